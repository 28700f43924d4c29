"""The benchmark suite: power retention against PyTorch SDPA (and flash-attn, fla when installed).

    nox -s bench                 # the full suite for this machine's device
    nox -s bench -- --quick      # a short run (GPU: about 3 minutes with Triton's first compiles)
    nox -s bench -- --dry-run    # the GPU protocol's code at tiny shapes on CPU (Triton interpreted), ~30 s
    python benchmarks/suite.py --help

On a GPU it runs the SPEC.md section 6 protocol (bf16, gating on, ``b * t = 65536`` tokens, ``t`` from 1k to
64k, deg 1/2/4, head dims 32/64/128, fwd, bwd and fwd+bwd); on a CPU the same shapes scaled down (fp32,
``b * t = 8192``, ``t`` from 512 to 8192, 4 heads, deg 2, head dim 64). Every installed backend of ours that
runs on the device takes part (``retention.available_backends()``); baselines run in the same process on the
same shapes. FLOPs come from :func:`retention.flops.power_retention_cost`.

One failing, hanging or out-of-memory case never loses the run: its row records why (``--case-timeout``), and
``--time-budget`` stops starting new cases in time for the decode suite, the breakdown and the plots. The JSON is
rewritten after every case, so a run cut off from outside still leaves its rows.

Outputs, under ``--out`` (default ``benchmarks/results/``), named ``<device>-<date>``: a JSON file with
everything, ``.csv`` (training suite) and ``-decode.csv`` (inference suite), and PNG plots.
``--docs`` also writes the plots and a results section into the documentation (see ``plots.py``).
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import dataclasses
import datetime
import json
import math
import os
import platform
import re
import signal
import statistics
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from torch.nn.attention import SDPBackend, sdpa_kernel

import retention
from retention._validate import validate
from retention.backends import get_backend
from retention.flops import PASSES, power_retention_cost

RESULTS = Path(__file__).parent / "results"
console = Console(width=None if sys.stdout.isatty() else 160)  # logs and CI: wide enough for the table


# --------------------------------------------------------------------------------------------------------------
# Configuration


@dataclasses.dataclass
class Config:
    """What one run measures."""

    device: str
    protocol: str  # "gpu" (SDPA kernels, flash-attn, fla, CUDA graphs) or "cpu"; a dry run is "gpu" on CPU
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
    decode_window: int  # switch_over_seq_len of the decode caches
    warmup: int  # CPU timer: untimed calls first
    repeats: int  # CPU timer: timed calls (the median is reported)
    matmul_size: int
    memory_budget_gb: float  # a method whose estimated memory exceeds this is skipped with a note
    case_timeout_s: float | None  # a case running longer is stopped and recorded as failed
    time_budget_s: float | None  # no new case starts once the phase's share of this is spent

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)


def default_config(device: str, quick: bool, dry_run: bool = False) -> Config:
    """The protocol for ``device``; ``dry_run``: the GPU protocol's code at tiny shapes on CPU."""
    if dry_run:
        return Config("cpu", "gpu", "bfloat16", 128, [32, 64], [2, 1], [16], 2, list(PASSES), None, True,
                      [40, 100], 1, 3, 32, 0, 1, 256, 1.0, 60.0, None)
    if device == "cuda":
        total_gb = torch.cuda.get_device_properties(0).total_memory / 2**30
        if quick:
            return Config(device, "gpu", "bfloat16", 65536, [1024, 4096, 16384, 65536], [2, 1], [64], 8,
                          ["fwd", "fwd+bwd"], None, True, [1024, 4096, 16384, 65536], 1, 20, 512, 0, 0, 8192,
                          0.6 * total_gb, 120.0, 270.0)
        return Config(device, "gpu", "bfloat16", 65536, [1024, 4096, 16384, 65536], [2, 1, 4], [64, 32, 128], 8,
                      list(PASSES), None, True, [1024, 4096, 16384, 65536], 1, 50, 512, 0, 0, 8192,
                      0.6 * total_gb, 300.0, None)
    if quick:
        return Config(device, "cpu", "float32", 2048, [512, 2048], [2], [64], 4, ["fwd", "fwd+bwd"], None, True,
                      [512, 4096], 1, 10, 512, 1, 3, 2048, 3.0, 300.0, None)
    return Config(device, "cpu", "float32", 8192, [512, 1024, 2048, 4096, 8192], [2], [64], 4, list(PASSES), None,
                  True, [512, 2048, 8192], 1, 20, 512, 1, 5, 2048, 6.0, 600.0, None)


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
# Timing and guards


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


