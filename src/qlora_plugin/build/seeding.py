"""Seeded adapter initialisation: the same config and seed give the same LoRA weights at step 0.

PEFT draws each ``lora_A`` from torch's global generator while it builds the
layers, which TRL and Axolotl do before their trainer seeds anything, so two
runs of one config started from different generator states. With the recipe,
each LoRA layer is drawn from its own generator seeded by the run's seed and
the layer's name (the same weights whatever ran before, and the global
generator untouched); the Axolotl plugin seeds the global generator just before
Axolotl builds its layers.

The run's seed is its run context's (:mod:`qlora_plugin.build.context`): for layers
built while a trainer is constructed (TRL's ``SFTTrainer`` wraps the model while its
``__init__`` runs), the context of that trainer's arguments, with their ``seed``
(:func:`qlora_plugin.build.trainer_frame.trainer_being_built`): it travels with the config, never with the
recipe, so one recipe behind several configs or trainers gives each its own seed.
Layers built outside a trainer (``get_peft_model`` by hand) use :data:`DEFAULT_SEED`.
"""

from __future__ import annotations

import contextlib
import zlib
from collections.abc import Iterator

import torch
from transformers import set_seed

DEFAULT_SEED = 42  # transformers' TrainingArguments.seed default


def layer_seed(seed: int, name: str) -> int:
    """A seed for the layer ``name`` of a run seeded with ``seed`` (stable across processes)."""
    return (seed * 1_000_003 + zlib.crc32(name.encode("utf-8"))) % 2**63


@contextlib.contextmanager
def seeded_layer_init(seed: int, name: str | None) -> Iterator[None]:
    """Build one LoRA layer from a generator of its own, seeded by the run's ``seed`` and the layer name."""
    with torch.random.fork_rng(devices=[]):  # PEFT creates the adapter weights on the CPU, then moves them
        torch.manual_seed(layer_seed(seed, name or ""))
        yield


def seed_before_adapters(seed: int | None) -> None:
    """Seed torch's generators for a host (Axolotl) that builds its LoRA layers itself, next."""
    set_seed(DEFAULT_SEED if seed is None else int(seed))
