"""The project's OpenAI-compatible server, reached on loopback through the real `openai` client."""

from __future__ import annotations

import collections
import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import openai
import pytest
import torch

from baize_exp.chat import ChatClient, ChatError
from baize_exp.serve import LocalServer

CACHE = os.environ.get("BAIZE_CACHE")


@pytest.fixture(scope="module")
def tiny_server():
    # max_n=4 (below max_batch): the most answers these tests ask for in one request, and the limit a 400 names
    with LocalServer("tiny", cache_dir=CACHE, max_batch=8, max_n=4) as s:
        yield s


@pytest.fixture(scope="module")
def context_model_dir(tmp_path_factory) -> Path:
    """A random 2-layer Llama whose greedy answer depends on the whole prompt. (model=tiny ties its embeddings at a
    small init scale, so it mostly repeats its last input token: useless for checking that batching keeps each
    row's context intact.) Saved as a plain HF dir, so serving it also covers `--model <HF dir>`."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from baize_exp.models import tokenizer_dir

    out = tmp_path_factory.mktemp("ctxmodel")
    tok = AutoTokenizer.from_pretrained(tokenizer_dir(Path(CACHE or "~/.cache/baize_exp").expanduser()))
    cfg = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        tie_word_embeddings=False,
        initializer_range=0.2,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        LlamaForCausalLM(cfg).save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def ctx_server(context_model_dir):
    with LocalServer(str(context_model_dir), cache_dir=CACHE, max_batch=16, served_name="ctx") as s:
        yield s


def _client(s: LocalServer, **kw) -> ChatClient:
    return ChatClient(s.base_url, s.api_key, "tiny", **kw)


def _openai(s: LocalServer, **kw) -> openai.OpenAI:
    return openai.OpenAI(base_url=s.base_url, api_key=s.api_key, **kw)


def _health(s: LocalServer) -> dict:
    with urllib.request.urlopen(f"http://127.0.0.1:{s.port}/health") as r:
        return json.loads(r.read())


def _wait_for(cond, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.02)


def _msgs(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def test_chat_completion_with_usage_n_and_logprobs(tiny_server) -> None:
    c = _openai(tiny_server)
    r = c.chat.completions.create(
        model="tiny", messages=_msgs("Hello"), max_tokens=5, n=4, temperature=0.9, logprobs=True, top_logprobs=2
    )
    assert len(r.choices) == 4 and [ch.index for ch in r.choices] == [0, 1, 2, 3]
    assert r.usage.completion_tokens == sum(len(ch.logprobs.content) for ch in r.choices) <= 20
    assert r.usage.prompt_tokens > 0
    first = r.choices[0].logprobs.content[0]
    assert first.logprob <= 0 and len(first.top_logprobs) == 2
    assert first.top_logprobs[0].logprob >= first.top_logprobs[1].logprob
    assert r.choices[0].finish_reason in ("stop", "length")
    assert r._request_id == r.id  # every reply carries x-request-id
    models = c.models.list()
    assert [m.id for m in models.data] == ["tiny"]


def test_greedy_is_identical_alone_and_inside_a_batch_of_16(ctx_server) -> None:
    """16 prompts of different lengths with different max_tokens: served one at a time, then all at once, half of
    them joining while the first half is being decoded (merged into the running batch's KV cache)."""
    c = _openai(ctx_server, max_retries=0)
    prompts = [f"Question {i}: " + "tell me more " * (i % 5) + "about cats" for i in range(16)]
    max_tokens = [3 + 2 * i for i in range(16)]

    def ask(i: int) -> tuple[str, str, int]:
        r = c.chat.completions.create(model="ctx", messages=_msgs(prompts[i]), max_tokens=max_tokens[i], temperature=0)
        return r.choices[0].message.content, r.choices[0].finish_reason, r.usage.completion_tokens

    alone = [ask(i) for i in range(16)]
    assert len({a[0] for a in alone}) == 16  # the answers depend on the prompts: a real check
    before = _health(ctx_server)
    with ThreadPoolExecutor(16) as pool:
        first = [pool.submit(ask, i) for i in range(0, 16, 2)]
        _wait_for(lambda: _health(ctx_server)["decode_steps"] > before["decode_steps"] + 2)
        second = [pool.submit(ask, i) for i in range(1, 16, 2)]
        batched = dict(zip(range(0, 16, 2), [f.result() for f in first], strict=True))
        batched.update(zip(range(1, 16, 2), [f.result() for f in second], strict=True))
    after = _health(ctx_server)
    assert [batched[i] for i in range(16)] == alone
    assert all(a[1] == "length" and a[2] == m for a, m in zip(alone, max_tokens, strict=True))
    assert after["peak_rows"] >= 9  # the late half joined a running batch
    assert after["prefills"] - before["prefills"] >= 2
    # far fewer forward passes than one request at a time would need
    assert after["decode_steps"] - before["decode_steps"] < sum(max_tokens) / 2


def test_seeded_sample_reproduces_alone_and_inside_a_mixed_batch(ctx_server) -> None:
    c = _openai(ctx_server, max_retries=0)

    def seeded(seed: int) -> list[str]:
        r = c.chat.completions.create(
            model="ctx", messages=_msgs("Write a poem"), max_tokens=12, temperature=1.0, top_p=0.9, seed=seed, n=2
        )
        return [ch.message.content for ch in r.choices]

    alone = seeded(7)
    assert alone[0] != alone[1]  # the n answers are different draws
    assert seeded(8) != alone
    others = [
        dict(temperature=t, top_p=p, max_tokens=m, stop=s)
        for t, p, m, s in [(0.0, 1.0, 20, None), (0.7, 0.95, 9, ["e"]), (1.3, 0.5, 15, None), (1.0, 1.0, 30, None)] * 2
    ]
    with ThreadPoolExecutor(9) as pool:
        futs = [
            pool.submit(c.chat.completions.create, model="ctx", messages=_msgs(f"Other {i}"), **kw)
            for i, kw in enumerate(others)
        ]
        mine = pool.submit(seeded, 7)
        rs = [f.result() for f in futs]
    assert mine.result() == alone
    for r, kw in zip(rs, others, strict=True):
        assert r.usage.completion_tokens <= kw["max_tokens"]
        if kw["stop"]:
            assert "e" not in r.choices[0].message.content


def test_streaming_reassembles_to_the_non_streamed_text(ctx_server) -> None:
    c = _openai(ctx_server, max_retries=0)
    for kw in (dict(max_tokens=40), dict(max_tokens=40, stop=["e", "a"]), dict(max_tokens=1)):
        full = c.chat.completions.create(model="ctx", messages=_msgs("Stream this"), temperature=0, logprobs=True, **kw)
        stream = c.chat.completions.create(
            model="ctx",
            messages=_msgs("Stream this"),
            temperature=0,
            stream=True,
            logprobs=True,
            stream_options={"include_usage": True},
            **kw,
        )
        text, finish, lps, usage, ids = "", None, [], None, set()
        for chunk in stream:
            ids.add(chunk.id)
            if chunk.usage:
                usage = chunk.usage
            for ch in chunk.choices:
                text += ch.delta.content or ""
                lps += ch.logprobs.content if ch.logprobs and ch.logprobs.content else []
                finish = ch.finish_reason or finish
        want = full.choices[0]
        assert text == want.message.content and finish == want.finish_reason, kw
        assert [x.token for x in lps] == [x.token for x in want.logprobs.content]
        assert usage.completion_tokens == full.usage.completion_tokens and len(ids) == 1
    assert len(text) > 0


def test_streaming_n_and_the_project_client(tiny_server) -> None:
    stream = _openai(tiny_server).chat.completions.create(
        model="tiny", messages=_msgs("hi"), n=3, max_tokens=6, temperature=1.0, stream=True
    )
    finishes = {}
    for chunk in stream:
        for ch in chunk.choices:
            if ch.finish_reason:
                finishes[ch.index] = ch.finish_reason
    assert sorted(finishes) == [0, 1, 2]


def test_max_tokens_is_honoured_per_request_inside_a_batch(tiny_server) -> None:
    client = _client(tiny_server, temperature=0.0, concurrency=8)
    convs = [_msgs(f"Count to {i}") for i in range(6)]
    lengths = [1, 2, 3, 4, 5, 6]
    rs = [client.complete(c, max_tokens=m) for c, m in zip(convs, lengths, strict=True)]
    assert all(r.usage["completion_tokens"] <= m for r, m in zip(rs, lengths, strict=True))
    again = client.complete(convs[5], max_tokens=6)
    assert again.text == rs[5].text


def test_full_queue_answers_429_with_retry_after_and_a_gone_client_frees_its_row(context_model_dir) -> None:
    with LocalServer(str(context_model_dir), cache_dir=CACHE, max_batch=1, queue_size=1, served_name="ctx") as s:
        c = _openai(s, max_retries=0)
        long_stream = c.chat.completions.create(
            model="ctx", messages=_msgs("long"), max_tokens=1000, temperature=0, stream=True
        )
        next(iter(long_stream))
        _wait_for(lambda: _health(s)["active_rows"] == 1)  # it holds the only row now
        with ThreadPoolExecutor(1) as pool:
            waiting = pool.submit(c.chat.completions.create, model="ctx", messages=_msgs("queued"), max_tokens=3)
            _wait_for(lambda: _health(s)["waiting"] == 1)
            with pytest.raises(openai.RateLimitError) as e:
                c.chat.completions.create(model="ctx", messages=_msgs("one too many"), max_tokens=3)
            assert e.value.status_code == 429 and e.value.response.headers["retry-after"] == "1"
            long_stream.close()  # the client goes away: its row is freed, the waiting request runs
            r = waiting.result(timeout=60)
        assert r.usage.completion_tokens == 3
        h = _health(s)
        assert h["rejected_429"] == 1 and h["active_rows"] == 0


def test_request_timeout_answers_504_and_frees_the_row(context_model_dir) -> None:
    with LocalServer(
        str(context_model_dir), cache_dir=CACHE, max_batch=2, request_timeout_s=0.3, served_name="ctx"
    ) as s:
        c = _openai(s, max_retries=0)
        with pytest.raises(openai.InternalServerError) as e:
            c.chat.completions.create(model="ctx", messages=_msgs("long"), max_tokens=1000, temperature=0)
        assert e.value.status_code == 504 and "timeout" in str(e.value)
        _wait_for(lambda: _health(s)["active_rows"] == 0, timeout=10)
        assert _health(s)["timeouts"] == 1


def test_sigterm_finishes_the_request_in_flight(context_model_dir) -> None:
    s = LocalServer(str(context_model_dir), cache_dir=CACHE, served_name="ctx").start()
    try:
        stream = _openai(s, max_retries=0).chat.completions.create(
            model="ctx",
            messages=_msgs("keep going"),
            max_tokens=300,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
        chunks = iter(stream)
        next(chunks)
        s.proc.send_signal(signal.SIGTERM)
        finish, usage = None, None
        for chunk in chunks:
            usage = chunk.usage or usage
            finish = next((ch.finish_reason for ch in chunk.choices if ch.finish_reason), finish)
        assert finish == "length" and usage.completion_tokens == 300
        assert s.proc.wait(timeout=60) == 0
    finally:
        s.stop()


def test_concurrent_requests_share_batches(tiny_server) -> None:
    before = _health(tiny_server)
    rs = _client(tiny_server, temperature=0.0, max_tokens=4, concurrency=8).complete_many(
        [_msgs(f"q{i}") for i in range(8)]
    )
    after = _health(tiny_server)
    assert all(r.error is None for r in rs)
    assert after["requests"] - before["requests"] == 8
    assert after["decode_steps"] - before["decode_steps"] < 8 * 4  # shared steps, not one stream per request


def test_wrong_key_stops_at_once(tiny_server) -> None:
    bad = ChatClient(tiny_server.base_url, "not-the-key", "tiny", max_retries=3)
    with pytest.raises(ChatError, match="refused the API key") as e:
        bad.complete(_msgs("x"))
    assert "not-the-key" not in str(e.value)
    assert bad.requests == 1  # no retry storm


def test_missing_key_env_is_a_clear_error() -> None:
    from helpers.config import compose_cfg

    cfg = compose_cfg(["teacher=openai", "teacher.api_key_env=BAIZE_TEST_UNSET_KEY"])
    os.environ.pop("BAIZE_TEST_UNSET_KEY", None)
    with pytest.raises(ChatError, match="BAIZE_TEST_UNSET_KEY"):
        ChatClient.from_config(cfg.teacher)


def test_bad_request_stops_with_a_clear_error(tiny_server) -> None:
    # a 400 would hit every request with the same settings: the client stops at once instead of recording each
    with pytest.raises(ChatError, match="HTTP 400.*max_tokens"):
        _client(tiny_server, max_retries=3).complete([{"role": "user", "content": "x"}], max_tokens=0)


@pytest.mark.parametrize(
    ("body", "needle"),
    [
        ({"max_tokens": 0}, "max_tokens"),
        ({"n": 99}, "max_batch"),
        ({"top_p": 0}, "top_p"),
        ({"logprobs": True, "top_logprobs": 50}, "top_logprobs"),
        ({"messages": []}, "messages"),
        ({"messages": [{"role": "user"}]}, "messages\\[0\\] needs 'content'"),
        ({"stop": 123}, "'stop' must be a string"),
        ({"stop": ["ok", 5]}, "'stop' must be"),
        ({"temperature": 2.5}, "temperature=2.5"),
        ({"temperature": float("nan")}, "temperature=nan"),
        ({"temperature": -0.1}, "temperature"),
        ({"n": 5}, "n=5: .*max_n \\(4"),
        ({"max_tokens": "ten"}, "'max_tokens' must be an integer"),
        ({"messages": [{"role": "user", "content": "x" * 9000}]}, "context_length_exceeded"),
    ],
)
def test_bad_request_is_a_400_naming_the_field(tiny_server, body: dict, needle: str) -> None:
    """What OpenAI answers 400 is a 400 with a JSON error here too (never a plain-text 500). Sent as raw JSON: the
    openai client itself refuses to send some of these (NaN)."""
    s = tiny_server
    req = urllib.request.Request(
        f"{s.base_url}/chat/completions",
        method="POST",
        data=json.dumps({"model": "tiny", "messages": _msgs("x"), **body}).encode(),
        headers={"Authorization": f"Bearer {s.api_key}", "Content-Type": "application/json"},
    )
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(req, timeout=30)
    err = json.loads(e.value.read())["error"]
    assert e.value.code == 400 and e.value.headers["content-type"] == "application/json"
    assert re.search(needle, err["message"]) and err["type"] == "invalid_request_error" and err["param"]


def test_unknown_model_is_404_model_not_found(tiny_server) -> None:
    """A misconfigured teacher or judge name is noticed at its first request, not answered by another model."""
    with pytest.raises(openai.NotFoundError) as e:
        _openai(tiny_server, max_retries=0).chat.completions.create(model="gpt-4", messages=_msgs("x"))
    assert e.value.body["code"] == "model_not_found" and "'tiny'" in e.value.body["message"]
    with pytest.raises(ChatError, match="does not know model 'gpt-4'"):
        ChatClient(tiny_server.base_url, tiny_server.api_key, "gpt-4").complete(_msgs("x"))
    ok = _openai(tiny_server).chat.completions.create(model="tiny", messages=_msgs("x"), max_tokens=2)
    assert ok.choices[0].message.content is not None


def test_vllm_configs_point_the_openai_client_at_a_server() -> None:
    from helpers.config import compose_cfg

    from baize_exp.config import validate

    cfg = compose_cfg(["teacher=vllm", "judge=vllm"])
    validate(cfg)
    for role in ("teacher", "judge"):
        assert cfg[role].backend == "openai" and cfg[role].base_url == "http://127.0.0.1:8000/v1"
        assert cfg[role].api_key_env == "VLLM_API_KEY"


def test_refuses_non_loopback_bind_unless_allowed() -> None:
    r = subprocess.run(
        [sys.executable, "-m", "baize_exp.serve", "--model", "tiny", "--host", "0.0.0.0"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode != 0 and "--allow-remote" in r.stderr


def test_serves_an_hf_dir_with_a_lora_adapter(context_model_dir, ctx_server, tmp_path) -> None:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(context_model_dir)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)  # non-zero LoRA weights, so the adapter changes the answers
        get_peft_model(
            base, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
        ).save_pretrained(tmp_path / "adapter")
    ask = dict(messages=_msgs("Tell me about dogs"), max_tokens=8, temperature=0)
    plain = _openai(ctx_server).chat.completions.create(model="ctx", **ask).choices[0].message.content
    with LocalServer(str(context_model_dir), adapter=str(tmp_path / "adapter"), cache_dir=CACHE) as s:
        c = _openai(s, max_retries=0)
        assert [m.id for m in c.models.list().data] == [f"{context_model_dir.name}+adapter"]
        with ThreadPoolExecutor(2) as pool:  # two rows of the same batch through the PEFT-wrapped model
            texts = [
                f.result().choices[0].message.content
                for f in [
                    pool.submit(c.chat.completions.create, model=f"{context_model_dir.name}+adapter", **ask)
                    for _ in range(2)
                ]
            ]
    assert texts[0] == texts[1] != plain


@pytest.mark.parametrize(("top_p", "allowed"), [(1.0, [0, 1, 2, 3]), (0.8, [0, 1]), (0.5, [0]), (0.81, [0, 1, 2])])
def test_top_p_sampler_draws_the_nucleus_in_proportion(top_p: float, allowed: list[int]) -> None:
    from baize_exp.serve.engine import sample_top_p

    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])[[2, 0, 3, 1]]  # not sorted by id: ids 1, 3, 0, 2 by mass
    rank_to_id = [1, 3, 0, 2]
    g = torch.Generator().manual_seed(0)
    draws = collections.Counter(sample_top_p(probs, top_p, g) for _ in range(4000))
    assert sorted(draws) == sorted(rank_to_id[r] for r in allowed)
    mass = sum(float(probs[rank_to_id[r]]) for r in allowed)
    for r in allowed:
        want = float(probs[rank_to_id[r]]) / mass
        assert abs(draws[rank_to_id[r]] / 4000 - want) < 0.03
    # the same generator state gives the same draws
    assert [sample_top_p(probs, top_p, torch.Generator().manual_seed(5)) for _ in range(3)] == [
        sample_top_p(probs, top_p, torch.Generator().manual_seed(5)) for _ in range(3)
    ]


@pytest.mark.slow
def test_local_server_dies_with_a_killed_parent(tmp_path: Path) -> None:
    """kill -9 of the run that started it must not leave a server holding the model (Linux parent-death signal)."""
    pid_file = tmp_path / "server.pid"
    code = (
        "import sys, time; from baize_exp.serve import LocalServer\n"
        f"s = LocalServer('tiny', cache_dir={os.environ['BAIZE_CACHE']!r}).start()\n"
        f"open({str(pid_file)!r}, 'w').write(str(s.proc.pid)); time.sleep(600)\n"
    )
    parent = subprocess.Popen([sys.executable, "-c", code])
    try:
        deadline = time.monotonic() + 300
        while not (pid_file.is_file() and pid_file.read_text()) and time.monotonic() < deadline:
            assert parent.poll() is None, "the parent died before its server started"
            time.sleep(0.2)
        server_pid = int(pid_file.read_text())
        os.kill(server_pid, 0)  # alive
    finally:
        parent.kill()
        parent.wait()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            os.kill(server_pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.2)
    os.kill(server_pid, signal.SIGKILL)
    pytest.fail("the server outlived its killed parent")
