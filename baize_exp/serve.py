"""The project's OpenAI-compatible chat server over a local model: `python -m baize_exp.serve`.

It is the offline teacher and judge: `teacher=local` starts it on a free 127.0.0.1 port for the run and the real
`openai` client talks to it, so the code path is the one `teacher=openai` uses.

How requests are batched (continuous batching over our own decode loop, no HF `generate`):

- One worker thread owns the model and a running batch: one row per answer being written (a request with `n=4`
  is 4 rows), a left-padded attention mask and one KV cache (`DynamicCache`) shared by all rows.
- Every iteration it first admits waiting requests while rows are free (`max_batch` rows at most). Newcomers are
  prefilled together in one forward pass of their own (left-padded among themselves, prompt once per request, then
  the cache row is repeated `n` times), their first token is sampled, and their cache is merged into the running
  one: both caches are left-padded with zeros to the same length and concatenated along the batch dimension, the
  attention mask padded the same way. This is correct because RoPE was applied to the cached keys with each row's
  own positions (`cumsum(mask) - 1`), so where a row's tokens sit in the cache does not matter; masked columns are
  never attended. Then one decode step feeds every row's last sampled token.
- Every row samples with its own settings: temperature (0 = greedy), top-p, max_tokens, stop strings, and a
  `torch.Generator` seeded by the request's `seed` (one per request, drawn in row order), so a seeded sample does
  not depend on what else shares the batch. A finished row (EOS, stop string, max_tokens, context end) leaves the
  batch at once: its cache row is dropped and all-padding columns on the left are trimmed, so its slot is free for
  the next waiting request at the next token.
- When the batch is empty the worker waits up to `max_wait_ms` after the first arrival so that a burst is
  prefilled together; while a batch runs, newcomers join at the next token without waiting.

HTTP: POST /v1/chat/completions (n, temperature, top_p, max_tokens, stop, seed, logprobs/top_logprobs, usage,
stream=true as server-sent events ending with `data: [DONE]`), GET /v1/models, GET /health. Every reply carries
an `x-request-id`. Bad requests are answered as OpenAI does: 400 with a JSON error naming the field (a message
without content, a stop that is not a string or list of strings, temperature outside [0, 2] or NaN, n above
`--max-n`), 404 `model_not_found` for a model name the server does not serve. At most `queue_size` requests wait
for a row; beyond that the answer is 429 with `Retry-After`. A request whose client went away is dropped from the
batch; there is no deadline unless `--request-timeout-s` sets one (504), because a slow answer on a busy machine
is still an answer. SIGTERM/SIGINT stop accepting connections and finish the requests in flight before exiting.
The worker's torch threads follow the free cores (`baize_exp.cpu`). Binds loopback only unless --allow-remote.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import copy
import ipaddress
import json
import logging
import os
import signal
import socket
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from transformers import DynamicCache

from baize_exp import cpu
from baize_exp.config import ModelConfig, cache_dir
from baize_exp.models import cut_at_stop

log = logging.getLogger("baize_exp.serve")
CONF_DIR = Path(__file__).resolve().parents[1] / "conf"
RETRY_AFTER_S = 1  # what a 429 tells the client to wait; rows free up every token, so retry soon


@dataclass
class GenRequest:
    """One chat completion request as the worker sees it. `emit` hands events to the HTTP side (thread-safe)."""

    prompt_ids: list[int]
    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    n: int = 1
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    top_logprobs: int | None = None  # None = no logprobs; 0.. = logprobs with that many alternatives
    stream: bool = False
    id: str = field(default_factory=lambda: f"chatcmpl-{uuid.uuid4().hex[:24]}")
    # events: ("delta", choice, text, logprobs), ("done", choice, Choice, unsent text, unsent logprobs),
    # ("error", None, message)
    emit: Callable[[tuple], None] = lambda event: None
    cancelled: bool = False  # set by the HTTP side (timeout, client gone); the worker drops the rows
    generator: torch.Generator | None = None

    def __post_init__(self) -> None:
        if self.seed is not None:
            self.generator = torch.Generator().manual_seed(int(self.seed))


@dataclass
class Choice:
    text: str
    finish_reason: str
    completion_tokens: int
    logprobs: list[dict] | None = None


@dataclass
class Row:
    """One answer being written: a row of the running batch."""

    req: GenRequest
    index: int  # choice index within the request
    pending: int = -1  # last sampled token, not yet in the KV cache
    tokens: list[int] = field(default_factory=list)
    logprobs: list[dict] = field(default_factory=list)
    streamed_chars: int = 0
    streamed_logprobs: int = 0
    finish: str | None = None
    text: str = ""


class QueueFull(RuntimeError):
    """More requests are waiting than `queue_size` allows."""


class DecodeEngine:
    """The running batch and its decode loop; used only from the worker thread (see the module docstring)."""

    def __init__(self, model: torch.nn.Module, tokenizer: Any, model_name: str):
        self.model = model.eval()
        self.tok = tokenizer  # the HTTP side encodes prompts with it
        self.detok = copy.deepcopy(tokenizer)  # the worker decodes with its own copy: fast tokenizers are not
        # safe to use from two threads at once
        self.model_name = model_name
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        eos = model.generation_config.eos_token_id
        self.eos_ids = set(eos if isinstance(eos, list) else [eos]) | {tokenizer.eos_token_id}
        self.eos_ids.discard(None)
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        self.config = base.config
        self.max_positions = int(getattr(self.config, "max_position_embeddings", 0) or 1 << 30)
        import inspect

        # transformers 5 names the cache argument `cache`, older releases `past_key_values`
        self.cache_kw = "cache" if "cache" in inspect.signature(base.forward).parameters else "past_key_values"
        self.rows: list[Row] = []
        self.cache: DynamicCache | None = None
        self.mask: torch.Tensor | None = None  # [rows, cache length], 1 = a real token
        self.decode_steps = self.prefills = self.peak_rows = 0

    def encode_chat(self, messages: list[dict]) -> list[int]:
        text = self.tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return self.tok(text, add_special_tokens=False).input_ids

    def _forward(self, ids: torch.Tensor, mask: torch.Tensor, cache: DynamicCache) -> torch.Tensor:
        positions = (mask.cumsum(-1) - 1).clamp(min=0)[:, -ids.shape[1]:]
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True,
                         logits_to_keep=1, **{self.cache_kw: cache})
        return out.logits[:, -1, :].float()

    @torch.no_grad()
    def add(self, reqs: list[GenRequest]) -> list[Row]:
        """Prefill `reqs` together, sample their first tokens, merge them into the running batch.
        Returns the new rows (some may already be finished)."""
        width = max(len(r.prompt_ids) for r in reqs)
        ids = torch.tensor([[self.pad_id] * (width - len(r.prompt_ids)) + r.prompt_ids for r in reqs])
        mask = torch.tensor([[0] * (width - len(r.prompt_ids)) + [1] * len(r.prompt_ids) for r in reqs])
        cache = DynamicCache()
        logits = self._forward(ids, mask, cache)
        self.prefills += 1
        expand = torch.tensor([i for i, r in enumerate(reqs) for _ in range(r.n)])
        new_rows = [Row(r, k) for r in reqs for k in range(r.n)]
        if len(expand) != len(reqs):  # n > 1: the prompt was computed once, its cache row is repeated
            for layer in cache.layers:
                layer.keys, layer.values = layer.keys[expand], layer.values[expand]
            mask, logits = mask[expand], logits[expand]
        self._check_cache(cache)
        if self.cache is None:
            self.cache, self.mask = cache, mask
        else:
            length = max(self.mask.shape[1], mask.shape[1])
            for old, new in zip(self.cache.layers, cache.layers, strict=True):
                old.keys = torch.cat([_pad_left(old.keys, length, -2), _pad_left(new.keys, length, -2)])
                old.values = torch.cat([_pad_left(old.values, length, -2), _pad_left(new.values, length, -2)])
            self.mask = torch.cat([_pad_left(self.mask, length, -1), _pad_left(mask, length, -1)])
        self.rows += new_rows
        self.peak_rows = max(self.peak_rows, len(self.rows))
        self._advance(new_rows, logits)
        return new_rows

    def _check_cache(self, cache: DynamicCache) -> None:
        kinds = {type(layer).__name__ for layer in cache.layers}
        if kinds != {"DynamicLayer"}:
            raise NotImplementedError(f"the server's batch merging needs plain full-attention cache layers; this "
                                      f"model uses {sorted(kinds)} (serve it with vLLM instead)")

    @torch.no_grad()
    def step(self) -> None:
        """Feed every row's pending token; sample the next one per row."""
        ids = torch.tensor([[r.pending] for r in self.rows])
        self.mask = torch.cat([self.mask, torch.ones(len(self.rows), 1, dtype=self.mask.dtype)], dim=1)
        logits = self._forward(ids, self.mask, self.cache)
        self.decode_steps += 1
        self._advance(self.rows, logits)

    def drop_finished(self) -> list[Row]:
        """Take finished (or cancelled) rows out of the batch; their slots are free at once."""
        done = [r for r in self.rows if r.finish is not None or r.req.cancelled]
        if not done:
            return []
        keep = [i for i, r in enumerate(self.rows) if r.finish is None and not r.req.cancelled]
        self.rows = [self.rows[i] for i in keep]
        if not keep:
            self.cache = self.mask = None
            return done
        idx = torch.tensor(keep)
        self.mask = self.mask[idx]
        first = int(self.mask.any(0).nonzero()[0])  # columns left of this are padding in every remaining row
        self.mask = self.mask[:, first:]
        for layer in self.cache.layers:
            layer.keys, layer.values = layer.keys[idx, :, first:], layer.values[idx, :, first:]
        return done

    def _advance(self, rows: list[Row], logits: torch.Tensor) -> None:
        """Sample one token per row with that row's settings and apply the finishing rules."""
        tokens = logits.argmax(-1)
        temps = torch.tensor([r.req.temperature for r in rows])
        sampled = (temps > 0).nonzero().flatten()
        if len(sampled):
            probs = torch.softmax(logits[sampled] / temps[sampled, None], dim=-1)
            for j, i in enumerate(sampled.tolist()):
                tokens[i] = sample_top_p(probs[j], rows[i].req.top_p, rows[i].req.generator)
        want_lp = [i for i, r in enumerate(rows) if r.req.top_logprobs is not None]
        logp = torch.log_softmax(logits[want_lp], -1) if want_lp else None
        for i, (row, tok) in enumerate(zip(rows, tokens.tolist(), strict=True)):
            if tok in self.eos_ids:
                row.finish = "stop"
                continue
            row.pending = tok
            row.tokens.append(tok)
            if logp is not None and i in want_lp:
                row.logprobs.append(self._logprob_entry(logp[want_lp.index(i)], tok, row.req.top_logprobs))
            if row.req.stop or row.req.stream:
                row.text = self.detok.decode(row.tokens, skip_special_tokens=True)
                row.text, stopped = cut_at_stop(row.text, row.req.stop)
                if stopped:
                    row.finish = "stop"
                    continue
            if len(row.tokens) >= row.req.max_tokens or len(row.req.prompt_ids) + len(row.tokens) >= \
                    self.max_positions:
                row.finish = "length"

    def _logprob_entry(self, logp: torch.Tensor, tok: int, top: int) -> dict:
        entry = {"token": self.detok.decode([tok]), "logprob": float(logp[tok]), "bytes": None, "top_logprobs": []}
        if top:
            vals, idx = logp.topk(top)
            entry["top_logprobs"] = [{"token": self.detok.decode([int(k)]), "logprob": float(v), "bytes": None}
                                     for v, k in zip(vals, idx, strict=True)]
        return entry

    def final_choice(self, row: Row) -> Choice:
        text = self.detok.decode(row.tokens, skip_special_tokens=True)
        text = cut_at_stop(text, row.req.stop)[0]
        return Choice(text=text, finish_reason=row.finish or "length", completion_tokens=len(row.tokens),
                      logprobs=row.logprobs if row.req.top_logprobs is not None else None)

    def stream_delta(self, row: Row) -> tuple[str, list[dict]]:
        """The text and logprobs of `row` not yet streamed, holding back what may still change: a partial UTF-8
        character, or a tail that could be the start of a stop string."""
        text = row.text
        hold = 1 if text.endswith("\ufffd") else 0
        for s in row.req.stop:
            hold = max(hold, max((j for j in range(1, min(len(s), len(text) + 1)) if text.endswith(s[:j])),
                                 default=0))
        end = max(row.streamed_chars, len(text) - hold)
        delta, lps = text[row.streamed_chars:end], row.logprobs[row.streamed_logprobs:]
        if delta:
            row.streamed_chars, row.streamed_logprobs = end, len(row.logprobs)
            return delta, lps
        return "", []


