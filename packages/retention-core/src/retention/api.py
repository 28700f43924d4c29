"""The public training entry point (drop-in for the ``retention`` 1.x signature)."""

from __future__ import annotations

import torch

from ._validate import validate
from .backends import dtype_of_state, select_backend

__all__ = ["power_retention"]


def power_retention(
    Q: torch.Tensor,
    K: torch.Tensor,
    V: torch.Tensor,
    log_G: torch.Tensor | None = None,
    initial_state=None,
    return_final_state: bool = False,
    deg: int = 2,
    scale: float | None = None,
    chunk_size: int | None = None,
    switch_over_seq_len: int | None = None,
    *,
    sum_of_keys: torch.Tensor | None = None,
    backend: str = "auto",
):
    r"""Causal power retention.

    With ``G_i = log_G_1 + ... + log_G_i`` and ``p = deg``, ``s = scale`` (default ``1/sqrt(d)``)::

        w_ij = (s <q_i, k_j>)^p exp(G_i - G_j)   (j <= i),    y_i = sum_j w_ij v_j / sum_j w_ij

    Args:
        Q: ``[b, t, hq, d]`` queries, fp16/bf16/fp32 (fp64 for checks).
        K: ``[b, t, h, d]`` keys, same dtype; ``hq`` is a multiple of ``h`` (query head ``i`` reads ``i // (hq/h)``).
        V: ``[b, t, h, e]`` values, same dtype.
        log_G: ``[b, t, h]`` log gates (``<= 0``: a gate in (0, 1]), fp32; other float dtypes are cast.
        initial_state: ``(state [b, h, D, e], sum_of_keys [b, h, D])`` of an earlier segment, or the state
            tensor with ``sum_of_keys=``; the output equals running on the concatenation.
        return_final_state: also return the state after the last step.
        deg: the power ``p`` (even ``p`` gives non-negative weights; odd ``p`` is supported, but its
            denominators can vanish).
        scale: ``s``, applied to the dot product before the power.
        chunk_size: chunk length of the linear-cost algorithm; ``None`` lets the backend choose. Every
            choice gives the same result up to rounding; ``chunk_size >= t`` is plain quadratic attention.
        switch_over_seq_len: sequences shorter than this run as one chunk (quadratic).
        sum_of_keys: the sum of keys when ``initial_state`` is a tensor.
        backend: ``"auto"``, ``"cuda"``, ``"triton"``, ``"cpu"`` or ``"reference"``.

    Returns:
        ``Y [b, t, hq, e]`` in Q's dtype; with ``return_final_state``, ``(Y, state [b, h, D, e], sum_of_keys
        [b, h, D])``, the state in Q's dtype and the sum of keys in fp32. ``D = sympow_dim(d, deg)``.
    """
    problem = validate(
        Q, K, V, log_G, initial_state, sum_of_keys, deg, scale, chunk_size, return_final_state, switch_over_seq_len
    )
    Y, state, keys = select_backend(problem, backend).forward(problem)
    Y = Y.to(Q.dtype)
    if not return_final_state:
        return Y
    state_dtype, keys_dtype = dtype_of_state(problem)
    return Y, state.to(state_dtype), keys.to(keys_dtype)
