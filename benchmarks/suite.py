"""The benchmark suite: power retention against PyTorch SDPA (and flash-attn, fla when installed).

    nox -s bench                 # the full suite for this machine's device
    nox -s bench -- --quick      # about a minute
    python benchmarks/suite.py --help

On a GPU it runs the SPEC.md section 6 protocol (bf16, gating on, ``b * t = 65536`` tokens, ``t`` from 1k to
64k, deg 1/2/4, head dims 32/64/128, fwd, bwd and fwd+bwd); on a CPU the same shapes scaled down (fp32,
``b * t = 8192``, ``t`` from 512 to 8192, 4 heads, deg 2, head dim 64). Every installed backend of ours runs
(``retention.available_backends()``); one that cannot run a case is skipped with its reason. Baselines run
in the same process on the same shapes. FLOPs come from :func:`retention.flops.power_retention_cost`.

Outputs, under ``--out`` (default ``benchmarks/results/``), named ``<device>-<date>``: a JSON file with
everything, ``.csv`` (training suite) and ``-decode.csv`` (inference suite), and PNG plots.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import dataclasses
import datetime
import json
import math
import platform
import re
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

import retention
from retention.flops import PASSES, power_retention_cost

RESULTS = Path(__file__).parent / "results"
console = Console(width=None if sys.stdout.isatty() else 160)  # logs and CI: wide enough for the table


# --------------------------------------------------------------------------------------------------------------
# Configuration


@dataclasses.dataclass
class Config:
    """What one run measures."""

    device: str
    dtype: str
    tokens: int  # b * t, fixed across context lengths
    contexts: list[int]
    degs: list[int]
    head_dims: list[int]
    heads: int
    passes: list[str]
    chunk_size: int | None  # None: each backend's default (what users get), counted with that chunk
    gating: bool
    decode_contexts: list[int]
    decode_batch: int
    decode_steps: int
    warmup: int  # CPU timer: untimed calls first
    repeats: int  # CPU timer: timed calls (the median is reported)
    matmul_size: int
    memory_budget_gb: float  # a method whose estimated memory exceeds this is skipped with a note

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)


def default_config(device: str, quick: bool) -> Config:
    if device == "cuda":
        total_gb = torch.cuda.get_device_properties(0).total_memory / 2**30
        if quick:
            return Config(device, "bfloat16", 65536, [1024, 16384], [2], [64], 8, ["fwd", "fwd+bwd"], None, True,
                          [1024, 16384], 1, 20, 0, 0, 8192, 0.6 * total_gb)
        return Config(device, "bfloat16", 65536, [1024, 4096, 16384, 65536], [1, 2, 4], [32, 64, 128], 8,
                      list(PASSES), None, True, [1024, 4096, 16384, 65536], 1, 50, 0, 0, 8192, 0.6 * total_gb)
    if quick:
        return Config(device, "float32", 2048, [512, 2048], [2], [64], 4, ["fwd", "fwd+bwd"], None, True,
                      [512, 4096], 1, 10, 1, 3, 2048, 3.0)
    return Config(device, "float32", 8192, [512, 1024, 2048, 4096, 8192], [2], [64], 4, list(PASSES), None, True,
                  [512, 2048, 8192], 1, 20, 1, 5, 2048, 6.0)


def device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name(0)
    model = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return f"CPU {model} ({torch.get_num_threads()} threads)"


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


# --------------------------------------------------------------------------------------------------------------
# Timing


def log(message: str) -> None:
    """A line per measurement where no progress bar is drawn (logs, CI, remote runs)."""
    if not console.is_terminal:
        console.print(f"[{time.strftime('%H:%M:%S')}] {message}", highlight=False, markup=False)


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def median_ms(fn: Callable[[], object], config: Config) -> float:
    """Median milliseconds of ``fn``: ``triton.testing.do_bench`` (CUDA events, L2 flushed) on GPU; on CPU the
    median of ``config.repeats`` calls after ``config.warmup`` untimed ones."""
    if config.device == "cuda":
        import triton.testing

        return float(triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median"))
    for _ in range(config.warmup):
        fn()
    times = []
    for _ in range(config.repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def matmul_tflops(config: Config) -> float:
    """The measured matrix rate: one ``n x n @ n x n`` torch.matmul in the benchmark dtype."""
    n = config.matmul_size
    a = torch.randn(n, n, device=config.device, dtype=config.torch_dtype)
    b = torch.randn(n, n, device=config.device, dtype=config.torch_dtype)
    ms = median_ms(lambda: torch.matmul(a, b), dataclasses.replace(config, repeats=max(config.repeats, 5)))
    return 2 * n**3 / (ms * 1e-3) / 1e12


# --------------------------------------------------------------------------------------------------------------
# Methods: ours (one per installed backend) and the baselines


@dataclasses.dataclass(frozen=True)
class Case:
    deg: int
    head_dim: int
    t: int
    b: int
    heads: int


@dataclasses.dataclass(frozen=True)
class Method:
    """A thing to time. ``build(case, config, requires_grad)`` returns ``(run, leaves)``: ``run()`` computes the
    output from fresh inputs made once, ``leaves`` are the tensors gradients are taken of.
    ``skip(case, config)`` is None, or the reason this method does not run the case."""

    name: str
    ours: bool  # power retention (its FLOPs are counted with the chunked algorithm), else softmax attention
    build: Callable
    skip: Callable[[Case, Config], str | None]
    depends_on_deg: bool = True  # softmax baselines give the same time for every deg: measured once
    chunk: Callable[[Case, Config], int] | None = None  # ours: the chunk length the call uses


def random_qkvg(case: Case, config: Config, requires_grad: bool, heads_first: bool = False):
    """Q, K, V ``[b, t, h, d]`` (``[b, h, t, d]`` with ``heads_first``) and log_G ``[b, t, h]`` fp32 (gates in
    (0.9, 1): long memories, the hard case for numerics and the one that makes the state matter)."""
    shape = (case.b, case.heads, case.t, case.head_dim) if heads_first else (case.b, case.t, case.heads, case.head_dim)

    def draw(*size):
        return torch.randn(*size, device=config.device, dtype=config.torch_dtype).requires_grad_(requires_grad)

    q, k, v = draw(*shape), draw(*shape), draw(*shape)
    log_g = None
    if config.gating:
        gates = F.logsigmoid(torch.randn(case.b, case.t, case.heads, device=config.device) + 4.0)
        log_g = gates.requires_grad_(requires_grad)
    return q, k, v, log_g


def default_chunk(backend: str, case: Case) -> int:
    """The chunk length backend ``backend`` picks for ``chunk_size=None`` (to count its FLOPs)."""
    if backend == "cpu":
        from retention.cpu import default_chunk_size

        return default_chunk_size(case.t, retention.sympow_dim(case.head_dim, case.deg))
    if backend == "triton":
        from retention_kernels.triton.function import default_chunk_size

        return default_chunk_size(case.t, case.head_dim, case.deg)
    if backend == "reference":
        return min(case.t, 64)
    raise ValueError(f"the benchmark does not know backend {backend!r}'s default chunk: pass --chunk-size")


def ours(backend: str) -> Method:
    def chunk(case, config):
        return default_chunk(backend, case) if config.chunk_size is None else min(config.chunk_size, case.t)

    def build(case, config, requires_grad):
        q, k, v, log_g = random_qkvg(case, config, requires_grad)
        chunk_size = None if config.chunk_size is None else chunk(case, config)

        def run():
            return retention.power_retention(q, k, v, log_g, deg=case.deg, chunk_size=chunk_size, backend=backend)

        return run, [x for x in (q, k, v, log_g) if x is not None]

    def skip(case, config):
        if backend == "reference":
            # The reference materialises phi(q) [b, t, hq, D], the per-chunk states and the c x c blocks in
            # fp32; autograd keeps about three times that.
            D = retention.sympow_dim(case.head_dim, case.deg)
            c = chunk(case, config)
            elements = case.b * case.heads * (case.t * D + math.ceil(case.t / c) * D * (case.head_dim + 1) + case.t * c)
            gigabytes = 3 * 4 * elements / 2**30
            if gigabytes > config.memory_budget_gb:
                return f"needs ~{gigabytes:.0f} GB (budget {config.memory_budget_gb:.0f} GB)"
        return None

    return Method(f"retention[{backend}]", True, build, skip, chunk=chunk)


SDPA_BACKENDS = ("math", "flash", "efficient", "cudnn")


def sdpa(kernel: str | None) -> Method:
    """``scaled_dot_product_attention(is_causal=True)`` on ``[b, h, t, d]`` inputs, forced to one kernel (GPU) or
    PyTorch's default choice (``kernel=None``, the CPU baseline)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    enum = {"math": SDPBackend.MATH, "flash": SDPBackend.FLASH_ATTENTION,
            "efficient": SDPBackend.EFFICIENT_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION}

    def build(case, config, requires_grad):
        q, k, v, _ = random_qkvg(case, config, requires_grad, heads_first=True)

        def run():
            with sdpa_kernel(enum[kernel]) if kernel else contextlib.nullcontext():
                return F.scaled_dot_product_attention(q, k, v, is_causal=True)

        return run, [q, k, v]

    def skip(case, config):
        if kernel == "math":
            # Materialises the t x t scores (and softmax, and their gradients) in fp32.
            gigabytes = 3 * 4 * case.b * case.heads * case.t**2 / 2**30
            if gigabytes > config.memory_budget_gb:
                return f"materialises t x t scores: ~{gigabytes:.0f} GB"
        return None

    return Method(f"sdpa[{kernel or 'default'}]", False, build, skip, depends_on_deg=False)


