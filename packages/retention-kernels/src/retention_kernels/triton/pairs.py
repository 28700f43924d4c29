"""deg-2 kernels in the internal block-pair layout: no selection products, ``phi`` tiles are outer products.

Coordinates are split into 16-wide blocks (``d`` padded to ``DP = 16 * NBP``). Feature ``f = 256 P + 16 u + v``
of block pair ``P = (I, J)``, ``I <= J``, is ``w_P x[16 I + u] x[16 J + v]`` with ``w_P = sqrt(2)`` off the
diagonal and 1 on it (diagonal blocks hold each off-diagonal product twice, which is what ``(x.y)^2`` needs), so
``<phi(x), phi(y)> = (x.y)^2`` with ``DI = 256 * NP`` features (2560 for d=64 instead of 2080). A ``[rows, 256]``
tile of ``phi`` is the broadcast product of two ``[rows, 16]`` loads: it feeds ``tl.dot`` directly.

The sum of keys is kept as the symmetric ``[DP, DP]`` matrix ``M = sum_j decay_j k_j k_j^T`` (so the
denominator's state term is ``q^T M q``, one small product). ``function.py`` converts both to and from the
public minimal layout (an isometry: ``S_int = A S_min``, ``S_min = A^T S_int``, ``A^T A = 1``).

Kernels (``G`` = cumulative log gate inside each chunk, ``s`` = scale):
  ``pair_state_kernel``   forward: ``S_{c+1} = e^{G_last} S_c + sum_j e^{G_last - G_j} phi(k_j) v_j^T`` (and M),
                          storing the state entering every chunk; backward: the reverse scan of
                          ``dS_c = e^{G_last} dS_{c+1} + s^2 sum_i e^{G_i} phi(q_i) dn_i^T`` (and dM from delta).
                          One program per (feature tile, head) walks the chunks in order: the scan is fused.
  ``pair_output_kernel``  intra-chunk block + state query + normalisation.
  ``pair_query_grad_kernel``, ``pair_key_value_grad_kernel``: dQ; dK, dV; and the pieces of the gate gradient
                          (QTERM, KTERM, SPAN: see ``grads.py``).
"""

from __future__ import annotations

import triton
import triton.language as tl

from ._tiles import spanning_finish, spanning_tile


@triton.jit
def _pair(PAIRS, P):
    """Blocks ``(I, J)`` of pair ``P`` and its weight ``w_P``."""
    block_i = tl.load(PAIRS + 2 * P)
    block_j = tl.load(PAIRS + 2 * P + 1)
    weight = tl.where(block_i < block_j, 1.4142135623730951, 1.0)
    return block_i, block_j, weight


@triton.jit
def _outer(xi, xj, ROWS: tl.constexpr, BU: tl.constexpr):
    """``[ROWS, BU * 16]`` tile ``xi[:, u] * xj[:, v]`` at column ``16 u + v`` (fp32)."""
    return tl.reshape(xi[:, :, None] * xj[:, None, :], (ROWS, BU * 16))


@triton.jit
def _outer_vjp(acc, dphi, xi, xj, block_i, block_j, ROWS: tl.constexpr, NBP: tl.constexpr):
    """``acc [ROWS, NBP, 16] += J^T dphi`` for the pair tile ``phi = xi (x) xj`` (weights already in ``dphi``)."""
    d3 = tl.reshape(dphi, (ROWS, 16, 16))
    grad_i = tl.sum(d3 * xj[:, None, :], axis=2)
    grad_j = tl.sum(d3 * xi[:, :, None], axis=1)
    blocks = tl.arange(0, NBP)[None, :, None]
    acc += tl.where(blocks == block_i, grad_i[:, None, :], 0.0)
    acc += tl.where(blocks == block_j, grad_j[:, None, :], 0.0)
    return acc


