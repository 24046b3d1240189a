"""A loopback fake of OpenAI's Files and Batches endpoints (and of online chat completions), for tests and benchmarks.

It speaks the wire format the real `openai` client expects: `POST /v1/files` (multipart, purpose `batch`),
`GET /v1/files/{id}` and `/v1/files/{id}/content`, `POST /v1/batches`, `GET /v1/batches/{id}`, `GET /v1/batches`
(newest first, cursor `after`, `has_more`), and `POST /v1/chat/completions` answered the same way as a batch line.
A batch is `validating` when created, `in_progress` while `complete_s` seconds pass (its request counts rising with
the time), then `completed` (or what a knob says) with an output file of the answered lines and an error file of
the rest, each line `{"id", "custom_id", "response": {"status_code", "request_id", "body"}, "error"}`.

Per-line faults, chosen by a directive in the request's messages (deterministic whatever the order):

    [[batch:KIND]]      every submission of this custom_id gets KIND
    [[batch:KINDxN]]    the first N submissions of this custom_id get KIND, later ones are answered

KIND: `expire` (the line is not run: error `batch_expired`, and the batch ends `expired`), `500`, `429`, `404`
(model not found), `too_long` (400 `context_length_exceeded`), `no_choices` (200 without choices).

Knobs: `complete_s` (time from create to done), `batch_outcomes` ({n: "failed" | "expired" | "cancelled"} for the
n-th batch created, from 0: failed at validation with `token_limit_exceeded`; expired or cancelled with the first
half of its lines answered), `max_requests` and `max_bytes` (a bigger upload is a 400, a batch of more lines fails
validation, as OpenAI's limits do), `lost_creates` (the first N creates make the batch and then answer 500, as a
reply lost on the way would), `report_progress` (False: the counts stay 0 until the batch ends), `reply` (request
body -> text; default: an echo of the last message), `count_prompt` and `count_text` (token counts for usage;
default: words, plus 3 a message). `realistic_reply` is a teacher's reply of realistic length for `reply`.

    with BatchServer(api_key="k", complete_s=0.2) as srv:     # 127.0.0.1, a free port, a background thread
        client = openai.OpenAI(base_url=srv.base_url, api_key="k")
        ...
        srv.submitted      # Counter: custom_id -> batches created holding it
        srv.batches        # id -> the batch as the API shows it (plus private fields starting with _)
"""

from __future__ import annotations

import email.parser
import email.policy
import json
import random
import re
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

_DIRECTIVE = re.compile(r"\[\[batch:([a-z0-9_]+?)(?:x(\d+))?\]\]")
KINDS = ("expire", "500", "429", "404", "too_long", "no_choices")
_REASONS = {200: "OK", 400: "Bad Request", 401: "Unauthorized", 404: "Not Found", 500: "Internal Server Error"}


def _words(text: str) -> int:
    return len(text.split())


