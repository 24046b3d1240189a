"""The HTTP side of the server: OpenAI's chat completions API, its errors, and server-sent events."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

from baize_exp.serve.engine import Choice, DecodeEngine, GenRequest, ServedModel
from baize_exp.serve.worker import BatchWorker, QueueFull

log = logging.getLogger("baize_exp.serve")
RETRY_AFTER_S = 1  # what a 429 tells the client to wait; rows free up every token, so retry soon


def build_app(
    worker: BatchWorker,
    api_key: str | None = None,
    request_timeout_s: float | None = None,
    max_n: int | None = None,
    aliases: tuple[str, ...] = (),
) -> FastAPI:
    """The HTTP side. `aliases`: other model names answered as the default served one (e.g. the conf/model
    option). Every name in `worker.engine.served` is answered with its own adapter and prompt format."""
    app = FastAPI(title="baize_exp local OpenAI-compatible server")
    server = ChatServer(worker, api_key, request_timeout_s, max_n or worker.max_batch, aliases)
    server.install(app)
    app.state.chat_server = server  # what the chat page (baize_exp.serve.ui) submits its arena requests through
    return app


def error(
    status: int,
    message: str,
    etype: str = "invalid_request_error",
    headers: dict | None = None,
    code: str | None = None,
    param: str | None = None,
) -> JSONResponse:
    """An error answered as OpenAI does: {"error": {"message", "type", "param", "code"}}."""
    return JSONResponse(
        status_code=status,
        headers=headers,
        content={"error": {"message": message, "type": etype, "param": param, "code": code}},
    )


@dataclass
class Submitted:
    """A request handed to the worker, and the queue its events arrive on."""

    req: GenRequest
    events: asyncio.Queue
    deadline: float | None
    timeout_s: float | None

    async def next_event(self, request: Request | None = None) -> tuple:
        """The worker's next event; raises TimeoutError past the deadline or when the client has gone."""
        while True:
            left = self.deadline - time.monotonic() if self.deadline else 1.0
            if left <= 0:
                raise TimeoutError(f"not done within the server's request timeout ({self.timeout_s:g}s)")
            try:
                return await asyncio.wait_for(self.events.get(), min(left, 1.0))
            except TimeoutError:
                if request is not None and await request.is_disconnected():
                    raise TimeoutError("the client went away") from None


