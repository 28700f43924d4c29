"""The scans across chunks, fused with the state update (forward) and with the query's state gradient
(backward). One program owns a ``[BD, e]`` tile of the state ``S' = [S, z]`` of one batch and key/value head and
walks the chunks in order, so the state never leaves registers between chunks.

Forward, chunk ``c`` (``G`` the cumulative log gate within the chunk, ``G_last`` its last value)::

    STATES[c] = S'_c
    S'_{c+1}  = e^{G_last} S'_c + sum_j e^{G_last - G_j} phi(k_j) [v_j, 1]^T

Backward, chunks in reverse (``dN'_i = [dn_i, delta_i]`` the gradient of the un-normalised output)::

    DSTATES[c] = dS'_{c+1}
    dS'_c      = e^{G_last} dS'_{c+1} + s^p sum_{i in c, query heads of the group} e^{G_i} phi(q_i) dN'_i^T
"""

from __future__ import annotations

import triton
import triton.language as tl

from ._tiles import integer_power, sympow_tile


@triton.jit
def state_scan_kernel(
    K, V, G, IDX, W, S0, Z0, STATES, ZS, S_OUT, Z_OUT,
    sk_b, sk_t, sk_h, sk_d, sv_b, sv_t, sv_h, sv_e,
    ss_b, ss_h, ss_D, ss_e, sz_b, sz_h, sz_D,
    t, h, D, e, n_chunks, C, T_pad,
    HAS_GATE: tl.constexpr, HAS_STATE: tl.constexpr, DEG: tl.constexpr,
    BT: tl.constexpr, BD: tl.constexpr, EP: tl.constexpr, OP: tl.constexpr, PRECISION: tl.constexpr,
):
    pid_d = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // h
    head = pid_bh % h
    a = pid_d * BD + tl.arange(0, BD)
    a_mask = a < D
    columns = tl.arange(0, EP)
    e_mask = columns < e
    tile_mask = a_mask[:, None] & e_mask[None, :]

    if HAS_STATE:
        S = tl.load(S0 + b * ss_b + head * ss_h + a[:, None] * ss_D + columns[None, :] * ss_e,
                    mask=tile_mask, other=0.0).to(tl.float32)
        z = tl.load(Z0 + b * sz_b + head * sz_h + a * sz_D, mask=a_mask, other=0.0).to(tl.float32)
    else:
        S = tl.zeros((BD, EP), dtype=tl.float32)
        z = tl.zeros((BD,), dtype=tl.float32)

    k_base = K + b * sk_b + head * sk_h
    v_base = V + b * sv_b + head * sv_h
    g_base = G + pid_bh * T_pad
    states_base = STATES
    zs_base = ZS
    for c in range(n_chunks):
        offset = (pid_bh * n_chunks + c).to(tl.int64) * D
        tl.store(states_base + (offset + a[:, None]) * e + columns[None, :], S.to(STATES.dtype.element_ty),
                 mask=tile_mask)
        tl.store(zs_base + offset + a, z, mask=a_mask)
        start = c * C
        if HAS_GATE:
            g_last = tl.load(g_base + start + C - 1)
        update = tl.zeros((BD, EP), dtype=tl.float32)
        key_sum = tl.zeros((BD,), dtype=tl.float32)
        for js in range(0, C, BT):
            local = js + tl.arange(0, BT)
            rows = start + local
            row_mask = (local < C) & (rows < t)
            phi = sympow_tile(k_base, rows * sk_t, row_mask, sk_d, IDX, W, a, a_mask, DEG)
            if HAS_GATE:
                g = tl.load(g_base + rows, mask=local < C, other=0.0)
                phi = phi * tl.exp(g_last - g)[:, None]
            v = tl.load(v_base + rows[:, None] * sv_t + columns[None, :] * sv_e,
                        mask=row_mask[:, None] & e_mask[None, :], other=0.0)
            update += tl.dot(tl.trans(phi.to(OP)), v.to(OP), input_precision=PRECISION)
            key_sum += tl.sum(phi, axis=0)
        if HAS_GATE:
            decay = tl.exp(g_last)
            S = S * decay + update
            z = z * decay + key_sum
        else:
            S = S + update
            z = z + key_sum

    out = pid_bh.to(tl.int64) * D
    tl.store(S_OUT + (out + a[:, None]) * e + columns[None, :], S, mask=tile_mask)
    tl.store(Z_OUT + out + a, z, mask=a_mask)


