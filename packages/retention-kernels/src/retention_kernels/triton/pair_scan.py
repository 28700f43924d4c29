"""Chunk-parallel state passes for the deg-2 block-pair layout: a drop-in for ``function._pair_state_pass``.

``pairs.pair_state_kernel`` walks the chunks in order inside each program (one per feature tile and head), so
at b=1, h=8 only ~100-170 programs run and each pass is latency-bound. Here the same pass takes two launches:

  1. ``pair_chunk_contribution_kernel``, grid ``((feature tiles + 1) n_chunks, b h)``: every chunk's own
     contribution, all chunks at once (``G`` = cumulative log gate inside the chunk, ``s`` = scale):
       forward   ``sum_j e^{G_last - G_j} phi(k_j) v_j^T``        and  ``sum_j e^{G_last - G_j} k_j k_j^T``
       backward  ``s^2 sum_i e^{G_i} phi(q_i) dn_i^T``            and  ``s^2 sum_i e^{G_i} delta_i q_i q_i^T``
     (backward: summed over the query heads of the group), written into that chunk's slot of STATES (its dtype:
     bf16 for bf16 inputs) and MS (fp32). The chunk the scan reaches last (the final chunk forward, the first
     one backward) writes into FINAL / FINAL_M instead (fp32): that term weighs most in the final state (and in
     the initial state's gradient) under decay. Rounding the other contributions to bf16 costs little: in a CPU
     emulation (d=e=64, C=1024, 16 chunks) the slots' error vs float64 went 2.3e-3 -> 2.3e-3 with gates and
     -> 2.9e-3 without, the final state's 1.6e-3 -> 1.6e-3 / 2.3e-3 (bf16 rounding alone: 1.7e-3).
  2. ``pair_slot_scan_kernel``, grid ``(blocks of DI e + blocks of DP^2, b h)``: a flat elementwise scan. It
     walks the chunks (in reverse for backward) with the running state in fp32 registers, reads chunk c's
     contribution, writes the state entering c into the same slot (read before write), then
     ``S = e^{G_last} S + contribution``; FINAL gets the last ``S`` (fp32).

No buffer beyond the sequential pass's: the slots hold the contributions until the scan overwrites them.
"""

from __future__ import annotations

import triton
import triton.language as tl

from . import function
from .pairs import _outer, _pair_tile


@triton.jit
def _row_weights(g_base, c, local, C, weight, query_factor, BACKWARD: tl.constexpr, HAS_GATE: tl.constexpr):
    """``[BT]`` fp32 weight of each row of the chunk: ``weight e^{G_last - G_j}`` forward,
    ``weight query_factor e^{G_i}`` backward (``G`` local to the chunk, so nothing overflows for ``log_G <= 0``)."""
    row_weight = tl.full(local.shape, 1.0, tl.float32) * weight
    if BACKWARD:
        row_weight = row_weight * query_factor
    if HAS_GATE:
        g = tl.load(g_base + c * C + local, mask=local < C, other=0.0)
        if BACKWARD:
            row_weight = row_weight * tl.exp(g)
        else:
            row_weight = row_weight * tl.exp(tl.load(g_base + c * C + C - 1) - g)
    return row_weight


