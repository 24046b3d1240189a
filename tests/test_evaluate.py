"""Evaluation: judge parsing, position swap, retries, bootstrap intervals, the answer cache, batched generation."""

from __future__ import annotations

import csv
import json
import os
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from helpers.config import compose_cfg
from helpers.recording_server import recording_server

from baize_exp import models as M
from baize_exp import stats as S
from baize_exp.serve import Backends
from baize_exp.stages.evaluate import judge as J


@pytest.fixture(scope="module")
def tiny_judge():
    """The project's server over the random tiny model: its greedy replies are deterministic gibberish."""
    with recording_server("tiny") as s:
        yield s


# --- parsing ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("reply", "score", "how"),
    [
        ("Score: 7", 7.0, "ok"),
        ("**Score:** 9\nGood answer.", 9.0, "ok"),
        ("score=10", 10.0, "ok"),
        ("Score: 8/10", 8.0, "ok"),
        ("Score: 3. Later: score: 3", 3.0, "ok"),
        # strict by default: what the rubric did not ask for is not a score
        ("I'd give it 8/10.", None, "failed"),
        ("8", None, "failed"),
        ("The answer is: 10.", None, "failed"),
        ("Score: 3, no, Score: 8", None, "failed"),
        ("Score: 11", None, "failed"),
        ("On a scale of 1 to 10 this is a 7", None, "failed"),
        ("great answer", None, "failed"),
        ("", None, "failed"),
    ],
)
def test_parse_score_is_strict_by_default(reply: str, score: float | None, how: str) -> None:
    got, got_how, err = J.parse_score(reply)
    assert (got, got_how) == (score, how)
    assert (err is None) == (score is not None)


@pytest.mark.parametrize(
    ("reply", "score", "how"),
    [
        ("Score: 7", 7.0, "ok"),
        ("I'd give it 8/10.", 8.0, "tolerant"),
        ("6 out of 10", 6.0, "tolerant"),
        ("8", 8.0, "tolerant"),
        ("The answer is: 10.", 10.0, "tolerant"),
        ("Score: 11", None, "failed"),
        ("On a scale of 1 to 10 this is a 7", None, "failed"),
    ],
)
def test_parse_score_tolerant_fallback(reply: str, score: float | None, how: str) -> None:
    assert J.parse_score(reply, ["tolerant"])[:2] == (score, how)


def test_logprob_fallback_reads_the_judges_choice_of_score() -> None:
    # the reply never states a score, but at its second token the judge put most mass on 6 and 7
    content = [
        _lp("Well", -0.1, {"Well": -0.1, "I": -2.5}),
        _lp(" 7", -0.7, {" 7": -0.7, " 6": -1.2, " a": -3.0}),
        _lp(".", -0.1, {".": -0.1}),
    ]
    reply = "Well 7."
    assert J.parse_score(reply, [], {"content": content})[:2] == (None, "failed")
    got, how, _ = J.parse_score(reply, ["logprob"], {"content": content})
    p7, p6 = np.exp(-0.7), np.exp(-1.2)
    assert how == "logprob" and got == pytest.approx((7 * p7 + 6 * p6) / (p7 + p6), abs=1e-4)
    assert J.parse_score(reply, ["logprob"], None)[:2] == (None, "failed")  # no logprobs: nothing to read
    # "²" is a digit to str.isdigit() but not to int(): an alternative the 135M judge really offered
    odd = [_lp("Score: ", -0.1, {"Score: ": -0.1}), _lp("7", -0.5, {"7": -0.5, "²": -1.0, "6": -2.0})]
    assert J.parse_score("Score: 7", ["logprob"], {"content": odd})[:2] == (7.0, "ok")
    assert J.weighted_score("Score: 7", {"content": odd}) == pytest.approx(
        (7 * np.exp(-0.5) + 6 * np.exp(-2.0)) / (np.exp(-0.5) + np.exp(-2.0)), abs=1e-4
    )
    assert J.logprob_score({"content": odd[1:]}) is not None


