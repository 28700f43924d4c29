"""Check every internal link of the built site: ``python docs/check_links.py site``.

Each ``href``/``src`` of every HTML page that points inside the site must name an existing file, and its
``#fragment`` an ``id`` on that page. External links (with a scheme or ``//``) are not fetched. Exits 1 and lists
the broken links when there are any. (``mkdocs build --strict`` checks the Markdown links; this checks what the
theme and mkdocstrings generated too.)
"""

from __future__ import annotations

import sys
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote, urlsplit


class _Page(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.links: list[str] = []
        self.ids: set[str] = set()

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        for name, value in attrs:
            if value is None:
                continue
            if name == "id":
                self.ids.add(value)
            elif (name == "href" and tag in ("a", "link")) or (name == "src" and tag in ("img", "script")):
                self.links.append(value)


def _parse(path: Path) -> _Page:
    page = _Page()
    page.feed(path.read_text(encoding="utf-8", errors="replace"))
    return page


def broken_links(site: Path) -> list[str]:
    pages = {path: _parse(path) for path in site.rglob("*.html")}
    broken = []
    for path, page in pages.items():
        for link in page.links:
            parts = urlsplit(link)
            if parts.scheme or link.startswith("//"):
                continue  # external, or mailto: and the like
            if not parts.path:
                target = path
            elif parts.path.startswith("/"):  # root-relative (404.html): the site is served from its root
                target = (site / unquote(parts.path).lstrip("/")).resolve()
            else:
                target = (path.parent / unquote(parts.path)).resolve()
            if target.is_dir():
                target = target / "index.html"
            if not target.exists():
                broken.append(f"{path.relative_to(site)}: {link} (no file {target})")
                continue
            if parts.fragment and target.suffix == ".html":
                ids = pages[target].ids if target in pages else _parse(target).ids
                if unquote(parts.fragment) not in ids:
                    broken.append(f"{path.relative_to(site)}: {link} (no id {parts.fragment!r})")
    return broken


def main(argv: list[str]) -> int:
    site = Path(argv[0] if argv else "site").resolve()
    if not (site / "index.html").exists():
        print(f"{site} holds no built site (index.html): run mkdocs build first", file=sys.stderr)
        return 2
    broken = broken_links(site)
    for line in broken:
        print(f"broken link: {line}", file=sys.stderr)
    pages = len(list(site.rglob("*.html")))
    print(f"checked the internal links of {pages} pages: {len(broken)} broken")
    return 1 if broken else 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
