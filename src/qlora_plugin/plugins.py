"""The one plugin manager: built-in hook implementations plus entry points."""

from __future__ import annotations

import functools

import pluggy

from qlora_plugin import hookspecs

ENTRY_POINT_GROUP = "qlora_plugin"
BUILTIN_PLUGINS = (
    "qlora_plugin.presets",
    "qlora_plugin.targets",
    "qlora_plugin.quantization",
)


@functools.cache
def plugin_manager() -> pluggy.PluginManager:
    """Return the plugin manager, loading built-ins and entry points on first use.

    Built-ins are registered first; pluggy calls the most recently registered
    implementations first, so installed plugins answer before the built-in
    generic rules of ``firstresult`` hooks.
    """
    import importlib

    manager = pluggy.PluginManager(hookspecs.PROJECT_NAME)
    manager.add_hookspecs(hookspecs)
    for module_name in BUILTIN_PLUGINS:
        manager.register(importlib.import_module(module_name), name=module_name)
    manager.load_setuptools_entrypoints(ENTRY_POINT_GROUP)
    return manager


def reset_plugin_manager() -> None:
    """Forget the loaded plugins, so the next use finds entry points anew."""
    plugin_manager.cache_clear()
    from qlora_plugin import presets

    presets.all_presets.cache_clear()
