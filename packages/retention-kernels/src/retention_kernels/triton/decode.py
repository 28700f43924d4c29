"""Fused Triton kernels for inference: query ``state + window`` (decode) and fold the window into the state.

``attend_window(problem, G) -> Y [b, tq, hq, e]`` is the ``attend_window`` op of the ``"triton"`` backend
(contract in ``retention.backends``). A query at window position ``m`` (queries align to the end of the window,
``G`` the window's cumulative log gate, ``S, z`` the state before the window) reads

    num = s^p e^{G_m} phi(q)^T S + sum_{j <= m} (s <q, k_j>)^p e^{G_m - G_j} v_j
    den = s^p e^{G_m} phi(q)^T z + sum_{j <= m} (s <q, k_j>)^p e^{G_m - G_j}
    y   = num / den        (0 where den == 0)

``phi(q)`` is never materialised: each program builds it tile by tile from the minimal sympow layout (the index
and weight table of :func:`retention.sympow.sympow_table`), so the state is streamed from memory exactly once per
query row. The state may be bf16/fp16/fp32; every product and accumulator is fp32. To use the whole GPU at
decode (``b * hq`` rows only), the state's D tiles and the window's key blocks are split over ``splits``
programs per row, and a second small kernel adds the partial sums and normalises.

``fold_window(K, V, G, deg, state, sum_of_keys)`` is the fold ``S' = e^{G_w} S + sum_j e^{G_w - G_j} phi(k_j)
v_j^T`` (and ``z'`` alike), one program per ``(D tile, b * h)``: ``phi(k)`` tiles are built on the fly and
multiplied with ``V`` by ``tl.dot``, so the ``[w, D]`` features never touch memory. It may write in place.

Both run under ``TRITON_INTERPRET=1`` on CPU tensors (the CI tests).
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from retention.sympow import sympow_indices, sympow_weights

__all__ = ["attend_window", "decode_step", "fold_window", "update_state", "TUNING"]


@functools.lru_cache(maxsize=32)
def _table(d: int, deg: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The sympow layout as kernel inputs: ``index [D, deg]`` int32 and ``weight [D]`` fp32 (built once)."""
    index = sympow_indices(d, deg, device).to(torch.int32).contiguous()
    weight = sympow_weights(d, deg, device).to(torch.float32).contiguous()
    return index, weight


