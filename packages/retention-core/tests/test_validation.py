"""Every malformed call raises ``TypeError``/``ValueError`` whose message names the argument and shows what was
received (shape, dtype, device or value). Validation runs before any backend, so one backend suffices; a
second device is faked with ``"meta"`` tensors (shapes only, no data)."""

from __future__ import annotations

import re

import pytest
import torch

from retention import PowerRetentionCache, power_retention, power_retention_inference, sympow_dim

B, T, HQ, H, D_HEAD, E = 2, 6, 4, 2, 4, 3
STATE_DIM = sympow_dim(D_HEAD, 2)


def valid_call() -> dict:
    return {
        "Q": torch.randn(B, T, HQ, D_HEAD),
        "K": torch.randn(B, T, H, D_HEAD),
        "V": torch.randn(B, T, H, E),
        "log_G": -torch.rand(B, T, H),
        "initial_state": torch.randn(B, H, STATE_DIM, E),
        "sum_of_keys": torch.rand(B, H, STATE_DIM),
    }


def replaced(**changes) -> dict:
    call = valid_call()
    call.update(changes)
    return call


def on_meta(x: torch.Tensor) -> torch.Tensor:
    return x.to("meta")


# (id, keyword arguments of the call, exception, a regex the message must match: the argument and what was received)
BAD_TRAINING_CALLS = [
    ("Q not a tensor", replaced(Q=[[1.0]]), TypeError, r"Q must be a torch.Tensor.*got list"),
    ("Q integer", replaced(Q=torch.ones(B, T, HQ, D_HEAD, dtype=torch.int64)), TypeError, r"Q .*floating.*int64"),
    ("K integer", replaced(K=torch.ones(B, T, H, D_HEAD, dtype=torch.int32)), TypeError, r"K .*floating.*int32"),
    ("V bool", replaced(V=torch.ones(B, T, H, E, dtype=torch.bool)), TypeError, r"V .*floating.*bool"),
    ("Q rank 3", replaced(Q=torch.randn(B, T, HQ * D_HEAD)), ValueError, r"Q must have 4 dimensions.*\(2, 6, 16\)"),
    ("K rank 5", replaced(K=torch.randn(B, T, H, D_HEAD, 1)),
     ValueError, r"K must have 4 dimensions.*\(2, 6, 2, 4, 1\)"),
    ("V rank 3", replaced(V=torch.randn(B, T, H)), ValueError, r"V must have 4 dimensions.*\(2, 6, 2\)"),
    ("K dtype differs", replaced(K=torch.randn(B, T, H, D_HEAD, dtype=torch.float16)), TypeError,
     r"K must have the same dtype as Q \(torch.float32\).*float16"),
    ("V dtype differs", replaced(V=torch.randn(B, T, H, E, dtype=torch.bfloat16)), TypeError, r"V .*dtype.*bfloat16"),
    ("K on another device", replaced(K=on_meta(torch.randn(B, T, H, D_HEAD))), ValueError,
     r"K must be on the same device as Q \(cpu\).*meta"),
    ("V on another device", replaced(V=on_meta(torch.randn(B, T, H, E))), ValueError, r"V .*same device.*meta"),
    ("K batch differs", replaced(K=torch.randn(B + 1, T, H, D_HEAD)), ValueError, r"K must have shape.*\(3, 6, 2, 4\)"),
    ("K head dim differs", replaced(K=torch.randn(B, T, H, D_HEAD + 1)),
     ValueError, r"K must have shape.*d=4.*\(2, 6, 2, 5\)"),
    ("V heads differ", replaced(V=torch.randn(B, T, H + 1, E)), ValueError, r"V must have shape.*\(2, 6, 3, 3\)"),
    ("V length differs", replaced(V=torch.randn(B, T + 1, H, E)),
     ValueError, r"V must have shape.*t=6.*\(2, 7, 2, 3\)"),
    ("Q length differs", replaced(Q=torch.randn(B, T + 2, HQ, D_HEAD)), ValueError, r"Q .*length.*t=6.*\(2, 8, 4, 4\)"),
    ("hq not a multiple of h", replaced(Q=torch.randn(B, T, 3, D_HEAD)), ValueError, r"hq=3.*h=2"),
    ("hq smaller than h", replaced(Q=torch.randn(B, T, 1, D_HEAD)), ValueError, r"hq=1.*h=2"),
    ("empty head dim", replaced(Q=torch.randn(B, T, HQ, 0), K=torch.randn(B, T, H, 0)), ValueError, r"head dims"),
    ("empty sequence", replaced(Q=torch.randn(B, 0, HQ, D_HEAD), K=torch.randn(B, 0, H, D_HEAD),
                                V=torch.randn(B, 0, H, E), log_G=None, initial_state=None, sum_of_keys=None),
     ValueError, r"K must hold at least one time step.*\(2, 0, 2, 4\)"),
    ("log_G shape", replaced(log_G=-torch.rand(B, T, HQ)),
     ValueError, r"log_G must have shape \[b=2, t=6, h=2\].*\(2, 6, 4\)"),
    ("log_G rank", replaced(log_G=-torch.rand(B, T)), ValueError, r"log_G must have 3 dimensions.*\(2, 6\)"),
    ("log_G integer", replaced(log_G=torch.zeros(B, T, H, dtype=torch.int64)), TypeError, r"log_G .*floating.*int64"),
    ("log_G on another device", replaced(log_G=on_meta(-torch.rand(B, T, H))),
     ValueError, r"log_G .*same device.*meta"),
    ("log_G not a tensor", replaced(log_G=0.5), TypeError, r"log_G must be a torch.Tensor.*float"),
    ("state shape", replaced(initial_state=torch.randn(B, H, STATE_DIM + 1, E)), ValueError,
     r"initial_state must have shape \[b=2, h=2, D=10, e=3\].*\(2, 2, 11, 3\)"),
    ("state rank", replaced(initial_state=torch.randn(H, STATE_DIM, E)), ValueError,
     r"initial_state must have 4 dimensions.*\(2, 10, 3\)"),
    ("state integer", replaced(initial_state=torch.zeros(B, H, STATE_DIM, E, dtype=torch.int64)), TypeError,
     r"initial_state .*floating.*int64"),
    ("state on another device", replaced(initial_state=on_meta(torch.randn(B, H, STATE_DIM, E))), ValueError,
     r"initial_state .*same device.*meta"),
    ("state not a tensor", replaced(initial_state=3.0), TypeError, r"initial_state must be a torch.Tensor.*float"),
    ("sum_of_keys shape", replaced(sum_of_keys=torch.rand(B, H, STATE_DIM, 1)), ValueError,
     r"sum_of_keys must have 3 dimensions.*\(2, 2, 10, 1\)"),
    ("sum_of_keys size", replaced(sum_of_keys=torch.rand(B, HQ, STATE_DIM)), ValueError,
     r"sum_of_keys must have shape \[b=2, h=2, D=10\].*\(2, 4, 10\)"),
    ("sum_of_keys on another device", replaced(sum_of_keys=on_meta(torch.rand(B, H, STATE_DIM))), ValueError,
     r"sum_of_keys .*same device.*meta"),
    ("sum_of_keys integer", replaced(sum_of_keys=torch.ones(B, H, STATE_DIM, dtype=torch.int64)), TypeError,
     r"sum_of_keys .*floating.*int64"),
    ("state without sum_of_keys", replaced(sum_of_keys=None), ValueError, r"sum_of_keys .*must be given"),
    ("sum_of_keys without state", replaced(initial_state=None), ValueError, r"sum_of_keys .*without initial_state"),
    ("state pair of three", replaced(initial_state=(1, 2, 3), sum_of_keys=None), ValueError,
     r"initial_state must be a \(state, sum_of_keys\) pair.*length 3"),
    ("sum_of_keys twice", replaced(initial_state=(torch.randn(B, H, STATE_DIM, E), torch.rand(B, H, STATE_DIM))),
     ValueError, r"sum_of_keys was given twice"),
]

