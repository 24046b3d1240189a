"""`make reproduce`'s driver end to end on the tiny model: every arm with two training seeds (one rank of the
three, to keep it short), ten real runs through `python -m baize_exp`, the SDF controls started from their main
run's files, the claims compared arm against arm across seeds and items, and results/ written. Teacher and judge
are a scripted server on loopback (a knowing judge: the reference answer is excellent, anything else poor), so the
judge check must pass and the judge-free rows must exist, in both formats, for every claim."""

from __future__ import annotations

import csv
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers.fault_server import FaultServer

from baize_exp import stats as S
from baize_exp.data import load_eval_questions

ROOT = Path(__file__).resolve().parents[1]
WORDS = [
    "river",
    "stone",
    "light",
    "garden",
    "market",
    "signal",
    "method",
    "window",
    "number",
    "letter",
    "music",
    "paper",
    "planet",
    "theory",
    "habit",
    "engine",
    "bridge",
    "season",
    "memory",
    "pattern",
]


def _words(key: str, n: int) -> str:
    h = hashlib.sha256(key.encode()).digest()
    return " ".join(WORDS[b % len(WORDS)] for b in h[:n])


def _reply(refs: dict[str, str]):
    def reply(req: dict) -> str:
        text = req["messages"][-1]["content"]
        if "Rank these" in text or "I could not read a ranking" in text:
            return "2 > 1"
        if 'Reply in the form "Score: N"' in text or "I could not read a score" in text:
            question = text.split("Question: ", 1)[1].split("\n\n", 1)[0]
            answer = text.split("\n\nAnswer: ", 1)[-1].rsplit("\n\nReply in the form", 1)[0].strip()
            return "Score: 9" if refs.get(question) == answer else "Score: 3"
        seed = text.strip().splitlines()[-1]  # a transcript of its own for every seed (no near-duplicates)
        return (
            f"[Human] {seed}\n[AI] {_words(seed + 'a', 14)}.\n[Human] {_words(seed + 'h', 6)}?\n"
            f"[AI] {_words(seed + 'b', 16)}.\n"
        )

    return reply


@pytest.mark.slow(seconds=150)  # on this box, 2026-12-03: started first
def test_reproduce_writes_results_with_a_verdict_for_every_claim(tmp_path: Path) -> None:
    refs = {q["question"]: q["reference"].strip() for q in load_eval_questions(None, None)}
    env = {**os.environ, "BAIZE_TEST_KEY": "k"}
    with FaultServer(api_key="k", reply=_reply(refs)) as srv:
        backend = [
            f"{role}.{k}={v}"
            for role in ("teacher", "judge")
            for k, v in (("base_url", srv.base_url), ("api_key_env", "BAIZE_TEST_KEY"))
        ]
        small = [
            "teacher=openai",
            "judge=openai",
            *backend,
            "model=tiny",
            "data.limit=24",
            "eval.limit=6",
            "eval.judge_check=10",
            "eval.max_new_tokens=8",
            "sdf.num_prompts=3",
            "sdf.num_candidates=2",
            "sdf.max_new_tokens=8",
            "sdf.max_steps=2",
            "eval.judge_logprobs=false",
        ]
        out, runs = tmp_path / "results", tmp_path / "runs"
        cmd = [
            sys.executable,
            "-m",
            "baize_exp.reproduce",
            "--out",
            str(out),
            "--runs",
            str(runs),
            "--seeds",
            "42,43",
            "--ranks",
            "4",
            *small,
        ]
        r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, timeout=1500)
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
        written = {p.name: p.read_bytes() for p in out.iterdir()}
        rankings = sum(bool(b) and "Rank these" in b["messages"][-1]["content"] for _, b in srv.received)
        # resumable: the same command again finds every run completed and asks nothing
        sent = srv.requests
        r2 = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, timeout=600)
        assert r2.returncode == 0, r2.stderr[-3000:]
        assert srv.requests == sent and r2.stdout.count("skipped") == 10
    # results/ come from the run dirs alone: the skip-all rerun and --report-only write the same bytes
    assert {p.name: p.read_bytes() for p in out.iterdir()} == written
    again = tmp_path / "again"
    only = [*cmd[: cmd.index("--out") + 1], str(again), *cmd[cmd.index("--out") + 2 :], "--report-only"]
    r3 = subprocess.run(only, capture_output=True, text=True, cwd=ROOT, env=env, timeout=600)
    assert r3.returncode == 0, r3.stderr[-3000:]
    assert {p.name: p.read_bytes() for p in again.iterdir()} == written
    assert "Stage time of all runs" in written["report.md"].decode()
    arms = ("main", "random", "teacher", "loss_all", "r4")
    assert {p.name for p in runs.iterdir()} == {f"{a}_s{s}" for a in arms for s in (42, 43)}
    # the controls reused their main run's ranked candidates: the teacher ranked each main run's prompts once
    assert rankings == 2 * 3
    steps = {
        name: json.loads((runs / name / "metrics.json").read_text())["sdf"]
        for name in ("main_s42", "random_s42", "teacher_s42")
    }
    assert {m["select"] for m in steps.values()} == {"best", "random", "teacher"}
    assert {m["steps"] for m in steps.values()} == {2} and {m["prompts_used"] for m in steps.values()} == {3}
    rows = list(csv.DictReader(open(out / "paired.csv")))
    assert {row["claim"] for row in rows} == {
        "(a) v1 vs base",
        "(b) v2 vs v1",
        "(b) the feedback: ranked vs random",
        "(b) more training: random vs v1",
        "(b) more training on teacher data: teacher answers vs v1",
        "(b) ranked samples vs teacher answers",
        "(c) ai-only vs all-tokens",
        "(d) rank 4 vs 8",
    }
    for row in rows:  # every row across both seeds of each arm (one for the untrained base), Holm-adjusted
        assert (row["k_a"], row["k_b"]) == ("2", "1" if row["b"] == "base" else "2"), row
        assert row["seed_noise_known"] == "True" and row["method"].startswith("seeds x items")
        assert float(row["p_holm"]) >= float(row["p"]) and row["verdict_holm"] in S.VERDICTS
        assert float(row["seed_sd_a"]) >= 0 and row["df"]
    by = {(row["claim"], row["metric"], row["format"]): row for row in rows}
    for fmt in ("baize", "chat_template"):  # base and v1 scored in the same format, each named
        assert int(by[("(a) v1 vs base", "heldout_loss", fmt)]["n"]) >= 4
        assert by[("(a) v1 vs base", "heldout_loss", fmt)]["seed_sd_b"] == "0"  # the base has no seed noise
        assert ("(a) v1 vs base", "ref_loglik", fmt) in by
        # (c) on both objectives and on the measure neither arm trains on
        for metric in ("heldout_loss", "heldout_loss_all", "ref_loglik"):
            assert ("(c) ai-only vs all-tokens", metric, fmt) in by
    judge = [row for row in rows if row["metric"].startswith("judge_")]
    assert {row["claim"] for row in judge} == {"(a) v1 vs base", "(b) v2 vs v1"}  # the main runs are judged
    assert all("unparsed" in row["items"] and S.NOT_SHOWN_TO_DISCRIMINATE not in row["note"] for row in judge)
    report = (out / "report.md").read_text()
    assert "The judge discriminates" in report and "forest.png" in report and (out / "forest.png").is_file()
    assert "What this can show" in report and "verdict (Holm)" in report and "lora.alpha=8" in report
    for claim in ("(a)", "(b)", "(c)", "(d)"):
        assert claim in report
    assert "<table" in (out / "report.html").read_text() and (out / "main_run.html").is_file()
