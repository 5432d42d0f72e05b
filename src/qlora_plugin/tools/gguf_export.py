"""``qlora export --format gguf``: an adapter (or a merged model) as one GGUF file for llama.cpp and Ollama.

An adapter is merged as ``qlora merge`` merges it: into its base loaded in 4 bits with the
format training used, then dequantized (float32, or bfloat16 for a bf16 file). The merged
weights, the tokenizer (:mod:`qlora_plugin.tools.gguf_vocab`), the chat template and the
hyper-parameters (:mod:`qlora_plugin.tools.gguf_arch`) are written with the ``gguf`` package:
no llama.cpp binary, no network, no GPU. ``--ollama`` adds a ``Modelfile`` beside it
(:mod:`qlora_plugin.tools.ollama`).

Every check (the input, the format, the architecture, the tokenizer, the chat template for
``--ollama``, the destination) runs before the base is loaded. The file is written under a
hidden temporary name beside ``--out`` and renamed at the end, with the Modelfile, so a
failure (a full disk, a signal) leaves ``--out`` as it was and nothing else behind.
"""

from __future__ import annotations

import math
import os
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from qlora_plugin.core.errors import QLoRAConfigError
from qlora_plugin.core.safe_io import check_writable_destination, staged_files
from qlora_plugin.tools import gguf_arch
from qlora_plugin.tools.adapter_fit import check_adapter_fits
from qlora_plugin.tools.gguf_vocab import read_vocab, write_vocab
from qlora_plugin.tools.merge import adapter_recipe, merge_into_base, progress_bars, read_adapter, tokenizer_source
from qlora_plugin.tools.ollama import chat_format, modelfile

if TYPE_CHECKING:
    from qlora_plugin.tools.gguf_arch import Family, Tensor
    from qlora_plugin.tools.gguf_vocab import Vocab

TYPES = ("f16", "bf16", "q8_0", "q4_0")
MODELFILE = "Modelfile"


def export_gguf(
    source: str | os.PathLike[str],
    out: str | os.PathLike[str],
    out_type: str = "f16",
    *,
    base: str | None = None,
    force: bool = False,
    ollama: bool = False,
    show_progress: bool = True,
    quant_type: str | None = None,
    double_quant: bool | None = None,
    assume_default_recipe: bool = False,
) -> dict[str, Any]:
    """Write ``source`` (an adapter directory, or a merged model directory) to the GGUF file ``out``.

    Returns a summary: the file, its tensor types, architecture, tokenizer and notes.
    """
    from qlora_plugin.build.models import load_config

    if out_type not in TYPES:
        raise QLoRAConfigError("--type", out_type, "is not a GGUF type written here", f"use one of {list(TYPES)}")
    source_path = Path(source)
    is_adapter = (source_path / "adapter_config.json").is_file()
    if is_adapter:
        adapter_config, base = read_adapter(source_path, base)
        model_dir = base
    elif (source_path / "config.json").is_file():
        adapter_config, model_dir = {}, os.fspath(source_path)
    else:
        raise QLoRAConfigError(
            "ADAPTER_OR_MERGED",
            os.fspath(source_path),
            "holds neither adapter_config.json (an adapter) nor config.json (a merged model)",
            "pass the directory the trainer saved the adapter to, or a folder written by qlora merge",
        )
    out_path = Path(out)
    outs = [out_path] + ([out_path.with_name(MODELFILE)] if ollama else [])
    inputs = [source_path] + ([Path(model_dir)] if Path(model_dir).exists() else [])
    _check_out(out_path, outs, inputs, force)
    for path in outs:
        check_writable_destination(path, "--out")
    config = load_config(model_dir)
    family = gguf_arch.family_of(config)
    gguf_arch.check_config(config, family)
    recipe = trained = None
    if is_adapter:
        recipe, trained = adapter_recipe(
            source_path,
            adapter_config,
            quant_type=quant_type,
            double_quant=double_quant,
            assume_default=assume_default_recipe,
        )
        check_adapter_fits(source_path, model_dir)
    tokenizer_dir = tokenizer_source(source_path, model_dir) if is_adapter else model_dir

    vocab = read_vocab(tokenizer_dir, config.vocab_size)
    fmt = None
    if ollama:
        from transformers import AutoTokenizer

        fmt = chat_format(AutoTokenizer.from_pretrained(tokenizer_dir))

    import torch

    merge_dtype = torch.bfloat16 if out_type == "bf16" else torch.float32
    with progress_bars(show_progress) as progress, staged_files(outs) as staged:
        if is_adapter:
            assert recipe is not None
            model, merged_layers = merge_into_base(source_path, model_dir, recipe, merge_dtype, progress)
        else:
            model, merged_layers = _load_merged(model_dir, merge_dtype, progress), 0
        planned = gguf_arch.plan_tensors(model, config, family)
        step = progress.add_task(f"write GGUF ({out_type})", total=len(planned))
        types = _write(staged[0], model_dir, config, family, vocab, planned, out_type, lambda: progress.advance(step))
        if fmt is not None:
            staged[1].write_text(modelfile(out_path.name, fmt, os.fspath(source_path)), encoding="utf-8")
    notes = list(vocab.notes)
    if trained is not None and trained.note:
        notes.append(trained.note)
    if getattr(config, "sliding_window", None) and family.arch == "llama":
        notes.append(
            f"llama.cpp's llama graph has no sliding window: contexts past {config.sliding_window} tokens "
            "attend further than the model was trained to"
        )
    return {
        "out": os.fspath(out_path),
        "type": out_type,
        "bytes": out_path.stat().st_size,
        "architecture": family.arch,
        "family": family.name,
        "source": os.fspath(source_path),
        "source_kind": "adapter" if is_adapter else "merged model",
        "base": model_dir,
        "merged_layers": merged_layers,
        "quantization": f"{recipe.quant_type}, double quant {recipe.double_quant}" if recipe else None,
        "quantization_from": trained.source if trained else None,
        "tensor_types": dict(sorted(types.items())),
        "tokenizer": {
            "model": vocab.model,
            "pre": vocab.pre,
            "tokens": len(vocab.tokens),
            "special_ids": vocab.special_ids,
            "add_bos": vocab.add_bos,
            "chat_template": bool(vocab.chat_template),
        },
        "modelfile": os.fspath(outs[1]) if fmt is not None else None,
        "chat_format": fmt.name if fmt is not None else None,
        "notes": notes,
    }


