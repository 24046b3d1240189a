"""The collect cost estimate and the spending guard (baize_exp.chat.cost): token counts against real servers'
usage, the requests the collect stage really sends, the refinement from finished dialogs, and the 20% criterion on
a loopback collection (the 1,000-seed run through run.py is benchmarks/cost_estimate.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers.batch_server import BatchServer, realistic_reply
from helpers.config import ROOT, compose_cfg
from helpers.fault_server import FaultServer

from baize_exp.chat import ChatClient
from baize_exp.chat.cost import (
    Budget,
    BudgetReached,
    TokenCounter,
    collect_requests,
    estimate_collection,
    spent_usd,
    usd,
)
from baize_exp.data import Seed, load_seeds
from baize_exp.errors import UserError
from baize_exp.io import read_jsonl
from baize_exp.stages.collect import collect

KEY = "sk-test-cost-0123456789abcdef-never-logged"
PRICE = {"prompt": 0.5, "completion": 1.5}  # conf/teacher/openai.yaml's gpt-3.5-turbo


def _cfg(*overrides: str):
    return compose_cfg(["teacher=openai", "teacher.backoff_base_s=0.01", "teacher.concurrency=8", *overrides])


# --- counting ----------------------------------------------------------------------------------------------------


def test_token_counts_with_the_teachers_tokenizer_are_the_local_servers_usage(tokenizer) -> None:
    from helpers.recording_server import recording_server

    cfg = _cfg("collect=turns", "collect.max_turns=4")
    requests = collect_requests("How do I keep basil alive?", cfg.collect, ["Sun and water.", "And in winter?"])
    requests += collect_requests("How do I keep basil alive?", _cfg().collect)
    counter = TokenCounter(tokenizer)
    with recording_server("tiny") as rec:
        client = rec.client(max_tokens=1, temperature=0.0)
        usage = [r.usage["prompt_tokens"] for r in client.complete_many(requests)]
    assert usage == [counter.prompt(m) for m in requests] and min(usage) > 20
    # negative controls: the character rule, or the text without the chat template, miss the server's count
    assert usage != [TokenCounter().prompt(m) for m in requests]
    assert usage != [sum(counter.text(x["content"]) for x in m) for m in requests]


def test_a_turn_filler_is_as_many_tokens_as_asked(tokenizer) -> None:
    for counter in (TokenCounter(tokenizer), TokenCounter()):
        assert counter.text(counter.filler(500)) == pytest.approx(500, abs=5)


def test_seeds_over_max_seed_tokens_are_counted_in_the_teachers_tokens_when_local(tokenizer) -> None:
    cfg = _cfg()  # collect.max_seed_tokens=1024
    seeds = ["hello " * 700, "hello " * 1100]  # 4,200 characters but 700 tokens; 1,100 tokens
    assert estimate_collection(seeds, cfg.collect, cfg.teacher, tokenizer=tokenizer).too_long == 1
    assert estimate_collection(seeds, cfg.collect, cfg.teacher).too_long == 2  # remote: 4 characters a token


def test_the_modelled_requests_are_the_ones_the_collect_stage_sends(tmp_path: Path) -> None:
    """collect_requests must follow collect.py: if the stage changes what it sends, this fails."""
    seeds = [Seed(f"s{i}", "test", f"How do I repair bicycle part {i}?") for i in range(3)]
    for mode in ("transcript", "turns"):
        cfg = _cfg(f"collect={mode}", "collect.max_turns=4", "collect.quality.enabled=false")
        with FaultServer(api_key=KEY) as srv:
            client = ChatClient.from_config(cfg.teacher, base_url=srv.base_url, api_key=KEY)
            collect(seeds, client, cfg.collect, cfg.teacher, tmp_path / mode)
            sent = sorted(str(body["messages"]) for _, body in srv.received)
        dialogs = read_jsonl(tmp_path / mode / "dialogs.jsonl")
        assert len(dialogs) == 3
        modelled = [
            m for d in dialogs for m in collect_requests(d["seed"], cfg.collect, [t["text"] for t in d["turns"][1:]])
        ]
        assert sorted(str(m) for m in modelled) == sent and len(sent) == (3 if mode == "transcript" else 9)


# --- the estimate ------------------------------------------------------------------------------------------------


def test_without_finished_dialogs_every_request_counts_at_its_upper_bound() -> None:
    cfg = _cfg("teacher.max_tokens=100")
    seeds = ["a" * 40, "b" * 80]
    est = estimate_collection([*seeds, "c" * 4097], cfg.collect, cfg.teacher)  # over max_seed_tokens=1024: no request
    assert est.too_long == 1 and "1 over collect.max_seed_tokens get no request" in est.lines()[0]
    by_rule = [round(len(cfg.collect.template.format(seed=s)) / 4) + 3 + 3 for s in seeds]
    assert (est.seeds, est.done, est.requests, est.requests_max) == (2, 0, 2, 2)
    assert est.prompt_tokens == est.prompt_tokens_max == sum(by_rule)
    assert est.completion_tokens == est.completion_tokens_max == 200
    assert est.usd() == pytest.approx(usd(sum(by_rule), 200, PRICE))
    assert est.usd(batch=True) == pytest.approx(est.usd() / 2)
    assert "upper bound" in est.completion_basis

    turns = _cfg("collect=turns", "collect.max_turns=6", "teacher.max_tokens=100")
    est = estimate_collection(seeds, turns.collect, turns.teacher)
    assert est.requests_max == 10 and est.completion_tokens_max == 1000  # 5 generated turns a seed
    # every earlier turn 100 tokens long: the last AI request alone carries 4 of them
    assert est.prompt_tokens > 2 * (4 * 100 + 3 * 5)


def test_finished_dialogs_refine_the_estimate() -> None:
    cfg = _cfg("teacher.max_tokens=100")
    seeds = [f"question number {i:04d}" for i in range(50)]
    rule = TokenCounter().prompt([{"role": "user", "content": cfg.collect.template.format(seed=seeds[0])}])
    finished = [
        {
            "key": f"k{i}",
            "seed": s,
            "mode": "transcript",
            "requests": 1,
            "usage": {"prompt_tokens": 2 * rule, "completion_tokens": 40},
        }
        for i, s in enumerate(seeds[:10])
    ]
    finished.append({"key": "long", "seed": "x", "mode": "transcript", "reason": "too_long", "requests": 0})
    est = estimate_collection(seeds[10:], cfg.collect, cfg.teacher, finished=finished)
    assert est.done == 11 and est.seeds == est.requests == 40
    assert est.prompt_tokens == 40 * 2 * rule and "x2.00 as measured on 10 finished" in est.prompt_basis
    assert est.completion_tokens == 40 * 40 and est.completion_tokens_max == 40 * 100
    assert est.usd(worst=True) > est.usd() and est.as_dict()["usd_batch"] == pytest.approx(est.usd() / 2)
    lines = est.lines()
    assert "40 seeds to collect (11 done)" in lines[0] and any("USD batch" in x for x in lines)


def test_the_estimate_is_within_20_percent_of_a_loopback_collection(tmp_path: Path, tokenizer) -> None:
    """A smaller twin of benchmarks/cost_estimate.py, in process: 20 seeds collected, the other 60 estimated from
    them, then collected; the teacher's usage is counted with the real SmolLM2 tokenizer, which the estimator
    (a remote teacher: 4 characters a token) does not know."""
    cfg = _cfg("data=quora", "data.limit=80")
    seeds = load_seeds(cfg.data)
    out = tmp_path / "c"

    def count_prompt(messages: list[dict]) -> int:
        return len(
            tokenizer(tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)).input_ids
        )

    def count_text(text: str) -> int:
        return len(tokenizer(text, add_special_tokens=False).input_ids)

    with BatchServer(api_key=KEY, reply=realistic_reply, count_prompt=count_prompt, count_text=count_text) as srv:
        client = ChatClient.from_config(cfg.teacher, base_url=srv.base_url, api_key=KEY)
        collect(seeds[:20], client, cfg.collect, cfg.teacher, out)
        first = read_jsonl(out / "dialogs.jsonl") + read_jsonl(out / "rejects.jsonl")
        cold = estimate_collection([s.question for s in seeds[20:]], cfg.collect, cfg.teacher)
        est = estimate_collection([s.question for s in seeds[20:]], cfg.collect, cfg.teacher, finished=first)
        collect(
            seeds,
            ChatClient.from_config(cfg.teacher, base_url=srv.base_url, api_key=KEY),
            cfg.collect,
            cfg.teacher,
            out,
        )
    rest = [r for r in read_jsonl(out / "dialogs.jsonl") + read_jsonl(out / "rejects.jsonl") if r not in first]
    assert len(first) == 20 and len(rest) == 60
    actual = {k: sum(r["usage"][k] for r in rest) for k in ("prompt_tokens", "completion_tokens")}
    assert est.requests == sum(r["requests"] for r in rest) == 60
    for k, v in actual.items():
        assert getattr(est, k) == pytest.approx(v, rel=0.2), k
    total = sum(actual.values())
    assert est.prompt_tokens + est.completion_tokens == pytest.approx(total, rel=0.2)
    # negative control: the cold estimate (no dialogs yet) is an upper bound, far from the real total
    assert cold.prompt_tokens + cold.completion_tokens > 1.5 * total


# --- the budget --------------------------------------------------------------------------------------------------


def test_the_budget_stops_before_the_limit_with_one_line_saying_how_far_it_got() -> None:
    limit = 0.0105
    outcomes = {}
    for max_usd in (limit, None):  # None: the negative control, which never stops
        budget = Budget(max_usd, {"prompt": 1.0, "completion": 2.0}, spent_usd=0.001)
        done = 0
        for _ in range(100):
            held = budget.reserve(1000, 1000)  # at most $0.003 each: prompt $0.001 + max completion $0.002
            if held is None:
                break
            budget.settle(held, {"prompt_tokens": 1000, "completion_tokens": 500})  # $0.002 spent
            done += 1
        outcomes[max_usd] = (done, budget.spent_usd)
    done, spent = outcomes[limit]
    assert spent <= limit < spent + 0.003 and done == 4  # 0.001 + 4 x 0.002 = 0.009; a 5th could reach 0.012
    assert outcomes[None][0] == 100
    budget = Budget(limit, {"prompt": 1.0, "completion": 2.0}, spent_usd=0.001)
    for _ in range(4):
        budget.settle(budget.reserve(1000, 1000), {"prompt_tokens": 1000, "completion_tokens": 500})
    assert budget.reserve(1000, 1000) is None
    err = budget.exceeded("4 of 100 seeds done")
    assert isinstance(err, BudgetReached) and isinstance(err, UserError)
    line = str(err)
    assert "\n" not in line and line.startswith("teacher.max_cost_usd=0.0105 reached: $0.0090 spent")
    assert "($0.0010 of it by earlier runs)" in line and "4 requests in this run" in line
    assert "up to $0.0030" in line and "4 of 100 seeds done" in line and "Raise teacher.max_cost_usd" in line


def test_requests_in_flight_are_held_at_their_worst_case() -> None:
    budget = Budget(0.01, {"prompt": 1.0, "completion": 2.0})
    held = [budget.reserve(1000, 1000) for _ in range(5)]  # concurrent: none settled yet
    assert held.count(None) == 2 and budget.reserved_usd == pytest.approx(0.009)
    for h in held[:3]:
        budget.settle(h, {"prompt_tokens": 1000, "completion_tokens": 0})  # replies shorter than their worst case
    assert budget.spent_usd == pytest.approx(0.003) and budget.reserved_usd == pytest.approx(0)
    assert budget.fit([(1000, 1000)] * 10) == 2  # a batch: as many as fit, reserved together


def test_earlier_spend_counts_batch_records_at_the_discount() -> None:
    records = [
        {"usage": {"prompt_tokens": 1_000_000, "completion_tokens": 0}},
        {"usage": {"prompt_tokens": 1_000_000, "completion_tokens": 0}, "batch": True},
        {"reason": "too_long", "requests": 0},
    ]
    assert spent_usd(records, PRICE, discount=0.5) == pytest.approx(0.5 + 0.25)
    assert spent_usd(records, None) is None
    budget = Budget(1.0, PRICE, spent_usd=spent_usd(records, PRICE))
    assert budget.reserve(0, 100_000) is not None and budget.reserve(0, 100_000) is None  # 0.9, then 1.05 > 1
    with pytest.raises(UserError, match="teacher.max_cost_usd=1.0 needs a price"):
        Budget(1.0, None)


# --- through baize-collect: the estimate, the budget, the rerun with a higher one --------------------------------


def _baize_collect(*args: str, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", "from baize_exp.cli import collect; collect()", *args],
        capture_output=True,
        text=True,
        env={**os.environ, **env},
        cwd=ROOT,
        timeout=300,
    )


@pytest.mark.slow
def test_estimate_sends_nothing_the_budget_stops_with_one_line_and_a_higher_one_finishes(tmp_path: Path) -> None:
    seeds_file = tmp_path / "seeds.txt"
    seeds_file.write_text("".join(f"How do I look after garden plant number {i}?\n" for i in range(30)))
    run_dir, cache = tmp_path / "run", tmp_path / "cache"
    env = {"BAIZE_COST_KEY": KEY, "BAIZE_CACHE": str(cache)}
    with FaultServer(api_key=KEY, reply=realistic_reply) as srv:
        common = [
            "teacher=openai",
            f"teacher.base_url={srv.base_url}",
            "teacher.api_key_env=BAIZE_COST_KEY",
            "teacher.concurrency=2",
            "data=file",
            f"data.path={seeds_file}",
            "logger=none",
            f"hydra.run.dir={run_dir}",
        ]
        cold = _baize_collect(*common, "--estimate", env=env)
        assert cold.returncode == 0, cold.stderr[-2000:]
        assert srv.requests == 0 and not run_dir.exists() and not cache.exists()  # nothing sent, nothing written
        assert "estimate for 30 seeds to collect (0 done)" in cold.stdout and "USD batch" in cold.stdout

        stopped = _baize_collect(*common, "teacher.max_cost_usd=0.008", env=env)
        assert stopped.returncode == 2, stopped.stderr[-2000:]
        (line,) = [x for x in stopped.stderr.splitlines() if "max_cost_usd" in x]
        assert line == stopped.stderr.strip().splitlines()[-1] and "Traceback" not in stopped.stderr
        assert line.startswith("baize-collect: teacher.max_cost_usd=0.008 reached") and "of 30 seeds are done" in line
        assert "run the same command again" in line
        (shared,) = (cache / "collect").iterdir()
        first = read_jsonl(shared / "dialogs.jsonl") + read_jsonl(shared / "rejects.jsonl")
        spent = spent_usd(first + read_jsonl(shared / "failures.jsonl"), PRICE)
        assert 0 < len(first) < 30 and spent <= 0.008  # stopped before passing the limit
        assert f"{len(first)} of 30 seeds are done" in line

        warm = _baize_collect(*common, "--estimate", env=env)
        assert warm.returncode == 0 and f"({len(first)} done)" in warm.stdout
        assert f"as measured on {len(first)} finished dialogs" in warm.stdout

        asked = srv.requests
        done = _baize_collect(*common, "teacher.max_cost_usd=1", env=env)
        assert done.returncode == 0, done.stderr[-2000:]
        assert srv.requests - asked == 30 - len(first)  # only the seeds left: nothing finished was lost
    card = json.loads((run_dir / "collect" / "data_card.json").read_text())
    everything = [*read_jsonl(shared / "dialogs.jsonl"), *read_jsonl(shared / "rejects.jsonl")]
    assert len(everything) == 30 and card["spent"]["requests"] == srv.requests
    assert card["spent"]["cost_usd"] == pytest.approx(spent_usd(everything, PRICE), abs=1e-6)
    # negative control: without the limit the first run would have gone past $0.008
    assert card["spent"]["cost_usd"] > 0.008


def test_over_batches_only_the_requests_that_fit_the_budget_are_submitted(tmp_path: Path) -> None:
    from baize_exp.chat.batch import BatchRunner
    from baize_exp.chat.cost import price_of

    cfg = _cfg("teacher.batch=true", "teacher.batch_poll_s=0.02", "teacher.batch_poll_max_s=0.1")
    seeds = [Seed(f"s{i}", "test", f"How do I look after garden plant number {i}?") for i in range(10)]
    counter = TokenCounter()
    one = usd(
        counter.prompt([{"role": "user", "content": cfg.collect.template.format(seed=seeds[0].question)}]),
        cfg.teacher.max_tokens,
        price_of(cfg.teacher),
        0.5,
    )
    limit = round(4.5 * one, 6)  # four requests' worst case at the batch price, not five
    out = tmp_path / "c"
    with BatchServer(api_key=KEY, reply=realistic_reply) as srv:

        def runner() -> BatchRunner:
            r = BatchRunner.from_config(cfg.teacher, out / "batches", base_url=srv.base_url, api_key=KEY)
            r.progress = False
            return r

        cfg.teacher.max_cost_usd = limit
        with pytest.raises(BudgetReached, match=r"teacher.max_cost_usd=.* reached.* 4 of 10 seeds are done"):
            collect(seeds, runner(), cfg.collect, cfg.teacher, out)
        assert sum(srv.submitted.values()) == 4  # the batch held only what fits
        first = read_jsonl(out / "dialogs.jsonl") + read_jsonl(out / "rejects.jsonl")
        assert len(first) == 4 and all(r["batch"] for r in first)
        cfg.teacher.max_cost_usd = None
        m = collect(seeds, runner(), cfg.collect, cfg.teacher, out)
    assert m["dialogs"] + m["rejects"] == 10 and set(srv.submitted.values()) == {1}  # the rest, once each


def test_a_budget_that_refuses_a_round_sends_none_of_it_and_one_that_refuses_the_retries_keeps_the_replies() -> None:
    from baize_exp.chat.ask import ask_parsed
    from baize_exp.chat.cost import Budgeted

    def parse(res):  # noqa: ANN001, ANN202
        return (7, "ok", None) if res.text.startswith("Score") else (None, "failed", "no score")

    convs = [[{"role": "user", "content": f"rate {i}{' vague' if i % 2 else ''}"}] for i in range(4)]
    long = " and so on" * 300  # 900 words: the first round spends most of what it reserved
    reply = lambda body: ("unsure" if "vague" in body["messages"][0]["content"] else "Score: 7") + long  # noqa: E731
    with FaultServer(api_key=KEY, reply=reply) as srv:
        client = ChatClient(srv.base_url, KEY, "gpt-3.5-turbo", max_tokens=1000)
        tight = Budgeted(client, Budget(0.001, PRICE, role="judge"))  # 4 x 1000 completion tokens: $0.006 > $0.001
        with pytest.raises(BudgetReached, match=r"judge.max_cost_usd=0.001 reached.*4 requests \(judge\) were not"):
            ask_parsed(tight, convs, parse, lambda e: "give a score", "judge")
        assert srv.requests == 0
        # the first round's worst case is $0.006 and it spends ~$0.0054; the retries' $0.003 more would pass $0.0065
        enough_for_one_round = Budgeted(client, Budget(0.0065, PRICE, role="judge"))
        answers = ask_parsed(enough_for_one_round, convs, parse, lambda e: "give a score", "judge")
        assert srv.requests == 4  # the first round; the retries' round did not fit
    assert [a.value for a in answers] == [7, None, 7, None] and answers[0].reply.startswith("Score: 7")
    assert all("judge.max_cost_usd" in a.failed for a in answers[1::2])  # asked again by a rerun


def test_the_estimate_of_a_killed_collection_reads_it_without_touching_it(tmp_path: Path) -> None:
    """`stages.collect.estimate` (what `--estimate` prints) on a collection whose last line a kill tore: the seeds
    done are counted, the torn line is ignored, and the file is left as it was (an estimate writes nothing)."""
    from baize_exp.stages import collect as collect_stage

    seeds_file = tmp_path / "seeds.txt"
    seeds_file.write_text("".join(f"How do I look after garden plant number {i}?\n" for i in range(12)))
    cfg = _cfg("data=file", f"data.path={seeds_file}", "collect.shared=false")
    run_dir = tmp_path / "run"
    teacher_dir = run_dir / "collect" / "teacher"
    seeds = load_seeds(cfg.data)
    with FaultServer(api_key=KEY, reply=realistic_reply) as srv:
        collect(
            seeds[:5], ChatClient.from_config(cfg.teacher, srv.base_url, KEY), cfg.collect, cfg.teacher, teacher_dir
        )
    with open(teacher_dir / "dialogs.jsonl", "ab") as f:
        f.write(b'{"id": "torn')
    before = (teacher_dir / "dialogs.jsonl").read_bytes()
    est = collect_stage.estimate(cfg, run_dir)
    assert (est.done, est.seeds) == (5, 7) and "as measured on 5 finished" in est.prompt_basis
    assert (teacher_dir / "dialogs.jsonl").read_bytes() == before
    with pytest.raises(UserError, match=r"dialogs.jsonl:\d+: not valid JSON .*ends mid-line"):  # a reader that may
        read_jsonl(teacher_dir / "dialogs.jsonl")  # not skip it says so: the torn line is really there
