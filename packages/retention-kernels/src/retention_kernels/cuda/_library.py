"""Loading ``_retention_cuda.so`` (the CUDA kernels, plain C entry points) with ctypes.

The library links the CUDA runtime statically and nothing of torch or Python, so it loads on any machine (the
driver, ``libcuda``, is needed only when a kernel runs) and works with any torch release. Its argument structs
are mirrored here field by field; ``ABI_VERSION`` must equal the library's ``retention_cuda_abi_version()``.
``RETENTION_CUDA_LIBRARY=/path/to/_retention_cuda.so`` loads another build (tests, development).
"""

from __future__ import annotations

import ctypes
import functools
import importlib.util
import os

ABI_VERSION = 2
ENTRY_POINTS = ("retention_attend_window", "retention_fold_window", "retention_state_query",
                "retention_cuda_abi_version", "retention_cuda_last_error", "retention_cuda_archs",
                "retention_cuda_runtime_version", "retention_cuda_struct_sizes")
DTYPE_CODES = {"torch.float32": 0, "torch.float16": 1, "torch.bfloat16": 2}

_pointer = ctypes.c_void_p
_int = ctypes.c_int64


def _strides(name: str, n: int) -> tuple[str, type]:
    return name, _int * n


class AttendArgs(ctypes.Structure):
    """``RetentionAttendArgs`` of csrc/common.cuh."""

    _fields_ = [(name, _pointer) for name in ("q", "k", "v", "g", "state", "keys", "out", "index", "weight", "partial",
                                              "new_k", "new_v", "new_log_g", "raw_log_g", "length", "counters")] + \
        [(name, _int) for name in ("dtype", "b", "tq", "hq", "h", "w", "d", "e", "D", "deg", "splits", "append",
                                   "fold")] + \
        [("scale", ctypes.c_double)] + \
        [_strides(name, n) for name, n in (("sq", 4), ("sk", 4), ("sv", 4), ("sg", 3), ("ss", 4), ("sz", 3),
                                           ("so", 4), ("snk", 3), ("snv", 3), ("sng", 2), ("srg", 3))]


class StateQueryArgs(ctypes.Structure):
    """``RetentionStateQueryArgs`` of csrc/common.cuh."""

    _fields_ = [(name, _pointer) for name in ("q", "states", "keys", "g", "index", "weight", "num", "den")] + \
        [(name, _int) for name in ("dtype", "b", "t", "hq", "h", "d", "e", "D", "deg", "chunk", "n_chunks")] + \
        [("scale", ctypes.c_double)] + \
        [_strides(name, n) for name, n in (("sq", 4), ("ss", 4), ("sz", 4), ("sg", 3), ("sn", 4), ("sd", 3))]


class FoldArgs(ctypes.Structure):
    """``RetentionFoldArgs`` of csrc/common.cuh."""

    _fields_ = [(name, _pointer) for name in ("k", "v", "g", "state", "keys", "out_state", "out_keys", "index",
                                              "weight")] + \
        [(name, _int) for name in ("dtype", "b", "w", "h", "d", "e", "D", "deg")] + \
        [_strides(name, n) for name, n in (("sk", 4), ("sv", 4), ("sg", 3), ("ss", 4), ("sz", 3), ("sos", 4),
                                           ("soz", 3))]


class CudaKernelError(RuntimeError):
    """A CUDA entry point returned an error (its message names the call and the CUDA error)."""


def library_path() -> str | None:
    """Where the library is: ``RETENTION_CUDA_LIBRARY``, else next to this module (normal and editable installs:
    found as the module ``retention_kernels.cuda._retention_cuda``, never imported as one)."""
    override = os.environ.get("RETENTION_CUDA_LIBRARY")
    if override:
        return override
    spec = importlib.util.find_spec("retention_kernels.cuda._retention_cuda")
    return None if spec is None else spec.origin


@functools.cache
def load() -> tuple[ctypes.CDLL | None, str | None]:
    """``(library, None)``, or ``(None, reason)`` when there is no usable library."""
    path = library_path()
    if path is None:
        return None, ("retention-kernels was installed without its CUDA library (built without nvcc, or "
                      "RETENTION_SKIP_CUDA=1); install the platform wheel or rebuild with nvcc on PATH")
    try:
        library = ctypes.CDLL(path)
    except OSError as error:
        return None, f"the CUDA library {path} does not load: {error}"
    missing = [name for name in ENTRY_POINTS if not hasattr(library, name)]
    if missing:
        return None, f"the CUDA library {path} lacks the entry points {missing}"
    library.retention_cuda_abi_version.restype = ctypes.c_int
    version = library.retention_cuda_abi_version()
    if version != ABI_VERSION:
        return None, f"the CUDA library {path} has ABI version {version}, this package expects {ABI_VERSION}"
    sizes = (ctypes.c_int64 * 3)()
    library.retention_cuda_struct_sizes(sizes)
    expected = tuple(ctypes.sizeof(args) for args in (AttendArgs, StateQueryArgs, FoldArgs))
    if tuple(sizes) != expected:
        return None, f"the CUDA library {path} has argument structs of {tuple(sizes)} bytes, expected {expected}"
    library.retention_cuda_last_error.restype = ctypes.c_char_p
    library.retention_cuda_archs.restype = ctypes.c_char_p
    library.retention_cuda_runtime_version.restype = ctypes.c_int
    for name, args in (("retention_attend_window", AttendArgs), ("retention_fold_window", FoldArgs),
                       ("retention_state_query", StateQueryArgs)):
        function = getattr(library, name)
        function.argtypes = [ctypes.POINTER(args), ctypes.c_void_p]
        function.restype = ctypes.c_int
    return library, None


def library() -> ctypes.CDLL:
    """The loaded library, or RuntimeError with the reason it is unavailable."""
    loaded, reason = load()
    if loaded is None:
        raise RuntimeError(reason)
    return loaded


def compiled_architectures() -> tuple[tuple[int, bool], ...]:
    """``((80, True), (90, True), (90, False))``: each architecture and whether it is machine code (``real``) or
    PTX (``virtual``); a bare ``80`` is both."""
    text = library().retention_cuda_archs().decode()
    found = []
    for item in filter(None, text.replace(";", ",").split(",")):
        number, _, kind = item.partition("-")
        number = int(number.rstrip("a"))
        if kind in ("", "real"):
            found.append((number, True))
        if kind in ("", "virtual"):
            found.append((number, False))
    return tuple(found)


def call(name: str, args: ctypes.Structure, stream: int) -> None:
    """Run an entry point; CudaKernelError with the library's message when it fails."""
    lib = library()
    status = getattr(lib, name)(ctypes.byref(args), ctypes.c_void_p(stream))
    if status != 0:
        message = lib.retention_cuda_last_error().decode(errors="replace")
        raise CudaKernelError(f"{name} failed (code {status}): {message}")
