"""The dialog record: the teacher's transcripts parsed strictly, dialog files read with every unusable dialog a
reject with its reason, the train/held-out split, and the dialogs the train and SDF stages both read."""

from __future__ import annotations

import random
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from baize_exp.errors import UserError
from baize_exp.io import content_hash, iter_jsonl

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


# --- the dialogs the train and SDF stages both read -------------------------------------------------------------


def dialogs_path(cfg: Any, run_dir: Path) -> Path:
    """This run's collected dialogs, or `train.data` (dialogs from another run or tool)."""
    p = Path(cfg.train.data).expanduser() if cfg.train.data else run_dir / "collect" / "dialogs.jsonl"
    if not p.is_file():
        raise UserError(f"train: no dialogs at {p}; run the collect stage or set train.data=<dialogs.jsonl>")
    return p


def training_dialogs(cfg: Any, run_dir: Path) -> tuple[Path, list[dict], list[dict], list[dict]]:
    """(source file, train dialogs, held-out dialogs, rejects) as the train stage and SDF both see them: the
    dialogs not worth training on are rejects with a reason, the rest split by dialog id."""
    src = dialogs_path(cfg, run_dir)
    dialogs, rejects = load_dialogs(src)
    if not dialogs:
        counts = Counter(r["reason"] for r in rejects)
        raise UserError(
            f"train: no usable dialog in {src}: {len(rejects)} record(s), all rejected "
            f"({', '.join(f'{k}: {v}' for k, v in counts.most_common()) or 'the file is empty'}); "
            f"each dialog needs a human turn then an AI turn, alternating, with text in every turn"
        )
    split_seed = cfg.train.seed if cfg.train.get("split_seed") is None else cfg.train.split_seed
    train_d, val_d = split_dialogs(dialogs, cfg.train.val_fraction, split_seed)
    if cfg.train.get("extra_data"):  # instruction data mixed into training only: held-out loss stays on self-chat
        extra, extra_rejects = instruction_dialogs(cfg.train.extra_data, cfg.train.extra_data_limit, cfg.train.seed)
        train_d, rejects = train_d + extra, rejects + extra_rejects
    return src, train_d, val_d, rejects


def instruction_dialogs(path: str, limit: int | None, seed: int) -> tuple[list[dict], list[dict]]:
    """Alpaca-style instruction/input/output records (alpaca_data.json or .jsonl) as one-exchange dialogs in the
    training format, as the original Baize recipe mixed Alpaca into its self-chat data; a record without an output
    is a reject ("no_output"). A seeded sample of `limit` when set."""
    from baize_exp.data.sources import alpaca_prompt, alpaca_records

    p = Path(path).expanduser()
    if not p.is_file():
        raise UserError(
            f"train.extra_data={path}: no such file (an alpaca_data.json or a .jsonl of "
            f"instruction/input/output records)"
        )
    source = p.stem.split("_")[0] or "extra"
    dialogs, rejects = [], []
    for n, rec in enumerate(alpaca_records(p), 1):
        out = rec.get("output")
        did = f"{source}-{content_hash(rec)[:10]}"
        if not isinstance(out, str) or not out.strip():
            rejects.append({"line": n, "id": did, "reason": "no_output", "detail": f"{p}: record {n} has no output"})
            continue
        dialogs.append(
            {
                "id": did,
                "source": source,
                "turns": [{"role": "human", "text": alpaca_prompt(rec)}, {"role": "ai", "text": out.strip()}],
            }
        )
    if limit is not None and limit < len(dialogs):
        dialogs = random.Random(seed).sample(dialogs, limit)
    return dialogs, rejects
