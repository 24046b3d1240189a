"""Judge reliability and paired comparisons on constructed data whose answers are known: the judge check, position
agreement, self-consistency, the length-controlled win rate and the paired bootstrap. Judges are real HTTP
servers on loopback (the fault server with a scripted reply), talked to through the real client."""

from __future__ import annotations

import re

import numpy as np
import pytest
from helpers.config import compose_cfg
from helpers.fault_server import FaultServer

from baize_exp import stats as S
from baize_exp.chat.client import ChatClient
from baize_exp.data import load_eval_questions
from baize_exp.stages.evaluate import judge as J
from baize_exp.stages.evaluate import reliability as R
from baize_exp.stages.evaluate import stage as evaluate


@pytest.fixture(scope="module")
def eval_cfg():
    return compose_cfg([]).eval


def _judge(reply) -> tuple[FaultServer, ChatClient]:
    srv = FaultServer(api_key="k", reply=reply).start()
    return srv, ChatClient(srv.base_url, "k", "judge", concurrency=8, max_retries=0)


def _check(eval_cfg, mode: str, reply, n: int = 12) -> tuple[dict, list[dict]]:
    cfg = eval_cfg.copy()
    cfg.judge_mode, cfg.judge_check = mode, n
    jobs = evaluate._judge_check_jobs(cfg, {})
    srv, client = _judge(reply)
    try:
        recs = J.run_judge(client, mode, jobs, cfg.verdict_retry if mode == "pairwise" else cfg.score_retry)
    finally:
        srv.stop()
    if mode == "pairwise":
        for j in recs:
            j["degradation"] = j["model"].split("/", 1)[1]
    records = R.check_records(mode, recs)
    return S.judge_check_clustered(records), records


# --- the judge check ---------------------------------------------------------------------------------------


def test_degradations_are_the_reference_made_worse_in_a_known_way() -> None:
    qs = load_eval_questions(None, None)
    items = R.check_items(qs, 9, seed=0)
    assert len({i["category"] for i in items}) == 9  # spread over the categories
    by = {(i["question_id"], i["degradation"]): i for i in items}
    for (qid, how), i in by.items():
        ref = i["reference"]
        if how == "truncated":
            assert ref.startswith(i["bad"]) and len(i["bad"].split()) <= len(ref.split()) // 3 + 1
        elif how == "shuffled":
            assert sorted(i["bad"].split()) == sorted(ref.split()) and i["bad"] != ref
        else:
            other = next(q for q in qs if q["reference"].strip() == i["bad"])
            assert other["question_id"] != qid and other["category"] != i["category"]
    assert R.check_items(qs, 9, seed=0) == items  # seeded: the same check every run


def _score_by_reference(qs: list[dict]):
    refs = {q["question"]: q["reference"].strip() for q in qs}

    def reply(req: dict) -> str:  # a judge that knows: the question's own reference (and only it) is excellent
        text = req["messages"][-1]["content"]
        question = text.split("Question: ", 1)[1].split("\n\nAnswer: ", 1)[0]
        answer = text.split("\n\nAnswer: ", 1)[1].rsplit("\n\nReply in the form", 1)[0]
        return "Score: 9" if answer.strip() == refs[question] else "Score: 2"

    return reply


def test_judge_check_a_knowing_judge_discriminates(eval_cfg) -> None:
    summary, records = _check(eval_cfg, "single", _score_by_reference(load_eval_questions(None, None)))
    assert summary["n"] == 36 and summary["accuracy"] == 1.0 and summary["discriminates"]
    # clustered by question: at accuracy 1 the design effect is the worst case, so n_effective is the 12 questions
    assert summary["status"] == "discriminates" and summary["n_effective"] == pytest.approx(12)
    assert summary["ci_low"] == pytest.approx(S.proportion_ci(12, 12)[1]) and summary["unparsed"] == 0
    assert set(summary["by_degradation"]) == set(R.DEGRADATIONS)
    assert all(r["good_score"] == 9 and r["bad_score"] == 2 for r in records)
    # the same knowing judge on the old default of 8 questions (24 items): too few to show anything
    few, _ = _check(eval_cfg, "single", _score_by_reference(load_eval_questions(None, None)), n=8)
    assert few["accuracy"] == 1.0 and few["status"] == S.TOO_FEW_READABLE and not few["discriminates"]


