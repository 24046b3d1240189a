"""A fault-injecting OpenAI-compatible chat server for tests and benchmarks: every way an API fails, on demand.

It speaks just enough HTTP/1.1 (keep-alive, Content-Length) for the `openai` client, on plain asyncio streams so
that it costs well under a millisecond of CPU per request and can hold hundreds of slow requests open at once.

Faults are chosen per request by a directive anywhere in the messages, so they stay deterministic however many
requests are in flight:

    [[fault:KIND]]      every attempt of this exact request gets KIND
    [[fault:KINDxN]]    the first N attempts of this exact request get KIND, later ones succeed

KIND is one of `FAULTS`: 429 (with Retry-After), 500, 400, 401, 403, hang (holds the request open for `hang_s`,
so the client's timeout fires), malformed (200 with a body that is not JSON), empty_choices, wrong_format (a reply
without [Human]/[AI] markers), role_order (a transcript that starts [AI] [AI]), short (a human turn only), length
(a transcript cut mid-turn, finish_reason "length"), empty (an empty reply), too_long (400 with OpenAI's
`context_length_exceeded` code, as for a prompt over the context), huge (a 1 MB transcript that ignores
max_tokens, finish_reason "stop"). `default_fault` applies to every
request without a directive (e.g. "500" for an outage); a wrong API key always gets 401.

A successful reply is a `[Human]`/`[AI]` transcript when the prompt asks for one (it says "transcript"), else one
plain sentence (a turn of turn-by-turn self-chat). Usage counts words.

In a test::

    with FaultServer(latency_s=0.05, api_key="k") as srv:   # 127.0.0.1, a free port, a background thread
        client = ChatClient(srv.base_url, "k", "fault-model")
        ...
        assert srv.requests == 3                            # chat requests received (every attempt)
        srv.received                                        # [(fault or "ok", request body dict), ...]

`reply=lambda request: "Rating: [[7]]"` makes every request that gets through answer that instead (e.g. to stand in
for a judge). From a shell (e.g. for a benchmark; GET /stats gives the counts; `--reply TEXT` for a fixed reply)::

    python tests/helpers/fault_server.py --port 0 --port-file /tmp/port --latency 1.0
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

FAULTS = (
    "ok",
    "429",
    "500",
    "400",
    "401",
    "403",
    "hang",
    "malformed",
    "empty_choices",
    "wrong_format",
    "role_order",
    "short",
    "length",
    "empty",
    "too_long",
    "huge",
)
_DIRECTIVE = re.compile(r"\[\[fault:([a-z0-9_]+?)(?:x(\d+))?\]\]")
_REASONS = {
    400: "Bad Request",
    401: "Unauthorized",
    403: "Forbidden",
    404: "Not Found",
    429: "Too Many Requests",
    500: "Internal Server Error",
}


class FaultServer:
    """An OpenAI-compatible server on 127.0.0.1 that injects latency and faults; a context manager.

    Args:
        latency_s: seconds every chat request waits before its reply (or its fault).
        api_key: if set, requests must carry `Authorization: Bearer <api_key>` or get 401.
        default_fault: the fault for requests without a directive ("ok" = none).
        retry_after_s: the Retry-After header sent with 429.
        hang_s: how long a "hang" holds the request before answering normally.
        port: 0 picks a free port; read `port` / `base_url` after `start()`.
        reply: request body -> reply text for requests that get through (e.g. a judge's verdict); default: a
            transcript when the prompt says "transcript", else a sentence.
    """

    def __init__(
        self,
        latency_s: float = 0.0,
        api_key: str | None = None,
        default_fault: str = "ok",
        retry_after_s: float = 0.1,
        hang_s: float = 60.0,
        host: str = "127.0.0.1",
        port: int = 0,
        reply: Callable[[dict], str] | None = None,
    ):
        if default_fault not in FAULTS:
            raise ValueError(f"default_fault={default_fault!r}: not one of {FAULTS}")
        if host not in ("127.0.0.1", "localhost", "::1"):
            raise ValueError(f"host={host!r}: the fault server binds loopback only")
        self.latency_s, self.api_key, self.default_fault = latency_s, api_key, default_fault
        self.retry_after_s, self.hang_s, self.host, self.port = retry_after_s, hang_s, host, port
        self.reply = reply
        self.requests = 0  # chat completion requests received, every attempt counted
        self.received: list[tuple[str, dict | None]] = []  # (fault applied, request body)
        self.arrivals: list[float] = []  # time.monotonic() of each chat request's arrival
        self.faults: Counter[str] = Counter()
        self._attempts: Counter[str] = Counter()  # per exact request body, for [[fault:KINDxN]]
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: asyncio.base_events.Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}/v1"

    # --- lifecycle ---------------------------------------------------------------------------------------------

    async def serve(self, port_file: str | Path | None = None) -> None:
        """Serve on the current event loop until cancelled (the CLI's way; tests use start/stop)."""
        self._server = await asyncio.start_server(self._handle, self.host, self.port, backlog=1024)
        self.port = self._server.sockets[0].getsockname()[1]
        if port_file:
            tmp = Path(port_file).with_suffix(".tmp")
            tmp.write_text(str(self.port))
            os.replace(tmp, port_file)
        async with self._server:
            await self._server.serve_forever()

    def start(self) -> FaultServer:
        """Serve from a daemon thread with its own event loop; returns once the port is bound."""
        ready = threading.Event()

        def run() -> None:
            self._loop = asyncio.new_event_loop()
            self._server = self._loop.run_until_complete(
                asyncio.start_server(self._handle, self.host, self.port, backlog=1024)
            )
            self.port = self._server.sockets[0].getsockname()[1]
            ready.set()
            self._loop.run_forever()
            # stopped: drop open connections (hung requests included) and close the loop
            for task in asyncio.all_tasks(self._loop):
                task.cancel()
            self._loop.run_until_complete(asyncio.sleep(0))
            self._loop.close()

        self._thread = threading.Thread(target=run, name="fault-server", daemon=True)
        self._thread.start()
        if not ready.wait(10):
            raise RuntimeError("fault server did not start in 10 s")
        return self

    def stop(self) -> None:
        if self._loop and self._thread:
            self._loop.call_soon_threadsafe(self._server.close)
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)
            self._thread = self._loop = None

    def __enter__(self) -> FaultServer:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    def stats(self) -> dict:
        with self._lock:
            return {"requests": self.requests, "faults": dict(self.faults)}

    # --- HTTP --------------------------------------------------------------------------------------------------

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:  # keep-alive: one request after another on this connection
                head = await reader.readuntil(b"\r\n\r\n")
                lines = head.decode("latin-1").split("\r\n")
                method, path, _ = lines[0].split(" ", 2)
                headers = {k.strip().lower(): v.strip() for k, v in (ln.split(":", 1) for ln in lines[1:] if ":" in ln)}
                body = await reader.readexactly(int(headers.get("content-length", 0)))
                status, extra, payload = await self._route(method, path, headers, body)
                reason = _REASONS.get(status, "OK")
                out = [
                    f"HTTP/1.1 {status} {reason}",
                    "Content-Type: application/json",
                    f"Content-Length: {len(payload)}",
                ] + [f"{k}: {v}" for k, v in extra.items()]
                writer.write(("\r\n".join(out) + "\r\n\r\n").encode() + payload)
                await writer.drain()
                if headers.get("connection", "").lower() == "close":
                    break
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.LimitOverrunError, ValueError):
            pass  # the client went away (its timeout, a kill) or sent garbage: drop the connection
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def _route(self, method: str, path: str, headers: dict, body: bytes) -> tuple[int, dict, bytes]:
        if method == "GET" and path in ("/stats", "/health"):
            return 200, {}, json.dumps({"status": "ok", **self.stats()}).encode()
        if method == "GET" and path == "/v1/models":
            return 200, {}, json.dumps({"object": "list", "data": [{"id": "fault-model", "object": "model"}]}).encode()
        if method != "POST" or path != "/v1/chat/completions":
            return 404, {}, _error(f"no route {method} {path}", "not_found")
        try:
            req = json.loads(body)
        except ValueError:
            req = None
        fault = self._pick_fault(headers, body, req)
        with self._lock:
            self.requests += 1
            self.received.append((fault, req))
            self.arrivals.append(time.monotonic())
            self.faults[fault] += 1
        if self.latency_s:
            await asyncio.sleep(self.latency_s)
        if fault == "hang":
            await asyncio.sleep(self.hang_s)
            fault = "ok"
        if fault == "too_long":
            return (
                400,
                {},
                json.dumps(
                    {
                        "error": {
                            "message": "This model's maximum context length is 4096 tokens. "
                            "However, your messages resulted in "
                            "250000 tokens.",
                            "type": "invalid_request_error",
                            "param": "messages",
                            "code": "context_length_exceeded",
                        }
                    }
                ).encode(),
            )
        if fault in ("400", "401", "403", "500"):
            etype = {
                "400": "invalid_request_error",
                "401": "authentication_error",
                "403": "permission_error",
                "500": "server_error",
            }[fault]
            return int(fault), {}, _error(f"injected HTTP {fault}", etype)
        if req is None or not isinstance(req.get("messages"), list) or not req["messages"]:
            return 400, {}, _error("body must be JSON with a non-empty 'messages' list", "invalid_request_error")
        if fault == "429":
            return 429, {"Retry-After": f"{self.retry_after_s:g}"}, _error("injected rate limit", "rate_limit")
        if fault == "malformed":
            return 200, {}, b'{"id": "chatcmpl-x", "choices": [{"message": '
        return 200, {}, json.dumps(_completion(req, fault, self.reply)).encode()

    def _pick_fault(self, headers: dict, body: bytes, req: dict | None) -> str:
        if self.api_key and headers.get("authorization") != f"Bearer {self.api_key}":
            return "401"
        text = (
            " ".join(str(m.get("content", "")) for m in req.get("messages", []) if isinstance(m, dict))
            if isinstance(req, dict)
            else ""
        )
        m = _DIRECTIVE.search(text)
        if not m:
            return self.default_fault
        kind, times = m.group(1), m.group(2)
        if kind not in FAULTS:
            return "400"
        with self._lock:
            self._attempts[body] += 1
            attempt = self._attempts[body]
        return kind if times is None or attempt <= int(times) else "ok"


