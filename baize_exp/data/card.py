"""A data card for a collection: what went in, what came out, what was thrown away and why, what it cost.

Written by the collect stage as `collect/data_card.json` and `collect/data_card.md`; the run's report includes the
markdown. Lengths are in the teacher's tokens when the teacher is local (its tokenizer), else in words (said so).
The dialogs and rejects are read once, as streams: what is kept per dialog is three integers.
"""

from __future__ import annotations

import array
from collections import Counter
from collections.abc import Iterable
from typing import Any

import numpy as np

from baize_exp.chat.cost import usd

TOKENIZE_BATCH = 1024  # texts per tokenizer call: the fast tokenizer encodes a list in one go


def _dist(values: Any) -> dict[str, float]:
    """n, min, p10, median, p90, max, mean of integers (as `statistics` gives them: an even count's median is the
    mean of the middle two, a float)."""
    v = np.sort(np.asarray(values, dtype=np.int64))
    n = len(v)
    if not n:
        return {"n": 0}
    pick = lambda q: int(v[min(n - 1, int(q * n))])  # noqa: E731
    median = int(v[n // 2]) if n % 2 else (int(v[n // 2 - 1]) + int(v[n // 2])) / 2
    return {
        "n": n,
        "min": int(v[0]),
        "p10": pick(0.1),
        "median": median,
        "p90": pick(0.9),
        "max": int(v[-1]),
        "mean": round(int(v.sum()) / n, 1),
    }


class _Lengths:
    """Lengths of texts in the card's unit: the tokenizer's tokens, counted in batches, else words."""

    def __init__(self, tokenizer: Any):
        self.tokenizer = tokenizer
        self.unit = "tokens" if tokenizer is not None else "words"

    def of(self, texts: list[str]) -> list[int]:
        if self.tokenizer is None:
            return [len(t.split()) for t in texts]
        return [len(ids) for ids in self.tokenizer(texts, add_special_tokens=False).input_ids] if texts else []


def spent_summary(records: Iterable[Iterable[dict]], price: dict[str, float] | None, discount: float) -> dict:
    """What the requests behind these records cost, over every attempt (dialogs, rejects, failed attempts; a quality
    reject holds its dialog's usage): requests, tokens, USD at `price` (a record marked `batch` at `discount`),
    and how many of the requests went through the Batch API. `records`: one stream per file."""
    out = Counter()
    cost = 0.0
    for stream in records:
        for r in stream:
            src = r if "usage" in r else r.get("dialog") or {}
            u = src.get("usage") or {}
            p, c, n = u.get("prompt_tokens", 0), u.get("completion_tokens", 0), src.get("requests") or 0
            out.update(requests=n, prompt_tokens=p, completion_tokens=c)
            if src.get("batch"):
                out.update(batch_requests=n)
            cost += usd(p, c, price, discount if src.get("batch") else 1.0) or 0.0
    return {
        "requests": out["requests"],
        "batch_requests": out["batch_requests"],
        "prompt_tokens": out["prompt_tokens"],
        "completion_tokens": out["completion_tokens"],
        "cost_usd": None if price is None else round(cost, 6),
    }


def data_card(
    seeds: list[Any],
    dialogs: Iterable[dict],
    rejects: Iterable[dict],
    metrics: dict,
    tokenizer: Any = None,
    duplicate_seeds: int = 0,
    eval_near_duplicates: int | None = None,
    spent: dict | None = None,
) -> dict:
    """The card's figures for the seeds a run asked for and the dialogs and rejects it got (each read once, in
    order). `eval_near_duplicates`: seeds dropped as near-copies of eval questions (`data.load_seeds`), shown where
    the caller counted them. `spent`: what every attempt at these seeds cost (`spent_summary`)."""
    lengths = _Lengths(tokenizer)
    seed_length = array.array("q")
    for i in range(0, len(seeds), TOKENIZE_BATCH):
        seed_length.extend(lengths.of([s.question for s in seeds[i : i + TOKENIZE_BATCH]]))
    dialog_length, turns = array.array("q"), array.array("q")
    by_source_dialogs: Counter[str] = Counter()
    texts: list[str] = []
    sizes: list[int] = []

    def count() -> None:  # the buffered dialogs' lengths: one tokenizer call for many turns
        per_turn = iter(lengths.of(texts))
        dialog_length.extend(sum(next(per_turn) for _ in range(k)) for k in sizes)
        texts.clear()
        sizes.clear()

    for d in dialogs:
        by_source_dialogs[d.get("source", "?")] += 1
        turns.append(len(d["turns"]))
        texts.extend(t["text"] for t in d["turns"])
        sizes.append(len(d["turns"]))
        if len(texts) >= TOKENIZE_BATCH:
            count()
    count()
    by_source_seeds = Counter(s.source for s in seeds)
    reasons = Counter(r["reason"] for r in rejects)
    return {
        "length_unit": lengths.unit,
        "sources": {src: {"seeds": n, "dialogs": by_source_dialogs.get(src, 0)} for src, n in by_source_seeds.items()},
        "seeds": len(seeds),
        "dialogs": len(turns),
        "rejects": sum(reasons.values()),
        "rejects_by_reason": dict(reasons.most_common()),
        "duplicates_removed": {
            "seeds": duplicate_seeds,
            "dialogs": reasons.get("near_duplicate", 0),
            **({"eval_near_duplicates": eval_near_duplicates} if eval_near_duplicates is not None else {}),
        },
        "seed_length": _dist(seed_length),
        "dialog_length": _dist(dialog_length),
        "turns_per_dialog": _dist(turns),
        "requests": metrics.get("requests"),
        "prompt_tokens": metrics.get("prompt_tokens"),
        "completion_tokens": metrics.get("completion_tokens"),
        "cost_usd": metrics.get("cost_usd"),
        **({"spent": spent} if spent is not None else {}),
    }


def card_markdown(card: dict) -> str:
    unit = card["length_unit"]
    cost = "unknown" if card["cost_usd"] is None else f"${card['cost_usd']:.4f}"
    removed = card["duplicates_removed"]
    leaks = removed.get("eval_near_duplicates")
    lines = [
        "## Data card (collect)",
        "",
        f"{card['seeds']} seeds → {card['dialogs']} dialogs, {card['rejects']} rejects; duplicates removed: "
        f"{removed['seeds']} seeds, {removed['dialogs']} dialogs"
        + ("" if leaks is None else f", {leaks} seeds that copy an eval question")
        + f"; {card['requests']} requests, {card['prompt_tokens']} prompt + {card['completion_tokens']} "
        f"completion tokens, cost {cost}",
        "",
        "| source | seeds | dialogs |",
        "|---|---|---|",
    ]
    lines += [f"| {src} | {v['seeds']} | {v['dialogs']} |" for src, v in card["sources"].items()]
    lines += [
        "",
        f"| distribution ({unit}) | n | min | p10 | median | p90 | max | mean |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name in ("seed_length", "dialog_length", "turns_per_dialog"):
        d = card[name]
        cells = [d.get(k, "-") for k in ("n", "min", "p10", "median", "p90", "max", "mean")]
        lines.append(f"| {name.replace('_', ' ')} | " + " | ".join(str(c) for c in cells) + " |")
    if card.get("spent"):
        sp = card["spent"]
        usd_spent = "unknown (no price for the model)" if sp["cost_usd"] is None else f"${sp['cost_usd']:.4f}"
        batch = f", {sp['batch_requests']} of them through the Batch API" if sp["batch_requests"] else ""
        lines += [
            "",
            f"Spent on these seeds over every attempt (failed ones included): {sp['requests']} requests{batch}, "
            f"{sp['prompt_tokens']} prompt + {sp['completion_tokens']} completion tokens, {usd_spent}",
        ]
    if card["rejects_by_reason"]:
        lines += ["", "| reject reason | count |", "|---|---|"]
        lines += [f"| {r} | {n} |" for r, n in card["rejects_by_reason"].items()]
    return "\n".join(lines) + "\n"