BAD_ARGUMENTS = [
    ("deg", 0), ("deg", -2), ("deg", 9), ("deg", 2.0), ("deg", True), ("deg", "2"), ("deg", None),
    ("scale", 0.0), ("scale", -1.0), ("scale", float("inf")), ("scale", float("nan")), ("scale", True),
    ("scale", "0.5"),
    ("chunk_size", 0), ("chunk_size", -16), ("chunk_size", 16.0), ("chunk_size", True), ("chunk_size", "16"),
    ("switch_over_seq_len", 0), ("switch_over_seq_len", -1), ("switch_over_seq_len", 2.5),
    ("switch_over_seq_len", False),
]


@pytest.mark.parametrize(("call", "error", "message"), [case[1:] for case in BAD_TRAINING_CALLS],
                         ids=[case[0] for case in BAD_TRAINING_CALLS])
def test_bad_training_call(call, error, message):
    with pytest.raises(error, match=message):
        power_retention(**call, backend="reference")


@pytest.mark.parametrize(("name", "value"), BAD_ARGUMENTS, ids=[f"{name}={value!r}" for name, value in BAD_ARGUMENTS])
def test_bad_argument_value(name, value):
    with pytest.raises(ValueError, match=rf"{name} must be .*got {re.escape(repr(value))}"):
        power_retention(**valid_call(), **{name: value}, backend="reference")


