"""benchmarks/gpu_ab.py --dry-run: the same-call comparison of kernel versions runs end to end on the CPU (tiny
fp32 shapes under the interpreter), so a device call spends its minutes on timings, not on the script's bugs."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(ROOT / "benchmarks"))
import gpu_ab  # noqa: E402


def test_compares_kernel_trees_with_a_variant(tmp_path):
    for name in ("ref", "ab-candidate"):
        shutil.copytree(ROOT / "packages/retention-kernels/src", tmp_path / name / "packages/retention-kernels/src")
    out = tmp_path / "out"
    out.mkdir()
    assert gpu_ab.main(["--ref", str(tmp_path / "ref"), "--variants", str(tmp_path / "ab-candidate"),
                        "--cases", "1:96:1,1:48:1", "--variant-cases", "1:96:1", "--out", str(out), "--dry-run"]) == 0
    result = json.loads((out / "gpu_ab.json").read_text())
    assert result["variants"] == ["ab-candidate"]
    case, without_variant = result["cases"]
    assert (case["deg"], case["t"], case["b"]) == (1, 96, 1)
    assert list(case["ms"]) == ["ref", "ab-candidate", "tree"]  # the reference first, the working tree last
    assert list(without_variant["ms"]) == ["ref", "tree"]  # not among --variant-cases
    for side in [*case["ms"].values(), *without_variant["ms"].values()]:
        assert side["whole fwd+bwd"] > 0
        assert any(name.endswith("power_retention_bwd") for name in side)
    assert (out / "gpu_ab.png").stat().st_size > 0


def test_missing_reference_says_how_to_make_it(tmp_path):
    with pytest.raises(SystemExit, match="git archive"):
        gpu_ab.main(["--ref", str(tmp_path / "nothing"), "--out", str(tmp_path), "--dry-run"])
