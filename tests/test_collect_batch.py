"""Collection over the OpenAI Batch API (`teacher.batch=true`) and SDF ranking and the judge over batches, through
the real `openai` client against the loopback fake of Files and Batches (tests/helpers/batch_server.py): the same
dialogs as the online path, a kill of `baize-collect` while its batches run and a rerun that polls them instead
of paying again, one batch per round in turn-by-turn mode, and a whole `run.py` run whose teacher and judge never
send an online request."""

from __future__ import annotations

import contextlib
import fnmatch
import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
from helpers.batch_server import BatchServer, realistic_reply
from helpers.config import ROOT, compose_cfg

from baize_exp import pipeline
from baize_exp.chat import ChatClient
from baize_exp.chat.batch import BatchRunner
from baize_exp.chat.cost import usd
from baize_exp.data import Seed
from baize_exp.io import read_jsonl
from baize_exp.stages.collect import collect

SECRET = "sk-test-collect-batch-0123456789abcdef-never-written"
KEY_ENV = "BAIZE_BATCH_TEST_KEY"
FAST_BATCH = [
    "teacher=openai",
    "teacher.batch=true",
    "teacher.batch_poll_s=0.05",
    "teacher.batch_poll_max_s=0.2",
    "teacher.backoff_base_s=0.01",
    f"teacher.api_key_env={KEY_ENV}",
]


def _seeds(n: int) -> list[Seed]:
    return [Seed(f"s{i:03d}", "test", f"How do I look after garden plant number {i}?") for i in range(n)]


def _runner(cfg, srv: BatchServer, state: Path) -> BatchRunner:
    runner = BatchRunner.from_config(cfg.teacher, state, base_url=srv.base_url, api_key=SECRET)
    runner.progress = False
    return runner


@pytest.mark.parametrize("mode", ["transcript", "turns"])
def test_batches_collect_the_dialogs_the_online_client_collects(tmp_path: Path, mode: str) -> None:
    """Same seeds, same teacher: the Batch API path gives byte for byte the dialogs and rejects of the online path
    (the fake answers a batch line as it answers the same request online), marked `"batch": true`; turns mode
    submits one round of batches per turn."""
    extra = ["collect=turns", "collect.max_turns=4"] if mode == "turns" else []
    cfg = compose_cfg([*FAST_BATCH, "teacher.batch_max_requests=8", *extra])
    seeds = _seeds(12)
    with BatchServer(api_key=SECRET, reply=realistic_reply) as srv:
        online = collect(
            seeds,
            ChatClient.from_config(cfg.teacher, srv.base_url, SECRET),
            cfg.collect,
            cfg.teacher,
            tmp_path / "online",
        )
        assert srv.chat_requests == online["requests"] and not srv.order
        runner = _runner(cfg, srv, tmp_path / "batch" / "batches")
        m = collect(seeds, runner, cfg.collect, cfg.teacher, tmp_path / "batch")
        rounds = 3 if mode == "turns" else 1  # turns: the AI, the human, the AI again
        assert srv.chat_requests == online["requests"]  # no online request from the batch path
        assert len(srv.order) == rounds * 2  # 12 requests a round, at most 8 a batch
        assert all(n == 1 for n in srv.submitted.values())  # each request in one batch only
        if mode == "turns":
            assert {cid.rsplit(":", 1)[1] for cid in srv.submitted} == {"1", "2", "3"}
        other = compose_cfg([*FAST_BATCH, "teacher.batch_max_requests=8", "teacher.temperature=0.3", *extra])
        control = collect(
            seeds, _runner(other, srv, tmp_path / "c" / "batches"), other.collect, other.teacher, tmp_path / "c"
        )
    for name in ("dialogs.jsonl", "rejects.jsonl"):
        on, ba = read_jsonl(tmp_path / "online" / name), read_jsonl(tmp_path / "batch" / name)
        assert all(r.pop("batch") is True for r in ba)
        strip = lambda rs: sorted(json.dumps({k: v for k, v in r.items() if k != "id"}, sort_keys=True) for r in rs)  # noqa: E731
        assert strip(ba) == strip(on), name
    assert m["dialogs"] + m["rejects"] == 12 and m["requests"] == online["requests"]
    assert m["usage_by_model"]["gpt-3.5-turbo"]["batches"] == rounds * 2
    price = cfg.teacher.prices["gpt-3.5-turbo"]
    assert m["cost_usd"] == pytest.approx(usd(m["prompt_tokens"], m["completion_tokens"], price, 0.5))
    assert m["cost_usd"] == pytest.approx(online["cost_usd"] / 2)
    # negative control: other sampling settings are other requests (other seeds), so other dialogs
    texts = lambda d: sorted(t["text"] for r in read_jsonl(d / "dialogs.jsonl") for t in r["turns"][1:])  # noqa: E731
    assert control["dialogs"] and texts(tmp_path / "c") != texts(tmp_path / "batch")
    assert not list((tmp_path / "batch" / "batches").glob("turns-*"))  # the rounds' state is gone once done


