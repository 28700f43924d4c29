"""deg-2 kernels in the internal block-pair layout: no selection products, ``phi`` tiles are outer products.

Coordinates are split into 16-wide blocks (``d`` padded to ``DP = 16 * NBP``). Feature ``f = 256 P + 16 u + v``
of block pair ``P = (I, J)``, ``I <= J``, is ``w_P x[16 I + u] x[16 J + v]`` with ``w_P = sqrt(2)`` off the
diagonal and 1 on it (diagonal blocks hold each off-diagonal product twice, which is what ``(x.y)^2`` needs), so
``<phi(x), phi(y)> = (x.y)^2`` with ``DI = 256 * NP`` features (2560 for d=64 instead of 2080). A ``[rows, 16 BU]``
tile of ``phi`` (``BU`` = 16, or 8 for half a block pair: ``_pair_tile``) is the broadcast product of a ``[rows,
BU]`` and a ``[rows, 16]`` load: it feeds ``tl.dot`` directly. Per-row factors (gates, the query scale) multiply
the sums after the loop over tiles, not every tile.

The sum of keys is kept as the symmetric ``[DP, DP]`` matrix ``M = sum_j decay_j k_j k_j^T`` (so the
denominator's state term is ``q^T M q``, one small product). ``function.py`` converts both to and from the
public minimal layout (an isometry: ``S_int = A S_min``, ``S_min = A^T S_int``, ``A^T A = 1``).

Kernels (``G`` = cumulative log gate inside each chunk, ``s`` = scale):
  ``pair_state_kernel``   forward: ``S_{c+1} = e^{G_last} S_c + sum_j e^{G_last - G_j} phi(k_j) v_j^T`` (and M),
                          storing the state entering every chunk; backward: the reverse scan of
                          ``dS_c = e^{G_last} dS_{c+1} + s^2 sum_i e^{G_i} phi(q_i) dn_i^T`` (and dM from delta).
                          One program per (feature tile, head) walks the chunks in order: the scan is fused.
  ``pair_output_kernel``  intra-chunk block + state query + normalisation.
  ``pair_query_grad_kernel``: dQ (and QTERM, the gate gradient's query pieces: see ``grads.py``).
  ``pair_key_state_grad_kernel``, then ``pair_key_value_grad_kernel``: the state's share of dK, dV (and KTERM),
                          then the intra-chunk block's added to it (and SPAN).
"""

from __future__ import annotations

import triton
import triton.language as tl

from ._tiles import (
    chunk_rows,
    intra_key_value_grad,
    intra_output,
    intra_query_grad,
    key_program,
    load_tile,
    query_program,
    store_output,
)


