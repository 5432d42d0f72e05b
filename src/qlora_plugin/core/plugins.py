"""The one plugin manager, and the queries that combine the plugins' answers.

Built-in hook implementations (:mod:`~qlora_plugin.core.presets`, the generic target
rule in :mod:`~qlora_plugin.core.targets`, the bitsandbytes backend in
:mod:`~qlora_plugin.build.quantization`) are registered first, then whatever the
entry-point group ``qlora_plugin`` names. The built-in modules never import this one:
the recipe and the tools ask the plugins through the functions here.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Any, cast

import pluggy

from qlora_plugin.core import hookspecs, presets, targets
from qlora_plugin.core import quantization_config as bitsandbytes_backend
from qlora_plugin.core.errors import QLoRAConfigError, nearest
from qlora_plugin.core.hookspecs import RecipeFields

if TYPE_CHECKING:
    import torch
    from torch import nn

ENTRY_POINT_GROUP = "qlora_plugin"
BUILTIN_PLUGINS = {module.__name__: module for module in (presets, targets, bitsandbytes_backend)}


@functools.cache
def plugin_manager() -> pluggy.PluginManager:
    """Return the plugin manager, loading built-ins and entry points on first use.

    Built-ins are registered first; pluggy calls the most recently registered
    implementations first, so installed plugins answer before the built-in
    generic rules of ``firstresult`` hooks.
    """
    manager = pluggy.PluginManager(hookspecs.PROJECT_NAME)
    manager.add_hookspecs(hookspecs)
    for name, module in BUILTIN_PLUGINS.items():
        manager.register(module, name=name)
    manager.load_setuptools_entrypoints(ENTRY_POINT_GROUP)
    return manager


def reset_plugin_manager() -> None:
    """Forget the loaded plugins, so the next use finds entry points anew."""
    plugin_manager.cache_clear()
    all_presets.cache_clear()


@functools.cache
def all_presets() -> dict[str, dict[str, Any]]:
    """Collect the presets of every plugin; a name offered twice is an error naming both plugins."""
    found: dict[str, dict[str, Any]] = {}
    owner: dict[str, str] = {}
    for impl in reversed(plugin_manager().hook.qlora_presets.get_hookimpls()):
        presets = cast("dict[str, dict[str, Any]] | None", impl.function())  # pluggy: returns object
        for name, fields in (presets or {}).items():
            if name in found:
                raise ValueError(
                    f"preset {name!r} is defined by two plugins, {owner[name]!r} and "
                    f"{impl.plugin_name!r}; uninstall one of them or rename the preset in it"
                )
            found[name], owner[name] = dict(fields), impl.plugin_name
    return found


def preset_fields(name: str) -> dict[str, Any]:
    """Return a copy of the fields of preset ``name``."""
    known = all_presets()
    if not isinstance(name, str) or name not in known:
        raise QLoRAConfigError(
            "preset", name, "no such preset" + nearest(str(name), known), f"use one of {sorted(known)}"
        )
    return dict(known[name])


def discover_targets(model: nn.Module, recipe: RecipeFields) -> list[str]:
    """Ask the plugins (then the generic rule) for the targets of ``model``, less the recipe's exclusions."""
    found = plugin_manager().hook.qlora_target_modules(model=model, recipe=recipe)
    return targets.without_user_exclusions(found, recipe, type(model).__name__)


def quantization_config(recipe: RecipeFields, compute_dtype: torch.dtype, storage_dtype: torch.dtype) -> Any:
    """The quantization config the plugins give for ``recipe`` (bitsandbytes 4-bit unless one overrides it)."""
    return plugin_manager().hook.qlora_quantization_config(
        recipe=recipe, compute_dtype=compute_dtype, storage_dtype=storage_dtype
    )


def only_builtin_targets() -> bool:
    """True when no installed plugin answers ``qlora_target_modules`` (the generic rule decides alone)."""
    impls = plugin_manager().hook.qlora_target_modules.get_hookimpls()
    return all(impl.plugin_name in BUILTIN_PLUGINS for impl in impls)
