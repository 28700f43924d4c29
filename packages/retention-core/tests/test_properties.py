"""Property-based tests (hypothesis) over shapes, dtypes, degrees, chunk sizes, gate strengths and states, for
every backend: the oracle within the tolerance rule (forward and backward), chunk invariance and segments.

Odd degrees have signed weights whose denominators can vanish (SPEC.md section 1); they are drawn with a
positive offset on Q and K and checked in fp32/fp64, where the rule stays meaningful.
"""

from __future__ import annotations

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from retention.reference import power_retention_quadratic
from retention.sympow import sympow_dim
from retention.testing import check_against_oracle, random_inputs, relative_error

# The backend fixture is the same for every example of a test, so function-scoped fixtures are fine here.
SETTINGS = settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
DTYPES = {"fp32": torch.float32, "fp64": torch.float64, "bf16": torch.bfloat16, "fp16": torch.float16}


@st.composite
def problems(draw, dtypes=tuple(DTYPES)):
    """Keyword arguments of ``random_inputs`` plus ``deg`` and ``chunk_size`` for ``power_retention``."""
    dtype = DTYPES[draw(st.sampled_from(dtypes))]
    deg = draw(st.integers(1, 4) if dtype in (torch.float32, torch.float64) else st.sampled_from([2, 4]))
    # d = 1, very short sequences and very strong gates make gradients zero up to rounding (with d = 1, q^p
    # cancels from y; a row whose earlier keys are gated away has y = v), where a relative error compares only
    # rounding noise of different algorithms. test_api covers t = 1, 2 and gates of -20 per step directly.
    d = draw(st.sampled_from([2, 3, 4, 8, 16] if deg < 4 else [2, 4, 8]))
    h = draw(st.integers(1, 2))
    t = draw(st.integers(4, 40))
    gate_strength = draw(st.sampled_from([0.0, 0.1, 1.0, 3.0]))  # log_G down to about -20 per step
    return {
        "inputs": {
            "b": draw(st.integers(1, 2)), "t": t, "h": h, "hq": h * draw(st.integers(1, 3)), "d": d,
            "e": draw(st.sampled_from([1, 3, d])), "dtype": dtype, "deg": deg,
            "gating": gate_strength > 0, "gate_strength": gate_strength,
            "magnitude": draw(st.sampled_from([0.5, 1.0, 2.0])), "state": draw(st.booleans()),
            "offset": 1.0 if deg % 2 else 0.0,
            "generator": torch.Generator().manual_seed(draw(st.integers(0, 2**31))),
        },
        "deg": deg,
        "chunk_size": draw(st.one_of(st.none(), st.integers(1, 48))),
    }


@SETTINGS
@given(problem=problems())
def test_oracle(run, require_dtype, problem):
    require_dtype(problem["inputs"]["dtype"])
    inputs = random_inputs(**problem["inputs"])
    assert sympow_dim(problem["inputs"]["d"], problem["deg"]) <= 816
    check_against_oracle(run, inputs, return_final_state=True, deg=problem["deg"],
                         chunk_size=problem["chunk_size"], generator=problem["inputs"]["generator"])


@SETTINGS
@given(problem=problems(dtypes=("fp64",)), other_chunk=st.integers(1, 48))
def test_chunk_invariance(run, exact, problem, other_chunk):
    inputs = random_inputs(**{**problem["inputs"], "dtype": exact.dtype})
    deg = problem["deg"]
    results = [run(**inputs, deg=deg, chunk_size=c, return_final_state=True) for c in (problem["chunk_size"],
                                                                                       other_chunk)]
    oracle = power_retention_quadratic(**inputs, deg=deg, return_final_state=True)
    for result in results:
        for name, actual, expected in zip(("Y", "state", "sum_of_keys"), result, oracle):
            assert relative_error(actual, expected) < exact.tolerance, name


@SETTINGS
@given(problem=problems(dtypes=("fp64",)), split=st.floats(0.0, 1.0))
def test_segments(run, exact, problem, split):
    inputs = random_inputs(**{**problem["inputs"], "dtype": exact.dtype})
    t, deg, chunk_size = inputs["Q"].shape[1], problem["deg"], problem["chunk_size"]
    cut = min(max(1, round(split * t)), t - 1) if t > 1 else 1
    sequence = {name: x for name, x in inputs.items() if name not in ("initial_state", "sum_of_keys")}
    state = (inputs["initial_state"], inputs["sum_of_keys"]) if "initial_state" in inputs else None
    outputs = []
    for part in (slice(None, cut), slice(cut, None)):
        pieces = {name: x[:, part] for name, x in sequence.items()}
        if pieces["Q"].shape[1]:
            Y, *state = run(**pieces, initial_state=state, deg=deg, chunk_size=chunk_size, return_final_state=True)
            outputs.append(Y)
    oracle = power_retention_quadratic(**inputs, deg=deg, return_final_state=True)
    assert relative_error(torch.cat(outputs, 1), oracle[0]) < exact.tolerance
    assert relative_error(state[0], oracle[1]) < exact.tolerance
    assert relative_error(state[1], oracle[2]) < exact.tolerance
