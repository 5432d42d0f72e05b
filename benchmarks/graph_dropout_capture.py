"""Which dropout captures work under CUDA graphs on this machine's torch? One case per process.

    PYTHONPATH=src python3 benchmarks/graph_dropout_capture.py      (CUDA machine, repository root)

Cases: plain ``native_dropout`` in ``torch.cuda.graph``; ``nn.Dropout`` and the fused LoRA
function (dropout 0 and 0.2) under ``make_graphed_callables``. Results of run 5 are in
benchmarks/results/run5-graphs/call2-diagnostics/ (benchmarks/NOTES.md, section 8).
"""
import subprocess, sys, traceback
import torch
from torch import nn

def case_plain():
    x = torch.randn(64, 64, device="cuda")
    g = torch.cuda.CUDAGraph(); s = torch.cuda.Stream(); s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        torch.native_dropout(x, 0.2, True)
    torch.cuda.current_stream().wait_stream(s)
    with torch.cuda.graph(g):
        y, m = torch.native_dropout(x, 0.2, True)
    g.replay(); a = m.clone(); g.replay(); return f"masks differ: {not torch.equal(a, m)}"

def case_module():
    mod = nn.Sequential(nn.Linear(64, 64), nn.Dropout(0.2)).cuda()
    x = torch.randn(8, 64, device="cuda", requires_grad=True)
    f = torch.cuda.make_graphed_callables(mod, (x,))
    f(x).sum().backward(); return "ok"

class Lora(nn.Module):
    def __init__(self, p):
        super().__init__()
        import bitsandbytes as bnb
        self.base = bnb.nn.Linear4bit(256, 256, bias=False, compute_dtype=torch.bfloat16, quant_type="nf4").cuda()
        self.a = nn.Parameter(torch.randn(8, 256, device="cuda") * 0.01)
        self.b = nn.Parameter(torch.randn(256, 8, device="cuda") * 0.01)
        self.p = p
    def forward(self, x):
        from qlora_plugin.kernels.lora_linear import lora_4bit_linear
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

CASES = {"plain": case_plain, "module": case_module, "lora0": case_lora(0.0), "lora02": case_lora(0.2)}
if __name__ == "__main__":
    if len(sys.argv) > 1:
        try:
            print(sys.argv[1], "OK", CASES[sys.argv[1]]())
        except Exception as e:
            print(sys.argv[1], "FAIL", type(e).__name__, str(e)[:300]); traceback.print_exc(limit=8)
    else:
        for name in CASES:
            r = subprocess.run([sys.executable, __file__, name], capture_output=True, text=True, timeout=120)
            print((r.stdout + r.stderr[-1500:]).strip())
