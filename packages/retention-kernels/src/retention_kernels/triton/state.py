"""The state across chunks, in two steps so that the heavy work is parallel over chunks:

1. ``chunk_update_kernel`` (one program per chunk and ``[BD, e]`` state tile, ``phi`` expanded in SRAM)::

       forward:  BUF[c + 1] = sum_{j in c} e^{G_last - G_j} phi(k_j) [v_j, 1]^T          (the chunk's contribution)
       backward: BUF[c]     = s^p sum_{i in c, query heads} e^{G_i} phi(q_i) [dn_i, delta_i]^T   (its query's gradient)

2. ``scan_kernel`` (memory-bound, in place, fp32), with ``decay_c = e^{G_last of chunk c}``::

       forward:  BUF[c + 1] = decay_c BUF[c] + BUF[c + 1]    ->  BUF[c] = S'_c entering chunk c, BUF[n] final
       backward: BUF[c]     = decay_c BUF[c + 1] + BUF[c]    ->  BUF[c] = dS'_c, BUF[0] the initial state's grad

``BUF`` is ``[b, h, n + 1, D, e]`` (numerators) with a ``[b, h, n + 1, D]`` twin for the sum of keys.
"""

from __future__ import annotations

import triton
import triton.language as tl

from ._tiles import integer_power, sympow_tile


