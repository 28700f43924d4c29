"""Op-level tests of the numba backend (retention.cpu): the feature map and its Jacobian against
``retention.sympow`` and autograd, the chunk kernels against their formulas, and the autograd Function
(forward and backward) against the float64 oracle with the tolerance rule of SPEC.md section 5, plus
gradcheck in float64. Every input is drawn fresh (seeded per test by conftest)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from retention import sympow, sympow_dim
from retention._validate import validate
from retention.cpu import default_chunk_size, kernels, power_retention_cpu
from retention.cpu.function import PowerRetentionCPU, one_blas_thread
from retention.reference import power_retention_quadratic, update_state
from retention.sympow import sympow_table
from retention.testing import check_against_oracle, random_inputs, relative_error

pytestmark = pytest.mark.filterwarnings("ignore::numba.NumbaPerformanceWarning")


def table(d: int, deg: int, dtype=np.float64):
    index, weight = sympow_table(d, deg)
    return index, weight.astype(dtype)


def run_cpu(Q, K, V, log_G=None, initial_state=None, sum_of_keys=None, return_final_state=False, deg=2,
            scale=None, chunk_size=None):
    """The op on a validated problem, outputs in the compute dtype (no API casts)."""
    problem = validate(Q, K, V, log_G, initial_state, sum_of_keys, deg, scale, chunk_size, return_final_state)
    Y, state, keys = power_retention_cpu(problem)
    return (Y, state, keys) if return_final_state else Y


# ----------------------------------------------------------------------------------------------- feature map


@pytest.mark.parametrize("deg", [1, 2, 3, 4])
@pytest.mark.parametrize("d", [1, 3, 8])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_features_match_sympow(d, deg, dtype, generator):
    x = torch.randn(7, d, generator=generator, dtype=torch.float64)
    index, weight = table(d, deg, dtype)
    out = np.full((index.shape[0], 7), np.nan, dtype=dtype)
    kernels.sympow_features(x.numpy().astype(dtype), index, weight, out)
    expected = sympow(x, deg).T
    tolerance = 1e-6 if dtype == np.float32 else 1e-14
    assert relative_error(torch.from_numpy(out), expected) < tolerance


@pytest.mark.parametrize("deg", [1, 2, 3, 4])
@pytest.mark.parametrize("d", [1, 3, 8])
def test_feature_jacobian_matches_autograd(d, deg, generator):
    x = torch.randn(5, d, generator=generator, dtype=torch.float64, requires_grad=True)
    D = sympow_dim(d, deg)
    cotangent = torch.randn(5, D, generator=generator, dtype=torch.float64)
    (expected,) = torch.autograd.grad((sympow(x, deg) * cotangent).sum(), x)
    start = torch.randn(5, d, generator=generator, dtype=torch.float64)  # the kernel accumulates into grad_x
    grad_x = start.numpy().copy()
    kernels.sympow_features_vjp(x.detach().numpy(), *table(d, deg), cotangent.T.contiguous().numpy(), grad_x)
    assert relative_error(torch.from_numpy(grad_x), start + expected) < 1e-13


# ----------------------------------------------------------------------------------------------- chunk kernels


def chunk_problem(generator, C=6, group=2, d=4, e=3, deg=2):
    draw = lambda *shape: torch.randn(*shape, generator=generator, dtype=torch.float64)
    q, k, v = draw(C * group, d), draw(C, d), draw(C, e)
    v1 = torch.cat([v, torch.ones(C, 1, dtype=torch.float64)], dim=1)
    G = (-torch.rand(C, generator=generator, dtype=torch.float64)).cumsum(0)
    state = draw(sympow_dim(d, deg), e + 1)
    return q, k, v, v1, G, state


@pytest.mark.parametrize("deg", [1, 2, 3])
@pytest.mark.parametrize("group", [1, 3])
def test_chunk_forward_formula(deg, group, generator):
    q, k, _, v1, G, state = chunk_problem(generator, group=group, deg=deg)
    C, d, s = k.shape[0], k.shape[1], 0.7
    step = torch.arange(C * group) // group  # row i is step i // group
    weights = (s * q @ k.T) ** deg * (G[step, None] - G[None, :]).exp()
    weights = weights.masked_fill(torch.arange(C)[None, :] > step[:, None], 0)
    expected = weights @ v1 + s**deg * G[step, None].exp() * (sympow(q, deg) @ state)
    phi_q = np.full((state.shape[0], C * group), np.nan)
    out = kernels.chunk_forward(q.numpy(), k.numpy(), v1.numpy(), G.numpy(), state.numpy(), *table(d, deg), deg, s,
                                group, phi_q)
    assert relative_error(torch.from_numpy(out), expected) < 1e-13


@pytest.mark.parametrize("deg", [1, 2, 4])
def test_chunk_state_update_matches_reference(deg, generator):
    _, k, v, v1, G, state = chunk_problem(generator, deg=deg)
    d, e = k.shape[1], v.shape[1]
    expected_S, expected_z = update_state(k[None, :, None], v[None, :, None], G[None, :, None], deg,
                                          state[None, None, :, :e], state[None, None, :, e], dtype=torch.float64)
    carried = state.numpy().copy()
    kernels.chunk_state_update(k.numpy(), v1.numpy(), G.numpy(), carried, *table(d, deg),
                               np.full((state.shape[0], k.shape[0]), np.nan))
    assert relative_error(torch.from_numpy(carried[:, :e]), expected_S[0, 0]) < 1e-13
    assert relative_error(torch.from_numpy(carried[:, e]), expected_z[0, 0]) < 1e-13


# ----------------------------------------------------------------------------------------------- the op vs the oracle


@pytest.mark.parametrize("chunk_size", [1, 5, 16, None, "t"])
@pytest.mark.parametrize("state", [False, True])
def test_chunk_sizes(chunk_size, state, generator):
    t = 21
    inputs = random_inputs(b=2, t=t, hq=4, h=2, d=8, state=state, generator=generator)
    chunk = t if chunk_size == "t" else chunk_size
    check_against_oracle(run_cpu, inputs, return_final_state=True, chunk_size=chunk, generator=generator)


@pytest.mark.parametrize("deg", [1, 2, 3, 4])
@pytest.mark.parametrize(("hq", "h"), [(2, 2), (6, 2)])
def test_degrees_and_gqa(deg, hq, h, generator):
    # A positive offset keeps odd-degree denominators away from zero (they can vanish: SPEC section 1).
    inputs = random_inputs(b=1, t=19, hq=hq, h=h, d=4, e=5, deg=deg, state=True, offset=0.7 * (deg % 2),
                           generator=generator)
    check_against_oracle(run_cpu, inputs, return_final_state=True, deg=deg, chunk_size=6, generator=generator)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_low_precision_inputs(dtype, generator):
    inputs = random_inputs(b=2, t=40, hq=2, h=1, d=16, dtype=dtype, state=True, generator=generator)
    Y, state, keys = run_cpu(**inputs, return_final_state=True, chunk_size=16)
    assert Y.dtype == state.dtype == keys.dtype == torch.float32  # fp32 accumulation, outputs in compute dtype
    check_against_oracle(run_cpu, inputs, return_final_state=True, chunk_size=16, generator=generator)


@pytest.mark.parametrize("d", [2, 16, 32, 64])  # d=1: y does not depend on q at all
def test_head_dims(d, generator):
    inputs = random_inputs(b=1, t=10, hq=1, h=1, d=d, e=max(d // 2, 1), generator=generator)
    check_against_oracle(run_cpu, inputs, return_final_state=True, chunk_size=4, generator=generator)


def test_single_step(generator):
    inputs = random_inputs(b=3, t=1, hq=2, h=1, d=8, state=True, generator=generator)
    check_against_oracle(run_cpu, inputs, return_final_state=True, generator=generator)


def test_non_contiguous_inputs(generator):
    inputs = random_inputs(b=2, t=18, hq=4, h=2, d=8, state=True, generator=generator)
    # Same values, strided memory: time-major views of head-major storage, and a sliced head dim.
    inputs["Q"] = inputs["Q"].transpose(1, 2).contiguous().transpose(1, 2)
    inputs["K"] = torch.cat([inputs["K"], inputs["K"]], dim=-1)[..., :8]
    inputs["V"] = inputs["V"].permute(3, 0, 1, 2).contiguous().permute(1, 2, 3, 0)
    inputs["log_G"] = inputs["log_G"].transpose(1, 2).contiguous().transpose(1, 2)
    inputs["initial_state"] = inputs["initial_state"].transpose(2, 3).contiguous().transpose(2, 3)
    assert not any(inputs[name].is_contiguous() for name in ("Q", "K", "V", "log_G", "initial_state"))
    check_against_oracle(run_cpu, inputs, return_final_state=True, chunk_size=5, generator=generator)


@pytest.mark.parametrize("chunk_size", [4, 16])
def test_strong_gating(chunk_size, generator):
    """log_G ~ -20 per step: e^{G} underflows within a chunk (e^{-320} in fp32); outputs stay exact, never 0/0."""
    inputs = random_inputs(b=1, t=32, hq=2, h=1, d=8, state=True, generator=generator)
    inputs["log_G"] = -20 * (0.5 + torch.rand(1, 32, 1, generator=generator))
    errors = check_against_oracle(run_cpu, inputs, return_final_state=True, chunk_size=chunk_size,
                                  generator=generator)
    assert errors["Y"] < 1e-5


@pytest.mark.parametrize(("dtype", "magnitude"), [(torch.float16, 64.0), (torch.bfloat16, 256.0),
                                                  (torch.float32, 1024.0)])
def test_large_magnitudes(dtype, magnitude, generator):
    """(s q.k)^4 far beyond the fp16 range: fp32 accumulation keeps Y and its gradients finite and on the oracle.
    (The state of such keys, and its gradient w.r.t. fp16 keys, do not fit fp16 at all: Y only.)"""
    inputs = random_inputs(b=1, t=24, hq=2, h=1, d=16, dtype=dtype, magnitude=magnitude, deg=4, generator=generator)
    check_against_oracle(run_cpu, inputs, deg=4, chunk_size=8, generator=generator,
                         plain_scales=(1 / magnitude, 1 / magnitude))


def test_zero_query_rows_give_zero(generator):
    """A row whose weights are all exactly zero (q_i = 0, no state) outputs 0 with zero gradients, never NaN."""
    inputs = random_inputs(b=1, t=12, hq=1, h=1, d=4, generator=generator, requires_grad=False)
    inputs["Q"][:, 3] = 0
    inputs["Q"].requires_grad_(True)
    Y = run_cpu(**inputs, chunk_size=5)
    assert torch.equal(Y[:, 3], torch.zeros_like(Y[:, 3]))
    check_against_oracle(run_cpu, inputs, chunk_size=5, generator=generator)


def test_default_chunk_size_equals_quadratic(generator):
    """chunk_size=None picks a chunk (at most t) and gives the oracle's result for t on both sides of it."""
    for t in (7, default_chunk_size(10**6, sympow_dim(4, 2)) + 9):
        assert default_chunk_size(t, sympow_dim(4, 2)) <= t
        inputs = random_inputs(b=1, t=t, hq=1, h=1, d=4, generator=generator)
        check_against_oracle(run_cpu, inputs, return_final_state=True, generator=generator)


