"""Host side of the Triton backend: launch plans, the ``torch.library`` custom ops (forward and backward, so
``torch.compile(fullgraph=True)`` sees no graph break) and the autograd wiring.

Forward (``n = ceil(t / C)`` chunks, time padded only inside the kernels by masks):
  1. ``state_scan_kernel``: the state entering every chunk, ``STATES [b, h, n, D, e]`` (bf16 for bf16 inputs,
     else fp32) and ``ZS [b, h, n, D]`` fp32, plus the final state; ``phi(K)`` is expanded tile by tile in SRAM.
  2. ``output_kernel``: intra-chunk block + state query + normalisation -> ``Y``, and the denominators.
Backward:
  3. ``state_grad_scan_kernel``: the reverse scan, ``dS'`` leaving every chunk and the initial-state gradient.
  4. ``query_grad_kernel`` (dQ and the gates' query terms) and ``key_value_grad_kernel`` (dK, dV, the gates' key
     terms and intra-chunk spanning sums), then ``chunk_inner_product_kernel`` (``<dS'_{c+1}, S'_c>``).
  5. ``gates.gate_gradient_kernel`` assembles d log_G from those per-chunk pieces.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import numpy as np
import torch
import triton
import triton.language as tl

from retention.sympow import sympow_dim, sympow_table

from . import cotangent
from ._tiles import next_power_of_2
from .gates import gate_gradient_kernel
from .grads import key_value_grad_kernel, query_grad_kernel
from .output import output_kernel
from .pairs import (
    pair_key_state_grad_kernel,
    pair_key_value_grad_kernel,
    pair_output_kernel,
    pair_query_grad_kernel,
    pair_state_kernel,
)
from .state import chunk_inner_product_kernel, chunk_update_kernel, scan_kernel

__all__ = ["power_retention_triton", "default_chunk_size"]

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"  # read once, like triton.jit does
_OPERAND = {torch.bfloat16: tl.bfloat16, torch.float16: tl.float32, torch.float32: tl.float32}
if _INTERPRET:
    # The interpreter's tl.dot multiplies the raw bits of bfloat16 operands (triton-lang/triton#11584, not
    # supported upstream): on CPU, bf16 inputs (exact in fp32) compute with fp32 operands.
    _OPERAND[torch.bfloat16] = tl.float32
# fp16 operands would overflow for (s q.k)^p; tf32 keeps fp16's 10-bit mantissa with fp32's range.
_PRECISION = {torch.bfloat16: "tf32", torch.float16: "tf32", torch.float32: "ieee"}


def default_chunk_size(t: int, d: int, deg: int) -> int:
    """Chunk length when the caller gives none: the state costs ``4 D e`` FLOPs per token and the intra block
    ``2 C d``, so large states want long chunks (and fewer stored states)."""
    if deg == 1:
        return min(t, 128)
    if d < 64:
        # The state is small (D_int = 768 for d=32), so the intra block dominates sooner. (d=32 with C=1024 once
        # hit an illegal memory access in the minimal-layout output kernel on an H200; the deg-2 pair kernels
        # passed that case on the H200 in the bf16 check. The chunk for d < 64 is not tuned yet.)
        return min(t, 256)
    # H200, bf16, d=64, b t = 65536 (benchmarks/results/gpu_chunk_sweep_2026-12-03.json): 256 and 2048 lose
    # everywhere; 512 takes 1-3% less fwd+bwd at 4k-64k but 0-5% more fwd, and its twice as many stored states
    # peak 1.26 GiB above the inputs at 64k (1024: 0.94), about 1.01 above inputs, outputs and gradients, over
    # issue 3's 1 GiB
    return min(t, 1024)


@dataclass(frozen=True)
class _Plan:
    C: int
    n: int
    T_pad: int
    D: int
    BQ: int
    BK: int
    BD: int
    DP: int
    EP: int
    operand: object
    precision: str
    num_warps: int


def _plan(Q: torch.Tensor, K: torch.Tensor, V: torch.Tensor, deg: int, chunk_size: int) -> _Plan:
    t, d, e = K.shape[1], K.shape[3], V.shape[3]
    C = chunk_size
    n = -(-t // C)
    D = sympow_dim(d, deg)
    block = next_power_of_2(min(C, 64))
    return _Plan(
        C=C, n=n, T_pad=n * C, D=D, BQ=block, BK=block, BD=_expansion_tile(D, d, deg, Q.dtype),
        DP=_feature_tile(d, deg), EP=next_power_of_2(e),
        operand=_OPERAND[Q.dtype], precision=_PRECISION[Q.dtype],
        num_warps=4,
    )


# Triton 3.6 on an H200 miscompiles the deg 3-4 minimal-layout kernels at 16 < d <= 32 with bf16 operands and
# 64 x 64 expansion tiles: inf or wrong outputs, illegal addresses from b = 8 (d 16 and d 64 pass, even past 2**31
# state elements). 64-wide feature tiles (zero-padded) with 32-wide expansion tiles pass, as do fp32 operands (the
# fp16 and fp32 path): benchmarks/results/gpu_large_state_variants.json.


def _feature_tile(d: int, deg: int) -> int:
    """Width of the ``[rows, DP]`` tiles of q and k in the minimal-layout kernels (zero-padded past ``d``)."""
    if deg >= 3 and d > 16:
        return next_power_of_2(d, minimum=64)
    return next_power_of_2(d)


def _expansion_tile(D: int, d: int, deg: int, dtype: torch.dtype) -> int:
    """Width ``BD`` of the ``[rows, BD]`` tiles of phi built in registers (and of the state tiles)."""
    if deg >= 3 and 16 < d <= 32 and _OPERAND[dtype] == tl.bfloat16:
        return 32
    return next_power_of_2(min(D, 64))


_TABLES: dict = {}
_SCAN_STEPS, _SCAN_BLOCK = 16, 256  # scan_kernel: [STEPS, BLOCK] tiles of slots
POISON = False  # tests set it: kernel outputs start as NaN


def _tables(d: int, deg: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The sympow index table (int32 [D, deg]) and weights (fp32 [D]) on ``device``, built once."""
    key = (d, deg, device)
    if key not in _TABLES:
        index, weight = sympow_table(d, deg)
        _TABLES[key] = (
            torch.from_numpy(index.astype("int32")).to(device),
            torch.from_numpy(weight.astype("float32")).to(device),
        )
    return _TABLES[key]