@pytest.mark.parametrize(
    ("reply", "verdict", "how", "fallbacks"),
    [
        ("[[A]]", "A", "ok", []),
        ("After thought, [[B]] is better.", "B", "ok", []),
        ("[[C]]", "C", "ok", []),
        ("B", None, "failed", []),
        ("B", "B", "tolerant", ["tolerant"]),
        ("Assistant A is more helpful", "A", "tolerant", ["tolerant"]),
        ("Tie.", "C", "tolerant", ["tolerant"]),
        ("[[A]] or maybe [[B]]", None, "failed", ["tolerant"]),
        ("Both are fine", None, "failed", ["tolerant"]),
    ],
)
def test_parse_verdict(reply: str, verdict: str | None, how: str, fallbacks: list[str]) -> None:
    assert J.parse_verdict(reply, fallbacks)[:2] == (verdict, how)


def _lp(token: str, logprob: float, alts: dict[str, float]) -> dict:
    return {"token": token, "logprob": logprob, "top_logprobs": [{"token": t, "logprob": lp} for t, lp in alts.items()]}


def test_weighted_score_reads_the_score_token_and_splits_ten() -> None:
    ln = np.log
    content = [
        _lp("Score", 0, {}),
        _lp(":", 0, {}),
        _lp(" ", 0, {}),
        _lp("7", ln(0.5), {"7": ln(0.5), "8": ln(0.3), "x": ln(0.1), "6": ln(0.1)}),
    ]
    assert J.weighted_score("Score: 7", {"content": content}) == pytest.approx(
        (7 * 0.5 + 8 * 0.3 + 6 * 0.1) / 0.9, abs=1e-4
    )
    # "10" as "1","0": P(1 then 0) goes to 10, the rest of "1" to 1
    ten = content[:3] + [
        _lp("1", ln(0.6), {"1": ln(0.6), "9": ln(0.4)}),
        _lp("0", ln(0.75), {"0": ln(0.75), ".": ln(0.25)}),
    ]
    assert J.weighted_score("Score: 10", {"content": ten}) == pytest.approx(10 * 0.45 + 1 * 0.15 + 9 * 0.4, abs=1e-4)
    assert J.weighted_score("Score: 7", None) is None
    assert J.weighted_score("Score: 7", {"content": content[:2]}) is None  # tokens do not spell the reply


def test_pairwise_combination_needs_agreement() -> None:
    assert S.combine_pairwise("model", "model") == "model"
    assert S.combine_pairwise("opponent", "opponent") == "opponent"
    assert S.combine_pairwise("model", "opponent") == "tie"  # position bias cancels
    assert S.combine_pairwise("model", None) is None  # a failure, not a one-sided win


# --- statistics ---------------------------------------------------------------------------------------------


def _synthetic() -> list[dict]:
    rng = np.random.default_rng(123)
    out = []
    for model, shift in (("m1", 0), ("m2", 2)):
        for cat in ("coding", "math", "writing"):
            for k in range(20):
                out.append(
                    {
                        "question_id": f"{cat}-{k}",
                        "category": cat,
                        "model": model,
                        "mode": "single",
                        "swap": False,
                        "score": float(min(10, rng.integers(1, 9) + shift)),
                    }
                )
            out.append(
                {
                    "question_id": f"{cat}-x",
                    "category": cat,
                    "model": model,
                    "mode": "single",
                    "swap": False,
                    "score": None,
                }
            )  # a parse failure per category
    return out


def test_scores_csv_intervals_match_an_independent_bootstrap(tmp_path: Path) -> None:
    from scipy.stats import bootstrap

    judgments = _synthetic()
    S.write_scores_csv(S.score_table(judgments, n_boot=20000, seed=0), tmp_path / "scores.csv")
    rows = list(csv.DictReader(open(tmp_path / "scores.csv")))
    assert list(rows[0]) == S.SCORES_COLUMNS
    assert len(rows) == 2 * 4
    for r in rows:
        vals = [
            j["score"]
            for j in judgments
            if j["model"] == r["model"] and j["score"] is not None and r["category"] in ("all", j["category"])
        ]
        assert int(r["n"]) == len(vals) == (60 if r["category"] == "all" else 20)
        assert int(r["parse_failures"]) == (3 if r["category"] == "all" else 1)  # counted, not zeros
        assert float(r["mean"]) == pytest.approx(np.mean(vals), abs=1e-4)
        ref = bootstrap(
            (np.array(vals),),
            np.mean,
            n_resamples=20000,
            method="percentile",
            confidence_level=0.95,
            random_state=np.random.default_rng(99),
        ).confidence_interval
        sem = np.std(vals, ddof=1) / np.sqrt(len(vals))
        assert float(r["ci_low"]) == pytest.approx(ref.low, abs=0.1 * sem)
        assert float(r["ci_high"]) == pytest.approx(ref.high, abs=0.1 * sem)
        assert float(r["ci_low"]) < float(r["mean"]) < float(r["ci_high"])
        # and the width is what the normal approximation says (1.96 standard errors each side)
        assert float(r["ci_high"]) - float(r["ci_low"]) == pytest.approx(2 * 1.96 * sem, rel=0.15)


