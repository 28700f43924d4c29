"""SPEC.md section 5, invariant 6: inference equals training.

Prefill then decode (one token or several at a time) through ``PowerRetentionCache`` and
``power_retention_inference``, across several folds of the window into the state, gives the outputs of the
training forward on the whole sequence (within the tolerance rule against the float64 oracle), and the folded
state equals the training final state. Exact identities use the ``exact`` fixture (float64 to 1e-9 where the
backend takes fp64).
"""

from __future__ import annotations

import pytest
import torch

from retention import PowerRetentionCache, power_retention, power_retention_inference, sympow
from retention.reference import power_retention_quadratic
from retention.testing import assert_close_to_oracle, plain_error, random_inputs, relative_error


def feed(cache: PowerRetentionCache, inputs: dict, steps: list[int]) -> torch.Tensor:
    """Run the sequence through ``cache`` in pieces of ``steps`` tokens; the outputs ``[b, t, hq, e]``."""
    outputs, start = [], 0
    for n in steps:
        piece = {name: x[:, start:start + n] for name, x in inputs.items()}
        outputs.append(cache.step(piece["Q"], piece["K"], piece["V"], piece.get("log_G")))
        start += n
    assert start == inputs["Q"].shape[1]
    return torch.cat(outputs, 1)


def assert_matches_oracle(Y: torch.Tensor, inputs: dict, **kwargs) -> None:
    oracle = power_retention_quadratic(**inputs, **kwargs)
    dtype = inputs["Q"].dtype
    plain = power_retention_quadratic(**inputs, dtype=dtype if dtype != torch.float64 else torch.float32, **kwargs)
    assert_close_to_oracle("Y", Y, oracle, plain_error(oracle, plain, Y.dtype))


@pytest.mark.parametrize(
    "steps",
    [
        [5] + [1] * 25,  # prefill, then decode token by token: folds at 8, 16, 24
        [3, 1, 4, 2, 7, 1, 1, 6, 5],  # several tokens per step (tq > 1 on a window), folds mid-step
        [30],  # prefill only, folded at once
    ],
    ids=["decode", "multi-token", "prefill"],
)
@pytest.mark.parametrize("gating", [True, False], ids=["gated", "ungated"])
@pytest.mark.parametrize("static", [False, True], ids=["dynamic", "static"])
def test_cache_equals_training_forward(backend, steps, gating, static, generator):
    inputs = random_inputs(b=2, t=30, hq=4, h=2, d=8, gating=gating, generator=generator)
    cache = PowerRetentionCache(switch_over_seq_len=8, backend=backend, static=static)
    Y = feed(cache, inputs, steps)
    assert Y.dtype == torch.float32 and Y.shape == (2, 30, 4, 8)
    assert_matches_oracle(Y, inputs)
    training = power_retention(**inputs, backend=backend)
    assert relative_error(Y, training) < 1e-5
    assert cache.position == 30


def test_cache_state_is_the_training_state_at_the_last_fold(backend, exact, generator):
    inputs = random_inputs(b=2, t=21, hq=2, h=2, d=4, dtype=exact.dtype, generator=generator)
    cache = PowerRetentionCache(switch_over_seq_len=5, backend=backend)
    feed(cache, inputs, [2, 1, 1, 3, 1, 4, 2, 1, 1, 5])  # windows of 7, 5, 9: folded after 7, 12, 21
    _, state, keys = power_retention_quadratic(**inputs, return_final_state=True)
    assert cache.window_K.shape[1] == 0
    assert relative_error(cache.state, state) < exact.tolerance
    assert relative_error(cache.sum_of_keys, keys) < exact.tolerance
    feed(cache, {name: x[:, :3] for name, x in inputs.items()}, [1, 1, 1])  # a window, no fold
    assert cache.window_K.shape[1] == 3 and relative_error(cache.state, state) < exact.tolerance


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_cache_low_precision(backend, dtype, generator):
    inputs = random_inputs(b=1, t=20, hq=4, h=1, d=16, dtype=dtype, generator=generator)
    cache = PowerRetentionCache(switch_over_seq_len=6, backend=backend)
    Y = feed(cache, inputs, [4] + [1] * 16)
    assert Y.dtype == dtype
    assert cache.state.dtype == dtype and cache.sum_of_keys.dtype == torch.float32
    assert_matches_oracle(Y, inputs)


