"""Seeded adapter initialisation: the same config and seed give the same LoRA weights at step 0.

PEFT draws each ``lora_A`` from torch's global generator while it builds the
layers, which TRL and Axolotl do before their trainer seeds anything, so two
runs of one config started from different generator states. With the recipe,
each LoRA layer is drawn from its own generator seeded by the run's seed and
the layer's name (the same weights whatever ran before, and the global
generator untouched); the Axolotl plugin seeds the global generator just before
Axolotl builds its layers.
"""

from __future__ import annotations

import contextlib
import zlib
from collections.abc import Iterator
from typing import Any

DEFAULT_SEED = 42  # transformers' TrainingArguments.seed default
_SEED = "_qlora_init_seed"


def remember_seed(recipe: Any, seed: int | None) -> None:
    """Use ``seed`` (the trainer's) for the adapters ``recipe`` builds from now on."""
    recipe.__dict__[_SEED] = DEFAULT_SEED if seed is None else int(seed)


def layer_seed(seed: int, name: str) -> int:
    """A seed for the layer ``name`` of a run seeded with ``seed`` (stable across processes)."""
    return (seed * 1_000_003 + zlib.crc32(name.encode("utf-8"))) % 2**63


@contextlib.contextmanager
def seeded_layer_init(recipe: Any, name: str | None) -> Iterator[None]:
    """Build one LoRA layer from a generator of its own, seeded by the run and the layer name."""
    import torch

    seed = recipe.__dict__.get(_SEED, DEFAULT_SEED)
    with torch.random.fork_rng(devices=[]):  # PEFT creates the adapter weights on the CPU, then moves them
        torch.manual_seed(layer_seed(seed, name or ""))
        yield


def seed_before_adapters(seed: int | None) -> None:
    """Seed torch's generators for a host (Axolotl) that builds its LoRA layers itself, next."""
    from transformers import set_seed

    set_seed(DEFAULT_SEED if seed is None else int(seed))
