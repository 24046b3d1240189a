"""Statistics shared by the eval stage and the report: per-question outcomes from judgments, bootstrap intervals,
scores.csv rows, the paired bootstrap behind every comparison and the Wilson interval of a share.

A judgment that could not be parsed stays in the tables as a parse failure (its own column); it is never a zero
and never silently left out of n without being counted.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path

import numpy as np

SCORES_COLUMNS = ["model", "category", "mode", "n", "mean", "ci_low", "ci_high", "parse_failures", "note"]
# pairwise outcome of the evaluated model against the opponent, as a value whose mean is a win rate
PAIRWISE_VALUE = {"model": 1.0, "tie": 0.5, "opponent": 0.0}


def bootstrap_ci(
    values: list[float], n_boot: int = 1000, seed: int = 0, alpha: float = 0.05
) -> tuple[float, float, float]:
    """(mean, low, high): the percentile bootstrap interval of the mean (resampling questions with replacement)."""
    v = np.asarray(values, dtype=float)
    if len(v) == 0:
        return float("nan"), float("nan"), float("nan")
    if len(v) == 1:
        return float(v[0]), float(v[0]), float(v[0])
    rng = np.random.default_rng(seed)
    means = v[rng.integers(0, len(v), size=(n_boot, len(v)))].mean(axis=1)
    return float(v.mean()), float(np.quantile(means, alpha / 2)), float(np.quantile(means, 1 - alpha / 2))


def combine_pairwise(first: str | None, second: str | None) -> str | None:
    """The outcome of one question judged in both orders: agreement stands, disagreement is a tie, and a failed
    parse in either order makes the whole question a parse failure (None) rather than a one-sided verdict."""
    if first is None or second is None:
        return None
    return first if first == second else "tie"


def outcomes(judgments: list[dict]) -> list[dict]:
    """One value per (model, question, mode) from judgment records: `score` for single/reference (the mean over
    `eval.judge_repeats` repeats that parsed), the win value of the two pairwise orders combined, and
    `<mode>_weighted` from the probability-weighted score where the judge returned logprobs. `value` None marks
    a parse failure. Each outcome keeps its `question_id`, so two models can be paired on it."""
    out: list[dict] = []
    pairs: dict[tuple, dict[bool, dict]] = {}
    singles: dict[tuple, list[dict]] = {}
    for j in judgments:
        key = (j["model"], j["question_id"])
        if j["mode"] == "pairwise":
            pairs.setdefault(key, {})[bool(j["swap"])] = j
        else:
            singles.setdefault((*key, j["mode"]), []).append(j)
    for (model, qid, mode), reps in singles.items():
        cat = reps[0]["category"]
        scores = [r["score"] for r in reps if r.get("score") is not None]
        out.append(
            {
                "model": model,
                "question_id": qid,
                "category": cat,
                "mode": mode,
                "value": float(np.mean(scores)) if scores else None,
            }
        )
        weighted = [r["weighted_score"] for r in reps if r.get("weighted_score") is not None]
        if weighted:
            out.append(
                {
                    "model": model,
                    "question_id": qid,
                    "category": cat,
                    "mode": f"{mode}_weighted",
                    "value": float(np.mean(weighted)),
                }
            )
    for (model, qid), both in pairs.items():
        w = combine_pairwise(*(both.get(s, {}).get("winner") for s in (False, True)))
        cat = next(iter(both.values()))["category"]
        out.append(
            {
                "model": model,
                "question_id": qid,
                "category": cat,
                "mode": "pairwise",
                "value": None if w is None else PAIRWISE_VALUE[w],
            }
        )
    return out


def score_table(judgments: list[dict], n_boot: int, seed: int) -> list[dict]:
    """Rows of scores.csv: per model, mode and category (`all` first) the mean, its 95% bootstrap interval, n
    (parsed outcomes) and parse failures. Weighted-score rows have no failures column of their own: a judgment
    without logprobs simply has no weighted value, so n says how many had one."""
    outs = outcomes(judgments)
    rows = []
    for model in dict.fromkeys(o["model"] for o in outs):
        for mode in dict.fromkeys(o["mode"] for o in outs if o["model"] == model):
            sel_m = [o for o in outs if o["model"] == model and o["mode"] == mode]
            for cat in ["all", *sorted({o["category"] for o in sel_m})]:
                sel = [o for o in sel_m if cat == "all" or o["category"] == cat]
                vals = [o["value"] for o in sel if o["value"] is not None]
                mean, lo, hi = bootstrap_ci(vals, n_boot, seed)
                rows.append(
                    {
                        "model": model,
                        "category": cat,
                        "mode": mode,
                        "n": len(vals),
                        "mean": round(mean, 4),
                        "ci_low": round(lo, 4),
                        "ci_high": round(hi, 4),
                        "parse_failures": sum(o["value"] is None for o in sel),
                    }
                )
    return rows


# what every judge-based number of a run carries when its judge check is at chance (scores.csv, paired.csv, report)
CANNOT_DISCRIMINATE = "judge cannot discriminate"
# items.jsonl `kind` -> the paired metric it gives
ITEM_METRICS = {"heldout": "heldout_loss", "ref_loglik": "ref_loglik"}


def item_values(judgments: list[dict], items: list[dict]) -> dict[str, dict[str, dict[str, float]]]:
    """{model: {metric: {item id: value}}}, what paired comparisons pair on: `judge_<mode>` per question (the
    `outcomes` above: a pairwise question's two orders combined), `heldout_loss` per held-out dialog (nats/token
    on its AI turns) and `ref_loglik` per question (mean log-prob per token of its reference answer)."""
    out: dict[str, dict[str, dict[str, float]]] = {}
    for o in outcomes(judgments):
        if o["value"] is not None:
            out.setdefault(o["model"], {}).setdefault(f"judge_{o['mode']}", {})[str(o["question_id"])] = float(
                o["value"]
            )
    for it in items:
        metric = ITEM_METRICS.get(it["kind"])
        if metric and it.get("tokens"):
            per_token = float(it["logprob_sum"]) / float(it["tokens"])
            out.setdefault(it["model"], {}).setdefault(metric, {})[str(it["item_id"])] = (
                -per_token if metric == "heldout_loss" else per_token
            )
    return out


def higher_is_better(metric: str) -> bool:
    """Every paired metric but the held-out loss is better higher."""
    return metric != "heldout_loss"


def write_scores_csv(rows: list[dict], path: Path) -> None:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=SCORES_COLUMNS, restval="")
        w.writeheader()
        w.writerows(rows)


# ---------------------------------------------------------------------------------------------------------------
# Paired comparisons: two models on the same items (questions or held-out dialogs)

PAIRED_COLUMNS = [
    "comparison",
    "a",
    "b",
    "metric",
    "better_if",
    "n",
    "mean_a",
    "mean_b",
    "diff",
    "ci_low",
    "ci_high",
    "mde",
    "verdict",
    "note",
]
VERDICTS = ("better", "worse", "no detectable difference")


def paired_bootstrap(
    a: dict[str, float],
    b: dict[str, float],
    higher_is_better: bool = True,
    n_boot: int = 2000,
    seed: int = 0,
    alpha: float = 0.05,
) -> dict:
    """Compare model a with model b on the items both have a value for (keys: question or dialog ids).

    The statistic is the mean per-item difference a - b; its (1 - alpha) interval is the percentile bootstrap
    over items (both models' values of an item resampled together, which is what makes it paired). The verdict is
    about a: "better" when the whole interval lies on the good side of 0, "worse" on the bad side, else "no
    detectable difference". `mde` is the smallest true difference this n and this noise would detect about 80% of
    the time (two-sided, alpha 0.05): (1.96 + 0.84) times the standard error of the mean difference."""
    ids = [k for k in a if k in b and a[k] is not None and b[k] is not None]
    d = np.asarray([a[k] - b[k] for k in ids], dtype=float)
    out = {
        "n": len(ids),
        "mean_a": float(np.mean([a[k] for k in ids])) if ids else float("nan"),
        "mean_b": float(np.mean([b[k] for k in ids])) if ids else float("nan"),
        "better_if": "higher" if higher_is_better else "lower",
    }
    if len(d) < 2:
        return {
            **out,
            "diff": float(d.mean()) if len(d) else float("nan"),
            "ci_low": float("nan"),
            "ci_high": float("nan"),
            "mde": float("nan"),
            "verdict": VERDICTS[2],
        }
    rng = np.random.default_rng(seed)
    means = d[rng.integers(0, len(d), size=(n_boot, len(d)))].mean(axis=1)
    lo, hi = float(np.quantile(means, alpha / 2)), float(np.quantile(means, 1 - alpha / 2))
    good_low, good_high = (lo, hi) if higher_is_better else (-hi, -lo)
    verdict = VERDICTS[0] if good_low > 0 else VERDICTS[1] if good_high < 0 else VERDICTS[2]
    mde = (1.96 + 0.84) * float(d.std(ddof=1)) / math.sqrt(len(d))
    return {**out, "diff": float(d.mean()), "ci_low": lo, "ci_high": hi, "mde": mde, "verdict": verdict}


def proportion_ci(successes: float, n: int, alpha: float = 0.05) -> tuple[float, float, float]:
    """(share, low, high): the Wilson score interval, which stays inside [0, 1] and is honest at small n and at
    shares near 0 or 1 (where a bootstrap of a handful of 0/1 values collapses to a point)."""
    if n == 0:
        return float("nan"), float("nan"), float("nan")
    z = 1.959963984540054 if alpha == 0.05 else float(_norm_ppf(1 - alpha / 2))
    p = successes / n
    den = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / den
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / den
    return p, max(0.0, centre - half), min(1.0, centre + half)


def _norm_ppf(q: float) -> float:
    from statistics import NormalDist

    return NormalDist().inv_cdf(q)


def write_csv_rows(rows: list[dict], path: Path, columns: list[str]) -> None:
    """A CSV with a fixed header; floats rounded to 6 significant digits, missing fields empty."""
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in r.items()})


# ---------------------------------------------------------------------------------------------------------------
# Human votes (the blind arena) and how often a judge agrees with them


def canonical_vote(model_x: str, model_y: str, winner: str) -> tuple[tuple[str, str], str]:
    """((first, second), verdict) for a vote on models x and y: the pair sorted by name, the verdict 'a' or 'b' for
    the first or second of that order, 'tie' for neither. `winner` is the winning model's name or 'tie'. Sorting
    (FastChat's convention) makes a vote on (v1, base) and one on (base, v1) the same pair."""
    first, second = sorted((model_x, model_y))
    if winner == "tie":
        return (first, second), "tie"
    if winner not in (first, second):
        raise ValueError(f"winner {winner!r} is neither {model_x!r} nor {model_y!r}")
    return (first, second), "a" if winner == first else "b"


def win_rate(wins: int, ties: int, losses: int, alpha: float = 0.05) -> dict:
    """A model's win rate over its votes against one opponent, ties counting half, with the Wilson interval of
    that share (as the judge check counts its ties): {"n", "wins", "ties", "losses", "win_rate", "ci_low",
    "ci_high"}. n = 0 gives NaN rate and bounds."""
    n = wins + ties + losses
    rate, lo, hi = proportion_ci(wins + 0.5 * ties, n, alpha)
    return {"n": n, "wins": wins, "ties": ties, "losses": losses, "win_rate": rate, "ci_low": lo, "ci_high": hi}


def judge_human_agreement(
    judge: dict[tuple, str], human: list[tuple[tuple, str]], with_ties: bool = True, alpha: float = 0.05
) -> dict:
    """How often a judge's verdict on a pair equals a person's, as FastChat's MT-bench study computes it
    (`compute_agreement.py`, judge vs human).

    `judge` holds one verdict per key (question id and the canonical model pair, see `canonical_vote`); `human`
    holds every human vote as (key, verdict), several per key allowed. Verdicts are 'a', 'b' or 'tie' (a person's
    "both bad" is a tie). Every human vote on a key the judge has a verdict for is one comparison; it agrees when
    the two verdicts are equal (tie with tie agrees). Without ties, a comparison where the judge or the person
    said tie is left out (FastChat's `ban=["tie"]`), so what remains asks only "did they pick the same winner".
    Returns {"agree", "n", "rate", "ci_low", "ci_high"} with a Wilson interval; n = 0 gives NaN."""
    agree = n = 0
    for key, vote in human:
        verdict = judge.get(key)
        if verdict is None or (not with_ties and "tie" in (verdict, vote)):
            continue
        n += 1
        agree += verdict == vote
    rate, lo, hi = proportion_ci(agree, n, alpha)
    return {"agree": agree, "n": n, "rate": rate, "ci_low": lo, "ci_high": hi}
