"""Backend dispatch (``retention.backends``): ``auto`` picks the best installed backend that supports the call,
explicit names are checked with clear errors, and ``retention_kernels`` is discovered only at the same version.
Kernel discovery is exercised with a fake ``retention_kernels`` module (monkeypatched into ``sys.modules``)."""

from __future__ import annotations

import sys
import types

import pytest
import torch

from retention import __version__, available_backends, power_retention
from retention import backends as dispatch
from retention._validate import validate
from retention.backends import Backend, get_backend, select_backend
from retention.testing import random_inputs, relative_error


def problem_of(device="cpu", dtype=torch.float32):
    inputs = random_inputs(b=1, t=4, hq=2, h=1, d=4, dtype=dtype)
    inputs = {name: x.to(device) for name, x in inputs.items()}
    return validate(**inputs, initial_state=None, sum_of_keys=None, deg=2, scale=None, chunk_size=None,
                    return_final_state=False)


@pytest.fixture
def fresh_discovery():
    """Kernel discovery is cached per process: clear it around a test that fakes ``retention_kernels``."""
    dispatch.reset_discovery()
    yield
    dispatch.reset_discovery()


def recording_backend(name: str, priority: int, calls: list, supports=lambda problem: None, attend_window=None):
    """A backend that runs the reference and records that it ran."""
    reference = get_backend("reference")

    def forward(problem):
        calls.append(name)
        return reference.forward(problem)

    return Backend(name, priority, supports, forward, attend_window)


def fake_kernels(monkeypatch, version: str, provided: list) -> None:
    module = types.ModuleType("retention_kernels")
    module.__version__ = version
    module.backends = lambda: provided
    monkeypatch.setitem(sys.modules, "retention_kernels", module)
    dispatch.reset_discovery()


def test_core_backends_are_always_available():
    found = available_backends()
    assert {"cpu", "reference"} <= set(found)
    assert all(isinstance(backend, Backend) and backend.name == name for name, backend in found.items())


def test_auto_picks_cpu_for_cpu_tensors():
    assert select_backend(problem_of(), "auto").name == "cpu"
    assert select_backend(problem_of(dtype=torch.float64), "auto").name == "cpu"


def test_auto_runs_the_cpu_backend(monkeypatch):
    calls = []
    cpu = recording_backend("cpu", 10, calls)
    monkeypatch.setattr(dispatch, "_CORE_BACKENDS", (cpu, get_backend("reference")))
    power_retention(**random_inputs(b=1, t=4, hq=1, h=1, d=4))
    assert calls == ["cpu"]


@pytest.mark.parametrize("name", ["cpu", "reference"])
def test_explicit_backend_is_used(monkeypatch, name):
    calls = []
    replaced = tuple(recording_backend(backend.name, backend.priority, calls) for backend in dispatch._CORE_BACKENDS)
    monkeypatch.setattr(dispatch, "_CORE_BACKENDS", replaced)
    power_retention(**random_inputs(b=1, t=4, hq=1, h=1, d=4), backend=name)
    assert calls == [name]


def test_explicit_backends_agree(generator):
    inputs = random_inputs(b=1, t=20, hq=2, h=1, d=8, dtype=torch.float64, state=True, generator=generator)
    expected = power_retention(**inputs, backend="reference")
    for name in ("auto", "cpu"):
        assert relative_error(power_retention(**inputs, backend=name), expected) < 1e-9, name


def test_cpu_backend_refuses_other_devices():
    with pytest.raises(ValueError, match=r"backend='cpu' cannot run this call: .*CPU tensors, got device meta"):
        select_backend(problem_of(device="meta"), "cpu")
    assert select_backend(problem_of(device="meta"), "auto").name == "reference"  # the fallback supports all


