"""PNG plots of a benchmark report (the dict that ``suite.py`` writes as JSON), and its section of the docs.

    python benchmarks/plots.py benchmarks/results/cpu-2025-01-01.json          # re-plot a saved report
    python benchmarks/plots.py --docs benchmarks/results/nvidia-h200-....json  # put it on the docs page

``--docs`` writes the plots as ``docs/assets/benchmarks/<gpu|cpu>-{throughput,tflops,breakdown,decode}.png``
and replaces the part of ``docs/benchmarks.md`` between ``<!-- results:gpu:start -->`` and
``<!-- results:gpu:end -->`` (``cpu`` for a CPU run) with the run's tables and those images.
"""

from __future__ import annotations

import argparse
import json
import os
import re
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
        positions = range(len(kernels))  # by position: two long names may shorten to the same label
        axis.barh(positions, [ms for _, ms in kernels], color="tab:blue")
        axis.set_yticks(positions, [_shorten(key) for key, _ in kernels])
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
    """``name`` cut in the middle to ``width`` characters (kernel names differ at both ends)."""
    if len(name) <= width:
        return name
    head = (width - 3) // 2
    return name[:head] + "..." + name[len(name) - (width - 3 - head):]


def _save(figure, path: Path) -> Path:
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


PLOTS = ("throughput", "tflops", "breakdown", "decode")
ROOT = Path(__file__).resolve().parent.parent


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


# --------------------------------------------------------------------------------------------------------------
# The docs page


def docs_kind(report: dict) -> str:
    """``gpu`` or ``cpu``: which section of the benchmarks page (and which ``<kind>-*.png``) a report fills."""
    return report["config"].get("protocol") or ("gpu" if report["config"]["device"] == "cuda" else "cpu")


def update_docs(report: dict, page: Path = ROOT / "docs" / "benchmarks.md",
                assets: Path = ROOT / "docs" / "assets" / "benchmarks") -> list[Path]:
    """Write the plots as ``assets/<kind>-<plot>.png`` and replace the section of ``page`` between
    ``<!-- results:<kind>:start -->`` and ``<!-- results:<kind>:end -->`` with :func:`results_markdown`."""
    kind = docs_kind(report)
    start, end = f"<!-- results:{kind}:start -->", f"<!-- results:{kind}:end -->"
    text = page.read_text()
    if start not in text or end not in text or text.index(start) > text.index(end):
        raise ValueError(f"{page} must contain {start} followed by {end} (where the results go)")
    assets.mkdir(parents=True, exist_ok=True)
    written = plot_all(report, assets / kind)
    images = {path.name[len(kind) + 1: -len(".png")]: path for path in written}
    prefix = Path(os.path.relpath(assets.resolve(), page.resolve().parent)).as_posix()  # links relative to the page
    section = results_markdown(report, {plot: f"{prefix}/{path.name}" for plot, path in images.items()})
    before, rest = text.split(start, 1)
    after = rest.split(end, 1)[1]
    page.write_text(f"{before}{start}\n{section}\n{end}{after}")
    return [*written, page]


