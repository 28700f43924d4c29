"""The working tree's Triton kernels against an earlier version's, and any number of candidate versions, timed in
one device call (same machine, same run: the only comparison that separates a kernel change from the noise
between calls).

    git archive REF packages/retention-kernels/src | (mkdir -p dist/ab-ref && tar -x -C dist/ab-ref)
    git archive BRANCH packages/retention-kernels/src | (mkdir -p dist/ab-NAME && tar -x -C dist/ab-NAME)
    python3 benchmarks/gpu_ab.py [--ref dist/ab-ref] [--variants dist/ab-NAME,...] [--cases 2:65536:1,1:4096:16]
                                 [--variant-cases 1:4096:16] [--out DIR] [--dry-run]

For each case ``deg:t:b`` (h 8, d 64, bf16, gates, default chunk) and each side (the reference, each variant,
named by its folder, then the working tree) it runs
``gpu_kernel_profile.py --no-sweep`` in a process of its own (``PYTHONPATH`` on that side's kernels, a Triton
cache of its own), reference first. Prints the whole fwd+bwd and every kernel side by side, writes
``DIR/gpu_ab.json`` and ``DIR/gpu_ab.png``. (``gpu_session.sh ab`` runs it on the device.) --dry-run: tiny fp32
shapes under TRITON_INTERPRET=1 on the CPU, to check the script.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--ref", default="dist/ab-ref", help="a folder holding packages/retention-kernels/src")
    parser.add_argument("--variants", default="", help="more such folders, comma-separated, timed beside the two")
    parser.add_argument("--cases", default="2:65536:1,1:4096:16", help="deg:t:b, comma-separated")
    parser.add_argument("--variant-cases", default=None,
                        help="the cases the variants run (default: all; a variant that changes deg 1 only need not "
                             "pay for the deg-2 tuning)")
    parser.add_argument("--out", default=os.environ.get("OUT", "."))
    parser.add_argument("--timeout", type=float, default=150.0, help="seconds per profile run")
    parser.add_argument("--dry-run", action="store_true")
    return parser.parse_args(argv)


def profile(side: str, kernels: Path, deg: int, t: int, b: int, args) -> dict:
    """One ``gpu_kernel_profile.py`` run on ``kernels`` -> its JSON (empty when it failed)."""
    out = Path(args.out) / f"ab-{side}-deg{deg}-t{t}"
    out.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT / "packages/retention-core/src"), str(kernels)]),
               TRITON_CACHE_DIR=os.environ.get("TRITON_CACHE_DIR", "/tmp/retention-triton-cache") + f"-{side}")
    command = [sys.executable, str(ROOT / "benchmarks/gpu_kernel_profile.py"), "--no-sweep", "--deg", str(deg),
               "--t", str(t), "--b", str(b), "--out", str(out), *(["--dry-run"] if args.dry_run else [])]
    try:
        run = subprocess.run(command, env=env, cwd=ROOT / "benchmarks", capture_output=True, text=True,
                             timeout=args.timeout)
        (out / "log.txt").write_text(run.stdout + run.stderr)
    except subprocess.TimeoutExpired:
        print(f"{side} deg {deg} t {t}: timed out after {args.timeout:.0f} s", flush=True)
        return {}
    found = sorted(out.glob("gpu_kernel_profile*.json"))
    if run.returncode or not found:
        print(f"{side} deg {deg} t {t}: failed (rc {run.returncode}), see {out / 'log.txt'}", flush=True)
        return {}
    return json.loads(found[0].read_text())


def times(result: dict) -> dict[str, float]:
    """``{"whole fwd+bwd": ms, kernel: ms}``: the tuned replays (deg 2) or the profiler's top operations."""
    rows = {"whole fwd+bwd": result.get("whole_fwd_bwd_ms", float("nan"))}
    rows.update({k["kernel"]: k["tuned_ms"] for k in result.get("kernels", [])})
    if not result.get("kernels"):
        rows.update({op["name"]: op["ms"] for op in result.get("top_operations", [])[:8]})
    return rows


def plot(cases: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(cases), figsize=(6 * len(cases), 4), squeeze=False)
    for axis, case in zip(axes[0], cases):
        sides = list(case["ms"])
        names = list(case["ms"]["tree"] or case["ms"]["ref"])
        height = 0.8 / len(sides)
        for number, side in enumerate(sides):
            offset = (number - (len(sides) - 1) / 2) * height
            axis.barh([i + offset for i in range(len(names))], [case["ms"][side].get(n, 0.0) for n in names],
                      height=height, label=side)
        axis.set_yticks(range(len(names)), [name[:40] for name in names], fontsize=7)
        axis.invert_yaxis()
        axis.set_xlabel("ms")
        axis.set_title(f"deg {case['deg']}, t {case['t']}, b {case['b']}")
        axis.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def kernel_tree(folder: str, option: str) -> Path:
    tree = Path(folder) / "packages/retention-kernels/src"
    if not tree.is_dir():
        raise SystemExit(f"{option} {folder}: no packages/retention-kernels/src there (make it with git archive, "
                         "see the docstring)")
    return tree.resolve()


def moved_from(old: float, new: float) -> str:
    return f"{new:8.3f} ({new / old - 1:+.1%})"


def main(argv=None) -> int:
    args = parse_args(argv)
    sides = {"ref": kernel_tree(args.ref, "--ref")}
    for folder in filter(None, args.variants.split(",")):
        sides[Path(folder).name] = kernel_tree(folder, "--variants")
    sides["tree"] = ROOT / "packages/retention-kernels/src"
    variant_cases = set((args.cases if args.variant_cases is None else args.variant_cases).split(","))
    cases = []
    for spec in args.cases.split(","):
        deg, t, b = (int(x) for x in spec.split(":"))
        ms = {side: times(profile(side, kernels, deg, t, b, args)) for side, kernels in sides.items()
              if side in ("ref", "tree") or spec in variant_cases}
        cases.append(dict(deg=deg, t=t, b=b, ms=ms))
        others = [side for side in ms if side != "ref"]
        print(f"\n# deg {deg}, t {t}, b {b}: ms, ref -> {', '.join(others)} (change against ref)", flush=True)
        for name in ms["tree"] or ms["ref"]:
            old = ms["ref"].get(name, float("nan"))
            moved = "  ".join(moved_from(old, ms[side].get(name, float("nan"))) for side in others)
            print(f"{name[:40]:40s} {old:8.3f} -> {moved}", flush=True)
    out = Path(args.out)
    (out / "gpu_ab.json").write_text(json.dumps(dict(ref=str(args.ref), variants=list(sides)[1:-1], cases=cases),
                                                indent=1))
    plot(cases, out / "gpu_ab.png")
    return 0 if all(all(case["ms"].values()) for case in cases) else 1


if __name__ == "__main__":
    sys.exit(main())