def test_return_final_state_must_be_bool():
    with pytest.raises(TypeError, match="return_final_state must be a bool, got 1"):
        power_retention(**valid_call(), return_final_state=1, backend="reference")


@pytest.mark.parametrize("backend", ["gpu", "Triton", "", None, 3])
def test_unknown_backend(backend):
    with pytest.raises(ValueError, match=rf"backend must be one of .*got {re.escape(repr(backend))}"):
        power_retention(**valid_call(), backend=backend)


def test_unavailable_backend():
    from retention.backends import available_backends

    missing = [name for name in ("cuda", "triton") if name not in available_backends()]
    if not missing:
        pytest.skip("every backend is installed here")
    with pytest.raises(ValueError, match=rf"backend='{missing[0]}' is not available"):
        power_retention(**valid_call(), backend=missing[0])


def test_validation_happens_before_any_work():
    """A bad call on meta tensors fails on the argument, not inside a backend."""
    call = {name: on_meta(x) for name, x in valid_call().items()}
    with pytest.raises(ValueError, match="deg must be"):
        power_retention(**call, deg=0, backend="reference")


# --- inference ----------------------------------------------------------------------------------------------------


def inference_call(**changes) -> dict:
    call = valid_call()
    call["Q"] = call["Q"][:, -2:]
    call.update(changes)
    return call


BAD_INFERENCE_CALLS = [
    ("K without V", inference_call(V=None), ValueError, r"K and V must be given together"),
    ("V without K", inference_call(K=None), ValueError, r"K and V must be given together"),
    ("log_G without window", inference_call(K=None, V=None), ValueError, r"log_G only with them"),
    ("no window, no state", inference_call(K=None, V=None, log_G=None, initial_state=None, sum_of_keys=None),
     ValueError, r"initial_state must be given"),
    ("no window, no state at all", {"Q": torch.randn(B, 1, HQ, D_HEAD)}, ValueError, r"initial_state must be given"),
    ("more queries than window", inference_call(Q=torch.randn(B, T + 1, HQ, D_HEAD)), ValueError,
     r"Q \(tq=7\) must not be longer than the window K \(w=6\)"),
    ("Q rank", inference_call(Q=torch.randn(B, HQ, D_HEAD)), ValueError, r"Q must have 4 dimensions.*\(2, 4, 4\)"),
    ("Q integer", inference_call(Q=torch.ones(B, 1, HQ, D_HEAD, dtype=torch.int64)), TypeError, r"Q .*int64"),
    ("hq not a multiple of h", inference_call(Q=torch.randn(B, 1, 3, D_HEAD)), ValueError, r"hq=3.*h=2"),
    ("log_G shape", inference_call(log_G=-torch.rand(B, T - 1, H)), ValueError, r"log_G must have shape.*\(2, 5, 2\)"),
    ("state shape", inference_call(initial_state=torch.randn(B, H, STATE_DIM, E + 1)), ValueError,
     r"initial_state must have shape.*\(2, 2, 10, 4\)"),
    ("state on another device", inference_call(initial_state=on_meta(torch.randn(B, H, STATE_DIM, E))),
     ValueError, r"initial_state .*same device.*meta"),
    ("state without sum_of_keys", inference_call(sum_of_keys=None), ValueError, r"sum_of_keys .*must be given"),
    ("K on another device", inference_call(K=on_meta(torch.randn(B, T, H, D_HEAD))), ValueError, r"K .*meta"),
    ("bad switch_over_seq_len", inference_call(switch_over_seq_len=0), ValueError, r"switch_over_seq_len must be"),
    ("bad deg", inference_call(deg=0), ValueError, r"deg must be"),
    ("bad scale", inference_call(scale=-1.0), ValueError, r"scale must be"),
]


