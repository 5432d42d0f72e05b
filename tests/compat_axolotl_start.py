"""An Axolotl plugin for the compatibility matrix: both runs of an Axolotl cell start from one adapter.

The plugin run saves its freshly built LoRA weights to the file ``QLORA_COMPAT_ADAPTER_SAVE``
names; the plugin-free baseline loads them from ``QLORA_COMPAT_ADAPTER_LOAD`` before its first
step. Without it the two runs start from different random adapters (the plugin seeds them its
own way), and the loss comparison measures two initialisations instead of the training.
"""

from __future__ import annotations

import os
from typing import Any

from axolotl.integrations.base import BasePlugin

SAVE_ENV = "QLORA_COMPAT_ADAPTER_SAVE"
LOAD_ENV = "QLORA_COMPAT_ADAPTER_LOAD"


class SameStartingAdapter(BasePlugin):
    """Saves (plugin run) or loads (baseline) the LoRA weights right after Axolotl builds them."""

    def post_lora_load(self, cfg: Any, model: Any) -> None:
        import torch

        adapters = {name: p for name, p in model.named_parameters() if "lora_" in name}
        if path := os.environ.get(SAVE_ENV):
            torch.save({name: p.detach().float().cpu() for name, p in adapters.items()}, path)
        if path := os.environ.get(LOAD_ENV):
            saved = torch.load(path)
            if set(saved) != set(adapters):
                raise RuntimeError(f"adapter names differ from {path}: {sorted(set(saved) ^ set(adapters))[:4]}")
            with torch.no_grad():
                for name, p in adapters.items():
                    p.copy_(saved[name])
