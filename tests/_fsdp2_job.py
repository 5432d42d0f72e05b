"""FSDP2 (torch's ``fully_shard``) over the recipe's 4-bit LoRA model, on each rank of a CPU launch.

    python -m torch.distributed.run --nproc_per_node 2 tests/_fsdp2_job.py MODEL_DIR OUT_DIR [--built DTYPE]

accelerate runs FSDP only on GPUs (on a CPU it falls back to DDP), so this shards the model
with torch's own FSDP2 API over gloo, as accelerate's FSDP2 preparation does on GPUs: one unit
per decoder layer, then the root. ``ACCELERATE_USE_FSDP=true`` (set by the test) is what
``accelerate launch`` with an FSDP config sets; the recipe reads it. Every rank trains on the
same batch, so the sharded step must match an unsharded copy of the model exactly. Rank 0
writes ``OUT_DIR/result.json``: storage dtype, losses and the largest LoRA gradient difference.
With ``--built DTYPE`` the model comes from ``MODEL_DIR``'s config through
``benchmarks/build_quantized.py`` (the 70B run's path: layers quantized in place), computing in
DTYPE, and the result also says whether every 4-bit layer saw, in its first sharded
forward, exactly the bytes it had before ``fully_shard``.
"""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
if str(SRC) not in sys.path:
    sys.path.insert(0, str(SRC))


def main(model_dir: str, out: str, built: str | None = None) -> None:
    import bitsandbytes as bnb
    import torch
    import torch.distributed as dist
    from peft import get_peft_model
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.fsdp._fully_shard import _fsdp_collectives as collectives

    from qlora_plugin import qlora_recipe
    from qlora_plugin.build.lora_layers import context_for

    dist.init_process_group("gloo")
    recipe = qlora_recipe(compute_dtype=built or "float32", lora_dropout=0.0, gradient_checkpointing=False)
    if built:
        sys.path.insert(0, str(SRC.parent / "benchmarks"))
        from build_quantized import build_quantized
        from transformers import AutoConfig

        base = build_quantized(AutoConfig.from_pretrained(model_dir), recipe, "cpu").train()
    else:
        base = recipe.load_model(model_dir, device_map={"": "cpu"})
    model = get_peft_model(base, recipe)
    for name, param in model.named_parameters():  # LoRA B starts at zero: give the gradients of A something to see
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.02, generator=torch.Generator().manual_seed(len(name)))
    reference = copy.deepcopy(model)
    storage = str(next(p.quant_storage for p in model.parameters() if hasattr(p, "quant_storage")))

    packed = {m: m.weight.data.view(torch.uint8).clone() for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)}
    changed: dict[str, int] = {}

    def compare(module: torch.nn.Module, _args: tuple) -> None:  # the unsharded weight the layer computes with
        changed.setdefault(str(id(module)), int((module.weight.data.view(torch.uint8) != packed[module]).sum()))

    for module in packed:
        module.register_forward_pre_hook(compare)
    for layer in model.base_model.model.model.layers:
        fully_shard(layer)
    fully_shard(model)

    torch.manual_seed(0)  # the same batch on every rank
    ids = torch.randint(4, 30, (2, 12))
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    expected = reference(input_ids=ids, labels=ids).loss
    expected.backward()
    reference_grads = dict(reference.named_parameters())
    gap, compared = 0.0, 0
    for name, param in model.named_parameters():
        if param.grad is not None:
            compared += 1
            full = param.grad.full_tensor()  # a DTensor shard: gather it
            gap = max(gap, (full - reference_grads[name].grad).abs().max().item())
    if dist.get_rank() == 0:
        result = {
            "storage": storage,
            "loss": loss.item(),
            "unsharded_loss": expected.item(),
            "max_grad_gap": gap,
            "gradients_compared": compared,
            "sharded_4bit_weights": sum(
                type(p).__name__ == "DTensor" and p.dtype == getattr(torch, built or "float32") and "base_layer" in n
                for n, p in model.named_parameters()
            ),
            "layers_compared": len(changed),
            "bytes_changed": sum(changed.values()),
            "fast_path": context_for(recipe).fast_path_on("cpu"),
            "all_gather_as_bytes": getattr(collectives._get_all_gather_input_metadatas, "_qlora_as_bytes", False),
        }
        Path(out).mkdir(parents=True, exist_ok=True)
        (Path(out) / "result.json").write_text(json.dumps(result))


if __name__ == "__main__":
    import argparse

    from _rank_exit import exit_rank  # tests/ is this script's folder

    parser = argparse.ArgumentParser()
    parser.add_argument("model_dir")
    parser.add_argument("out")
    parser.add_argument("--built", metavar="DTYPE", help="build the model in place (float32 or bfloat16)")
    options = parser.parse_args()
    main(options.model_dir, options.out, options.built)
    exit_rank()
