"""Shared fixtures: a small slice of the embedded corpus, prepared once per test session."""

from __future__ import annotations

import pytest

from retention_train.data import prepare_default


@pytest.fixture(scope="session")
def data_root(tmp_path_factory):
    """A data root whose ``default`` dataset is 300 kB of standard-library source (bytes)."""
    root = tmp_path_factory.mktemp("data")
    prepare_default(root / "default", max_bytes=300_000)
    return root
