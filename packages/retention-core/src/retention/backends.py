"""Backend selection, in one place.

A backend is a name, a priority, a ``supports(problem)`` check (None when it can run the problem, else the
reason it cannot), a differentiable ``forward(problem) -> (Y, state, sum_of_keys)`` and, optionally, an
``attend_window(problem, G) -> Y`` for inference (queries at the end of a window plus the state before it,
``G`` the window's cumulative log gate in fp32; it may fold the window too and then returns
``(Y, state, sum_of_keys)``) and an optional fused ``decode_step`` for the static cache (contract:
``retention_kernels.triton.decode.decode_step``); see ``retention.inference``. ``"auto"`` picks the
highest-priority backend that supports the problem and has the operation asked for; ``priorities`` overrides
``priority`` per operation (a backend can be the best at ``attend_window`` without being the best overall).
Backends in ``retention_kernels`` (Triton, CUDA) are discovered when that package is installed at the same
version.
"""

from __future__ import annotations

import importlib
import importlib.util
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ._validate import Problem
from ._version import __version__

__all__ = ["Backend", "available_backends", "get_backend", "select_backend", "BACKEND_NAMES"]

BACKEND_NAMES = ("auto", "cuda", "triton", "cpu", "reference")


@dataclass(frozen=True)
class Backend:
    name: str
    priority: int
    supports: Callable[[Problem], str | None]
    forward: Callable[[Problem], tuple]
    attend_window: Callable | None = None
    decode_step: Callable | None = None
    priorities: tuple[tuple[str, int], ...] = ()  # (operation, priority) pairs that differ from ``priority``

    def priority_for(self, need: str) -> int:
        """The priority of this backend for operation ``need`` (``"forward"``, ``"attend_window"``, ...)."""
        return dict(self.priorities).get(need, self.priority)


def _reference_supports(problem: Problem) -> str | None:
    return None


def _reference_forward(problem: Problem):
    from .reference import power_retention_chunked

    b, t, hq, h, d, e = problem.shape
    chunk_size = problem.chunk_size or min(t, 64)
    return power_retention_chunked(
        problem.Q, problem.K, problem.V, problem.log_G, problem.state, problem.sum_of_keys,
        deg=problem.deg, scale=problem.scale, chunk_size=chunk_size, return_final_state=True,
    )


_HAVE_NUMBA = importlib.util.find_spec("numba") is not None


def _cpu_supports(problem: Problem) -> str | None:
    if problem.device.type != "cpu":
        return f"the cpu backend runs on CPU tensors, got device {problem.device}"
    if not _HAVE_NUMBA:
        return "the cpu backend needs numba (pip install numba)"
    return None


def _cpu_forward(problem: Problem):
    from .cpu import power_retention_cpu

    return power_retention_cpu(problem)


_CORE_BACKENDS = (
    Backend("cpu", 10, _cpu_supports, _cpu_forward),
    Backend("reference", 0, _reference_supports, _reference_forward),
)


_discovered: tuple[tuple[Backend, ...], str | None] | None = None


def _discover_kernels() -> tuple[tuple[Backend, ...], str | None]:
    try:
        kernels = importlib.import_module("retention_kernels")
    except ImportError as error:
        return (), f"retention-kernels is not installed ({error}); pip install retention-kernels=={__version__}"
    version = getattr(kernels, "__version__", None)
    if version != __version__:
        message = (
            f"retention-kernels {version} does not match retention-core {__version__}; "
            f"pip install retention-kernels=={__version__}"
        )
        warnings.warn(message, RuntimeWarning, stacklevel=4)
        return (), message
    return tuple(kernels.backends()), None


def _kernel_backends() -> tuple[tuple[Backend, ...], str | None]:
    """Backends of ``retention_kernels`` and, when there are none, why. Discovered once (at ``import
    retention``), so that dispatch under ``torch.compile`` only reads a module global."""
    global _discovered
    if _discovered is None:
        _discovered = _discover_kernels()
    return _discovered


def reset_discovery() -> None:
    """Forget the discovered kernel backends (tests; after installing retention-kernels in a live process)."""
    global _discovered
    _discovered = None


def available_backends() -> dict[str, Backend]:
    """Every installed backend by name (whether it supports a given problem is asked separately)."""
    found = {backend.name: backend for backend in _CORE_BACKENDS}
    found.update({backend.name: backend for backend in _kernel_backends()[0]})
    return found


def get_backend(name: str) -> Backend:
    if not isinstance(name, str) or name not in BACKEND_NAMES:
        raise ValueError(f"backend must be one of {BACKEND_NAMES}, got {name!r}")
    backends = available_backends()
    if name not in backends:
        reason = _kernel_backends()[1] or f"retention-kernels provides no {name!r} backend on this platform"
        raise ValueError(f"backend={name!r} is not available: {reason}")
    return backends[name]


def select_backend(problem: Problem, name: str = "auto", need: str = "forward") -> Backend | None:
    """The backend that runs ``problem``: the named one (checked), or for ``"auto"`` the best that supports it.

    ``need="attend_window"`` asks for a backend with that (optional) operation; None when ``"auto"`` finds
    none (the caller then uses the plain PyTorch path).
    """
    if name != "auto":
        backend = get_backend(name)
        reason = backend.supports(problem)
        if reason is not None:
            raise ValueError(f"backend={name!r} cannot run this call: {reason}")
        return backend if getattr(backend, need) is not None else None
    candidates = sorted(available_backends().values(), key=lambda backend: -backend.priority_for(need))
    for backend in candidates:
        if getattr(backend, need) is not None and backend.supports(problem) is None:
            return backend
    if need == "forward":
        raise ValueError("no installed backend supports this call")  # unreachable: reference supports everything
    return None


def dtype_of_state(problem: Problem) -> tuple[torch.dtype, torch.dtype]:
    """Public dtypes: the state in the inputs' dtype, the sum of keys in fp32 (fp64 for fp64 inputs)."""
    return problem.Q.dtype, problem.compute_dtype
