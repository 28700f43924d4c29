"""The Triton kernels compiled for a Hopper GPU (sm_90a) on a machine without one: per kernel and config, the
registers per thread, the bytes spilled to local memory, the shared memory, the kind of matrix instruction
(``wgmma``: Hopper's warpgroup MMA; ``mma.sync``: the older per-warp path), whether ptxas serialized the wgmma
(its C7515 note: each then waits for the previous one) and static counts of the SASS instructions that split
the time (``sass_counts``). It answers "does this kernel spill, does it use wgmma, and how much CUDA-core work
feeds it" in seconds on the CPU, for the installed Triton (the GPU machine's may differ: run it there too for
its own answer).

    python benchmarks/kernel_asm.py [--t 4096] [--d 64] [--dtype bfloat16] [--deg 2] [--kernels output,key_state]
                                    [--all-configs] [--out DIR]

The kernels are reached through the real host code (deg 2: ``_pair_forward`` / ``_pair_backward``; else
``_forward`` / ``_backward``, on CPU tensors): its launches are caught and each config is compiled with
``warmup`` against a stand-in driver that only names the target. Without ``--all-configs`` each kernel's first
config (the one untuned launches take) is compiled. (``tests/hopper_fit.py`` uses the same capture to check
that every kernel has a config that fits an SM.)
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
for package in ("retention-core", "retention-kernels"):
    sys.path.insert(0, str(ROOT / "packages" / package / "src"))


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--t", type=int, default=4096, help="context (the code does not depend on it past a chunk)")
    parser.add_argument("--d", type=int, default=64)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--no-gates", action="store_true")
    parser.add_argument("--deg", type=int, default=2, help="2: the block-pair kernels; 1, 3, 4: the minimal layout's")
    parser.add_argument("--kernels", default="", help="comma-separated parts of kernel names (default: all)")
    parser.add_argument("--all-configs", action="store_true", help="every config of each tuned list")
    parser.add_argument("--out", default=None, help="write kernel_asm.json there")
    return parser.parse_args(argv)


class StandInDriver:
    """What ``JITFunction.warmup`` asks of a driver: a device, a stream, the target (Hopper)."""

    def __init__(self, capability: int = 90):
        from triton.backends.compiler import GPUTarget

        self.target = GPUTarget("cuda", capability, 32)

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_current_target(self):
        return self.target

    def get_benchmarker(self):
        raise RuntimeError("no GPU: nothing is timed here")


def ptxas_report(ptx: str) -> dict:
    """Registers, spill bytes, stack frame and the C7515 note from ``ptxas -v`` on ``ptx`` (Triton's bundled
    ptxas, sm_90a), and the SASS counts of the cubin it builds."""
    from triton.backends.nvidia.compiler import get_ptxas

    try:
        ptxas = get_ptxas(90).path  # the Triton releases differ here
    except TypeError:
        ptxas = get_ptxas().path
    path = Path("/tmp") / f"kernel_asm_{os.getpid()}.ptx"
    cubin = path.with_suffix(".cubin")
    path.write_text(ptx)
    run = subprocess.run([ptxas, "-arch=sm_90a", "-v", str(path), "-o", str(cubin)], capture_output=True, text=True)
    path.unlink()
    info = run.stdout + run.stderr
    sass = sass_counts(cubin, Path(ptxas).parent / "nvdisasm")
    cubin.unlink(missing_ok=True)

    def number(pattern):
        found = re.search(pattern, info)
        return int(found.group(1)) if found else None

    # C7515: ptxas found a wgmma accumulator written by other instructions inside a pipeline stage and made
    # every wgmma of the kernel wait for the previous one (no overlap of the tensor cores with anything)
    return dict(registers=number(r"Used (\d+) registers"), spill_stores=number(r"(\d+) bytes spill stores"),
                spill_loads=number(r"(\d+) bytes spill loads"), stack_frame=number(r"(\d+) bytes stack frame"),
                wgmma_serialized="C7515" in info, sass=sass)


# The SASS instructions that say how a kernel's time splits: the tensor-core products, the waits for them, and
# the CUDA-core work that builds their operands (fp32 products, conversions to 16 bits, packed bf16 products).
SASS_COUNTED = ("HGMMA", "FMUL", "FFMA", "F2FP", "HMUL2", "LDS", "STS", "BAR")


def sass_counts(cubin: Path, nvdisasm: Path) -> dict | None:
    """Static counts of the ``SASS_COUNTED`` opcodes in ``cubin``, ``wgmma_waits`` (``WARPGROUP.DEPBAR.LE gsb0,
    0x0``: a full wait for every wgmma in flight) and ``total`` instructions; None without Triton's nvdisasm."""
    if not cubin.exists() or not nvdisasm.exists():
        return None
    text = subprocess.run([str(nvdisasm), "-c", str(cubin)], capture_output=True, text=True).stdout
    opcodes = re.findall(r"^\s+/\*[0-9a-f]+\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*)", text, re.MULTILINE)
    counts = {name: opcodes.count(name) for name in SASS_COUNTED}
    return dict(counts, wgmma_waits=len(re.findall(r"WARPGROUP\.DEPBAR\.LE gsb0, 0x0", text)), total=len(opcodes))


