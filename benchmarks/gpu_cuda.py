"""The CUDA kernels of retention-kernels on a GPU (issue 5): the wheel built on a CPU machine, installed here,
checked against the float64 oracle and the Triton kernels, then timed against Triton. One device call:

    python benchmarks/gpu_cuda.py --wheel dist/retention_kernels-*-manylinux_*_x86_64.whl [--out DIR] [--quick]

``--wheel`` installs the wheel into a private folder (``pip install --no-deps --target``) and re-runs this script
with that folder first on ``PYTHONPATH`` (retention-core from the checkout), so the kernels that run are the
wheel's, built against another torch. Without ``--wheel`` the installed/editable package is used.

Checks (each against the float64 PyTorch oracle, tolerance: 3 x the worse of the Triton error and the plain
low-precision PyTorch error, floor 1e-4; fresh random inputs, NaN-poisoned outputs):
- ``attend_window`` (tq 1 and 3, windows 0/5/64, with and without a state, GQA, fp32/fp16/bf16, deg 1..4,
  d = e in 16/32/64/128, splits 1/3/default, a non-contiguous Q), and its fold (``return_final_state``);
- the fold kernel alone (tensor cores), also at shapes with D, e and w off the tile sizes and e > 128;
- the static cache's fused decode step (``backend="cuda"``) over two folds, eager and replayed from a
  ``DecodeGraph``, against the whole-sequence oracle;
- the state query ``phi(Q)^T S`` of the chunked forward;
- ``torch.compile(fullgraph=True)`` of the attend op.

Timing (CUDA events, ``triton.testing.do_bench`` medians; bf16, b=16, h=hq=8, d=e=64, deg 2, gating, W=512):
- the attend kernel alone at a full window (CUDA per splits choice, Triton tuned default);
- the decode step replayed from a CUDA graph over 512 steps (one fold amortised) at contexts 1k..128k: CUDA vs
  Triton (the state of a context of T tokens stands in as random values: the step's cost does not depend on T);
- the decode step's CUDA launch choice (blocks per key/value head, ``splits``) at one context;
- the fold: CUDA vs Triton (and the CUDA TFLOP/s);
- the state query at the standard problem (b*t = 65536): CUDA (bf16 tensor cores) vs PyTorch (sympow + matmul).
``--quick`` keeps every dtype (fp32 runs other code paths: 3xTF32 products) but fewer shapes and contexts.
Writes ``benchmarks/results/gpu_cuda.{md,json}``.
"""

from __future__ import annotations

import argparse
import datetime
import glob
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def log(*args):
    print(*args, flush=True)


