"""Can this judge be believed? Measured in every eval, beside the scores it produced.

- Judge check: the judge scores answers whose order is known — a question's reference answer against a degraded
  copy (cut to its first third, its sentences shuffled, or another question's reference). Its accuracy (ties
  count half) with a Wilson 95% interval at the design-effect n (a question's items are clustered), the
  unreadable items counted beside it (`stats.judge_check_clustered`); when the interval reaches down to chance
  (0.5), or fewer than `stats.MIN_CHECK_PARSED` items were readable, the judge is not shown to tell a good
  answer from a broken one, and every judge-based number of the run says so.
- Position agreement (pairwise): the share of questions where both orders give the same verdict. A judge that
  always picks the first answer agrees 0% of the time; its combined verdicts are all ties.
- Self-consistency (single/reference with `eval.judge_repeats` > 1): the share of answers whose repeats all got
  the same score. A greedy judge (temperature 0) repeats itself by construction; the figure means something only
  for a sampling judge.
- Length-controlled win rate (pairwise), after AlpacaEval 2: a logistic regression of the per-question win on
  the standardised length difference (through tanh), read at equal length.
"""

from __future__ import annotations

import math
import random
import re

import numpy as np

from baize_exp.stats import PAIRWISE_VALUE, outcomes, proportion_ci

DEGRADATIONS = ("truncated", "shuffled", "other_answer")
_SENTENCE = re.compile(r"(?<=[.!?])\s+")


