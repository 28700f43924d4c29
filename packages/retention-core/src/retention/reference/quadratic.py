"""The quadratic formula of SPEC.md section 1, in any dtype: the float64 oracle of every test.

    G_i  = log_G_1 + ... + log_G_i
    w_ij = (s <q_i, k_j>)^p exp(G_i - G_j)            (j <= i)
    y_i  = (sum_j w_ij v_j + s^p e^{G_i} phi(q_i)^T S_0) / (sum_j w_ij + s^p e^{G_i} phi(q_i)^T z_0)

Shapes: Q [b, t, hq, d], K [b, t, h, d], V [b, t, h, e], log_G [b, t, h], S_0 [b, h, D, e], z_0 [b, h, D].
"""

from __future__ import annotations

import torch

from ..sympow import sympow
from .common import expand_heads, normalise, update_state

__all__ = ["power_retention_quadratic"]


def power_retention_quadratic(
    Q, K, V, log_G=None, initial_state=None, sum_of_keys=None, deg=2, scale=None,
    return_final_state=False, dtype=torch.float64,
):
    """``Y [b, t, hq, e]`` (and the final ``state [b, h, D, e]``, ``sum_of_keys [b, h, D]``), all in ``dtype``.

    Costs ``O(t^2)`` time and memory: an oracle, not a backend for long sequences.
    """
    b, t, hq, d = Q.shape
    h = K.shape[2]
    scale = d**-0.5 if scale is None else scale
    q, k, v = Q.to(dtype), K.to(dtype), V.to(dtype)
    g = torch.zeros(b, t, h, dtype=dtype, device=Q.device) if log_G is None else log_G.to(dtype)
    G = g.cumsum(1)  # [b, t, h]

    k_rep, v_rep, G_rep = expand_heads(hq // h, k, v, G)
    scores = torch.einsum("bihd,bjhd->bhij", q, k_rep) * scale
    causal = torch.ones(t, t, dtype=torch.bool, device=Q.device).tril()
    G_h = G_rep.transpose(1, 2)  # [b, hq, t]
    log_decay = (G_h[..., :, None] - G_h[..., None, :]).masked_fill(~causal, float("-inf"))
    weights = scores**deg * log_decay.exp()
    numerator = torch.einsum("bhij,bjhe->bihe", weights, v_rep)
    denominator = weights.sum(-1).transpose(1, 2)  # [b, t, hq]

    if initial_state is not None:
        state0, keys0 = expand_heads(hq // h, initial_state.to(dtype), sum_of_keys.to(dtype), dim=1)
        phi_q = sympow(q, deg) * (scale**deg * G_rep.exp())[..., None]  # [b, t, hq, D]
        numerator = numerator + torch.einsum("bthD,bhDe->bthe", phi_q, state0)
        denominator = denominator + torch.einsum("bthD,bhD->bth", phi_q, keys0)

    Y = normalise(numerator, denominator)
    if not return_final_state:
        return Y
    state, keys = update_state(k, v, G, deg, initial_state, sum_of_keys, dtype)
    return Y, state, keys