@triton.jit
def state_grad_scan_kernel(
    Q, DN, DELTA, G, IDX, W, DS_FINAL, DZ_FINAL, DSTATES, DZS, DS0, DZ0,
    sq_b, sq_t, sq_h, sq_d,
    t, hq, h, D, e, n_chunks, C, T_pad, scale,
    HAS_GATE: tl.constexpr, HAS_FINAL_GRAD: tl.constexpr, DEG: tl.constexpr,
    BT: tl.constexpr, BD: tl.constexpr, EP: tl.constexpr, OP: tl.constexpr, PRECISION: tl.constexpr,
):
    """DN [b, t, hq, e] and DELTA [b, t, hq] (fp32, contiguous) are dN' = [dy/den, -(dy.y)/den]."""
    pid_d = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // h
    head = pid_bh % h
    group = hq // h
    a = pid_d * BD + tl.arange(0, BD)
    a_mask = a < D
    columns = tl.arange(0, EP)
    e_mask = columns < e
    tile_mask = a_mask[:, None] & e_mask[None, :]
    out = pid_bh.to(tl.int64) * D
    if HAS_FINAL_GRAD:
        dS = tl.load(DS_FINAL + (out + a[:, None]) * e + columns[None, :], mask=tile_mask, other=0.0)
        dz = tl.load(DZ_FINAL + out + a, mask=a_mask, other=0.0)
    else:
        dS = tl.zeros((BD, EP), dtype=tl.float32)
        dz = tl.zeros((BD,), dtype=tl.float32)
    query_scale = integer_power(scale, DEG)

    g_base = G + pid_bh * T_pad
    states_base = DSTATES
    zs_base = DZS
    for step in range(n_chunks):
        c = n_chunks - 1 - step
        offset = (pid_bh * n_chunks + c).to(tl.int64) * D
        tl.store(states_base + (offset + a[:, None]) * e + columns[None, :], dS.to(DSTATES.dtype.element_ty),
                 mask=tile_mask)
        tl.store(zs_base + offset + a, dz, mask=a_mask)
        start = c * C
        update = tl.zeros((BD, EP), dtype=tl.float32)
        key_sum = tl.zeros((BD,), dtype=tl.float32)
        for r in range(group):
            query_head = head * group + r
            q_base = Q + b * sq_b + query_head * sq_h
            for js in range(0, C, BT):
                local = js + tl.arange(0, BT)
                rows = start + local
                row_mask = (local < C) & (rows < t)
                phi = sympow_tile(q_base, rows * sq_t, row_mask, sq_d, IDX, W, a, a_mask, DEG) * query_scale
                if HAS_GATE:
                    g = tl.load(g_base + rows, mask=local < C, other=0.0)
                    phi = phi * tl.exp(g)[:, None]
                grad_rows = (b * t + rows).to(tl.int64) * hq + query_head
                dn = tl.load(DN + grad_rows[:, None] * e + columns[None, :],
                             mask=row_mask[:, None] & e_mask[None, :], other=0.0)
                delta = tl.load(DELTA + grad_rows, mask=row_mask, other=0.0)
                update += tl.dot(tl.trans(phi.to(OP)), dn.to(OP), input_precision=PRECISION)
                key_sum += tl.sum(phi * delta[:, None], axis=0)
        if HAS_GATE:
            decay = tl.exp(tl.load(g_base + start + C - 1))
            dS = dS * decay + update
            dz = dz * decay + key_sum
        else:
            dS = dS + update
            dz = dz + key_sum

    tl.store(DS0 + (out + a[:, None]) * e + columns[None, :], dS, mask=tile_mask)
    tl.store(DZ0 + out + a, dz, mask=a_mask)


__all__ = ["state_scan_kernel", "state_grad_scan_kernel"]
