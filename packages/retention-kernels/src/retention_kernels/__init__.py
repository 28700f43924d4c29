"""GPU kernels for power retention; ``retention`` discovers them through :func:`backends`."""

from __future__ import annotations

import importlib.util
import os

__version__ = "2.0.0.dev0"

_TRITON_DTYPES = ("torch.float16", "torch.bfloat16", "torch.float32")
MAX_DEG = 4


# Looked up once: torch.compile traces the dispatch, and Dynamo (torch 2.11) refuses to trace importlib's find_spec.
_HAVE_TRITON = importlib.util.find_spec("triton") is not None


def _triton_supports(problem) -> str | None:
    """None when the Triton backend can run ``problem``, else the reason it cannot."""
    if not _HAVE_TRITON:
        return "the triton backend needs triton (pip install triton)"
    device = problem.device
    if device.type != "cuda" and not (device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1"):
        return f"the triton backend runs on CUDA tensors (CPU only with TRITON_INTERPRET=1), got device {device}"
    if str(problem.Q.dtype) not in _TRITON_DTYPES:
        return f"the triton backend supports fp16, bf16 and fp32 inputs, got {problem.Q.dtype}"
    if problem.deg > MAX_DEG:
        return f"the triton backend supports deg 1 to {MAX_DEG}, got deg={problem.deg}"
    return None


def _triton_forward(problem):
    from .triton import power_retention_triton

    return power_retention_triton(
        problem.Q, problem.K, problem.V, problem.log_G, problem.state, problem.sum_of_keys,
        deg=problem.deg, scale=problem.scale, chunk_size=problem.chunk_size,
        need_final_state=problem.return_final_state,
    )


def _triton_attend_window(problem, G):
    from .triton.decode import attend_window

    return attend_window(problem, G)


def _triton_decode_step(*args):
    from .triton.decode import decode_step

    return decode_step(*args)


def backends() -> list:
    """The backends this package provides (``retention.backends.Backend`` objects)."""
    from retention.backends import Backend

    from .cuda import cuda_backend

    found = [Backend("triton", 20, _triton_supports, _triton_forward, attend_window=_triton_attend_window,
                     decode_step=_triton_decode_step)]
    cuda = cuda_backend()  # None without the CUDA library (Triton-only install) or without a GPU
    return found if cuda is None else [*found, cuda]
