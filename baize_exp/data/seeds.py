"""Seed questions and held-out questions: the shipped sets, seed files (.jsonl/.txt/.csv), the real releases through
`sources`, mixed by weight; the eval questions (the shipped 80, or FastChat's MT-bench / Vicuna-80 files); and the
guard that keeps near-copies of eval questions out of training (`EvalLeakGuard`)."""

from __future__ import annotations

import csv
import io
import logging
import math
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from baize_exp.errors import UserError
from baize_exp.io import content_hash, decode_utf8, iter_jsonl, read_jsonl

DATA_DIR = Path(__file__).resolve().parent
SEEDS_DIR = DATA_DIR / "seeds"
EVAL_QUESTIONS = DATA_DIR / "eval_questions.jsonl"
log = logging.getLogger(__name__)


@dataclass
class Seed:
    id: str
    source: str
    question: str


class SeedFileError(UserError, ValueError):
    """A seed file that cannot be read, naming the file and the line."""


SEED_FIELDS = ("question", "text", "instruction")


def load_seed_file(path: str | Path, source: str | None = None) -> list[Seed]:
    """Seeds from .jsonl (objects with "question", "text" or "instruction"), .txt (one a line) or .csv (a column
    of one of those names). Anything that is not a seed file of that kind is a SeedFileError (or JsonlError)
    naming the file and line: an unreadable file is never half-read into garbled seeds."""
    path = Path(path).expanduser()
    src = source or path.stem
    if not path.is_file():
        raise SeedFileError(f"seed file {path} does not exist")
    seeds: list[Seed] = []
    if path.suffix == ".jsonl":
        for line, rec in iter_jsonl(path):
            q = next((rec.get(k) for k in SEED_FIELDS if rec.get(k)), None) if isinstance(rec, dict) else None
            if not isinstance(q, str) or not q.strip():
                raise SeedFileError(
                    f"{path}:{line}: needs a non-empty string field 'question' (or 'text', "
                    f"'instruction'); found {_keys(rec)}"
                )
            seeds.append(Seed(str(rec.get("id", f"{src}-{line:05d}")), rec.get("source", src), q.strip()))
    elif path.suffix == ".txt":
        lines = [ln.strip() for ln in decode_utf8(path, path.read_bytes()).splitlines()]
        seeds = [Seed(f"{src}-{i + 1:05d}", src, q) for i, q in enumerate(x for x in lines if x)]
    elif path.suffix == ".csv":
        seeds = _csv_seeds(path, src)
    else:
        raise SeedFileError(f"{path}: unsupported seed file type {path.suffix!r} (use .jsonl, .txt or .csv)")
    if not seeds:
        raise SeedFileError(f"{path}: no seeds in the file (it is empty or every entry is blank)")
    return seeds


def _keys(rec: Any) -> str:
    return f"keys {sorted(rec)}" if isinstance(rec, dict) else f"a JSON {type(rec).__name__}"


def _csv_seeds(path: Path, src: str) -> list[Seed]:
    """A CSV's question column. A record that runs over several physical lines is what an unclosed or stray
    quote does (the next rows are swallowed into one garbled field), so it stops the load with the line numbers
    instead of becoming a seed; a seed with a real line break belongs in .jsonl."""
    text = decode_utf8(path, path.read_bytes())
    reader = csv.DictReader(io.StringIO(text, newline=""))
    col = next((c for c in SEED_FIELDS if c in (reader.fieldnames or [])), None)
    if col is None:
        raise SeedFileError(
            f"{path}:1: needs a 'question' (or 'text', 'instruction') column in the header, "
            f"found {reader.fieldnames or 'no header'}"
        )
    seeds, blank, start = [], [], reader.line_num
    for row in reader:
        first, start = start + 1, reader.line_num
        if start > first:
            raise SeedFileError(
                f"{path}:{first}-{start}: one CSV record runs over {start - first + 1} lines "
                f"(an unclosed or stray '\"' in line {first}?); quote a field that holds commas or "
                f'quotes as "..." with inner quotes doubled (""), or use a .jsonl seed file'
            )
        if None in row:
            raise SeedFileError(f"{path}:{first}: more fields than the header has columns (an unquoted comma?)")
        q = (row.get(col) or "").strip()
        if q:
            seeds.append(Seed(f"{src}-{len(seeds) + 1:05d}", src, q))
        else:
            blank.append(first)
    if blank and seeds:
        log.warning("%s: %d row(s) with an empty %r were skipped (lines %s)", path, len(blank), col, blank[:10])
    return seeds


