"""Statistics shared by the eval stage and the report: per-question outcomes from judgments, bootstrap intervals,
scores.csv rows, the Wilson interval of a share, and the verdicts of paired comparisons: `paired_test` (a run's
models, item by item), `seed_paired_test` (arms trained with several seeds), Holm's adjustment over a table, and
the judge check clustered by question (see the section "Verdicts that survive a reviewer" below).

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


# items.jsonl `kind` -> the paired metric it gives: per held-out dialog the loss on its AI turns (`heldout`, the
# training labels) or on every token (`heldout_all`); per question the reference answer's log-likelihood
ITEM_METRICS = {"heldout": "heldout_loss", "heldout_all": "heldout_loss_all", "ref_loglik": "ref_loglik"}
LOSS_METRICS = ("heldout_loss", "heldout_loss_all")  # lower is better
# the prompt formats a model's likelihoods are scored in (eval.formats); an item records the one it used
FORMATS = ("baize", "chat_template")


def metric_key(metric: str, fmt: str | None) -> str:
    """A paired metric's key: `heldout_loss@baize` for a likelihood scored in a named format; the bare metric for
    judge values and for items an older run wrote without a format."""
    return f"{metric}@{fmt}" if fmt else metric


def split_metric(key: str) -> tuple[str, str]:
    """(metric, format) of a `metric_key`; the format is "" where the key names none."""
    metric, _, fmt = key.partition("@")
    return metric, fmt


def item_values(
    judgments: list[dict], items: list[dict], keep_failures: bool = False
) -> dict[str, dict[str, dict[str, float | None]]]:
    """{model: {metric key: {item id: value}}}, what paired comparisons pair on: `judge_<mode>` per question (the
    `outcomes` above: a pairwise question's two orders combined; a parse failure left out, or kept as None with
    `keep_failures` so `pair_counts` can count it), and per likelihood item `metric_key(metric, format)`:
    `heldout_loss` per held-out dialog (nats/token on its AI turns), `heldout_loss_all` (on all its tokens) and
    `ref_loglik` per question (mean log-prob per token of its reference answer), each in the prompt format it was
    scored in."""
    out: dict[str, dict[str, dict[str, float | None]]] = {}
    for o in outcomes(judgments):
        if o["value"] is not None or keep_failures:
            value = None if o["value"] is None else float(o["value"])
            out.setdefault(o["model"], {}).setdefault(f"judge_{o['mode']}", {})[str(o["question_id"])] = value
    for it in items:
        metric = ITEM_METRICS.get(it["kind"])
        if metric and it.get("tokens"):
            per_token = float(it["logprob_sum"]) / float(it["tokens"])
            key = metric_key(metric, it.get("format"))
            out.setdefault(it["model"], {}).setdefault(key, {})[str(it["item_id"])] = (
                -per_token if metric in LOSS_METRICS else per_token
            )
    return out


def higher_is_better(metric: str) -> bool:
    """Every paired metric but the held-out losses is better higher (a `metric_key` works too)."""
    return split_metric(metric)[0] not in LOSS_METRICS


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
    """Compare model a with model b on the items both have a value for (keys: question or dialog ids). The first
    verdict rule, kept for the arena's vote rows (`human.py`) and as the baseline `benchmarks/interval_coverage.py`
    measures; the eval stage and the report use `paired_test`.

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


# ---------------------------------------------------------------------------------------------------------------
# Verdicts that survive a reviewer (issue 24): an interval that holds its coverage at small n, exact tests for
# discrete judge scores, Holm's adjustment over a family of rows, seed-aware inference, the judge check clustered
# by question, and the parse failures behind every judge row. benchmarks/interval_coverage.py measures each choice.

PAIRED_TESTS = ("auto", "interval", "wilcoxon", "sign")
PAIRED_INTERVALS = ("studentized", "t")
# the power `mde` is read at, with the two-sided alpha of the test
MDE_POWER = 0.8
# Above this many non-zero differences the signed-rank test uses its normal approximation: the exact distribution
# is a convolution over n(n+1) half-rank sums (about 40 ms at n = 500 on the 2-core box, 1.7 s at n = 1000), and
# by n = 500 the approximation's p-value is within a few thousandths of the exact one (tests/test_stats.py).
WILCOXON_EXACT_MAX_N = 500
# what judge-based numbers carry when the judge check did not show the judge can tell a good answer from a broken
# one (a failed check is absence of evidence, not proof of blindness)
NOT_SHOWN_TO_DISCRIMINATE = "judge not shown to discriminate"
TOO_FEW_READABLE = "too few readable"
# The fewest parsed judge-check items a verdict on the judge is read from: the smallest count from which on a
# judge whose true accuracy is 0.75 passes the check (Wilson lower bound above 0.5) at least 80% of the time,
# counting the items as independent (exact binomial; at 25 items a 0.7 judge passes about half the time). The
# items are clustered by question, so this is a floor, not a guarantee of power.
MIN_CHECK_PARSED = 29
JUDGE_CHECK_STATUSES = ("discriminates", NOT_SHOWN_TO_DISCRIMINATE, TOO_FEW_READABLE)
# paired.csv (a run's and the cross-run report's): the metric's prompt format after the metric, then the old
# columns, then the test's own (p, Holm's adjustment over the table, the method, what the items were); seed-aware
# rows add SEED_PAIRED_COLUMNS
PAIRED_TEST_COLUMNS = [
    *PAIRED_COLUMNS[:4],
    "format",
    *PAIRED_COLUMNS[4:-1],
    "p",
    "p_holm",
    "verdict_holm",
    "method",
    "items",
    "note",
]
SEED_PAIRED_COLUMNS = ["k_a", "k_b", "seed_sd_a", "seed_sd_b", "seed_sd_pooled", "seed_noise_known", "df"]


