"""Triton backend on a GPU: correctness at real sizes (bf16/fp16 vs the float64 oracle, SPEC.md section 5
tolerance rule) and the SPEC.md section 6 timing protocol against SDPA. One script, one device call:

    PYTHONPATH=packages/retention-core/src:packages/retention-kernels/src python benchmarks/gpu_triton.py \
        [--quick] [--skip-checks] [--checks-only] [--no-compile] [--profile] [--degs 2,1] [--ts 1024,65536]
        [--chunks 512,1024] [--json results.json]

Prints the checks as they run and a short table last. ``--dry-run`` runs every check at tiny sizes on the CPU
under ``TRITON_INTERPRET=1`` (no timing): a typo costs no device time.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time

if "--dry-run" in sys.argv:  # before triton decorates the kernels
    os.environ["TRITON_INTERPRET"] = "1"

import torch
import torch.nn.functional as F
import triton
from triton.testing import do_bench

from retention import power_retention
from retention.flops import power_retention_cost
from retention.reference import power_retention_chunked, power_retention_quadratic
from retention.sympow import sympow_dim
from retention.testing import random_inputs, relative_error
from retention_kernels.triton import default_chunk_size

FACTOR, FLOOR = 3.0, 1e-4
NAMES = ("Q", "K", "V", "log_G", "initial_state", "sum_of_keys")
DRY_RUN = os.environ.get("TRITON_INTERPRET") == "1"
ONLY = ()  # --only: the checks whose names contain one of these (the rest are skipped)
EXCLUDE = ()  # --exclude: the checks whose names contain one of these are skipped


def size(full, tiny):
    """``full`` on the GPU, ``tiny`` in the CPU dry run."""
    return tiny if DRY_RUN else full


def log(*args):
    print(*args, flush=True)


def extra_peak_gib(step) -> float:
    """Peak CUDA memory one call of ``step`` allocates above what is allocated before it, in GiB."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    step()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**30


def run_backend(inputs, deg, chunk_size, cotangents, **kwargs):
    """Outputs and input gradients of the Triton backend for fixed cotangents (dY, dS, dz)."""
    Y, S, z = power_retention(**inputs, deg=deg, chunk_size=chunk_size, return_final_state=True,
                              backend="triton", **kwargs)
    dY, dS, dz = cotangents
    leaves = [inputs[n] for n in NAMES if n in inputs]
    loss = (Y.float() * dY).sum() + (S.float() * dS).sum() + (z.float() * dz).sum()
    grads = torch.autograd.grad(loss, leaves)
    return [Y, S, z, *grads]


def run_reference(fn, inputs, deg, cotangents, cast, **kwargs):
    # Gates and key sums stay fp32 (their contract dtype) in the low-precision baseline.
    upcast = {n: x.detach().to(cast if cast == torch.float64 or n in ("Q", "K", "V", "initial_state")
                              else torch.float32).requires_grad_(True) for n, x in inputs.items()}
    Y, S, z = fn(**upcast, deg=deg, return_final_state=True, **kwargs)
    dY, dS, dz = cotangents
    leaves = [upcast[n] for n in NAMES if n in upcast]
    loss = (Y * dY.to(Y.dtype)).sum() + (S * dS.to(S.dtype)).sum() + (z * dz.to(z.dtype)).sum()
    grads = torch.autograd.grad(loss, leaves)
    return [Y, S, z, *grads]


def labels(inputs):
    return ["Y", "state", "sum_of_keys", *["d" + n for n in NAMES if n in inputs]]


def baseline_error(plain, ref) -> float:
    """The plain formula's error in the inputs' dtype (inf where it overflows): what the tolerance rule scales."""
    return relative_error(plain, ref) if torch.isfinite(plain).all() else float("inf")


def judged(got, ref, baseline) -> tuple[float, float]:
    """``(error, bound)`` of one output under the SPEC.md tolerance rule, ``FACTOR * min(baseline, 1) + FLOOR``
    (a non-finite output has an infinite error)."""
    error = relative_error(got, ref) if torch.isfinite(got).all() else float("inf")
    return error, FACTOR * min(baseline, 1.0) + FLOOR