def _output_cotangent(dY, Y, den, operand, dn=None, delta=None):
    """``(dn, delta)`` of ``cotangent.output_cotangent``, ``dn`` rounded to the kernels' operands: bf16, or for
    fp16 inputs (fp32 operands on tf32 tensor cores) to tf32."""
    if operand == tl.bfloat16:
        rounding = cotangent.BF16
    else:
        rounding = cotangent.TF32 if Y.dtype == torch.float16 else cotangent.NO_ROUNDING
    return cotangent.output_cotangent(dY, Y, den, rounding, dn, delta)


def _local_gates(log_G: torch.Tensor | None, plan: _Plan, b: int, h: int, device) -> torch.Tensor:
    """Cumulative log gate within each chunk, ``[b, h, n * C]`` fp32 (zero gates pad the last chunk)."""
    if log_G is None:
        return torch.empty(0, device=device, dtype=torch.float32)
    t = log_G.shape[1]
    g = torch.nn.functional.pad(log_G.float().transpose(1, 2), (0, plan.T_pad - t))
    return g.reshape(b, h, plan.n, plan.C).cumsum(-1).reshape(b, h, plan.T_pad).contiguous()


def _new(*shape, device, dtype=torch.float32) -> torch.Tensor:
    """Kernel outputs: NaN-poisoned when ``POISON`` is set (tests), so an element no kernel wrote shows up."""
    if POISON:
        return torch.full(shape, float("nan"), device=device, dtype=dtype)
    return torch.empty(shape, device=device, dtype=dtype)


def _single_chunk_without_state(plan: _Plan, has_state: bool, need_final_state: bool = False) -> bool:
    """One chunk, no initial state and no final state wanted (or, backward, no initial state's gradient): the
    state passes would compute only what nobody reads, since the first chunk's queries see no state."""
    return plan.n == 1 and not has_state and not need_final_state


def _state_pass(X, V, G, log_G, buffer, key_buffer, plan, index, weight, h, deg, scale, backward, delta=None):
    """Fill ``buffer [b, h, n + 1, D, e]`` (and ``key_buffer``) with every chunk's contribution, then scan.
    Backward: ``V`` is dn ``[b, t, hq, e]`` and ``delta [b, t, hq]`` fp32 the ones column of dN'."""
    b, t, hx = X.shape[:3]
    e = buffer.shape[-1]
    has_gate = log_G is not None
    G_arg = G if has_gate else key_buffer
    chunk_update_kernel[(plan.n * triton.cdiv(plan.D, plan.BD), b * h)](
        X, V, key_buffer if delta is None else delta, G_arg, index, weight, buffer, key_buffer,
        *X.stride(), *V.stride(),
        t, hx, h, plan.D, X.shape[3], e, plan.n, plan.C, plan.T_pad, scale,
        BACKWARD=backward, HAS_GATE=has_gate, DEG=deg, BT=plan.BK, BD=plan.BD, DP=plan.DP, EP=plan.EP,
        OP=plan.operand, PRECISION=plan.precision, num_warps=plan.num_warps,
    )
    for target, length in ((buffer, plan.D * e), (key_buffer, plan.D)):
        block = min(_SCAN_BLOCK, triton.next_power_of_2(length))
        scan_kernel[(triton.cdiv(length, block), b * h)](
            target, G_arg, length, plan.n, plan.C, plan.T_pad,
            HAS_GATE=has_gate, REVERSE=backward, STEPS=_SCAN_STEPS, BLOCK=block, num_warps=4,
        )


_INNER_BLOCK = 1024
_INNER_SPLIT = 16 * _INNER_BLOCK  # elements per program of chunk_inner_product_kernel (a multiple of the block)


