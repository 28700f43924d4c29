"""Backward of one chunk: gradients of Q (per query head) and of K, V (per key/value head, summing the query
heads of its group), and the pieces of the gate gradient. With ``dN'_i = [dn_i, delta_i]``,
``A_ij = (s q_i.k_j)^p e^{G_i - G_j}`` (j <= i in the chunk) and ``dA_ij = dn_i.v_j + delta_i``::

    dq_i  = s sum_j dA_ij p (s q_i.k_j)^(p-1) e^{G_i-G_j} k_j  +  J_phi(q_i)^T (s^p e^{G_i} S'_c dN'_i)
    dk_j  = s sum_i dA_ij p (s q_i.k_j)^(p-1) e^{G_i-G_j} q_i  +  J_phi(k_j)^T (e^{G_last-G_j} dS'_{c+1} [v_j, 1])
    dv'_j = sum_i A_ij dN'_i  +  e^{G_last-G_j} dS'_{c+1}^T phi(k_j)

Gate pieces (``function._gate_gradient`` assembles them; phi is p-homogeneous, so ``x . J_phi(x)^T g =
p phi(x) . g``): QTERM_i = q_i . dq_i^state / p = dN'_i . (state part of N'_i), KTERM_j = k_j . dk_j^state / p =
e^{G_last-G_j} [v_j, 1] . dS'_{c+1}^T phi(k_j), and SPAN (``_tiles.spanning_tile``) the intra-chunk sums of
``dA_ij A_ij`` over the pairs ``j < u <= i`` spanning each gate ``u``.
"""

from __future__ import annotations

import triton
import triton.language as tl

from ._tiles import integer_power, select, spanning_finish, spanning_tile, sympow_tile, sympow_vjp


@triton.jit
def query_grad_kernel(
    Q, K, V, G, IDX, W, STATES, ZS, DN, DQ, QTERM,
    sq_b, sq_t, sq_h, sq_d, sk_b, sk_t, sk_h, sk_d, sv_b, sv_t, sv_h, sv_e,
    t, hq, h, D, d, e, n_chunks, C, T_pad, scale,
    HAS_GATE: tl.constexpr, HAS_STATE: tl.constexpr, DEG: tl.constexpr,
    BQ: tl.constexpr, BK: tl.constexpr, BD: tl.constexpr, DP: tl.constexpr, EP: tl.constexpr,
    OP: tl.constexpr, PRECISION: tl.constexpr,
):
    """DQ [b, t, hq, d] contiguous (Q's dtype); DN = dN' [b, t, hq, e + 1] fp32; STATES [b, h, n + 1, D, e];
    QTERM [b, t, hq] fp32 (with HAS_GATE): ``q_i . dq_i^state / p``."""
    pid = tl.program_id(0)
    pid_bh = tl.program_id(1)
    blocks_per_chunk = tl.cdiv(C, BQ)
    c = pid // blocks_per_chunk
    q_start = (pid % blocks_per_chunk) * BQ
    b = pid_bh // hq
    query_head = pid_bh % hq
    head = query_head // (hq // h)

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
    dn = tl.load(DN + grad_rows[:, None] * (e + 1) + columns[None, :], mask=q_mask[:, None] & e_mask[None, :],
                 other=0.0)
    delta = tl.load(DN + grad_rows * (e + 1) + e, mask=q_mask, other=0.0)
    g_base = G + (b * h + head) * T_pad + c * C
    if HAS_GATE:
        g_i = tl.load(g_base + local_i, mask=local_i < C, other=0.0)

    k_base = K + b * sk_b + head * sk_h
    v_base = V + b * sv_b + head * sv_h
    dq = tl.zeros((BQ, DP), dtype=tl.float32)
    dn_op = dn.to(OP)
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
        d_weights = tl.dot(dn_op, tl.trans(v), input_precision=PRECISION) + delta[:, None]
        d_scores = d_weights * DEG * integer_power(scores, DEG - 1)
        if HAS_GATE:
            g_j = tl.load(g_base + local_j, mask=local_j < C, other=0.0)
            d_scores = d_scores * tl.exp(tl.where(causal, g_i[:, None] - g_j[None, :], float("-inf")))
        d_scores = tl.where(causal, d_scores, 0.0)
        dq += tl.dot(d_scores.to(OP), k, input_precision=PRECISION) * scale

    dq_state = tl.zeros((BQ, DP), dtype=tl.float32)  # kept apart for the gate term q . dq_state / p
    first_chunk_with_state = 0 if HAS_STATE else 1
    if c >= first_chunk_with_state:
        query_scale = tl.full((BQ,), 1.0, tl.float32) * integer_power(scale, DEG)
        if HAS_GATE:
            query_scale = query_scale * tl.exp(g_i)
        state_offset = ((b * h + head) * (n_chunks + 1) + c).to(tl.int64) * D
        for d_start in range(0, D, BD):
            a = d_start + tl.arange(0, BD)
            a_mask = a < D
            S = tl.load(STATES + (state_offset + a[:, None]) * e + columns[None, :],
                        mask=a_mask[:, None] & e_mask[None, :], other=0.0)
            z = tl.load(ZS + state_offset + a, mask=a_mask, other=0.0)
            dphi = tl.dot(dn_op, tl.trans(S.to(OP)), input_precision=PRECISION) + delta[:, None] * z[None, :]
            dphi = dphi * query_scale[:, None]
            dq_state = sympow_vjp(dq_state, dphi, q, IDX, W, a, a_mask, DEG, DP, OP, PRECISION)
    dq += dq_state

    out_rows = (b * t + rows_q).to(tl.int64) * hq + query_head
    tl.store(DQ + out_rows[:, None] * d + dims[None, :], dq.to(DQ.dtype.element_ty),
             mask=q_mask[:, None] & d_mask[None, :])
    if HAS_GATE:
        tl.store(QTERM + out_rows, tl.sum(q32 * dq_state, axis=1) / DEG, mask=q_mask)


