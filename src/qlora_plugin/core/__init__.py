"""The recipe and what it is made of: fields, presets, targets, quantization, the plugin hooks.

The lowest layer: it imports nothing else of the package. Conveniences that need a
higher layer reach it through :mod:`qlora_plugin.core.seams`.
"""