@pytest.mark.parametrize(("call", "error", "message"), [case[1:] for case in BAD_INFERENCE_CALLS],
                         ids=[case[0] for case in BAD_INFERENCE_CALLS])
def test_bad_inference_call(call, error, message):
    with pytest.raises(error, match=message):
        power_retention_inference(**call, backend="reference")


def test_inference_unknown_backend():
    with pytest.raises(ValueError, match="backend must be one of"):
        power_retention_inference(**inference_call(Q=valid_call()["Q"]), backend="gpu")


# --- the cache ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "value"), [("deg", 0), ("switch_over_seq_len", 0), ("switch_over_seq_len", None)])
def test_bad_cache_settings(name, value):
    with pytest.raises(ValueError, match=rf"{name} must be"):
        PowerRetentionCache(**{name: value})


def cache_after_one_step(gating: bool = True) -> PowerRetentionCache:
    cache = PowerRetentionCache(switch_over_seq_len=4, backend="reference")
    call = valid_call()
    cache.step(call["Q"][:, :2], call["K"][:, :2], call["V"][:, :2], call["log_G"][:, :2] if gating else None)
    return cache


@pytest.mark.parametrize(
    ("K", "message"),
    [
        (torch.randn(B, 1, H + 1, D_HEAD), r"K must match the cached window.*\(2, 1, 3, 4\)"),
        (torch.randn(B + 1, 1, H, D_HEAD), r"K must match the cached window.*\(3, 1, 2, 4\)"),
        (torch.randn(B, 1, H, D_HEAD, dtype=torch.float64), r"K must have the same dtype as the cached window"),
        (on_meta(torch.randn(B, 1, H, D_HEAD)), r"K must be on the same device as the cached window"),
        (torch.randn(B, H, D_HEAD), r"K must have 4 dimensions"),
    ],
    ids=["heads", "batch", "dtype", "device", "rank"],
)
def test_cache_step_must_match_window(K, message):
    cache = cache_after_one_step()
    Q, V = torch.randn(B, 1, HQ, D_HEAD), torch.randn(B, 1, H, E)
    with pytest.raises((ValueError, TypeError), match=message):
        cache.step(Q, K, V, -torch.rand(B, 1, H))


@pytest.mark.parametrize("gating_first", [True, False])
def test_cache_gating_is_fixed(gating_first):
    cache = cache_after_one_step(gating=gating_first)
    step = (torch.randn(B, 1, HQ, D_HEAD), torch.randn(B, 1, H, D_HEAD), torch.randn(B, 1, H, E))
    with pytest.raises(ValueError, match="log_G must be given at every step or at none"):
        cache.step(*step, None if gating_first else -torch.rand(B, 1, H))


def test_cache_select_needs_integer_indices():
    with pytest.raises(TypeError, match="indices must be an int32/int64 tensor"):
        cache_after_one_step().select(torch.tensor([0.0, 1.0]))