class ChatServer:
    """OpenAI's chat completions over one worker: the routes, their errors, and request submission."""

    def __init__(
        self, worker: BatchWorker, api_key: str | None, request_timeout_s: float | None, max_n: int, aliases: tuple
    ):
        self.worker, self.engine, self.api_key = worker, worker.engine, api_key
        self.request_timeout_s, self.max_n = request_timeout_s, max_n
        self.aliases = {a: self.engine.model_name for a in aliases if a not in self.engine.served}
        self.stats = {"requests": 0, "rejected_429": 0, "timeouts": 0}

    def install(self, app: FastAPI) -> None:
        """Exception handlers, /health, and the /v1 routes behind the API key."""
        app.add_exception_handler(Exception, self._unexpected)
        app.add_exception_handler(QueueFull, self._queue_full)
        app.add_exception_handler(_Unauthorized, self._unauthorized)
        app.add_api_route("/health", self.health, methods=["GET"])
        api = APIRouter(prefix="/v1", dependencies=[Depends(self.check_key)])
        api.add_api_route("/models", self.models, methods=["GET"])
        api.add_api_route("/chat/completions", self.chat, methods=["POST"])
        app.include_router(api)

    async def _unexpected(self, request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error")  # JSON like every other answer, never plain text
        return error(500, f"internal error: {type(exc).__name__}: {exc}", "server_error")

    async def _queue_full(self, request: Request, exc: Exception) -> JSONResponse:
        self.stats["rejected_429"] += 1
        return error(429, str(exc), "rate_limit_error", {"Retry-After": str(RETRY_AFTER_S)})

    async def _unauthorized(self, request: Request, exc: Exception) -> JSONResponse:
        return error(401, "invalid API key", "authentication_error")

    def check_key(self, request: Request) -> None:
        if self.api_key and not secrets.compare_digest(
            request.headers.get("authorization", ""), f"Bearer {self.api_key}"
        ):
            raise _Unauthorized()

    async def health(self) -> dict:
        return {"status": "ok", "model": self.engine.model_name, **self.stats, **self.worker.stats()}

    async def models(self) -> dict:
        return {
            "object": "list",
            "data": [{"id": name, "object": "model", "owned_by": "baize_exp"} for name in self.engine.served],
        }

    def served_name(self, body: Any) -> str | None:
        """The served model a request body asks for (no `model`: the default one), or None for a name not served."""
        asked = body.get("model") if isinstance(body, dict) else None
        if asked is None:
            return self.engine.model_name
        if not isinstance(asked, str):
            return None
        return asked if asked in self.engine.served else self.aliases.get(asked)

    def submit(self, body: Any) -> Submitted | JSONResponse:
        """Parse a request body and hand it to the worker (QueueFull propagates: a 429); an error reply when the
        body is refused."""
        name = self.served_name(body)
        if name is None:
            return error(
                404,
                f"The model {body['model']!r} does not exist on this server; it serves "
                + ", ".join(repr(n) for n in self.engine.served),
                code="model_not_found",
                param="model",
            )
        req_or_error = _parse(body, self.engine, self.max_n, self.engine.served[name])
        if isinstance(req_or_error, tuple):
            return error(400, req_or_error[1], param=req_or_error[0])
        req, loop, events = req_or_error, asyncio.get_running_loop(), asyncio.Queue()

        def emit(event: tuple) -> None:
            with contextlib.suppress(RuntimeError):  # the loop is gone (shutdown): nobody is listening any more
                loop.call_soon_threadsafe(events.put_nowait, event)

        req.emit = emit
        self.worker.submit(req)
        self.stats["requests"] += 1
        deadline = time.monotonic() + self.request_timeout_s if self.request_timeout_s else None
        log.debug(
            "request %s: %d prompt tokens, n=%d, max_tokens=%d", req.id, len(req.prompt_ids), req.n, req.max_tokens
        )
        return Submitted(req, events, deadline, self.request_timeout_s)

    async def chat(self, request: Request) -> Any:
        try:
            body = await request.json()
        except ValueError:
            return error(400, "body is not valid JSON")
        sub = self.submit(body)
        if isinstance(sub, JSONResponse):
            return sub
        headers = {"x-request-id": sub.req.id}
        if sub.req.stream:
            events = _sse(sub.req, sub.req.model, lambda: sub.next_event(request), body, self.stats)
            return StreamingResponse(events, headers=headers, media_type="text/event-stream")
        return await self._complete(sub, request, headers)

    async def _complete(self, sub: Submitted, request: Request, headers: dict) -> JSONResponse:
        """The whole answer as one chat.completion object."""
        req = sub.req
        choices: list[Choice | None] = [None] * req.n
        try:
            while any(c is None for c in choices):
                kind, index, payload, *_ = await sub.next_event(request)
                if kind == "error":
                    return error(500, f"generation failed: {payload}", "server_error", headers)
                if kind == "done":
                    choices[index] = payload
        except TimeoutError as e:
            self.stats["timeouts"] += 1
            return error(504, str(e), "timeout", headers)
        finally:
            if any(c is None for c in choices):
                req.cancelled = True  # frees its rows at the next step
        return JSONResponse(headers=headers, content=_completion(req, choices))


class _Unauthorized(Exception):
    pass


def _completion(req: GenRequest, choices: list[Choice]) -> dict:
    return {
        "id": req.id,
        "object": "chat.completion",
        "created": int(time.time()),
        "model": req.model,
        "choices": [
            {
                "index": k,
                "message": {"role": "assistant", "content": c.text},
                "finish_reason": c.finish_reason,
                "logprobs": None if c.logprobs is None else {"content": c.logprobs},
            }
            for k, c in enumerate(choices)
        ],
        "usage": _usage(req, sum(c.completion_tokens for c in choices)),
    }


def _usage(req: GenRequest, completion_tokens: int) -> dict:
    prompt = len(req.prompt_ids) * req.n
    return {"prompt_tokens": prompt, "completion_tokens": completion_tokens, "total_tokens": prompt + completion_tokens}


def _parse(body: Any, engine: DecodeEngine, max_n: int, served: ServedModel) -> GenRequest | tuple[str, str]:
    """A GenRequest for the `served` model from a request body, or (field, why it is refused), answered 400 as
    OpenAI does. The model's own end-of-turn marker (Baize's `[|Human|]`) is added to the request's stops."""
    if not isinstance(body, dict):
        return "body", "the body must be a JSON object"
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        return "messages", "'messages' must be a non-empty list"
    for k, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            return f"messages[{k}]", f"messages[{k}] must be an object with a 'role'"
        if not isinstance(m.get("content"), str):
            return f"messages[{k}].content", f"messages[{k}] needs 'content' as a string"

    def get(key: str, default: Any, kind: type | tuple) -> Any:
        value = body.get(key)
        if value is None:
            return default
        if not isinstance(value, kind) or isinstance(value, bool) and kind is not bool:
            raise TypeError(key)
        return value

    try:
        stop = get("stop", [], (str, list))
        stop = [stop] if isinstance(stop, str) else stop
        if not all(isinstance(x, str) for x in stop):
            raise TypeError("stop")
        max_tokens = get("max_tokens", get("max_completion_tokens", 256, int), int)
        temperature = float(get("temperature", 1.0, (int, float)))
        top_p = float(get("top_p", 1.0, (int, float)))
        n, seed = get("n", 1, int), get("seed", None, int)
        logprobs, top_logprobs = get("logprobs", False, bool), get("top_logprobs", 0, int)
        stream = get("stream", False, bool)
    except TypeError as e:
        kinds = {
            "stop": "a string or a list of strings",
            "logprobs": "a boolean",
            "stream": "a boolean",
            "temperature": "a number",
            "top_p": "a number",
        }
        return str(e), f"'{e}' must be {kinds.get(str(e), 'an integer')}"
    if max_tokens < 1:
        return "max_tokens", f"max_tokens={max_tokens}: must be >= 1"
    if not 0 <= temperature <= 2:  # NaN fails this too
        return "temperature", f"temperature={temperature}: must be between 0 and 2"
    if not 0 < top_p <= 1:
        return "top_p", f"top_p={top_p}: must be > 0 and <= 1"
    if not 1 <= n <= max_n:
        return "n", f"n={n}: must be between 1 and this server's max_n ({max_n}; max_batch by default)"
    if logprobs and not 0 <= top_logprobs <= 20:
        return "top_logprobs", "top_logprobs must be between 0 and 20"
    try:
        prompt_ids = engine.encode_chat(messages, served.name)
    except Exception as e:  # a template that cannot render these messages (e.g. roles it does not know)
        return "messages", f"the messages cannot be rendered in {served.name}'s prompt format ({served.fmt.label}): {e}"
    if len(prompt_ids) >= engine.max_positions:
        return "messages", (
            f"the prompt has {len(prompt_ids)} tokens; this model's maximum context length is "
            f"{engine.max_positions} (context_length_exceeded)"
        )
    return GenRequest(
        prompt_ids=prompt_ids,
        max_tokens=max_tokens,
        temperature=temperature,
        top_p=top_p,
        n=n,
        stop=stop + [s for s in served.fmt.stop if s not in stop],
        seed=seed,
        top_logprobs=top_logprobs if logprobs else None,
        stream=stream,
        model=served.name,
        adapter=served.adapter,
    )


async def _sse(req: GenRequest, model: str, next_event: Callable, body: dict, stats: dict):
    """Server-sent events as the openai client reads them: chat.completion.chunk objects, then [DONE]."""
    created = int(time.time())

    def chunk(choices: list[dict], **extra: Any) -> str:
        obj = {
            "id": req.id,
            "object": "chat.completion.chunk",
            "created": created,
            "model": model,
            "choices": choices,
            **extra,
        }
        return f"data: {json.dumps(obj)}\n\n"

    def choice(index: int, delta: dict, logprobs: list | None = None, finish: str | None = None) -> dict:
        lp = {"content": logprobs} if req.top_logprobs is not None and logprobs is not None else None
        return {"index": index, "delta": delta, "logprobs": lp, "finish_reason": finish}

    done = 0
    completion = 0
    try:
        yield chunk([choice(k, {"role": "assistant", "content": ""}) for k in range(req.n)])
        while done < req.n:
            try:
                kind, index, payload, *rest = await next_event()
            except TimeoutError as e:
                stats["timeouts"] += 1
                yield f"data: {json.dumps({'error': {'message': str(e), 'type': 'timeout'}})}\n\n"
                return
            if kind == "error":
                yield f"data: {json.dumps({'error': {'message': payload, 'type': 'server_error'}})}\n\n"
                return
            if kind == "delta":
                yield chunk([choice(index, {"content": payload}, rest[0])])
            elif kind == "done":
                c: Choice = payload
                tail, tail_logprobs = rest
                done += 1
                completion += c.completion_tokens
                if tail or tail_logprobs:
                    yield chunk([choice(index, {"content": tail}, tail_logprobs)])
                yield chunk([choice(index, {}, None, c.finish_reason)])
        if (body.get("stream_options") or {}).get("include_usage"):
            yield chunk([], usage=_usage(req, completion))
        yield "data: [DONE]\n\n"
    finally:
        if done < req.n:
            req.cancelled = True  # the client went away or timed out: free the rows
