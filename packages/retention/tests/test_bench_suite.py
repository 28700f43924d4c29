"""The benchmark suite (benchmarks/suite.py) and its plots/docs writer (benchmarks/plots.py), on CPU.

The GPU run is expensive and rare, so its code runs here first: ``--dry-run`` is the GPU protocol (Triton backend
under the interpreter, every SDPA kernel that runs on CPU, flash-attn and fla, the decode suite with the static
cache, the profiler breakdown, TFLOP/s against the measured matmul rate, JSON, CSV, plots) at tiny shapes. flash-attn
and fla are not installed here (nor on the GPU machine), so stand-ins with their call conventions are put on the
path. Also: the CPU protocol, the per-case guards (out of memory, time limit, errors), the time budget, the
incremental JSON and the docs section.
"""

from __future__ import annotations

import csv
import importlib.util
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

pytest.importorskip("rich", reason="the benchmark suite needs rich (nox -s bench installs it)")
pytest.importorskip("matplotlib", reason="the benchmark plots need matplotlib (nox -s bench installs it)")

import retention
from retention.flops import power_retention_cost

REPO_ROOT = Path(__file__).resolve().parents[3]
BENCHMARKS = REPO_ROOT / "benchmarks"
PLOTS = ("throughput", "tflops", "breakdown", "decode")


def load(name: str):
    """benchmarks/<name>.py as a module (the folder is scripts, not a package)."""
    if str(BENCHMARKS) not in sys.path:
        sys.path.insert(0, str(BENCHMARKS))
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


# Stand-ins for flash-attn and flash-linear-attention with the real call conventions (layout [b, t, h, d], the
# keyword names, fla's (output, final state) pair); each checks what the real one would refuse.
FAKE_FLASH_ATTN = '''
import torch
import torch.nn.functional as F

CALLS = []

def flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, **kwargs):
    if q.dtype not in (torch.float16, torch.bfloat16):
        raise RuntimeError("FlashAttention only support fp16 and bf16 data type")
    assert causal and q.dim() == 4 and q.shape == k.shape == v.shape
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True)
    return out.transpose(1, 2)
'''

