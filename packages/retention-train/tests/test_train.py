"""The training loop on CPU: loss falls, outputs are written, --resume is bit-exact, DDP equals one process."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
import torch

from retention_train.sample import main as sample_main
from retention_train.train import TrainConfig, config_from_args, learning_rate, parse_args, train

TINY = dict(n_layer=2, n_head=2, n_embd=32, block_size=32, batch_size=4, chunk_size=8, backend="reference",
            eval_iters=2, sample_tokens=0, progress=False, learning_rate=1e-2, warmup_iters=2, grad_clip=1.0)


def config(data_root, out_dir, **overrides) -> TrainConfig:
    return TrainConfig(**{**TINY, "data_root": str(data_root), "out_dir": str(out_dir), **overrides})


def test_command_line_parsing():
    values = parse_args(["--batch_size=32", "--attention_kernel=power", "--degree=2", "--chunk_size=128",
                         "--disable_gating=False", "--n_kv_head=None", "--resume", "--learning_rate", "1e-3"])
    assert values == {"batch_size": 32, "attention_kernel": "power", "degree": 2, "chunk_size": 128,
                      "disable_gating": False, "n_kv_head": None, "resume": True, "learning_rate": 1e-3}
    with pytest.raises(ValueError, match="--degree expects int"):
        parse_args(["--degree=two"])
    with pytest.raises(ValueError, match="--disable_gating expects bool"):
        parse_args(["--disable_gating=maybe"])
    with pytest.raises(ValueError, match="batch_size must be a positive int, got 0"):
        config_from_args(["--batch_size=0"])


def test_learning_rate_schedule():
    c = TrainConfig(learning_rate=1.0, min_lr=0.1, warmup_iters=10, max_iters=110)
    assert learning_rate(c, 0) == pytest.approx(0.1) and learning_rate(c, 9) == pytest.approx(1.0)
    assert learning_rate(c, 60) == pytest.approx(0.55) and learning_rate(c, 110) == pytest.approx(0.1)


def test_tiny_model_learns_and_writes_its_outputs(data_root, tmp_path, capsys):
    # backend="auto": the fastest installed backend (the numba CPU one), as the main job runs.
    result = train(config(data_root, tmp_path / "out", max_iters=40, eval_interval=20, log_interval=5,
                          sample_tokens=16, eval_iters=4, backend="auto"))
    evals = [e for e in result["history"] if e["kind"] == "eval"]
    assert [e["iter"] for e in evals] == [0, 20, 40]
    # Uniform guessing over 256 bytes costs ln 256 = 5.55 nats, the untrained model's loss; 40 steps must get
    # well below (to the byte frequencies of Python source at least).
    assert abs(evals[0]["val_loss"] - math.log(256)) < 0.25
    assert evals[-1]["val_loss"] < 4.0 and evals[-1]["train_loss"] < evals[1]["train_loss"]
    trains = [e["loss"] for e in result["history"] if e["kind"] == "train"]
    assert trains[-1] < trains[0] - 1.5
    out = tmp_path / "out"
    logged = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert logged == result["history"]
    assert all(e["tokens_per_s"] > 0 for e in logged if e["kind"] == "train")
    assert (out / "loss.png").stat().st_size > 1000
    assert "=== step 40 ===\ndef " in (out / "samples.txt").read_text()
    assert not list(out.glob("*.tmp*"))  # atomic writes leave no temporaries
    checkpoint = torch.load(out / "ckpt.pt", weights_only=False)
    assert checkpoint["iter_num"] == 40 and checkpoint["model_config"]["n_layer"] == 2
    # Generation from the checkpoint (constant-time decoding with the cache).
    capsys.readouterr()
    sample_main([f"--out_dir={out}", "--prompt=class ", "--max_new_tokens=30", "--num_samples=2", "--report_timing"])
    printed = capsys.readouterr().out
    assert printed.count("class ") >= 2 and "ms/token" in printed


def test_resume_continues_bit_exactly(data_root, tmp_path):
    # lr_decay_iters fixes the schedule, so the first half is the same run as the start of the full one.
    common = dict(eval_interval=3, log_interval=1, lr_decay_iters=8, dropout=0.1, gradient_accumulation_steps=2)
    train(config(data_root, tmp_path / "half", max_iters=4, **common))
    resumed = train(config_from_args([f"--out_dir={tmp_path / 'half'}", "--resume", "--max_iters=8"]))
    full = train(config(data_root, tmp_path / "full", max_iters=8, **common))
    # Same losses at every step (timings aside); the interrupted run also evaluated at its end, step 4.
    strip = lambda history: [{k: v for k, v in e.items() if k != "tokens_per_s"} for e in history]
    interrupted_end = {"kind": "eval", "iter": 4}
    resumed_history = [e for e in resumed["history"] if {"kind": e["kind"], "iter": e["iter"]} != interrupted_end]
    assert len(resumed_history) == len(resumed["history"]) - 1
    assert strip(resumed_history) == strip(full["history"])
    a = torch.load(tmp_path / "half" / "ckpt.pt", weights_only=False)
    b = torch.load(tmp_path / "full" / "ckpt.pt", weights_only=False)
    assert a["iter_num"] == b["iter_num"] == 8
    for name, tensor in b["model"].items():
        assert torch.equal(a["model"][name], tensor), name
    for state_a, state_b in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        for key in state_b:
            assert torch.equal(state_a[key], state_b[key]), key


@pytest.mark.parametrize("mode", ["ddp", "context_parallel"])
def test_two_gloo_processes_equal_one_process(data_root, tmp_path, mode):
    """torchrun with 2 CPU processes == 1 process on the same global batch of 4 sequences of 32 tokens:
    DDP gives each rank 2 sequences; context parallelism gives each rank 16 tokens of all 4 sequences."""
    args = [f"--{k}={v}" for k, v in {**TINY, "data_root": data_root, "max_iters": 4, "eval_interval": 4,
                                         "log_interval": 1, "weight_decay": 0.0}.items()]
    single = train(config_from_args([*args, f"--out_dir={tmp_path / 'single'}"]))
    split = ["--batch_size=2"] if mode == "ddp" else ["--context_parallel=True"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               "-m", "retention_train.train", *args, *split, f"--out_dir={tmp_path / mode}"]
    run = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "2 process(es)" in run.stderr
    parallel = torch.load(tmp_path / mode / "ckpt.pt", weights_only=False)
    one = [e for e in single["history"] if e["kind"] == "train"]
    two = [e for e in parallel["history"] if e["kind"] == "train"]
    assert [e["tokens"] for e in two] == [e["tokens"] for e in one] == [128, 256, 384, 512]
    for a, b in zip(one, two):
        assert math.isclose(a["loss"], b["loss"], rel_tol=1e-5), (a, b)
    reference = torch.load(tmp_path / "single" / "ckpt.pt", weights_only=False)["model"]
    for name, tensor in reference.items():
        torch.testing.assert_close(parallel["model"][name], tensor, rtol=1e-4, atol=1e-5, msg=name)
