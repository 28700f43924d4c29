"""The chunk-parallel deg-2 state pass (``pair_scan.py``) against the sequential one (``pairs.pair_state_kernel``
through ``function._pair_state_pass``), a float64 torch definition of the pass, and, swapped into the backend,
the float64 oracle of the whole forward + backward (SPEC.md section 5 tolerance rule).

Without CUDA the kernels run under ``TRITON_INTERPRET=1`` (conftest.py) on small fp32 shapes. Every output
buffer starts as NaN, so an element that no kernel wrote fails the comparison.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from retention import power_retention
from retention.testing import check_against_oracle, random_inputs, relative_error
from retention_kernels.triton import function
from retention_kernels.triton.pair_scan import pair_state_pass_parallel, reference_state_pass

# The sequential pass (pairs.pair_state_kernel): function._pair_state_pass until function.py switches between the
# two passes (then _pair_state_pass_sequential).
SEQUENTIAL = getattr(function, "_pair_state_pass_sequential", function._pair_state_pass)
# fp32 accumulation in a different order (per chunk, then across chunks) than the sequential kernel
FP32_AGREEMENT = 2e-6


@pytest.fixture(autouse=True)
def poison(monkeypatch):
    monkeypatch.setattr(function, "POISON", True)


def run_pass(state_pass, problem, device):
    """``state_pass`` on fresh NaN-poisoned buffers: ``(states, Ms, final, final_M)``."""
    X, V, delta, log_G, init, init_M, h, C, scale, backward = problem
    b, t, hx, d = X.shape
    e = V.shape[3]
    layout = function._pair_layout(d, device)
    plan = function._plan(X, X, V, 2, C)
    G = function._local_gates(log_G, plan, b, h, device)
    states = function._new(b * h, plan.n, layout.DI, e, device=device)
    Ms = function._new(b * h, plan.n, layout.DP, layout.DP, device=device)
    final = function._new(b, h, layout.DI, e, device=device)
    final_M = function._new(b, h, layout.DP, layout.DP, device=device)
    state_pass(X, V, delta, G, log_G, layout, plan, init, init_M, states, Ms, final, final_M, h, scale, backward)
    return states, Ms, final, final_M


def make_problem(device, b=1, t=45, hx=2, h=1, d=24, e=12, C=16, gating=True, has_init=True, backward=False):
    """Inputs of one state pass (forward: X = K, V = V with ``hx = h``; backward: X = Q, V = dn, delta)."""
    layout = function._pair_layout(d, device)
    X = torch.randn(b, t, hx, d, device=device)
    V = torch.randn(b, t, hx, e, device=device)
    delta = torch.randn(b, t, hx, device=device) if backward else None
    log_G = torch.nn.functional.logsigmoid(torch.randn(b, t, h, device=device) + 1.0) if gating else None
    init = torch.randn(b, h, layout.DI, e, device=device) if has_init else None
    init_M = torch.randn(b, h, layout.DP, layout.DP, device=device) if has_init else None
    return X, V, delta, log_G, init, init_M, h, C, 0.3, backward


CASES = {
    # name: make_problem kwargs (n_chunks >= 3, t not a multiple of C, d=24 pads blocks and DP, e=12 pads EP)
    "forward-gates-init": dict(),
    "forward-no-gates-no-init": dict(gating=False, has_init=False),
    "forward-two-heads-batch2": dict(b=2, hx=2, h=2, d=16, e=16, t=40, C=8),
    "backward-gqa2-gates-init": dict(backward=True),
    "backward-gqa2-no-gates-no-init": dict(backward=True, gating=False, has_init=False),
    "backward-one-chunk": dict(backward=True, t=13, C=13),
}


@pytest.mark.parametrize("case", list(CASES))
def test_parallel_pass_equals_sequential_and_float64(case, interpreter):
    problem = make_problem(interpreter, **CASES[case])
    sequential = run_pass(SEQUENTIAL, problem, interpreter)
    parallel = run_pass(pair_state_pass_parallel, problem, interpreter)
    X, V, delta, log_G, init, init_M, h, C, scale, backward = problem
    layout = function._pair_layout(X.shape[3], interpreter)
    exact = reference_state_pass(X, V, delta, log_G, layout, C, init, init_M, h, scale, backward)
    for name, s, p, x in zip(("states", "Ms", "final", "final_M"), sequential, parallel, exact):
        assert torch.isfinite(p).all(), f"{name}: NaN poison left (an element no kernel wrote)"
        assert relative_error(p, s) <= FP32_AGREEMENT, f"{name}: parallel vs sequential {relative_error(p, s):.3g}"
        # both kernels as close to the float64 pass as fp32 allows
        assert relative_error(p, x) <= FP32_AGREEMENT, f"{name}: parallel vs float64 {relative_error(p, x):.3g}"
        assert relative_error(s, x) <= FP32_AGREEMENT, f"{name}: sequential vs float64 {relative_error(s, x):.3g}"


@pytest.mark.parametrize("kwargs, chunk_size", [
    (dict(b=1, t=37, hq=4, h=2, d=16, state=True), 8),
    (dict(b=1, t=40, hq=2, h=1, d=24, gating=False), 16),
])
def test_power_retention_through_parallel_pass_matches_oracle(kwargs, chunk_size, interpreter, monkeypatch):
    """The whole deg-2 forward + backward with the parallel pass swapped in, vs the float64 oracle."""
    calls = []

    def counted(*args, **kw):
        calls.append(kw.get("backward", args[-1]))
        return pair_state_pass_parallel(*args, **kw)

    monkeypatch.setattr(function, "_pair_state_pass", counted)
    inputs = random_inputs(dtype=torch.float32, device=interpreter, **kwargs)

    def run(**x):
        return power_retention(**x, backend="triton")

    check_against_oracle(run, inputs, return_final_state=True, chunk_size=chunk_size)
    assert calls == [False, True]  # the forward and the backward pass both went through it
