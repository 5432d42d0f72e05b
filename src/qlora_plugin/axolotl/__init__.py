"""Axolotl integration: ``plugins: [qlora_plugin.axolotl.QLoRAPlugin]`` plus a ``qlora:`` section."""

from qlora_plugin.integrations.axolotl.plugin import QLoRAPlugin

__all__ = ["QLoRAPlugin"]
