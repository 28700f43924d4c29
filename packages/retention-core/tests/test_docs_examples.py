"""Every ```python block of the documentation runs (on CPU), and every API reference target imports.

The blocks of one page run in order in one namespace (a page is a walk-through: later blocks use earlier
names). Examples assert what they claim, so a passing run means the docs are true, not only that they run.
"""

from __future__ import annotations

import importlib
import re
from pathlib import Path

import pytest
import torch

DOCS = Path(__file__).resolve().parents[3] / "docs"
PAGES = sorted(DOCS.rglob("*.md"))
PYTHON_BLOCK = re.compile(r"^```python[^\n]*\n(.*?)^```\s*$", re.MULTILINE | re.DOTALL)
REFERENCE_TARGET = re.compile(r"^::: ([\w.]+)\s*$", re.MULTILINE)


def python_blocks(page: Path) -> list[tuple[int, str]]:
    """``(line number, code)`` of each ```python block of ``page``."""
    text = page.read_text(encoding="utf-8")
    return [(text.count("\n", 0, match.start()) + 2, match.group(1)) for match in PYTHON_BLOCK.finditer(text)]


def test_the_docs_are_found():
    assert (DOCS / "index.md").exists(), f"no docs at {DOCS}"
    pages_with_code = [page.name for page in PAGES if python_blocks(page)]
    for name in ("index.md", "quickstart.md", "math.md", "inference.md", "training.md", "installation.md"):
        assert name in pages_with_code, f"{name} has no ```python example"


@pytest.mark.parametrize("page", [p for p in PAGES if python_blocks(p)], ids=lambda p: str(p.relative_to(DOCS)))
def test_examples_run(page: Path, capsys):
    namespace: dict = {"__name__": f"docs_{page.stem}"}
    torch.manual_seed(0)
    for line, code in python_blocks(page):
        try:
            exec(compile(code, f"{page.relative_to(DOCS.parent)}:{line}", "exec"), namespace)
        except Exception as error:
            raise AssertionError(f"the example at {page.name} line {line} failed: {error!r}") from error


@pytest.mark.parametrize("page", sorted((DOCS / "reference").glob("*.md")), ids=lambda p: p.name)
def test_reference_targets_import(page: Path):
    targets = REFERENCE_TARGET.findall(page.read_text(encoding="utf-8"))
    assert targets, f"{page.name} documents nothing (no ::: target)"
    for target in targets:
        module_name, attribute = target, None
        while True:
            try:
                module = importlib.import_module(module_name)
                break
            except ModuleNotFoundError:
                module_name, _, tail = module_name.rpartition(".")
                attribute = tail if attribute is None else f"{tail}.{attribute}"
                assert module_name, f"{page.name}: ::: {target} names no module"
        for part in (attribute or "").split(".") if attribute else []:
            module = getattr(module, part)  # AttributeError names the missing member


def test_link_checker_finds_missing_files_and_anchors(tmp_path):
    import importlib.util

    spec = importlib.util.spec_from_file_location("check_links", DOCS / "check_links.py")
    check_links = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(check_links)
    (tmp_path / "guide").mkdir()
    (tmp_path / "index.html").write_text(
        '<a href="guide/">ok</a><a href="guide/#setup">ok</a><a href="https://example.org/x">external</a>'
        '<a href="#top" id="top">self</a><img src="missing.png"><a href="guide/#nowhere">bad anchor</a>'
        '<a href="/guide/index.html">root-relative</a>'
    )
    (tmp_path / "guide" / "index.html").write_text('<h2 id="setup">Setup</h2><a href="../index.html#top">up</a>')
    broken = check_links.broken_links(tmp_path)
    assert len(broken) == 2, broken
    assert "missing.png" in broken[0] and "'nowhere'" in broken[1]
    assert check_links.main([str(tmp_path)]) == 1
