"""The HTTP side of the server: OpenAI's chat completions API, its errors, and server-sent events."""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import logging
import time
from collections.abc import Callable
from typing import Any

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

from baize_exp.serve.engine import Choice, DecodeEngine, GenRequest
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
    """The HTTP side. `aliases`: other model names answered as the served one (e.g. the conf/model option)."""
    app = FastAPI(title="baize_exp local OpenAI-compatible server")
    engine = worker.engine
    stats = {"requests": 0, "rejected_429": 0, "timeouts": 0}
    names = {engine.model_name, *aliases}
    max_n = max_n or worker.max_batch

    def error(
        status: int,
        message: str,
        etype: str = "invalid_request_error",
        headers: dict | None = None,
        code: str | None = None,
        param: str | None = None,
    ):
        return JSONResponse(
            status_code=status,
            headers=headers,
            content={"error": {"message": message, "type": etype, "param": param, "code": code}},
        )

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception):  # JSON like every other answer, never plain text
        log.exception("unhandled error")
        return error(500, f"internal error: {type(exc).__name__}: {exc}", "server_error")

    def check_key(request: Request) -> None:
        if api_key and request.headers.get("authorization", "") != f"Bearer {api_key}":
            raise _Unauthorized()

    @app.exception_handler(QueueFull)
    async def _queue_full(request: Request, exc: QueueFull):
        stats["rejected_429"] += 1
        return error(429, str(exc), "rate_limit_error", {"Retry-After": str(RETRY_AFTER_S)})

    @app.exception_handler(_Unauthorized)
    async def _unauthorized(request: Request, exc: Exception):
        return error(401, "invalid API key", "authentication_error")

    api = APIRouter(prefix="/v1", dependencies=[Depends(check_key)])

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": engine.model_name, **stats, **worker.stats()}

    @api.get("/models")
    async def models():
        return {"object": "list", "data": [{"id": engine.model_name, "object": "model", "owned_by": "baize_exp"}]}

    @api.post("/chat/completions")
    async def chat(request: Request):
        try:
            body = await request.json()
        except ValueError:
            return error(400, "body is not valid JSON")
        if isinstance(body, dict) and body.get("model") is not None and body["model"] not in names:
            return error(
                404,
                f"The model {body['model']!r} does not exist on this server; it serves {engine.model_name!r}",
                code="model_not_found",
                param="model",
            )
        req_or_error = _parse(body, engine, max_n)
        if isinstance(req_or_error, tuple):
            return error(400, req_or_error[1], param=req_or_error[0])
        req = req_or_error
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[tuple] = asyncio.Queue()

        def emit(event: tuple) -> None:
            with contextlib.suppress(RuntimeError):  # the loop is gone (shutdown): nobody is listening any more
                loop.call_soon_threadsafe(events.put_nowait, event)

        req.emit = emit
        worker.submit(req)  # QueueFull -> 429
        stats["requests"] += 1
        deadline = time.monotonic() + request_timeout_s if request_timeout_s else None
        headers = {"x-request-id": req.id}
        log.debug(
            "request %s: %d prompt tokens, n=%d, max_tokens=%d", req.id, len(req.prompt_ids), req.n, req.max_tokens
        )

        async def next_event() -> tuple:
            """The worker's next event; raises TimeoutError past the deadline or when the client has gone."""
            while True:
                left = deadline - time.monotonic() if deadline else 1.0
                if left <= 0:
                    raise TimeoutError(f"not done within the server's request timeout ({request_timeout_s:g}s)")
                try:
                    return await asyncio.wait_for(events.get(), min(left, 1.0))
                except TimeoutError:
                    if await request.is_disconnected():
                        raise TimeoutError("the client went away") from None

        if req.stream:
            return StreamingResponse(
                _sse(req, engine.model_name, next_event, body, stats), headers=headers, media_type="text/event-stream"
            )
        choices: list[Choice | None] = [None] * req.n
        try:
            while any(c is None for c in choices):
                kind, index, payload, *_ = await next_event()
                if kind == "error":
                    return error(500, f"generation failed: {payload}", "server_error", headers)
                if kind == "done":
                    choices[index] = payload
        except TimeoutError as e:
            stats["timeouts"] += 1
            return error(504, str(e), "timeout", headers)
        finally:
            if any(c is None for c in choices):
                req.cancelled = True  # frees its rows at the next step
        completion = sum(c.completion_tokens for c in choices)
        return JSONResponse(
            headers=headers,
            content={
                "id": req.id,
                "object": "chat.completion",
                "created": int(time.time()),
                "model": engine.model_name,
                "choices": [
                    {
                        "index": k,
                        "message": {"role": "assistant", "content": c.text},
                        "finish_reason": c.finish_reason,
                        "logprobs": None if c.logprobs is None else {"content": c.logprobs},
                    }
                    for k, c in enumerate(choices)
                ],
                "usage": _usage(req, completion),
            },
        )

    app.include_router(api)
    return app


class _Unauthorized(Exception):
    pass


def _usage(req: GenRequest, completion_tokens: int) -> dict:
    prompt = len(req.prompt_ids) * req.n
    return {"prompt_tokens": prompt, "completion_tokens": completion_tokens, "total_tokens": prompt + completion_tokens}


def _parse(body: Any, engine: DecodeEngine, max_n: int) -> GenRequest | tuple[str, str]:
    """A GenRequest from a request body, or (field, why it is refused), answered 400 as OpenAI does."""
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
        prompt_ids = engine.encode_chat(messages)
    except Exception as e:  # a template that cannot render these messages (e.g. roles it does not know)
        return "messages", f"the messages cannot be rendered with the model's chat template: {e}"
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
        stop=stop,
        seed=seed,
        top_logprobs=top_logprobs if logprobs else None,
        stream=stream,
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


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
