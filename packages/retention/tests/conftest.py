"""Shared fixtures of the meta-package's tests: the release tools (tools/*.py) and the repository root."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[3]
# tools/ is a folder of scripts, not a package: make `import bump` and `import release` work as they do there.
if str(REPO_ROOT / "tools") not in sys.path:
    sys.path.insert(0, str(REPO_ROOT / "tools"))


@pytest.fixture
def repo_root() -> Path:
    return REPO_ROOT