def degrade(question: dict, others: list[dict], how: str, seed: int) -> str | None:
    """A copy of the question's reference answer made clearly worse in one known way; None if it cannot be
    (a reference too short to cut or shuffle, no other question to borrow from)."""
    ref = question["reference"].strip()
    rng = random.Random(f"{seed}:{question['question_id']}:{how}")
    words = ref.split()
    if how == "truncated":  # the first third, cut mid-sentence: an unfinished answer
        if len(words) < 9:
            return None
        ends = [m.end() for m in re.finditer(r"\S+", ref)]
        return ref[: ends[len(words) // 3 - 1]]  # the original text up to a word's end (code keeps its layout)
    if how == "shuffled":
        parts = _SENTENCE.split(ref)
        if len(parts) < 3:  # two sentences swapped can still read fine: shuffle the words instead
            parts = words
        if len(parts) < 3:
            return None
        shuffled = parts[:]
        while shuffled == parts:
            rng.shuffle(shuffled)
        return " ".join(shuffled)
    if how == "other_answer":  # fluent and on some topic, just not this question's
        pool = [o for o in others if o["question_id"] != question["question_id"] and o.get("reference")]
        pool = [o for o in pool if o["category"] != question["category"]] or pool
        return rng.choice(pool)["reference"].strip() if pool else None
    raise ValueError(f"unknown degradation {how!r}: one of {DEGRADATIONS}")


def check_items(questions: list[dict], n: int, seed: int) -> list[dict]:
    """Up to `n` questions with a reference, spread over the categories, each with every degradation that applies:
    [{"question_id", "category", "question", "reference", "degradation", "bad"}]."""
    with_ref = [q for q in questions if q.get("reference")]
    by_cat: dict[str, list[dict]] = {}
    for q in with_ref:
        by_cat.setdefault(q["category"], []).append(q)
    picked: list[dict] = []
    while len(picked) < min(n, len(with_ref)):  # round-robin over categories, in file order within each
        for qs in by_cat.values():
            if qs and len(picked) < n:
                picked.append(qs.pop(0))
    items = []
    for q in picked:
        for how in DEGRADATIONS:
            bad = degrade(q, with_ref, how, seed)
            if bad is not None:
                items.append(
                    {
                        **{k: q[k] for k in ("question_id", "category", "question", "reference")},
                        "degradation": how,
                        "bad": bad,
                    }
                )
    return items


def check_answers(items: list[dict]) -> tuple[list[dict], dict[str, dict[str, str]]]:
    """The check as eval answers: the good answer of each question once (model "check/good"), each degraded one
    as model "check/<degradation>"; and, for pairwise, {degradation: {question_id: bad answer}} to judge the good
    answer against."""
    good = {
        i["question_id"]: {
            "question_id": i["question_id"],
            "category": i["category"],
            "model": "check/good",
            "answer": i["reference"],
        }
        for i in items
    }
    bad = [
        {
            "question_id": i["question_id"],
            "category": i["category"],
            "model": f"check/{i['degradation']}",
            "answer": i["bad"],
        }
        for i in items
    ]
    opponents: dict[str, dict[str, str]] = {}
    for i in items:
        opponents.setdefault(i["degradation"], {})[i["question_id"]] = i["bad"]
    return [*good.values(), *bad], opponents


def check_records(mode: str, judgments: list[dict]) -> list[dict]:
    """One record per check outcome: single/reference compare the good answer's score with each degraded one's
    (correct 1, tie 0.5, wrong 0); pairwise counts each order on its own (the good answer shown first, then
    second), so a judge that always picks one position scores 0.5. `correct` None: a reply did not parse."""
    out = []
    if mode == "pairwise":
        for j in judgments:
            value = None if j.get("winner") is None else PAIRWISE_VALUE[j["winner"]]
            out.append(
                {
                    "question_id": j["question_id"],
                    "category": j["category"],
                    "degradation": j["degradation"],
                    "mode": mode,
                    "swap": j["swap"],
                    "verdict": j.get("verdict"),
                    "correct": value,
                    "parse": j["parse"],
                    "judge_reply": j.get("judge_reply"),
                }
            )
        return out
    good = {j["question_id"]: j for j in judgments if j["model"] == "check/good"}
    for j in judgments:
        if j["model"] == "check/good":
            continue
        g = good.get(j["question_id"], {})
        gs, bs = g.get("score"), j.get("score")
        correct = None if gs is None or bs is None else 1.0 if gs > bs else 0.5 if gs == bs else 0.0
        out.append(
            {
                "question_id": j["question_id"],
                "category": j["category"],
                "degradation": j["model"].split("/", 1)[1],
                "mode": mode,
                "good_score": gs,
                "bad_score": bs,
                "correct": correct,
                "parse": j["parse"] if bs is None else g.get("parse", "failed"),
                "judge_reply": j.get("judge_reply"),
            }
        )
    return out


def position_agreement(judgments: list[dict]) -> dict[str, dict]:
    """Per model: the share of questions whose two pairwise orders gave the same outcome (both parsed)."""
    both: dict[tuple, dict[bool, str | None]] = {}
    for j in judgments:
        if j["mode"] == "pairwise":
            both.setdefault((j["model"], j["question_id"]), {})[bool(j["swap"])] = j.get("winner")
    out: dict[str, dict] = {}
    for model in dict.fromkeys(m for m, _ in both):
        agree = [
            float(w[False] == w[True])
            for (m, _), w in both.items()
            if m == model and w.get(False) is not None and w.get(True) is not None
        ]
        share, lo, hi = proportion_ci(sum(agree), len(agree))
        out[model] = {"n": len(agree), "agreement": share, "ci_low": lo, "ci_high": hi}
    return out


def self_consistency(judgments: list[dict]) -> dict[str, dict]:
    """Per model, over answers judged more than once with every repeat parsed: the share whose repeats all gave
    the same score, and the mean absolute deviation of a repeat from its answer's mean score."""
    reps: dict[tuple, list[float | None]] = {}
    for j in judgments:
        if j["mode"] != "pairwise" and "repeat" in j:
            reps.setdefault((j["model"], j["question_id"]), []).append(j.get("score"))
    out: dict[str, dict] = {}
    for model in dict.fromkeys(m for m, _ in reps):
        groups = [v for (m, _), v in reps.items() if m == model and len(v) > 1 and None not in v]
        same = [float(len(set(v)) == 1) for v in groups]
        share, lo, hi = proportion_ci(sum(same), len(same))
        mad = float(np.mean([abs(x - np.mean(v)) for v in groups for x in v])) if groups else float("nan")
        out[model] = {"n": len(groups), "agreement": share, "ci_low": lo, "ci_high": hi, "mean_abs_dev": mad}
    return out


def parse_shares(judgments: list[dict]) -> dict[str, float]:
    """The share of judgments each reader decided (ok = strict, tolerant, logprob, retried) or that failed."""
    n = len(judgments)
    hows = ("ok", "tolerant", "logprob", "retried", "failed")
    return {h: (sum(j.get("parse") == h for j in judgments) / n if n else float("nan")) for h in hows}


def _fit_logistic(x: np.ndarray, y: np.ndarray, l2: float = 1e-2, iters: int = 50) -> np.ndarray:
    """Weights (intercept, slope) of a logistic regression with fractional targets (ties 0.5), by Newton steps;
    the small ridge keeps the fit finite when one side wins every question (separation)."""
    X = np.column_stack([np.ones_like(x), x])
    w = np.zeros(2)
    for _ in range(iters):
        p = 1 / (1 + np.exp(-X @ w))
        grad = X.T @ (p - y) + l2 * w
        hess = (X * (p * (1 - p))[:, None]).T @ X + l2 * np.eye(2)
        step = np.linalg.solve(hess, grad)
        w -= step
        if np.abs(step).max() < 1e-8:
            break
    return w


def _lc(values: np.ndarray, len_diff: np.ndarray, scale: float) -> float:
    w = _fit_logistic(np.tanh(len_diff / scale), values)
    return float(1 / (1 + math.exp(-w[0])))  # the fitted win probability at equal length (tanh(0) = 0)


def lc_win_rate(rows: list[dict], n_boot: int = 500, seed: int = 0) -> dict:
    """rows: [{"value": win value 1/0.5/0, "len_model", "len_opponent"}] for one model. The raw win rate and the
    length-controlled one, with a 95% bootstrap interval over questions (refitting each resample). Lengths are in
    words; their difference is standardised by its standard deviation (1 when all differences are equal)."""
    rows = [r for r in rows if r["value"] is not None]
    if not rows:
        return {"n": 0, "raw": float("nan"), "lc": float("nan"), "ci_low": float("nan"), "ci_high": float("nan")}
    y = np.asarray([r["value"] for r in rows], dtype=float)
    d = np.asarray([r["len_model"] - r["len_opponent"] for r in rows], dtype=float)
    scale = float(d.std()) or 1.0
    lc = _lc(y, d, scale)
    rng = np.random.default_rng(seed)
    boots = []
    for _ in range(n_boot if len(rows) > 1 else 0):
        idx = rng.integers(0, len(rows), len(rows))
        boots.append(_lc(y[idx], d[idx], scale))
    lo, hi = (float(np.quantile(boots, 0.025)), float(np.quantile(boots, 0.975))) if boots else (lc, lc)
    return {"n": len(rows), "raw": float(y.mean()), "lc": lc, "ci_low": lo, "ci_high": hi}


def pairwise_lengths(
    judgments: list[dict], answers: dict[tuple[str, str], str], opponent: dict[str, str]
) -> dict[str, list[dict]]:
    """Per model, the rows `lc_win_rate` takes: each question's combined win value (`stats.outcomes`) and both
    answers' lengths."""
    out: dict[str, list[dict]] = {}
    for o in outcomes(judgments):
        if o["mode"] != "pairwise":
            continue
        mine, theirs = answers.get((o["model"], o["question_id"])), opponent.get(o["question_id"])
        if mine is None or theirs is None:
            continue
        out.setdefault(o["model"], []).append(
            {
                "question_id": o["question_id"],
                "value": o["value"],
                "len_model": len(mine.split()),
                "len_opponent": len(theirs.split()),
            }
        )
    return out