def _t_dist():
    # scipy is imported here, not at module level: the stages import this module at start-up and most never test
    from scipy.stats import t

    return t


def _verdict(direction: float, higher_is_better: bool) -> str:
    """The verdict about a for a difference a - b shown to lie on the side `direction` (> 0 above, < 0 below 0)."""
    if direction == 0:
        return VERDICTS[2]
    return VERDICTS[0] if (direction > 0) == higher_is_better else VERDICTS[1]


def t_interval(diffs: list[float] | np.ndarray, alpha: float = 0.05) -> dict:
    """The one-sample t-interval and t-test of the mean per-item difference.

    Assumes the items are independent draws and the mean's sampling distribution is close enough to normal for
    Student's t with n - 1 degrees of freedom: at n = 17 it covered 0.948 on normal differences but 0.911 on
    skewed ones (benchmarks/interval_coverage.py), so `paired_test` defaults to `studentized_interval`; the
    t-interval stays for a deterministic answer and for the seed-aware test's Satterthwaite form. When every
    difference is equal the interval is that point (p 1 when it is 0, else 0).

    Returns {"n", "mean", "se", "df", "ci_low", "ci_high", "p", "mde"}; fewer than 2 items give NaN for all
    but n and the mean. `mde` is the true difference detected with probability MDE_POWER:
    (t(1 - alpha/2) + t(MDE_POWER)) times the standard error, both at n - 1 degrees of freedom.
    """
    d = np.asarray(diffs, dtype=float)
    n = len(d)
    nan = float("nan")
    out = {"n": n, "mean": float(d.mean()) if n else nan, "se": nan, "df": nan}
    if n < 2:
        return {**out, "ci_low": nan, "ci_high": nan, "p": nan, "mde": nan}
    t = _t_dist()
    df = n - 1
    se = float(d.std(ddof=1)) / math.sqrt(n)
    mean = out["mean"]
    q = float(t.ppf(1 - alpha / 2, df))
    p = float(2 * t.sf(abs(mean) / se, df)) if se > 0 else (1.0 if mean == 0 else 0.0)
    mde = (q + float(t.ppf(MDE_POWER, df))) * se
    return {**out, "se": se, "df": df, "ci_low": mean - q * se, "ci_high": mean + q * se, "p": p, "mde": mde}


def sign_test(diffs: list[float] | np.ndarray) -> dict:
    """The exact two-sided sign test of "a difference is as likely above 0 as below".

    Zeros (ties between the arms) carry no sign and are left out of the count; they are reported as `n_zero`.
    Exact at every n (a binomial(n_pos + n_neg, 1/2) tail, doubled, at most 1). Assumes only that the items are
    independent; it ignores how large each difference is, so it is the least powerful and the least assuming.

    Returns {"n_pos", "n_neg", "n_zero", "direction", "p"}: direction is n_pos - n_neg; no non-zero difference
    gives p 1.
    """
    d = np.asarray(diffs, dtype=float)
    pos, neg = int((d > 0).sum()), int((d < 0).sum())
    m = pos + neg
    # integer arithmetic: the tail is exact, and Python's int division rounds the ratio correctly at any n
    tail = sum(math.comb(m, k) for k in range(min(pos, neg) + 1))
    p = min(1.0, 2 * tail / 2**m) if m else 1.0
    return {"n_pos": pos, "n_neg": neg, "n_zero": len(d) - m, "direction": pos - neg, "p": p}


def _midranks(x: np.ndarray) -> np.ndarray:
    """Ranks 1..n of x, tied values sharing the mean of the ranks they span."""
    order = np.argsort(x, kind="mergesort")
    xs = x[order]
    ranks = np.empty(len(x))
    i = 0
    while i < len(xs):
        j = i
        while j + 1 < len(xs) and xs[j + 1] == xs[i]:
            j += 1
        ranks[order[i : j + 1]] = (i + j) / 2 + 1
        i = j + 1
    return ranks


