"""benchmarks/host_overhead.py --dry-run: the host-time measurement runs end to end on the CPU (tiny fp32 shapes
under the interpreter), so a device call spends its time measuring."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]


def test_host_overhead_dry_run_writes_its_record(tmp_path):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        str(ROOT / f"packages/{name}/src") for name in ("retention-core", "retention-kernels")))
    run = subprocess.run([sys.executable, str(ROOT / "benchmarks/host_overhead.py"), "--dry-run", "--deg", "2",
                          "--out", str(tmp_path)], env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    result = json.loads((tmp_path / "host_overhead_deg2.json").read_text())
    assert result["deg"] == 2 and result["shape"] == dict(b=1, t=40, h=2, d=16)
    assert 0 < result["host_ms"] <= result["whole_ms"]
    assert result["synchronising"] == []  # on the CPU nothing synchronises
    assert any("function calls" in line for line in result["profile_top"])