class CaseTimeout(Exception):
    pass


@contextlib.contextmanager
def time_limit(seconds: float | None):
    """Raise :class:`CaseTimeout` in the block after ``seconds`` (SIGALRM: Python code such as Triton's autotuner
    is interrupted; a single long kernel or compile step only when it returns). No limit off the main thread."""
    if not seconds or not hasattr(signal, "setitimer") or threading.current_thread() is not threading.main_thread():
        yield
        return

    def expire(signum, frame):
        raise CaseTimeout(f"stopped after the per-case limit of {seconds:g} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


# When each phase stops starting new cases, as fractions of --time-budget (the rest is left to the later phases).
BUDGET_SHARES = {"training": 0.70, "decode": 0.88, "breakdown": 0.95}


class Budget:
    """The run's time budget (None: no limit): each phase may start new cases until its share is spent."""

    def __init__(self, seconds: float | None):
        self.seconds = seconds
        self.start = time.perf_counter()

    def spent(self, phase: str) -> bool:
        return self.seconds is not None and time.perf_counter() - self.start > BUDGET_SHARES[phase] * self.seconds

    def note(self, phase: str) -> str:
        return f"skipped: the {phase} share of --time-budget {self.seconds:g} s was spent"


def is_out_of_memory(error: BaseException) -> bool:
    return isinstance(error, torch.OutOfMemoryError) or "out of memory" in str(error).lower()


def short(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0][:160] if lines else ''}"


# Set by the first error that leaves the CUDA context unusable (an illegal address is sticky: every later call
# fails): no case runs after it, each is recorded as skipped with this reason, and the report is still written.
DEVICE_LOST: list[str] = []


def is_device_lost(error: BaseException) -> bool:
    return isinstance(error, getattr(torch, "AcceleratorError", ())) or "illegal memory access" in str(error)


def guarded(fn: Callable[[], object], config: Config) -> tuple[object, str]:
    """``(fn(), "")``, or ``(None, why not)``: out of memory, over the per-case time limit, or any error. Device
    memory is given back afterwards, so the next case starts clean."""
    if DEVICE_LOST:
        return None, f"skipped: the device was lost earlier ({DEVICE_LOST[0]})"
    try:
        with time_limit(config.case_timeout_s):
            return fn(), ""
    except Exception as error:
        if is_out_of_memory(error):
            return None, "skipped: out of memory"
        if is_device_lost(error):
            DEVICE_LOST.append(short(error))
        return None, f"failed: {short(error)}"
    finally:
        if config.device == "cuda":
            with contextlib.suppress(Exception):  # after a device error the context may refuse everything
                torch.cuda.empty_cache()


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


def never_skip(case: Case, config: Config) -> None:
    return None


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


def default_chunk(backend: str, case: Case) -> int | None:
    """The chunk length backend ``backend`` picks for ``chunk_size=None`` (to count its FLOPs); None: unknown."""
    if backend == "cpu":
        from retention.cpu import default_chunk_size

        return default_chunk_size(case.t, retention.sympow_dim(case.head_dim, case.deg))
    if backend in ("triton", "cuda"):  # the cuda backend's training forward is the Triton one
        from retention_kernels.triton.function import default_chunk_size

        return default_chunk_size(case.t, case.head_dim, case.deg)
    if backend == "reference":
        return min(case.t, 64)
    return None


def backend_refuses(name: str, case: Case, config: Config) -> str | None:
    """Why backend ``name`` cannot run ``case`` on this device and dtype (its ``supports`` check on a tiny
    problem: nothing is compiled), or None."""
    x = torch.zeros(1, 1, case.heads, case.head_dim, device=config.device, dtype=config.torch_dtype)
    return get_backend(name).supports(validate(x, x, x, None, None, None, case.deg, None, None, True))


