"""Triton helpers shared by the kernels: the sympow expansion of a tile and its transposed Jacobian.

The state is kept in the minimal public layout of ``retention.sympow`` (feature ``a`` multiplies
``x[idx[a, 0]] * ... * x[idx[a, p-1]]`` with weight ``w[a]``), so no conversion is needed at the API boundary.
A tile of features ``a0 .. a0+BD`` of ``phi(x)`` for a block of rows is built in registers from the rows' tile
(``p`` products with one-hot selection matrices on the tensor cores), never written to memory.
"""

from __future__ import annotations

import os

import triton
import triton.language as tl

# The spanning sums of the diagonal tiles (the exact gate gradient): by a scan along each row, O(BQ BK) (default),
# or with RETENTION_TRITON_SPAN=dot by an fp32 product with the strict-upper ones matrix, O(BQ BK^2) on the CUDA
# cores. On an H200 (deg 2, d 64, t 65536, bf16) fwd+bwd took 11.01 ms by scan and 11.82 ms by dot, and the scan
# passed the strong-gate checks (benchmarks/results/gpu_span_*).
SPAN_BY_SCAN = tl.constexpr(os.environ.get("RETENTION_TRITON_SPAN", "scan") == "scan")


@triton.jit
def select(x, IDX, a, a_mask, l, DEG: tl.constexpr, DP: tl.constexpr, OP: tl.constexpr,
            PRECISION: tl.constexpr):
    """``x[:, idx[a, l]]`` as fp32 ``[rows, BD]``: a product with a one-hot ``[DP, BD]`` matrix, so the
    gather runs on the tensor cores and is exact (one non-zero term per output)."""
    coordinate = tl.load(IDX + a * DEG + l, mask=a_mask, other=-1)
    one_hot = (tl.arange(0, DP)[:, None] == coordinate[None, :]).to(OP)
    return tl.dot(x, one_hot, input_precision=PRECISION)


@triton.jit
def sympow_tile(x, IDX, W, a, a_mask, DEG: tl.constexpr, DP: tl.constexpr, OP: tl.constexpr,
                PRECISION: tl.constexpr):
    """``phi(x)[:, a]`` as an fp32 ``[rows, BD]`` tile, ``w[a] * prod_l x[:, idx[a, l]]``, from a ``[rows, DP]``
    tile ``x`` (OP dtype) already in registers (0 for masked features)."""
    phi = tl.load(W + a, mask=a_mask, other=0.0)[None, :]
    if DEG == 1 and a.shape[0] == DP:  # phi(x) = w x and the tile is the only one (BD = DP >= D): no selection
        return phi * x.to(tl.float32)
    for l in tl.static_range(DEG):
        phi = phi * select(x, IDX, a, a_mask, l, DEG, DP, OP, PRECISION)
    return phi


@triton.jit
def sympow_vjp(acc, dphi, x, IDX, W, a, a_mask,
               DEG: tl.constexpr, DP: tl.constexpr, OP: tl.constexpr, PRECISION: tl.constexpr):
    """``acc + J_phi(x)^T dphi`` for a ``[rows, BD]`` tile ``dphi``; ``acc`` is ``[rows, DP]`` fp32.

    ``(J^T u)_m = sum_a u_a w_a sum_{l: idx[a,l]=m} prod_{l' != l} x[idx[a,l']]``: for each factor ``l`` the
    coefficients are scattered onto the coordinates by a product with the one-hot matrix of ``idx[:, l]``.
    """
    weighted = dphi * tl.load(W + a, mask=a_mask, other=0.0)[None, :]
    if DEG == 1 and a.shape[0] == DP:  # J_phi = w I on the only tile (see sympow_tile)
        return acc + weighted
    columns = tl.arange(0, DP)
    for l in tl.static_range(DEG):
        coefficient = weighted
        for other in tl.static_range(DEG):
            if other != l:
                coefficient = coefficient * select(x, IDX, a, a_mask, other, DEG, DP, OP, PRECISION)
        target = tl.load(IDX + a * DEG + l, mask=a_mask, other=-1)
        one_hot = (target[:, None] == columns[None, :]).to(OP)
        acc += tl.dot(coefficient.to(OP), one_hot, input_precision=PRECISION)
    return acc


@triton.jit
def integer_power(x, P: tl.constexpr):
    """``x ** P`` for a small constant integer ``P >= 0`` (repeated products, exact signs; ``P = 0``: the scalar 1,
    so deg 1's ``dA * x^0`` costs no operation on its tiles)."""
    if P == 0:
        result = 1.0
    else:
        result = x
        for _ in tl.static_range(P - 1):
            result = result * x
    return result