def source_path(dcfg: Any, source: str) -> str | None:
    """The real file or folder `source` is read from: data.paths.<source>, or data.path for a one-source group."""
    paths = getattr(dcfg, "paths", None) or {}
    return paths.get(source) or (dcfg.path if list(dcfg.sources) == [source] else None)


def _sampled_pool(source: str, path: str | None, dcfg: Any) -> list[Seed]:
    from baize_exp.data import sources

    questions = sources.sample(sources.load_source(source, path, dcfg), dcfg.limit, dcfg.seed)
    if not questions:
        raise SeedFileError(f"data: no questions read from {path or dcfg.hf.path} ({source})")
    # ids from the text: the same question keeps its id whatever else is sampled
    return [Seed(f"{source}-{content_hash(q)[:10]}", source, q) for q in questions]


# Word-set Jaccard from which a seed or SDF prompt counts as a copy of an eval question. Set on the shipped pools
# (4 x 200 seeds against the 80 eval questions, tests/test_data_leaks.py): the two near-copies there score 0.71
# ("Write a short poem about the first snowfall of winter." against the eval's "... (8 to 12 lines) ...") and
# 0.70 ("Explain the difference between a virus and a bacterium."), the highest other pair 0.60 (templated
# questions such as "What is the difference between X and Y?" on other topics, and a poem about a city at night
# against three haiku about one).
EVAL_OVERLAP = 0.65
_WORD = re.compile(r"[a-z0-9']+")


def _word_set(text: str) -> frozenset[str]:
    return frozenset(_WORD.findall(text.lower()))


class EvalLeakGuard:
    """Which texts are near-copies of an eval question: word-set Jaccard >= `threshold` (an exact copy is 1).

    Built once over the eval questions; `match` costs a few dictionary look-ups per text whatever the number of
    questions (prefix filtering: words are ordered rarest-in-the-questions first, and two sets whose Jaccard
    reaches t share a word among the first |x| - ceil(t |x|) + 1 of each, so only the questions indexed under
    those words are compared exactly)."""

    def __init__(self, questions: list[str], threshold: float = EVAL_OVERLAP) -> None:
        self.threshold = threshold
        self.questions = [(q, _word_set(q)) for q in questions]
        df: dict[str, int] = {}
        for _, ws in self.questions:
            for w in ws:
                df[w] = df.get(w, 0) + 1
        self._df = df
        self._index: dict[str, list[int]] = {}
        for i, (_, ws) in enumerate(self.questions):
            for w in self._prefix(ws):
                self._index.setdefault(w, []).append(i)

    @classmethod
    def for_eval_questions(cls, path: str | Path | None = None, threshold: float = EVAL_OVERLAP) -> EvalLeakGuard:
        """A guard over an eval question file (None: the shipped 80)."""
        return cls([q["question"] for q in load_eval_questions(path)], threshold)

    def _prefix(self, ws: frozenset[str]) -> list[str]:
        ordered = sorted(ws, key=lambda w: (self._df.get(w, 0), w))
        return ordered[: len(ordered) - math.ceil(self.threshold * len(ordered)) + 1]

    def match(self, text: str) -> tuple[str, float] | None:
        """(the eval question `text` copies, their word-set Jaccard), the closest one; None if none reaches the
        threshold."""
        ws = _word_set(text)
        if not ws:
            return None
        best: tuple[str, float] | None = None
        for i in {i for w in self._prefix(ws) for i in self._index.get(w, ())}:
            q, qs = self.questions[i]
            j = len(ws & qs) / len(ws | qs)
            if j >= self.threshold and (best is None or j > best[1]):
                best = (q, j)
        return best