def test_default_chunk_size_bounds_the_feature_scratch():
    assert default_chunk_size(10**6, sympow_dim(64, 2)) == 128
    assert default_chunk_size(10**6, sympow_dim(64, 4)) == 32  # D = 766480
    assert default_chunk_size(10, sympow_dim(64, 4)) == 10


def test_double_backward_is_refused(generator):
    inputs = random_inputs(b=1, t=6, hq=1, h=1, d=4, generator=generator, requires_grad=True)
    cotangent = torch.randn(1, 6, 1, 4, generator=generator, requires_grad=True)
    Y = run_cpu(**inputs, chunk_size=4)
    (grad_Q,) = torch.autograd.grad((Y * cotangent).sum(), inputs["Q"], create_graph=True)
    with pytest.raises(RuntimeError, match="differentiate twice"):
        grad_Q.sum().backward()


def test_outputs_overwrite_the_poison():
    """Outputs start as NaN (function.py) and the kernels must write every element, padded rows included."""
    inputs = random_inputs(b=1, t=11, hq=3, h=1, d=4, requires_grad=True)
    Y, state, keys = run_cpu(**inputs, return_final_state=True, chunk_size=4)
    (Y.sum() + state.sum() + keys.sum()).backward()
    for x in (Y, state, keys, *(inputs[name].grad for name in ("Q", "K", "V", "log_G"))):
        assert not torch.isnan(x).any()


