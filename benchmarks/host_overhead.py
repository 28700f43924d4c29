"""How long the host takes to issue one ``power_retention`` fwd+bwd on the Triton backend, against the GPU's time
for it: when the host is the slower, eager training waits on Python, not on the kernels.

    python3 benchmarks/host_overhead.py [--deg 1] [--t 65536] [--b 1] [--chunk N] [--out DIR] [--dry-run]

Per step (bf16, h 8, d 64, gates on): the host's time to return from fwd+bwd with the GPU idle before it (no
synchronisation inside the step unless the code forces one), the whole step's time to the GPU's end, and the
GPU's own time (CUDA-graph replay of the same step, so no host in it); medians of 30. Then every operation that
synchronised with the GPU (``torch.cuda.set_sync_debug_mode``) and the top host functions of 30 steps by own
time (cProfile). Writes ``DIR/host_overhead_deg<p>.json``. ``--dry-run``: tiny fp32 shapes under
TRITON_INTERPRET=1 on the CPU (the times then mean nothing; it checks the script).
"""

from __future__ import annotations

import argparse
import cProfile
import datetime
import io
import json
import os
import pstats
import statistics
import time
import warnings

from script_args import parse_with_out_and_dry_run  # benchmarks/ is on the path: scripts run from there


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--deg", type=int, default=1)
    parser.add_argument("--t", type=int, default=65536)
    parser.add_argument("--b", type=int, default=1)
    parser.add_argument("--chunk", type=int, default=None)
    parser.add_argument("--steps", type=int, default=30)
    return parse_with_out_and_dry_run(parser)


ARGS = parse_args()

import torch  # noqa: E402
from standard_step import fwd_bwd_step  # noqa: E402

DEVICE = "cpu" if ARGS.dry_run else "cuda"


def synchronize():
    if DEVICE == "cuda":
        torch.cuda.synchronize()


SHAPE = (1, 40, 2, 16) if ARGS.dry_run else (ARGS.b, ARGS.t, 8, 64)  # b, t, h, d


def timed(step) -> tuple[float, float]:
    """(host ms to return from ``step``, ms to the GPU's end), the GPU idle before."""
    synchronize()
    start = time.perf_counter()
    step()
    issued = time.perf_counter()
    synchronize()
    return 1e3 * (issued - start), 1e3 * (time.perf_counter() - start)


def gpu_only_ms(step) -> float | None:
    """The GPU's time for ``step`` alone: a CUDA graph of it replayed (no host between its kernels)."""
    if DEVICE != "cuda":
        return None
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            step()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    times = []
    for _ in range(ARGS.steps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def synchronising_operations(step) -> list[str]:
    """The messages of every operation in one step that synchronised with the GPU."""
    if DEVICE != "cuda":
        return []
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    return sorted({str(w.message).splitlines()[0] for w in caught})


def main():
    b, t, h, d = SHAPE
    step = fwd_bwd_step(b, t, h, d, ARGS.deg, ARGS.chunk, DEVICE,
                        torch.float32 if ARGS.dry_run else torch.bfloat16)
    for _ in range(3):  # compile and warm up
        step()
    steps = 3 if ARGS.dry_run else ARGS.steps
    pairs = [timed(step) for _ in range(steps)]
    host, whole = (statistics.median(p[i] for p in pairs) for i in (0, 1))
    gpu = gpu_only_ms(step)
    syncs = synchronising_operations(step)
    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(steps):
        step()
    synchronize()
    profiler.disable()
    text = io.StringIO()
    pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(30)
    gpu_text = "-" if gpu is None else f"{gpu:.3f}"
    print(f"deg {ARGS.deg} b {b} t {t} h {h} d {d} chunk {ARGS.chunk}: host issues a fwd+bwd in {host:.3f} ms, "
          f"whole {whole:.3f} ms, GPU alone (graph replay) {gpu_text} ms")
    print("synchronising operations:", syncs or "none")
    print(text.getvalue())
    result = dict(date=datetime.date.today().isoformat(), device=torch.cuda.get_device_name() if DEVICE == "cuda"
                  else "cpu", torch=torch.__version__, deg=ARGS.deg, shape=dict(zip("bthd", SHAPE)), chunk=ARGS.chunk,
                  host_ms=host, whole_ms=whole, gpu_graph_ms=gpu, synchronising=syncs,
                  profile_top=text.getvalue().splitlines()[:60])
    os.makedirs(ARGS.out, exist_ok=True)
    with open(os.path.join(ARGS.out, f"host_overhead_deg{ARGS.deg}.json"), "w") as handle:
        json.dump(result, handle, indent=1)


if __name__ == "__main__":
    main()
