"""``qlora merge``: a QLoRA adapter folded into its base, saved as a plain model.

The adapter was trained against the 4-bit base, so that is what it is merged
into: the base is loaded with the quantization training used (read from the
run's records, :mod:`qlora_plugin.tools.provenance`; never guessed), dequantized to
``--dtype``, the LoRA weights are added to the dequantized weights, and the
result is saved as safetensors with the tokenizer. It loads with
``AutoModelForCausalLM.from_pretrained`` alone: no PEFT, no bitsandbytes.

Nothing half-written is ever left at ``--out``: a destination that could not be
replaced (an unwritable parent, a mount point) is refused before the merge
starts; everything goes to a hidden temporary directory beside it, which
replaces ``--out`` in one rename at the end and is removed if the merge stops
early (an error, a full disk, SIGINT or SIGTERM). The result gets the
permissions ``mkdir`` would give, or those of the ``--out`` it replaces.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from qlora_plugin.core.device import torch_dtype
from qlora_plugin.core.errors import QLoRAConfigError
from qlora_plugin.core.fields import RECIPE_FIELDS
from qlora_plugin.core.files import looks_local, path_problem, read_json, require
from qlora_plugin.core.run_record import compare_record, model_format
from qlora_plugin.core.safe_io import check_writable_destination, staged_directory
from qlora_plugin.tools.adapter_fit import check_adapter_fits
from qlora_plugin.tools.console import console
from qlora_plugin.tools.provenance import trained_format

if TYPE_CHECKING:
    import torch

    from qlora_plugin.core.recipe import QLoRARecipe
    from qlora_plugin.tools.provenance import TrainedFormat

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")  # PEFT's names, safetensors first
DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}
TOKENIZER_FILES = ("tokenizer_config.json", "tokenizer.json", "tokenizer.model")


def read_adapter(adapter_dir: str | os.PathLike[str], base: str | None = None) -> tuple[dict[str, Any], str]:
    """The adapter's config and the base model it names (or ``base``), each file checked for what it is.

    The adapter's weights must be on disk: PEFT would otherwise ask the hub for them and report a
    network error. A local base path is read as a path only; a relative one is read from the working
    directory, as PEFT and transformers read it, and an error says so.
    """
    restore = "restore the adapter directory from the run that trained it"
    path = require(adapter_dir, "directory", "ADAPTER_DIR", "pass the directory the trainer saved the adapter to")
    config_file = path / ADAPTER_CONFIG
    if not os.path.lexists(config_file):
        raise QLoRAConfigError(
            "ADAPTER_DIR",
            os.fspath(adapter_dir),
            f"holds no {ADAPTER_CONFIG}",
            "pass a directory with adapter_config.json and adapter_model.safetensors",
        )
    config = read_json(config_file, "ADAPTER_DIR", restore)
    if not isinstance(config, dict):
        raise QLoRAConfigError(
            ADAPTER_CONFIG, os.fspath(config_file), f"holds a JSON {type(config).__name__}, not an object", restore
        )
    weights = [path / name for name in ADAPTER_WEIGHTS if os.path.lexists(path / name)]
    if not weights:
        raise QLoRAConfigError(
            "ADAPTER_DIR",
            os.fspath(adapter_dir),
            f"holds no {ADAPTER_WEIGHTS[0]} (the adapter's weights): the save was cut short, or this is not the "
            "adapter's directory",
            "pass the directory that holds adapter_model.safetensors beside adapter_config.json",
        )
    require(weights[0], "file", "ADAPTER_DIR", restore)
    if config.get("peft_type", "LORA") != "LORA":
        raise QLoRAConfigError(
            "peft_type", config.get("peft_type"), "is not a LoRA adapter", "merge LoRA / QLoRA adapters only"
        )
    field = "--base" if base else "base_model_name_or_path"
    base = base or config.get("base_model_name_or_path")
    if not base:
        raise QLoRAConfigError(
            "base_model_name_or_path", None, "the adapter does not name its base model", "pass --base PATH"
        )
    if not isinstance(base, str):
        raise QLoRAConfigError(
            f"{ADAPTER_CONFIG}: base_model_name_or_path", base, "is not a model path or hub id", "pass --base PATH"
        )
    check_base(base, field)
    return config, base


def check_base(base: str, field: str) -> None:
    """A base given as a path must be a model directory; a relative one is read from the working directory."""
    if not looks_local(base):
        return  # a hub id: read from the hub, or from its cache while HF_HUB_OFFLINE is set
    found = Path(os.path.expanduser(base))
    problem = path_problem(found, "directory")
    if problem is None:
        return
    where = "" if found.is_absolute() else f" (a relative path, read from the working directory {os.getcwd()})"
    raise QLoRAConfigError(
        field,
        base,
        problem + where,
        "pass --base with the base model's directory (run from the directory training ran in, for a relative path)",
    )


def adapter_recipe(
    adapter_dir: str | os.PathLike[str],
    adapter_config: dict[str, Any],
    *,
    quant_type: str | None = None,
    double_quant: bool | None = None,
    assume_default: bool = False,
) -> tuple[QLoRARecipe, TrainedFormat]:
    """The recipe to load the base with: the run's recorded one, with the 4-bit format training used."""
    trained = trained_format(
        adapter_dir, adapter_config, quant_type=quant_type, double_quant=double_quant, assume_default=assume_default
    )
    from qlora_plugin.core.recipe import QLoRARecipe, qlora_recipe

    fields: dict[str, Any] = {"quant_type": trained.quant_type, "double_quant": trained.double_quant}
    if trained.recipe_fields is None:
        return qlora_recipe(**fields), trained
    recorded = {key: value for key, value in trained.recipe_fields.items() if key in RECIPE_FIELDS}
    try:
        return QLoRARecipe(**{**recorded, **fields}), trained
    except QLoRAConfigError as error:
        raise QLoRAConfigError(
            f"qlora_recipe.json: {error.field}",
            error.value,
            error.problem,
            "restore the file from the run, or delete it and pass --quant-type",
        ) from error


