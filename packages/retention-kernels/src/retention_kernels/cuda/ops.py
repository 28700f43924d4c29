"""The CUDA kernels as ``torch.library`` custom ops (``torch.ops.retention_kernels.cuda_*``).

Each op fills the argument struct of ``_library`` from its tensors (data pointers, element strides) and calls the
C entry point on the current CUDA stream. Fake (meta) kernels give the output shapes, so the ops trace under
``torch.compile`` and run on ``meta`` tensors without a GPU. They are inference ops (no autograd formula).

    cuda_attend_window(Q, K, V, G, state, keys, deg, scale, splits) -> Y            [b, tq, hq, e]
    cuda_decode_step(Q, K, V, log_G, window_K, window_V, window_log_G, window_G, window_length, state,
                     sum_of_keys, deg, scale, fold, splits) -> Y                     [b, 1, hq, e], buffers in place
    cuda_fold_window(K, V, G, state, keys, deg, state_dtype) -> (state', keys')     [b, h, D, e], [b, h, D] fp32
    cuda_state_query(Q, states, keys, G, deg, scale, chunk) -> (num, den)           [b, t, hq, e], [b, t, hq] fp32

Shapes and formulas: retention_kernels.triton.decode (same contracts) and csrc/common.cuh.
"""

from __future__ import annotations

import functools

import torch

from retention.sympow import sympow_dim, sympow_indices, sympow_weights

from . import _library
from ._library import AttendArgs, FoldArgs, StateQueryArgs

__all__ = ["attend_window", "decode_step", "fold_window", "state_query", "default_splits", "TUNING"]

# Launch choices; None picks per device (benchmarks/gpu_cuda.py sweeps them).
TUNING = {"splits": None}


