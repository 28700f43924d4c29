"""Where the deg-2 Triton time goes: every kernel of one power_retention fwd+bwd, split and re-tuned.

    PYTHONPATH=packages/retention-core/src:packages/retention-kernels/src python3 benchmarks/gpu_kernel_profile.py \
        [--t 65536] [--b 1] [--heads 8] [--d 64] [--deg 2] [--no-sweep | --intra-sweep] [--strided] [--out DIR]
        [--dry-run]

Records the launches of one fwd+bwd (bf16, gating on, the default chunk), then replays each one alone (do_bench
medians) as tuned, with the intra-chunk part only (``NP = 0``: the state loop runs no pair), without the gates'
work (``HAS_GATE=False``) and under a sweep of explicit configs (block rows, warps, pipeline stages);
``--intra-sweep`` sweeps the intra-chunk part alone instead (``NP = 0``, the kernels that have both: what a
separate intra-chunk kernel would gain from its own tile shape). Prints a
table, writes ``DIR/gpu_kernel_profile.json`` (``gpu_kernel_profile_deg<p>.json`` for ``--deg`` other than 2,
whose kernels are only timed whole: they launch without the tuned lists that the replays use). Also the peak
memory of one fwd+bwd above its inputs, outputs and gradients (issue 3's target: at most 1 GiB at 64k).
Replays reuse the recorded buffers: values are not checked here (in-place scans drift), only the times.

--dry-run: tiny fp32 shapes on the CPU under TRITON_INTERPRET=1, to catch mistakes before a device run.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import os
import statistics
import time

from script_args import parse_with_out_and_dry_run  # benchmarks/ is on the path: scripts run from there


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--t", type=int, default=65536)
    parser.add_argument("--b", type=int, default=1)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--d", type=int, default=64)
    parser.add_argument("--chunk", type=int, default=None)
    parser.add_argument("--strided", action="store_true",
                        help="Q, K, V as views of one [b, t, 3 h, d] projection (retention_train's model's layout)")
    parser.add_argument("--no-sweep", action="store_true", help="each kernel as tuned only (no variants)")
    parser.add_argument("--intra-sweep", action="store_true",
                        help="sweep the intra-chunk part alone (NP=0) of the kernels with a pair loop")
    parser.add_argument("--deg", type=int, default=2, help="deg 1 / 3 / 4: the whole time and top operations only")
    return parse_with_out_and_dry_run(parser)


ARGS = parse_args()

import torch  # noqa: E402
import triton  # noqa: E402
from gpu_triton import extra_peak_gib  # noqa: E402  (benchmarks/ is on the path: scripts run from there)
from standard_step import fwd_bwd_step  # noqa: E402

from retention_kernels.triton import function  # noqa: E402

# the configs swept per kernel (meta parameters of its launch, warps, stages)
ROW_SWEEP = [  # meta parameters a kernel does not take are dropped (BU: the pair-tile width of the state products)
    (dict(BQ=64, BK=64, BU=16), 4, 1), (dict(BQ=64, BK=64, BU=16), 4, 2), (dict(BQ=64, BK=64, BU=16), 4, 3),
    (dict(BQ=64, BK=64, BU=8), 4, 1), (dict(BQ=64, BK=64, BU=8), 4, 2), (dict(BQ=64, BK=64, BU=8), 4, 3),
    (dict(BQ=64, BK=64, BU=8), 8, 2), (dict(BQ=128, BK=64, BU=8), 8, 2), (dict(BQ=128, BK=128, BU=8), 8, 2),
    (dict(BQ=64, BK=32, BU=16), 4, 2), (dict(BQ=32, BK=64, BU=16), 4, 2),
    # two warpgroups on 128 rows (flash-attention's usual Hopper shape): slower in every kernel on an H200
    # (benchmarks/results/gpu_kernel_profile_2026-12-03_eve.json)
    (dict(BQ=128, BK=64, BU=16), 8, 2), (dict(BQ=128, BK=64, BU=8), 8, 3), (dict(BQ=128, BK=64, BU=8), 8, 1),
]
# the intra-chunk block alone: flash-attention's shapes (two warpgroups, 128-key tiles) included. On an H200 the
# best took 5-6% less than the tuned fused kernels' intra part (gpu_kernel_profile_2026-12-03_intra-sweep.json)
INTRA_SWEEP = [
    (dict(BQ=64, BK=64), 4, 2), (dict(BQ=64, BK=64), 4, 3), (dict(BQ=64, BK=128), 4, 2), (dict(BQ=64, BK=32), 4, 3),
    (dict(BQ=128, BK=64), 8, 2), (dict(BQ=128, BK=64), 8, 3), (dict(BQ=128, BK=128), 8, 2),
    (dict(BQ=128, BK=32), 8, 3), (dict(BQ=128, BK=64), 4, 2), (dict(BQ=128, BK=64), 4, 3),
]
STATE_SWEEP = [
    (dict(BT=64, BU=8, PHI_T=True), 4, 3), (dict(BT=64, BU=16, PHI_T=True), 8, 3),
    (dict(BT=128, BU=8, PHI_T=True), 8, 2), (dict(BT=64, BU=16, PHI_T=True), 4, 2),
    (dict(BT=128, BU=16, PHI_T=True), 8, 2), (dict(BT=32, BU=16, PHI_T=True), 4, 3),
]


def record_launches(fn):
    launches = []
    original = function._launch

    def recording(tuned, kernel, grid, args, constants, meta_names):
        launches.append(dict(tuned=tuned, kernel=kernel, grid=grid, args=args, constants=constants,
                             meta_names=meta_names))
        return original(tuned, kernel, grid, args, constants, meta_names)

    function._launch = recording
    try:
        fn()
    finally:
        function._launch = original
    return launches


def median_ms(fn):
    if ARGS.dry_run:
        start = time.perf_counter()
        fn()
        return 1e3 * (time.perf_counter() - start)
    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")


def name_of(launch):
    kernel = launch["kernel"].__name__.replace("pair_", "").replace("_kernel", "")
    if "BACKWARD" in launch["constants"]:
        kernel += ".bwd" if launch["constants"]["BACKWARD"] else ".fwd"
    return kernel


def explicit(launch, meta, warps, stages, args=None, constants=None):
    args = launch["args"] if args is None else args
    constants = launch["constants"] if constants is None else constants
    kernel = launch["kernel"]
    if ARGS.dry_run:
        meta = {**meta, **{k: function._INTERPRETER_META[k] for k in meta if k in ("BT", "BU")}}

    def run():
        kernel[launch["grid"](meta)](*args, **constants, **meta, num_warps=warps, num_stages=stages)
    return run


def top_operations(step, device, count=15):
    """The most expensive device operations of one fwd+bwd (torch.profiler): the Triton kernels and the torch work
    around them (gate-gradient sums, layout conversions, casts)."""
    activity = torch.profiler.ProfilerActivity.CUDA if device == "cuda" else torch.profiler.ProfilerActivity.CPU
    with torch.profiler.profile(activities=[activity]) as profile:
        step()
        if device == "cuda":
            torch.cuda.synchronize()
    attribute = "device_time_total" if device == "cuda" else "cpu_time_total"
    events = sorted(profile.key_averages(), key=lambda event: getattr(event, attribute), reverse=True)
    ops = [dict(name=event.key[:90], ms=getattr(event, attribute) / 1e3, calls=event.count) for event in events
           if not event.key.startswith("ProfilerStep")][:count]
    print(f"# top operations of one fwd+bwd ({attribute}, torch.profiler)")
    for op in ops:
        print(f"  {op['ms']:8.3f} ms  x{op['calls']:<4d} {op['name']}")
    return ops


def best_config(launch):
    tuned = launch["tuned"]
    if tuned is None or not getattr(tuned, "cache", None):
        return None
    config = list(tuned.cache.values())[-1]
    return dict(config.kwargs), config.num_warps, config.num_stages


def main():
    device = "cpu" if ARGS.dry_run else "cuda"
    dtype = torch.float32 if ARGS.dry_run else torch.bfloat16
    b, t, h, d = (1, 96, 2, 16) if ARGS.dry_run else (ARGS.b, ARGS.t, ARGS.heads, ARGS.d)
    chunk = 32 if ARGS.dry_run else ARGS.chunk
    step = fwd_bwd_step(b, t, h, d, ARGS.deg, chunk, device, dtype, ARGS.strided)

    step()  # tune and compile
    whole = median_ms(step)
    memory = peak_memory(step) if device == "cuda" else None
    ops = top_operations(step, device)
    launches = record_launches(step) if ARGS.deg == 2 else []
    rows = []
    print(f"# {torch.cuda.get_device_name() if device == 'cuda' else 'cpu'}  deg={ARGS.deg} b={b} t={t} h={h} d={d} "
          f"chunk={chunk or function.default_chunk_size(t, d, ARGS.deg)}  whole fwd+bwd {whole:.3f} ms", flush=True)
    if memory:
        print("peak memory of one fwd+bwd above inputs, outputs and gradients: {extra_gib:.3f} GiB "
              "(peak {peak_gib:.3f}, inputs {inputs_gib:.3f}, outputs + gradients {results_gib:.3f})".format(**memory))
    save(rows, ops, whole, memory, b, t, h, d, device)
    for launch in launches:
        name = name_of(launch)
        tuned_ms = median_ms(functools.partial(function._launch, *(launch[key] for key in (
            "tuned", "kernel", "grid", "args", "constants", "meta_names"))))
        best = best_config(launch)
        row = dict(kernel=name, tuned_ms=tuned_ms, tuned_config=repr(best), variants=[])
        print(f"{name:28s} tuned {tuned_ms:8.3f} ms  {best}", flush=True)
        meta, warps, stages = best if best else (
            {k: function._INTERPRETER_META[k] for k in launch["meta_names"]}, 4, 1)
        variants = []
        if ARGS.no_sweep:
            rows.append(row)
            continue
        names = launch["kernel"].arg_names
        pair_loop = "BT" not in launch["meta_names"] and "NP" in names and "BK" in names  # a row kernel's
        # --intra-sweep: only the kernels whose intra-chunk block has query tiles (output, dQ) are swept
        if pair_loop and (not ARGS.intra_sweep or "BQ" in launch["meta_names"]):
            args = list(launch["args"])
            args[names.index("NP")] = 0
            variants.append(("intra only (NP=0)", explicit(launch, meta, warps, stages, args=tuple(args))))
            for config_meta, config_warps, config_stages in INTRA_SWEEP if ARGS.intra_sweep else []:
                variants.append((f"intra only {config_meta} w{config_warps} s{config_stages}", explicit(
                    launch, {**meta, **config_meta}, config_warps, config_stages, args=tuple(args))))
        if not ARGS.intra_sweep and launch["constants"].get("HAS_GATE"):
            variants.append(("no gates", explicit(launch, meta, warps, stages,
                                                 constants={**launch["constants"], "HAS_GATE": False})))
        sweep = [] if ARGS.intra_sweep else STATE_SWEEP if "BT" in launch["meta_names"] else ROW_SWEEP
        swept = set()
        for config_meta, config_warps, config_stages in sweep:
            config_meta = {k: v for k, v in config_meta.items() if k in launch["meta_names"]}
            if (repr(config_meta), config_warps, config_stages) in swept:
                continue
            swept.add((repr(config_meta), config_warps, config_stages))
            variants.append((f"{config_meta} w{config_warps} s{config_stages}",
                             explicit(launch, config_meta, config_warps, config_stages)))
        for label, run in variants:
            try:
                ms = median_ms(run)
            except Exception as error:  # out of resources, compile errors: recorded, not fatal
                ms = None
                label += f" [{type(error).__name__}: {str(error)[:80]}]"
            row["variants"].append(dict(variant=label, ms=ms))
            print(f"{'':28s} {label:45s} {'-' if ms is None else f'{ms:8.3f}'}", flush=True)
        rows.append(row)
        save(rows, ops, whole, memory, b, t, h, d, device)
    if not rows:
        return
    total = sum(row["tuned_ms"] for row in rows)
    print(f"sum of tuned kernels {total:.3f} ms (whole {whole:.3f} ms; median of parts "
          f"{statistics.median(row['tuned_ms'] for row in rows):.3f})")


def peak_memory(step) -> dict:
    """Peak CUDA memory of one ``step`` (returning ``Y`` and the input gradients) above what was allocated before
    it (the inputs) and the size of what it returns, in GiB."""
    inputs = torch.cuda.memory_allocated()
    returned = []
    peak = extra_peak_gib(lambda: returned.append(step()))
    Y, grads = returned[0]
    results = sum(x.numel() * x.element_size() for x in (Y, *grads)) / 2**30
    return dict(extra_gib=peak - results, peak_gib=torch.cuda.max_memory_allocated() / 2**30,
                inputs_gib=inputs / 2**30, results_gib=results)


def save(rows, ops, whole, memory, b, t, h, d, device):
    """Rewritten after every kernel, so a run cut short keeps its rows."""
    result = dict(date=datetime.date.today().isoformat(), device=torch.cuda.get_device_name() if device == "cuda"
                  else "cpu", torch=torch.__version__, triton=triton.__version__,
                  shape=dict(b=b, t=t, h=h, d=d, strided=ARGS.strided),
                  deg=ARGS.deg, whole_fwd_bwd_ms=whole, peak_memory=memory, kernels=rows, top_operations=ops,
                  command="python3 benchmarks/gpu_kernel_profile.py " + " ".join(
                      f"--{k} {v}" for k, v in vars(ARGS).items() if k not in ("out", "dry_run") and v))
    os.makedirs(ARGS.out, exist_ok=True)
    name = "gpu_kernel_profile" + ("" if ARGS.deg == 2 else f"_deg{ARGS.deg}")
    name += (f"_t{t}_h{h}" if ARGS.strided else "") + ".json"
    with open(os.path.join(ARGS.out, name), "w") as handle:
        json.dump(result, handle, indent=1)


if __name__ == "__main__":
    main()