def sample_top_p(probs: torch.Tensor, top_p: float, generator: torch.Generator | None,
                 candidates: int = 1024) -> int:
    """Draw one token from `probs` restricted to the smallest set of most likely tokens whose mass reaches
    `top_p` (the most likely token always stays). Inverse-CDF with one uniform draw from `generator`: a full
    sort or `multinomial` over a 49k vocabulary costs more than a small model's decode step on a CPU, so only the
    `candidates` most likely tokens are sorted when they already hold `top_p` of the mass (they almost always do
    for a trained model)."""
    if top_p >= 1:
        values, index = probs, None
    else:
        values, index = probs.topk(min(candidates, probs.numel()))
        if float(values.sum()) < top_p:  # a flat distribution: fall back to sorting everything
            values, index = probs.sort(descending=True)
        keep = (values.cumsum(-1) - values) < top_p
        index, by_id = index[keep].sort()  # draw in token-id order: near-equal probabilities that swap places
        values = values[keep][by_id]  # in a batch (float noise) then move the draw only at a bucket edge
    cdf = values.cumsum(-1)
    u = torch.rand((), generator=generator) * cdf[-1]
    pick = min(int(torch.searchsorted(cdf, u, right=True)), len(cdf) - 1)
    return pick if index is None else int(index[pick])


