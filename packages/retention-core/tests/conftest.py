"""Shared fixtures of the retention-core tests.

``backend``: every backend that runs on CPU tensors here — ``"reference"`` always, ``"cpu"`` (numba) when
``retention.cpu`` exists, and ``"triton"`` only under ``TRITON_INTERPRET=1`` (slow; off in the default run).
``generator``: a ``torch.Generator`` seeded from the test's id, so every test draws fresh inputs (different
from every other test's) that are reproducible run to run. The global torch seed is set the same way.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import zlib

import pytest
import torch

from retention import power_retention
from retention.backends import available_backends


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


def seed_of(request) -> int:
    return zlib.crc32(request.node.nodeid.encode())


@pytest.fixture(autouse=True)
def _seed_torch(request):
    torch.manual_seed(seed_of(request))


@pytest.fixture
def generator(request) -> torch.Generator:
    return torch.Generator().manual_seed(seed_of(request))