def check_out(out: Path, force: bool, keep: list[Path]) -> None:
    """Refuse an ``--out`` that would destroy something: non-empty without ``--force``, or an input."""
    resolved = out.resolve()
    for path in keep:
        path = path.resolve()
        if resolved == path or resolved in path.parents:
            raise QLoRAConfigError(
                "--out",
                os.fspath(out),
                f"would replace the input {os.fspath(path)}",
                "choose a directory outside the adapter and the base model",
            )
    if out.exists() and not out.is_dir():
        raise QLoRAConfigError("--out", os.fspath(out), "is a file", "choose a directory path")
    if out.is_dir():
        require(out, "directory", "--out", "choose a directory you can read and write")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise QLoRAConfigError(
            "--out", os.fspath(out), "is not empty", "choose a new directory, or pass --force to replace it"
        )


def load_dequantized_base(
    base: str, recipe: QLoRARecipe, dtype: torch.dtype, trained: TrainedFormat | None = None
) -> Any:
    """The base as training saw it: loaded in 4 bits with the recipe, then dequantized to ``dtype``.

    Mixture-of-experts experts, which bitsandbytes loads in 16 bits, go through the plugin's 4-bit
    storage and back, as training stored them. What was loaded is compared with the record
    (``trained``; else the recipe) first: a base stored pre-quantized keeps its own format, whatever
    the recipe asks, and another format is an error naming both.
    """
    import torch

    from qlora_plugin.build.models import auto_class, load_config

    device = "cuda" if torch.cuda.is_available() else "cpu"
    if recipe.quantizes_targets_itself:  # 16 bits here; merge_into_base rounds its targets through 4 bits
        return auto_class(load_config(base, "--base")).from_pretrained(base, dtype=dtype, device_map={"": device})
    model = auto_class(load_config(base, "--base")).from_pretrained(
        base,
        quantization_config=recipe.bnb_config(device),
        dtype=dtype,
        device_map={"": device},
    )
    loaded = model_format(model)
    if loaded is not None:
        record = {"quant_type": recipe.quant_type, "double_quant": recipe.double_quant}
        if trained is not None and trained.recipe_fields is not None and "blocksize" in trained.recipe_fields:
            record["blocksize"] = trained.recipe_fields["blocksize"]
        compare_record(
            record,
            loaded,
            trained.source if trained is not None else "the recipe",
            f"the base {base} as loaded",
            "pass the base the adapter was trained on, unquantized, with --base (a base saved in 4 bits keeps its "
            "own format), or --quant-type/--double-quant to merge as it is",
        )
    model = model.dequantize()
    from qlora_plugin.build.moe_experts import roundtrip_experts

    roundtrip_experts(model, recipe)  # fused MoE experts: bitsandbytes leaves them in 16 bits, training did not
    return model.to(dtype)