def wilcoxon_signed_rank(diffs: list[float] | np.ndarray, exact_max_n: int = WILCOXON_EXACT_MAX_N) -> dict:
    """The two-sided Wilcoxon signed-rank test of "each difference is symmetric about 0".

    Zeros are dropped before ranking (Wilcoxon's own convention; `n_zero` counts them); tied magnitudes share
    their mean rank. Up to `exact_max_n` non-zero differences the p-value is exact: the distribution of W+ over
    all 2^n sign assignments given the observed (mid)ranks, so ties are handled exactly, not approximated. Above
    it, the normal approximation with the tie-corrected variance (sum of squared ranks / 4) and a continuity
    correction of 1/2. Assumes independent items and, under the null, a distribution symmetric about 0; it
    weighs each difference by its rank, so it uses more of judge scores than the sign test does.

    Returns {"n", "n_zero", "w_plus", "w_minus", "direction", "p", "exact"}: n counts the non-zero differences,
    direction is w_plus - w_minus; no non-zero difference gives p 1.
    """
    d = np.asarray(diffs, dtype=float)
    nz = d[d != 0]
    n = len(nz)
    out = {"n": n, "n_zero": len(d) - n}
    if n == 0:
        return {**out, "w_plus": 0.0, "w_minus": 0.0, "direction": 0.0, "p": 1.0, "exact": True}
    ranks = _midranks(np.abs(nz))
    w_plus = float(ranks[nz > 0].sum())
    w_minus = float(ranks[nz < 0].sum())
    out.update({"w_plus": w_plus, "w_minus": w_minus, "direction": w_plus - w_minus})
    if n <= exact_max_n:
        doubled = np.rint(2 * ranks).astype(int)  # midranks are multiples of 1/2: twice them are integers
        dist = np.zeros(int(doubled.sum()) + 1)
        dist[0] = 1.0
        top = 0
        for r in doubled:  # each rank joins W+ with probability 1/2 under the null
            shifted = dist[: top + 1].copy()
            dist[: top + 1] *= 0.5
            dist[r : r + top + 1] += 0.5 * shifted
            top += r
        w2 = int(round(2 * w_plus))
        low, high = float(dist[: w2 + 1].sum()), float(dist[w2:].sum())
        return {**out, "p": min(1.0, 2 * min(low, high)), "exact": True}
    from statistics import NormalDist

    mean = n * (n + 1) / 4
    sd = math.sqrt(float((ranks**2).sum()) / 4)
    z = max(0.0, abs(w_plus - mean) - 0.5) / sd
    return {**out, "p": min(1.0, 2 * (1 - NormalDist().cdf(z))), "exact": False}


def is_discrete(diffs: list[float] | np.ndarray) -> bool:
    """Whether per-item differences look like those of a discrete score: a zero (the arms tied on an item) or a
    magnitude that occurs twice. Judge scores (1-10) and pairwise win values (0, 1/2, 1) nearly always have
    both; per-item losses and log-likelihoods, continuous, practically never do."""
    mags = np.abs(np.asarray(diffs, dtype=float))
    return bool(len(mags) and ((mags == 0).any() or len(np.unique(mags)) < len(mags)))


