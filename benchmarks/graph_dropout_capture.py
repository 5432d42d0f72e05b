"""Which dropout captures work under CUDA graphs on this machine's torch? One case per process.

    PYTHONPATH=src python3 benchmarks/graph_dropout_capture.py      (CUDA machine, repository root)

Cases: plain ``native_dropout`` in ``torch.cuda.graph``; ``nn.Dropout`` and the fused LoRA
function (dropout 0 and 0.2) under ``make_graphed_callables``; two dropout LoRAs captured three
ways; the fast path's decoder graphs on a tiny Llama with dropout 0.2 (one layer, two layers, and
two layers captured one call per layer in a shared pool). Results of run 5 are in
benchmarks/results/run5-graphs/call2-diagnostics/ (benchmarks/NOTES.md, section 8).
"""

import subprocess
import sys
import traceback

import torch
from torch import nn


def case_plain():
    x = torch.randn(64, 64, device="cuda")
    g = torch.cuda.CUDAGraph()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        torch.native_dropout(x, 0.2, True)
    torch.cuda.current_stream().wait_stream(s)
    with torch.cuda.graph(g):
        y, m = torch.native_dropout(x, 0.2, True)
    g.replay()
    a = m.clone()
    g.replay()
    return f"masks differ: {not torch.equal(a, m)}"


def case_module():
    mod = nn.Sequential(nn.Linear(64, 64), nn.Dropout(0.2)).cuda()
    x = torch.randn(8, 64, device="cuda", requires_grad=True)
    f = torch.cuda.make_graphed_callables(mod, (x,))
    f(x).sum().backward()
    return "ok"


class Lora(nn.Module):
    def __init__(self, p):
        super().__init__()
        import bitsandbytes as bnb

        self.base = bnb.nn.Linear4bit(256, 256, bias=False, compute_dtype=torch.bfloat16, quant_type="nf4").cuda()
        self.a = nn.Parameter(torch.randn(8, 256, device="cuda") * 0.01)
        self.b = nn.Parameter(torch.randn(256, 8, device="cuda") * 0.01)
        self.p = p

    def forward(self, x):
        from qlora_plugin.fastpath.kernels.lora_linear import lora_4bit_linear

        w = self.base.weight
        return lora_4bit_linear(x, self.a, self.b, 2.0, w, w.quant_state, dropout=self.p)


