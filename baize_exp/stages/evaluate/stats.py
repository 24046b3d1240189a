"""From judgments to numbers: per-question outcomes, bootstrap intervals, scores.csv rows and bar charts.

A judgment that could not be parsed stays in the tables as a parse failure (its own column); it is never a zero
and never silently left out of n without being counted.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

SCORES_COLUMNS = ["model", "category", "mode", "n", "mean", "ci_low", "ci_high", "parse_failures"]
# pairwise outcome of the evaluated model against the opponent, as a value whose mean is a win rate
PAIRWISE_VALUE = {"model": 1.0, "tie": 0.5, "opponent": 0.0}


def bootstrap_ci(values: list[float], n_boot: int = 1000, seed: int = 0, alpha: float = 0.05
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
    """One value per (model, question, mode) from judgment records: `score` for single/reference, the win value
    of the two pairwise orders combined, and `<mode>_weighted` from the probability-weighted score where the judge
    returned logprobs. `value` None marks a parse failure."""
    out: list[dict] = []
    pairs: dict[tuple, dict[bool, dict]] = {}
    for j in judgments:
        if j["mode"] == "pairwise":
            pairs.setdefault((j["model"], j["question_id"]), {})[bool(j["swap"])] = j
            continue
        out.append({"model": j["model"], "category": j["category"], "mode": j["mode"], "value": j["score"]})
        if j.get("weighted_score") is not None:
            out.append({"model": j["model"], "category": j["category"], "mode": f"{j['mode']}_weighted",
                        "value": j["weighted_score"]})
    for (model, _), both in pairs.items():
        w = combine_pairwise(*(both.get(s, {}).get("winner") for s in (False, True)))
        cat = next(iter(both.values()))["category"]
        out.append({"model": model, "category": cat, "mode": "pairwise",
                    "value": None if w is None else PAIRWISE_VALUE[w]})
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
                rows.append({"model": model, "category": cat, "mode": mode, "n": len(vals), "mean": round(mean, 4),
                             "ci_low": round(lo, 4), "ci_high": round(hi, 4),
                             "parse_failures": sum(o["value"] is None for o in sel)})
    return rows


def write_scores_csv(rows: list[dict], path: Path) -> None:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=SCORES_COLUMNS)
        w.writeheader()
        w.writerows(rows)


def plot_scores(rows: list[dict], path: Path, mode: str) -> None:
    """Bars per category (one per model) with 95% interval whiskers, for one judge mode."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in rows if r["mode"] == mode]
    models = list(dict.fromkeys(r["model"] for r in rows))
    cats = list(dict.fromkeys(r["category"] for r in rows))
    fig, ax = plt.subplots(figsize=(max(6, 0.6 * len(cats) * max(1, len(models))), 4))
    width = 0.8 / max(1, len(models))
    for k, m in enumerate(models):
        by = {r["category"]: r for r in rows if r["model"] == m and r["n"]}
        xs = [i + k * width for i in range(len(cats))]
        means = [by[c]["mean"] if c in by else 0 for c in cats]
        err = [[max(0, by[c]["mean"] - by[c]["ci_low"]) if c in by else 0 for c in cats],
               [max(0, by[c]["ci_high"] - by[c]["mean"]) if c in by else 0 for c in cats]]
        ax.bar(xs, means, width, yerr=err, capsize=3, label=Path(m).name or m)
    ax.set_xticks([i + width * (len(models) - 1) / 2 for i in range(len(cats))], cats, rotation=30, ha="right")
    if mode == "pairwise":
        ax.set_ylabel("win rate vs opponent (tie = 0.5), 95% CI")
        ax.set_ylim(0, 1)
        ax.axhline(0.5, color="grey", lw=0.8, ls="--")
    else:
        ax.set_ylabel(f"judge score 1-10 ({mode}), 95% CI")
        ax.set_ylim(0, 10)
    ax.set_title(f"eval: {mode}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