def flash_attn() -> Method:
    from flash_attn import flash_attn_func

    def build(case, config, requires_grad):
        q, k, v, _ = random_qkvg(case, config, requires_grad)
        return (lambda: flash_attn_func(q, k, v, causal=True)), [q, k, v]

    return Method("flash-attn", False, build, lambda case, config: None, depends_on_deg=False)


def fla_simple_gla() -> Method:
    """flash-linear-attention's gated linear attention with a scalar gate per head and step: power retention of
    degree 1 without normalisation (its FLOPs are counted as ours with deg 1, chunk 64)."""
    from fla.ops.simple_gla import chunk_simple_gla

    def build(case, config, requires_grad):
        q, k, v, log_g = random_qkvg(case, config, requires_grad)
        return (lambda: chunk_simple_gla(q=q, k=k, v=v, g=log_g)[0]), [x for x in (q, k, v, log_g) if x is not None]

    return Method("fla[simple_gla]", False, build, lambda case, config: None, depends_on_deg=False)


def methods_for(config: Config, only: list[str] | None, quick: bool) -> tuple[list[Method], list[str]]:
    """Every method that can run here, and a note for each that cannot."""
    methods, notes = [], []
    for name in retention.available_backends():
        reason = backend_refuses(name, config)
        if reason:
            notes.append(f"retention[{name}] skipped: {reason}")
        else:
            methods.append(ours(name))
    if quick and len(methods) > 1 and not any("reference" in pattern for pattern in only or []):
        # The reference is the differentiable oracle, not a fast path: it takes most of a quick run's time.
        methods = [m for m in methods if m.name != "retention[reference]"]
        notes.append("retention[reference] not run with --quick (add --methods retention[reference] to run it)")
    if config.device == "cuda":
        methods += [sdpa(kernel) for kernel in SDPA_BACKENDS]
        for factory, package in ((flash_attn, "flash-attn"), (fla_simple_gla, "fla (flash-linear-attention)")):
            try:
                methods.append(factory())
            except ImportError as error:
                notes.append(f"{package} not installed, skipped ({error})")
    else:
        methods.append(sdpa(None))
        notes.append("flash-attn and fla need CUDA: not run on CPU")
    if only:
        methods = [m for m in methods if any(pattern in m.name for pattern in only)]
    return methods, notes


