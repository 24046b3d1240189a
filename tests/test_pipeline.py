"""The real run.py end to end with model=tiny: what each stage wrote, reruns, secrets, W&B offline files."""

from __future__ import annotations

import csv
import json
import os
import urllib.request
from pathlib import Path

import pytest
from helpers.cli import run_cli

from baize_exp.data import REJECT_REASONS
from baize_exp.data.quality import QUALITY_REASONS
from baize_exp.serve import LocalServer

SECRET = "sk-test-0123456789abcdef-do-not-log"
# A greedy teacher makes the run deterministic (same dialogs, same rejects) on this machine.
SMALL = [
    "model=tiny",
    "data.limit=8",
    "teacher.temperature=0",
    "teacher.max_tokens=160",
    "collect.on_truncated=drop_turn",
    "sdf.num_prompts=3",
    "sdf.num_candidates=2",
    "sdf.max_new_tokens=16",
    "eval.limit=3",
    "eval.max_new_tokens=16",
    "eval.bootstrap=200",
    "eval.judge_check=3",  # the check's own tests are in test_evaluate.py; here it only has to run and be noted
    "trainer.max_epochs=1",
]


def _served_requests(server: LocalServer) -> int:
    with urllib.request.urlopen(f"http://127.0.0.1:{server.port}/health") as r:
        return json.loads(r.read())["requests"]


@pytest.fixture(scope="module")
def teacher_server():
    """The embedded model served on loopback, used as an 'openai' backend with a key of our choosing."""
    with LocalServer("smollm2_135m", cache_dir=os.environ["BAIZE_CACHE"], max_batch=16) as s:
        yield s


@pytest.mark.slow(seconds=105)  # on this box, 2026-12-03: started first
def test_run_py_end_to_end_through_the_openai_backend(tmp_path: Path, teacher_server: LocalServer) -> None:
    run_dir = tmp_path / "run"
    env = {"BAIZE_TEST_KEY": teacher_server.api_key}
    backend = (
        [f"{role}={x}" for role in ("teacher", "judge") for x in ("openai",)]
        + [
            f"{role}.{k}={v}"
            for role in ("teacher", "judge")
            for k, v in (
                ("base_url", teacher_server.base_url),
                ("api_key_env", "BAIZE_TEST_KEY"),
                ("model", "smollm2-135m-instruct"),
                ("concurrency", 16),
            )
        ]
        + ["judge.max_tokens=48"]
    )  # judge=local's own for this model (judge=openai's 256 is for GPT-4's reasoning)
    args = [*SMALL, *backend, "logger=wandb", f"hydra.run.dir={run_dir}"]
    n0 = _served_requests(teacher_server)
    r = run_cli(*args, env=env)
    assert r.returncode == 0, r.stderr[-4000:]
    requests_first = _served_requests(teacher_server) - n0

    # collect: every seed is a dialog or a reject with a reason
    dialogs = [json.loads(x) for x in (run_dir / "collect" / "dialogs.jsonl").read_text().splitlines()]
    rejects = [json.loads(x) for x in (run_dir / "collect" / "rejects.jsonl").read_text().splitlines()]
    assert len(dialogs) + len(rejects) == 8 and len(dialogs) >= 2
    for d in dialogs:
        assert {"id", "seed", "source", "turns", "teacher", "usage", "key"} <= d.keys()
        assert [t["role"] for t in d["turns"]][:2] == ["human", "ai"]
    for x in rejects:  # the parser's rejects keep the raw reply, the quality filters' the whole dialog
        assert (x["reason"] in REJECT_REASONS and "raw" in x) or (x["reason"] in QUALITY_REASONS and "dialog" in x), x
    # train and sdf: adapters that describe themselves; v2 differs from v1
    for stage in ("train", "sdf"):
        ad = run_dir / stage / "adapter"
        assert (ad / "adapter_model.safetensors").is_file() and (ad / "prompt_format.json").is_file()
    assert (run_dir / "train" / "adapter" / "adapter_model.safetensors").read_bytes() != (
        run_dir / "sdf" / "adapter" / "adapter_model.safetensors"
    ).read_bytes()
    cands = [json.loads(x) for x in (run_dir / "sdf" / "candidates.jsonl").read_text().splitlines()]
    assert cands and all(len(c["candidates"]) == 2 and sorted(c["order"]) == [0, 1] for c in cands)
    # eval: scores.csv per model with the contract's columns, a plot, judgments for every answer
    rows = list(csv.DictReader(open(run_dir / "eval" / "scores.csv")))
    assert {r["model"] for r in rows} == {"base", "v1", "v2"}
    assert list(rows[0].keys()) == [
        "model",
        "category",
        "mode",
        "n",
        "mean",
        "ci_low",
        "ci_high",
        "parse_failures",
        "note",
    ]  # the contract's columns, and the judge check's word on them
    judgments = (run_dir / "eval" / "judgments.jsonl").read_text().splitlines()
    assert len(judgments) == 3 * 3
    assert (run_dir / "eval" / "scores.png").stat().st_size > 5000
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert {"collect", "train", "sdf", "eval", "report"} <= metrics.keys()
    assert metrics["collect"]["dialogs"] == len(dialogs)
    val = (run_dir / "train" / "val_dialogs.jsonl").read_text().splitlines()
    assert metrics["eval"]["heldout_dialogs"] == len(val) >= 1
    assert metrics["eval"]["v1/heldout_loss"] > 0 and metrics["eval"]["base/heldout_ppl"] > 1
    assert "Judge scores" in (run_dir / "report.md").read_text()
    # W&B offline: a real run file holding the stage metrics (in its summary: tests/test_wandb.py)
    wandb_files = list(run_dir.glob("wandb/offline-run-*/run-*.wandb"))
    assert len(wandb_files) == 1 and b"collect/summary/dialogs" in wandb_files[0].read_bytes()
    # the stage contract: every file of the run is one a stage (or the pipeline) declares
    assert _unclaimed(run_dir) == []
    (run_dir / "eval" / "stray.txt").write_text("x")  # the check's negative control
    assert _unclaimed(run_dir) == ["eval/stray.txt"]
    (run_dir / "eval" / "stray.txt").unlink()
    # the key never lands in anything the run wrote
    for f in run_dir.rglob("*"):
        if f.is_file():
            assert SECRET.encode() not in f.read_bytes() and teacher_server.api_key.encode() not in f.read_bytes(), f

    # rerun: every stage is skipped, no request is sent
    n1 = _served_requests(teacher_server)
    r2 = run_cli(*args, env=env)
    assert r2.returncode == 0, r2.stderr[-3000:]
    assert _served_requests(teacher_server) == n1
    log = (run_dir / "run.log").read_text()
    for stage in ("collect", "train", "sdf", "eval"):
        assert f"stage {stage}: already complete" in log
    assert requests_first >= 8 + 3 + 9  # seeds, rankings, judgments (plus any retries)

    # the same run dir with a changed stage config is refused rather than mixed
    r3 = run_cli(*[a for a in args if not a.startswith("eval.limit")], "eval.limit=4", env=env)
    assert r3.returncode != 0 and "different config" in r3.stderr


