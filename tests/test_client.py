"""ChatClient against the project's fault-injecting server on 127.0.0.1: every fault, counted at the server."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from helpers.fault_server import FAULTS, FaultServer

from baize_exp.chat import ChatClient, ChatError
from baize_exp.chat.client import RateLimiter, retry_after_s

KEY = "sk-test-fault-0123456789-never-logged"


@pytest.fixture
def server():
    with FaultServer(latency_s=0.01, api_key=KEY, retry_after_s=0.3, hang_s=30) as s:
        yield s


def _client(srv: FaultServer, **kw) -> ChatClient:
    kw = {"max_retries": 2, "timeout_s": 0.5, "backoff_base_s": 0.02, "backoff_max_s": 0.1, **kw}
    return ChatClient(srv.base_url, KEY, "fault-model", **kw)


def _ask(fault: str) -> list[dict]:
    return [{"role": "user", "content": f"write a transcript about tea [[fault:{fault}]]"}]


# fault directive -> (attempts the client makes, whether the result is an error) with max_retries=2
RECOVERABLE = {
    "ok": (1, False),
    "429x2": (3, False),
    "500x1": (2, False),
    "hangx1": (2, False),
    "malformedx1": (2, False),
    "empty_choicesx2": (3, False),
    "500": (3, True),
    "malformed": (3, True),
    "empty_choices": (3, True),
    "hang": (3, True),
    "429": (3, True),
}


@pytest.mark.parametrize("fault", list(RECOVERABLE))
def test_retryable_faults_are_retried_then_recorded(server: FaultServer, fault: str) -> None:
    c = _client(server)
    r = c.complete(_ask(fault))
    attempts, failed = RECOVERABLE[fault]
    assert server.requests == attempts == r.attempts == c.requests
    assert c.retries == attempts - 1
    assert (r.error is not None) == failed
    if failed:
        assert f"gave up after {attempts} attempts" in r.error and KEY not in r.error
    else:
        assert "[Human]" in r.text and r.finish_reasons == ["stop"]


def test_retry_after_is_honoured_and_pauses_every_request(server: FaultServer) -> None:
    c = _client(server, concurrency=4)
    t0 = time.monotonic()
    (r,) = c.complete_many([_ask("429x2")])
    assert r.error is None and r.attempts == 3 == server.requests
    assert time.monotonic() - t0 >= 2 * 0.3  # two Retry-After waits of 0.3 s, not the 0.02 s backoff

    async def other_request_after_a_429() -> float:
        async with c.session():
            first = asyncio.ensure_future(c.acomplete(_ask("429x1")))
            await asyncio.sleep(0.1)  # its 429 (Retry-After 0.3 s) is back by now
            t = time.monotonic()
            await c.acomplete([{"role": "user", "content": "an unrelated request"}])
            waited = time.monotonic() - t
            assert (await first).error is None
            return waited

    assert asyncio.run(other_request_after_a_429()) >= 0.15  # it waited out the pause (alone it takes ~0.01 s)


@pytest.mark.parametrize("fault", ["400", "401", "403"])
def test_refused_requests_stop_the_run_at_once(server: FaultServer, fault: str) -> None:
    c = _client(server, concurrency=1)
    convs = [_ask(fault)] + [[{"role": "user", "content": f"q{i}"}] for i in range(20)]
    with pytest.raises(ChatError, match=f"HTTP {fault}.*Nothing was retried") as e:
        c.complete_many(convs)
    assert KEY not in str(e.value)
    assert server.requests == 1  # no retry, and the 20 queued requests were never sent


def test_wrong_key_with_many_in_flight_is_no_retry_storm(server: FaultServer) -> None:
    bad = ChatClient(server.base_url, "sk-wrong-key-abcdef123456", "fault-model", concurrency=4, max_retries=5)
    with pytest.raises(ChatError, match="refused the API key") as e:
        bad.complete_many([[{"role": "user", "content": f"q{i}"}] for i in range(50)])
    assert "sk-wrong-key-abcdef123456" not in str(e.value)
    assert server.requests == 1  # the first request goes alone; the other 49 were never sent
    assert server.faults["401"] == 1


def test_the_first_request_goes_alone_then_the_rest_fan_out() -> None:
    """Read from when the requests arrive at the server (1 s each), not from wall times a busy machine stretches."""
    with FaultServer(latency_s=1.0) as srv:
        rs = ChatClient(srv.base_url, "k", "m", concurrency=16).complete_many(
            [[{"role": "user", "content": f"q{i}"}] for i in range(17)]
        )
        probed = list(srv.arrivals)
        ChatClient(srv.base_url, "k", "m", concurrency=16, probe_first=False).complete_many(
            [[{"role": "user", "content": f"q{i}"}] for i in range(16)]
        )
        fanned = srv.arrivals[len(probed) :]
    assert all(not r.error for r in rs)
    assert min(probed[1:]) - probed[0] >= 0.95  # the others waited for the first one's answer
    assert max(probed[1:]) - min(probed[1:]) < 0.95  # then went together
    assert max(fanned) - min(fanned) < 0.95  # the run's own server: all at once


def test_a_400_about_one_request_is_that_requests_error_not_the_runs() -> None:
    """context_length_exceeded concerns one prompt; any 400 after a success concerns one request; a plain 400
    before anything succeeded would hit every request (bad model name, bad sampling): that one stops the run."""
    with FaultServer() as srv:
        c = ChatClient(srv.base_url, "k", "m", concurrency=4, max_retries=3)
        rs = c.complete_many(
            [
                [{"role": "user", "content": "q [[fault:too_long]]"}],
                [{"role": "user", "content": "fine"}],
                [{"role": "user", "content": "q [[fault:400]]"}],
            ]
        )
        assert [bool(r.error) for r in rs] == [True, False, True] and not any(r.transient for r in rs)
        assert "maximum context length" in rs[0].error and "http 400" in rs[2].error
        assert srv.requests == 3  # no retry of a 400
        with pytest.raises(ChatError, match="HTTP 400"):
            ChatClient(srv.base_url, "k", "m").complete([{"role": "user", "content": "q [[fault:400]]"}])


def test_an_outage_stops_after_a_bounded_number_of_failures() -> None:
    """Every request failing the same transient way: stop after stop_after_failures attempts, not after every
    request has spent its retries; what is left comes back as transient errors, with the cause."""
    from baize_exp.chat.client import ChatOutage
    from baize_exp.errors import Interrupted

    with FaultServer(default_fault="500") as srv:
        c = ChatClient(
            srv.base_url,
            "k",
            "m",
            concurrency=4,
            max_retries=5,
            backoff_base_s=0.01,
            backoff_max_s=0.02,
            stop_after_failures=10,
        )
        rs = c.complete_many([[{"role": "user", "content": f"q{i}"}] for i in range(100)])
        assert 10 <= srv.requests <= 10 + 4  # the bound, plus what was in flight when it tripped
    assert all(r.error and r.transient for r in rs)
    assert sum("endpoint looks down" in r.error for r in rs) >= 90 and "http 500" in rs[-1].error
    assert issubclass(ChatOutage, Interrupted)
    with FaultServer(default_fault="500") as srv:  # successes in between keep it going
        c = ChatClient(srv.base_url, "k", "m", concurrency=1, max_retries=0, stop_after_failures=3)
        convs = [[{"role": "user", "content": f"q{i} [[fault:okx1]]" if i % 2 else f"q{i}"}] for i in range(12)]
        rs = c.complete_many(convs)
        assert srv.requests == 12 and sum(not r.error for r in rs) == 6


def test_a_batch_that_times_out_together_is_one_observation_not_an_outage() -> None:
    """A busy local server: every request in flight times out at once (as many failures as `concurrency`, none
    sent after another failed). That is not yet an outage: the retries go out and succeed. Control: the same
    burst with every retry timing out too is stopped as an outage, naming the timeout and what to change."""
    convs = [[{"role": "user", "content": f"q{i} [[fault:hangx1]]"}] for i in range(8)]
    kw = dict(concurrency=8, timeout_s=0.5, max_retries=2, backoff_base_s=0.01, backoff_max_s=0.02)
    with FaultServer(hang_s=2.0) as srv:
        rs = ChatClient(srv.base_url, "k", "m", stop_after_failures=8, probe_first=False, **kw).complete_many(convs)
        assert srv.requests == 16  # 8 that timed out together, 8 retries
    assert not any(r.error for r in rs)
    with FaultServer(hang_s=2.0, default_fault="hang") as srv:
        hung = [[{"role": "user", "content": f"q{i}"}] for i in range(8)]
        rs = ChatClient(srv.base_url, "k", "m", stop_after_failures=8, probe_first=False, **kw).complete_many(hung)
    assert all(r.error and r.transient for r in rs)
    assert any("endpoint looks down" in r.error and "timeout_s" in r.error for r in rs)


def test_bad_path_404_is_fatal_and_names_the_model() -> None:
    with FaultServer() as srv:
        c = ChatClient(srv.base_url.removesuffix("/v1") + "/nope", KEY, "gpt-typo", max_retries=3)
        with pytest.raises(ChatError, match="gpt-typo"):
            c.complete([{"role": "user", "content": "x"}])


def test_results_keep_input_order_under_concurrency() -> None:
    with FaultServer(latency_s=0.05) as srv:
        c = ChatClient(srv.base_url, "k", "m", concurrency=8)
        rs = c.complete_many([[{"role": "user", "content": f"question number {i}"}] for i in range(16)])
    assert [r.text for r in rs] == [f"A reply after 1 messages about: question number {i}" for i in range(16)]
    assert srv.requests == 16


def test_concurrency_bounds_the_requests_in_flight() -> None:
    """32 requests of 1 s at concurrency 16: never more than 16 at the server at once, and in waves, not one by one
    (read from the arrival times, which a busy machine does not stretch much)."""
    with FaultServer(latency_s=1.0) as srv:
        ChatClient(srv.base_url, "k", "m", concurrency=16).complete_many(
            [[{"role": "user", "content": f"q{i}"}] for i in range(32)]
        )
        arrivals = sorted(srv.arrivals)
    in_flight = max(sum(1 for b in arrivals if a <= b < a + 0.95) for a in arrivals)
    assert in_flight == 16  # the bound, reached
    assert arrivals[-1] - arrivals[0] < 4.0  # three waves (the first request alone, 16, 15), not 31 s in a row


def test_requests_per_min_limit(server: FaultServer) -> None:
    c = _client(server, concurrency=20, requests_per_min=600)  # 10/s, bursts of one second's worth
    t0 = time.monotonic()
    rs = c.complete_many([[{"role": "user", "content": f"q{i}"}] for i in range(20)])
    elapsed = time.monotonic() - t0
    assert all(r.error is None for r in rs) and server.requests == 20
    assert elapsed >= 0.9  # 10 at once, then 10 more at 10/s


def test_tokens_per_min_limit_reserves_then_settles_with_real_usage() -> None:
    async def timed(settle_used: float | None) -> float:
        lim = RateLimiter(tokens_per_min=30000)  # 500 tokens/s, one second's worth in the bucket
        t0 = time.monotonic()
        for _ in range(10):
            await lim.acquire(100)
            if settle_used is not None:
                lim.settle(100, settle_used)
        return time.monotonic() - t0

    assert 0.9 <= asyncio.run(timed(None)) < 1.6  # 5 in the bucket, 5 more at 500 tokens/s
    assert asyncio.run(timed(10)) < 0.2  # replies used 10 of the 100 reserved: the rest comes back


def test_backoff_is_exponential_with_jitter_and_retry_after_wins() -> None:
    c = ChatClient(None, KEY, "m", backoff_base_s=1.0, backoff_max_s=8.0)
    for attempt, cap in ((1, 1.0), (2, 2.0), (3, 4.0), (6, 8.0)):
        waits = {c._backoff_s(attempt, None) for _ in range(50)}
        assert all(cap / 2 <= w <= cap for w in waits) and len(waits) > 40
    assert all(3.0 <= c._backoff_s(1, 3.0) <= 3.3 for _ in range(20))
    assert retry_after_s({"retry-after": "1.5"}) == 1.5
    assert retry_after_s({"retry-after-ms": "250", "retry-after": "9"}) == 0.25
    assert retry_after_s({"retry-after": "Wed, 21 Oct 2015 07:28:00 GMT"}) is None


def test_usage_and_cost_from_the_price_table(server: FaultServer) -> None:
    c = _client(server, prices={"fault-model": {"prompt": 2.0, "completion": 10.0}})
    c.complete_many([[{"role": "user", "content": "one two three"}]] * 3)
    rep = c.usage_report()["fault-model"]
    assert rep["requests"] == 3 and rep["prompt_tokens"] == 9  # the server counts words
    assert rep["cost_usd"] == pytest.approx((9 * 2.0 + rep["completion_tokens"] * 10.0) / 1e6)
    assert _client(server).usage_report()["fault-model"]["cost_usd"] is None  # unpriced: None, not 0


def test_fault_server_reply_hook_for_other_benchmarks() -> None:
    with FaultServer(reply=lambda req: f"Rating: [[7]] for {len(req['messages'])} messages") as srv:
        c = ChatClient(srv.base_url, "k", "judge")
        assert c.complete([{"role": "user", "content": "judge this"}]).text == "Rating: [[7]] for 1 messages"
        assert c.complete([{"role": "user", "content": "x [[fault:empty]]"}]).text == ""  # faults still apply


def test_fault_server_cli_serves_and_counts() -> None:
    import tempfile

    port_file = Path(tempfile.mkdtemp()) / "port"
    p = subprocess.Popen(
        [
            sys.executable,
            str(Path(__file__).parent / "helpers" / "fault_server.py"),
            "--port-file",
            str(port_file),
            "--default-fault",
            "500",
        ]
    )
    try:
        for _ in range(100):
            if port_file.is_file():
                break
            time.sleep(0.1)
        base = f"http://127.0.0.1:{port_file.read_text()}"
        r = ChatClient(base + "/v1", "k", "m", max_retries=1, backoff_base_s=0.01).complete(
            [{"role": "user", "content": "x"}]
        )
        assert r.error and "http 500" in r.error
        with urllib.request.urlopen(base + "/stats") as resp:
            assert json.loads(resp.read()) == {"status": "ok", "requests": 2, "faults": {"500": 2}}
    finally:
        p.terminate()
        p.wait(10)


def test_fault_server_refuses_unknown_faults_and_public_hosts() -> None:
    assert set(FAULTS) >= {"429", "500", "hang", "malformed", "empty_choices", "wrong_format", "401"}
    with pytest.raises(ValueError, match="loopback"):
        FaultServer(host="0.0.0.0")
    with pytest.raises(ValueError, match="default_fault"):
        FaultServer(default_fault="teapot")