def backend_refuses(name: str, config: Config) -> str | None:
    """Why backend ``name`` cannot run on this device and dtype (asked with a tiny call), or None."""
    x = torch.randn(1, 4, 1, 16, device=config.device, dtype=config.torch_dtype)
    try:
        retention.power_retention(x, x, x, deg=2, backend=name)
    except ValueError as error:
        if "cannot run this call" in str(error):
            return str(error).split("cannot run this call: ", 1)[-1]
        raise
    return None


def method_chunk(method: Method, case: Case, config: Config) -> int | None:
    if method.name.startswith("fla"):
        return min(64, case.t)
    return method.chunk(case, config) if method.chunk else None


def method_flops(method: Method, case: Case, config: Config, pass_: str) -> float:
    if method.name.startswith("fla"):
        return power_retention_cost(case.b, case.t, case.heads, case.head_dim, deg=1,
                                    chunk_size=method_chunk(method, case, config), pass_=pass_).flops
    cost = power_retention_cost(case.b, case.t, case.heads, case.head_dim, deg=case.deg,
                                chunk_size=method_chunk(method, case, config), pass_=pass_)
    return cost.flops if method.ours else cost.sdpa_flops


def timed_call(method: Method, case: Case, config: Config, pass_: str) -> Callable[[], object]:
    """A function that runs the pass once on inputs made now (for ``bwd``, the forward is run once here)."""
    run, leaves = method.build(case, config, requires_grad=pass_ != "fwd")
    if pass_ == "fwd":
        def forward():
            with torch.no_grad():
                return run()
        return forward
    out = run()
    grad_out = torch.randn_like(out)
    if pass_ == "bwd":
        return lambda: torch.autograd.grad(out, leaves, grad_out, retain_graph=True)
    return lambda: torch.autograd.grad(run(), leaves, grad_out)


