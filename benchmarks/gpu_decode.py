"""Decode on a GPU (issue 4): per-token latency of the static cache's captured step against context length,
SDPA over a KV cache, and the time to read the state once. One script, one device call:

    PYTHONPATH=packages/retention-core/src:packages/retention-kernels/src python benchmarks/gpu_decode.py \
        [--out DIR]

Standard problem: bf16, batch 16, h = hq = 8, d = e = 64, deg 2 (D = 2080), gating, switch_over_seq_len 512.

What is measured (CUDA events; medians of ``triton.testing.do_bench`` or a timed loop of graph replays):
- copy bandwidth (bytes read + written of a 1 GiB device copy) and the floor: state bytes / bandwidth;
- the fused ``attend_window`` kernel alone at a full window, for a few tile/split choices;
- the fold: Triton ``fold_window`` against the PyTorch ``update_state``;
- the static cache's decode step: eager, replayed from its CUDA graph one step at a time (one full window of
  512 steps, so one fold is amortised), and 16 steps in one graph (GPU time, no launch overhead), at contexts
  1k .. 128k. The decode step reads the state and the window whatever the context: the state of a context of T
  tokens stands in as random values of that size (a real 2M-token prefill is not needed to time it);
- SDPA (``scaled_dot_product_attention``) of one query over a KV cache of T tokens, in the same process;
- memory per sequence per layer: the static cache against the KV cache it replaces.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import itertools
import json
import os
import sys

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
from retention.testing import relative_error
from retention_kernels.triton import decode


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
    """Microseconds per call of ``step`` over ``count`` calls (CUDA events; after a warm-up call)."""
    step()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(count):
        step()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) * 1e3 / count


def graph_time(function, calls: int = 10) -> float:
    """GPU microseconds per call of ``function``: ``calls`` calls captured in one CUDA graph, replays timed (no
    Python launch overhead, which for one small launch can exceed the kernel's own time)."""
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
    """Bytes per second of a 1 GiB device copy, counting bytes read plus bytes written."""
    n = 1 << 30
    source = torch.randint(0, 255, (n,), dtype=torch.uint8, device="cuda")
    target = torch.empty_like(source)
    ms = do_bench(functools.partial(target.copy_, source), warmup=50, rep=300, return_mode="median")
    return 2 * n / (ms * 1e-3)


def random_cache(b, h, d, e, W, context, dtype, generator) -> PowerRetentionCache:
    """A static cache standing for ``context`` tokens: a real prefill of the window part (``context mod W``,
    at least 8 tokens) and a random state of the right size and magnitude for the rest."""
    cache = PowerRetentionCache(deg=2, switch_over_seq_len=W, static=True)
    n = max(context % W, 8)

    def draw(*shape):
        return torch.randn(*shape, generator=generator, device="cuda").to(dtype)

    log_G = F.logsigmoid(torch.randn(b, n, h, generator=generator, device="cuda") + 4.0)
    cache.step(draw(b, n, h, d), draw(b, n, h, d), draw(b, n, h, e), log_G)
    D = sympow_dim(d, 2)
    scale = 1.0 / (1.0 - 0.98)  # a gated state's sum of keys saturates near 1 / (1 - gate)
    cache.state.copy_(torch.randn(b, h, D, e, generator=generator, device="cuda").to(dtype) * scale)
    cache.sum_of_keys.copy_(torch.rand(b, h, D, generator=generator, device="cuda") * scale)
    cache.position = context
    return cache


def measure_context(b, h, d, e, W, context, dtype, generator, floor_us, profile=False) -> dict:
    """One row of the table: the static cache's step (eager, graph per token, 16 steps in one graph) and SDPA
    over a KV cache of ``context`` tokens."""

    def draw(*shape):
        return torch.randn(*shape, generator=generator, device="cuda").to(dtype)

    cache = random_cache(b, h, d, e, W, context, dtype, generator)
    tokens = [(draw(b, 1, h, d), draw(b, 1, h, d), draw(b, 1, h, e),
               F.logsigmoid(torch.randn(b, 1, h, generator=generator, device="cuda") + 4.0)) for _ in range(8)]
    counter = iter(range(1 << 30))
    eager_us = time_loop(lambda: cache.step(*tokens[next(counter) % 8]), 64)
    graph = DecodeGraph(cache, *tokens[0])
    graph_us = time_loop(graph.replay, W)  # one full window of replays: one fold
    # 16 plain steps in one graph: GPU time without per-replay launch overhead.
    many = torch.cuda.CUDAGraph()
    cache.window_length.fill_(0)
    cache._length = 0
    with torch.cuda.graph(many):
        for i in range(16):
            cache._decode_one(*tokens[i % 8])

    def replay_many():
        cache.window_length.fill_(0)  # every replay starts from an empty window: no fold inside
        many.replay()

    gpu_us = time_loop(replay_many, 20) / 16
    if profile:  # where a step's GPU time goes, kernel by kernel (eager steps)
        cache.window_length.fill_(0)
        cache._length = 0
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as profiler:
            for i in range(10):
                cache._decode_one(*tokens[i % 8])
            torch.cuda.synchronize()
        log(profiler.key_averages().table(sort_by="cuda_time_total", row_limit=12, max_name_column_width=60))
    k_cache, v_cache = draw(b, h, context, d), draw(b, h, context, e)
    q = draw(b, h, 1, d)
    attend = functools.partial(F.scaled_dot_product_attention, q, k_cache, v_cache)
    sdpa_us = do_bench(attend, warmup=10, rep=100, return_mode="median") * 1e3
    return {"context": context, "eager_us": eager_us, "graph_us": graph_us, "graph16_us": gpu_us,
            "sdpa_us": sdpa_us, "sdpa_over_graph": sdpa_us / graph_us, "graph_over_floor": graph_us / floor_us,
            "kv_cache_bytes_per_seq": context * h * (d + e) * 2}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--window", type=int, default=512)
    parser.add_argument("--contexts", default="1024,4096,16384,65536,131072")
    parser.add_argument("--out", default=None, help="folder for gpu_decode.json and gpu_decode.md")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("gpu_decode.py needs a CUDA device")
    b, h, d, W = args.batch, args.heads, args.dim, args.window
    e, deg, dtype = d, 2, torch.bfloat16
    D = sympow_dim(d, deg)
    contexts = [int(x) for x in args.contexts.split(",")]
    generator = torch.Generator(device="cuda").manual_seed(0)
    torch.manual_seed(0)
    how = use_triton_decode()
    device_name = torch.cuda.get_device_name()
    results = {"device": device_name, "torch": torch.__version__, "triton": triton.__version__,
               "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
               "shape": {"batch": b, "heads": h, "d": d, "e": e, "deg": deg, "D": D, "window": W, "dtype": "bf16"},
               "decode_op": how}
    log(f"{device_name}, torch {torch.__version__}, triton {triton.__version__}; decode op: {how}")

    # The floor: reading the state once.
    bandwidth = copy_bandwidth()
    state_bytes = b * h * D * e * 2
    window_bytes = b * W * h * (d + e) * 2
    floor_us = state_bytes / bandwidth * 1e6
    results.update(copy_bandwidth_TBps=bandwidth / 1e12, state_bytes=state_bytes, window_bytes=window_bytes,
                   state_read_floor_us=floor_us)
    log(f"copy bandwidth {bandwidth / 1e12:.2f} TB/s; state {state_bytes / 1e6:.1f} MB -> floor {floor_us:.1f} us; "
        f"full window {window_bytes / 1e6:.1f} MB")

    # The fused kernel alone: one query per row at the end of a full window, with a state.
    def draw(*shape):
        return torch.randn(*shape, generator=generator, device="cuda").to(dtype)

    Q, K, V = draw(b, 1, h, d), draw(b, W, h, d), draw(b, W, h, e)
    log_G = F.logsigmoid(torch.randn(b, W, h, generator=generator, device="cuda") + 4.0)
    G = log_G.cumsum(1)
    state = draw(b, h, D, e) * 10
    keys = torch.rand(b, h, D, generator=generator, device="cuda") * 10
    problem = Problem(Q, K, V, log_G, state, keys, deg, d**-0.5, None, False)
    expected = _attend_window(Q.double(), K.double(), V.double(), G.double(), state.double(), keys.double(), deg,
                              d**-0.5, torch.float64)
    plain = _attend_window(Q, K, V, G, state, keys, deg, d**-0.5, torch.float32)
    kernel_rows = []
    for num_warps, block_d, splits, stages in itertools.product((4, 8), (128, 256), (2, 4, 8), (1, 3)):
        tuning = {"num_warps": num_warps, "block_d": block_d, "splits": splits, "stages": stages}
        run = functools.partial(decode.attend_window, problem, G, **tuning)
        error = relative_error(run(), expected)
        us = graph_time(run)
        kernel_rows.append({**tuning, "us": us, "rel_error": error})
        log(f"attend_window {tuning}: {us:6.1f} us (GPU, graph-timed), error {error:.2e}")
    best = min(kernel_rows, key=lambda row: row["us"])
    decode.TUNING.update({name: best[name] for name in decode.TUNING})
    log(f"best: {decode.TUNING}; used for the cache below")
    default_us = graph_time(functools.partial(decode.attend_window, problem, G))
    launch_us = do_bench(functools.partial(decode.attend_window, problem, G), warmup=20, rep=200,
                         return_mode="median") * 1e3
    torch_us = graph_time(lambda: _attend_window(Q, K, V, G, state, keys, deg, d**-0.5, torch.float32), calls=2)
    log(f"attend_window default: GPU {default_us:.1f} us, with Python launch (do_bench) {launch_us:.1f} us")
    results["attend_window"] = {"sweep": kernel_rows, "tuning": dict(decode.TUNING), "best_us": default_us,
                                "pytorch_us": torch_us,
                                "default_with_launch_us": launch_us,
                                "pytorch_rel_error": relative_error(plain, expected)}
    log(f"attend_window default {default_us:.1f} us (PyTorch path {torch_us:.1f} us)")

    # The fold of a full window.
    new_state, new_keys = decode.fold_window(K, V, G, deg, state, keys)
    oracle_state, _ = update_state(K.double(), V.double(), G.double(), deg, state.double(), keys.double(),
                                   torch.float64)
    fold_us = graph_time(lambda: decode.fold_window(K, V, G, deg, state, keys), calls=2)
    torch_fold_us = graph_time(lambda: update_state(K, V, G, deg, state, keys, torch.float32), calls=1)
    results["fold"] = {"triton_us": fold_us, "pytorch_us": torch_fold_us,
                       "rel_error": relative_error(new_state, oracle_state)}
    log(f"fold of {W} steps: Triton {fold_us:.1f} us (error {results['fold']['rel_error']:.2e}), "
        f"PyTorch {torch_fold_us:.1f} us")
    del new_state, new_keys, oracle_state

    # The cache's decode step at each context, and SDPA over a KV cache of that length.
    rows = []
    for context in contexts:
        row = measure_context(b, h, d, e, W, context, dtype, generator, floor_us, profile=context == contexts[0])
        torch.cuda.empty_cache()
        rows.append(row)
        log(f"context {context:6d}: eager {row['eager_us']:6.1f} us, graph {row['graph_us']:6.1f} us/token "
            f"(16-step graph {row['graph16_us']:5.1f}), SDPA {row['sdpa_us']:7.1f} us -> "
            f"{row['sdpa_over_graph']:5.1f}x, floor x{row['graph_over_floor']:.2f}")
    for row in rows:  # GPU time per token inside a captured model: the in-graph step plus its share of a fold
        row["amortised_us"] = row["graph16_us"] + fold_us / W
        row["sdpa_over_amortised"] = row["sdpa_us"] / row["amortised_us"]
        row["amortised_over_floor"] = row["amortised_us"] / floor_us
    results["decode"] = rows
    static_bytes = PowerRetentionCache.static_bytes(1, h, d, e, deg, W, dtype=dtype)
    state_only = PowerRetentionCache.state_bytes(1, h, d, e, deg, dtype=dtype)
    results["memory_per_sequence_per_layer"] = {"static_cache_bytes": static_bytes, "state_bytes": state_only}

    flat = rows[-1]["graph_us"] / rows[0]["graph_us"]
    at_64k = next((row for row in rows if row["context"] == 65536), rows[-1])
    results["summary"] = {
        "flat_ratio_last_over_first": flat,
        "sdpa_speedup_at_64k_replay": at_64k["sdpa_over_graph"],
        "sdpa_speedup_at_64k_in_graph_amortised": at_64k["sdpa_over_amortised"],
        "over_state_read_floor_at_64k_replay": at_64k["graph_over_floor"],
        "over_state_read_floor_at_64k_in_graph_amortised": at_64k["amortised_over_floor"],
    }
    lines = [
        f"# GPU decode: {device_name}",
        "",
        f"bf16, batch {b}, h = hq = {h}, d = e = {d}, deg {deg} (D = {D}), gating, switch_over_seq_len {W}; "
        f"decode op: {how}. Copy bandwidth {bandwidth / 1e12:.2f} TB/s (read + write); reading the state "
        f"({state_bytes / 1e6:.1f} MB) once: {floor_us:.1f} us.",
        "",
        "Per token: **replay** = `DecodeGraph.replay()` one step at a time over 512 steps (one fold included, "
        "Python launch per step); **in-graph** = GPU time of a step when 16 are captured in one graph, plus "
        "the Triton fold / 512 (what a fully captured model pays).",
        "",
        "| context | eager (us) | replay (us) | in-graph + fold/512 (us) | SDPA over KV cache (us) "
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
    lines += [
        "",
        f"Flat in context (replay): {rows[-1]['context']} / {rows[0]['context']} tokens = {flat:.3f}. "
        f"attend_window kernel alone (full window + state, tuning {dict(decode.TUNING)}): {default_us:.1f} us "
        f"(PyTorch path "
        f"{torch_us:.1f} us). Fold of a full window: Triton {fold_us:.1f} us, PyTorch {torch_fold_us:.1f} us.",
        f"Static cache per sequence per layer: state {state_only / 2**20:.2f} MiB (D x e bf16 + D fp32) + window "
        f"buffers {(static_bytes - state_only) / 2**20:.2f} MiB = {static_bytes / 2**20:.2f} MiB.",
    ]
    table = "\n".join(lines)
    log("\n" + table)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "gpu_decode.json"), "w") as file:
            json.dump(results, file, indent=2)
        with open(os.path.join(args.out, "gpu_decode.md"), "w") as file:
            file.write(table + "\n")


if __name__ == "__main__":
    main()
