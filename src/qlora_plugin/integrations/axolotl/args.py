"""The ``qlora:`` section in Axolotl's config schema."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field


class QLoRAArgs(BaseModel):
    """Adds ``qlora:`` to Axolotl's config; the plugin checks it against the recipe."""

    qlora: dict[str, Any] | None = Field(
        default=None,
        json_schema_extra={
            "description": "QLoRA recipe: `preset` plus any recipe field (r, lora_alpha, quant_type, ...)"
        },
    )
