"""The chat page's server side on loopback: one model holding every adapter answers as one-adapter servers do,
each model in its own prompt format; the arena's votes are appended as cast and malformed ones are refused
without writing; the token, the Host check and the JSON-only POSTs guard it; a conversation exports as a
dialog the trainer reads."""

from __future__ import annotations

import json
import re
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import pytest
from helpers.chat_fixture import CACHE, MARKUP, make_base, make_chat_run

from baize_exp.serve import LocalServer
from baize_exp.serve.app import build_app
from baize_exp.serve.engine import DecodeEngine
from baize_exp.serve.worker import BatchWorker

TOKEN = "t0ken-for-tests-0123456789"


class Served:
    """A FastAPI app on a free 127.0.0.1 port, served by uvicorn in a thread of the test process."""

    def __init__(self, app, worker: BatchWorker | None = None):
        import uvicorn

        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        self.server, self.worker = uvicorn.Server(uvicorn.Config(app, log_level="warning")), worker
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]}, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert time.monotonic() < deadline, "server did not start"
            time.sleep(0.02)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)
        if self.worker:
            self.worker.stop()


@pytest.fixture(scope="module")
def chat_run(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("chat")
    return make_chat_run(tmp / "run", make_base(tmp / "base"))


def _base_dir(run: Path) -> Path:
    return Path(run.joinpath(".hydra", "config.yaml").read_text().split("path: ")[1].split("\n")[0])


def _one_model_server(base_dir: Path, adapter: Path | None, name: str) -> Served:
    """What `baize-serve --model DIR [--adapter DIR]` runs, in this process: one model, one name."""
    from baize_exp.models import load_for_serving
    from baize_exp.serve.adapters import load_served

    net, tok, _ = load_for_serving(str(base_dir), None, CACHE)
    net, served = load_served(net, name, {name: adapter} if adapter else {}, serve_base=adapter is None)
    worker = BatchWorker(DecodeEngine(net, tok, name, served), max_batch=8)
    return Served(build_app(worker), worker)


CONVERSATIONS = [
    [{"role": "user", "content": "Tell me about dogs"}],
    [{"role": "user", "content": "How do I repot a basil plant without killing it?"}],
    [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Name a colour"},
        {"role": "assistant", "content": "Blue."},
        {"role": "user", "content": "Another one"},
    ],
]


def test_one_model_with_every_adapter_answers_as_one_adapter_servers_do(chat_run: Path) -> None:
    """baize-serve --adapter v1=DIR --adapter v2=DIR (the base held once, rows of different adapters in one batch)
    against three servers holding one model each: the same greedy answers, model by model."""
    base_dir = _base_dir(chat_run)
    adapters = {"v1": chat_run / "train" / "adapter", "v2": chat_run / "sdf" / "adapter"}
    with LocalServer(
        str(base_dir), adapter=[f"{n}={p}" for n, p in adapters.items()], cache_dir=CACHE, max_wait_ms=300
    ) as multi:
        client = openai.OpenAI(base_url=multi.base_url, api_key=multi.api_key, max_retries=0)
        assert [m.id for m in client.models.list().data] == [base_dir.name, "v1", "v2"]
        asks = [(m, k) for m in (base_dir.name, "v1", "v2") for k in range(len(CONVERSATIONS))]
        with ThreadPoolExecutor(len(asks)) as pool:  # all at once: the batches mix the three models
            futures = {
                a: pool.submit(
                    client.chat.completions.create,
                    model=a[0],
                    messages=CONVERSATIONS[a[1]],
                    max_tokens=10,
                    temperature=0,
                )
                for a in asks
            }
            together = {a: f.result().choices[0].message.content for a, f in futures.items()}
        health = httpx.get(f"http://127.0.0.1:{multi.port}/health").json()
    assert health["peak_rows"] > len(CONVERSATIONS)  # rows of more than one model decoded in the same steps
    alone = {}
    for name, adapter in [(base_dir.name, None), *adapters.items()]:
        s = _one_model_server(base_dir, adapter, name)
        try:
            c = openai.OpenAI(base_url=f"{s.url}/v1", api_key="none", max_retries=0)
            for k, conv in enumerate(CONVERSATIONS):
                r = c.chat.completions.create(model=name, messages=conv, max_tokens=10, temperature=0)
                alone[(name, k)] = r.choices[0].message.content
        finally:
            s.stop()
    assert together == alone
    # negative control: the adapters matter, so a row decoded with the wrong adapter would have shown
    for k in range(len(CONVERSATIONS)):
        assert len({alone[(m, k)] for m in (base_dir.name, "v1", "v2")}) == 3


def test_each_model_is_prompted_in_its_own_format(chat_run: Path) -> None:
    from transformers import AutoTokenizer

    from baize_exp.serve.adapters import served_models
    from baize_exp.serve.formats import PromptFormat

    tok = AutoTokenizer.from_pretrained(_base_dir(chat_run))
    served = {
        s.name: s
        for s in served_models(
            "base",
            {"v1": chat_run / "train" / "adapter", "v2": chat_run / "sdf" / "adapter"},
            {"v1": "a0", "v2": "a1"},
        )
    }
    conv = CONVERSATIONS[2]
    v1 = served["v1"].fmt.render(conv, tok)
    assert v1 == (
        "The conversation between human and AI assistant.\nYou are terse.\n[|Human|] Name a colour\n[|AI|] Blue."
        "\n[|Human|] Another one\n[|AI|]"
    )
    assert served["v1"].fmt.stop == ("[|Human|]",)
    for name in ("base", "v2"):  # the chat template (ChatML for the SmolLM2 tokenizer)
        text = served[name].fmt.render(conv, tok)
        assert text.endswith("<|im_start|>assistant\n") and "[|Human|]" not in text
    assert PromptFormat.of_adapter(None).kind == "chat_template"
    with pytest.raises(ValueError, match="last message"):
        served["v1"].fmt.render(conv[:3], tok)


@pytest.fixture(scope="module")
def chat_page(chat_run: Path):
    """The baize-chat app (as its entry point builds it) on loopback, without a token."""
    from baize_exp.serve.ui.__main__ import build, parse_args

    app, worker, catalog, votes = build(parse_args([str(chat_run)]), None)
    s = Served(app, worker)
    yield s, votes
    s.stop()


def _events(response: httpx.Response) -> list[dict]:
    return [json.loads(line[6:]) for line in response.text.splitlines() if line.startswith("data: ")]


def _battle(url: str, body: dict) -> list[dict]:
    r = httpx.post(f"{url}/api/arena/start", json=body, timeout=120)
    assert r.status_code == 200, r.text
    return _events(r)


def test_arena_streams_two_anonymous_answers_and_appends_the_vote(chat_page) -> None:
    s, votes = chat_page
    info = httpx.get(f"{s.url}/api/models").json()
    assert [(m["label"], m["format"]) for m in info["models"]] == [
        ("base", "chat template"),
        ("v1", "Baize format"),
        ("v2", "chat template"),
    ]
    before = votes.read_bytes() if votes.exists() else b""
    events = _battle(s.url, {"prompt": "Why is the sky blue?", "settings": {"temperature": 0, "max_tokens": 12}})
    assert events[0]["type"] == "pair" and events[-1]["type"] == "ready"
    assert {e["slot"] for e in events if e["type"] == "delta"} == {"A", "B"}  # both streamed, token by token
    done = {e["slot"]: e["text"] for e in events if e["type"] == "done"}
    assert not any("label" in json.dumps(e) or "v1" in json.dumps(e) for e in events[:-1])  # anonymous
    r = httpx.post(f"{s.url}/api/arena/vote", json={"pair_id": events[0]["pair_id"], "vote": "B"})
    assert r.status_code == 200, r.text
    lines = votes.read_bytes()[len(before) :].decode().splitlines()
    assert len(lines) == 1
    rec = json.loads(lines[0])
    assert rec["vote"] == "B" and rec["question"] == "Why is the sky blue?" and rec["question_id"] is None
    assert rec["answers"] == done and rec["order"] == r.json()["reveal"]
    assert rec["order"][0] != rec["order"][1] and set(rec["order"]) <= {"base", "v1", "v2"}
    assert rec["models"]["A"]["label"] == rec["order"][0] and rec["settings"]["temperature"] == 0
    again = httpx.post(f"{s.url}/api/arena/vote", json={"pair_id": events[0]["pair_id"], "vote": "A"})
    assert again.status_code == 409 and "already" in again.json()["error"]["message"]
    assert len(votes.read_bytes()[len(before) :].decode().splitlines()) == 1


def test_an_eval_question_shows_the_answers_the_judge_saw(chat_page) -> None:
    s, votes = chat_page
    events = _battle(s.url, {"eval": True})
    assert events[0]["question_id"] is not None
    done = [e for e in events if e["type"] == "done"]
    assert len(done) == 2 and all(e["text"].endswith(MARKUP) for e in done)  # recorded, markup and all
    r = httpx.post(f"{s.url}/api/arena/vote", json={"pair_id": events[0]["pair_id"], "vote": "both_bad"})
    rec = json.loads(votes.read_text().splitlines()[-1])
    assert r.status_code == 200 and rec["answer_source"] == "eval" and rec["source"] == "eval"
    assert rec["models"]["A"]["run"] and rec["models"]["A"]["name"] == rec["order"][0]


@pytest.mark.parametrize(
    ("body", "status", "needle"),
    [
        ({"vote": "A"}, 422, "missing field(s) ['pair_id']"),
        ({"pair_id": "PAIR", "vote": "C"}, 422, "must be one of ['A', 'B', 'tie', 'both_bad']"),
        ({"pair_id": "PAIR", "vote": None}, 422, "must be one of"),
        ({"pair_id": "0123456789abcdef", "vote": "A"}, 400, "is not a battle this server showed"),
        ({"pair_id": ["PAIR"], "vote": "A"}, 400, "is not a battle"),
        ([1, 2], 422, "must be a JSON object"),
        ("not json", 422, "must be a JSON object"),
    ],
)
def test_a_malformed_vote_is_refused_clearly_and_writes_nothing(chat_page, body, status, needle) -> None:
    s, votes = chat_page
    pair = _battle(s.url, {"prompt": "hi", "settings": {"temperature": 0, "max_tokens": 3}})[0]["pair_id"]
    before = votes.read_bytes() if votes.exists() else b""
    payload = json.loads(json.dumps(body).replace("PAIR", pair))
    if payload == "not json":
        r = httpx.post(f"{s.url}/api/arena/vote", content=b"{vote: A", headers={"content-type": "application/json"})
    else:
        r = httpx.post(f"{s.url}/api/arena/vote", json=payload)
    assert r.status_code == status and needle in r.json()["error"]["message"], r.text
    assert (votes.read_bytes() if votes.exists() else b"") == before
    # the refused request left the pair open: a proper vote on it still counts
    assert httpx.post(f"{s.url}/api/arena/vote", json={"pair_id": pair, "vote": "tie"}).status_code == 200


def test_bad_arena_requests_are_refused_before_anything_is_generated(chat_page) -> None:
    s, _ = chat_page
    r = httpx.post(f"{s.url}/api/arena/start", json={"prompt": "   "})
    assert r.status_code == 422 and "non-empty string" in r.json()["error"]["message"]
    r = httpx.post(f"{s.url}/api/arena/start", json={"prompt": "hi", "settings": {"temperature": 7}})
    assert r.status_code == 400 and "temperature" in r.json()["error"]["message"]


def test_the_page_loads_nothing_from_elsewhere_and_posts_must_be_json(chat_page) -> None:
    s, _ = chat_page
    r = httpx.get(s.url + "/")
    assert r.status_code == 200
    csp = r.headers["content-security-policy"]
    assert "default-src 'none'" in csp and "script-src 'sha256-" in csp and "connect-src 'self'" in csp
    assert "http://" not in r.text and "https://" not in r.text and " src=" not in r.text.split("<script>")[0]
    assert "innerHTML" not in r.text and "insertAdjacentHTML" not in r.text  # answers go in as text
    assert r.headers["referrer-policy"] == "no-referrer"
    form = httpx.post(f"{s.url}/api/arena/vote", content=b"pair_id=x&vote=A", headers={"content-type": "text/plain"})
    assert form.status_code == 415  # what a cross-site form could send without asking first
    rebound = httpx.get(f"{s.url}/api/models", headers={"host": "attacker.example:80"})
    assert rebound.status_code == 403  # DNS rebinding: a loopback server answers loopback names only
    assert httpx.get(f"{s.url}/api/models", headers={"host": "localhost"}).status_code == 200


def test_a_conversation_exports_as_a_dialog_the_trainer_reads(chat_page, tmp_path: Path) -> None:
    from baize_exp.data import load_dialogs

    s, _ = chat_page
    messages = [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello <b>there</b>"},
        {"role": "user", "content": "Bye"},
        {"role": "assistant", "content": "Bye!"},
    ]
    r = httpx.post(f"{s.url}/api/export", json={"model": "v1", "messages": messages})
    assert r.status_code == 200, r.text
    path = tmp_path / "dialogs.jsonl"
    path.write_text(json.dumps(r.json()) + "\n")
    dialogs, rejects = load_dialogs(path)
    assert rejects == [] and [t["role"] for t in dialogs[0]["turns"]] == ["human", "ai", "human", "ai"]
    assert dialogs[0]["turns"][1]["text"] == "Hello <b>there</b>" and dialogs[0]["teacher"]["model"] == "v1"
    bad = httpx.post(f"{s.url}/api/export", json={"model": "v1", "messages": messages[1:]})
    assert bad.status_code == 422 and "ai_first" in bad.json()["error"]["message"]


def test_with_a_token_every_route_needs_it(chat_run: Path, tmp_path: Path) -> None:
    from baize_exp.serve.ui.__main__ import build, parse_args

    args = parse_args([str(chat_run), "--token", TOKEN, "--votes", str(tmp_path / "votes.jsonl")])
    app, worker, _, _ = build(args, TOKEN)
    s = Served(app, worker)
    try:
        for path in ("/", "/api/models", "/v1/models"):
            assert httpx.get(s.url + path).status_code == 401
            assert httpx.get(s.url + path, headers={"authorization": f"Bearer {TOKEN}x"}).status_code == 401
            assert httpx.get(s.url + path, headers={"authorization": f"Bearer {TOKEN}"}).status_code == 200
        assert httpx.get(f"{s.url}/?token={TOKEN}").status_code == 200  # how the page is opened
        vote = httpx.post(f"{s.url}/api/arena/vote", json={"pair_id": "x", "vote": "A"})
        assert vote.status_code == 401 and not (tmp_path / "votes.jsonl").exists()
    finally:
        s.stop()


def test_binding_beyond_loopback_needs_a_token_and_bad_paths_are_one_line(chat_run: Path, monkeypatch) -> None:
    from baize_exp.errors import UserError
    from baize_exp.serve.ui.__main__ import parse_args, token_of
    from baize_exp.serve.ui.catalog import build_catalog

    monkeypatch.delenv("BAIZE_TEST_NO_SUCH_VAR", raising=False)
    for extra, needle in [
        (["--host", "0.0.0.0"], "--token"),
        (["--host", "0.0.0.0", "--token", "short"], "16 or more"),
        (["--token-env", "BAIZE_TEST_NO_SUCH_VAR"], "environment variable is empty"),
    ]:
        with pytest.raises(UserError, match=re.escape(needle)):
            token_of(parse_args([str(chat_run), *extra]))
    assert token_of(parse_args([str(chat_run), "--host", "0.0.0.0", "--token", TOKEN])) == TOKEN
    assert token_of(parse_args([str(chat_run)])) is None  # loopback: no token needed
    with pytest.raises(UserError, match="neither a run dir"):
        build_catalog([chat_run / "eval"])
    # through the entry point: one line, exit 2, before any model is loaded
    r = subprocess.run(
        [sys.executable, "-m", "baize_exp.serve.ui", str(chat_run), "--host", "0.0.0.0"], capture_output=True, text=True
    )
    assert r.returncode == 2 and "--token" in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