def check(name, inputs, deg, chunk_size=None, oracle="quadratic", baseline_errors=None, results=None,
          strict_gates=False, unjudged=()):
    """Backend vs float64 oracle; baseline = the plain quadratic formula in the inputs' dtype (or given).
    Labels in ``unjudged`` are printed (marked ``~``) but not part of PASS.

    ``strict_gates``: also report d log_G against a bound the plain formula cannot set under strong gates (its
    own d log_G is then rounding: a cancelling reverse cumulative sum), ``FACTOR * max(unit roundoff, error of the
    float64 oracle fed dY rounded to the output dtype) + FLOOR`` (informational, not part of PASS)."""
    if (ONLY and not any(part in name for part in ONLY)) or any(part in name for part in EXCLUDE):
        return True, None
    t0 = time.time()
    dtype = inputs["Q"].dtype
    b, t, hq, d = inputs["Q"].shape
    h, e = inputs["K"].shape[2], inputs["V"].shape[3]
    D = sympow_dim(d, deg)
    dev = inputs["Q"].device
    cot = (torch.randn(b, t, hq, e, device=dev), torch.randn(b, h, D, e, device=dev) * 1e-3,
           torch.randn(b, h, D, device=dev) * 1e-3)
    got = run_backend(inputs, deg, chunk_size, cot)
    if oracle == "quadratic":
        ref = run_reference(power_retention_quadratic, inputs, deg, cot, torch.float64)
    else:  # long sequences: the float64 chunked form (same math, linear memory)
        ref = run_reference(power_retention_chunked, inputs, deg, cot, torch.float64, chunk_size=1024)
    strict = None
    if strict_gates:
        rounded = (cot[0].to(dtype).float(), *cot[1:])
        gate = labels(inputs).index("dlog_G")
        floor = relative_error(run_reference(power_retention_quadratic, inputs, deg, rounded, torch.float64)[gate],
                               ref[gate])
        strict_bound = FACTOR * max(torch.finfo(dtype).eps / 2, floor) + FLOOR
        strict = (relative_error(got[gate], ref[gate]), strict_bound, floor)
    if baseline_errors is None:
        plain = run_reference(power_retention_quadratic, inputs, deg, cot, dtype, dtype=dtype)
        baseline_errors = [baseline_error(p, r) for p, r in zip(plain, ref)]
        del plain
    ok = True
    rows = []
    for label, g, r, base in zip(labels(inputs), got, ref, baseline_errors):
        err, bound = judged(g, r, base)
        passed = err <= bound or label in unjudged
        ok &= passed
        rows.append((label, err, base, passed))
    status = "PASS" if ok else "FAIL"
    detail = " ".join(f"{'~' if lbl in unjudged else ''}{lbl}={err:.2e}/{base:.1e}{'' if p else '!'}"
                      for lbl, err, base, p in rows)
    log(f"[{status}] {name} ({time.time() - t0:.1f}s): {detail}")
    if strict is not None:
        err, bound, floor = strict
        log(f"    dlog_G strict: {err:.2e} vs {bound:.2e} = {FACTOR:g} max(roundoff, {floor:.1e} from rounded dY) "
            f"+ {FLOOR:g}: {'within' if err <= bound else 'OVER'}")
    if results is not None:
        entry = {"check": name, "pass": ok, "errors": {lbl: [err, base] for lbl, err, base, _ in rows}}
        if strict is not None:
            entry["dlog_G_strict"] = {"error": strict[0], "bound": strict[1], "rounded_dY_error": strict[2]}
        results.append(entry)
    del got, ref
    torch.cuda.empty_cache()
    return ok, baseline_errors


def strong_gates(inputs, kind, generator=None):
    """``log_G`` = -20 per step (``constant``) or uniform in [-20, 0]: the gate gradients are tiny next to the
    weights that do not span a gate, the case a cancelling reverse cumulative sum of ``dG`` got wrong."""
    shape, device = inputs["log_G"].shape, inputs["log_G"].device
    gates = torch.full(shape, -20.0) if kind == "constant" else -20.0 * torch.rand(shape, generator=generator)
    inputs["log_G"] = gates.to(device).requires_grad_(True)
    return inputs