def install_wheel(wheel: str) -> None:
    """Install ``wheel`` into a private folder and re-run this script with it first on the path."""
    matches = sorted(glob.glob(wheel))
    if len(matches) != 1:
        sys.exit(f"--wheel {wheel!r} must name exactly one file, found {matches}")
    target = Path(tempfile.mkdtemp(prefix="retention-wheel-"))
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--target", str(target), matches[0]],
                   check=True)
    env = {**os.environ, "RETENTION_GPU_CUDA_WHEEL": matches[0],
           "PYTHONPATH": os.pathsep.join([str(target), str(ROOT / "packages/retention-core/src")])}
    arguments, skip = [], False
    for argument in sys.argv[1:]:  # everything but --wheel (the child uses the installed folder)
        if skip or argument.startswith("--wheel="):
            skip = False
            continue
        skip = argument == "--wheel"
        if not skip:
            arguments.append(argument)
    os.execve(sys.executable, [sys.executable, __file__, *arguments], env)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--wheel", help="the platform wheel to install and test (a glob is fine)")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    parser.add_argument("--quick", action="store_true", help="fewer check configurations and contexts")
    args = parser.parse_args()
    if args.wheel and "RETENTION_GPU_CUDA_WHEEL" not in os.environ:
        install_wheel(args.wheel)
    if "RETENTION_GPU_CUDA_WHEEL" not in os.environ:
        sys.path[:0] = [str(ROOT / "packages/retention-core/src"), str(ROOT / "packages/retention-kernels/src")]

    import torch

    import retention_kernels
    from retention_kernels import cuda as cuda_kernels

    if not torch.cuda.is_available():
        sys.exit("no GPU: this script checks and times the CUDA kernels on a GPU")
    reason = cuda_kernels.unavailable_reason()
    if reason is not None:
        sys.exit(f"the CUDA library does not load: {reason}")
    from retention_kernels.cuda import _library

    library = _library.library()
    meta = {
        "date": datetime.date.today().isoformat(), "device": torch.cuda.get_device_name(),
        "capability": list(torch.cuda.get_device_capability()), "torch": torch.__version__,
        "torch_cuda": torch.version.cuda, "wheel": os.environ.get("RETENTION_GPU_CUDA_WHEEL"),
        "retention_kernels": retention_kernels.__file__, "library": _library.library_path(),
        "library_archs": library.retention_cuda_archs().decode(),
        "library_cuda_runtime": library.retention_cuda_runtime_version(),
    }
    log(json.dumps(meta, indent=1))
    if meta["wheel"]:
        assert meta["retention_kernels"].startswith(tempfile.gettempdir()), "the wheel's package must be the one used"

    checks = run_checks(quick=args.quick)
    timings = run_timings(quick=args.quick)
    write(Path(args.out), meta, checks, timings)
    failed = [c for c in checks if not c["ok"]]
    log(f"{len(checks) - len(failed)}/{len(checks)} checks passed")
    return 1 if failed else 0


# -- checks ---------------------------------------------------------------------------------------------------


def tolerance(baseline: float) -> float:
    return max(3.0 * baseline, 1e-4)


def record(checks, name, errors: dict, baseline: float) -> None:
    """``errors``: relative error of each implementation against the oracle; CUDA's must be within tolerance."""
    limit = tolerance(baseline)
    ok = all(error == error and error <= limit for key, error in errors.items() if key.startswith("cuda"))
    checks.append({"name": name, **{k: float(v) for k, v in errors.items()}, "baseline": float(baseline),
                   "tolerance": limit, "ok": bool(ok)})
    log(f"{'ok  ' if ok else 'FAIL'} {name}: " + ", ".join(f"{k} {v:.2e}" for k, v in errors.items())
        + f" (tolerance {limit:.1e})")


