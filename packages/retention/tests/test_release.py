"""The release tools without network: version bookkeeping (tools/bump.py) and the refusals of tools/release.py."""

from __future__ import annotations

import http.server
import json
import shutil
import subprocess
import threading
from pathlib import Path

import bump
import pytest
import release
from packaging.version import Version


def copy_version_files(source: Path, target: Path) -> Path:
    """The files tools/bump.py reads, copied under ``target`` (a stand-in repository root)."""
    for distribution in bump.DISTRIBUTIONS:
        path = bump.pyproject_path(distribution, source).relative_to(source)
        (target / path).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(source / path, target / path)
    for module in bump.VERSION_MODULES:
        (target / module).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(source / module, target / module)
    return target


def test_every_version_in_the_repository_agrees(repo_root):
    found = bump.find_versions(repo_root)
    # Every package, every sibling pin and every __version__ was found...
    assert len([k for k in found if k.endswith(" pyproject")]) == len(bump.DISTRIBUTIONS)
    assert {"retention pins retention-core", "retention pins retention-kernels",
            "retention-kernels pins retention-core", "retention-train pins retention-core"} <= set(found)
    assert set(bump.VERSION_MODULES) <= set(found)
    # ...and they name one version.
    assert {Version(v) for v in found.values()} == {bump.common_version(repo_root)}


def test_bump_moves_every_package_at_once(repo_root, tmp_path):
    root = copy_version_files(repo_root, tmp_path)
    before = {p: p.read_text() for p in root.rglob("*") if p.is_file()}
    changed = bump.bump("2.3.1", root)
    assert set(changed) == set(before)  # every file holds a version
    assert set(bump.find_versions(root).values()) == {"2.3.1"}
    assert bump.common_version(root) == Version("2.3.1")
    meta = (root / "packages/retention/pyproject.toml").read_text()
    # Markers and the other dependencies are kept as they were.
    assert "retention-kernels==2.3.1; platform_system == 'Linux' and platform_machine == 'x86_64'" in meta
    kernels = (root / "packages/retention-kernels/pyproject.toml").read_text()
    assert "triton>=3.2" in kernels
    # Only version strings changed: undoing the bump restores every file byte for byte.
    old = str(bump.common_version(repo_root))
    bump.bump(old, root)
    assert {p: p.read_text() for p in before} == before


def test_bump_refuses_a_version_that_is_not_pep440(repo_root, tmp_path):
    root = copy_version_files(repo_root, tmp_path)
    with pytest.raises(ValueError, match=r"new_version: expected a PEP 440 version .* got 'two'"):
        bump.bump("two", root)
    assert bump.main(["--root", str(root), "two"]) == 2


def test_disagreeing_versions_are_listed(repo_root, tmp_path):
    root = copy_version_files(repo_root, tmp_path)
    module = root / "packages/retention-train/src/retention_train/__init__.py"
    module.write_text(module.read_text().replace(str(bump.common_version(repo_root)), "9.9.9"))
    with pytest.raises(ValueError, match=r"disagree(.|\n)*retention_train/__init__.py: 9.9.9"):
        bump.common_version(root)
    bump.bump("3.0.0", root)  # a bump repairs the disagreement
    assert bump.common_version(root) == Version("3.0.0")


def test_a_loose_sibling_requirement_is_an_error(repo_root, tmp_path):
    root = copy_version_files(repo_root, tmp_path)
    path = root / "packages/retention-train/pyproject.toml"
    path.write_text(path.read_text().replace("retention-core==", "retention-core>="))
    with pytest.raises(ValueError, match="must be an exact '==' pin"):
        bump.find_versions(root)


# -- the simple-index look-up -----------------------------------------------------------------------------


class FakeIndex:
    """A simple index on 127.0.0.1 serving fixed pages: ``pages[path] = (content type, body)``."""

    def __init__(self, pages: dict[str, tuple[str, str]]):
        owner = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                owner.accepts.append(self.headers.get("Accept", ""))
                if self.path not in pages:
                    self.send_error(404)
                    return
                content_type, body = pages[self.path]
                self.send_response(200)
                self.send_header("Content-Type", content_type)
                self.end_headers()
                self.wfile.write(body.encode())

            def log_message(self, *args):
                pass

        self.accepts: list[str] = []
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}/simple/"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()