def is_out_of_memory(error: BaseException) -> bool:
    return isinstance(error, torch.OutOfMemoryError) or "out of memory" in str(error).lower()


# --------------------------------------------------------------------------------------------------------------
# The training suite


def run_training(config: Config, methods: list[Method], matmul: float, progress: Progress) -> list[dict]:
    cases = [Case(deg, d, t, config.tokens // t, config.heads)
             for deg in config.degs for d in config.head_dims for t in config.contexts]
    task = progress.add_task("training suite", total=len(cases) * len(config.passes) * len(methods))
    rows, softmax_times = [], {}  # softmax baselines do not depend on deg: time once per (method, pass, d, t)
    for pass_ in config.passes:
        for case in cases:
            for method in methods:
                progress.update(task, description=escape(f"{pass_} {method.name} deg={case.deg} t={case.t}"))
                key = (method.name, pass_, case.head_dim, case.t)
                if not method.depends_on_deg and key in softmax_times:
                    ms, note = softmax_times[key]
                else:
                    ms, note = measure(method, case, config, pass_)
                    if not method.depends_on_deg:
                        softmax_times[key] = (ms, note)
                rows.append(training_row(method, case, config, pass_, ms, note, matmul))
                progress.advance(task)
                log(f"{pass_} {method.name} deg={case.deg} d={case.head_dim} t={case.t}: {fmt(ms, '.3f')} ms {note}")
    add_speedups(rows)
    return rows


def measure(method: Method, case: Case, config: Config, pass_: str) -> tuple[float | None, str]:
    """``(median ms, "")``, or ``(None, why not)``; a failing method is reported, never fatal to the suite."""
    reason = method.skip(case, config)
    if reason:
        return None, f"skipped: {reason}"
    try:
        return median_ms(timed_call(method, case, config, pass_), config), ""
    except Exception as error:
        if is_out_of_memory(error):
            return None, "skipped: out of memory"
        return None, f"failed: {short(error)}"
    finally:  # the inputs are gone with the call's frame: give their memory back before the next method
        if config.device == "cuda":
            torch.cuda.empty_cache()


def short(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0][:160] if lines else ''}"


def training_row(method, case, config, pass_, ms, note, matmul) -> dict:
    flops = method_flops(method, case, config, pass_)
    tflops = None if ms is None else flops / (ms * 1e-3) / 1e12
    return {
        "pass": pass_, "method": method.name, "deg": case.deg, "head_dim": case.head_dim, "t": case.t,
        "b": case.b, "heads": case.heads, "dtype": config.dtype, "chunk_size": method_chunk(method, case, config),
        "ms": ms, "tokens_per_s": None if ms is None else case.b * case.t / (ms * 1e-3),
        "gflop": flops / 1e9, "tflops": tflops, "fraction_of_matmul": None if tflops is None else tflops / matmul,
        "speedup_vs_sdpa": None, "note": note,
    }


def add_speedups(rows: list[dict]) -> None:
    """``speedup_vs_sdpa`` = fastest SDPA time / this time, for the same pass and shape (> 1: faster)."""
    best = {}
    for row in rows:
        if row["method"].startswith("sdpa") and row["ms"] is not None:
            key = (row["pass"], row["deg"], row["head_dim"], row["t"])
            best[key] = min(best.get(key, math.inf), row["ms"])
    for row in rows:
        key = (row["pass"], row["deg"], row["head_dim"], row["t"])
        if row["ms"] is not None and key in best:
            row["speedup_vs_sdpa"] = best[key] / row["ms"]