def test_auto_prefers_priority_and_skips_unsupported(monkeypatch, fresh_discovery):
    calls = []
    refuses = recording_backend("cuda", 30, calls, supports=lambda problem: "needs CUDA tensors")
    accepts = recording_backend("triton", 20, calls)
    fake_kernels(monkeypatch, __version__, [refuses, accepts])
    assert select_backend(problem_of(), "auto").name == "triton"
    power_retention(**random_inputs(b=1, t=4, hq=1, h=1, d=4))
    assert calls == ["triton"]
    with pytest.raises(ValueError, match="backend='cuda' cannot run this call: needs CUDA tensors"):
        power_retention(**random_inputs(b=1, t=4, hq=1, h=1, d=4), backend="cuda")


def test_kernel_backends_discovered_at_the_same_version(monkeypatch, fresh_discovery, generator):
    calls = []
    fake_kernels(monkeypatch, __version__, [recording_backend("triton", 20, calls)])
    assert "triton" in available_backends()
    inputs = random_inputs(b=1, t=9, hq=2, h=1, d=4, dtype=torch.float64, generator=generator)
    Y = power_retention(**inputs, backend="triton")
    assert calls == ["triton"]
    assert relative_error(Y, power_retention(**inputs, backend="reference")) < 1e-12


def test_kernel_version_mismatch_is_refused_with_a_warning(monkeypatch, fresh_discovery):
    fake_kernels(monkeypatch, "0.0.1", [recording_backend("triton", 20, [])])
    with pytest.warns(RuntimeWarning, match=rf"retention-kernels 0.0.1 does not match retention-core {__version__}"):
        assert "triton" not in available_backends()
    with pytest.raises(ValueError, match=rf"backend='triton' is not available: retention-kernels 0.0.1 does not "
                                         rf"match .*pip install retention-kernels=={__version__}"):
        power_retention(**random_inputs(b=1, t=4, hq=1, h=1, d=4), backend="triton")
    assert select_backend(problem_of(), "auto").name == "cpu"  # auto still works without the kernels


def test_kernels_not_installed(monkeypatch, fresh_discovery):
    monkeypatch.setitem(sys.modules, "retention_kernels", None)  # makes the import raise ImportError
    dispatch.reset_discovery()
    assert set(available_backends()) == {"cpu", "reference"}
    with pytest.raises(ValueError, match=r"backend='cuda' is not available: retention-kernels is not installed"):
        power_retention(**random_inputs(b=1, t=4, hq=1, h=1, d=4), backend="cuda")


def test_kernels_without_the_requested_backend(monkeypatch, fresh_discovery):
    fake_kernels(monkeypatch, __version__, [])
    with pytest.raises(ValueError, match=r"backend='cuda' is not available: retention-kernels provides no 'cuda'"):
        get_backend("cuda")


def test_attend_window_selection(monkeypatch, fresh_discovery):
    """Inference asks for the optional ``attend_window``: the best backend having it, else None (plain path)."""
    fake_kernels(monkeypatch, __version__, [])
    problem = problem_of()
    with_window = recording_backend("triton", 20, [], attend_window=lambda problem, G: None)
    expected = next((b for b in sorted(available_backends().values(), key=lambda b: -b.priority)
                     if b.attend_window is not None), None)
    assert select_backend(problem, "auto", need="attend_window") is expected
    assert select_backend(problem, "reference", need="attend_window") is None
    fake_kernels(monkeypatch, __version__, [with_window])
    chosen = select_backend(problem, "auto", need="attend_window")
    assert chosen is with_window or chosen.priority > with_window.priority


def test_per_operation_priority(monkeypatch, fresh_discovery):
    """A backend below another overall can still be the best at one operation (CUDA's attend_window)."""
    calls = []
    overall = recording_backend("triton", 20, calls, attend_window=lambda problem, G: "triton window")
    window_only = Backend("cuda", 15, lambda problem: None, get_backend("reference").forward,
                          attend_window=lambda problem, G: "cuda window", priorities=(("attend_window", 30),))
    fake_kernels(monkeypatch, __version__, [overall, window_only])
    problem = problem_of()
    assert select_backend(problem, "auto").name == "triton"
    assert select_backend(problem, "auto", need="attend_window").name == "cuda"
    assert window_only.priority_for("attend_window") == 30 and window_only.priority_for("forward") == 15
    assert select_backend(problem, "triton", need="attend_window") is overall