def next_power_of_2(n: int, minimum: int = 16) -> int:
    return max(minimum, triton.next_power_of_2(n))


@triton.jit
def spanning_tile(P, local_i, local_j, k_start, C, own, SPAN_ROW, BK: tl.constexpr):
    """Gate sums of one ``[BQ, BK]`` tile of ``P_ij = dA_ij A_ij`` whose query rows ``local_i`` reach into the key
    block (columns ``local_j = k_start + arange(BK)``, chunk positions).

    The gate at position ``u`` scales exactly the pairs ``j < u <= i``, so its gradient from this key block is
    ``sum_{i >= u} sum_{j < u} P_ij``, a sum of terms that all span ``u`` (never the diagonal, no cancellation):
      * ``u`` inside the key block: the tiles reaching into the block add the masked ``(P U)[i, u]`` with
        ``U[j, u] = [j < u]`` to ``own``; the later tiles (every ``i >= u``) only need their column sums, turned
        into the exclusive prefix over ``j`` by :func:`spanning_finish`;
      * ``u`` after the key block (every ``j < u``): the suffix over ``i >= u`` of the row sums. The row sums of
        the rows after the block are stored to ``SPAN_ROW + i`` as they are (:func:`store_row_sums`);
        ``gates.gate_gradient_kernel`` takes the suffix sums.
    """
    if SPAN_BY_SCAN:
        # at v = u - 1: sum_{i > v} sum_{j <= v} P_ij (an inclusive scan, never the diagonal), moved to u
        scanned = tl.cumsum(P, axis=1)
        by_previous = tl.sum(tl.where(local_i[:, None] > local_j[None, :], scanned, 0.0), axis=0)
        own += tl.sum(tl.where(local_j[:, None] + 1 == local_j[None, :], by_previous[:, None], 0.0), axis=0)
    else:
        before = (local_j[:, None] < local_j[None, :]).to(tl.float32)
        spanned = tl.dot(P, before, input_precision="ieee")  # [BQ, BK]: sum_{j < u} P_ij
        own += tl.sum(tl.where(local_i[:, None] >= local_j[None, :], spanned, 0.0), axis=0)
    store_row_sums(tl.sum(P, axis=1), local_i, k_start, C, SPAN_ROW, BK)
    return own


@triton.jit
def store_row_sums(row_sums, local_i, k_start, C, SPAN_ROW, BK: tl.constexpr):
    """``SPAN_ROW[i] = sum_j P_ij`` for the query rows ``i`` after the key block (and inside the chunk)."""
    tl.store(SPAN_ROW + local_i, row_sums, mask=(local_i >= k_start + BK) & (local_i < C))


@triton.jit
def spanning_finish(own, column, local_j, k_start, C, SPAN_ROW, BK: tl.constexpr):
    """Store the key block's own gates (``own`` + the exclusive prefix of ``column``) and zeros before it."""
    before = local_j[:, None] < local_j[None, :]
    own += tl.sum(tl.where(before, column[:, None], 0.0), axis=0)
    tl.store(SPAN_ROW + local_j, own, mask=local_j < C)
    for start in range(0, k_start, BK):
        tl.store(SPAN_ROW + start + tl.arange(0, BK), tl.zeros((BK,), dtype=tl.float32))


# ---------------------------------------------------------------------------------------------------------------
# The intra-chunk block, shared by the minimal-layout kernels (output.py, grads.py) and the block-pair ones
# (pairs.py): ``A_ij = (s q_i.k_j)^p e^{G_i - G_j}`` for ``j <= i`` in the chunk, and its gradients.


@triton.jit
def query_program(hq, h, C, BQ: tl.constexpr):
    """Program ``(chunk block, b * hq)`` of a query-row kernel -> ``(c, q_start, b, query_head, head)``."""
    pid = tl.program_id(0)
    pid_bh = tl.program_id(1)
    blocks_per_chunk = tl.cdiv(C, BQ)
    query_head = pid_bh % hq
    return pid // blocks_per_chunk, (pid % blocks_per_chunk) * BQ, pid_bh // hq, query_head, query_head // (hq // h)


@triton.jit
def key_program(h, C, BK: tl.constexpr):
    """Program ``(chunk block, b * h)`` of a key-row kernel -> ``(c, k_start, b, head, b * h + head)``."""
    pid = tl.program_id(0)
    pid_bh = tl.program_id(1)
    blocks_per_chunk = tl.cdiv(C, BK)
    return pid // blocks_per_chunk, (pid % blocks_per_chunk) * BK, pid_bh // h, pid_bh % h, pid_bh