def test_gradients_flow_only_where_needed(generator):
    inputs = random_inputs(b=1, t=9, hq=1, h=1, d=4, state=True, generator=generator)
    inputs["V"].requires_grad_(True)
    Y = run_cpu(**inputs, chunk_size=4)
    (grad_V,) = torch.autograd.grad(Y.sum(), inputs["V"])
    oracle = {name: x.double() for name, x in inputs.items()}
    oracle["V"].requires_grad_(True)
    (expected,) = torch.autograd.grad(power_retention_quadratic(**oracle).sum(), oracle["V"])
    assert relative_error(grad_V, expected) < 1e-5


# ----------------------------------------------------------------------------------------------- gradcheck (fp64)


@pytest.mark.parametrize(("deg", "chunk"), [(1, 2), (2, 2), (2, 5), (3, 3)])
def test_gradcheck(deg, chunk, generator):
    """Q, K, V, log_G, initial state and sum of keys, through Y and the final state (t=5: padded chunks)."""
    inputs = random_inputs(b=1, t=5, hq=2, h=1, d=3, e=2, dtype=torch.float64, deg=deg, state=True,
                           offset=0.7 * (deg % 2), generator=generator, requires_grad=True)
    names = ("Q", "K", "V", "log_G", "initial_state", "sum_of_keys")
    scale = 0.8

    def op(*tensors):
        return PowerRetentionCPU.apply(*tensors, deg, scale, chunk)

    assert torch.autograd.gradcheck(op, tuple(inputs[name] for name in names), eps=1e-6, atol=1e-7, rtol=1e-5)


def test_gradcheck_without_state_or_gates(generator):
    inputs = random_inputs(b=2, t=4, hq=1, h=1, d=2, e=2, dtype=torch.float64, gating=False, generator=generator,
                           requires_grad=True)

    def op(Q, K, V):
        return PowerRetentionCPU.apply(Q, K, V, None, None, None, 2, 0.5, 3)

    assert torch.autograd.gradcheck(op, (inputs["Q"], inputs["K"], inputs["V"]), eps=1e-6, atol=1e-7)


def test_blas_is_single_threaded_inside_the_kernels():
    """The kernels parallelise over (b, h); BLAS threads inside the workers would oversubscribe the cores."""
    from threadpoolctl import threadpool_info

    with one_blas_thread():
        assert all(lib["num_threads"] == 1 for lib in threadpool_info() if lib["user_api"] == "blas")