class BatchServer:
    """The fake, on 127.0.0.1 with a free port, served from a daemon thread; a context manager (see module doc)."""

    def __init__(
        self,
        api_key: str | None = None,
        complete_s: float = 0.0,
        batch_outcomes: dict[int, str] | None = None,
        max_requests: int = 50_000,
        max_bytes: int = 200_000_000,
        lost_creates: int = 0,
        report_progress: bool = True,
        reply: Callable[[dict], str] | None = None,
        count_prompt: Callable[[list[dict]], int] | None = None,
        count_text: Callable[[str], int] | None = None,
    ):
        self.api_key, self.complete_s = api_key, complete_s
        self.batch_outcomes = dict(batch_outcomes or {})
        self.max_requests, self.max_bytes, self.lost_creates = max_requests, max_bytes, lost_creates
        self.report_progress = report_progress
        self.reply = reply
        self.count_text = count_text or _words
        self.count_prompt = count_prompt or (
            lambda msgs: sum(self.count_text(str(m.get("content") or "")) + 3 for m in msgs)
        )
        self.files: dict[str, dict] = {}  # id -> {"object": FileObject fields..., "_data": bytes}
        self.batches: dict[str, dict] = {}
        self.order: list[str] = []  # batch ids, oldest first
        self.submitted: Counter[str] = Counter()  # custom_id -> batches created holding it
        self.executed: Counter[str] = Counter()  # custom_id -> times a batch ran it (billed)
        self.calls: Counter[str] = Counter()  # "POST /v1/files", ... -> count
        self._attempts: Counter[str] = Counter()  # custom_id -> submissions that reached a directive
        self.chat_requests = 0
        self._lock = threading.RLock()
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # --- lifecycle ---------------------------------------------------------------------------------------------

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def start(self) -> BatchServer:
        server = self

        class Handler(_Handler):
            fake = server

        self._httpd = _Server(("127.0.0.1", 0), Handler)
        self._httpd.daemon_threads = True
        self.port = self._httpd.server_address[1]
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="batch-server", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._thread.join(10)
            self._httpd = None

    def __enter__(self) -> BatchServer:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    # --- the API -------------------------------------------------------------------------------------------------

    def route(self, method: str, path: str, query: dict, headers: dict, body: bytes) -> tuple[int, str, bytes]:
        """(status, content type, payload) for one request."""
        if self.api_key and headers.get("authorization") != f"Bearer {self.api_key}":
            return _error(401, "Incorrect API key provided", "invalid_api_key")
        with self._lock:
            self.calls[f"{method} {re.sub(r'/(file-|batch_)[A-Za-z0-9]+', '/{id}', path)}"] += 1
            if method == "POST" and path == "/v1/files":
                return self._upload(headers, body)
            if method == "POST" and path == "/v1/batches":
                return self._create(json.loads(body or b"{}"))
            if method == "GET" and path == "/v1/batches":
                return self._list(query)
            if method == "POST" and path == "/v1/chat/completions":
                self.chat_requests += 1
                return self._chat(json.loads(body or b"{}"))
            m = re.fullmatch(r"/v1/batches/([^/]+)", path)
            if method == "GET" and m:
                batch = self.batches.get(m.group(1))
                return _json(self._advance(batch)) if batch else _error(404, f"No batch {m.group(1)}", "not_found")
            m = re.fullmatch(r"/v1/files/([^/]+)(/content)?", path)
            if method == "GET" and m:
                f = self.files.get(m.group(1))
                if f is None:
                    return _error(404, f"No such File object: {m.group(1)}", "not_found")
                if m.group(2):
                    return 200, "application/octet-stream", f["_data"]
                return _json(_public(f))
        return _error(404, f"no route {method} {path}", "not_found")

    def _upload(self, headers: dict, body: bytes) -> tuple[int, str, bytes]:
        msg = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
            b"Content-Type: " + headers.get("content-type", "").encode() + b"\r\n\r\n" + body
        )
        fields: dict[str, Any] = {}
        for part in msg.iter_parts():
            name = part.get_param("name", header="content-disposition")
            fields[name] = (part.get_filename(), part.get_payload(decode=True))
        if "file" not in fields or "purpose" not in fields:
            return _error(400, "multipart body needs 'file' and 'purpose'", "invalid_request_error")
        filename, data = fields["file"]
        purpose = fields["purpose"][1].decode()
        if len(data) > self.max_bytes:
            return _error(400, f"File is too large: {len(data)} bytes, the limit is {self.max_bytes}", "file_too_large")
        return _json(_public(self._store(filename or "upload.jsonl", purpose, data)))

    def _store(self, filename: str, purpose: str, data: bytes) -> dict:
        fid = "file-" + uuid.uuid4().hex[:24]
        self.files[fid] = {
            "id": fid,
            "object": "file",
            "bytes": len(data),
            "created_at": int(time.time()),
            "filename": filename,
            "purpose": purpose,
            "status": "processed",
            "_data": data,
        }
        return self.files[fid]

    def _create(self, req: dict) -> tuple[int, str, bytes]:
        f = self.files.get(req.get("input_file_id") or "")
        if f is None:
            return _error(404, f"No such File object: {req.get('input_file_id')}", "not_found")
        if req.get("endpoint") != "/v1/chat/completions" or req.get("completion_window") != "24h":
            return _error(400, "endpoint must be /v1/chat/completions, completion_window 24h", "invalid_request_error")
        n = len(self.order)
        bid = "batch_" + uuid.uuid4().hex[:24]
        lines, errors = _validate(f["_data"], self.max_requests)
        fate = "failed" if errors else self.batch_outcomes.get(n, "completed")
        if fate == "failed" and not errors:
            errors = [{"code": "token_limit_exceeded", "message": "Enqueued token limit reached", "line": None}]
        batch = {
            "id": bid,
            "object": "batch",
            "endpoint": req["endpoint"],
            "errors": {"object": "list", "data": errors} if errors else None,
            "input_file_id": f["id"],
            "completion_window": "24h",
            "status": "validating",
            "output_file_id": None,
            "error_file_id": None,
            "created_at": int(time.time()),
            "expires_at": int(time.time()) + 86400,
            "request_counts": {"total": len(lines), "completed": 0, "failed": 0},
            "metadata": req.get("metadata"),
            "_fate": fate,
            "_lines": lines,
            "_t0": time.monotonic(),
        }
        self.batches[bid] = batch
        self.order.append(bid)
        if fate != "failed":
            self.submitted.update(line["custom_id"] for line in lines)
        if self.lost_creates > 0:
            self.lost_creates -= 1
            return _error(500, "The server had an error while processing your request", "server_error")
        return _json(_public(batch))

    def _list(self, query: dict) -> tuple[int, str, bytes]:
        limit = int(query.get("limit", ["20"])[0])
        ids = self.order[::-1]
        if "after" in query:
            ids = ids[ids.index(query["after"][0]) + 1 :] if query["after"][0] in ids else []
        page = [_public(self._advance(self.batches[i])) for i in ids[:limit]]
        return _json(
            {
                "object": "list",
                "data": page,
                "first_id": page[0]["id"] if page else None,
                "last_id": page[-1]["id"] if page else None,
                "has_more": len(ids) > limit,
            }
        )

    def _advance(self, b: dict) -> dict:
        """The batch as of now: in progress while complete_s passes, then finished once (files written)."""
        if b["status"] in ("completed", "failed", "expired", "cancelled"):
            return b
        now = int(time.time())
        if b["_fate"] == "failed":
            b.update(status="failed", failed_at=now)
            return b
        elapsed, total = time.monotonic() - b["_t0"], len(b["_lines"])
        if elapsed < self.complete_s:
            b["status"], b["in_progress_at"] = "in_progress", b.get("in_progress_at") or now
            if self.report_progress:
                b["request_counts"]["completed"] = int(total * elapsed / self.complete_s)
            return b
        fate = forced = b["_fate"]
        out, err = [], []
        for i, line in enumerate(b["_lines"]):
            if forced in ("expired", "cancelled") and i >= total // 2:
                code = "batch_expired" if forced == "expired" else "batch_cancelled"
                err.append(_result_line(line["custom_id"], None, {"code": code, "message": f"Request {forced}"}))
                continue
            kind = self._kind(line)
            if kind == "expire":
                fate = "expired"
                err.append(
                    _result_line(
                        line["custom_id"],
                        None,
                        {"code": "batch_expired", "message": "not executed before the completion window expired"},
                    )
                )
                continue
            self.executed[line["custom_id"]] += 1
            status, body = self._answer(line["body"], kind)
            (out if status == 200 else err).append(_result_line(line["custom_id"], (status, body), None))
        b["request_counts"] = {"total": total, "completed": len(out), "failed": len(err)}
        if out:
            b["output_file_id"] = self._store(f"{b['id']}_output.jsonl", "batch_output", _jsonl(out))["id"]
        if err:
            b["error_file_id"] = self._store(f"{b['id']}_error.jsonl", "batch_output", _jsonl(err))["id"]
        b["status"] = fate
        b[f"{fate}_at"] = now
        return b

    def _kind(self, line: dict) -> str:
        """The fault this submission of this line gets ("ok" for none); counts submissions per custom_id."""
        text = " ".join(str(m.get("content") or "") for m in line["body"].get("messages", []))
        m = _DIRECTIVE.search(text)
        if not m:
            return "ok"
        self._attempts[line["custom_id"]] += 1
        kind, times = m.group(1), m.group(2)
        return kind if times is None or self._attempts[line["custom_id"]] <= int(times) else "ok"

    def _answer(self, body: dict, kind: str = "ok") -> tuple[int, dict]:
        """(status, body) for a chat request, as the online endpoint would answer it."""
        if kind in ("500", "429"):
            return int(kind), {"error": {"message": f"injected {kind}", "type": "server_error", "code": None}}
        if kind == "404":
            msg = f"The model `{body.get('model')}` does not exist or you do not have access to it."
            return 404, {"error": {"message": msg, "type": "invalid_request_error", "code": "model_not_found"}}
        if kind == "too_long":
            return 400, {
                "error": {
                    "message": "This model's maximum context length is 4096 tokens.",
                    "type": "invalid_request_error",
                    "code": "context_length_exceeded",
                }
            }
        messages = body.get("messages") or []
        if self.reply is not None:
            text = self.reply(body)
        else:
            last = str(messages[-1].get("content") or "") if messages else ""
            text = "echo: " + _DIRECTIVE.sub("", last).strip()
        prompt, completion = self.count_prompt(messages), self.count_text(text)
        choice = {
            "index": 0,
            "message": {"role": "assistant", "content": text},
            "finish_reason": "stop",
            "logprobs": None,
        }
        return 200, {
            "id": "chatcmpl-" + uuid.uuid4().hex[:12],
            "object": "chat.completion",
            "created": int(time.time()),
            "model": body.get("model", "fake-model"),
            "choices": [] if kind == "no_choices" else [choice],
            "usage": {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion},
        }

    def _chat(self, body: dict) -> tuple[int, str, bytes]:
        text = " ".join(str(m.get("content") or "") for m in body.get("messages", []))
        m = _DIRECTIVE.search(text)
        status, payload = self._answer(body, m.group(1) if m else "ok")
        return status, "application/json", json.dumps(payload).encode()