def studentized_interval(
    diffs: list[float] | np.ndarray, alpha: float = 0.05, n_boot: int = 2000, seed: int = 0
) -> dict:
    """The studentized (bootstrap-t) interval of the mean per-item difference, and its test of "the mean is 0".

    Items are resampled with replacement; each resample's t = (resampled mean - mean) / its own standard error,
    and the interval is the mean minus the upper and lower alpha/2 quantiles of t times the standard error (order
    statistics, no interpolation). Unlike the percentile bootstrap it corrects for the spread of the standard
    error and for skew: on simulated nulls at n = 17 it covered 0.948 (normal) and 0.949 (skewed), where the
    percentile bootstrap covered 0.923 and 0.889 and the t-interval 0.948 and 0.911 (benchmarks/README.md,
    "interval_coverage.py"). Assumes independent items; heavy skew (lognormal) still lowers it to 0.90-0.94.
    Not for sparse discrete values: there it says "better" on nulls about twice as often as it should (the
    exact tests of `paired_test` are for them).
    A resample whose values are all equal has t = +-inf (kept: it is what that resample says), so at tiny n
    or with few non-zero values the interval can be unbounded rather than falsely narrow. p: twice the smaller
    share of resampled t at or beyond the observed mean / standard error, at most 1; the interval excludes 0
    when p < alpha (up to the resolution 1/n_boot). When every difference is equal (to rounding) the interval is
    that point.

    Returns {"n", "mean", "se", "ci_low", "ci_high", "p", "mde"}; fewer than 2 items give NaN for all but n and
    the mean. `mde`: (t(1 - alpha/2) + t(MDE_POWER)) times the standard error at n - 1 degrees of freedom (the
    normal-theory approximation; the bootstrap gives no closed form).
    """
    d = np.asarray(diffs, dtype=float)
    n = len(d)
    nan = float("nan")
    mean = float(d.mean()) if n else nan
    if n < 2:
        return {"n": n, "mean": mean, "se": nan, "ci_low": nan, "ci_high": nan, "p": nan, "mde": nan}
    t = _t_dist()
    se = float(d.std(ddof=1)) / math.sqrt(n)
    mde = (float(t.ppf(1 - alpha / 2, n - 1)) + float(t.ppf(MDE_POWER, n - 1))) * se
    if se <= 1e-12 * float(np.abs(d).max()):  # every difference equal, up to floating-point rounding
        return {"n": n, "mean": mean, "se": se, "ci_low": mean, "ci_high": mean, "p": float(mean == 0), "mde": mde}
    res = d[np.random.default_rng(seed).integers(0, n, size=(n_boot, n))]
    num = res.mean(axis=1) - mean
    den = res.std(axis=1, ddof=1) / math.sqrt(n)
    with np.errstate(divide="ignore", invalid="ignore"):
        tstar = np.where(den > 0, num / den, np.sign(num) * np.inf)
    q_lo = float(np.quantile(tstar, alpha / 2, method="lower"))
    q_hi = float(np.quantile(tstar, 1 - alpha / 2, method="higher"))
    t_obs = mean / se
    p = min(1.0, 2 * min(float((tstar >= t_obs).mean()), float((tstar <= t_obs).mean())))
    return {"n": n, "mean": mean, "se": se, "ci_low": mean - q_hi * se, "ci_high": mean - q_lo * se, "p": p, "mde": mde}


def paired_test(
    a: dict[str, float | None] | list[float] | np.ndarray,
    b: dict[str, float | None] | None = None,
    higher_is_better: bool = True,
    test: str = "auto",
    interval: str = "studentized",
    alpha: float = 0.05,
    n_boot: int = 2000,
    seed: int = 0,
) -> dict:
    """Compare model a with model b item by item: the mean difference a - b, its interval, a p-value and the
    verdict about a.

    Give either two {item id: value} dicts (paired on the ids both have a value for, None counting as none) or
    one sequence of per-item differences a - b as `a`.

    `interval`: "studentized" (`studentized_interval`, the default: it held its coverage on every simulated null
    at n = 10-50, benchmarks/README.md) or "t" (`t_interval`, deterministic, under-covers skewed differences).
    `test`:

    - "interval": the verdict and p come from the interval: "better"/"worse" when it lies wholly on one side of 0.
    - "wilcoxon" / "sign": the exact signed-rank or sign test, for discrete per-item values (judge scores, win
      values), where an interval's approximation is too optimistic with few non-zero differences (4 of 23 items
      +1: the t-test gives p 0.043, the exact sign test 0.125). p is the exact test's; the verdict needs both the
      exact test (p < alpha) and the interval on the same side of 0, so it never contradicts the interval shown
      and never rests on an approximation alone. When they disagree, `note` says so.
    - "auto": "wilcoxon" when the differences look discrete (`is_discrete`), else "interval".

    Assumes independent items (questions or dialogs) given the two trained models: it sees item noise only, not
    what another training seed would change (`seed_paired_test` does).

    Returns {"n", "mean_a", "mean_b", "better_if", "diff", "ci_low", "ci_high", "p", "mde", "verdict", "method",
    "note"} (the keys of PAIRED_COLUMNS plus p and method). mean_a/mean_b are NaN when given differences.
    """
    if test not in PAIRED_TESTS:
        raise ValueError(f"test {test!r}: one of {PAIRED_TESTS}")
    if interval not in PAIRED_INTERVALS:
        raise ValueError(f"interval {interval!r}: one of {PAIRED_INTERVALS}")
    nan = float("nan")
    if isinstance(a, dict):
        if b is None:
            raise ValueError("paired_test: two dicts of per-item values, or one sequence of differences")
        ids = [k for k in a if k in b and a[k] is not None and b[k] is not None]
        d = np.asarray([a[k] - b[k] for k in ids], dtype=float)
        means = {
            "mean_a": float(np.mean([a[k] for k in ids])) if ids else nan,
            "mean_b": float(np.mean([b[k] for k in ids])) if ids else nan,
        }
    else:
        d = np.asarray(a, dtype=float)
        means = {"mean_a": nan, "mean_b": nan}
    chosen = ("wilcoxon" if is_discrete(d) else "interval") if test == "auto" else test
    ci = studentized_interval(d, alpha, n_boot, seed) if interval == "studentized" else t_interval(d, alpha)
    interval_label = "studentized bootstrap" if interval == "studentized" else "t"
    out = {
        "n": len(d),
        **means,
        "better_if": "higher" if higher_is_better else "lower",
        "diff": ci["mean"],
        "ci_low": ci["ci_low"],
        "ci_high": ci["ci_high"],
        "mde": ci["mde"],
    }
    if len(d) < 2:
        return {**out, "p": nan, "verdict": VERDICTS[2], "method": "none", "note": f"{len(d)} item(s): no test"}
    interval_side = 1 if ci["ci_low"] > 0 else -1 if ci["ci_high"] < 0 else 0
    if chosen == "interval":
        verdict = _verdict(interval_side, higher_is_better)
        return {**out, "p": ci["p"], "verdict": verdict, "method": interval_label, "note": ""}
    result = wilcoxon_signed_rank(d) if chosen == "wilcoxon" else sign_test(d)
    label = f"{chosen} exact" if result.get("exact", True) else f"{chosen} normal approx."
    test_side = int(np.sign(result["direction"])) if result["p"] < alpha else 0
    agree = test_side if test_side == interval_side else 0
    note = ""
    if interval_side and not test_side:
        nonzero = len(d) - result["n_zero"]
        note = (
            f"the interval excludes 0 but the {label} test does not (p={result['p']:.3g}, {nonzero} non-zero "
            f"of {len(d)} differences): not shown"
        )
    elif test_side and test_side != interval_side:
        note = f"the {label} test rejects (p={result['p']:.3g}) but the mean's interval includes 0: not shown"
    method = f"{label} + {interval_label} interval"
    return {**out, "p": result["p"], "verdict": _verdict(agree, higher_is_better), "method": method, "note": note}