@pytest.mark.slow
def test_local_teacher_is_started_and_stopped_for_the_run(tmp_path: Path) -> None:
    """teacher=local: the pipeline starts the server on a free loopback port and stops it after."""
    run_dir = tmp_path / "run"
    # 160 tokens leave room for two complete turns; the requests are seeded from the dialog keys, so what the
    # teacher writes does not change from run to run
    r = run_cli(
        "model=tiny",
        "data.limit=2",
        "teacher.max_tokens=160",
        "collect.on_truncated=drop_turn",
        "stages=[collect]",
        "logger=csv",
        f"hydra.run.dir={run_dir}",
    )
    assert r.returncode == 0, r.stderr[-3000:]
    serve_log = (run_dir / "serve-0.log").read_text()
    assert "serving smollm2-135m-instruct on http://127.0.0.1:" in serve_log
    n = sum(1 for _ in open(run_dir / "collect" / "dialogs.jsonl")) + sum(
        1 for _ in open(run_dir / "collect" / "rejects.jsonl")
    )
    assert n == 2


@pytest.mark.slow
def test_train_from_another_runs_dialogs(tmp_path: Path) -> None:
    """A stage can take its input from another run: train.data=<dialogs.jsonl>, no collect, no teacher."""
    src = tmp_path / "dialogs.jsonl"

    def turns(i: int) -> list[dict]:
        return [{"role": "human", "text": f"Question {i}?"}, {"role": "ai", "text": f"Answer {i}."}]

    src.write_text("".join(json.dumps({"id": f"d{i}", "turns": turns(i)}) + "\n" for i in range(8)))
    run_dir = tmp_path / "run"
    r = run_cli("model=tiny", "stages=[train,report]", f"train.data={src}", "logger=csv", f"hydra.run.dir={run_dir}")
    assert r.returncode == 0, r.stderr[-3000:]
    m = json.loads((run_dir / "metrics.json").read_text())
    assert m["train"]["train_dialogs"] + m["train"]["val_dialogs"] == 8
    assert (run_dir / "train" / "logs" / "metrics.csv").is_file()
    assert not (run_dir / "collect").exists()


def _unclaimed(run_dir: Path) -> list[str]:
    """The files of a run dir that no stage declares in `writes`/`may_write` and that are not the run's own."""
    from fnmatch import fnmatchcase

    from baize_exp.pipeline import RUN_FILES, stages

    files = sorted(p.relative_to(run_dir).as_posix() for p in run_dir.rglob("*") if p.is_file())
    return [
        f
        for f in files
        if not any(s.claims(f) for s in stages().values()) and not any(fnmatchcase(f, pattern) for pattern in RUN_FILES)
    ]


def test_a_stage_that_does_not_write_what_it_declares_stops_the_run_as_a_bug(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The pipeline checks each finished stage's `writes`: a stage that forgot one is an error naming it, and the
    stage gets no completion marker."""
    from dataclasses import replace

    from helpers.config import compose_cfg

    from baize_exp import pipeline

    def writes_half(cfg, run_dir: Path, backends) -> dict:
        (run_dir / "plan").mkdir(parents=True, exist_ok=True)
        (run_dir / "plan" / "plan.json").write_text("{}")  # plan.md forgotten
        return {}

    monkeypatch.setitem(pipeline.stages(), "plan", replace(pipeline.stages()["plan"], run=writes_half))
    cfg = compose_cfg(["model=tiny", "logger=none", "stages=[plan]", f"paths.output_dir={tmp_path}"])
    with pytest.raises(pipeline.StageContractError, match=r"stage plan finished without writing \['plan/plan.md'\]"):
        pipeline.run_pipeline(cfg)
    assert pipeline.stages()["plan"].missing(tmp_path) == ["plan/plan.md"]