def load_seeds(dcfg: Any, stats: dict | None = None, guard: EvalLeakGuard | None = None) -> list[Seed]:
    """The seeds a `data` config selects: deduplicated, without near-copies of eval questions, mixed by weight,
    shuffled with `data.seed`, limited.

    A source read from its real release is sampled as it streams (`sources.sample`: seeded, bounded memory, in a
    seeded order whose first n are the sample of n, so a larger data.limit only adds seeds). `guard`: the eval
    questions no seed may copy (default: the shipped 80; `EvalLeakGuard([])` turns it off); a seed it matches is
    dropped before the limit is applied, so the count stays data.limit, and logged with the question it copies.
    `stats` gets "duplicate_seeds" (seeds dropped as repeats of another) and "eval_near_duplicates" (seeds dropped
    as near-copies of an eval question)."""
    sampled: set[str] = set()  # pools already in a seeded order (sources.sample)
    if dcfg.name == "file":
        pools = {"file": load_seed_file(dcfg.path)}
    else:
        names = list(dcfg.sources) + (["hf"] if dcfg.name == "hf" and "hf" not in dcfg.sources else [])
        pools = {}
        for s in names:
            path = source_path(dcfg, s)
            if s == "hf" or path:
                pools[s] = _sampled_pool(s, path, dcfg)
                sampled.add(s)
            else:
                pools[s] = load_seed_file(SEEDS_DIR / f"{s}.jsonl", s)
    rng = random.Random(dcfg.seed)
    guard = EvalLeakGuard.for_eval_questions() if guard is None else guard
    seen: set[str] = set()
    duplicates = leaks = 0
    for name in pools:  # dedup by normalised text, across sources too; no copy of an eval question
        uniq = []
        for s in pools[name]:
            k = re.sub(r"\s+", " ", s.question.lower()).strip()
            if k in seen:
                duplicates += 1
            elif copied := guard.match(s.question):
                leaks += 1
                log.info("seed %s dropped: a near-copy (word overlap %.2f) of eval question %r", s.id, *copied[::-1])
            else:
                seen.add(k)
                uniq.append(s)
        if name not in sampled:  # a sampled pool is in its seeded order already (a shuffle would break prefixes)
            rng.shuffle(uniq)
        pools[name] = uniq
    if stats is not None:
        stats["duplicate_seeds"] = duplicates
        stats["eval_near_duplicates"] = leaks
    weights = {n: float(dcfg.mix.get(n, 1.0)) for n in pools}
    total = sum(len(p) for p in pools.values())
    want = min(dcfg.limit or total, total)
    # Weighted round-robin: draw from the source whose share is furthest below its weight.
    taken = {n: 0 for n in pools}
    out: list[Seed] = []
    while len(out) < want:
        live = [n for n in pools if taken[n] < len(pools[n]) and weights[n] > 0]
        if not live:
            break
        n = min(live, key=lambda x: (taken[x] + 1) / weights[x])
        out.append(pools[n][taken[n]])
        taken[n] += 1
    return out


def load_eval_questions(path: str | Path | None = None, limit: int | None = None) -> list[dict]:
    """The held-out questions: {"question_id", "category", "question", "reference"?}.

    Also reads the question files of FastChat's MT-bench and Vicuna-80 sets ({"question_id", "category",
    "turns": [...], "reference": [...]?}, or the older "text"): the first turn is asked (the eval is single-turn;
    how many later turns were left out is logged), with the first reference answer."""
    where = path or EVAL_QUESTIONS
    recs = read_jsonl(where)
    later_turns = 0
    for i, r in enumerate(recs):
        if not isinstance(r, dict):
            raise SeedFileError(f"{where}:{i + 1}: a JSON {type(r).__name__}, expected an object with 'question'")
        if "question" not in r and isinstance(r.get("turns"), list) and r["turns"]:
            r["question"], later_turns = r["turns"][0], later_turns + len(r["turns"]) - 1
        elif "question" not in r and isinstance(r.get("text"), str):
            r["question"] = r["text"]
        if not isinstance(r.get("question"), str) or not r["question"].strip():
            raise SeedFileError(
                f"{where}:{i + 1}: needs a non-empty 'question' (or FastChat's 'turns' / 'text'); found {_keys(r)}"
            )
        if isinstance(r.get("reference"), list):
            r["reference"] = r["reference"][0] if r["reference"] else None
        if r.get("reference") is None:
            r.pop("reference", None)
        r["question_id"] = str(r.get("question_id", f"q{i + 1:03d}"))
        r.setdefault("category", "general")
    if later_turns:
        log.warning(
            "%s: %d later turns of multi-turn questions are not asked (the eval asks each question's first turn)",
            where,
            later_turns,
        )
    if limit:
        # Spread the limit over categories so a small eval still covers several kinds of question.
        by_cat: dict[str, list[dict]] = {}
        for r in recs:
            by_cat.setdefault(r["category"], []).append(r)
        picked: list[dict] = []
        while len(picked) < min(limit, len(recs)):
            for cat in list(by_cat):
                if by_cat[cat] and len(picked) < limit:
                    picked.append(by_cat[cat].pop(0))
        recs = picked
    return recs
