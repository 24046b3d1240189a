"""The Batch API runner through the real `openai` client against the loopback fake of Files and Batches
(tests/helpers/batch_server.py): whole runs, the per-batch limits, failed lines asked again, lost replies, kills
at each step.

Run as a script (`python tests/test_batch.py child ...`) it is the child process the kill tests SIGKILL."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path

import openai
import pytest
from helpers.batch_server import BatchServer
from helpers.config import compose_cfg
from helpers.fault_server import FaultServer

from baize_exp.chat import ChatError
from baize_exp.chat.ask import ask_parsed
from baize_exp.chat.batch import BatchRunner
from baize_exp.config import ConfigError, validate

KEY = "sk-test-batch-0123456789abcdef-never-logged"
MODEL = "gpt-4o-mini"


def _runner(srv: BatchServer, state: Path, **kw) -> BatchRunner:
    client = openai.OpenAI(base_url=srv.base_url, api_key=KEY, max_retries=0, timeout=30)
    kw = {"poll_s": 0.02, "poll_max_s": 0.2, "max_failures": 3, "progress": False, **kw}
    return BatchRunner(client, state, MODEL, defaults={"temperature": 0.7, "max_tokens": 64}, **kw)


def _requests(runner: BatchRunner, n: int, directives: dict[int, str] | None = None) -> list[tuple[str, dict]]:
    directives = directives or {}
    return [
        (f"q{i:03d}", runner.body([{"role": "user", "content": f"question {i}{directives.get(i, '')}"}]))
        for i in range(n)
    ]


def _answered(results: dict, ids: list[str]) -> bool:
    """Every id has the echo of its own question: a result mapped to the wrong custom_id fails this."""
    return all(results[i].error is None and results[i].text == f"echo: question {int(i[1:])}" for i in ids)


def test_a_whole_run_maps_every_result_back_and_a_rerun_sends_nothing(tmp_path: Path) -> None:
    prices = {MODEL: {"prompt": 0.15, "completion": 0.6}}
    with BatchServer(api_key=KEY, complete_s=0.2) as srv:
        runner = _runner(srv, tmp_path, prices=prices)
        reqs = _requests(runner, 30)
        results = runner.run(reqs)
        assert set(results) == {cid for cid, _ in reqs} and _answered(results, list(results))
        assert srv.submitted == Counter({cid: 1 for cid, _ in reqs}) and len(srv.order) == 1
        (state,) = [json.loads(p.read_text()) for p in tmp_path.glob("chunk-*.json")]
        assert state["state"] == "done" and state["batch_id"] == srv.order[0] and len(state["requests"]) == 30
        # what the fake received is what the online client would send
        (line,) = [json.loads(x) for x in srv.files[srv.batches[srv.order[0]]["input_file_id"]]["_data"].splitlines()][
            :1
        ]
        assert line["url"] == "/v1/chat/completions" and line["body"]["model"] == MODEL
        assert line["body"]["temperature"] == 0.7 and line["body"]["max_tokens"] == 64

        calls = dict(srv.calls)
        again = _runner(srv, tmp_path).run(reqs)  # another process: results from disk, no request sent
        assert dict(srv.calls) == calls
        assert {k: v.text for k, v in again.items()} == {k: v.text for k, v in results.items()}

    report = runner.usage_report()[MODEL]
    prompt = sum(r.usage["prompt_tokens"] for r in results.values())
    completion = sum(r.usage["completion_tokens"] for r in results.values())
    assert report["requests"] == 30 and report["prompt_tokens"] == prompt > 0
    assert report["cost_usd"] == pytest.approx((prompt * 0.15 + completion * 0.6) / 1e6 * 0.5)  # half price


def test_a_changed_body_under_the_same_custom_id_is_a_new_request(tmp_path: Path) -> None:
    with BatchServer(api_key=KEY) as srv:
        runner = _runner(srv, tmp_path)
        runner.run(_requests(runner, 3))
        changed = [(cid, {**body, "temperature": 0.1}) for cid, body in _requests(runner, 3)]
        runner.run(changed)
    assert len(srv.order) == 2 and set(srv.submitted.values()) == {2}


def test_the_per_batch_limits_split_the_work_into_several_batches(tmp_path: Path) -> None:
    with BatchServer(api_key=KEY, max_requests=4) as srv:
        runner = _runner(srv, tmp_path / "a", max_requests=4)
        results = runner.run(iter(_requests(runner, 10)))  # one pass over the requests: a generator will do
        assert _answered(results, list(results)) and len(results) == 10
        assert [srv.batches[b]["request_counts"]["total"] for b in srv.order] == [4, 4, 2]
    with BatchServer(api_key=KEY, max_requests=4) as srv:  # negative control: the same work, no split
        reqs = _requests(runner, 10)
        results = _runner(srv, tmp_path / "b").run(reqs)
        assert all(r.transient and "too_many_requests" in r.error for r in results.values())

    one = len(json.dumps({"custom_id": "q000", "method": "POST", "url": "/v1/chat/completions", "body": reqs[0][1]}))
    limit = 3 * (one + 2)  # three requests a file
    with BatchServer(api_key=KEY, max_bytes=limit) as srv:
        runner = _runner(srv, tmp_path / "c", max_bytes=limit)
        reqs = _requests(runner, 7, {5: " " + "x" * limit})  # one request bigger than a whole batch file
        results = runner.run(reqs)
        assert all(f["bytes"] <= limit for f in srv.files.values() if f["purpose"] == "batch")
        assert [srv.batches[b]["request_counts"]["total"] for b in srv.order] == [3, 3] and "q005" not in srv.submitted
        assert not results["q005"].transient and "batch_max_bytes" in results["q005"].error
        assert _answered(results, [c for c, _ in reqs if c != "q005"])
    too_large = "HTTP 400 uploading a batch file: File is too large.*batch_max_bytes"
    with BatchServer(api_key=KEY, max_bytes=limit) as srv, pytest.raises(ChatError, match=too_large):
        _runner(srv, tmp_path / "d").run(_requests(runner, 7))  # negative control: files over the endpoint's limit


def test_expired_and_failed_lines_are_asked_again_by_the_next_submission(tmp_path: Path) -> None:
    directives = {
        1: " [[batch:expirex1]]",
        2: " [[batch:500x1]]",
        3: " [[batch:429x1]]",
        4: " [[batch:no_choicesx1]]",
        5: " [[batch:too_long]]",
    }
    with BatchServer(api_key=KEY) as srv:
        runner = _runner(srv, tmp_path)
        reqs = _requests(runner, 8, directives)
        first = runner.run(reqs)
        transient = {c for c, r in first.items() if r.error and r.transient}
        assert transient == {"q001", "q002", "q003", "q004"}
        assert "batch_expired" in first["q001"].error and "http 500" in first["q002"].error
        assert not first["q005"].transient and "context_length_exceeded" in first["q005"].error  # a reject, final
        assert srv.batches[srv.order[0]]["status"] == "expired"
        second = runner.run(reqs)
    assert srv.submitted == Counter(
        {"q001": 2, "q002": 2, "q003": 2, "q004": 2, "q000": 1, "q005": 1, "q006": 1, "q007": 1}
    )
    assert _answered(second, [c for c, _ in reqs if c != "q005"])
    assert second["q005"].error == first["q005"].error


@pytest.mark.parametrize(
    "outcome, asked_again",
    [("failed", 4), ("expired", 2), ("cancelled", 2)],
)
def test_a_failed_expired_or_cancelled_batch_becomes_transient_failures(
    tmp_path: Path, outcome: str, asked_again: int
) -> None:
    with BatchServer(api_key=KEY, batch_outcomes={1: outcome}) as srv:
        runner = _runner(srv, tmp_path, max_requests=4)
        reqs = _requests(runner, 10)
        first = runner.run(reqs)
        failed = sorted(c for c, r in first.items() if r.error)
        assert all(first[c].transient for c in failed) and len(failed) == asked_again
        assert set(failed) <= {"q004", "q005", "q006", "q007"}  # the second batch's
        if outcome == "failed":
            assert "token_limit_exceeded" in first["q004"].error
        second = runner.run(reqs)
    assert _answered(second, list(second))
    assert sum(srv.submitted.values()) == 10 + (0 if outcome == "failed" else asked_again)
    assert sorted(c for c, n in srv.submitted.items() if n == 2) == ([] if outcome == "failed" else failed)


class _NoAdoption(BatchRunner):
    """A runner that never looks for a batch it may have created: the bug the lost-reply tests must catch."""

    def _find_batch(self, ch):  # noqa: ANN001
        return None


@pytest.mark.parametrize("runner_class", [BatchRunner, _NoAdoption])
def test_a_create_whose_reply_was_lost_is_found_not_created_twice(tmp_path: Path, runner_class: type) -> None:
    with BatchServer(api_key=KEY, lost_creates=1) as srv:
        runner = _runner(srv, tmp_path)
        runner.__class__ = runner_class
        results = runner.run(_requests(runner, 5))
    assert _answered(results, list(results))
    twice = len(srv.order) == 2 and set(srv.submitted.values()) == {2}
    assert twice == (runner_class is _NoAdoption)  # the control pays twice: the check can fail


def test_every_line_refused_for_the_settings_stops_the_run(tmp_path: Path) -> None:
    with BatchServer(api_key=KEY) as srv:
        runner = _runner(srv, tmp_path / "a")
        with pytest.raises(ChatError, match=r"every line of batch batch_\w+ was refused \(3; first: http 404.*model"):
            runner.run(_requests(runner, 3, {i: " [[batch:404]]" for i in range(3)}))
        # one refused line among answered ones is that request's failure only
        results = _runner(srv, tmp_path / "b").run(_requests(runner, 3, {1: " [[batch:404]]"}))
        assert results["q001"].transient and _answered(results, ["q000", "q002"])
        bad_key = openai.OpenAI(base_url=srv.base_url, api_key="sk-wrong-key-0123456789", max_retries=0)
        with pytest.raises(ChatError, match="HTTP 401 uploading a batch file") as e:
            BatchRunner(bad_key, tmp_path / "c", MODEL, progress=False).run(_requests(runner, 2))
    assert "sk-wrong-key-0123456789" not in str(e.value) and "\n" not in str(e.value)
    with FaultServer(api_key=KEY) as chat_only:  # a chat endpoint without Files and Batches (vLLM, our server)
        client = openai.OpenAI(base_url=chat_only.base_url, api_key=KEY, max_retries=0)
        with pytest.raises(ChatError, match=r"HTTP 404 uploading a batch file.*has no Files API.*teacher.batch=true"):
            BatchRunner(client, tmp_path / "d", MODEL, progress=False).run(_requests(runner, 2))


def test_polls_back_off_while_nothing_moves_and_the_bar_counts_requests(tmp_path: Path, capsys) -> None:
    with BatchServer(api_key=KEY, complete_s=1.5, report_progress=False) as srv:
        runner = _runner(srv, tmp_path, poll_s=0.02, poll_max_s=1.0, progress=True)
        runner.run(_requests(runner, 6))
        polls = srv.calls["GET /v1/batches/{id}"]
    # at a fixed 0.02 s, 1.5 s would take ~75 polls; growing 1.5x per poll without progress, about 10
    assert polls <= 15
    assert "6/6" in capsys.readouterr().err


def test_ask_parsed_runs_over_batches_one_round_each(tmp_path: Path) -> None:
    """SDF ranking and the judge use `ask_parsed`: a BatchRunner in place of the client gives one batch for the
    first replies and one for the retries of the ones that did not parse."""

    def reply(body: dict) -> str:
        text = body["messages"][-1]["content"]
        return "Score: 4" if "could not read" in text else "no idea" if "vague" in text else "Score: 8"

    def parse(res):  # noqa: ANN001, ANN202
        return (
            (int(res.text.split()[-1]), "ok", None) if res.text.startswith("Score:") else (None, "failed", "no score")
        )

    convs = [[{"role": "user", "content": f"rate answer {i}{' (vague)' if i % 2 else ''}"}] for i in range(6)]
    with BatchServer(api_key=KEY, reply=reply) as srv:
        runner = _runner(srv, tmp_path)
        answers = ask_parsed(runner, convs, parse, lambda err: f"I could not read a score ({err})", "judge")
        assert len(srv.order) == 2  # a round, then the retry round
        assert [a.value for a in answers] == [8, 4] * 3 and [a.how for a in answers] == ["ok", "retried"] * 3
        assert runner.complete_many(convs[:1]) and len(srv.order) == 2  # asked again: read from disk


def test_turn_by_turn_collection_submits_one_batch_per_round(tmp_path: Path) -> None:
    with BatchServer(api_key=KEY) as srv:
        runner = _runner(srv, tmp_path)
        dialogs = {f"d{i}": [{"role": "user", "content": f"seed {i}"}] for i in range(4)}
        for turn in range(3):
            reqs = [(f"{key}:{turn}", runner.body(msgs)) for key, msgs in dialogs.items()]
            results = runner.run(reqs)
            for key, msgs in dialogs.items():
                msgs += [
                    {"role": "assistant", "content": results[f"{key}:{turn}"].text},
                    {"role": "user", "content": "and?"},
                ]
    assert len(srv.order) == 3 and [srv.batches[b]["request_counts"]["total"] for b in srv.order] == [4, 4, 4]
    assert dialogs["d2"][1]["content"] == "echo: seed 2" and dialogs["d2"][3]["content"] == "echo: and?"


def test_from_config_takes_the_teacher_settings_and_the_key_from_the_environment(tmp_path: Path, monkeypatch) -> None:
    cfg = compose_cfg(
        [
            "teacher=openai",
            "teacher.batch=true",
            "teacher.batch_max_requests=2",
            "teacher.batch_poll_s=0.02",
            "teacher.api_key_env=BATCH_TEST_KEY",
        ]
    )
    validate(cfg)
    monkeypatch.delenv("BATCH_TEST_KEY", raising=False)
    with pytest.raises(
        ChatError, match="teacher.batch=true needs an API key in the environment variable 'BATCH_TEST_KEY'"
    ):
        BatchRunner.from_config(cfg.teacher, tmp_path)
    monkeypatch.setenv("BATCH_TEST_KEY", KEY)
    with BatchServer(api_key=KEY) as srv:
        runner = BatchRunner.from_config(cfg.teacher, tmp_path, base_url=srv.base_url)
        runner.progress = False
        assert KEY not in repr(runner)
        results = runner.run(_requests(runner, 5))
        (first,) = [json.loads(x) for x in srv.files[srv.batches[srv.order[0]]["input_file_id"]]["_data"].splitlines()][
            :1
        ]
    assert _answered(results, list(results)) and len(srv.order) == 3  # 2 + 2 + 1
    assert first["body"]["model"] == "gpt-3.5-turbo" and first["body"]["max_tokens"] == 1024  # conf/teacher/openai
    assert runner.usage_report()["gpt-3.5-turbo"]["cost_usd"] > 0  # priced from teacher.prices


# --- killed at each step ---------------------------------------------------------------------------------------

KILL_POINTS = ["upload", "create", "poll", "download", "return"]


def _child(argv: list[str]) -> None:
    """The child process: run 12 requests through a runner, SIGKILLed at `point` (or never)."""
    base_url, state, out, point, adopt = argv

    def die() -> None:
        os.kill(os.getpid(), signal.SIGKILL)

    def after(cls: type, name: str) -> None:  # kill right after `cls.name` returns (its effect done)
        original = getattr(cls, name)

        def patched(*a, **k):  # noqa: ANN002, ANN003, ANN202
            result = original(*a, **k)
            die()
            return result

        setattr(cls, name, patched)

    from openai.resources.batches import Batches
    from openai.resources.files import Files

    if point == "upload":
        after(Files, "create")  # the file is uploaded, its id not yet recorded
    elif point == "create":
        after(Batches, "create")  # the batch exists, its id not yet recorded
    elif point == "poll":
        after(Batches, "retrieve")  # recorded and in progress
    elif point == "download":
        save = BatchRunner._save

        def save_then_die(self, ch):  # noqa: ANN001, ANN202
            if ch.state == "done":  # the files are on disk, the state does not say so yet
                die()
            save(self, ch)

        BatchRunner._save = save_then_die
    client = openai.OpenAI(base_url=base_url, api_key=os.environ["BATCH_TEST_KEY"], max_retries=0, timeout=30)
    cls = BatchRunner if adopt == "adopt" else _NoAdoption
    runner = cls(client, state, MODEL, poll_s=0.05, poll_max_s=0.2, progress=False)
    results = runner.run(_requests(runner, 12))
    if point == "return":  # the caller had not written them yet
        die()
    Path(out).write_text(json.dumps({k: [r.text, r.error] for k, r in results.items()}))


def _run_child(srv: BatchServer, tmp_path: Path, point: str, adopt: str = "adopt") -> subprocess.CompletedProcess:
    return subprocess.run(
        [
            sys.executable,
            __file__,
            "child",
            srv.base_url,
            str(tmp_path / "state"),
            str(tmp_path / "out.json"),
            point,
            adopt,
        ],
        env={**os.environ, "BATCH_TEST_KEY": KEY},
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.mark.parametrize("point", KILL_POINTS)
def test_a_kill_at_any_step_resumes_without_paying_twice_or_losing_a_result(tmp_path: Path, point: str) -> None:
    with BatchServer(api_key=KEY, complete_s=0.5) as srv:
        killed = _run_child(srv, tmp_path, point)
        assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
        uploads = srv.calls["POST /v1/files"]
        rerun = _run_child(srv, tmp_path, "never")
        assert rerun.returncode == 0, rerun.stderr[-2000:]
        results = json.loads((tmp_path / "out.json").read_text())
        assert len(results) == 12 and all(
            text == f"echo: question {int(cid[1:])}" and err is None for cid, (text, err) in results.items()
        )
        assert srv.submitted == Counter({f"q{i:03d}": 1 for i in range(12)})  # each request in one batch only
        assert len(srv.order) == 1
        # a rerun after the batch was recorded polls it: nothing uploaded again
        assert srv.calls["POST /v1/files"] == uploads + (1 if point == "upload" else 0)
        assert not list((tmp_path / "state").glob("*.tmp"))


def test_the_kill_check_catches_a_runner_that_creates_again(tmp_path: Path) -> None:
    """Negative control for the kill test: a rerun that does not look for the batch its killed run created
    submits every request twice, which the assertion on `srv.submitted` above would catch."""
    with BatchServer(api_key=KEY, complete_s=0.5) as srv:
        assert _run_child(srv, tmp_path, "create", "no-adopt").returncode == -signal.SIGKILL
        assert _run_child(srv, tmp_path, "never", "no-adopt").returncode == 0
    assert len(srv.order) == 2 and set(srv.submitted.values()) == {2}


def test_batch_settings_are_validated_before_any_work() -> None:
    with pytest.raises(ConfigError) as e:
        validate(
            compose_cfg(
                [
                    "teacher.batch=true",  # the local server has no Batch API
                    "teacher.batch_max_requests=60000",
                    "teacher.batch_max_bytes=10",
                    "teacher.batch_poll_s=0",
                    "teacher.batch_discount=1.5",
                    "judge.max_cost_usd=-1",
                ]
            )
        )
    for key in ("batch", "batch_max_requests", "batch_max_bytes", "batch_poll_s", "batch_discount"):
        assert f"teacher.{key}=" in str(e.value)
    assert "judge.max_cost_usd=-1" in str(e.value)
    with pytest.raises(ConfigError, match=r"add teacher.prices.gpt-5="):  # a limit without a price
        validate(compose_cfg(["teacher=openai", "teacher.model=gpt-5", "teacher.max_cost_usd=3"]))
    validate(compose_cfg(["teacher=openai", "teacher.batch=true", "teacher.max_cost_usd=5", "judge=openai"]))


if __name__ == "__main__" and sys.argv[1:2] == ["child"]:
    _child(sys.argv[2:])