def holm(p_values: list[float | None]) -> list[float]:
    """Holm's step-down adjustment of a family of p-values (controls the chance of any false verdict in the
    family at alpha, under any dependence between the tests). A None or NaN p (a row with no test) stays NaN and
    is not counted in the family's size. Returns the adjusted p-values in the input order."""
    vals = [float("nan") if p is None else float(p) for p in p_values]
    tested = sorted((i for i, p in enumerate(vals) if not math.isnan(p)), key=lambda i: vals[i])
    m = len(tested)
    out = [float("nan")] * len(vals)
    running = 0.0
    for rank, i in enumerate(tested):
        running = max(running, min(1.0, (m - rank) * vals[i]))  # monotone: never below a smaller p's adjustment
        out[i] = running
    return out


def holm_rows(rows: list[dict], alpha: float = 0.05) -> list[dict]:
    """The rows (of `paired_test` or `seed_paired_test`, one family: e.g. every row of one report) each with
    `p_holm` and `verdict_holm`: the row's own verdict where its adjusted p is below alpha (use the alpha the
    rows were tested at), else "no detectable difference". Returns new dicts; the input is not changed."""
    missing = [i for i, r in enumerate(rows) if "p" not in r]
    if missing:
        raise ValueError(
            f"holm_rows: row(s) {missing[:5]} have no 'p' (rows of paired_bootstrap?): make them with paired_test"
        )
    adjusted = holm([r["p"] for r in rows])
    return [
        {**r, "p_holm": ph, "verdict_holm": r["verdict"] if ph < alpha else VERDICTS[2]}
        for r, ph in zip(rows, adjusted, strict=True)
    ]


def _arm_spread(y: np.ndarray) -> tuple[float, float]:
    """(variance over seeds of the seed means, residual mean square of the seed x item table) of one arm's
    k x n values; NaN for one seed."""
    k, n = y.shape
    if k < 2:
        return float("nan"), float("nan")
    resid = y - y.mean(1, keepdims=True) - y.mean(0, keepdims=True) + y.mean()
    return float(y.mean(1).var(ddof=1)), float((resid**2).sum() / ((k - 1) * (n - 1)))


