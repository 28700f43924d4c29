"""The working tree's Triton kernels against an earlier version's, timed in one device call (same machine, same
run: the only comparison that separates a kernel change from the noise between calls).

    git archive REF packages/retention-kernels/src | (mkdir -p dist/ab-ref && tar -x -C dist/ab-ref)
    python3 benchmarks/gpu_ab.py [--ref dist/ab-ref] [--cases 2:65536:1,1:4096:16] [--out DIR] [--dry-run]

For each case ``deg:t:b`` (h 8, d 64, bf16, gates, default chunk) and each side it runs
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
    parser.add_argument("--cases", default="2:65536:1,1:4096:16", help="deg:t:b, comma-separated")
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
        names = list(case["ms"]["tree"] or case["ms"]["ref"])
        for offset, side in ((-0.2, "ref"), (0.2, "tree")):
            axis.barh([i + offset for i in range(len(names))], [case["ms"][side].get(n, 0.0) for n in names],
                      height=0.4, label=side)
        axis.set_yticks(range(len(names)), [name[:40] for name in names], fontsize=7)
        axis.invert_yaxis()
        axis.set_xlabel("ms")
        axis.set_title(f"deg {case['deg']}, t {case['t']}, b {case['b']}")
        axis.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> int:
    args = parse_args(argv)
    ref = Path(args.ref) / "packages/retention-kernels/src"
    if not ref.is_dir():
        raise SystemExit(f"--ref {args.ref}: no packages/retention-kernels/src there (make it with git archive, "
                         "see the docstring)")
    sides = {"ref": ref.resolve(), "tree": ROOT / "packages/retention-kernels/src"}
    cases = []
    for spec in args.cases.split(","):
        deg, t, b = (int(x) for x in spec.split(":"))
        ms = {side: times(profile(side, kernels, deg, t, b, args)) for side, kernels in sides.items()}
        cases.append(dict(deg=deg, t=t, b=b, ms=ms))
        print(f"\n# deg {deg}, t {t}, b {b}: ms (ref -> tree)", flush=True)
        for name in ms["tree"] or ms["ref"]:
            old, new = ms["ref"].get(name, float("nan")), ms["tree"].get(name, float("nan"))
            print(f"{name[:40]:40s} {old:8.3f} -> {new:8.3f}  ({new / old - 1:+.1%})", flush=True)
    out = Path(args.out)
    (out / "gpu_ab.json").write_text(json.dumps(dict(ref=str(args.ref), cases=cases), indent=1))
    plot(cases, out / "gpu_ab.png")
    return 0 if all(c["ms"]["ref"] and c["ms"]["tree"] for c in cases) else 1


if __name__ == "__main__":
    sys.exit(main())
