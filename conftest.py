"""Shared by every package's tests: each test draws fresh random inputs from its own seed (the CRC of its id),
so tests differ from one another while a CI run is reproducible."""

from __future__ import annotations

import zlib

import pytest
import torch


def seed_of(request) -> int:
    return zlib.crc32(request.node.nodeid.encode())


@pytest.fixture(autouse=True)
def _seed_torch(request):
    torch.manual_seed(seed_of(request))


@pytest.fixture
def generator(request) -> torch.Generator:
    """A generator seeded like the test, for code that takes one explicitly."""
    return torch.Generator().manual_seed(seed_of(request))