def _pad_left(t: torch.Tensor, length: int, dim: int) -> torch.Tensor:
    missing = length - t.shape[dim]
    if missing == 0:
        return t
    pad = [0, 0] * (-dim - 1) + [missing, 0]  # F.pad counts dimensions from the last one
    return F.pad(t, pad)


class BatchWorker:
    """One thread owns the model: it admits waiting requests into free rows and steps the running batch."""

    def __init__(self, engine: DecodeEngine, max_batch: int = 16, max_wait_ms: float = 5.0, queue_size: int = 256):
        self.engine, self.max_batch, self.max_wait = engine, max_batch, max_wait_ms / 1000
        self.queue_size = queue_size
        self.waiting: collections.deque[GenRequest] = collections.deque()
        self.cond = threading.Condition()
        self.stopping = False
        self.thread = threading.Thread(target=self._loop, daemon=True, name="batch-worker")
        self.thread.start()

    def submit(self, req: GenRequest) -> None:
        with self.cond:
            if len(self.waiting) >= self.queue_size:
                raise QueueFull(f"{len(self.waiting)} requests are already waiting (serve.queue_size)")
            self.waiting.append(req)
            self.cond.notify()

    def stats(self) -> dict:
        e = self.engine
        return {"active_rows": len(e.rows), "waiting": len(self.waiting), "decode_steps": e.decode_steps,
                "prefills": e.prefills, "peak_rows": e.peak_rows}

    def stop(self, timeout: float = 60.0) -> None:
        """Finish what is in the batch and waiting, then end the thread."""
        with self.cond:
            self.stopping = True
            self.cond.notify()
        self.thread.join(timeout=timeout)

    def _admit(self) -> list[GenRequest]:
        free = self.max_batch - len(self.engine.rows)
        admitted = []
        with self.cond:
            if any(r.cancelled for r in self.waiting):  # timed out or gone while waiting: not worth a row
                self.waiting = collections.deque(r for r in self.waiting if not r.cancelled)
            while self.waiting and self.waiting[0].n <= free:  # first come, first served: no overtaking
                admitted.append(self.waiting.popleft())
                free -= admitted[-1].n
        return admitted

    def _loop(self) -> None:
        while True:
            with self.cond:
                while not self.waiting and not self.engine.rows:
                    if self.stopping:
                        return
                    self.cond.wait()
            if not self.engine.rows and len(self.waiting) < self.max_batch:
                time.sleep(self.max_wait)  # an idle server lets a burst arrive, then prefills it together
            admitted: list[GenRequest] = []
            cpu.fit_threads()  # this thread does the torch work: it takes the cores free now (re-read every 2 s)
            try:
                admitted = self._admit()
                if admitted:
                    self.engine.add(admitted)
                    self._report()
                if self.engine.rows:
                    self.engine.step()
                    self._report()
            except Exception as e:  # a failed forward fails the requests in the batch, not the server
                log.exception("decode step failed")
                failed = {id(r.req): r.req for r in self.engine.rows}
                failed.update({id(r): r for r in admitted if id(r) not in failed})
                self.engine.rows, self.engine.cache, self.engine.mask = [], None, None
                for req in failed.values():
                    req.emit(("error", None, f"{type(e).__name__}: {e}"))

    def _report(self) -> None:
        """Send streamed text for the live rows, and the final answer of the rows that finished."""
        e = self.engine
        for row in e.rows:
            if row.req.stream and row.finish is None and not row.req.cancelled:
                delta, lps = e.stream_delta(row)
                if delta:
                    row.req.emit(("delta", row.index, delta, lps))
        for row in e.drop_finished():
            if not row.req.cancelled:
                # a streamed answer also gets what was held back: the final text minus what was already sent
                final = e.final_choice(row)
                row.req.emit(("done", row.index, final, final.text[row.streamed_chars:],
                              row.logprobs[row.streamed_logprobs:]))


