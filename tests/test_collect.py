"""The collect engine against the fault-injecting server: both modes, every reject reason, resume, kill -9, CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers.config import ROOT, compose_cfg
from helpers.fault_server import FaultServer

from baize_exp.chat import ChatClient, ChatError
from baize_exp.config import ConfigError, validate
from baize_exp.data import REJECT_REASONS, Seed
from baize_exp.data.export import ExportError, export, export_records
from baize_exp.errors import Interrupted
from baize_exp.io import read_jsonl
from baize_exp.stages.collect import collect

SECRET = "sk-test-collect-0123456789abcdef-never-written"
FAST = [
    "teacher=openai",
    "teacher.backoff_base_s=0.01",
    "teacher.backoff_max_s=0.05",
    "teacher.timeout_s=0.5",
    "teacher.max_retries=2",
    "teacher.concurrency=8",
    "collect.on_truncated=reject",  # the fault tables' "length" seeds are rejects (drop_turn has its own test)
]


def _setup(tmp_path: Path, *overrides: str):
    cfg = compose_cfg([*FAST, f"paths.output_dir={tmp_path}", *overrides])
    validate(cfg)
    return cfg


def _client(cfg, srv: FaultServer) -> ChatClient:
    return ChatClient.from_config(cfg.teacher, base_url=srv.base_url, api_key=SECRET)


def _seeds(faults: list[str]) -> list[Seed]:
    return [Seed(f"s{i:03d}", "test", f"question {i}" + (f" [[fault:{f}]]" if f else "")) for i, f in enumerate(faults)]


# fault directive in the seed -> what becomes of it (transcript mode, max_retries=2): a dialog, a reject with its
# reason (final), or "failed" (transient: kept in failures.jsonl, asked again by every rerun)
TRANSCRIPT_OUTCOMES = {
    "": "dialog",
    "429x2": "dialog",
    "500x1": "dialog",
    "hangx1": "dialog",
    "malformedx1": "dialog",
    "empty_choicesx1": "dialog",
    "wrong_format": "no_transcript",
    "role_order": "role_order",
    "short": "too_few_turns",
    "length": "length",
    "empty": "empty",
    "too_long": "bad_request",
    "huge": "oversized",
    "500": "failed",
    "malformed": "failed",
    "empty_choices": "failed",
}
FAILS_FOREVER = ("500", "malformed", "empty_choices")


def test_transcript_mode_every_fault_ends_as_a_dialog_a_reject_or_a_failure_to_ask_again(tmp_path: Path) -> None:
    cfg = _setup(tmp_path)
    faults = list(TRANSCRIPT_OUTCOMES)
    seeds = _seeds(faults) + [Seed("long", "test", "Why? " * 1000)]  # 5000 characters: over max_seed_tokens
    out = tmp_path / "collect"
    with FaultServer(latency_s=0.01, api_key=SECRET, retry_after_s=0.05) as srv:
        client = _client(cfg, srv)
        with pytest.raises(
            Interrupted,
            match=r"3 of 17 seeds are unfinished: 3 failed after their retries "
            r"\(last: .*gave up after 3 attempts\)",
        ) as e:
            collect(seeds, client, cfg.collect, cfg.teacher, out)
        first = srv.requests
        assert "14 finished are kept" in str(e.value)
        with pytest.raises(Interrupted):  # a rerun asks again for the 3 that failed, and only for them
            collect(seeds, _client(cfg, srv), cfg.collect, cfg.teacher, out)
        asked_again = [b["messages"][0]["content"] for _, b in srv.received[first:]]
    # attempts per seed: 1, or 1 + the injected failures, or 3 (max_retries=2) for a fault that never clears; the
    # 400 and the seed over max_seed_tokens: 1 and 0
    expected = sum(3 if f in FAILS_FOREVER else 1 + int(f.split("x")[1]) if "x" in f else 1 for f in faults)
    assert first == client.requests == expected and client.retries == expected - len(faults)
    assert len(asked_again) == 9 and {a.rsplit("[[fault:", 1)[1][:-2] for a in asked_again} == set(FAILS_FOREVER)

    dialogs, rejects = read_jsonl(out / "dialogs.jsonl"), read_jsonl(out / "rejects.jsonl")
    failures = read_jsonl(out / "failures.jsonl")
    outcome = {d["seed"]: "dialog" for d in dialogs} | {r["seed"]: r["reason"] for r in rejects}
    outcome |= {f["seed"]: "failed" for f in failures}
    assert outcome == {s.question: TRANSCRIPT_OUTCOMES[f] for s, f in zip(seeds, faults, strict=False)} | {
        seeds[-1].question[:4000]: "too_long"
    }
    assert len(dialogs) + len(rejects) == len(seeds) - 3  # nothing lost, nothing twice
    assert len(failures) == 6 and all(f["error"] and f["key"] for f in failures)  # two attempts each, history
    assert sum(x["requests"] for x in dialogs + rejects + failures) == srv.requests  # every request accounted
    for r in rejects:
        assert r["reason"] in REJECT_REASONS and "raw" in r and r["key"]
        if r["reason"] not in ("empty", "bad_request", "too_long"):
            assert r["raw"]  # the teacher's reply is kept for inspection
    (huge,) = [r for r in rejects if r["reason"] == "oversized"]
    assert huge["raw_chars"] > 1_000_000 and len(huge["raw"]) == 4000  # never the whole megabyte
    assert "maximum context length" in next(r for r in rejects if r["reason"] == "bad_request")["detail"]
    assert "collect.max_seed_tokens=1024" in next(r for r in rejects if r["reason"] == "too_long")["detail"]
    for d in dialogs:
        assert [t["role"] for t in d["turns"]] == ["human", "ai"] * (len(d["turns"]) // 2)
    assert (out / "dialogs.jsonl").stat().st_size + (out / "rejects.jsonl").stat().st_size < 100_000


def test_metrics_and_cost_of_a_clean_collection(tmp_path: Path) -> None:
    cfg = _setup(tmp_path)
    with FaultServer(api_key=SECRET) as srv:
        m = collect(_seeds(["", "", "wrong_format"]), _client(cfg, srv), cfg.collect, cfg.teacher, tmp_path / "c")
    assert m["dialogs"] == m["new_dialogs"] == 2 and m["rejects_by_reason"] == {"no_transcript": 1}
    assert m["seeds_that_failed_before"] == m["failed_attempts"] == 0
    assert m["completion_tokens"] > 0 and m["cost_usd"] == pytest.approx(
        (m["prompt_tokens"] * 0.5 + m["completion_tokens"] * 1.5) / 1e6
    )  # gpt-3.5-turbo in conf/teacher/openai


def test_truncated_reply_can_keep_its_complete_turns(tmp_path: Path) -> None:
    cfg = _setup(tmp_path, "collect.on_truncated=drop_turn")
    with FaultServer(api_key=SECRET) as srv:
        m = collect(_seeds(["length"]), _client(cfg, srv), cfg.collect, cfg.teacher, tmp_path / "c")
    (d,) = read_jsonl(tmp_path / "c" / "dialogs.jsonl")
    assert m["dialogs"] == 1 and len(d["turns"]) == 2 and d["finish_reason"] == "length"


def test_turns_mode_plays_both_roles_turn_by_turn(tmp_path: Path) -> None:
    cfg = _setup(tmp_path, "collect=turns", "collect.max_turns=6")
    faults = ["", "", "429x1", "length", "empty", "role_order", "500"]
    seeds = _seeds(faults)
    out = tmp_path / "collect"
    with FaultServer(latency_s=0.01, api_key=SECRET, retry_after_s=0.05) as srv:
        client = _client(cfg, srv)
        with pytest.raises(Interrupted, match="1 of 7 seeds are unfinished"):
            collect(seeds, client, cfg.collect, cfg.teacher, out)
        n = srv.requests
        bodies = [b for _, b in srv.received]
        with pytest.raises(Interrupted, match="1 of 7 seeds are unfinished"):  # asked again: only that seed
            collect(seeds, _client(cfg, srv), cfg.collect, cfg.teacher, out)
        assert srv.requests - n == 3
    dialogs = {d["seed"]: d for d in read_jsonl(out / "dialogs.jsonl")}
    rejects = {r["seed"]: r for r in read_jsonl(out / "rejects.jsonl")}
    assert set(dialogs) == {s.question for s in seeds[:3]}
    for d in dialogs.values():
        assert [t["role"] for t in d["turns"]] == ["human", "ai"] * 3 and d["mode"] == "turns"
        assert d["turns"][0]["text"] == d["seed"]  # the seed is the human's first turn
    assert dialogs[seeds[2].question]["requests"] == 10  # 5 turns, each 429 once then served
    assert {s: r["reason"] for s, r in rejects.items()} == {
        seeds[3].question: "length",
        seeds[4].question: "empty",
        seeds[5].question: "role_order",
    }
    # 5 requests per full dialog (+5 retries for the 429s); length and empty end the dialog on the first AI turn,
    # role_order on the first human turn (its reply speaks as the AI), 500 after 3 attempts
    assert n == client.requests == 5 * 3 + 5 + 1 + 1 + 2 + 3
    assert [f["seed"] for f in read_jsonl(out / "failures.jsonl")] == [seeds[6].question] * 2
    assert "turn 3 (human)" in rejects[seeds[5].question]["detail"]
    # the AI sees the dialog as chat messages; the human sees it as a transcript in its template
    ai = [b for b in bodies if b["messages"][0]["role"] == "system"]
    human = [b for b in bodies if b["messages"][0]["role"] == "user"]
    assert ai and human and all(len(b["messages"]) % 2 == 0 for b in ai)
    assert all("[Human] " in b["messages"][0]["content"] and "[AI] " in b["messages"][0]["content"] for b in human)


@pytest.mark.parametrize("mode", ["transcript", "turns"])
def test_requests_carry_seeds_drawn_from_the_dialog_key(tmp_path: Path, mode: str) -> None:
    """A collection redone elsewhere with the same settings asks the same questions with the same sampling seeds
    (so a seeded backend gives the same dialogs); every request of a dialog has its own seed."""
    cfg = _setup(tmp_path, f"collect.mode={mode}", "collect.max_turns=4")
    seeds = _seeds(["", "", ""])
    sent = []
    for out in ("a", "b"):
        with FaultServer(latency_s=0.0, api_key=SECRET) as srv:
            collect(seeds, _client(cfg, srv), cfg.collect, cfg.teacher, tmp_path / out)
            sent.append(sorted((json.dumps(b["messages"]), b["seed"]) for _, b in srv.received))
    assert sent[0] == sent[1] and len(sent[0]) == 3 * (1 if mode == "transcript" else 3)
    request_seeds = [seed for _, seed in sent[0]]
    assert all(isinstance(x, int) and 0 <= x < 2**31 for x in request_seeds)
    assert len(set(request_seeds)) == len(request_seeds)


def test_changed_sampling_settings_are_new_work(tmp_path: Path) -> None:
    seeds = _seeds(["", "", ""])
    with FaultServer(api_key=SECRET) as srv:
        for overrides, new_requests in (([], 3), ([], 0), (["teacher.temperature=0.2"], 3)):
            cfg = _setup(tmp_path, *overrides)
            n = srv.requests
            collect(seeds, _client(cfg, srv), cfg.collect, cfg.teacher, tmp_path / "c")
            assert srv.requests - n == new_requests
    keys = [d["key"] for d in read_jsonl(tmp_path / "c" / "dialogs.jsonl")]
    assert len(keys) == len(set(keys)) == 6


def test_failed_requests_are_asked_again_by_every_rerun_and_their_history_is_kept(tmp_path: Path) -> None:
    seeds = _seeds(["", "500x3", "wrong_format"])  # max_retries=2: the 500 outlasts the first run's 3 attempts
    out = tmp_path / "c"
    with FaultServer(api_key=SECRET) as srv:
        cfg = _setup(tmp_path)
        with pytest.raises(Interrupted, match="1 of 3 seeds are unfinished.*http 500"):
            collect(seeds, _client(cfg, srv), cfg.collect, cfg.teacher, out)
        n = srv.requests
        m = collect(seeds, _client(cfg, srv), cfg.collect, cfg.teacher, out)
        assert srv.requests - n == 1 and m["requested"] == 1  # only the failed one; the parse reject stays
    assert m["dialogs"] == 2 and m["rejects_by_reason"] == {"no_transcript": 1}
    assert m["seeds_that_failed_before"] == 1 and m["failed_attempts"] == 1
    assert [r["reason"] for r in read_jsonl(out / "rejects.jsonl")] == ["no_transcript"]
    (f,) = read_jsonl(out / "failures.jsonl")
    assert f["requests"] == 3 and "http 500" in f["error"]
    recovered = next(d for d in read_jsonl(out / "dialogs.jsonl") if d["seed"] == seeds[1].question)
    assert recovered["earlier_failures"] == 1


def test_refused_key_stops_collection_with_nothing_written(tmp_path: Path) -> None:
    cfg = _setup(tmp_path)
    with FaultServer(api_key="sk-the-right-key-123456") as srv:
        with pytest.raises(ChatError, match="refused the API key"):
            collect(_seeds([""] * 40), _client(cfg, srv), cfg.collect, cfg.teacher, tmp_path / "c")
        assert srv.requests == 1  # the first request alone, then nothing
    assert read_jsonl(tmp_path / "c" / "dialogs.jsonl") == [] == read_jsonl(tmp_path / "c" / "rejects.jsonl")


def test_collect_config_is_validated() -> None:
    cfg = compose_cfg(
        [
            "collect.max_turns=1",  # choices (collect.mode, on_truncated): refused at composition, test_config_choices
            "teacher.requests_per_min=0",
            "collect.human_template=no history here",
        ]
    )
    with pytest.raises(ConfigError) as e:
        validate(cfg)
    for key in (
        "collect.max_turns",
        "teacher.requests_per_min",
        "collect.human_template",
    ):
        assert key in str(e.value)
    assert compose_cfg(["collect=turns"]).collect.mode == "turns"


def test_export_to_baize_text_and_chatml(tmp_path: Path) -> None:
    src = tmp_path / "dialogs.jsonl"
    turns = [{"role": "human", "text": "Why is the sky blue?"}, {"role": "ai", "text": "Rayleigh scattering."}]
    src.write_text(json.dumps({"id": "d1", "seed": "sky", "turns": turns}) + "\n")
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "baize_exp.data.export",
            str(src),
            "--format",
            "baize",
            "--out",
            str(tmp_path / "baize.jsonl"),
        ],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stderr
    (b,) = read_jsonl(tmp_path / "baize.jsonl")
    assert b == {
        "id": "d1",
        "topic": "sky",
        "input": "The conversation between human and AI assistant.\n"
        "[|Human|] Why is the sky blue?\n[|AI|] Rayleigh scattering.\n[|Human|]",
    }
    assert export(src, tmp_path / "chat.jsonl", "chatml", system="Be brief.") == 1
    (c,) = read_jsonl(tmp_path / "chat.jsonl")
    assert c["messages"] == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Why is the sky blue?"},
        {"role": "assistant", "content": "Rayleigh scattering."},
    ]
    src.write_text(src.read_text() + json.dumps({"id": "d2", "turns": [{"role": "robot", "text": "x"}]}) + "\n")
    with pytest.raises(ExportError, match="dialogs.jsonl:2: turn 1 has role 'robot'"):
        export_records(src, "baize")
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "baize_exp.data.export",
            str(src),
            "--format",
            "chatml",
            "--out",
            str(tmp_path / "x.jsonl"),
        ],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 2 and "dialogs.jsonl:2:" in r.stderr and not (tmp_path / "x.jsonl").exists()


def _lines(path: Path) -> int:
    return path.read_bytes().count(b"\n") if path.exists() else 0


@pytest.mark.slow
def test_kill_9_then_rerun_sends_exactly_the_missing_requests(tmp_path: Path) -> None:
    """`baize-collect` as a subprocess, killed mid-way; the rerun requests only what is missing,
    writes no dialog twice, repairs a torn last line; W&B gets progress and samples; the key is in no file."""
    n_seeds = 40
    seeds_file = tmp_path / "seeds.txt"
    seeds_file.write_text("".join(f"How do I look after plant number {i}?\n" for i in range(n_seeds)))
    run_dir = tmp_path / "run"
    env = {**os.environ, "BAIZE_FAULT_KEY": SECRET}
    with FaultServer(latency_s=0.3, api_key=SECRET) as srv:
        args = [
            sys.executable,
            "-c",
            "from baize_exp.cli import collect; collect()",
            "teacher=openai",
            f"teacher.base_url={srv.base_url}",
            "teacher.api_key_env=BAIZE_FAULT_KEY",
            "teacher.concurrency=4",
            "data=file",
            f"data.path={seeds_file}",
            f"hydra.run.dir={run_dir}",
            "collect.shared=false",
        ]  # write in the run dir itself, so the test can watch it grow and kill
        store = run_dir / "collect" / "teacher"  # the teacher's dialogs as they come; the filtered ones beside
        dialogs = store / "dialogs.jsonl"
        with open(tmp_path / "first.log", "wb") as log:
            p = subprocess.Popen([*args, "logger=none"], stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
            deadline = time.monotonic() + 180
            while _lines(dialogs) < 8 and time.monotonic() < deadline and p.poll() is None:
                time.sleep(0.05)
            p.kill()  # SIGKILL: no cleanup of any kind
            p.wait()
        assert p.returncode == -9, (tmp_path / "first.log").read_text()[-3000:]
        done = {r["seed"] for r in read_jsonl(dialogs)} | {r["seed"] for r in read_jsonl(store / "rejects.jsonl")}
        assert 8 <= len(done) < n_seeds
        with open(dialogs, "ab") as f:  # what a kill during a write leaves behind
            f.write(b'{"id": "torn-rec')

        before = srv.requests
        r = subprocess.run([*args, "logger=wandb"], capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
        assert r.returncode == 0, r.stderr[-3000:]
        rerun_bodies = [b for _, b in srv.received[before:]]
        assert srv.requests - before == n_seeds - len(done)  # exactly the missing ones
        asked = {b["messages"][0]["content"].rsplit("about: ", 1)[1] for b in rerun_bodies}
        assert asked == {f"How do I look after plant number {i}?" for i in range(n_seeds)} - done

        before = srv.requests
        r = subprocess.run([*args, "logger=none"], capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
        assert r.returncode == 0 and srv.requests == before  # unchanged rerun: zero requests

    recs = read_jsonl(dialogs) + read_jsonl(store / "rejects.jsonl")
    assert len(recs) == n_seeds and len({x["key"] for x in recs}) == n_seeds  # none lost, none twice
    out = read_jsonl(run_dir / "collect" / "dialogs.jsonl") + read_jsonl(run_dir / "collect" / "rejects.jsonl")
    assert sorted(x["key"] for x in out) == sorted(x["key"] for x in recs)  # filtered: every seed still accounted for
    assert b"torn-rec" not in dialogs.read_bytes()
    metrics = json.loads((run_dir / "metrics.json").read_text())["collect"]
    assert metrics["requested"] == n_seeds - len(done) and metrics["dialogs"] + metrics["rejects"] == n_seeds
    (wb,) = run_dir.glob("wandb/offline-run-*/run-*.wandb")
    data = wb.read_bytes()
    assert b"collect/progress/dialogs_per_s" in data and b"collect/samples" in data
    assert list(run_dir.glob("wandb/offline-run-*/files/media/table/collect/samples_*.table.json"))
    for f in tmp_path.rglob("*"):
        if f.is_file():
            assert SECRET.encode() not in f.read_bytes(), f


@pytest.mark.slow
def test_turns_mode_against_the_projects_own_server(tmp_path: Path) -> None:
    """The happy path on real parts: the embedded model served on loopback plays both roles, greedy."""
    import urllib.request

    from baize_exp.serve import LocalServer

    def served() -> int:
        with urllib.request.urlopen(f"http://127.0.0.1:{srv.port}/health") as r:
            return json.loads(r.read())["requests"]

    cfg = _setup(
        tmp_path,
        "collect=turns",
        "collect.max_turns=4",
        "collect.on_truncated=drop_turn",
        "teacher.max_tokens=128",
        "teacher.temperature=0",
        "teacher.timeout_s=600",
    )
    seeds = [Seed("q1", "test", "How do I make a cup of green tea?"), Seed("q2", "test", "What is a prime number?")]
    with LocalServer("smollm2_135m", cache_dir=os.environ["BAIZE_CACHE"], max_batch=4) as srv:
        client = ChatClient(
            srv.base_url,
            srv.api_key,
            "smollm2-135m-instruct",
            temperature=0.0,
            max_tokens=128,
            concurrency=4,
            timeout_s=600,
        )
        m = collect(seeds, client, cfg.collect, cfg.teacher, tmp_path / "c")
        n = served()
        assert collect(seeds, client, cfg.collect, cfg.teacher, tmp_path / "c")["requested"] == 0
        assert served() == n
    recs = read_jsonl(tmp_path / "c" / "dialogs.jsonl") + read_jsonl(tmp_path / "c" / "rejects.jsonl")
    assert sorted(r["seed"] for r in recs) == sorted(s.question for s in seeds)
    assert sum(r["requests"] for r in recs) == n == m["requests"]
    assert m["dialogs"] >= 1
    for d in read_jsonl(tmp_path / "c" / "dialogs.jsonl"):
        assert [t["role"] for t in d["turns"]] == ["human", "ai"] * (len(d["turns"]) // 2)
        assert all(t["text"] and "[AI]" not in t["text"] for t in d["turns"])


def test_a_larger_limit_grows_the_shared_collection_and_asks_only_for_new_seeds(tmp_path: Path) -> None:
    """Runs sharing a collection: limit 3, then 6 (3 new requests), then 2 (none); each run's files hold exactly
    its own seeds, and a finished run's files do not change when the shared collection grows."""
    from baize_exp.pipeline import run_pipeline

    def run(name: str, limit: int) -> tuple[dict, int, Path]:
        cfg = _setup(
            tmp_path,
            "stages=[collect]",
            "logger=none",
            f"data.limit={limit}",
            "collect.shared=true",
            f"teacher.base_url={srv.base_url}",
            "teacher.api_key_env=BAIZE_TEST_KEY",
            f"paths.output_dir={tmp_path / name}",
        )
        n0 = srv.requests
        m = run_pipeline(cfg)["collect"]
        return m, srv.requests - n0, tmp_path / name / "collect"

    os.environ["BAIZE_TEST_KEY"] = SECRET
    try:
        with FaultServer(latency_s=0.0, api_key=SECRET) as srv:
            m3, sent3, c3 = run("a", 3)
            before = (c3 / "dialogs.jsonl").read_text()
            m6, sent6, c6 = run("b", 6)
            m2, sent2, c2 = run("c", 2)
    finally:
        del os.environ["BAIZE_TEST_KEY"]
    assert (sent3, sent6, sent2) == (3, 3, 0)
    assert m3["shared_dir"] == m6["shared_dir"] == m2["shared_dir"]
    seeds = {n: [d["seed"] for d in read_jsonl(c / "dialogs.jsonl")] for n, c in (("a", c3), ("b", c6), ("c", c2))}
    assert len(seeds["a"]) == m3["dialogs"] == 3 and len(seeds["b"]) == m6["dialogs"] == 6
    assert len(seeds["c"]) == m2["dialogs"] == 2
    assert set(seeds["c"]) < set(seeds["a"]) < set(seeds["b"])  # the seeds of a smaller limit come first
    assert (c3 / "dialogs.jsonl").read_text() == before