def _check_out(out: Path, outs: list[Path], inputs: list[Path], force: bool) -> None:
    """Refuse an ``--out`` that would damage something: inside an input, a directory, or an existing file
    without ``--force``."""
    if out.suffix != ".gguf":
        raise QLoRAConfigError(
            "--out", os.fspath(out), "does not end in .gguf", f"name the file, e.g. --out {os.fspath(out)}.gguf"
        )
    for path in inputs:
        folder = path.resolve()
        if folder in out.resolve().parents:
            raise QLoRAConfigError(
                "--out",
                os.fspath(out),
                f"lies inside the input {os.fspath(path)}, which tools read as a whole",
                "write the GGUF outside the adapter and the base model folders",
            )
    for path in outs:
        if path.is_dir():
            raise QLoRAConfigError("--out", os.fspath(path), "is a directory", "name a file path ending in .gguf")
        if path.exists() and not force:
            raise QLoRAConfigError(
                "--out", os.fspath(path), "exists", "choose a new file name, or pass --force to replace it"
            )


def _load_merged(model_dir: str, dtype: Any, progress: Any) -> Any:
    from qlora_plugin.build.models import auto_class, load_config

    step = progress.add_task("load the merged model", total=1)
    model = auto_class(load_config(model_dir)).from_pretrained(model_dir, dtype=dtype)
    progress.advance(step)
    return model


def _write(
    path: Path,
    model_dir: str,
    config: Any,
    family: Family,
    vocab: Vocab,
    planned: list[Tensor],
    out_type: str,
    advance: Callable[[], None],
) -> Counter[str]:
    """Stream the header, the metadata and one tensor at a time into ``path``; the tensor-type counts."""
    import gguf
    import numpy as np

    writer = gguf.GGUFWriter(os.fspath(path), family.arch)
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(Path(model_dir).name)
    gguf_arch.write_hparams(writer, config, family)
    writer.add_file_type(gguf_arch.file_type(out_type))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    write_vocab(writer, vocab)
    typed = list(gguf_arch.tensor_types(planned, out_type))
    q = gguf.GGMLQuantizationType
    for tensor, kind in typed:
        if kind in (q.F32, q.F16):
            dtype = np.dtype(np.float32 if kind == q.F32 else np.float16)
            writer.add_tensor_info(tensor.name, tensor.shape, dtype, math.prod(tensor.shape) * dtype.itemsize, kind)
        else:  # bf16 and the block types are written as bytes, as gguf.quantize returns them
            shape = gguf.quant_shape_to_byte_shape(tensor.shape, kind)
            writer.add_tensor_info(tensor.name, shape, np.dtype(np.uint8), math.prod(shape), raw_dtype=kind)
    try:
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        assert writer.fout is not None
        stream = writer.fout[0]
        for tensor, kind in typed:
            data = tensor.make()
            data = data if kind == q.F32 else gguf.quantize(data, kind)
            # the writer's own write_tensor_data uses numpy's tofile, whose short write on a full disk raises an
            # OSError without errno; a file write raises ENOSPC/EFBIG, which the CLI reports as a full disk
            writer.write_padding(stream, stream.tell())
            stream.write(data.tobytes())
            writer.write_padding(stream, data.nbytes)
            advance()
        stream.flush()
        os.fsync(stream.fileno())
    finally:
        writer.close()
    return Counter(kind.name for _, kind in typed)
