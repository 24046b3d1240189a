"""Seed sources, the dialog record, transcript parsing and the text formats models are trained on."""

from __future__ import annotations

import csv
import io
import logging
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

BAIZE_HEADER = "The conversation between human and AI assistant."
BAIZE_HUMAN, BAIZE_AI = "[|Human|]", "[|AI|]"

# Reasons a seed becomes a reject instead of a dialog (the documented set; a reject is final): an empty reply or
# turn, no [Human]/[AI] markers (unparsable), turns out of order, fewer than collect.min_turns turns, a reply cut by
# the length limit (finish_reason "length", collect.on_truncated=reject), a seed over collect.max_seed_tokens (no
# request sent), a 400 the endpoint gave for this request alone (e.g. context_length_exceeded), a reply far longer
# than max_tokens allows (kept only in part). A request that failed for a transient reason is no reject: it is
# recorded in failures.jsonl and asked again.
REJECT_REASONS = (
    "empty",
    "no_transcript",
    "role_order",
    "too_few_turns",
    "length",
    "too_long",
    "bad_request",
    "oversized",
)


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


def load_seeds(dcfg: Any, stats: dict | None = None) -> list[Seed]:
    """The seeds a `data` config selects: deduplicated, mixed by weight, shuffled with `data.seed`, limited.

    A source read from its real release is sampled as it streams (`sources.sample`: seeded, bounded memory, in a
    seeded order whose first n are the sample of n, so a larger data.limit only adds seeds). `stats` gets
    "duplicate_seeds": how many seeds were dropped as repeats of another."""
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
    seen: set[str] = set()
    duplicates = 0
    for name in pools:  # dedup by normalised text, across sources too
        uniq = []
        for s in pools[name]:
            k = re.sub(r"\s+", " ", s.question.lower()).strip()
            if k not in seen:
                seen.add(k)
                uniq.append(s)
            else:
                duplicates += 1
        if name not in sampled:  # a sampled pool is in its seeded order already (a shuffle would break prefixes)
            rng.shuffle(uniq)
        pools[name] = uniq
    if stats is not None:
        stats["duplicate_seeds"] = duplicates
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


# --- transcripts -------------------------------------------------------------------------------------------

_MARK = re.compile(r"^\s*\[(Human|AI)\]\s*:?\s*", re.IGNORECASE | re.MULTILINE)


@dataclass
class Parsed:
    turns: list[dict] | None
    reason: str | None = None
    detail: str = ""


def parse_transcript(text: str, seed: str, min_turns: int = 2, truncated: bool = False) -> Parsed:
    """Parse a teacher's `[Human] ... [AI] ...` transcript into turns, strictly.

    Prose before the first marker is dropped (models often announce the transcript). The dialog must start with
    the human, alternate roles and have at least `min_turns` turns. If the reply was cut by the length limit, the
    last (unfinished) turn is dropped. A dialog that starts with an AI turn answers the seed: the seed becomes the
    human's first turn. The model repeating an exchange it already wrote ends the dialog there.
    """
    if not text or not text.strip():
        return Parsed(None, "empty")
    marks = list(_MARK.finditer(text))
    if not marks:
        return Parsed(None, "no_transcript", "no [Human]/[AI] markers")
    turns = []
    for i, m in enumerate(marks):
        end = marks[i + 1].start() if i + 1 < len(marks) else len(text)
        body = text[m.end() : end].strip()
        turns.append({"role": "human" if m.group(1).lower() == "human" else "ai", "text": body})
    if truncated and turns:
        turns = turns[:-1]
    if turns and not turns[-1]["text"]:
        turns.pop()  # a marker with nothing after it ends many replies
    if turns and turns[0]["role"] == "ai":
        turns.insert(0, {"role": "human", "text": seed})
    for i, t in enumerate(turns):
        want = "human" if i % 2 == 0 else "ai"
        if t["role"] != want:
            return Parsed(None, "role_order", f"turn {i + 1} is {t['role']}, expected {want}")
        if not t["text"]:
            return Parsed(None, "empty", f"turn {i + 1} is empty")
    seen, kept = set(), []
    for i in range(0, len(turns) - 1, 2):
        pair = (turns[i]["text"], turns[i + 1]["text"])
        if pair in seen:
            break
        seen.add(pair)
        kept += [turns[i], turns[i + 1]]
    turns = kept
    if len(turns) < min_turns:
        return Parsed(None, "too_few_turns", f"{len(turns)} complete turns, need {min_turns}")
    return Parsed(turns)


# --- dialog files ------------------------------------------------------------------------------------------

# Why a dialog in a dialogs file is not trained on (the documented set): no turns at all, a turn with no text,
# a dialog that starts with the AI, two turns of one role in a row, no AI turn to learn from.
DIALOG_REJECTS = ("empty_dialog", "empty_turn", "ai_first", "role_order", "no_ai_turn")


class DialogFileError(UserError, ValueError):
    """A dialogs file that is not in the dialog format at all, naming the file and line."""


def dialog_shape_error(d: Any) -> str | None:
    """What makes `d` not a dialog record (not an object, no 'turns' list, a turn that is not
    {'role': 'human'|'ai', 'text': str}), or None. A file with such a record is in another format: an error."""
    if not isinstance(d, dict):
        return f"a JSON {type(d).__name__}, not a dialog object"
    turns = d.get("turns")
    if not isinstance(turns, list):
        return f"no 'turns' list (keys {sorted(d)})"
    for k, t in enumerate(turns, start=1):
        if not isinstance(t, dict) or not isinstance(t.get("text"), str):
            return f"turn {k} is not {{'role': ..., 'text': str}}"
        if t.get("role") not in ("human", "ai"):
            return f"turn {k} has role {t.get('role')!r}; roles are 'human' and 'ai'"
    return None