def test_pairwise_rows_are_win_rates_with_ties_and_failures() -> None:
    def j(qid: str, swap: bool, winner: str | None) -> dict:
        return {
            "question_id": qid,
            "category": "math",
            "model": "v1",
            "mode": "pairwise",
            "swap": swap,
            "winner": winner,
        }

    judgments = [
        j("a", False, "model"),
        j("a", True, "model"),
        j("b", False, "model"),
        j("b", True, "opponent"),
        j("c", False, "opponent"),
        j("c", True, "opponent"),
        j("d", False, None),
        j("d", True, "model"),
    ]
    row = S.score_table(judgments, 200, 0)[0]
    assert (row["mode"], row["n"], row["parse_failures"]) == ("pairwise", 3, 1)
    assert row["mean"] == pytest.approx((1 + 0.5 + 0) / 3, abs=1e-4)


# --- the judge against a real server ------------------------------------------------------------------------

QUESTIONS = {
    f"q{i}": {"question_id": f"q{i}", "category": "math", "question": f"What is {i} + {i}?", "reference": str(2 * i)}
    for i in range(3)
}


def test_pairwise_judge_sees_both_orders(tiny_judge) -> None:
    e = compose_cfg(["eval=pairwise"]).eval
    answers = [{"question_id": q, "category": "math", "model": "v1", "answer": f"MODEL-ANSWER-{q}"} for q in QUESTIONS]
    opponent = {q: f"OPPONENT-ANSWER-{q}" for q in QUESTIONS}
    jobs = J.build_jobs("pairwise", e, QUESTIONS, answers, opponent)
    n0 = len(tiny_judge.received)
    recs = J.run_judge(tiny_judge.client(max_tokens=8, concurrency=8), "pairwise", jobs, e.verdict_retry)
    first_round = tiny_judge.received[n0 : n0 + len(jobs)]
    for q in QUESTIONS:
        shown = [p for p in first_round if f"MODEL-ANSWER-{q}" in p]
        a_first = [p.index(f"MODEL-ANSWER-{q}") < p.index(f"OPPONENT-ANSWER-{q}") for p in shown]
        assert sorted(a_first) == [False, True]  # the judge received the model's answer as A once and as B once
        for p in shown:  # and what it received as [Assistant A] is the answer the record's swap flag says
            a_part = p.split("[Assistant A]")[1].split("[Assistant B]")[0]
            rec_swap = f"MODEL-ANSWER-{q}" not in a_part
            assert sum(r["question_id"] == q and r["swap"] == rec_swap for r in recs) == 1
    assert len(recs) == 2 * len(QUESTIONS)


def test_unparsable_judge_replies_are_retried_with_the_error_then_recorded(tiny_judge) -> None:
    e = compose_cfg([]).eval
    answers = [{"question_id": q, "category": "math", "model": "base", "answer": "42"} for q in QUESTIONS]
    jobs = J.build_jobs("single", e, QUESTIONS, answers)
    n0 = len(tiny_judge.received)
    # 2 tokens of a random model: deterministic, and never "Score: N"
    recs = J.run_judge(tiny_judge.client(max_tokens=2, concurrency=8), "single", jobs, e.score_retry, logprobs=True)
    sent = tiny_judge.received[n0:]
    assert len(sent) == 2 * len(jobs)  # every job once, then once more
    retries = sent[len(jobs) :]
    assert all("I could not read a score in that: the reply has no 'Score: N'" in p for p in retries)
    for r in recs:
        assert r["parse"] == "failed" and r["score"] is None and r["weighted_score"] is None
        assert r["judge_reply"] is not None and r["judge_reply_retry"] is not None and r["error"]
    row = S.score_table(recs, 200, 0)[0]
    assert (row["n"], row["parse_failures"]) == (0, len(jobs))  # reported as failures, not as zero scores


