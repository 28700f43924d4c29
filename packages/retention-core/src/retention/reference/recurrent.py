"""The token-by-token recurrence of SPEC.md section 2:

    S_t = g_t S_{t-1} + phi(k_t) v_t^T,   z_t = g_t z_{t-1} + phi(k_t),   y_t = phi(q_t)^T S_t / phi(q_t)^T z_t

Linear in ``t`` with a Python loop: a readable check of the algebra, not a fast path.
"""

from __future__ import annotations

import torch

from ..sympow import sympow, sympow_dim
from .common import expand_heads, normalise

__all__ = ["power_retention_recurrent"]


def power_retention_recurrent(
    Q, K, V, log_G=None, initial_state=None, sum_of_keys=None, deg=2, scale=None,
    return_final_state=False, dtype=torch.float64,
):
    """Same contract as :func:`power_retention_quadratic`, computed one step at a time."""
    b, t, hq, d = Q.shape
    h, e = K.shape[2], V.shape[-1]
    r = hq // h
    scale = d**-0.5 if scale is None else scale
    D = sympow_dim(d, deg)
    phi_q = sympow(Q.to(dtype), deg) * scale**deg  # [b, t, hq, D]
    phi_k = sympow(K.to(dtype), deg)
    v = V.to(dtype)
    gate = None if log_G is None else log_G.to(dtype).exp()
    if initial_state is None:
        state = Q.new_zeros(b, h, D, e, dtype=dtype)
        keys = Q.new_zeros(b, h, D, dtype=dtype)
    else:
        state, keys = initial_state.to(dtype), sum_of_keys.to(dtype)
    outputs = []
    for step in range(t):
        if gate is not None:
            state = gate[:, step, :, None, None] * state
            keys = gate[:, step, :, None] * keys
        state = state + phi_k[:, step, :, :, None] * v[:, step, :, None, :]
        keys = keys + phi_k[:, step]
        state_q, keys_q = expand_heads(r, state, keys, dim=1)
        numerator = torch.einsum("bhD,bhDe->bhe", phi_q[:, step], state_q)
        denominator = torch.einsum("bhD,bhD->bh", phi_q[:, step], keys_q)
        outputs.append(normalise(numerator, denominator))
    Y = torch.stack(outputs, dim=1) if outputs else Q.new_zeros(b, 0, hq, e, dtype=dtype)
    return (Y, state, keys) if return_final_state else Y
