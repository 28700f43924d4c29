"""The CPU performance targets of issue 2, for the numba backend (``backend="cpu"``), in one run:

    /work/venv/bin/python benchmarks/cpu_issue2.py [--repeats 5] [--out benchmarks/results]

Problem: b=1, h=hq=4, d=e=64, deg=2 (D=2080), gating on, fp32 inputs, layout [b, t, h, d] (SDPA: [b, h, t, d]).

1. forward+backward at t=4096: numba vs the differentiable PyTorch chunked reference (``backend="reference"``,
   chunk 64); target >= 3x faster. Also t=1024.
2. forward at t=16384 (and 1024, 4096): numba vs ``torch.nn.functional.scaled_dot_product_attention
   (is_causal=True)`` on CPU; target: faster.
3. peak memory of the numba forward at t=4k, 16k, 64k: each t in a fresh subprocess, the peak resident set
   (VmHWM, reset through /proc/self/clear_refs after the inputs exist) minus the resident set before the call;
   target: grows linearly in t.
4. chunk-size sweep (fwd and fwd+bwd at t=4096), the evidence behind ``retention.cpu.default_chunk_size``.

Timings are wall-clock medians over ``--repeats`` rounds; within a round the contenders run back to back
(interleaved), so load from other processes on this shared 2-core machine hits them alike. Writes
cpu_issue2.json (every sample), cpu_issue2.md (a short table) and cpu_issue2.png.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from retention import power_retention
from retention.cpu import default_chunk_size
from retention.testing import random_inputs

B, H, D_HEAD, DEG = 1, 4, 64, 2


def log(*args):
    print(*args, flush=True)


def inputs_for(t: int, requires_grad: bool) -> dict:
    generator = torch.Generator().manual_seed(t)
    return random_inputs(b=B, t=t, hq=H, h=H, d=D_HEAD, dtype=torch.float32, generator=generator,
                         requires_grad=requires_grad)


def forward(backend: str, t: int, chunk_size=None):
    inputs = inputs_for(t, requires_grad=False)

    def run():
        with torch.no_grad():
            power_retention(**inputs, deg=DEG, chunk_size=chunk_size, backend=backend)
    return run


def forward_backward(backend: str, t: int, chunk_size=None):
    inputs = inputs_for(t, requires_grad=True)
    leaves = [x for x in inputs.values() if x.requires_grad]

    def run():
        Y = power_retention(**inputs, deg=DEG, chunk_size=chunk_size, backend=backend)
        torch.autograd.grad(Y.sum(), leaves)
    return run


def sdpa_forward(t: int):
    generator = torch.Generator().manual_seed(t)
    q, k, v = (torch.randn(B, H, t, D_HEAD, generator=generator) for _ in range(3))

    def run():
        with torch.no_grad():
            F.scaled_dot_product_attention(q, k, v, is_causal=True)
    return run


def interleaved(contenders: dict, repeats: int) -> dict:
    """``{name: [seconds, ...]}``: one warm-up call each, then ``repeats`` rounds running each once."""
    for name, run in contenders.items():
        started = time.perf_counter()
        run()
        log(f"  warm-up {name}: {time.perf_counter() - started:.3f} s")
    samples = {name: [] for name in contenders}
    for _ in range(repeats):
        for name, run in contenders.items():
            started = time.perf_counter()
            run()
            samples[name].append(time.perf_counter() - started)
    for name, values in samples.items():
        log(f"  {name}: median {statistics.median(values) * 1e3:.1f} ms  samples {[round(v * 1e3) for v in values]}")
    return samples


def median_ms(values) -> float:
    return statistics.median(values) * 1e3


# --------------------------------------------------------------------------------------------- peak memory


def measure_memory_here(t: int) -> dict:
    """Runs in a fresh subprocess: peak RSS growth of one numba forward at length t (compiled kernels loaded
    from numba's cache by a warm-up call at a small t first)."""
    forward("cpu", 256)()
    run = forward("cpu", t)
    with open("/proc/self/clear_refs", "w") as handle:
        handle.write("5")  # resets VmHWM (peak RSS) to the current RSS

    def status(field: str) -> int:
        with open("/proc/self/status") as handle:
            line = next(line for line in handle if line.startswith(field))
        return int(line.split()[1]) * 1024

    before = status("VmRSS")
    run()
    peak = status("VmHWM")
    return {"t": t, "rss_before_bytes": before, "peak_bytes": peak, "peak_growth_bytes": peak - before}


def measure_memory(t: int) -> dict:
    script = f"import json, sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); import cpu_issue2; " \
             f"print(json.dumps(cpu_issue2.measure_memory_here({t})))"
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------------------------- report


def machine() -> dict:
    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as handle:
            cpu = next(line.split(":", 1)[1].strip() for line in handle if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    import numba

    return {"cpu": cpu, "cores": os.cpu_count(), "numba_threads": numba.get_num_threads(),
            "torch_threads": torch.get_num_threads(), "torch": torch.__version__, "numba": numba.__version__,
            "python": platform.python_version(), "load_average_at_start": os.getloadavg()}


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (times, memory) = plt.subplots(1, 2, figsize=(11, 4.2))
    for key, label, style in (("numba_fwd", "numba forward", "o-"), ("sdpa_fwd", "SDPA causal forward", "s--"),
                              ("numba_fwd_bwd", "numba fwd+bwd", "o-"),
                              ("reference_fwd_bwd", "torch chunked reference fwd+bwd", "s--")):
        points = sorted((int(t), median_ms(v)) for t, v in results["timings"][key].items())
        times.plot([p[0] for p in points], [p[1] for p in points], style, label=label)
    times.set(xscale="log", yscale="log", xlabel="t (tokens)", ylabel="ms (median)",
              title=f"b={B}, h={H}, d={D_HEAD}, deg={DEG}, gated, fp32")
    times.set_xticks(sorted({int(t) for v in results["timings"].values() for t in v}))
    times.get_xaxis().set_major_formatter(matplotlib.ticker.ScalarFormatter())
    times.legend(fontsize=8)
    times.grid(alpha=0.3)
    rows = results["memory"]
    memory.plot([r["t"] for r in rows], [r["peak_growth_bytes"] / 2**20 for r in rows], "o-", label="measured")
    slope = rows[-1]["peak_growth_bytes"] / rows[-1]["t"]
    memory.plot([r["t"] for r in rows], [slope * r["t"] / 2**20 for r in rows], ":", label="linear through last")
    memory.set(xlabel="t (tokens)", ylabel="peak RSS growth (MiB)", title="numba forward: peak memory")
    memory.legend(fontsize=8)
    memory.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def write_markdown(results: dict, path: Path) -> None:
    timings, m = results["timings"], results["machine"]
    lines = [
        f"# CPU benchmark of issue 2 (numba backend), {results['date']}",
        "",
        f"Machine: {m['cpu']}, {m['cores']} cores (shared with other jobs; load average at start "
        f"{m['load_average_at_start'][0]:.1f}), torch {m['torch']}, numba {m['numba']}. Problem: b={B}, h={H}, "
        f"d=e={D_HEAD}, deg={DEG}, gating on, fp32; numba chunk = default ({results['default_chunk']}), "
        f"reference chunk 64. Medians of {results['repeats']} interleaved rounds.",
        "",
        "| measurement | t | numba (ms) | baseline (ms) | speed-up | target |",
        "|---|---|---|---|---|---|",
    ]
    for t in sorted(timings["numba_fwd_bwd"], key=int):
        mine, base = median_ms(timings["numba_fwd_bwd"][t]), median_ms(timings["reference_fwd_bwd"][t])
        target = ">= 3x" if int(t) == 4096 else ""
        lines.append(f"| fwd+bwd vs torch chunked reference | {t} | {mine:.0f} | {base:.0f} | {base / mine:.1f}x | "
                     f"{target} |")
    for t in sorted(timings["numba_fwd"], key=int):
        mine, base = median_ms(timings["numba_fwd"][t]), median_ms(timings["sdpa_fwd"][t])
        target = "> 1x" if int(t) == 16384 else ""
        lines.append(f"| fwd vs SDPA(is_causal) | {t} | {mine:.0f} | {base:.0f} | {base / mine:.2f}x | {target} |")
    lines += ["", "Peak memory of the numba forward (peak RSS growth during one call, fresh process per t; at small t",
              "the allocator reuses memory freed before the call, so the growth undercounts there):", "",
              "| t | peak growth (MiB) | per token (KiB) |", "|---|---|---|"]
    for row in results["memory"]:
        lines.append(f"| {row['t']} | {row['peak_growth_bytes'] / 2**20:.1f} | "
                     f"{row['peak_growth_bytes'] / row['t'] / 1024:.2f} |")
    lines += ["", "Chunk-size sweep at t=4096 (medians, ms):", "", "| chunk | fwd | fwd+bwd |", "|---|---|---|"]
    for chunk, row in results["chunk_sweep"].items():
        lines.append(f"| {chunk} | {median_ms(row['fwd']):.0f} | {median_ms(row['fwd_bwd']):.0f} |")
    path.write_text("\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    parser.add_argument("--report-only", action="store_true", help="rewrite the .md and .png from the .json")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    if args.report_only:
        results = json.loads((args.out / "cpu_issue2.json").read_text())
        write_markdown(results, args.out / "cpu_issue2.md")
        plot(results, args.out / "cpu_issue2.png")
        return
    results = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
               "machine": machine(), "repeats": args.repeats, "default_chunk": default_chunk_size(1 << 30),
               "problem": {"b": B, "h": H, "hq": H, "d": D_HEAD, "e": D_HEAD, "deg": DEG, "gating": True,
                           "dtype": "float32"},
               "timings": {"numba_fwd_bwd": {}, "reference_fwd_bwd": {}, "numba_fwd": {}, "sdpa_fwd": {}}}
    timings = results["timings"]

    for t in (1024, 4096):
        log(f"fwd+bwd, t={t}")
        samples = interleaved({"numba": forward_backward("cpu", t),
                               "reference": forward_backward("reference", t, chunk_size=64)}, args.repeats)
        timings["numba_fwd_bwd"][t], timings["reference_fwd_bwd"][t] = samples["numba"], samples["reference"]
    for t in (1024, 4096, 16384):
        log(f"fwd, t={t}")
        samples = interleaved({"numba": forward("cpu", t), "sdpa": sdpa_forward(t)}, args.repeats)
        timings["numba_fwd"][t], timings["sdpa_fwd"][t] = samples["numba"], samples["sdpa"]

    log("chunk sweep, t=4096")
    results["chunk_sweep"] = {}
    sweep_contenders = {}
    for chunk in (32, 64, 128, 256, 512):
        sweep_contenders[f"fwd {chunk}"] = forward("cpu", 4096, chunk)
        sweep_contenders[f"fwd_bwd {chunk}"] = forward_backward("cpu", 4096, chunk)
    sweep = interleaved(sweep_contenders, max(3, args.repeats // 2))
    for chunk in (32, 64, 128, 256, 512):
        results["chunk_sweep"][chunk] = {"fwd": sweep[f"fwd {chunk}"], "fwd_bwd": sweep[f"fwd_bwd {chunk}"]}

    log("peak memory of the numba forward")
    results["memory"] = []
    for t in (4096, 16384, 65536):
        row = measure_memory(t)
        log(f"  t={t}: peak growth {row['peak_growth_bytes'] / 2**20:.1f} MiB")
        results["memory"].append(row)
    growth = [row["peak_growth_bytes"] / row["t"] for row in results["memory"]]
    results["memory_bytes_per_token"] = growth

    (args.out / "cpu_issue2.json").write_text(json.dumps(results, indent=1) + "\n")
    write_markdown(results, args.out / "cpu_issue2.md")
    plot(results, args.out / "cpu_issue2.png")
    log((args.out / "cpu_issue2.md").read_text())


if __name__ == "__main__":
    main()
