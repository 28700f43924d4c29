"""Input validation: every malformed call raises ``TypeError``/``ValueError`` naming the argument, what was
expected and what was received. Checks read shapes, dtypes and devices only (no device synchronisation)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .sympow import sympow_dim

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


@dataclass(frozen=True)
class Problem:
    """A validated call: tensors in their original dtype, arguments normalised.

    Q [b, t, hq, d], K [b, t, h, d], V [b, t, h, e], log_G [b, t, h] fp32 or None,
    state [b, h, D, e] and sum_of_keys [b, h, D] (both or neither). ``chunk_size`` is at most ``t``
    (``t`` itself: one chunk, plain quadratic power attention), or None: the backend picks; every choice
    gives the same result up to rounding.
    """

    Q: torch.Tensor
    K: torch.Tensor
    V: torch.Tensor
    log_G: torch.Tensor | None
    state: torch.Tensor | None
    sum_of_keys: torch.Tensor | None
    deg: int
    scale: float
    chunk_size: int | None
    return_final_state: bool

    @property
    def shape(self) -> tuple[int, int, int, int, int, int]:
        """``(b, t, hq, h, d, e)``."""
        b, t, hq, d = self.Q.shape
        return b, t, hq, self.K.shape[2], d, self.V.shape[-1]

    @property
    def device(self) -> torch.device:
        return self.Q.device

    @property
    def compute_dtype(self) -> torch.dtype:
        return torch.promote_types(self.Q.dtype, torch.float32)


def describe(x: torch.Tensor) -> str:
    return f"shape {tuple(x.shape)}, dtype {x.dtype}, device {x.device}"


def check_tensor(name: str, x, rank: int, layout: str) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape {layout}, got {type(x).__name__}")
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be a floating point tensor (fp16, bf16, fp32 or fp64), got {describe(x)}")
    if x.dim() != rank:
        raise ValueError(f"{name} must have {rank} dimensions {layout}, got {describe(x)}")
    return x


def check_same(name: str, x: torch.Tensor, ref_name: str, ref: torch.Tensor, *, dtype: bool = True) -> None:
    if x.device != ref.device:
        raise ValueError(f"{name} must be on the same device as {ref_name} ({ref.device}), got {describe(x)}")
    if dtype and x.dtype != ref.dtype:
        raise TypeError(f"{name} must have the same dtype as {ref_name} ({ref.dtype}), got {describe(x)}")


def check_positive_int(name: str, value, *, allow_none: bool = False) -> int | None:
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        expected = "a positive int or None" if allow_none else "a positive int"
        raise ValueError(f"{name} must be {expected}, got {value!r}")
    return value


def check_deg(deg) -> int:
    if isinstance(deg, bool) or not isinstance(deg, int) or not 1 <= deg <= 8:
        raise ValueError(f"deg must be an int from 1 to 8, got {deg!r}")
    return deg


def check_scale(scale, d: int) -> float:
    if scale is None:
        return d**-0.5
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not scale > 0 or scale == float("inf"):
        raise ValueError(f"scale must be a positive finite float or None, got {scale!r}")
    return float(scale)


def check_qkv(Q, K, V, *, allow_empty_window: bool = False):
    """Shapes of Q [b, tq, hq, d], K [b, t, h, d], V [b, t, h, e]; returns ``(b, hq, h, d, e)``."""
    check_tensor("Q", Q, 4, "[b, t, hq, d]")
    check_tensor("K", K, 4, "[b, t, h, d]")
    check_tensor("V", V, 4, "[b, t, h, e]")
    check_same("K", K, "Q", Q)
    check_same("V", V, "Q", Q)
    b, tq, hq, d = Q.shape
    if K.shape[0] != b or K.shape[3] != d:
        raise ValueError(f"K must have shape [b={b}, t, h, d={d}] to match Q, got {describe(K)}")
    bk, t, h, _ = K.shape
    if V.shape[:3] != K.shape[:3]:
        raise ValueError(f"V must have shape [b={b}, t={t}, h={h}, e] to match K, got {describe(V)}")
    if h == 0 or hq % h != 0:
        raise ValueError(f"Q's heads (hq={hq}) must be a positive multiple of K's heads (h={h})")
    if d == 0 or V.shape[3] == 0:
        raise ValueError(f"head dims must be positive, got Q {describe(Q)} and V {describe(V)}")
    if t == 0 and not allow_empty_window:
        raise ValueError(f"K must hold at least one time step, got {describe(K)}")
    return b, hq, h, d, V.shape[3]


def check_log_G(log_G, b: int, t: int, h: int, ref: torch.Tensor) -> torch.Tensor | None:
    if log_G is None:
        return None
    check_tensor("log_G", log_G, 3, "[b, t, h]")
    check_same("log_G", log_G, "Q", ref, dtype=False)
    if tuple(log_G.shape) != (b, t, h):
        raise ValueError(f"log_G must have shape [b={b}, t={t}, h={h}], got {describe(log_G)}")
    # Gates are fp32 by contract; other float dtypes are cast (documented, not silent about values).
    return log_G.float() if log_G.dtype != torch.float64 else log_G


def split_initial_state(initial_state, sum_of_keys):
    """Accept ``(state, sum_of_keys)`` or a state tensor plus ``sum_of_keys=``."""
    if initial_state is None:
        if sum_of_keys is not None:
            raise ValueError("sum_of_keys was given without initial_state; pass both or neither")
        return None, None
    if isinstance(initial_state, (tuple, list)):
        if len(initial_state) != 2:
            raise ValueError(
                f"initial_state must be a (state, sum_of_keys) pair, got a sequence of length {len(initial_state)}"
            )
        if sum_of_keys is not None:
            raise ValueError("sum_of_keys was given twice: inside initial_state and as a keyword")
        return initial_state[0], initial_state[1]
    if sum_of_keys is None:
        raise ValueError("initial_state is a tensor, so sum_of_keys [b, h, D] must be given too")
    return initial_state, sum_of_keys


def check_state(state, sum_of_keys, b: int, h: int, d: int, e: int, deg: int, ref: torch.Tensor):
    if state is None:
        return None, None
    D = sympow_dim(d, deg)
    check_tensor("initial_state", state, 4, "[b, h, D, e]")
    check_tensor("sum_of_keys", sum_of_keys, 3, "[b, h, D]")
    check_same("initial_state", state, "Q", ref, dtype=False)
    check_same("sum_of_keys", sum_of_keys, "Q", ref, dtype=False)
    if tuple(state.shape) != (b, h, D, e):
        raise ValueError(
            f"initial_state must have shape [b={b}, h={h}, D={D}, e={e}] (D = sympow_dim(d={d}, deg={deg})), "
            f"got {describe(state)}"
        )
    if tuple(sum_of_keys.shape) != (b, h, D):
        raise ValueError(f"sum_of_keys must have shape [b={b}, h={h}, D={D}], got {describe(sum_of_keys)}")
    return state, sum_of_keys


def validate(
    Q, K, V, log_G, initial_state, sum_of_keys, deg, scale, chunk_size, return_final_state,
    switch_over_seq_len=None,
) -> Problem:
    """Check a :func:`retention.power_retention` call and normalise its arguments."""
    b, hq, h, d, e = check_qkv(Q, K, V)
    t = K.shape[1]
    if Q.shape[1] != t:
        raise ValueError(f"Q must have the same length as K (t={t}), got {describe(Q)}")
    deg = check_deg(deg)
    scale = check_scale(scale, d)
    chunk_size = check_positive_int("chunk_size", chunk_size, allow_none=True)
    switch_over_seq_len = check_positive_int("switch_over_seq_len", switch_over_seq_len, allow_none=True)
    if not isinstance(return_final_state, bool):
        raise TypeError(f"return_final_state must be a bool, got {return_final_state!r}")
    log_G = check_log_G(log_G, b, t, h, Q)
    state, sum_of_keys = check_state(*split_initial_state(initial_state, sum_of_keys), b, h, d, e, deg, Q)
    if switch_over_seq_len is not None and t < switch_over_seq_len:
        chunk_size = t  # the 1.x hint: below it, plain quadratic power attention (one chunk)
    if chunk_size is not None:
        chunk_size = min(chunk_size, t)
    return Problem(Q, K, V, log_G, state, sum_of_keys, deg, scale, chunk_size, return_final_state)