def trainable_inputs(deg, **kwargs):
    """``random_inputs(deg=deg, **kwargs)`` as leaves that require grad. Odd deg has signed weights: ``|Q|`` and
    ``|K|`` keep q.k > 0, so the denominators (and fp16 gradients) stay finite."""
    inp = random_inputs(deg=deg, **kwargs)
    if deg % 2:
        inp["Q"], inp["K"] = inp["Q"].abs(), inp["K"].abs()
    for x in inp.values():
        x.requires_grad_(True)
    return inp


def correctness(quick, results):
    dev = "cpu" if DRY_RUN else "cuda"
    ok = True
    gate_errors = []  # (check, d log_G error, rule bound, strict bound) of the strong-gate checks
    for dtype in (torch.bfloat16, torch.float16):
        tag = str(dtype).replace("torch.", "")
        # GQA, strong gating, large magnitudes, an initial state, t not a multiple of the chunk.
        t, d = size(3000, 45), size(64, 16)
        inp = random_inputs(b=2, t=t, hq=8, h=2, d=d, dtype=dtype, device=dev, gate_strength=8.0,
                            magnitude=3.0, state=True, deg=2, requires_grad=True)
        passed, base = check(f"{tag} deg2 d{d} t{t} gqa4 strong-gates mag3 state", inp, 2, chunk_size=size(None, 16),
                             results=results)
        ok &= passed
        # d log_G of -20 gates (constant, random), final-state cotangent, initial state, GQA, several chunks, the
        # last one partial: deg 2 (block-pair kernels) and deg 1 / 3 (minimal-layout kernels).
        strong = [(2, size(64, 16), size(3000, 45), size(None, 16), gates) for gates in ("constant", "uniform")]
        if not quick:
            strong += [(2, size(64, 16), size(1000, 45), size(256, 32), "constant"),
                       (1, size(64, 16), size(777, 37), size(100, 16), "constant"),
                       (3, size(16, 8), size(777, 37), size(100, 8), "uniform")]
        for deg, d, t, chunk, gates in strong:
            inp = trainable_inputs(deg, b=2, t=t, hq=4, h=2, d=d, dtype=dtype, device=dev, state=True)
            name = f"{tag} deg{deg} d{d} t{t} chunk{chunk} gqa2 state gates-20-{gates}"
            # Constant -20 gates: y_i = v_i up to e^-20, so dQ and dK are e^-20 times their usual size, below the
            # rounding of any low-precision Y (the plain formula misses them as far): reported, not judged.
            unjudged = ("dQ", "dK") if gates == "constant" else ()
            entries = len(results)
            ok &= check(name, strong_gates(inp, gates), deg, chunk_size=chunk, results=results,
                        strict_gates=True, unjudged=unjudged)[0]
            if len(results) > entries:
                gate_errors.append((name, results[-1]["errors"]["dlog_G"], results[-1]["dlog_G_strict"]))
        # deg 1 (minimal-layout kernels) at its automatic chunk (128): 24 chunks, so the slot scans run more than
        # one group of scan_kernel's STEPS slots
        inp = trainable_inputs(1, b=2, t=size(3000, 45), hq=4, h=2, d=size(64, 16), dtype=dtype, device=dev,
                               gate_strength=8.0, state=True)
        ok &= check(f"{tag} deg1 d{size(64, 16)} t{size(3000, 45)} gqa2 gates state", inp, 1,
                    chunk_size=size(None, 2), results=results)[0]
        if quick and dtype == torch.float16:
            break
        t = size(2048, 40)
        inp = random_inputs(b=1, t=t, hq=2, h=2, d=size(64, 16), dtype=dtype, device=dev, gating=False,
                            deg=2, requires_grad=True)
        ok &= check(f"{tag} deg2 d64 t{t} no-gates chunk=t", inp, 2, chunk_size=t, results=results)[0]
        # d=32 with chunk 1024 once hit an illegal memory access (minimal-layout output kernel, Triton 3.6).
        inp = random_inputs(b=1, t=size(1500, 40), hq=2, h=1, d=32, dtype=dtype, device=dev, gate_strength=4.0,
                            deg=2, requires_grad=True)
        ok &= check(f"{tag} deg2 d32 t1500 chunk1024", inp, 2, chunk_size=size(1024, 32), results=results)[0]
        if not quick:
            for deg, d in ((1, size(64, 16)), (3, size(16, 8)), (4, size(16, 4))):
                inp = trainable_inputs(deg, b=1, t=size(777, 37), hq=4, h=2, d=d, dtype=dtype, device=dev,
                                       state=True)
                ok &= check(f"{tag} deg{deg} d{d} t777 state", inp, deg, chunk_size=size(100, 16),
                            results=results)[0]
            for d in ((16, 32, 128) if not DRY_RUN else (16,)):
                inp = random_inputs(b=1, t=size(1500, 40), hq=2, h=1, d=d, dtype=dtype, device=dev,
                                    gate_strength=20.0, deg=2, requires_grad=True)
                ok &= check(f"{tag} deg2 d{d} t1500 gates20", inp, 2, chunk_size=size(None, 16), results=results)[0]
        # Long context: 64k without gating (the state grows like t) and with gating; baseline from t=3000.
        t_long = size(16384 if quick else 65536, 64)
        for gating in ((True,) if quick else (False, True)):
            inp = random_inputs(b=1, t=t_long, hq=1, h=1, d=size(64, 16), dtype=dtype, device=dev, gating=gating,
                                deg=2, requires_grad=True)
            ok &= check(f"{tag} deg2 d64 t{t_long} gating={gating}", inp, 2, oracle="chunked",
                        chunk_size=size(None, 16), baseline_errors=base, results=results)[0]
    # Non-contiguous inputs (a transposed [b, h, t, d] storage), fp32.
    x = random_inputs(b=1, t=size(500, 30), hq=4, h=2, d=size(32, 16), dtype=torch.float32, device=dev, deg=2)
    inp = {n: v.transpose(1, 2).contiguous().transpose(1, 2).requires_grad_(True) if v.dim() == 4 else
           v.requires_grad_(True) for n, v in x.items()}
    ok &= check("fp32 deg2 d32 t500 non-contiguous", inp, 2, chunk_size=size(64, 8), results=results)[0]
    # fp32 operands at d = 128: the largest shared-memory footprint, full-fp32 products on the CUDA cores (the small
    # configs only, function._ieee_wide_prune; about a minute of compiling on an H200: not in --quick).
    if quick:
        return finish_correctness(ok, gate_errors)
    inp = random_inputs(b=1, t=size(700, 30), hq=2, h=1, d=size(128, 16), dtype=torch.float32, device=dev, deg=2,
                        requires_grad=True)
    ok &= check("fp32 deg2 d128 t700", inp, 2, chunk_size=size(256, 8), results=results)[0]
    return finish_correctness(ok, gate_errors)


