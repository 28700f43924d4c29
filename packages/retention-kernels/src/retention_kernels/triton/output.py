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

from ._tiles import chunk_rows, integer_power, intra_output, load_tile, query_program, store_output, sympow_tile


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
    c, q_start, b, query_head, head = query_program(hq, h, C, BQ)
    local_i, rows_q, q_mask = chunk_rows(q_start, c, t, C, BQ)
    dims = tl.arange(0, DP)
    d_mask = dims < d
    columns = tl.arange(0, EP)
    e_mask = columns < e
    q = load_tile(Q + b * sq_b + query_head * sq_h, rows_q, sq_t, q_mask, dims, sq_d, d_mask).to(OP)
    g_base = G + (b * h + head) * T_pad + c * C
    if HAS_GATE:
        g_i = tl.load(g_base + local_i, mask=local_i < C, other=0.0)
    numerator, denominator = intra_output(
        q, local_i, q_mask, q_start, K + b * sk_b + head * sk_h, sk_t, sk_d, V + b * sv_b + head * sv_h, sv_t, sv_e,
        g_base, c, t, C, scale, dims, d_mask, columns, e_mask, HAS_GATE, DEG, BQ, BK, EP, OP, PRECISION,
    )

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

    out_rows = (b * t + rows_q).to(tl.int64) * hq + query_head
    store_output(Y, DEN, numerator, denominator, out_rows, q_mask, columns, e_mask, e)