_VOCAB: list[str] = []


def realistic_reply(body: dict) -> str:
    """A teacher's reply of realistic length and vocabulary, the same for the same request (its text and `seed`):
    a [Human]/[AI] transcript of 2-4 exchanges (answers of 2-6 sentences) when the prompt asks for a transcript,
    else one turn (an answer after a system message, else a human's one- or two-sentence follow-up). The words are
    those of the shipped seed questions, so characters per token are those of real English questions."""
    if not _VOCAB:
        from baize_exp.data.seeds import SEEDS_DIR

        for path in sorted(SEEDS_DIR.glob("*.jsonl")):
            for raw in path.read_text(encoding="utf-8").splitlines():
                _VOCAB.extend(w.strip("?.,!\"'()").lower() for w in json.loads(raw)["question"].split())
        _VOCAB[:] = [w for w in _VOCAB if w]
    messages = body.get("messages") or []
    text = "\n".join(str(m.get("content") or "") for m in messages)
    rng = random.Random(f"{text}|{body.get('seed')}")

    def sentences(lo: int, hi: int) -> str:
        out = []
        for _ in range(rng.randint(lo, hi)):
            words = rng.choices(_VOCAB, k=rng.randint(6, 22))
            out.append(" ".join(words).capitalize() + rng.choice([".", ".", ".", "?", "!"]))
        return " ".join(out)

    last = str(messages[-1].get("content") or "") if messages else ""
    if "transcript" in last.lower():
        topic = last.rsplit("about:", 1)[-1].strip()
        lines = [f"[Human] {topic}"]
        exchanges = rng.randint(2, 4)
        for k in range(exchanges):
            lines.append(f"[AI] {sentences(2, 6)}")
            if k < exchanges - 1:
                lines.append(f"[Human] {sentences(1, 2)}")
        return "Here is a new transcript.\n" + "\n".join(lines)
    if messages and messages[0].get("role") == "system":
        return sentences(2, 6)
    return sentences(1, 2)


