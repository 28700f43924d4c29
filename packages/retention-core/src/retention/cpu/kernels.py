"""Numba kernels of the chunked algorithm (see the module docstring of :mod:`retention.cpu`).

Layout, per (batch, kv-head) pair ``bh`` (the leading axis of every array, ``BH = b * h``), time padded to
``T = n * C``:

    q [BH, T, r, d]   the r query heads of the group, time-major: a chunk is a contiguous [C * r, d] block
    k [BH, T, d], v1 [BH, T, e + 1] (= [v, 1]; padded steps are all zero), log_g [BH, T]
    state [BH, D, e + 1] (= [S, z])

Per chunk, with ``G`` the cumulative log gate *within* the chunk (only differences and values <= 0 are
exponentiated, so nothing overflows for log gates <= 0), rows ``i`` are queries and ``j`` keys:

    A_ij  = (s q_i.k_j)^p e^{G_i - G_j}   (j <= i)
    N'_i  = sum_j A_ij v'_j + s^p e^{G_i} phi(q_i)^T S'          y_i = N'_i[:e] / N'_i[e]
    S'   <- e^{G_C} S' + sum_j e^{G_C - G_j} phi(k_j) v'_j^T

Features are held transposed, ``phi^T [D, rows]``, so the feature map and its Jacobian run as vector loops
over rows; the matmuls go to BLAS through ``np.dot`` on contiguous (C or F ordered) 2-D arrays.
All arithmetic is in the arrays' dtype: fp32 (fp64 for fp64 inputs).
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

__all__ = [
    "backward_scan",
    "chunk_forward",
    "chunk_state_update",
    "forward_scan",
    "sympow_features",
    "sympow_features_vjp",
]


@njit(cache=True, inline="always")
def _power(x, p):
    """``x**p`` for a small int ``p >= 0`` by repeated products, in ``x``'s type."""
    result = x
    for _ in range(p - 1):
        result *= x
    return result if p > 0 else x * 0 + 1


@njit(cache=True)
def sympow_features(x, index, weight, out):
    """``out[a, i] = weight[a] * prod_l x[i, index[a, l]]``: ``phi(x_i)`` for rows ``x [R, d]``, transposed
    into ``out [D, R]`` (``index [D, p]``, ``weight [D]`` from :func:`retention.sympow.sympow_table`)."""
    x_t = np.ascontiguousarray(x.T)  # [d, R]: each factor is a contiguous row
    rows = x.shape[0]
    for a in range(index.shape[0]):
        first = x_t[index[a, 0]]
        for i in range(rows):
            out[a, i] = weight[a] * first[i]
        for position in range(1, index.shape[1]):
            factor = x_t[index[a, position]]
            for i in range(rows):
                out[a, i] *= factor[i]
    return out


@njit(cache=True)
def sympow_features_vjp(x, index, weight, grad_features, grad_x):
    """``grad_x[i] += J_phi(x_i)^T grad_features[:, i]`` for rows ``x [R, d]``, ``grad_features [D, R]``:

        (J^T u)_m = sum_a u_a w_a sum_{l: index[a, l] = m} prod_{l' != l} x[index[a, l']]
    """
    x_t = np.ascontiguousarray(x.T)
    rows, p = x.shape[0], index.shape[1]
    grad_t = np.zeros((x.shape[1], rows), dtype=x.dtype)
    term = np.empty(rows, dtype=x.dtype)
    for a in range(index.shape[0]):
        for position in range(p):
            for i in range(rows):
                term[i] = weight[a] * grad_features[a, i]
            for other in range(p):
                if other != position:
                    factor = x_t[index[a, other]]
                    for i in range(rows):
                        term[i] *= factor[i]
            target = grad_t[index[a, position]]
            for i in range(rows):
                target[i] += term[i]
    grad_x += grad_t.T
    return grad_x


