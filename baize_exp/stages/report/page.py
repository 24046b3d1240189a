"""A report as a list of blocks, written out twice: as markdown (images referenced by relative path) and as one
self-contained HTML page (images inlined as data: URLs), so both always carry the same sections."""

from __future__ import annotations

import base64
import html
import os
import re
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class Heading:
    text: str
    level: int = 2


@dataclass
class Text:
    """A paragraph of inline markdown (`code`, **bold**); `warn` makes it a loud box in HTML."""

    text: str
    warn: bool = False


@dataclass
class Table:
    header: list[str]
    rows: list[list[str]]
    row_classes: list[str] | None = None  # HTML only: e.g. "failed" colours a run that did not complete
    row_titles: list[str] | None = None  # HTML only: a tooltip per row (a failed run's error)


@dataclass
class Image:
    path: Path
    alt: str
    caption: str = ""  # what was left out of the chart and why


@dataclass
class Markdown:
    """Markdown written by another stage (the data card): copied into the .md, converted for the HTML."""

    text: str


@dataclass
class Samples:
    """Questions and each model's answer: a readable list in markdown, a table (one column per model) in HTML."""

    models: list[str]
    items: list[dict] = field(default_factory=list)  # {"question_id", "category", "question", "answers": {m: a}}


Block = Heading | Text | Table | Image | Markdown | Samples


def _md_cell(s: str) -> str:
    return s.replace("|", "\\|").replace("\n", " ")


def to_markdown(title: str, blocks: list[Block], base: Path) -> str:
    """Markdown with image paths relative to `base` (the folder the .md is written to)."""
    out = [f"# {title}", ""]
    for b in blocks:
        if isinstance(b, Heading):
            out += ["#" * b.level + " " + b.text, ""]
        elif isinstance(b, Text):
            out += [f"> **{b.text}**" if b.warn else b.text, ""]
        elif isinstance(b, Table):
            out += ["| " + " | ".join(_md_cell(h) for h in b.header) + " |", "|" + "---|" * len(b.header)]
            out += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in b.rows]
            out.append("")
        elif isinstance(b, Image):
            out.append(f"![{b.alt}]({Path(os.path.relpath(b.path, base)).as_posix()})")
            out += [f"*{b.caption}*", ""] if b.caption else [""]
        elif isinstance(b, Markdown):
            out += [b.text.rstrip(), ""]
        elif isinstance(b, Samples):
            for i, it in enumerate(b.items, 1):
                out += [f"**{i}. {it['category']}** (`{it['question_id']}`)", ""]
                out += _quote(it.get("question") or "(question text not recorded)") + [""]
                for m in b.models:
                    if m in it["answers"]:
                        out += [f"- **{m}**:", ""] + ["  " + q for q in _quote(_answer_text(it["answers"][m]))] + [""]
    return "\n".join(out).rstrip() + "\n"


def _quote(text: str) -> list[str]:
    # escaped, so an answer's own markup (or HTML) shows as text instead of being rendered
    return ["> " + html.escape(line, quote=False) if line.strip() else ">" for line in text.splitlines() or [""]]


ANSWER_CHARS = 700


def _answer_text(a: str | None) -> str:
    if a is None:
        return "(no answer)"
    if not a.strip():
        return "(empty answer)"
    return a if len(a) <= ANSWER_CHARS else a[:ANSWER_CHARS].rstrip() + f" … [{len(a) - ANSWER_CHARS} more chars]"


CSS = """
body{font-family:system-ui,sans-serif;margin:1.5em auto;max-width:1180px;padding:0 1em;line-height:1.4;color:#222}
h1{font-size:1.6em} h2{font-size:1.3em;border-bottom:1px solid #ddd;padding-bottom:2px;margin-top:1.6em}
.scroll{overflow-x:auto;max-width:100%;margin:.5em 0}
table{border-collapse:collapse;font-size:12.5px}
td,th{border:1px solid #ccc;padding:3px 6px;vertical-align:top;text-align:left;overflow-wrap:break-word}
th{background:#f3f3f3;position:sticky;top:0}
td.num{text-align:right;white-space:nowrap} td.nw{white-space:nowrap}
td.long{min-width:14em;max-width:32em}
tr.failed td{background:#fde2e2} tr.incomplete td{background:#fff4d6}
tr.better td.verdict{color:#176d2c;font-weight:600} tr.worse td.verdict{color:#a11;font-weight:600}
figure{margin:.8em 0} figure img{max-width:100%;height:auto;display:block} figcaption{font-size:12px;color:#555}
.warn{background:#fde2e2;border:2px solid #b00;color:#800;padding:.6em .8em;font-weight:700}
code{background:#f5f5f5;padding:0 2px;overflow-wrap:anywhere}
table.samples{width:100%;table-layout:fixed} table.samples td{white-space:pre-wrap;overflow-wrap:anywhere}
blockquote{margin:.3em 0 .3em 1em;color:#333}
"""
_NUM = re.compile(r"^[-+]?(\d[\d,]*\.?\d*(e[-+]?\d+)?|nan|inf|-)( \[.*\])?( n=\d+)?$", re.I)


def _inline(s: str) -> str:
    s = html.escape(s)
    s = re.sub(r"`([^`]+)`", r"<code>\1</code>", s)
    return re.sub(r"\*\*([^*]+)\*\*", r"<strong>\1</strong>", s)


