"""The package's shape: the public API, imports that flow one way, the README's field table."""

from __future__ import annotations

import dataclasses
import importlib.util
import shutil
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

REPO = Path(__file__).resolve().parent.parent


def load_script(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, REPO / "scripts" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_public_api_keeps_its_names() -> None:
    """What README and users import: the recipe, its class, the hook marker."""
    import peft

    from qlora_plugin import QLoRARecipe, hookimpl, qlora_recipe

    recipe = qlora_recipe()
    assert isinstance(recipe, QLoRARecipe) and isinstance(recipe, peft.LoraConfig)
    assert callable(hookimpl)
    for method in ("sft_config", "training_args", "callbacks", "optimizer_cls_and_kwargs", "load_model"):
        assert callable(getattr(recipe, method)), method


def test_the_axolotl_plugin_keeps_its_public_path() -> None:
    """``plugins: [qlora_plugin.axolotl.QLoRAPlugin]`` in a user's config (needs the ``axolotl`` extra)."""
    pytest.importorskip("axolotl")
    from qlora_plugin.axolotl import QLoRAPlugin
    from qlora_plugin.integrations.axolotl.plugin import QLoRAPlugin as PluginImplementation

    assert QLoRAPlugin is PluginImplementation


def test_the_command_line_entry_point_is_the_one_pyproject_names() -> None:
    text = (REPO / "pyproject.toml").read_text()
    assert 'qlora = "qlora_plugin.commands.main:main"' in text
    done = subprocess.run(
        [sys.executable, "-m", "qlora_plugin.commands.main", "presets", "--json"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0 and '"paper"' in done.stdout, done.stderr[-2000:]


def test_imports_flow_one_way_with_no_circle() -> None:
    check = load_script("check_layers")
    edges = check.graph()
    assert len(edges) > 50
    assert check.problems_in(edges) == []


def test_the_layer_check_finds_an_upward_import_and_a_circle(tmp_path: Path) -> None:
    """The check above can fail: a copy of the package with a planted upward import and circle."""
    check = load_script("check_layers")
    root = tmp_path / "src"
    shutil.copytree(REPO / "src" / "qlora_plugin", root / "qlora_plugin")
    errors = root / "qlora_plugin" / "core" / "errors.py"
    errors.write_text(errors.read_text() + "\n\ndef _late() -> None:\n    from qlora_plugin.commands import main\n")
    fields = root / "qlora_plugin" / "core" / "fields.py"
    fields.write_text(fields.read_text() + "\nfrom qlora_plugin.core import recipe as _recipe\n")
    targets = root / "qlora_plugin" / "core" / "targets.py"  # a circle closed only for the type checker
    closing = "\nif TYPE_CHECKING:\n    from qlora_plugin.core.recipe import QLoRARecipe\n"
    targets.write_text(targets.read_text() + closing)
    problems = check.problems_in(check.graph(root))
    assert any(p.startswith("upward import: qlora_plugin.core.errors (core)") for p in problems), problems
    assert any(p.startswith("import circle:") and "qlora_plugin.core.fields" in p for p in problems), problems
    assert any(p.startswith("import circle:") and "qlora_plugin.core.targets" in p for p in problems), problems
    assert check.deferred_problems(root) == [
        "import inside a function: qlora_plugin.core.errors imports qlora_plugin.commands (move it to the top)"
    ]


def test_no_import_names_a_module_that_does_not_exist(tmp_path: Path) -> None:
    """A stale path after a move (inside a function it fails only when that function runs) is found."""
    check = load_script("check_layers")
    assert check.missing_imports() == []
    root = tmp_path / "src"
    shutil.copytree(REPO / "src" / "qlora_plugin", root / "qlora_plugin")
    errors = root / "qlora_plugin" / "core" / "errors.py"
    errors.write_text(errors.read_text() + "\n\ndef _late() -> None:\n    from qlora_plugin.core.section import X\n")
    assert check.missing_imports(root) == [
        "missing module: qlora_plugin.core.errors imports qlora_plugin.core.section, which does not exist"
    ]


def test_package_imports_are_at_the_top_except_where_they_defer_a_heavy_library() -> None:
    """``qlora --help`` stays light only because a few deferrals are deliberate (scripts/check_layers.py)."""
    check = load_script("check_layers")
    assert check.deferred_problems() == []


def test_every_recipe_field_has_help_and_its_choices() -> None:
    from qlora_plugin.core.fields import CHOICES, HELP, RECIPE_FIELDS
    from qlora_plugin.core.recipe import QLoRARecipe

    declared = {f.name: f for f in dataclasses.fields(QLoRARecipe)}
    for name in RECIPE_FIELDS:
        assert declared[name].metadata.get("help") == HELP[name], name
        assert declared[name].metadata.get("choices") == CHOICES.get(name), name


def test_the_readme_field_table_is_generated_from_the_metadata() -> None:
    done = subprocess.run(
        [sys.executable, "scripts/field_table.py", "--check"], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stdout + done.stderr[-2000:]


def test_every_patch_in_the_registry_is_documented_with_its_range() -> None:
    from qlora_plugin.core.patches import PATCHES

    documented = (REPO / "docs" / "compatibility.md").read_text(encoding="utf-8")
    for name, patch in PATCHES.items():
        assert f"| `{name}` | {patch.package} | `{patch.tested}` |" in documented, name


def test_fields_the_recipe_redeclares_keep_peft_s_own_metadata() -> None:
    """PEFT reads flags such as ``is_lora_variant`` back from its fields: the recipe's help must keep them."""
    import peft

    from qlora_plugin.core.recipe import QLoRARecipe

    declared = {f.name: f for f in dataclasses.fields(QLoRARecipe)}
    for peft_field in dataclasses.fields(peft.LoraConfig):
        kept = {key: value for key, value in peft_field.metadata.items() if key != "help"}
        assert {key: declared[peft_field.name].metadata.get(key) for key in kept} == kept, peft_field.name


def test_a_dora_recipe_builds_and_trains_on_a_4bit_model(tmp_path: Path) -> None:
    import torch
    from _tiny_qlora import VOCAB, load_4bit, tiny_llama_checkpoint
    from peft import get_peft_model

    from qlora_plugin import qlora_recipe

    model = get_peft_model(load_4bit(tiny_llama_checkpoint(tmp_path / "llama")), qlora_recipe(use_dora=True))
    batch = torch.randint(3, VOCAB, (2, 8), generator=torch.Generator().manual_seed(0))
    model(input_ids=batch, labels=batch).loss.backward()
    magnitudes = [p for name, p in model.named_parameters() if "lora_magnitude_vector" in name]
    assert magnitudes and all(p.grad is not None for p in magnitudes)
