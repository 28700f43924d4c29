"""The chunked algorithm of SPEC.md section 3 in differentiable PyTorch (autograd does the backward).

Time is split into chunks of ``c``. Inside a chunk the weights are computed directly (a ``c x c`` masked
block); across chunks the state ``(S, z)`` is carried, decayed by each chunk's total gate. With ``G`` the
cumulative log gate *within* the chunk (so every exponent below is a difference, never ``e^{-G}``):

    intra_i = sum_{j <= i} (s <q_i, k_j>)^p e^{G_i - G_j} [v_j, 1]
    inter_i = s^p e^{G_i} phi(q_i)^T [S, z]
    y_i     = (intra_i + inter_i)[:e] / (intra_i + inter_i)[e]
    [S, z] <- e^{G_c} [S, z] + sum_j e^{G_c - G_j} phi(k_j) [v_j, 1]^T

Computes in fp32 (fp64 for fp64 inputs). Padding: ``t`` is padded to a multiple of ``c`` with zero keys
and gates, which add nothing to the state.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..sympow import sympow
from .common import normalise

__all__ = ["power_retention_chunked"]


def power_retention_chunked(
    Q, K, V, log_G=None, initial_state=None, sum_of_keys=None, deg=2, scale=None,
    chunk_size=64, return_final_state=False,
):
    """Same contract as :func:`power_retention_quadratic`; returns tensors in the compute dtype."""
    b, t, hq, d = Q.shape
    h, e = K.shape[2], V.shape[-1]
    r, c = hq // h, chunk_size
    dtype = torch.promote_types(Q.dtype, torch.float32)
    scale = d**-0.5 if scale is None else scale
    n = -(-t // c)
    pad = n * c - t

    def chunks(x):  # [b, t, ...] -> [b, n, c, ...], zero padded
        x = x.to(dtype)
        x = F.pad(x, (0, 0) * (x.dim() - 2) + (0, pad))
        return x.reshape(b, n, c, *x.shape[2:])

    q = chunks(Q).reshape(b, n, c, h, r, d)
    k = chunks(K)
    v1 = chunks(torch.cat([V, V.new_ones(b, t, h, 1)], dim=-1))  # [v, 1]: the sum of keys rides along
    g = torch.zeros(b, t, h, dtype=dtype, device=Q.device) if log_G is None else log_G
    G = chunks(g).cumsum(2)  # [b, n, c, h]

    # Intra-chunk block.
    scores = torch.einsum("bnihrd,bnjhd->bnhrij", q, k) * scale
    causal = torch.ones(c, c, dtype=torch.bool, device=Q.device).tril()
    G_h = G.transpose(2, 3)  # [b, n, h, c]
    log_decay = (G_h[..., :, None] - G_h[..., None, :]).masked_fill(~causal, float("-inf"))
    weights = scores**deg * log_decay.exp()[:, :, :, None]
    out = torch.einsum("bnhrij,bnjhe->bnihre", weights, v1)

    # Chunk contributions to the state, then the sequential scan that carries it.
    phi_k = sympow(k, deg) * (G[:, :, -1:] - G).exp()[..., None]  # [b, n, c, h, D]
    contributions = torch.einsum("bnjhD,bnjhe->bnhDe", phi_k, v1)
    chunk_decay = G[:, :, -1].exp()  # [b, n, h]
    if initial_state is None:
        state = contributions.new_zeros(contributions[:, 0].shape)
    else:
        state = torch.cat([initial_state.to(dtype), sum_of_keys.to(dtype)[..., None]], dim=-1)
    entering = []
    for i in range(n):
        entering.append(state)
        state = chunk_decay[:, i, :, None, None] * state + contributions[:, i]
    entering = torch.stack(entering, dim=1)  # [b, n, h, D, e + 1]

    # Query the state entering each chunk.
    phi_q = sympow(q, deg) * (scale**deg * G.exp())[:, :, :, :, None, None]  # [b, n, c, h, r, D]
    out = out + torch.einsum("bnihrD,bnhDe->bnihre", phi_q, entering)

    out = out.reshape(b, n * c, hq, e + 1)[:, :t]
    Y = normalise(out[..., :e], out[..., e])
    if not return_final_state:
        return Y
    return Y, state[..., :e], state[..., e]
