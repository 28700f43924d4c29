"""SPEC.md section 5 through ``retention.power_retention`` for every backend that runs on CPU, forward and
backward: oracle, chunk invariance, recurrence, segments, GQA, dtypes/shapes/strides, extreme inputs.

Tolerances follow the rule of section 5 (``retention.testing.check_against_oracle``): the error against the
float64 oracle is at most 3x the error of plain PyTorch in the same precision, plus a floor of 1e-5. Exact
identities (chunk sizes, segments, GQA) are checked in float64 to 1e-9 (fp32 to 5e-5 for backends without fp64:
the ``exact`` fixture).
"""

from __future__ import annotations

import math

import pytest
import torch

from retention import power_retention, sympow_dim
from retention.reference import power_retention_quadratic, power_retention_recurrent
from retention.testing import check_against_oracle, random_inputs, relative_error

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]


def dtype_id(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def results_with_grads(run, inputs: dict, cotangents=None, **kwargs):
    """Outputs ``(Y, state, sum_of_keys)`` of ``run`` and the gradients of every input tensor of ``inputs`` (fresh
    leaves) for the loss ``sum(output * cotangent)``; returns ``(outputs, grads by name, cotangents)``."""
    leaves = {name: x.detach().clone().requires_grad_() if isinstance(x, torch.Tensor) else x
              for name, x in inputs.items()}
    outputs = run(**leaves, return_final_state=True, **kwargs)
    if cotangents is None:
        cotangents = [torch.randn_like(x, dtype=torch.float64) for x in outputs]
    loss = sum((x.double() * cot).sum() for x, cot in zip(outputs, cotangents))
    tensors = {name: x for name, x in leaves.items() if isinstance(x, torch.Tensor)}
    grads = dict(zip(tensors, torch.autograd.grad(loss, list(tensors.values()))))
    return [x.detach() for x in outputs], grads, cotangents


def assert_same(actual: dict | list, expected: dict | list, tolerance: float, what: str = ""):
    items = actual.items() if isinstance(actual, dict) else enumerate(actual)
    for key, x in items:
        error = relative_error(x, expected[key])
        assert error <= tolerance, f"{what} {key}: relative error {error:.3g} > {tolerance:.3g}"


# --- invariant 2: the oracle, forward and backward -------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("gating", [False, True], ids=["ungated", "gated"])
@pytest.mark.parametrize("state", [False, True], ids=["fresh", "state"])
def test_matches_oracle(run, require_dtype, dtype, gating, state, generator):
    require_dtype(dtype)
    inputs = random_inputs(b=2, t=37, hq=4, h=2, d=16, dtype=dtype, gating=gating, state=state, generator=generator)
    # 16 does not divide 37: three chunks, the last one partial (chunk_size=None is tested on longer inputs).
    check_against_oracle(run, inputs, return_final_state=True, chunk_size=16, generator=generator)


@pytest.mark.parametrize("deg", [1, 2, 3, 4])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=dtype_id)
def test_degrees(run, require_dtype, deg, dtype, generator):
    require_dtype(dtype)
    d = 16 if deg < 4 else 8
    # Odd degrees have signed weights: an offset keeps their denominators away from zero.
    inputs = random_inputs(b=1, t=29, hq=2, h=1, d=d, dtype=dtype, state=True, deg=deg,
                           offset=0.7 if deg % 2 else 0.0, generator=generator)
    check_against_oracle(run, inputs, return_final_state=True, deg=deg, chunk_size=8, generator=generator)


@pytest.mark.parametrize("scale", [0.05, 1.0, 3.0])
def test_explicit_scale(run, scale, generator):
    inputs = random_inputs(b=1, t=20, hq=2, h=2, d=8, state=True, generator=generator)
    check_against_oracle(run, inputs, return_final_state=True, scale=scale, generator=generator)


def test_default_chunk_size_and_switch_over(run, generator):
    """``chunk_size=None`` (backend's choice) and ``switch_over_seq_len`` (quadratic below it) on a longer
    sequence, where the backend really chunks."""
    inputs = random_inputs(b=1, t=300, hq=2, h=1, d=8, state=True, generator=generator)
    check_against_oracle(run, inputs, return_final_state=True, generator=generator)
    for switch_over in (64, 1024):
        check_against_oracle(run, inputs, grads=False, chunk_size=32, switch_over_seq_len=switch_over)


