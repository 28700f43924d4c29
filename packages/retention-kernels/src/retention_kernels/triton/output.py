"""The forward output: the intra-chunk power-attention block fused with the query of the state entering the
chunk and the normalisation. One program computes ``BQ`` query rows of one chunk for one query head::

    N'_i = sum_{j <= i in chunk} (s q_i.k_j)^p e^{G_i - G_j} [v_j, 1]  +  s^p e^{G_i} phi(q_i)^T S'_c
    y_i  = N'_i[:e] / N'_i[e]   (0 when the denominator is exactly 0);   DEN_i = N'_i[e]

Products and accumulators are fp32; both terms are in the same (chunk-start) reference, so no rescaling is
needed before the division (fp32 range covers ``(s q.k)^p`` summed over 64k steps for p <= 4 at sane scales).
"""

from __future__ import annotations

import triton
import triton.language as tl

from ._tiles import integer_power, sympow_tile


@triton.jit
def output_kernel(
    Q, K, V, G, IDX, W, STATES, ZS, Y, DEN,
    sq_b, sq_t, sq_h, sq_d, sk_b, sk_t, sk_h, sk_d, sv_b, sv_t, sv_h, sv_e,
    t, hq, h, D, d, e, n_chunks, C, T_pad, scale,
    HAS_GATE: tl.constexpr, HAS_STATE: tl.constexpr, DEG: tl.constexpr,
    BQ: tl.constexpr, BK: tl.constexpr, BD: tl.constexpr, DP: tl.constexpr, EP: tl.constexpr,
    OP: tl.constexpr, PRECISION: tl.constexpr,
):
    """Y [b, t, hq, e] (contiguous, Q's dtype), DEN [b, t, hq] fp32; STATES [b, h, n + 1, D, e] fp32."""
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
    q = tl.load(q_base + rows_q[:, None] * sq_t + dims[None, :] * sq_d,
                mask=q_mask[:, None] & d_mask[None, :], other=0.0).to(OP)
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
        weights = integer_power(tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale, DEG)
        if HAS_GATE:
            g_j = tl.load(g_base + local_j, mask=local_j < C, other=0.0)
            # exp of a masked -inf is 0: the acausal (positive) differences never overflow.
            weights = weights * tl.exp(tl.where(causal, g_i[:, None] - g_j[None, :], float("-inf")))
        weights = tl.where(causal, weights, 0.0)
        numerator += tl.dot(weights.to(OP), v, input_precision=PRECISION)
        denominator += tl.sum(weights, axis=1)

    first_chunk_with_state = 0 if HAS_STATE else 1
    if c >= first_chunk_with_state:
        inter = tl.zeros((BQ, EP), dtype=tl.float32)
        inter_denominator = tl.zeros((BQ,), dtype=tl.float32)
        state_offset = ((b * h + head) * (n_chunks + 1) + c).to(tl.int64) * D
        for d_start in range(0, D, BD):
            a = d_start + tl.arange(0, BD)
            a_mask = a < D
            phi = sympow_tile(q, IDX, W, a, a_mask, DEG, DP, OP, PRECISION)
            S = tl.load(STATES + (state_offset + a[:, None]) * e + columns[None, :],
                        mask=a_mask[:, None] & e_mask[None, :], other=0.0)
            z = tl.load(ZS + state_offset + a, mask=a_mask, other=0.0)
            inter += tl.dot(phi.to(OP), S.to(OP), input_precision=PRECISION)
            inter_denominator += tl.sum(phi * z[None, :], axis=1)
        query_scale = tl.full((BQ,), 1.0, tl.float32) * integer_power(scale, DEG)
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
