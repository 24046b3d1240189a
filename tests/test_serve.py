"""The project's OpenAI-compatible server, reached on loopback through the real `openai` client."""

from __future__ import annotations

import os
import subprocess
import sys
import urllib.request

import openai
import pytest

from baize_exp.chat import ChatClient, ChatError, LocalServer


@pytest.fixture(scope="module")
def tiny_server():
    with LocalServer("tiny", cache_dir=os.environ["BAIZE_CACHE"], max_batch=8) as s:
        yield s


def _client(s: LocalServer, **kw) -> ChatClient:
    return ChatClient(s.base_url, s.api_key, "tiny", **kw)


def test_chat_completion_with_usage_n_and_logprobs(tiny_server) -> None:
    c = openai.OpenAI(base_url=tiny_server.base_url, api_key=tiny_server.api_key)
    r = c.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Hello"}], max_tokens=5,
                                  n=4, temperature=0.9, logprobs=True, top_logprobs=2)
    assert len(r.choices) == 4
    assert r.usage.completion_tokens == sum(len(ch.logprobs.content) for ch in r.choices) <= 20
    assert r.usage.prompt_tokens > 0
    first = r.choices[0].logprobs.content[0]
    assert first.logprob <= 0 and len(first.top_logprobs) == 2
    assert r.choices[0].finish_reason in ("stop", "length")
    models = c.models.list()
    assert [m.id for m in models.data] == ["tiny"]


def test_max_tokens_is_honoured_per_request_inside_a_batch(tiny_server) -> None:
    client = _client(tiny_server, temperature=0.0, concurrency=8)
    convs = [[{"role": "user", "content": f"Count to {i}"}] for i in range(6)]
    lengths = [1, 2, 3, 4, 5, 6]
    rs = [client.complete(c, max_tokens=m) for c, m in zip(convs, lengths, strict=True)]
    assert all(r.usage["completion_tokens"] <= m for r, m in zip(rs, lengths, strict=True))
    # greedy is deterministic: the same request twice gives the same text
    again = client.complete(convs[5], max_tokens=6)
    assert again.text == rs[5].text


def test_concurrent_requests_share_batches(tiny_server) -> None:
    def health():
        with urllib.request.urlopen(f"http://127.0.0.1:{tiny_server.port}/health") as r:
            import json

            return json.loads(r.read())

    before = health()
    rs = _client(tiny_server, temperature=0.0, max_tokens=4, concurrency=8).complete_many(
        [[{"role": "user", "content": f"q{i}"}] for i in range(8)])
    after = health()
    assert all(r.error is None for r in rs)
    assert after["requests"] - before["requests"] == 8
    assert after["batches"] - before["batches"] < 8  # gathered, not one generate per request


def test_wrong_key_stops_at_once(tiny_server) -> None:
    bad = ChatClient(tiny_server.base_url, "not-the-key", "tiny", max_retries=3)
    with pytest.raises(ChatError, match="refused the API key") as e:
        bad.complete([{"role": "user", "content": "x"}])
    assert "not-the-key" not in str(e.value)
    assert bad.requests == 1  # no retry storm


def test_missing_key_env_is_a_clear_error() -> None:
    from conftest import compose_cfg

    cfg = compose_cfg(["teacher=openai", "teacher.api_key_env=BAIZE_TEST_UNSET_KEY"])
    os.environ.pop("BAIZE_TEST_UNSET_KEY", None)
    with pytest.raises(ChatError, match="BAIZE_TEST_UNSET_KEY"):
        ChatClient.from_config(cfg.teacher)


def test_bad_request_stops_with_a_clear_error(tiny_server) -> None:
    # a 400 would hit every request with the same settings: the client stops at once instead of recording each
    with pytest.raises(ChatError, match="HTTP 400.*max_tokens"):
        _client(tiny_server, max_retries=3).complete([{"role": "user", "content": "x"}], max_tokens=0)


def test_refuses_non_loopback_bind_unless_allowed() -> None:
    r = subprocess.run([sys.executable, "-m", "baize_exp.serve", "--model", "tiny", "--host", "0.0.0.0"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and "--allow-remote" in r.stderr
