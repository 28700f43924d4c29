"""The reproducible environments agree with the packages' pyproject.toml constraints and with each other.

environment.yml (conda-forge pins), requirements/ci-lock.txt (the pip lock CI installs, with hashes) and
flake.nix (Nix: its minimum versions, asserted there against nixpkgs, and that it parses and evaluates).
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import tomllib
import yaml
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name
from packaging.version import Version

REPO_ROOT = Path(__file__).resolve().parents[3]
OUR_DISTRIBUTIONS = {"retention", "retention-core", "retention-kernels", "retention-train"}
# The platform every pin is for: CPython 3.11 on Linux x86_64.
LINUX_PY311 = {"python_version": "3.11", "python_full_version": "3.11.7", "sys_platform": "linux",
               "platform_system": "Linux", "platform_machine": "x86_64", "os_name": "posix",
               "implementation_name": "cpython", "platform_python_implementation": "CPython", "extra": ""}
# conda-forge names that differ from the PyPI ones.
CONDA_TO_PYPI = {"pytorch": "torch", "python-build": "build", "matplotlib-base": "matplotlib"}


def pyprojects() -> dict[str, dict]:
    paths = sorted((REPO_ROOT / "packages").glob("*/pyproject.toml"))
    return {path.parent.name: tomllib.loads(path.read_text()) for path in paths}


def third_party_requirements(markers: dict | None = LINUX_PY311) -> list[tuple[str, Requirement]]:
    """``(package, requirement)`` of every runtime and build dependency that is not one of ours.

    With ``markers``, only those that apply there; with None, all of them.
    """
    found = []
    for package, pyproject in pyprojects().items():
        lines = pyproject["project"].get("dependencies", []) + pyproject["build-system"]["requires"]
        for line in lines:
            requirement = Requirement(line)
            if canonicalize_name(requirement.name) in OUR_DISTRIBUTIONS:
                continue
            if markers is None or requirement.marker is None or requirement.marker.evaluate(markers):
                found.append((package, requirement))
    assert found, "no dependency found: the pyproject layout changed"
    return found


def conda_pins() -> tuple[str, dict[str, Version]]:
    """environment.yml: the python pin and ``{PyPI name: version}`` of every other conda package."""
    environment = yaml.safe_load((REPO_ROOT / "environment.yml").read_text())
    assert environment["channels"][0] == "conda-forge"
    python, pins = None, {}
    for entry in environment["dependencies"]:
        if not isinstance(entry, str) or entry == "pip":
            continue
        name, _, version = entry.partition("=")
        assert version and not version.startswith("=") and "*" not in version, f"{entry}: not pinned exactly"
        if name == "python":
            python = version
        else:
            pins[canonicalize_name(CONDA_TO_PYPI.get(name, name))] = Version(version)
    assert python is not None, "environment.yml pins no python"
    return python, pins


def lock_pins() -> dict[str, Version]:
    """requirements/ci-lock.txt: ``{name: version}``; every pin carries at least one sha256 hash."""
    text = (REPO_ROOT / "requirements/ci-lock.txt").read_text()
    entries = re.findall(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==(\S+)((?: \\\n\s+--hash=sha256:[0-9a-f]{64})*)",
                         text, re.MULTILINE)
    pins = {}
    for name, version, hashes in entries:
        assert hashes, f"{name}=={version} has no hash in the lock"
        pins[canonicalize_name(name)] = Version(version)
    requirement_lines = [line for line in text.splitlines() if re.match(r"^[A-Za-z0-9]", line)]
    assert len(pins) == len(requirement_lines), "a lock entry is not of the form name==version --hash=..."
    return pins


def satisfied(pins: dict[str, Version], requirement: Requirement, where: str) -> None:
    name = canonicalize_name(requirement.name)
    assert name in pins, f"{where} misses {requirement.name}"
    assert requirement.specifier.contains(pins[name], prereleases=True), \
        f"{where} pins {name} {pins[name]}, which does not satisfy {requirement}"


# -- environment.yml --------------------------------------------------------------------------------------------


def test_conda_pins_satisfy_every_pyproject_constraint():
    python, pins = conda_pins()
    for package, requirement in third_party_requirements():
        satisfied(pins, requirement, f"environment.yml (for {package})")
    for package, pyproject in pyprojects().items():
        assert SpecifierSet(pyproject["project"]["requires-python"]).contains(f"{python}.0"), package


def test_conda_pins_the_tools_of_the_issue():
    python, pins = conda_pins()
    assert python == "3.11"
    wanted = {"torch", "triton", "numba", "nox", "mkdocs-material", "build", "twine", "pytest", "hypothesis",
              "pypiserver", "hatchling", "ruff"}
    assert wanted <= set(pins), f"environment.yml misses {sorted(wanted - set(pins))}"


def test_conda_and_the_pip_lock_pin_the_same_versions():
    _, conda = conda_pins()
    lock = lock_pins()
    differ = {name: (str(conda[name]), str(lock[name])) for name in set(conda) & set(lock)
              if Version(lock[name].public) != conda[name]}  # the lock's torch is 2.13.0+cpu
    assert not differ, f"environment.yml and requirements/ci-lock.txt differ (conda, lock): {differ}"
    assert len(set(conda) & set(lock)) >= 15


# -- the pip lock -------------------------------------------------------------------------------------------------


def test_the_lock_satisfies_every_pyproject_constraint_and_its_input():
    pins = lock_pins()
    for package, requirement in third_party_requirements():
        satisfied(pins, requirement, f"requirements/ci-lock.txt (for {package})")
    inputs = [line.split("#")[0].strip() for line in (REPO_ROOT / "requirements/ci.in").read_text().splitlines()]
    for line in filter(None, inputs):
        satisfied(pins, Requirement(line), "requirements/ci-lock.txt (for requirements/ci.in)")


def test_the_lock_takes_the_cpu_torch_never_a_cuda_build():
    pins = lock_pins()
    assert pins["torch"].local == "cpu", f"torch {pins['torch']} in the lock is not the CPU build"
    assert not [name for name in pins if name.startswith("nvidia-")], "a CUDA library is in the lock"
    # The same torch as the constraint CI gives pip (constraints/cpu.txt).
    constraints = [Requirement(line) for line in (REPO_ROOT / "constraints/cpu.txt").read_text().splitlines()
                   if line.strip() and not line.startswith("#")]
    satisfied(pins, next(c for c in constraints if c.name == "torch"), "requirements/ci-lock.txt")


# -- flake.nix ----------------------------------------------------------------------------------------------------


def flake_text() -> str:
    return (REPO_ROOT / "flake.nix").read_text()


def flake_minimum_versions() -> dict[str, str]:
    block = re.search(r"minimumVersions = \{(.*?)\};", flake_text(), re.DOTALL)
    assert block, "flake.nix has no minimumVersions = { ... };"
    return dict(re.findall(r'([A-Za-z0-9_-]+) = "([^"]+)";', block.group(1)))


def test_flake_minimum_versions_are_the_pyproject_lower_bounds():
    lower_bounds: dict[str, set[str]] = {}
    for _, requirement in third_party_requirements(markers=None):
        for specifier in requirement.specifier:
            if specifier.operator == ">=":
                lower_bounds.setdefault(canonicalize_name(requirement.name), set()).add(specifier.version)
    assert all(len(v) == 1 for v in lower_bounds.values()), f"packages disagree on a lower bound: {lower_bounds}"
    expected = {name: versions.pop() for name, versions in lower_bounds.items()}
    assert flake_minimum_versions() == expected


def test_flake_uses_the_python_of_the_other_environments():
    python, _ = conda_pins()
    assert f"python = pkgs.python{python.replace('.', '')};" in flake_text()


NIX_INSTANTIATE = shutil.which("nix-instantiate")
needs_nix = pytest.mark.skipif(NIX_INSTANTIATE is None, reason="nix-instantiate is not installed (Debian: "
                                                               "apt-get install -y nix-bin)")


@needs_nix
def test_flake_parses():
    result = subprocess.run([NIX_INSTANTIATE, "--parse", str(REPO_ROOT / "flake.nix")], capture_output=True,
                            text=True)
    assert result.returncode == 0, result.stderr


STUB_NIXPKGS = """
{ system }:
let
  package = pname: version: { inherit pname version; };
  versions = __VERSIONS__;
  py = builtins.mapAttrs package versions // {
    buildPythonPackage = args: args;
  };
