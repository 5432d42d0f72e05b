"""Does an adapter fit a base model? Checked from shapes alone, before any weight is loaded.

PEFT loads an adapter onto a base it was not trained for with at best a shape error deep in a
traceback, and where module names differ (fewer layers, other names) with only a warning: the
adapter's weights are then simply left out. Every LoRA weight in ``adapter_model.safetensors`` is
compared here with the module of the same name in the base, built on the meta device.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, NoReturn

from qlora_plugin.core.errors import QLoRAConfigError

WEIGHTS = "adapter_model.safetensors"
PREFIX = "base_model.model."
# LoRA weight -> (which of the module's dimensions its shape holds, as (rows, columns)); "r" is the rank
LORA_SHAPES = {
    "lora_A.weight": ("r", "in"),
    "lora_B.weight": ("out", "r"),
    "lora_embedding_A": ("r", "in"),
    "lora_embedding_B": ("out", "r"),
}


def check_adapter_fits(adapter_dir: str | os.PathLike[str], base: str) -> int:
    """Raise if a LoRA weight names a module the base lacks, or has another shape; return how many were checked."""
    weights = Path(adapter_dir) / WEIGHTS
    if not weights.is_file():
        return 0  # older .bin adapters: PEFT checks what it can
    from safetensors import safe_open

    from qlora_plugin.build.models import meta_model

    with safe_open(os.fspath(weights), "pt") as handle:
        shapes = {key: tuple(handle.get_slice(key).get_shape()) for key in handle.keys()}  # noqa: SIM118
    modules = dict(meta_model(base).named_modules())
    checked = 0
    for key, shape in sorted(shapes.items()):
        name, kind = _split(key)
        if kind is None:
            continue
        module = modules.get(name)
        if module is None and not _is_parameter(modules, name):
            _misfit(adapter_dir, base, f"adapts {name}, a layer the base does not have")
        weight = getattr(module, "weight", None)
        if weight is None or weight.dim() != 2:
            continue  # LoRA on a parameter (MoE experts, PEFT's target_parameters): PEFT checks its shapes
        out_features, in_features = (weight.shape[1], weight.shape[0]) if "embedding" in kind else weight.shape
        expected = tuple(
            {"in": in_features, "out": out_features}.get(d, shape[i]) for i, d in enumerate(LORA_SHAPES[kind])
        )
        if shape != expected:
            _misfit(
                adapter_dir, base, f"has {key} of shape {list(shape)}, and the base's {name} needs {list(expected)}"
            )
        checked += 1
    return checked


def _is_parameter(modules: dict[str, Any], name: str) -> bool:
    """True where ``name`` is a parameter of a module (``...experts.gate_up_proj``), not a module."""
    import torch

    owner, _, attribute = name.rpartition(".")
    return owner in modules and isinstance(getattr(modules[owner], attribute, None), torch.nn.Parameter)


def _split(key: str) -> tuple[str, str | None]:
    """``base_model.model.<module>.<lora weight>`` -> (module name, kind); kind None for other saved weights."""
    name = key.removeprefix(PREFIX)
    for kind in LORA_SHAPES:
        marker = "." + kind
        if marker in name:  # PEFT's nested wrappers (two parameters of one module) add ".base_layer"
            return name.split(marker, 1)[0].replace(".base_layer", ""), kind
    return name, None


def _misfit(adapter_dir: str | os.PathLike[str], base: str, what: str) -> NoReturn:
    raise QLoRAConfigError(
        "ADAPTER_DIR",
        os.fspath(adapter_dir),
        f"does not fit the base {base}: {WEIGHTS} {what} (the adapter was trained on another base)",
        "pass --base with the model the adapter was trained on",
    )