@triton.jit
def pair_state_kernel(
    X, V, DELTA, G, PAIRS, INIT, STATES, FINAL, INIT_M, MS, FINAL_M,
    sx_b, sx_t, sx_h, sx_d, sv_b, sv_t, sv_h, sv_e,
    t, hx, h, d, e, n_chunks, C, T_pad, NP, query_factor,
    BACKWARD: tl.constexpr, HAS_GATE: tl.constexpr, HAS_INIT: tl.constexpr,
    BT: tl.constexpr, BU: tl.constexpr, DP: tl.constexpr, EP: tl.constexpr, OP: tl.constexpr,
    PRECISION: tl.constexpr, GRAM_PRECISION: tl.constexpr, PHI_T: tl.constexpr,
):
    """Grid ``(NP * 16 / BU + 1, b * h)``: programs below ``NP * 16 / BU`` own ``[16 BU, e]`` state tiles, the
    last one the ``[DP, DP]`` key-sum matrix. Forward: X = K, V = V; backward: X = Q (``hx = hq`` heads, the
    group of a key head adds up), V = dn ``[b, t, hq, e]``, DELTA ``[b, t, hq]`` fp32 (the ones column).
    STATES ``[b h, n, DI, e]`` slot c: forward the state entering chunk c, backward the gradient of the state
    leaving it. MS likewise ``[b h, n, DP, DP]`` fp32. FINAL (fp32): forward the final state, backward the
    gradient of the initial one; INIT: the other end (when HAS_INIT)."""
    pid = tl.program_id(0)
    pid_bh = tl.program_id(1)
    split = 16 // BU
    n_tiles = NP * split
    b = pid_bh // h
    head = pid_bh % h
    group = hx // h
    DI = NP * 256
    g_base = G + pid_bh * T_pad
    if pid < n_tiles:
        P = pid // split
        u0 = (pid % split) * BU
        block_i, block_j, weight = _pair(PAIRS, P)
        features = P * 256 + u0 * 16 + tl.arange(0, BU * 16)
        columns = tl.arange(0, EP)
        e_mask = columns < e
        coord_i = block_i * 16 + u0 + tl.arange(0, BU)
        coord_j = block_j * 16 + tl.arange(0, 16)
        tile = features[:, None] * e + columns[None, :]
        tile_mask = e_mask[None, :] & (features[:, None] >= 0)
        if HAS_INIT:
            acc = tl.load(INIT + pid_bh.to(tl.int64) * DI * e + tile, mask=tile_mask, other=0.0).to(tl.float32)
        else:
            acc = tl.zeros((BU * 16, EP), dtype=tl.float32)
        for step in range(n_chunks):
            if BACKWARD:
                c = n_chunks - 1 - step
            else:
                c = step
            slot = (pid_bh * n_chunks + c).to(tl.int64) * DI * e
            tl.store(STATES + slot + tile, acc.to(STATES.dtype.element_ty), mask=tile_mask)
            contribution = tl.zeros((BU * 16, EP), dtype=tl.float32)
            if HAS_GATE:
                g_last = tl.load(g_base + c * C + C - 1)
            for r in range(group):
                x_base = X + b * sx_b + (head * group + r) * sx_h
                v_base = V + b * sv_b + (head * group + r) * sv_h
                for js in range(0, C, BT):
                    local = js + tl.arange(0, BT)
                    rows = c * C + local
                    row_mask = (local < C) & (rows < t)
                    row_weight = tl.full((BT,), 1.0, tl.float32) * weight
                    if BACKWARD:
                        row_weight = row_weight * query_factor
                    if HAS_GATE:
                        g = tl.load(g_base + c * C + local, mask=local < C, other=0.0)
                        if BACKWARD:
                            row_weight = row_weight * tl.exp(g)
                        else:
                            row_weight = row_weight * tl.exp(g_last - g)
                    v = tl.load(v_base + rows[:, None] * sv_t + columns[None, :] * sv_e,
                                mask=row_mask[:, None] & e_mask[None, :], other=0.0).to(OP)
                    if PHI_T:  # phi^T [16 BU, BT] built directly from transposed loads (no transpose of phi)
                        xi_t = tl.load(x_base + coord_i[:, None] * sx_d + rows[None, :] * sx_t,
                                       mask=(coord_i < d)[:, None] & row_mask[None, :], other=0.0).to(tl.float32)
                        xj_t = tl.load(x_base + coord_j[:, None] * sx_d + rows[None, :] * sx_t,
                                       mask=(coord_j < d)[:, None] & row_mask[None, :], other=0.0).to(tl.float32)
                        phi_t = tl.reshape((xi_t * row_weight[None, :])[:, None, :] * xj_t[None, :, :], (BU * 16, BT))
                        contribution += tl.dot(phi_t.to(OP), v, input_precision=PRECISION)
                    else:
                        xi = tl.load(x_base + rows[:, None] * sx_t + coord_i[None, :] * sx_d,
                                     mask=row_mask[:, None] & (coord_i < d)[None, :], other=0.0).to(tl.float32)
                        xj = tl.load(x_base + rows[:, None] * sx_t + coord_j[None, :] * sx_d,
                                     mask=row_mask[:, None] & (coord_j < d)[None, :], other=0.0).to(tl.float32)
                        phi = _outer(xi * row_weight[:, None], xj, BT, BU).to(OP)
                        contribution += tl.dot(tl.trans(phi), v, input_precision=PRECISION)
            if HAS_GATE:
                acc = acc * tl.exp(g_last)
            acc += contribution
        tl.store(FINAL + pid_bh.to(tl.int64) * DI * e + tile, acc, mask=tile_mask)
    else:
        dims = tl.arange(0, DP)
        d_mask = dims < d
        square = dims[:, None] * DP + dims[None, :]
        if HAS_INIT:
            acc_m = tl.load(INIT_M + pid_bh.to(tl.int64) * DP * DP + square)
        else:
            acc_m = tl.zeros((DP, DP), dtype=tl.float32)
        for step in range(n_chunks):
            if BACKWARD:
                c = n_chunks - 1 - step
            else:
                c = step
            tl.store(MS + (pid_bh * n_chunks + c).to(tl.int64) * DP * DP + square, acc_m)
            contribution = tl.zeros((DP, DP), dtype=tl.float32)
            if HAS_GATE:
                g_last = tl.load(g_base + c * C + C - 1)
            for r in range(group):
                x_base = X + b * sx_b + (head * group + r) * sx_h
                for js in range(0, C, BT):
                    local = js + tl.arange(0, BT)
                    rows = c * C + local
                    row_mask = (local < C) & (rows < t)
                    x = tl.load(x_base + rows[:, None] * sx_t + dims[None, :] * sx_d,
                                mask=row_mask[:, None] & d_mask[None, :], other=0.0).to(tl.float32)
                    row_weight = tl.full((BT,), 1.0, tl.float32)
                    if BACKWARD:
                        x_head = head * group + r
                        delta = tl.load(DELTA + (b * t + rows).to(tl.int64) * hx + x_head, mask=row_mask,
                                        other=0.0)
                        row_weight = delta * query_factor
                    if HAS_GATE:
                        g = tl.load(g_base + c * C + local, mask=local < C, other=0.0)
                        if BACKWARD:
                            row_weight = row_weight * tl.exp(g)
                        else:
                            row_weight = row_weight * tl.exp(g_last - g)
                    contribution += tl.dot(tl.trans(x * row_weight[:, None]), x, input_precision=GRAM_PRECISION)
            if HAS_GATE:
                acc_m = acc_m * tl.exp(g_last)
            acc_m += contribution
        tl.store(FINAL_M + pid_bh.to(tl.int64) * DP * DP + square, acc_m)