# --- the eval stage: answer cache, held-out loss, outputs ---------------------------------------------------


def _health(backends: Backends) -> int:
    (srv,) = backends.servers.values()
    with urllib.request.urlopen(f"http://127.0.0.1:{srv.port}/health") as r:
        return json.loads(r.read())["requests"]


@pytest.mark.slow
def test_eval_stage_caches_answers_so_a_rerun_generates_nothing(tmp_path: Path, monkeypatch, request) -> None:
    from baize_exp.stages import evaluate
    from baize_exp.training import save_adapter

    cache = Path(os.environ["BAIZE_CACHE"])
    base, tok = M.load_model_and_tokenizer(compose_cfg(["model=tiny"]).model, cache)
    cfg0 = compose_cfg(["model=tiny"])
    peft = M.attach_lora(base, cfg0.lora)
    for n, p in peft.named_parameters():  # a LoRA that changes the output (fresh B weights are zero)
        if "lora_B" in n:
            p.data.normal_(0, 0.5)
    save_adapter(peft, tok, tmp_path / "adapter", {})
    heldout = tmp_path / "heldout.jsonl"
    heldout.write_text(
        "".join(
            json.dumps(
                {
                    "id": f"h{i}",
                    "turns": [
                        {"role": "human", "text": f"Tell me about {x}."},
                        {"role": "ai", "text": f"{x} is a fine topic."},
                    ],
                }
            )
            + "\n"
            for i, x in enumerate(["cats", "rain", "tea"])
        )
    )
    srv = [f"{r}.{k}={v}" for r in ("teacher", "judge") for k, v in (("serve.model", "tiny"), ("model", "tiny"))]
    cfg = compose_cfg(
        [
            "model=tiny",
            "eval=pairwise",
            "eval.limit=4",
            "eval.max_new_tokens=8",
            "judge.max_tokens=4",
            f"eval.models=[base,{tmp_path / 'adapter'}]",
            f"eval.answer_cache={tmp_path / 'answers'}",
            f"eval.heldout={heldout}",
            "eval.bootstrap=200",
            *srv,
        ]
    )
    calls = []
    real = M.generate_texts
    monkeypatch.setattr(M, "generate_texts", lambda *a, **k: calls.append(len(a[2])) or real(*a, **k))

    backends = Backends(cfg, tmp_path, cache)  # one tiny server for teacher and judge, shared by the three runs

    def run_once(run_dir: Path) -> tuple[dict, int]:
        n0 = _health(backends)
        m = evaluate.run(cfg, run_dir, backends)
        return m, _health(backends) - n0

    backends.client("judge")
    request.addfinalizer(backends.close)
    m1, req1 = run_once(tmp_path / "run1")
    assert m1["answers_generated"] == 8 and m1["answers_cached"] == 0
    assert calls == [4, 4]  # one batched call per model
    assert m1["teacher_answers_requested"] == 4 and req1 == 4 + m1["judge_requests"]
    assert m1["judge_requests"] >= 2 * 2 * 4  # two models x two orders x four questions (+ retries)
    for name in ("base", str(tmp_path / "adapter")):
        assert m1[f"{name}/heldout_loss"] > 0 and m1[f"{name}/heldout_ppl"] == pytest.approx(
            np.exp(m1[f"{name}/heldout_loss"]), rel=1e-6
        )
    run1 = tmp_path / "run1" / "eval"
    rows = list(csv.DictReader(open(run1 / "scores.csv")))
    assert {r["mode"] for r in rows} == {"pairwise", "pairwise_lc"}  # the raw win rate and the length-controlled
    assert {r["model"] for r in rows} == {"base", str(tmp_path / "adapter")}
    assert all(
        int(r["n"]) + int(r["parse_failures"]) == (4 if r["category"] == "all" else 1)
        for r in rows
        if r["mode"] == "pairwise"
    )
    assert (run1 / "scores.png").stat().st_size > 5000
    answers = [json.loads(x) for x in (run1 / "answers.jsonl").read_text().splitlines()]
    assert {a["model"] for a in answers} == {"base", str(tmp_path / "adapter"), "teacher"}
    # the judge's reliability beside its scores: the check's known-order pairs (both orders), position agreement
    rel = json.loads((run1 / "reliability.json").read_text())
    assert rel["judge_check"]["n"] + rel["judge_check"]["unparsed"] == rel["judge_check"]["total"]
    assert rel["judge_check"]["total"] == 2 * 3 * cfg.eval.judge_check
    assert set(rel["position_agreement"]) == {"base", str(tmp_path / "adapter")}
    assert m1["judge_check/n"] == rel["judge_check"]["n"] and m1["judge_check/status"] in S.JUDGE_CHECK_STATUSES
    if not rel["judge_check"]["discriminates"]:  # the random tiny judge: every judge-based row says so
        assert {r["note"] for r in rows} == {S.judge_check_note(rel["judge_check"])}
        assert all(r["note"].startswith(S.NOT_SHOWN_TO_DISCRIMINATE) for r in rows)
    # judge-free, per item and paired: held-out loss per dialog, the references' log-likelihood per question, every
    # model in both formats
    items = [json.loads(x) for x in (run1 / "items.jsonl").read_text().splitlines()]
    per = {(i["model"], i["kind"], i["format"]) for i in items}
    models = ("base", str(tmp_path / "adapter"))
    assert per == {(m, k, f) for m in models for k in ("heldout", "ref_loglik") for f in ("baize", "chat_template")}
    for fmt in ("baize", "chat_template"):
        held = [i for i in items if i["model"] == "base" and i["kind"] == "heldout" and i["format"] == fmt]
        assert -sum(i["logprob_sum"] for i in held) / sum(i["tokens"] for i in held) == pytest.approx(
            m1[f"base/heldout_loss@{fmt}"], rel=1e-6
        )
    assert m1["base/heldout_loss"] == m1["base/heldout_loss@baize"]  # train.format's, as earlier runs reported
    assert m1["base/heldout_loss@chat_template"] != m1["base/heldout_loss@baize"]  # really another format
    assert m1["base/answer_format"] == "chat_template" and m1[f"{tmp_path / 'adapter'}/answer_format"] == "baize"
    paired = {(r["metric"], r["format"]): r for r in csv.DictReader(open(run1 / "paired.csv"))}
    assert set(paired) >= {(m, f) for m in ("heldout_loss", "ref_loglik") for f in ("baize", "chat_template")}
    assert paired[("heldout_loss", "baize")]["comparison"] == f"{tmp_path / 'adapter'} vs base"
    assert int(paired[("ref_loglik", "chat_template")]["n"]) == 4
    assert paired[("heldout_loss", "baize")]["verdict_holm"] in S.VERDICTS
    judge_row = paired[("judge_pairwise", f"{tmp_path / 'adapter'}: baize; base: chat_template")]
    assert judge_row["items"].startswith(f"n={judge_row['n']} of 4")
    # W&B (offline, real files): the samples and scores tables and the charts
    import wandb

    wb = wandb.init(project="t", dir=str(tmp_path), mode="offline")
    evaluate.log_wandb(wb, run1)
    wb.finish()
    tables = sorted(p.name.split("_")[0] for p in tmp_path.glob("wandb/offline-run-*/files/media/table/eval/*.json"))
    assert {"samples", "scores"} <= set(tables)
    assert list(tmp_path.glob("wandb/offline-run-*/files/media/images/eval/chart_scores*.png"))
    scores_table = json.loads(
        next(tmp_path.glob("wandb/offline-run-*/files/media/table/eval/scores_*.json")).read_text()
    )
    assert scores_table["columns"] == S.SCORES_COLUMNS and len(scores_table["data"]) == len(rows)

    calls.clear()
    m2, req2 = run_once(tmp_path / "run2")
    assert calls == [] and m2["answers_generated"] == 0 and m2["answers_cached"] == 8
    assert m2["teacher_answers_requested"] == 0 and req2 == m2["judge_requests"] == 0  # nothing was asked
    # the judge's replies are reused, read or not: at temperature 0 they are the replies
    j1, j2 = (
        [json.loads(x) for x in (tmp_path / r / "eval" / "judgments.jsonl").read_text().splitlines()]
        for r in ("run1", "run2")
    )
    assert m2["judge_cached"] == len(j1)  # the judge is greedy: even its unreadable replies are its replies
    for a, b in zip(j1, j2, strict=True):
        assert b["cached"] and (b["judge_reply"], b["verdict"], b["winner"], b["parse"]) == (
            a["judge_reply"],
            a["verdict"],
            a["winner"],
            a["parse"],
        )
    assert (tmp_path / "run2" / "eval" / "answers.jsonl").read_text().replace("true", "false") == (
        run1 / "answers.jsonl"
    ).read_text().replace("true", "false")

    # new adapter weights are a new model: only its answers are generated again
    peft.base_model.model.model.layers[0].self_attn.q_proj.lora_B["default"].weight.data.add_(0.3)
    save_adapter(peft, tok, tmp_path / "adapter", {})
    calls.clear()
    m3, _ = run_once(tmp_path / "run3")
    assert calls == [4] and m3["answers_generated"] == 4


