"""Training under CUDA graphs (issue 3): capture ``power_retention`` forward + backward on the Triton backend in one
``torch.cuda.CUDAGraph``, replay it on new inputs copied into the static buffers, and compare with eager.

    PYTHONPATH=packages/retention-core/src:packages/retention-kernels/src python benchmarks/gpu_graphs.py [--out DIR]

Kernels autotune (and the sympow tables are built) during the eager warm-up: a capture cannot benchmark or
allocate outside the graph's pool. Each case checks, on fresh inputs, that the replayed outputs and gradients
equal eager ones (bitwise for the same kernels is not required: relative error <= 1e-3 in bf16 terms) and
reports eager vs replay time. Writes ``gpu_graphs.json`` under ``--out`` (default ``$OUT`` or benchmarks/results).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
from pathlib import Path

import torch
from triton.testing import do_bench

from retention import power_retention
from retention.testing import random_inputs, relative_error

NAMES = ("Q", "K", "V", "log_G")
CASES = [  # (deg, b, t, hq, h, d, dtype, chunk_size)
    (2, 2, 4096, 8, 8, 64, torch.bfloat16, None),
    (2, 1, 3000, 8, 2, 64, torch.float16, 1024),
    (1, 2, 4096, 8, 8, 64, torch.bfloat16, None),
]


def step(inputs, cotangent, deg, chunk_size):
    """One training step's attention: outputs and the gradients of ``<Y, cotangent>``."""
    leaves = [inputs[n] for n in NAMES]
    Y = power_retention(*leaves, deg=deg, chunk_size=chunk_size, backend="triton")
    grads = torch.autograd.grad((Y.float() * cotangent).sum(), leaves)
    return [Y, *grads]


def run_case(deg, b, t, hq, h, d, dtype, chunk_size) -> dict:
    label = f"deg{deg} b{b} t{t} hq{hq} h{h} d{d} {str(dtype).removeprefix('torch.')} chunk={chunk_size}"
    generator = torch.Generator().manual_seed(t + deg)  # random_inputs draws on the CPU

    def fresh():
        drawn = random_inputs(b=b, t=t, hq=hq, h=h, d=d, dtype=dtype, gating=True, generator=generator,
                              device="cuda")
        return {n: drawn[n] for n in NAMES}, torch.randn(b, t, hq, d, generator=generator).cuda()

    static, static_cotangent = fresh()
    for x in static.values():
        x.requires_grad_(True)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up: autotune, tables, allocator
        for _ in range(3):
            step(static, static_cotangent, deg, chunk_size)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outputs = step(static, static_cotangent, deg, chunk_size)

    errors = {}
    for _ in range(2):  # new inputs through the same graph
        new, cotangent = fresh()
        with torch.no_grad():
            for n in NAMES:
                static[n].copy_(new[n])
            static_cotangent.copy_(cotangent)
        graph.replay()
        torch.cuda.synchronize()
        eager = step({n: new[n].clone().requires_grad_(True) for n in NAMES}, cotangent, deg, chunk_size)
        for name, got, want in zip(("Y", "dQ", "dK", "dV", "dlog_G"), outputs, eager):
            errors[name] = max(errors.get(name, 0.0), relative_error(got.double(), want.double()))
    eager_ms = do_bench(lambda: step(static, static_cotangent, deg, chunk_size))
    replay_ms = do_bench(graph.replay)
    passed = all(error <= 1e-3 for error in errors.values())
    print(f"[{'PASS' if passed else 'FAIL'}] {label}: replay vs eager " +
          " ".join(f"{k}={v:.1e}" for k, v in errors.items()) + f"; eager {eager_ms:.3f} ms, replay {replay_ms:.3f} ms",
          flush=True)
    return {"case": label, "passed": passed, "errors": errors, "eager_ms": eager_ms, "replay_ms": replay_ms}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path,
                        default=Path(os.environ.get("OUT") or Path(__file__).parent / "results"))
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("gpu_graphs.py needs a CUDA device")
    rows = []
    for case in CASES:
        try:
            rows.append(run_case(*case))
        except Exception as error:  # keep the other cases: the report says which one failed and why
            print(f"[FAIL] {case}: {type(error).__name__}: {error}", flush=True)
            rows.append({"case": str(case), "passed": False, "error": f"{type(error).__name__}: {error}"})
    report = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "device": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": rows}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "gpu_graphs.json").write_text(json.dumps(report, indent=1))
    passed = sum(row["passed"] for row in rows)
    print(f"{passed}/{len(rows)} CUDA-graph cases passed")
    return 0 if passed == len(rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
