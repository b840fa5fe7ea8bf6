"""The pictures the documentation shows: every image README.md and docs/**/*.md link exists, and
every image under docs/ is linked from one of them (none is left behind by a rewrite)."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
IMAGE_SUFFIXES = {".png", ".svg", ".jpg", ".jpeg", ".gif", ".webp"}
# Inline links and images [text](target "title"), reference definitions [id]: target, and <img src="...">.
LINKS = (
    re.compile(r"\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)"),
    re.compile(r"^ {0,3}\[[^\]]+\]:\s*<?([^\s>]+)>?", re.M),
    re.compile(r"<img\b[^>]*\bsrc\s*=\s*[\"']([^\"']+)[\"']", re.I),
)


def markdown_files() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]


def image_links(text: str) -> list[str]:
    """The local image files a markdown text links, as written (no URLs, no #anchors)."""
    targets = [m.group(1) for pattern in LINKS for m in pattern.finditer(text)]
    local = [t.split("#", 1)[0] for t in targets if not re.match(r"[a-z][a-z0-9+.-]*:", t, re.I)]
    return [t for t in local if Path(t).suffix.lower() in IMAGE_SUFFIXES]


def linked_images() -> dict[Path, list[str]]:
    """Each linked image file, resolved against the markdown file that links it -> where it is linked."""
    found: dict[Path, list[str]] = {}
    for md in markdown_files():
        for target in image_links(md.read_text()):
            found.setdefault((md.parent / target).resolve(), []).append(f"{md.relative_to(ROOT)}: {target}")
    return found


def test_the_link_finder_sees_images_in_every_link_form():
    text = """![heatmap](docs/a.png) and [the figure](b.svg "title") and <img width=3 src='c.jpg'>
[ref]: docs/d.png
not a link: `docs/e.png`; a page [docs](docs/memory.md), a remote ![x](https://example.com/f.png), ![y](g.png#x)
"""
    assert sorted(image_links(text)) == ["b.svg", "c.jpg", "docs/a.png", "docs/d.png", "g.png"]


def test_every_linked_image_exists():
    missing = [where for path, places in linked_images().items() if not path.is_file() for where in places]
    assert not missing, f"images linked but missing: {missing}"


def test_every_image_under_docs_is_linked_from_the_readme_or_docs():
    images = {p.resolve() for p in (ROOT / "docs").rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES}
    orphans = sorted(str(p.relative_to(ROOT)) for p in images - set(linked_images()))
    assert not orphans, f"images under docs/ that no README.md or docs/*.md links (link them or delete them): {orphans}"