def case_lora(p):
    def run():
        m = Lora(p)
        x = torch.randn(4, 32, 256, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        f = torch.cuda.make_graphed_callables(m, (x,))
        for _ in range(2):
            f(x).float().sum().backward()
        return "ok"

    return run


def case_two_loras(mode):
    """Two dropout LoRAs: as two callables of one call, in one callable, or two calls sharing a pool."""

    def run():
        m1, m2 = Lora(0.2), Lora(0.2)
        x1, x2 = (torch.randn(4, 32, 256, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(2))
        if mode == "two-callables":
            f1, f2 = torch.cuda.make_graphed_callables((m1, m2), ((x1,), (x2,)))
        elif mode == "one-callable":
            f1, f2 = torch.cuda.make_graphed_callables(nn.Sequential(m1, m2), (x1,)), (lambda x: x)
        else:
            pool = torch.cuda.graph_pool_handle()
            f1 = torch.cuda.make_graphed_callables(m1, (x1,), pool=pool)
            f2 = torch.cuda.make_graphed_callables(m2, (x2,), pool=pool)
        for _ in range(2):
            f2(f1(x1)).float().sum().backward()
        return "ok"

    return run


def per_layer_capture(callables, sample_args, **kwargs):
    """make_graphed_callables, one call per callable, all in one pool (an alternative capture order)."""
    pool = torch.cuda.graph_pool_handle()
    return tuple(_MAKE_GRAPHED(c, a, pool=pool, **kwargs) for c, a in zip(callables, sample_args, strict=False))


_MAKE_GRAPHED = torch.cuda.make_graphed_callables


def traced_capture(callables, sample_args, **kwargs):
    """make_graphed_callables under the sync debug mode "error", printing any exception's traceback."""
    torch.cuda.set_sync_debug_mode("error")
    try:
        return _MAKE_GRAPHED(callables, sample_args, **kwargs)
    except Exception:
        traceback.print_exc()
        raise
    finally:
        torch.cuda.set_sync_debug_mode("default")


def bernoulli_dropout(x, p, train):
    """native_dropout's contract from a Bernoulli mask (another RNG op, to compare under capture)."""
    mask = torch.empty_like(x, dtype=torch.bool).bernoulli_(1.0 - p)
    return x * mask * (1.0 / (1.0 - p)), mask


def case_tiny(layers, per_layer, p=0.2, variant=""):
    """The fast path's decoder graphs on a tiny 4-bit Llama with LoRA dropout ``p`` (the guard lifted).

    ``variant``: "syncdebug" (capture under the sync debug mode, traceback printed), "capture-first"
    (capture at the first forward, no eager dropout before it), "bernoulli" (dropout drawn with
    ``bernoulli_`` instead of ``native_dropout``)."""

    def run():
        import tempfile
        from pathlib import Path

        sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
        from _tiny_qlora import VOCAB, load_4bit, lora, tiny_llama_checkpoint

        from qlora_plugin.fastpath.kernels import FastPathConfig, apply_fast_path, graphs

        graphs.draws_random_numbers = lambda layers: False
        if per_layer:
            torch.cuda.make_graphed_callables = per_layer_capture
        if variant == "syncdebug":
            torch.cuda.make_graphed_callables = traced_capture
        if variant == "bernoulli":
            torch.native_dropout = bernoulli_dropout
        if variant == "capture-first":
            key = graphs.DecoderGraphs._key

            def first_key(self, *args):
                k = key(self, *args)
                self.last_key = self.last_key or k
                return k

            graphs.DecoderGraphs._key = first_key
        ckpt = tiny_llama_checkpoint(Path(tempfile.mkdtemp()) / "llama", layers=layers)
        model = lora(load_4bit(ckpt, "cuda"), stock=False, dropout=p)
        apply_fast_path(model, config=FastPathConfig(recompute="none", cache_block_constants=True, cuda_graphs=True))
        model.train()
        ctl = model.get_base_model().model.layers[0].__dict__["_qlora_decoder_graphs"]
        x = torch.randint(0, VOCAB, (2, 64), generator=torch.Generator().manual_seed(9)).to("cuda")
        losses = []
        for _ in range(5):
            loss = model(input_ids=x, labels=x).loss
            loss.backward()
            model.zero_grad(set_to_none=True)
            losses.append(round(float(loss), 5))
        rng_ok = bool(torch.isfinite(torch.nn.functional.dropout(torch.ones(64, device="cuda"), 0.5)).all())
        return (
            f"captured={ctl.graphed is not None} replays={ctl.replays} off={ctl.disabled_because[:200]!r} "
            f"distinct_losses={len(set(losses))}/5 generator_ok={rng_ok}"
        )

    return run


CASES = {
    "plain": case_plain,
    "module": case_module,
    "lora0": case_lora(0.0),
    "lora02": case_lora(0.2),
    "two-callables": case_two_loras("two-callables"),
    "one-callable": case_two_loras("one-callable"),
    "two-calls-pool": case_two_loras("two-calls-pool"),
    "tiny-1-layer": case_tiny(1, False),
    "tiny-2-layers": case_tiny(2, False),
    "tiny-2-layers-per-layer-capture": case_tiny(2, True),
    "tiny-1-layer-p0": case_tiny(1, False, p=0.0),
    "tiny-1-layer-syncdebug": case_tiny(1, False, variant="syncdebug"),
    "tiny-1-layer-capture-first": case_tiny(1, False, variant="capture-first"),
    "tiny-1-layer-bernoulli": case_tiny(1, False, variant="bernoulli"),
}
if __name__ == "__main__":
    if len(sys.argv) > 1:
        try:
            print(sys.argv[1], "OK", CASES[sys.argv[1]]())
        except Exception as e:
            print(sys.argv[1], "FAIL", type(e).__name__, str(e)[:300])
            traceback.print_exc(limit=8)
    else:
        for name in CASES:
            r = subprocess.run([sys.executable, __file__, name], capture_output=True, text=True, timeout=120)
            print((r.stdout + r.stderr[-1500:]).strip())
