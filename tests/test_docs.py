"""Every relative link in the README and the docs resolves: the file exists inside the repository, and an anchor
names a heading of the file it points at (GitHub's heading ids). Moving a section between files breaks exactly
these links, and nothing else would notice."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [
    ROOT / "README.md",
    *sorted((ROOT / "docs").glob("*.md")),
    ROOT / "benchmarks" / "README.md",
    ROOT / "results" / "README.md",
]
LINK = re.compile(r"!?\[[^\]]*\]\(\s*([^)\s]+)(?:\s+\"[^\"]*\")?\s*\)")
CODE_SPAN = re.compile(r"`[^`]*`")
HEADING = re.compile(r"^#{1,6}\s+(.*?)\s*#*\s*$")
SCHEME = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*:")  # http:, https:, mailto: are not checked (no network)


def prose_lines(text: str) -> list[tuple[int, str]]:
    """(line number, line) outside fenced code blocks: a fence's contents are commands, not links."""
    lines, fence = [], None
    for number, line in enumerate(text.splitlines(), start=1):
        marker = line.lstrip()[:3]
        if marker in ("```", "~~~"):
            fence = None if fence == marker else (fence or marker)
            continue
        if fence is None:
            lines.append((number, line))
    return lines


def heading_ids(text: str) -> set[str]:
    """The anchors GitHub gives a file's headings: lower case, punctuation dropped, spaces to hyphens, and -1, -2
    after a repeated one."""
    ids: set[str] = set()
    seen: dict[str, int] = {}
    for _, line in prose_lines(text):
        m = HEADING.match(line)
        if not m:
            continue
        slug = re.sub(r"[^\w\- ]", "", m.group(1).strip().lower()).replace(" ", "-")
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        ids.add(slug if n == 0 else f"{slug}-{n}")
    return ids


def broken_links(md: Path, root: Path = ROOT) -> list[str]:
    """Each relative link of `md` that does not resolve, as `file:line: target: why`."""
    problems = []
    for number, line in prose_lines(md.read_text(encoding="utf-8")):
        for target in LINK.findall(CODE_SPAN.sub("", line)):
            if SCHEME.match(target):
                continue
            path, _, anchor = target.partition("#")
            dest = (md.parent / path).resolve() if path else md.resolve()
            where = f"{md.relative_to(root)}:{number}: {target}"
            if not dest.is_relative_to(root.resolve()):
                problems.append(f"{where}: outside the repository")
            elif not dest.exists():
                problems.append(f"{where}: no such file")
            elif anchor and dest.suffix == ".md" and anchor not in heading_ids(dest.read_text(encoding="utf-8")):
                problems.append(f"{where}: no heading with that id")
    return problems


@pytest.mark.parametrize("md", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(md: Path) -> None:
    assert md.is_file(), f"{md} is gone: update DOCS"
    assert broken_links(md) == []


def test_broken_links_are_found(tmp_path: Path) -> None:
    """Negative control: each way a link can break is reported, and what is not a link is left alone."""
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "other.md").write_text("# Other page\n\n## The run's files: `a.py`\n\n## Again\n## Again\n")
    md = tmp_path / "README.md"
    md.write_text(
        "# Title\n"
        "[ok](docs/other.md) [ok](docs/other.md#the-runs-files-apy) [ok](docs/other.md#again-1) [ok](#title)\n"
        "[web](https://example.com/x.md) `[code span](missing.md)`\n"
        "```\n[in a fence](missing.md)\n```\n"
        "[gone](docs/missing.md) ![image](docs/missing.png)\n"
        "[bad anchor](docs/other.md#no-such-heading) [bad local](#nope)\n"
        "[escapes](../outside.md)\n"
    )
    assert broken_links(md, tmp_path) == [
        "README.md:7: docs/missing.md: no such file",
        "README.md:7: docs/missing.png: no such file",
        "README.md:8: docs/other.md#no-such-heading: no heading with that id",
        "README.md:8: #nope: no heading with that id",
        "README.md:9: ../outside.md: outside the repository",
    ]