@pytest.mark.parametrize("reply", ["Score: 5", "The answer is: 10."])
def test_judge_check_a_constant_or_unparsable_judge_is_not_shown_to_discriminate(eval_cfg, reply: str) -> None:
    summary, _ = _check(eval_cfg, "single", lambda req: reply)
    assert not summary["discriminates"]
    if reply == "Score: 5":  # every pair a tie: exactly chance
        assert summary["accuracy"] == 0.5 and summary["n"] == 36
        assert summary["status"] == S.NOT_SHOWN_TO_DISCRIMINATE
    else:  # strict parsing: no score at all, so nothing shows the judge can tell
        assert summary["n"] == 0 and summary["unparsed"] == 36 and summary["status"] == S.TOO_FEW_READABLE


def test_judge_check_pairwise_position_biased_judge_is_at_chance(eval_cfg) -> None:
    summary, records = _check(eval_cfg, "pairwise", lambda req: "[[A]]")
    assert summary["n"] == 72  # 36 pairs, both orders
    assert summary["accuracy"] == 0.5 and not summary["discriminates"]
    assert {r["correct"] for r in records if not r["swap"]} == {1.0}  # good answer first: "right"
    assert {r["correct"] for r in records if r["swap"]} == {0.0}  # good answer second: wrong


# --- position agreement, self-consistency, parse shares ----------------------------------------------------


def _pairwise_judgments(eval_cfg, reply, n: int = 12) -> list[dict]:
    qs = {f"q{i}": {"question_id": f"q{i}", "category": "generic", "question": f"Question {i}?"} for i in range(n)}
    answers = [{"question_id": q, "category": "generic", "model": "v1", "answer": f"mine {q}"} for q in qs]
    cfg = eval_cfg.copy()
    cfg.pairwise_against = "teacher"
    jobs = J.build_jobs("pairwise", cfg, qs, answers, {q: f"theirs {q}" for q in qs})
    srv, client = _judge(reply)
    try:
        return J.run_judge(client, "pairwise", jobs, cfg.verdict_retry)
    finally:
        srv.stop()


def test_position_agreement_is_zero_for_a_judge_that_always_picks_a(eval_cfg) -> None:
    recs = _pairwise_judgments(eval_cfg, lambda req: "[[A]]")
    pa = R.position_agreement(recs)["v1"]
    assert pa["n"] == 12 and pa["agreement"] == 0.0 and pa["ci_high"] < 0.3
    rows = S.score_table(recs, 200, 0)
    assert rows[0]["mean"] == 0.5  # every question a tie: position bias cannot decide the win rate


def test_position_agreement_is_one_for_a_judge_that_reads_the_answers(eval_cfg) -> None:
    def reply(req: dict) -> str:  # prefers "mine" wherever it is shown
        text = req["messages"][-1]["content"]
        return "[[A]]" if text.index("mine") < text.index("theirs") else "[[B]]"

    recs = _pairwise_judgments(eval_cfg, reply)
    pa = R.position_agreement(recs)["v1"]
    assert pa["agreement"] == 1.0 and pa["ci_low"] > 0.7
    assert S.score_table(recs, 200, 0)[0]["mean"] == 1.0


