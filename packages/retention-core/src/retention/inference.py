"""Inference: attend to ``state + window``, fold the window into the state when it is full, and a cache
object that a generation loop holds (one per layer).

A query at window position ``m`` (``G`` the cumulative log gate of the window, ``S_0, z_0`` the state before
the window) reads

    y = (s^p e^{G_m} phi(q)^T S_0 + sum_{j <= m} (s <q, k_j>)^p e^{G_m - G_j} v_j) / (same with z_0 and 1)

and the fold is ``S <- e^{G_w} S_0 + sum_j e^{G_w - G_j} phi(k_j) v_j^T`` (and ``z`` alike).
"""

from __future__ import annotations

import os

import torch

from ._validate import (
    Problem,
    check_deg,
    check_log_G,
    check_positive_int,
    check_qkv,
    check_same,
    check_scale,
    check_state,
    check_tensor,
    describe,
    split_initial_state,
)
from .api import power_retention
from .backends import select_backend
from .reference import expand_heads, normalise, update_state
from .sympow import sympow, sympow_dim

__all__ = ["power_retention_inference", "PowerRetentionCache"]


def power_retention_inference(
    Q: torch.Tensor,
    K: torch.Tensor | None = None,
    V: torch.Tensor | None = None,
    log_G: torch.Tensor | None = None,
    initial_state=None,
    sum_of_keys: torch.Tensor | None = None,
    deg: int = 2,
    scale: float | None = None,
    switch_over_seq_len: int | None = 512,
    *,
    backend: str = "auto",
):
    """Attend ``Q`` to a state and the uncompressed window since it, folding the window when full.

    Args:
        Q: ``[b, tq, hq, d]``, aligned to the end of the window (``tq <= w`` when a window is given).
        K, V: ``[b, w, h, d]``, ``[b, w, h, e]``: the window since the last fold, or None with a state.
        log_G: ``[b, w, h]`` log gates of the window.
        initial_state, sum_of_keys: the state before the window (``[b, h, D, e]``, ``[b, h, D]``), or None.
        switch_over_seq_len: when ``w >= switch_over_seq_len`` the window is folded into the returned state
            and the caller drops it. ``None`` never folds.

    Returns:
        ``(Y [b, tq, hq, e], state, sum_of_keys)``: the folded state, or the given one (None stays None).
    """
    check_tensor("Q", Q, 4, "[b, tq, hq, d]")
    state, keys = split_initial_state(initial_state, sum_of_keys)
    if K is None or V is None:
        if K is not None or V is not None or log_G is not None:
            raise ValueError("K and V must be given together (log_G only with them), or all be None")
        if state is None:
            raise ValueError("with no window (K=None, V=None) an initial_state must be given")
        e = state.shape[-1] if state.dim() == 4 else 0
        K = Q.new_empty(Q.shape[0], 0, (state.shape[1] if state.dim() == 4 else 1), Q.shape[3])
        V = Q.new_empty(Q.shape[0], 0, K.shape[2], e)
    b, hq, h, d, e = check_qkv(Q, K, V, allow_empty_window=True)
    tq, w = Q.shape[1], K.shape[1]
    if w and tq > w:
        raise ValueError(f"Q (tq={tq}) must not be longer than the window K (w={w}): queries align to its end")
    deg = check_deg(deg)
    scale = check_scale(scale, d)
    switch_over_seq_len = check_positive_int("switch_over_seq_len", switch_over_seq_len, allow_none=True)
    log_G = check_log_G(log_G, b, w, h, Q)
    state, keys = check_state(state, keys, b, h, d, e, deg, Q)
    fold = switch_over_seq_len is not None and w >= switch_over_seq_len
    if w > 0 and tq == w:
        # Prefill: the training path (linear cost) computes the same outputs and the folded state.
        Y, new_state, new_keys = power_retention(
            Q, K, V, log_G, None if state is None else (state, keys), return_final_state=True, deg=deg,
            scale=scale, backend=backend,
        )
        return (Y, new_state, new_keys) if fold else (Y, state, keys)

    compute = torch.promote_types(Q.dtype, torch.float32)
    G = (torch.zeros(b, w, h, device=Q.device, dtype=compute) if log_G is None else log_G.to(compute)).cumsum(1)
    problem = Problem(Q, K, V, log_G, state, keys, deg, scale, None, fold)
    kernel = select_backend(problem, backend, need="attend_window")
    if kernel is not None:
        Y = kernel.attend_window(problem, G)
    else:
        Y = _attend_window(Q, K, V, G, state, keys, deg, scale, compute)
    if not fold:
        return Y, state, keys
    new_state, new_keys = update_state(K, V, G, deg, state, keys, compute)
    return Y, new_state.to(Q.dtype), new_keys


