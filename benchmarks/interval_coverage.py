"""Measure: how often each candidate interval and test of a paired comparison holds its nominal level on simulated
nulls, the numbers behind the choices in baize_exp/stats.py (issue 24, "Verdicts that survive a reviewer").

1. Paired intervals of the mean per-item difference (true difference 0): the percentile bootstrap (today's
   `paired_bootstrap`), BCa, and `stats.paired_test`'s studentized bootstrap and t-interval, on normal, skewed
   (centred exponential) and heavily skewed (centred lognormal, sigma 1) differences, n = 10, 17, 27, 50.
   Coverage of 0 and the median width relative to the t-interval's.
2. Discrete per-item values with no true difference (sparse +-1; judge scores 1-10): how often each method says
   "better" or "worse" (should be <= 0.05), and how often it finds a real effect.
3. Seeds: a null with a between-seed shift and no treatment effect (seeds x items crossed): the item-only
   intervals on one seed pair, a two-level bootstrap (seeds within each arm, then the same items for both) and
   `stats.seed_paired_test` (method of moments, Satterthwaite t).
4. The judge check: accuracy of clustered items (3 per question, intra-question correlation 0.3): plain Wilson,
   a cluster bootstrap over questions, and `stats.clustered_share_ci` (Wilson at the design-effect n).

    python benchmarks/interval_coverage.py [--sims 1500] [--boot 2000] [--seed 0]

A fixed seed gives the same table every run; about 1-2 minutes on the 2-core box. Coverage from S simulations
has a standard error of about sqrt(0.95 * 0.05 / S) (0.006 at S = 1500).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from statistics import NormalDist

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from baize_exp import stats as S  # noqa: E402

Z = NormalDist()
CHUNK = 50  # simulations resampled at once (memory: CHUNK x boot x n floats)


def draw(dist: str, rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    """Per-item differences with mean 0."""
    if dist == "normal":
        return rng.standard_normal(shape)
    if dist == "skewed":  # skewness 2
        return rng.exponential(1.0, shape) - 1.0
    if dist == "heavy skew":  # skewness 6.2
        return rng.lognormal(0.0, 1.0, shape) - np.exp(0.5)
    raise ValueError(dist)


def bootstrap_intervals(x: np.ndarray, boot: int, rng: np.random.Generator, alpha: float = 0.05) -> dict:
    """Percentile and BCa bootstrap intervals of the mean for each row of x (sims x n), from the same resamples."""
    sims, n = x.shape
    out = {m: np.empty((sims, 2)) for m in ("percentile", "BCa")}
    lo_q, hi_q = alpha / 2, 1 - alpha / 2
    for s0 in range(0, sims, CHUNK):
        xs = x[s0 : s0 + CHUNK]
        c = len(xs)
        idx = rng.integers(0, n, size=(c, boot, n))
        means = np.take_along_axis(xs[:, None, :], idx, axis=2).mean(axis=2)
        m = xs.mean(axis=1)
        out["percentile"][s0 : s0 + c] = np.quantile(means, [lo_q, hi_q], axis=1).T
        # BCa: bias correction from the share of resampled means below the mean, acceleration from the jackknife
        z0 = np.array([Z.inv_cdf(min(max(f, 1e-6), 1 - 1e-6)) for f in (means < m[:, None]).mean(axis=1)])
        jack = (xs.sum(axis=1, keepdims=True) - xs) / (n - 1)
        dev = jack.mean(axis=1, keepdims=True) - jack
        acc = (dev**3).sum(axis=1) / (6 * ((dev**2).sum(axis=1)) ** 1.5)
        for j, q in enumerate((lo_q, hi_q)):
            zq = Z.inv_cdf(q)
            adj = np.array([Z.cdf(z + (z + zq) / (1 - a * (z + zq))) for z, a in zip(z0, acc, strict=True)])
            out["BCa"][s0 : s0 + c, j] = [np.quantile(mr, aq) for mr, aq in zip(means, adj, strict=True)]
    return out


def section_paired(sims: int, boot: int, rng: np.random.Generator) -> None:
    print("\n## 1. Paired intervals: coverage of a true difference of 0 (nominal 0.95)\n")
    methods = ["percentile", "BCa", "studentized", "t"]
    print("| distribution | n | " + " | ".join(methods) + " | median width vs t (pct, BCa, stud) |")
    print("|---|---|" + "---|" * len(methods) + "---|")
    for dist in ("normal", "skewed", "heavy skew"):
        for n in (10, 17, 27, 50):
            x = draw(dist, rng, (sims, n))
            ci = bootstrap_intervals(x, boot, rng)
            for name, kind in (("studentized", "studentized"), ("t", "t")):
                rows = [
                    S.paired_test(row, test="interval", interval=kind, n_boot=boot, seed=i) for i, row in enumerate(x)
                ]
                ci[name] = np.array([[r["ci_low"], r["ci_high"]] for r in rows])
            cover = {m: float(((ci[m][:, 0] <= 0) & (ci[m][:, 1] >= 0)).mean()) for m in methods}
            width = {m: float(np.median(ci[m][:, 1] - ci[m][:, 0])) for m in methods}
            ratios = ", ".join(f"{width[m] / width['t']:.2f}" for m in methods[:3])
            print(f"| {dist} | {n} | " + " | ".join(f"{cover[m]:.3f}" for m in methods) + f" | {ratios} |")


def discrete_draw(kind: str, rng: np.random.Generator, sims: int, n: int, effect: bool) -> np.ndarray:
    if kind == "sparse +-1":  # most items tie; a few move by one
        p_up, p_down = (0.3, 0.05) if effect else (0.1, 0.1)
        u = rng.random((sims, n))
        return (u < p_up).astype(float) - (u > 1 - p_down).astype(float)
    # judge scores 1-10: each question has a quality, each answer's score is it plus judge noise, rounded
    quality = rng.uniform(3, 8, (sims, n))
    a = np.clip(np.rint(quality + (1.0 if effect else 0.0) + rng.normal(0, 1.5, (sims, n))), 1, 10)
    b = np.clip(np.rint(quality + rng.normal(0, 1.5, (sims, n))), 1, 10)
    return a - b


def section_discrete(sims: int, boot: int, rng: np.random.Generator) -> None:
    print("\n## 2. Discrete per-item values: share of simulations with a verdict (better or worse)\n")
    print("Null: no true difference (should be <= 0.05). Effect: sparse P(+1) 0.3, P(-1) 0.05; scores +1.\n")
    methods = ["percentile (today)", "t", "studentized", "auto: wilcoxon exact", "sign exact"]
    print("| values | n | truth | " + " | ".join(methods) + " |")
    print("|---|---|---|" + "---|" * len(methods))
    for kind, n in (("sparse +-1", 23), ("judge scores 1-10", 17), ("judge scores 1-10", 27)):
        for effect in (False, True):
            x = discrete_draw(kind, rng, sims, n, effect)
            said = dict.fromkeys(methods, 0)
            zeros = {str(i): 0.0 for i in range(n)}
            for i, row in enumerate(x):
                vals = {str(j): float(v) for j, v in enumerate(row)}
                verdicts = [
                    S.paired_bootstrap(vals, zeros, n_boot=boot, seed=i),
                    S.paired_test(row, test="interval", interval="t"),
                    S.paired_test(row, test="interval", n_boot=boot, seed=i),
                    S.paired_test(row, n_boot=boot, seed=i),
                    S.paired_test(row, test="sign", n_boot=boot, seed=i),
                ]
                for m, r in zip(methods, verdicts, strict=True):
                    said[m] += r["verdict"] != S.VERDICTS[2]
            truth = "effect" if effect else "null"
            print(f"| {kind} | {n} | {truth} | " + " | ".join(f"{said[m] / sims:.3f}" for m in methods) + " |")
    sparse = [1.0] * 4 + [0.0] * 19
    today = S.paired_bootstrap(dict(enumerate(sparse)), dict.fromkeys(range(23), 0.0))
    t_p = S.paired_test(sparse, test="interval", interval="t")["p"]
    stud = S.paired_test(sparse, test="interval")
    new = S.paired_test(sparse)
    print(
        f"\nThe reviewer's case (4 of 23 items +1, the rest 0): percentile bootstrap (today) {today['verdict']}; "
        f"t-test p={t_p:.3f}; studentized alone {stud['verdict']} (p={stud['p']:.3f}); "
        f"paired_test: {new['verdict']} (p={new['p']:.3f}, {new['method']})"
    )


def crossed(rng: np.random.Generator, k: int, n: int, sd_seed: float, item: np.ndarray) -> np.ndarray:
    """One arm's k x n values: the shared item effects, this arm's item x arm effect, a shift per seed, and
    seed x item noise. No treatment effect: every arm has mean 0."""
    arm_item = rng.normal(0, 0.5, n)
    return item + arm_item + rng.normal(0, sd_seed, (k, 1)) + rng.normal(0, 0.5, (k, n))


def section_seeds(sims: int, boot: int, rng: np.random.Generator) -> None:
    print("\n## 3. Seeds: coverage of a true difference of 0 with a between-seed shift (n = 27 items)\n")
    print("Item x arm SD 0.5, seed x item SD 0.5, seed shift SD as listed; `base` is an untrained arm.\n")
    methods = [
        "item-only percentile (today, 1 seed pair)",
        "item-only studentized",
        "two-level bootstrap",
        "seed_paired_test",
    ]
    print("| seeds a vs b | seed SD | " + " | ".join(methods) + " |")
    print("|---|---|" + "---|" * len(methods))
    n = 27
    sims = min(sims, 1000)
    for ka, kb, sd_seed in ((2, 2, 0.3), (3, 3, 0.3), (5, 5, 0.3), (3, 3, 0.0), (3, "base", 0.3)):
        covered = dict.fromkeys(methods, 0)
        for _ in range(sims):
            item = rng.normal(0, 1, n)
            ya = crossed(rng, ka, n, sd_seed, item)
            yb = item[None, :] + rng.normal(0, 0.5, (1, n)) if kb == "base" else crossed(rng, kb, n, sd_seed, item)
            a0 = {str(i): v for i, v in enumerate(ya[0])}
            b0 = {str(i): v for i, v in enumerate(yb[0])}
            r = S.paired_bootstrap(a0, b0, n_boot=boot)
            covered[methods[0]] += r["ci_low"] <= 0 <= r["ci_high"]
            r = S.paired_test(a0, b0, test="interval", n_boot=boot)
            covered[methods[1]] += r["ci_low"] <= 0 <= r["ci_high"]
            # two-level bootstrap: seeds resampled within each arm, then items, the same items for both arms
            ca = rng.multinomial(ya.shape[0], [1 / ya.shape[0]] * ya.shape[0], size=boot)
            cb = rng.multinomial(yb.shape[0], [1 / yb.shape[0]] * yb.shape[0], size=boot)
            ci = rng.multinomial(n, [1 / n] * n, size=boot)
            star = (
                np.einsum("bk,kn,bn->b", ca, ya, ci) / ya.shape[0] - np.einsum("bk,kn,bn->b", cb, yb, ci) / yb.shape[0]
            ) / n
            lo, hi = np.quantile(star, [0.025, 0.975])
            covered[methods[2]] += lo <= 0 <= hi
            runs_a = {s: {str(i): v for i, v in enumerate(row)} for s, row in enumerate(ya)}
            runs_b = {s: {str(i): v for i, v in enumerate(row)} for s, row in enumerate(yb)}
            r = S.seed_paired_test(runs_a, runs_b, b_trained=kb != "base")
            covered[methods[3]] += r["ci_low"] <= 0 <= r["ci_high"]
        print(f"| {ka} vs {kb} | {sd_seed} | " + " | ".join(f"{covered[m] / sims:.3f}" for m in methods) + " |")


def section_judge_check(sims: int, boot: int, rng: np.random.Generator) -> None:
    print("\n## 4. Judge check: coverage of the true accuracy, 3 items per question, intra-question corr. 0.3\n")
    print("`passes` = share of simulations whose interval's lower end is above 0.5 (at accuracy 0.5: false passes).\n")
    methods = ["plain Wilson (today)", "cluster bootstrap", "design-effect Wilson"]
    print("| questions | accuracy | " + " | ".join(methods) + " | passes (today, new) |")
    print("|---|---|" + "---|" * len(methods) + "---|")
    icc, per = 0.3, 3
    for k in (8, 20):
        for acc in (0.5, 0.8):
            total = 1 / icc - 1  # beta(a, b) with a + b = total has intra-cluster correlation icc
            qa = rng.beta(acc * total, (1 - acc) * total, (sims, k))
            y = (rng.random((sims, k, per)) < qa[:, :, None]).astype(float)
            covered = dict.fromkeys(methods, 0)
            passes = [0, 0]
            clusters = np.repeat(np.arange(k), per)
            for row in y:
                flat = row.ravel()
                _, lo, hi = S.proportion_ci(flat.sum(), len(flat))
                covered[methods[0]] += lo <= acc <= hi
                passes[0] += lo > 0.5
                boots = row[rng.integers(0, k, (boot, k))].mean(axis=(1, 2))
                blo, bhi = np.quantile(boots, [0.025, 0.975])
                covered[methods[1]] += blo <= acc <= bhi
                c = S.clustered_share_ci(flat.tolist(), clusters.tolist())
                covered[methods[2]] += c["ci_low"] <= acc <= c["ci_high"]
                passes[1] += c["ci_low"] > 0.5
            print(
                f"| {k} | {acc} | "
                + " | ".join(f"{covered[m] / sims:.3f}" for m in methods)
                + f" | {passes[0] / sims:.3f}, {passes[1] / sims:.3f} |"
            )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sims", type=int, default=1500, help="simulations per cell (the seed section uses <= 1000)")
    ap.add_argument("--boot", type=int, default=2000, help="bootstrap resamples per interval")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    rng = np.random.default_rng(args.seed)
    t0 = time.monotonic()
    print(f"# interval_coverage.py --sims {args.sims} --boot {args.boot} --seed {args.seed}")
    section_paired(args.sims, args.boot, rng)
    section_discrete(args.sims, args.boot, rng)
    section_seeds(args.sims, args.boot, rng)
    section_judge_check(args.sims, args.boot, rng)
    print(f"\n{time.monotonic() - t0:.0f} s")


if __name__ == "__main__":
    main()
