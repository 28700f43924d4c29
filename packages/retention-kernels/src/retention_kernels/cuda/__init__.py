"""The compiled CUDA kernels of retention-kernels (csrc/), loaded with ctypes, wrapped as torch custom ops.

:func:`cuda_backend` is the ``"cuda"`` backend (priority 30, above Triton's 20) when the library loads and a CUDA
device is present (no GPU: no ``"cuda"`` backend, the package is Triton-only as far as dispatch sees): its
``attend_window`` and fused ``decode_step`` run the CUDA kernels; its training ``forward`` runs the Triton
kernels (the CUDA state query, :func:`ops.state_query`, is not wired in until it beats the fused Triton output
kernel). ``supports`` says why a problem cannot run (CPU tensors, a GPU below sm_80 or without compiled code
for it, dtype, sizes), so ``backend="cuda"`` raises that reason and ``"auto"`` moves on.
"""

from __future__ import annotations

import functools

import torch

from ._library import CudaKernelError, compiled_architectures, load

__all__ = ["available", "unavailable_reason", "cuda_backend", "supports", "CudaKernelError"]

MAX_HEAD_DIM = 256
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def available() -> bool:
    """Whether the CUDA library loads (a GPU is still needed to run it)."""
    return load()[0] is not None


def unavailable_reason() -> str | None:
    """None when the library loads, else why not."""
    return load()[1]


@functools.lru_cache(maxsize=16)
def _device_reason(index: int) -> str | None:
    """None when the GPU ``index`` can run the compiled code (sm_80+, machine code for its major version or PTX
    at or below its capability), else why not."""
    major, minor = torch.cuda.get_device_capability(index)
    name = torch.cuda.get_device_name(index)
    if major < 8:
        return f"the cuda backend needs a GPU of compute capability 8.0 or newer (sm_80+), got {major}.{minor} ({name})"
    capability = 10 * major + minor
    architectures = compiled_architectures()
    runnable = any((real and arch // 10 == major and arch <= capability) or (not real and arch <= capability)
                   for arch, real in architectures)
    if not runnable:
        built = ";".join(f"{arch}-{'real' if real else 'virtual'}" for arch, real in architectures)
        return (f"the cuda library was built for {built}, which cannot run on compute capability {major}.{minor} "
                f"({name}); rebuild with RETENTION_CUDA_ARCHS={capability}")
    return None


def supports(problem) -> str | None:
    """None when the ``"cuda"`` backend can run ``problem``, else the reason it cannot."""
    device = problem.device
    if device.type != "cuda":
        return f"the cuda backend runs on CUDA tensors, got device {device}"
    reason = unavailable_reason()
    if reason is not None:
        return reason
    reason = _device_reason(device.index if device.index is not None else torch.cuda.current_device())
    if reason is not None:
        return reason
    dtype = problem.Q.dtype
    if dtype not in _DTYPES:
        return f"the cuda backend supports fp16, bf16 and fp32 inputs, got {dtype}"
    if not 1 <= problem.deg <= 4:
        return f"the cuda backend supports deg 1 to 4, got deg={problem.deg}"
    d, e = problem.Q.shape[-1], problem.V.shape[-1]
    vector = 4 if dtype == torch.float32 else 8  # elements per 16-byte load of a state row
    if d > MAX_HEAD_DIM:
        return f"the cuda backend supports head dims d <= {MAX_HEAD_DIM}, got d={d}"
    if e % vector or e > 32 * vector:
        return (f"the cuda backend needs the value dim e to be a multiple of {vector} and at most {32 * vector} for "
                f"{dtype}, got e={e}")
    from .. import _triton_supports  # the training forward runs the Triton kernels

    reason = _triton_supports(problem)
    return None if reason is None else f"the cuda backend's training forward runs the Triton kernels, and {reason}"


def _forward(problem):
    from .. import _triton_forward

    return _triton_forward(problem)


def _attend_window(problem, G):
    from .ops import attend_window

    return attend_window(problem, G)


def _decode_step(*args):
    from .ops import decode_step

    return decode_step(*args)


# Verified on an H200 against the float64 oracle (benchmarks/results/gpu_cuda.md, 70/70 checks). Below Triton (20)
# overall: the fused decode step (27-48 us vs 16-22 us per token at b16 h8 d64) and the fold (466 vs 332 us) are
# slower; above it for attend_window alone (52-74 us at tq=1, b16, a full 512 window, against 109-169 us for the
# Triton kernels measured), so "auto" takes CUDA for that.
PRIORITY = 15
PRIORITIES = (("attend_window", 30),)


def cuda_backend():
    """The ``"cuda"`` ``retention.backends.Backend``, or None when the library does not load or there is no GPU."""
    if not available() or not torch.cuda.is_available():
        return None
    from retention.backends import Backend

    from . import ops  # noqa: F401  (registers the custom ops)

    return Backend("cuda", PRIORITY, supports, _forward, attend_window=_attend_window, decode_step=_decode_step,
                   priorities=PRIORITIES)
