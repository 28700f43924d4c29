"""PNG plots of a benchmark report (the dict that ``suite.py`` writes as JSON).

    python benchmarks/plots.py benchmarks/results/cpu-2025-01-01.json    # re-plot a saved report
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt
from matplotlib.ticker import NullFormatter


def standard_problem(report: dict) -> tuple[int, int]:
    """The (deg, head dim) the plots show: SPEC.md's standard problem (2, 64) when measured."""
    config = report["config"]
    deg = 2 if 2 in config["degs"] else config["degs"][0]
    d = 64 if 64 in config["head_dims"] else config["head_dims"][0]
    return deg, d


def _series(report: dict, pass_: str, d: int, deg: int) -> dict[str, list[dict]]:
    """Rows of one pass and head dim by label; our methods get one line per deg, baselines one line."""
    lines: dict[str, list[dict]] = {}
    for row in report["training"]:
        if row["pass"] != pass_ or row["head_dim"] != d or row["ms"] is None:
            continue
        ours = row["method"].startswith("retention")
        if not ours and row["deg"] != deg:
            continue  # the same measurement repeated for every deg
        label = f"{row['method']} deg={row['deg']}" if ours and len(report["config"]["degs"]) > 1 else row["method"]
        lines.setdefault(label, []).append(row)
    return lines


def _title(report: dict, d: int) -> str:
    config = report["config"]
    return (f"{report['device']}\n{config['dtype']}, b*t={config['tokens']}, h={config['heads']}, d={d}, "
            f"gating {'on' if config['gating'] else 'off'}, chunk {config['chunk_size'] or 'backend default'}")


def plot_throughput(report: dict, path: Path) -> Path:
    deg, d = standard_problem(report)
    passes = report["config"]["passes"]
    figure, axes = plt.subplots(1, len(passes), figsize=(5.5 * len(passes), 4.5), squeeze=False)
    for axis, pass_ in zip(axes[0], passes):
        for label, rows in sorted(_series(report, pass_, d, deg).items()):
            style = "-o" if label.startswith("retention") else "--s"
            axis.plot([r["t"] for r in rows], [r["tokens_per_s"] for r in rows], style, label=label, markersize=4)
        axis.set(xscale="log", yscale="log", xlabel="context length t", ylabel="tokens / s", title=pass_)
        _context_ticks(axis, report["config"]["contexts"])
        axis.grid(alpha=0.3, which="both")
        axis.legend(fontsize=7)
    figure.suptitle(f"Throughput by context length (deg {deg})\n{_title(report, d)}", fontsize=9)
    return _save(figure, path)


def plot_tflops(report: dict, path: Path) -> Path:
    deg, d = standard_problem(report)
    passes = report["config"]["passes"]
    matmul = report["matmul_tflops"]
    figure, axes = plt.subplots(1, len(passes), figsize=(5.5 * len(passes), 4.5), squeeze=False)
    for axis, pass_ in zip(axes[0], passes):
        for label, rows in sorted(_series(report, pass_, d, deg).items()):
            style = "-o" if label.startswith("retention") else "--s"
            axis.plot([r["t"] for r in rows], [r["tflops"] for r in rows], style, label=label, markersize=4)
        axis.axhline(matmul, color="black", linestyle=":", label=f"measured matmul {matmul:.2f}")
        axis.set(xscale="log", xlabel="context length t", ylabel="achieved TFLOP/s (useful FLOPs)", title=pass_)
        _context_ticks(axis, report["config"]["contexts"])
        axis.set_ylim(bottom=0)
        axis.grid(alpha=0.3)
        axis.legend(fontsize=7)
    figure.suptitle(f"Achieved TFLOP/s against the measured matrix rate\n{_title(report, d)}", fontsize=9)
    return _save(figure, path)


def plot_breakdown(report: dict, path: Path) -> Path:
    items = {name: item for name, item in report["breakdown"].items() if "kernels_ms" in item}
    figure, axes = plt.subplots(len(items) or 1, 1, figsize=(9, 0.5 + 2.6 * max(1, len(items))), squeeze=False)
    for axis, (name, item) in zip(axes[:, 0], items.items()):
        kernels = sorted(item["kernels_ms"].items(), key=lambda kv: kv[1])
        axis.barh([_shorten(key) for key, _ in kernels], [ms for _, ms in kernels], color="tab:blue")
        case = item["case"]
        axis.set_title(f"{name}: {item['pass']}, deg {case['deg']}, d {case['head_dim']}, t {case['t']}, "
                       f"b {case['b']} (total {item['total_ms']:.1f} ms)", fontsize=9)
        axis.set_xlabel("ms (self time)")
        axis.tick_params(axis="y", labelsize=7)
    if not items:
        axes[0, 0].text(0.5, 0.5, "no breakdown measured", ha="center")
    figure.suptitle(f"Time breakdown by kernel / op (torch.profiler)\n{report['device']}", fontsize=9)
    return _save(figure, path)


def plot_decode(report: dict, path: Path) -> Path:
    figure, (latency, memory) = plt.subplots(1, 2, figsize=(11, 4.5))
    config = report["config"]
    methods = sorted({row["method"] for row in report["decode"]})
    for method in methods:
        rows = [r for r in report["decode"] if r["method"] == method and r["ms"] is not None]
        style = "-o" if method.startswith("retention") else "--s"
        latency.plot([r["context"] for r in rows], [r["ms"] for r in rows], style, label=method, markersize=4)
        memory.plot([r["context"] for r in rows], [r["cache_bytes"] / 2**20 for r in rows], style, label=method,
                    markersize=4)
    latency.set(xscale="log", yscale="log", xlabel="context length", ylabel="ms per decode step (median)")
    memory.set(xscale="log", yscale="log", xlabel="context length", ylabel="cache MiB (one layer)")
    for axis in (latency, memory):
        _context_ticks(axis, config["decode_contexts"])
        axis.grid(alpha=0.3, which="both")
        axis.legend(fontsize=7)
    figure.suptitle(f"Decode: one token against a context\n{report['device']}, {config['dtype']}, "
                    f"b={config['decode_batch']}, h={config['heads']}", fontsize=9)
    return _save(figure, path)


def _context_ticks(axis, contexts: list[int]) -> None:
    """Label exactly the measured context lengths on a log axis."""
    axis.set_xticks(contexts, [str(t) for t in contexts])
    axis.xaxis.set_minor_formatter(NullFormatter())


def _shorten(name: str, width: int = 60) -> str:
    return name if len(name) <= width else name[: width - 3] + "..."


def _save(figure, path: Path) -> Path:
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def plot_all(report: dict, stem: Path) -> list[Path]:
    """Write ``<stem>-throughput.png``, ``-tflops.png``, ``-breakdown.png`` and (with a decode suite)
    ``-decode.png``; returns their paths."""
    paths = [
        plot_throughput(report, stem.with_name(stem.name + "-throughput.png")),
        plot_tflops(report, stem.with_name(stem.name + "-tflops.png")),
        plot_breakdown(report, stem.with_name(stem.name + "-breakdown.png")),
    ]
    if report["decode"]:
        paths.append(plot_decode(report, stem.with_name(stem.name + "-decode.png")))
    return paths


if __name__ == "__main__":
    for argument in sys.argv[1:]:
        source = Path(argument)
        print(*plot_all(json.loads(source.read_text()), source.with_suffix("")), sep="\n")
