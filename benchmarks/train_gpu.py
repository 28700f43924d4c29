"""retention-train on GPUs (issue 8): throughput at long context, loss curves, DDP and context parallel.

    PY="PYTHONPATH=packages/retention-core/src:packages/retention-kernels/src:packages/retention-train/src"
    env $PY python benchmarks/train_gpu.py throughput [--context=16384]   # 1 GPU, ~3 min
    env $PY python benchmarks/train_gpu.py curves [--steps=600]           # 1 GPU, ~6 min
    env $PY python benchmarks/train_gpu.py parallel                       # 2 GPUs (torchrun inside), ~3 min

- ``throughput``: a 12-layer, 768-wide GPT (12 heads of 64) at context 16k, bf16, batch 1: training tokens/s
  (forward, backward and AdamW step; CUDA-synchronised wall time after warm-up) with ``sdpa`` and with
  ``power`` (degree 2, gating, chunk 1024), same process. Writes ``results/train_throughput.{json,md}``.
- ``curves``: the same short run (embedded corpus, or ``--dataset=owt`` when prepared) with ``sdpa``, power
  degree 1 and power degree 2, equal steps and batches; ``results/train_curves.{json,png}``.
- ``parallel``: 1 GPU against 2 GPUs with DDP (half the batch each) and with context parallelism (half of
  every sequence each); the per-step losses must agree (rel 1e-2 in bf16) and the tokens/s are reported;
  ``results/train_parallel.json``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

from retention_train.model import GPT, GPTConfig
from retention_train.train import TrainConfig, train

# On the device machine only $OUT comes back: results go there when it is set.
RESULTS = Path(os.environ["OUT"]) if os.environ.get("OUT") else Path(__file__).parent / "results"


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def _train_step(model, optimizer, x, y) -> torch.Tensor:
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = model(x, y)[1]
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss


def throughput(args) -> dict:
    device = torch.device("cuda")
    rows = []
    for kernel in ("sdpa", "power"):
        config = GPTConfig(vocab_size=50304, block_size=args.context, n_layer=12, n_head=12, n_embd=768,
                           attention_kernel=kernel, degree=2, chunk_size=args.chunk_size,
                           checkpoint_activations=args.checkpoint_activations)
        torch.manual_seed(0)
        model = GPT(config).to(device)
        optimizer = model.configure_optimizer(0.1, 3e-4, (0.9, 0.95))
        idx = torch.randint(0, config.vocab_size, (args.batch, args.context + 1), device=device)
        x, y = idx[:, :-1], idx[:, 1:]

        for _ in range(args.warmup):
            _train_step(model, optimizer, x, y)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        for _ in range(args.steps):
            loss = _train_step(model, optimizer, x, y)
        torch.cuda.synchronize()
        seconds = (time.perf_counter() - start) / args.steps
        rows.append({"attention_kernel": kernel, "seconds_per_step": seconds,
                     "tokens_per_s": args.batch * args.context / seconds, "loss": loss.item(),
                     "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30})
        print(json.dumps(rows[-1]), flush=True)
        del model, optimizer
        torch.cuda.empty_cache()
    result = {"date": _now(), "device": torch.cuda.get_device_name(), "context": args.context, "batch": args.batch,
              "model": "12 layers, 768 wide, 12 heads of 64, bf16 autocast, AdamW", "chunk_size": args.chunk_size,
              "checkpoint_activations": args.checkpoint_activations, "rows": rows,
              "power_over_sdpa": rows[1]["tokens_per_s"] / rows[0]["tokens_per_s"]}
    lines = [f"# Training throughput at context {args.context} ({result['device']}, {result['date']})", "",
             f"{result['model']}; batch {args.batch}; power: degree 2, gating, chunk {args.chunk_size}.", "",
             "| attention | ms / step | tokens / s | peak memory (GiB) |", "|---|---|---|---|"]
    lines += [f"| {r['attention_kernel']} | {r['seconds_per_step'] * 1e3:.1f} | {r['tokens_per_s']:,.0f} | "
              f"{r['peak_memory_gib']:.1f} |" for r in rows]
    lines += ["", f"power / sdpa tokens per second: {result['power_over_sdpa']:.2f}x"]
    _write(result, "train_throughput", "\n".join(lines) + "\n")
    return result


def curves(args) -> dict:
    runs = {"sdpa": {"attention_kernel": "sdpa"}, "power deg 1": {"degree": 1}, "power deg 2": {"degree": 2}}
    histories = {}
    for name, overrides in runs.items():
        config = TrainConfig(out_dir=str(Path(args.work) / name.replace(" ", "_")), dataset=args.dataset,
                             data_root=args.data_root, max_iters=args.steps, eval_interval=args.steps // 6,
                             eval_iters=20, log_interval=10, n_layer=6, n_head=6, n_embd=384, block_size=1024,
                             batch_size=16, learning_rate=1e-3, min_lr=1e-4, warmup_iters=50, chunk_size=256,
                             sample_tokens=0, progress=False, **overrides)
        start = time.perf_counter()
        histories[name] = {"history": train(config)["history"], "seconds": time.perf_counter() - start}
        print(name, histories[name]["history"][-1], flush=True)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for name, run in histories.items():
        evals = [e for e in run["history"] if e["kind"] == "eval"]
        ax.plot([e["iter"] for e in evals], [e["val_loss"] for e in evals], "o-", label=f"{name} (val)")
    ax.set_xlabel("step")
    ax.set_ylabel("validation cross entropy (nats / token)")
    ax.set_title(f"6 layers x 384, context 1024, {args.dataset} data, {torch.cuda.get_device_name()}")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    RESULTS.mkdir(exist_ok=True)
    fig.savefig(RESULTS / "train_curves.png", dpi=120)
    result = {"date": _now(), "device": torch.cuda.get_device_name(), "dataset": args.dataset, "runs": histories}
    _write(result, "train_curves")
    return result


def parallel(args) -> dict:
    if torch.cuda.device_count() < 2:
        raise SystemExit("parallel needs 2 GPUs")
    common = {"dataset": args.dataset, "data_root": args.data_root, "max_iters": 30, "eval_interval": 30,
              "eval_iters": 2, "log_interval": 1, "n_layer": 4, "n_head": 8, "n_embd": 512, "block_size": 4096,
              "chunk_size": 512, "sample_tokens": 0, "progress": False, "learning_rate": 1e-3}
    flags = [f"--{k}={v}" for k, v in common.items()]
    results = {}
    for name, launcher, extra in (
        ("1 GPU", [sys.executable, "-m", "retention_train.train"], ["--batch_size=8"]),
        ("DDP 2 GPUs", [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        "-m", "retention_train.train"], ["--batch_size=4"]),
        ("context parallel 2 GPUs", [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                     "--nproc_per_node=2", "-m", "retention_train.train"],
         ["--batch_size=8", "--context_parallel=True"]),
    ):
        out = Path(args.work) / name.replace(" ", "_")
        run = subprocess.run([*launcher, *flags, *extra, f"--out_dir={out}"], capture_output=True, text=True)
        if run.returncode:
            raise SystemExit(f"{name} failed:\n{run.stderr[-4000:]}")
        history = torch.load(out / "ckpt.pt", weights_only=False)["history"]
        train_entries = [e for e in history if e["kind"] == "train"]
        results[name] = {"losses": [e["loss"] for e in train_entries],
                         "tokens_per_s": sum(e["tokens_per_s"] for e in train_entries[5:]) / len(train_entries[5:])}
        print(name, results[name]["losses"][-1], results[name]["tokens_per_s"], flush=True)
    reference = results["1 GPU"]["losses"]
    for name in ("DDP 2 GPUs", "context parallel 2 GPUs"):
        worst = max(abs(a - b) / abs(b) for a, b in zip(results[name]["losses"], reference))
        results[name]["max_relative_loss_difference_to_1_gpu"] = worst
    result = {"date": _now(), "device": torch.cuda.get_device_name(), "settings": common, "runs": results}
    _write(result, "train_parallel")
    return result


def _write(result: dict, stem: str, markdown: str | None = None) -> None:
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{stem}.json").write_text(json.dumps(result, indent=1))
    if markdown:
        (RESULTS / f"{stem}.md").write_text(markdown)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("what", choices=["throughput", "curves", "parallel"])
    parser.add_argument("--context", type=int, default=16384)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--chunk_size", type=int, default=1024)
    parser.add_argument("--checkpoint_activations", action="store_true")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--dataset", default="default")
    parser.add_argument("--data_root", default="/tmp/retention_train_data")
    parser.add_argument("--work", default="/tmp/retention_train_gpu", help="checkpoints (large; not kept)")
    args = parser.parse_args()
    if args.what == "curves" and args.steps == 10:
        args.steps = 600
    {"throughput": throughput, "curves": curves, "parallel": parallel}[args.what](args)


if __name__ == "__main__":
    main()