@triton.jit
def pair_output_kernel(
    Q, K, V, G, PAIRS, STATES, MS, Y, DEN,
    sq_b, sq_t, sq_h, sq_d, sk_b, sk_t, sk_h, sk_d, sv_b, sv_t, sv_h, sv_e,
    t, hq, h, d, e, n_chunks, C, T_pad, NP, scale,
    HAS_GATE: tl.constexpr, HAS_STATE: tl.constexpr,
    BQ: tl.constexpr, BK: tl.constexpr, DP: tl.constexpr, EP: tl.constexpr,
    OP: tl.constexpr, PRECISION: tl.constexpr, GRAM_PRECISION: tl.constexpr,
):
    """``N'_i = sum_{j <= i in chunk} (s q_i.k_j)^2 e^{G_i - G_j} [v_j, 1] + s^2 e^{G_i} [phi(q_i)^T S_c,
    q_i^T M_c q_i]``, ``Y = N'[:e] / N'[e]`` (0 when the denominator is 0), ``DEN = N'[e]`` fp32."""
    pid = tl.program_id(0)
    pid_bh = tl.program_id(1)
    blocks_per_chunk = tl.cdiv(C, BQ)
    c = pid // blocks_per_chunk
    q_start = (pid % blocks_per_chunk) * BQ
    b = pid_bh // hq
    query_head = pid_bh % hq
    head = query_head // (hq // h)
    DI = NP * 256

    local_i = q_start + tl.arange(0, BQ)
    rows_q = c * C + local_i
    q_mask = (local_i < C) & (rows_q < t)
    dims = tl.arange(0, DP)
    d_mask = dims < d
    columns = tl.arange(0, EP)
    e_mask = columns < e
    q_base = Q + b * sq_b + query_head * sq_h
    q32 = tl.load(q_base + rows_q[:, None] * sq_t + dims[None, :] * sq_d,
                  mask=q_mask[:, None] & d_mask[None, :], other=0.0).to(tl.float32)
    q = q32.to(OP)
    g_base = G + (b * h + head) * T_pad + c * C
    if HAS_GATE:
        g_i = tl.load(g_base + local_i, mask=local_i < C, other=0.0)

    k_base = K + b * sk_b + head * sk_h
    v_base = V + b * sv_b + head * sv_h
    numerator = tl.zeros((BQ, EP), dtype=tl.float32)
    denominator = tl.zeros((BQ,), dtype=tl.float32)
    for k_start in range(0, tl.minimum(q_start + BQ, C), BK):
        local_j = k_start + tl.arange(0, BK)
        rows_k = c * C + local_j
        k_mask = (local_j < C) & (rows_k < t)
        k = tl.load(k_base + rows_k[:, None] * sk_t + dims[None, :] * sk_d,
                    mask=k_mask[:, None] & d_mask[None, :], other=0.0).to(OP)
        v = tl.load(v_base + rows_k[:, None] * sv_t + columns[None, :] * sv_e,
                    mask=k_mask[:, None] & e_mask[None, :], other=0.0).to(OP)
        causal = (local_i[:, None] >= local_j[None, :]) & q_mask[:, None] & k_mask[None, :]
        scores = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale
        weights = scores * scores
        if HAS_GATE:
            g_j = tl.load(g_base + local_j, mask=local_j < C, other=0.0)
            weights = weights * tl.exp(tl.where(causal, g_i[:, None] - g_j[None, :], float("-inf")))
        weights = tl.where(causal, weights, 0.0)
        numerator += tl.dot(weights.to(OP), v, input_precision=PRECISION)
        denominator += tl.sum(weights, axis=1)

    first_chunk_with_state = 0 if HAS_STATE else 1
    if c >= first_chunk_with_state:
        inter = tl.zeros((BQ, EP), dtype=tl.float32)
        slot = (b * h + head) * n_chunks + c
        state_base = STATES + slot.to(tl.int64) * DI * e
        features = tl.arange(0, 256)
        for P in range(NP):
            block_i, block_j, weight = _pair(PAIRS, P)
            coord_i = block_i * 16 + tl.arange(0, 16)
            coord_j = block_j * 16 + tl.arange(0, 16)
            qi = tl.load(q_base + rows_q[:, None] * sq_t + coord_i[None, :] * sq_d,
                         mask=q_mask[:, None] & (coord_i < d)[None, :], other=0.0).to(tl.float32)
            qj = tl.load(q_base + rows_q[:, None] * sq_t + coord_j[None, :] * sq_d,
                         mask=q_mask[:, None] & (coord_j < d)[None, :], other=0.0).to(tl.float32)
            phi = _outer(qi * weight, qj, BQ, 16).to(OP)
            S = tl.load(state_base + (P * 256 + features[:, None]) * e + columns[None, :],
                        mask=e_mask[None, :], other=0.0).to(OP)
            inter += tl.dot(phi, S, input_precision=PRECISION)
        square = dims[:, None] * DP + dims[None, :]
        M = tl.load(MS + slot.to(tl.int64) * DP * DP + square)
        inter_denominator = tl.sum(tl.dot(q32, M, input_precision=GRAM_PRECISION) * q32, axis=1)
        query_scale = tl.full((BQ,), 1.0, tl.float32) * (scale * scale)
        if HAS_GATE:
            query_scale = query_scale * tl.exp(g_i)
        numerator += inter * query_scale[:, None]
        denominator += inter_denominator * query_scale

    empty = denominator == 0.0
    y = numerator / tl.where(empty, 1.0, denominator)[:, None]
    y = tl.where(empty[:, None], 0.0, y)
    out_rows = (b * t + rows_q).to(tl.int64) * hq + query_head
    tl.store(Y + out_rows[:, None] * e + columns[None, :], y.to(Y.dtype.element_ty),
             mask=q_mask[:, None] & e_mask[None, :])
    tl.store(DEN + out_rows, denominator, mask=q_mask)


