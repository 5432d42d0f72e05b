"""What each variant trains: the random-init Llama checkpoints, the synthetic token batches, and the
PEFT model plus optimizer of a variant (stock PEFT/bitsandbytes, the plugin's kernels, or the recipe)."""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

from bench_config import ALPHA, BATCH, DEVICE, LR, RANK, SEQ, SHAPES, VARIANTS, VOCAB
from bench_measure import empty_cache


def model_dirs(root: Path, shape: str) -> tuple[Path, Path]:
    """Where ``make-model`` saves ``shape``: the bf16 checkpoint and its pre-quantized NF4 copy."""
    return root / f"{shape}-bf16", root / f"{shape}-nf4"


def synthetic_batches(n: int, seed: int = 0, vocab: int = VOCAB) -> list[Any]:
    """``n`` batches [BATCH, SEQ] of token ids: Zipf unigram over 8k ids, half the time the fixed successor."""
    import torch

    g = torch.Generator().manual_seed(seed)
    support = 8192
    probs = 1.0 / torch.arange(1, support + 1, dtype=torch.float64) ** 1.1
    ids = torch.randperm(vocab, generator=g)[:support]
    succ = torch.randperm(support, generator=g)
    out = []
    for _ in range(n):
        draws = torch.multinomial(probs.float(), BATCH * SEQ, replacement=True, generator=g).view(BATCH, SEQ)
        follow = torch.rand(BATCH, SEQ, generator=g) < 0.5
        successor = succ.tolist()
        rows = []
        for row, row_follow in zip(draws.tolist(), follow.tolist(), strict=True):  # in Python: fast at long rows
            for t in range(1, SEQ):
                if row_follow[t]:
                    row[t] = successor[row[t - 1]]
            rows.append(row)
        out.append(ids[torch.tensor(rows, dtype=draws.dtype)])
    return out


def llama_config(shape: str) -> Any:
    """A Llama-3 config of ``shape`` (random init: no model hub needed)."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=VOCAB,
        max_position_embeddings=8192,
        rms_norm_eps=1e-5,
        rope_theta=500000.0,
        attn_implementation="sdpa",
        **SHAPES[shape],
    )


def bnb_config() -> Any:
    """The usual QLoRA quantization: NF4, double quantization, bf16 compute."""
    import torch
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16,
        bnb_4bit_quant_storage=torch.uint8,
    )


def placeholder_tokenizer() -> Any:
    """A three-token tokenizer for trainers that want one; the benchmark's rows come tokenized."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<eos>": 1, "<unk>": 2}
    return PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="<unk>")),
        pad_token="<pad>",
        eos_token="<eos>",
        unk_token="<unk>",
    )


# ----------------------------------------------------------------------------- make-model