def seed_paired_test(
    a: dict[object, dict[str, float | None]],
    b: dict[object, dict[str, float | None]],
    higher_is_better: bool = True,
    alpha: float = 0.05,
    a_trained: bool = True,
    b_trained: bool = True,
    pool_seed_sd: bool = False,
    n_boot: int = 2000,
    seed: int = 0,
) -> dict:
    """Compare arm a with arm b when each arm was trained with several seeds and every seed was evaluated on the
    same items: {seed: {item id: value}} per arm (the arms may have different numbers of seeds).

    The effect is the mean over seeds and items of a minus that of b, on the items every seed of both arms has a
    value for (the others are listed in `items_dropped`, never silently lost). Its variance comes from the
    crossed random-effects model value = arm + seed shift + item x arm + seed x item noise, by the method of
    moments: var(seed means)/k per trained arm, plus var(per-item difference of seed means)/n less the seed x item
    noise the first term already counts (the residual mean square of each arm's seed x item table over k n),
    that item part held at >= 0. The interval is t with Satterthwaite's degrees of freedom: with 3 seeds per arm
    about 4, so the interval is as wide as 3 seeds deserve. Chosen over a two-level bootstrap (seeds within each
    arm, then the same items for both) because resampling 2-5 seeds cannot show their spread: on a null with a
    between-seed shift that bootstrap covered far below 0.95 where this covers about 0.95
    (benchmarks/interval_coverage.py).

    Assumes seeds are independent draws of training randomness, items independent draws of questions, the mean
    close enough to normal for t (judge scores averaged over seeds included; no exact test here). An arm no
    training seed touches (`a_trained`/`b_trained` False: the base model) has one evaluation and no seed noise.
    A trained arm with one seed has unknown seed noise: then `seed_noise_known` is False, its seed SD is NaN and
    the interval covers only what is known (item noise, the other arm's seeds), said in `note`; unless
    `pool_seed_sd`, which assumes every trained arm has the same seed noise and pools it over the trained arms
    that have >= 2 seeds. With no seed noise to add (one seed each, untrained or unknown) the result is
    `paired_test`'s on the items (its studentized interval, exact tests for discrete values; `n_boot`, `seed`).

    Returns {"n", "items_dropped", "k_a", "k_b", "mean_a", "mean_b", "better_if", "diff", "ci_low", "ci_high",
    "p", "mde", "df", "verdict", "seed_sd_a", "seed_sd_b", "seed_sd_pooled", "seed_noise_known", "method",
    "note"}. seed_sd_*: the SD over seeds of the arm's mean over the items (0 for an untrained arm).
    """
    for name, runs, trained in (("a", a, a_trained), ("b", b, b_trained)):
        if not runs:
            raise ValueError(f"seed_paired_test: arm {name} has no seed")
        if not trained and len(runs) > 1:
            raise ValueError(f"seed_paired_test: arm {name} is untrained (one evaluation) but has {len(runs)} seeds")
    every = [run for runs in (a, b) for run in runs.values()]
    shared = set.intersection(*({k for k, v in run.items() if v is not None} for run in every))
    items = [k for k in next(iter(a.values())) if k in shared]  # paired_test's order: one seed each gives its answer
    dropped = sorted(set().union(*every) - shared, key=str)
    ya = np.asarray([[run[k] for k in items] for run in a.values()], dtype=float).reshape(len(a), len(items))
    yb = np.asarray([[run[k] for k in items] for run in b.values()], dtype=float).reshape(len(b), len(items))
    n, nan = len(items), float("nan")
    spread = {"a": (len(a), a_trained, *_arm_spread(ya)), "b": (len(b), b_trained, *_arm_spread(yb))}
    seed_sd = {
        name: (math.sqrt(s2) if k > 1 else nan) if trained else 0.0 for name, (k, trained, s2, _) in spread.items()
    }
    out = {
        "n": n,
        "items_dropped": dropped,
        "k_a": len(a),
        "k_b": len(b),
        "mean_a": float(ya.mean()) if n else nan,
        "mean_b": float(yb.mean()) if n else nan,
        "better_if": "higher" if higher_is_better else "lower",
        "diff": float(ya.mean() - yb.mean()) if n else nan,
        "seed_sd_a": seed_sd["a"],
        "seed_sd_b": seed_sd["b"],
        "seed_sd_pooled": nan,
    }
    if n < 2:
        return {
            **out,
            **dict.fromkeys(("ci_low", "ci_high", "p", "mde", "df"), nan),
            "verdict": VERDICTS[2],
            "seed_noise_known": False,
            "method": "none",
            "note": f"{n} shared item(s): no test",
        }
    # (value, degrees of freedom) of each variance component of the effect; `less` is the seed x item noise the
    # seed components already hold, to take off the item component
    terms: list[tuple[float, float]] = []
    less: list[tuple[float, float]] = []
    trained_arms = {name: s for name, s in spread.items() if s[1]}
    with_seeds = {name: s for name, s in trained_arms.items() if s[0] > 1}
    unknown: list[str] = []
    pooled = bool(pool_seed_sd and with_seeds)
    if pooled:
        df_s = sum(k - 1 for k, *_ in with_seeds.values())
        df_r = (n - 1) * df_s
        s2 = sum((k - 1) * s2 for k, _, s2, _ in with_seeds.values()) / df_s
        ms = sum((k - 1) * ms for k, _, _, ms in with_seeds.values()) / df_s
        per_seed = sum(1 / k for k, *_ in trained_arms.values())
        terms.append((s2 * per_seed, df_s))
        less.append((ms * per_seed, df_r))
        out["seed_sd_pooled"] = math.sqrt(s2)
    else:
        for name, (k, _, s2, ms) in trained_arms.items():
            if k > 1:
                terms.append((s2 / k, k - 1))
                less.append((ms / k, (k - 1) * (n - 1)))
            else:
                unknown.append(name)
    d = ya.mean(0) - yb.mean(0)
    if unknown:
        note = (
            f"seed noise unknown: one training seed for {' and '.join(unknown)}; the interval covers item noise"
            + (" and the other arm's seeds" if terms else "")
            + " only"
        )
    else:
        note = "seed SD pooled over the trained arms (assumed equal)" if pooled else ""
    if not terms:  # no seed noise to add (or none known): the item-level comparison of paired_test, as it is
        r = paired_test(d.tolist(), higher_is_better=higher_is_better, alpha=alpha, n_boot=n_boot, seed=seed)
        keep = ("ci_low", "ci_high", "p", "mde", "verdict")
        return {
            **out,
            **{k: r[k] for k in keep},
            "df": float(n - 1),
            "seed_noise_known": not unknown,
            "method": f"items only: {r['method']}",
            "note": "; ".join(x for x in (note, r["note"]) if x),
        }
    s2_items = float(d.var(ddof=1))
    if s2_items - sum(v for v, _ in less) > 0:
        terms += [(s2_items / n, n - 1), *((-v / n, df) for v, df in less)]
    var = sum(v for v, _ in terms)
    den = sum(v * v / df for v, df in terms)
    df = var * var / den if den > 0 else n - 1.0
    t = _t_dist()
    q = float(t.ppf(1 - alpha / 2, df))
    se = math.sqrt(var)
    diff = out["diff"]
    p = float(2 * t.sf(abs(diff) / se, df)) if se > 0 else (1.0 if diff == 0 else 0.0)
    lo, hi = diff - q * se, diff + q * se
    side = 1 if lo > 0 else -1 if hi < 0 else 0
    return {
        **out,
        "ci_low": lo,
        "ci_high": hi,
        "p": p,
        "mde": (q + float(t.ppf(MDE_POWER, df))) * se,
        "df": df,
        "verdict": _verdict(side, higher_is_better),
        "seed_noise_known": not unknown,
        "method": "seeds x items: moment estimate, Satterthwaite t",
        "note": note,
    }