@triton.jit
def pair_query_grad_kernel(
    Q, K, V, G, PAIRS, STATES, MS, DN, DELTA, DQ, QTERM,
    sq_b, sq_t, sq_h, sq_d, sk_b, sk_t, sk_h, sk_d, sv_b, sv_t, sv_h, sv_e,
    t, hq, h, d, e, n_chunks, C, T_pad, NP, scale,
    HAS_GATE: tl.constexpr, HAS_STATE: tl.constexpr,
    BQ: tl.constexpr, BK: tl.constexpr, DP: tl.constexpr, EP: tl.constexpr,
    OP: tl.constexpr, PRECISION: tl.constexpr, GRAM_PRECISION: tl.constexpr,
):
    """DQ [b, t, hq, d] contiguous. DN ``[b, t, hq, e]`` (already rounded to the operand precision) and DELTA
    ``[b, t, hq]`` = ``-(dn . y)`` computed from that same rounded dn, so ``dA_ij = dn_i . v_j + delta_i`` equals
    ``dn_i . (v_j - y_i)`` without the bf16 rounding of dn turning into an absolute error. QTERM [b, t, hq]
    fp32 (with HAS_GATE): ``q_i . dq_i^state / 2``, the gate term of the state query."""
    pid = tl.program_id(0)
    pid_bh = tl.program_id(1)
    blocks_per_chunk = tl.cdiv(C, BQ)
    c = pid // blocks_per_chunk
    q_start = (pid % blocks_per_chunk) * BQ
    b = pid_bh // hq
    query_head = pid_bh % hq
    head = query_head // (hq // h)
    DI = NP * 256
    NBP: tl.constexpr = DP // 16

    local_i = q_start + tl.arange(0, BQ)
    rows_q = c * C + local_i
    q_mask = (local_i < C) & (rows_q < t)
    dims = tl.arange(0, DP)
    d_mask = dims < d
    columns = tl.arange(0, EP)
    e_mask = columns < e
    q_base = Q + b * sq_b + query_head * sq_h
    q32 = tl.load(q_base + rows_q[:, None] * sq_t + dims[None, :] * sq_d,
                  mask=q_mask[:, None] & d_mask[None, :], other=0.0).to(tl.float32)
    q = q32.to(OP)
    grad_rows = (b * t + rows_q).to(tl.int64) * hq + query_head
    dn = tl.load(DN + grad_rows[:, None] * e + columns[None, :], mask=q_mask[:, None] & e_mask[None, :],
                 other=0.0).to(OP)
    delta = tl.load(DELTA + grad_rows, mask=q_mask, other=0.0)
    g_base = G + (b * h + head) * T_pad + c * C
    if HAS_GATE:
        g_i = tl.load(g_base + local_i, mask=local_i < C, other=0.0)

    k_base = K + b * sk_b + head * sk_h
    v_base = V + b * sv_b + head * sv_h
    dq = tl.zeros((BQ, DP), dtype=tl.float32)
    for k_start in range(0, tl.minimum(q_start + BQ, C), BK):
        local_j = k_start + tl.arange(0, BK)
        rows_k = c * C + local_j
        k_mask = (local_j < C) & (rows_k < t)
        k = tl.load(k_base + rows_k[:, None] * sk_t + dims[None, :] * sk_d,
                    mask=k_mask[:, None] & d_mask[None, :], other=0.0).to(OP)
        v = tl.load(v_base + rows_k[:, None] * sv_t + columns[None, :] * sv_e,
                    mask=k_mask[:, None] & e_mask[None, :], other=0.0).to(OP)
        causal = (local_i[:, None] >= local_j[None, :]) & q_mask[:, None] & k_mask[None, :]
        scores = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale
        d_weights = tl.dot(dn, tl.trans(v), input_precision=PRECISION) + delta[:, None]
        d_scores = d_weights * 2.0 * scores
        if HAS_GATE:
            g_j = tl.load(g_base + local_j, mask=local_j < C, other=0.0)
            d_scores = d_scores * tl.exp(tl.where(causal, g_i[:, None] - g_j[None, :], float("-inf")))
        d_scores = tl.where(causal, d_scores, 0.0)
        dq += tl.dot(d_scores.to(OP), k, input_precision=PRECISION) * scale

    first_chunk_with_state = 0 if HAS_STATE else 1
    if c >= first_chunk_with_state:
        query_scale = tl.full((BQ,), 1.0, tl.float32) * (scale * scale)
        if HAS_GATE:
            query_scale = query_scale * tl.exp(g_i)
        slot = (b * h + head) * n_chunks + c
        state_base = STATES + slot.to(tl.int64) * DI * e
        features = tl.arange(0, 256)
        acc = tl.zeros((BQ, NBP, 16), dtype=tl.float32)
        for P in range(NP):
            block_i, block_j, weight = _pair(PAIRS, P)
            coord_i = block_i * 16 + tl.arange(0, 16)
            coord_j = block_j * 16 + tl.arange(0, 16)
            qi = tl.load(q_base + rows_q[:, None] * sq_t + coord_i[None, :] * sq_d,
                         mask=q_mask[:, None] & (coord_i < d)[None, :], other=0.0).to(tl.float32)
            qj = tl.load(q_base + rows_q[:, None] * sq_t + coord_j[None, :] * sq_d,
                         mask=q_mask[:, None] & (coord_j < d)[None, :], other=0.0).to(tl.float32)
            S = tl.load(state_base + (P * 256 + features[:, None]) * e + columns[None, :],
                        mask=e_mask[None, :], other=0.0).to(OP)
            dphi = tl.dot(dn, tl.trans(S), input_precision=PRECISION) * (query_scale * weight)[:, None]
            acc = _outer_vjp(acc, dphi, qi, qj, block_i, block_j, BQ, NBP)
        dq_state = tl.reshape(acc, (BQ, DP))
        # the denominator's state term s^2 e^{G_i} delta_i q_i^T M q_i, M symmetric
        M = tl.load(MS + slot.to(tl.int64) * DP * DP + dims[:, None] * DP + dims[None, :])
        dq_state += tl.dot(q32, M, input_precision=GRAM_PRECISION) * (2.0 * query_scale * delta)[:, None]
        dq += dq_state
        state_term = tl.sum(q32 * dq_state, axis=1) * 0.5
    else:
        state_term = tl.zeros((BQ,), dtype=tl.float32)

    out_rows = (b * t + rows_q).to(tl.int64) * hq + query_head
    tl.store(DQ + out_rows[:, None] * d + dims[None, :], dq.to(DQ.dtype.element_ty),
             mask=q_mask[:, None] & d_mask[None, :])
    if HAS_GATE:
        tl.store(QTERM + out_rows, state_term, mask=q_mask)


