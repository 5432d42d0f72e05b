"""Axolotl integration: the plugin, its config schema and the section's expansion into Axolotl keys."""
