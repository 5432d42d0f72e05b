"""The ``micro`` subcommand: single-layer timings (NF4 dequant, LoRA-over-NF4 forward+backward) at 8B
shapes, to see the kernels apart from a whole model."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from bench_config import ALPHA, BATCH, RANK, SEQ


def cmd_micro(a: argparse.Namespace) -> None:
    """Per-layer timings at 8B shapes: NF4 dequant (bitsandbytes vs Triton) and one LoRA-over-NF4
    layer forward+backward (PEFT vs the fused function), 8192 tokens, bf16."""
    import bitsandbytes as bnb
    import torch
    from peft import LoraConfig, get_peft_model
    from triton.testing import do_bench

    from qlora_plugin.fastpath.kernels import dequant
    from qlora_plugin.fastpath.kernels.lora_linear import LayerOptions, patch_lora_4bit_layers, unpatch_lora_4bit_layers
    from qlora_plugin.fastpath.kernels.triton_nf4 import dequantize_4bit_triton

    rows = []
    for name, (out_f, in_f) in {
        "q_proj": (4096, 4096),
        "kv_proj": (1024, 4096),
        "gate_proj": (14336, 4096),
        "down_proj": (4096, 14336),
    }.items():
        torch.manual_seed(0)
        lin = bnb.nn.Linear4bit(
            in_f, out_f, bias=False, compute_dtype=torch.bfloat16, compress_statistics=True, quant_type="nf4"
        )
        lin.weight = bnb.nn.Params4bit(
            torch.randn(out_f, in_f, dtype=torch.bfloat16) / in_f**0.5,
            requires_grad=False,
            compress_statistics=True,
            quant_type="nf4",
            blocksize=64,
        )
        holder = torch.nn.Module()
        holder.lin = lin.cuda()
        q, st = holder.lin.weight, holder.lin.weight.quant_state
        t_bnb = do_bench(lambda: bnb.functional.dequantize_4bit(q, st), return_mode="median")
        buf = torch.empty(out_f, in_f, device="cuda", dtype=torch.bfloat16)
        t_tri = do_bench(lambda: dequantize_4bit_triton(q, st, torch.bfloat16, out=buf), return_mode="median")
        pm = get_peft_model(holder, LoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=0.0, target_modules=["lin"]))
        layer = pm.base_model.model.lin
        for p_ in layer.parameters():
            if p_.requires_grad:
                p_.data = p_.data.float()
                torch.nn.init.normal_(p_, std=0.01)
        x = torch.randn(BATCH * SEQ, in_f, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        g = torch.randn(BATCH * SEQ, out_f, device="cuda", dtype=torch.bfloat16)

        def fwd_bwd() -> None:
            layer(x).backward(g)

        t_peft = do_bench(fwd_bwd, return_mode="median", grad_to_none=[x, *layer.parameters()])
        patch_lora_4bit_layers(pm)
        t_fused = do_bench(fwd_bwd, return_mode="median", grad_to_none=[x, *layer.parameters()])
        unpatch_lora_4bit_layers(pm)
        patch_lora_4bit_layers(pm, options=LayerOptions(dequant=dequant.make_dequantizer(triton=True)))
        t_fused_tri = do_bench(fwd_bwd, return_mode="median", grad_to_none=[x, *layer.parameters()])
        xw = torch.randn(out_f, in_f, device="cuda", dtype=torch.bfloat16)
        t_gemm = do_bench(lambda: torch.mm(x.detach(), xw.t()), return_mode="median")
        rows.append(
            dict(
                layer=name,
                out_f=out_f,
                in_f=in_f,
                dequant_bnb_ms=round(t_bnb, 4),
                dequant_triton_ms=round(t_tri, 4),
                lora_fwd_bwd_peft_ms=round(t_peft, 3),
                lora_fwd_bwd_fused_ms=round(t_fused, 3),
                lora_fwd_bwd_fused_triton_ms=round(t_fused_tri, 3),
                one_bf16_gemm_ms=round(t_gemm, 3),
            )
        )
        print(json.dumps(rows[-1]), flush=True)
    Path(a.json).write_text(json.dumps(rows, indent=1))