@njit(cache=True)
def chunk_forward(q, k, v1, G, state, index, weight, deg, scale, group, phi_q):
    """``N' [R, e + 1]`` of one chunk: queries ``q [R = C * group, d]`` (time-major: row ``i`` is step
    ``i // group``), keys ``k [C, d]``, ``v1 [C, e + 1]``, within-chunk cumulative log gates ``G [C]``, the
    state entering the chunk ``state [D, e + 1]``; ``phi_q [D, R]`` is scratch (left holding ``phi(q)^T``).

        N'_i = sum_{j <= i} (s q_i.k_j)^p e^{G_i - G_j} v'_j + s^p e^{G_i} phi(q_i)^T S'
    """
    rows, steps = q.shape[0], k.shape[0]
    weights = np.dot(q, k.T)  # [R, C] dot products, turned into the causal power weights in place
    for row in range(rows):
        i = row // group
        for j in range(steps):
            if j <= i:
                weights[row, j] = _power(scale * weights[row, j], deg) * np.exp(G[i] - G[j])
            else:
                weights[row, j] = 0
    out = np.dot(weights, v1)
    sympow_features(q, index, weight, phi_q)
    from_state = np.dot(phi_q.T, state)  # [R, e + 1]
    scale_p = scale**deg
    for row in range(rows):
        coefficient = scale_p * np.exp(G[row // group])
        for col in range(out.shape[1]):
            out[row, col] += coefficient * from_state[row, col]
    return out


@njit(cache=True)
def chunk_state_update(k, v1, G, state, index, weight, phi_k):
    """``S' <- e^{G_C} S' + sum_j e^{G_C - G_j} phi(k_j) v'_j^T`` in place on ``state [D, e + 1]``
    (``k [C, d]``, ``v1 [C, e + 1]``, ``G [C]``; ``phi_k [D, C]`` is scratch, left holding ``phi(k)^T``)."""
    steps = k.shape[0]
    last = G[steps - 1]
    decayed = np.empty_like(v1)  # the decay rides on the small [C, e + 1] side of the product
    for j in range(steps):
        decay = np.exp(last - G[j])
        for col in range(v1.shape[1]):
            decayed[j, col] = decay * v1[j, col]
    sympow_features(k, index, weight, phi_k)
    contribution = np.dot(phi_k, decayed)  # [D, e + 1]
    total = np.exp(last)
    for a in range(state.shape[0]):
        for col in range(state.shape[1]):
            state[a, col] = total * state[a, col] + contribution[a, col]
    return state


@njit(cache=True)
def _chunk_gates(log_g, start, stop):
    """Cumulative log gate within ``[start, stop)``."""
    return np.cumsum(log_g[start:stop])


@njit(cache=True, parallel=True)
def forward_scan(q, k, v1, log_g, state, index, weight, deg, scale, chunk, y, denominator):
    """The forward over every chunk, parallel over ``bh``.

    Reads the layout of the module docstring; ``state [BH, D, e + 1]`` enters as the initial ``[S, z]`` and
    leaves as the final one. Writes ``y [BH, T, r, e]`` (0 where the denominator is exactly 0) and
    ``denominator [BH, T, r]`` (``N'[e]``, kept for the backward).
    """
    pairs, steps, group, d = q.shape
    e = v1.shape[2] - 1
    rows = chunk * group
    for bh in prange(pairs):
        phi_q = np.empty((index.shape[0], rows), dtype=q.dtype)
        phi_k = np.empty((index.shape[0], chunk), dtype=q.dtype)
        for start in range(0, steps, chunk):
            stop = start + chunk
            G = _chunk_gates(log_g[bh], start, stop)
            out = chunk_forward(q[bh, start:stop].reshape((rows, d)), k[bh, start:stop], v1[bh, start:stop], G,
                                state[bh], index, weight, deg, scale, group, phi_q)
            y_chunk = y[bh, start:stop].reshape((rows, e))
            denominator_chunk = denominator[bh, start:stop].reshape(rows)
            for row in range(rows):
                total = out[row, e]
                denominator_chunk[row] = total
                for col in range(e):
                    y_chunk[row, col] = out[row, col] / total if total != 0 else 0
            chunk_state_update(k[bh, start:stop], v1[bh, start:stop], G, state[bh], index, weight, phi_k)


@njit(cache=True, parallel=True)
def backward_scan(q, k, v1, log_g, state, index, weight, deg, scale, chunk, y, denominator, grad_y,
                  grad_state, grad_q, grad_k, grad_v1, grad_log_g):
    """The backward, parallel over ``bh``: recompute the states entering each chunk (stored here, in the
    backward, never in the forward), then a reverse scan over chunks carrying ``dS' [D, e + 1]``.

    Inputs as in :func:`forward_scan` (``state`` = the *initial* state, read only; ``y``, ``denominator`` from
    the forward), ``grad_y [BH, T, r, e]``; ``grad_state [BH, D, e + 1]`` enters as the gradient of the final
    state and leaves as the gradient of the initial state. Writes ``grad_q [BH, T, r, d]``, ``grad_k [BH, T, d]``,
    ``grad_v1 [BH, T, e + 1]`` and ``grad_log_g [BH, T]``. With ``dN'_i = [dy_i, -dy_i.y_i] / N'_i[e]``:

        dA_ij = dN'_i.v'_j,  dv'_j = sum_i A_ij dN'_i + e^{G_C - G_j} dS'^T phi(k_j),  dS' <- e^{G_C} dS' + ...

    The gate of step ``t`` (position ``u`` in its chunk) scales exactly the weights that span it, so its
    gradient is a sum of those weights times their gradients, with no cancelling terms (the global form
    ``dN'_i.N'_i - v'_i.dv'_i`` reverse-summed loses the small gradients of strong gates in rounding):

        d log_g_t = sum_{i >= u > j} dA_ij A_ij + sum_{i >= u} dN'_i.(query of S'_c)_i
                    + e^{G_C} <dS'_{c+1}, S'_c> + sum_{j < u} e^{G_C - G_j} v'_j.(dS'^T phi(k_j))
    """
    pairs, steps, group, d = q.shape
    e = v1.shape[2] - 1
    D = index.shape[0]
    rows = chunk * group
    count = steps // chunk
    scale_p = scale**deg
    for bh in prange(pairs):
        phi_q = np.empty((D, rows), dtype=q.dtype)
        phi_k = np.empty((D, chunk), dtype=q.dtype)

        # States entering each chunk (S'_0 .. S'_{n-1}).
        entering = np.empty((count, D, e + 1), dtype=q.dtype)
        carried = state[bh].copy()
        for c in range(count):
            start = c * chunk
            entering[c] = carried
            G = _chunk_gates(log_g[bh], start, start + chunk)
            chunk_state_update(k[bh, start:start + chunk], v1[bh, start:start + chunk], G, carried, index,
                               weight, phi_k)

        grad_carried = grad_state[bh]  # dS' of the state leaving the current chunk, updated in place
        for c in range(count - 1, -1, -1):
            start, stop = c * chunk, (c + 1) * chunk
            G = _chunk_gates(log_g[bh], start, stop)
            last = G[chunk - 1]
            q_c = q[bh, start:stop].reshape((rows, d))
            k_c, v1_c = k[bh, start:stop], v1[bh, start:stop]
            y_c = y[bh, start:stop].reshape((rows, e))
            dy_c = grad_y[bh, start:stop].reshape((rows, e))
            den_c = denominator[bh, start:stop].reshape(rows)
            grad_gate = np.zeros(chunk, dtype=q.dtype)  # d log_g of the chunk's steps

            # dN'_i (0 where the denominator is exactly 0: the output row is the constant 0 there).
            grad_out = np.zeros((rows, e + 1), dtype=q.dtype)
            for row in range(rows):
                total = den_c[row]
                if total == 0:
                    continue
                dy_dot_y = 0.0
                for col in range(e):
                    grad_out[row, col] = dy_c[row, col] / total
                    dy_dot_y += dy_c[row, col] * y_c[row, col]
                grad_out[row, e] = -dy_dot_y / total

            # Intra-chunk block; the pairs j < u <= i of row i add dA_ij A_ij to the gates u in (j, i].
            dots = np.dot(q_c, k_c.T)  # [R, C]
            grad_weights = np.dot(grad_out, v1_c.T)  # dA [R, C], turned into d(dots) in place
            weights = np.empty_like(dots)
            for row in range(rows):
                i = row // group
                spanning = 0.0  # sum_{j < u} dA_ij A_ij for the current gate u
                for j in range(chunk):
                    if j <= i:
                        grad_gate[j] += spanning
                        decay = np.exp(G[i] - G[j])
                        scaled = scale * dots[row, j]
                        lower = _power(scaled, deg - 1)
                        weights[row, j] = lower * scaled * decay
                        spanning += grad_weights[row, j] * weights[row, j]
                        grad_weights[row, j] *= deg * lower * decay * scale
                    else:
                        weights[row, j] = 0
                        grad_weights[row, j] = 0
            dv1_c = np.dot(weights.T, grad_out)  # [C, e + 1]
            dq_c = np.dot(grad_weights, k_c)  # [R, d]
            dk_c = np.dot(grad_weights.T, q_c)  # [C, d]

            # Query of the entering state: dphi(q_i) = s^p e^{G_i} S'_c dN'_i, dS'_c += s^p e^{G_i} phi(q_i) dN'_i^T.
            grad_query = np.empty_like(grad_out)
            for row in range(rows):
                coefficient = scale_p * np.exp(G[row // group])
                for col in range(e + 1):
                    grad_query[row, col] = coefficient * grad_out[row, col]
            sympow_features(q_c, index, weight, phi_q)
            grad_phi_q = np.dot(entering[c], grad_query.T)  # [D, R]
            sympow_features_vjp(q_c, index, weight, grad_phi_q, dq_c)
            queried = np.zeros(rows, dtype=q.dtype)  # dN'_i . (s^p e^{G_i} phi(q_i)^T S'_c)
            for a in range(D):
                for row in range(rows):
                    queried[row] += phi_q[a, row] * grad_phi_q[a, row]
            later = 0.0  # gates u <= i scale the query of row i
            for i in range(chunk - 1, -1, -1):
                for member in range(group):
                    later += queried[i * group + member]
                grad_gate[i] += later
            grad_entering = np.dot(phi_q, grad_query)  # [D, e + 1]

            # State update: dv'_j += e^{G_C - G_j} dS'^T phi(k_j), dphi(k_j) = e^{G_C - G_j} dS' v'_j.
            sympow_features(k_c, index, weight, phi_k)
            from_state = np.dot(phi_k.T, grad_carried)  # [C, e + 1]
            decayed = np.empty_like(v1_c)
            earlier = 0.0  # gates u > j scale key j's contribution to the state
            for j in range(chunk):
                grad_gate[j] += earlier
                decay = np.exp(last - G[j])
                for col in range(e + 1):
                    earlier += decay * v1_c[j, col] * from_state[j, col]
                    dv1_c[j, col] += decay * from_state[j, col]
                    decayed[j, col] = decay * v1_c[j, col]
            sympow_features_vjp(k_c, index, weight, np.dot(grad_carried, decayed.T), dk_c)
            total_decay = np.exp(last)
            kept = 0.0  # every gate of the chunk scales the entering state: e^{G_C} <dS'_{c+1}, S'_c>
            for a in range(D):
                for col in range(e + 1):
                    kept += grad_carried[a, col] * entering[c, a, col]
                    grad_carried[a, col] = total_decay * grad_carried[a, col] + grad_entering[a, col]

            grad_q[bh, start:stop] = dq_c.reshape((chunk, group, d))
            grad_k[bh, start:stop] = dk_c
            grad_v1[bh, start:stop] = dv1_c
            for j in range(chunk):
                grad_log_g[bh, start + j] = grad_gate[j] + total_decay * kept
