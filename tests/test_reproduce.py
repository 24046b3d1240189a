"""`make reproduce`'s driver end to end on the tiny model: six real runs (through `python -m baize_exp`), their
paired comparisons gathered per claim, and results/ written. Teacher and judge are a scripted server on loopback
(a knowing judge: the reference answer is excellent, anything else poor), so the judge check must pass and the
judge-free rows must exist for every claim."""

from __future__ import annotations

import csv
import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers.fault_server import FaultServer

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


@pytest.mark.slow
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
            "eval.judge_check=4",
            "eval.max_new_tokens=8",
            "sdf.num_prompts=3",
            "sdf.num_candidates=2",
            "sdf.max_new_tokens=8",
            "eval.judge_logprobs=false",
        ]
        out, runs = tmp_path / "results", tmp_path / "runs"
        cmd = [sys.executable, "-m", "baize_exp.reproduce", "--out", str(out), "--runs", str(runs), *small]
        r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, timeout=1200)
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
        # resumable: the same command again finds every stage done (its marker matches) and asks nothing
        sent = srv.requests
        r2 = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, timeout=600)
        assert r2.returncode == 0, r2.stderr[-3000:]
        assert srv.requests == sent
    assert {p.name for p in runs.iterdir()} == {"main", "loss_all", "r4", "r16", "r64", "seed43"}
    rows = list(csv.DictReader(open(out / "paired.csv")))
    claims = {row["claim"] for row in rows}
    assert claims == {
        "v1 vs base",
        "v2 vs v1",
        "ai-only vs all-tokens",
        "rank 4 vs 8",
        "rank 16 vs 8",
        "rank 64 vs 8",
        "control: training seed 43 vs 42",
    }
    # the same split under another training seed: the control pairs on the very same held-out dialogs
    control = {row["metric"]: row for row in rows if row["claim"].startswith("control")}
    main_v1 = {row["metric"]: row for row in rows if row["claim"] == "v1 vs base"}
    assert control["heldout_loss"]["n"] == main_v1["heldout_loss"]["n"]
    for row in rows:  # each row carries the floor it was held against; a verdict inside it says so
        if row["metric"] == "heldout_loss":
            assert float(row["seed_noise"]) == abs(float(control["heldout_loss"]["diff"]))
            if row["verdict"] != "no detectable difference" and not row["claim"].startswith("control"):
                inside = abs(float(row["diff"])) <= float(row["seed_noise"])
                assert ("within seed noise" in row["note"]) == inside
    for claim in claims:  # judge-free rows for every claim, paired on the same held-out dialogs
        got = {row["metric"]: row for row in rows if row["claim"] == claim}
        assert {"heldout_loss", "ref_loglik", "judge_single"} <= set(got), (claim, set(got))
        assert int(got["heldout_loss"]["n"]) >= 4 and got["heldout_loss"]["verdict"] in (
            "better",
            "worse",
            "no detectable difference",
        )
        assert "judge cannot discriminate" not in got["judge_single"]["note"]  # the knowing judge passed its check
    report = (out / "report.md").read_text()
    assert "The judge discriminates" in report and "forest.png" in report and (out / "forest.png").is_file()
    for claim in ("(a)", "(b)", "(c)", "(d)"):
        assert claim in report
    assert "<table" in (out / "report.html").read_text() and (out / "main_run.html").is_file()
