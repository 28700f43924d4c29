"""benchmarks/kernel_asm.py: the deg-2 kernels compile for sm_90a on the CPU through the real host code, and the
report says what a device call would otherwise have to find out (registers, spills, the matrix instructions and
whether ptxas serialized them)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]


def test_reports_registers_spills_and_wgmma(run_compiled, tmp_path):
    result = run_compiled(str(ROOT / "benchmarks/kernel_asm.py"), "--t", "2048", "--kernels", "pair_output",
                          "--out", str(tmp_path), timeout=900)
    assert result.returncode == 0, result.stdout + result.stderr[-3000:]
    report = json.loads((tmp_path / "kernel_asm.json").read_text())
    assert report["target"] == "sm_90a" and report["gates"]
    (row,) = report["rows"]  # the output kernel's first config only
    assert row["kernel"] == "pair_output_kernel" and "error" not in row, row
    assert row["config"] == {"BQ": 64, "BK": 64, "BU": 16} and row["warps"] == 4
    assert 0 < row["registers"] <= 255
    assert row["spill_stores"] >= 0 and row["spill_loads"] >= 0
    # the products run on Hopper's warpgroup MMA, not the per-warp path
    assert row["wgmma"] > 0 and row["mma_sync"] == 0
    assert 0 < row["shared_kb"] <= 227
    assert row["wgmma_serialized"] is False
    # static SASS counts (Triton's nvdisasm): the products are not each waited for before the next
    sass = row["sass"]
    assert 0 < sass["HGMMA"] and sass["wgmma_waits"] < sass["HGMMA"] < sass["total"]
    assert sass["F2FP"] > 0 and sass["FMUL"] > 0  # the phi tiles: fp32 products converted to bf16


@pytest.mark.parametrize("deg", [2, 1])
def test_no_kernel_has_its_wgmma_serialized(deg, run_compiled, tmp_path):
    """ptxas serializes every wgmma of a kernel (each waits for the previous one: no overlap of the tensor cores
    with anything) when another instruction writes an accumulator inside a pipeline stage. The deg-2 output
    kernel did, through a state loop inside a branch; each kernel's first config is checked."""
    result = run_compiled(str(ROOT / "benchmarks/kernel_asm.py"), "--t", "2048", "--deg", str(deg),
                          "--out", str(tmp_path), timeout=900)
    assert result.returncode == 0, result.stdout + result.stderr[-3000:]
    rows = json.loads((tmp_path / "kernel_asm.json").read_text())["rows"]
    assert len(rows) >= 8 and not [row for row in rows if "error" in row]
    assert sum(row["wgmma"] for row in rows) > 0
    assert [row["kernel"] for row in rows if row["wgmma_serialized"]] == []
