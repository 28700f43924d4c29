"""Host side of the Triton backend: launch plans, the ``torch.library`` custom ops (forward and backward, so
``torch.compile(fullgraph=True)`` sees no graph break) and the autograd wiring.

Forward (``n = ceil(t / C)`` chunks, time padded only inside the kernels by masks):
  1. ``state_scan_kernel``: the state entering every chunk, ``STATES [b, h, n, D, e]`` (bf16 for bf16 inputs,
     else fp32) and ``ZS [b, h, n, D]`` fp32, plus the final state; ``phi(K)`` is expanded tile by tile in SRAM.
  2. ``output_kernel``: intra-chunk block + state query + normalisation -> ``Y``, and the denominators.
Backward:
  3. ``state_grad_scan_kernel``: the reverse scan, ``dS'`` leaving every chunk and the initial-state gradient.
  4. ``query_grad_kernel`` (dQ) and ``key_value_grad_kernel`` (dK, dV, key side of dG).
  5. torch: dG = query side - key side (+ the final-state term), then a reverse cumulative sum -> d log_G.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from retention.sympow import sympow_dim, sympow_table

from ._tiles import next_power_of_2
from .grads import key_value_grad_kernel, query_grad_kernel
from .output import output_kernel
from .state import chunk_update_kernel, scan_kernel

__all__ = ["power_retention_triton", "default_chunk_size"]

_OPERAND = {torch.bfloat16: tl.bfloat16, torch.float16: tl.float32, torch.float32: tl.float32}
# fp16 operands would overflow for (s q.k)^p; tf32 keeps fp16's 10-bit mantissa with fp32's range.
_PRECISION = {torch.bfloat16: "tf32", torch.float16: "tf32", torch.float32: "ieee"}


def default_chunk_size(t: int, d: int, deg: int) -> int:
    """Chunk length when the caller gives none: the state costs ``4 D e`` FLOPs per token and the intra block
    ``2 C d``, so large states want long chunks (and fewer stored states)."""
    if deg == 1:
        return min(t, 128)
    if d < 64:
        # d=32 with C=1024 hit an illegal memory access in output_kernel on an H200 (Triton 3.6, unexplained,
        # clean under the interpreter); C=256 ran and matched the oracle there.
        return min(t, 256)
    return min(t, 1024)  # measured on an H200 (bf16, d=64): 1024 beats 256 and 512 and stores 4x fewer states


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
        C=C, n=n, T_pad=n * C, D=D, BQ=block, BK=block, BD=next_power_of_2(min(D, 64)),
        DP=next_power_of_2(d), EP=next_power_of_2(e),
        operand=_OPERAND[Q.dtype], precision=_PRECISION[Q.dtype],
        num_warps=4,
    )


_TABLES: dict = {}
_SCAN_BLOCK = 1024
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


def _state_pass(X, V, G, log_G, buffer, key_buffer, plan, index, weight, h, deg, scale, backward):
    """Fill ``buffer [b, h, n + 1, D, e]`` (and ``key_buffer``) with every chunk's contribution, then scan."""
    b, t, hx = X.shape[:3]
    e = buffer.shape[-1]
    has_gate = log_G is not None
    G_arg = G if has_gate else key_buffer
    chunk_update_kernel[(plan.n * triton.cdiv(plan.D, plan.BD), b * h)](
        X, V, G_arg, index, weight, buffer, key_buffer,
        *X.stride(), *V.stride(),
        t, hx, h, plan.D, X.shape[3], e, plan.n, plan.C, plan.T_pad, scale,
        BACKWARD=backward, HAS_GATE=has_gate, DEG=deg, BT=plan.BK, BD=plan.BD, DP=plan.DP, EP=plan.EP,
        OP=plan.operand, PRECISION=plan.precision, num_warps=plan.num_warps,
    )
    for target, length in ((buffer, plan.D * e), (key_buffer, plan.D)):
        scan_kernel[(triton.cdiv(length, _SCAN_BLOCK), b * h)](
            target, G_arg, length, plan.n, plan.C, plan.T_pad,
            HAS_GATE=has_gate, REVERSE=backward, BLOCK=_SCAN_BLOCK, num_warps=4,
        )


