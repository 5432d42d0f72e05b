"""Built-in named presets, registered through the hooks like any plugin's.

Each preset lists only the recipe fields it changes from the defaults of
:class:`qlora_plugin.core.recipe.QLoRARecipe`.
"""

from __future__ import annotations

from typing import Any

from qlora_plugin.core.hookspecs import hookimpl

BUILTIN_PRESETS: dict[str, dict[str, Any]] = {
    # The recipe's own defaults: NF4 + double quant, bf16 compute, paged AdamW
    # 32-bit and max_grad_norm 0.3 as in the QLoRA paper (Dettmers et al. 2023,
    # arXiv:2305.14314); r 16 / alpha 32 / dropout 0.05 on every linear layer,
    # the common choice of the TRL and PEFT QLoRA examples.
    "default": {},
    # The QLoRA paper's setup (section 4 and appendix B.2 of arXiv:2305.14314):
    # LoRA r 64, alpha 16, dropout 0.1 on all linear layers; lr 2e-4 with a
    # constant schedule, warmup ratio 0.03, max grad norm 0.3, paged AdamW.
    "paper": {
        "r": 64,
        "lora_alpha": 16,
        "lora_dropout": 0.1,
        "learning_rate": 2e-4,
        "lr_scheduler_type": "constant",
        "warmup_ratio": 0.03,
        "max_grad_norm": 0.3,
        "optimizer": "paged_adamw_32bit",
    },
    # FinLoRA's `sentiment_llama_3_1_8b_4bits_r4` entry (lora/finetune_configs.json
    # in github.com/wangd12rpi/FinLoRA; paper arXiv:2505.19819): 4-bit base,
    # r 4, lr 1e-4, 4 epochs, batch 8, gradient accumulation 2.
    "finlora-r4": {
        "r": 4,
        "learning_rate": 1e-4,
        "num_train_epochs": 4,
        "per_device_train_batch_size": 8,
        "gradient_accumulation_steps": 2,
    },
}


@hookimpl
def qlora_presets() -> dict[str, dict[str, Any]]:
    """Offer the built-in presets."""
    return BUILTIN_PRESETS
