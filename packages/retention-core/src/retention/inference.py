"""Inference: attend to ``state + window``, fold the window into the state when it is full, and a cache
object that a generation loop holds (one per layer).

A query at window position ``m`` (``G`` the cumulative log gate of the window, ``S_0, z_0`` the state before
the window) reads

    y = (s^p e^{G_m} phi(q)^T S_0 + sum_{j <= m} (s <q, k_j>)^p e^{G_m - G_j} v_j) / (same with z_0 and 1)

and the fold is ``S <- e^{G_w} S_0 + sum_j e^{G_w - G_j} phi(k_j) v_j^T`` (and ``z`` alike).

A backend's optional ``attend_window(problem, G)`` op returns ``Y``, or ``(Y, state, sum_of_keys)`` with the
window folded in when ``problem.return_final_state`` is set (the window is full); when it returns ``Y`` only,
the fold runs here in PyTorch.

``PowerRetentionCache(static=True)`` keeps fixed-size buffers (window of ``switch_over_seq_len`` steps, state,
window length on the device), so a one-token decode step reads and writes the same memory every time and can be
captured in a CUDA graph (:class:`DecodeGraph`).
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

__all__ = ["power_retention_inference", "PowerRetentionCache", "DecodeGraph"]


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
        K: ``[b, w, h, d]``: the window's keys since the last fold, or None with a state.
        V: ``[b, w, h, e]``: the window's values (None when K is).
        log_G: ``[b, w, h]`` log gates of the window.
        initial_state: the state before the window, ``[b, h, D, e]`` (or a ``(state, sum_of_keys)`` pair), or None.
        sum_of_keys: ``[b, h, D]``, with a state tensor.
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
    if switch_over_seq_len is not None and tq < w and w - tq >= switch_over_seq_len:
        raise ValueError(
            f"K holds a window longer than allowed: w={w} steps of which {w - tq} precede the {tq} queries, but "
            f"switch_over_seq_len={switch_over_seq_len} folds a window as soon as it reaches that length "
            f"(drop the window after a call that folds it)"
        )
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

    G = _cumulative_gate(log_G, b, w, h, Q.device, problem_dtype(Q))
    problem = Problem(Q, K, V, log_G, state, keys, deg, scale, None, fold)
    return _attend(problem, G, select_backend(problem, backend, need="attend_window"))


def problem_dtype(x: torch.Tensor) -> torch.dtype:
    """The compute dtype: fp32, fp64 for fp64 inputs."""
    return torch.promote_types(x.dtype, torch.float32)


def _attend(problem: Problem, G: torch.Tensor, kernel) -> tuple:
    """``(Y, state, sum_of_keys)`` of a validated window problem: the backend's ``attend_window`` op when there is
    one (it may fold too), else plain PyTorch; the state is folded when ``problem.return_final_state``."""
    Q, K, V, state, keys = problem.Q, problem.K, problem.V, problem.state, problem.sum_of_keys
    compute = problem.compute_dtype
    result = None if kernel is None else kernel.attend_window(problem, G)
    if isinstance(result, tuple):  # the backend folded the window itself
        Y, new_state, new_keys = result
        return Y, new_state.to(Q.dtype), new_keys.to(compute)
    Y = _attend_window(Q, K, V, G, state, keys, problem.deg, problem.scale, compute) if result is None else result
    if not problem.return_final_state:
        return Y, state, keys
    new_state, new_keys = update_state(K, V, G, problem.deg, state, keys, compute)
    return Y, new_state.to(Q.dtype), new_keys


def _decode_step_op(kernel):
    """A backend's fused static-cache step (append, attend, fold in one launch), when it has one."""
    return None if kernel is None else kernel.decode_step


