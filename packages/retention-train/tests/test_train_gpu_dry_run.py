"""benchmarks/train_gpu.py --dry-run: every code path of the GPU benchmark on the CPU at tiny sizes, so a device
run does not fail on a typo. ``throughput`` and ``curves`` run in-process (a few seconds); ``parallel`` launches
three trainings (1 process, 2 gloo DDP processes, 2 gloo context-parallel processes: ~20-50 s on 2 cores) and is
marked ``slow`` (deselect with ``-m "not slow"``)."""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[3] / "benchmarks" / "train_gpu.py"
pytestmark = pytest.mark.skipif(not SCRIPT.is_file(), reason="benchmarks/ is not part of this checkout")


def load_script():
    spec = importlib.util.spec_from_file_location("train_gpu", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_throughput_and_curves_dry_run(tmp_path, data_root):
    train_gpu = load_script()
    out = tmp_path / "results"
    code = train_gpu.main(["throughput", "curves", "--dry-run", f"--out={out}", f"--work={tmp_path}",
                           f"--data_root={data_root}"])
    assert code == 0
    result = json.loads((out / "train_throughput.json").read_text())
    rows = {row["run"]: row for row in result["rows"]}
    assert list(rows)[:3] == ["sdpa", "power deg 1", "power deg 2"]
    assert [rows[r]["chunk_size"] for r in list(rows)[:3]] == [None, 32, 64]
    # The chunk sweep times the attention at the other chunks; the dry run trains with the best of them too.
    assert [(e["degree"], e["chunk_size"]) for e in result["attention_chunk_sweep"]] == [(1, 16), (2, 32), (2, 128)]
    assert rows["power deg 1 (chunk 16)"]["chunk_size"] == 16
    assert sum(row["degree"] == 2 for row in rows.values()) == 2
    for row in rows.values():
        assert row["tokens_per_s"] > 0 and row["attention_fwd_bwd_ms"] > 0 and 0 < row["attention_share"]
        assert 4.0 < row["loss"] < 6.5  # ln 256 = 5.55 for the untrained model, in bf16 autocast
    assert "| power deg 2 | 64 |" in (out / "train_throughput.md").read_text()
    curves = json.loads((out / "train_curves.json").read_text())
    assert list(curves["runs"]) == ["sdpa", "power deg 1", "power deg 2"]
    for run in curves["runs"].values():
        assert [e["iter"] for e in run["history"] if e["kind"] == "eval"] == [0, 2, 4]
    assert (out / "train_curves.png").stat().st_size > 1000
    assert "| power deg 1 |" in (out / "train_curves.md").read_text()


def test_a_failing_run_is_reported_and_the_others_kept(tmp_path, data_root, monkeypatch):
    """A row (throughput) or a run (curves) that raises is recorded, the rest is still measured and written,
    and the exit status is 1."""
    train_gpu = load_script()
    real_row, real_train = train_gpu._throughput_row, train_gpu.train

    def row(args, device, label, *rest):
        if label == "power deg 1":
            raise RuntimeError("CUDA out of memory (simulated)")
        return real_row(args, device, label, *rest)

    def train(config):
        if config.attention_kernel == "power" and config.degree == 2:
            raise FloatingPointError("loss is NaN (simulated)")
        return real_train(config)

    monkeypatch.setattr(train_gpu, "_throughput_row", row)
    monkeypatch.setattr(train_gpu, "train", train)
    out = tmp_path / "results"
    code = train_gpu.main(["throughput", "curves", "--dry-run", f"--out={out}", f"--work={tmp_path}",
                           f"--data_root={data_root}", "--sweep_deg1=", "--sweep_deg2="])
    assert code == 1
    result = json.loads((out / "train_throughput.json").read_text())
    assert [row["run"] for row in result["rows"]] == ["sdpa", "power deg 2"]
    assert [e["what"] for e in result["errors"]] == ["power deg 1"]
    assert "failed: power deg 1: RuntimeError: CUDA out of memory (simulated)" in (
        out / "train_throughput.md").read_text()
    curves = json.loads((out / "train_curves.json").read_text())
    assert "history" in curves["runs"]["power deg 1"] and "loss is NaN" in curves["runs"]["power deg 2"]["error"]
    summary = (out / "train_curves.md").read_text()
    assert "| power deg 2 | failed: FloatingPointError: loss is NaN (simulated)" in summary


@pytest.mark.slow
def test_parallel_dry_run(tmp_path, data_root, monkeypatch):
    # The launched trainings import the packages from PYTHONPATH (made absolute for torchrun's workers).
    src = [str(Path(__file__).resolve().parents[2].parent / name / "src")
           for name in ("retention-core", "retention-kernels", "retention-train")]
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([*src, os.environ.get("PYTHONPATH", "")]))
    train_gpu = load_script()
    out = tmp_path / "results"
    code = train_gpu.main(["parallel", "--dry-run", f"--out={out}", f"--work={tmp_path}", f"--data_root={data_root}",
                           "--launch_timeout=240"])
    result = json.loads((out / "train_parallel.json").read_text())
    assert code == 0, result
    for label in ("DDP 2 GPUs", "context parallel 2 GPUs"):
        run = result["runs"][label]
        assert run["passed"] and run["max_relative_loss_difference_to_1_gpu"] <= 1e-4
        assert len(run["losses"]) == 3