def _forward(Q, K, V, log_G, state, sum_of_keys, deg: int, scale: float, chunk_size: int):
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
              final_state, final_keys, has_state: bool, deg: int, scale: float, chunk_size: int):
    b, t, hq, d = Q.shape
    h, e = K.shape[2], V.shape[3]
    plan = _plan(Q, K, V, deg, chunk_size)
    device = Q.device
    index, weight = _tables(d, deg, device)
    has_gate = log_G is not None
    D = plan.D

    # dN' = [dy / den, -(dy . y) / den]  [b, t, hq, e + 1], 0 where the denominator is exactly 0 (y = 0 there).
    dY32, Y32 = dY.float(), Y.float()
    inverse = torch.where(den == 0, 0.0, 1.0 / torch.where(den == 0, 1.0, den))
    dN = torch.cat([dY32 * inverse[..., None], (-(dY32 * Y32).sum(-1) * inverse)[..., None]], dim=-1)

    # Slot c: dS'_c, the gradient of the state entering chunk c (slot n: of the final state; slot 0: initial).
    d_states = _new(b, h, plan.n + 1, D, e, device=device)
    d_key_states = _new(b, h, plan.n + 1, D, device=device)
    has_final_grad = d_final_state is not None or d_final_keys is not None
    d_states[:, :, plan.n] = 0.0 if d_final_state is None else d_final_state
    d_key_states[:, :, plan.n] = 0.0 if d_final_keys is None else d_final_keys
    _state_pass(Q, dN, G, log_G, d_states, d_key_states, plan, index, weight, h, deg, scale, backward=True)

    G_arg = G if has_gate else den
    dQ = _new(b, t, hq, d, device=device, dtype=Q.dtype)
    query_grad_kernel[(plan.n * triton.cdiv(plan.C, plan.BQ), b * hq)](
        Q, K, V, G_arg, index, weight, states, key_states, dN, dQ,
        *Q.stride(), *K.stride(), *V.stride(),
        t, hq, h, D, d, e, plan.n, plan.C, plan.T_pad, scale,
        HAS_GATE=has_gate, HAS_STATE=has_state, DEG=deg, BQ=plan.BQ, BK=plan.BK, BD=plan.BD,
        DP=plan.DP, EP=plan.EP, OP=plan.operand, PRECISION=plan.precision, num_warps=plan.num_warps,
    )
    dK = _new(b, t, h, d, device=device, dtype=K.dtype)
    dV = _new(b, t, h, e, device=device, dtype=V.dtype)
    dG_keys = _new(b, t, h, device=device)
    key_value_grad_kernel[(plan.n * triton.cdiv(plan.C, plan.BK), b * h)](
        Q, K, V, G_arg, index, weight, d_states, d_key_states, dN, dK, dV, dG_keys,
        *Q.stride(), *K.stride(), *V.stride(),
        t, hq, h, D, d, e, plan.n, plan.C, plan.T_pad, scale,
        HAS_GATE=has_gate, DEG=deg, BQ=plan.BQ, BK=plan.BK, BD=plan.BD,
        DP=plan.DP, EP=plan.EP, OP=plan.operand, PRECISION=plan.precision, num_warps=plan.num_warps,
    )

    d_log_G = None
    if has_gate:
        # Query side dN'_i . N'_i with N'_i = [y_i den_i, den_i]: (dy.y) - (dy.y), zero up to rounding.
        dG_queries = den * ((dN[..., :e] * Y32).sum(-1) + dN[..., e])
        dG = dG_queries.reshape(b, t, h, hq // h).sum(-1) - dG_keys
        if has_final_grad:
            dG[:, -1] += (d_states[:, :, plan.n] * final_state).sum((-2, -1))
            dG[:, -1] += (d_key_states[:, :, plan.n] * final_keys).sum(-1)
        # Reverse cumulative sum over time, along the contiguous last axis (a scan over a strided axis is slow).
        d_log_G = dG.transpose(1, 2).flip(-1).cumsum(-1).flip(-1).transpose(1, 2).contiguous()
    return dQ, dK, dV, d_log_G, d_states[:, :, 0].clone(), d_key_states[:, :, 0].clone()


# ---------------------------------------------------------------------------------------------------------------
# torch.library custom ops


@torch.library.custom_op("retention_kernels::power_retention_fwd", mutates_args=())
def _forward_op(
    Q: torch.Tensor, K: torch.Tensor, V: torch.Tensor, log_G: torch.Tensor | None,
    state: torch.Tensor | None, sum_of_keys: torch.Tensor | None, deg: int, scale: float, chunk_size: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return _forward(Q, K, V, log_G, state, sum_of_keys, deg, scale, chunk_size)


@_forward_op.register_fake
def _(Q, K, V, log_G, state, sum_of_keys, deg, scale, chunk_size):
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
        dY, d_final_state, d_final_keys, Q, K, V, log_G, G, Y, den, states, key_states,
        final_state, final_keys, has_state, deg, scale, chunk_size,
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


def _setup_context(ctx, inputs, output):
    Q, K, V, log_G, state, sum_of_keys, deg, scale, chunk_size = inputs
    Y, den, final_state, final_keys, states, key_states, G = output
    ctx.save_for_backward(Q, K, V, log_G, G, Y, den, states, key_states, final_state, final_keys)
    # Intermediates (den, states, G) carry no gradient: do not let autograd allocate zeros for them.
    ctx.mark_non_differentiable(den, states, key_states, G)
    ctx.set_materialize_grads(False)
    ctx.meta = (state is not None, deg, scale, chunk_size)
    ctx.state_dtypes = (
        None if state is None else state.dtype, None if sum_of_keys is None else sum_of_keys.dtype,
        None if log_G is None else log_G.dtype,
    )


def _backward_autograd(ctx, dY, d_den, d_final_state, d_final_keys, d_states, d_key_states, d_G):
    Q, K, V, log_G, G, Y, den, states, key_states, final_state, final_keys = ctx.saved_tensors
    has_state, deg, scale, chunk_size = ctx.meta
    if dY is None:
        dY = torch.zeros_like(Y)
    dQ, dK, dV, d_log_G, d_state0, d_keys0 = _backward_op(
        dY, d_final_state, d_final_keys, Q, K, V, log_G, G, Y, den, states, key_states,
        final_state, final_keys, has_state, deg, scale, chunk_size,
    )
    state_dtype, keys_dtype, gate_dtype = ctx.state_dtypes
    return (
        dQ, dK, dV,
        None if log_G is None else d_log_G.to(gate_dtype),
        None if state_dtype is None else d_state0.to(state_dtype),
        None if keys_dtype is None else d_keys0.to(keys_dtype),
        None, None, None,
    )


torch.library.register_autograd(
    "retention_kernels::power_retention_fwd", _backward_autograd, setup_context=_setup_context
)


def power_retention_triton(Q, K, V, log_G=None, state=None, sum_of_keys=None, deg=2, scale=None,
                           chunk_size=None):
    """``(Y [b, t, hq, e], state [b, h, D, e] fp32, sum_of_keys [b, h, D] fp32)``, differentiable.

    Same contract as :func:`retention.power_retention` with ``return_final_state=True`` (arguments already
    validated); ``chunk_size=None`` picks :func:`default_chunk_size`.
    """
    b, t, hq, d = Q.shape
    scale = d**-0.5 if scale is None else float(scale)
    if chunk_size is None:
        chunk_size = default_chunk_size(t, d, deg)
    chunk_size = min(int(chunk_size), t)
    if not math.isfinite(scale):
        raise ValueError(f"scale must be finite, got {scale!r}")
    Y, _den, final_state, final_keys, _states, _key_states, _G = _forward_op(
        Q, K, V, log_G, state, sum_of_keys, deg, scale, chunk_size
    )
    return Y, final_state, final_keys