def test_self_consistency_counts_answers_whose_repeats_agree(eval_cfg) -> None:
    qs = {f"q{i}": {"question_id": f"q{i}", "category": "generic", "question": f"Question {i}?"} for i in range(6)}
    answers = [{"question_id": q, "category": "generic", "model": "v1", "answer": f"answer {q}"} for q in qs]
    jobs = J.build_jobs("single", eval_cfg, qs, answers, repeats=3)
    assert len(jobs) == 18 and [j["record"]["repeat"] for j in jobs[:3]] == [0, 1, 2]
    calls: dict[str, int] = {}

    def reply(req: dict) -> str:  # q0..q2 always 7; q3..q5 drift 5, 6, 7 over their repeats
        qid = re.search(r"answer (q\d)", req["messages"][-1]["content"]).group(1)
        calls[qid] = calls.get(qid, 0) + 1
        return "Score: 7" if qid in ("q0", "q1", "q2") else f"Score: {4 + calls[qid]}"

    srv, client = _judge(reply)
    try:
        recs = J.run_judge(client, "single", jobs, eval_cfg.score_retry)
    finally:
        srv.stop()
    assert srv.requests == 18  # each repeat its own request (its own cache key), not one reply reused
    sc = R.self_consistency(recs)["v1"]
    assert sc["n"] == 6 and sc["agreement"] == 0.5
    assert sc["mean_abs_dev"] == pytest.approx((0 * 9 + 9 * 2 / 3) / 18)
    out = {o["question_id"]: o["value"] for o in S.outcomes(recs)}
    assert out["q0"] == 7 and out["q4"] == 6  # the repeats' mean is the answer's score


def test_parse_shares_say_which_reader_decided() -> None:
    js = [{"parse": p} for p in ("ok", "ok", "tolerant", "logprob", "failed")]
    assert R.parse_shares(js) == {"ok": 0.4, "tolerant": 0.2, "logprob": 0.2, "retried": 0.0, "failed": 0.2}


# --- length-controlled win rate ----------------------------------------------------------------------------


def _lc_rows(n: int, base_logit: float, length_effect: float, longer_share: float, seed: int) -> list[dict]:
    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(n):
        d = rng.normal(40 if rng.random() < longer_share else -40, 20)
        p = 1 / (1 + np.exp(-(base_logit + length_effect * np.tanh(d / 40))))
        rows.append({"value": float(rng.random() < p), "len_model": 100 + d, "len_opponent": 100})
    return rows


def test_lc_win_rate_removes_a_judges_taste_for_length() -> None:
    # equally good models, the judge prefers the longer answer, and ours is longer 80% of the time
    lc = R.lc_win_rate(_lc_rows(600, 0.0, 2.5, 0.8, seed=1), n_boot=200)
    assert lc["raw"] > 0.6
    assert abs(lc["lc"] - 0.5) < 0.08 and lc["ci_low"] < 0.5 < lc["ci_high"]


def test_lc_win_rate_keeps_a_real_advantage() -> None:
    # a truly better model, no length effect: raw and LC agree, both near sigmoid(1.5) = 0.82
    lc = R.lc_win_rate(_lc_rows(600, 1.5, 0.0, 0.5, seed=2), n_boot=200)
    assert lc["raw"] == pytest.approx(0.82, abs=0.05) and lc["lc"] == pytest.approx(0.82, abs=0.05)
    assert lc["ci_low"] > 0.5
    one_sided = R.lc_win_rate([{"value": 1.0, "len_model": 50 + i, "len_opponent": 40} for i in range(20)], 100)
    assert 0.5 < one_sided["lc"] <= 1.0  # separation (wins everything) stays finite


# --- paired bootstrap --------------------------------------------------------------------------------------


def test_paired_bootstrap_verdicts_on_known_differences() -> None:
    rng = np.random.default_rng(0)
    base = {f"q{i}": float(rng.integers(1, 11)) for i in range(40)}
    better = {k: v + 0.5 for k, v in base.items()}  # better on every question, by a little
    r = S.paired_bootstrap(better, base)
    assert r["verdict"] == "better" and r["diff"] == pytest.approx(0.5) and r["n"] == 40
    # an unpaired view of the same numbers cannot tell: the spread between questions swamps 0.5
    assert S.bootstrap_ci(list(better.values()))[1] < S.bootstrap_ci(list(base.values()))[2]
    assert S.paired_bootstrap(base, better)["verdict"] == "worse"
    noise = {k: v + float(rng.normal(0, 1)) for k, v in base.items()}
    same = S.paired_bootstrap(noise, base)
    assert same["verdict"] == "no detectable difference" and same["ci_low"] < 0 < same["ci_high"]
    assert same["mde"] == pytest.approx(2.8 * np.std([noise[k] - base[k] for k in base], ddof=1) / np.sqrt(40))


