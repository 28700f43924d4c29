"""The minimal-layout Triton kernels (deg 1, 3, 4) at large states on a GPU: forward and backward of the last
batch element against the float64 oracle (SPEC.md section 5 tolerance rule), one case per process so that a
kernel that faults (an illegal address kills the CUDA context) shows which case and kernel it was
(``CUDA_LAUNCH_BLOCKING=1``) and the other cases still run.

    PYTHONPATH=packages/retention-core/src:packages/retention-kernels/src python benchmarks/gpu_large_state.py \
        [--out DIR] [--dry-run]

The suite's deg 4, d 32, t 1024, b 64 (states ``[b, h, n + 1, D, e]`` of 4.3e9 elements) faulted on an H200;
the cases separate the size of the state (b) from the shape of the expansion (d, deg).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

# (deg, d, t, b): small states first, then past 2**31 elements of [b, h, n + 1, D, e]
CASES = [(4, 16, 1024, 64), (4, 32, 1024, 1), (3, 32, 1024, 8), (4, 32, 1024, 8), (4, 32, 1024, 64),
         (3, 64, 1024, 32)]
TINY = [(4, 8, 40, 2), (3, 8, 40, 2)]
HEADS = 8


def one_case(deg: int, d: int, t: int, b: int, dry_run: bool) -> dict:
    """Run the Triton backend on ``[b, t, 8, d]`` bf16 (fp32 in the dry run) with gates and an initial state;
    judge the last batch element's outputs and gradients against the float64 quadratic oracle."""
    import torch

    sys.path.insert(0, os.path.dirname(__file__))
    from gpu_triton import FACTOR, FLOOR, NAMES, labels, run_backend, run_reference

    from retention.reference import power_retention_quadratic
    from retention.sympow import sympow_dim
    from retention.testing import random_inputs, relative_error

    device, dtype = ("cpu", torch.float32) if dry_run else ("cuda", torch.bfloat16)
    torch.manual_seed(0)
    inputs = random_inputs(b=b, t=t, hq=HEADS, h=HEADS, d=d, dtype=dtype, device=device, state=True, deg=deg,
                           requires_grad=True)
    if deg % 2:  # odd deg: signed weights; keep q.k > 0 so the denominators stay away from 0
        inputs["Q"] = inputs["Q"].detach().abs().requires_grad_(True)
        inputs["K"] = inputs["K"].detach().abs().requires_grad_(True)
    D = sympow_dim(d, deg)
    cotangents = (torch.randn(b, t, HEADS, d, device=device), torch.randn(b, HEADS, D, d, device=device) * 1e-3,
                  torch.randn(b, HEADS, D, device=device) * 1e-3)
    start = time.perf_counter()
    got = [x[-1:].detach() for x in run_backend(inputs, deg, None, cotangents)]
    seconds = time.perf_counter() - start
    last = {n: x[-1:].detach().requires_grad_(True) for n, x in inputs.items()}
    last_cotangents = tuple(x[-1:] for x in cotangents)
    ref = run_reference(power_retention_quadratic, last, deg, last_cotangents, torch.float64)
    plain = run_reference(power_retention_quadratic, last, deg, last_cotangents, dtype, dtype=dtype)
    errors, ok = {}, True
    for label, g, r, p in zip(labels(inputs), got, ref, plain):
        base = relative_error(p, r) if torch.isfinite(p).all() else float("inf")
        error = relative_error(g, r) if torch.isfinite(g).all() else float("inf")
        bound = FACTOR * min(base, 1.0) + FLOOR
        errors[label] = [error, bound]
        ok &= error <= bound
    elements = b * HEADS * (-(-t // 256) + 1) * D * d
    return {"deg": deg, "d": d, "t": t, "b": b, "state_elements": elements, "pass": bool(ok),
            "seconds": seconds, "errors": errors, "inputs": list(NAMES)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=os.environ.get("OUT", "."))
    parser.add_argument("--dry-run", action="store_true", help="tiny fp32 cases on CPU under TRITON_INTERPRET=1")
    parser.add_argument("--case", help=argparse.SUPPRESS)  # deg,d,t,b: run one case in this process
    args = parser.parse_args()
    if args.case:
        print(json.dumps(one_case(*map(int, args.case.split(",")), dry_run=args.dry_run)))
        return 0
    env = {**os.environ, "CUDA_LAUNCH_BLOCKING": "1"}
    if args.dry_run:
        env["TRITON_INTERPRET"] = "1"
    results, all_ok = [], True
    for case in TINY if args.dry_run else CASES:
        command = [sys.executable, __file__, "--case", ",".join(map(str, case))] + ["--dry-run"] * args.dry_run
        run = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
        name = "deg {} d {} t {} b {}".format(*case)
        if run.returncode == 0:
            result = json.loads(run.stdout.strip().splitlines()[-1])
            detail = " ".join(f"{k}={v[0]:.1e}/{v[1]:.1e}" for k, v in result["errors"].items())
            print(f"[{'PASS' if result['pass'] else 'FAIL'}] {name} ({result['state_elements']:.1e} state "
                  f"elements, {result['seconds']:.1f} s): {detail}", flush=True)
        else:
            tail = run.stderr.strip().splitlines()[-25:]
            result = {"case": case, "pass": False, "error": "\n".join(tail)}
            print(f"[FAIL] {name}: crashed\n    " + "\n    ".join(tail), flush=True)
        all_ok &= result["pass"]
        results.append(result)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "gpu_large_state.json"), "w") as f:
        json.dump(results, f, indent=1)
    print("PASS" if all_ok else "FAIL")
    return 0 if all_ok else 1


if __name__ == "__main__":
    sys.exit(main())
