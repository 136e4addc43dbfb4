"""The README and docs/ link to each other by relative paths and heading anchors: every such link
must reach an existing file and, where it names an anchor, a heading of that file (GitHub's slugs)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^ {0,3}(```|~~~).*?^ {0,3}\1[^\n]*$", re.M | re.S)
CODE_SPAN = re.compile(r"`[^`\n]*`")
INLINE = re.compile(r"!?\[(?:[^\]]|\n)*?\]\(\s*<?([^)\s>]+)>?(?:\s+(?:\"[^\"]*\"|'[^']*'))?\s*\)")
DEFINITION = re.compile(r"^ {0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s+.*)?$", re.M)
HTML = re.compile(r"<(?:a|img)\s[^>]*?(?:href|src)=[\"']([^\"']+)[\"']", re.I)


def prose(text: str) -> str:
    """The text outside fenced code blocks."""
    return FENCE.sub("", text)


def links(text: str) -> list[str]:
    """Every link target of a page: inline (with or without a title, text over several lines),
    reference definitions and HTML ``href`` / ``src``; none inside code."""
    body = CODE_SPAN.sub("", prose(text))
    return [m.group(1) for pattern in (INLINE, DEFINITION, HTML) for m in pattern.finditer(body)]


def slug(heading: str) -> str:
    """GitHub's anchor for a heading, from its rendered text: links become their text, emphasis and
    punctuation go, lower case, spaces as hyphens."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading.strip())
    text = re.sub(r"(?<![\w])_+|_+(?![\w])", "", text)
    text = re.sub(r"[^\w\- ]", "", text.lower())
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    seen: dict[str, int] = {}
    out = set()
    for line in prose(path.read_text(encoding="utf-8")).splitlines():
        match = re.match(r"^ {0,3}#{1,6} (.+?)\s*#*\s*$", line)
        if match:
            base = slug(match.group(1))
            n = seen.get(base, 0)
            seen[base] = n + 1
            out.add(base if n == 0 else f"{base}-{n}")
    return out


def test_slug_follows_github():
    assert slug("Quality: MovieLens user cold start (`coldstart-v1`)") == "quality-movielens-user-cold-start-coldstart-v1"
    assert slug("Other held-out users: seeds 1 to 4 (`benchmarks/seeds.py`)") == "other-held-out-users-seeds-1-to-4-benchmarksseedspy"
    assert slug("Speed, memory and scale") == "speed-memory-and-scale"
    assert slug("Noise (the details: [docs/movielens.md](docs/movielens.md))") == "noise-the-details-docsmovielensmd"
    assert slug("An _emphasised_ word and snake_case") == "an-emphasised-word-and-snake_case"


def test_links_finds_every_kind():
    page = 'a [x](a.md "title") b [wrapped\ntext](b.md#h) `[not](code.md)`\n[ref]: c.md\n<a href="d.md">d</a> ![i](e.png)\n```\n[no](f.md)\n```\n'
    assert sorted(links(page)) == ["a.md", "b.md#h", "c.md", "d.md", "e.png"]


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_relative_links_reach_a_file_and_a_heading(page):
    local = [link for link in links(page.read_text(encoding="utf-8")) if not re.match(r"^[a-z]+:", link)]
    if page.parent.name == "docs":  # a docs page links back into the README
        assert any(link.partition("#")[0] == "../README.md" for link in local)
    broken = []
    for link in local:
        target, _, anchor = link.partition("#")
        path = (page.parent / target).resolve() if target else page
        if not path.is_file():
            broken.append(f"{link}: no file {path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}")
        elif anchor and path.suffix == ".md" and anchor not in anchors(path):
            broken.append(f"{link}: no heading #{anchor} in {path.relative_to(ROOT)}")
    assert not broken, "\n".join(broken)