def estimated_gb(backend: str, case: Case, chunk: int) -> float:
    """Device memory a forward+backward of ours needs beyond its inputs, roughly: the fp32 per-chunk states
    ``[b, h, n + 1, D, e + 1]`` and their gradients; the reference also materialises phi(q) ``[b, t, h, D]`` and
    the ``c x c`` blocks, and autograd keeps about three times all that."""
    D = retention.sympow_dim(case.head_dim, case.deg)
    states = case.b * case.heads * (math.ceil(case.t / chunk) + 1) * D * (case.head_dim + 1)
    if backend == "reference":
        elements = 3 * (states + case.b * case.heads * case.t * (D + chunk))
    else:
        elements = 2 * states
    return 4 * elements / 2**30


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
        reason = backend_refuses(backend, case, config)
        if reason:
            return reason
        if chunk(case, config) is None:
            return f"the suite does not know the default chunk of backend {backend!r} (to count FLOPs): --chunk-size"
        gigabytes = estimated_gb(backend, case, chunk(case, config))
        if gigabytes > config.memory_budget_gb:
            return f"needs ~{gigabytes:.0f} GB (budget {config.memory_budget_gb:.0f} GB)"
        return None

    return Method(f"retention[{backend}]", True, build, skip, chunk=chunk)


SDPA_BACKENDS = ("math", "flash", "efficient", "cudnn")


def sdpa_context(kernel: str | None):
    """A context that forces SDPA kernel ``kernel`` (None: PyTorch's default choice)."""
    if kernel is None:
        return contextlib.nullcontext()
    enum = {"math": SDPBackend.MATH, "flash": SDPBackend.FLASH_ATTENTION,
            "efficient": SDPBackend.EFFICIENT_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION}
    return sdpa_kernel(enum[kernel])


def sdpa(kernel: str | None) -> Method:
    """``scaled_dot_product_attention(is_causal=True)`` on ``[b, h, t, d]`` inputs, forced to one kernel (GPU) or
    PyTorch's default choice (``kernel=None``, the CPU baseline)."""

    def build(case, config, requires_grad):
        q, k, v, _ = random_qkvg(case, config, requires_grad, heads_first=True)

        def run():
            with sdpa_context(kernel):
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


def sdpa_refuses(kernel: str, config: Config) -> str | None:
    """Why SDPA kernel ``kernel`` cannot run fwd+bwd here (a tiny call), or None."""
    q = torch.randn(1, 1, 8, config.head_dims[0], device=config.device, dtype=config.torch_dtype,
                    requires_grad=True)
    try:
        with sdpa_context(kernel), warnings_silenced():
            F.scaled_dot_product_attention(q, q, q, is_causal=True).sum().backward()
    except Exception as error:  # RuntimeError in practice; any refusal is a note, never the end of the run
        return short(error)
    return None


@contextlib.contextmanager
def warnings_silenced():
    """SDPA warns at length why a forced kernel cannot run; the refusal is reported as a note instead."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def flash_attn() -> Method:
    """flash-attn's ``flash_attn_func(q, k, v, causal=True)`` on ``[b, t, h, d]`` inputs."""
    from flash_attn import flash_attn_func

    def build(case, config, requires_grad):
        q, k, v, _ = random_qkvg(case, config, requires_grad)
        return (lambda: flash_attn_func(q, k, v, causal=True)), [q, k, v]

    return Method("flash-attn", False, build, never_skip, depends_on_deg=False)


def fla_simple_gla() -> Method:
    """flash-linear-attention's gated linear attention with a scalar gate per head and step: power retention of
    degree 1 without normalisation (its FLOPs are counted as ours with deg 1, chunk 64)."""
    from fla.ops.simple_gla import chunk_simple_gla

    def build(case, config, requires_grad):
        q, k, v, log_g = random_qkvg(case, config, requires_grad)
        return (lambda: chunk_simple_gla(q=q, k=k, v=v, g=log_g)[0]), [x for x in (q, k, v, log_g) if x is not None]

    return Method("fla[simple_gla]", False, build, never_skip, depends_on_deg=False)


OPTIONAL_BASELINES = ((flash_attn, "flash-attn", "pip install flash-attn"),
                      (fla_simple_gla, "fla (flash-linear-attention)", "pip install flash-linear-attention"))