@dataclass
class Launch:
    """One Triton launch of the host code: a tuned one (``configs``: its list, fallbacks last) or a direct one
    (``compiled``: the kernel as built where the launch was made, its meta parameters given)."""

    kernel: object
    args: tuple
    constants: dict
    configs: list = field(default_factory=list)
    compiled: object = None

    def compile(self, config):
        """This launch's kernel built with ``config`` (a ``triton.Config``) for the stand-in driver's target."""
        return self.kernel.warmup(*self.args, grid=(1,), **self.constants, **config.kwargs,
                                  num_warps=config.num_warps, num_stages=config.num_stages)


def capture_launches(dtype: str = "bfloat16", t: int = 4096, d: int = 64, heads: int = 8, gates: bool = True,
                     state: bool = False, capability: int = 90, deg: int = 2) -> list[Launch]:
    """Run the forward and backward host code of ``deg`` (2: the block-pair kernels; else the minimal-layout ones,
    chunked as ``default_chunk_size``) on CPU tensors (``state``: from an initial state, and with a cotangent of
    the final one) and return every Triton launch it makes, compiled for ``sm_<capability>`` instead
    of launched (tuned launches go through ``function._launch``, direct ones through ``JITFunction.run``; both are
    patched back afterwards). A kernel that does not compile raises. One target per process: Triton keeps the
    first one it sees."""
    import torch
    from triton.runtime.driver import driver
    from triton.runtime.jit import JITFunction

    from retention_kernels.triton import function

    launches = []

    def catch(tuned, kernel, grid, launch_args, constants, meta_names):
        configs = [*tuned.configs, *tuned.fallbacks] if tuned is not None else []
        launches.append(Launch(kernel, launch_args, constants, configs))

    def compile_only(self, *launch_args, grid, warmup, **kwargs):
        compiled = run(self, *launch_args, grid=grid, warmup=True, **kwargs)
        if not warmup:
            launches.append(Launch(self, launch_args, kwargs, compiled=compiled))
        return compiled

    driver.set_active(StandInDriver(capability))
    launch, run = function._launch, JITFunction.run
    function._launch, JITFunction.run = catch, compile_only
    try:
        b, scale = 1, d ** -0.5
        Q, K, V = (torch.randn(b, t, heads, d, dtype=getattr(torch, dtype)) for _ in range(3))
        log_G = -torch.rand(b, t, heads) if gates else None
        if deg != 2:
            chunk = function.default_chunk_size(t, d, deg)
            D = function.sympow_dim(d, deg)
            S0 = torch.zeros(b, heads, D, d) if state else None
            z0 = torch.zeros(b, heads, D) if state else None
            Y, den, _, _, states, key_states, G = function._forward(Q, K, V, log_G, S0, z0, deg, scale, chunk)
            function._backward(torch.randn_like(Y), S0, z0, Q, K, V, log_G, G, Y, den, states, key_states, state,
                               deg, scale, chunk)
            return launches
        layout = function._pair_layout(d, Q.device)
        S0 = torch.zeros(b, heads, layout.DI, d) if state else None
        M0 = torch.zeros(b, heads, layout.DP, layout.DP) if state else None
        Y, den, final, final_M, states, Ms, G = function._pair_forward(Q, K, V, log_G, S0, M0, scale, 1024)
        # with a state, the final state's cotangent too: both scans then start from one
        function._pair_backward(torch.randn_like(Y), S0, M0, Q, K, V, log_G, G, Y, den, states, Ms, state, scale, 1024)
    finally:
        function._launch, JITFunction.run = launch, run
    return launches


def compile_row(launch: Launch, config=None) -> dict:
    """One row of the table: ``launch`` built with ``config`` (or as it was built, for a direct launch)."""
    if config is None:
        compiled = launch.compiled
        meta = {key: value for key, value in launch.constants.items() if key.isupper()}
    else:
        compiled, meta = launch.compile(config), dict(config.kwargs)
    ptx = compiled.asm["ptx"]
    return dict(kernel=launch.kernel.__name__, config=meta, warps=compiled.metadata.num_warps,
                stages=compiled.metadata.num_stages, shared_kb=round(compiled.metadata.shared / 1024, 1),
                wgmma=ptx.count("wgmma.mma_async"), mma_sync=ptx.count("mma.sync"), **ptxas_report(ptx))


def main(argv=None) -> int:
    args = parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise SystemExit("kernel_asm.py compiles real kernels: unset TRITON_INTERPRET")
    wanted = [part for part in args.kernels.split(",") if part]
    rows = []
    for launch in capture_launches(args.dtype, args.t, args.d, args.heads, not args.no_gates, deg=args.deg):
        if wanted and not any(part in launch.kernel.__name__ for part in wanted):
            continue
        configs = launch.configs if args.all_configs else launch.configs[:1]
        for config in configs or [None]:
            try:
                row = compile_row(launch, config)
            except Exception as error:  # e.g. a config over the shared memory: say so, go on
                row = dict(kernel=launch.kernel.__name__, config=dict(getattr(config, "kwargs", {})),
                           error=f"{type(error).__name__}: {str(error)[:200]}")
            rows.append(row)
            print(" | ".join(f"{key} {value}" for key, value in row.items()), flush=True)
    if args.out:
        import triton

        Path(args.out).mkdir(parents=True, exist_ok=True)
        result = dict(triton=triton.__version__, target="sm_90a", shape=dict(t=args.t, d=args.d, h=args.heads),
                      deg=args.deg, dtype=args.dtype, gates=not args.no_gates, rows=rows)
        (Path(args.out) / "kernel_asm.json").write_text(json.dumps(result, indent=1, default=str))  # dtypes as names
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