# --- invariants 3 and 4: chunk sizes and the recurrence -----------------------------------------------------


def test_chunk_invariance(run, exact, generator):
    t = 70
    inputs = random_inputs(b=2, t=t, hq=2, h=1, d=8, dtype=exact.dtype, state=True, gate_strength=2.0,
                           generator=generator)
    expected, expected_grads, cotangents = results_with_grads(run, inputs, chunk_size=t)
    oracle = power_retention_quadratic(**inputs, return_final_state=True)
    assert_same(expected, oracle, exact.tolerance, what="chunk_size=t vs oracle")
    for chunk_size in (1, 7, 16, 64, 100, None):  # 7 and 16 do not divide 70; 100 > t
        outputs, grads, _ = results_with_grads(run, inputs, cotangents, chunk_size=chunk_size)
        assert_same(outputs, expected, exact.tolerance, what=f"chunk_size={chunk_size}")
        assert_same(grads, expected_grads, exact.tolerance, what=f"chunk_size={chunk_size} grad")


def test_matches_recurrence(run, exact, generator):
    inputs = random_inputs(b=2, t=25, hq=4, h=2, d=4, dtype=exact.dtype, state=True, generator=generator)
    expected = power_retention_recurrent(**inputs, return_final_state=True)
    assert_same(run(**inputs, return_final_state=True, chunk_size=8), expected, exact.tolerance, what="recurrence")


# --- invariant 5: segments ------------------------------------------------------------------------------------


@pytest.mark.parametrize("split", [1, 19, 32, 39])
@pytest.mark.parametrize("state", [False, True], ids=["fresh", "state"])
def test_segments(run, exact, split, state, generator):
    """A then B (B starting from A's final state) equals A+B: outputs, final state and every gradient."""
    inputs = random_inputs(b=2, t=40, hq=4, h=2, d=4, dtype=exact.dtype, state=state, generator=generator)

    def in_two_segments(Q, K, V, log_G, initial_state=None, sum_of_keys=None, return_final_state=True):
        def part(x):
            return {"Q": Q[:, x], "K": K[:, x], "V": V[:, x], "log_G": log_G[:, x]}

        first = run(**part(slice(None, split)), initial_state=initial_state, sum_of_keys=sum_of_keys,
                    return_final_state=True, chunk_size=16)
        second = run(**part(slice(split, None)), initial_state=first[1:], return_final_state=True, chunk_size=16)
        return torch.cat([first[0], second[0]], 1), second[1], second[2]

    expected, expected_grads, cotangents = results_with_grads(run, inputs, chunk_size=16)
    outputs, grads, _ = results_with_grads(in_two_segments, inputs, cotangents)
    assert_same(outputs, expected, exact.tolerance, what="segments")
    assert_same(grads, expected_grads, exact.tolerance, what="segments grad")


def test_segments_low_precision(run, generator):
    """The same in bf16 (state passed on in bf16, sum of keys in fp32), within bf16 tolerance of the oracle."""
    inputs = random_inputs(b=1, t=48, hq=2, h=2, d=16, dtype=torch.bfloat16, generator=generator)
    first = run(**{name: x[:, :20] for name, x in inputs.items()}, return_final_state=True)
    second = run(**{name: x[:, 20:] for name, x in inputs.items()}, initial_state=first[1:])
    oracle = power_retention_quadratic(**inputs)
    error = relative_error(torch.cat([first[0], second], 1), oracle)
    plain = relative_error(power_retention_quadratic(**inputs, dtype=torch.bfloat16), oracle)
    assert error <= 3 * plain + 1e-5


# --- invariant 7: grouped-query attention -----------------------------------------------------------------------


@pytest.mark.parametrize("ratio", [2, 3])
def test_gqa_equals_repeated_heads(run, exact, ratio, generator):
    h = 2
    inputs = random_inputs(b=2, t=21, hq=h * ratio, h=h, d=4, dtype=exact.dtype, state=True, generator=generator)

    def repeated(Q, K, V, log_G, initial_state, sum_of_keys, return_final_state):
        def rep(x, dim):
            return x.repeat_interleave(ratio, dim=dim)

        Y, S, z = run(Q, rep(K, 2), rep(V, 2), rep(log_G, 2), (rep(initial_state, 1), rep(sum_of_keys, 1)),
                      return_final_state=True, chunk_size=8)
        # Every repeated head holds the same state: head i of the original is head i * ratio.
        assert_same([S[:, 1::ratio]], [S[:, ::ratio]], exact.tolerance, what="repeated heads' states")
        return Y, S[:, ::ratio], z[:, ::ratio]

    expected, expected_grads, cotangents = results_with_grads(repeated, inputs)
    outputs, grads, _ = results_with_grads(run, inputs, cotangents, chunk_size=8)
    assert_same(outputs, expected, exact.tolerance, what="GQA")
    assert_same(grads, expected_grads, exact.tolerance, what="GQA grad")