@functools.lru_cache(maxsize=32)
def _table(d: int, deg: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The sympow layout as kernel inputs: ``index [D, deg]`` int32 and ``weight [D]`` fp32."""
    return (sympow_indices(d, deg, device).to(torch.int32).contiguous(),
            sympow_weights(d, deg, device).to(torch.float32).contiguous())


@functools.lru_cache(maxsize=16)
def _processors(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def _programs(b: int, tq: int, hq: int, h: int) -> int:
    """Blocks of the attend kernel before splitting (csrc/decode.cu): one per key/value head and group of at
    most 8 query rows (a power of two) of its ``tq * hq / h`` rows."""
    group_rows = tq * (hq // h)
    rows = min(8, 1 << (group_rows - 1).bit_length())
    return b * h * -(-group_rows // rows)


def default_splits(programs: int, D: int, device: torch.device) -> int:
    """Blocks per program: about eight per SM in all (the state stream needs many loads in flight), at least
    128 state rows each."""
    if device.type != "cuda":
        return 1
    return max(1, min(-(-D // 128), -(-8 * _processors(device) // programs)))


def _dtype_code(tensor: torch.Tensor) -> int:
    return _library.DTYPE_CODES[str(tensor.dtype)]


def _ptr(tensor: torch.Tensor | None) -> int | None:
    return None if tensor is None else tensor.data_ptr()


def _fill(array, values) -> None:
    for i, value in enumerate(values):
        array[i] = value


def _stream(device: torch.device) -> int:
    return torch.cuda.current_stream(device).cuda_stream


def _vector_ready(state: torch.Tensor) -> bool:
    """Rows of 16-byte loads: contiguous along e, every other stride a multiple of 16 bytes, aligned base."""
    vec = 16 // state.element_size()
    return (state.stride(-1) == 1 and all(s % vec == 0 for s in state.stride()[:-1])
            and state.data_ptr() % 16 == 0)


def _workspace(splits: int, rows: int, e: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """The partial sums ``[splits, rows, e + 1]`` fp32 and the row-group counters (int32, zeroed by the
    library before each launch) of a split or appending attend launch."""
    return (torch.empty(splits, rows, e + 1, device=device),
            torch.empty(rows + 1, device=device, dtype=torch.int32))


def _attend_args(Q, K, V, G, state, keys, deg, scale, splits, out, workspace) -> AttendArgs:
    b, tq, hq, d = Q.shape
    w, h, e = K.shape[1], K.shape[2], V.shape[-1]
    index, weight = _table(d, deg, Q.device)
    partial, counters = workspace or (None, None)
    args = AttendArgs(q=Q.data_ptr(), k=K.data_ptr(), v=V.data_ptr(), g=G.data_ptr(), state=_ptr(state),
                      keys=_ptr(keys), out=out.data_ptr(), index=index.data_ptr(), weight=weight.data_ptr(),
                      partial=_ptr(partial), counters=_ptr(counters), dtype=_dtype_code(Q), b=b, tq=tq, hq=hq,
                      h=h, w=w, d=d, e=e, D=index.shape[0], deg=deg, splits=splits, append=0, fold=0, scale=scale)
    for name, tensor in (("sq", Q), ("sk", K), ("sv", V), ("sg", G), ("so", out)):
        _fill(getattr(args, name), tensor.stride())
    if state is not None:
        _fill(args.ss, state.stride())
        _fill(args.sz, keys.stride())
    return args


def _splits(splits: int, programs: int, D: int, device) -> int:
    return splits if splits > 0 else (TUNING["splits"] or default_splits(programs, D, device))


@torch.library.custom_op("retention_kernels::cuda_attend_window", mutates_args=())
def _attend_window_op(Q: torch.Tensor, K: torch.Tensor, V: torch.Tensor, G: torch.Tensor, state: torch.Tensor | None,
                      keys: torch.Tensor | None, deg: int, scale: float, splits: int) -> torch.Tensor:
    b, tq, hq, d = Q.shape
    e = V.shape[-1]
    if state is not None:
        state = state.to(Q.dtype)
        if not _vector_ready(state):
            state = state.contiguous() if not state.is_contiguous() else state.clone()
    if keys is not None:
        keys = keys.float()
    if G.numel() == 0:  # a valid pointer when the window is empty
        G = torch.zeros(b, 1, K.shape[2], device=Q.device)
    splits = _splits(splits, _programs(b, tq, hq, K.shape[2]), sympow_dim(d, deg), Q.device)
    out = torch.full((b, tq, hq, e), float("nan"), device=Q.device, dtype=Q.dtype)
    workspace = None if splits == 1 else _workspace(splits, b * tq * hq, e, Q.device)
    args = _attend_args(Q, K, V, G.float(), state, keys, deg, scale, splits, out, workspace)
    _library.call("retention_attend_window", args, _stream(Q.device))
    return out


@_attend_window_op.register_fake
def _(Q, K, V, G, state, keys, deg, scale, splits):
    return Q.new_empty(*Q.shape[:3], V.shape[-1])


@torch.library.custom_op("retention_kernels::cuda_decode_step",
                         mutates_args=("window_K", "window_V", "window_log_G", "window_G", "window_length", "state",
                                       "sum_of_keys"))
def _decode_step_op(Q: torch.Tensor, K: torch.Tensor, V: torch.Tensor, log_G: torch.Tensor | None,
                    window_K: torch.Tensor, window_V: torch.Tensor, window_log_G: torch.Tensor | None,
                    window_G: torch.Tensor, window_length: torch.Tensor, state: torch.Tensor,
                    sum_of_keys: torch.Tensor, deg: int, scale: float, fold: bool, splits: int) -> torch.Tensor:
    b, _, hq, d = Q.shape
    e = V.shape[-1]
    if not _vector_ready(state):
        raise ValueError("cuda decode_step: the state buffer must be contiguous along e with 16-byte aligned rows "
                         f"(a static cache's buffer is), got strides {state.stride()}")
    for name, tensor in (("sum_of_keys", sum_of_keys), ("window_G", window_G)) + (
            (("window_log_G", window_log_G),) if window_log_G is not None else ()):
        if tensor.dtype != torch.float32:
            raise TypeError(f"cuda decode_step: {name} must be float32, got {tensor.dtype}")
    if window_length.dtype != torch.int64 or window_length.numel() != 1:
        raise TypeError(f"cuda decode_step: window_length must be an int64 [1] tensor, got {window_length.dtype} "
                        f"{tuple(window_length.shape)}")
    D = sympow_dim(d, deg)
    splits = _splits(splits, _programs(b, 1, hq, window_K.shape[2]), D, Q.device)
    # No NaN fill here (one launch less in the decode graph): the kernel writes every element of Y.
    out = torch.empty((b, 1, hq, e), device=Q.device, dtype=Q.dtype)
    args = _attend_args(Q, window_K, window_V, window_G, state, sum_of_keys, deg, scale, splits, out,
                        _workspace(splits, b * hq, e, Q.device))
    new_log_G = None if log_G is None else log_G.float()
    args.new_k, args.new_v, args.new_log_g = K.data_ptr(), V.data_ptr(), _ptr(new_log_G)
    args.raw_log_g, args.length = _ptr(window_log_G), window_length.data_ptr()
    args.append, args.fold = 1, int(fold)
    _fill(args.snk, (K.stride(0), K.stride(2), K.stride(3)))
    _fill(args.snv, (V.stride(0), V.stride(2), V.stride(3)))
    if new_log_G is not None:
        _fill(args.sng, (new_log_G.stride(0), new_log_G.stride(2)))
    if window_log_G is not None:
        _fill(args.srg, window_log_G.stride())
    _library.call("retention_attend_window", args, _stream(Q.device))
    return out


@_decode_step_op.register_fake
def _(Q, K, V, log_G, window_K, window_V, window_log_G, window_G, window_length, state, sum_of_keys, deg, scale,
      fold, splits):
    return Q.new_empty(*Q.shape[:3], V.shape[-1])


def _fold(K, V, G, state, keys, deg: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The fold kernel, writing the state in K's dtype."""
    b, w, h, d = K.shape
    e = V.shape[-1]
    index, weight = _table(d, deg, K.device)
    D = index.shape[0]
    out_state = torch.full((b, h, D, e), float("nan"), device=K.device, dtype=K.dtype)
    out_keys = torch.full((b, h, D), float("nan"), device=K.device, dtype=torch.float32)
    if state is not None:
        state, keys = state.to(K.dtype), keys.float()
    G = G.float() if G.numel() else torch.zeros(b, 1, h, device=K.device)
    args = FoldArgs(k=K.data_ptr(), v=V.data_ptr(), g=G.data_ptr(), state=_ptr(state), keys=_ptr(keys),
                    out_state=out_state.data_ptr(), out_keys=out_keys.data_ptr(), index=index.data_ptr(),
                    weight=weight.data_ptr(), dtype=_dtype_code(K), b=b, w=w, h=h, d=d, e=e, D=D, deg=deg)
    for name, tensor in (("sk", K), ("sv", V), ("sg", G), ("sos", out_state), ("soz", out_keys)):
        _fill(getattr(args, name), tensor.stride())
    if state is not None:
        _fill(args.ss, state.stride())
        _fill(args.sz, keys.stride())
    _library.call("retention_fold_window", args, _stream(K.device))
    return out_state, out_keys


@torch.library.custom_op("retention_kernels::cuda_fold_window", mutates_args=())
def _fold_window_op(K: torch.Tensor, V: torch.Tensor, G: torch.Tensor, state: torch.Tensor | None,
                    keys: torch.Tensor | None, deg: int, state_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    out_state, out_keys = _fold(K, V, G, state, keys, deg)
    return out_state.to(state_dtype), out_keys


@_fold_window_op.register_fake
def _(K, V, G, state, keys, deg, state_dtype):
    b, _, h, d = K.shape
    D = sympow_dim(d, deg)
    return K.new_empty(b, h, D, V.shape[-1], dtype=state_dtype), K.new_empty(b, h, D, dtype=torch.float32)


@torch.library.custom_op("retention_kernels::cuda_state_query", mutates_args=())
def _state_query_op(Q: torch.Tensor, states: torch.Tensor, keys: torch.Tensor, G: torch.Tensor | None, deg: int,
                    scale: float, chunk: int) -> tuple[torch.Tensor, torch.Tensor]:
    b, t, hq, d = Q.shape
    h, n_chunks, D, e = states.shape[1:]
    index, weight = _table(d, deg, Q.device)
    states = states.float()
    if not states.is_contiguous() or states.data_ptr() % 16:
        states = states.contiguous() if not states.is_contiguous() else states.clone()
    keys = keys.float()
    G = None if G is None else G.float()
    num = torch.full((b, t, hq, e), float("nan"), device=Q.device, dtype=torch.float32)
    den = torch.full((b, t, hq), float("nan"), device=Q.device, dtype=torch.float32)
    args = StateQueryArgs(q=Q.data_ptr(), states=states.data_ptr(), keys=keys.data_ptr(), g=_ptr(G),
                          index=index.data_ptr(), weight=weight.data_ptr(), num=num.data_ptr(), den=den.data_ptr(),
                          dtype=_dtype_code(Q), b=b, t=t, hq=hq, h=h, d=d, e=e, D=D, deg=deg, chunk=chunk,
                          n_chunks=n_chunks, scale=scale)
    _fill(args.sq, Q.stride())
    _fill(args.ss, states.stride()[:4])
    _fill(args.sz, keys.stride())
    if G is not None:
        _fill(args.sg, G.stride())
    _fill(args.sn, num.stride())
    _fill(args.sd, den.stride())
    _library.call("retention_state_query", args, _stream(Q.device))
    return num, den


@_state_query_op.register_fake
def _(Q, states, keys, G, deg, scale, chunk):
    b, t, hq, _ = Q.shape
    return Q.new_empty(b, t, hq, states.shape[-1], dtype=torch.float32), Q.new_empty(b, t, hq, dtype=torch.float32)


def attend_window(problem, G: torch.Tensor, *, splits: int = 0):
    """The ``attend_window`` op of the ``"cuda"`` backend (contract: ``retention.backends``): ``Y``, or
    ``(Y, state, sum_of_keys)`` with the window folded in when ``problem.return_final_state``."""
    Y = torch.ops.retention_kernels.cuda_attend_window(problem.Q, problem.K, problem.V, G, problem.state,
                                                       problem.sum_of_keys, problem.deg, problem.scale, splits)
    if problem.return_final_state:
        return (Y, *fold_window(problem.K, problem.V, G, problem.deg, problem.state, problem.sum_of_keys,
                                state_dtype=problem.Q.dtype))
    return Y


def decode_step(Q, K, V, log_G, window_K, window_V, window_log_G, window_G, window_length, state, sum_of_keys,
                deg: int, scale: float, fold: bool, *, splits: int = 0) -> torch.Tensor:
    """One token of a static cache in one call (append, attend, fold when ``fold``); the contract of
    ``retention_kernels.triton.decode.decode_step``. Returns ``Y [b, 1, hq, e]``."""
    return torch.ops.retention_kernels.cuda_decode_step(Q, K, V, log_G, window_K, window_V, window_log_G, window_G,
                                                        window_length, state, sum_of_keys, deg, scale, fold, splits)


def fold_window(K, V, G, deg: int, state=None, sum_of_keys=None, *, state_dtype: torch.dtype | None = None):
    """``S' = e^{G_w} S + sum_j e^{G_w - G_j} phi(k_j) v_j^T`` (``z'`` alike): ``(state' [b, h, D, e] in
    ``state_dtype`` (default K's), sum_of_keys' [b, h, D] fp32)``."""
    return torch.ops.retention_kernels.cuda_fold_window(K, V, G, state, sum_of_keys, deg, state_dtype or K.dtype)


def state_query(Q, states, keys, G, deg: int, scale: float, chunk: int):
    """The chunked forward's state query: ``num [b, t, hq, e] = s^p e^{G_i} phi(q_i)^T S_c``, ``den [b, t, hq] =
    s^p e^{G_i} phi(q_i)^T z_c`` (fp32) for ``Q [b, t, hq, d]``, ``states [b, h, n_chunks, D, e]``, ``keys
    [b, h, n_chunks, D]``, ``G [b, t, h]`` the cumulative log gate since each chunk's start (or None), ``c = i //
    chunk``."""
    return torch.ops.retention_kernels.cuda_state_query(Q, states, keys, G, deg, scale, chunk)
