"""Automation: `nox -s tests`, `nox -s lint`, `nox -s bench`, `nox -s docs` ...

Sessions run on the Python that runs nox, reuse their virtualenvs and install the local packages editable.
On CPU-only machines set ``PIP_CONSTRAINT=constraints/cpu.txt`` (CI does) so pip takes the CPU wheel of torch.
"""

from __future__ import annotations

from pathlib import Path

import nox

ROOT = Path(__file__).parent
PACKAGES = ROOT / "packages"
LOCAL = [f"{PACKAGES / name}" for name in ("retention-core", "retention-kernels", "retention-train", "retention")]

nox.options.reuse_existing_virtualenvs = True
nox.options.sessions = ["lint", "tests"]


def install_local(session: nox.Session, *extras: str) -> None:
    """Install every package editable (the meta-package plainly: it has no code)."""
    session.install("-e", LOCAL[0], "-e", LOCAL[1], "-e", LOCAL[2], *extras)
    session.install("--no-deps", LOCAL[3])


@nox.session
def tests(session: nox.Session) -> None:
    """Every package's tests; arguments after `--` go to pytest."""
    install_local(session, "pytest>=8", "hypothesis>=6.100", "pytest-timeout", "triton>=3.2")
    session.run("pytest", *session.posargs, env={"NUMBA_CACHE_DIR": str(ROOT / ".nox" / "numba-cache")})


@nox.session
def lint(session: nox.Session) -> None:
    """ruff check."""
    session.install("ruff>=0.6")
    session.run("ruff", "check", ".")
