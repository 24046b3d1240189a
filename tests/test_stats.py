"""The statistics behind verdicts (issue 24) on constructed data whose answers are known: exact sign and signed-rank
tests (against scipy's own), the studentized and t intervals, paired_test's verdicts on discrete scores, Holm's
adjustment, seed-aware inference, the judge check clustered by question, and the parse-failure counts of a judge
row. Coverage on simulated nulls is measured by benchmarks/interval_coverage.py, not here."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats as sps

from baize_exp import stats as S

DEGRADATIONS = ("truncated", "shuffled", "other_answer")  # reliability.DEGRADATIONS, checked where it is imported

SPARSE = [1.0] * 4 + [0.0] * 19  # the reviewer's case: 4 of 23 items +1, the rest tied


def _as_pairs(diffs: list[float]) -> tuple[dict[str, float], dict[str, float]]:
    return {str(i): d for i, d in enumerate(diffs)}, {str(i): 0.0 for i in range(len(diffs))}


# --- exact tests ------------------------------------------------------------------------------------------------


def test_sign_test_is_the_exact_binomial_and_ignores_ties() -> None:
    r = S.sign_test(SPARSE)
    assert (r["n_pos"], r["n_neg"], r["n_zero"], r["p"]) == (4, 0, 19, 0.125)
    rng = np.random.default_rng(0)
    for _ in range(20):
        d = rng.integers(-2, 3, int(rng.integers(5, 60))).astype(float)
        r = S.sign_test(d)
        m = r["n_pos"] + r["n_neg"]
        ref = sps.binomtest(r["n_pos"], m).pvalue if m else 1.0
        assert r["p"] == pytest.approx(ref, rel=1e-9)
    assert S.sign_test([0.0, 0.0])["p"] == 1.0


def test_wilcoxon_exact_matches_scipy_without_ties_and_a_full_enumeration_with_them() -> None:
    rng = np.random.default_rng(1)
    for n in (5, 12, 25):
        d = rng.normal(0.4, 1, n)
        assert S.wilcoxon_signed_rank(d)["p"] == pytest.approx(sps.wilcoxon(d, method="exact").pvalue, rel=1e-9)
    for _ in range(3):  # ties and zeros: scipy's permutation method enumerates all 2^n signs when n is small
        d = rng.integers(-3, 4, 12).astype(float)
        ref = sps.wilcoxon(d, zero_method="wilcox", method=sps.PermutationMethod(n_resamples=10**5)).pvalue
        r = S.wilcoxon_signed_rank(d)
        assert r["exact"] and r["n"] + r["n_zero"] == 12
        assert r["p"] == pytest.approx(ref, rel=1e-9)
    assert S.wilcoxon_signed_rank(SPARSE)["p"] == 0.125
    assert S.wilcoxon_signed_rank([0.0] * 5)["p"] == 1.0


def test_wilcoxon_switches_to_the_normal_approximation_above_its_limit_and_they_agree_there() -> None:
    rng = np.random.default_rng(2)
    n = S.WILCOXON_EXACT_MAX_N + 1
    for shift in (0.0, 0.1, 0.2):
        d = rng.normal(shift, 1, n)
        approx = S.wilcoxon_signed_rank(d)
        assert not approx["exact"]
        ref = sps.wilcoxon(d, method="approx", correction=True).pvalue
        assert approx["p"] == pytest.approx(ref, rel=1e-6)
        exact = S.wilcoxon_signed_rank(d, exact_max_n=n)
        assert exact["exact"] and abs(exact["p"] - approx["p"]) < 0.005


# --- intervals and paired_test -----------------------------------------------------------------------------------


def test_t_interval_is_the_one_sample_t_test() -> None:
    d = np.random.default_rng(3).normal(0.3, 1, 17)
    r = S.t_interval(d)
    lo, hi = sps.t.interval(0.95, 16, loc=d.mean(), scale=sps.sem(d))
    assert (r["ci_low"], r["ci_high"]) == (pytest.approx(lo), pytest.approx(hi))
    assert r["p"] == pytest.approx(sps.ttest_1samp(d, 0).pvalue)


def test_studentized_interval_is_close_to_t_on_normal_data_and_leans_with_the_skew() -> None:
    rng = np.random.default_rng(4)
    normal = rng.normal(0, 1, 60)
    s, t = S.studentized_interval(normal), S.t_interval(normal)
    assert (s["ci_high"] - s["ci_low"]) == pytest.approx(t["ci_high"] - t["ci_low"], rel=0.15)
    skewed = rng.exponential(1, 25)  # long right tail: the mean's interval reaches further up than down
    s = S.studentized_interval(skewed)
    assert s["ci_high"] - s["mean"] > 1.2 * (s["mean"] - s["ci_low"])
    t = S.t_interval(skewed)  # the t-interval is symmetric by construction
    assert t["ci_high"] - t["mean"] == pytest.approx(t["mean"] - t["ci_low"])


def test_an_intervals_p_value_agrees_with_whether_it_excludes_zero() -> None:
    rng = np.random.default_rng(5)
    seen = set()
    for i in range(40):
        d = rng.normal(rng.uniform(0, 0.8), 1, 15)
        for interval in ("studentized", "t"):
            r = S.paired_test(d, test="interval", interval=interval, seed=i)
            excludes = r["ci_low"] > 0 or r["ci_high"] < 0
            assert (r["p"] < 0.05) == excludes
            assert (r["verdict"] == "better") == excludes
            seen.add(excludes)
    assert seen == {True, False}  # both sides of the boundary were exercised


def test_sparse_discrete_scores_are_not_a_verdict_where_the_bootstrap_said_better() -> None:
    a, b = _as_pairs(SPARSE)
    # negative controls: today's percentile bootstrap and the studentized interval alone say "better"
    assert S.paired_bootstrap(a, b)["verdict"] == "better"
    assert S.paired_test(a, b, test="interval")["verdict"] == "better"
    r = S.paired_test(a, b)
    assert r["verdict"] == "no detectable difference"
    assert r["p"] == 0.125 and r["method"].startswith("wilcoxon exact")
    assert "does not" in r["note"]
    assert S.paired_test(a, b, test="sign")["p"] == 0.125
    assert (r["n"], r["mean_a"], r["mean_b"]) == (23, pytest.approx(4 / 23), 0.0)


def test_a_clear_effect_on_discrete_scores_is_still_found_on_either_side() -> None:
    d = [1.0] * 14 + [0.0] * 8 + [-1.0]
    assert S.paired_test(d)["verdict"] == "better"
    assert S.paired_test(d, higher_is_better=False)["verdict"] == "worse"
    assert S.paired_test([-x for x in d])["verdict"] == "worse"


def test_auto_uses_the_exact_test_only_for_discrete_differences() -> None:
    cont = np.random.default_rng(6).normal(1, 1, 12)
    assert S.paired_test(cont)["method"] == "studentized bootstrap"
    assert S.paired_test([2.0, 1.0, 0.0, 3.0, 1.0])["method"].startswith("wilcoxon")
    assert S.is_discrete([0.5, -0.5, 1.0]) and not S.is_discrete(cont)


def test_paired_test_pairs_on_shared_parsed_items_and_handles_degenerate_input() -> None:
    a = {"q1": 5.0, "q2": 7.0, "q3": None, "q4": 6.0}
    b = {"q1": 4.0, "q2": 5.0, "q3": 3.0, "q5": 1.0, "q4": 6.5}
    r = S.paired_test(a, b)
    assert r["n"] == 3 and r["diff"] == pytest.approx((1 + 2 - 0.5) / 3)
    one = S.paired_test([0.4])
    assert one["verdict"] == "no detectable difference" and math.isnan(one["p"]) and math.isnan(one["ci_low"])
    same = S.paired_test([0.3] * 6, test="interval")
    assert (same["ci_low"], same["ci_high"], same["p"], same["verdict"]) == (0.3, 0.3, 0.0, "better")
    assert S.paired_test([0.0] * 6, test="interval")["p"] == 1.0
    first, again = (S.paired_test(list(np.linspace(-1, 2, 9)), seed=3) for _ in range(2))
    assert (first["ci_low"], first["ci_high"]) == (again["ci_low"], again["ci_high"])  # seeded
    with pytest.raises(ValueError, match="test"):
        S.paired_test([1.0, 2.0], test="bootstrap")
    with pytest.raises(ValueError, match="interval"):
        S.paired_test([1.0, 2.0], interval="bca")


# --- Holm ----------------------------------------------------------------------------------------------------------


def test_holm_adjusts_step_down_and_keeps_the_order() -> None:
    adj = S.holm([0.01, 0.04, 0.03, 0.005])
    assert adj == pytest.approx([0.03, 0.06, 0.06, 0.02])  # 0.04 x 1 < 0.03 x 2: monotone, so 0.06
    adj = S.holm([0.01, None, float("nan"), 0.02])  # rows with no test are not in the family
    assert adj[0] == pytest.approx(0.02) and adj[3] == pytest.approx(0.02)
    assert math.isnan(adj[1]) and math.isnan(adj[2])
    assert S.holm([0.6, 0.7]) == [1.0, 1.0]


def test_holm_rows_demote_verdicts_the_family_does_not_support() -> None:
    rows = [
        {"comparison": "v1 vs base", "p": 0.004, "verdict": "better"},
        {"comparison": "v2 vs v1", "p": 0.03, "verdict": "worse"},
        {"comparison": "r4 vs r8", "p": 0.5, "verdict": "no detectable difference"},
    ]
    out = S.holm_rows(rows)
    assert [r["p_holm"] for r in out] == pytest.approx([0.012, 0.06, 0.5])
    assert [r["verdict_holm"] for r in out] == ["better", "no detectable difference", "no detectable difference"]
    assert "p_holm" not in rows[0]  # the input rows are left as they were
    with pytest.raises(ValueError, match="paired_test"):
        S.holm_rows([{"verdict": "better"}])


# --- seeds -------------------------------------------------------------------------------------------------------


def _arms(shift_a: list[float], shift_b: list[float], effect: float = 0.0, n: int = 30, noise: float = 0.1):
    """{seed: {item: value}} per arm: shared item levels, a shift per training seed, small seed x item noise."""
    rng = np.random.default_rng(7)
    item = rng.normal(5, 1, n)

    def arm(shifts: list[float], plus: float) -> dict:
        return {
            s: {f"q{i}": float(v) for i, v in enumerate(item + plus + sh + rng.normal(0, noise, n))}
            for s, sh in enumerate(shifts)
        }

    return arm(shift_a, effect), arm(shift_b, 0.0)


def test_a_between_seed_shift_is_not_a_treatment_effect() -> None:
    a, b = _arms([0.5, -0.3, -0.2], [-0.5, 0.3, 0.2])  # the arms' means are equal; their first seeds are not
    # negative control: one seed pair, item noise only, finds a "difference" of about 1
    one_pair = S.paired_bootstrap(a[0], b[0])
    assert one_pair["verdict"] == "better" and one_pair["diff"] == pytest.approx(1.0, abs=0.1)
    r = S.seed_paired_test(a, b)
    assert r["verdict"] == "no detectable difference"
    assert r["diff"] == pytest.approx(0.0, abs=0.05) and r["ci_low"] < 0 < r["ci_high"]
    assert r["seed_noise_known"] and (r["k_a"], r["k_b"]) == (3, 3)
    assert r["seed_sd_a"] == pytest.approx(np.std([0.5, -0.3, -0.2], ddof=1), abs=0.03)


def test_an_effect_larger_than_the_seed_noise_is_found_and_a_smaller_one_is_not() -> None:
    a, b = _arms([0.5, -0.3, -0.2], [-0.5, 0.3, 0.2], effect=3.0)
    r = S.seed_paired_test(a, b)
    assert r["verdict"] == "better" and r["ci_low"] < 3.0 < r["ci_high"]
    assert S.seed_paired_test(a, b, higher_is_better=False)["verdict"] == "worse"
    a, b = _arms([0.5, -0.3, -0.2], [-0.5, 0.3, 0.2], effect=0.3)  # within the seeds' spread
    assert S.seed_paired_test(a, b)["verdict"] == "no detectable difference"


def test_seed_variance_and_degrees_of_freedom_by_hand() -> None:
    # no item x arm and no seed x item noise: the per-item differences are constant, the variance is the seeds'
    shifts_a, shifts_b = [0.0, 1.0, 2.0], [0.0, 0.5]
    a, b = _arms(shifts_a, shifts_b, effect=1.0, noise=0.0)
    r = S.seed_paired_test(a, b)
    va, vb = np.var(shifts_a, ddof=1) / 3, np.var(shifts_b, ddof=1) / 2
    df = (va + vb) ** 2 / (va**2 / 2 + vb**2 / 1)
    half = sps.t.ppf(0.975, df) * math.sqrt(va + vb)
    assert r["diff"] == pytest.approx(1.0 + 1.0 - 0.25)
    assert r["df"] == pytest.approx(df)
    assert r["ci_high"] - r["diff"] == pytest.approx(half)


def test_seed_variance_is_unbiased_with_seed_by_item_noise() -> None:
    # the crossed model with large seed x item noise, which both the seed means and the per-item differences
    # carry: counted twice, the variance would be about 60% too large
    rng = np.random.default_rng(8)
    k, n, sd_seed, sd_arm_item, sd_noise = 3, 20, 0.3, 0.5, 2.0
    true_var = sd_seed**2 * 2 / k + 2 * sd_arm_item**2 / n + sd_noise**2 * 2 / (k * n)
    diffs, variances = [], []
    for _ in range(400):
        item = rng.normal(0, 1, n)
        arms = [
            item + rng.normal(0, sd_arm_item, n) + rng.normal(0, sd_seed, (k, 1)) + rng.normal(0, sd_noise, (k, n))
            for _ in range(2)
        ]
        runs = [{s: {f"q{i}": float(v) for i, v in enumerate(row)} for s, row in enumerate(y)} for y in arms]
        r = S.seed_paired_test(*runs)
        diffs.append(r["diff"])
        variances.append(((r["ci_high"] - r["diff"]) / sps.t.ppf(0.975, r["df"])) ** 2)
    assert np.var(diffs) == pytest.approx(true_var, rel=0.15)  # the simulation is the model the formula is for
    assert np.mean(variances) == pytest.approx(true_var, rel=0.15)  # held >= 0, the item part leans high (~5%)


def test_one_seed_per_arm_says_the_seed_noise_is_unknown() -> None:
    a, b = _arms([0.5], [-0.5])
    r = S.seed_paired_test(a, b)
    assert not r["seed_noise_known"] and math.isnan(r["seed_sd_a"]) and math.isnan(r["seed_sd_b"])
    assert "seed noise unknown" in r["note"] and r["method"].startswith("items only")
    item_only = S.paired_test(a[0], b[0])
    assert (r["ci_low"], r["ci_high"], r["verdict"]) == (item_only["ci_low"], item_only["ci_high"], "better")


def test_an_untrained_base_has_no_seed_noise_and_pooling_fills_a_one_seed_arm() -> None:
    a, b = _arms([0.5, -0.3, -0.2], [0.0])
    r = S.seed_paired_test(a, b, b_trained=False)
    assert r["seed_noise_known"] and r["seed_sd_b"] == 0.0
    unknown = S.seed_paired_test(a, b)  # the same one-seed arm, but trained: its seed noise is unknown
    assert not unknown["seed_noise_known"] and "for b" in unknown["note"]
    pooled = S.seed_paired_test(a, b, pool_seed_sd=True)
    assert pooled["seed_noise_known"] and pooled["seed_sd_pooled"] == pytest.approx(pooled["seed_sd_a"])
    assert pooled["ci_high"] - pooled["ci_low"] > unknown["ci_high"] - unknown["ci_low"]
    with pytest.raises(ValueError, match="untrained"):
        S.seed_paired_test(a, a, b_trained=False)
    with pytest.raises(ValueError, match="no seed"):
        S.seed_paired_test(a, {})


def test_items_missing_from_any_seed_are_listed_not_silently_dropped() -> None:
    a, b = _arms([0.1, -0.1], [0.0, 0.2])
    del a[1]["q3"]
    b[0]["q7"] = None
    b[1]["extra"] = 1.0
    r = S.seed_paired_test(a, b)
    assert r["n"] == 28 and r["items_dropped"] == ["extra", "q3", "q7"]


# --- the judge check -------------------------------------------------------------------------------------------------


def _check_records(correct_by_question: list[list[float | None]]) -> list[dict]:
    return [
        {"question_id": f"q{q}", "degradation": d, "correct": c}
        for q, row in enumerate(correct_by_question)
        for d, c in zip(DEGRADATIONS, row, strict=True)
    ]


def test_min_check_parsed_is_the_smallest_count_with_80_percent_power_at_accuracy_075() -> None:
    def power(n: int) -> float:
        return sum(sps.binom.pmf(x, n, 0.75) for x in range(n + 1) if S.proportion_ci(x, n)[1] > 0.5)

    m = S.MIN_CHECK_PARSED
    assert all(power(n) >= 0.8 for n in range(m, 121)) and power(m - 1) < 0.8
    assert 0.45 < sum(sps.binom.pmf(x, 25, 0.7) for x in range(26) if S.proportion_ci(x, 25)[1] > 0.5) < 0.55


def test_design_effect_is_one_for_spread_out_errors_and_the_worst_case_for_clustered_ones() -> None:
    spread = [[1.0, 1.0, 0.0]] * 30  # every question alike: no between-question variation
    c = S.clustered_share_ci(*zip(*[(r["correct"], r["question_id"]) for r in _check_records(spread)], strict=True))
    assert c["design_effect"] == 1.0 and c["n_effective"] == 90
    assert (c["ci_low"], c["ci_high"]) == pytest.approx(S.proportion_ci(60, 90)[1:])
    clustered = [[1.0] * 3] * 15 + [[0.0] * 3] * 15  # a question's items all right or all wrong
    c = S.clustered_share_ci(*zip(*[(r["correct"], r["question_id"]) for r in _check_records(clustered)], strict=True))
    assert c["design_effect"] == pytest.approx(3.0) and c["n_effective"] == pytest.approx(30)
    perfect = S.clustered_share_ci([1.0] * 60, [i // 3 for i in range(60)])  # a share of 1 says nothing of corr.
    assert perfect["n_effective"] == pytest.approx(20) and perfect["ci_low"] == pytest.approx(
        S.proportion_ci(20, 20)[1]
    )


def test_design_effect_by_hand() -> None:
    values = [1, 1, 0, 1, 0, 0, 1, 1, 1, 0, 1, 1]
    clusters = [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3]
    p, n, k = 8 / 12, 12, 4
    robust = k / (k - 1) * sum((sum(values[3 * c : 3 * c + 3]) - 3 * p) ** 2 for c in range(k)) / n**2
    c = S.clustered_share_ci(values, clusters)
    assert c["design_effect"] == pytest.approx(max(1.0, robust / (p * (1 - p) / n)))


@pytest.fixture(scope="module")
def R():
    # the eval stage's package (imported with it) loads torch and transformers: only the tests that compare with
    # the judge check's own records pay for that
    from baize_exp.stages.evaluate import reliability

    assert reliability.DEGRADATIONS == DEGRADATIONS
    return reliability


def test_too_few_readable_check_items_is_said_where_the_old_check_passed() -> None:
    rows = [[1.0, 1.0, 1.0]] * 8 + [[1.0, None, None]] * 1 + [[None, None, None]] * 11  # 25 of 60 parsed, all right
    records = _check_records(rows)
    # negative control: the old check (plain Wilson on the parsed items, no minimum) passed on these 25 items
    assert S.proportion_ci(25, 25)[1] > 0.5
    c = S.judge_check_clustered(records)
    assert (c["n"], c["unparsed"], c["total"], c["questions"]) == (25, 35, 60, 9)
    assert c["status"] == S.TOO_FEW_READABLE and not c["discriminates"]
    note = S.judge_check_note(c)
    assert note.startswith(S.NOT_SHOWN_TO_DISCRIMINATE) and "25 of 60" in note and S.TOO_FEW_READABLE in note
    assert not hasattr(S, "CANNOT_DISCRIMINATE")  # the old wording is gone everywhere


def test_judge_check_passes_a_good_judge_and_words_a_failure_as_not_shown() -> None:
    good = S.judge_check_clustered(_check_records([[1.0, 1.0, 1.0]] * 10 + [[0.0, 0.0, 1.0]] * 2))
    assert good["status"] == "discriminates" and good["discriminates"] and S.judge_check_note(good) == ""
    assert good["ci_low"] < good["ci_unclustered"][0]  # clustering widens the interval
    assert set(good["by_degradation"]) == set(DEGRADATIONS)
    assert good["design_effect"] > 1.5  # the errors sit in two questions
    assert good["by_degradation"]["shuffled"]["accuracy"] == pytest.approx(10 / 12)
    chance = S.judge_check_clustered(_check_records([[1.0, 0.0, 0.5]] * 12))
    assert chance["status"] == S.NOT_SHOWN_TO_DISCRIMINATE and not chance["discriminates"]
    assert S.judge_check_note(chance).startswith(S.NOT_SHOWN_TO_DISCRIMINATE + " (check accuracy 0.50")
    assert S.judge_check_note(None) == ""


def test_judge_check_takes_the_records_reliability_writes(R) -> None:
    judgments = []
    for q in range(12):
        judgments.append({"question_id": f"q{q}", "category": "c", "model": "check/good", "score": 9, "parse": "ok"})
        for d in DEGRADATIONS:
            score = None if (q == 0 and d == "shuffled") else 2
            judgments.append(
                {
                    "question_id": f"q{q}",
                    "category": "c",
                    "model": f"check/{d}",
                    "score": score,
                    "parse": "failed" if score is None else "ok",
                }
            )
    c = S.judge_check_clustered(R.check_records("single", judgments))
    assert (c["n"], c["unparsed"], c["accuracy"]) == (35, 1, 1.0)
    assert c["by_degradation"]["shuffled"]["unparsed"] == 1 and c["status"] == "discriminates"


# --- parse failures behind a judge row ------------------------------------------------------------------------------


def test_pair_counts_says_what_a_judge_row_used_and_what_it_could_not() -> None:
    v1 = {f"q{i}": (None if i < 12 else 7.0) for i in range(36)}
    base = {f"q{i}": (None if 12 <= i < 19 else 5.0) for i in range(36)}
    c = S.pair_counts(v1, base, "v1", "base")
    assert c["text"] == "n=17 of 36; unparsed: 12 in v1, 7 in base"
    assert (c["n"], c["of"], c["unparsed_a"], c["unparsed_b"]) == (17, 36, 12, 7)
    assert c["n"] == S.paired_test(v1, base)["n"]  # the same items the comparison pairs on
    del base["q35"]
    assert S.pair_counts(v1, base, "v1", "base")["text"].endswith("; missing: 1 in base")
    assert S.pair_counts({"q": 1.0}, {"q": 2.0})["text"] == "n=1 of 1"


def test_judge_item_values_keep_parse_failures_as_none() -> None:
    judgments = [
        {"model": m, "question_id": q, "category": "c", "mode": "single", "swap": False, "score": s}
        for m, q, s in [("v1", "a", 7), ("v1", "b", None), ("base", "a", 5), ("base", "b", 6)]
    ]
    v1, base = (S.judge_item_values(judgments, m, "single") for m in ("v1", "base"))
    assert v1 == {"a": 7.0, "b": None} and base == {"a": 5.0, "b": 6.0}
    assert S.pair_counts(v1, base, "v1", "base")["text"] == "n=1 of 2; unparsed: 1 in v1"
    assert "b" not in S.item_values(judgments, [])["v1"]["judge_single"]  # what item_values alone would hide
