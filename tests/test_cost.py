"""The collect cost estimate and the spending guard (baize_exp.chat.cost): token counts against real servers'
usage, the requests the collect stage really sends, the refinement from finished dialogs, and the 20% criterion on
a loopback collection (the 1,000-seed run through run.py is benchmarks/cost_estimate.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers.batch_server import BatchServer, realistic_reply
from helpers.config import compose_cfg
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