FAKE_SIMPLE_GLA = '''
import math

import torch

def chunk_simple_gla(q, k, v, g=None, scale=None, initial_state=None, output_final_state=False, **kwargs):
    """o_i = sum_{j <= i} scale (q_i . k_j) exp(G_i - G_j) v_j, G the cumulative sum of g [B, T, H]."""
    b, t, h, d = q.shape
    assert k.shape == q.shape and v.shape[:3] == q.shape[:3] and g.shape == (b, t, h)
    scale = d ** -0.5 if scale is None else scale
    G = g.float().cumsum(1).transpose(1, 2)  # [b, h, t]
    scores = torch.einsum("bihd,bjhd->bhij", q.float(), k.float()) * scale
    decay = (G[..., :, None] - G[..., None, :]).masked_fill(~torch.ones(t, t, dtype=torch.bool).tril(), -math.inf)
    o = torch.einsum("bhij,bjhe->bihe", scores * decay.exp(), v.float())
    return o.to(q.dtype), None
'''


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory) -> tuple[dict, Path]:
    """One ``suite.py --dry-run`` in a fresh process (TRITON_INTERPRET=1 must precede the kernels' import), with
    the flash-attn and fla stand-ins on its path."""
    root = tmp_path_factory.mktemp("bench")
    fakes = root / "fakes"
    (fakes / "flash_attn").mkdir(parents=True)
    (fakes / "flash_attn" / "__init__.py").write_text(FAKE_FLASH_ATTN)
    (fakes / "fla" / "ops" / "simple_gla").mkdir(parents=True)
    (fakes / "fla" / "__init__.py").write_text("")
    (fakes / "fla" / "ops" / "__init__.py").write_text("")
    (fakes / "fla" / "ops" / "simple_gla" / "__init__.py").write_text(FAKE_SIMPLE_GLA)
    out = root / "out"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(fakes), os.environ.get("PYTHONPATH", "")])}
    start = time.perf_counter()
    result = subprocess.run([sys.executable, str(BENCHMARKS / "suite.py"), "--dry-run", "--out", str(out)],
                            cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    print(f"dry run: {time.perf_counter() - start:.1f} s")
    (report_path,) = out.glob("*-dry-run.json")
    return json.loads(report_path.read_text()), out


def test_dry_run_measures_every_gpu_method_without_failures(dry_run):
    report, _ = dry_run
    config = report["config"]
    assert report["complete"] and config["protocol"] == "gpu" and config["device"] == "cpu"
    methods = {row["method"] for row in report["training"]}
    sdpa_kernels = {m for m in methods if m.startswith("sdpa[")}
    assert {"retention[triton]", "flash-attn", "fla[simple_gla]"} <= methods and sdpa_kernels
    # Every SDPA kernel either ran or is explained in a note.
    for kernel in ("math", "flash", "efficient", "cudnn"):
        assert f"sdpa[{kernel}]" in methods or any(n.startswith(f"sdpa[{kernel}] cannot run") for n in report["notes"])
    expected = len(config["degs"]) * len(config["contexts"]) * len(config["passes"]) * len(methods)
    assert len(report["training"]) == expected
    failures = [(row["method"], row["pass"], row["deg"], row["t"], row["note"]) for row in report["training"]
                if row["ms"] is None or row["note"]]
    assert not failures


def test_dry_run_counts_flops_and_speedups_with_the_documented_formulas(dry_run, monkeypatch):
    report, _ = dry_run
    if not torch.cuda.is_available():  # as packages/retention-kernels/tests/conftest.py imports the kernels
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    from retention_kernels.triton.function import default_chunk_size

    matmul = report["matmul_tflops"]
    best_sdpa = {}
    for row in report["training"]:
        if row["method"].startswith("sdpa"):
            key = (row["pass"], row["deg"], row["t"])
            best_sdpa[key] = min(best_sdpa.get(key, math.inf), row["ms"])
    for row in report["training"]:
        b, t, h, d = row["b"], row["t"], row["heads"], row["head_dim"]
        assert b * t == report["config"]["tokens"]
        if row["method"] == "retention[triton]":
            assert row["chunk_size"] == default_chunk_size(t, d, row["deg"])
            flops = power_retention_cost(b, t, h, d, deg=row["deg"], chunk_size=row["chunk_size"],
                                         pass_=row["pass"]).flops
        elif row["method"] == "fla[simple_gla]":
            flops = power_retention_cost(b, t, h, d, deg=1, chunk_size=min(64, t), pass_=row["pass"]).flops
        else:
            flops = power_retention_cost(b, t, h, d, deg=row["deg"], pass_=row["pass"]).sdpa_flops
        assert row["gflop"] == pytest.approx(flops / 1e9, rel=1e-12)
        assert row["tflops"] == pytest.approx(flops / (row["ms"] * 1e-3) / 1e12, rel=1e-9)
        assert row["fraction_of_matmul"] == pytest.approx(row["tflops"] / matmul, rel=1e-9)
        assert row["tokens_per_s"] == pytest.approx(b * t / (row["ms"] * 1e-3), rel=1e-9)
        assert row["speedup_vs_sdpa"] == pytest.approx(best_sdpa[(row["pass"], row["deg"], t)] / row["ms"], rel=1e-9)


def test_dry_run_decode_and_breakdown(dry_run):
    report, _ = dry_run
    config = report["config"]
    by_method = {}
    for row in report["decode"]:
        assert row["ms"] is not None and row["ms"] > 0 and not row["note"], row
        by_method.setdefault(row["method"], []).append(row)
    assert set(by_method) == {"retention[triton] dynamic", "retention[triton] static", "sdpa kv-cache"}
    b, h, d = config["decode_batch"], config["heads"], config["head_dims"][0]
    for row in by_method["retention[triton] static"]:  # fixed buffers, whatever the context
        assert row["cache_bytes"] == retention.PowerRetentionCache.static_bytes(
            b, h, d, d, row["deg"], config["decode_window"], torch.bfloat16)
    for row in by_method["sdpa kv-cache"]:
        assert row["cache_bytes"] == 2 * b * h * row["context"] * d * 2
    assert [row["context"] for row in by_method["sdpa kv-cache"]] == sorted(config["decode_contexts"])
    item = report["breakdown"]["retention[triton]"]
    assert item["pass"] == "fwd+bwd" and item["case"]["t"] == max(config["contexts"])
    # CPU: the top ops, the rest and the time outside any op add up to the profiled call's wall time.
    assert item["total_ms"] > 0 and sum(item["kernels_ms"].values()) >= item["total_ms"] * (1 - 1e-6)


def test_dry_run_writes_json_csv_and_plots(dry_run):
    report, out = dry_run
    stem = report["stem"]
    assert stem.endswith("-dry-run")
    with (out / f"{stem}.csv").open() as file:
        rows = list(csv.DictReader(file))
    assert len(rows) == len(report["training"]) and rows[0]["method"] == report["training"][0]["method"]
    with (out / f"{stem}-decode.csv").open() as file:
        assert len(list(csv.DictReader(file))) == len(report["decode"])
    for plot in PLOTS:
        png = out / f"{stem}-{plot}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    assert not list(out.glob("*.partial"))


def test_docs_section_from_a_report(dry_run, tmp_path):
    """plots.py --docs: the plots under the docs' names and the marked section of the page, idempotently."""
    report, _ = dry_run
    plots = load("plots")
    page = tmp_path / "docs" / "benchmarks.md"
    page.parent.mkdir()
    page.write_text((REPO_ROOT / "docs" / "benchmarks.md").read_text())
    assets = tmp_path / "docs" / "assets" / "benchmarks"
    plots.main([str(_saved(report, tmp_path)), "--docs", "--page", str(page), "--assets", str(assets)])
    text = page.read_text()
    section = text.split("<!-- results:gpu:start -->")[1].split("<!-- results:gpu:end -->")[0]
    for plot in PLOTS:
        assert f"](assets/benchmarks/gpu-{plot}.png)" in section and (assets / f"gpu-{plot}.png").exists()
    assert "`retention[triton]` ms" in section and "`fla[simple_gla]` ms" in section and "sdpa kv-cache" in section
    outside = text.replace(section, "")
    assert outside == (REPO_ROOT / "docs" / "benchmarks.md").read_text().replace(_section(REPO_ROOT), "")
    plots.update_docs(report, page, assets)
    assert page.read_text() == text
    page.write_text("# no markers\n")
    with pytest.raises(ValueError, match="results:gpu:start"):
        plots.update_docs(report, page, assets)


def _saved(report: dict, folder: Path) -> Path:
    path = folder / f"{report['stem']}.json"
    path.write_text(json.dumps(report))
    return path


def _section(root: Path) -> str:
    text = (root / "docs" / "benchmarks.md").read_text()
    return text.split("<!-- results:gpu:start -->")[1].split("<!-- results:gpu:end -->")[0]


# -- the guards, the budget and the incremental JSON (in-process, no kernels) --


@pytest.fixture
def suite():
    return load("suite")


def cpu_config(suite, **changes):
    tiny = dict(tokens=64, contexts=[32], heads=1, head_dims=[8], warmup=0, repeats=1)
    return suite.dataclasses.replace(suite.default_config("cpu", quick=True), **{**tiny, **changes})


def failing_method(suite, run) -> object:
    def build(case, config, requires_grad):
        x = torch.zeros(1, requires_grad=requires_grad)
        return (lambda: run() + x), [x]

    return suite.Method("failing", False, build, suite.never_skip, depends_on_deg=False)


def test_a_failing_case_is_recorded_not_fatal(suite):
    config = cpu_config(suite, case_timeout_s=0.3)
    case = suite.Case(2, 8, 32, 2, 1)

    def out_of_memory():
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 80.00 GiB")

    def broken():
        raise ValueError("bad shape")

    def hangs():
        time.sleep(5)

    assert suite.measure(failing_method(suite, out_of_memory), case, config, "fwd") == (None, "skipped: out of memory")
    assert suite.measure(failing_method(suite, broken), case, config, "fwd") == (None, "failed: ValueError: bad shape")
    start = time.perf_counter()
    ms, note = suite.measure(failing_method(suite, hangs), case, config, "fwd+bwd")
    assert ms is None and note.startswith("failed: CaseTimeout") and time.perf_counter() - start < 3


def test_time_budget_and_incremental_json(suite, tmp_path):
    """Each row is saved as it is measured; once the training share of the budget is spent, no case starts."""
    config = cpu_config(suite, contexts=[16, 32, 64], time_budget_s=1000.0)
    methods = [suite.sdpa(None)]
    saved = []
    rows = []
    budget = suite.Budget(config.time_budget_s)
    with suite.Progress(console=suite.console, disable=True) as progress:
        suite.run_training(config, methods, 1.0, progress, budget, lambda: saved.append(len(rows)), rows)
    assert saved == list(range(1, 1 + len(rows))) and len(rows) == 3 * len(config.passes)
    assert all(row["ms"] is not None for row in rows)
    rows, budget = [], suite.Budget(1e-9)
    time.sleep(0.01)
    with suite.Progress(console=suite.console, disable=True) as progress:
        suite.run_training(config, methods, 1.0, progress, budget, lambda: None, rows)
    assert rows and all(row["ms"] is None and "--time-budget" in row["note"] for row in rows)


def test_optional_baselines_missing_are_noted(suite, monkeypatch):
    monkeypatch.setitem(sys.modules, "flash_attn", None)  # import raises ImportError
    monkeypatch.setitem(sys.modules, "fla", None)
    config = suite.dataclasses.replace(cpu_config(suite), protocol="gpu")
    methods, notes = suite.methods_for(config, None, quick=True)
    assert not any(m.name in ("flash-attn", "fla[simple_gla]") for m in methods)
    assert any(n.startswith("flash-attn not installed") for n in notes)
    assert any(n.startswith("fla (flash-linear-attention) not installed") for n in notes)


def test_cpu_protocol(suite, tmp_path):
    """The CPU protocol end to end at tiny shapes (reference backend and SDPA's default kernel: no numba compile)."""
    report = suite.main(["--device", "cpu", "--quick", "--out", str(tmp_path), "--tokens", "64", "--contexts",
                         "16,32", "--heads", "1", "--head-dims", "8", "--decode-contexts", "24", "--methods",
                         "retention[reference],sdpa", "--no-plots"])
    assert report["config"]["protocol"] == "cpu" and report["complete"]
    assert {row["method"] for row in report["training"]} == {"retention[reference]", "sdpa[default]"}
    assert all(row["ms"] is not None and not row["note"] for row in report["training"])
    assert {row["method"] for row in report["decode"]} == {"retention[reference] dynamic", "sdpa kv-cache"}
    assert all(row["ms"] is not None for row in report["decode"])
    assert "kernels_ms" in report["breakdown"]["retention[reference]"]
    saved = json.loads((tmp_path / f"{report['stem']}.json").read_text())
    assert saved["training"] == report["training"] and saved["complete"]



def test_cases_standard_problem_first_then_cheapest(suite):
    config = cpu_config(suite, degs=[2, 1, 4], head_dims=[64, 32, 128], contexts=[16, 32])
    problems = list(dict.fromkeys((case.deg, case.head_dim) for case in suite.training_cases(config)))
    assert problems[0] == (2, 64) and len(problems) == 9
    sizes = [suite.retention.sympow_dim(d, deg) * d for deg, d in problems[1:]]
    assert sizes == sorted(sizes) and problems[1] == (1, 32) and problems[-1] == (4, 128)


def test_extend_keeps_an_earlier_runs_rows(suite, tmp_path):
    """A second run with --extend measures only what the first did not, and its report holds both."""
    common = ["--device", "cpu", "--quick", "--tokens", "64", "--contexts", "16,32", "--heads", "1",
              "--methods", "sdpa", "--no-plots", "--no-breakdown", "--decode-contexts", "24"]
    first = suite.main([*common, "--head-dims", "8", "--out", str(tmp_path / "a"), "--tag", "part1"])
    second = suite.main([*common, "--head-dims", "8,16", "--no-decode", "--out", str(tmp_path / "b"),
                         "--extend", str(tmp_path / "a" / f"{first['stem']}.json")])
    kept = [row for row in second["training"] if row["head_dim"] == 8]
    assert kept == first["training"]  # the same measurements, not new ones
    assert {row["head_dim"] for row in second["training"]} == {8, 16}
    assert all(row["ms"] is not None for row in second["training"])
    assert second["decode"] == first["decode"] and second["extends"]["stem"] == first["stem"]
    assert set(first["notes"]) <= set(second["notes"])


def test_a_lost_device_stops_the_run_but_not_the_report(suite, monkeypatch):
    """An illegal address leaves the CUDA context unusable: that case fails, every later one is skipped with the
    reason instead of crashing the run (the report and plots are still written)."""
    monkeypatch.setattr(suite, "DEVICE_LOST", [])
    config = cpu_config(suite)
    case = suite.Case(2, 8, 32, 2, 1)

    def faults():
        raise torch.AcceleratorError("CUDA error: an illegal memory access was encountered")

    ms, note = suite.measure(failing_method(suite, faults), case, config, "fwd")
    assert ms is None and note.startswith("failed: AcceleratorError")
    ms, note = suite.measure(suite.sdpa(None), case, config, "fwd")
    assert ms is None and note.startswith("skipped: the device was lost earlier (AcceleratorError")


def test_extend_reuses_softmax_times_for_new_degs(suite, tmp_path):
    """SDPA does not depend on deg: a later run's new deg takes the earlier run's SDPA times, not new ones."""
    common = ["--device", "cpu", "--quick", "--tokens", "64", "--contexts", "16", "--heads", "1", "--head-dims", "8",
              "--methods", "sdpa", "--no-plots", "--no-breakdown", "--no-decode"]
    first = suite.main([*common, "--degs", "2", "--out", str(tmp_path / "a"), "--tag", "part1"])
    second = suite.main([*common, "--degs", "2,4", "--out", str(tmp_path / "b"),
                         "--extend", str(tmp_path / "a" / f"{first['stem']}.json")])
    by_deg = {deg: sorted(row["ms"] for row in second["training"] if row["deg"] == deg) for deg in (2, 4)}
    assert by_deg[4] == by_deg[2] == sorted(row["ms"] for row in first["training"])


def test_breakdown_counts_device_kernels_once(suite):
    """A custom op's self device time is the Triton kernels it launches, which are events of their own: the
    breakdown takes the device-side events only, so the kernels sum to the call's time instead of twice it."""
    from types import SimpleNamespace

    from torch.autograd import DeviceType

    def event(key, device_type, ms):
        return SimpleNamespace(key=key, device_type=device_type, self_device_time_total=1e3 * ms)

    events = [event("retention_kernels::pair_retention_bwd", DeviceType.CPU, 7.0),  # the op around the kernels
              event("pair_key_value_grad_kernel", DeviceType.CUDA, 5.0),
              event("pair_query_grad_kernel", DeviceType.CUDA, 2.0),
              event("aten::copy_", DeviceType.CPU, 0.5),
              event("void at::native::unrolled_elementwise_kernel<...>", DeviceType.CUDA, 0.5),
              event("cudaLaunchKernel", DeviceType.CPU, 0.0)]
    times = suite.kernel_times(events)
    assert times == {"pair_key_value_grad_kernel": 5.0, "pair_query_grad_kernel": 2.0,
                     "void at::native::unrolled_elementwise_kernel<...>": 0.5}
