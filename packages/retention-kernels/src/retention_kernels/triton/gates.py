"""The gate gradient ``d log_G`` assembled from the per-chunk pieces that the gradient kernels leave behind.

For the gate at position ``u`` of chunk ``c`` (every term really spans the gate, so strong gates lose nothing to
cancellation)::

    d log_g_u = SPAN_u + sum_{i >= u in c} QTERM_i + sum_{j < u in c} KTERM_j + e^{G_C} <dS'_{c+1}, S'_c>

``SPAN_u`` comes from the intra-chunk blocks: row ``J`` of ``SPANS`` (key block ``J``, ``_tiles.spanning_tile``)
holds its own gates' sums inside the block, zeros before it and, after it, the row sums ``sum_{j in J} P_ij``,
whose suffix sums over ``i >= u`` are that block's share of ``SPAN_u``. One program per chunk and head walks the
chunk backwards and keeps every suffix sum as a running carry, in fp64 (one pass over the pieces, no fp64 copies
in memory).
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def gate_gradient_kernel(
    QTERM, KTERM, SPANS, G, STATE_INNER, OUT,
    t, hq, h, n_chunks, C, T_pad, key_block, n_blocks,
    NB: tl.constexpr, BLOCK: tl.constexpr,
):
    """Grid ``(n_chunks, b h)``. QTERM ``[b, t, hq]`` fp32 (summed over the query heads of each key head), KTERM
    ``[b, t, h]`` fp32, SPANS ``[b h, n, n_blocks, C]`` fp32, G ``[b h, T_pad]`` (cumulative within each chunk),
    STATE_INNER ``[b h, n]`` fp64 ``<dS'_{c+1}, S'_c>``; OUT ``[b, t, h]`` fp32. ``NB >= n_blocks``, powers of 2."""
    c = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // h
    head = bh % h
    group = hq // h
    g_last = tl.load(G + bh.to(tl.int64) * T_pad + c * C + C - 1).to(tl.float64)
    kept = tl.exp(g_last) * tl.load(STATE_INNER + bh * n_chunks + c)

    positions = tl.arange(0, BLOCK)
    key_total = tl.zeros((), dtype=tl.float64)
    for start in range(0, C, BLOCK):
        rows = c * C + start + positions
        valid = (start + positions < C) & (rows < t)
        key_total += tl.sum(tl.load(KTERM + (b * t + rows).to(tl.int64) * h + head, mask=valid, other=0.0)
                            .to(tl.float64), axis=0)

    blocks = tl.arange(0, NB)
    span_base = SPANS + (bh * n_chunks + c).to(tl.int64) * n_blocks * C
    query_carry = tl.zeros((), dtype=tl.float64)  # sums over the positions after the current tile
    key_carry = tl.zeros((), dtype=tl.float64)
    span_carry = tl.zeros((NB,), dtype=tl.float64)
    n_tiles = tl.cdiv(C, BLOCK)
    for step in range(n_tiles):
        u = (n_tiles - 1 - step) * BLOCK + positions
        rows = c * C + u
        in_chunk = u < C
        valid = in_chunk & (rows < t)
        queries = tl.zeros((BLOCK,), dtype=tl.float64)
        for r in range(group):
            queries += tl.load(QTERM + (b * t + rows).to(tl.int64) * hq + head * group + r, mask=valid,
                               other=0.0).to(tl.float64)
        keys = tl.load(KTERM + (b * t + rows).to(tl.int64) * h + head, mask=valid, other=0.0).to(tl.float64)
        later_queries = tl.cumsum(queries, axis=0, reverse=True) + query_carry  # i >= u
        earlier_keys = key_total - (tl.cumsum(keys, axis=0, reverse=True) + key_carry)  # j < u
        query_carry += tl.sum(queries, axis=0)
        key_carry += tl.sum(keys, axis=0)

        spans = tl.load(span_base + blocks[:, None] * C + u[None, :],
                        mask=(blocks < n_blocks)[:, None] & in_chunk[None, :], other=0.0).to(tl.float64)
        after = u[None, :] >= (blocks[:, None] + 1) * key_block
        row_sums = tl.where(after, spans, 0.0)
        later_rows = tl.cumsum(row_sums, axis=1, reverse=True) + span_carry[:, None]  # sum over i >= u
        span_carry += tl.sum(row_sums, axis=1)
        span = tl.sum(tl.where(after, later_rows, spans), axis=0)

        total = span + later_queries + earlier_keys + kept
        tl.store(OUT + (b * t + rows).to(tl.int64) * h + head, total.to(tl.float32), mask=valid)