def _validate(data: bytes, max_requests: int) -> tuple[list[dict], list[dict]]:
    """The lines of an input file, and the validation errors OpenAI would report (the batch then fails)."""
    lines, errors, seen = [], [], set()
    for n, raw in enumerate(data.splitlines(), 1):
        if not raw.strip():
            continue
        try:
            line = json.loads(raw)
        except ValueError:
            errors.append(
                {"code": "invalid_json_line", "message": "This line is not parseable as valid JSON.", "line": n}
            )
            continue
        cid = line.get("custom_id")
        if not cid or cid in seen:
            errors.append(
                {"code": "duplicate_custom_id", "message": f"custom_id {cid!r} missing or repeated", "line": n}
            )
        elif line.get("method") != "POST" or line.get("url") != "/v1/chat/completions":
            errors.append(
                {"code": "invalid_url", "message": "method must be POST, url the batch's endpoint", "line": n}
            )
        elif not isinstance(line.get("body"), dict) or "model" not in line["body"]:
            errors.append({"code": "missing_required_parameter", "message": "body.model is required", "line": n})
        seen.add(cid)
        lines.append(line)
    if len(lines) > max_requests:
        errors.append(
            {
                "code": "too_many_requests",
                "message": f"{len(lines)} requests; a batch holds {max_requests}",
                "line": None,
            }
        )
    return lines, errors