@pytest.mark.parametrize("deg", [1, 3, 4])
def test_cache_degrees(backend, exact, deg, generator):
    inputs = random_inputs(b=1, t=14, hq=2, h=1, d=4, dtype=exact.dtype, deg=deg, offset=0.7 if deg % 2 else 0.0,
                           generator=generator)
    cache = PowerRetentionCache(deg=deg, scale=0.6, switch_over_seq_len=4, backend=backend)
    Y = feed(cache, inputs, [3] + [1] * 11)
    expected = power_retention_quadratic(**inputs, deg=deg, scale=0.6)
    assert relative_error(Y, expected) < exact.tolerance


@pytest.mark.parametrize("tq", [1, 3, 6])
def test_inference_with_state_and_window(backend, exact, tq, generator):
    """State of an earlier segment plus a window of 6 steps with gating; the last ``tq`` queries (GQA)."""
    inputs = random_inputs(b=2, t=6, hq=6, h=2, d=4, dtype=exact.dtype, state=True, generator=generator)
    expected = power_retention_quadratic(**inputs)[:, -tq:]
    call = {**inputs, "Q": inputs["Q"][:, -tq:]}
    Y, state, keys = power_retention_inference(**call, switch_over_seq_len=None, backend=backend)
    assert relative_error(Y, expected) < exact.tolerance
    assert state is inputs["initial_state"] and keys is inputs["sum_of_keys"]  # not folded: given back


@pytest.mark.parametrize("tq", [1, 4])
def test_inference_fold_returns_the_training_state(backend, exact, tq, generator):
    inputs = random_inputs(b=2, t=8, hq=2, h=1, d=4, dtype=exact.dtype, state=True, generator=generator)
    expected_Y, expected_state, expected_keys = power_retention_quadratic(**inputs, return_final_state=True)
    Y, state, keys = power_retention_inference(**{**inputs, "Q": inputs["Q"][:, -tq:]}, switch_over_seq_len=8,
                                               backend=backend)
    assert relative_error(Y, expected_Y[:, -tq:]) < exact.tolerance
    assert relative_error(state, expected_state) < exact.tolerance
    assert relative_error(keys, expected_keys) < exact.tolerance


def test_inference_without_state(backend, exact, generator):
    """``initial_state=None``: no fold gives None back; a fold gives the state of the window alone."""
    inputs = random_inputs(b=1, t=5, hq=2, h=2, d=4, dtype=exact.dtype, generator=generator)
    expected_Y, expected_state, expected_keys = power_retention_quadratic(**inputs, return_final_state=True)
    Y, state, keys = power_retention_inference(**{**inputs, "Q": inputs["Q"][:, -2:]}, backend=backend)
    assert state is None and keys is None
    assert relative_error(Y, expected_Y[:, -2:]) < exact.tolerance
    Y, state, keys = power_retention_inference(**{**inputs, "Q": inputs["Q"][:, -2:]}, switch_over_seq_len=5,
                                               backend=backend)
    assert relative_error(state, expected_state) < exact.tolerance
    assert relative_error(keys, expected_keys) < exact.tolerance