def _chunk_inner_products(A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """``<A[:, c], B[:, c]>`` for ``A``, ``B`` of shape ``[b h, n, ...]`` (each chunk's block contiguous, any
    dtype), ``[b h, n]`` fp64: fp32 sums in a kernel (no fp32 copy of bf16 states), the partial sums in fp64."""
    bh, n = A.shape[:2]
    length = A[0, 0].numel()
    splits = triton.cdiv(length, _INNER_SPLIT)
    out = torch.empty(bh, n, splits, device=A.device, dtype=torch.float32)
    chunk_inner_product_kernel[(splits, n, bh)](
        A, B, out, A.stride(0), A.stride(1), B.stride(0), B.stride(1), length, n,
        SPLIT=_INNER_SPLIT, BLOCK=_INNER_BLOCK, num_warps=4,
    )
    return out.sum(-1, dtype=torch.float64)


def _gate_gradient(G, state_inner, query_terms, key_terms, spans, key_block: int, plan: _Plan) -> torch.Tensor:
    """``d log_G [b, t, h]`` fp32 from the gradient kernels' per-chunk pieces (``gates.gate_gradient_kernel``):
    ``G [b, h, T_pad]`` cumulative gates within each chunk, ``state_inner [b h, n]`` fp64 ``<dS'_{c+1}, S'_c>``
    (numerators and key sums; ``dS'_n`` is the final state's cotangent), ``query_terms [b, t, hq]``, ``key_terms
    [b, t, h]`` and ``spans [b h, n, nb, C]`` (row ``J`` from key block ``J`` of ``key_block`` keys)."""
    b, t, h = key_terms.shape
    n_blocks = spans.shape[2]
    NB = triton.next_power_of_2(n_blocks)
    out = _new(b, t, h, device=key_terms.device)
    # [NB, BLOCK] fp64 tiles of at most 4096 elements (32 KB of registers over 4 warps)
    gate_gradient_kernel[(plan.n, b * h)](
        query_terms, key_terms, spans, G, state_inner.contiguous(), out,
        t, query_terms.shape[2], h, plan.n, plan.C, plan.T_pad, key_block, n_blocks,
        NB=NB, BLOCK=max(16, min(triton.next_power_of_2(plan.C), 4096 // NB)), num_warps=4,
    )
    return out


def _forward(Q, K, V, log_G, state, sum_of_keys, deg: int, scale: float, chunk_size: int,
             need_final_state: bool = True):
    b, t, hq, d = Q.shape
    h, e = K.shape[2], V.shape[3]
    plan = _plan(Q, K, V, deg, chunk_size)
    device = Q.device
    index, weight = _tables(d, deg, device)
    G = _local_gates(log_G, plan, b, h, device)
    has_gate = log_G is not None
    has_state = state is not None
    D = plan.D

    # Slot c: the state entering chunk c (slot 0 the initial state, slot n the final one).
    states = _new(b, h, plan.n + 1, D, e, device=device)
    key_states = _new(b, h, plan.n + 1, D, device=device)
    states[:, :, 0] = state if has_state else 0.0
    key_states[:, :, 0] = sum_of_keys if has_state else 0.0
    if not _single_chunk_without_state(plan, has_state, need_final_state):  # else the final state is not written
        _state_pass(K, V, G, log_G, states, key_states, plan, index, weight, h, deg, scale, backward=False)

    Y = _new(b, t, hq, e, device=device, dtype=Q.dtype)
    den = _new(b, t, hq, device=device)
    output_kernel[(plan.n * triton.cdiv(plan.C, plan.BQ), b * hq)](
        Q, K, V, G if has_gate else den, index, weight, states, key_states, Y, den,
        *Q.stride(), *K.stride(), *V.stride(),
        t, hq, h, D, d, e, plan.n, plan.C, plan.T_pad, scale,
        HAS_GATE=has_gate, HAS_STATE=has_state, DEG=deg, BQ=plan.BQ, BK=plan.BK, BD=plan.BD,
        DP=plan.DP, EP=plan.EP, OP=plan.operand, PRECISION=plan.precision, num_warps=plan.num_warps,
    )
    final_state = states[:, :, plan.n].clone()
    final_keys = key_states[:, :, plan.n].clone()
    return Y, den, final_state, final_keys, states, key_states, G


def _backward(dY, d_final_state, d_final_keys, Q, K, V, log_G, G, Y, den, states, key_states,
              has_state: bool, deg: int, scale: float, chunk_size: int):
    b, t, hq, d = Q.shape
    h, e = K.shape[2], V.shape[3]
    plan = _plan(Q, K, V, deg, chunk_size)
    device = Q.device
    index, weight = _tables(d, deg, device)
    has_gate = log_G is not None
    D = plan.D

    # dN' = [dn, delta] = [dy / den, -(dn . y)]: dn [b, t, hq, e] in the operand dtype, delta [b, t, hq] fp32
    dn, delta = _output_cotangent(dY, Y, den, plan.operand)

    # Slot c: dS'_c, the gradient of the state entering chunk c (slot n: of the final state; slot 0: initial).
    d_states = _new(b, h, plan.n + 1, D, e, device=device)
    d_key_states = _new(b, h, plan.n + 1, D, device=device)
    d_states[:, :, plan.n] = 0.0 if d_final_state is None else d_final_state
    d_key_states[:, :, plan.n] = 0.0 if d_final_keys is None else d_final_keys
    if not _single_chunk_without_state(plan, has_state):  # else the initial state's gradient is not written
        _state_pass(Q, dn, G, log_G, d_states, d_key_states, plan, index, weight, h, deg, scale, backward=True,
                    delta=delta)

    G_arg = G if has_gate else den
    dQ = _new(b, t, hq, d, device=device, dtype=Q.dtype)
    # the gate gradient's pieces (see _gate_gradient); without gates the kernels skip them
    query_terms = _new(b, t, hq, device=device) if has_gate else den
    key_terms = _new(b, t, h, device=device) if has_gate else den
    spans = _new(b * h, plan.n, triton.cdiv(plan.C, plan.BK), plan.C, device=device) if has_gate else den
    query_grad_kernel[(plan.n * triton.cdiv(plan.C, plan.BQ), b * hq)](
        Q, K, V, G_arg, index, weight, states, key_states, dn, delta, dQ, query_terms,
        *Q.stride(), *K.stride(), *V.stride(),
        t, hq, h, D, d, e, plan.n, plan.C, plan.T_pad, scale,
        HAS_GATE=has_gate, HAS_STATE=has_state, DEG=deg, BQ=plan.BQ, BK=plan.BK, BD=plan.BD,
        DP=plan.DP, EP=plan.EP, OP=plan.operand, PRECISION=plan.precision, num_warps=plan.num_warps,
    )
    dK = _new(b, t, h, d, device=device, dtype=K.dtype)
    dV = _new(b, t, h, e, device=device, dtype=V.dtype)
    key_value_grad_kernel[(plan.n * triton.cdiv(plan.C, plan.BK), b * h)](
        Q, K, V, G_arg, index, weight, d_states, d_key_states, dn, delta, dK, dV, key_terms, spans,
        *Q.stride(), *K.stride(), *V.stride(),
        t, hq, h, D, d, e, plan.n, plan.C, plan.T_pad, scale,
        HAS_GATE=has_gate, DEG=deg, BQ=plan.BQ, BK=plan.BK, BD=plan.BD,
        DP=plan.DP, EP=plan.EP, OP=plan.operand, PRECISION=plan.precision, num_warps=plan.num_warps,
    )

    d_log_G = None
    if has_gate:
        # slot c of the states: S'_c entering chunk c; slot c + 1 of their gradients: dS'_{c+1} leaving it
        def entering_and_leaving(X, dX):
            return _chunk_inner_products(X.flatten(0, 1)[:, :-1], dX.flatten(0, 1)[:, 1:])

        state_inner = entering_and_leaving(states, d_states) + entering_and_leaving(key_states, d_key_states)
        d_log_G = _gate_gradient(G, state_inner, query_terms, key_terms, spans, plan.BK, plan)
    return dQ, dK, dV, d_log_G, d_states[:, :, 0].clone(), d_key_states[:, :, 0].clone()


# ---------------------------------------------------------------------------------------------------------------
# deg 2: the block-pair layout (pairs.py), converted to and from the minimal layout by differentiable gathers

# RETENTION_TRITON_PAIRS=0 falls back to the minimal-layout kernels (one-hot expansion) for deg 2.
PAIR_LAYOUT = os.environ.get("RETENTION_TRITON_PAIRS", "1") != "0"


@dataclass(frozen=True)
class _PairLayout:
    """Index tables between the minimal layout (``Dm`` features) and the block-pair one (``DI``, ``[DP, DP]``)."""

    DP: int
    NP: int
    DI: int
    pairs: torch.Tensor  # int32 [NP, 2]: blocks (I, J) of pair P
    src: torch.Tensor  # [DI] minimal feature of each internal one (0 for padding)
    coef: torch.Tensor  # [DI] entries of A (S_int = A S_min; A^T A = 1)
    src1: torch.Tensor  # [Dm] first internal source of each minimal feature
    coef1: torch.Tensor
    src2: torch.Tensor  # [Dm] second source (the mirrored product of a diagonal block), coef 0 when none
    coef2: torch.Tensor
    m_index: torch.Tensor  # [DP * DP] minimal feature of M[x, y]
    m_coef: torch.Tensor  # [DP * DP] 1 / w (0 for padding)
    z_index1: torch.Tensor  # [Dm] flat index of M[x, y] and M[y, x]
    z_index2: torch.Tensor
    z_coef: torch.Tensor  # [Dm] w / 2


_PAIR_LAYOUTS: dict = {}


def _pair_layout(d: int, device) -> _PairLayout:
    key = (d, str(device))
    if key in _PAIR_LAYOUTS:
        return _PAIR_LAYOUTS[key]
    blocks = -(-d // 16)
    DP = next_power_of_2(d)
    pairs = [(i, j) for i in range(blocks) for j in range(i, blocks)]
    index, weight = sympow_table(d, 2)
    minimal = {(int(x), int(y)): a for a, (x, y) in enumerate(index)}
    DI = 256 * len(pairs)
    src, coef = np.zeros(DI, np.int64), np.zeros(DI)
    sources: list[list] = [[] for _ in range(len(index))]
    for P, (i, j) in enumerate(pairs):
        for u in range(16):
            for v in range(16):
                x, y = 16 * i + u, 16 * j + v
                if x >= d or y >= d:
                    continue
                f = 256 * P + 16 * u + v
                a = minimal[(min(x, y), max(x, y))]
                src[f], coef[f] = a, (1.0 if (i < j or u == v) else 0.5**0.5)
                sources[a].append((f, coef[f]))
    src1 = np.array([s[0][0] for s in sources])
    coef1 = np.array([s[0][1] for s in sources])
    src2 = np.array([s[-1][0] for s in sources])
    coef2 = np.array([s[1][1] if len(s) > 1 else 0.0 for s in sources])
    m_index, m_coef = np.zeros(DP * DP, np.int64), np.zeros(DP * DP)
    for x in range(d):
        for y in range(d):
            a = minimal[(min(x, y), max(x, y))]
            m_index[x * DP + y], m_coef[x * DP + y] = a, 1.0 / weight[a]

    def on(array, dtype=torch.float32):
        return torch.from_numpy(np.ascontiguousarray(array)).to(device=device, dtype=dtype)

    layout = _PairLayout(
        DP=DP, NP=len(pairs), DI=DI, pairs=on(np.array(pairs).reshape(-1, 2), torch.int32),
        src=on(src, torch.long), coef=on(coef), src1=on(src1, torch.long), coef1=on(coef1),
        src2=on(src2, torch.long), coef2=on(coef2), m_index=on(m_index, torch.long), m_coef=on(m_coef),
        z_index1=on(index[:, 0] * DP + index[:, 1], torch.long),
        z_index2=on(index[:, 1] * DP + index[:, 0], torch.long),
        z_coef=on(weight / 2),
    )
    _PAIR_LAYOUTS[key] = layout
    return layout


def _autotuned(kernel, configs, key, fallbacks=()):
    """``kernel`` autotuned over ``configs`` (results cached on disk), or None under the interpreter. A single-stage
    copy of the first config, then ``fallbacks``, come last: with fp32 operands (fp16/fp32 inputs) at d = 128 the
    pipelined configs need more shared memory than a Hopper SM has (e.g. 331 KB for the output kernel), and the
    tuner skips those (untuned launches take the first that fits; tests/hopper_fit.py checks one always does)."""
    if _INTERPRET:
        return None
    first = configs[0]
    single_stage = triton.Config(first.kwargs, num_warps=first.num_warps, num_stages=1)
    configs = [*configs, single_stage]
    prune = {"early_config_prune": _ieee_wide_prune(list(fallbacks) or [single_stage])}
    try:
        tuned = triton.autotune(configs=configs, key=key, prune_configs_by=prune, cache_results=True)(kernel)
    except TypeError:  # a triton without on-disk autotune caching
        tuned = triton.autotune(configs=configs, key=key, prune_configs_by=prune)(kernel)
    tuned.fallbacks = tuple(fallbacks)  # tried only when no tuned config fits (see _launch)
    return tuned


def _ieee_wide_prune(small):
    """The tuner's config filter: full-fp32 ("ieee") products at d > 64 try only the ``small`` configs. Those products
    run on the CUDA cores, unrolled per tile: on an H200 each pipelined 64-row config of that case took 1-2 min to
    compile and most then did not fit in shared memory, so tuning them outlasted a 10-minute device call."""

    def prune(configs, named_args, **constants):
        if constants.get("PRECISION") == "ieee" and constants.get("DP", 0) > 64:
            return small
        return configs

    return prune


def _config(num_warps, num_stages, **meta):
    return triton.Config(meta, num_warps=num_warps, num_stages=num_stages)


_SHAPE_KEY = ["C", "d", "e", "NP"]
_TUNED_STATE = _autotuned(
    pair_state_kernel,
    [_config(8, 3, BT=64, BU=16, PHI_T=True), _config(4, 3, BT=64, BU=8, PHI_T=True),
     _config(8, 3, BT=64, BU=16, PHI_T=False), _config(4, 3, BT=64, BU=8, PHI_T=False),
     _config(8, 2, BT=128, BU=8, PHI_T=True)],
    [*_SHAPE_KEY, "hx", "h", "BACKWARD", "HAS_GATE", "HAS_INIT"],
)
# fp32 inputs at d = 128: the [256, 128] fp32 state tile alone takes 128 KB, so the last resorts shrink the rows,
# then (for an A100's 164 KB, benchmarks/results/a100_shared_memory_fit.txt) the state tile to [128, 128].
_SMALL_ROWS = (_config(4, 1, BQ=16, BK=32, BU=16), _config(4, 1, BQ=16, BK=32, BU=8))
# BU: pair tiles of 16 BU features; BU = 8 halves the [rows, 16 BU] phi / dphi tiles that the state products hold
# in registers (the key-state kernel's best on an H200, benchmarks/results/gpu_kernel_profile.json).
_QUERY_CONFIGS = [_config(4, 3, BQ=64, BK=64, BU=16), _config(4, 2, BQ=64, BK=64, BU=16),
                  _config(4, 3, BQ=64, BK=64, BU=8), _config(8, 2, BQ=128, BK=64, BU=8)]
_TUNED_OUTPUT = _autotuned(pair_output_kernel, _QUERY_CONFIGS, [*_SHAPE_KEY, "hq", "h", "HAS_GATE", "HAS_STATE"],
                           _SMALL_ROWS)
_TUNED_QUERY_GRAD = _autotuned(pair_query_grad_kernel, _QUERY_CONFIGS,
                               [*_SHAPE_KEY, "hq", "h", "HAS_GATE", "HAS_STATE"], _SMALL_ROWS)
_TUNED_KEY_STATE_GRAD = _autotuned(
    pair_key_state_grad_kernel,
    [_config(4, 3, BK=64, BU=8), _config(4, 2, BK=64, BU=8), _config(4, 1, BK=64, BU=16), _config(8, 1, BK=128, BU=8)],
    [*_SHAPE_KEY, "h", "HAS_GATE"],
    (_config(4, 1, BK=32, BU=16), _config(4, 1, BK=16, BU=16), _config(4, 1, BK=16, BU=8)),
)
# One BK per tuned list: the gates' scratch SPAN has one row per key block, allocated before the launch. BK = 32
# where fp32 operands (fp16/fp32 inputs) meet d > 64: with BK = 64 the kernel (then with the state's share fused)
# needed 258 KB of shared memory there, more than an H100/H200 SM has (227 KB).
_TUNED_KEY_VALUE_GRAD = {
    block: _autotuned(
        pair_key_value_grad_kernel,
        [_config(4, 1, BQ=64, BK=block), _config(4, 2, BQ=64, BK=block), _config(8, 2, BQ=128, BK=block),
         _config(4, 2, BQ=32, BK=block)],
        ["C", "d", "e", "hq", "h", "HAS_GATE"], (_config(4, 1, BQ=16, BK=block),),
    )
    for block in (64, 32)
}
# Under the interpreter (CPU): large blocks mean fewer (slow) Python-level programs.
_INTERPRETER_META = dict(BT=32, BU=16, BQ=32, BK=32, PHI_T=True)


def _key_state_precision(plan, layout) -> str:
    """The product precision of ``pair_key_state_grad_kernel``: "ieee" where fp32 operands meet d > 64 (the tf32
    products with the transposed state tile need 196 KB of shared memory at d = 128, too much with the margin of
    tests/hopper_fit.py; fp32 inputs compute in "ieee" anyway)."""
    return "ieee" if plan.operand == tl.float32 and layout.DP > 64 else plan.precision


def _key_value_block(plan, layout) -> int:
    """The BK that ``pair_key_value_grad_kernel`` runs with (see ``_launch``)."""
    if _INTERPRET:
        return _INTERPRETER_META["BK"]
    return 32 if plan.operand == tl.float32 and layout.DP > 64 else 64


# False: every GPU launch takes the first config of its list (no tuning runs; the checks set it to save compiles).
AUTOTUNE = True


def _launch(tuned, kernel, grid, args, constants, meta_names):
    if tuned is None:
        meta = {name: _INTERPRETER_META[name] for name in meta_names}
        kernel[grid(meta)](*args, **constants, **meta, num_warps=4)
    elif AUTOTUNE:
        try:
            tuned[grid](*args, **constants)
        except triton.runtime.errors.OutOfResources:  # no tuned config fits this GPU: the small fallbacks
            _launch_first_fitting(kernel, grid, args, constants, tuned.fallbacks)
    else:
        candidates = tuned.early_config_prune(tuned.configs, None, **constants)
        # the filter may return the fallbacks themselves (full-fp32 products at d > 64): each is tried once
        fallbacks = [config for config in tuned.fallbacks if config not in candidates]
        _launch_first_fitting(kernel, grid, args, constants, [*candidates, *fallbacks])


def _launch_first_fitting(kernel, grid, args, constants, configs):
    """Launch ``kernel`` with the first of ``configs`` that fits this GPU's shared memory."""
    too_large = None
    for config in configs:
        try:
            kernel[grid(config.kwargs)](*args, **constants, **config.kwargs, num_warps=config.num_warps,
                                        num_stages=config.num_stages)
            return
        except triton.runtime.errors.OutOfResources as error:
            too_large = error
    # e.g. a GPU with less shared memory than the static fits of tests/hopper_fit.py assume
    raise RuntimeError(
        f"the Triton kernel {getattr(kernel, '__name__', kernel)} has no config that fits this GPU's shared memory "
        f"({len(configs)} tried; last: {too_large}). The fp32 state tiles of fp16/fp32 inputs at head dims above 64 "
        "are the usual cause: pass bf16 inputs, or backend='reference'"
    ) from too_large


def _pair_constants(Q, plan, layout):
    gram = "ieee" if Q.dtype == torch.float32 else "tf32"
    return dict(DP=layout.DP, EP=plan.EP, OP=plan.operand, PRECISION=plan.precision, GRAM_PRECISION=gram)


# RETENTION_TRITON_STATE=sequential: the deg-2 state passes walk the chunks inside each program (pairs.py);
# parallel (default; 1.5x per pass at t=65536, b=1 on an H200, equal at 4k-16k): every chunk's contribution at
# once, then a light scan (pair_scan.py). Measured in benchmarks/results/gpu_pair_scan.json.
STATE_PASS = os.environ.get("RETENTION_TRITON_STATE", "parallel")
if STATE_PASS not in ("parallel", "sequential"):
    raise ValueError(f"RETENTION_TRITON_STATE must be 'parallel' or 'sequential', got {STATE_PASS!r}")


def _pair_state_pass(*args, **kwargs):
    """The deg-2 state pass that ``STATE_PASS`` names (same arguments and outputs)."""
    if STATE_PASS == "parallel":
        from .pair_scan import pair_state_pass_parallel  # here: pair_scan imports this module

        return pair_state_pass_parallel(*args, **kwargs)
    return _pair_state_pass_sequential(*args, **kwargs)


def _pair_state_pass_sequential(X, V, delta, G, log_G, layout, plan, init, init_M, states, Ms, final, final_M, h,
                                scale, backward):
    b, t, hx = X.shape[:3]
    e = V.shape[3]
    has_gate = log_G is not None
    has_init = init is not None
    args = (
        X, V, delta if backward else final_M, G if has_gate else final_M, layout.pairs,
        init if has_init else final, states, final, init_M if has_init else final_M, Ms, final_M,
        *X.stride(), *V.stride(), t, hx, h, X.shape[3], e, plan.n, plan.C, plan.T_pad, layout.NP, scale * scale,
    )
    constants = dict(BACKWARD=backward, HAS_GATE=has_gate, HAS_INIT=has_init, **_pair_constants(X, plan, layout))
    def grid(meta):
        return (layout.NP * (16 // meta["BU"]) + 1, b * h)
    _launch(_TUNED_STATE, pair_state_kernel, grid, args, constants, ("BT", "BU", "PHI_T"))


def _pair_forward(Q, K, V, log_G, state, M0, scale: float, chunk_size: int, need_final_state: bool = True):
    b, t, hq, d = Q.shape
    h, e = K.shape[2], V.shape[3]
    plan = _plan(Q, K, V, 2, chunk_size)
    device = Q.device
    layout = _pair_layout(d, device)
    G = _local_gates(log_G, plan, b, h, device)
    state_dtype = torch.bfloat16 if Q.dtype == torch.bfloat16 else torch.float32
    states = _new(b * h, plan.n, layout.DI, e, device=device, dtype=state_dtype)
    Ms = _new(b * h, plan.n, layout.DP, layout.DP, device=device)
    final = _new(b, h, layout.DI, e, device=device)
    final_M = _new(b, h, layout.DP, layout.DP, device=device)
    init = None if state is None else state.float().contiguous()
    init_M = None if M0 is None else M0.float().contiguous()
    if _single_chunk_without_state(plan, state is not None, need_final_state):
        states.zero_()  # the state entering the only chunk; the final state is not written
        Ms.zero_()
    else:
        _pair_state_pass(K, V, None, G, log_G, layout, plan, init, init_M, states, Ms, final, final_M, h, scale,
                         backward=False)

    Y = _new(b, t, hq, e, device=device, dtype=Q.dtype)
    den = _new(b, t, hq, device=device)
    args = (
        Q, K, V, G if log_G is not None else den, layout.pairs, states, Ms, Y, den,
        *Q.stride(), *K.stride(), *V.stride(), t, hq, h, d, e, plan.n, plan.C, plan.T_pad, layout.NP, scale,
    )
    constants = dict(HAS_GATE=log_G is not None, HAS_STATE=state is not None, **_pair_constants(Q, plan, layout))
    def grid(meta):
        return (plan.n * triton.cdiv(plan.C, meta["BQ"]), b * hq)
    _launch(_TUNED_OUTPUT, pair_output_kernel, grid, args, constants, ("BQ", "BK", "BU"))
    return Y, den, final, final_M, states, Ms, G


def _pair_backward(dY, d_final, d_final_M, Q, K, V, log_G, G, Y, den, states, Ms,
                   has_state: bool, scale: float, chunk_size: int):
    """``d_final``, ``d_final_M``: the final state's cotangent in the internal layout (None without one)."""
    b, t, hq, d = Q.shape
    h, e = K.shape[2], V.shape[3]
    plan = _plan(Q, K, V, 2, chunk_size)
    device = Q.device
    layout = _pair_layout(d, device)
    has_gate = log_G is not None
    dn, delta = _output_cotangent(dY, Y, den, plan.operand)

    has_final_grad = d_final is not None
    d_states = _new(*states.shape, device=device, dtype=states.dtype)
    d_Ms = _new(*Ms.shape, device=device)
    d_init = _new(b, h, layout.DI, e, device=device)
    d_init_M = _new(b, h, layout.DP, layout.DP, device=device)
    if _single_chunk_without_state(plan, has_state):
        # the gradient of the state leaving the only chunk is the final state's cotangent; the initial state's
        # gradient is not written
        if has_final_grad:
            d_states.copy_(d_final.reshape(d_states.shape))
            d_Ms.copy_(d_final_M.reshape(d_Ms.shape))
        else:
            d_states.zero_()
            d_Ms.zero_()
    else:
        _pair_state_pass(Q, dn, delta, G, log_G, layout, plan, d_final if has_final_grad else None, d_final_M,
                         d_states, d_Ms, d_init, d_init_M, h, scale, backward=True)

    G_arg = G if has_gate else den
    common = (*Q.stride(), *K.stride(), *V.stride(), t, hq, h, d, e, plan.n, plan.C, plan.T_pad, layout.NP, scale)
    dQ = _new(b, t, hq, d, device=device, dtype=Q.dtype)
    # the gate gradient's pieces (see _gate_gradient); without gates the kernels skip them
    query_terms = _new(b, t, hq, device=device) if has_gate else den
    key_terms = _new(b, t, h, device=device) if has_gate else den
    key_block = _key_value_block(plan, layout)
    key_blocks = triton.cdiv(plan.C, key_block)
    spans = _new(b * h, plan.n, key_blocks, plan.C, device=device) if has_gate else den
    constants = dict(HAS_GATE=has_gate, HAS_STATE=has_state, **_pair_constants(Q, plan, layout))
    def query_grid(meta):
        return (plan.n * triton.cdiv(plan.C, meta["BQ"]), b * hq)
    _launch(_TUNED_QUERY_GRAD, pair_query_grad_kernel, query_grid,
            (Q, K, V, G_arg, layout.pairs, states, Ms, dn, delta, dQ, query_terms, *common), constants,
            ("BQ", "BK", "BU"))
    # the state's share of dK, dV (fp32), then the intra-chunk block's added to it
    dK_state = _new(b, t, h, d, device=device)
    dV_state = _new(b, t, h, e, device=device)
    constants = dict(HAS_GATE=has_gate, **_pair_constants(Q, plan, layout))
    def key_grid(meta):
        return (plan.n * triton.cdiv(plan.C, meta["BK"]), b * h)
    _launch(_TUNED_KEY_STATE_GRAD, pair_key_state_grad_kernel, key_grid,
            (K, V, G_arg, layout.pairs, d_states, d_Ms, dK_state, dV_state, key_terms, *K.stride(), *V.stride(),
             t, h, d, e, plan.n, plan.C, plan.T_pad, layout.NP),
            {**constants, "PRECISION": _key_state_precision(plan, layout)}, ("BK", "BU"))
    dK = _new(b, t, h, d, device=device, dtype=K.dtype)
    dV = _new(b, t, h, e, device=device, dtype=V.dtype)
    constants.pop("GRAM_PRECISION")  # the intra-chunk block has no key-sum products
    _launch(_TUNED_KEY_VALUE_GRAD.get(key_block), pair_key_value_grad_kernel, key_grid,  # None: interpreted
            (Q, K, V, G_arg, dK_state, dV_state, dn, delta, dK, dV, spans, *Q.stride(), *K.stride(), *V.stride(),
             t, hq, h, d, e, plan.n, plan.C, plan.T_pad, scale), constants, ("BQ", "BK"))

    d_log_G = None
    if has_gate:
        # slot c of the states: S'_c entering chunk c; of their gradients: dS'_{c+1} leaving it (the inner
        # products are the same in the internal layout: an isometry for S, the true gradient of M for dM)
        state_inner = _chunk_inner_products(states, d_states) + _chunk_inner_products(Ms, d_Ms)
        d_log_G = _gate_gradient(G, state_inner, query_terms, key_terms, spans, key_block, plan)
    return dQ, dK, dV, d_log_G, d_init, d_init_M


# ---------------------------------------------------------------------------------------------------------------
# torch.library custom ops


@torch.library.custom_op("retention_kernels::power_retention_fwd", mutates_args=())
def _forward_op(
    Q: torch.Tensor, K: torch.Tensor, V: torch.Tensor, log_G: torch.Tensor | None,
    state: torch.Tensor | None, sum_of_keys: torch.Tensor | None, deg: int, scale: float, chunk_size: int,
    need_final_state: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return _forward(Q, K, V, log_G, state, sum_of_keys, deg, scale, chunk_size, need_final_state)


@_forward_op.register_fake
def _(Q, K, V, log_G, state, sum_of_keys, deg, scale, chunk_size, need_final_state):
    b, t, hq, d = Q.shape
    h, e = K.shape[2], V.shape[3]
    plan = _plan(Q, K, V, deg, chunk_size)
    D = plan.D
    new = Q.new_empty
    G = new(b, h, plan.T_pad, dtype=torch.float32) if log_G is not None else new(0, dtype=torch.float32)
    return (
        new(b, t, hq, e), new(b, t, hq, dtype=torch.float32),
        new(b, h, D, e, dtype=torch.float32), new(b, h, D, dtype=torch.float32),
        new(b, h, plan.n + 1, D, e, dtype=torch.float32), new(b, h, plan.n + 1, D, dtype=torch.float32), G,
    )


@torch.library.custom_op("retention_kernels::power_retention_bwd", mutates_args=())
def _backward_op(
    dY: torch.Tensor, d_final_state: torch.Tensor | None, d_final_keys: torch.Tensor | None,
    Q: torch.Tensor, K: torch.Tensor, V: torch.Tensor, log_G: torch.Tensor | None, G: torch.Tensor,
    Y: torch.Tensor, den: torch.Tensor, states: torch.Tensor, key_states: torch.Tensor,
    final_state: torch.Tensor, final_keys: torch.Tensor, has_state: bool, deg: int, scale: float, chunk_size: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    dQ, dK, dV, d_log_G, d_state0, d_keys0 = _backward(
        dY, d_final_state, d_final_keys, Q, K, V, log_G, G, Y, den, states, key_states, has_state, deg, scale,
        chunk_size,
    )
    if d_log_G is None:
        d_log_G = Q.new_empty(0, dtype=torch.float32)
    return dQ, dK, dV, d_log_G, d_state0, d_keys0


@_backward_op.register_fake
def _(dY, d_final_state, d_final_keys, Q, K, V, log_G, G, Y, den, states, key_states, final_state, final_keys,
      has_state, deg, scale, chunk_size):
    b, t, hq, d = Q.shape
    h, e = K.shape[2], V.shape[3]
    D = final_state.shape[2]
    new = Q.new_empty
    d_log_G = new(b, t, h, dtype=torch.float32) if log_G is not None else new(0, dtype=torch.float32)
    return (
        new(b, t, hq, d), K.new_empty(b, t, h, d), V.new_empty(b, t, h, e), d_log_G,
        new(b, h, D, e, dtype=torch.float32), new(b, h, D, dtype=torch.float32),
    )


def _save_for_backward(ctx, inputs, output, meta):
    """Both ops' ``setup_context``: inputs ``(Q, K, V, log_G, state, sum_of_keys, ...)``, outputs ``(Y, den,
    final_state, final_keys, states, key_states, G)``; ``meta`` the non-tensor arguments the backward needs."""
    Q, K, V, log_G, state, sum_of_keys = inputs[:6]
    Y, den, final_state, final_keys, states, key_states, G = output
    ctx.save_for_backward(Q, K, V, log_G, G, Y, den, states, key_states, final_state, final_keys)
    # Intermediates (den, states, G) carry no gradient: do not let autograd allocate zeros for them.
    ctx.mark_non_differentiable(den, states, key_states, G)
    ctx.set_materialize_grads(False)
    ctx.meta = (state is not None, *meta)
    ctx.dtypes = (
        None if state is None else state.dtype, None if sum_of_keys is None else sum_of_keys.dtype,
        None if log_G is None else log_G.dtype,
    )


def _input_grads(ctx, backward_op, dY, d_final_state, d_final_keys, non_tensor_inputs: int):
    """Both ops' autograd backward: ``backward_op`` on the saved tensors, gradients cast to the inputs' dtypes."""
    Q, K, V, log_G, G, Y, den, states, key_states, final_state, final_keys = ctx.saved_tensors
    if dY is None:
        dY = torch.zeros_like(Y)
    dQ, dK, dV, d_log_G, d_state0, d_keys0 = backward_op(
        dY, d_final_state, d_final_keys, Q, K, V, log_G, G, Y, den, states, key_states, final_state, final_keys,
        *ctx.meta,
    )
    state_dtype, keys_dtype, gate_dtype = ctx.dtypes
    return (
        dQ, dK, dV,
        None if log_G is None else d_log_G.to(gate_dtype),
        None if state_dtype is None else d_state0.to(state_dtype),
        None if keys_dtype is None else d_keys0.to(keys_dtype),
        *[None] * non_tensor_inputs,
    )


def _setup_context(ctx, inputs, output):
    _save_for_backward(ctx, inputs, output, inputs[6:9])  # deg, scale, chunk_size


def _backward_autograd(ctx, dY, d_den, d_final_state, d_final_keys, d_states, d_key_states, d_G):
    return _input_grads(ctx, _backward_op, dY, d_final_state, d_final_keys, 4)


torch.library.register_autograd(
    "retention_kernels::power_retention_fwd", _backward_autograd, setup_context=_setup_context
)


def _to_internal(layout, state, keys):
    """Minimal ``state [b, h, Dm, e]``, ``keys [b, h, Dm]`` -> ``(A state, M(keys))`` (fp32, contiguous). The same
    maps carry final-state cotangents inwards (A is an isometry; M() is the transpose of _to_minimal's key map)."""
    b, h = state.shape[:2]
    internal = (state.float()[..., layout.src, :] * layout.coef[:, None]).contiguous()
    M = (keys.float()[..., layout.m_index] * layout.m_coef).reshape(b, h, layout.DP, layout.DP).contiguous()
    return internal, M


def _to_minimal(layout, internal, M):
    """Internal ``[b, h, DI, e]`` state and ``[b, h, DP, DP]`` key matrix -> the minimal layout (``A^T``), fp32."""
    b, h = internal.shape[:2]
    state = (internal[..., layout.src1, :] * layout.coef1[:, None]
             + internal[..., layout.src2, :] * layout.coef2[:, None])
    flat = M.reshape(b, h, layout.DP * layout.DP)
    return state, (flat[..., layout.z_index1] + flat[..., layout.z_index2]) * layout.z_coef


def _minimal_or_undefined(layout, internal, M, wanted: bool):
    """``_to_minimal(layout, internal, M)`` where ``wanted``; else uninitialised tensors of its shapes (nobody
    reads them: a final state not asked for, the gradient of an initial state not given)."""
    if wanted:
        return _to_minimal(layout, internal, M)
    b, h, _, e = internal.shape
    D = layout.coef1.shape[0]
    return _new(b, h, D, e, device=internal.device), _new(b, h, D, device=internal.device)


# The states cross these ops in the minimal layout (converted inside, so the graph sees no table building).
@torch.library.custom_op("retention_kernels::pair_retention_fwd", mutates_args=())
def _pair_forward_op(
    Q: torch.Tensor, K: torch.Tensor, V: torch.Tensor, log_G: torch.Tensor | None,
    state: torch.Tensor | None, sum_of_keys: torch.Tensor | None, scale: float, chunk_size: int,
    need_final_state: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    layout = _pair_layout(Q.shape[3], Q.device)
    init = init_M = None
    if state is not None:
        keys = sum_of_keys if sum_of_keys is not None else state.new_zeros(state.shape[:3], dtype=torch.float32)
        init, init_M = _to_internal(layout, state, keys)
    Y, den, final, final_M, states, Ms, G = _pair_forward(Q, K, V, log_G, init, init_M, scale, chunk_size,
                                                          need_final_state)
    final_state, final_keys = _minimal_or_undefined(layout, final, final_M, need_final_state)
    return Y, den, final_state, final_keys, states, Ms, G


@_pair_forward_op.register_fake
def _(Q, K, V, log_G, state, sum_of_keys, scale, chunk_size, need_final_state):
    b, t, hq, d = Q.shape
    h, e = K.shape[2], V.shape[3]
    plan = _plan(Q, K, V, 2, chunk_size)
    DP = next_power_of_2(d)
    DI = 256 * ((-(-d // 16)) * (-(-d // 16) + 1) // 2)
    D = sympow_dim(d, 2)
    new = Q.new_empty
    G = new(b, h, plan.T_pad, dtype=torch.float32) if log_G is not None else new(0, dtype=torch.float32)
    state_dtype = torch.bfloat16 if Q.dtype == torch.bfloat16 else torch.float32
    return (
        new(b, t, hq, e), new(b, t, hq, dtype=torch.float32),
        new(b, h, D, e, dtype=torch.float32), new(b, h, D, dtype=torch.float32),
        new(b * h, plan.n, DI, e, dtype=state_dtype), new(b * h, plan.n, DP, DP, dtype=torch.float32), G,
    )


@torch.library.custom_op("retention_kernels::pair_retention_bwd", mutates_args=())
def _pair_backward_op(
    dY: torch.Tensor, d_final_state: torch.Tensor | None, d_final_keys: torch.Tensor | None,
    Q: torch.Tensor, K: torch.Tensor, V: torch.Tensor, log_G: torch.Tensor | None, G: torch.Tensor,
    Y: torch.Tensor, den: torch.Tensor, states: torch.Tensor, Ms: torch.Tensor,
    final_state: torch.Tensor, final_keys: torch.Tensor, has_state: bool, scale: float, chunk_size: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    layout = _pair_layout(Q.shape[3], Q.device)
    d_final = d_final_M = None
    if d_final_state is not None or d_final_keys is not None:
        dS = torch.zeros_like(final_state) if d_final_state is None else d_final_state.float()
        dz = torch.zeros_like(final_keys) if d_final_keys is None else d_final_keys.float()
        d_final, d_final_M = _to_internal(layout, dS, dz)
    dQ, dK, dV, d_log_G, d_init, d_init_M = _pair_backward(
        dY, d_final, d_final_M, Q, K, V, log_G, G, Y, den, states, Ms, has_state, scale, chunk_size,
    )
    d_state0, d_keys0 = _minimal_or_undefined(layout, d_init, d_init_M, has_state)
    if d_log_G is None:
        d_log_G = Q.new_empty(0, dtype=torch.float32)
    return dQ, dK, dV, d_log_G, d_state0, d_keys0


@_pair_backward_op.register_fake
def _(dY, d_final_state, d_final_keys, Q, K, V, log_G, G, Y, den, states, Ms, final_state, final_keys,
      has_state, scale, chunk_size):
    b, t, hq, d = Q.shape
    h, e = K.shape[2], V.shape[3]
    new = Q.new_empty
    d_log_G = new(b, t, h, dtype=torch.float32) if log_G is not None else new(0, dtype=torch.float32)
    return (
        new(b, t, hq, d), K.new_empty(b, t, h, d), V.new_empty(b, t, h, e), d_log_G,
        torch.empty_like(final_state), torch.empty_like(final_keys),
    )


def _pair_setup_context(ctx, inputs, output):
    _save_for_backward(ctx, inputs, output, inputs[6:8])  # scale, chunk_size (the key states: the Ms)


def _pair_backward_autograd(ctx, dY, d_den, d_final_state, d_final_keys, d_states, d_Ms, d_G):
    return _input_grads(ctx, _pair_backward_op, dY, d_final_state, d_final_keys, 3)


torch.library.register_autograd(
    "retention_kernels::pair_retention_fwd", _pair_backward_autograd, setup_context=_pair_setup_context
)


def power_retention_triton(Q, K, V, log_G=None, state=None, sum_of_keys=None, deg=2, scale=None,
                           chunk_size=None, need_final_state=True):
    """``(Y [b, t, hq, e], state [b, h, D, e] fp32, sum_of_keys [b, h, D] fp32)``, differentiable.

    Same contract as :func:`retention.power_retention` with ``return_final_state=True`` (arguments already
    validated); ``chunk_size=None`` picks :func:`default_chunk_size`. ``need_final_state=False``: the returned
    state and key sums are undefined (a call of one chunk and no initial state then skips the state passes).
    """
    b, t, hq, d = Q.shape
    scale = d**-0.5 if scale is None else float(scale)
    if chunk_size is None:
        chunk_size = default_chunk_size(t, d, deg)
    chunk_size = min(int(chunk_size), t)
    if not math.isfinite(scale):
        raise ValueError(f"scale must be finite, got {scale!r}")
    if deg == 2 and PAIR_LAYOUT:
        Y, _den, final_state, final_keys, _states, _Ms, _G = _pair_forward_op(
            Q, K, V, log_G, state, sum_of_keys, scale, chunk_size, need_final_state
        )
        return Y, final_state, final_keys
    Y, _den, final_state, final_keys, _states, _key_states, _G = _forward_op(
        Q, K, V, log_G, state, sum_of_keys, deg, scale, chunk_size, need_final_state
    )
    return Y, final_state, final_keys