def test_paired_bootstrap_lower_is_better_and_only_shared_items() -> None:
    loss_a = {f"d{i}": 2.0 + 0.01 * i for i in range(30)}
    loss_b = {**{k: v + 0.2 for k, v in loss_a.items()}, "only_b": 9.0}
    r = S.paired_bootstrap(loss_a, loss_b, higher_is_better=False)
    assert r["verdict"] == "better" and r["n"] == 30 and r["diff"] == pytest.approx(-0.2)
    assert S.paired_bootstrap({"x": 1.0}, {"x": 2.0})["verdict"] == "no detectable difference"  # n=1: no CI


def test_mde_shrinks_with_n() -> None:
    mdes = []
    for n in (20, 80, 320):  # the same noise (differences of +-1) at 16 times the n: a quarter of the MDE
        a = {str(i): float((-1) ** i) for i in range(n)}
        mdes.append(S.paired_bootstrap(a, dict.fromkeys(a, 0.0))["mde"])
    assert mdes[0] > mdes[1] > mdes[2] and mdes[0] / mdes[2] == pytest.approx(4, rel=0.05)


def test_paired_rows_compare_each_model_with_the_one_before() -> None:
    qids = [f"q{i}" for i in range(20)]
    judgments = [
        {
            "model": m,
            "question_id": q,
            "category": "generic",
            "mode": "single",
            "swap": False,
            "score": None if (m, i) == ("v1", 4) else s + (i % 3),
            "parse": "failed" if (m, i) == ("v1", 4) else "ok",
        }
        for m, s in (("base", 3), ("v1", 6), ("v2", 6))
        for i, q in enumerate(qids)
    ]
    rng = np.random.default_rng(0)
    noise = {m: rng.normal(0, 0.05, 15) for m in ("base", "v1", "v2")}  # losses are continuous: no ties
    items = [
        {
            "model": m,
            "kind": "heldout",
            "format": fmt,
            "item_id": f"d{i}",
            "tokens": 10,
            "logprob_sum": -10 * (loss + shift + 0.01 * i + noise[m][i]),
        }
        for fmt, shift in (("baize", 0.0), ("chat_template", 0.5))
        for m, loss in (("base", 3.0), ("v1", 2.0), ("v2", 2.0))
        for i in range(15)
    ]
    formats = {"base": "chat_template", "v1": "baize", "v2": "baize"}
    note = S.NOT_SHOWN_TO_DISCRIMINATE
    rows = evaluate.paired_rows(["base", "v1", "v2"], judgments, items, "single", 500, 0, note, formats)
    got = {(r["comparison"], r["metric"], r["format"]): r for r in rows}
    judge = got[("v1 vs base", "judge_single", "v1: baize; base: chat_template")]
    assert judge["verdict"] == "better" and judge["note"] == note
    assert judge["items"] == "n=19 of 20; unparsed: 1 in v1" and judge["n"] == 19  # the failure is counted, not lost
    assert judge["method"].startswith("wilcoxon exact")  # discrete scores: the exact test decides
    for fmt in ("baize", "chat_template"):  # each model in each format: a row per format, named
        r = got[("v1 vs base", "heldout_loss", fmt)]
        assert r["verdict"] == "better" and r["diff"] == pytest.approx(-1.0, abs=0.05)  # lower loss
        assert r["method"] == "studentized bootstrap" and r["items"] == "n=15 of 15"
    assert got[("v2 vs v1", "judge_single", "baize")]["verdict"] == "no detectable difference"
    assert not any(k[1] == "ref_loglik" for k in got)  # no such items: no row rather than an empty one
    assert all(r["p_holm"] >= r["p"] for r in rows) and {r["verdict_holm"] for r in rows} <= set(S.VERDICTS)
    assert set(S.PAIRED_TEST_COLUMNS) <= set(rows[0])  # every column paired.csv has
