"""Where FSDP2 changes the packed bytes of 4-bit weights stored in a float dtype, if it does.

    torchrun --nproc_per_node 2 benchmarks/fsdp_bytes_probe.py --out DIR [--variants NAME ...]

bitsandbytes packs NF4 codes into a float "container" (``quant_storage``) so that FSDP can
shard them; about 0.1 % of bf16 containers hold a NaN bit pattern, and bitsandbytes issue 1945
reports FSDP2 rewriting those to one canonical NaN. Each variant builds the same small 4-bit
LoRA model (``benchmarks/build_quantized.py``, the recipe's adapters), shards it with torch's
``fully_shard`` (one unit per decoder layer, then the root, as accelerate does) and compares
every 4-bit layer's bytes with a copy taken before sharding at two points: the rank's shard
right after ``fully_shard`` and the unsharded weight the layer computes with in its first
forward. It also compares the sharded model's logits with an unsharded copy's. Rank 0 writes
``fsdp_bytes.json``. Runs on GPUs (NCCL) or, for the script's own test, on a CPU (gloo).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
from collections import Counter
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent

# name -> (adapter dtype, MixedPrecisionPolicy param dtype or None, 4-bit weights as plain parameters,
#          the plugin's byte-exact all-gather on)
VARIANTS: dict[str, tuple[str, str | None, bool, bool]] = {
    "fp32-adapters": ("float32", None, False, False),
    "fp32-adapters-bf16-policy": ("float32", "bfloat16", False, False),  # accelerate's FSDP2 with bf16
    "bf16-adapters": ("bfloat16", None, False, False),
    "bf16-adapters-bf16-policy": ("bfloat16", "bfloat16", False, False),
    "plain-weights-bf16-policy": ("float32", "bfloat16", True, False),
    "fp32-adapters-bf16-policy-as-bytes": ("float32", "bfloat16", False, True),
    "bf16-adapters-bf16-policy-as-bytes": ("bfloat16", "bfloat16", False, True),
}


def use_byte_all_gather(as_bytes: bool) -> None:
    """Turn the plugin's byte-exact FSDP2 all-gather on or off (the recipe turns it on when it builds LoRA layers)."""
    from qlora_plugin.build.fsdp_bytes import PATCH, all_gather_as_bytes
    from qlora_plugin.core import patches

    patches.revert(PATCH)  # FSDP2's own choice, as the registry found it
    if as_bytes:
        all_gather_as_bytes()


def small_config() -> Any:
    from transformers import LlamaConfig

    return LlamaConfig(
        hidden_size=1024,
        intermediate_size=2816,
        num_hidden_layers=2,
        num_attention_heads=8,
        num_key_value_heads=8,
        vocab_size=2048,
        max_position_embeddings=256,
    )


def element_changes(before: Any, after: Any) -> dict[str, Any]:
    """Changed 2-byte elements between two flat bf16 tensors: how many, how many were NaN before, what they became."""
    import torch

    old, new = before.view(torch.int16), after.view(torch.int16)
    changed = old != new
    count = int(changed.sum())
    if not count:
        return {"elements_changed": 0}
    became = Counter(f"0x{int(v) & 0xFFFF:04X}" for v in new[changed][:4096].tolist())
    return {
        "elements_changed": count,
        "of_them_nan_before": int(torch.isnan(before[changed]).sum()),
        "became": dict(became.most_common(3)),
    }


