"""Shared fixtures of the retention-core tests.

``backend``: every backend that runs on CPU tensors here — ``"reference"`` always, ``"cpu"`` (numba) when
``retention.cpu`` exists, and ``"triton"`` only under ``TRITON_INTERPRET=1`` (slow; off in the default run).
``exact``: the dtype and tolerance of exact identities (chunk sizes, segments, GQA, inference): float64 to 1e-9
where the backend takes fp64 inputs (reference, cpu), else fp32 to 5e-5 (triton). ``require_dtype(dtype)``
skips a test whose dtype the backend does not take.
``generator``: a ``torch.Generator`` seeded from the test's id, so every test draws fresh inputs (different
from every other test's) that are reproducible run to run. The global torch seed is set the same way.
"""

from __future__ import annotations

import functools
import importlib.util
import os
from typing import NamedTuple

import pytest
import torch

from retention import power_retention
from retention._validate import validate
from retention.backends import available_backends, get_backend


def cpu_backend_names() -> list[str]:
    names = ["reference"]
    if importlib.util.find_spec("retention.cpu") is not None:
        names.append("cpu")
    if os.environ.get("TRITON_INTERPRET") == "1" and "triton" in available_backends():
        names.append("triton")
    return names


@pytest.fixture(params=cpu_backend_names())
def backend(request) -> str:
    return request.param


@pytest.fixture
def run(backend):
    """``power_retention`` bound to the test's backend."""
    return functools.partial(power_retention, backend=backend)


@functools.cache
def backend_takes(name: str, dtype: torch.dtype) -> bool:
    Q = torch.zeros(1, 1, 1, 1, dtype=dtype)
    problem = validate(Q, Q, Q, None, None, None, 2, None, None, False)
    return get_backend(name).supports(problem) is None


class Exact(NamedTuple):
    dtype: torch.dtype
    tolerance: float


@pytest.fixture
def exact(backend) -> Exact:
    if backend_takes(backend, torch.float64):
        return Exact(torch.float64, 1e-9)
    return Exact(torch.float32, 5e-5)


@pytest.fixture
def require_dtype(backend):
    def require(dtype: torch.dtype) -> None:
        if not backend_takes(backend, dtype):
            pytest.skip(f"backend {backend!r} does not take {dtype} inputs")

    return require
