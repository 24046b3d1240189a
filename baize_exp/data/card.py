"""A data card for a collection: what went in, what came out, what was thrown away and why, what it cost.

Written by the collect stage as `collect/data_card.json` and `collect/data_card.md`; the run's report includes the
markdown. Lengths are in the teacher's tokens when the teacher is local (its tokenizer), else in words (said so).
"""

from __future__ import annotations

import statistics
from collections import Counter
from typing import Any


def _dist(values: list[int]) -> dict[str, float]:
    if not values:
        return {"n": 0}
    v = sorted(values)
    pick = lambda q: v[min(len(v) - 1, int(q * len(v)))]  # noqa: E731
    return {
        "n": len(v),
        "min": v[0],
        "p10": pick(0.1),
        "median": statistics.median(v),
        "p90": pick(0.9),
        "max": v[-1],
        "mean": round(statistics.fmean(v), 1),
    }


def data_card(
    seeds: list[Any],
    dialogs: list[dict],
    rejects: list[dict],
    metrics: dict,
    tokenizer: Any = None,
    duplicate_seeds: int = 0,
) -> dict:
    """The card's figures for the seeds a run asked for and the dialogs and rejects it got."""
    if tokenizer is not None:
        unit, length = "tokens", lambda t: len(tokenizer(t, add_special_tokens=False).input_ids)
    else:
        unit, length = "words", lambda t: len(t.split())
    by_source_seeds = Counter(s.source for s in seeds)
    by_source_dialogs = Counter(d.get("source", "?") for d in dialogs)
    reasons = Counter(r["reason"] for r in rejects)
    return {
        "length_unit": unit,
        "sources": {src: {"seeds": n, "dialogs": by_source_dialogs.get(src, 0)} for src, n in by_source_seeds.items()},
        "seeds": len(seeds),
        "dialogs": len(dialogs),
        "rejects": len(rejects),
        "rejects_by_reason": dict(reasons.most_common()),
        "duplicates_removed": {"seeds": duplicate_seeds, "dialogs": reasons.get("near_duplicate", 0)},
        "seed_length": _dist([length(s.question) for s in seeds]),
        "dialog_length": _dist([sum(length(t["text"]) for t in d["turns"]) for d in dialogs]),
        "turns_per_dialog": _dist([len(d["turns"]) for d in dialogs]),
        "requests": metrics.get("requests"),
        "prompt_tokens": metrics.get("prompt_tokens"),
        "completion_tokens": metrics.get("completion_tokens"),
        "cost_usd": metrics.get("cost_usd"),
    }


def card_markdown(card: dict) -> str:
    unit = card["length_unit"]
    cost = "unknown" if card["cost_usd"] is None else f"${card['cost_usd']:.4f}"
    lines = [
        "## Data card (collect)",
        "",
        f"{card['seeds']} seeds → {card['dialogs']} dialogs, {card['rejects']} rejects; duplicates removed: "
        f"{card['duplicates_removed']['seeds']} seeds, {card['duplicates_removed']['dialogs']} dialogs; "
        f"{card['requests']} requests, {card['prompt_tokens']} prompt + {card['completion_tokens']} completion "
        f"tokens, cost {cost}",
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
    if card["rejects_by_reason"]:
        lines += ["", "| reject reason | count |", "|---|---|"]
        lines += [f"| {r} | {n} |" for r, n in card["rejects_by_reason"].items()]
    return "\n".join(lines) + "\n"
