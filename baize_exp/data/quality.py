"""Is a parsed dialog worth training on? Cheap checks at collect time, each a reject reason.

A small teacher copies the template's example (the basil dialog) for any seed, loops on one line, writes the same
dialog for different seeds, or has the AI echo the human. Each check works on word n-grams and line counts: O(dialog
length), and the near-duplicate check compares bottom-k sketches (k hashes of a dialog's word 5-grams; their
Jaccard estimate) with the kept dialogs that share a hash, with no all-pairs scan.
Thresholds were set on the embedded teacher's dialogs (benchmarks/quality_filters.py prints the measurement).

Memory stays small for a million dialogs: the kept dialogs' sketches go to a temporary file (k x 8 bytes each, read
back only for a candidate), and the in-memory index holds only each kept dialog's m smallest hashes, m the least
number with (k - m) / k < near_duplicate (13 of 64 at 0.8), in sorted numpy arrays (12 bytes an entry). That finds
every kept dialog a new one is a near duplicate of: if none of kept dialog B's m smallest hashes is in the new
dialog's sketch, either they are all among the k smallest of the union, unshared, so the estimate is at most
(k - m) / k, or one is not, so the union's k smallest lie below it, where B holds only unshared hashes: 0.
"""

from __future__ import annotations

import hashlib
import os
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

QUALITY_REASONS = ("template_copy", "repetitive", "near_duplicate", "echo")

_WORD = re.compile(r"[a-z0-9']+")
_TURN_LINE = re.compile(r"^\s*\[(?:Human|AI)\]\s*:?\s*(.*)$", re.IGNORECASE | re.MULTILINE)


def words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def ngrams(text: str, n: int) -> set[tuple[str, ...]]:
    w = words(text)
    return {tuple(w[i : i + n]) for i in range(len(w) - n + 1)}


def template_example(template: str) -> str:
    """The example dialog a transcript template shows (its [Human]/[AI] lines); empty if it shows none."""
    return "\n".join(m.group(1) for m in _TURN_LINE.finditer(template))


def _dialog_text(turns: list[dict]) -> str:
    return "\n".join(t["text"] for t in turns)


class _HashIndex:
    """hash -> the numbers of the kept dialogs holding it: recent entries in a dict, older ones in sorted numpy runs
    (keys uint64, dialog numbers uint32), merged as they grow; a merge never builds more than `max_run` entries, so
    it needs little more memory than the runs themselves."""

    def __init__(self, buffer: int = 16_384, max_run: int = 4_000_000):
        self.buffer_size, self.max_run = buffer, max_run
        self._recent: dict[int, list[int]] = {}
        self._n_recent = 0
        self._runs: list[tuple[np.ndarray, np.ndarray]] = []  # largest first

    def add(self, hashes: np.ndarray, j: int) -> None:
        for h in hashes.tolist():
            self._recent.setdefault(h, []).append(j)
        self._n_recent += len(hashes)
        if self._n_recent >= self.buffer_size:
            self._flush()

    def lookup(self, hashes: np.ndarray) -> set[int]:
        found: set[int] = set()
        for h in hashes.tolist():
            found.update(self._recent.get(h, ()))
        for keys, vals in self._runs:
            lo = np.searchsorted(keys, hashes, "left")
            hi = np.searchsorted(keys, hashes, "right")
            for a, b in zip(lo[hi > lo].tolist(), hi[hi > lo].tolist(), strict=True):
                found.update(vals[a:b].tolist())
        return found

    def _flush(self) -> None:
        keys = np.fromiter((h for h, js in self._recent.items() for _ in js), np.uint64, self._n_recent)
        vals = np.fromiter((j for js in self._recent.values() for j in js), np.uint32, self._n_recent)
        order = np.argsort(keys, kind="stable")
        self._runs.append((keys[order], vals[order]))
        self._recent, self._n_recent = {}, 0
        while len(self._runs) > 1:
            (k1, v1), (k2, v2) = self._runs[-2], self._runs[-1]
            if len(k1) > 2 * len(k2) or len(k1) + len(k2) > self.max_run:
                break
            at = np.searchsorted(k1, k2)
            self._runs[-2:] = [(np.insert(k1, at, k2), np.insert(v1, at, v2))]


