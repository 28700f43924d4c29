"""The three torch references agree (SPEC.md section 5, invariants 2-4) and their gradients are right.

quadratic (section 1, the oracle) == recurrent (section 2, token by token) == chunked (section 3), in float64,
with gating, initial states, GQA and degrees 1 to 4; ``torch.autograd.gradcheck`` on tiny shapes.
"""

from __future__ import annotations

import pytest
import torch

from retention.reference import (
    expand_heads,
    normalise,
    power_retention_chunked,
    power_retention_quadratic,
    power_retention_recurrent,
    update_state,
)
from retention.testing import random_inputs, relative_error

FP64_TOLERANCE = 1e-10  # norm-wise relative error between float64 evaluations of the same formula


def offset_for(deg: int) -> float:
    """Odd degrees have signed weights: a positive mean keeps their denominators away from zero."""
    return 0.7 if deg % 2 else 0.0


@pytest.mark.parametrize("deg", [1, 2, 3, 4])
@pytest.mark.parametrize("gating", [False, True])
@pytest.mark.parametrize("state", [False, True])
def test_quadratic_recurrent_chunked_agree(deg, gating, state, generator):
    d = 8 if deg < 4 else 4
    inputs = random_inputs(b=2, t=21, hq=4, h=2, d=d, e=5, dtype=torch.float64, gating=gating, state=state,
                           deg=deg, offset=offset_for(deg), generator=generator)
    expected = power_retention_quadratic(**inputs, deg=deg, return_final_state=True)
    forms = {"recurrent": power_retention_recurrent(**inputs, deg=deg, return_final_state=True)}
    for chunk_size in (1, 4, 16, 21, 64):
        forms[f"chunked c={chunk_size}"] = power_retention_chunked(
            **inputs, deg=deg, chunk_size=chunk_size, return_final_state=True
        )
    for form, result in forms.items():
        for name, actual, oracle in zip(("Y", "state", "sum_of_keys"), result, expected):
            assert actual.dtype == torch.float64
            assert relative_error(actual, oracle) < FP64_TOLERANCE, f"{form}: {name}"


def test_quadratic_matches_explicit_loops(generator):
    """The oracle itself against the formula of section 1 written out one weight at a time."""
    inputs = random_inputs(b=1, t=6, hq=2, h=1, d=3, e=2, dtype=torch.float64, generator=generator)
    Q, K, V, log_G = inputs["Q"], inputs["K"], inputs["V"], inputs["log_G"]
    deg, scale = 3, 0.7
    G = log_G.cumsum(1)
    expected = torch.zeros(1, 6, 2, 2, dtype=torch.float64)
    for head in range(2):
        for i in range(6):
            weights = [(scale * Q[0, i, head] @ K[0, j, 0]) ** deg * torch.exp(G[0, i, 0] - G[0, j, 0])
                       for j in range(i + 1)]
            expected[0, i, head] = sum(w * V[0, j, 0] for j, w in enumerate(weights)) / sum(weights)
    actual = power_retention_quadratic(**inputs, deg=deg, scale=scale)
    assert relative_error(actual, expected) < FP64_TOLERANCE


def test_gate_decays_earlier_steps_only():
    """``exp(G_i - G_j)`` is the product of the gates of steps ``j+1..i``: a step's own gate never touches
    its own key. Two steps, gate of step 2 = g: ``y_2 = (g w_1 v_1 + w_2 v_2) / (g w_1 + w_2)``."""
    Q = torch.tensor([[[[1.0]], [[1.0]]]], dtype=torch.float64)  # [1, 2, 1, 1]
    K = torch.tensor([[[[1.0]], [[2.0]]]], dtype=torch.float64)
    V = torch.tensor([[[[3.0]], [[5.0]]]], dtype=torch.float64)
    g = 0.25
    log_G = torch.tensor([[[-7.0], [torch.log(torch.tensor(g)).item()]]], dtype=torch.float64)
    Y = power_retention_quadratic(Q, K, V, log_G, deg=2, scale=1.0)
    assert Y[0, 0, 0, 0].item() == pytest.approx(3.0)  # the first gate decays nothing
    assert Y[0, 1, 0, 0].item() == pytest.approx((g * 1 * 3 + 4 * 5) / (g * 1 + 4))


def test_initial_state_equals_running_the_earlier_segment(generator):
    inputs = random_inputs(b=2, t=30, hq=2, h=2, d=4, dtype=torch.float64, generator=generator)
    first = {name: x[:, :11] for name, x in inputs.items()}
    second = {name: x[:, 11:] for name, x in inputs.items()}
    Y_full, state_full, keys_full = power_retention_quadratic(**inputs, return_final_state=True)
    Y_a, state_a, keys_a = power_retention_quadratic(**first, return_final_state=True)
    Y_b, state_b, keys_b = power_retention_quadratic(**second, initial_state=state_a, sum_of_keys=keys_a,
                                                     return_final_state=True)
    assert relative_error(torch.cat([Y_a, Y_b], 1), Y_full) < FP64_TOLERANCE
    assert relative_error(state_b, state_full) < FP64_TOLERANCE
    assert relative_error(keys_b, keys_full) < FP64_TOLERANCE