def methods_for(config: Config, only: list[str] | None, quick: bool) -> tuple[list[Method], list[str]]:
    """Every method that can run here, and a note for each that cannot."""
    methods, notes = [], []
    for name in retention.available_backends():
        probe = Case(config.degs[0], config.head_dims[0], 1, 1, config.heads)
        reason = backend_refuses(name, probe, config)
        if config.protocol == "gpu" and config.device == "cpu" and name == "cpu":
            reason = "dry run of the GPU protocol: the cpu backend does not run on a GPU"
        if reason:
            notes.append(f"retention[{name}] skipped: {reason}")
        else:
            methods.append(ours(name))
    on_gpu = config.protocol == "gpu"
    if (quick or on_gpu) and len(methods) > 1 and not any("reference" in pattern for pattern in only or []):
        # The reference is the differentiable oracle, not a fast path: it takes most of a quick run's time, and
        # on a GPU seconds per case (a minute for one backward at t=1024) where the kernels take milliseconds.
        methods = [m for m in methods if m.name != "retention[reference]"]
        why = "the GPU protocol" if on_gpu else "--quick"
        notes.append(f"retention[reference] not run in {why} (add --methods retention[reference] to run it)")
    if config.protocol == "gpu":
        for kernel in SDPA_BACKENDS:
            reason = sdpa_refuses(kernel, config)
            if reason:
                notes.append(f"sdpa[{kernel}] cannot run here: {reason}")
            else:
                methods.append(sdpa(kernel))
        for factory, package, install in OPTIONAL_BASELINES:
            try:
                methods.append(factory())
            except ImportError as error:
                notes.append(f"{package} not installed, skipped ({install}; {error})")
            except Exception as error:  # installed but broken (e.g. built for another torch)
                notes.append(f"{package} installed but not importable, skipped ({short(error)})")
    else:
        methods.append(sdpa(None))
        notes.append("flash-attn and fla need CUDA: not run on CPU")
    if only:
        methods = [m for m in methods if any(pattern in m.name for pattern in only)]
    return methods, notes


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


# --------------------------------------------------------------------------------------------------------------
# The training suite


