"""Pick dtypes and precision flags from the device the run is on."""

from __future__ import annotations

from typing import TYPE_CHECKING

from qlora_plugin.core.errors import QLoRAConfigError

if TYPE_CHECKING:
    import torch

DTYPE_NAMES = {
    "bfloat16": "bfloat16",
    "bf16": "bfloat16",
    "float16": "float16",
    "fp16": "float16",
    "half": "float16",
    "float32": "float32",
    "fp32": "float32",
    "uint8": "uint8",
}


def torch_dtype(name: str) -> torch.dtype:
    """``"bf16"`` -> ``torch.bfloat16``; the names of :data:`DTYPE_NAMES`."""
    import torch

    return getattr(torch, DTYPE_NAMES[name])


def training_device() -> str:
    """The device a trainer started now would train on: ``"cuda"`` or ``"cpu"``."""
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def resolve_compute_dtype(name: str, device: str | None = None) -> torch.dtype:
    """Turn the recipe's ``compute_dtype`` into the dtype to run on ``device``.

    ``"auto"`` is bfloat16 where the device supports it (recent GPUs, CPUs) and
    float16 on GPUs without bfloat16. An explicit dtype the device cannot run
    is an error.
    """
    import torch

    device = device or training_device()
    bf16_ok = device != "cuda" or torch.cuda.is_bf16_supported()
    if name == "auto":
        return torch.bfloat16 if bf16_ok else torch.float16
    dtype = torch_dtype(name)
    if dtype == torch.bfloat16 and not bf16_ok:
        raise QLoRAConfigError(
            "compute_dtype",
            name,
            "this GPU cannot compute in bfloat16",
            "set compute_dtype='float16' (or 'auto')",
        )
    return dtype


def precision_flags(compute_dtype: torch.dtype, device: str | None = None) -> dict[str, bool]:
    """The trainer's ``bf16``/``fp16`` flags for ``compute_dtype`` on ``device``.

    Mixed precision is a GPU feature in the trainers; on a CPU both stay off and
    the 4-bit layers still compute in ``compute_dtype``.
    """
    import torch

    on_gpu = (device or training_device()) == "cuda"
    return {
        "bf16": on_gpu and compute_dtype == torch.bfloat16,
        "fp16": on_gpu and compute_dtype == torch.float16,
    }