def test_update_state_folds_segments(generator):
    """Folding A then B equals folding A+B (``G`` is cumulative within each folded segment)."""
    K = torch.randn(2, 9, 3, 4, generator=generator, dtype=torch.float64)
    V = torch.randn(2, 9, 3, 5, generator=generator, dtype=torch.float64)
    log_G = -torch.rand(2, 9, 3, generator=generator, dtype=torch.float64)
    full = update_state(K, V, log_G.cumsum(1), 3, dtype=torch.float64)
    a = update_state(K[:, :4], V[:, :4], log_G[:, :4].cumsum(1), 3, dtype=torch.float64)
    b = update_state(K[:, 4:], V[:, 4:], log_G[:, 4:].cumsum(1), 3, *a, dtype=torch.float64)
    for actual, expected in zip(b, full):
        assert relative_error(actual, expected) < FP64_TOLERANCE
    empty = update_state(K[:, :0], V[:, :0], log_G[:, :0], 3, *a, dtype=torch.float64)
    for actual, expected in zip(empty, a):
        torch.testing.assert_close(actual, expected, rtol=0, atol=0)


def test_expand_heads_uses_repeat_interleave_convention():
    x = torch.arange(6.0).reshape(1, 1, 2, 3)  # heads 0 and 1
    (repeated,) = expand_heads(3, x)
    assert repeated.shape == (1, 1, 6, 3)
    for query_head in range(6):
        torch.testing.assert_close(repeated[0, 0, query_head], x[0, 0, query_head // 3])
    assert expand_heads(1, x)[0] is x


def test_normalise_zero_denominator_gives_zero_and_finite_gradients():
    numerator = torch.tensor([[0.0, 0.0], [2.0, 4.0]], dtype=torch.float64, requires_grad=True)
    denominator = torch.tensor([0.0, 2.0], dtype=torch.float64, requires_grad=True)
    out = normalise(numerator, denominator)
    torch.testing.assert_close(out, torch.tensor([[0.0, 0.0], [1.0, 2.0]], dtype=torch.float64))
    out.sum().backward()
    torch.testing.assert_close(numerator.grad, torch.tensor([[0.0, 0.0], [0.5, 0.5]], dtype=torch.float64))
    torch.testing.assert_close(denominator.grad, torch.tensor([0.0, -6.0 / 4.0], dtype=torch.float64))


@pytest.mark.parametrize("deg", [1, 2, 3, 4])
def test_zero_query_row_is_zero_for_every_form(deg, generator):
    inputs = random_inputs(b=1, t=7, hq=2, h=1, d=3, dtype=torch.float64, state=True, deg=deg, generator=generator)
    inputs["Q"][:, 4] = 0.0
    for form in (power_retention_quadratic, power_retention_recurrent, power_retention_chunked):
        kwargs = {"chunk_size": 3} if form is power_retention_chunked else {}
        Y = form(**inputs, deg=deg, **kwargs)
        assert torch.equal(Y[:, 4], torch.zeros_like(Y[:, 4])), form.__name__


def tiny_inputs(generator, deg):
    inputs = random_inputs(b=1, t=6, hq=2, h=1, d=3, e=2, dtype=torch.float64, state=True, deg=deg,
                           offset=offset_for(deg), generator=generator)
    return tuple(inputs[name].requires_grad_() for name in ("Q", "K", "V", "log_G", "initial_state", "sum_of_keys"))


@pytest.mark.parametrize("deg", [1, 2, 3])
@pytest.mark.parametrize(
    "form",
    [
        power_retention_quadratic,
        power_retention_recurrent,
        lambda *args, **kwargs: power_retention_chunked(*args, chunk_size=4, **kwargs),  # 6 = 4 + 2: padding
    ],
    ids=["quadratic", "recurrent", "chunked"],
)
def test_gradcheck(form, deg, generator):
    def outputs(*tensors):
        return form(*tensors, deg=deg, scale=0.8, return_final_state=True)

    assert torch.autograd.gradcheck(outputs, tiny_inputs(generator, deg))


def test_gradgradcheck_quadratic(generator):
    def outputs(*tensors):
        return power_retention_quadratic(*tensors, deg=2, return_final_state=True)

    assert torch.autograd.gradgradcheck(outputs, tiny_inputs(generator, 2))