@triton.jit
def pair_chunk_contribution_kernel(
    X, V, DELTA, G, PAIRS, STATES, FINAL, MS, FINAL_M,
    sx_b, sx_t, sx_h, sx_d, sv_b, sv_t, sv_h, sv_e,
    t, hx, h, d, e, n_chunks, C, T_pad, NP, query_factor,
    BACKWARD: tl.constexpr, HAS_GATE: tl.constexpr,
    BT: tl.constexpr, BU: tl.constexpr, DP: tl.constexpr, EP: tl.constexpr, OP: tl.constexpr,
    PRECISION: tl.constexpr, GRAM_PRECISION: tl.constexpr, PHI_T: tl.constexpr,
):
    """Grid ``((NP * 16 / BU + 1) n_chunks, b * h)``: per chunk c, programs below ``NP * 16 / BU`` compute its
    ``[16 BU, e]`` contribution tile (features ``256 P + 16 u + v``, ``u`` in ``[u0, u0 + BU)``), the last one
    its ``[DP, DP]`` key-sum contribution. Arguments as ``pairs.pair_state_kernel`` (forward: X = K ``[b, t, h,
    d]``, V = V; backward: X = Q with ``hx = hq`` heads, V = dn ``[b, t, hq, e]``, DELTA ``[b, t, hq]`` fp32).
    STATES ``[b h, n, DI, e]``, MS ``[b h, n, DP, DP]``; FINAL ``[b h, DI, e]``, FINAL_M ``[b h, DP, DP]`` fp32
    receive the contribution of the chunk that the scan adds last."""
    n_tiles = NP * (16 // BU)
    pid = tl.program_id(0) % (n_tiles + 1)
    c = tl.program_id(0) // (n_tiles + 1)  # chunks on axis 0: axes 1 and 2 stop at 65535
    pid_bh = tl.program_id(1)
    b = pid_bh // h
    head = pid_bh % h
    group = hx // h
    DI = NP * 256
    g_base = G + pid_bh * T_pad
    if BACKWARD:
        scanned_last = c == 0
    else:
        scanned_last = c == n_chunks - 1
    if pid < n_tiles:
        first_i, block_j, weight, first_feature = _pair_tile(PAIRS, pid, NP, BU)
        features = first_feature + tl.arange(0, BU * 16)
        columns = tl.arange(0, EP)
        e_mask = columns < e
        coord_i = first_i + tl.arange(0, BU)
        coord_j = block_j * 16 + tl.arange(0, 16)
        contribution = tl.zeros((BU * 16, EP), dtype=tl.float32)
        for r in range(group):
            x_base = X + b * sx_b + (head * group + r) * sx_h
            v_base = V + b * sv_b + (head * group + r) * sv_h
            for js in range(0, C, BT):
                local = js + tl.arange(0, BT)
                rows = c * C + local
                row_mask = (local < C) & (rows < t)
                row_weight = _row_weights(g_base, c, local, C, weight, query_factor, BACKWARD, HAS_GATE)
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
        tile = features[:, None] * e + columns[None, :]
        tile_mask = e_mask[None, :] & (features[:, None] >= 0)
        if scanned_last:
            tl.store(FINAL + pid_bh.to(tl.int64) * DI * e + tile, contribution, mask=tile_mask)
        else:
            slot = (pid_bh * n_chunks + c).to(tl.int64) * DI * e
            tl.store(STATES + slot + tile, contribution.to(STATES.dtype.element_ty), mask=tile_mask)
    else:
        dims = tl.arange(0, DP)
        d_mask = dims < d
        contribution_m = tl.zeros((DP, DP), dtype=tl.float32)
        for r in range(group):
            x_base = X + b * sx_b + (head * group + r) * sx_h
            for js in range(0, C, BT):
                local = js + tl.arange(0, BT)
                rows = c * C + local
                row_mask = (local < C) & (rows < t)
                x = tl.load(x_base + rows[:, None] * sx_t + dims[None, :] * sx_d,
                            mask=row_mask[:, None] & d_mask[None, :], other=0.0).to(tl.float32)
                row_weight = _row_weights(g_base, c, local, C, 1.0, query_factor, BACKWARD, HAS_GATE)
                if BACKWARD:  # the ones column of v' carries delta
                    row_weight *= tl.load(DELTA + (b * t + rows).to(tl.int64) * hx + head * group + r,
                                          mask=row_mask, other=0.0)
                contribution_m += tl.dot(tl.trans(x * row_weight[:, None]), x, input_precision=GRAM_PRECISION)
        square = dims[:, None] * DP + dims[None, :]
        if scanned_last:
            tl.store(FINAL_M + pid_bh.to(tl.int64) * DP * DP + square, contribution_m)
        else:
            tl.store(MS + (pid_bh * n_chunks + c).to(tl.int64) * DP * DP + square, contribution_m)


@triton.jit
def _chunk_of_step(step, n_chunks, BACKWARD: tl.constexpr):
    if BACKWARD:
        c = n_chunks - 1 - step
    else:
        c = step
    return c


@triton.jit
def _load_contribution(SLOTS, FINAL, pid_bh, step, offsets, mask, length, n_chunks, BACKWARD: tl.constexpr):
    """fp32 contribution of the chunk scanned at ``step`` (the last one sits in FINAL)."""
    if step == n_chunks - 1:
        contribution = tl.load(FINAL + pid_bh.to(tl.int64) * length + offsets, mask=mask, other=0.0)
    else:
        slot = (pid_bh * n_chunks + _chunk_of_step(step, n_chunks, BACKWARD)).to(tl.int64) * length
        contribution = tl.load(SLOTS + slot + offsets, mask=mask, other=0.0).to(tl.float32)
    return contribution


@triton.jit
def _scan_slots(SLOTS, INIT, FINAL, g_base, pid_bh, offsets, length, n_chunks, C,
                BACKWARD: tl.constexpr, HAS_GATE: tl.constexpr, HAS_INIT: tl.constexpr):
    """One block of ``offsets`` into the ``length``-long flat slots of head ``pid_bh``: contribution in, state
    entering the chunk out (``SLOTS [b h, n, length]``); FINAL ``[b h, length]`` fp32 holds the contribution of
    the chunk scanned last on entry and the final state on exit. The next contribution is loaded one step ahead
    (two loads in flight: the scan is bound by memory latency, not by arithmetic)."""
    mask = offsets < length
    head_offset = pid_bh.to(tl.int64) * length
    if HAS_INIT:
        acc = tl.load(INIT + head_offset + offsets, mask=mask, other=0.0).to(tl.float32)
    else:
        acc = tl.zeros(offsets.shape, dtype=tl.float32)
    upcoming = _load_contribution(SLOTS, FINAL, pid_bh, 0, offsets, mask, length, n_chunks, BACKWARD)
    for step in range(n_chunks):
        c = _chunk_of_step(step, n_chunks, BACKWARD)
        contribution = upcoming
        if step + 1 < n_chunks:  # read slot c + 1 before anything writes it
            upcoming = _load_contribution(SLOTS, FINAL, pid_bh, step + 1, offsets, mask, length, n_chunks,
                                          BACKWARD)
        tl.store(SLOTS + (pid_bh * n_chunks + c).to(tl.int64) * length + offsets, acc.to(SLOTS.dtype.element_ty),
                 mask=mask)
        if HAS_GATE:
            acc = acc * tl.exp(tl.load(g_base + c * C + C - 1))
        acc += contribution
    tl.store(FINAL + head_offset + offsets, acc, mask=mask)


@triton.jit
def pair_slot_scan_kernel(
    STATES, INIT, FINAL, MS, INIT_M, FINAL_M, G,
    state_length, m_length, n_chunks, C, T_pad,
    BACKWARD: tl.constexpr, HAS_GATE: tl.constexpr, HAS_INIT: tl.constexpr, BLOCK: tl.constexpr,
):
    """Grid ``(cdiv(DI e, BLOCK) + cdiv(DP^2, BLOCK), b * h)``: the first blocks scan STATES (flat
    ``[b h, n, DI e]``), the rest MS (flat ``[b h, n, DP^2]``); INIT / INIT_M the state before the first chunk
    scanned (forward: the initial state; backward: the final state's gradient)."""
    pid = tl.program_id(0)
    pid_bh = tl.program_id(1)
    g_base = G + pid_bh * T_pad
    state_blocks = tl.cdiv(state_length, BLOCK)
    if pid < state_blocks:
        offsets = pid * BLOCK + tl.arange(0, BLOCK)
        _scan_slots(STATES, INIT, FINAL, g_base, pid_bh, offsets, state_length, n_chunks, C,
                    BACKWARD, HAS_GATE, HAS_INIT)
    else:
        offsets = (pid - state_blocks) * BLOCK + tl.arange(0, BLOCK)
        _scan_slots(MS, INIT_M, FINAL_M, g_base, pid_bh, offsets, m_length, n_chunks, C,
                    BACKWARD, HAS_GATE, HAS_INIT)


_config = function._config
# BU=8 (128-feature tiles) first: twice the programs of BU=16 for the same operand loads per feature.
_TUNED_CONTRIBUTION = function._autotuned(
    pair_chunk_contribution_kernel,
    [_config(4, 3, BT=32, BU=16, PHI_T=True), _config(4, 2, BT=64, BU=16, PHI_T=True),
     _config(4, 3, BT=64, BU=8, PHI_T=True), _config(4, 3, BT=64, BU=8, PHI_T=False)],
    [*function._SHAPE_KEY, "hx", "h", "BACKWARD", "HAS_GATE"],
)
# The scan is not tuned: it updates its buffers in place, so the tuner would have to copy them around every
# trial run (triton's restore_value), and those copies would dominate the timings it compares.
_SCAN_BLOCK, _SCAN_WARPS = 1024, 4
_INTERPRETER_SCAN_BLOCK = 4096  # under the interpreter (CPU): fewer, larger (slow) Python-level programs


def pair_state_pass_parallel(X, V, delta, G, log_G, layout, plan, init, init_M, states, Ms, final, final_M, h,
                             scale, backward):
    """Same arguments, outputs and semantics as ``function._pair_state_pass``, chunk-parallel.

    Forward (X = K ``[b, t, h, d]``, V ``[b, t, h, e]``): STATES/MS slot c = the state / key-sum matrix entering
    chunk c, FINAL/FINAL_M the final ones (``init``/``init_M``: the initial ones, or None). Backward (X = Q
    ``[b, t, hq, d]``, V = dn, ``delta [b, t, hq]``): slot c = the gradient of the state leaving chunk c,
    FINAL/FINAL_M the initial state's gradient (``init``/``init_M``: the final state's gradient, or None)."""
    chunk_contributions(X, V, delta, G, log_G, layout, plan, states, Ms, final, final_M, h, scale, backward)
    scan_slots(G, log_G, layout, plan, init, init_M, states, Ms, final, final_M, X.shape[0] * h, V.shape[3],
               backward)


def chunk_contributions(X, V, delta, G, log_G, layout, plan, states, Ms, final, final_M, h, scale, backward):
    """Step 1: every chunk's contribution into its slot (the chunk scanned last: into FINAL / FINAL_M)."""
    b, t, hx = X.shape[:3]
    e = V.shape[3]
    has_gate = log_G is not None
    constants = dict(BACKWARD=backward, HAS_GATE=has_gate, **function._pair_constants(X, plan, layout))
    args = (
        X, V, delta if backward else final_M, G if has_gate else final_M, layout.pairs,
        states, final, Ms, final_M,
        *X.stride(), *V.stride(), t, hx, h, X.shape[3], e, plan.n, plan.C, plan.T_pad, layout.NP, scale * scale,
    )

    def grid(meta):
        return ((layout.NP * (16 // meta["BU"]) + 1) * plan.n, b * h)

    function._launch(_TUNED_CONTRIBUTION, pair_chunk_contribution_kernel, grid, args, constants, ("BT", "BU", "PHI_T"))


def scan_slots(G, log_G, layout, plan, init, init_M, states, Ms, final, final_M, heads, e, backward):
    """Step 2: contributions -> states entering (forward) / gradients leaving (backward) every chunk, in place."""
    has_gate = log_G is not None
    has_init = init is not None
    state_length, m_length = layout.DI * e, layout.DP * layout.DP
    args = (
        states, init if has_init else final, final, Ms, init_M if has_init else final_M, final_M,
        G if has_gate else final_M, state_length, m_length, plan.n, plan.C, plan.T_pad,
    )

    block = _INTERPRETER_SCAN_BLOCK if function._INTERPRET else _SCAN_BLOCK
    grid = (triton.cdiv(state_length, block) + triton.cdiv(m_length, block), heads)
    pair_slot_scan_kernel[grid](*args, BACKWARD=backward, HAS_GATE=has_gate, HAS_INIT=has_init, BLOCK=block,
                                num_warps=_SCAN_WARPS)


def reference_state_pass(X, V, delta, log_G, layout, C, init, init_M, h, scale, backward):
    """The state pass in float64 torch (small shapes: it builds ``phi`` for every row), the definition that the
    tests and ``benchmarks/gpu_pair_scan.py`` check both kernels against. ``log_G [b, t, h]`` (global, or None);
    other arguments as :func:`pair_state_pass_parallel`. Returns ``(states [b h, n, DI, e], Ms [b h, n, DP, DP],
    final [b, h, DI, e], final_M [b, h, DP, DP])``."""
    import torch

    b, t, hx, d = X.shape
    e, n = V.shape[3], -(-t // C)
    group = hx // h
    pad_rows = (0, 0, 0, 0, 0, n * C - t)
    x = torch.nn.functional.pad(torch.nn.functional.pad(X.double(), (0, layout.DP - d)), pad_rows)
    x = x.reshape(b, n, C, hx, layout.DP)
    values = torch.nn.functional.pad(V.double(), pad_rows).reshape(b, n, C, hx, e)
    pairs = layout.pairs.long().cpu()
    blocks = x.reshape(b, n, C, hx, -1, 16)
    pair_weight = torch.where(pairs[:, 0] < pairs[:, 1], 2.0**0.5, 1.0).double().to(X.device)
    phi = blocks[..., pairs[:, 0], :, None] * blocks[..., pairs[:, 1], None, :] * pair_weight[:, None, None]
    phi = phi.reshape(b, n, C, hx, layout.DI)
    if log_G is None:
        g = torch.zeros(b, n, C, h, dtype=torch.float64, device=X.device)
    else:
        g = torch.nn.functional.pad(log_G.double(), (0, 0, 0, n * C - t)).reshape(b, n, C, h).cumsum(2)
    gate_last = g[:, :, -1]  # [b, n, h]
    row_weight = (scale * scale) * g.exp() if backward else (gate_last[:, :, None] - g).exp()
    row_weight = row_weight.repeat_interleave(group, dim=3)  # [b, n, C, hx]
    key_weight = row_weight * torch.nn.functional.pad(delta.double(), (0, 0, 0, n * C - t)).reshape(
        b, n, C, hx) if backward else row_weight
    contributions = torch.einsum("bncxf,bncxe,bncx->bnxfe", phi, values, row_weight)
    contributions_M = torch.einsum("bncxi,bncxj,bncx->bnxij", x, x, key_weight)
    contributions = contributions.reshape(b, n, h, group, layout.DI, e).sum(3)
    contributions_M = contributions_M.reshape(b, n, h, group, layout.DP, layout.DP).sum(3)

    S = torch.zeros(b, h, layout.DI, e, dtype=torch.float64, device=X.device) if init is None else init.double()
    M = torch.zeros(b, h, layout.DP, layout.DP, dtype=torch.float64, device=X.device)
    M = M if init_M is None else init_M.double()
    states, Ms = [None] * n, [None] * n
    for c in (reversed(range(n)) if backward else range(n)):
        states[c], Ms[c] = S, M
        decay = gate_last[:, c].exp()[..., None, None]  # [b, h, 1, 1]
        S = decay * S + contributions[:, c]
        M = decay * M + contributions_M[:, c]
    states = torch.stack(states, 2).reshape(b * h, n, layout.DI, e)
    Ms = torch.stack(Ms, 2).reshape(b * h, n, layout.DP, layout.DP)
    return states, Ms, S, M
