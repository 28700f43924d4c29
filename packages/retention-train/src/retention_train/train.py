"""Train a GPT with power retention (or softmax attention): one process, DDP, or context parallel.

    python -m retention_train.train --max_iters=300                      # embedded corpus, CPU or GPU
    python -m retention_train.train --batch_size=32 --attention_kernel=power --degree=2 --chunk_size=128 \\
        --disable_gating=False
    torchrun --nproc_per_node=2 -m retention_train.train ...              # DDP (gloo on CPU, NCCL on GPU)
    torchrun --nproc_per_node=2 -m retention_train.train --context_parallel=True --block_size=16384 ...
    python -m retention_train.train --out_dir=out --resume                # continue exactly where it stopped

Every field of :class:`TrainConfig` is a ``--name=value`` option. Outputs in ``out_dir``: ``ckpt.pt``
(written to a temporary file, then renamed), ``log.jsonl`` (one JSON object per log line), ``loss.png`` and
``samples.txt``.

Exact resumption: the batch and the random state (dropout) of step ``i`` are functions of ``(seed, rank, i)``
only, and the checkpoint holds the model, the optimizer, the step and the history; so a resumed run takes
bit-for-bit the steps the uninterrupted run would have taken.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import sys
import time
from dataclasses import dataclass, fields
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from tqdm.auto import tqdm

from .context_parallel import ContextParallel
from .data import Dataset, resolve_dataset
from .model import GPT, GPTConfig

__all__ = ["TrainConfig", "config_from_args", "main", "parse_args", "train"]


@dataclass
class TrainConfig:
    # I/O
    out_dir: str = "out"
    dataset: str = "default"  # "default" (embedded, no network), "owt" (prepared) or a prepared folder
    data_root: str = "data"  # where "default" and "owt" live
    resume: bool = False  # continue from out_dir/ckpt.pt (the model shape comes from the checkpoint)
    eval_interval: int = 100  # evaluate, sample, plot and checkpoint every this many steps (and at the end)
    eval_iters: int = 10
    log_interval: int = 10
    sample_tokens: int = 200  # 0: no samples
    sample_prompt: str = "def "
    progress: bool = True  # the tqdm progress bar
    # model (see GPTConfig)
    n_layer: int = 4
    n_head: int = 8
    n_kv_head: int | None = None
    n_embd: int = 128
    block_size: int = 128
    dropout: float = 0.0
    bias: bool = False
    attention_kernel: str = "power"
    degree: int = 2
    chunk_size: int | None = None
    disable_gating: bool = False
    tie_weights: bool = True
    checkpoint_activations: bool = False
    backend: str = "auto"
    # optimisation
    batch_size: int = 16  # sequences per process and micro-step
    gradient_accumulation_steps: int = 1
    max_iters: int = 300
    learning_rate: float = 3e-3
    min_lr: float = 3e-4
    warmup_iters: int = 30
    lr_decay_iters: int | None = None  # None: max_iters
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0  # 0: no clipping
    # system
    device: str = "auto"  # "auto": cuda if available, else cpu
    dtype: str = "auto"  # "auto": bfloat16 on GPUs that have it, else float32
    compile: bool = False
    cpu_threads: int = 0  # torch.set_num_threads on CPU; 0 keeps PyTorch's default (1 is fastest for small models)
    seed: int = 1337
    context_parallel: bool = False  # split each sequence across the ranks of torchrun

    def __post_init__(self):
        for name in ("eval_interval", "eval_iters", "log_interval", "batch_size", "gradient_accumulation_steps",
                     "max_iters", "warmup_iters"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < (0 if name == "warmup_iters" else 1):
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if self.sample_tokens < 0:
            raise ValueError(f"sample_tokens must be >= 0, got {self.sample_tokens!r}")

    def model_config(self, vocab_size: int) -> GPTConfig:
        shared = {f.name for f in fields(GPTConfig)} & {f.name for f in fields(TrainConfig)}
        return GPTConfig(vocab_size=vocab_size, **{name: getattr(self, name) for name in shared})


# --- the command line ---------------------------------------------------------------------------------------


def _parse_value(name: str, text: str, annotation: str):
    """``text`` as the type of field ``name`` (``annotation`` is the field's type as a string)."""
    if "None" in annotation and text in ("None", "none", ""):
        return None
    base = annotation.replace("| None", "").strip()
    try:
        if base == "bool":
            if text.lower() in ("true", "1", "yes"):
                return True
            if text.lower() in ("false", "0", "no"):
                return False
            raise ValueError(text)
        return {"int": int, "float": float, "str": str}[base](text)
    except ValueError:
        raise ValueError(f"--{name} expects {annotation}, got {text!r}") from None


def parse_args(argv: list[str] | None = None) -> dict:
    """The options given as ``--name=value`` (or ``--name value``; a bare ``--flag`` is True), by field name."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    for f in fields(TrainConfig):
        bare = "True" if f.type == "bool" else None  # a bare --flag means True
        parser.add_argument(f"--{f.name}", type=str, default=None, nargs="?", const=bare,
                            metavar=f.type.replace(" ", ""), help=f"default: {f.default!r}")
    args = parser.parse_args(argv)
    values = {}
    for f in fields(TrainConfig):
        text = getattr(args, f.name)
        if text is not None:
            values[f.name] = _parse_value(f.name, text, f.type)
    return values


def config_from_args(argv: list[str] | None = None) -> TrainConfig:
    """Defaults, overridden by the command line; with ``--resume``, the checkpoint's configuration instead of
    the defaults (so ``--out_dir=out --resume`` alone continues the same run)."""
    values = parse_args(argv)
    config = TrainConfig(**values)
    checkpoint_path = Path(config.out_dir) / "ckpt.pt"
    if config.resume and checkpoint_path.is_file():
        saved = torch.load(checkpoint_path, map_location="cpu", weights_only=False)["train_config"]
        config = TrainConfig(**{**saved, **values})
    return config


# --- pieces of the loop -------------------------------------------------------------------------------------


def learning_rate(config: TrainConfig, step: int) -> float:
    """Linear warm-up to ``learning_rate``, then cosine decay to ``min_lr`` at ``lr_decay_iters``."""
    decay_iters = config.lr_decay_iters or config.max_iters
    if step < config.warmup_iters:  # (warmup_iters == 0: no warm-up)
        return config.learning_rate * (step + 1) / config.warmup_iters
    if step >= decay_iters:
        return config.min_lr
    progress = (step - config.warmup_iters) / max(1, decay_iters - config.warmup_iters)
    return config.min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (config.learning_rate - config.min_lr)


def _seed_step(config: TrainConfig, rank: int, step: int) -> None:
    """The random state of step ``step`` (dropout), a function of (seed, rank, step) for exact resumption."""
    torch.manual_seed((config.seed * 1_000_003 + rank * 10_007 + step) % 2**63)


def _atomic_save(obj, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _write_log(history: list[dict], path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(json.dumps(entry) + "\n" for entry in history))
    os.replace(tmp, path)


def plot_losses(history: list[dict], path: Path, title: str = "") -> None:
    """Training loss per logged step and the evaluated train/val losses, to a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [(e["iter"], e["loss"]) for e in history if e["kind"] == "train"]
    evals = [e for e in history if e["kind"] == "eval"]
    fig, ax = plt.subplots(figsize=(7, 4))
    if train:
        ax.plot(*zip(*train), label="train (batch)", alpha=0.5)
    if evals:
        ax.plot([e["iter"] for e in evals], [e["train_loss"] for e in evals], "o-", label="train (eval)")
        ax.plot([e["iter"] for e in evals], [e["val_loss"] for e in evals], "s-", label="val")
    ax.set_xlabel("step")
    ax.set_ylabel("cross entropy (nats / token)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    tmp = path.with_name(path.stem + ".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)


@dataclass
class _Distributed:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    initialised_here: bool = False

    @property
    def master(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world_size > 1


def _setup_distributed(device_type: str) -> _Distributed:
    """Join the torchrun group when launched by torchrun (RANK/WORLD_SIZE in the environment)."""
    if "RANK" not in os.environ:
        return _Distributed()
    info = _Distributed(int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", 0)), int(os.environ["WORLD_SIZE"]))
    if not dist.is_initialized():
        if device_type == "cuda":  # NCCL binds each rank to its GPU
            torch.cuda.set_device(info.local_rank)
        dist.init_process_group(backend="nccl" if device_type == "cuda" else "gloo")
        info.initialised_here = True
    return info


def _resolve_device(config: TrainConfig, local_rank: int) -> torch.device:
    name = config.device
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    return device


def _resolve_dtype(config: TrainConfig, device: torch.device) -> torch.dtype:
    names = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if config.dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else torch.float32
    if config.dtype not in names:
        raise ValueError(f"dtype must be 'auto' or one of {sorted(names)}, got {config.dtype!r}")
    return names[config.dtype]


# --- the loop -----------------------------------------------------------------------------------------------


def train(config: TrainConfig) -> dict:
    """Run (or resume) training; returns ``{"history", "out_dir", "model"}`` (the unwrapped model)."""
    device_type = "cuda" if config.device.startswith("cuda") or (
        config.device == "auto" and torch.cuda.is_available()) else "cpu"
    world = _setup_distributed(device_type)
    try:
        return _train(config, world)
    finally:
        if world.initialised_here:
            dist.destroy_process_group()


def _train(config: TrainConfig, world: _Distributed) -> dict:
    device = _resolve_device(config, world.local_rank)
    if config.cpu_threads > 0 and device.type == "cpu":
        # Small models spend more on waking idle OpenMP workers than the matmuls save (and the numba
        # backend runs its own worker threads).
        torch.set_num_threads(config.cpu_threads)
    dtype = _resolve_dtype(config, device)
    autocast = (torch.autocast(device.type, dtype=dtype) if dtype != torch.float32
                else contextlib.nullcontext())
    out_dir = Path(config.out_dir)
    checkpoint_path = out_dir / "ckpt.pt"

    # Data: rank 0 builds the embedded corpus on first use while the others wait.
    if world.master:
        out_dir.mkdir(parents=True, exist_ok=True)
        folder = resolve_dataset(config.dataset, config.data_root)
    if world.active:
        dist.barrier()
    if not world.master:
        folder = resolve_dataset(config.dataset, config.data_root)
    data = Dataset(folder)

    # Model and optimizer, fresh or from the checkpoint.
    checkpoint = None
    if config.resume:
        if not checkpoint_path.is_file():
            raise ValueError(f"--resume: no checkpoint at {checkpoint_path}")
        checkpoint = torch.load(checkpoint_path, map_location=device, weights_only=False)
        model_config = GPTConfig(**checkpoint["model_config"])
    else:
        model_config = config.model_config(data.vocab_size)
    cp = None
    if config.context_parallel:
        if not world.active:
            raise ValueError("--context_parallel=True needs several processes (torchrun --nproc_per_node=N)")
        if config.block_size % world.world_size:
            raise ValueError(f"block_size ({config.block_size}) must be a multiple of the ranks ({world.world_size})")
        cp = ContextParallel()
    torch.manual_seed(config.seed)  # the same initial weights on every rank
    model = GPT(model_config).to(device)
    optimizer = model.configure_optimizer(config.weight_decay, config.learning_rate, (config.beta1, config.beta2))
    step, history, best_val = 0, [], float("inf")
    if checkpoint is not None:
        model.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        step, history, best_val = checkpoint["iter_num"], checkpoint["history"], checkpoint["best_val_loss"]
    raw_model = model
    if config.compile:
        model = torch.compile(model)
    if world.active and cp is None:
        model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)

    # Who reads which rows of each global batch.
    if cp is None:
        per_step = config.batch_size * world.world_size
        rows = slice(world.rank * config.batch_size, (world.rank + 1) * config.batch_size)
        local_t = config.block_size
    else:  # every rank reads the same sequences, a slice of their time axis each
        per_step, rows = config.batch_size, slice(None)
        local_t = config.block_size // world.world_size
    time_slice = slice(world.rank * local_t, (world.rank + 1) * local_t) if cp else slice(None)
    tokens_per_step = per_step * config.gradient_accumulation_steps * config.block_size
    tokenizer = data.tokenizer()

    def get_batch(split, stream, key):
        x, y = data.batch(split, config.block_size, per_step, config.seed, key, stream=stream, rows=rows)
        return x[:, time_slice].to(device), y[:, time_slice].to(device)

    def forward(net, x, y):
        with autocast:
            return net(x, y, context_parallel=cp)[1] if cp is not None else net(x, y)[1]

    def average(value: torch.Tensor) -> float:
        if world.active:
            value = value.detach().clone()
            dist.all_reduce(value)
            value /= world.world_size
        return value.item()

    @torch.no_grad()
    def evaluate() -> dict:
        raw_model.eval()
        result = {}
        for split in ("train", "val"):
            losses = torch.zeros((), device=device)
            for k in range(config.eval_iters):
                losses += forward(raw_model, *get_batch(split, f"eval-{split}", k)).float()
            result[f"{split}_loss"] = average(losses / config.eval_iters)
        raw_model.train()
        return result

    def save_outputs(entry_eval: dict | None):
        nonlocal best_val
        if entry_eval is not None:
            best_val = min(best_val, entry_eval["val_loss"])
        if not world.master:
            return
        _atomic_save({
            "model": raw_model.state_dict(), "optimizer": optimizer.state_dict(),
            "model_config": model_config.to_dict(), "train_config": dataclasses.asdict(config),
            "iter_num": step, "best_val_loss": best_val, "history": history, "tokenizer": tokenizer.name,
        }, checkpoint_path)
        _write_log(history, out_dir / "log.jsonl")
        plot_losses(history, out_dir / "loss.png",
                    f"{model_config.attention_kernel} deg {model_config.degree}, {raw_model.num_params():,} params")

    def sample(bar) -> None:
        if not world.master or config.sample_tokens <= 0:
            return
        raw_model.eval()
        prompt = torch.tensor([tokenizer.encode(config.sample_prompt)], device=device)
        generator = torch.Generator(device).manual_seed(config.seed + step)
        with autocast:
            tokens = raw_model.generate(prompt, config.sample_tokens, temperature=0.8, top_k=None,
                                        generator=generator)
        raw_model.train()
        text = tokenizer.decode(tokens[0].tolist())
        bar.write(f"--- sample at step {step} ---\n{text}\n---")
        with open(out_dir / "samples.txt", "a", encoding="utf-8") as f:
            f.write(f"=== step {step} ===\n{text}\n")
        history[-1]["sample"] = text

    if world.master:
        print(f"model: {raw_model.num_params():,} parameters, {model_config.attention_kernel} attention "
              f"(degree {model_config.degree}, gating {'off' if model_config.disable_gating else 'on'}); "
              f"data {folder} ({data.meta.get('source', '')}, vocab {data.vocab_size}); device {device}, {dtype}; "
              f"{world.world_size} process(es){', context parallel' if cp else ''}; "
              f"{tokens_per_step:,} tokens per step", file=sys.stderr)
        if checkpoint is None:
            out_dir.mkdir(parents=True, exist_ok=True)
            (out_dir / "samples.txt").unlink(missing_ok=True)
        else:
            _write_log(history, out_dir / "log.jsonl")  # drops lines written after the checkpoint

    bar = tqdm(total=config.max_iters, initial=step, disable=not (world.master and config.progress),
               dynamic_ncols=True, desc="train")
    if step == 0:  # the starting point of the curve (ln vocab for an untrained model)
        history.append({"kind": "eval", "iter": 0, **evaluate()})
        bar.write(f"step 0: train loss {history[-1]['train_loss']:.4f}, val loss {history[-1]['val_loss']:.4f}")
    model.train()
    window_start, window_tokens, running = time.perf_counter(), 0, torch.zeros((), device=device)
    window_steps = 0
    while step < config.max_iters:
        lr = learning_rate(config, step)
        for group in optimizer.param_groups:
            group["lr"] = lr
        _seed_step(config, world.rank, step)
        for micro in range(config.gradient_accumulation_steps):
            x, y = get_batch("train", "train", step * config.gradient_accumulation_steps + micro)
            last = micro == config.gradient_accumulation_steps - 1
            accumulate_only = not last and isinstance(model, DistributedDataParallel)
            with model.no_sync() if accumulate_only else contextlib.nullcontext():
                loss = forward(model, x, y) / config.gradient_accumulation_steps
                scaler.scale(loss).backward()
            running += loss.detach().float()
        if cp is not None:
            cp.average_gradients(raw_model.parameters())
        if config.grad_clip > 0:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(raw_model.parameters(), config.grad_clip)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        window_steps += 1
        window_tokens += tokens_per_step
        bar.update(1)

        if step % config.log_interval == 0 or step == config.max_iters:
            mean_loss = average(running / window_steps)  # the one host sync per log interval
            elapsed = time.perf_counter() - window_start
            entry = {"kind": "train", "iter": step, "loss": mean_loss, "lr": lr,
                     "tokens": step * tokens_per_step, "tokens_per_s": window_tokens / elapsed}
            history.append(entry)
            bar.set_postfix(loss=f"{mean_loss:.4f}", tok_s=f"{entry['tokens_per_s']:,.0f}")
            if world.master:
                with open(out_dir / "log.jsonl", "a") as f:
                    f.write(json.dumps(entry) + "\n")
            window_start, window_tokens, window_steps = time.perf_counter(), 0, 0
            running = torch.zeros((), device=device)

        if step % config.eval_interval == 0 or step == config.max_iters:
            losses = evaluate()
            history.append({"kind": "eval", "iter": step, **losses})
            bar.write(f"step {step}: train loss {losses['train_loss']:.4f}, val loss {losses['val_loss']:.4f}")
            sample(bar)
            save_outputs(losses)
            window_start = time.perf_counter()  # evaluation time is not training throughput
    bar.close()
    if world.active:
        dist.barrier()  # rank 0 has written its checkpoint before anyone returns
    return {"history": history, "out_dir": out_dir, "model": raw_model}


def main(argv: list[str] | None = None) -> None:
    train(config_from_args(argv))


if __name__ == "__main__":
    main()