def probe(variant: str, device: Any, rank: int, world: int) -> dict[str, Any]:
    import bitsandbytes as bnb
    import torch
    from peft import get_peft_model
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    from qlora_plugin import qlora_recipe

    sys.path.insert(0, str(HERE))
    from build_quantized import build_quantized

    adapter_dtype, policy_dtype, plain, as_bytes = VARIANTS[variant]
    recipe = qlora_recipe(compute_dtype="bfloat16", lora_dropout=0.0, gradient_checkpointing=False)
    model = get_peft_model(build_quantized(small_config(), recipe, str(device)).train(), recipe)
    for name, param in model.named_parameters():
        if "lora_" in name:
            with torch.no_grad():
                param.data = param.data.to(getattr(torch, adapter_dtype))
            if "lora_B" in name:
                torch.nn.init.normal_(param, std=0.02)
    reference = copy.deepcopy(model)
    use_byte_all_gather(as_bytes)
    layers = {name: m for name, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)}
    packed = {name: m.weight.data.reshape(-1).clone() for name, m in layers.items()}  # bf16 containers
    if plain:  # the layer keeps quant_state; bitsandbytes rebuilds its Params4bit in forward
        for module in layers.values():
            module.weight = torch.nn.Parameter(module.weight.data, requires_grad=False)
    policy = MixedPrecisionPolicy(param_dtype=getattr(torch, policy_dtype)) if policy_dtype else MixedPrecisionPolicy()
    for layer in model.base_model.model.model.layers:
        fully_shard(layer, mp_policy=policy)
    fully_shard(model, mp_policy=policy)

    sharded: dict[str, Any] = {}
    for name, module in layers.items():
        local = module.weight.to_local().reshape(-1)  # FSDP2 shards dim 0 (rows of one element) in world-size chunks
        chunk = -(-packed[name].numel() // world)
        mine = packed[name][rank * chunk : (rank + 1) * chunk]
        sharded[name] = element_changes(mine, local[: mine.numel()])
    first_forward: dict[str, Any] = {}

    def compare(name: str, module: Any, _args: Any) -> None:
        if name not in first_forward:
            first_forward[name] = element_changes(packed[name], module.weight.data.reshape(-1))

    handles = [
        m.register_forward_pre_hook(lambda mod, args, n=name: compare(n, mod, args)) for name, m in layers.items()
    ]
    ids = torch.randint(0, 2048, (2, 64), generator=torch.Generator().manual_seed(0)).to(device)
    with torch.autocast(device.type, dtype=torch.bfloat16):
        logits = model(input_ids=ids).logits.float()
        expected_logits = reference(input_ids=ids).logits.float()
    for handle in handles:
        handle.remove()
    summary = lambda table: {  # noqa: E731
        "layers": len(table),
        "layers_changed": sum(1 for row in table.values() if row["elements_changed"]),
        "elements_changed": sum(row["elements_changed"] for row in table.values()),
        "of_them_nan_before": sum(row.get("of_them_nan_before", 0) for row in table.values()),
        "became": dict(sum((Counter(row.get("became", {})) for row in table.values()), Counter()).most_common(3)),
    }
    return {
        "variant": variant,
        "adapter_dtype": adapter_dtype,
        "policy_param_dtype": policy_dtype,
        "plain_weights": plain,
        "all_gather_as_bytes": as_bytes,
        "storage": str(next(iter(packed.values())).dtype),
        "nan_elements_before": sum(int(torch.isnan(p).sum()) for p in packed.values()),
        "after_fully_shard": summary(sharded),
        "first_forward": summary(first_forward),
        "logits_max_abs_diff_vs_unsharded": float((logits - expected_logits).abs().max()),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    args = parser.parse_args(argv)

    import torch
    import torch.distributed as dist

    os.environ["ACCELERATE_USE_FSDP"] = "true"  # as `accelerate launch` sets it: the recipe stores 4-bit in bf16
    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}" if cuda else "cpu")
    if cuda:
        torch.cuda.set_device(device)
    rows = []
    for variant in args.variants:
        torch.manual_seed(0)
        try:
            row = probe(variant, device, rank, world)
        except Exception as error:  # one variant's failure is a finding, not the end of the probe
            row = {"variant": variant, "error": f"{type(error).__name__}: {error}"[:500]}
        rows.append(row)
        if rank == 0:
            print(json.dumps(row), flush=True)
    if rank == 0:
        import bitsandbytes
        import transformers

        args.out.mkdir(parents=True, exist_ok=True)
        versions = {name: module.__version__ for name, module in (("torch", torch), ("transformers", transformers))}
        versions["bitsandbytes"] = bitsandbytes.__version__
        result = {"gpu": torch.cuda.get_device_name(0) if cuda else "cpu", "versions": versions, "rows": rows}
        (args.out / "fsdp_bytes.json").write_text(json.dumps(result, indent=1) + "\n")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