# --- invariant 8: dtypes, shapes, strides, extreme values ----------------------------------------------------


@pytest.mark.parametrize("layout", ["permuted", "strided"])
def test_non_contiguous_inputs(run, layout, generator):
    inputs = random_inputs(b=2, t=19, hq=4, h=2, d=8, state=True, generator=generator)
    for name, x in inputs.items():
        if layout == "permuted":  # stored [.., t, ..] -> a transposed view with the same values
            inputs[name] = x.transpose(0, -1).contiguous().transpose(0, -1)
        else:  # every other element of a twice-as-long last dimension
            inputs[name] = torch.stack([x, torch.full_like(x, float("nan"))], -1).flatten(-2)[..., ::2]
        assert not inputs[name].is_contiguous()
    check_against_oracle(run, inputs, return_final_state=True, chunk_size=8, generator=generator)


@pytest.mark.parametrize("d", [16, 32, 64, 128])
def test_head_dims(run, d, generator):
    inputs = random_inputs(b=1, t=10, hq=1, h=1, d=d, dtype=torch.bfloat16, state=True, generator=generator)
    check_against_oracle(run, inputs, return_final_state=True, chunk_size=8, generator=generator)


def test_value_dim_differs_from_key_dim(run, generator):
    inputs = random_inputs(b=2, t=17, hq=2, h=1, d=8, e=5, state=True, generator=generator)
    check_against_oracle(run, inputs, return_final_state=True, chunk_size=8, generator=generator)


@pytest.mark.parametrize("t", [1, 2, 15, 37, 65])
@pytest.mark.parametrize("chunk_size", [None, 16])
def test_lengths(run, t, chunk_size, generator):
    inputs = random_inputs(b=3, t=t, hq=2, h=2, d=8, state=True, generator=generator)
    check_against_oracle(run, inputs, return_final_state=True, chunk_size=chunk_size, generator=generator)


@pytest.mark.parametrize(
    ("dtype", "deg", "magnitude"),
    [
        (torch.float16, 2, 24.0),  # (s <q, k>)^2 ~ 1e7: overflows fp16 when not kept in fp32
        (torch.bfloat16, 4, 24.0),
        (torch.float16, 2, 1e-3),  # weights ~ 1e-12: underflow fp16
        (torch.float32, 4, 300.0),
        (torch.float32, 2, 1e-6),
    ],
    ids=["fp16-large", "bf16-deg4-large", "fp16-tiny", "fp32-deg4-large", "fp32-tiny"],
)
def test_extreme_magnitudes(run, dtype, deg, magnitude, generator):
    """The plain baseline runs on Q, K rescaled by a power of two (``Y`` does not change), so it is meaningful."""
    inputs = random_inputs(b=2, t=40, hq=2, h=2, d=16, dtype=dtype, deg=deg, magnitude=magnitude,
                           generator=generator)
    power_of_two = 2.0 ** -round(math.log2(magnitude))
    check_against_oracle(run, inputs, return_final_state=True, deg=deg, chunk_size=16,
                         plain_scales=(power_of_two, power_of_two), generator=generator)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=dtype_id)
@pytest.mark.parametrize("gates", ["constant", "uniform"])
@pytest.mark.parametrize("chunk_size", [16, 64, None])
def test_strong_gating(run, dtype, gates, chunk_size, generator):
    """log_G down to -20 per step: exp(G) underflows within a chunk; no 0/0, still the oracle."""
    inputs = random_inputs(b=2, t=80, hq=2, h=2, d=8, dtype=dtype, state=True, generator=generator)
    shape = inputs["log_G"].shape
    inputs["log_G"] = (torch.full(shape, -20.0) if gates == "constant"
                       else -20.0 * torch.rand(shape, generator=generator))
    check_against_oracle(run, inputs, return_final_state=True, chunk_size=chunk_size, generator=generator)


