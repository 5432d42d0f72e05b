"""YAML read as written: a key given twice in one mapping is an error, not a silent "the last one wins".

PyYAML (and Axolotl, which reads configs with it) keeps only the last of two equal
keys, so a config with the ``qlora:`` section twice trains with one of them and says
nothing. :func:`duplicate_key` finds the first such key, with both line numbers.
"""

from __future__ import annotations

from typing import Any

import yaml

from qlora_plugin.core.errors import QLoRAConfigError


class _DuplicateKey(Exception):
    def __init__(self, key: Any, first: int, second: int) -> None:
        super().__init__(key)
        self.key, self.first, self.second = key, first, second


class _StrictLoader(yaml.SafeLoader):
    """PyYAML's safe loader, refusing a mapping that gives one key twice."""


def _construct_mapping(loader: _StrictLoader, node: yaml.MappingNode, deep: bool = False) -> Any:
    seen: dict[Any, int] = {}
    for key_node, _ in node.value:
        if key_node.tag == "tag:yaml.org,2002:merge":
            continue
        key = loader.construct_object(key_node, deep=True)
        try:
            hash(key)
        except TypeError:
            continue  # PyYAML itself refuses unhashable keys, with its own message
        line = key_node.start_mark.line + 1
        if key in seen:
            raise _DuplicateKey(key, seen[key], line)
        seen[key] = line
    return yaml.SafeLoader.construct_mapping(loader, node, deep=deep)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def duplicate_key(text: str, source: str) -> QLoRAConfigError | None:
    """The error for the first key ``text`` (YAML) gives twice in one mapping, or None (also for invalid YAML)."""
    try:
        yaml.load(text, Loader=_StrictLoader)  # noqa: S506 - a SafeLoader subclass
    except _DuplicateKey as found:
        return QLoRAConfigError(
            f"{source} line {found.second}",
            found.key,
            f"is given twice in one mapping (lines {found.first} and {found.second}); YAML keeps only the last one, "
            "silently",
            "keep one of them, with the settings of both merged into it",
        )
    except yaml.YAMLError:
        return None
    return None