@triton.jit
def chunk_rows(start, c, t, C, BLOCK: tl.constexpr):
    """Positions ``start + arange(BLOCK)`` of chunk ``c`` -> ``(local, rows, mask)``: within the chunk, in the
    sequence, and inside both (the last chunk is padded only by this mask)."""
    local = start + tl.arange(0, BLOCK)
    rows = c * C + local
    return local, rows, (local < C) & (rows < t)


@triton.jit
def load_tile(base, rows, row_stride, row_mask, cols, col_stride, col_mask):
    """``base[rows, cols]``, 0 outside ``row_mask x col_mask``."""
    return tl.load(base + rows[:, None] * row_stride + cols[None, :] * col_stride,
                   mask=row_mask[:, None] & col_mask[None, :], other=0.0)


@triton.jit
def key_value_tile(k_base, sk_t, sk_d, v_base, sv_t, sv_e, k_start, c, t, C, dims, d_mask, columns, e_mask,
                   BK: tl.constexpr, OP: tl.constexpr):
    """The ``[BK]`` keys and values from chunk position ``k_start`` -> ``(local_j, k_mask, k, v)`` (OP tiles, zeros
    outside the chunk and the sequence)."""
    local_j, rows_k, k_mask = chunk_rows(k_start, c, t, C, BK)
    k = load_tile(k_base, rows_k, sk_t, k_mask, dims, sk_d, d_mask).to(OP)
    v = load_tile(v_base, rows_k, sv_t, k_mask, columns, sv_e, e_mask).to(OP)
    return local_j, k_mask, k, v


@triton.jit
def causal_decay(g_base, local_i, local_j, causal, C, HAS_GATE: tl.constexpr):
    """``e^{G_i - G_j}`` on the ``causal`` pairs of a tile that reaches across the diagonal, 0 elsewhere (the exp
    of a masked -inf: the acausal, positive differences never overflow). Multiply, then mask with ``causal``: a
    power that overflowed there would make ``inf * 0``. (Tiles wholly below the diagonal split the decay into a
    query and a key factor instead: ``intra_output``, ``intra_key_value_grad``.)"""
    if HAS_GATE:
        g_i = tl.load(g_base + local_i, mask=local_i < C, other=0.0)
        g_j = tl.load(g_base + local_j, mask=local_j < C, other=0.0)
        decay = tl.exp(tl.where(causal, g_i[:, None] - g_j[None, :], float("-inf")))
    else:
        decay = tl.where(causal, 1.0, 0.0)
    return decay


@triton.jit
def diagonal_key_tile(k_base, sk_t, sk_d, v_base, sv_t, sv_e, k_start, local_i, q_mask, g_base, c, t, C, dims,
                      d_mask, columns, e_mask, HAS_GATE: tl.constexpr, BK: tl.constexpr, OP: tl.constexpr):
    """A key tile that reaches into the query rows ``local_i`` -> ``(k, v, causal, decay)``: its keys and values,
    the causal pairs inside the chunk and the sequence, and their decay (:func:`causal_decay`)."""
    local_j, k_mask, k, v = key_value_tile(k_base, sk_t, sk_d, v_base, sv_t, sv_e, k_start, c, t, C, dims, d_mask,
                                           columns, e_mask, BK, OP)
    causal = (local_i[:, None] >= local_j[None, :]) & q_mask[:, None] & k_mask[None, :]
    return k, v, causal, causal_decay(g_base, local_i, local_j, causal, C, HAS_GATE)


@triton.jit
def query_factor(g_base, local_i, g_a, C):
    """The query side of a decay split at a chunk position ``a`` with ``G_a = g_a``, no later than any query row
    ``local_i`` and no earlier than any key it meets: ``e^{G_i - G_j} = e^{G_i - G_a} e^{G_a - G_j}``, both
    factors at most 1 (log gates <= 0). Returns ``e^{G_i - G_a}`` (1 for rows past the chunk)."""
    g_i = tl.load(g_base + local_i, mask=local_i < C, other=0.0)
    return tl.exp(tl.where(local_i < C, g_i - g_a, 0.0))