@triton.jit
def chunk_update_kernel(
    X, V, DELTA, G, IDX, W, BUF, ZBUF,
    sx_b, sx_t, sx_h, sx_d, sv_b, sv_t, sv_h, sv_e,
    t, hx, h, D, d, e, n_chunks, C, T_pad, scale,
    BACKWARD: tl.constexpr, HAS_GATE: tl.constexpr, DEG: tl.constexpr,
    BT: tl.constexpr, BD: tl.constexpr, DP: tl.constexpr, EP: tl.constexpr, OP: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """Forward: X = K [b, t, h, d], V = V [b, t, h, e] (any strides). Backward: X = Q [b, t, hq, d], V = dn
    [b, t, hq, e] and DELTA [b, t, hq] fp32 contiguous (dN' = [dn, delta], see ``cotangent``)."""
    pid = tl.program_id(0)
    pid_bh = tl.program_id(1)
    tiles = tl.cdiv(D, BD)
    c = pid // tiles
    a = (pid % tiles) * BD + tl.arange(0, BD)
    a_mask = a < D
    b = pid_bh // h
    head = pid_bh % h
    group = hx // h
    columns = tl.arange(0, EP)
    e_mask = columns < e
    dims = tl.arange(0, DP)
    g_base = G + pid_bh * T_pad + c * C
    if HAS_GATE:
        g_last = tl.load(g_base + C - 1)

    update = tl.zeros((BD, EP), dtype=tl.float32)
    key_sum = tl.zeros((BD,), dtype=tl.float32)
    for r in range(group):
        x_head = head * group + r
        x_base = X + b * sx_b + x_head * sx_h
        v_base = V + b * sv_b + x_head * sv_h
        for js in range(0, C, BT):
            local = js + tl.arange(0, BT)
            rows = c * C + local
            row_mask = (local < C) & (rows < t)
            x = tl.load(x_base + rows[:, None] * sx_t + dims[None, :] * sx_d,
                        mask=row_mask[:, None] & (dims < d)[None, :], other=0.0).to(OP)
            phi = sympow_tile(x, IDX, W, a, a_mask, DEG, DP, OP, PRECISION)
            if HAS_GATE:
                g = tl.load(g_base + local, mask=local < C, other=0.0)
                if BACKWARD:
                    phi = phi * tl.exp(g)[:, None]
                else:
                    phi = phi * tl.exp(g_last - g)[:, None]
            v = tl.load(v_base + rows[:, None] * sv_t + columns[None, :] * sv_e,
                        mask=row_mask[:, None] & e_mask[None, :], other=0.0)
            update += tl.dot(tl.trans(phi.to(OP)), v.to(OP), input_precision=PRECISION)
            if BACKWARD:  # the ones column of dN'
                delta = tl.load(DELTA + (b * t + rows).to(tl.int64) * hx + x_head, mask=row_mask, other=0.0)
                key_sum += tl.sum(phi * delta[:, None], axis=0)
            else:
                key_sum += tl.sum(phi, axis=0)
    if BACKWARD:
        slot = c
        factor = integer_power(scale, DEG)
        update = update * factor
        key_sum = key_sum * factor
    else:
        slot = c + 1
    offset = (pid_bh * (n_chunks + 1) + slot).to(tl.int64) * D
    tl.store(BUF + (offset + a[:, None]) * e + columns[None, :], update, mask=a_mask[:, None] & e_mask[None, :])
    tl.store(ZBUF + offset + a, key_sum, mask=a_mask)


@triton.jit
def _then(decay_a, value_a, decay_b, value_b):
    """Composition of the affine steps ``x -> decay_a x + value_a``, then ``x -> decay_b x + value_b``."""
    return decay_a * decay_b, value_a * decay_b + value_b


@triton.jit
def scan_kernel(BUF, G, length, n_chunks, C, T_pad, HAS_GATE: tl.constexpr, REVERSE: tl.constexpr,
                STEPS: tl.constexpr, BLOCK: tl.constexpr):
    """In-place scan over the ``n + 1`` slots of ``BUF [b * h, n + 1, length]`` (see the module docstring).

    ``STEPS`` slots at a time: one ``[STEPS, BLOCK]`` load, a parallel scan of the affine steps along the slots,
    one store. One slot at a time, each step waited for its load: at deg 1 (t = 65536, chunk 128, 512 slots of
    4096 elements) the four scans took 0.89 ms on an H200, against about 0.05 ms for their memory traffic."""
    pid = tl.program_id(0)
    pid_bh = tl.program_id(1)
    offsets = pid * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < length
    base = BUF + pid_bh.to(tl.int64) * (n_chunks + 1) * length + offsets
    g_base = G + pid_bh * T_pad
    if REVERSE:
        carry = tl.load(base + n_chunks * length, mask=mask, other=0.0)
    else:
        carry = tl.load(base, mask=mask, other=0.0)
    for first in range(0, n_chunks, STEPS):
        step = first + tl.arange(0, STEPS)
        step_mask = step < n_chunks
        if REVERSE:
            c = n_chunks - 1 - step
            slot = c
        else:
            c = step
            slot = c + 1
        pointers = base[None, :] + slot.to(tl.int64)[:, None] * length
        tile_mask = step_mask[:, None] & mask[None, :]
        values = tl.load(pointers, mask=tile_mask, other=0.0)
        if HAS_GATE:  # steps past the last slot: decay 1 and value 0, so they carry the last slot's sum on
            decay = tl.exp(tl.load(g_base + c * C + C - 1, mask=step_mask, other=0.0))
        else:
            decay = tl.full((STEPS,), 1.0, tl.float32)
        decays, sums = tl.associative_scan((tl.broadcast_to(decay[:, None], (STEPS, BLOCK)), values), 0, _then)
        sums += decays * carry[None, :]
        tl.store(pointers, sums, mask=tile_mask)
        carry = tl.sum(tl.where((tl.arange(0, STEPS) == STEPS - 1)[:, None], sums, 0.0), axis=0)


@triton.jit
def chunk_inner_product_kernel(A, B, OUT, sa_bh, sa_c, sb_bh, sb_c, length, n_chunks, SPLIT: tl.constexpr,
                               BLOCK: tl.constexpr):
    """``OUT[bh, c, s] = sum_x A[bh, c, x] B[bh, c, x]`` over the ``s``-th slice of ``SPLIT`` elements (fp32 sums
    of any input dtype; ``x`` contiguous). Grid ``(cdiv(length, SPLIT), n_chunks, b h)``, ``OUT`` contiguous."""
    split = tl.program_id(0)
    c = tl.program_id(1)
    bh = tl.program_id(2)
    a_base = A + bh.to(tl.int64) * sa_bh + c.to(tl.int64) * sa_c
    b_base = B + bh.to(tl.int64) * sb_bh + c.to(tl.int64) * sb_c
    total = tl.zeros((BLOCK,), dtype=tl.float32)
    for start in range(split * SPLIT, tl.minimum(split * SPLIT + SPLIT, length), BLOCK):
        x = start + tl.arange(0, BLOCK)
        mask = x < length
        total += (tl.load(a_base + x, mask=mask, other=0.0).to(tl.float32)
                  * tl.load(b_base + x, mask=mask, other=0.0).to(tl.float32))
    tl.store(OUT + (bh * n_chunks + c) * tl.num_programs(0) + split, tl.sum(total, axis=0))