def _error(message: str, etype: str) -> bytes:
    return json.dumps({"error": {"message": message, "type": etype, "code": None}}).encode()


def _completion(req: dict, fault: str, reply: Callable[[dict], str] | None = None) -> dict:
    """The reply for a request that gets through: `reply(request)` if given, else a transcript if one was asked
    for, else a sentence; a content fault replaces it."""
    messages = req["messages"]
    prompt = " ".join(str(m.get("content", "")) for m in messages)
    last_line = (_DIRECTIVE.sub("", str(messages[-1].get("content", ""))).strip().splitlines() or [""])[-1]
    topic = last_line.rsplit("about:", 1)[-1].strip().replace("[", "(").replace("]", ")")[-120:]
    finish = "stop"
    if reply is not None:
        text = reply(req)
    elif "transcript" in prompt.lower():
        text = (
            f"Sure, here is a transcript.\n[Human] {topic}\n[AI] A careful answer about that.\n"
            f"[Human] Can you say more?\n[AI] Yes: here are more details on {topic[:40]}.\n"
        )
    else:
        text = f"A reply after {len(messages)} messages about: {topic}"
    if fault == "wrong_format":
        text = f"I would be happy to help with {topic}. It depends on many things."
    elif fault == "role_order":
        text = "[AI] Hello.\n[AI] Hello again.\n[Human] Hi."
    elif fault == "short":
        text = f"[Human] {topic}\n[AI]"
    elif fault == "length":
        text = f"[Human] {topic}\n[AI] A full first answer.\n[Human] And then?\n[AI] It goes on and on and"
        finish = "length"
    elif fault == "empty":
        text = ""
    elif fault == "huge":
        text = f"[Human] {topic}\n[AI] " + "and on " * 150_000 + "\n[Human] More?\n[AI] Yes."
    choices = (
        []
        if fault == "empty_choices"
        else [
            {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish, "logprobs": None}
        ]
    )
    prompt_tokens, completion_tokens = len(prompt.split()), len(text.split())
    return {
        "id": "chatcmpl-fault",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": req.get("model", "fault-model"),
        "choices": choices,
        "usage": {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        },
    }