@triton.jit
def intra_output(q, local_i, q_mask, q_start, k_base, sk_t, sk_d, v_base, sv_t, sv_e, g_base, c, t, C, scale,
                 dims, d_mask, columns, e_mask, HAS_GATE: tl.constexpr, DEG: tl.constexpr, BQ: tl.constexpr,
                 BK: tl.constexpr, EP: tl.constexpr, OP: tl.constexpr, PRECISION: tl.constexpr):
    """``(sum_j A_ij v_j, sum_j A_ij)`` over the chunk's keys ``j <= i`` for the ``[BQ, DP]`` query tile ``q``.

    The key tiles before the query tile come first, every pair causal: their decay is a factor per query row (applied
    once to their sums) times a key factor per column, so no ``[BQ, BK]`` decay tile and no masks (padded keys
    load as zeros). The tiles reaching into the query tile follow, with the full causal decay. The scale's ``s^p``
    multiplies the sums once, at the end (``s`` itself would be an operation on every ``[BQ, BK]`` tile)."""
    numerator = tl.zeros((BQ, EP), dtype=tl.float32)
    denominator = tl.zeros((BQ,), dtype=tl.float32)
    if HAS_GATE:  # split at the query tile's first row
        g_p = tl.load(g_base + q_start)
        row_factor = query_factor(g_base, local_i, g_p, C)
    keys_before = q_start // BK * BK
    for k_start in range(0, keys_before, BK):
        local_j, k_mask, k, v = key_value_tile(k_base, sk_t, sk_d, v_base, sv_t, sv_e, k_start, c, t, C, dims,
                                               d_mask, columns, e_mask, BK, OP)
        weights = integer_power(tl.dot(q, tl.trans(k), input_precision=PRECISION), DEG)
        if HAS_GATE:
            weights = weights * tl.exp(g_p - tl.load(g_base + local_j))[None, :]
        numerator += tl.dot(weights.to(OP), v, input_precision=PRECISION)
        denominator += tl.sum(weights, axis=1)
    if HAS_GATE:
        numerator = numerator * row_factor[:, None]
        denominator = denominator * row_factor
    for k_start in range(keys_before, tl.minimum(q_start + BQ, C), BK):
        k, v, causal, decay = diagonal_key_tile(k_base, sk_t, sk_d, v_base, sv_t, sv_e, k_start, local_i, q_mask,
                                                g_base, c, t, C, dims, d_mask, columns, e_mask, HAS_GATE, BK, OP)
        weights = integer_power(tl.dot(q, tl.trans(k), input_precision=PRECISION), DEG)
        weights = tl.where(causal, weights * decay, 0.0)
        numerator += tl.dot(weights.to(OP), v, input_precision=PRECISION)
        denominator += tl.sum(weights, axis=1)
    power_scale = integer_power(scale, DEG)
    return numerator * power_scale, denominator * power_scale


@triton.jit
def intra_query_grad(q, dn, delta, local_i, q_mask, q_start, k_base, sk_t, sk_d, v_base, sv_t, sv_e, g_base, c, t,
                     C, scale, dims, d_mask, columns, e_mask, HAS_GATE: tl.constexpr, DEG: tl.constexpr,
                     BQ: tl.constexpr, BK: tl.constexpr, DP: tl.constexpr, OP: tl.constexpr,
                     PRECISION: tl.constexpr):
    """``dq_i = s sum_j dA_ij p (s q_i.k_j)^(p-1) e^{G_i - G_j} k_j`` with ``dA_ij = dn_i.v_j + delta_i``, fp32
    ``[BQ, DP]`` (``dn`` an OP tile ``[BQ, EP]``, ``delta`` fp32 ``[BQ]``). Key tiles in the order and with the
    decay split of :func:`intra_output`; ``p s^p`` multiplies the sum at the end."""
    dq = tl.zeros((BQ, DP), dtype=tl.float32)
    if HAS_GATE:  # split at the query tile's first row
        g_p = tl.load(g_base + q_start)
        row_factor = query_factor(g_base, local_i, g_p, C)
    keys_before = q_start // BK * BK
    for k_start in range(0, keys_before, BK):
        local_j, k_mask, k, v = key_value_tile(k_base, sk_t, sk_d, v_base, sv_t, sv_e, k_start, c, t, C, dims,
                                               d_mask, columns, e_mask, BK, OP)
        scores = tl.dot(q, tl.trans(k), input_precision=PRECISION)
        d_weights = tl.dot(dn, tl.trans(v), input_precision=PRECISION) + delta[:, None]
        d_scores = d_weights * integer_power(scores, DEG - 1)
        if HAS_GATE:
            d_scores = d_scores * tl.exp(g_p - tl.load(g_base + local_j))[None, :]
        dq += tl.dot(d_scores.to(OP), k, input_precision=PRECISION)
    if HAS_GATE:
        dq = dq * row_factor[:, None]
    for k_start in range(keys_before, tl.minimum(q_start + BQ, C), BK):
        k, v, causal, decay = diagonal_key_tile(k_base, sk_t, sk_d, v_base, sv_t, sv_e, k_start, local_i, q_mask,
                                                g_base, c, t, C, dims, d_mask, columns, e_mask, HAS_GATE, BK, OP)
        scores = tl.dot(q, tl.trans(k), input_precision=PRECISION)
        d_weights = tl.dot(dn, tl.trans(v), input_precision=PRECISION) + delta[:, None]
        d_scores = tl.where(causal, d_weights * integer_power(scores, DEG - 1) * decay, 0.0)
        dq += tl.dot(d_scores.to(OP), k, input_precision=PRECISION)
    return dq * (DEG * integer_power(scale, DEG))