def _breakable(s: str) -> str:
    """Escaped text with break opportunities after / and _, so paths and long keys wrap inside narrow cells
    (not after . or ,: a number must never be cut in two)."""
    return re.sub(r"([/_])", r"\1<wbr>", html.escape(s))


def _td(c: str, cls: str = "") -> str:
    classes = [cls] if cls else []
    if _NUM.match(c.strip()):
        classes.append("num")  # kept on one line: "5.78 [5, 6.67] n=9" reads only whole
        text = html.escape(c)
    elif len(c) <= 24:
        classes.append("nw")  # a run dir name or a short value: cut by hyphens it is unreadable
        text = html.escape(c)
    else:
        classes.append("long")
        text = _breakable(c)
    return f"<td class='{' '.join(classes)}'>{text}</td>"


def _table_html(t: Table) -> str:
    rows = ["<div class='scroll'><table>", "<tr>" + "".join(f"<th>{_breakable(h)}</th>" for h in t.header) + "</tr>"]
    verdict_col = t.header.index("verdict") if "verdict" in t.header else -1
    for i, row in enumerate(t.rows):
        cls = t.row_classes[i] if t.row_classes else ""
        title = t.row_titles[i] if t.row_titles else ""
        attrs = (f" class='{html.escape(cls)}'" if cls else "") + (f" title='{html.escape(title)}'" if title else "")
        cells = "".join(_td(c, "verdict" if j == verdict_col else "") for j, c in enumerate(row))
        rows.append(f"<tr{attrs}>{cells}</tr>")
    rows.append("</table></div>")
    return "\n".join(rows)


def markdown_to_html(text: str) -> str:
    """The small markdown the stages write (headings, pipe tables, bullet lists, paragraphs) as HTML."""
    out: list[str] = []
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i].rstrip()
        if not line.strip():
            i += 1
        elif m := re.match(r"^(#{1,6})\s+(.*)", line):
            out.append(f"<h{len(m[1])}>{_inline(m[2])}</h{len(m[1])}>")
            i += 1
        elif line.lstrip().startswith("|"):
            block = []
            while i < len(lines) and lines[i].lstrip().startswith("|"):
                block.append([c.strip() for c in lines[i].strip().strip("|").split("|")])
                i += 1
            body = [r for r in block[1:] if not all(re.fullmatch(r":?-+:?", c) for c in r)]
            out.append(_table_html(Table(block[0], body)))
        elif re.match(r"^\s*[-*]\s+", line):
            items = []
            while i < len(lines) and re.match(r"^\s*[-*]\s+", lines[i]):
                items.append("<li>" + _inline(re.sub(r"^\s*[-*]\s+", "", lines[i])) + "</li>")
                i += 1
            out.append("<ul>" + "".join(items) + "</ul>")
        else:
            para = []
            while i < len(lines) and lines[i].strip() and not re.match(r"^(#|\s*\||\s*[-*]\s)", lines[i]):
                para.append(lines[i].strip())
                i += 1
            out.append("<p>" + _inline(" ".join(para)) + "</p>")
    return "\n".join(out)


def _img_html(b: Image) -> str:
    data = base64.b64encode(b.path.read_bytes()).decode()
    cap = f"<figcaption>{_inline(b.caption)}</figcaption>" if b.caption else ""
    return f"<figure><img alt='{html.escape(b.alt)}' src='data:image/png;base64,{data}'>{cap}</figure>"


def _samples_html(b: Samples) -> str:
    head = "<tr><th>question</th>" + "".join(f"<th>{html.escape(m)}</th>" for m in b.models) + "</tr>"
    rows = []
    for it in b.items:
        q = (
            f"<strong>{html.escape(it['category'])}</strong> <code>{html.escape(it['question_id'])}</code>\n"
            + html.escape(it.get("question") or "(question text not recorded)")
        )
        cells = "".join(f"<td>{html.escape(_answer_text(it['answers'].get(m)))}</td>" for m in b.models)
        rows.append(f"<tr><td>{q}</td>{cells}</tr>")
    return "<div class='scroll'><table class='samples'>" + head + "".join(rows) + "</table></div>"


def to_html(title: str, blocks: list[Block]) -> str:
    """One self-contained page: plots inlined, so it can be mailed or attached as is."""
    out = [
        "<!doctype html><html><head><meta charset='utf-8'>",
        "<meta name='viewport' content='width=device-width, initial-scale=1'>",
        f"<title>{html.escape(title)}</title><style>{CSS}</style></head><body>",
        f"<h1>{_inline(title)}</h1>",
    ]
    for b in blocks:
        if isinstance(b, Heading):
            out.append(f"<h{b.level}>{_inline(b.text)}</h{b.level}>")
        elif isinstance(b, Text):
            out.append(f"<p class='warn'>{_inline(b.text)}</p>" if b.warn else f"<p>{_inline(b.text)}</p>")
        elif isinstance(b, Table):
            out.append(_table_html(b))
        elif isinstance(b, Image):
            out.append(_img_html(b))
        elif isinstance(b, Markdown):
            out.append(markdown_to_html(b.text))
        elif isinstance(b, Samples):
            out.append(_samples_html(b))
    out.append("</body></html>")
    return "\n".join(out)
