"""Pieces shared by the torch references: GQA expansion, safe normalisation, the state update."""

from __future__ import annotations

import torch

from ..sympow import sympow


def expand_heads(ratio: int, *tensors: torch.Tensor, dim: int = 2) -> list[torch.Tensor]:
    """Repeat key/value-head tensors ``ratio`` times along ``dim`` (query head ``i`` reads head ``i // ratio``)."""
    if ratio == 1:
        return list(tensors)
    return [x.repeat_interleave(ratio, dim=dim) for x in tensors]


def normalise(numerator: torch.Tensor, denominator: torch.Tensor) -> torch.Tensor:
    """``numerator / denominator[..., None]``, with rows whose denominator is exactly 0 set to 0 (never NaN,
    gradients included)."""
    empty = denominator == 0
    safe = torch.where(empty, torch.ones_like(denominator), denominator)
    return torch.where(empty[..., None], torch.zeros_like(numerator), numerator / safe[..., None])


def update_state(K, V, G, deg, state=None, sum_of_keys=None, dtype=torch.float32):
    """Fold a segment into the state: ``S' = e^{G_T} S + sum_j e^{G_T - G_j} phi(k_j) v_j^T`` (and ``z'`` alike).

    K [b, t, h, d], V [b, t, h, e], G [b, t, h] (cumulative log gate within the segment).
    Returns ``state [b, h, D, e]`` and ``sum_of_keys [b, h, D]`` in ``dtype``.
    """
    k, v, G = K.to(dtype), V.to(dtype), G.to(dtype)
    decay = (G[:, -1:] - G).exp() if G.shape[1] else G  # [b, t, h]
    phi_k = sympow(k, deg) * decay[..., None]  # [b, t, h, D]
    new_state = torch.einsum("bthD,bthe->bhDe", phi_k, v)
    new_keys = phi_k.sum(1)
    if state is not None:
        total = G[:, -1].exp() if G.shape[1] else G.new_ones(G.shape[0], G.shape[2])  # [b, h]
        new_state = new_state + total[..., None, None] * state.to(dtype)
        new_keys = new_keys + total[..., None] * sum_of_keys.to(dtype)
    return new_state, new_keys
