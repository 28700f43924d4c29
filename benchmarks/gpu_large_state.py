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
CASES = [(4, 16, 1024, 64), (1, 32, 1024, 1), (1, 64, 1024, 8), (4, 32, 1024, 1), (3, 32, 1024, 8),
         (4, 32, 1024, 64), (3, 64, 1024, 32)]
TINY = [(4, 8, 40, 2), (3, 8, 40, 2)]
HEADS = 8
# --variants: the d = 32 failures (wrong outputs at deg 4, inf at deg 3, illegal addresses) under other tile
# shapes of the minimal-layout kernels (fields of function._Plan), to find which one Triton 3.6 miscompiles
VARIANTS = {
    "as-is": {}, "EP64": {"EP": 64}, "DP32": {"DP": 32}, "DP32-EP64": {"DP": 32, "EP": 64}, "BD32": {"BD": 32},
    "B32": {"BQ": 32, "BK": 32}, "warps8": {"num_warps": 8}, "fp32-operands": {"operand": "float32"},
}
PROBES = [(4, 32, 1024, 1), (3, 32, 1024, 8)]


def use_variant(name: str) -> None:
    """Make every minimal-layout plan use the tile shapes of ``VARIANTS[name]``."""
    import dataclasses

    import triton.language as tl

    from retention_kernels.triton import function

    changes = {k: getattr(tl, v) if k == "operand" else v for k, v in VARIANTS[name].items()}
    plan = function._plan
    function._plan = lambda *args: dataclasses.replace(plan(*args), **changes)


def one_case(deg: int, d: int, t: int, b: int, dry_run: bool, variant: str = "as-is") -> dict:
    """Run the Triton backend on ``[b, t, 8, d]`` bf16 (fp32 in the dry run) with gates and an initial state;
    judge the last batch element's outputs and gradients against the float64 quadratic oracle."""
    import torch

    use_variant(variant)

    sys.path.insert(0, os.path.dirname(__file__))
    from gpu_triton import NAMES, baseline_error, judged, labels, run_backend, run_reference

    from retention.reference import power_retention_quadratic
    from retention.sympow import sympow_dim
    from retention.testing import random_inputs

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
        error, bound = judged(g, r, baseline_error(p, r))
        errors[label] = [error, bound]
        ok &= error <= bound
    elements = b * HEADS * (-(-t // 256) + 1) * D * d
    return {"deg": deg, "d": d, "t": t, "b": b, "state_elements": elements, "pass": bool(ok),
            "seconds": seconds, "errors": errors, "inputs": list(NAMES)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=os.environ.get("OUT", "."))
    parser.add_argument("--dry-run", action="store_true", help="tiny fp32 cases on CPU under TRITON_INTERPRET=1")
    parser.add_argument("--variants", action="store_true",
                        help="also run the d = 32 probes under every tile variant (VARIANTS), informational")
    parser.add_argument("--case", help=argparse.SUPPRESS)  # deg,d,t,b: run one case in this process
    parser.add_argument("--variant", default="as-is", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.case:
        case = map(int, args.case.split(","))
        print(json.dumps(one_case(*case, dry_run=args.dry_run, variant=args.variant)))
        return 0
    env = {**os.environ, "CUDA_LAUNCH_BLOCKING": "1"}
    if args.dry_run:
        env["TRITON_INTERPRET"] = "1"
    runs = [(case, "as-is") for case in (TINY if args.dry_run else CASES)]
    if args.variants:
        probes = TINY[:1] if args.dry_run else PROBES
        runs += [(case, variant) for variant in list(VARIANTS)[1:] for case in probes]
    results, all_ok = [], True
    for case, variant in runs:
        command = [sys.executable, __file__, "--case", ",".join(map(str, case)), "--variant", variant]
        command += ["--dry-run"] * args.dry_run
        run = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
        name = "deg {} d {} t {} b {}".format(*case) + ("" if variant == "as-is" else f" [{variant}]")
        if run.returncode == 0:
            result = json.loads(run.stdout.strip().splitlines()[-1])
            detail = " ".join(f"{k}={v[0]:.1e}/{v[1]:.1e}" for k, v in result["errors"].items())
            print(f"[{'PASS' if result['pass'] else 'FAIL'}] {name} ({result['state_elements']:.1e} state "
                  f"elements, {result['seconds']:.1f} s): {detail}", flush=True)
        else:
            tail = run.stderr.strip().splitlines()[-25:]
            result = {"case": case, "pass": False, "error": "\n".join(tail)}
            print(f"[FAIL] {name}: crashed: {tail[-1] if tail else run.returncode}", flush=True)
        result["variant"] = variant
        if variant == "as-is":
            all_ok &= result["pass"]
        results.append(result)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "gpu_large_state.json"), "w") as f:
        json.dump(results, f, indent=1)
    print("PASS" if all_ok else "FAIL")
    return 0 if all_ok else 1


if __name__ == "__main__":
    sys.exit(main())