def test_eval_without_the_judge_scores_every_model_in_every_format_and_asks_no_one(tmp_path: Path) -> None:
    """eval.use_judge=false: no answer, no judge and no server, only the judge-free measures, each model in both
    prompt formats, the held-out dialogs on their AI turns and on all their tokens, paired per format."""
    from baize_exp.stages import evaluate
    from baize_exp.training import save_adapter

    cache = Path(os.environ["BAIZE_CACHE"])
    cfg0 = compose_cfg(["model=tiny"])
    base, tok = M.load_model_and_tokenizer(cfg0.model, cache)
    peft = M.attach_lora(base, cfg0.lora)
    for n, p in peft.named_parameters():
        if "lora_B" in n:
            p.data.normal_(0, 0.5)
    save_adapter(peft, tok, tmp_path / "adapter", {})
    heldout = tmp_path / "heldout.jsonl"
    turns = [{"role": "human", "text": "Tell me about tea."}, {"role": "ai", "text": "Tea is a leaf."}]
    heldout.write_text("".join(json.dumps({"id": f"h{i}", "turns": turns * (1 + i % 2)}) + "\n" for i in range(5)))
    cfg = compose_cfg(
        [
            "model=tiny",
            "eval.use_judge=false",
            "eval.heldout_all_tokens=true",
            "eval.limit=3",
            f"eval.models=[base,{tmp_path / 'adapter'}]",
            f"eval.heldout={heldout}",
            "eval.bootstrap=200",
        ]
    )
    backends = Backends(cfg, tmp_path, cache)
    try:
        m = evaluate.run(cfg, tmp_path / "run", backends)
        assert backends.servers == {}  # neither teacher nor judge was started
    finally:
        backends.close()
    ev = tmp_path / "run" / "eval"
    assert (ev / "answers.jsonl").read_text() == "" and (ev / "judgments.jsonl").read_text() == ""
    assert not (ev / "scores.png").exists() and json.loads((ev / "reliability.json").read_text()) == {
        "use_judge": False
    }
    assert m["answers_generated"] == 0 and m["formats"] == ["baize", "chat_template"]
    adapter = str(tmp_path / "adapter")
    for who in ("base", adapter):
        for fmt in ("baize", "chat_template"):
            assert m[f"{who}/heldout_loss_all@{fmt}"] != m[f"{who}/heldout_loss@{fmt}"]  # all tokens, not AI turns
            assert m[f"{who}/ref_loglik@{fmt}"] < 0
    rows = {(r["metric"], r["format"]): r for r in csv.DictReader(open(ev / "paired.csv"))}
    metrics = ("heldout_loss", "heldout_loss_all", "ref_loglik")
    assert set(rows) == {(k, f) for k in metrics for f in ("baize", "chat_template")}
    assert all(
        r["comparison"] == f"{adapter} vs base" and r["items"] == f"n={r['n']} of {r['n']}" for r in rows.values()
    )
    assert int(rows[("heldout_loss", "baize")]["n"]) == 5 and int(rows[("ref_loglik", "baize")]["n"]) == 3