@triton.jit
def pair_key_value_grad_kernel(
    Q, K, V, G, PAIRS, DSTATES, DMS, DN, DELTA, DK, DV, KTERM, SPAN,
    sq_b, sq_t, sq_h, sq_d, sk_b, sk_t, sk_h, sk_d, sv_b, sv_t, sv_h, sv_e,
    t, hq, h, d, e, n_chunks, C, T_pad, NP, scale,
    HAS_GATE: tl.constexpr,
    BQ: tl.constexpr, BK: tl.constexpr, DP: tl.constexpr, EP: tl.constexpr,
    OP: tl.constexpr, PRECISION: tl.constexpr, GRAM_PRECISION: tl.constexpr,
):
    """DK [b, t, h, d], DV [b, t, h, e] contiguous. DSTATES ``[b h, n, DI, e]`` / DMS ``[b h, n, DP, DP]`` slot c:
    the gradient of the state leaving chunk c. With HAS_GATE: KTERM [b, t, h] fp32 (``k_j . dk_j^state / 2``) and
    SPAN ``[b h, n, cdiv(C, BK), C]`` fp32 (row J: the spanning sums of key block J, ``_tiles.spanning_tile``)."""
    pid = tl.program_id(0)
    pid_bh = tl.program_id(1)
    blocks_per_chunk = tl.cdiv(C, BK)
    c = pid // blocks_per_chunk
    k_start = (pid % blocks_per_chunk) * BK
    b = pid_bh // h
    head = pid_bh % h
    group = hq // h
    DI = NP * 256
    NBP: tl.constexpr = DP // 16

    local_j = k_start + tl.arange(0, BK)
    rows_k = c * C + local_j
    k_mask = (local_j < C) & (rows_k < t)
    dims = tl.arange(0, DP)
    d_mask = dims < d
    columns = tl.arange(0, EP)
    e_mask = columns < e
    k_base = K + b * sk_b + head * sk_h
    v_base = V + b * sv_b + head * sv_h
    k32 = tl.load(k_base + rows_k[:, None] * sk_t + dims[None, :] * sk_d,
                  mask=k_mask[:, None] & d_mask[None, :], other=0.0).to(tl.float32)
    k = k32.to(OP)
    v = tl.load(v_base + rows_k[:, None] * sv_t + columns[None, :] * sv_e,
                mask=k_mask[:, None] & e_mask[None, :], other=0.0).to(OP)
    g_base = G + pid_bh * T_pad + c * C
    if HAS_GATE:
        g_j = tl.load(g_base + local_j, mask=local_j < C, other=0.0)

    dk = tl.zeros((BK, DP), dtype=tl.float32)
    dv = tl.zeros((BK, EP), dtype=tl.float32)
    span_row = SPAN + ((pid_bh * n_chunks + c) * tl.cdiv(C, BK) + k_start // BK).to(tl.int64) * C
    own = tl.zeros((BK,), dtype=tl.float32)  # spanning sums of the gates of this key block
    column = tl.zeros((BK,), dtype=tl.float32)
    running = tl.sum(tl.zeros((BQ,), dtype=tl.float32), axis=0)
    q_tiles = tl.cdiv(C - k_start, BQ)
    for step in range(q_tiles):  # decreasing query tiles (the spanning sums run backwards), group inside
        q_start = k_start + (q_tiles - 1 - step) * BQ
        local_i = q_start + tl.arange(0, BQ)
        rows_q = c * C + local_i
        q_mask = (local_i < C) & (rows_q < t)
        spanning = tl.zeros((BQ, BK), dtype=tl.float32)  # P_ij = dA_ij A_ij summed over the group
        for r in range(group):
            query_head = head * group + r
            q_base = Q + b * sq_b + query_head * sq_h
            q = tl.load(q_base + rows_q[:, None] * sq_t + dims[None, :] * sq_d,
                        mask=q_mask[:, None] & d_mask[None, :], other=0.0).to(OP)
            grad_rows = (b * t + rows_q).to(tl.int64) * hq + query_head
            dn = tl.load(DN + grad_rows[:, None] * e + columns[None, :],
                         mask=q_mask[:, None] & e_mask[None, :], other=0.0).to(OP)
            delta = tl.load(DELTA + grad_rows, mask=q_mask, other=0.0)
            causal = (local_i[:, None] >= local_j[None, :]) & q_mask[:, None] & k_mask[None, :]
            scores = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale  # [BQ, BK]
            if HAS_GATE:
                g_i = tl.load(g_base + local_i, mask=local_i < C, other=0.0)
                decay = tl.exp(tl.where(causal, g_i[:, None] - g_j[None, :], float("-inf")))
            else:
                decay = tl.where(causal, 1.0, 0.0)
            weights = scores * scores * decay
            d_weights = tl.dot(dn, tl.trans(v), input_precision=PRECISION) + delta[:, None]
            d_scores = d_weights * 2.0 * scores * decay
            dv += tl.dot(tl.trans(weights.to(OP)), dn, input_precision=PRECISION)
            dk += tl.dot(tl.trans(d_scores.to(OP)), q, input_precision=PRECISION) * scale
            if HAS_GATE:
                spanning += d_weights * weights
        if HAS_GATE:
            own, column, running = spanning_tile(spanning, local_i, local_j, q_start, k_start, C, own, column,
                                                 running, span_row, BK)
    if HAS_GATE:
        spanning_finish(own, column, local_j, k_start, C, span_row, BK)

    # The state leaving the chunk: every key of the chunk was written into it.
    if HAS_GATE:
        key_decay = tl.exp(tl.load(g_base + C - 1) - g_j)
    else:
        key_decay = tl.full((BK,), 1.0, tl.float32)
    slot = pid_bh * n_chunks + c
    state_base = DSTATES + slot.to(tl.int64) * DI * e
    features = tl.arange(0, 256)
    acc = tl.zeros((BK, NBP, 16), dtype=tl.float32)
    for P in range(NP):
        block_i, block_j, weight = _pair(PAIRS, P)
        coord_i = block_i * 16 + tl.arange(0, 16)
        coord_j = block_j * 16 + tl.arange(0, 16)
        ki = tl.load(k_base + rows_k[:, None] * sk_t + coord_i[None, :] * sk_d,
                     mask=k_mask[:, None] & (coord_i < d)[None, :], other=0.0).to(tl.float32)
        kj = tl.load(k_base + rows_k[:, None] * sk_t + coord_j[None, :] * sk_d,
                     mask=k_mask[:, None] & (coord_j < d)[None, :], other=0.0).to(tl.float32)
        dS = tl.load(state_base + (P * 256 + features[:, None]) * e + columns[None, :],
                     mask=e_mask[None, :], other=0.0).to(OP)
        row_weight = key_decay * weight
        phi = _outer(ki * row_weight[:, None], kj, BK, 16).to(OP)
        dv += tl.dot(phi, dS, input_precision=PRECISION)
        dphi = tl.dot(v, tl.trans(dS), input_precision=PRECISION) * row_weight[:, None]
        acc = _outer_vjp(acc, dphi, ki, kj, block_i, block_j, BK, NBP)
    dk_state = tl.reshape(acc, (BK, DP))
    # the key-sum path: e^{G_last - G_j} k_j^T dM k_j with dM symmetric
    dM = tl.load(DMS + slot.to(tl.int64) * DP * DP + dims[:, None] * DP + dims[None, :])
    dk_state += tl.dot(k32, dM, input_precision=GRAM_PRECISION) * (2.0 * key_decay)[:, None]
    dk += dk_state

    out_rows = (b * t + rows_k).to(tl.int64) * h + head
    tl.store(DK + out_rows[:, None] * d + dims[None, :], dk.to(DK.dtype.element_ty),
             mask=k_mask[:, None] & d_mask[None, :])
    tl.store(DV + out_rows[:, None] * e + columns[None, :], dv.to(DV.dtype.element_ty),
             mask=k_mask[:, None] & e_mask[None, :])
    if HAS_GATE:
        tl.store(KTERM + out_rows, tl.sum(k32 * dk_state, axis=1) * 0.5, mask=k_mask)
