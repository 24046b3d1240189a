"""Every error a user can cause, through the real run.py: one line naming the file, line or key and the fix, exit 2,
no traceback; a transient stop is one line with the command that resumes, exit 75; a refused command leaves a
finished run dir as it was."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers.cli import run_cli
from helpers.fault_server import FaultServer

pytestmark = pytest.mark.slow  # each case starts the real run.py (~10 s)

KEY = "sk-test-errors-0123456789abcdef"
NO_SERVER = [
    "teacher=openai",
    "teacher.base_url=http://127.0.0.1:9/v1",
    "teacher.api_key_env=BAIZE_TEST_KEY",
    "logger=none",
    "model=tiny",
]
DIALOG = {"turns": [{"role": "human", "text": "Why is the sky blue?"}, {"role": "ai", "text": "Scattering."}]}

# case -> (files to write, overrides ({dir} is the test's dir), what the one line must say)
CASES = {
    "seed file empty": ({"s.jsonl": b""}, ["data=file", "data.path={dir}/s.jsonl"], r"s.jsonl: no seeds"),
    "seed missing field": (
        {"s.jsonl": b'{"question": "a?"}\n{"title": "b?"}\n'},
        ["data=file", "data.path={dir}/s.jsonl"],
        r"s.jsonl:2: needs a non-empty string field",
    ),
    "seed not JSON": (
        {"s.jsonl": b'{"question": "a?"}\nb?\n'},
        ["data=file", "data.path={dir}/s.jsonl"],
        r"s.jsonl:2: not valid JSON",
    ),
    "seed csv no column": (
        {"s.csv": b"title\na?\n"},
        ["data=file", "data.path={dir}/s.csv"],
        r"s.csv:1: needs a 'question' .* column",
    ),
    "seed not UTF-8": (
        {"s.txt": "one?\ncaf\u00e9?\n".encode("latin-1")},
        ["data=file", "data.path={dir}/s.txt"],
        r"s.txt:2: not UTF-8 text \(byte 0xe9",
    ),
    "seed csv broken quote": (
        {"s.csv": b'question\n"a, b?\nc?\nd?\n'},
        ["data=file", "data.path={dir}/s.csv"],
        r"s.csv:2-\d: one CSV record runs over",
    ),
    "train.data torn line": (
        {"d.jsonl": (json.dumps(DIALOG) + '\n{"turns": [').encode()},
        ["stages=[train]", "train.data={dir}/d.jsonl"],
        r"d.jsonl:2: not valid JSON.*mid-line",
    ),
    "train.data unknown roles": (
        {
            "d.jsonl": json.dumps(
                {"turns": [{"role": "user", "text": "hi"}, {"role": "assistant", "text": "yo"}]}
            ).encode()
        },
        ["stages=[train]", "train.data={dir}/d.jsonl"],
        r"d.jsonl:1: turn 1 has role 'user'; roles are 'human' and 'ai'",
    ),
    "train.data no usable dialog": (
        {
            "d.jsonl": b"".join(
                json.dumps(x).encode() + b"\n"
                for x in (
                    {"turns": [{"role": "ai", "text": "Hello."}, {"role": "human", "text": "Hi."}]},
                    {"turns": [{"role": "human", "text": "  "}, {"role": "ai", "text": "What?"}]},
                    {"turns": []},
                )
            )
        },
        ["stages=[train]", "train.data={dir}/d.jsonl"],
        r"no usable dialog in .*d.jsonl: 3 record\(s\), all rejected \(ai_first: 1, empty_turn: 1, empty_dialog: 1\)",
    ),
    "model=7b without a path": (
        {"d.jsonl": json.dumps(DIALOG).encode()},
        ["stages=[train]", "train.data={dir}/d.jsonl", "model=7b"],
        r"model=llama_7b needs model.path=<local HF checkpoint dir>",
    ),
    "trainer=gpu without CUDA": (
        {"d.jsonl": json.dumps(DIALOG).encode()},
        ["stages=[train]", "train.data={dir}/d.jsonl", "trainer=gpu"],
        r"trainer.accelerator=gpu \(trainer=gpu\) but no CUDA GPU is visible",
    ),
    "a bad config value": (
        {},
        ["lora.r=0", "teacher.timeout_s=-1"],
        r"invalid config:.*lora.r=0.*teacher.timeout_s=-1",
    ),
    "a missing API key": (
        {},
        ["stages=[collect]", "teacher.api_key_env=BAIZE_UNSET_KEY_FOR_TEST"],
        r"needs an API key in the environment variable 'BAIZE_UNSET_KEY_FOR_TEST'",
    ),
}


def _one_line(r, status: int = 2) -> str:
    assert r.returncode == status, (r.returncode, r.stderr[-3000:])
    assert "Traceback" not in r.stderr and "Traceback" not in r.stdout, r.stderr[-3000:]
    (line,) = [ln for ln in r.stderr.splitlines() if ln.startswith("baize_exp:")]
    return line


@pytest.mark.parametrize("case", list(CASES))
def test_every_user_error_is_one_line_and_exit_2(tmp_path: Path, case: str) -> None:
    files, overrides, message = CASES[case]
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    args = [o.replace("{dir}", str(tmp_path)) for o in overrides]
    if not any(a.startswith("stages=") for a in args):
        args.append("stages=[collect]")
    r = run_cli(*NO_SERVER, *args, f"hydra.run.dir={tmp_path / 'run'}", env={"BAIZE_TEST_KEY": KEY}, timeout=300)
    line = _one_line(r)
    import re

    assert re.search(message, line), line
    assert KEY not in r.stderr + r.stdout


def test_collect_with_no_usable_dialog_names_the_reasons_and_what_to_change(tmp_path: Path) -> None:
    with FaultServer(api_key=KEY, default_fault="wrong_format") as srv:
        r = run_cli(
            *NO_SERVER,
            f"teacher.base_url={srv.base_url}",
            "stages=[collect]",
            "data.limit=3",
            f"hydra.run.dir={tmp_path / 'run'}",
            f"paths.cache_dir={tmp_path / 'cache'}",
            env={"BAIZE_TEST_KEY": KEY, "BAIZE_CACHE": ""},
            timeout=300,
        )
    line = _one_line(r)
    assert "no usable dialog out of 3 seeds (no_transcript: 3" in line and "a stronger teacher" in line


def test_an_outage_stops_early_with_the_resume_command_and_the_rerun_picks_up(tmp_path: Path) -> None:
    """Every request failing: the run stops after a bounded number of failures (not one per seed and retry), says
    what failed and which command resumes; that command, once the endpoint is back, asks only for what is
    unfinished and completes the stage in the same run dir."""
    run_dir = tmp_path / "run"
    with FaultServer(api_key=KEY, default_fault="500") as srv:
        args = [
            *NO_SERVER,
            f"teacher.base_url={srv.base_url}",
            "stages=[collect]",
            "data.limit=12",
            "teacher.max_retries=1",
            "teacher.backoff_base_s=0.01",
            "teacher.backoff_max_s=0.02",
            "teacher.stop_after_failures=5",
            "teacher.concurrency=2",
            f"hydra.run.dir={run_dir}",
            f"paths.cache_dir={tmp_path / 'cache'}",
        ]
        env = {"BAIZE_TEST_KEY": KEY, "BAIZE_CACHE": ""}
        r = run_cli(*args, env=env, timeout=300)
        line = _one_line(r, status=75)
        assert srv.requests <= 5 + 2  # the bound, plus what was in flight
        assert "the last 5 attempts all failed (http 500" in line and "endpoint looks down" in line
        assert f"resume with: python {Path('run.py').resolve()}" in line or "resume with: python " in line
        assert f"hydra.run.dir={run_dir}" in line
        metrics = json.loads((run_dir / "metrics.json").read_text())
        assert metrics["run"]["status"] == "interrupted" and not (run_dir / "collect" / "_COMPLETE.json").exists()

        srv.default_fault = "ok"  # the endpoint is back
        n = srv.requests
        r2 = run_cli(*args, env=env, timeout=300)
        assert r2.returncode == 0, r2.stderr[-3000:]
        assert srv.requests - n == 12  # each seed once: none had finished
    m = json.loads((run_dir / "metrics.json").read_text())
    assert m["run"]["status"] == "completed" and m["collect"]["dialogs"] == 12
    assert m["collect"]["seeds_that_failed_before"] >= 1


def test_a_refused_command_leaves_the_finished_run_dir_as_it_was(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    with FaultServer(api_key=KEY) as srv:
        args = [
            *NO_SERVER,
            f"teacher.base_url={srv.base_url}",
            "stages=[collect]",
            "data.limit=3",
            f"hydra.run.dir={run_dir}",
            f"paths.cache_dir={tmp_path / 'cache'}",
        ]
        env = {"BAIZE_TEST_KEY": KEY, "BAIZE_CACHE": ""}
        assert run_cli(*args, env=env, timeout=300).returncode == 0
        before = {p: p.read_bytes() for p in [run_dir / "metrics.json", *sorted((run_dir / ".hydra").iterdir())]}
        refused = run_cli(*args, "teacher.temperature=0.2", env=env, timeout=300)  # collect's config changed
        assert "completed with a different config" in _one_line(refused)
        invalid = run_cli(*args, "lora.r=0", env=env, timeout=300)
        assert "lora.r=0" in _one_line(invalid)
    after = {p: p.read_bytes() for p in before}
    assert after == before  # metrics.json and Hydra's record of the accepted command are untouched
    assert json.loads((run_dir / "metrics.json").read_text())["run"]["status"] == "completed"