def run_checks(quick: bool) -> list[dict]:
    import itertools

    import torch

    from retention import PowerRetentionCache
    from retention._validate import Problem
    from retention.inference import DecodeGraph, _attend_window, _cumulative_gate
    from retention.reference import power_retention_quadratic, update_state
    from retention.sympow import sympow
    from retention.testing import random_inputs, relative_error
    from retention_kernels.cuda import ops as cuda_ops
    from retention_kernels.triton import decode as triton_decode

    checks: list[dict] = []
    device = "cuda"
    all_dtypes = (torch.float32, torch.float16, torch.bfloat16)
    dtypes = (torch.float32, torch.bfloat16) if quick else all_dtypes
    shapes = [(2, 3, 4, 2, 64, 64, 2), (1, 1, 2, 2, 16, 16, 4), (2, 1, 8, 8, 32, 32, 3), (1, 3, 2, 1, 128, 128, 2),
              (2, 1, 2, 1, 16, 16, 1)]
    windows = (0, 5, 64)
    if quick:
        shapes, windows = shapes[:2], (5,)

    def window_problem(b, tq, hq, h, d, e, deg, w, dtype, with_state):
        inputs = random_inputs(b=b, t=max(w, 1), hq=hq, h=h, d=d, e=e, dtype=dtype, device=device, state=True,
                               deg=deg, offset=0.5 if deg % 2 else 0.0)
        Q = inputs["Q"][:, -tq:] if w else random_inputs(b=b, t=tq, hq=hq, h=h, d=d, e=e, dtype=dtype,
                                                          device=device)["Q"]
        K, V, log_G = (inputs[n][:, :w] for n in ("K", "V", "log_G"))
        state, keys = (inputs["initial_state"], inputs["sum_of_keys"]) if with_state or not w else (None, None)
        return Q, K, V, log_G, state, keys

    for (b, tq, hq, h, d, e, deg), w, dtype, with_state in itertools.product(shapes, windows, dtypes, (True, False)):
        if w and tq > w:
            continue
        Q, K, V, log_G, state, keys = window_problem(b, tq, hq, h, d, e, deg, w, dtype, with_state)
        scale = d**-0.5
        G64 = _cumulative_gate(log_G.double() if w else None, b, w, h, device, torch.float64)
        G = G64.float()
        oracle = _attend_window(Q.double(), K.double(), V.double(), G64,
                                None if state is None else state.double(),
                                None if keys is None else keys.double(), deg, scale, torch.float64)
        plain = _attend_window(Q, K, V, G.to(dtype), state, None if keys is None else keys.to(dtype), deg, scale,
                               dtype)
        for splits in (1, 3, 0):
            problem = Problem(Q, K, V, log_G, state, keys, deg, scale, None, False)
            y_cuda = cuda_ops.attend_window(problem, G, splits=splits)
            y_triton = triton_decode.attend_window(problem, G)
            errors = {"cuda": relative_error(y_cuda.double(), oracle),
                      "triton": relative_error(y_triton.double(), oracle)}
            baseline = max(errors["triton"], relative_error(plain.double(), oracle))
            record(checks, f"attend b{b} tq{tq} hq{hq} h{h} d{d} e{e} deg{deg} w{w} {str(dtype)[6:]} "
                           f"state={state is not None} splits={splits or 'auto'}", errors, baseline)
        if w and state is not None:  # the fold through the backend op, and a non-contiguous Q
            problem = Problem(Q, K, V, log_G, state, keys, deg, scale, None, True)
            Y, new_state, new_keys = cuda_ops.attend_window(problem, G)
            s64, z64 = update_state(K.double(), V.double(), G64, deg, state.double(), keys.double(),
                                    torch.float64)
            ts, tz = triton_decode.update_state(problem, G)
            errors = {"cuda state": relative_error(new_state.double(), s64),
                      "cuda keys": relative_error(new_keys.double(), z64),
                      "triton state": relative_error(ts.double(), s64), "triton keys": relative_error(tz.double(), z64)}
            plain_state = relative_error(update_state(K, V, G, deg, state, keys, dtype)[0].double(), s64)
            record(checks, f"fold b{b} h{h} d{d} e{e} deg{deg} w{w} {str(dtype)[6:]}", errors,
                   max(errors["triton state"], errors["triton keys"], plain_state))
            Q_strided = torch.empty(b, tq, d, hq, device=device, dtype=dtype).transpose(2, 3)
            Q_strided.copy_(Q)
            problem = Problem(Q_strided, K, V, log_G, state, keys, deg, scale, None, False)
            errors = {"cuda": relative_error(cuda_ops.attend_window(problem, G).double(), oracle)}
            record(checks, f"attend non-contiguous Q d{d} deg{deg} {str(dtype)[6:]}", errors,
                   max(relative_error(y_triton.double(), oracle), relative_error(plain.double(), oracle)))

    # The fold kernel alone at shapes off its tiles: D not a multiple of 128, e not of 16 and above 128 (two
    # column blocks), windows not a multiple of 32 steps, GQA-free heads; with and without a state.
    fold_shapes = [(2, 2, 64, 64, 2, 512), (1, 3, 32, 200, 2, 77), (2, 1, 16, 24, 3, 33), (1, 2, 8, 8, 4, 40),
                   (1, 2, 128, 128, 1, 50)]
    for (b, h, d, e, deg, w), dtype in itertools.product(fold_shapes[:3] if quick else fold_shapes, all_dtypes):
        inputs = random_inputs(b=b, t=w, hq=h, h=h, d=d, e=e, dtype=dtype, device=device, state=True, deg=deg)
        K, V, log_G = inputs["K"], inputs["V"], inputs["log_G"]
        G64 = _cumulative_gate(log_G.double(), b, w, h, device, torch.float64)
        for with_state in (True, False):
            state, keys = (inputs["initial_state"], inputs["sum_of_keys"]) if with_state else (None, None)
            s64, z64 = update_state(K.double(), V.double(), G64, deg, None if state is None else state.double(),
                                    None if keys is None else keys.double(), torch.float64)
            new_state, new_keys = cuda_ops.fold_window(K, V, G64.float(), deg, state, keys)
            ts, tz = triton_decode.fold_window(K, V, G64.float(), deg, state, keys)
            plain = update_state(K, V, G64.float(), deg, state, keys, dtype)[0]
            errors = {"cuda state": relative_error(new_state.double(), s64),
                      "cuda keys": relative_error(new_keys.double(), z64),
                      "triton state": relative_error(ts.double(), s64), "triton keys": relative_error(tz.double(), z64)}
            record(checks, f"fold kernel b{b} h{h} d{d} e{e} deg{deg} w{w} {str(dtype)[6:]} state={with_state}",
                   errors, max(errors["triton state"], errors["triton keys"], relative_error(plain.double(), s64)))

    # The static cache's fused decode step over two folds, eager and from a CUDA graph, against the oracle.
    for dtype in dtypes:
        b, hq, h, d, W, deg = 2, 4, 2, 32, 16, 2
        t0, steps = 7, 2 * W + 3
        inputs = random_inputs(b=b, t=t0 + steps, hq=hq, h=h, d=d, dtype=dtype, device=device, deg=deg)
        Q, K, V, log_G = inputs["Q"], inputs["K"], inputs["V"], inputs["log_G"]
        oracle = power_retention_quadratic(Q, K, V, log_G, deg=deg)
        plain = power_retention_quadratic(Q, K, V, log_G, deg=deg, dtype=torch.float32).to(dtype)
        for backend, graph in (("cuda", False), ("cuda", True), ("triton", False)):
            cache = PowerRetentionCache(deg=deg, switch_over_seq_len=W, backend=backend, static=True)
            outputs = [cache.step(Q[:, :t0], K[:, :t0], V[:, :t0], log_G[:, :t0])]
            replay = None
            for i in range(t0, t0 + steps):
                step = (Q[:, i:i + 1], K[:, i:i + 1], V[:, i:i + 1], log_G[:, i:i + 1])
                if graph and replay is None:
                    replay = DecodeGraph(cache, *step)
                outputs.append(replay(*step).clone() if graph else cache.step(*step))
            Y = torch.cat(outputs, dim=1)
            errors = {f"{backend}": relative_error(Y.double(), oracle)}
            if backend == "triton":
                triton_error = errors["triton"]
                continue
            record(checks, f"decode {backend}{' graph' if graph else ''} {str(dtype)[6:]} W{W} steps{steps}",
                   errors, relative_error(plain.double(), oracle))
        checks[-1]["triton"] = checks[-2]["triton"] = float(triton_error)

    # The chunked forward's state query (chunks of 32 and of 200: two row blocks, the second partial).
    for dtype, (d, e, deg, chunk) in itertools.product(all_dtypes, ((64, 64, 2, 32), (32, 32, 3, 200),
                                                                    (16, 16, 4, 32), (128, 128, 1, 200),
                                                                    (24, 48, 2, 32))):
        b, t, hq, h = 2, 260, 4, 2
        n = -(-t // chunk)
        inputs = random_inputs(b=b, t=t, hq=hq, h=h, d=d, e=e, dtype=dtype, device=device)
        Q = inputs["Q"]
        states = torch.randn(b, h, n, sympow(torch.ones(1, d), deg).shape[-1], e, device=device)
        keys = torch.rand(b, h, n, states.shape[3], device=device)
        G = -torch.rand(b, t, h, device=device) * 3
        scale = d**-0.5
        phi = sympow(Q.double(), deg) * scale**deg  # [b, t, hq, D]
        chunk_of = torch.arange(t, device=device) // chunk
        S = states.double().repeat_interleave(hq // h, dim=1)[:, :, chunk_of]  # [b, hq, t, D, e]
        Z = keys.double().repeat_interleave(hq // h, dim=1)[:, :, chunk_of]
        gate = G.double().exp().repeat_interleave(hq // h, dim=2)  # [b, t, hq]
        num64 = torch.einsum("bthD,bhtDe->bthe", phi, S) * gate[..., None]
        den64 = torch.einsum("bthD,bhtD->bth", phi, Z) * gate
        num, den = cuda_ops.state_query(Q, states, keys, G, deg, scale, chunk)
        plain_num = torch.einsum("bthD,bhtDe->bthe", sympow(Q, deg).float() * scale**deg, S.float())
        plain_num = plain_num * gate[..., None].float()
        errors = {"cuda num": relative_error(num.double(), num64), "cuda den": relative_error(den.double(), den64)}
        # The kernel multiplies bf16 operands (phi(q) and the fp32 states rounded to bf16, fp32 accumulation)
        # for fp16/bf16 queries, 3xTF32 (about fp32) for fp32: the baseline is PyTorch with the same roundings.
        operand = torch.float32 if dtype == torch.float32 else torch.bfloat16
        phi_rounded = (sympow(Q.double(), deg).to(operand).double() * scale**deg)
        emulated = torch.einsum("bthD,bhtDe->bthe", phi_rounded, S.to(operand).double()) * gate[..., None]
        baseline = max(relative_error(plain_num.double(), num64), relative_error(emulated, num64))
        record(checks, f"state query d{d} e{e} deg{deg} {str(dtype)[6:]} chunk{chunk}", errors, baseline)

    # torch.compile traces the custom op through its fake kernel.
    b, tq, hq, h, d, w = 2, 1, 4, 2, 64, 33
    Q, K, V, log_G, state, keys = window_problem(b, tq, hq, h, d, d, 2, w, torch.bfloat16, True)
    G = _cumulative_gate(log_G, b, w, h, device, torch.float32)
    compiled = torch.compile(lambda *x: torch.ops.retention_kernels.cuda_attend_window(*x), fullgraph=True)
    eager = torch.ops.retention_kernels.cuda_attend_window(Q, K, V, G, state, keys, 2, d**-0.5, 0)
    traced = compiled(Q, K, V, G, state, keys, 2, d**-0.5, 0)
    record(checks, "torch.compile(fullgraph) of cuda_attend_window", {"cuda compiled vs eager":
                                                                       relative_error(traced.double(), eager.double())},
           0.0)
    return checks


# -- timings --------------------------------------------------------------------------------------------------


def run_timings(quick: bool) -> dict:
    import torch
    from triton.testing import do_bench

    from retention import PowerRetentionCache
    from retention._validate import Problem
    from retention.inference import DecodeGraph
    from retention.sympow import sympow, sympow_dim
    from retention_kernels.cuda import ops as cuda_ops
    from retention_kernels.triton import decode as triton_decode

    device, dtype = "cuda", torch.bfloat16
    b, h, d, e, deg, W = 16, 8, 64, 64, 2, 512
    D = sympow_dim(d, deg)
    scale = d**-0.5
    timings: dict = {"problem": {"b": b, "h": h, "hq": h, "d": d, "e": e, "deg": deg, "W": W, "dtype": "bf16"}}

    def rand(*shape, dt=dtype):
        return torch.randn(*shape, device=device, dtype=dt)

    # The attend kernel alone at a full window.
    Q = rand(b, 1, h, d)
    K, V = rand(b, W, h, d), rand(b, W, h, e)
    G = -torch.rand(b, W, h, device=device).cumsum(1) * 0.01
    state, keys = rand(b, h, D, e) * 0.01, torch.rand(b, h, D, device=device)
    problem = Problem(Q, K, V, None, state, keys, deg, scale, None, False)
    attend = {"triton": do_bench(lambda: triton_decode.attend_window(problem, G)) * 1e3}
    for splits in (1, 2, 4, 8, 16, 0):
        attend[f"cuda splits={splits or 'auto'}"] = do_bench(lambda s=splits: cuda_ops.attend_window(problem, G,
                                                                                                       splits=s)) * 1e3
    timings["attend_us"] = attend
    log("attend (us):", {k: round(v, 1) for k, v in attend.items()})

    timings["fold_us"] = {
        "triton": do_bench(lambda: triton_decode.fold_window(K, V, G, deg, state, keys)) * 1e3,
        "cuda": do_bench(lambda: cuda_ops.fold_window(K, V, G, deg, state, keys)) * 1e3,
    }
    fold_flops = 2 * b * h * D * W * (e + 1)
    timings["fold_tflops"] = {k: fold_flops / v / 1e6 for k, v in timings["fold_us"].items()}
    log("fold (us):", {k: round(v, 1) for k, v in timings["fold_us"].items()},
        "TFLOP/s:", {k: round(v, 1) for k, v in timings["fold_tflops"].items()})

    # The decode step from a CUDA graph, one step at a time over a full window (one fold amortised).
    contexts = (1024, 131072) if quick else (1024, 4096, 16384, 65536, 131072)

    def decode_step_us(backend: str, context: int) -> float:
        cache = PowerRetentionCache(deg=deg, switch_over_seq_len=W, backend=backend, static=True)
        fill = context % W or W - 1
        cache.step(rand(b, fill, h, d), rand(b, fill, h, d), rand(b, fill, h, e),
                   -torch.rand(b, fill, h, device=device) * 0.01)
        cache.state.copy_(state)  # the state of a context of `context` tokens stands in as random values
        cache.sum_of_keys.copy_(keys)
        step = (rand(b, 1, h, d), rand(b, 1, h, d), rand(b, 1, h, e), -torch.rand(b, 1, h, device=device) * 0.01)
        graph = DecodeGraph(cache, *step)

        def window():
            for _ in range(W):
                graph.replay()

        return do_bench(window, warmup=1, rep=200) * 1e3 / W

    sweep = {}
    for splits in (2, 4, 8, 16, 32, None):
        cuda_ops.TUNING["splits"] = splits
        sweep[f"splits={splits or 'auto'}"] = decode_step_us("cuda", contexts[0])
    cuda_ops.TUNING["splits"] = None
    timings["decode_step_cuda_splits_us"] = sweep
    log("decode step, CUDA by splits (us):", {k: round(v, 2) for k, v in sweep.items()})
    decode = {}
    for context in contexts:
        row = {}
        for backend in ("cuda", "triton"):
            row[backend] = decode_step_us(backend, context)
        row["triton / cuda"] = row["triton"] / row["cuda"]
        decode[context] = row
        log(f"decode step at {context}: " + ", ".join(f"{k} {v:.2f}" for k, v in row.items()))
    timings["decode_step_us"] = decode

    # The state query at the standard problem: b * t = 65536, chunk 256.
    def time_state_query(t: int, chunk: int = 256) -> dict:
        bq, n = 65536 // t, t // chunk
        Qs = rand(bq, t, h, d)
        states = torch.randn(bq, h, n, D, e, device=device) * 0.01
        key_states = torch.rand(bq, h, n, D, device=device)
        Gs = -torch.rand(bq, t, h, device=device)
        cuda_ms = do_bench(lambda: cuda_ops.state_query(Qs, states, key_states, Gs, deg, scale, chunk))

        def torch_query():
            phi = sympow(Qs, deg).float().view(bq, n, chunk, h, D).permute(0, 3, 1, 2, 4)  # [b, h, n, c, D]
            return torch.matmul(phi, states), torch.matmul(phi, key_states[..., None])

        torch.backends.cuda.matmul.allow_tf32 = True
        torch_ms = do_bench(torch_query)
        torch.backends.cuda.matmul.allow_tf32 = False
        flops = 2 * bq * t * h * D * (e + 1)
        return {"cuda_ms": cuda_ms, "torch_tf32_ms": torch_ms, "cuda_tflops": flops / cuda_ms / 1e9}

    query = {}
    for t in ((1024, 65536) if quick else (1024, 4096, 16384, 65536)):
        query[t] = time_state_query(t)
        log(f"state query t={t}: cuda {query[t]['cuda_ms']:.3f} ms ({query[t]['cuda_tflops']:.1f} TFLOP/s), "
            f"torch (sympow + TF32 matmul) {query[t]['torch_tf32_ms']:.3f} ms")
    timings["state_query"] = query
    return timings


def write(out: Path, meta: dict, checks: list[dict], timings: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_cuda.json").write_text(json.dumps({"meta": meta, "checks": checks, "timings": timings}, indent=1))
    passed = sum(c["ok"] for c in checks)
    lines = [f"# CUDA kernels on {meta['device']} (sm_{meta['capability'][0]}{meta['capability'][1]})", "",
             f"Wheel: `{meta['wheel']}` (library archs {meta['library_archs']}, CUDA runtime "
             f"{meta['library_cuda_runtime']}), torch {meta['torch']} (CUDA {meta['torch_cuda']}).", "",
             f"Checks against the float64 oracle: {passed}/{len(checks)} passed "
             f"(failures: {[c['name'] for c in checks if not c['ok']] or 'none'}).", "",
             "bf16, b=16, h=hq=8, d=e=64, deg 2, W=512.", "",
             "| decode step (graph replay, us/token) | CUDA | Triton | Triton / CUDA |", "|---:|---:|---:|---:|"]
    for context, row in timings["decode_step_us"].items():
        lines.append(f"| {context} | {row['cuda']:.2f} | {row['triton']:.2f} | {row['triton / cuda']:.2f}x |")
    lines += ["", "| attend kernel, full window (us) | " + " | ".join(timings["attend_us"]) + " |",
              "|---|" + "---:|" * len(timings["attend_us"]),
              "| | " + " | ".join(f"{v:.1f}" for v in timings["attend_us"].values()) + " |", "",
              f"Fold of a full window: CUDA {timings['fold_us']['cuda']:.1f} us "
              f"({timings['fold_tflops']['cuda']:.1f} TFLOP/s), Triton {timings['fold_us']['triton']:.1f} us "
              f"({timings['fold_tflops']['triton']:.1f} TFLOP/s).", "",
              "Decode step, CUDA, by blocks per key/value head (us/token): "
              + ", ".join(f"{k} {v:.2f}" for k, v in timings["decode_step_cuda_splits_us"].items()) + ".", "",
              "| state query, b*t = 65536, chunk 256 | CUDA (ms) | CUDA TFLOP/s | PyTorch sympow + TF32 matmul (ms) |",
              "|---:|---:|---:|---:|"]
    for t, row in timings["state_query"].items():
        lines.append(f"| t={t} | {row['cuda_ms']:.3f} | {row['cuda_tflops']:.1f} | {row['torch_tf32_ms']:.3f} |")
    (out / "gpu_cuda.md").write_text("\n".join(lines) + "\n")
    log("\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())
