"""Backward of one chunk: gradients of Q (per query head) and of K, V (per key/value head, summing the query
heads of its group), and the pieces of the gate gradient. With ``dN'_i = [dn_i, delta_i]``,
``A_ij = (s q_i.k_j)^p e^{G_i - G_j}`` (j <= i in the chunk) and ``dA_ij = dn_i.v_j + delta_i``::

    dq_i  = s sum_j dA_ij p (s q_i.k_j)^(p-1) e^{G_i-G_j} k_j  +  J_phi(q_i)^T (s^p e^{G_i} S'_c dN'_i)
    dk_j  = s sum_i dA_ij p (s q_i.k_j)^(p-1) e^{G_i-G_j} q_i  +  J_phi(k_j)^T (e^{G_last-G_j} dS'_{c+1} [v_j, 1])
    dv'_j = sum_i A_ij dN'_i  +  e^{G_last-G_j} dS'_{c+1}^T phi(k_j)

Gate pieces (``gates.gate_gradient_kernel`` assembles them; phi is p-homogeneous, so ``x . J_phi(x)^T g =
p phi(x) . g``): QTERM_i = q_i . dq_i^state / p = dN'_i . (state part of N'_i), KTERM_j = k_j . dk_j^state / p =
e^{G_last-G_j} [v_j, 1] . dS'_{c+1}^T phi(k_j), and SPAN (``_tiles.spanning_tile``) the intra-chunk sums of
``dA_ij A_ij`` over the pairs ``j < u <= i`` spanning each gate ``u``.
"""

from __future__ import annotations

import triton
import triton.language as tl

from ._tiles import (
    chunk_rows,
    integer_power,
    intra_key_value_grad,
    intra_query_grad,
    key_program,
    load_tile,
    query_program,
    select,
    sympow_tile,
    sympow_vjp,
)


@triton.jit
def query_grad_kernel(
    Q, K, V, G, IDX, W, STATES, ZS, DN, DELTA, DQ, QTERM,
    sq_b, sq_t, sq_h, sq_d, sk_b, sk_t, sk_h, sk_d, sv_b, sv_t, sv_h, sv_e,
    t, hq, h, D, d, e, n_chunks, C, T_pad, scale,
    HAS_GATE: tl.constexpr, HAS_STATE: tl.constexpr, DEG: tl.constexpr,
    BQ: tl.constexpr, BK: tl.constexpr, BD: tl.constexpr, DP: tl.constexpr, EP: tl.constexpr,
    OP: tl.constexpr, PRECISION: tl.constexpr,
):
    """DQ [b, t, hq, d] contiguous (Q's dtype); dN' = [DN, DELTA]: DN [b, t, hq, e] (operand dtype), DELTA
    [b, t, hq] fp32, both contiguous; STATES [b, h, n + 1, D, e];
    QTERM [b, t, hq] fp32 (with HAS_GATE): ``q_i . dq_i^state / p``."""
    c, q_start, b, query_head, head = query_program(hq, h, C, BQ)
    local_i, rows_q, q_mask = chunk_rows(q_start, c, t, C, BQ)
    dims = tl.arange(0, DP)
    d_mask = dims < d
    columns = tl.arange(0, EP)
    e_mask = columns < e
    q32 = load_tile(Q + b * sq_b + query_head * sq_h, rows_q, sq_t, q_mask, dims, sq_d, d_mask).to(tl.float32)
    q = q32.to(OP)
    grad_rows = (b * t + rows_q).to(tl.int64) * hq + query_head
    dn = load_tile(DN, grad_rows, e, q_mask, columns, 1, e_mask)
    delta = tl.load(DELTA + grad_rows, mask=q_mask, other=0.0)
    g_base = G + (b * h + head) * T_pad + c * C
    if HAS_GATE:
        g_i = tl.load(g_base + local_i, mask=local_i < C, other=0.0)
    dn_op = dn.to(OP)
    dq = intra_query_grad(
        q, dn_op, delta, local_i, q_mask, q_start, K + b * sk_b + head * sk_h, sk_t, sk_d, V + b * sv_b + head * sv_h,
        sv_t, sv_e, g_base, c, t, C, scale, dims, d_mask, columns, e_mask, HAS_GATE, DEG, BQ, BK, DP, OP, PRECISION,
    )

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
    Q, K, V, G, IDX, W, DSTATES, DZS, DN, DELTA, DK, DV, KTERM, SPAN,
    sq_b, sq_t, sq_h, sq_d, sk_b, sk_t, sk_h, sk_d, sv_b, sv_t, sv_h, sv_e,
    t, hq, h, D, d, e, n_chunks, C, T_pad, scale,
    HAS_GATE: tl.constexpr, DEG: tl.constexpr,
    BQ: tl.constexpr, BK: tl.constexpr, BD: tl.constexpr, DP: tl.constexpr, EP: tl.constexpr,
    OP: tl.constexpr, PRECISION: tl.constexpr,
):
    """DK [b, t, h, d], DV [b, t, h, e] contiguous (K's dtype). DSTATES [b, h, n + 1, D, e]: slot c + 1 holds
    dS'_{c+1}, the gradient of the state leaving chunk c. With HAS_GATE: KTERM [b, t, h] fp32 (``k_j . dk_j^state
    / p``) and SPAN [b h, n, cdiv(C, BK), C] fp32 (row J: the spanning sums of key block J, see ``spanning_tile``)."""
    c, k_start, b, head, pid_bh = key_program(h, C, BK)

    local_j, rows_k, k_mask = chunk_rows(k_start, c, t, C, BK)
    dims = tl.arange(0, DP)
    d_mask = dims < d
    columns = tl.arange(0, EP)
    e_mask = columns < e
    k32 = load_tile(K + b * sk_b + head * sk_h, rows_k, sk_t, k_mask, dims, sk_d, d_mask).to(tl.float32)
    k = k32.to(OP)
    v = load_tile(V + b * sv_b + head * sv_h, rows_k, sv_t, k_mask, columns, sv_e, e_mask).to(OP)
    g_base = G + pid_bh * T_pad + c * C
    if HAS_GATE:
        g_j = tl.load(g_base + local_j, mask=local_j < C, other=0.0)
    group = hq // h
    span_row = SPAN + ((pid_bh * n_chunks + c) * tl.cdiv(C, BK) + k_start // BK).to(tl.int64) * C
    dk, dv = intra_key_value_grad(
        k, v, local_j, k_mask, k_start, Q + b * sq_b + head * group * sq_h, sq_t, sq_d, sq_h, DN, e, DELTA, 1,
        g_base, span_row, b, c, t, hq, head, group, C, scale, dims, d_mask, columns, e_mask,
        HAS_GATE, DEG, BQ, BK, DP, EP, OP, PRECISION,
    )

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