def build_app(worker: BatchWorker, api_key: str | None = None, request_timeout_s: float | None = None,
              max_n: int | None = None, aliases: tuple[str, ...] = ()) -> FastAPI:
    """The HTTP side. `aliases`: other model names answered as the served one (e.g. the conf/model option)."""
    app = FastAPI(title="baize_exp local OpenAI-compatible server")
    engine = worker.engine
    stats = {"requests": 0, "rejected_429": 0, "timeouts": 0}
    names = {engine.model_name, *aliases}
    max_n = max_n or worker.max_batch

    def error(status: int, message: str, etype: str = "invalid_request_error", headers: dict | None = None,
              code: str | None = None, param: str | None = None):
        return JSONResponse(status_code=status, headers=headers,
                            content={"error": {"message": message, "type": etype, "param": param, "code": code}})

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
            return error(404, f"The model {body['model']!r} does not exist on this server; it serves "
                              f"{engine.model_name!r}", code="model_not_found", param="model")
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
        log.debug("request %s: %d prompt tokens, n=%d, max_tokens=%d", req.id, len(req.prompt_ids), req.n,
                  req.max_tokens)

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
            return StreamingResponse(_sse(req, engine.model_name, next_event, body, stats), headers=headers,
                                     media_type="text/event-stream")
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
        return JSONResponse(headers=headers, content={
            "id": req.id, "object": "chat.completion", "created": int(time.time()), "model": engine.model_name,
            "choices": [
                {"index": k, "message": {"role": "assistant", "content": c.text}, "finish_reason": c.finish_reason,
                 "logprobs": None if c.logprobs is None else {"content": c.logprobs}}
                for k, c in enumerate(choices)
            ],
            "usage": _usage(req, completion),
        })

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
        kinds = {"stop": "a string or a list of strings", "logprobs": "a boolean", "stream": "a boolean",
                 "temperature": "a number", "top_p": "a number"}
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
        return "messages", (f"the prompt has {len(prompt_ids)} tokens; this model's maximum context length is "
                            f"{engine.max_positions} (context_length_exceeded)")
    return GenRequest(prompt_ids=prompt_ids, max_tokens=max_tokens, temperature=temperature, top_p=top_p, n=n,
                      stop=stop, seed=seed, top_logprobs=top_logprobs if logprobs else None, stream=stream)