@triton.jit
def query_rows(q_base, sq_t, sq_d, DN, dn_stride, DELTA, delta_stride, rows_q, q_mask, b, t, hq, first_head, r,
               dims, d_mask, columns, e_mask, OP: tl.constexpr):
    """One query head's rows for the key-side gradients -> ``(q, dn, delta)``: OP tiles of ``q`` and ``dn`` (row
    ``i`` at ``DN + ((b t + i) hq + query_head) dn_stride``) and fp32 ``delta``, zeros outside ``q_mask``."""
    q = load_tile(q_base, rows_q, sq_t, q_mask, dims, sq_d, d_mask).to(OP)
    grad_rows = (b * t + rows_q).to(tl.int64) * hq + first_head + r
    dn = load_tile(DN, grad_rows, dn_stride, q_mask, columns, 1, e_mask).to(OP)
    return q, dn, tl.load(DELTA + grad_rows * delta_stride, mask=q_mask, other=0.0)


@triton.jit
def intra_key_value_grad(k, v, local_j, k_mask, k_start, q_base, sq_t, sq_d, sq_h, DN, dn_stride, DELTA,
                         delta_stride, g_base, SPAN_ROW, b, c, t, hq, head, group, C, scale, dims, d_mask, columns,
                         e_mask, HAS_GATE: tl.constexpr, DEG: tl.constexpr, BQ: tl.constexpr, BK: tl.constexpr,
                         DP: tl.constexpr, EP: tl.constexpr, OP: tl.constexpr, PRECISION: tl.constexpr):
    """``(dk, dv)`` fp32 of the ``[BK]`` key tile from the queries ``i >= j`` of its chunk (every query head of the
    group; ``q_base`` points at the first one), and with HAS_GATE the spanning sums of the gates (``SPAN_ROW``)::

        dk_j = s sum_i dA_ij p (s q_i.k_j)^(p-1) e^{G_i - G_j} q_i,   dv_j = sum_i A_ij dn_i

    Query row ``i`` of head ``h'`` reads ``dn_i`` at ``DN + ((b t + i) hq + h') dn_stride`` and ``delta_i`` at
    ``DELTA + (..) delta_stride``.

    The query tiles after the key block come first: there every pair is causal and the decay splits at the
    block's last key ``a``, ``e^{G_i - G_a} e^{G_a - G_j}``, with a key factor common to all of them. It is
    applied once to their sums (dk, dv, column sums of the gates) instead of as a ``[BQ, BK]`` decay tile in
    each: fewer registers, no masks (padded rows load as zeros). The tiles reaching into the block follow, with
    the full causal decay. The tiles compute without the scale: ``s^p`` (and ``p`` for dk) multiplies the sums."""
    dk = tl.zeros((BK, DP), dtype=tl.float32)
    dv = tl.zeros((BK, EP), dtype=tl.float32)
    # the later tiles' P, summed into a tile: its column sums (for spanning_finish) cross the warps, so they are
    # taken once, after the loop
    column = tl.zeros((BQ, BK), dtype=tl.float32)
    last_key = tl.minimum(k_start + BK, C) - 1  # the block's last key inside the chunk: the split point
    power_scale = integer_power(scale, DEG)
    if HAS_GATE:
        g_a = tl.load(g_base + last_key)
        key_factor = tl.exp(g_a - tl.load(g_base + local_j, mask=local_j < C, other=0.0))  # <= 1
        span_factor = key_factor * power_scale
    diagonal_tiles = tl.cdiv(BK, BQ)  # the query tiles that reach into the key block
    q_tiles = tl.cdiv(C - k_start, BQ)
    for step in range(diagonal_tiles, q_tiles):
        q_start = k_start + step * BQ
        local_i, rows_q, q_mask = chunk_rows(q_start, c, t, C, BQ)
        if HAS_GATE:
            row_factor = query_factor(g_base, local_i, g_a, C)
        row_sums = tl.zeros((BQ,), dtype=tl.float32)  # of P_ij over the block, summed over the group
        for r in range(group):
            q, dn, delta = query_rows(q_base + r * sq_h, sq_t, sq_d, DN, dn_stride, DELTA, delta_stride, rows_q,
                                      q_mask, b, t, hq, head * group, r, dims, d_mask, columns, e_mask, OP)
            scores = tl.dot(q, tl.trans(k), input_precision=PRECISION)  # [BQ, BK], unscaled
            d_weights = tl.dot(dn, tl.trans(v), input_precision=PRECISION) + delta[:, None]
            power = integer_power(scores, DEG - 1)
            if HAS_GATE:  # the row factor once, on the power both products share
                power = power * row_factor[:, None]
            weights = power * scores
            d_scores = d_weights * power
            if HAS_GATE:  # P_ij / e^{G_a - G_j}: into the column tile and the row sums, no [BQ, BK] tile per group
                spanning = d_weights * weights
                column += spanning
                row_sums += tl.sum(spanning * span_factor[None, :], axis=1)
            dv += tl.dot(tl.trans(weights.to(OP)), dn, input_precision=PRECISION)
            dk += tl.dot(tl.trans(d_scores.to(OP)), q, input_precision=PRECISION)
        if HAS_GATE:
            store_row_sums(row_sums, local_i, k_start, C, SPAN_ROW, BK)
    if HAS_GATE:
        dk = dk * key_factor[:, None]
        dv = dv * key_factor[:, None]
        column = tl.sum(column, axis=0) * span_factor
    own = tl.zeros((BK,), dtype=tl.float32)  # spanning sums of the gates inside this key block
    for step in range(0, tl.minimum(diagonal_tiles, q_tiles)):
        q_start = k_start + step * BQ
        local_i, rows_q, q_mask = chunk_rows(q_start, c, t, C, BQ)
        causal = (local_i[:, None] >= local_j[None, :]) & q_mask[:, None] & k_mask[None, :]
        decay = causal_decay(g_base, local_i, local_j, causal, C, HAS_GATE)
        spanning = tl.zeros((BQ, BK), dtype=tl.float32)  # P_ij = dA_ij A_ij summed over the group
        for r in range(group):
            q, dn, delta = query_rows(q_base + r * sq_h, sq_t, sq_d, DN, dn_stride, DELTA, delta_stride, rows_q,
                                      q_mask, b, t, hq, head * group, r, dims, d_mask, columns, e_mask, OP)
            scores = tl.dot(q, tl.trans(k), input_precision=PRECISION)  # [BQ, BK], unscaled
            weights = tl.where(causal, integer_power(scores, DEG) * decay, 0.0)
            d_weights = tl.dot(dn, tl.trans(v), input_precision=PRECISION) + delta[:, None]
            d_scores = tl.where(causal, d_weights * integer_power(scores, DEG - 1) * decay, 0.0)
            dv += tl.dot(tl.trans(weights.to(OP)), dn, input_precision=PRECISION)
            dk += tl.dot(tl.trans(d_scores.to(OP)), q, input_precision=PRECISION)
            if HAS_GATE:
                spanning += d_weights * weights
        if HAS_GATE:
            own = spanning_tile(spanning * power_scale, local_i, local_j, k_start, C, own, SPAN_ROW, BK)
    if HAS_GATE:
        spanning_finish(own, column, local_j, k_start, C, SPAN_ROW, BK)
    return dk * (DEG * power_scale), dv * power_scale


@triton.jit
def store_output(Y, DEN, numerator, denominator, out_rows, q_mask, columns, e_mask, e):
    """``Y = numerator / denominator`` (0 where the denominator is exactly 0) and ``DEN = denominator``."""
    empty = denominator == 0.0
    y = numerator / tl.where(empty, 1.0, denominator)[:, None]
    y = tl.where(empty[:, None], 0.0, y)
    tl.store(Y + out_rows[:, None] * e + columns[None, :], y.to(Y.dtype.element_ty),
             mask=q_mask[:, None] & e_mask[None, :])
    tl.store(DEN + out_rows, denominator, mask=q_mask)
