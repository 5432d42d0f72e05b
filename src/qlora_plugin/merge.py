"""``qlora merge``: a QLoRA adapter folded into its base, saved as a plain model.

The adapter was trained against the 4-bit base, so that is what it is merged
into: the base is loaded with the recipe's quantization (read from the
adapter's ``qlora_recipe.json``; NF4 with double quant when there is none),
dequantized to ``--dtype``, the LoRA weights are added to the dequantized
weights, and the result is saved as safetensors with the tokenizer. It loads
with ``AutoModelForCausalLM.from_pretrained`` alone: no PEFT, no bitsandbytes.

Nothing half-written is ever left at ``--out``: everything goes to a hidden
temporary directory beside it, which replaces ``--out`` in one rename at the end
and is removed if the merge stops early.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from qlora_plugin.errors import QLoRAConfigError

if TYPE_CHECKING:
    import torch

    from qlora_plugin.recipe import QLoRARecipe

ADAPTER_CONFIG = "adapter_config.json"
DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}
TOKENIZER_FILES = ("tokenizer_config.json", "tokenizer.json", "tokenizer.model")


def read_adapter(adapter_dir: str | os.PathLike[str], base: str | None = None) -> tuple[dict[str, Any], str]:
    """The adapter's config and the base model it names (or ``base``)."""
    path = Path(adapter_dir)
    if not path.is_dir():
        raise QLoRAConfigError("ADAPTER_DIR", os.fspath(path), "is not a directory",
                               "pass the directory the trainer saved the adapter to")
    config_file = path / ADAPTER_CONFIG
    if not config_file.is_file():
        raise QLoRAConfigError("ADAPTER_DIR", os.fspath(path), f"holds no {ADAPTER_CONFIG}",
                               "pass a directory with adapter_config.json and adapter_model.safetensors")
    config = json.loads(config_file.read_text(encoding="utf-8"))
    if config.get("peft_type", "LORA") != "LORA":
        raise QLoRAConfigError("peft_type", config.get("peft_type"), "is not a LoRA adapter",
                               "merge LoRA / QLoRA adapters only")
    base = base or config.get("base_model_name_or_path")
    if not base:
        raise QLoRAConfigError("base_model_name_or_path", None, "the adapter does not name its base model",
                               "pass --base PATH")
    return config, base


def adapter_recipe(adapter_dir: str | os.PathLike[str]) -> tuple[QLoRARecipe, bool]:
    """The recipe saved with the adapter, and whether one was found."""
    from qlora_plugin.recipe import RECIPE_FILE, QLoRARecipe, qlora_recipe

    path = Path(adapter_dir) / RECIPE_FILE
    if not path.is_file():
        return qlora_recipe(), False
    return QLoRARecipe(**json.loads(path.read_text(encoding="utf-8"))), True


def check_out(out: Path, force: bool, keep: list[Path]) -> None:
    """Refuse an ``--out`` that would destroy something: non-empty without ``--force``, or an input."""
    resolved = out.resolve()
    for path in keep:
        path = path.resolve()
        if resolved == path or resolved in path.parents:
            raise QLoRAConfigError("--out", os.fspath(out), f"would replace the input {os.fspath(path)}",
                                   "choose a directory outside the adapter and the base model")
    if out.exists() and not out.is_dir():
        raise QLoRAConfigError("--out", os.fspath(out), "is a file", "choose a directory path")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise QLoRAConfigError("--out", os.fspath(out), "is not empty",
                               "choose a new directory, or pass --force to replace it")


@contextlib.contextmanager
def staged_directory(out: Path) -> Iterator[Path]:
    """A temporary directory beside ``out`` that becomes ``out`` if the block completes."""
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent))
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    old = None
    if out.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".old", dir=out.parent))
        os.rename(out, old / "previous")
    try:
        os.rename(staging, out)
    except BaseException:
        if old is not None:
            os.rename(old / "previous", out)
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def load_dequantized_base(base: str, recipe: QLoRARecipe, dtype: torch.dtype) -> Any:
    """The base as training saw it: loaded in 4 bits with the recipe, then dequantized to ``dtype``."""
    import torch

    from qlora_plugin.models import auto_class, load_config

    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = auto_class(load_config(base)).from_pretrained(
        base, quantization_config=recipe.bnb_config(device), dtype=dtype, device_map={"": device},
    )
    model = model.dequantize()
    return model.to(dtype)