async def _sse(req: GenRequest, model: str, next_event: Callable, body: dict, stats: dict):
    """Server-sent events as the openai client reads them: chat.completion.chunk objects, then [DONE]."""
    created = int(time.time())

    def chunk(choices: list[dict], **extra: Any) -> str:
        obj = {"id": req.id, "object": "chat.completion.chunk", "created": created, "model": model,
               "choices": choices, **extra}
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


def _model_option(model: str) -> Any:
    """The conf/model option named `model`, or None."""
    from omegaconf import OmegaConf

    path = CONF_DIR / "model" / f"{model}.yaml"
    return OmegaConf.merge(OmegaConf.structured(ModelConfig), OmegaConf.load(path)) if path.is_file() else None


def tokenizer_for_serving(model: str, cache_dir: Path) -> Any:
    """The tokenizer the server would use for `model` (see `load_for_serving`), without loading weights."""
    from transformers import AutoTokenizer

    from baize_exp import models as M

    mcfg, p = _model_option(model), Path(model).expanduser()
    if mcfg is not None:
        return M.load_tokenizer(mcfg, cache_dir)
    if p.suffix == ".gguf" and p.is_file():
        return AutoTokenizer.from_pretrained(M.converted_gguf_dir(p, cache_dir))
    return AutoTokenizer.from_pretrained(p)