def spawn(latency_s: float, workdir: Path, api_key_env: str, reply: str | None = None) -> tuple[Any, str]:
    """Start `python tests/helpers/fault_server.py` in its own process (so its CPU is not the caller's, e.g. in a
    benchmark); returns (process, base_url). The caller terminates the process."""
    import subprocess
    import sys

    port_file = workdir / "fault_server.port"
    cmd = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--latency",
        str(latency_s),
        "--port-file",
        str(port_file),
        "--api-key-env",
        api_key_env,
        *(["--reply", reply] if reply else []),
    ]
    proc = subprocess.Popen(cmd)
    for _ in range(200):
        if port_file.is_file() and port_file.read_text():
            return proc, f"http://127.0.0.1:{port_file.read_text()}/v1"
        time.sleep(0.05)
    proc.kill()
    raise RuntimeError("fault server did not start")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python tests/helpers/fault_server.py", description=__doc__.split("\n")[0])
    ap.add_argument("--host", default="127.0.0.1", help="loopback only")
    ap.add_argument("--port", type=int, default=0, help="0 picks a free port (see --port-file)")
    ap.add_argument("--port-file", default=None, help="write the bound port here once serving")
    ap.add_argument("--latency", type=float, default=0.0, help="seconds every chat request waits")
    ap.add_argument("--default-fault", default="ok", choices=FAULTS)
    ap.add_argument("--retry-after", type=float, default=0.1, help="Retry-After seconds sent with 429")
    ap.add_argument("--hang", type=float, default=60.0, help="seconds a 'hang' holds a request")
    ap.add_argument("--api-key-env", default=None, help="require 'Bearer <value of this env var>'")
    ap.add_argument("--reply", default=None, help="a fixed reply text (e.g. a judge verdict) instead of the default")
    a = ap.parse_args(argv)
    key = os.environ.get(a.api_key_env) if a.api_key_env else None
    srv = FaultServer(
        a.latency,
        key,
        a.default_fault,
        a.retry_after,
        a.hang,
        a.host,
        a.port,
        reply=None if a.reply is None else lambda _req: a.reply,
    )
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(srv.serve(a.port_file))


if __name__ == "__main__":
    main()