@triton.jit
def key_value_grad_kernel(
    Q, K, V, G, IDX, W, DSTATES, DZS, DN, DK, DV, KTERM, SPAN,
    sq_b, sq_t, sq_h, sq_d, sk_b, sk_t, sk_h, sk_d, sv_b, sv_t, sv_h, sv_e,
    t, hq, h, D, d, e, n_chunks, C, T_pad, scale,
    HAS_GATE: tl.constexpr, DEG: tl.constexpr,
    BQ: tl.constexpr, BK: tl.constexpr, BD: tl.constexpr, DP: tl.constexpr, EP: tl.constexpr,
    OP: tl.constexpr, PRECISION: tl.constexpr,
):
    """DK [b, t, h, d], DV [b, t, h, e] contiguous (K's dtype). DSTATES [b, h, n + 1, D, e]: slot c + 1 holds
    dS'_{c+1}, the gradient of the state leaving chunk c. With HAS_GATE: KTERM [b, t, h] fp32 (``k_j . dk_j^state
    / p``) and SPAN [b h, n, cdiv(C, BK), C] fp32 (row J: the spanning sums of key block J, see ``spanning_tile``)."""
    pid = tl.program_id(0)
    pid_bh = tl.program_id(1)
    blocks_per_chunk = tl.cdiv(C, BK)
    c = pid // blocks_per_chunk
    k_start = (pid % blocks_per_chunk) * BK
    b = pid_bh // h
    head = pid_bh % h
    group = hq // h

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
            dn = tl.load(DN + grad_rows[:, None] * (e + 1) + columns[None, :],
                         mask=q_mask[:, None] & e_mask[None, :], other=0.0).to(OP)
            delta = tl.load(DN + grad_rows * (e + 1) + e, mask=q_mask, other=0.0)
            causal = (local_i[:, None] >= local_j[None, :]) & q_mask[:, None] & k_mask[None, :]
            scores = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale  # [BQ, BK]
            if HAS_GATE:
                g_i = tl.load(g_base + local_i, mask=local_i < C, other=0.0)
                decay = tl.exp(tl.where(causal, g_i[:, None] - g_j[None, :], float("-inf")))
            else:
                decay = tl.where(causal, 1.0, 0.0)
            weights = integer_power(scores, DEG) * decay
            d_weights = tl.dot(dn, tl.trans(v), input_precision=PRECISION) + delta[:, None]
            d_scores = d_weights * DEG * integer_power(scores, DEG - 1) * decay
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
    state_offset = (pid_bh * (n_chunks + 1) + c + 1).to(tl.int64) * D
    dk_state = tl.zeros((BK, DP), dtype=tl.float32)  # kept apart for the gate term k . dk_state / p
    for d_start in range(0, D, BD):
        a = d_start + tl.arange(0, BD)
        a_mask = a < D
        dS = tl.load(DSTATES + (state_offset + a[:, None]) * e + columns[None, :],
                     mask=a_mask[:, None] & e_mask[None, :], other=0.0).to(OP)
        dz = tl.load(DZS + state_offset + a, mask=a_mask, other=0.0)
        dphi = (tl.dot(v, tl.trans(dS), input_precision=PRECISION) + dz[None, :]) * key_decay[:, None]
        if DEG == 2:
            # The two selected factors serve both phi(k) and its Jacobian: 2 one-hot products instead of 4.
            weight = tl.load(W + a, mask=a_mask, other=0.0)[None, :]
            first = select(k, IDX, a, a_mask, 0, DEG, DP, OP, PRECISION)
            second = select(k, IDX, a, a_mask, 1, DEG, DP, OP, PRECISION)
            phi = weight * first * second * key_decay[:, None]
            weighted = (dphi * weight).to(tl.float32)
            first_target = tl.load(IDX + a * DEG, mask=a_mask, other=-1)
            second_target = tl.load(IDX + a * DEG + 1, mask=a_mask, other=-1)
            dk_state += tl.dot((weighted * second).to(OP), (first_target[:, None] == dims[None, :]).to(OP),
                               input_precision=PRECISION)
            dk_state += tl.dot((weighted * first).to(OP), (second_target[:, None] == dims[None, :]).to(OP),
                               input_precision=PRECISION)
        else:
            phi = sympow_tile(k, IDX, W, a, a_mask, DEG, DP, OP, PRECISION) * key_decay[:, None]
            dk_state = sympow_vjp(dk_state, dphi, k, IDX, W, a, a_mask, DEG, DP, OP, PRECISION)
        dv += tl.dot(phi.to(OP), dS, input_precision=PRECISION)
    dk += dk_state

    out_rows = (b * t + rows_k).to(tl.int64) * h + head
    tl.store(DK + out_rows[:, None] * d + dims[None, :], dk.to(DK.dtype.element_ty),
             mask=k_mask[:, None] & d_mask[None, :])
    tl.store(DV + out_rows[:, None] * e + columns[None, :], dv.to(DV.dtype.element_ty),
             mask=k_mask[:, None] & e_mask[None, :])
    if HAS_GATE:
        tl.store(KTERM + out_rows, tl.sum(k32 * dk_state, axis=1) / DEG, mask=k_mask)
