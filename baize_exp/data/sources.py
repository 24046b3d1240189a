"""Seed questions from the real releases of the paper's four sources, and from any dataset `datasets` can load.

Each loader reads the layout its public release uses and yields questions one at a time (a StackOverflow
`Posts.xml` is tens of GB: it is parsed as a stream and each element freed), and `sample` keeps a seeded sample
of them in bounded memory, deduplicated:

- quora: the question-pairs file (`quora_duplicate_questions.tsv`, or Kaggle's `train.csv`: columns qid1, qid2,
  question1, question2, is_duplicate), or the HF `quora` layout (JSON lines with `questions: {id, text}`).
- stackoverflow: the data dump's `Posts.xml` (question posts only, PostTypeId 1), or a questions table
  (`Questions.csv` with Title and Body columns); the title, and optionally the body's first paragraph (HTML
  stripped).
- medical: MedQuAD (folders of XML documents with `<QAPair><Question>` elements).
- alpaca: `alpaca_data.json` (a JSON array) or `.jsonl` of instruction, input, output; the seed is the instruction
  with its input when there is one.
- hf: `datasets.load_dataset` on a local file or folder (json, jsonl, csv, parquet) or a hub id, with `data.field`
  naming a column or formatting several (`"{title}\\n{body}"`).
"""

from __future__ import annotations

import csv
import hashlib
import heapq
import html
import json
import re
import sys
import xml.etree.ElementTree as ET
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from baize_exp.errors import UserError


class SourceError(UserError, ValueError):
    """A source file that is not in the layout its loader reads, naming the file and what was expected."""


def _norm(text: str) -> str:
    return re.sub(r"\s+", " ", text.lower()).strip()


def sample(questions: Iterable[str], limit: int | None, seed: int) -> list[str]:
    """A seeded sample of `limit` distinct questions (all of them for None), in a seeded random order.

    Each question's rank is a hash of the seed and its normalised text, and the `limit` lowest are kept (a bounded
    heap): the same file and seed give the same sample however it is read, a duplicate can never be kept twice, and
    memory holds `limit` questions, never the file."""
    heap: list[tuple[int, str, str]] = []  # (-rank, normalised, text): a max-heap of the lowest ranks
    kept: set[str] = set()
    for q in questions:
        q = q.strip()
        if not q:
            continue
        k = _norm(q)
        if k in kept:
            continue
        rank = int.from_bytes(hashlib.blake2b(f"{seed}\0{k}".encode(), digest_size=8).digest(), "big")
        if limit is None or len(heap) < limit:
            heapq.heappush(heap, (-rank, k, q))
            kept.add(k)
        elif rank < -heap[0][0]:
            _, gone, _ = heapq.heappushpop(heap, (-rank, k, q))
            kept.discard(gone)
            kept.add(k)
    return [q for _, _, q in sorted(heap, key=lambda x: -x[0])]


def _open_text(path: Path) -> Any:
    return open(path, encoding="utf-8", errors="replace", newline="")


# --- quora ---------------------------------------------------------------------------------------------------------


def quora(path: Path) -> Iterator[str]:
    """Unique questions of a question-pairs file (TSV/CSV) or of the HF `quora` JSON-lines layout."""
    if path.suffix in (".jsonl", ".json"):
        with _open_text(path) as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                    yield from rec["questions"]["text"]
                except (json.JSONDecodeError, KeyError, TypeError) as e:
                    raise SourceError(
                        f"{path}:{n}: not the HF quora layout (a JSON object with questions.text): {type(e).__name__}"
                    ) from e
        return
    csv.field_size_limit(sys.maxsize)
    with _open_text(path) as f:
        head = f.readline()
        delim = "\t" if head.count("\t") > head.count(",") else ","
        f.seek(0)
        reader = csv.DictReader(f, delimiter=delim)
        need = {"question1", "question2"}
        if not need <= set(reader.fieldnames or []):
            raise SourceError(
                f"{path}:1: a Quora pairs file needs columns question1 and question2 (with qid1, "
                f"qid2), found {reader.fieldnames}"
            )
        seen: set[str] = set()
        for row in reader:
            for q, qid in ((row["question1"], row.get("qid1")), (row["question2"], row.get("qid2"))):
                key = qid or q
                if q and key not in seen:  # each question is in many pairs: once by its qid
                    seen.add(key)
                    yield q