def load_for_serving(model: str, adapter: str | None, cache_dir: Path) -> tuple[torch.nn.Module, Any, str]:
    """`model` is a conf/model option name, a local HF dir, or a .gguf file."""
    from baize_exp import models as M

    p = Path(model).expanduser()
    if (mcfg := _model_option(model)) is not None:
        net, tok = M.load_model_and_tokenizer(mcfg, cache_dir)
        name = "smollm2-135m-instruct" if mcfg.source == "gguf" else mcfg.name
    elif p.suffix == ".gguf" and p.is_file():
        d = M.converted_gguf_dir(p, cache_dir)
        net, tok = M.AutoModelForCausalLM.from_pretrained(d), M.AutoTokenizer.from_pretrained(d)
        name = p.stem
    elif (p / "config.json").is_file():
        net, tok = M.AutoModelForCausalLM.from_pretrained(p), M.AutoTokenizer.from_pretrained(p)
        name = p.name
    else:
        raise M.ModelLoadError(f"--model {model!r}: not a conf/model option, an HF model dir, or a .gguf file")
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    if adapter:
        net = M.load_adapter(net, adapter)
        name = f"{name}+{Path(adapter).name}"
    return net, tok, name


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m baize_exp.serve", description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2_135m", help="conf/model option, HF model dir, or .gguf file")
    ap.add_argument("--adapter", default=None, help="LoRA adapter dir to put on the model")
    ap.add_argument("--served-name", default=None, help="model id reported to clients")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8000, help="0 picks a free port (see --port-file)")
    ap.add_argument("--port-file", default=None, help="write the bound port here once serving")
    ap.add_argument("--allow-remote", action="store_true", help="allow binding a non-loopback address")
    ap.add_argument("--max-batch", type=int, default=16, help="rows (answers) decoded together at most")
    ap.add_argument("--max-wait-ms", type=float, default=5.0, help="an idle server waits this long to gather a burst")
    ap.add_argument("--queue-size", type=int, default=256, help="requests waiting for a row at most; then 429")
    ap.add_argument("--request-timeout-s", type=float, default=None,
                    help="answer 504 and drop a request not done after this (default: no deadline)")
    ap.add_argument("--max-n", type=int, default=None, help="most answers one request may ask for (default: "
                    "--max-batch)")
    ap.add_argument("--shutdown-timeout-s", type=float, default=60.0,
                    help="on SIGTERM/SIGINT, how long in-flight requests may take to finish")
    ap.add_argument("--api-key-env", default=None, help="require 'Bearer <value of this env var>'")
    ap.add_argument("--cache-dir", default=str(cache_dir()), help="converted models (default: BAIZE_CACHE, else "
                    "~/.cache/baize_exp)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    if not is_loopback(args.host) and not args.allow_remote:
        ap.error(f"--host {args.host} is not a loopback address; pass --allow-remote to expose the server")
    for key in ("max_batch", "queue_size"):
        if getattr(args, key) < 1:
            ap.error(f"--{key.replace('_', '-')} must be >= 1")
    if args.max_wait_ms < 0 or (args.request_timeout_s is not None and args.request_timeout_s <= 0):
        ap.error("--max-wait-ms must be >= 0 and --request-timeout-s > 0")
    if args.max_n is not None and not args.max_n >= 1:
        ap.error("--max-n must be >= 1")
    api_key = os.environ.get(args.api_key_env) if args.api_key_env else None
    if args.api_key_env and not api_key:
        ap.error(f"--api-key-env {args.api_key_env}: that environment variable is empty")

    net, tok, name = load_for_serving(args.model, args.adapter, Path(args.cache_dir).expanduser())
    worker = BatchWorker(DecodeEngine(net, tok, args.served_name or name), args.max_batch, args.max_wait_ms,
                         args.queue_size)
    app = build_app(worker, api_key, args.request_timeout_s, args.max_n, aliases=(args.model,))

    import uvicorn

    family = socket.AF_INET6 if ":" in args.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((args.host, args.port))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning",
                                           timeout_graceful_shutdown=args.shutdown_timeout_s))
    if args.port_file:
        tmp = Path(args.port_file).with_suffix(".tmp")
        tmp.write_text(str(port))
        os.replace(tmp, args.port_file)
    log.info("serving %s on http://%s:%d/v1 (max_batch=%d, queue_size=%d)", worker.engine.model_name, args.host,
             port, args.max_batch, args.queue_size)
    # uvicorn handles the signal (stops accepting, waits for in-flight requests), then re-raises it once it is done;
    # these handlers make that re-raise a no-op so the worker is stopped cleanly and the exit status is 0.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda s, f: log.info("signal %d: in-flight requests finished, exiting", s))
    try:
        server.run(sockets=[sock])
    finally:
        worker.stop()


if __name__ == "__main__":
    main()