def finish_correctness(ok, gate_errors):
    """Print the strong-gate checks' d log_G table; pass ``ok`` through."""
    log("\nd log_G of the strong-gate checks (relative error vs the float64 oracle):")
    log("| check | error | rule bound (plain baseline) | strict bound |")
    log("|---|---|---|---|")
    for name, (err, base), strict in gate_errors:
        log(f"| {name} | {err:.2e} | {FACTOR * min(base, 1.0) + FLOOR:.2e} | {strict['bound']:.2e} |")
    return ok


def compile_check(results) -> bool:
    """``torch.compile(fullgraph=True)`` fwd+bwd, through the custom ops alone and through the public API, against
    eager; True when both match."""
    inp = random_inputs(b=1, t=size(1000, 24), hq=2, h=2, d=size(64, 16), dtype=torch.bfloat16,
                        device="cpu" if DRY_RUN else "cuda", deg=2, requires_grad=True)

    chunk = size(None, 8)

    def f(Q, K, V, log_G):
        return power_retention(Q, K, V, log_G, backend="triton", chunk_size=chunk).float().square().sum()

    from retention_kernels.triton import power_retention_triton

    def g(Q, K, V, log_G):  # the custom ops alone, without the API's Python dispatch
        return power_retention_triton(Q, K, V, log_G, chunk_size=chunk)[0].float().square().sum()

    args = [inp["Q"], inp["K"], inp["V"], inp["log_G"]]
    ok = True
    for label, loss in (("torch.compile fullgraph (custom ops)", g), ("torch.compile fullgraph", f)):
        try:
            grads = torch.autograd.grad(torch.compile(loss, fullgraph=True)(*args), args)
            eager = torch.autograd.grad(loss(*args), args)
            err = max(relative_error(a, b) for a, b in zip(grads, eager))
            log(f"[{'PASS' if err < 1e-3 else 'FAIL'}] {label} fwd+bwd, max rel diff vs eager {err:.1e}")
            results.append({"check": label, "pass": err < 1e-3, "diff": err})
            ok &= err < 1e-3
        except Exception as error:  # report, keep timing
            log(f"[FAIL] {label}: {type(error).__name__}: {str(error)[:400]}")
            results.append({"check": label, "pass": False, "error": str(error)[:400]})
            ok = False
    return ok


