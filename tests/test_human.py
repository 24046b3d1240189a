"""Human votes: win rates, the judge's agreement with people (FastChat's definition) on constructed votes whose
answers are known, and their way into scores.csv, paired.csv, the report and W&B."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest
from helpers.report_fixture import QUESTIONS, make_run

from baize_exp import human
from baize_exp import stats as S
from baize_exp.io import JsonlError


def _agreement(judge: dict, votes: list[tuple]) -> tuple[dict, dict]:
    return S.judge_human_agreement(judge, votes, True), S.judge_human_agreement(judge, votes, False)


def test_a_judge_that_always_agrees_scores_one_with_and_without_ties() -> None:
    keys = [("q1", "base", "v1"), ("q2", "base", "v1"), ("q3", "base", "v2"), ("q4", "v1", "v2")]
    human_votes = [(keys[0], "a"), (keys[1], "b"), (keys[2], "tie"), (keys[3], "b"), (keys[3], "b")]
    judge = {k: v for k, v in human_votes}
    with_ties, without = _agreement(judge, human_votes)
    assert (with_ties["agree"], with_ties["n"], with_ties["rate"]) == (5, 5, 1.0)
    assert (without["agree"], without["n"], without["rate"]) == (4, 4, 1.0)  # the tied vote is left out


def test_a_judge_that_always_picks_a_scores_the_share_of_a_votes() -> None:
    """10 votes on 10 pairs: 6 for a, 2 for b, 2 ties. Always 'a' agrees 6/10 with ties; without ties the two tied
    votes are left out: 6/8."""
    votes = [((f"q{i}", "base", "v1"), v) for i, v in enumerate(["a"] * 6 + ["b"] * 2 + ["tie"] * 2)]
    always_a = {k: "a" for k, _ in votes}
    with_ties, without = _agreement(always_a, votes)
    assert (with_ties["agree"], with_ties["n"]) == (6, 10) and with_ties["rate"] == pytest.approx(0.6)
    assert (without["agree"], without["n"]) == (6, 8) and without["rate"] == pytest.approx(0.75)
    lo, hi = S.proportion_ci(6, 10)[1:]
    assert (with_ties["ci_low"], with_ties["ci_high"]) == (lo, hi)
    # negative control: the opposite judge agrees only where people chose b
    always_b = {k: "b" for k, _ in votes}
    assert _agreement(always_b, votes)[1]["rate"] == pytest.approx(2 / 8)


def test_agreement_follows_fastchat_ties_several_votes_and_missing_verdicts() -> None:
    k1, k2, k3 = ("q1", "base", "v1"), ("q2", "base", "v1"), ("q3", "base", "v1")
    judge = {k1: "tie", k2: "a"}  # no verdict on k3 (a parse failure)
    votes = [(k1, "tie"), (k1, "a"), (k2, "a"), (k2, "tie"), (k3, "a")]
    with_ties, without = _agreement(judge, votes)
    # with ties: judge tie == human tie agrees; k3 is not compared at all
    assert (with_ties["agree"], with_ties["n"]) == (2, 4)
    # without ties: a tie on either side drops the comparison (the judge's tie on k1 drops both k1 votes)
    assert (without["agree"], without["n"]) == (1, 1)
    empty = S.judge_human_agreement({}, votes)
    assert empty["n"] == 0 and math.isnan(empty["rate"])


def test_canonical_vote_makes_the_order_shown_irrelevant_and_win_rate_counts_ties_half() -> None:
    assert S.canonical_vote("v1", "base", "v1") == (("base", "v1"), "b")
    assert S.canonical_vote("base", "v1", "v1") == (("base", "v1"), "b")
    assert S.canonical_vote("v1", "base", "tie") == (("base", "v1"), "tie")
    with pytest.raises(ValueError):
        S.canonical_vote("v1", "base", "v2")
    r = S.win_rate(wins=6, ties=2, losses=2)
    assert r["n"] == 10 and r["win_rate"] == pytest.approx(0.7)
    assert r["ci_low"] < 0.7 < r["ci_high"] and (r["ci_low"], r["ci_high"]) == S.proportion_ci(7, 10)[1:]
    assert math.isnan(S.win_rate(0, 0, 0)["win_rate"])


def _answers(run: Path) -> dict[tuple[str, str], str]:
    return {
        (a["model"], a["question_id"]): a["answer"]
        for a in map(json.loads, (run / "eval" / "answers.jsonl").read_text().splitlines())
    }


def _vote(run: Path, qid: str | None, shown: tuple[str, str], choice: str, answers: dict, k: int) -> dict:
    """A vote record as the arena writes it, on the answers the eval stage recorded (unless `answers` differ)."""
    return {
        "pair_id": f"p{k}",
        "time": 1.0,
        "question": f"question {qid}",
        "question_id": qid,
        "source": "eval" if qid else "prompt",
        "order": list(shown),
        "models": {s: {"label": m, "name": m, "run": str(run)} for s, m in zip("AB", shown, strict=True)},
        "answers": {s: answers[(m, qid)] for s, m in zip("AB", shown, strict=True)},
        "answer_source": "eval",
        "settings": {},
        "vote": choice,
    }


@pytest.fixture
def voted_run(tmp_path: Path) -> Path:
    """A single-mode run whose judge scores v2 > v1 > base on every answered question (report_fixture), and 10
    votes on (v1, base) in both display orders: v1 wins 6, base 2, tie 1, both bad 1; plus 2 votes the judge
    cannot be compared on (a free prompt, and an answer other than the judged one)."""
    run = make_run(tmp_path / "run", ["eval=single"])
    ans = _answers(run)
    votes = []
    winners = ["v1"] * 6 + ["base"] * 2 + ["tie", "both_bad"]
    for k, (qid, winner) in enumerate(zip(QUESTIONS * 2, winners, strict=False)):
        shown = ("v1", "base") if k % 2 else ("base", "v1")
        choice = winner if winner in ("tie", "both_bad") else "AB"[shown.index(winner)]
        votes.append(_vote(run, qid, shown, choice, ans, k))
    free = _vote(run, QUESTIONS[0], ("v2", "base"), "A", ans, 90)
    free["question_id"] = None
    other = _vote(run, QUESTIONS[1], ("v2", "v1"), "B", ans, 91)
    other["answers"]["A"] = "a live answer the judge never saw"
    log = human.VoteLog(human.votes_path(run))
    for v in [*votes, free, other]:
        log.append(v)
    return run


def test_summary_win_rates_and_judge_agreement_on_constructed_votes(voted_run: Path) -> None:
    s = human.summary(voted_run)
    assert s["votes"] == 12
    pairs = {(p["model"], p["opponent"]): p for p in s["pairs"]}
    v1 = pairs[("v1", "base")]
    assert (v1["n"], v1["wins"], v1["ties"], v1["losses"], v1["both_bad"]) == (10, 6, 2, 2, 1)
    assert v1["win_rate"] == pytest.approx(0.7)
    assert v1["paired"]["n"] == 10 and v1["paired"]["diff"] == pytest.approx(0.4)  # 0.7 - 0.3
    assert pairs[("v2", "base")]["wins"] == 1 and pairs[("v2", "v1")]["losses"] == 1
    # the judge prefers v1 over base everywhere: it agrees with the 6 v1 votes of 10 (ties count), 6 of 8 without
    a = s["agreement"]
    assert (a["with_ties"]["agree"], a["with_ties"]["n"]) == (6, 10)
    assert (a["without_ties"]["agree"], a["without_ties"]["n"]) == (6, 8)
    assert a["left_out"] == {"free prompt (no eval question)": 1, "answers other than the ones judged": 1}


def _csv(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_refresh_adds_the_human_rows_keeps_the_others_and_is_idempotent(voted_run: Path) -> None:
    ev = voted_run / "eval"
    before = {p: (ev / p).read_text() for p in ("scores.csv", "paired.csv")}
    metrics = human.refresh(voted_run)
    assert metrics["human_votes"] == 12 and metrics["judge_human_agreement/with_ties"] == pytest.approx(0.6)
    scores = _csv(ev / "scores.csv")
    assert [r for r in scores if not r["mode"].startswith("human_")] == list(
        csv.DictReader(before["scores.csv"].splitlines())
    )
    mine = {(r["model"], r["mode"]): r for r in scores if r["mode"].startswith("human_")}
    assert float(mine[("v1", "human_vs_base")]["mean"]) == pytest.approx(0.7)
    assert mine[("v1", "human_vs_base")]["n"] == "10"
    assert float(mine[("judge", "human_agreement")]["mean"]) == pytest.approx(0.6)
    assert float(mine[("judge", "human_agreement_no_ties")]["mean"]) == pytest.approx(0.75)
    paired = _csv(ev / "paired.csv")
    assert (ev / "paired.csv").read_text().startswith(before["paired.csv"])  # old rows first, untouched
    (row,) = [r for r in paired if r["metric"] == "human_vote" and r["a"] == "v1"]
    assert float(row["diff"]) == pytest.approx(0.4) and row["verdict"] in S.VERDICTS
    once = {p: (ev / p).read_bytes() for p in ("scores.csv", "paired.csv")}
    human.refresh(voted_run)
    assert once == {p: (ev / p).read_bytes() for p in ("scores.csv", "paired.csv")}
    # the votes gone: so are their rows, and the files are what the eval stage wrote
    human.votes_path(voted_run).unlink()
    assert human.refresh(voted_run) == {"human_votes": 0}
    assert before == {p: (ev / p).read_text() for p in ("scores.csv", "paired.csv")}


def test_a_torn_last_vote_is_skipped_by_readers_and_cut_by_the_next_writer(voted_run: Path) -> None:
    path = human.votes_path(voted_run)
    whole = path.read_bytes()
    path.write_bytes(whole + b'{"pair_id": "torn", "vo')  # a crash in the middle of a write
    assert len(human.read_votes(path)) == 12 and path.read_bytes().endswith(b'"vo')  # readers never write
    log = human.VoteLog(path)
    assert log.count == 12 and path.read_bytes() == whole
    path.write_bytes(whole.replace(b'"vote": "A"', b'"vote": "maybe"', 1))
    with pytest.raises(JsonlError, match="not a vote record"):
        human.read_votes(path)


def test_report_shows_votes_and_agreement_and_says_so_in_one_line_without(voted_run: Path, tmp_path: Path) -> None:
    from baize_exp.stages import report

    md, _ = report.write(voted_run)
    text = md.read_text()
    assert "## Human votes" in text and "judge agrees with people" in text
    assert "| v1 | base | 10 | 6 | 2 | 2 |" in text
    assert "v1,all,human_vs_base" in (voted_run / "eval" / "scores.csv").read_text()  # the report refreshed it
    bare = make_run(tmp_path / "bare", ["eval=single"])
    text = report.write(bare)[0].read_text()
    lines = [line for line in text.splitlines() if "Human votes" in line]
    assert lines == [human.NO_VOTES.format(run=bare)]


def test_wandb_gets_the_win_rates_and_agreement(voted_run: Path) -> None:
    import wandb

    wb = wandb.init(project="t", dir=str(voted_run), mode="offline")
    human.log_wandb(wb, voted_run)
    wb.finish()
    (table,) = voted_run.glob("wandb/offline-run-*/files/media/table/eval/human_win_rates_*.table.json")
    data = json.loads(table.read_text())
    row = dict(zip(data["columns"], next(r for r in data["data"] if r[0] == "v1"), strict=True))
    assert (row["n"], row["wins"], row["win_rate"]) == (10, 6, pytest.approx(0.7))
    (agree,) = voted_run.glob("wandb/offline-run-*/files/media/table/eval/judge_human_agreement_*.table.json")
    rates = {r[0]: r[3] for r in json.loads(agree.read_text())["data"]}
    assert rates == {"with_ties": pytest.approx(0.6), "without_ties": pytest.approx(0.75)}


def test_pairwise_judgments_give_a_verdict_only_where_both_orders_parsed(tmp_path: Path) -> None:
    """v1 judged against eval.pairwise_against=base in both orders: agreeing orders decide, disagreeing ones tie,
    a failed parse in either order gives no verdict (as stats.combine_pairwise)."""
    winners = {
        "q1": ("model", "model"),
        "q2": ("opponent", "opponent"),
        "q3": ("model", "opponent"),
        "q4": ("model", None),
    }
    rows = [
        {
            "question_id": q,
            "category": "c",
            "model": "v1",
            "mode": "pairwise",
            "swap": swap,
            "winner": w,
            "opponent": "base",
        }
        for q, both in winners.items()
        for swap, w in zip((False, True), both, strict=True)
    ]
    (tmp_path / "eval").mkdir()
    (tmp_path / "eval" / "judgments.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    verdicts, _ = human.judge_verdicts(tmp_path)
    assert verdicts == {("q1", "base", "v1"): "b", ("q2", "base", "v1"): "a", ("q3", "base", "v1"): "tie"}
