"""Read and move the version of every package of the monorepo at once.

    python tools/bump.py            # print the versions found and check that they agree
    python tools/bump.py 2.1.0      # move every package (and the sibling ``==`` pins) to 2.1.0

Where a version lives: each ``packages/*/pyproject.toml`` (``[project].version`` and the ``==`` pins on sibling
packages in ``[project].dependencies``) and the ``__version__`` of each importable package.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

import tomllib
from packaging.requirements import Requirement
from packaging.version import InvalidVersion, Version

ROOT = Path(__file__).resolve().parent.parent

# Distribution name -> its folder under packages/.
DISTRIBUTIONS = {
    "retention": "retention",
    "retention-core": "retention-core",
    "retention-kernels": "retention-kernels",
    "retention-train": "retention-train",
}
# Files holding ``__version__ = "..."`` (relative to the repository root).
VERSION_MODULES = (
    "packages/retention-core/src/retention/_version.py",
    "packages/retention-kernels/src/retention_kernels/__init__.py",
    "packages/retention-train/src/retention_train/__init__.py",
)

_PROJECT_VERSION = re.compile(r'^(version\s*=\s*")([^"]+)(")', re.MULTILINE)
_MODULE_VERSION = re.compile(r'^(__version__\s*=\s*")([^"]+)(")', re.MULTILINE)
# A sibling pin inside a dependency string: "retention-core==2.0.0" (markers may follow).
_SIBLING_NAMES = "|".join(re.escape(name) for name in sorted(DISTRIBUTIONS, key=len, reverse=True))
_SIBLING_PIN = re.compile(rf"(\b(?:{_SIBLING_NAMES})\s*==\s*)([^;,\s\"']+)")


def pyproject_path(distribution: str, root: Path = ROOT) -> Path:
    return root / "packages" / DISTRIBUTIONS[distribution] / "pyproject.toml"


def parse_version(text: str, argument: str = "version") -> Version:
    """``Version(text)``, or a ValueError naming the argument (PEP 440 versions only)."""
    try:
        return Version(text)
    except InvalidVersion:
        raise ValueError(f"{argument}: expected a PEP 440 version such as 2.1.0, got {text!r}") from None


def find_versions(root: Path = ROOT) -> dict[str, str]:
    """Every place a version is written, as ``{"where": "version"}``.

    Keys: ``"<dist> pyproject"``, ``"<dist> pins <sibling>"`` and the ``__version__`` module paths.
    """
    found: dict[str, str] = {}
    for distribution in DISTRIBUTIONS:
        project = tomllib.loads(pyproject_path(distribution, root).read_text())["project"]
        found[f"{distribution} pyproject"] = project["version"]
        for dependency in project.get("dependencies", []):
            requirement = Requirement(dependency)
            if requirement.name in DISTRIBUTIONS:
                specifiers = list(requirement.specifier)
                pinned = [s.version for s in specifiers if s.operator == "=="]
                if len(specifiers) != 1 or not pinned:
                    raise ValueError(f"{distribution}: sibling dependency {dependency!r} must be an exact '==' pin")
                found[f"{distribution} pins {requirement.name}"] = pinned[0]
    for module in VERSION_MODULES:
        match = _MODULE_VERSION.search((root / module).read_text())
        if match is None:
            raise ValueError(f"{module}: no __version__ = \"...\" line")
        found[module] = match.group(2)
    return found


def common_version(root: Path = ROOT) -> Version:
    """The one version of the monorepo; a ValueError listing the disagreements when they differ."""
    found = find_versions(root)
    distinct = {Version(v) for v in found.values()}
    if len(distinct) != 1:
        listing = "\n".join(f"  {where}: {version}" for where, version in sorted(found.items()))
        raise ValueError(f"the packages disagree on their version:\n{listing}")
    return distinct.pop()


def bump(new_version: str, root: Path = ROOT) -> list[Path]:
    """Write ``new_version`` everywhere a version lives; returns the files changed."""
    new = str(parse_version(new_version, "new_version"))  # normalised: '2.1' stays '2.1', 'v2.1' -> '2.1'
    changed = []
    for distribution in DISTRIBUTIONS:
        path = pyproject_path(distribution, root)
        text = path.read_text()
        project_start = text.index("[project]")  # only [project].version, not some [tool.*] version key
        head, body = text[:project_start], text[project_start:]
        body = _PROJECT_VERSION.sub(rf"\g<1>{new}\g<3>", body, count=1)
        body = _SIBLING_PIN.sub(rf"\g<1>{new}", body)
        changed += _write_if_changed(path, text, head + body)
    for module in VERSION_MODULES:
        path = root / module
        text = path.read_text()
        changed += _write_if_changed(path, text, _MODULE_VERSION.sub(rf"\g<1>{new}\g<3>", text, count=1))
    if common_version(root) != Version(new):  # every place was found and rewritten
        raise RuntimeError(f"bump to {new} left other versions behind: {find_versions(root)}")
    return changed


def _write_if_changed(path: Path, old: str, new: str) -> list[Path]:
    if old == new:
        return []
    path.write_text(new)
    return [path]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("version", nargs="?", help="the new version (PEP 440); without it, check and print")
    parser.add_argument("--root", type=Path, default=ROOT, help="repository root (default: this checkout)")
    args = parser.parse_args(argv)
    try:
        if args.version is None:
            print(common_version(args.root))
            return 0
        before = sorted(set(find_versions(args.root).values()))
        for path in bump(args.version, args.root):
            print(f"updated {path.relative_to(args.root)}")
        print(f"{', '.join(before)} -> {common_version(args.root)}")
    except ValueError as error:
        print(f"bump: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