def profile(deg=2, t=65536, chunk=None):
    """Per-kernel CUDA time of one forward+backward (torch.profiler), the largest first."""
    h, d = 8, 64
    inp = random_inputs(b=65536 // t, t=t, hq=h, h=h, d=d, dtype=torch.bfloat16, device="cuda", deg=deg,
                        requires_grad=True)
    dY = torch.randn_like(inp["Q"])
    for _ in range(2):
        power_retention(**inp, deg=deg, chunk_size=chunk, backend="triton").backward(dY)
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        power_retention(**inp, deg=deg, chunk_size=chunk, backend="triton").backward(dY)
        torch.cuda.synchronize()
    log(f"profile deg={deg} t={t} chunk={chunk}:")
    log(prof.key_averages().table(sort_by="cuda_time_total", row_limit=12, max_name_column_width=40))


def matmul_rate():
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    ms = do_bench(lambda: a @ b, warmup=100, rep=500, return_mode="median")
    return 2 * 8192**3 / ms * 1e-9  # TFLOP/s


def timing(deg_list, t_list, chunk_list, rate, rows):
    h, d = 8, 64
    tokens = 65536
    for deg in deg_list:
        for t in t_list:
            b = tokens // t
            inp = random_inputs(b=b, t=t, hq=h, h=h, d=d, dtype=torch.bfloat16, device="cuda", deg=deg,
                                requires_grad=True)
            dY = torch.randn(b, t, h, d, device="cuda", dtype=torch.bfloat16)
            q, k, v = (inp[n].detach().transpose(1, 2).requires_grad_(True) for n in ("Q", "K", "V"))
            dO = dY.transpose(1, 2)

            def sdpa(q=q, k=k, v=v):
                return F.scaled_dot_product_attention(q, k, v, is_causal=True)

            sdpa_f = do_bench(sdpa, warmup=25, rep=200, return_mode="median")
            sdpa_fb = do_bench(lambda dO=dO: sdpa().backward(dO), warmup=25, rep=200, return_mode="median",
                               grad_to_none=[q, k, v])
            # deg 2: every chunk size of the list that fits the context (the automatic choice's evidence)
            chunks = [C for C in chunk_list if C <= t] if deg == 2 else [None]
            for C in chunks:
                args = dict(deg=deg, chunk_size=C, backend="triton")
                def fwd(inp=inp, args=args):
                    return power_retention(**inp, **args)

                def fb(inp=inp, args=args, dY=dY):
                    power_retention(**inp, **args).backward(dY)

                ms_f = do_bench(fwd, warmup=25, rep=200, return_mode="median")
                ms_fb = do_bench(fb, warmup=25, rep=200, return_mode="median",
                                 grad_to_none=[inp[n] for n in ("Q", "K", "V", "log_G")])
                for n in ("Q", "K", "V", "log_G"):
                    inp[n].grad = None
                peak = extra_peak_gib(fb)
                chunk = C or default_chunk_size(t, d, deg)
                flops = power_retention_cost(b, t, h, d, deg=deg, chunk_size=chunk).flops  # SPEC section 6 count
                frac_f = flops / ms_f * 1e-9 / rate
                frac_fb = power_retention_cost(b, t, h, d, deg=deg, chunk_size=chunk, pass_="fwd+bwd").flops / ms_fb \
                    * 1e-9 / rate
                row = dict(deg=deg, t=t, b=b, chunk=chunk, fwd_ms=ms_f, fwdbwd_ms=ms_fb, sdpa_fwd_ms=sdpa_f,
                           sdpa_fwdbwd_ms=sdpa_fb, speedup_fwd=sdpa_f / ms_f, speedup_fwdbwd=sdpa_fb / ms_fb,
                           matmul_frac_fwd=frac_f, matmul_frac_fwdbwd=frac_fb, peak_extra_gib=peak)
                rows.append(row)
                log(f"deg={deg} t={t:6d} b={b:3d} C={chunk:5d}: fwd {ms_f:8.3f} ms (sdpa {sdpa_f:8.3f}, "
                    f"x{sdpa_f / ms_f:5.2f})  fwd+bwd {ms_fb:8.3f} ms (sdpa {sdpa_fb:8.3f}, x{sdpa_fb / ms_fb:5.2f})"
                    f"  matmul-frac fwd {frac_f:.2f} fb {frac_fb:.2f}  peak+{peak:.2f} GiB")
            del inp, q, k, v
            torch.cuda.empty_cache()


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--skip-checks", action="store_true")
    parser.add_argument("--json", default=None)
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--chunks", default="256,512,1024")
    parser.add_argument("--degs", default="2,1")
    parser.add_argument("--ts", default="1024,4096,16384,65536")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile checks")
    parser.add_argument("--checks-only", action="store_true", help="no timing")
    parser.add_argument("--only", default="", help="comma-separated parts of check names: run only those checks")
    parser.add_argument("--exclude", default="", help="comma-separated parts of check names: skip those checks")
    parser.add_argument("--dry-run", action="store_true",
                        help="the checks at tiny sizes on the CPU under TRITON_INTERPRET=1, no timing")
    args = parser.parse_args()
    global ONLY, EXCLUDE
    ONLY = tuple(part for part in args.only.split(",") if part)
    EXCLUDE = tuple(part for part in args.exclude.split(",") if part)
    torch.manual_seed(0)
    device = "cpu (TRITON_INTERPRET=1)" if DRY_RUN else torch.cuda.get_device_properties(0).name
    info = dict(device=device, torch=torch.__version__, triton=triton.__version__,
                date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                command=" ".join(["python", *sys.argv]))
    log(info)
    results = []
    t0 = time.time()
    ok = True
    if not args.skip_checks:
        from retention_kernels.triton import function

        function.AUTOTUNE = False  # one config per kernel variant: the checks compile less
        ok = correctness(args.quick, results)
        function.AUTOTUNE = True
        if not args.no_compile:
            ok &= compile_check(results)
        log(f"checks {'all PASS' if ok else 'FAILED'} in {time.time() - t0:.0f}s")
    if DRY_RUN or args.checks_only:
        if args.json:
            with open(args.json, "w") as f:
                json.dump(dict(info=info, checks=results), f, indent=1)
        return 0 if ok else 1
    if args.profile:
        profile(chunk=1024)
    rate = matmul_rate()
    log(f"measured bf16 matmul rate: {rate:.0f} TFLOP/s")
    rows = []
    chunks = [int(c) for c in args.chunks.split(",")]
    timing([int(x) for x in args.degs.split(",")], [int(x) for x in args.ts.split(",")], chunks, rate, rows)
    log("\n| deg | t | b | C | fwd ms | SDPA fwd | x | fwd+bwd ms | SDPA f+b | x | matmul frac f / fb | peak+GiB |")
    log("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        log(f"| {r['deg']} | {r['t']} | {r['b']} | {r['chunk']} | {r['fwd_ms']:.3f} | {r['sdpa_fwd_ms']:.3f} | "
            f"{r['speedup_fwd']:.2f} | {r['fwdbwd_ms']:.3f} | {r['sdpa_fwdbwd_ms']:.3f} | {r['speedup_fwdbwd']:.2f} | "
            f"{r['matmul_frac_fwd']:.2f} / {r['matmul_frac_fwdbwd']:.2f} | {r['peak_extra_gib']:.2f} |")
    from retention_kernels.triton import function

    tuned_kernels = {name: getattr(function, name, None) for name in ("_TUNED_STATE", "_TUNED_OUTPUT",
                                                                      "_TUNED_QUERY_GRAD")}
    tuned_kernels.update({f"_TUNED_KEY_VALUE_GRAD[{block}]": tuned
                          for block, tuned in function._TUNED_KEY_VALUE_GRAD.items()})
    for name, tuned in tuned_kernels.items():
        if tuned is not None:
            log(f"{name}: " + "; ".join(f"{k}: {v}" for k, v in tuned.cache.items()))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(info=info, matmul_tflops=rate, checks=results, timing=rows), f, indent=1)
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