def merge_adapter(adapter_dir: str | os.PathLike[str], out: str | os.PathLike[str], dtype: str = "bf16",
                  base: str | None = None, force: bool = False, show_progress: bool = True) -> dict[str, Any]:
    """Merge the adapter at ``adapter_dir`` into its dequantized base and save it to ``out``."""
    import torch

    from qlora_plugin.device import torch_dtype

    if dtype not in DTYPES:
        raise QLoRAConfigError("--dtype", dtype, "is not supported", f"use one of {list(DTYPES)}")
    _, base = read_adapter(adapter_dir, base)
    out_path = Path(out)
    keep = [Path(adapter_dir)] + ([Path(base)] if Path(base).exists() else [])
    check_out(out_path, force, keep)
    recipe, found = adapter_recipe(adapter_dir)
    target_dtype = torch_dtype(DTYPES[dtype])

    with _progress(show_progress) as progress, staged_directory(out_path) as staging:
        step = progress.add_task("load the base in 4 bits and dequantize", total=1)
        model = load_dequantized_base(base, recipe, target_dtype)
        progress.advance(step)
        step = progress.add_task("load the adapter", total=1)
        from peft import PeftModel
        from peft.tuners.lora import LoraLayer

        peft_model = PeftModel.from_pretrained(model, os.fspath(adapter_dir))
        progress.advance(step)
        layers = [module for module in peft_model.modules() if isinstance(module, LoraLayer)]
        step = progress.add_task("merge the LoRA weights", total=len(layers))
        with torch.no_grad():
            for layer in layers:
                layer.merge(safe_merge=True)
                progress.advance(step)
        merged = peft_model.unload()
        merged.to(target_dtype)
        step = progress.add_task("save safetensors and the tokenizer", total=2)
        merged.save_pretrained(staging, safe_serialization=True)
        progress.advance(step)
        tokenizer_from = _save_tokenizer(Path(adapter_dir), base, staging)
        progress.advance(step)
        files = sorted(p.name for p in staging.iterdir())
    return {
        "out": os.fspath(out_path), "base": base, "adapter": os.fspath(adapter_dir), "dtype": DTYPES[dtype],
        "merged_layers": len(layers), "quantization": f"{recipe.quant_type}, double quant {recipe.double_quant}",
        "recipe_file_found": found, "tokenizer_from": tokenizer_from, "files": files,
    }


def _save_tokenizer(adapter_dir: Path, base: str, staging: Path) -> str | None:
    """Copy the tokenizer (the adapter's own if it has one, else the base's) into ``staging``."""
    from transformers import AutoTokenizer

    source = os.fspath(adapter_dir) if any((adapter_dir / f).is_file() for f in TOKENIZER_FILES) else base
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError):
        return None
    tokenizer.save_pretrained(staging)
    return source


@contextlib.contextmanager
def _progress(show: bool) -> Iterator[Any]:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from qlora_plugin.console import console

    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console(stderr=True), disable=not show, transient=False) as progress:
        yield progress


def command(args: Any) -> int:
    """``qlora merge``."""
    from qlora_plugin.console import console, print_json

    summary = merge_adapter(args.adapter, args.out, args.dtype, args.base, args.force, show_progress=True)
    if args.json:
        print_json(summary)
        return 0
    out = console()
    out.print(f"merged {summary['merged_layers']} LoRA layers into {summary['base']} "
              f"(dequantized from {summary['quantization']}) -> [bold]{summary['out']}[/bold] ({summary['dtype']})")
    if not summary["recipe_file_found"]:
        out.print("[yellow]note:[/yellow] the adapter has no qlora_recipe.json; the base was quantized as NF4 "
                  "with double quant, the recipe defaults")
    if summary["tokenizer_from"] is None:
        out.print("[yellow]note:[/yellow] no tokenizer found with the adapter or the base; none saved")
    out.print("load it with: AutoModelForCausalLM.from_pretrained(" + repr(summary["out"]) + ")")
    return 0