@pytest.mark.slow
def test_batched_generation_equals_sequential_greedy() -> None:
    """Left-padded batches of mixed-length prompts give the same greedy tokens as one prompt at a time."""
    from baize_exp.data import baize_prompt, load_eval_questions

    model, tok = M.load_model_and_tokenizer(compose_cfg([]).model, Path(os.environ["BAIZE_CACHE"]))
    prompts = [baize_prompt(q["question"]) for q in load_eval_questions(limit=6)]
    assert len({len(tok(p).input_ids) for p in prompts}) > 1  # really mixed lengths, so padding is exercised
    batched = M.generate_texts(model, tok, prompts, 24, batch_size=6)
    sequential = [M.generate_texts(model, tok, [p], 24, batch_size=1)[0] for p in prompts]
    for b, s in zip(batched, sequential, strict=True):
        assert tok(b[0], add_special_tokens=False).input_ids == tok(s[0], add_special_tokens=False).input_ids
    assert len({b[0] for b in batched}) > 1


def test_item_log_probabilities_are_each_items_own_in_its_order_however_batched(tokenizer) -> None:
    """Items of mixed lengths, batched by length: each gets the summed log-probability of its labelled tokens that
    the model's own loss gives for it alone (HF shifts the labels and skips -100), in the items' order."""
    import torch

    from baize_exp.stages.evaluate.likelihood import item_logprobs
    from baize_exp.training.data import IGNORE

    model, _ = M.load_model_and_tokenizer(compose_cfg(["model=tiny"]).model, Path(os.environ["BAIZE_CACHE"]))
    g = torch.Generator().manual_seed(0)
    items = []
    for n, scored_from in ((40, 10), (7, 3), (25, 0), (12, 11), (31, 20)):  # not in length order
        ids = torch.randint(5, 1000, (n,), generator=g).tolist()
        items.append({"input_ids": ids, "labels": [IGNORE] * scored_from + ids[scored_from:]})
    got = item_logprobs(model, items, tokenizer.pad_token_id, batch_size=2)
    with torch.no_grad():
        for item, (logprob_sum, count) in zip(items, got, strict=True):
            one = model(input_ids=torch.tensor([item["input_ids"]]), labels=torch.tensor([item["labels"]]))
            assert count == sum(label != IGNORE for label in item["labels"][1:])
            assert logprob_sum == pytest.approx(-float(one.loss) * count, rel=1e-4, abs=1e-3)


