"""A GGUF file read back: what ``qlora inspect model.gguf`` shows, from the file alone.

The architecture and its hyper-parameters, the tensors by type, the tokenizer (kind, size,
special tokens and whether BOS is added) and the chat template. Read with the ``gguf``
package's reader, which maps the file and loads no tensor data.
"""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path
from typing import Any

from qlora_plugin.core.errors import QLoRAConfigError

SPECIAL = {"bos": "bos_token_id", "eos": "eos_token_id", "unk": "unknown_token_id", "pad": "padding_token_id"}


def is_gguf(path: str | os.PathLike[str]) -> bool:
    """True for an existing file that starts with GGUF's magic bytes."""
    file = Path(path)
    if not file.is_file():
        return False
    with file.open("rb") as stream:
        return stream.read(4) == b"GGUF"


def read_gguf(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The summary of the GGUF file at ``path`` (plain data, for printing or JSON)."""
    from gguf import GGUFReader

    try:
        reader = GGUFReader(os.fspath(path))
    except (ValueError, OSError) as error:
        raise QLoRAConfigError(
            "MODEL",
            os.fspath(path),
            f"is not a readable GGUF file ({error})",
            "pass a complete .gguf file (export it again if it was cut short)",
        ) from None
    fields = {name: _value(field) for name, field in reader.fields.items()}
    arch = fields.get("general.architecture")
    tokens = fields.get("tokenizer.ggml.tokens") or []
    special = {}
    for name, key in SPECIAL.items():
        token_id = fields.get(f"tokenizer.ggml.{key}")
        if isinstance(token_id, int) and 0 <= token_id < len(tokens):
            special[name] = {"id": token_id, "text": tokens[token_id]}
    template = fields.get("tokenizer.chat_template")
    prefix = f"{arch}."
    return {
        "file": os.fspath(path),
        "bytes": Path(path).stat().st_size,
        "architecture": arch,
        "name": fields.get("general.name"),
        "hyper_parameters": {k.removeprefix(prefix): v for k, v in fields.items() if k.startswith(prefix)},
        "tensors": len(reader.tensors),
        "parameters": int(sum(int(t.n_elements) for t in reader.tensors)),
        "tensor_types": dict(sorted(Counter(t.tensor_type.name for t in reader.tensors).items())),
        "tokenizer": {
            "model": fields.get("tokenizer.ggml.model"),
            "pre": fields.get("tokenizer.ggml.pre"),
            "tokens": len(tokens),
            "merges": len(fields.get("tokenizer.ggml.merges") or []),
            "special": special,
            "add_bos": fields.get("tokenizer.ggml.add_bos_token"),
            "add_eos": fields.get("tokenizer.ggml.add_eos_token"),
        },
        "chat_template": template,
    }


def _value(field: Any) -> Any:
    """A field's value: a string, a number, a bool, or a list of them."""
    from gguf import GGUFValueType

    if not field.types:
        return None
    if field.types[0] == GGUFValueType.ARRAY:
        return list(field.contents())
    return field.contents()
