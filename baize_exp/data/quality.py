"""Is a parsed dialog worth training on? Cheap checks at collect time, each a reject reason.

A small teacher copies the template's example (the basil dialog) for any seed, loops on one line, writes the same
dialog for different seeds, or has the AI echo the human. Each check works on word n-grams and line counts: O(dialog
length), and the near-duplicate index is a bottom-k sketch per dialog (exact Jaccard estimate, no all-pairs scan).
Thresholds were set on the embedded teacher's dialogs (benchmarks/quality_filters.py prints the measurement).
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from typing import Any

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
    _example_grams: set = field(default_factory=set, repr=False)
    _index: dict[int, set[int]] = field(default_factory=dict, repr=False)  # sketch hash -> dialog numbers
    _sketches: list[list[int]] = field(default_factory=list, repr=False)

    def __post_init__(self) -> None:
        self._example_grams = ngrams(self.example, 3)

    @classmethod
    def from_config(cls, qcfg: Any, template: str) -> QualityFilter:
        return cls(
            example=template_example(template),
            copy_overlap=qcfg.copy_overlap,
            repeat_lines=qcfg.repeat_lines,
            near_duplicate=qcfg.near_duplicate,
            echo_overlap=qcfg.echo_overlap,
            enabled=qcfg.enabled,
        )

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

    def _sketch(self, turns: list[dict]) -> list[int]:
        """The bottom-k hashes of the dialog's word 5-grams (of its whole text when it has none)."""
        text = _dialog_text(turns)
        grams = [" ".join(g) for g in ngrams(text, 5)] or [" ".join(words(text))]
        return sorted({int.from_bytes(hashlib.blake2b(g.encode(), digest_size=8).digest(), "big") for g in grams})[
            : self.sketch
        ]

    def duplicate_of(self, turns: list[dict], sketch: list[int] | None = None) -> tuple[int, float]:
        """The earlier dialog (its number among those added) most like this one, with the estimated Jaccard."""
        mine = set(sketch if sketch is not None else self._sketch(turns))
        best, score = -1, 0.0
        for j in {j for h in mine for j in self._index.get(h, ())}:
            other = set(self._sketches[j])
            union = sorted(mine | other)[: self.sketch]  # bottom-k of the union
            est = sum(1 for h in union if h in mine and h in other) / len(union)
            if est > score:
                best, score = j, est
        return best, score

    def add(self, turns: list[dict], sketch: list[int] | None = None) -> None:
        """Remember a kept dialog (later ones are checked against it)."""
        sk = sketch if sketch is not None else self._sketch(turns)
        for h in sk:
            self._index.setdefault(h, set()).add(len(self._sketches))
        self._sketches.append(sk)

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
