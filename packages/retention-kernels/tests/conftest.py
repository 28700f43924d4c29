"""Without CUDA, every Triton kernel of ``retention_kernels`` runs under the interpreter (CI): triton reads
``TRITON_INTERPRET`` when a kernel is decorated, so it is set while the kernel modules are imported, then
restored, so that ``backend="auto"`` in the other packages' tests keeps choosing the CPU backend. Tests that
call the Triton backend on CPU tensors set it again (fixture ``interpreter``)."""

from __future__ import annotations

import importlib
import importlib.util
import os
import pkgutil
import subprocess
import sys

import pytest
import torch

if not torch.cuda.is_available() and importlib.util.find_spec("triton") is not None:
    _previous = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        import retention_kernels.triton as _kernels

        for _module in pkgutil.iter_modules(_kernels.__path__):
            importlib.import_module(f"retention_kernels.triton.{_module.name}")
    finally:
        if _previous is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = _previous


@pytest.fixture
def interpreter(monkeypatch):
    """The device the Triton backend runs on here: CUDA, or CPU under the interpreter."""
    if torch.cuda.is_available():
        return "cuda"
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    return "cpu"


@pytest.fixture
def run_compiled():
    """``run_compiled(*args, timeout=600)`` runs ``python *args`` in a process where the Triton kernels compile
    (``TRITON_INTERPRET`` unset): the compiler type-checks what the interpreter lets through. Returns the
    ``subprocess.CompletedProcess`` (text output captured)."""
    env = {name: value for name, value in os.environ.items() if name != "TRITON_INTERPRET"}

    def run(*args, timeout=600):
        return subprocess.run([sys.executable, *args], env=env, capture_output=True, text=True, timeout=timeout)

    return run
