"""fwd and fwd+bwd of deg-2 power retention at t=65536 (b 1, h 8, d 64, bf16, gates) with the first config of every
tuned list (no autotuning, so it fits a short device call; the lists put the tuner's usual pick first).

    PYTHONPATH=packages/retention-core/src:packages/retention-kernels/src python3 benchmarks/gpu_quick_time.py LABEL

Run it from two source trees in one device call to compare them (benchmarks/results/gpu_decay_split_quick_*.md).
"""

from __future__ import annotations

import sys
import time

import torch
import triton

from retention import power_retention
from retention_kernels.triton import function


def main(label: str) -> None:
    function.AUTOTUNE = False
    torch.manual_seed(0)
    b, t, h, d = 1, 65536, 8, 64
    Q, K, V = (torch.randn(b, t, h, d, device="cuda", dtype=torch.bfloat16).requires_grad_() for _ in range(3))
    log_G = torch.nn.functional.logsigmoid(torch.randn(b, t, h, device="cuda") + 4.0).requires_grad_()
    dY = torch.randn(b, t, h, d, device="cuda", dtype=torch.bfloat16)

    def forward():
        return power_retention(Q, K, V, log_G, deg=2, backend="triton")

    def forward_backward():
        torch.autograd.grad(forward(), (Q, K, V, log_G), dY)

    start = time.time()
    forward_backward()
    torch.cuda.synchronize()
    compile_s = time.time() - start

    def median(fn):
        return triton.testing.do_bench(fn, warmup=10, rep=50, return_mode="median")

    fwd_ms, fwd_bwd_ms = median(forward), median(forward_backward)
    print(f"{label}: compile {compile_s:.0f} s, fwd {fwd_ms:.3f} ms, fwd+bwd {fwd_bwd_ms:.3f} ms", flush=True)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "this tree")
