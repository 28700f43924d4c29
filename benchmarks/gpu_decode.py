"""Decode on a GPU (issue 4): per-token latency of the static cache's captured step against context length,
SDPA over a KV cache, and the time to read the state once. One script, one device call:

    PYTHONPATH=packages/retention-core/src:packages/retention-kernels/src python benchmarks/gpu_decode.py \
        [--out DIR]

Standard problem: bf16, batch 16, h = hq = 8, d = e = 64, deg 2 (D = 2080), gating, switch_over_seq_len 512;
then the same with grouped queries, hq = 4 h = 32 (``--ratios 1,4``): the state and window are the same size
(read once per key/value head), the queries four times as many.

``--dry-run``: tiny shapes on the CPU under ``TRITON_INTERPRET=1`` (wall-clock timings, no CUDA graphs: the
graph-replay rows time the same steps uncaptured), to check the script itself before a device run.

What is measured (CUDA events; medians of ``triton.testing.do_bench`` or a timed loop of graph replays):
- copy bandwidth (bytes read + written of a 1 GiB device copy) and the floor: state bytes / bandwidth;
- the fused ``attend_window`` kernel alone at a full window, for a few tile/split choices;
- the fold: Triton ``fold_window`` against the PyTorch ``update_state``;
- the static cache's decode step: eager, replayed from its CUDA graph one step at a time (one full window of
  512 steps, so one fold is amortised), and 16 steps in one graph (GPU time, no launch overhead), at contexts
  1k .. 128k. The decode step reads the state and the window whatever the context: the state of a context of T
  tokens stands in as random values of that size (a real 2M-token prefill is not needed to time it);
- SDPA (``scaled_dot_product_attention``, ``enable_gqa`` for hq > h) of one query per head over a KV cache of
  T tokens, in the same process;
- memory per sequence per layer: the static cache against the KV cache it replaces.
Each kernel configuration's output and the fold are checked against float64 (PASS: error at most 3x plain
PyTorch's (fp32, rounded to bf16) plus 1e-3); the script exits non-zero when any check fails.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import itertools
import json
import os
import sys
import time

if "--dry-run" in sys.argv[1:]:  # before triton is imported: its kernels run in the interpreter, on the CPU
    os.environ["TRITON_INTERPRET"] = "1"

import torch
import torch.nn.functional as F
import triton
from triton.testing import do_bench

import retention.inference as inference
from retention import PowerRetentionCache
from retention._validate import Problem
from retention.backends import Backend, available_backends
from retention.inference import DecodeGraph, _attend_window
from retention.reference import update_state
from retention.sympow import sympow_dim
from retention.testing import plain_error, relative_error
from retention_kernels.triton import decode

DEVICE = "cpu" if "--dry-run" in sys.argv[1:] else "cuda"


def log(*args):
    print(*args, flush=True)


def use_triton_decode() -> str:
    """Make the cache use the Triton decode op: through the registered "triton" backend when it has one, else
    attached here (the registration is a one-line change in retention_kernels)."""
    registered = available_backends().get("triton")
    if registered is not None and registered.attend_window is not None:
        return "registered triton backend"
    op = Backend("triton-decode", 100, lambda problem: None if problem.device.type == "cuda" else "cuda only",
                 forward=None, attend_window=decode.attend_window)
    select = inference.select_backend

    def select_for_inference(problem, name="auto", need="forward"):
        return op if need == "attend_window" else select(problem, name, need)

    inference.select_backend = select_for_inference
    return "attached by the benchmark (backend registration pending)"


def time_loop(step, count: int) -> float:
    """Microseconds per call of ``step`` over ``count`` calls (CUDA events; after a warm-up call). Dry run: the
    wall clock."""
    step()
    if DEVICE != "cuda":
        start = time.perf_counter()
        for _ in range(count):
            step()
        return (time.perf_counter() - start) * 1e6 / count
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(count):
        step()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) * 1e3 / count


def bench(function) -> float:
    """Median microseconds of ``function`` (``triton.testing.do_bench``; dry run: a few timed calls)."""
    if DEVICE != "cuda":
        return time_loop(function, 2)
    return do_bench(function, warmup=10, rep=100, return_mode="median") * 1e3


def graph_time(function, calls: int = 10) -> float:
    """GPU microseconds per call of ``function``: ``calls`` calls captured in one CUDA graph, replays timed (no
    Python launch overhead, which for one small launch can exceed the kernel's own time). Dry run: uncaptured."""
    if DEVICE != "cuda":
        return time_loop(function, 2)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        function()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            function()
    return time_loop(graph.replay, 20) / calls


def copy_bandwidth() -> float:
    """Bytes per second of a 1 GiB device copy (dry run: 16 MiB), counting bytes read plus bytes written."""
    n = 1 << (30 if DEVICE == "cuda" else 24)
    source = torch.randint(0, 255, (n,), dtype=torch.uint8, device=DEVICE)
    target = torch.empty_like(source)
    return 2 * n / (bench(functools.partial(target.copy_, source)) * 1e-6)


class Draw:
    """Random bf16 tensors and gates on the device, from one generator."""

    def __init__(self, generator, dtype):
        self.generator, self.dtype = generator, dtype

    def __call__(self, *shape) -> torch.Tensor:
        return torch.randn(*shape, generator=self.generator, device=DEVICE).to(self.dtype)

    def gates(self, *shape) -> torch.Tensor:
        return F.logsigmoid(torch.randn(*shape, generator=self.generator, device=DEVICE) + 4.0)


def random_cache(b, hq, h, d, e, W, context, draw) -> PowerRetentionCache:
    """A static cache standing for ``context`` tokens: a real prefill of the window part (``context mod W``,
    at least 8 tokens) and a random state of the right size and magnitude for the rest."""
    cache = PowerRetentionCache(deg=2, switch_over_seq_len=W, static=True)
    n = max(context % W, 8)
    cache.step(draw(b, n, hq, d), draw(b, n, h, d), draw(b, n, h, e), draw.gates(b, n, h))
    D = sympow_dim(d, 2)
    scale = 1.0 / (1.0 - 0.98)  # a gated state's sum of keys saturates near 1 / (1 - gate)
    cache.state.copy_(torch.randn(b, h, D, e, generator=draw.generator, device=DEVICE).to(draw.dtype) * scale)
    cache.sum_of_keys.copy_(torch.rand(b, h, D, generator=draw.generator, device=DEVICE) * scale)
    cache.position = context
    return cache


def measure_context(b, hq, h, d, e, W, context, draw, floor_us, profile=False) -> dict:
    """One row of the table: the static cache's step (eager, graph per token, 16 steps in one graph) and SDPA
    over a KV cache of ``context`` tokens."""
    cache = random_cache(b, hq, h, d, e, W, context, draw)
    tokens = [(draw(b, 1, hq, d), draw(b, 1, h, d), draw(b, 1, h, e), draw.gates(b, 1, h)) for _ in range(8)]
    counter = iter(range(1 << 30))
    eager_us = time_loop(lambda: cache.step(*tokens[next(counter) % 8]), 64 if DEVICE == "cuda" else 2)
    if DEVICE == "cuda":
        replay = DecodeGraph(cache, *tokens[0]).replay
    else:  # dry run: the same step, not captured
        def replay():
            return cache.step(*tokens[0])
    graph_us = time_loop(replay, W)  # one full window of replays: one fold

    def sixteen_steps():  # 16 plain steps from an empty window (no fold); in one graph: GPU time, no launches
        cache.window_length.fill_(0)
        cache._length = 0
        for i in range(16):
            cache._decode_one(*tokens[i % 8])

    gpu_us = graph_time(sixteen_steps, calls=1) / 16
    cache._length = int(cache.window_length)
    if profile and DEVICE == "cuda":  # where a step's GPU time goes, kernel by kernel (eager steps)
        cache.window_length.fill_(0)
        cache._length = 0
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as profiler:
            for i in range(10):
                cache._decode_one(*tokens[i % 8])
            torch.cuda.synchronize()
        log(profiler.key_averages().table(sort_by="cuda_time_total", row_limit=12, max_name_column_width=60))
    k_cache, v_cache = draw(b, h, context, d), draw(b, h, context, e)
    q = draw(b, hq, 1, d)
    attend = functools.partial(F.scaled_dot_product_attention, q, k_cache, v_cache, enable_gqa=hq != h)
    sdpa_us = bench(attend)
    return {"context": context, "eager_us": eager_us, "graph_us": graph_us, "graph16_us": gpu_us,
            "sdpa_us": sdpa_us, "sdpa_over_graph": sdpa_us / graph_us, "graph_over_floor": graph_us / floor_us,
            "kv_cache_bytes_per_seq": context * h * (d + e) * 2}


def sweep_configs(ratio: int, dry_run: bool) -> list[dict]:
    """Kernel launch choices to time: for hq = h the sweep behind the committed defaults; for GQA, the rows per
    program (1 = a program per query head, each reading the state: the kernel before grouping) with state tiles
    of as many fp32 accumulators as the hq = h tiles of 128 and 256 rows."""
    if dry_run:
        return [{"num_warps": 4, "block_r": None, "block_d": 16, "splits": 2, "stages": 1}]
    configs = []
    rows_choices = (1,) if ratio == 1 else (1, 2, 4)
    for block_r, tile, splits, num_warps in itertools.product(rows_choices, (128, 256), (2, 4), (4, 8)):
        for stages in (1, 3) if ratio == 1 else (3,):
            configs.append({"num_warps": num_warps, "block_r": block_r, "block_d": max(16, tile // block_r),
                            "splits": splits, "stages": stages})
    return configs


def kernel_case(b, hq, h, d, e, W, deg, draw, dry_run) -> dict:
    """The fused ``attend_window`` kernel alone: one query per row at the end of a full window, with a state;
    the sweep, each configuration checked against float64."""
    D = sympow_dim(d, deg)
    Q, K, V = draw(b, 1, hq, d), draw(b, W, h, d), draw(b, W, h, e)
    log_G = draw.gates(b, W, h)
    G = log_G.cumsum(1)
    state = draw(b, h, D, e) * 10
    keys = torch.rand(b, h, D, generator=draw.generator, device=DEVICE) * 10
    problem = Problem(Q, K, V, log_G, state, keys, deg, d**-0.5, None, False)
    expected = _attend_window(Q.double(), K.double(), V.double(), G.double(), state.double(), keys.double(), deg,
                              d**-0.5, torch.float64)
    plain = _attend_window(Q, K, V, G, state, keys, deg, d**-0.5, torch.float32)
    baseline = plain_error(expected, plain, torch.bfloat16)  # plain PyTorch in fp32, the output rounded to bf16
    tolerance = 3 * baseline + 1e-3
    rows = []
    for tuning in sweep_configs(hq // h, dry_run):
        run = functools.partial(decode.attend_window, problem, G, **tuning)
        error = relative_error(run(), expected)
        us = graph_time(run)
        rows.append({**tuning, "us": us, "rel_error": error, "pass": error <= tolerance})
        log(f"  hq={hq} attend_window {tuning}: {us:6.1f} us (GPU, graph-timed), error {error:.2e} "
            f"{'PASS' if error <= tolerance else 'FAIL'}")
    default = functools.partial(decode.attend_window, problem, G)
    default_error = relative_error(default(), expected)
    default_us = graph_time(default)
    launch_us = bench(default)
    torch_us = graph_time(lambda: _attend_window(Q, K, V, G, state, keys, deg, d**-0.5, torch.float32), calls=2)
    best = min(rows, key=lambda row: row["us"])
    per_head = [row["us"] for row in rows if row["block_r"] == 1]
    log(f"  hq={hq} attend_window default {dict(decode.TUNING)}: GPU {default_us:.1f} us, with Python launch "
        f"{launch_us:.1f} us, error {default_error:.2e} {'PASS' if default_error <= tolerance else 'FAIL'}; "
        f"best of sweep {best['us']:.1f} us; PyTorch path {torch_us:.1f} us")
    return {"sweep": rows, "best": best, "default_tuning": dict(decode.TUNING), "default_us": default_us,
            "default_with_launch_us": launch_us, "default_rel_error": default_error,
            "default_pass": default_error <= tolerance, "best_per_head_us": min(per_head) if per_head else None,
            "pytorch_us": torch_us, "pytorch_rel_error": baseline, "tolerance": tolerance}


def fold_case(b, h, d, e, W, deg, draw) -> dict:
    """The fold of a full window (independent of hq): Triton ``fold_window`` against PyTorch and float64."""
    D = sympow_dim(d, deg)
    K, V = draw(b, W, h, d), draw(b, W, h, e)
    G = draw.gates(b, W, h).cumsum(1)
    state, keys = draw(b, h, D, e) * 10, torch.rand(b, h, D, generator=draw.generator, device=DEVICE) * 10
    new_state, _ = decode.fold_window(K, V, G, deg, state, keys)
    oracle_state, _ = update_state(K.double(), V.double(), G.double(), deg, state.double(), keys.double(),
                                   torch.float64)
    fold_us = graph_time(lambda: decode.fold_window(K, V, G, deg, state, keys), calls=2)
    torch_fold_us = graph_time(lambda: update_state(K, V, G, deg, state, keys, torch.float32), calls=1)
    fold_error = relative_error(new_state, oracle_state)
    # Plain PyTorch folds in fp32 and stores the state in bf16: the rounding sets the baseline.
    baseline = plain_error(oracle_state, update_state(K, V, G, deg, state, keys, torch.float32)[0], torch.bfloat16)
    tolerance = 3 * baseline + 1e-3
    log(f"fold of {W} steps: Triton {fold_us:.1f} us (error {fold_error:.2e}, tolerance {tolerance:.1e} "
        f"{'PASS' if fold_error <= tolerance else 'FAIL'}), PyTorch {torch_fold_us:.1f} us")
    return {"triton_us": fold_us, "pytorch_us": torch_fold_us, "rel_error": fold_error, "tolerance": tolerance,
            "pass": fold_error <= tolerance}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--window", type=int, default=512)
    parser.add_argument("--contexts", default="1024,4096,16384,65536,131072")
    parser.add_argument("--ratios", default="1,4", help="query heads per key/value head: hq = ratio * h")
    parser.add_argument("--out", default=None, help="folder for gpu_decode.json and gpu_decode.md")
    parser.add_argument("--dry-run", action="store_true",
                        help="tiny shapes on the CPU under TRITON_INTERPRET=1 (checks the script, times nothing)")
    args = parser.parse_args()
    if args.dry_run:
        args.batch, args.heads, args.dim, args.window, args.contexts = 2, 2, 8, 16, "24,40"
    elif not torch.cuda.is_available():
        sys.exit("gpu_decode.py needs a CUDA device (or --dry-run)")
    b, h, d, W = args.batch, args.heads, args.dim, args.window
    e, deg, dtype = d, 2, torch.bfloat16
    D = sympow_dim(d, deg)
    contexts = [int(x) for x in args.contexts.split(",")]
    ratios = [int(x) for x in args.ratios.split(",")]
    draw = Draw(torch.Generator(device=DEVICE).manual_seed(0), dtype)
    torch.manual_seed(0)
    how = use_triton_decode()
    device_name = torch.cuda.get_device_name() if DEVICE == "cuda" else "CPU dry run (TRITON_INTERPRET=1)"
    results = {"device": device_name, "torch": torch.__version__, "triton": triton.__version__,
               "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
               "shape": {"batch": b, "heads": h, "d": d, "e": e, "deg": deg, "D": D, "window": W, "dtype": "bf16"},
               "decode_op": how}
    log(f"{device_name}, torch {torch.__version__}, triton {triton.__version__}; decode op: {how}")

    # The floor: reading the state once (once per key/value head whatever hq).
    bandwidth = copy_bandwidth()
    state_bytes = b * h * D * e * 2
    window_bytes = b * W * h * (d + e) * 2
    floor_us = state_bytes / bandwidth * 1e6
    results.update(copy_bandwidth_TBps=bandwidth / 1e12, state_bytes=state_bytes, window_bytes=window_bytes,
                   state_read_floor_us=floor_us)
    log(f"copy bandwidth {bandwidth / 1e12:.2f} TB/s; state {state_bytes / 1e6:.1f} MB -> floor {floor_us:.1f} us; "
        f"full window {window_bytes / 1e6:.1f} MB")

    results["fold"] = fold_case(b, h, d, e, W, deg, draw)
    fold_us, torch_fold_us = results["fold"]["triton_us"], results["fold"]["pytorch_us"]

    committed = dict(decode.TUNING)
    static_bytes = PowerRetentionCache.static_bytes(1, h, d, e, deg, W, dtype=dtype)
    state_only = PowerRetentionCache.state_bytes(1, h, d, e, deg, dtype=dtype)
    results["memory_per_sequence_per_layer"] = {"static_cache_bytes": static_bytes, "state_bytes": state_only}
    results["cases"] = []
    lines = [
        f"# GPU decode: {device_name}",
        "",
        f"bf16, batch {b}, h = {h} key/value heads, d = e = {d}, deg {deg} (D = {D}), gating, switch_over_seq_len "
        f"{W}; hq = {', '.join(f'{r * h}' for r in ratios)} query heads; decode op: {how}. Copy bandwidth "
        f"{bandwidth / 1e12:.2f} TB/s (read + write); reading the state ({state_bytes / 1e6:.1f} MB, the same "
        f"whatever hq) once: {floor_us:.1f} us. Fold of a full window: Triton {fold_us:.1f} us, PyTorch "
        f"{torch_fold_us:.1f} us.",
        "",
        f"Per token: **replay** = `DecodeGraph.replay()` one step at a time over {W} steps (one fold included, "
        f"Python launch per step); **in-graph** = GPU time of a step when 16 are captured in one graph, plus "
        f"the Triton fold / {W} (what a fully captured model pays).",
    ]
    for ratio in ratios:
        hq = ratio * h
        log(f"hq = {hq} (r = {ratio})")
        decode.TUNING.clear()
        decode.TUNING.update(committed)
        kernel = kernel_case(b, hq, h, d, e, W, deg, draw, args.dry_run)
        best = kernel["best"]
        decode.TUNING.update({name: best[name] for name in ("num_warps", "block_r", "block_d", "splits", "stages")})
        log(f"  best: {decode.TUNING}; used for the cache below")
        rows = []
        for context in contexts:
            row = measure_context(b, hq, h, d, e, W, context, draw, floor_us, profile=context == contexts[0])
            if DEVICE == "cuda":
                torch.cuda.empty_cache()
            row["amortised_us"] = row["graph16_us"] + fold_us / W  # a captured model: in-graph step + its fold share
            row["sdpa_over_amortised"] = row["sdpa_us"] / row["amortised_us"]
            row["amortised_over_floor"] = row["amortised_us"] / floor_us
            rows.append(row)
            log(f"  context {context:6d}: eager {row['eager_us']:6.1f} us, graph {row['graph_us']:6.1f} us/token "
                f"(16-step graph {row['graph16_us']:5.1f}), SDPA {row['sdpa_us']:7.1f} us -> "
                f"{row['sdpa_over_graph']:5.1f}x, floor x{row['graph_over_floor']:.2f}")
        flat = rows[-1]["graph_us"] / rows[0]["graph_us"]
        at_64k = next((row for row in rows if row["context"] == 65536), rows[-1])
        summary = {
            "flat_ratio_last_over_first": flat,
            "sdpa_speedup_at_64k_replay": at_64k["sdpa_over_graph"],
            "sdpa_speedup_at_64k_in_graph_amortised": at_64k["sdpa_over_amortised"],
            "over_state_read_floor_at_64k_replay": at_64k["graph_over_floor"],
            "over_state_read_floor_at_64k_in_graph_amortised": at_64k["amortised_over_floor"],
        }
        results["cases"].append({"hq": hq, "ratio": ratio, "attend_window": kernel, "tuning": dict(decode.TUNING),
                                 "decode": rows, "summary": summary})
        lines += [
            "",
            f"## hq = {hq} (r = {ratio} query heads per key/value head)",
            "",
            f"| context | eager (us) | replay (us) | in-graph + fold/{W} (us) | SDPA over KV cache (us) "
            "| SDPA / replay | SDPA / in-graph | replay / floor | in-graph / floor | KV cache per seq per layer "
            "| static cache per seq per layer |",
            "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for row in rows:
            lines.append(
                f"| {row['context']} | {row['eager_us']:.1f} | {row['graph_us']:.1f} | {row['amortised_us']:.1f} | "
                f"{row['sdpa_us']:.1f} | {row['sdpa_over_graph']:.1f}x | {row['sdpa_over_amortised']:.1f}x | "
                f"{row['graph_over_floor']:.2f}x | {row['amortised_over_floor']:.2f}x | "
                f"{row['kv_cache_bytes_per_seq'] / 2**20:.2f} MiB | {static_bytes / 2**20:.2f} MiB |"
            )
        per_head = kernel["best_per_head_us"]
        grouped = "" if ratio == 1 or per_head is None else (
            f" One program per query head (block_r = 1, each re-reading the state): best {per_head:.1f} us; "
            f"grouped: {best['us']:.1f} us ({per_head / best['us']:.2f}x).")
        lines += [
            "",
            f"Flat in context (replay): {rows[-1]['context']} / {rows[0]['context']} tokens = {flat:.3f}. "
            f"attend_window kernel alone (full window + state): committed tuning {kernel['default_tuning']} "
            f"{kernel['default_us']:.1f} us; best of the sweep {best['us']:.1f} us with "
            f"{ {name: best[name] for name in ('num_warps', 'block_r', 'block_d', 'splits', 'stages')} } "
            f"(used for the cache rows); PyTorch path {kernel['pytorch_us']:.1f} us.{grouped}",
        ]
    decode.TUNING.clear()
    decode.TUNING.update(committed)
    lines += [
        "",
        f"Static cache per sequence per layer: state {state_only / 2**20:.2f} MiB (D x e bf16 + D fp32) + window "
        f"buffers {(static_bytes - state_only) / 2**20:.2f} MiB = {static_bytes / 2**20:.2f} MiB.",
    ]
    checks = [results["fold"]["pass"]] + [case["attend_window"]["default_pass"] for case in results["cases"]]
    checks += [row["pass"] for case in results["cases"] for row in case["attend_window"]["sweep"]]
    results["checks"] = {"passed": sum(checks), "failed": len(checks) - sum(checks)}
    verdict = "PASS" if all(checks) else "FAIL"
    lines += ["", f"Checks against float64 (every kernel configuration, the fold): {sum(checks)} / {len(checks)} "
              f"pass: {verdict}."]
    table = "\n".join(lines)
    log("\n" + table)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "gpu_decode.json"), "w") as file:
            json.dump(results, file, indent=2)
        with open(os.path.join(args.out, "gpu_decode.md"), "w") as file:
            file.write(table + "\n")
    if verdict != "PASS":
        sys.exit(f"gpu_decode.py: {len(checks) - sum(checks)} checks FAILED")


if __name__ == "__main__":
    main()