def _cumulative_gate(log_G, b, w, h, device, compute) -> torch.Tensor:
    """``G [b, w, h]``, the cumulative log gate along the window (a ``[b, h, w]``-contiguous view). The scan
    runs along the innermost dimension: PyTorch scans an outer dimension with one sequential thread per
    column, which on a GPU costs ~150 us for a 512-step window, more than the rest of a decode step."""
    if log_G is None:
        return torch.zeros(b, w, h, device=device, dtype=compute)
    return log_G.to(compute).transpose(1, 2).cumsum(-1).transpose(1, 2)


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

    Dynamic mode (default): the window grows by concatenation and is sized to its content. Memory per sequence:
    ``h * (D * e)`` state elements in the model dtype, ``h * D`` fp32 for the sum of keys, and a window of
    fewer than ``switch_over_seq_len`` steps (``h * (d + e)`` elements and ``h`` fp32 gates per step),
    whatever the context length. ``D = sympow_dim(d, deg)``.

    Static mode (``static=True``): the first step allocates fixed buffers (see :meth:`static_bytes`): the
    window for ``W = switch_over_seq_len`` steps (zero beyond its length) with its raw and cumulative gates
    (``window_G``), the state (zero before the first fold) and ``window_length``, an int64 ``[1]`` tensor on
    the device. A one-token step then reads and writes the same memory every time, with no Python-side
    slicing, so it can be captured in a CUDA graph (:class:`DecodeGraph`). With a backend whose op has a fused
    ``decode_step`` (Triton), one kernel reads the length, attends to the buffered keys below it, the new key
    and the state, and appends the token. Otherwise the new key is written at the device-side length and the
    query is placed at the buffer's end, where the zero keys past the length weigh exactly 0 and the zero
    gates leave its discount unchanged. The host keeps the same length in ``_length`` (known from the steps taken, never
    read back from the device) to decide when the window is full and folds. Results equal the dynamic mode's.

    Attributes:
        window_K: ``[b, w, h, d]`` keys since the last fold (static mode: ``w = W``, the buffer).
        window_V: ``[b, w, h, e]`` values since the last fold.
        window_log_G: ``[b, w, h]`` log gates in the compute dtype, or None without gating.
        state: ``[b, h, D, e]`` (None before the first fold in dynamic mode).
        sum_of_keys: ``[b, h, D]`` (None before the first fold in dynamic mode).
        position: tokens seen.
        window_length: static mode only: the number of valid steps in the window buffers.
    """

    def __init__(self, deg: int = 2, scale: float | None = None, switch_over_seq_len: int = 512,
                 backend: str = "auto", *, static: bool = False):
        self.deg = check_deg(deg)
        self.scale = scale
        self.switch_over_seq_len = check_positive_int("switch_over_seq_len", switch_over_seq_len)
        self.backend = backend
        if not isinstance(static, bool):
            raise TypeError(f"static must be a bool, got {static!r}")
        self.static = static
        self.window_K = self.window_V = self.window_log_G = None
        self.state = self.sum_of_keys = None
        self.window_G = None  # static mode: the cumulative gates of the window, fp32
        self.window_length = None  # static mode: int64 [1] on the device
        self._length = 0  # static mode: the same length on the host
        self.position = 0

    @property
    def window_size(self) -> int:
        """Steps in the window now (not yet folded into the state)."""
        if self.static:
            return self._length
        return 0 if self.window_K is None else self.window_K.shape[1]

    def window(self) -> tuple:
        """``(K [b, w, h, d], V [b, w, h, e], log_G [b, w, h] or None)`` of the window now, or Nones."""
        if self.window_K is None:
            return None, None, None
        n = self.window_size
        log_G = None if self.window_log_G is None else self.window_log_G[:, :n]
        return self.window_K[:, :n], self.window_V[:, :n], log_G

    def step(self, Q, K, V, log_G=None) -> torch.Tensor:
        """Append ``K [b, n, h, d]``, ``V``, ``log_G [b, n, h]`` (prefill: many steps; decode: one) and return
        the outputs of ``Q [b, n, hq, d]``: exactly the training forward's last ``n`` outputs."""
        check_tensor("K", K, 4, "[b, n, h, d]")
        check_tensor("V", V, 4, "[b, n, h, e]")
        if self.window_K is not None:
            self._check_step(K, V, log_G)
        elif self.static:
            self._allocate(K, V, log_G)
        if self.static and K.shape[1] == 1:
            return self._decode_one(Q, K, V, log_G)
        window_K, window_V, window_log_G = self.window()
        if window_K is not None:
            K = torch.cat([window_K, K], dim=1)
            V = torch.cat([window_V, V], dim=1)
            log_G = None if log_G is None else torch.cat([window_log_G, log_G.to(problem_dtype(K))], dim=1)
        Y, state, keys = power_retention_inference(
            Q, K, V, log_G, None if self.state is None else (self.state, self.sum_of_keys), deg=self.deg,
            scale=self.scale, switch_over_seq_len=self.switch_over_seq_len, backend=self.backend,
        )
        self.position += Q.shape[1]
        folded = K.shape[1] >= self.switch_over_seq_len
        if self.static:
            self._store(K, V, log_G, state, keys, folded)
        elif folded:  # the window starts afresh
            self.state, self.sum_of_keys = state, keys
            self.window_K = K[:, :0]
            self.window_V = V[:, :0]
            self.window_log_G = None if log_G is None else log_G[:, :0].to(problem_dtype(K))
        else:
            # Gates in the compute dtype: fp32, fp64 for fp64 inputs (rounding them to fp32 would cost fp64 models
            # their precision).
            self.window_K, self.window_V = K, V
            self.window_log_G = None if log_G is None else log_G.to(problem_dtype(K))
        return Y

    def _check_step(self, K, V, log_G) -> None:
        check_same("K", K, "the cached window", self.window_K)
        check_same("V", V, "the cached window", self.window_V)
        if K.shape[0] != self.window_K.shape[0] or K.shape[2:] != self.window_K.shape[2:]:
            raise ValueError(
                f"K must match the cached window's [b, ·, h, d] = {tuple(self.window_K.shape)}, got {describe(K)}"
            )
        if V.shape[:2] != K.shape[:2] or V.shape[2:] != self.window_V.shape[2:]:
            raise ValueError(
                f"V must match K's [b, n] and the cached window's [h, e] = {tuple(self.window_V.shape[2:])}, "
                f"got {describe(V)}"
            )
        if (log_G is None) != (self.window_log_G is None):
            raise ValueError("log_G must be given at every step or at none (gating is fixed per cache)")

    # Static mode.

    def _allocate(self, K, V, log_G) -> None:
        """The fixed buffers of static mode, sized by the first step's ``K``, ``V`` and gating."""
        b, _, h, d = K.shape
        e, W = V.shape[-1], self.switch_over_seq_len
        D = sympow_dim(d, self.deg)
        compute = torch.promote_types(K.dtype, torch.float32)
        self.window_K = K.new_zeros(b, W, h, d)
        self.window_V = V.new_zeros(b, W, h, e)
        self.window_log_G = None if log_G is None else torch.zeros(b, W, h, device=K.device, dtype=compute)
        self.window_G = torch.zeros(b, W, h, device=K.device, dtype=compute)
        self.state = K.new_zeros(b, h, D, e)
        self.sum_of_keys = torch.zeros(b, h, D, device=K.device, dtype=compute)
        self.window_length = torch.zeros(1, device=K.device, dtype=torch.int64)
        self._length = 0

    def _decode_one(self, Q, K, V, log_G) -> torch.Tensor:
        """One step of static mode with fixed shapes and addresses (what :class:`DecodeGraph` captures)."""
        b, _, h, d = K.shape
        check_qkv(Q, K, V)
        log_G = check_log_G(log_G, b, 1, h, Q)
        scale = check_scale(self.scale, d)
        W = self.switch_over_seq_len
        fold = self._length + 1 == W
        problem = Problem(Q, self.window_K, self.window_V, self.window_log_G, self.state, self.sum_of_keys,
                          self.deg, scale, None, fold)
        kernel = select_backend(problem, self.backend, need="attend_window")
        fused = _decode_step_op(kernel)
        if fused is not None:  # one launch: append at the device-side length, attend, fold in place
            Y = fused(Q, K, V, log_G, self.window_K, self.window_V, self.window_log_G, self.window_G,
                      self.window_length, self.state, self.sum_of_keys, self.deg, scale, fold)
            state, keys = self.state, self.sum_of_keys
        else:
            self.window_K.index_copy_(1, self.window_length, K)
            self.window_V.index_copy_(1, self.window_length, V)
            if log_G is not None:
                self.window_log_G.index_copy_(1, self.window_length, log_G.to(self.window_log_G.dtype))
            self.window_length += 1
            # The query at the buffer's end reads exactly the window: past the length, keys (so weights) are 0
            # and gates are 0 (so the cumulative gate at the end is the one at the length).
            G = _cumulative_gate(self.window_log_G, b, W, h, Q.device, self.window_G.dtype)
            self.window_G.copy_(G)
            Y, state, keys = _attend(problem, G, kernel)
        self._length += 1
        self.position += 1
        if fold:
            self._reset_window(state, keys)
        return Y

    def _reset_window(self, state, keys) -> None:
        """After a fold: the new state into the state buffers, the window buffers back to zero."""
        if state is not self.state:
            self.state.copy_(state)
            self.sum_of_keys.copy_(keys)
        for buffer in (self.window_K, self.window_V, self.window_log_G, self.window_G):
            if buffer is not None:
                buffer.zero_()
        self.window_length.zero_()
        self._length = 0

    def _store(self, K, V, log_G, state, keys, folded: bool) -> None:
        """Static mode after a many-token step: copy the new window (shorter than ``W``) into the buffers."""
        if folded:
            self._reset_window(state, keys)
            return
        n = K.shape[1]
        self.window_K[:, :n].copy_(K)
        self.window_V[:, :n].copy_(V)
        if log_G is not None:
            self.window_log_G[:, :n].copy_(log_G)
            self.window_G[:, :n].copy_(_cumulative_gate(log_G, *log_G.shape, log_G.device, self.window_G.dtype))
        self.window_length.fill_(n)
        self._length = n

    # Batch selection, devices, persistence, memory.

    def _tensors(self) -> dict:
        names = ("window_K", "window_V", "window_log_G", "state", "sum_of_keys")
        if self.static:
            names = (*names, "window_G", "window_length")
        return {name: getattr(self, name) for name in names}

    def _map(self, function) -> PowerRetentionCache:
        for name, tensor in self._tensors().items():
            if tensor is not None:
                setattr(self, name, function(name, tensor))
        return self

    def select(self, indices: torch.Tensor) -> PowerRetentionCache:
        """Keep (or repeat) batch rows ``indices`` [b'] in place, e.g. to reorder beams; returns self.
        Static mode with ``b' == b`` writes into the same buffers (captured graphs stay valid)."""
        if not isinstance(indices, torch.Tensor) or indices.dtype not in (torch.int32, torch.int64):
            raise TypeError(f"indices must be an int32/int64 tensor of batch rows, got {indices!r}")

        def pick(name, x):
            if name == "window_length":  # one length for the whole batch
                return x
            chosen = x.index_select(0, indices.to(x.device))
            return x.copy_(chosen) if self.static and chosen.shape == x.shape else chosen

        return self._map(pick)

    reorder = select

    def to(self, device=None, dtype: torch.dtype | None = None) -> PowerRetentionCache:
        """Move to ``device``; ``dtype`` converts the window and state (gates and sum of keys stay fp32)."""
        def move(name, x):
            keep = name in ("window_log_G", "window_G", "sum_of_keys", "window_length") or dtype is None
            return x.to(device=device, dtype=None if keep else dtype)

        return self._map(move)

    def state_dict(self) -> dict:
        """Everything needed to resume generation (tensors and settings)."""
        settings = {"deg": self.deg, "scale": self.scale, "switch_over_seq_len": self.switch_over_seq_len,
                    "position": self.position, "static": self.static}
        tensors = self._tensors()
        if self.static:
            tensors["window_length"] = self._length  # the host's copy: no device read
        return {**settings, **tensors}

    def load_state_dict(self, state: dict) -> PowerRetentionCache:
        self.deg, self.scale = state["deg"], state["scale"]
        self.switch_over_seq_len, self.position = state["switch_over_seq_len"], state["position"]
        self.static = state.get("static", False)
        for name in ("window_K", "window_V", "window_log_G", "state", "sum_of_keys"):
            setattr(self, name, state[name])
        self.window_G = state.get("window_G") if self.static else None
        if self.static:
            self._length = state["window_length"] if self.window_K is not None else 0
            self.window_length = None
            if self.window_K is not None:
                if self.window_K.shape[1] != self.switch_over_seq_len or not 0 <= self._length < self.window_K.shape[1]:
                    raise ValueError(
                        f"a static cache needs window buffers of switch_over_seq_len={self.switch_over_seq_len} "
                        f"steps and a window_length below it, got {describe(self.window_K)} and "
                        f"window_length={self._length}"
                    )
                self.window_length = torch.tensor([self._length], device=self.window_K.device)
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
        cache = cls(state["deg"], state["scale"], state["switch_over_seq_len"], backend,
                    static=state.get("static", False))
        return cache.load_state_dict(state)

    def memory_bytes(self) -> int:
        """Bytes held now (state, sum of keys and window; static mode: the whole buffers)."""
        return sum(x.numel() * x.element_size() for x in self._tensors().values() if x is not None)

    @staticmethod
    def state_bytes(batch: int, heads: int, head_dim: int, value_dim: int, deg: int, dtype=torch.bfloat16) -> int:
        """Bytes of the folded state per layer: ``b * h * D * (e * itemsize + 4)``."""
        D = sympow_dim(head_dim, deg)
        return batch * heads * D * (value_dim * torch.empty((), dtype=dtype).element_size() + 4)

    @staticmethod
    def static_bytes(batch: int, heads: int, head_dim: int, value_dim: int, deg: int, switch_over_seq_len: int,
                     dtype=torch.bfloat16, gating: bool = True) -> int:
        """Bytes of a static cache per layer, whatever the context length: the state (:meth:`state_bytes`)
        plus window buffers of ``W = switch_over_seq_len`` steps, ``b * W * h * ((d + e) * itemsize + 4 + 4 if
        gating)`` (keys, values, cumulative gates, raw gates), plus the 8-byte length. E.g. bf16, h=8,
        d=e=64, deg=2, W=512: 2.09 MiB + 1.03 MiB per sequence."""
        itemsize = torch.empty((), dtype=dtype).element_size()
        gates = 8 if gating else 4
        window = batch * switch_over_seq_len * heads * ((head_dim + value_dim) * itemsize + gates)
        return PowerRetentionCache.state_bytes(batch, heads, head_dim, value_dim, deg, dtype) + window + 8