def test_long_ungated_sequence_accumulates_in_fp32(run, generator):
    """Without gating the state grows like t: a bf16 result must be the oracle rounded to bf16 (within 3x that
    rounding), which summing the state or the weights in bf16 would miss by far."""
    inputs = random_inputs(b=1, t=4096, hq=1, h=1, d=4, dtype=torch.bfloat16, gating=False, generator=generator)
    Y, state, keys = run(**inputs, return_final_state=True)
    expected = power_retention_quadratic(**inputs, return_final_state=True)
    for name, actual, oracle in zip(("Y", "state", "sum_of_keys"), (Y, state, keys), expected):
        rounding = relative_error(oracle.to(actual.dtype), oracle)
        assert relative_error(actual, oracle) <= 3 * rounding + 1e-6, name


@pytest.mark.parametrize("state", [False, True], ids=["fresh", "state"])
@pytest.mark.parametrize("deg", [2, 4])
def test_zero_query_row_gives_zero(run, state, deg, generator):
    inputs = random_inputs(b=2, t=20, hq=2, h=1, d=8, state=state, deg=deg, generator=generator)
    inputs["Q"][:, 5] = 0.0
    inputs["Q"][1, 11, 0] = 0.0
    Y = run(**inputs, deg=deg, chunk_size=8)
    assert torch.equal(Y[:, 5], torch.zeros_like(Y[:, 5]))
    assert torch.equal(Y[1, 11, 0], torch.zeros_like(Y[1, 11, 0]))
    check_against_oracle(run, inputs, return_final_state=True, deg=deg, chunk_size=8, generator=generator)


# --- the API contract ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_output_dtypes_shapes_and_devices(run, require_dtype, dtype, generator):
    require_dtype(dtype)
    b, t, hq, h, d, e = 2, 9, 4, 2, 8, 4
    inputs = random_inputs(b=b, t=t, hq=hq, h=h, d=d, e=e, dtype=dtype, generator=generator)
    Y = run(**inputs)
    assert (Y.shape, Y.dtype, Y.device) == ((b, t, hq, e), dtype, inputs["Q"].device)
    Y, S, z = run(**inputs, return_final_state=True)
    D = sympow_dim(d, 2)
    assert (S.shape, S.dtype) == ((b, h, D, e), dtype)
    assert (z.shape, z.dtype) == ((b, h, D), torch.float64 if dtype == torch.float64 else torch.float32)


def test_initial_state_forms_agree(run, generator):
    """``(state, sum_of_keys)``, ``[state, sum_of_keys]`` and ``state`` with ``sum_of_keys=`` are the same call."""
    inputs = random_inputs(b=1, t=10, hq=2, h=1, d=8, state=True, generator=generator)
    state, keys = inputs.pop("initial_state"), inputs.pop("sum_of_keys")
    expected = run(**inputs, initial_state=state, sum_of_keys=keys)
    assert torch.equal(run(**inputs, initial_state=(state, keys)), expected)
    assert torch.equal(run(**inputs, initial_state=[state, keys]), expected)
    positional = run(inputs["Q"], inputs["K"], inputs["V"], inputs["log_G"], (state, keys))
    assert torch.equal(positional, expected)


def test_inputs_are_not_modified(run, generator):
    inputs = random_inputs(b=1, t=20, hq=2, h=1, d=8, dtype=torch.float16, state=True, generator=generator)
    inputs = {name: x.requires_grad_() for name, x in inputs.items()}
    copies = {name: x.detach().clone() for name, x in inputs.items()}
    Y, S, z = run(**inputs, return_final_state=True)
    (Y.float().sum() + S.float().sum() + z.sum()).backward()
    for name, x in inputs.items():
        assert torch.equal(x, copies[name]), name


def test_log_G_other_float_dtypes_are_cast(run, generator):
    inputs = random_inputs(b=1, t=12, hq=2, h=1, d=8, dtype=torch.bfloat16, generator=generator)
    for dtype in (torch.float16, torch.bfloat16, torch.float64):
        log_G = inputs["log_G"].to(dtype)
        assert torch.equal(run(**{**inputs, "log_G": log_G}), run(**{**inputs, "log_G": log_G.float()})), dtype


def test_auto_backend_matches_oracle(generator):
    inputs = random_inputs(b=1, t=33, hq=2, h=1, d=8, state=True, generator=generator)
    check_against_oracle(power_retention, inputs, return_final_state=True, generator=generator)