def test_each_model_is_prompted_in_the_format_it_was_trained_in(tmp_path: Path, tokenizer) -> None:
    """A chat_template-trained adapter is asked through the chat template, a Baize one with the Baize markers, the
    base through its own template; an adapter without prompt_format.json falls back to train.format."""
    import json

    from baize_exp.stages.evaluate.answers import model_prompts

    q = [{"question": "Why is the sky blue?"}]
    for name, fmt in (("chat", "chat_template"), ("baize", "baize")):
        (tmp_path / name).mkdir()
        (tmp_path / name / "prompt_format.json").write_text(json.dumps({"format": fmt}))
    (tmp_path / "bare").mkdir()
    chat, baize, bare, base = (
        model_prompts(tokenizer, q, a, True, "chat_template")[0]
        for a in (tmp_path / "chat", tmp_path / "baize", tmp_path / "bare", None)
    )
    assert "<|im_start|>assistant" in chat and "[|AI|]" not in chat
    assert baize.endswith("[|AI|]") and "<|im_start|>" not in baize
    assert bare == chat == base


def test_judge_cache_reuses_parsed_replies_and_asks_failures_again(tmp_path: Path) -> None:
    """Against the fault server: a second judging of the same jobs sends only what did not parse the first time."""
    from helpers.fault_server import FaultServer

    from baize_exp.chat import ChatClient
    from baize_exp.io import KeyedJsonl

    e = compose_cfg([]).eval
    questions = {f"q{i}": {"question": f"Question {i}?", "category": "generic"} for i in range(4)}
    answers = [{"question_id": q, "category": "generic", "model": "m", "answer": f"Answer {q}"} for q in questions]
    jobs = J.build_jobs("single", e, questions, answers)
    unreadable = {"Answer q3"}  # the judge never gives this one a score
    with FaultServer(
        api_key="k",
        reply=lambda r: "no idea" if any(u in m["content"] for m in r["messages"] for u in unreadable) else "Score: 7",
    ) as srv:
        client = ChatClient(srv.base_url, "k", "judge-model", concurrency=4, max_retries=0)
        cache = KeyedJsonl(tmp_path / "judgments.jsonl")
        first = J.run_judge(client, "single", jobs, e.score_retry, cache=cache)
        n1 = srv.requests
        second = J.run_judge(client, "single", jobs, e.score_retry, cache=KeyedJsonl(tmp_path / "judgments.jsonl"))
        n2 = srv.requests - n1
    assert n1 == 4 + 1  # four judgments, one retry of the unparsable
    assert n2 == 2  # a sampling judge (temperature 0.7): only the failure again (and its retry)
    assert [r["score"] for r in first] == [r["score"] for r in second] == [7, 7, 7, None]
    assert [bool(r.get("cached")) for r in second] == [True, True, True, False]
    assert second[3]["parse"] == "failed" and "error" in second[3]
    # a greedy judge's unreadable reply is its reply: stored as the failure it was, not asked again
    with FaultServer(
        api_key="k",
        reply=lambda r: "no idea" if any(u in m["content"] for m in r["messages"] for u in unreadable) else "Score: 7",
    ) as srv:
        greedy = ChatClient(srv.base_url, "k", "judge-model", concurrency=4, max_retries=0, temperature=0.0)
        J.run_judge(greedy, "single", jobs, e.score_retry, cache=KeyedJsonl(tmp_path / "greedy.jsonl"))
        n1 = srv.requests
        again = J.run_judge(greedy, "single", jobs, e.score_retry, cache=KeyedJsonl(tmp_path / "greedy.jsonl"))
        assert (n1, srv.requests) == (5, 5)
    assert all(r["cached"] for r in again) and again[3]["parse"] == "failed" and again[3]["score"] is None
    assert again[3]["judge_reply"] == "no idea" and again[3]["judge_reply_retry"] == "no idea" and again[3]["error"]