def cmd_make_model(a: argparse.Namespace) -> None:
    """Save a random-init Llama of ``--shape`` under ``--dir`` in bf16 and in NF4 (each once)."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaForCausalLM

    bf16_dir, nf4_dir = model_dirs(Path(a.dir), a.shape)
    t0 = time.time()
    if not (bf16_dir / "config.json").exists():
        torch.manual_seed(1234)
        cfg = llama_config(a.shape)
        with torch.device(DEVICE):
            model = LlamaForCausalLM(cfg).to(torch.bfloat16)
        model.save_pretrained(bf16_dir, max_shard_size="4GB")
        del model
        empty_cache()
    t1 = time.time()
    if not (nf4_dir / "config.json").exists():
        q = AutoModelForCausalLM.from_pretrained(
            bf16_dir,
            quantization_config=bnb_config(),
            dtype=torch.bfloat16,
            device_map=DEVICE,
            attn_implementation="sdpa",
        )
        q.save_pretrained(nf4_dir)
    print(f"make-model {a.shape}: bf16 {t1 - t0:.0f}s, nf4 {time.time() - t1:.0f}s", flush=True)


def build(
    shape: str,
    variant: str,
    model_root: Path,
    *,
    dropout: float | None = None,
    plugin_overrides: dict[str, Any] | None = None,
    optim: str | None = None,
) -> tuple[Any, Any, dict[str, Any]]:
    """The PEFT model and optimizer of ``variant`` plus a description of what was set."""
    import torch
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM

    spec = dict(VARIANTS[variant])
    if dropout is not None:
        spec["dropout"] = dropout
    if optim is not None:
        spec["optim"] = optim
    bf16_dir, nf4_dir = model_dirs(model_root, shape)
    kw = dict(dtype=torch.bfloat16, device_map=DEVICE, attn_implementation="sdpa")
    if "recipe" in spec:
        return build_recipe(nf4_dir, spec, kw)
    model = AutoModelForCausalLM.from_pretrained(nf4_dir if spec["quant"] else bf16_dir, **kw)
    model.config.use_cache = False
    info: dict[str, Any] = {"lora_dropout": spec["dropout"], "optimizer": spec["optim"]}
    if spec.get("prepare"):
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=spec["grad_ckpt"])
    lcfg = LoraConfig(
        r=RANK, lora_alpha=ALPHA, lora_dropout=spec["dropout"], target_modules="all-linear", task_type="CAUSAL_LM"
    )
    torch.manual_seed(0)
    model = get_peft_model(model, lcfg)
    if "plugin" in spec:
        from qlora_plugin.fastpath.kernels import FastPathConfig, apply_fast_path

        pcfg = FastPathConfig(**{**spec["plugin"], **(plugin_overrides or {})})
        report = apply_fast_path(model, config=pcfg)
        info["plugin"] = {k: (str(v) if isinstance(v, torch.dtype) else v) for k, v in pcfg.__dict__.items()}
        info["plugin_report"] = report.__dict__
        info["grad_ckpt"] = pcfg.recompute
    else:
        if spec["grad_ckpt"] and not spec.get("prepare"):
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        info["grad_ckpt"] = "full" if spec["grad_ckpt"] else "none"
    params = [p for p in model.parameters() if p.requires_grad]
    info["adapter_dtype"] = str(params[0].dtype)
    if spec["optim"] == "bnb-paged":
        import bitsandbytes as bnb

        opt = bnb.optim.PagedAdamW32bit(params, lr=LR, weight_decay=0.0)
    elif spec["optim"] == "plugin-paged":
        from qlora_plugin.fastpath.kernels import PagedAdamW

        opt = PagedAdamW(params, lr=LR, weight_decay=0.0)
    elif spec["optim"] == "torch-fused":
        opt = torch.optim.AdamW(params, lr=LR, weight_decay=0.0, fused=True)
    else:
        opt = torch.optim.AdamW(params, lr=LR, weight_decay=0.0)
    model.train()
    return model, opt, info


def make_recipe(spec: dict[str, Any]) -> Any:
    """The qlora_recipe of a recipe variant: the benchmark's rank, alpha, dropout and LR plus its overrides."""
    from qlora_plugin import qlora_recipe

    return qlora_recipe(r=RANK, lora_alpha=ALPHA, lora_dropout=spec["dropout"], learning_rate=LR, **spec["recipe"])


def build_recipe(nf4_dir: Path, spec: dict[str, Any], kw: dict[str, Any]) -> tuple[Any, Any, dict[str, Any]]:
    """recipe.load_model -> get_peft_model(model, recipe) -> the recipe's optimizer; the fast path goes
    on by itself at the first training forward (on CUDA)."""
    import torch
    from peft import get_peft_model

    recipe = make_recipe(spec)
    model = recipe.load_model(nf4_dir, **kw)
    torch.manual_seed(0)
    model = get_peft_model(model, recipe)
    params = [p for p in model.parameters() if p.requires_grad]
    chosen = recipe.optimizer_cls_and_kwargs()
    if chosen is not None:
        cls, okw = chosen
        opt = cls(params, **{**okw, "weight_decay": 0.0})
    else:
        import bitsandbytes as bnb

        opt = bnb.optim.PagedAdamW32bit(params, lr=LR, weight_decay=0.0)
    model.train()
    from qlora_plugin.build.context import RECOMPUTE

    info = {
        "lora_dropout": spec["dropout"],
        "optimizer": type(opt).__name__,
        "grad_ckpt": RECOMPUTE[recipe.gradient_checkpointing],
        "adapter_dtype": "float32 (after the first forward)",
        "recipe": recipe.recipe_fields(),
    }
    return model, opt, info