def clustered_share_ci(values: list[float], clusters: list[object], alpha: float = 0.05) -> dict:
    """A share (the mean of values in [0, 1]; a tie counts 1/2) with a Wilson interval at the effective n of
    clustered items.

    Items of one cluster (the degradations of one question share its good answer) are not independent, so n is
    divided by the design effect: the cluster-robust variance of the share (between-cluster, with K/(K-1)) over
    the binomial variance p(1-p)/n, held between 1 (independent) and sum(m_c^2)/n (all items of a cluster alike).
    At a share of 0 or 1 the variance says nothing about the correlation and the worst case is taken. Chosen over
    a cluster bootstrap, which with 8-20 questions is a percentile bootstrap on few units (narrow, as
    benchmarks/interval_coverage.py shows for items) and collapses to a point when every item is right; Wilson
    stays inside [0, 1]. Assumes clusters are independent and the share varies between them only.

    Returns {"n", "clusters", "share", "ci_low", "ci_high", "design_effect", "n_effective"}; n = 0 gives NaN.
    """
    v = np.asarray(values, dtype=float)
    n = len(v)
    if n == 0:
        nan = float("nan")
        return {
            "n": 0,
            "clusters": 0,
            "share": nan,
            "ci_low": nan,
            "ci_high": nan,
            "design_effect": nan,
            "n_effective": 0.0,
        }
    sums: dict[object, list[float]] = {}
    for x, c in zip(v, clusters, strict=True):
        sums.setdefault(c, []).append(float(x))
    k = len(sums)
    p = float(v.mean())
    worst = sum(len(s) ** 2 for s in sums.values()) / n  # every item of a cluster alike (intra-cluster corr. 1)
    binomial = p * (1 - p) / n
    if binomial == 0 or k < 2:
        deff = worst
    else:
        robust = k / (k - 1) * sum((sum(s) - p * len(s)) ** 2 for s in sums.values()) / n**2
        deff = min(worst, max(1.0, robust / binomial))
    n_eff = n / deff
    _, lo, hi = proportion_ci(p * n_eff, n_eff, alpha)  # type: ignore[arg-type]  # Wilson takes a real n
    return {"n": n, "clusters": k, "share": p, "ci_low": lo, "ci_high": hi, "design_effect": deff, "n_effective": n_eff}


