"""Write the README's table of recipe fields from the recipe's own field metadata.

    python scripts/field_table.py          # rewrite the table between the README's markers
    python scripts/field_table.py --check  # exit 1 if the README's table is not what the metadata gives

The table lists every field of :data:`qlora_plugin.core.fields.RECIPE_FIELDS` with its
default, its choices and its help text (``dataclasses.fields(QLoRARecipe)`` metadata).
"""

from __future__ import annotations

import sys
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"
START, END = "<!-- recipe-fields:start -->", "<!-- recipe-fields:end -->"


def table() -> str:
    import dataclasses

    from qlora_plugin.core.fields import ALIASES, RECIPE_FIELDS
    from qlora_plugin.core.recipe import QLoRARecipe

    aliases = {field: alias for alias, field in ALIASES.items()}
    fields = {f.name: f for f in dataclasses.fields(QLoRARecipe)}
    rows = ["| field | default | choices | meaning |", "|---|---|---|---|"]
    for name in RECIPE_FIELDS:
        spec = fields[name]
        shown = f"`{name}`" + (f" (`{aliases[name]}`)" if name in aliases else "")
        choices = ", ".join(f"`{c}`" for c in spec.metadata.get("choices", ())) or ""
        default = "unset" if spec.default is None else f"`{spec.default}`"
        rows.append(f"| {shown} | {default} | {choices} | {spec.metadata['help']} |")
    return "\n".join(rows)


def main() -> int:
    text = README.read_text(encoding="utf-8")
    before, rest = text.split(START, 1)
    _, after = rest.split(END, 1)
    updated = f"{before}{START}\n{table()}\n{END}{after}"
    if "--check" in sys.argv:
        if updated != text:
            print("README.md's recipe field table is out of date: run python scripts/field_table.py")
            return 1
        return 0
    README.write_text(updated, encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