def _lines(path: Path) -> int:
    return len(path.read_bytes().splitlines()) if path.exists() else 0


def _created(batches: Path) -> int:
    n = 0
    for p in batches.glob("chunk-*.json"):
        with contextlib.suppress(ValueError, KeyError):  # being replaced
            n += json.loads(p.read_text())["state"] in ("created", "done")
    return n


@pytest.mark.slow
def test_baize_collect_killed_while_its_batches_run_resumes_them_without_paying_twice(tmp_path: Path) -> None:
    """`baize-collect teacher.batch=true` is SIGKILLed once two of its four batches are created and before any
    has finished; the rerun polls the recorded batches, submits the other two, and finishes: every request was
    in exactly one batch, every seed has its dialog or reject, the data card says what the batches cost."""
    n = 30
    seeds_file = tmp_path / "seeds.txt"
    seeds_file.write_text("".join(f"How do I look after garden plant number {i}?\n" for i in range(n)))
    run_dir = tmp_path / "run"
    env = {**os.environ, KEY_ENV: SECRET, "BAIZE_CACHE": str(tmp_path / "cache")}
    with BatchServer(api_key=SECRET, complete_s=4.0, reply=realistic_reply) as srv:
        args = [
            sys.executable,
            "-c",
            "from baize_exp.cli import collect; collect()",
            *FAST_BATCH,
            f"teacher.base_url={srv.base_url}",
            "teacher.batch_max_requests=8",
            "data=file",
            f"data.path={seeds_file}",
            "collect.shared=false",  # the collection in the run dir, where the test watches its batches
            "logger=none",
            f"hydra.run.dir={run_dir}",
        ]
        batches = run_dir / "collect" / "teacher" / "batches"
        with open(tmp_path / "first.log", "wb") as log:
            p = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
            deadline = time.monotonic() + 120
            while _created(batches) < 2 and time.monotonic() < deadline and p.poll() is None:
                time.sleep(0.02)
            p.send_signal(signal.SIGKILL)
            p.wait()
        assert p.returncode == -signal.SIGKILL, (tmp_path / "first.log").read_text()[-3000:]
        assert 2 <= len(srv.order) < 4 and _lines(run_dir / "collect" / "teacher" / "dialogs.jsonl") == 0
        killed_batches = list(srv.order)

        r = subprocess.run(args, capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
        assert r.returncode == 0, r.stderr[-3000:]
        assert srv.order[: len(killed_batches)] == killed_batches and len(srv.order) == 4  # polled, not made again
        assert srv.submitted == Counter({k: 1 for k in srv.submitted}) and len(srv.submitted) == n
        assert srv.chat_requests == 0

        before = dict(srv.calls)
        again = subprocess.run(args, capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
        assert again.returncode == 0 and dict(srv.calls) == before  # a finished run: nothing asked at all

    teacher = read_jsonl(run_dir / "collect" / "teacher" / "dialogs.jsonl")
    teacher += read_jsonl(run_dir / "collect" / "teacher" / "rejects.jsonl")
    assert sorted(x["key"] for x in teacher) == sorted(srv.submitted) and all(x["batch"] for x in teacher)
    card = json.loads((run_dir / "collect" / "data_card.json").read_text())
    spent = card["spent"]
    assert spent["requests"] == spent["batch_requests"] == n
    assert spent["cost_usd"] == pytest.approx(
        usd(spent["prompt_tokens"], spent["completion_tokens"], {"prompt": 0.5, "completion": 1.5}, 0.5), abs=1e-6
    )
    assert "30 of them through the Batch API" in (run_dir / "collect" / "data_card.md").read_text()
    stages = pipeline.stages().values()
    for f in run_dir.rglob("*"):
        if f.is_file():
            rel = f.relative_to(run_dir).as_posix()
            assert any(s.claims(rel) for s in stages) or any(fnmatch.fnmatchcase(rel, g) for g in pipeline.RUN_FILES), (
                rel
            )
            assert SECRET.encode() not in f.read_bytes(), f


def _scripted(body: dict) -> str:
    """The teacher and the judge in one fake: transcripts for collection, a ranking for SDF, a score."""
    text = "\n".join(str(m.get("content") or "") for m in body.get("messages") or [])
    if "Score: N" in text or "[[rating]]" in text.lower():
        return "Score: 7"
    if "transcript" in text.lower():
        return realistic_reply(body)
    return "2 > 1"


@pytest.mark.slow
def test_a_run_asks_its_teacher_and_judge_only_through_batches(tmp_path: Path) -> None:
    """`run.py` with `teacher.batch=true judge.batch=true` on the tiny model: collect, SDF ranking and the judge
    all go through batches (no online request at all), their answers are read, and every file is declared."""
    env = {**os.environ, KEY_ENV: SECRET, "BAIZE_CACHE": str(tmp_path / "cache")}
    run_dir = tmp_path / "run"
    with BatchServer(api_key=SECRET, reply=_scripted) as srv:
        backend = []
        for role in ("teacher", "judge"):
            backend += [
                f"{role}=openai",
                f"{role}.batch=true",
                f"{role}.base_url={srv.base_url}",
                f"{role}.api_key_env={KEY_ENV}",
                f"{role}.batch_poll_s=0.05",
                f"{role}.batch_poll_max_s=0.2",
            ]
        cmd = [
            sys.executable,
            str(ROOT / "run.py"),
            "model=tiny",
            "stages=[collect,train,sdf,eval]",
            "data.limit=12",
            "trainer.max_epochs=1",
            "sdf.num_prompts=3",
            "sdf.num_candidates=2",
            "sdf.max_new_tokens=8",
            "eval.limit=2",
            "eval.max_new_tokens=8",
            "eval.bootstrap=100",
            *backend,
            "logger=none",
            f"hydra.run.dir={run_dir}",
        ]
        r = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=1500)
        assert r.returncode == 0, r.stderr[-4000:]
        assert srv.chat_requests == 0  # not one online request
        roles = Counter(b["metadata"]["baize_role"] for b in srv.batches.values())
        assert roles["teacher"] >= 2 and roles["judge"] >= 1  # collect and SDF ranking; the judge
    for stage in ("sdf", "eval"):
        (chunk,) = [json.loads(p.read_text()) for p in sorted((run_dir / stage / "batches").glob("chunk-*.json"))][:1]
        assert chunk["state"] == "done"
    cands = read_jsonl(run_dir / "sdf" / "candidates.jsonl")
    assert cands and all(c["parse"] == "ok" and c["ranking"] == [c["order"][1], c["order"][0]] for c in cands)
    judged = read_jsonl(run_dir / "eval" / "judgments.jsonl")
    assert judged and all(j["score"] == 7 for j in judged)
    for f in run_dir.rglob("*"):
        if f.is_file():
            rel = f.relative_to(run_dir).as_posix()
            declared = any(s.claims(rel) for s in pipeline.stages().values())
            assert declared or any(fnmatch.fnmatchcase(rel, g) for g in pipeline.RUN_FILES), rel