def _attend_window(Q, K, V, G, state, keys, deg, scale, compute):
    """Outputs of the last ``tq`` window positions: the in-window block plus the state query."""
    b, tq, hq, d = Q.shape
    w, h = K.shape[1], K.shape[2]
    q = Q.to(compute)
    k, v, G_q = expand_heads(hq // h, K.to(compute), V.to(compute), G)
    positions = torch.arange(w - tq, w, device=Q.device) if w else torch.zeros(tq, dtype=torch.long)
    scores = torch.einsum("bihd,bjhd->bhij", q, k) * scale  # [b, hq, tq, w]
    G_h = G_q.transpose(1, 2)  # [b, hq, w]
    G_query = G_h[..., positions] if w else torch.zeros(b, hq, tq, device=Q.device, dtype=compute)
    causal = torch.arange(w, device=Q.device)[None, :] <= positions[:, None]
    log_decay = (G_query[..., :, None] - G_h[..., None, :]).masked_fill(~causal, float("-inf"))
    weights = scores**deg * log_decay.exp()
    numerator = torch.einsum("bhij,bjhe->bihe", weights, v)
    denominator = weights.sum(-1).transpose(1, 2)
    if state is not None:
        state_q, keys_q = expand_heads(hq // h, state.to(compute), keys.to(compute), dim=1)
        phi_q = sympow(q, deg) * (scale**deg * G_query.exp()).transpose(1, 2)[..., None]  # [b, tq, hq, D]
        numerator = numerator + torch.einsum("bthD,bhDe->bthe", phi_q, state_q)
        denominator = denominator + torch.einsum("bthD,bhD->bth", phi_q, keys_q)
    return normalise(numerator, denominator).to(Q.dtype)


class PowerRetentionCache:
    """What one layer keeps while generating: the window since the last fold and the state before it.

    Memory per sequence: ``h * (D * e)`` state elements in the model dtype, ``h * D`` fp32 for the sum of
    keys, and a window of fewer than ``switch_over_seq_len`` steps (``h * (d + e)`` elements and ``h`` fp32
    gates per step), whatever the context length. ``D = sympow_dim(d, deg)``.

    Attributes:
        window_K ``[b, w, h, d]``, window_V ``[b, w, h, e]``, window_log_G ``[b, w, h]`` fp32 (or None),
        state ``[b, h, D, e]``, sum_of_keys ``[b, h, D]`` (None before the first fold), position (tokens seen).
    """

    def __init__(self, deg: int = 2, scale: float | None = None, switch_over_seq_len: int = 512,
                 backend: str = "auto"):
        self.deg = check_deg(deg)
        self.scale = scale
        self.switch_over_seq_len = check_positive_int("switch_over_seq_len", switch_over_seq_len)
        self.backend = backend
        self.window_K = self.window_V = self.window_log_G = None
        self.state = self.sum_of_keys = None
        self.position = 0

    def step(self, Q, K, V, log_G=None) -> torch.Tensor:
        """Append ``K [b, n, h, d]``, ``V``, ``log_G [b, n, h]`` (prefill: many steps; decode: one) and return
        the outputs of ``Q [b, n, hq, d]``: exactly the training forward's last ``n`` outputs."""
        check_tensor("K", K, 4, "[b, n, h, d]")
        if self.window_K is not None:
            check_same("K", K, "the cached window", self.window_K)
            if K.shape[0] != self.window_K.shape[0] or K.shape[2:] != self.window_K.shape[2:]:
                raise ValueError(
                    f"K must match the cached window's [b, ·, h, d] = {tuple(self.window_K.shape)}, got {describe(K)}"
                )
            if (log_G is None) != (self.window_log_G is None):
                raise ValueError("log_G must be given at every step or at none (gating is fixed per cache)")
            K = torch.cat([self.window_K, K], dim=1)
            V = torch.cat([self.window_V, V], dim=1)
            log_G = None if log_G is None else torch.cat([self.window_log_G, log_G.float()], dim=1)
        Y, state, keys = power_retention_inference(
            Q, K, V, log_G, None if self.state is None else (self.state, self.sum_of_keys), deg=self.deg,
            scale=self.scale, switch_over_seq_len=self.switch_over_seq_len, backend=self.backend,
        )
        self.position += Q.shape[1]
        if K.shape[1] >= self.switch_over_seq_len:  # folded: the window starts afresh
            self.state, self.sum_of_keys = state, keys
            self.window_K = K[:, :0]
            self.window_V = V[:, :0]
            self.window_log_G = None if log_G is None else log_G[:, :0]
        else:
            self.window_K, self.window_V, self.window_log_G = K, V, None if log_G is None else log_G.float()
        return Y

    def _tensors(self) -> dict:
        names = ("window_K", "window_V", "window_log_G", "state", "sum_of_keys")
        return {name: getattr(self, name) for name in names}

    def _map(self, function) -> PowerRetentionCache:
        for name, tensor in self._tensors().items():
            if tensor is not None:
                setattr(self, name, function(name, tensor))
        return self

    def select(self, indices: torch.Tensor) -> PowerRetentionCache:
        """Keep (or repeat) batch rows ``indices`` [b'] in place, e.g. to reorder beams; returns self."""
        if not isinstance(indices, torch.Tensor) or indices.dtype not in (torch.int32, torch.int64):
            raise TypeError(f"indices must be an int32/int64 tensor of batch rows, got {indices!r}")
        return self._map(lambda name, x: x.index_select(0, indices.to(x.device)))

    reorder = select

    def to(self, device=None, dtype: torch.dtype | None = None) -> PowerRetentionCache:
        """Move to ``device``; ``dtype`` converts the window and state (gates and sum of keys stay fp32)."""
        def move(name, x):
            keep = name in ("window_log_G", "sum_of_keys") or dtype is None
            return x.to(device=device, dtype=None if keep else dtype)

        return self._map(move)

    def state_dict(self) -> dict:
        """Everything needed to resume generation (tensors and settings)."""
        settings = {"deg": self.deg, "scale": self.scale, "switch_over_seq_len": self.switch_over_seq_len,
                    "position": self.position}
        return {**settings, **self._tensors()}

    def load_state_dict(self, state: dict) -> PowerRetentionCache:
        self.deg, self.scale = state["deg"], state["scale"]
        self.switch_over_seq_len, self.position = state["switch_over_seq_len"], state["position"]
        for name in self._tensors():
            setattr(self, name, state[name])
        return self

    def save(self, path) -> None:
        """Write atomically (a temporary file, then a rename): a crash never leaves half a cache."""
        path = os.fspath(path)
        temporary = f"{path}.tmp-{os.getpid()}"
        torch.save(self.state_dict(), temporary)
        os.replace(temporary, path)

    @classmethod
    def load(cls, path, map_location=None, backend: str = "auto") -> PowerRetentionCache:
        state = torch.load(path, map_location=map_location, weights_only=True)
        return cls(state["deg"], state["scale"], state["switch_over_seq_len"], backend).load_state_dict(state)

    def memory_bytes(self) -> int:
        """Bytes held now (state, sum of keys and window)."""
        return sum(x.numel() * x.element_size() for x in self._tensors().values() if x is not None)

    @staticmethod
    def state_bytes(batch: int, heads: int, head_dim: int, value_dim: int, deg: int, dtype=torch.bfloat16) -> int:
        """Bytes of the folded state per layer: ``b * h * D * (e * itemsize + 4)``."""
        D = sympow_dim(head_dim, deg)
        return batch * heads * D * (value_dim * torch.empty((), dtype=dtype).element_size() + 4)