def training_cases(config: Config) -> list[Case]:
    """Every (deg, head dim, t) in the order measured: the first configured (deg, head dim), the standard
    problem, at every length first, then the others by state size ``D x d`` (cheapest first), contexts ascending
    in each, so a run stopped by its time budget has the standard problem and as many others as fitted."""
    problems = [(deg, d) for deg in config.degs for d in config.head_dims]
    first, rest = problems[0], problems[1:]
    rest.sort(key=lambda problem: retention.sympow_dim(problem[1], problem[0]) * problem[1])
    return [Case(deg, d, t, config.tokens // t, config.heads) for deg, d in [first, *rest]
            for t in sorted(config.contexts)]


def row_key(row: dict) -> tuple:
    return row["pass"], row["method"], row["deg"], row["head_dim"], row["t"]


def run_training(config: Config, methods: list[Method], matmul: float, progress: Progress, budget: Budget,
                 save: Callable[[], None], rows: list[dict], earlier: dict[tuple, dict] | None = None) -> None:
    """Measure every (case, pass, method) into ``rows`` (``save()`` after each one); a measured row of
    ``earlier`` (by :func:`row_key`, from ``--extend``) is taken instead of measuring it again."""
    earlier = earlier or {}
    cases = training_cases(config)
    task = progress.add_task("training suite", total=len(cases) * len(config.passes) * len(methods))
    softmax_times = {}  # softmax baselines do not depend on deg: time once per (method, pass, d, t)
    for case in cases:
        for pass_ in config.passes:
            for method in methods:
                progress.update(task, description=escape(f"{pass_} {method.name} deg={case.deg} t={case.t}"))
                key = (method.name, pass_, case.head_dim, case.t)
                earlier_row = earlier.get((pass_, method.name, case.deg, case.head_dim, case.t))
                rate = matmul
                if earlier_row is not None and earlier_row["ms"] is not None:
                    ms, note = earlier_row["ms"], earlier_row["note"]
                    rate = earlier_row["tflops"] / earlier_row["fraction_of_matmul"]  # that run's matrix rate
                    if not method.depends_on_deg:
                        softmax_times[key] = (ms, note)
                elif not method.depends_on_deg and key in softmax_times:
                    ms, note = softmax_times[key]
                elif budget.spent("training"):
                    ms, note = None, budget.note("training")
                else:
                    ms, note = measure(method, case, config, pass_)
                    if not method.depends_on_deg:
                        softmax_times[key] = (ms, note)
                rows.append(training_row(method, case, config, pass_, ms, note, rate))
                add_speedups(rows)
                save()
                progress.advance(task)
                log(f"{pass_} {method.name} deg={case.deg} d={case.head_dim} t={case.t}: {fmt(ms, '.3f')} ms {note}")


def measure(method: Method, case: Case, config: Config, pass_: str) -> tuple[float | None, str]:
    """``(median ms, "")``, or ``(None, why not)``; a failing method is reported, never fatal to the suite."""
    reason, error = guarded(lambda: method.skip(case, config), config)  # the skip checks touch the device too
    if error or reason:
        return None, error or f"skipped: {reason}"
    # The inputs live in timed_call's closure: gone when guarded returns, before the cache is emptied.
    return guarded(lambda: median_ms(timed_call(method, case, config, pass_), config), config)


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
    pass_ = "fwd+bwd" if "fwd+bwd" in config.passes else config.passes[0]
    deg = 2 if 2 in config.degs else config.degs[0]
    d = 64 if 64 in config.head_dims else config.head_dims[0]
    t = max(config.contexts)
    case = Case(deg, d, t, config.tokens // t, config.heads)
    result = {}
    for method in (m for m in methods if m.ours):
        reason = method.skip(case, config)
        if reason:
            result[method.name] = {"error": f"skipped: {reason}"}
            continue
        log(f"profiling {method.name} {pass_} t={t}")
        item, error = guarded(lambda method=method: profile_once(method, case, config, pass_, top), config)
        result[method.name] = item if error == "" else {"error": error}
    return result


def kernel_times(events) -> dict[str, float]:
    """Milliseconds per device kernel (and memcpy / memset) from ``key_averages()``: only the device-side events.
    An op's self device time counts the kernels it launches outside any child op (Triton kernels launched from
    a custom op, for one), which are also events of their own: summing both counted them twice."""
    from torch.autograd import DeviceType

    return {e.key: e.self_device_time_total / 1e3 for e in events
            if e.device_type == DeviceType.CUDA and e.self_device_time_total > 0}


def profile_once(method: Method, case: Case, config: Config, pass_: str, top: int) -> dict:
    """One profiled call after a warm-up call (compilation, autotuning): the ``top`` ops or kernels by self time
    (device time on GPU, CPU time on CPU), the rest summed."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if config.device == "cuda" else [])
    fn = timed_call(method, case, config, pass_)
    fn()
    synchronize(config.device)
    start = time.perf_counter()
    with profile(activities=activities) as prof:
        fn()
        synchronize(config.device)
    wall_ms = 1e3 * (time.perf_counter() - start)
    events = prof.key_averages()
    if config.device == "cuda":
        times = kernel_times(events)
    else:
        times = {e.key: e.self_cpu_time_total / 1e3 for e in events if e.self_cpu_time_total > 0}
    ranked = sorted(times.items(), key=lambda item: -item[1])
    kernels = dict(ranked[:top])
    kernels["other ops"] = sum(ms for _, ms in ranked[top:])
    if config.device == "cuda":
        total = sum(times.values())
    else:
        total = wall_ms
        kernels["outside torch ops (python, numba, triton interpreter)"] = max(0.0, wall_ms - sum(times.values()))
    return {"case": dataclasses.asdict(case), "pass": pass_, "total_ms": total, "kernels_ms": kernels}


# --------------------------------------------------------------------------------------------------------------
# The inference suite: one decode step against a context of T tokens


def run_decode(config: Config, backends: list[str], progress: Progress, budget: Budget,
               save: Callable[[], None], rows: list[dict]) -> None:
    """For each context: each backend's dynamic cache (eager steps), the static cache of backends with a fused
    decode step (replayed from a CUDA graph on GPU; eager on CPU), and an SDPA KV cache."""
    deg = 2 if 2 in config.degs else config.degs[0]
    d = 64 if 64 in config.head_dims else config.head_dims[0]
    variants = [(backend, False) for backend in backends]
    variants += [(backend, True) for backend in backends if get_backend(backend).decode_step is not None]
    task = progress.add_task("decode suite", total=len(config.decode_contexts) * (len(variants) + 1))
    for context in sorted(config.decode_contexts):
        for backend, static in variants:
            progress.update(task, description=escape(f"decode retention[{backend}] context={context}"))
            rows.append(decode_ours(backend, static, context, d, deg, config, budget))
            save()
            progress.advance(task)
            log(f"decode {rows[-1]['method']} context={context}: {fmt(rows[-1]['ms'], '.3f')} ms {rows[-1]['note']}")
        progress.update(task, description=f"decode sdpa context={context}")
        rows.append(decode_sdpa(context, d, config, budget))
        save()
        progress.advance(task)
        log(f"decode sdpa context={context}: {fmt(rows[-1]['ms'], '.3f')} ms {rows[-1]['note']}")


def step_inputs(b, n, h, d, config: Config):
    device = config.device
    q, k, v = (torch.randn(b, n, h, d, device=device, dtype=config.torch_dtype) for _ in range(3))
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


def decode_row(method: str, context: int, d: int, deg: int | None, config: Config) -> dict:
    return {"method": method, "context": context, "b": config.decode_batch, "heads": config.heads, "head_dim": d,
            "deg": deg, "dtype": config.dtype, "ms": None, "cache_bytes": None, "note": ""}


def decode_ours(backend: str, static: bool, context: int, d: int, deg: int, config: Config, budget: Budget) -> dict:
    """A cache prefilled with ``context`` tokens, then one-token steps. ``static``: the fixed-buffer cache; on
    CUDA each step is replayed from a :class:`retention.inference.DecodeGraph` (what a generation loop uses)."""
    graph = static and config.device == "cuda"
    label = "static + cuda graph" if graph else "static" if static else "dynamic"
    row = decode_row(f"retention[{backend}] {label}", context, d, deg, config)
    if budget.spent("decode"):
        row["note"] = budget.note("decode")
        return row
    b, h = config.decode_batch, config.heads

    def measure_steps():
        with torch.no_grad():
            cache = retention.PowerRetentionCache(deg=deg, switch_over_seq_len=config.decode_window, backend=backend,
                                                  static=static)
            cache.step(*step_inputs(b, context, h, d, config))  # prefill: folds all but the window
            if graph:
                from retention.inference import DecodeGraph

                replay = DecodeGraph(cache, *step_inputs(b, 1, h, d, config))
                inputs = step_inputs(b, 1, h, d, config)
                ms = median_step_ms(lambda: replay(*inputs), config)
            else:
                ms = median_step_ms(lambda: cache.step(*step_inputs(b, 1, h, d, config)), config)
            return ms, cache.memory_bytes()

    result, row["note"] = guarded(measure_steps, config)
    if result is not None:
        row["ms"], row["cache_bytes"] = result
    return row


def decode_sdpa(context: int, d: int, config: Config, budget: Budget) -> dict:
    """A preallocated KV cache ``[b, h, T + steps, d]``: write the new key/value, attend the query to the prefix."""
    row = decode_row("sdpa kv-cache", context, d, None, config)
    if budget.spent("decode"):
        row["note"] = budget.note("decode")
        return row
    b, h, dtype, device = config.decode_batch, config.heads, config.torch_dtype, config.device

    def measure_steps():
        capacity = context + config.decode_steps + 8
        keys = torch.randn(b, h, capacity, d, device=device, dtype=dtype)
        values = torch.randn(b, h, capacity, d, device=device, dtype=dtype)
        position = [context]

        def step():
            q, k, v, _ = step_inputs(b, 1, h, d, config)
            n = position[0]
            keys[:, :, n] = k[:, 0]
            values[:, :, n] = v[:, 0]
            position[0] = n + 1
            return F.scaled_dot_product_attention(q.transpose(1, 2), keys[:, :, : n + 1], values[:, :, : n + 1])

        # Every step has a new KV length: the cuDNN kernel (SDPA's first choice on Hopper) builds a plan per
        # shape, ~42 ms per step on an H200 at any context. Flash / memory-efficient kernels need no plan.
        backends = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
        with torch.no_grad(), sdpa_kernel(backends):
            return median_step_ms(step, config)

    row["ms"], row["note"] = guarded(measure_steps, config)
    row["cache_bytes"] = 2 * b * h * context * d * torch.empty((), dtype=dtype).element_size()
    return row


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


def print_summary(report: dict) -> bool:
    """A few closing lines (what a remote run's log tail keeps): rows measured, skipped and failed per suite,
    each distinct failure, and PASS when nothing failed. Returns whether nothing failed."""
    failures = []
    for suite in ("training", "decode"):
        rows = report[suite]
        failed = [row for row in rows if row["note"].startswith("failed")]
        measured = sum(row["ms"] is not None for row in rows)
        console.print(f"{suite}: {measured} measured, {len(rows) - measured - len(failed)} skipped, "
                      f"{len(failed)} failed", markup=False)
        failures += sorted({f"{suite} {row['method']}: {row['note']}" for row in failed})
    failures += [f"breakdown {name}: {item['error']}" for name, item in report["breakdown"].items()
                 if item.get("error", "").startswith("failed")]
    for failure in failures:
        console.print(f"FAIL {failure}", markup=False)
    console.print("PASS: every case ran or was skipped with its reason" if not failures else
                  f"{len(failures)} distinct failures (rows kept, see the JSON)", markup=False)
    return not failures


def write_csv(path: Path, rows: list[dict]) -> None:
    if not rows:
        return
    with path.open("w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def write_report(report: dict, out: Path) -> list[str]:
    """``<stem>.json`` (atomically: a run killed while writing keeps the previous version), ``.csv`` and
    ``-decode.csv``; returns the file names."""
    stem = report["stem"]
    partial = out / f"{stem}.json.partial"
    partial.write_text(json.dumps(report, indent=1))
    os.replace(partial, out / f"{stem}.json")
    write_csv(out / f"{stem}.csv", report["training"])
    write_csv(out / f"{stem}-decode.csv", report["decode"])
    return [f"{stem}.json", f"{stem}.csv"] + [f"{stem}-decode.csv"] * bool(report["decode"])


def parse_ints(text: str) -> list[int]:
    return [int(item) for item in text.split(",") if item]


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help="a short run: fewer shapes and passes, no reference backend")
    parser.add_argument("--dry-run", action="store_true",
                        help="the GPU protocol's code (Triton backend interpreted, SDPA kernels, decode, breakdown, "
                             "plots) at tiny shapes on CPU, to check the suite before spending GPU time")
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
    parser.add_argument("--case-timeout", type=float, help="seconds one case may take (0: no limit)")
    parser.add_argument("--time-budget", type=float,
                        help="seconds for the whole run (0: no limit; GPU --quick default 270): no new case starts "
                             "once a phase's share is spent, so decode, breakdown and plots still happen")
    parser.add_argument("--extend", type=Path, metavar="JSON",
                        help="an earlier run's JSON (same device): its measured rows are kept, not measured again, "
                             "and so are its decode rows and breakdown when this run has none; to spread the full "
                             "protocol over several shorter runs")
    parser.add_argument("--no-decode", action="store_true", help="skip the inference suite")
    parser.add_argument("--no-breakdown", action="store_true", help="skip the torch.profiler breakdown")
    parser.add_argument("--no-plots", action="store_true")
    parser.add_argument("--docs", action="store_true",
                        help="also write the plots to docs/assets/benchmarks/<gpu|cpu>-*.png and this run's results "
                             "into the marked section of docs/benchmarks.md (see plots.py)")
    args = parser.parse_args(argv)
    for name, value in (("--passes", args.passes or []),):
        if set(value) - set(PASSES):
            parser.error(f"{name} must be among {PASSES}, got {value}")
    if args.dry_run and args.device == "cuda":
        parser.error("--dry-run runs on CPU: drop --device cuda")
    if args.dry_run and args.docs:
        parser.error("--dry-run measures nothing worth publishing: drop --docs")
    return args


def make_config(args: argparse.Namespace) -> Config:
    if args.dry_run:
        device = "cpu"
    else:
        device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: torch sees no CUDA device")
    config = default_config(device, args.quick, args.dry_run)
    overrides = {"contexts": args.contexts, "tokens": args.tokens, "degs": args.degs, "head_dims": args.head_dims,
                 "heads": args.heads, "passes": args.passes, "chunk_size": args.chunk_size, "dtype": args.dtype,
                 "decode_contexts": args.decode_contexts, "case_timeout_s": args.case_timeout,
                 "time_budget_s": args.time_budget}
    config = dataclasses.replace(config, **{k: v for k, v in overrides.items() if v is not None})
    config.case_timeout_s = config.case_timeout_s or None  # 0: no limit
    config.time_budget_s = config.time_budget_s or None
    if args.no_gating:
        config.gating = False
    bad = [t for t in config.contexts if config.tokens % t]
    if bad:
        raise SystemExit(f"--contexts must divide --tokens={config.tokens}, got {bad}")
    return config


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.dry_run:
        # The Triton backend runs on CPU tensors under the interpreter; read when its kernels are defined.
        os.environ["TRITON_INTERPRET"] = "1"
        kernels = sys.modules.get("retention_kernels.triton.function")
        if kernels is not None and not kernels._INTERPRET:
            raise SystemExit("--dry-run needs a fresh process: the Triton kernels were imported without "
                             "TRITON_INTERPRET=1")
    config = make_config(args)
    name = device_name(config.device) + (" (dry run of the GPU protocol)" if args.dry_run else "")
    stem = slug(f"{'cpu' if config.device == 'cpu' else name}-{datetime.date.today()}"
                f"{'-dry-run' if args.dry_run else ''}{'-' + args.tag if args.tag else ''}")
    console.print(f"retention {retention.__version__} on {name}, torch {torch.__version__}; "
                  f"backends: {', '.join(retention.available_backends())}", markup=False)
    methods, notes = methods_for(config, args.methods, args.quick or args.dry_run)
    console.print(f"methods: {', '.join(m.name for m in methods)}", markup=False)
    torch.manual_seed(0)
    matmul = matmul_tflops(config)
    console.print(f"measured matmul rate ({config.matmul_size}^3 {config.dtype}): {matmul:.3f} TFLOP/s")
    report = {
        "device": name, "stem": stem, "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "complete": False, "command": " ".join(sys.argv if argv is None else ["suite.py", *argv]),
        "torch": torch.__version__, "retention": retention.__version__, "python": platform.python_version(),
        "config": dataclasses.asdict(config), "matmul_tflops": matmul, "notes": notes,
        "training": [], "breakdown": {}, "decode": [],
    }
    earlier = {}
    if args.extend:
        extended = json.loads(args.extend.read_text())
        if extended["device"] != name:
            raise SystemExit(f"--extend: {args.extend} was measured on {extended['device']}, this run is on {name}")
        earlier = {row_key(row): row for row in extended["training"]}
        report["extends"] = {"stem": extended["stem"], "date": extended["date"], "command": extended["command"]}
        notes[:0] = [note for note in extended["notes"] if note not in notes]  # notes is report["notes"]
    args.out.mkdir(parents=True, exist_ok=True)

    def save() -> None:
        write_report(report, args.out)

    budget = Budget(config.time_budget_s)
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console, transient=True) as progress:
        run_training(config, methods, matmul, progress, budget, save, report["training"], earlier)
        if args.extend:  # the earlier run's other cases
            taken = {row_key(row) for row in report["training"]}
            report["training"] += [row for key, row in earlier.items() if key not in taken]
            add_speedups(report["training"])
        ours_backends = [m.name[len("retention["):-1] for m in methods if m.ours]
        if not args.no_decode:
            run_decode(config, ours_backends, progress, budget, save, report["decode"])
    if args.extend and not report["decode"]:
        report["decode"] = extended["decode"]
    if args.extend and args.no_breakdown:
        report["breakdown"] = extended["breakdown"]
    if not args.no_breakdown:
        if budget.spent("breakdown"):
            notes.append("breakdown " + budget.note("breakdown"))
        else:
            report["breakdown"] = breakdown(config, methods)
    report["complete"] = True
    written = write_report(report, args.out)
    print_tables(report)
    if not args.no_plots:
        sys.path.insert(0, str(Path(__file__).parent))
        from plots import plot_all, update_docs

        written += [p.name for p in plot_all(report, args.out / stem)]
        if args.docs:
            for path in update_docs(report):
                console.print(f"updated {path}", markup=False)
    console.print(f"wrote {', '.join(written)} to {args.out}", markup=False)
    report["passed"] = print_summary(report)
    return report


if __name__ == "__main__":
    sys.exit(0 if main()["passed"] else 1)  # 1: some case failed (its row and the JSON say why)
