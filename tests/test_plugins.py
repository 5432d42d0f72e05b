"""Plugins: a real distribution with a real ``qlora_plugin`` entry point."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from qlora_plugin import qlora_recipe
from qlora_plugin.core.plugins import plugin_manager, reset_plugin_manager

ACME_PLUGIN = '''
"""A third-party plugin: a preset, and target discovery for its own architecture."""
import torch
from transformers import BitsAndBytesConfig, PretrainedConfig, PreTrainedModel

from qlora_plugin import hookimpl


class AcmeConfig(PretrainedConfig):
    model_type = "acme"

    def __init__(self, hidden=16, blocks=2, vocab=32, **kwargs):
        self.hidden, self.blocks, self.vocab = hidden, blocks, vocab
        super().__init__(**kwargs)


class AcmeBlock(torch.nn.Module):
    def __init__(self, hidden):
        super().__init__()
        self.mixer = torch.nn.Linear(hidden, hidden)
        self.ffn_in = torch.nn.Linear(hidden, 2 * hidden)
        self.ffn_out = torch.nn.Linear(2 * hidden, hidden)


class AcmeForCausalLM(PreTrainedModel):
    config_class = AcmeConfig

    def __init__(self, config):
        super().__init__(config)
        self.embed = torch.nn.Embedding(config.vocab, config.hidden)
        self.blocks = torch.nn.ModuleList(AcmeBlock(config.hidden) for _ in range(config.blocks))
        self.head = torch.nn.Linear(config.hidden, config.vocab)

    def get_output_embeddings(self):
        return self.head


@hookimpl
def qlora_presets():
    return {"acme-long": {"r": 12, "learning_rate": 1e-4}}


@hookimpl
def qlora_target_modules(model, recipe):
    if getattr(model.config, "model_type", None) != "acme":
        return None
    return [name for name, _ in model.named_modules() if name.endswith(".mixer")]


@hookimpl
def qlora_quantization_config(recipe, compute_dtype):
    if recipe.preset != "acme-long":
        return None
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=compute_dtype,
                              llm_int8_skip_modules=["head"])
'''
CLASHING_PLUGIN = """
from qlora_plugin import hookimpl


@hookimpl
def qlora_presets():
    return {"paper": {"r": 2}}
"""


def install(site: Path, distribution: str, module: str, source: str) -> None:
    """Make ``module`` importable and announce it through a ``qlora_plugin`` entry point."""
    (site / f"{module}.py").write_text(textwrap.dedent(source))
    info = site / f"{distribution}-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {distribution}\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(f"[qlora_plugin]\n{module} = {module}\n")


@pytest.fixture
def site(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(tmp_path))
    reset_plugin_manager()
    yield tmp_path
    reset_plugin_manager()


def test_an_installed_plugin_adds_a_preset_and_a_discovery_rule(site) -> None:
    install(site, "acme-qlora", "acme_qlora", ACME_PLUGIN)
    import acme_qlora

    model = acme_qlora.AcmeForCausalLM(acme_qlora.AcmeConfig())
    recipe = qlora_recipe("acme-long", model=model)

    assert recipe.r == 12 and recipe.learning_rate == 1e-4
    assert sorted(recipe.target_modules) == ["blocks.0.mixer", "blocks.1.mixer"]
    assert recipe.quantization_config(device="cpu").llm_int8_skip_modules == ["head"]
    assert "acme_qlora" in {name for name, _ in plugin_manager().list_name_plugin()}


def test_the_generic_rule_still_answers_for_other_architectures(site) -> None:
    install(site, "acme-qlora", "acme_qlora", ACME_PLUGIN)
    import acme_qlora

    from qlora_plugin.core.targets import qlora_target_modules as generic_rule

    model = acme_qlora.AcmeForCausalLM(acme_qlora.AcmeConfig())
    generic = set(generic_rule(model=model, recipe=qlora_recipe()))
    assert generic == {f"blocks.{i}.{part}" for i in range(2) for part in ("mixer", "ffn_in", "ffn_out")}
    assert qlora_recipe().quantization_config(device="cpu").llm_int8_skip_modules is None


def test_two_plugins_defining_one_preset_is_an_error_naming_both(site) -> None:
    install(site, "clash-qlora", "clash_qlora", CLASHING_PLUGIN)
    with pytest.raises(
        ValueError, match=r"'qlora_plugin.core.presets'.*'clash_qlora'|'clash_qlora'.*'qlora_plugin.core.presets'"
    ):
        qlora_recipe("paper")