@pytest.mark.parametrize("tq", [1, 3])
def test_inference_without_window(backend, exact, tq, generator):
    """``K = V = None``: each query reads the state alone, ``phi(q)^T S / phi(q)^T z`` (the scale cancels)."""
    inputs = random_inputs(b=2, t=tq, hq=4, h=2, d=4, dtype=exact.dtype, state=True, generator=generator)
    Q, state, keys = inputs["Q"], inputs["initial_state"], inputs["sum_of_keys"]
    Y, state_out, keys_out = power_retention_inference(Q, initial_state=(state, keys), backend=backend)
    phi_q = sympow(Q, 2)  # [b, tq, hq, D]; query head i reads state head i // 2
    numerator = torch.einsum("bthD,bhDe->bthe", phi_q, state.repeat_interleave(2, 1))
    denominator = torch.einsum("bthD,bhD->bth", phi_q, keys.repeat_interleave(2, 1))
    assert relative_error(Y, numerator / denominator[..., None]) < exact.tolerance
    assert state_out is state and keys_out is keys


def test_inference_outputs_in_query_dtype(backend, generator):
    inputs = random_inputs(b=1, t=6, hq=2, h=1, d=8, dtype=torch.bfloat16, state=True, generator=generator)
    Y, state, keys = power_retention_inference(**{**inputs, "Q": inputs["Q"][:, -2:]}, switch_over_seq_len=6,
                                               backend=backend)
    assert (Y.dtype, state.dtype, keys.dtype) == (torch.bfloat16, torch.bfloat16, torch.float32)
    oracle = power_retention_quadratic(**inputs)[:, -2:]
    plain = power_retention_quadratic(**inputs, dtype=torch.bfloat16)[:, -2:]
    assert_close_to_oracle("Y", Y, oracle, plain_error(oracle, plain, Y.dtype))


# --- the cache object ---------------------------------------------------------------------------------------------


def test_cache_select_reorders_the_batch(backend, exact, generator):
    inputs = random_inputs(b=3, t=12, hq=2, h=1, d=4, dtype=exact.dtype, generator=generator)
    order = torch.tensor([2, 0, 0])
    cache = PowerRetentionCache(switch_over_seq_len=4, backend=backend)
    feed(cache, {name: x[:, :7] for name, x in inputs.items()}, [3, 1, 1, 1, 1])  # a state and a window
    cache.select(order)
    reordered = {name: x[order] for name, x in inputs.items()}
    Y = feed(cache, {name: x[:, 7:] for name, x in reordered.items()}, [1] * 5)
    assert relative_error(Y, power_retention_quadratic(**reordered)[:, 7:]) < exact.tolerance


def test_cache_save_and_load_resume_generation(backend, exact, generator, tmp_path):
    inputs = random_inputs(b=1, t=10, hq=2, h=2, d=4, dtype=exact.dtype, generator=generator)
    cache = PowerRetentionCache(switch_over_seq_len=4, backend=backend)
    feed(cache, {name: x[:, :6] for name, x in inputs.items()}, [2, 1, 1, 1, 1])
    cache.save(tmp_path / "cache.pt")
    resumed = PowerRetentionCache.load(tmp_path / "cache.pt", backend=backend)
    assert resumed.position == 6
    Y = feed(resumed, {name: x[:, 6:] for name, x in inputs.items()}, [1] * 4)
    assert relative_error(Y, power_retention_quadratic(**inputs)[:, 6:]) < exact.tolerance


def test_cache_memory_is_bounded(backend, generator):
    """Whatever the length: the state, its sum of keys and a window shorter than switch_over_seq_len."""
    b, h, d, switch = 1, 2, 4, 4
    inputs = random_inputs(b=b, t=23, hq=2, h=h, d=d, dtype=torch.bfloat16, generator=generator)
    cache = PowerRetentionCache(switch_over_seq_len=switch, backend=backend)
    feed(cache, inputs, [1] * 23)
    state_bytes = PowerRetentionCache.state_bytes(b, h, d, d, 2, torch.bfloat16)
    assert state_bytes == cache.state.numel() * 2 + cache.sum_of_keys.numel() * 4
    window_bytes = cache.window_K.shape[1] * b * h * (2 * d * 2 + 4)  # K, V in bf16 and fp32 gates per step
    assert cache.window_K.shape[1] == 23 % switch
    assert cache.memory_bytes() == state_bytes + window_bytes