def judge_check_clustered(records: list[dict], alpha: float = 0.05, min_parsed: int = MIN_CHECK_PARSED) -> dict:
    """The judge check's verdict on the judge, from `reliability.check_records` records ({"question_id",
    "degradation", "correct": 1/0.5/0 or None when a reply did not parse, ...}).

    Accuracy over the parsed items with `clustered_share_ci`'s interval (clustered by question), beside the
    count of unparsed items (never left out unsaid) and the plain Wilson interval for reference. `status`:
    TOO_FEW_READABLE below `min_parsed` parsed items (the check could not have shown much either way),
    "discriminates" when the interval's lower end is above chance (0.5), else NOT_SHOWN_TO_DISCRIMINATE: a
    failed check is absence of evidence that the judge can tell, not evidence that it cannot.

    Returns the keys `check_summary` gives (n, correct, accuracy, ci_low, ci_high, chance, unparsed,
    discriminates, by_degradation) plus total, questions, design_effect, n_effective, ci_unclustered,
    min_parsed and status; each by_degradation entry has n, unparsed, correct, accuracy, ci_low, ci_high,
    design_effect.
    """

    def summary(recs: list[dict]) -> dict:
        parsed = [r for r in recs if r["correct"] is not None]
        c = clustered_share_ci([r["correct"] for r in parsed], [r["question_id"] for r in parsed], alpha)
        return {
            "n": c["n"],
            "unparsed": len(recs) - c["n"],
            "correct": float(sum(r["correct"] for r in parsed)),
            "accuracy": c["share"],
            "ci_low": c["ci_low"],
            "ci_high": c["ci_high"],
            "questions": c["clusters"],
            "design_effect": c["design_effect"],
            "n_effective": c["n_effective"],
        }

    out = summary(records)
    _, lo, hi = proportion_ci(out["correct"], out["n"], alpha)
    if out["n"] < min_parsed:
        status = TOO_FEW_READABLE
    else:
        status = "discriminates" if out["ci_low"] > 0.5 else NOT_SHOWN_TO_DISCRIMINATE
    by = {}
    for deg in dict.fromkeys(r["degradation"] for r in records):
        s = summary([r for r in records if r["degradation"] == deg])
        by[deg] = {k: s[k] for k in ("n", "unparsed", "correct", "accuracy", "ci_low", "ci_high", "design_effect")}
    return {
        **out,
        "total": len(records),
        "chance": 0.5,
        "ci_unclustered": [lo, hi],
        "min_parsed": min_parsed,
        "status": status,
        "discriminates": status == "discriminates",
        "by_degradation": by,
    }


def judge_check_note(check: dict | None) -> str:
    """The note every judge-based number carries from a `judge_check_clustered` result: empty when the judge was
    shown to discriminate or there was no check (None), else NOT_SHOWN_TO_DISCRIMINATE with the reason."""
    if check is None or check["discriminates"]:
        return ""
    read = f"{check['n']} of {check['total']} check items readable"
    if check["status"] == TOO_FEW_READABLE:
        return f"{NOT_SHOWN_TO_DISCRIMINATE} ({TOO_FEW_READABLE}: {read}, fewer than {check['min_parsed']})"
    return (
        f"{NOT_SHOWN_TO_DISCRIMINATE} (check accuracy {check['accuracy']:.2f} "
        f"[{check['ci_low']:.2f}, {check['ci_high']:.2f}], {read})"
    )


def judge_item_values(judgments: list[dict], model: str, mode: str) -> dict[str, float | None]:
    """{question id: value} of one model's judge outcomes in one mode (`outcomes`: "single", "pairwise",
    "single_weighted", ...), None where the judgment did not parse: `item_values` without the parse failures
    dropped, so `pair_counts` can count them."""
    return {str(o["question_id"]): o["value"] for o in outcomes(judgments) if o["model"] == model and o["mode"] == mode}


def pair_counts(a: dict[str, float | None], b: dict[str, float | None], a_name: str = "a", b_name: str = "b") -> dict:
    """What a paired comparison of a and b used and what it could not: n (items with a value in both) of the items
    either has; per arm the items unparsed (value None) and missing (no entry: e.g. no weighted score), as counts
    and ids, and `text`, e.g. "n=17 of 36; unparsed: 12 in v1, 7 in base"."""
    ids = list(dict.fromkeys([*a, *b]))
    used = sum(a.get(k) is not None and b.get(k) is not None for k in ids)
    out: dict = {"n": used, "of": len(ids)}
    clauses = []
    for what, test in (
        ("unparsed", lambda vals, k: k in vals and vals[k] is None),
        ("missing", lambda v, k: k not in v),
    ):
        per = {}
        for side, vals, name in (("a", a, a_name), ("b", b, b_name)):
            out[f"{what}_ids_{side}"] = [k for k in ids if test(vals, k)]
            out[f"{what}_{side}"] = len(out[f"{what}_ids_{side}"])
            if out[f"{what}_{side}"]:
                per[name] = out[f"{what}_{side}"]
        if per:
            clauses.append(f"{what}: " + ", ".join(f"{c} in {name}" for name, c in per.items()))
    out["text"] = "; ".join([f"n={used} of {len(ids)}", *clauses])
    return out