@triton.jit
def _pair_tile(PAIRS, tile, NP, BU: tl.constexpr):
    """Tile ``tile`` of the ``NP * 16 / BU``: block pair ``P = (I, J)`` (``tile % NP``) and its rows ``u0 .. u0 + BU``
    of the 16 (``u0 = BU * (tile // NP)``) -> its first ``i`` coordinate ``16 I + u0`` (then ``BU`` of them), block
    ``J`` (16 coordinates), the weight ``w_P`` (``sqrt(2)`` off the diagonal) and its first feature ``256 P + 16 u0``.
    The pairs are ordered ``I``-major, so consecutive tiles share their ``i`` coordinates, ``16 / BU`` runs per
    block ``I`` (see :func:`_outer_vjp`)."""
    if BU == 16:  # no division in the kernels' hot loops where the tiles are whole pairs
        P = tile
        u0 = 0
    else:
        P = tile % NP
        u0 = (tile // NP) * BU
    block_i = tl.load(PAIRS + 2 * P)
    block_j = tl.load(PAIRS + 2 * P + 1)
    weight = tl.where(block_i < block_j, 1.4142135623730951, 1.0)
    return block_i * 16 + u0, block_j, weight, P * 256 + u0 * 16


@triton.jit
def _pair_operands(PAIRS, tile, NP, x_base, rows, sx_t, row_mask, sx_d, d, state_base, e, columns,
                   BU: tl.constexpr):
    """The operands of one pair tile's state product -> ``(xi, xj, state_tile, weight, first_i, block_j)``: fp32
    rows of ``x`` at the tile's ``BU`` ``i`` coordinates and 16 ``j`` coordinates (``phi = _outer(xi * weight,
    xj)``) and the pointers of the ``[16 BU, e]`` tile of the state ``state_base [DI, e]`` at its features (see
    :func:`_pair_tile`; the caller loads it where its schedule wants it)."""
    first_i, block_j, weight, first_feature = _pair_tile(PAIRS, tile, NP, BU)
    coord_i = first_i + tl.arange(0, BU)
    coord_j = block_j * 16 + tl.arange(0, 16)
    xi = load_tile(x_base, rows, sx_t, row_mask, coord_i, sx_d, coord_i < d).to(tl.float32)
    xj = load_tile(x_base, rows, sx_t, row_mask, coord_j, sx_d, coord_j < d).to(tl.float32)
    state_tile = state_base + (first_feature + tl.arange(0, BU * 16))[:, None] * e + columns[None, :]
    return xi, xj, state_tile, weight, first_i, block_j


@triton.jit
def _outer(xi, xj, ROWS: tl.constexpr, BU: tl.constexpr):
    """``[ROWS, BU * 16]`` tile ``xi[:, u] * xj[:, v]`` at column ``16 u + v`` (fp32)."""
    return tl.reshape(xi[:, :, None] * xj[:, None, :], (ROWS, BU * 16))


@triton.jit
def _outer_vjp(run_i, acc_j, dphi, xi_w, xj_w, block_j, ROWS: tl.constexpr, BU: tl.constexpr, NBP: tl.constexpr):
    """``J^T dphi`` for the pair tile ``phi = w xi (x) xj``, given ``xi_w = w xi`` and ``xj_w = w xj`` (the weight on
    the small operands, not on the ``[ROWS, 16 BU]`` tile): the ``[ROWS, BU]`` gradient of ``xi`` added to
    ``run_i`` (the run of tiles with the same ``i`` coordinates, :func:`_flush_run`), that of ``xj`` to its block
    of ``acc_j [ROWS, NBP, 16]``. (Placing a gradient in its block is a masked add over the whole accumulator:
    once per run rather than per tile for the ``i`` side.)"""
    d3 = tl.reshape(dphi, (ROWS, BU, 16))
    run_i += tl.sum(d3 * xj_w[:, None, :], axis=2)
    grad_j = tl.sum(d3 * xi_w[:, :, None], axis=1)
    acc_j += tl.where(tl.arange(0, NBP)[None, :, None] == block_j, grad_j[:, None, :], 0.0)
    return run_i, acc_j


@triton.jit
def _flush_run(acc, run_i, first_i, ROWS: tl.constexpr, BU: tl.constexpr, NBP: tl.constexpr):
    """Place a run's ``i`` gradient (coordinates ``first_i .. first_i + BU``) in its block of ``acc [ROWS, NBP,
    16]``. A half block (BU = 8) is widened to the block's 16 columns first, zeros in the other half: one
    accumulator for both sides of the pairs (a second one for the half blocks cost 32 registers a thread, and
    the gradient kernels spill at the 255 limit)."""
    if BU == 16:
        block_grad = run_i
    else:
        zeros = tl.zeros((ROWS, BU), dtype=tl.float32)
        if first_i % 16 == 0:
            halves = tl.join(run_i, zeros)  # [ROWS, BU, 2]: half 0 is the block's first BU coordinates
        else:
            halves = tl.join(zeros, run_i)
        block_grad = tl.reshape(tl.permute(halves, (0, 2, 1)), (ROWS, 16))
    return acc + tl.where(tl.arange(0, NBP)[None, :, None] == first_i // 16, block_grad[:, None, :], 0.0)


@triton.jit
def _state_vjp(X, rows, sx_t, row_mask, sx_d, d, PAIRS, NP, state_base, e, columns, e_mask, u,
               ROWS: tl.constexpr, BU: tl.constexpr, DP: tl.constexpr, EP: tl.constexpr, OP: tl.constexpr,
               PRECISION: tl.constexpr, VALUE_GRAD: tl.constexpr):
    """The state products of a gradient kernel for the ``[ROWS]`` rows of ``x`` (at ``X``) and their OP tile ``u``
    ``[ROWS, EP]``, against the state ``S [DI, e]`` at ``state_base``: ``J_phi(x)^T (S u)`` fp32 ``[ROWS, DP]``
    and, with VALUE_GRAD, ``phi(x)^T S`` fp32 ``[ROWS, EP]`` (else zeros)."""
    NBP: tl.constexpr = DP // 16
    acc_j = tl.zeros((ROWS, NBP, 16), dtype=tl.float32)
    run_i = tl.zeros((ROWS, BU), dtype=tl.float32)
    value_grad = tl.zeros((ROWS, EP), dtype=tl.float32)
    current_i, _, _, _ = _pair_tile(PAIRS, 0, NP, BU)
    for tile in range(NP * (16 // BU)):
        xi, xj, state_tile, weight, first_i, block_j = _pair_operands(PAIRS, tile, NP, X, rows, sx_t, row_mask, sx_d,
                                                                      d, state_base, e, columns, BU)
        if first_i != current_i:  # a new run: the last one's i gradient to its place
            acc_j = _flush_run(acc_j, run_i, current_i, ROWS, BU, NBP)
            run_i = tl.zeros((ROWS, BU), dtype=tl.float32)
            current_i = first_i
        S = tl.load(state_tile, mask=e_mask[None, :], other=0.0).to(OP)
        xi_w = xi * weight
        if VALUE_GRAD:
            value_grad += tl.dot(_outer(xi_w, xj, ROWS, BU).to(OP), S, input_precision=PRECISION)
        dphi = tl.dot(u, tl.trans(S), input_precision=PRECISION)  # d/d(w xi xj): the weight goes on xi, xj
        run_i, acc_j = _outer_vjp(run_i, acc_j, dphi, xi_w, xj * weight, block_j, ROWS, BU, NBP)
    acc_j = _flush_run(acc_j, run_i, current_i, ROWS, BU, NBP)
    return tl.reshape(acc_j, (ROWS, DP)), value_grad


@triton.jit
def _reloaded_fp32(x_base, rows, sx_t, row_mask, dims, sx_d, d_mask):
    """The program's rows of ``x`` as fp32 ``[rows, DP]`` for its products after the loops, loaded again there
    (from the cache) rather than held through them: 32 registers a thread at 64 rows, where the kernels were at
    the 255 limit and spilling (``benchmarks/kernel_asm.py``)."""
    return load_tile(x_base, rows, sx_t, row_mask, dims, sx_d, d_mask).to(tl.float32)


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
    n_tiles = NP * (16 // BU)
    b = pid_bh // h
    head = pid_bh % h
    group = hx // h
    DI = NP * 256
    g_base = G + pid_bh * T_pad
    if pid < n_tiles:
        first_i, block_j, weight, first_feature = _pair_tile(PAIRS, pid, NP, BU)
        features = first_feature + tl.arange(0, BU * 16)
        columns = tl.arange(0, EP)
        e_mask = columns < e
        coord_i = first_i + tl.arange(0, BU)
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
    BQ: tl.constexpr, BK: tl.constexpr, BU: tl.constexpr, DP: tl.constexpr, EP: tl.constexpr,
    OP: tl.constexpr, PRECISION: tl.constexpr, GRAM_PRECISION: tl.constexpr,
):
    """``N'_i = sum_{j <= i in chunk} (s q_i.k_j)^2 e^{G_i - G_j} [v_j, 1] + s^2 e^{G_i} [phi(q_i)^T S_c,
    q_i^T M_c q_i]``, ``Y = N'[:e] / N'[e]`` (0 when the denominator is 0), ``DEN = N'[e]`` fp32."""
    c, q_start, b, query_head, head = query_program(hq, h, C, BQ)
    DI = NP * 256

    local_i, rows_q, q_mask = chunk_rows(q_start, c, t, C, BQ)
    dims = tl.arange(0, DP)
    d_mask = dims < d
    columns = tl.arange(0, EP)
    e_mask = columns < e
    q_base = Q + b * sq_b + query_head * sq_h
    q = load_tile(q_base, rows_q, sq_t, q_mask, dims, sq_d, d_mask).to(OP)
    g_base = G + (b * h + head) * T_pad + c * C
    if HAS_GATE:
        g_i = tl.load(g_base + local_i, mask=local_i < C, other=0.0)
    numerator, denominator = intra_output(
        q, local_i, q_mask, q_start, K + b * sk_b + head * sk_h, sk_t, sk_d, V + b * sv_b + head * sv_h, sv_t, sv_e,
        g_base, c, t, C, scale, dims, d_mask, columns, e_mask, HAS_GATE, 2, BQ, BK, EP, OP, PRECISION,
    )

    first_chunk_with_state = 0 if HAS_STATE else 1
    has_state = c >= first_chunk_with_state
    # the state loop runs no tile without a state rather than sitting in the branch below: there, its zero-trip
    # path wrote the wgmma accumulator with moves, and ptxas serialized every wgmma of the kernel (C7515)
    inter = tl.zeros((BQ, EP), dtype=tl.float32)
    slot = (b * h + head) * n_chunks + c
    state_base = STATES + slot.to(tl.int64) * DI * e
    for tile in range(NP * (16 // BU) * has_state.to(tl.int32)):
        qi, qj, state_tile, weight, _, _ = _pair_operands(PAIRS, tile, NP, q_base, rows_q, sq_t, q_mask, sq_d,
                                                          d, state_base, e, columns, BU)
        phi = _outer(qi * weight, qj, BQ, BU).to(OP)
        S = tl.load(state_tile, mask=e_mask[None, :], other=0.0).to(OP)
        inter += tl.dot(phi, S, input_precision=PRECISION)
    if has_state:
        square = dims[:, None] * DP + dims[None, :]
        M = tl.load(MS + slot.to(tl.int64) * DP * DP + square)
        q32 = _reloaded_fp32(q_base, rows_q, sq_t, q_mask, dims, sq_d, d_mask)
        inter_denominator = tl.sum(tl.dot(q32, M, input_precision=GRAM_PRECISION) * q32, axis=1)
        query_scale = tl.full((BQ,), 1.0, tl.float32) * (scale * scale)
        if HAS_GATE:
            query_scale = query_scale * tl.exp(g_i)
        numerator += inter * query_scale[:, None]
        denominator += inter_denominator * query_scale

    out_rows = (b * t + rows_q).to(tl.int64) * hq + query_head
    store_output(Y, DEN, numerator, denominator, out_rows, q_mask, columns, e_mask, e)


@triton.jit
def pair_query_grad_kernel(
    Q, K, V, G, PAIRS, STATES, MS, DN, DELTA, DQ, QTERM,
    sq_b, sq_t, sq_h, sq_d, sk_b, sk_t, sk_h, sk_d, sv_b, sv_t, sv_h, sv_e,
    t, hq, h, d, e, n_chunks, C, T_pad, NP, scale,
    HAS_GATE: tl.constexpr, HAS_STATE: tl.constexpr,
    BQ: tl.constexpr, BK: tl.constexpr, BU: tl.constexpr, DP: tl.constexpr, EP: tl.constexpr,
    OP: tl.constexpr, PRECISION: tl.constexpr, GRAM_PRECISION: tl.constexpr,
):
    """DQ [b, t, hq, d] contiguous. DN ``[b, t, hq, e]`` (already rounded to the operand precision) and DELTA
    ``[b, t, hq]`` = ``-(dn . y)`` computed from that same rounded dn, so ``dA_ij = dn_i . v_j + delta_i`` equals
    ``dn_i . (v_j - y_i)`` without the bf16 rounding of dn turning into an absolute error. QTERM [b, t, hq]
    fp32 (with HAS_GATE): ``q_i . dq_i^state / 2``, the gate term of the state query."""
    c, q_start, b, query_head, head = query_program(hq, h, C, BQ)
    DI = NP * 256

    local_i, rows_q, q_mask = chunk_rows(q_start, c, t, C, BQ)
    dims = tl.arange(0, DP)
    d_mask = dims < d
    columns = tl.arange(0, EP)
    e_mask = columns < e
    q_base = Q + b * sq_b + query_head * sq_h
    q = load_tile(q_base, rows_q, sq_t, q_mask, dims, sq_d, d_mask).to(OP)
    grad_rows = (b * t + rows_q).to(tl.int64) * hq + query_head
    dn = load_tile(DN, grad_rows, e, q_mask, columns, 1, e_mask).to(OP)
    delta = tl.load(DELTA + grad_rows, mask=q_mask, other=0.0)
    g_base = G + (b * h + head) * T_pad + c * C
    if HAS_GATE:
        g_i = tl.load(g_base + local_i, mask=local_i < C, other=0.0)
    dq = intra_query_grad(
        q, dn, delta, local_i, q_mask, q_start, K + b * sk_b + head * sk_h, sk_t, sk_d, V + b * sv_b + head * sv_h,
        sv_t, sv_e, g_base, c, t, C, scale, dims, d_mask, columns, e_mask, HAS_GATE, 2, BQ, BK, DP, OP, PRECISION,
    )

    first_chunk_with_state = 0 if HAS_STATE else 1
    if c >= first_chunk_with_state:
        query_scale = tl.full((BQ,), 1.0, tl.float32) * (scale * scale)
        if HAS_GATE:
            query_scale = query_scale * tl.exp(g_i)
        slot = (b * h + head) * n_chunks + c
        state_base = STATES + slot.to(tl.int64) * DI * e
        dq_state, _ = _state_vjp(q_base, rows_q, sq_t, q_mask, sq_d, d, PAIRS, NP, state_base, e, columns, e_mask,
                                 dn, BQ, BU, DP, EP, OP, PRECISION, False)
        # the per-row scale once, after the loop: inside it the gates' row vector costs registers in every tile
        dq_state = dq_state * query_scale[:, None]
        # the denominator's state term s^2 e^{G_i} delta_i q_i^T M q_i, M symmetric
        M = tl.load(MS + slot.to(tl.int64) * DP * DP + dims[:, None] * DP + dims[None, :])
        q32 = _reloaded_fp32(q_base, rows_q, sq_t, q_mask, dims, sq_d, d_mask)
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
def pair_key_state_grad_kernel(
    K, V, G, PAIRS, DSTATES, DMS, DK_STATE, DV_STATE, KTERM,
    sk_b, sk_t, sk_h, sk_d, sv_b, sv_t, sv_h, sv_e,
    t, h, d, e, n_chunks, C, T_pad, NP,
    HAS_GATE: tl.constexpr,
    BK: tl.constexpr, BU: tl.constexpr, DP: tl.constexpr, EP: tl.constexpr,
    OP: tl.constexpr, PRECISION: tl.constexpr, GRAM_PRECISION: tl.constexpr,
):
    """The state's share of dK, dV: ``dk_j = J_phi(k_j)^T (e^{G_last - G_j} dS'_{c+1} [v_j, 1])`` and ``dv_j =
    e^{G_last - G_j} dS'_{c+1}^T phi(k_j)``, fp32 DK_STATE ``[b, t, h, d]`` and DV_STATE ``[b, t, h, e]``
    (contiguous), and with HAS_GATE KTERM [b, t, h] fp32 (``k_j . dk_j / 2``). DSTATES ``[b h, n, DI, e]`` / DMS
    ``[b h, n, DP, DP]`` slot c: the gradient of the state leaving chunk c. A kernel of its own: fused with the
    intra-chunk block, the accumulators of both spilled (4.9 ms at t = 65536 on an H200, against 2.3 ms for the
    intra-chunk block alone, benchmarks/results/gpu_kernel_profile_before.json)."""
    c, k_start, b, head, pid_bh = key_program(h, C, BK)
    DI = NP * 256

    local_j, rows_k, k_mask = chunk_rows(k_start, c, t, C, BK)
    dims = tl.arange(0, DP)
    d_mask = dims < d
    columns = tl.arange(0, EP)
    e_mask = columns < e
    k_base = K + b * sk_b + head * sk_h
    v = load_tile(V + b * sv_b + head * sv_h, rows_k, sv_t, k_mask, columns, sv_e, e_mask).to(OP)
    # The state leaving the chunk: every key of the chunk was written into it.
    if HAS_GATE:
        g_base = G + pid_bh * T_pad + c * C
        g_j = tl.load(g_base + local_j, mask=local_j < C, other=0.0)
        key_decay = tl.exp(tl.load(g_base + C - 1) - g_j)
    else:
        key_decay = tl.full((BK,), 1.0, tl.float32)
    slot = pid_bh * n_chunks + c
    state_base = DSTATES + slot.to(tl.int64) * DI * e
    dk, dv = _state_vjp(k_base, rows_k, sk_t, k_mask, sk_d, d, PAIRS, NP, state_base, e, columns, e_mask, v, BK, BU,
                        DP, EP, OP, PRECISION, True)
    # the keys' decay once, after the loop (both products are linear in it): with the row vector scaling every
    # tile inside it, the kernel took 2.64 ms at t = 65536 with gates, 1.84 without (gpu_kernel_profile_split.json)
    dv = dv * key_decay[:, None]
    dk = dk * key_decay[:, None]
    # the key-sum path: e^{G_last - G_j} k_j^T dM k_j with dM symmetric
    dM = tl.load(DMS + slot.to(tl.int64) * DP * DP + dims[:, None] * DP + dims[None, :])
    k32 = _reloaded_fp32(k_base, rows_k, sk_t, k_mask, dims, sk_d, d_mask)
    dk += tl.dot(k32, dM, input_precision=GRAM_PRECISION) * (2.0 * key_decay)[:, None]

    out_rows = (b * t + rows_k).to(tl.int64) * h + head
    tl.store(DK_STATE + out_rows[:, None] * d + dims[None, :], dk, mask=k_mask[:, None] & d_mask[None, :])
    tl.store(DV_STATE + out_rows[:, None] * e + columns[None, :], dv, mask=k_mask[:, None] & e_mask[None, :])
    if HAS_GATE:
        tl.store(KTERM + out_rows, tl.sum(k32 * dk, axis=1) * 0.5, mask=k_mask)


@triton.jit
def pair_key_value_grad_kernel(
    Q, K, V, G, DK_STATE, DV_STATE, DN, DELTA, DK, DV, SPAN,
    sq_b, sq_t, sq_h, sq_d, sk_b, sk_t, sk_h, sk_d, sv_b, sv_t, sv_h, sv_e,
    t, hq, h, d, e, n_chunks, C, T_pad, scale,
    HAS_GATE: tl.constexpr,
    BQ: tl.constexpr, BK: tl.constexpr, DP: tl.constexpr, EP: tl.constexpr,
    OP: tl.constexpr, PRECISION: tl.constexpr,
):
    """DK [b, t, h, d], DV [b, t, h, e] contiguous: the intra-chunk block plus the state's share (DK_STATE,
    DV_STATE fp32, from ``pair_key_state_grad_kernel``). With HAS_GATE: SPAN ``[b h, n, cdiv(C, BK), C]`` fp32
    (row J: the spanning sums of key block J, ``_tiles.spanning_tile``)."""
    c, k_start, b, head, pid_bh = key_program(h, C, BK)
    group = hq // h

    local_j, rows_k, k_mask = chunk_rows(k_start, c, t, C, BK)
    dims = tl.arange(0, DP)
    d_mask = dims < d
    columns = tl.arange(0, EP)
    e_mask = columns < e
    k = load_tile(K + b * sk_b + head * sk_h, rows_k, sk_t, k_mask, dims, sk_d, d_mask).to(OP)
    v = load_tile(V + b * sv_b + head * sv_h, rows_k, sv_t, k_mask, columns, sv_e, e_mask).to(OP)
    g_base = G + pid_bh * T_pad + c * C
    span_row = SPAN + ((pid_bh * n_chunks + c) * tl.cdiv(C, BK) + k_start // BK).to(tl.int64) * C
    dk, dv = intra_key_value_grad(
        k, v, local_j, k_mask, k_start, Q + b * sq_b + head * group * sq_h, sq_t, sq_d, sq_h, DN, e, DELTA, 1,
        g_base, span_row, b, c, t, hq, head, group, C, scale, dims, d_mask, columns, e_mask,
        HAS_GATE, 2, BQ, BK, DP, EP, OP, PRECISION,
    )

    out_rows = (b * t + rows_k).to(tl.int64) * h + head
    dk_tile = out_rows[:, None] * d + dims[None, :]
    dk_mask = k_mask[:, None] & d_mask[None, :]
    dv_tile = out_rows[:, None] * e + columns[None, :]
    dv_mask = k_mask[:, None] & e_mask[None, :]
    dk += tl.load(DK_STATE + dk_tile, mask=dk_mask, other=0.0)
    dv += tl.load(DV_STATE + dv_tile, mask=dv_mask, other=0.0)
    tl.store(DK + dk_tile, dk.to(DK.dtype.element_ty), mask=dk_mask)
    tl.store(DV + dv_tile, dv.to(DV.dtype.element_ty), mask=dv_mask)