class DecodeGraph:
    """One-token decode steps of a static :class:`PowerRetentionCache`, replayed from CUDA graphs.

        cache = PowerRetentionCache(switch_over_seq_len=512, static=True)
        cache.step(Q, K, V, log_G)                  # prefill (eager): allocates the buffers
        graph = DecodeGraph(cache, q, k, v, g)      # example one-token inputs fix shapes and dtypes
        y = graph(q, k, v, g)                       # same as cache.step(q, k, v, g)

    Two graphs are captured: the plain step and the step that fills the window and folds it; the host picks one
    from the cache's host-side length, so no step reads the device. ``y`` is memory owned by the graph and is
    overwritten by the next call (clone it to keep it). The cache's buffers must stay where they are: ``to()``,
    ``load`` or a ``select`` that changes the batch size make the graph refuse to run (capture a new one).
    """

    def __init__(self, cache: PowerRetentionCache, Q, K, V, log_G=None, *, warmup: int = 2):
        if not isinstance(cache, PowerRetentionCache) or not cache.static:
            raise ValueError("DecodeGraph needs a PowerRetentionCache(static=True)")
        if cache.window_K is None:
            raise ValueError("DecodeGraph needs a cache whose buffers exist: run a first cache.step (the prefill)")
        if Q.device.type != "cuda":
            raise ValueError(f"DecodeGraph captures CUDA graphs: Q must be a CUDA tensor, got {describe(Q)}")
        if K.dim() != 4 or K.shape[1] != 1:
            raise ValueError(f"DecodeGraph runs one-token steps: K must be [b, 1, h, d], got {describe(K)}")
        cache._check_step(K, V, log_G)
        self.cache = cache
        self.inputs = [x.clone() for x in (Q, K, V)] + [None if log_G is None else log_G.clone()]
        snapshot = {name: x.clone() for name, x in cache._tensors().items() if x is not None}
        host = (cache._length, cache.position)
        W = cache.switch_over_seq_len

        def start(fold: bool) -> None:  # a state from which the next step folds, or does not
            cache._length = W - 1 if fold else 0
            cache.window_length.fill_(cache._length)

        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):  # compile the kernels and warm the allocator outside the capture
            for fold in (False, True):
                for _ in range(warmup):
                    start(fold)
                    cache._decode_one(*self.inputs)
        torch.cuda.current_stream().wait_stream(stream)
        self.graphs, self.outputs = {}, {}
        pool = torch.cuda.graph_pool_handle()
        for fold in (False, True):
            start(fold)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                self.outputs[fold] = cache._decode_one(*self.inputs)
            self.graphs[fold] = graph
        for name, x in snapshot.items():  # undo the warm-up steps
            getattr(cache, name).copy_(x)
        cache._length, cache.position = host
        self._addresses = self._buffer_addresses()

    def _buffer_addresses(self) -> tuple:
        return tuple(x.data_ptr() for x in self.cache._tensors().values() if x is not None)

    def __call__(self, Q, K, V, log_G=None) -> torch.Tensor:
        """One decode step: ``Y [b, 1, hq, e]`` (graph-owned memory, see the class docstring)."""
        for name, static, x in zip(("Q", "K", "V", "log_G"), self.inputs, (Q, K, V, log_G)):
            if (static is None) != (x is None):
                raise ValueError(f"{name} must be given exactly when it was at capture ({'no ' * (static is None)}"
                                 f"{name} then)")
            if static is not None:
                if x.shape != static.shape or x.dtype != static.dtype or x.device != static.device:
                    raise ValueError(f"{name} must match the captured {describe(static)}, got {describe(x)}")
                static.copy_(x)
        return self.replay()

    def replay(self) -> torch.Tensor:
        """One decode step on the inputs already written into ``self.inputs`` ``[Q, K, V, log_G]`` (no copies:
        a model can write its projections there directly)."""
        cache = self.cache
        if self._buffer_addresses() != self._addresses:
            raise ValueError("the cache's buffers moved since the capture (to(), load or select with a new batch "
                             "size): capture a new DecodeGraph")
        fold = cache._length + 1 == cache.switch_over_seq_len
        self.graphs[fold].replay()
        cache._length = 0 if fold else cache._length + 1
        cache.position += 1
        return self.outputs[fold]