class _SketchStore:
    """The kept dialogs' sketches, row j at byte j * k * 8 of an unnamed temporary file (gone when closed)."""

    def __init__(self, k: int, spill_dir: str | Path | None):
        self.k, self.rows = k, 0
        self._file = tempfile.TemporaryFile(prefix="baize-sketches-", dir=spill_dir)
        self._lengths = np.zeros(1024, np.uint16)  # a sketch of a short dialog has fewer than k hashes

    def append(self, sketch: np.ndarray) -> int:
        row = np.zeros(self.k, np.uint64)
        row[: len(sketch)] = sketch
        os.pwrite(self._file.fileno(), row.tobytes(), self.rows * self.k * 8)
        if self.rows == len(self._lengths):
            self._lengths = np.concatenate([self._lengths, np.zeros_like(self._lengths)])
        self._lengths[self.rows] = len(sketch)
        self.rows += 1
        return self.rows - 1

    def get(self, j: int) -> np.ndarray:
        data = os.pread(self._file.fileno(), self.k * 8, j * self.k * 8)
        return np.frombuffer(data, np.uint64)[: self._lengths[j]]

    def close(self) -> None:
        self._file.close()


@dataclass
class QualityFilter:
    """The checks, with their thresholds; `check` returns (reason, detail) or None for a dialog worth keeping."""

    example: str = ""  # the template's example dialog
    copy_overlap: float = 0.3  # share of the example's word 3-grams the dialog reproduces
    repeat_lines: int = 3  # the same line (>= 4 words) this many times
    near_duplicate: float = 0.8  # estimated Jaccard of word 5-gram sets with an earlier dialog
    echo_overlap: float = 0.7  # share of an AI turn's word 3-grams taken from the human turn before it
    sketch: int = 64  # bottom-k sketch size for near duplicates
    enabled: bool = True
    spill_dir: str | Path | None = None
    """Where the kept dialogs' sketches are written (an unnamed temporary file); None = the system's temp dir."""
    _example_grams: set = field(default_factory=set, repr=False)
    _index: _HashIndex = field(default_factory=_HashIndex, repr=False)
    _store: _SketchStore | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        self._example_grams = ngrams(self.example, 3)
        m = 1  # the fewest smallest hashes to index so that no near duplicate is missed (module docstring)
        while m < self.sketch and (self.sketch - m) / self.sketch >= self.near_duplicate:
            m += 1
        self._indexed = m

    @classmethod
    def from_config(cls, qcfg: Any, template: str, spill_dir: str | Path | None = None) -> QualityFilter:
        return cls(
            example=template_example(template),
            copy_overlap=qcfg.copy_overlap,
            repeat_lines=qcfg.repeat_lines,
            near_duplicate=qcfg.near_duplicate,
            echo_overlap=qcfg.echo_overlap,
            enabled=qcfg.enabled,
            spill_dir=spill_dir,
        )

    @property
    def kept(self) -> int:
        """Dialogs added so far (kept dialogs are numbered from 0 in this order)."""
        return self._store.rows if self._store is not None else 0

    def close(self) -> None:
        """Delete the sketches file (also done when the filter is garbage collected)."""
        if self._store is not None:
            self._store.close()
            self._store = None

    # --- the checks, each alone (benchmarks and tests call them one by one) -------------------------------------
    def copy_score(self, turns: list[dict]) -> float:
        """How much of the example the dialog reproduces (a copy often has the template's instructions or a new
        question appended, so the share of the dialog that is copied would understate it)."""
        grams = ngrams(_dialog_text(turns), 3)
        return len(grams & self._example_grams) / len(self._example_grams) if self._example_grams else 0.0

    @staticmethod
    def most_repeated_line(turns: list[dict]) -> tuple[str, int]:
        counts: dict[str, int] = {}
        for t in turns:
            for line in re.split(r"(?<=[.!?])\s+|\n", t["text"]):
                w = words(line)
                if len(w) >= 4:
                    k = " ".join(w)
                    counts[k] = counts.get(k, 0) + 1
        return max(counts.items(), key=lambda kv: kv[1], default=("", 0))

    @staticmethod
    def echo_score(turns: list[dict]) -> tuple[float, int]:
        """The highest share of an AI turn's 3-grams copied from the human turn before it, and that turn's number;
        an empty AI turn scores 1."""
        worst, at = 0.0, -1
        for i in range(1, len(turns)):
            if turns[i]["role"] != "ai" or turns[i - 1]["role"] != "human":
                continue
            ai = ngrams(turns[i]["text"], 3)
            if not words(turns[i]["text"]):
                return 1.0, i + 1
            share = len(ai & ngrams(turns[i - 1]["text"], 3)) / len(ai) if ai else 0.0
            if not ai and " ".join(words(turns[i]["text"])) in " ".join(words(turns[i - 1]["text"])):
                share = 1.0  # a one- or two-word answer that only repeats the human's words
            if share > worst:
                worst, at = share, i + 1
        return worst, at

    def _sketch(self, turns: list[dict]) -> np.ndarray:
        """The bottom-k hashes of the dialog's word 5-grams (of its whole text when it has none), ascending."""
        text = _dialog_text(turns)
        grams = [" ".join(g) for g in ngrams(text, 5)] or [" ".join(words(text))]
        hashes = sorted({int.from_bytes(hashlib.blake2b(g.encode(), digest_size=8).digest(), "big") for g in grams})
        return np.array(hashes[: self.sketch], dtype=np.uint64)

    def duplicate_of(
        self, turns: list[dict], sketch: np.ndarray | None = None, exhaustive: bool = False
    ) -> tuple[int, float]:
        """The earlier dialog (its number among those added) most like this one, with the estimated Jaccard; the
        lowest number among equals. Exact whenever the estimate reaches `near_duplicate`; below it, only the kept
        dialogs sharing an indexed hash are compared unless `exhaustive` (every kept dialog: a measurement's way)."""
        mine = sketch if sketch is not None else self._sketch(turns)
        if self._store is None:
            return -1, 0.0
        candidates = range(self._store.rows) if exhaustive else sorted(self._index.lookup(mine))
        best, score = -1, 0.0
        for j in candidates:
            other = self._store.get(j)
            union = np.union1d(mine, other)[: self.sketch]  # bottom-k of the union
            shared = np.intersect1d(mine, other, assume_unique=True)
            est = int(np.isin(union, shared, assume_unique=True).sum()) / len(union)
            if est > score:
                best, score = j, est
        return best, score

    def add(self, turns: list[dict], sketch: np.ndarray | None = None) -> None:
        """Remember a kept dialog (later ones are checked against it)."""
        sk = sketch if sketch is not None else self._sketch(turns)
        if self._store is None:
            self._store = _SketchStore(self.sketch, self.spill_dir)
        j = self._store.append(sk)
        self._index.add(sk[: self._indexed], j)

    def check(self, turns: list[dict]) -> tuple[str, str] | None:
        """The first reason this dialog is not worth training on, or None; a kept dialog is remembered."""
        if not self.enabled:
            return None
        copy = self.copy_score(turns)
        if copy >= self.copy_overlap:
            return "template_copy", f"reproduces {copy:.0%} of the template's example (its word 3-grams)"
        line, n = self.most_repeated_line(turns)
        if n >= self.repeat_lines:
            return "repetitive", f"the line {line[:80]!r} {n} times"
        echo, at = self.echo_score(turns)
        if echo >= self.echo_overlap:
            return "echo", f"AI turn {at} is empty or {echo:.0%} copied from the human turn before it"
        sketch = self._sketch(turns)
        j, dup = self.duplicate_of(turns, sketch)
        if dup >= self.near_duplicate:
            return "near_duplicate", f"~{dup:.0%} the same word 5-grams as kept dialog #{j + 1}"
        self.add(turns, sketch)
        return None