# --------------------------------------------------------------------------------------------------------------
# Per-kernel time breakdown


def breakdown(config: Config, methods: list[Method], top: int = 8) -> dict[str, dict]:
    """Where our time goes, by torch op / kernel (torch.profiler, self time), for each backend of ours on the
    standard problem (deg 2 when measured, head dim 64 when measured, the longest context, fwd+bwd when
    measured). Time outside any torch op (e.g. numba kernels called from Python) is reported as such."""
    from torch.profiler import ProfilerActivity, profile

    pass_ = "fwd+bwd" if "fwd+bwd" in config.passes else config.passes[0]
    deg = 2 if 2 in config.degs else config.degs[0]
    d = 64 if 64 in config.head_dims else config.head_dims[0]
    t = max(config.contexts)
    case = Case(deg, d, t, config.tokens // t, config.heads)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if config.device == "cuda" else [])
    result = {}
    for method in (m for m in methods if m.ours):
        if method.skip(case, config):
            continue
        log(f"profiling {method.name} {pass_} t={t}")
        try:
            fn = timed_call(method, case, config, pass_)
            fn()  # warm-up (compilation, autotuning)
            synchronize(config.device)
            start = time.perf_counter()
            with profile(activities=activities) as prof:
                fn()
                synchronize(config.device)
            wall_ms = 1e3 * (time.perf_counter() - start)
            del fn
        except Exception as error:
            result[method.name] = {"error": short(error)}
            continue
        events = prof.key_averages()
        if config.device == "cuda":
            times = {e.key: e.self_device_time_total / 1e3 for e in events if e.self_device_time_total > 0}
            total = sum(times.values())
        else:
            times = {e.key: e.self_cpu_time_total / 1e3 for e in events if e.self_cpu_time_total > 0}
            total = wall_ms
        ranked = sorted(times.items(), key=lambda item: -item[1])
        kernels = dict(ranked[:top])
        kernels["other ops"] = sum(ms for _, ms in ranked[top:])
        if config.device == "cpu":
            kernels["outside torch ops (python, numba)"] = max(0.0, wall_ms - sum(times.values()))
        result[method.name] = {"case": dataclasses.asdict(case), "pass": pass_, "total_ms": total,
                               "kernels_ms": kernels}
    return result


# --------------------------------------------------------------------------------------------------------------
# The inference suite: one decode step against a context of T tokens


def run_decode(config: Config, backends: list[str], progress: Progress) -> list[dict]:
    deg = 2 if 2 in config.degs else config.degs[0]
    d = 64 if 64 in config.head_dims else config.head_dims[0]
    b, h, dtype, device = config.decode_batch, config.heads, config.torch_dtype, config.device
    task = progress.add_task("decode suite", total=len(config.decode_contexts) * (len(backends) + 1))
    rows = []
    for context in config.decode_contexts:
        for backend in backends:
            progress.update(task, description=escape(f"decode retention[{backend}] context={context}"))
            rows.append(decode_ours(backend, b, context, h, d, deg, dtype, device, config))
            progress.advance(task)
            log(f"decode retention[{backend}] context={context}: {fmt(rows[-1]['ms'], '.3f')} ms {rows[-1]['note']}")
        progress.update(task, description=f"decode sdpa context={context}")
        rows.append(decode_sdpa(b, context, h, d, dtype, device, config))
        progress.advance(task)
        log(f"decode sdpa context={context}: {fmt(rows[-1]['ms'], '.3f')} ms")
    return rows


def step_inputs(b, n, h, d, dtype, device):
    q, k, v = (torch.randn(b, n, h, d, device=device, dtype=dtype) for _ in range(3))
    return q, k, v, F.logsigmoid(torch.randn(b, n, h, device=device) + 4.0)


def median_step_ms(step: Callable[[], object], config: Config) -> float:
    """Median wall-clock latency of consecutive decode steps (each synchronised: a step's latency is what a
    generation loop waits for). Steps that fold the window into the state are included in the sample."""
    for _ in range(3):
        step()
    synchronize(config.device)
    times = []
    for _ in range(config.decode_steps):
        start = time.perf_counter()
        step()
        synchronize(config.device)
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def decode_ours(backend, b, context, h, d, deg, dtype, device, config) -> dict:
    row = {"method": f"retention[{backend}]", "context": context, "b": b, "heads": h, "head_dim": d, "deg": deg,
           "dtype": config.dtype, "ms": None, "cache_bytes": None, "note": ""}
    try:
        with torch.no_grad():
            cache = retention.PowerRetentionCache(deg=deg, backend=backend)
            cache.step(*step_inputs(b, context, h, d, dtype, device))  # prefill: folds all but the window
            row["ms"] = median_step_ms(lambda: cache.step(*step_inputs(b, 1, h, d, dtype, device)), config)
            row["cache_bytes"] = cache.memory_bytes()
    except Exception as error:
        row["note"] = f"failed: {short(error)}"
    return row


def decode_sdpa(b, context, h, d, dtype, device, config) -> dict:
    """A preallocated KV cache ``[b, h, T + steps, d]``: write the new key/value, attend the query to the prefix."""
    capacity = context + config.decode_steps + 8
    keys = torch.randn(b, h, capacity, d, device=device, dtype=dtype)
    values = torch.randn(b, h, capacity, d, device=device, dtype=dtype)
    position = [context]

    def step():
        q, k, v, _ = step_inputs(b, 1, h, d, dtype, device)
        n = position[0]
        keys[:, :, n] = k[:, 0]
        values[:, :, n] = v[:, 0]
        position[0] = n + 1
        return F.scaled_dot_product_attention(q.transpose(1, 2), keys[:, :, : n + 1], values[:, :, : n + 1])

    with torch.no_grad():
        ms = median_step_ms(step, config)
    item = torch.empty((), dtype=dtype).element_size()
    return {"method": "sdpa kv-cache", "context": context, "b": b, "heads": h, "head_dim": d, "deg": None,
            "dtype": config.dtype, "ms": ms, "cache_bytes": 2 * b * h * context * d * item, "note": ""}


# --------------------------------------------------------------------------------------------------------------
# Output


def fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def print_tables(report: dict) -> None:
    table = Table(title=f"training: {report['device']}, {report['config']['dtype']}, "
                        f"b*t={report['config']['tokens']}, h={report['config']['heads']}, "
                        f"matmul {report['matmul_tflops']:.2f} TFLOP/s")
    for column in ("pass", "method", "deg", "d", "t", "b", "ms", "vs SDPA", "TFLOP/s", "% matmul", "note"):
        table.add_column(column, justify="left" if column in ("pass", "method", "note") else "right")
    for row in report["training"]:
        table.add_row(row["pass"], escape(row["method"]), str(row["deg"]), str(row["head_dim"]), str(row["t"]),
                      str(row["b"]), fmt(row["ms"], ".2f"), fmt(row["speedup_vs_sdpa"], ".2f") + "x" * bool(
                          row["speedup_vs_sdpa"]), fmt(row["tflops"], ".3f"),
                      fmt(None if row["fraction_of_matmul"] is None else 100 * row["fraction_of_matmul"], ".1f"),
                      escape(row["note"]))
    console.print(table)
    decode = Table(title="decode: one token against a context of T tokens (median step latency)")
    for column in ("method", "context", "ms", "cache MiB", "note"):
        decode.add_column(column, justify="left" if column in ("method", "note") else "right")
    for row in report["decode"]:
        mib = None if row["cache_bytes"] is None else row["cache_bytes"] / 2**20
        decode.add_row(escape(row["method"]), str(row["context"]), fmt(row["ms"], ".3f"), fmt(mib, ".2f"),
                       escape(row["note"]))
    console.print(decode)
    for name, item in report["breakdown"].items():
        if "error" in item:
            console.print(f"breakdown {name}: {item['error']}", markup=False)
            continue
        lines = ", ".join(f"{key} {ms:.1f}" for key, ms in item["kernels_ms"].items())
        console.print(f"breakdown {name} ({item['pass']}, t={item['case']['t']}, total {item['total_ms']:.1f} ms): "
                      f"{lines}", markup=False)
    for note in report["notes"]:
        console.print(f"note: {note}", markup=False)


def write_csv(path: Path, rows: list[dict]) -> None:
    if not rows:
        return
    with path.open("w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def parse_ints(text: str) -> list[int]:
    return [int(item) for item in text.split(",") if item]


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help="a short run: fewer shapes and passes, no reference backend")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                        help="auto: cuda when available")
    parser.add_argument("--out", type=Path, default=RESULTS, help="results folder (default benchmarks/results)")
    parser.add_argument("--tag", default="", help="added to the output names")
    parser.add_argument("--contexts", type=parse_ints, help="context lengths t, e.g. 1024,4096")
    parser.add_argument("--tokens", type=int, help="b * t")
    parser.add_argument("--degs", type=parse_ints, help="powers, e.g. 1,2,4")
    parser.add_argument("--head-dims", type=parse_ints, help="head dims, e.g. 32,64,128")
    parser.add_argument("--heads", type=int)
    parser.add_argument("--passes", type=lambda text: text.split(","), help="fwd,bwd,fwd+bwd")
    parser.add_argument("--chunk-size", type=int)
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"))
    parser.add_argument("--no-gating", action="store_true")
    parser.add_argument("--decode-contexts", type=parse_ints)
    parser.add_argument("--methods", type=lambda text: text.split(","),
                        help="only methods whose name contains one of these, e.g. retention,sdpa[flash]")
    parser.add_argument("--no-decode", action="store_true", help="skip the inference suite")
    parser.add_argument("--no-breakdown", action="store_true", help="skip the torch.profiler breakdown")
    parser.add_argument("--no-plots", action="store_true")
    parser.add_argument("--docs", action="store_true",
                        help="also copy the plots to docs/assets/benchmarks/<device kind>-*.png for the site")
    args = parser.parse_args(argv)
    for name, value in (("--passes", args.passes or []),):
        if set(value) - set(PASSES):
            parser.error(f"{name} must be among {PASSES}, got {value}")
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: torch sees no CUDA device")
    config = default_config(device, args.quick)
    overrides = {"contexts": args.contexts, "tokens": args.tokens, "degs": args.degs, "head_dims": args.head_dims,
                 "heads": args.heads, "passes": args.passes, "chunk_size": args.chunk_size, "dtype": args.dtype,
                 "decode_contexts": args.decode_contexts}
    config = dataclasses.replace(config, **{k: v for k, v in overrides.items() if v is not None})
    if args.no_gating:
        config.gating = False
    bad = [t for t in config.contexts if config.tokens % t]
    if bad:
        raise SystemExit(f"--contexts must divide --tokens={config.tokens}, got {bad}")

    name = device_name(device)
    console.print(f"retention {retention.__version__} on {name}, torch {torch.__version__}; "
                  f"backends: {', '.join(retention.available_backends())}", markup=False)
    methods, notes = methods_for(config, args.methods, args.quick)
    torch.manual_seed(0)
    matmul = matmul_tflops(config)
    console.print(f"measured matmul rate ({config.matmul_size}^3 {config.dtype}): {matmul:.2f} TFLOP/s")
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console, transient=True) as progress:
        training = run_training(config, methods, matmul, progress)
        ours_backends = [m.name[len("retention["):-1] for m in methods if m.ours]
        decode = [] if args.no_decode else run_decode(config, ours_backends, progress)
    report = {
        "device": name, "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "torch": torch.__version__, "retention": retention.__version__, "python": platform.python_version(),
        "config": dataclasses.asdict(config), "matmul_tflops": matmul, "notes": notes,
        "training": training, "breakdown": {} if args.no_breakdown else breakdown(config, methods), "decode": decode,
    }
    print_tables(report)

    args.out.mkdir(parents=True, exist_ok=True)
    stem = slug(f"{'cpu' if device == 'cpu' else name}-{datetime.date.today()}{'-' + args.tag if args.tag else ''}")
    (args.out / f"{stem}.json").write_text(json.dumps(report, indent=1))
    write_csv(args.out / f"{stem}.csv", training)
    write_csv(args.out / f"{stem}-decode.csv", decode)
    written = [f"{stem}.json", f"{stem}.csv", f"{stem}-decode.csv"]
    if not args.no_plots:
        sys.path.insert(0, str(Path(__file__).parent))
        from plots import plot_all

        pngs = plot_all(report, args.out / stem)
        written += [p.name for p in pngs]
        if args.docs:
            target = Path(__file__).parent.parent / "docs" / "assets" / "benchmarks"
            target.mkdir(parents=True, exist_ok=True)
            for png in pngs:
                (target / f"{device}{png.name[len(stem):]}").write_bytes(png.read_bytes())
    console.print(f"wrote {', '.join(written)} to {args.out}")
    return report


if __name__ == "__main__":
    main()