def merge_adapter(
    adapter_dir: str | os.PathLike[str],
    out: str | os.PathLike[str],
    dtype: str = "bf16",
    base: str | None = None,
    force: bool = False,
    show_progress: bool = True,
    *,
    quant_type: str | None = None,
    double_quant: bool | None = None,
    assume_default_recipe: bool = False,
) -> dict[str, Any]:
    """Merge the adapter at ``adapter_dir`` into its dequantized base and save it to ``out``.

    Every check (the adapter, its 4-bit format, ``out``) runs before the base is loaded.
    """
    if dtype not in DTYPES:
        raise QLoRAConfigError("--dtype", dtype, "is not supported", f"use one of {list(DTYPES)}")
    config, base = read_adapter(adapter_dir, base)
    out_path = Path(out)
    keep = [Path(adapter_dir)] + ([Path(base)] if Path(base).exists() else [])
    check_writable_destination(out_path, "--out")  # first: a link to nothing, an unwritable or file parent
    check_out(out_path, force, keep)
    recipe, trained = adapter_recipe(
        adapter_dir, config, quant_type=quant_type, double_quant=double_quant, assume_default=assume_default_recipe
    )

    check_adapter_fits(adapter_dir, base)

    target_dtype = torch_dtype(DTYPES[dtype])

    with progress_bars(show_progress) as progress, staged_directory(out_path) as staging:
        merged, merged_layers = merge_into_base(adapter_dir, base, recipe, target_dtype, progress, trained)
        step = progress.add_task("save safetensors and the tokenizer", total=2)
        merged.save_pretrained(staging, safe_serialization=True)
        progress.advance(step)
        tokenizer_from = _save_tokenizer(Path(adapter_dir), base, staging)
        progress.advance(step)
        files = sorted(p.name for p in staging.iterdir())
    return {
        "out": os.fspath(out_path),
        "base": base,
        "base_path": _local_path(base),
        "adapter": os.fspath(adapter_dir),
        "dtype": DTYPES[dtype],
        "merged_layers": merged_layers,
        "quantization": f"{recipe.quant_type}, double quant {recipe.double_quant}",
        "quantization_from": trained.source,
        "quantization_note": trained.note,
        "tokenizer_from": tokenizer_from,
        "files": files,
    }


def _local_path(base: str) -> str | None:
    """The absolute directory a base given as a path was read from (a relative one: from the working directory)."""
    return os.path.abspath(os.path.expanduser(base)) if looks_local(base) else None


def roundtrip_targets(peft_model: Any, recipe: QLoRARecipe) -> int:
    """Round each LoRA layer's 16-bit base through the recipe's 4 bits, as training quantized it; the count.

    For a recipe that quantized its targets itself (``blocksize``, ``adapter_init``,
    ``unquantized_modules``): targets in ``unquantized_modules`` stay as they are.
    """
    import torch
    from peft.tuners.lora import LoraLayer
    from transformers.pytorch_utils import Conv1D

    from qlora_plugin.build.target_quantization import keeps_16bit, roundtrip

    count = 0
    with torch.no_grad():
        for name, module in peft_model.named_modules():
            if isinstance(module, LoraLayer) and not keeps_16bit(recipe, name.removeprefix("base_model.model.")):
                base = module.get_base_layer()
                weight = cast("torch.Tensor", base.weight.data)  # an nn.Linear's or Conv1D's
                if isinstance(base, Conv1D):  # stored (in, out); training quantized it as (out, in)
                    base.weight.data = roundtrip(weight.t(), recipe).t().contiguous()
                else:
                    base.weight.data = roundtrip(weight, recipe)
                count += 1
    return count


def merge_into_base(
    adapter_dir: str | os.PathLike[str],
    base: str,
    recipe: QLoRARecipe,
    dtype: torch.dtype,
    progress: Any,
    trained: TrainedFormat | None = None,
) -> tuple[Any, int]:
    """The base as training saw it (4-bit, dequantized to ``dtype``; checked against the record ``trained``)
    with the adapter folded in, and the number of LoRA layers merged; each step is a task on ``progress``."""
    import torch
    from peft import PeftModel
    from peft.tuners.lora import LoraLayer

    step = progress.add_task("load the base in 4 bits and dequantize", total=1)
    model = load_dequantized_base(base, recipe, dtype, trained)
    progress.advance(step)
    step = progress.add_task("load the adapter", total=1)
    peft_model = PeftModel.from_pretrained(model, os.fspath(adapter_dir))
    progress.advance(step)
    layers = [module for module in peft_model.modules() if isinstance(module, LoraLayer)]
    if recipe.quantizes_targets_itself:
        roundtrip_targets(peft_model, recipe)
    step = progress.add_task("merge the LoRA weights", total=len(layers))
    with torch.no_grad():
        for layer in layers:
            layer.merge(safe_merge=True)
            progress.advance(step)
    merged = peft_model.unload()
    merged.to(dtype)
    return merged, len(layers)


def tokenizer_source(adapter_dir: Path, base: str) -> str:
    """Where the tokenizer is: the adapter's own folder if it saved one, else the base."""
    return os.fspath(adapter_dir) if any((adapter_dir / f).is_file() for f in TOKENIZER_FILES) else base


def _save_tokenizer(adapter_dir: Path, base: str, staging: Path) -> str | None:
    """Copy the tokenizer (the adapter's own if it has one, else the base's) into ``staging``."""
    from transformers import AutoTokenizer

    source = tokenizer_source(adapter_dir, base)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError):
        return None
    tokenizer.save_pretrained(staging)
    return source


@contextlib.contextmanager
def progress_bars(show: bool) -> Iterator[Any]:
    """Rich progress bars on stderr (none when ``show`` is false); each step adds a task."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console(stderr=True), disable=not show, transient=False) as progress:
        yield progress