def _number(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def results_markdown(report: dict, images: dict[str, str]) -> str:
    """The run as Markdown: what was measured, the training table (one column per method), the decode table, the
    breakdown, the notes and the plots (``images``: plot name -> path relative to the page)."""
    config = report["config"]
    # GFLOP/s where a TFLOP/s would print as 0.0 (CPUs)
    unit, scale = ("TFLOP/s", 1.0) if report["matmul_tflops"] >= 1 else ("GFLOP/s", 1e3)
    lines = [
        f"Measured {report['date'][:10]} on {report['device']}, torch {report['torch']}, retention "
        f"{report['retention']}; measured matrix rate {scale * report['matmul_tflops']:.1f} {unit} "
        f"({config['dtype']}). "
        f"{config['dtype']}, b*t = {config['tokens']}, h = {config['heads']}, gating "
        f"{'on' if config['gating'] else 'off'}, chunk {config['chunk_size'] or 'each backend default'}. "
        f"Files: `benchmarks/results/{report['stem']}.{{json,csv}}`, `{report['stem']}-decode.csv`"
        + ("" if report.get("complete", True) else " (the run stopped before the end: partial results)") + ".",
        "",
    ]
    rows = [row for row in report["training"]]
    methods = list(dict.fromkeys(row["method"] for row in rows))
    ours = [m for m in methods if m.startswith("retention")]
    if rows:
        header = ["pass", "deg", "d", "t", "b", *[f"`{m}` ms" for m in methods],
                  *[f"`{m}` vs best SDPA" for m in ours], *[f"`{m}` {unit} (% matmul)" for m in ours]]
        lines += ["Milliseconds per call (median; `-`: skipped or failed, see the notes and the JSON):", "",
                  "| " + " | ".join(header) + " |", "|" + "---|" * 5 + "---:|" * (len(header) - 5)]
        by_key = {}
        for row in rows:
            by_key.setdefault((row["pass"], row["deg"], row["head_dim"], row["t"], row["b"]), {})[row["method"]] = row
        for (pass_, deg, d, t, b), cells in by_key.items():
            times = [_number(cells[m]["ms"], ".3f") if m in cells else "" for m in methods]
            speedups = [_number(cells[m]["speedup_vs_sdpa"], ".2f") + "x" * (cells.get(m, {}).get("speedup_vs_sdpa")
                        is not None) if m in cells else "" for m in ours]
            rates = [f"{scale * cells[m]['tflops']:.1f} ({100 * cells[m]['fraction_of_matmul']:.0f}%)"
                     if m in cells and cells[m]["tflops"] is not None else "-" for m in ours]
            lines.append(f"| {pass_} | {deg} | {d} | {t} | {b} | " + " | ".join(times + speedups + rates) + " |")
        lines.append("")
    if report["decode"]:
        decode_methods = list(dict.fromkeys(row["method"] for row in report["decode"]))
        lines += [f"Decode (one token, batch {config['decode_batch']}, deg {report['decode'][0]['deg'] or 2}, "
                  f"median step; cache MiB per layer):", "",
                  "| context | " + " | ".join(f"`{m}` ms | MiB" for m in decode_methods) + " |",
                  "|---:|" + "---:|---:|" * len(decode_methods)]
        contexts = list(dict.fromkeys(row["context"] for row in report["decode"]))
        for context in contexts:
            cells = {row["method"]: row for row in report["decode"] if row["context"] == context}
            values = []
            for method in decode_methods:
                row = cells.get(method, {"ms": None, "cache_bytes": None})
                mib = None if row["cache_bytes"] is None else row["cache_bytes"] / 2**20
                values += [_number(row["ms"], ".3f"), _number(mib, ".2f")]
            lines.append(f"| {context} | " + " | ".join(values) + " |")
        lines.append("")
    for name, item in report["breakdown"].items():
        if "kernels_ms" not in item:
            lines.append(f"- Breakdown of `{name}`: {item['error']}")
            continue
        top = ", ".join(f"`{_shorten(key, 70)}` {ms:.2f} ms" for key, ms in item["kernels_ms"].items() if ms > 0)
        lines.append(f"- Breakdown of `{name}` ({item['pass']}, t = {item['case']['t']}, total "
                     f"{item['total_ms']:.2f} ms): {top}.")
    notes = report["notes"] + sorted({f"`{row['method']}`: {row['note']}" for row in rows if row["note"]})
    lines += [f"- Note: {_escape_pipes(note)}" for note in notes]
    titles = {"throughput": "Throughput by context length", "tflops": "Achieved TFLOP/s against the measured "
              "matrix rate", "breakdown": "Time breakdown by kernel", "decode": "Decode latency and cache memory"}
    for plot in PLOTS:
        if plot in images:
            lines += ["", f"![{titles[plot]}]({images[plot]})"]
    return "\n".join(lines)


def _escape_pipes(text: str) -> str:
    return re.sub(r"\s+", " ", text).replace("|", "\\|")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Plot saved benchmark reports (suite.py JSON).")
    parser.add_argument("reports", nargs="+", type=Path)
    parser.add_argument("--docs", action="store_true",
                        help="write docs/assets/benchmarks/<gpu|cpu>-*.png and the results section of the page instead")
    parser.add_argument("--page", type=Path, default=ROOT / "docs" / "benchmarks.md", help=argparse.SUPPRESS)
    parser.add_argument("--assets", type=Path, default=ROOT / "docs" / "assets" / "benchmarks", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    for source in args.reports:
        report = json.loads(source.read_text())
        report.setdefault("stem", source.stem)  # reports written before the suite stored it
        if args.docs:
            print(*update_docs(report, args.page, args.assets), sep="\n")
        else:
            print(*plot_all(report, source.with_suffix("")), sep="\n")


if __name__ == "__main__":
    main()