# --- stackoverflow -------------------------------------------------------------------------------------------------

_TAG = re.compile(r"<[^>]+>")
_PARA = re.compile(r"<p>(.*?)</p>", re.DOTALL | re.IGNORECASE)


def first_paragraph(body_html: str, max_chars: int = 600) -> str:
    """The first paragraph of a post body as plain text (code blocks and markup dropped)."""
    m = _PARA.search(body_html)
    text = html.unescape(_TAG.sub("", m.group(1) if m else body_html.split("\n\n")[0]))
    text = re.sub(r"\s+", " ", text).strip()
    return text[:max_chars].rsplit(" ", 1)[0] + " ..." if len(text) > max_chars else text


def _so_seed(title: str, body: str | None, with_body: bool) -> str:
    title = html.unescape(title).strip()
    para = first_paragraph(body) if with_body and body else ""
    return f"{title}\n\n{para}" if para else title


def stackoverflow(path: Path, with_body: bool = False) -> Iterator[str]:
    """Question titles (and first paragraphs) from a `Posts.xml` dump, streamed, or a questions CSV table."""
    if path.suffix == ".csv":
        csv.field_size_limit(sys.maxsize)
        with _open_text(path) as f:
            reader = csv.DictReader(f)
            cols = {c.lower(): c for c in reader.fieldnames or []}
            if "title" not in cols:
                raise SourceError(
                    f"{path}:1: a StackOverflow questions table needs a Title column (and Body), "
                    f"found {reader.fieldnames}"
                )
            for row in reader:
                yield _so_seed(row[cols["title"]], row.get(cols.get("body", "")), with_body)
        return
    try:
        root = None
        for event, el in ET.iterparse(path, events=("start", "end")):
            if root is None:
                root = el  # <posts>: it keeps every row it has seen unless emptied
            if event == "end" and el.tag == "row":
                if el.get("PostTypeId") == "1" and el.get("Title"):
                    yield _so_seed(el.get("Title", ""), el.get("Body"), with_body)
                root.clear()  # the dump is tens of GB: never keep what was read, nor the emptied rows
    except ET.ParseError as e:
        raise SourceError(f"{path}: not a StackOverflow Posts.xml ({e}); a .csv questions table also works") from e


# --- medical (MedQuAD) ---------------------------------------------------------------------------------------------


def medquad(path: Path) -> Iterator[str]:
    """The questions of every MedQuAD XML document under `path` (a folder, or one file)."""
    files = sorted(path.rglob("*.xml")) if path.is_dir() else [path]
    if not files:
        raise SourceError(f"{path}: no .xml files (MedQuAD is a folder of XML documents with QAPair elements)")
    found = 0
    for f in files:
        try:
            root = ET.parse(f).getroot()
        except ET.ParseError as e:
            raise SourceError(f"{f}: not an XML document ({e})") from e
        for q in root.iter("Question"):
            if q.text and q.text.strip():
                found += 1
                yield q.text.strip()
    if not found:
        raise SourceError(f"{path}: no <Question> elements in {len(files)} XML file(s): not the MedQuAD layout")


# --- alpaca --------------------------------------------------------------------------------------------------------