def test_judge_requests_that_failed_are_marked_and_not_sent_back_with_a_parse_error(tmp_path: Path) -> None:
    """A transient failure is no unparsable reply: it is not 'corrected' with the retry template, is marked
    `failed`, and is not cached, so the next judging asks it again and only it."""
    from helpers.fault_server import FaultServer

    from baize_exp.chat import ChatClient
    from baize_exp.io import KeyedJsonl

    e = compose_cfg([]).eval
    questions = {f"q{i}": {"question": f"Question {i}?", "category": "generic"} for i in range(3)}
    answers = [{"question_id": q, "category": "generic", "model": "m", "answer": f"Answer {q}"} for q in questions]
    answers[1]["answer"] += " [[fault:500x2]]"
    jobs = J.build_jobs("single", e, questions, answers)
    with FaultServer(api_key="k", reply=lambda r: "Score: 6") as srv:
        client = ChatClient(
            srv.base_url, "k", "judge-model", concurrency=4, max_retries=1, backoff_base_s=0.01, backoff_max_s=0.02
        )
        first = J.run_judge(client, "single", jobs, e.score_retry, cache=KeyedJsonl(tmp_path / "j.jsonl"))
        n1 = srv.requests
        second = J.run_judge(client, "single", jobs, e.score_retry, cache=KeyedJsonl(tmp_path / "j.jsonl"))
        n2 = srv.requests - n1
    assert n1 == 2 + 2 and n2 == 1  # two served, one failed twice (no retry prompt); then only that one
    assert [r.get("failed") is not None for r in first] == [False, True, False]
    assert "judge_reply_retry" not in first[1] and first[1]["score"] is None
    assert [r["score"] for r in second] == [6, 6, 6] and not any(r.get("failed") for r in second)


def test_the_eval_stage_publishes_its_last_evaluated_model_as_final_for_sweepers() -> None:
    """`final/<metric>` is the last model of eval.models that has figures (v2 skipped by sdf=off: v1), and a
    sweeper's optimized_metric reads it without knowing the model names."""
    from baize_exp.config import ConfigError
    from baize_exp.pipeline import optimized_value
    from baize_exp.stages.evaluate import publish_final

    metrics = {"base/heldout_loss": 3.0, "v1/heldout_loss": 2.5, "v1/judge_mean": 6.0, "paired/v1 vs base/x": 1}
    publish_final(metrics, ["base", "v1", "v2"])
    assert metrics["final_model"] == "v1"
    assert metrics["final/heldout_loss"] == 2.5 and metrics["final/judge_mean"] == 6.0
    assert optimized_value({"eval": metrics}, "eval/final/heldout_loss") == 2.5
    metrics["v2/heldout_loss"] = 2.0
    publish_final(metrics, ["base", "v1", "v2"])
    assert metrics["final_model"] == "v2" and metrics["final/heldout_loss"] == 2.0
    with pytest.raises(ConfigError, match="no such metric"):
        optimized_value({"eval": metrics}, "eval/final/ref_loglik")
