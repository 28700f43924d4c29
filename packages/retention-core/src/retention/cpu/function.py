"""The autograd Function of the numba backend: both passes run the kernels of :mod:`retention.cpu.kernels`.

The public layout (``Q [b, t, hq, d]``, ``K, V [b, t, h, *]``, ``log_G [b, t, h]``, state ``[b, h, D, e]``
plus ``sum_of_keys [b, h, D]``) is copied once into the kernels' layout (``[b * h, T, ...]``, time padded to a
multiple of the chunk, the sum of keys appended to the state as column ``e``) in the compute dtype: fp32 for
fp16/bf16/fp32 inputs, fp64 for fp64.
"""

from __future__ import annotations

import contextlib
import functools
import warnings

import numpy as np
import torch
from torch.autograd.function import once_differentiable

from ..sympow import sympow_table
from . import kernels

__all__ = ["PowerRetentionCPU", "kernel_layout", "one_blas_thread"]


def kernel_layout(Q, K, V, log_G, state, sum_of_keys, chunk: int, dtype: torch.dtype):
    """``q [BH, T, r, d]``, ``k [BH, T, d]``, ``v1 [BH, T, e + 1]`` (``[v, 1]``, zero on padded steps),
    ``log_g [BH, T]`` and ``state [BH, D, e + 1]`` (``[S, z]``, zero without an initial state), contiguous."""
    b, t, hq, d = Q.shape
    h, e = K.shape[2], V.shape[-1]
    r = hq // h
    padded = -(-t // chunk) * chunk

    def head_major(x, *shape):  # [b, t, h, ...] -> [b, h, padded, ...], the padded steps zero
        out = Q.new_empty(b, h, padded, *shape, dtype=dtype)
        out[:, :, t:] = 0
        if x is not None:
            out[:, :, :t] = x.detach().transpose(1, 2)
        return out

    q = head_major(Q.reshape(b, t, h, r, d), r, d)
    k = head_major(K, d)
    v1 = head_major(None, e + 1)
    v1[:, :, :t, :e] = V.detach().transpose(1, 2)
    v1[:, :, :t, e] = 1
    log_g = head_major(log_G) if log_G is not None else Q.new_zeros(b, h, padded, dtype=dtype)
    if state is None:
        state1 = None
    else:
        state1 = Q.new_empty(b, h, state.shape[2], e + 1, dtype=dtype)
        state1[..., :e] = state.detach()
        state1[..., e] = sum_of_keys.detach()
    flat = lambda x: None if x is None else x.reshape(b * h, *x.shape[2:])
    return flat(q), flat(k), flat(v1), flat(log_g), flat(state1)


@functools.cache
def _blas_controller():
    import scipy.linalg.cython_blas  # noqa: F401  (loads the BLAS that numba's np.dot calls)

    try:
        from threadpoolctl import ThreadpoolController
    except ImportError:
        warnings.warn("threadpoolctl is not installed: BLAS may start threads inside each numba worker, which "
                      "makes the cpu backend many times slower (pip install threadpoolctl)", RuntimeWarning,
                      stacklevel=4)
        return None
    return ThreadpoolController()


def one_blas_thread():
    """A context in which BLAS runs single-threaded: the kernels already run one (b, h) pair per core, and BLAS
    threads started inside numba's OpenMP workers oversubscribe the cores (measured ~50x slower fwd+bwd)."""
    controller = _blas_controller()
    return contextlib.nullcontext() if controller is None else controller.limit(limits=1, user_api="blas")


def _table(d: int, deg: int, dtype: torch.dtype) -> tuple[np.ndarray, np.ndarray]:
    index, weight = sympow_table(d, deg)
    return index, weight.astype(np.float64 if dtype == torch.float64 else np.float32)


class PowerRetentionCPU(torch.autograd.Function):
    """``(Y [b, t, hq, e], state [b, h, D, e], sum_of_keys [b, h, D])`` in the compute dtype."""

    @staticmethod
    def forward(ctx, Q, K, V, log_G, state, sum_of_keys, deg: int, scale: float, chunk: int):
        b, t, hq, d = Q.shape
        h, e = K.shape[2], V.shape[-1]
        r = hq // h
        dtype = torch.promote_types(Q.dtype, torch.float32)
        index, weight = _table(d, deg, dtype)
        D = index.shape[0]
        q, k, v1, log_g, state1 = kernel_layout(Q, K, V, log_G, state, sum_of_keys, chunk, dtype)
        initial = torch.zeros(b * h, D, e + 1, dtype=dtype) if state1 is None else state1
        final = initial.clone()  # the kernel turns it into the final state in place
        padded = q.shape[1]
        y = torch.full((b * h, padded, r, e), float("nan"), dtype=dtype)
        denominator = torch.full((b * h, padded, r), float("nan"), dtype=dtype)
        scalar = weight.dtype.type(scale)
        with one_blas_thread():
            kernels.forward_scan(q.numpy(), k.numpy(), v1.numpy(), log_g.numpy(), final.numpy(), index, weight,
                                 deg, scalar, chunk, y.numpy(), denominator.numpy())

        ctx.saved = (q, k, v1, log_g, initial, y, denominator)
        ctx.config = (b, t, hq, h, d, e, deg, scale, chunk)
        ctx.dtypes = tuple(None if x is None else x.dtype for x in (Q, K, V, log_G, state, sum_of_keys))
        Y = y.reshape(b, h, padded, r, e)[:, :, :t].permute(0, 2, 1, 3, 4).reshape(b, t, hq, e)
        final = final.reshape(b, h, D, e + 1)
        return Y, final[..., :e].contiguous(), final[..., e].contiguous()

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_Y, grad_state, grad_keys):
        q, k, v1, log_g, initial, y, denominator = ctx.saved
        b, t, hq, h, d, e, deg, scale, chunk = ctx.config
        r, padded = hq // h, q.shape[1]
        dtype = q.dtype
        index, weight = _table(d, deg, dtype)
        D = index.shape[0]

        dy = torch.zeros(b, h, padded, r, e, dtype=dtype)
        dy[:, :, :t] = grad_Y.reshape(b, t, h, r, e).transpose(1, 2)
        grad_state1 = torch.empty(b, h, D, e + 1, dtype=dtype)
        grad_state1[..., :e] = grad_state
        grad_state1[..., e] = grad_keys
        grad_state1 = grad_state1.reshape(b * h, D, e + 1)
        poison = lambda *shape: torch.full(shape, float("nan"), dtype=dtype)
        dq, dk, dv1, dlog_g = poison(*q.shape), poison(*k.shape), poison(*v1.shape), poison(*log_g.shape)
        with one_blas_thread():
            kernels.backward_scan(q.numpy(), k.numpy(), v1.numpy(), log_g.numpy(), initial.numpy(), index, weight,
                                  deg, weight.dtype.type(scale), chunk, y.numpy(), denominator.numpy(),
                                  dy.reshape(b * h, padded, r, e).numpy(), grad_state1.numpy(), dq.numpy(),
                                  dk.numpy(), dv1.numpy(), dlog_g.numpy())

        Q_dtype, K_dtype, V_dtype, G_dtype, S_dtype, z_dtype = ctx.dtypes
        needs = ctx.needs_input_grad
        time_major = lambda x: x.reshape(b, h, padded, *x.shape[2:])[:, :, :t].transpose(1, 2)
        grad_Q = time_major(dq).reshape(b, t, hq, d).to(Q_dtype) if needs[0] else None
        grad_K = time_major(dk).to(K_dtype).contiguous() if needs[1] else None
        grad_V = time_major(dv1[..., :e]).to(V_dtype).contiguous() if needs[2] else None
        grad_G = time_major(dlog_g).to(G_dtype).contiguous() if needs[3] else None
        grad_state1 = grad_state1.reshape(b, h, D, e + 1)
        grad_S = grad_state1[..., :e].to(S_dtype).contiguous() if needs[4] else None
        grad_z = grad_state1[..., e].to(z_dtype).contiguous() if needs[5] else None
        return grad_Q, grad_K, grad_V, grad_G, grad_S, grad_z, None, None, None