HTML_CORE = """<!DOCTYPE html><html><body>
<a href="/packages/retention_core-2.1.tar.gz#sha256=00">retention_core-2.1.tar.gz</a>
<a href="../../packages/retention_core-2.1-py3-none-any.whl">retention_core-2.1-py3-none-any.whl</a>
<a href="/packages/retention_core-1.9.0rc1-py3-none-any.whl">retention_core-1.9.0rc1-py3-none-any.whl</a>
<a href="/packages/retention-core-0.1.win32.exe">an installer of an ancient release</a>
</body></html>"""
JSON_META = json.dumps({"meta": {"api-version": "1.0"}, "name": "retention",
                        "files": [{"filename": "retention-2.0.0-py3-none-any.whl", "url": "x", "hashes": {}}]})


def test_released_versions_reads_html_and_json_pages():
    pages = {"/simple/retention-core/": ("text/html", HTML_CORE),
             "/simple/retention/": ("application/vnd.pypi.simple.v1+json", JSON_META)}
    with FakeIndex(pages) as index:
        assert release.released_versions(index.url, "retention-core") == {Version("2.1"), Version("1.9.0rc1")}
        assert release.released_versions(index.url, "Retention_Core") == {Version("2.1"), Version("1.9.0rc1")}
        assert release.released_versions(index.url, "retention") == {Version("2.0.0")}
        assert release.released_versions(index.url, "retention-train") == set()  # 404: never released
    assert "application/vnd.pypi.simple.v1+json" in index.accepts[0]


def test_a_taken_version_is_refused_comparing_versions_not_strings():
    pages = {"/simple/retention-core/": ("text/html", HTML_CORE)}
    with FakeIndex(pages) as index:
        # 2.1 is on the index; 2.1.0 is the same release (a string comparison would miss it).
        with pytest.raises(release.ReleaseError, match=r"version 2.1.0 already exists .* retention-core"):
            release.check_version_is_new(index.url, Version("2.1.0"))
        release.check_version_is_new(index.url, Version("2.1.1"))
        release.check_version_is_new(index.url, Version("1.9.0"))  # the rc is not the final release


# -- the working tree ---------------------------------------------------------------------------------------


def git(root: Path, *args: str) -> None:
    subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=root, check=True,
                   capture_output=True)


def test_a_dirty_tree_is_refused(tmp_path):
    git(tmp_path, "init", "-q")
    (tmp_path / ".gitignore").write_text("dist/\n")
    (tmp_path / "a.txt").write_text("a")
    git(tmp_path, "add", ".")
    git(tmp_path, "commit", "-q", "-m", "first")
    release.check_clean_tree(tmp_path)
    (tmp_path / "dist").mkdir()
    (tmp_path / "dist" / "ignored.whl").write_text("")  # ignored files do not count
    release.check_clean_tree(tmp_path)
    (tmp_path / "untracked.py").write_text("")  # an sdist could pick it up
    with pytest.raises(release.ReleaseError, match=r"dirty(.|\n)*untracked.py"):
        release.check_clean_tree(tmp_path)
    (tmp_path / "untracked.py").unlink()
    (tmp_path / "a.txt").write_text("changed")
    with pytest.raises(release.ReleaseError, match=r"dirty(.|\n)*a.txt"):
        release.check_clean_tree(tmp_path)


def test_the_built_files_must_be_complete_and_at_one_version(tmp_path):
    names = [f"{d.replace('-', '_')}-2.0.0{suffix}" for d in bump.DISTRIBUTIONS
             for suffix in ("-py3-none-any.whl", ".tar.gz")]
    files = [tmp_path / name for name in names]
    release.check_built(files, Version("2.0.0"))
    with pytest.raises(release.ReleaseError, match="miss"):
        release.check_built(files[1:], Version("2.0.0"))
    with pytest.raises(release.ReleaseError, match=r"expected 2\.0\.1"):
        release.check_built(files, Version("2.0.1"))