def dialog_reject(turns: list[dict]) -> tuple[str, str] | None:
    """(reason, detail) when a well-formed dialog is not worth training on, else None (see DIALOG_REJECTS).
    A trailing human turn is fine: training drops it."""
    if not turns:
        return "empty_dialog", "no turns"
    for k, t in enumerate(turns, start=1):
        if not t["text"].strip():
            return "empty_turn", f"turn {k} ({t['role']}) has no text"
    if turns[0]["role"] == "ai":
        return "ai_first", "the dialog starts with the AI"
    for k in range(1, len(turns)):
        if turns[k]["role"] == turns[k - 1]["role"]:
            return "role_order", f"turns {k} and {k + 1} are both {turns[k]['role']}"
    if len(turns) < 2:
        return "no_ai_turn", "a human turn with no answer"
    return None


def load_dialogs(path: str | Path) -> tuple[list[dict], list[dict]]:
    """(dialogs, rejects) of a dialogs.jsonl: a record that is not a dialog stops with DialogFileError (file and
    line, and the expected shape); a dialog not worth training on becomes a reject {"line", "id", "reason",
    "detail"} (see `dialog_reject`), never a silent drop."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise DialogFileError(f"{path}: no such dialogs file")
    dialogs, rejects = [], []
    for line, d in iter_jsonl(path):
        err = dialog_shape_error(d)
        if err:
            raise DialogFileError(
                f'{path}:{line}: {err}; a dialog is {{"turns": [{{"role": "human"|"ai", '
                f"\"text\": str}}, ...]}} (convert ChatML 'user'/'assistant' messages to that)"
            )
        bad = dialog_reject(d["turns"])
        if bad:
            rejects.append({"line": line, "id": d.get("id"), "reason": bad[0], "detail": bad[1]})
        else:
            dialogs.append(d if "id" in d else {**d, "id": f"{path.stem}-{line:06d}"})
    return dialogs, rejects


def split_dialogs(dialogs: list[dict], val_fraction: float, seed: int) -> tuple[list[dict], list[dict]]:
    """Split by dialog id (no dialog has turns on both sides), deterministic for a seed."""
    ids = sorted({d["id"] for d in dialogs})
    random.Random(seed).shuffle(ids)
    n_val = int(round(len(ids) * val_fraction))
    if val_fraction > 0 and n_val == 0 and len(ids) >= 2:
        n_val = 1
    val_ids = set(ids[:n_val])
    return [d for d in dialogs if d["id"] not in val_ids], [d for d in dialogs if d["id"] in val_ids]


# --- formats -----------------------------------------------------------------------------------------------


def baize_segments(turns: list[dict]) -> list[tuple[str, bool]]:
    """The Baize training text as (segment, is_ai_text) pieces, so labels can cover only what the AI says.

    Layout: header, then `[|Human|] text` / `[|AI|] text` lines; the marker of the next turn closes an AI turn,
    so the final AI turn is closed with a trailing `[|Human|]` marker, which the model learns to emit to stop.
    """
    segs: list[tuple[str, bool]] = [(BAIZE_HEADER, False)]
    for t in turns:
        if t["role"] == "human":
            segs.append((f"\n{BAIZE_HUMAN} {t['text']}\n{BAIZE_AI}", False))
        else:
            segs.append((f" {t['text']}", True))
    segs.append((f"\n{BAIZE_HUMAN}", True))
    return segs


def baize_prompt(question: str, history: list[dict] | None = None) -> str:
    """Prompt for generation in the Baize format: header, history, the question, then the AI marker.

    The training text up to where the AI's answer starts (without the closing marker training adds)."""
    segs = baize_segments([*(history or []), {"role": "human", "text": question}])
    return "".join(s for s, _ in segs[:-1])


def bos_text(tok: Any) -> str:
    """The BOS token the tokenizer puts before plain text (Llama-3's `<|begin_of_text|>`, Mistral's `<s>`), or ""
    for one that puts none (SmolLM2, Qwen2). Read from what encoding does, not from a flag: Llama-3's tokenizer
    adds it through its post-processor and has no `add_bos_token`."""
    if tok is None or tok.bos_token_id is None:
        return ""
    ids = tok("a", add_special_tokens=True).input_ids
    added = ids[: len(ids) - len(tok("a", add_special_tokens=False).input_ids)]
    return tok.bos_token if added[:1] == [tok.bos_token_id] else ""


def with_bos(text: str, tok: Any) -> str:
    """`text` starting with the tokenizer's BOS exactly once: the model was trained with it first, and text is
    tokenized with add_special_tokens=False everywhere (so a chat template that renders BOS itself gets no second)."""
    bos = bos_text(tok)
    return text if not bos or text.startswith(bos) else bos + text


def generation_prompt(question: str, fmt: str = "baize", tok: Any = None) -> str:
    """The prompt a model tuned in `fmt` (train.format) answers: the Baize markers, or the tokenizer's chat
    template (what chat_template training supervised); with the tokenizer's BOS first, once (`with_bos`)."""
    if fmt == "chat_template":
        text = tok.apply_chat_template(
            [{"role": "user", "content": question}], tokenize=False, add_generation_prompt=True
        )
    else:
        text = baize_prompt(question)
    return with_bos(text, tok)


def to_baize_text(turns: list[dict]) -> str:
    return "".join(s for s, _ in baize_segments(turns))


def to_chat_messages(turns: list[dict]) -> list[dict]:
    """OpenAI/ChatML messages for export to other tools."""
    return [{"role": "user" if t["role"] == "human" else "assistant", "content": t["text"]} for t in turns]


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