@functools.lru_cache(maxsize=16)
def _processors(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def _default_splits(rows: int, tiles: int, device: torch.device) -> int:
    """Programs per query row: about one program per SM in all (on an H200 with 128 rows, 2 splits ran 18 us,
    4 splits 24 us, 8 splits 25 us), at most one per state tile."""
    if device.type != "cuda":
        return 1
    return max(1, min(tiles, triton.cdiv(_processors(device), rows)))


@triton.jit
def _attend_window_kernel(
    Q, K, V, G, S, Z, INDEX, WEIGHT, OUT, PARTIAL, NEW_K, NEW_V, NEW_LOG_G, RAW_G, LENGTH,
    tq, w, hq, ratio, scale, scale_power,
    sqb, sqt, sqh, sqd,
    skb, skt, skh, skd,
    svb, svt, svh, sve,
    sgb, sgt, sgh,
    ssb, ssh, ssd, sse,
    szb, szh, szd,
    sob, sot, soh, soe,
    snkb, snkh, snkd,
    snvb, snvh, snve,
    sngb, sngh,
    srgb, srgt, srgh,
    D: tl.constexpr, d: tl.constexpr, e: tl.constexpr,  # compile-time: masks fold away when d, e are powers of 2
    DEG: tl.constexpr, HAS_STATE: tl.constexpr, SPLITS: tl.constexpr, STAGES: tl.constexpr,
    APPEND: tl.constexpr, GATED: tl.constexpr, HAS_RAW: tl.constexpr,
    BLOCK_W: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DH: tl.constexpr, BLOCK_E: tl.constexpr,
):
    row = tl.program_id(0)  # (batch, query, query head), query head fastest
    split = tl.program_id(1)
    head = row % hq
    query = (row // hq) % tq
    batch = row // (hq * tq)
    kv_head = head // ratio

    offs_dh = tl.arange(0, BLOCK_DH)
    offs_e = tl.arange(0, BLOCK_E)
    q_base = Q + batch * sqb + query * sqt + head * sqh
    q = tl.load(q_base + offs_dh * sqd, mask=offs_dh < d, other=0.0).to(tl.float32)
    g_base = G + batch * sgb + kv_head * sgh
    if APPEND:
        # One query per row; the new key sits at the device-side length L, after the L keys of the buffer.
        n_keys = tl.load(LENGTH).to(tl.int32)
        G_before = tl.where(n_keys > 0, tl.load(g_base + tl.maximum(n_keys - 1, 0) * sgt), 0.0)
        g_new = 0.0
        if GATED:
            g_new = tl.load(NEW_LOG_G + batch * sngb + kv_head * sngh)
        G_m = G_before + g_new
    else:
        position = w - tq + query  # window position of this query; -1 when there is no window
        n_keys = position + 1
        # G_m = 0 with no window (then nothing decays the state).
        G_m = tl.load(g_base + tl.maximum(position, 0) * sgt, mask=w > 0, other=0.0)

    # Accumulate elementwise and reduce once at the end: no cross-thread reduction inside the loops.
    numerator = tl.zeros([BLOCK_W, BLOCK_E], dtype=tl.float32)
    denominator = tl.zeros([BLOCK_W], dtype=tl.float32)

    # The window: keys 0..n_keys-1, each decayed by e^{G_m - G_j}; rows past n_keys are never read.
    k_base = K + batch * skb + kv_head * skh
    v_base = V + batch * svb + kv_head * svh
    for block in tl.range(split, tl.cdiv(n_keys, BLOCK_W), SPLITS, num_stages=STAGES):
        offs_j = block * BLOCK_W + tl.arange(0, BLOCK_W)
        visible = offs_j < n_keys
        k = tl.load(k_base + offs_j[:, None] * skt + offs_dh[None, :] * skd,
                    mask=visible[:, None] & (offs_dh[None, :] < d), other=0.0).to(tl.float32)
        score = tl.sum(k * q[None, :], axis=1) * scale
        power = score
        for _ in tl.static_range(DEG - 1):
            power = power * score
        G_j = tl.load(g_base + offs_j * sgt, mask=visible, other=0.0)
        weight = tl.where(visible, power * tl.exp(G_m - G_j), 0.0)
        v = tl.load(v_base + offs_j[:, None] * svt + offs_e[None, :] * sve,
                    mask=visible[:, None] & (offs_e[None, :] < e), other=0.0).to(tl.float32)
        numerator += weight[:, None] * v
        denominator += weight
    numerator = tl.sum(numerator, axis=0)
    denominator = tl.sum(denominator, axis=0)

    if APPEND:
        # The new key (weight (s <q, k>)^p, no decay), counted by the first split; one program per key/value
        # head writes it (and its gates) into the buffers at L. Every other read is of rows below L: no race.
        k_new = tl.load(NEW_K + batch * snkb + kv_head * snkh + offs_dh * snkd, mask=offs_dh < d, other=0.0)
        v_new = tl.load(NEW_V + batch * snvb + kv_head * snvh + offs_e * snve, mask=offs_e < e, other=0.0)
        score = tl.sum(k_new.to(tl.float32) * q, axis=0) * scale
        power = score
        for _ in tl.static_range(DEG - 1):
            power = power * score
        power = tl.where(split == 0, power, 0.0)
        numerator += power * v_new.to(tl.float32)
        denominator += power
        # Masks as one comparison each against a limit that is 0 for the programs that do not write.
        writer = (split + head % ratio) == 0
        single = tl.arange(0, 1)  # one-element blocks: masked scalar stores
        tl.store(k_base + n_keys * skt + offs_dh * skd, k_new, mask=offs_dh < tl.where(writer, d, 0))
        tl.store(v_base + n_keys * svt + offs_e * sve, v_new, mask=offs_e < tl.where(writer, e, 0))
        tl.store(g_base + n_keys * sgt + single, G_m + tl.zeros([1], tl.float32), mask=single < tl.where(writer, 1, 0))
        if HAS_RAW:
            tl.store(RAW_G + batch * srgb + n_keys * srgt + kv_head * srgh + single,
                     g_new + tl.zeros([1], tl.float32), mask=single < tl.where(writer, 1, 0))

    # The state: phi(q)^T [S, z], phi(q) built tile by tile from the sympow table, scaled once at the end.
    if HAS_STATE:
        state_numerator = tl.zeros([BLOCK_D, BLOCK_E], dtype=tl.float32)
        state_denominator = tl.zeros([BLOCK_D], dtype=tl.float32)
        s_base = S + batch * ssb + kv_head * ssh
        z_base = Z + batch * szb + kv_head * szh
        for tile in tl.range(split, tl.cdiv(D, BLOCK_D), SPLITS, num_stages=STAGES):
            offs_a = tile * BLOCK_D + tl.arange(0, BLOCK_D)
            inside = offs_a < D
            phi = tl.load(WEIGHT + offs_a, mask=inside, other=0.0)
            for p in tl.static_range(DEG):
                coordinate = tl.load(INDEX + offs_a * DEG + p, mask=inside, other=0)
                phi = phi * tl.load(q_base + coordinate * sqd, mask=inside, other=0.0).to(tl.float32)
            state = tl.load(s_base + offs_a[:, None] * ssd + offs_e[None, :] * sse,
                            mask=inside[:, None] & (offs_e[None, :] < e), other=0.0).to(tl.float32)
            z = tl.load(z_base + offs_a * szd, mask=inside, other=0.0).to(tl.float32)
            state_numerator += phi[:, None] * state
            state_denominator += phi * z
        coefficient = scale_power * tl.exp(G_m)
        numerator += coefficient * tl.sum(state_numerator, axis=0)
        denominator += coefficient * tl.sum(state_denominator, axis=0)

    if SPLITS == 1:
        empty = denominator == 0.0
        y = tl.where(empty, 0.0, numerator / tl.where(empty, 1.0, denominator))
        out = OUT + batch * sob + query * sot + head * soh + offs_e * soe
        tl.store(out, y.to(OUT.dtype.element_ty), mask=offs_e < e)
    else:
        # PARTIAL [SPLITS, rows, BLOCK_E + 1]: numerators, then the denominator in the last column.
        partial = PARTIAL + (split * tl.num_programs(0) + row) * (BLOCK_E + 1)
        tl.store(partial + offs_e, numerator)
        tl.store(partial + BLOCK_E, denominator)


@triton.jit
def _combine_kernel(
    PARTIAL, OUT, LENGTH, tq, hq,
    sob, sot, soh, soe,
    e: tl.constexpr, SPLITS: tl.constexpr, BLOCK_E: tl.constexpr, BUMP_LENGTH: tl.constexpr,
):
    row = tl.program_id(0)
    if BUMP_LENGTH:  # after the attend kernel (stream order): every program there has read the old length
        if row == 0:
            tl.store(LENGTH, tl.load(LENGTH) + 1)
    rows = tl.num_programs(0)
    head = row % hq
    query = (row // hq) % tq
    batch = row // (hq * tq)
    offs_e = tl.arange(0, BLOCK_E)
    numerator = tl.load(PARTIAL + row * (BLOCK_E + 1) + offs_e)
    denominator = tl.load(PARTIAL + row * (BLOCK_E + 1) + BLOCK_E)
    for split in tl.static_range(1, SPLITS):
        partial = PARTIAL + (split * rows + row) * (BLOCK_E + 1)
        numerator += tl.load(partial + offs_e)
        denominator += tl.load(partial + BLOCK_E)
    empty = denominator == 0.0
    y = tl.where(empty, 0.0, numerator / tl.where(empty, 1.0, denominator))
    out = OUT + batch * sob + query * sot + head * soh + offs_e * soe
    tl.store(out, y.to(OUT.dtype.element_ty), mask=offs_e < e)


def _block(n: int) -> int:
    return max(16, triton.next_power_of_2(n))


# Launch choices for the decode kernel; None picks per device. ``stages`` > 1 asks Triton to software-pipeline
# the loads of the window and state loops. The defaults are the best of the sweep in benchmarks/gpu_decode.py
# (H200, bf16, b=16, h=8, d=64: 4 warps, 128-row state tiles, 3 stages, 2 splits: 18 us for a full window).
TUNING = {"splits": None, "block_d": None, "num_warps": 4, "stages": 3}


def _scratch(*shape, device) -> torch.Tensor:
    """fp32 partial sums of the split programs (every entry is written before the combine kernel reads it)."""
    return torch.empty(shape, device=device, dtype=torch.float32)


def _launch_attend(Q, K, V, G, state, keys, deg, scale, *, append=None, splits=None, block_d=None,
                   num_warps=None, stages=None):
    """Run the attend kernel (and the combine kernel when the rows are split); returns ``Y``.

    ``append = (K_new, V_new, log_G_new or None, raw_log_G_buffer or None, length)``: decode mode (see
    :func:`decode_step`); ``K``, ``V``, ``G`` are then the window buffers.
    """
    b, tq, hq, d = Q.shape
    w, h, e = K.shape[1], K.shape[2], V.shape[-1]
    index, weight = _table(d, deg, Q.device)
    D = index.shape[0]
    block_e = _block(e)
    block_d = block_d or TUNING["block_d"] or max(16, min(128, 8192 // block_e))
    rows = b * tq * hq
    splits = splits or TUNING["splits"] or _default_splits(rows, triton.cdiv(D, block_d), Q.device)
    num_warps = num_warps or TUNING["num_warps"]
    stages = stages or TUNING["stages"]
    G = G.float() if G.numel() else torch.zeros(b, 1, h, device=Q.device)  # a valid pointer when w == 0
    has_state = state is not None
    if not has_state:  # unused pointers
        state, keys = G.new_zeros(1, 1, 1, 1), G.new_zeros(1, 1, 1)
    out = torch.full((b, tq, hq, e), float("nan"), device=Q.device, dtype=Q.dtype)
    partial = out if splits == 1 else _scratch(splits, rows, block_e + 1, device=Q.device)
    if append is None:
        new_K, new_V, new_log_G, raw, length = K, V, G, G, G  # unused pointers
    else:
        new_K, new_V, new_log_G, raw, length = append
    gated, has_raw = new_log_G is not None, raw is not None
    new_log_G = G if new_log_G is None else new_log_G
    raw = G if raw is None else raw
    _attend_window_kernel[(rows, splits)](
        Q, K, V, G, state, keys, index, weight, out, partial, new_K, new_V, new_log_G, raw, length,
        tq, w, hq, hq // h, scale, scale**deg,
        *Q.stride(), *K.stride(), *V.stride(), *G.stride(), *state.stride(), *keys.stride(), *out.stride(),
        new_K.stride(0), new_K.stride(-2), new_K.stride(-1), new_V.stride(0), new_V.stride(-2), new_V.stride(-1),
        new_log_G.stride(0), new_log_G.stride(-1), *raw.stride()[:3],
        D=D, d=d, e=e, DEG=deg, HAS_STATE=has_state, SPLITS=splits, STAGES=stages,
        APPEND=append is not None, GATED=gated, HAS_RAW=has_raw,
        BLOCK_W=32, BLOCK_D=block_d, BLOCK_DH=_block(d), BLOCK_E=block_e,
        num_warps=num_warps,
    )
    bump = append is not None and splits > 1
    if splits > 1:
        _combine_kernel[(rows,)](partial, out, length if bump else out, tq, hq, *out.stride(), e=e, SPLITS=splits,
                                 BLOCK_E=block_e, BUMP_LENGTH=bump)
    elif append is not None:
        length.add_(1)
    return out


def attend_window(problem, G: torch.Tensor, **tuning):
    """Outputs of the queries at the end of the window, ``Y [b, tq, hq, e]`` in ``Q``'s dtype; when
    ``problem.return_final_state`` (the window is full), ``(Y, state, sum_of_keys)`` with the window folded in.

    ``problem``: a validated ``retention._validate.Problem`` (``Q [b, tq, hq, d]``, window ``K [b, w, h, d]``,
    ``V [b, w, h, e]``, optional ``state [b, h, D, e]`` and ``sum_of_keys [b, h, D]``). ``G [b, w, h]``: the
    window's cumulative log gate (fp32). ``tuning``: ``splits``, ``block_d``, ``num_warps``, ``stages`` (see
    ``TUNING``).
    """
    out = _launch_attend(problem.Q, problem.K, problem.V, G, problem.state, problem.sum_of_keys, problem.deg,
                         problem.scale, **tuning)
    if problem.return_final_state:
        return (out, *update_state(problem, G))
    return out


def decode_step(Q, K, V, log_G, window_K, window_V, window_log_G, window_G, window_length, state, sum_of_keys,
                deg: int, scale: float, fold: bool) -> torch.Tensor:
    """One token of a static cache in one fused launch: append, attend, (fold). Fixed shapes and addresses.

    Q ``[b, 1, hq, d]``, K ``[b, 1, h, d]``, V ``[b, 1, h, e]``, log_G ``[b, 1, h]`` or None: the new token.
    Buffers: window_K ``[b, W, h, d]``, window_V ``[b, W, h, e]``, window_log_G ``[b, W, h]`` (raw gates, or
    None), window_G ``[b, W, h]`` fp32 (cumulative gates), window_length int64 ``[1]`` (``L``, on the device),
    state ``[b, h, D, e]``, sum_of_keys ``[b, h, D]``. The kernel reads ``L``, attends the query to the ``L``
    buffered keys, the new key and the state, writes the new key, value and gates at row ``L``, and
    ``L`` becomes ``L + 1``. With ``fold`` (the window is then full) the window is folded into ``state`` and
    ``sum_of_keys`` in place; the caller empties the buffers. Returns ``Y [b, 1, hq, e]``.
    """
    Y = _launch_attend(Q, window_K, window_V, window_G, state, sum_of_keys, deg, scale,
                       append=(K, V, log_G, window_log_G, window_length))
    if fold:
        fold_window(window_K, window_V, window_G, deg, state, sum_of_keys, out_state=state, out_keys=sum_of_keys)
    return Y


attend_window.decode_step = decode_step  # found by retention.inference through the backend's attend_window


@triton.jit
def _fold_kernel(
    K, V, G, S, Z, INDEX, WEIGHT, OUT_S, OUT_Z,
    w, h,
    skb, skt, skh, skd,
    svb, svt, svh, sve,
    sgb, sgt, sgh,
    ssb, ssh, ssd, sse,
    szb, szh, szd,
    sob, soh, sod, soe,
    szob, szoh, szod,
    D: tl.constexpr, e: tl.constexpr,
    DEG: tl.constexpr, HAS_STATE: tl.constexpr, DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_W: tl.constexpr, BLOCK_E: tl.constexpr,
):
    tile = tl.program_id(0)
    batch = tl.program_id(1) // h
    head = tl.program_id(1) % h
    offs_a = tile * BLOCK_D + tl.arange(0, BLOCK_D)
    inside = offs_a < D
    offs_e = tl.arange(0, BLOCK_E)
    feature_weight = tl.load(WEIGHT + offs_a, mask=inside, other=0.0)
    k_base = K + batch * skb + head * skh
    v_base = V + batch * svb + head * svh
    g_base = G + batch * sgb + head * sgh
    G_w = tl.load(g_base + tl.maximum(w - 1, 0) * sgt, mask=w > 0, other=0.0)

    state = tl.zeros([BLOCK_D, BLOCK_E], dtype=tl.float32)
    keys = tl.zeros([BLOCK_D], dtype=tl.float32)
    for start in range(0, w, BLOCK_W):
        offs_j = start + tl.arange(0, BLOCK_W)
        present = offs_j < w
        decay = tl.where(present, tl.exp(G_w - tl.load(g_base + offs_j * sgt, mask=present, other=0.0)), 0.0)
        # phi(k_j)^T for this D tile and key block: [BLOCK_D, BLOCK_W], decayed to the end of the window.
        phi = feature_weight[:, None] * decay[None, :]
        for p in tl.static_range(DEG):
            coordinate = tl.load(INDEX + offs_a * DEG + p, mask=inside, other=0)
            phi = phi * tl.load(k_base + offs_j[None, :] * skt + coordinate[:, None] * skd,
                                mask=inside[:, None] & present[None, :], other=0.0).to(tl.float32)
        v = tl.load(v_base + offs_j[:, None] * svt + offs_e[None, :] * sve,
                    mask=present[:, None] & (offs_e[None, :] < e), other=0.0)
        state = tl.dot(phi.to(DOT_DTYPE), v.to(DOT_DTYPE), state, input_precision=PRECISION)
        keys += tl.sum(phi, axis=1)

    mask = inside[:, None] & (offs_e[None, :] < e)
    if HAS_STATE:
        total = tl.exp(G_w)
        old = tl.load(S + batch * ssb + head * ssh + offs_a[:, None] * ssd + offs_e[None, :] * sse,
                      mask=mask, other=0.0).to(tl.float32)
        old_keys = tl.load(Z + batch * szb + head * szh + offs_a * szd, mask=inside, other=0.0).to(tl.float32)
        state += total * old
        keys += total * old_keys
    tl.store(OUT_S + batch * sob + head * soh + offs_a[:, None] * sod + offs_e[None, :] * soe,
             state.to(OUT_S.dtype.element_ty), mask=mask)
    tl.store(OUT_Z + batch * szob + head * szoh + offs_a * szod, keys.to(OUT_Z.dtype.element_ty), mask=inside)


def fold_window(K, V, G, deg: int, state=None, sum_of_keys=None, *, out_state=None, out_keys=None,
                state_dtype: torch.dtype | None = None):
    """Fold a window into the state: ``S' = e^{G_w} S + sum_j e^{G_w - G_j} phi(k_j) v_j^T``, ``z'`` alike.

    K ``[b, w, h, d]``, V ``[b, w, h, e]``, G ``[b, w, h]`` (cumulative log gate of the window, fp32),
    state ``[b, h, D, e]`` and sum_of_keys ``[b, h, D]`` or None. Writes ``out_state`` / ``out_keys`` when given
    (they may be ``state`` / ``sum_of_keys`` themselves: each tile is read before it is written by the same
    program), else new tensors: the state in ``state_dtype`` (default ``K``'s dtype), the sum of keys in fp32.
    bf16/fp16 windows multiply ``phi(k)`` and ``V`` in bf16 with fp32 accumulation; fp32 windows in full fp32.
    """
    b, w, h, d = K.shape
    e = V.shape[-1]
    index, weight = _table(d, deg, K.device)
    D = index.shape[0]
    if out_state is None:
        out_state = torch.full((b, h, D, e), float("nan"), device=K.device, dtype=state_dtype or K.dtype)
    if out_keys is None:
        out_keys = torch.full((b, h, D), float("nan"), device=K.device, dtype=torch.float32)
    has_state = state is not None
    if not has_state:
        state, sum_of_keys = out_state, out_keys  # unused pointers
    G = G.float() if G.numel() else torch.zeros(b, 1, h, device=K.device)
    # The interpreter (CPU) multiplies bf16 dot operands as raw bits: it gets fp32 operands instead.
    low_precision = K.dtype in (torch.bfloat16, torch.float16) and K.device.type == "cuda"
    block_d, block_w, block_e = 64, 32, _block(e)
    _fold_kernel[(triton.cdiv(D, block_d), b * h)](
        K, V, G, state, sum_of_keys, index, weight, out_state, out_keys,
        w, h,
        *K.stride(), *V.stride(), *G.stride(), *state.stride(), *sum_of_keys.stride(),
        *out_state.stride(), *out_keys.stride(),
        D=D, e=e, DEG=deg, HAS_STATE=has_state,
        DOT_DTYPE=tl.bfloat16 if low_precision else tl.float32,
        PRECISION="tf32" if low_precision else "ieee",  # unused for bf16 operands
        BLOCK_D=block_d, BLOCK_W=block_w, BLOCK_E=block_e,
        num_warps=4,
    )
    return out_state, out_keys


def update_state(problem, G: torch.Tensor):
    """The backend's fold op: ``(state [b, h, D, e] in Q's dtype, sum_of_keys [b, h, D] fp32)`` after folding
    the window of ``problem`` (see :func:`fold_window`) into ``problem.state``."""
    return fold_window(problem.K, problem.V, G, problem.deg, problem.state, problem.sum_of_keys,
                       state_dtype=problem.Q.dtype)