def alpaca_records(path: Path) -> Iterator[dict]:
    """instruction/input/output records of `alpaca_data.json` (a JSON array) or a .jsonl of them."""
    if path.suffix == ".json":
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise SourceError(f"{path}:{e.lineno}: not JSON ({e.msg}); Alpaca's file is one JSON array") from e
        if not isinstance(data, list):
            raise SourceError(f"{path}: a JSON {type(data).__name__}, expected an array of instruction records")
        records: Iterable[tuple[int, Any]] = enumerate(data, 1)
        where = "record"
    else:
        from baize_exp.io import iter_jsonl

        records, where = iter_jsonl(path), "line"
    for n, rec in records:
        if not isinstance(rec, dict) or not isinstance(rec.get("instruction"), str) or not rec["instruction"].strip():
            raise SourceError(f"{path}: {where} {n}: needs a non-empty 'instruction' (with optional 'input', 'output')")
        yield rec


def alpaca_prompt(rec: dict) -> str:
    """The instruction, with its input (the text to translate, summarise, ...) when there is one."""
    inp = (rec.get("input") or "").strip()
    return f"{rec['instruction'].strip()}\n\n{inp}" if inp else rec["instruction"].strip()


def alpaca(path: Path) -> Iterator[str]:
    return (alpaca_prompt(r) for r in alpaca_records(path))


# --- any dataset ---------------------------------------------------------------------------------------------------

_BUILDERS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet", ".txt": "text"}


def hf_dataset(path: str, split: str = "train", name: str | None = None) -> Any:
    """`datasets.load_dataset` for a local file (by its suffix), a local folder, or a hub id."""
    import datasets

    p = Path(path).expanduser()
    try:
        if p.is_file():
            if p.suffix not in _BUILDERS:
                raise SourceError(
                    f"data.hf.path={path}: {p.suffix!r} files are not read (use one of {sorted(_BUILDERS)})"
                )
            return datasets.load_dataset(_BUILDERS[p.suffix], data_files=str(p), split=split)
        return datasets.load_dataset(str(p) if p.is_dir() else path, name, split=split)
    except (FileNotFoundError, ValueError, datasets.exceptions.DatasetNotFoundError) as e:
        if isinstance(e, SourceError):
            raise
        raise SourceError(
            f"data.hf.path={path} (split {split}): {type(e).__name__}: {str(e).splitlines()[0][:200]}"
        ) from e


def hf_questions(path: str, split: str, name: str | None, field: str | None) -> Iterator[str]:
    """One seed per row: the column `field` names, or `field` as a format over the columns ("{title}\\n{body}")."""
    ds = hf_dataset(path, split, name)
    cols = list(ds.column_names)
    if field is None:
        field = next((c for c in ("question", "text", "instruction", "prompt") if c in cols), None)
        if field is None:
            raise SourceError(
                f"data.hf.path={path}: set data.field to a column or a format such as "
                f"'{{title}}\\n{{body}}'; columns: {cols}"
            )
    fmt = field.replace("\\n", "\n") if "{" in field else "{" + field + "}"  # "\n" typed on a command line
    names = re.findall(r"{(\w+)}", fmt)
    missing = [c for c in names if c not in cols]
    if missing:
        raise SourceError(f"data.field={field!r}: no column {missing} in {path} (columns: {cols})")
    for row in ds:
        yield fmt.format(**{c: "" if row[c] is None else row[c] for c in names})


def load_source(source: str, path: str | None, dcfg: Any) -> Iterator[str]:
    """The questions of `source` read from `path` with its loader."""
    p = Path(path).expanduser() if path else None
    if source == "hf":
        h = dcfg.hf
        return hf_questions(h.path, h.split, h.name, dcfg.field)
    assert p is not None
    if not p.exists():
        raise SourceError(f"data: {source} file {p} does not exist")
    if source == "quora":
        return quora(p)
    if source == "stackoverflow":
        return stackoverflow(p, dcfg.stackoverflow_body)
    if source == "medical":
        return medquad(p)
    if source == "alpaca":
        return alpaca(p)
    raise SourceError(f"data: no loader for source {source!r}")
