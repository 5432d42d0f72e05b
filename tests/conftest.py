"""Shared fixtures: a tiny Llama and its tokenizer, an eight-layer config, sentences to memorise, a CPU fast path."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("AXOLOTL_DO_NOT_TRACK", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# `make mutate` (docs/mutation.md): mutmut's coverage run sets MUTANT_UNDER_TEST=stats, which the CLI tests'
# subprocesses would inherit and fail on (they cannot read mutmut's config); mutmut keeps its own copy.
# Mutant runs keep the variable, so a subprocess runs the mutant too.
if os.environ.get("MUTANT_UNDER_TEST") == "stats":
    del os.environ["MUTANT_UNDER_TEST"]


def pytest_collection_modifyitems(config, items):
    """Under mutmut, with a mutant active: test files with the cheapest tests first, so that with -x a
    killed mutant stops early. Each file keeps its own order (and its module fixtures); nothing changes
    in a normal run."""
    import json
    from pathlib import Path

    stats = Path(__file__).resolve().parents[1] / "mutmut-stats.json"  # mutants/mutmut-stats.json
    if os.environ.get("MUTANT_UNDER_TEST", "") in ("", "stats", "fail", "list_all_tests") or not stats.is_file():
        return
    durations = json.loads(stats.read_text())["duration_by_test"]
    cost: dict[str, float] = {}
    for item in items:
        cost[item.path] = cost.get(item.path, 0.0) + durations.get(item.nodeid, 0.0)
    items.sort(key=lambda item: cost[item.path])  # stable: within a file, the collected order


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A two-layer Llama (random init) and a word-level tokenizer, saved to a directory."""
    from tiny import tiny_llama_with_tokenizer

    return tiny_llama_with_tokenizer(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def eight_layer_config(tmp_path_factory) -> Path:
    """A Llama config only (read on the meta device): eight layers, so offloading differs from full
    recompute and FSDP has layers to shard; untied head."""
    from transformers import LlamaConfig

    directory = tmp_path_factory.mktemp("eight-layers")
    LlamaConfig(
        vocab_size=32000,
        hidden_size=512,
        intermediate_size=1408,
        num_hidden_layers=8,
        num_attention_heads=8,
        num_key_value_heads=2,
        tie_word_embeddings=False,
    ).save_pretrained(directory)
    return directory


@pytest.fixture(scope="session")
def memorisable_dataset():
    """Eight sentences, repeated: a tiny model can learn them in a few dozen steps."""
    from datasets import Dataset
    from tiny import SENTENCES

    return Dataset.from_dict({"text": SENTENCES * 4})


@pytest.fixture(autouse=True)
def package_logger_as_found():
    """Axolotl's logging setup puts a filter on loggers it finds (ours too); each test starts without it."""
    import logging

    logger = logging.getLogger("qlora_plugin")
    saved = (list(logger.filters), list(logger.handlers), logger.level, logger.propagate)
    logger.filters.clear()
    yield
    logger.filters[:], logger.handlers[:], logger.level, logger.propagate = saved[0], saved[1], saved[2], saved[3]


@pytest.fixture
def fast_path_on_cpu(monkeypatch):
    """The fast path on a CPU (its PyTorch reference paths), with no model left waiting for it before or after."""
    from qlora_plugin.core.environment import FAST_PATH_ON_CPU
    from qlora_plugin.fastpath import activation

    monkeypatch.setenv(FAST_PATH_ON_CPU, "1")
    activation.disarm()
    yield
    activation.disarm()
