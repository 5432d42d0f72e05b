"""FSDP2 moves float-stored 4-bit weights as bytes, so no packed code is rewritten on the way.

Under FSDP the recipe stores the packed NF4 codes in the compute dtype (bf16), so that FSDP
shards them with everything else; some of those bf16 containers hold NaN bit patterns. When
all the tensors one FSDP2 unit all-gathers share one dtype, torch copies them into the
all-gather buffer as floats, and on GPUs that copy turns every NaN pattern into one canonical
NaN, rewriting four packed codes each time (bitsandbytes issue 1945; docs/multi-gpu.md has the
measurements). Where a unit's dtypes differ, FSDP2 already all-gathers raw bytes (uint8), and
those copies are exact. :func:`all_gather_as_bytes` makes it take that byte path for every
unit: the same bytes travel, nothing is converted.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import torch

from qlora_plugin.build.distributed import FSDP_NAME
from qlora_plugin.core import patches

if TYPE_CHECKING:
    from torch import nn

    from qlora_plugin.build.context import RunContext

PATCH = "torch-fsdp2-all-gather-bytes"


def guard_float_storage(context: RunContext) -> None:
    """4-bit weights are to be stored in a float dtype for FSDP: make FSDP2's all-gather byte-exact, and say so once.

    Called where that storage is chosen (:func:`qlora_plugin.build.quantization.storage_dtype`)
    and where a 4-bit layer is met under FSDP, so a model whose LoRA layers PEFT or Axolotl
    build is covered too. The patch applies to the whole process (:mod:`qlora_plugin.core.patches`);
    FSDP1 never reaches the wrapped function.
    """
    if all_gather_as_bytes():
        context.say_once(
            logging.INFO,
            "qlora: FSDP2 (fully_shard) will all-gather the 4-bit weights as bytes (its float all-gather "
            "rewrites packed codes that read as NaN on GPUs, bitsandbytes issue 1945)",
        )
    else:
        context.say_once(
            logging.WARNING,
            "qlora: FSDP2 (fully_shard) would all-gather the float-stored 4-bit weights as floats here, which "
            "can rewrite some of their packed codes on GPUs (bitsandbytes issue 1945); the plugin's byte-exact "
            "all-gather needs a torch version it was tested on (see the warning above)",
        )


def guard_packed_weights(layer: nn.Module, context: RunContext) -> None:
    """Before FSDP shards ``layer``, make sure its float-stored 4-bit weight will be all-gathered as bytes."""
    weight = getattr(layer, "weight", None)
    float_stored = weight is not None and weight.is_floating_point()
    if float_stored and context.sharding == FSDP_NAME:
        guard_float_storage(context)


def guard_packed_model(model: nn.Module, context: RunContext) -> None:
    """:func:`guard_packed_weights` for a model whose LoRA layers another library builds (Axolotl's PEFT config)."""
    for module in model.modules():
        if type(getattr(module, "weight", None)).__name__ == "Params4bit":
            guard_packed_weights(module, context)
            return  # the all-gather is chosen once per process


def all_gather_as_bytes() -> bool:
    """Make FSDP2 all-gather every unit as uint8 in this process (once); False where the patch is not allowed.

    FSDP2 picks the all-gather dtype in ``_get_all_gather_input_metadatas``: the inputs' one
    dtype, or uint8 when they differ, in which case it views every input and output as bytes.
    The wrapper keeps the per-input dtypes and sizes it returns and always answers uint8.
    """
    return patches.apply(PATCH, _answering_bytes)


def _answering_bytes(original: Any) -> Any:
    """FSDP2's ``_get_all_gather_input_metadatas`` with uint8 as the all-gather dtype."""

    def metadatas_as_bytes(param_all_gather_inputs: list[list[torch.Tensor]]) -> Any:
        input_dtypes, input_numels, _dtype = original(param_all_gather_inputs)
        return input_dtypes, input_numels, torch.uint8

    metadatas_as_bytes.__wrapped__ = original  # type: ignore[attr-defined]
    metadatas_as_bytes._qlora_as_bytes = True  # type: ignore[attr-defined]
    return metadatas_as_bytes