def _result_line(custom_id: str, response: tuple[int, dict] | None, error: dict | None) -> dict:
    return {
        "id": "batch_req_" + uuid.uuid4().hex[:20],
        "custom_id": custom_id,
        "response": None
        if response is None
        else {"status_code": response[0], "request_id": uuid.uuid4().hex[:16], "body": response[1]},
        "error": error,
    }


def _public(obj: dict) -> dict:
    return {k: v for k, v in obj.items() if not k.startswith("_")}


def _jsonl(records: list[dict]) -> bytes:
    return b"".join(json.dumps(r).encode() + b"\n" for r in records)


def _json(obj: dict, status: int = 200) -> tuple[int, str, bytes]:
    return status, "application/json", json.dumps(obj).encode()


def _error(status: int, message: str, code: str) -> tuple[int, str, bytes]:
    etype = "invalid_request_error" if status < 500 else "server_error"
    return _json({"error": {"message": message, "type": etype, "param": None, "code": code}}, status)


class _Server(ThreadingHTTPServer):
    request_queue_size = 256  # the listen backlog; the default 5 resets connections a concurrent client opens


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as the openai client expects
    fake: BatchServer

    def _serve(self, method: str) -> None:
        url = urlsplit(self.path)
        headers = {k.lower(): v for k, v in self.headers.items()}
        if headers.get("transfer-encoding", "").lower() == "chunked":
            body = self._read_chunked()
        else:
            body = self.rfile.read(int(headers.get("content-length") or 0))
        try:
            status, ctype, payload = self.fake.route(method, url.path, parse_qs(url.query), headers, body)
        except (ValueError, KeyError) as e:
            status, ctype, payload = _error(400, f"bad request: {e}", "invalid_request_error")
        self.send_response(status, _REASONS.get(status))
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def _read_chunked(self) -> bytes:
        out = bytearray()
        while True:
            size = int(self.rfile.readline().split(b";")[0].strip(), 16)
            if size == 0:
                self.rfile.readline()
                return bytes(out)
            out += self.rfile.read(size)
            self.rfile.readline()

    def do_GET(self) -> None:  # noqa: N802 (http.server's names)
        self._serve("GET")

    def do_POST(self) -> None:  # noqa: N802
        self._serve("POST")

    def log_message(self, *args: Any) -> None:  # quiet: tests read the counters instead
        pass
