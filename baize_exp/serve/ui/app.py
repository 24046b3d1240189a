"""The chat page's HTTP side, mounted on the OpenAI-compatible server of the same process.

The page talks to `/v1/chat/completions` like any client (streamed, one request per pane). What it needs beyond
the API is here: the page itself (one HTML document, its script and style inline and pinned by hash in the
Content-Security-Policy, so nothing loads from anywhere else), `/api/models`, the arena (`/api/arena/start`
streams both anonymous answers as server-sent events, `/api/arena/vote` records a vote), and `/api/export` (a
conversation as a dialog record in the training format).

Safety: every request must carry the token when one is set (`Authorization: Bearer`, or `?token=` to open the
page); without a token the server is bound to loopback and answers only requests whose Host is a loopback name (a
web page elsewhere cannot reach it by DNS rebinding); a POST must be `application/json` (a cross-site form cannot
send that without the browser asking first). Answers reach the page as data and are shown with `textContent`.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import secrets
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse

from baize_exp.data import dialog_reject
from baize_exp.io import content_hash
from baize_exp.serve.app import ChatServer, Submitted
from baize_exp.serve.ui.arena import SLOTS, Arena, Pair, VoteRefused
from baize_exp.serve.ui.catalog import Catalog

HERE = Path(__file__).resolve().parent
LOOPBACK_HOSTS = {"127.0.0.1", "localhost", "[::1]", "::1"}
DEFAULTS = {"temperature": 0.7, "top_p": 0.9, "max_tokens": 256}
ROLES = {"user": "human", "assistant": "ai"}


def page() -> tuple[str, str]:
    """(the page's HTML with its style and script inline, its Content-Security-Policy)."""
    css, js = (HERE / "page.css").read_text(), (HERE / "page.js").read_text()
    html = (HERE / "page.html").read_text().replace("/*CSS*/", css).replace("/*JS*/", js)

    def pin(text: str) -> str:
        return "'sha256-" + base64.b64encode(hashlib.sha256(text.encode()).digest()).decode() + "'"

    csp = (
        f"default-src 'none'; script-src {pin(js)}; style-src {pin(css)}; connect-src 'self'; img-src data:; "
        "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    )
    return html, csp


def mount(app: FastAPI, catalog: Catalog, arena: Arena, token: str | None, loopback: bool) -> None:
    """The page, its API and the guard in front of every route (the /v1 API included)."""
    server: ChatServer = app.state.chat_server
    html, csp = page()
    app.middleware("http")(_guard(token, loopback))

    @app.get("/", include_in_schema=False)
    async def index() -> HTMLResponse:
        return HTMLResponse(html, headers={"Content-Security-Policy": csp, "Cache-Control": "no-store"})

    @app.get("/api/models")
    async def models() -> dict:
        return describe(catalog, server, arena)

    @app.post("/api/arena/start")
    async def arena_start(request: Request) -> Any:
        return await start_battle(await _json(request), arena, server, request)

    @app.post("/api/arena/vote")
    async def arena_vote(request: Request) -> JSONResponse:
        try:
            return JSONResponse(arena.vote(await _json(request)))
        except VoteRefused as e:
            return _refuse(e.status, str(e))

    @app.post("/api/export")
    async def export(request: Request) -> JSONResponse:
        dialog = export_dialog(await _json(request), catalog)
        return dialog if isinstance(dialog, JSONResponse) else JSONResponse(dialog)


def _guard(token: str | None, loopback: bool) -> Any:
    async def guard(request: Request, call_next: Any) -> Any:
        if loopback and _host_name(request.headers.get("host") or "") not in LOOPBACK_HOSTS:
            return _refuse(403, f"Host {request.headers.get('host')!r} is not this machine's loopback name")
        if token:
            given = request.headers.get("authorization", "").removeprefix("Bearer ")
            given = given or request.query_params.get("token", "")
            if not secrets.compare_digest(given, token):
                return _refuse(401, "this server needs its token: open the page as /?token=<token>")
        if (
            request.method == "POST"
            and request.headers.get("content-type", "").split(";")[0].strip() != "application/json"
        ):
            return _refuse(415, "a POST body must be JSON (Content-Type: application/json)")
        response = await call_next(request)
        response.headers["X-Content-Type-Options"] = "nosniff"
        response.headers["Referrer-Policy"] = "no-referrer"  # a token in the page's address never leaves in a Referer
        response.headers["X-Frame-Options"] = "DENY"
        return response

    return guard


def _host_name(header: str) -> str:
    """The name part of a Host header: `127.0.0.1:8000` -> `127.0.0.1`, `[::1]:8000` -> `[::1]`."""
    if header.startswith("["):
        return header[: header.find("]") + 1]
    return header.rsplit(":", 1)[0]


def _refuse(status: int, message: str) -> JSONResponse:
    return JSONResponse(status_code=status, content={"error": {"message": message, "type": "invalid_request_error"}})


async def _json(request: Request) -> Any:
    try:
        return await request.json()
    except ValueError:
        return None


def describe(catalog: Catalog, server: ChatServer, arena: Arena) -> dict:
    served = server.engine.served
    return {
        "models": [
            {"label": m.label, "format": served[m.label].fmt.label, "adapter": str(m.adapter) if m.adapter else None}
            for m in catalog.models
        ],
        "defaults": DEFAULTS,
        "arena": {
            "questions": len(catalog.questions),
            "votes": arena.votes.count,
            "votes_file": str(arena.votes.path),
        },
    }


def _settings(body: dict) -> dict | str:
    """The sampling settings of an arena request (the page's, else the defaults); a message when malformed (the
    server's own parser checks their ranges)."""
    s = body.get("settings") or {}
    if not isinstance(s, dict):
        return "'settings' must be an object"
    out = {k: s.get(k, v) for k, v in DEFAULTS.items()}
    if s.get("seed") is not None:
        out["seed"] = s["seed"]
    return out


async def start_battle(body: Any, arena: Arena, server: ChatServer, request: Request) -> Any:
    """A new pair: server-sent events {"type": "pair"}, then "delta"/"done" per slot, then "ready" (or "error")."""
    if not isinstance(body, dict):
        return _refuse(422, 'the body must be a JSON object {"prompt": str} or {"eval": true}')
    prompt = body.get("prompt")
    if not body.get("eval") and (not isinstance(prompt, str) or not prompt.strip()):
        return _refuse(422, "'prompt' must be a non-empty string (or send {\"eval\": true} for an eval question)")
    settings = _settings(body)
    if isinstance(settings, str):
        return _refuse(422, settings)
    try:
        pair = arena.new_pair(None if body.get("eval") else prompt, settings)
    except VoteRefused as e:
        return _refuse(e.status, str(e))
    subs: dict[str, Submitted] = {}
    if pair.answer_source == "live":
        for slot in SLOTS:
            ask = {
                "model": pair.models[slot].label,
                "messages": [{"role": "user", "content": pair.question}],
                "stream": True,
            }
            sub = server.submit({**ask, **pair.settings})
            if isinstance(sub, JSONResponse):
                for other in subs.values():
                    other.req.cancelled = True
                arena.pending.pop(pair.pair_id, None)
                return sub
            subs[slot] = sub
    return StreamingResponse(_battle_events(pair, subs, request), media_type="text/event-stream")


def _event(**fields: Any) -> str:
    return f"data: {json.dumps(fields)}\n\n"


async def _battle_events(pair: Pair, subs: dict[str, Submitted], request: Request) -> AsyncIterator[str]:
    yield _event(type="pair", pair_id=pair.pair_id, question=pair.question, question_id=pair.question_id)
    if not subs:  # the eval stage's answers: shown whole
        for slot in SLOTS:
            yield _event(type="done", slot=slot, text=pair.answers[slot])
        yield _event(type="ready")
        return
    queue: asyncio.Queue = asyncio.Queue()
    tasks = [asyncio.create_task(_pump(slot, sub, queue, request)) for slot, sub in subs.items()]
    try:
        for _ in range(len(tasks)):
            while True:
                slot, kind, text = await queue.get()
                if kind == "delta":
                    yield _event(type="delta", slot=slot, text=text)
                    continue
                if kind == "error":
                    yield _event(type="error", slot=slot, message=text)
                    return
                pair.answers[slot] = text
                yield _event(type="done", slot=slot, text=text)
                break
        yield _event(type="ready")
    finally:
        for t in tasks:
            t.cancel()
        for slot, sub in subs.items():
            if pair.answers[slot] is None:
                sub.req.cancelled = True  # the page went away or the other answer failed: free the rows


async def _pump(slot: str, sub: Submitted, queue: asyncio.Queue, request: Request) -> None:
    """One answer's events into the shared queue: deltas, then ("done", final text) or ("error", message)."""
    try:
        while True:
            kind, _index, payload, *_ = await sub.next_event(request)
            if kind == "delta":
                await queue.put((slot, "delta", payload))
            elif kind == "done":
                await queue.put((slot, "done", payload.text))
                return
            elif kind == "error":
                await queue.put((slot, "error", f"generation failed: {payload}"))
                return
    except TimeoutError as e:
        await queue.put((slot, "error", str(e)))


def export_dialog(body: Any, catalog: Catalog) -> dict | JSONResponse:
    """A conversation with one model as a dialog record in the training format (`train.data=` reads a file of
    these); 422 naming what is wrong otherwise."""
    labels = {m.label: m for m in catalog.models}
    if not isinstance(body, dict) or body.get("model") not in labels or not isinstance(body.get("messages"), list):
        return _refuse(422, f"the body must be {{'model': one of {list(labels)}, 'messages': [...]}}")
    turns = []
    for k, m in enumerate(body["messages"]):
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            return _refuse(422, f"messages[{k}] must be {{'role': 'user'|'assistant', 'content': str}}")
        turns.append({"role": ROLES[m["role"]], "text": m["content"]})
    bad = dialog_reject(turns)
    if bad:
        return _refuse(422, f"not a dialog worth training on ({bad[0]}: {bad[1]})")
    model = labels[body["model"]]
    return {
        "id": f"chat-{content_hash(model.label, turns, n=12)}",
        "seed": turns[0]["text"],
        "source": "chat",
        "mode": "chat",
        "turns": turns,
        "teacher": {"model": model.label, **{k: v for k, v in model.record().items() if k != "label"}},
        "key": content_hash("chat", model.label, turns),
    }