in {
  lib = {
    versionAtLeast = a: b: builtins.compareVersions a b >= 0;
    assertMsg = condition: message: condition || throw message;
    optional = condition: x: if condition then [ x ] else [ ];
  };
  python311 = { pkgs = py; withPackages = select: select py; };
  mkShell = args: args;
  ruff = { }; uv = { }; gnumake = { }; git = { }; cmake = { }; ninja = { };
}
"""
STUB_EVALUATION = """
let
  flake = import __FLAKE__;
  outputs = flake.outputs {
    self = { };
    nixpkgs = __STUB__;
    flake-utils = { lib.eachSystem = systems: perSystem: perSystem "x86_64-linux"; };
  };
  names = map (p: p.pname);
  packages = outputs.packages;
in {
  versions = builtins.mapAttrs (_: p: p.version) packages;
  default = packages.default.pname;
  meta = names packages.retention.dependencies;
  kernels = names packages.retention-kernels.dependencies;
  core = names packages.retention-core.dependencies;
  shell = builtins.length (builtins.head outputs.devShells.default.packages);
}
"""
NIXPKGS_VERSIONS = {"torch": "2.13.0", "numpy": "2.4.6", "numba": "0.68.1", "scipy": "1.17.1", "threadpoolctl": "3.8.0",
                    "triton": "3.9.0",
                    "tqdm": "4.70.1", "matplotlib": "3.11.2", "hatchling": "1.33.0", "pytest": "9.2.0",
                    "hypothesis": "6.170.15", "pytest-timeout": "2.4.0", "pyyaml": "6.0.3", "nox": "2026.10.20",
                    "build": "1.6.1", "twine": "7.0.0", "packaging": "26.3", "pypiserver": "2.4.2",
                    "mkdocs-material": "9.8.1", "editables": "0.6", "scikit-build-core": "1.1.2"}


def evaluate_flake(tmp_path: Path, versions: dict[str, str]) -> subprocess.CompletedProcess:
    """The flake's outputs for x86_64-linux, with a stand-in nixpkgs whose Python packages have ``versions``."""
    attrs = "{ " + " ".join(f'"{name}" = "{version}";' for name, version in versions.items()) + " }"
    stub = tmp_path / "nixpkgs.nix"
    stub.write_text(STUB_NIXPKGS.replace("__VERSIONS__", attrs))
    expression = STUB_EVALUATION.replace("__FLAKE__", str(REPO_ROOT / "flake.nix")).replace("__STUB__", str(stub))
    return subprocess.run([NIX_INSTANTIATE, "--eval", "--strict", "--json", "--expr", expression],
                          capture_output=True, text=True)


@needs_nix
def test_flake_builds_every_package_at_the_pyproject_version(tmp_path):
    result = evaluate_flake(tmp_path, NIXPKGS_VERSIONS)
    assert result.returncode == 0, result.stderr
    outputs = json.loads(result.stdout)
    expected = {pyproject["project"]["name"]: pyproject["project"]["version"] for pyproject in pyprojects().values()}
    assert outputs["versions"] == {**expected, "default": expected["retention"]}
    assert outputs["default"] == "retention"
    assert outputs["meta"] == ["retention-core", "retention-kernels"]
    assert outputs["kernels"] == ["retention-core", "triton"]
    assert outputs["core"] == ["torch", "numpy", "numba", "scipy", "threadpoolctl"]
    assert outputs["shell"] == len(NIXPKGS_VERSIONS)


@needs_nix
def test_flake_refuses_a_nixpkgs_torch_older_than_the_pyproject_bound(tmp_path):
    result = evaluate_flake(tmp_path, {**NIXPKGS_VERSIONS, "torch": "2.3.1"})
    assert result.returncode != 0
    assert "nixpkgs has torch 2.3.1, retention needs >= 2.4" in result.stderr
