"""Concurrent chat completions through the `openai` AsyncOpenAI client, with our own limits and retries.

The openai client's built-in retry is switched off (`max_retries=0`) and done here instead, because a collection of
100k dialogs needs what it cannot give: a shared requests/min and tokens/min budget, a pause of *every* request when
one gets a 429 with Retry-After, retry counts for the progress bar, and retries of replies that arrive but are
unusable (not JSON, no choices). Backoff is exponential with jitter, so a burst of failures does not come back as a
synchronised burst of retries.

Failures come in three kinds:
- transient (timeouts, 5xx, connection errors, 429 and unusable replies after `max_retries`): returned as a
  `ChatResult` with `error` set and `transient=True`, so the caller records it and a rerun asks again;
- about one request (a 400 for a prompt that is too long or refused by a content filter, or any 400 once other
  requests have succeeded): a `ChatResult` with `transient=False`, a reject for that record only;
- about every request (401/403 key, 404 model or path, a 400 before anything succeeded: a bad model name or
  sampling setting): `ChatError`, which stops the run at once, since every other request would fail the same way.
A remote endpoint gets the first request of a session alone, then the rest fan out, so a wrong key or model costs
exactly one request. When `stop_after_failures` attempts in a row fail for transient reasons with no success in
between, and at least one of them was sent after the first of them had failed (so a batch of requests that time out
together on a busy server is one observation, not `concurrency` of them), the endpoint is down: every request still
waiting gets `ChatOutage` (an `Interrupted`, resumable) instead of burning its retries. The API key is held
privately and scrubbed from every message.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import re
import time
from collections import Counter
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import openai
from openai.types.chat import ChatCompletion
from tqdm.auto import tqdm

from baize_exp.errors import Interrupted, UserError

log = logging.getLogger(__name__)
FATAL_STATUS = (401, 403, 404)  # the key, the model or the path is wrong: no retry, stop the run
RETRY_STATUS = (408, 409, 429)  # plus every 5xx
# 400s that concern one request's content (OpenAI's and vLLM's codes and wordings), never the run's settings
ONE_REQUEST_400 = re.compile(
    r"context_length_exceeded|maximum context length|string_above_max_length|too long|"
    r"content_filter|content_policy|invalid_prompt|prompt is too long",
    re.IGNORECASE,
)


class ChatError(UserError, RuntimeError):
    """A backend problem that must stop the run (bad key, bad request, missing key, unreachable endpoint)."""


class ChatOutage(Interrupted):
    """The endpoint failed `stop_after_failures` attempts in a row for transient reasons: stop asking, resume later."""


@dataclass
class ChatResult:
    texts: list[str] = field(default_factory=list)  # one per choice (n)
    finish_reasons: list[str] = field(default_factory=list)
    usage: dict[str, int] = field(default_factory=dict)
    logprobs: list[Any] | None = None
    error: str | None = None  # set when the request failed after retries
    transient: bool = False  # the error may go away on a later try (timeout, 5xx, connection, 429, unusable reply)
    attempts: int = 0  # requests sent for this result (1 + retries)

    @property
    def text(self) -> str:
        return self.texts[0] if self.texts else ""


class _Bucket:
    """A token bucket holding one second's worth; a cost above that is let through into debt, so any request
    eventually goes and the average rate still holds."""

    def __init__(self, per_min: float):
        self.rate = per_min / 60.0
        self.capacity = max(1.0, self.rate)
        self.level, self.t = self.capacity, time.monotonic()

    def wait_s(self, cost: float, now: float) -> float:
        self.level = min(self.capacity, self.level + (now - self.t) * self.rate)
        self.t = now
        need = min(cost, self.capacity) - self.level
        return need / self.rate if need > 0 else 0.0


class RateLimiter:
    """Requests/min and tokens/min budgets (None = unlimited), plus a shared pause after a 429's Retry-After.

    Tokens are reserved up front (prompt estimate + max_tokens) and settled with the reply's real usage.
    """

    def __init__(self, requests_per_min: float | None = None, tokens_per_min: float | None = None):
        self.req = _Bucket(requests_per_min) if requests_per_min else None
        self.tok = _Bucket(tokens_per_min) if tokens_per_min else None
        self.paused_until = 0.0

    async def acquire(self, tokens: float) -> None:
        while True:
            now = time.monotonic()
            wait = max(
                self.paused_until - now,
                self.req.wait_s(1, now) if self.req else 0.0,
                self.tok.wait_s(tokens, now) if self.tok else 0.0,
            )
            if wait <= 0:
                if self.req:
                    self.req.level -= 1
                if self.tok:
                    self.tok.level -= tokens
                return
            await asyncio.sleep(wait)

    def settle(self, reserved: float, used: float) -> None:
        if self.tok:
            self.tok.level = min(self.tok.capacity, self.tok.level + reserved - used)

    def pause(self, seconds: float) -> None:
        self.paused_until = max(self.paused_until, time.monotonic() + seconds)


def retry_after_s(headers: Any) -> float | None:
    """Seconds a server asked us to wait (`retry-after-ms`, or `Retry-After` in seconds); None if absent/unparsable."""
    if headers is None:
        return None
    for name, scale in (("retry-after-ms", 1000.0), ("retry-after", 1.0)):
        value = headers.get(name)
        if value is not None:
            try:
                return max(0.0, float(value) / scale)
            except ValueError:
                continue  # an HTTP date: fall back to our own backoff
    return None


def estimate_tokens(messages: list[dict]) -> int:
    """A cheap upper-ish estimate of prompt tokens (4 characters a token) for the tokens/min budget."""
    return sum(len(str(m.get("content") or "")) for m in messages) // 4 + 4 * len(messages)


class ChatClient:
    """One chat model at one endpoint: concurrency, rate limits, retries, usage and cost accounting.

    Use `complete_many` from synchronous code, or `async with client.session(): await client.acomplete(...)`
    inside an event loop (what the collect engine does, so each dialog is written the moment it is done).
    """

    def __init__(
        self,
        base_url: str | None,
        api_key: str,
        model: str,
        *,
        temperature: float = 0.7,
        top_p: float = 1.0,
        max_tokens: int = 256,
        concurrency: int = 8,
        timeout_s: float | None = 120.0,
        max_retries: int = 3,
        role: str = "teacher",
        requests_per_min: float | None = None,
        tokens_per_min: float | None = None,
        backoff_base_s: float = 1.0,
        backoff_max_s: float = 60.0,
        prices: dict[str, Any] | None = None,
        probe_first: bool = True,
        stop_after_failures: int = 16,
    ):
        self.base_url, self._api_key, self.model, self.role = base_url, api_key, model, role
        self.defaults = dict(temperature=temperature, top_p=top_p, max_tokens=max_tokens)
        self.concurrency, self.timeout_s, self.max_retries = concurrency, timeout_s, max_retries
        self.backoff_base_s, self.backoff_max_s = backoff_base_s, backoff_max_s
        self.limiter = RateLimiter(requests_per_min, tokens_per_min)
        self.prices = {k: dict(v) for k, v in (prices or {}).items()}  # model -> {prompt, completion} $/1M tokens
        self.requests = 0  # requests sent, retries included
        self.retries = 0
        self.usage: Counter[str] = Counter()  # prompt_tokens, completion_tokens (this client's model)
        self._aclient: openai.AsyncOpenAI | None = None
        self._sem: asyncio.Semaphore | None = None
        self._fatal: ChatError | ChatOutage | None = None
        self.probe_first, self.stop_after_failures = probe_first, stop_after_failures
        self._probe: asyncio.Event | None = None  # set once the session's first request has an answer
        self._probing = False
        self.failures_in_a_row = 0  # transient failed attempts since the last success
        self._streak_began = 0.0  # when the first of those failed
        self._failed_again = False  # one of them was sent after that: the endpoint failed after we saw it fail
        self._recent_errors: list[str] = []
        self.succeeded = False  # a request got a reply in this client's life (a later 400 is then per request)

    @classmethod
    def from_config(
        cls,
        bcfg: Any,
        base_url: str | None = None,
        api_key: str | None = None,
        role: str = "teacher",
        probe_first: bool = True,
    ) -> ChatClient:
        """Build from a teacher/judge config; the key comes from the environment, never from the config.
        `probe_first=False` for the run's own server, whose key the run made and whose only clients are the run."""
        if api_key is None:
            api_key = os.environ.get(bcfg.api_key_env)
            if not api_key:
                raise ChatError(
                    f"{role}={bcfg.backend} needs an API key in the environment variable "
                    f"{bcfg.api_key_env!r} ({role}.api_key_env names it); it is not set"
                )
        return cls(
            base_url if base_url is not None else bcfg.base_url,
            api_key,
            bcfg.model,
            temperature=bcfg.temperature,
            top_p=bcfg.top_p,
            max_tokens=bcfg.max_tokens,
            concurrency=bcfg.concurrency,
            timeout_s=bcfg.timeout_s,
            max_retries=bcfg.max_retries,
            role=role,
            requests_per_min=bcfg.requests_per_min,
            tokens_per_min=bcfg.tokens_per_min,
            backoff_base_s=bcfg.backoff_base_s,
            backoff_max_s=bcfg.backoff_max_s,
            prices=dict(bcfg.prices),
            probe_first=probe_first,
            stop_after_failures=bcfg.stop_after_failures,
        )

    def __repr__(self) -> str:  # never show the key
        return f"ChatClient(role={self.role!r}, model={self.model!r}, base_url={self.base_url!r})"

    # --- accounting --------------------------------------------------------------------------------------------

    def usage_report(self) -> dict[str, dict]:
        """{model: {requests, prompt_tokens, completion_tokens, cost_usd}}; cost_usd is None for a model missing
        from the price table (a warning says so), never a silent 0."""
        price = self.prices.get(self.model)
        if price is None and self.usage:
            log.warning(
                "%s: no price for model %r in %s.prices; its cost is not estimated", self.role, self.model, self.role
            )
        cost = (
            None
            if price is None
            else (self.usage["prompt_tokens"] * price["prompt"] + self.usage["completion_tokens"] * price["completion"])
            / 1e6
        )
        return {
            self.model: {
                "requests": self.requests,
                "prompt_tokens": self.usage["prompt_tokens"],
                "completion_tokens": self.usage["completion_tokens"],
                "cost_usd": cost,
            }
        }

    # --- async API ---------------------------------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def session(self) -> AsyncIterator[ChatClient]:
        """The HTTP client and concurrency limit, bound to the running event loop."""
        self._aclient = openai.AsyncOpenAI(
            base_url=self.base_url, api_key=self._api_key, timeout=self.timeout_s, max_retries=0
        )
        self._sem = asyncio.Semaphore(self.concurrency)
        self._fatal = None
        self._probe, self._probing = asyncio.Event(), False
        if not self.probe_first:
            self._probe.set()
        try:
            yield self
        finally:
            await self._aclient.close()
            self._aclient = self._sem = None

    async def acomplete(self, messages: list[dict], **params: Any) -> ChatResult:
        """One chat completion with limits and retries; raises ChatError on a request the endpoint refuses and
        ChatOutage once the endpoint looks down (see the module docstring)."""
        if self._aclient is None or self._sem is None or self._probe is None:
            raise RuntimeError("ChatClient.acomplete needs `async with client.session():`")
        kw = {**self.defaults, **params}
        reserve = estimate_tokens(messages) + (kw.get("max_tokens") or 0) * (kw.get("n") or 1)
        attempts = 0
        probing = False
        if not self._probe.is_set():
            if self._probing:
                await self._probe.wait()  # the first request goes alone; the rest follow once it has an answer
            else:
                self._probing = probing = True
        try:
            while True:
                wait: float | None = None
                async with self._sem:
                    await self.limiter.acquire(reserve)
                    if self._fatal:  # checked after every wait: a request queued behind a fatal one is never sent
                        raise self._fatal
                    attempts += 1
                    self.requests += 1
                    sent_at = time.monotonic()
                    try:
                        # `post` is what `chat.completions.create` ends in, minus its walk of the typed params over
                        # every message (~25% of the client's CPU per request, measured); same errors, same parsing.
                        resp = await self._aclient.post(
                            "/chat/completions",
                            cast_to=ChatCompletion,
                            body={"model": self.model, "messages": messages, **kw},
                        )
                    except openai.APIStatusError as e:
                        self.limiter.settle(reserve, 0)
                        error = f"http {e.status_code}: {self._scrub(e.message)}"
                        if e.status_code in FATAL_STATUS or (e.status_code == 400 and self._fatal_400(e)):
                            self._fatal = ChatError(self._fatal_message(e))
                            raise self._fatal from None
                        if e.status_code not in RETRY_STATUS and e.status_code < 500:
                            return ChatResult(error=error, attempts=attempts)  # about this request only
                        wait = retry_after_s(e.response.headers)
                        if wait is not None:
                            self.limiter.pause(wait)  # everyone waits, not just this request
                    except openai.APITimeoutError:
                        self.limiter.settle(reserve, 0)
                        error = f"timeout after {self.timeout_s:g}s"
                    except openai.APIConnectionError as e:
                        self.limiter.settle(reserve, 0)
                        error = f"connection: {self._scrub(str(e))}"
                    except (openai.APIResponseValidationError, ValueError) as e:  # 200 with a body that is no reply
                        self.limiter.settle(reserve, 0)
                        error = f"malformed reply: {self._scrub(str(e))[:200]}"
                    else:
                        usage = resp.usage.model_dump() if resp.usage else {}
                        usage = {k: usage.get(k) or 0 for k in ("prompt_tokens", "completion_tokens")}
                        self.usage.update(usage)
                        self.limiter.settle(reserve, usage["prompt_tokens"] + usage["completion_tokens"])
                        if isinstance(resp, str) or not resp.choices:
                            error = "malformed reply: not JSON" if isinstance(resp, str) else "reply has no choices"
                        else:
                            self.succeeded, self.failures_in_a_row = True, 0
                            return ChatResult(
                                texts=[c.message.content or "" for c in resp.choices],
                                finish_reasons=[c.finish_reason or "" for c in resp.choices],
                                usage=usage,
                                logprobs=[c.logprobs.model_dump() if c.logprobs else None for c in resp.choices],
                                attempts=attempts,
                            )
                    self._count_failure(error, sent_at)
                if probing:  # a transient failure says nothing about the key: let the others go
                    self._probe.set()
                if attempts > self.max_retries:
                    return ChatResult(
                        error=f"{error} (gave up after {attempts} attempts)", transient=True, attempts=attempts
                    )
                self.retries += 1
                await asyncio.sleep(self._backoff_s(attempts, wait))
        finally:
            if probing:
                self._probe.set()

    def _count_failure(self, error: str, sent_at: float) -> None:
        """One more transient failure in a row; at `stop_after_failures`, one of them sent after the streak's
        first failure, the endpoint is taken as down."""
        now = time.monotonic()
        if self.failures_in_a_row == 0:
            self._streak_began, self._failed_again = now, False
        elif sent_at >= self._streak_began:
            self._failed_again = True
        self.failures_in_a_row += 1
        self._recent_errors = (self._recent_errors + [re.sub(r"\d+(\.\d+)?s\b", "Ns", error)[:120]])[-64:]
        down = self.failures_in_a_row >= self.stop_after_failures and self._failed_again
        if self.stop_after_failures and down and not self._fatal:
            common = Counter(self._recent_errors[-self.failures_in_a_row :]).most_common(2)
            what = "; ".join(f"{e} (x{n})" for e, n in common)
            hint = f"raise {self.role}.stop_after_failures to wait longer"
            if common[0][0].startswith("timeout"):
                hint = f"raise {self.role}.timeout_s or lower {self.role}.concurrency if the server is just slow"
            self._fatal = ChatOutage(
                f"{self.role} at {self.base_url or 'api.openai.com'}: the last {self.failures_in_a_row} attempts "
                f"all failed ({what}) with no success in between, so the endpoint looks down or overloaded; "
                f"stopped early instead of retrying every request ({hint})"
            )

    def _fatal_400(self, e: openai.APIStatusError) -> bool:
        """Whether a 400 would hit every request: not when it names a per-request problem (a prompt too long,
        a content filter) and not once other requests have succeeded with the same settings."""
        body = e.body if isinstance(e.body, dict) else {}
        text = " ".join(str(x) for x in (e.message, body.get("code"), body.get("type"), body.get("message")))
        return not self.succeeded and not ONE_REQUEST_400.search(text)

    def _backoff_s(self, attempt: int, retry_after: float | None) -> float:
        """Exponential backoff with jitter (half fixed, half random); at least what Retry-After asked for."""
        if retry_after is not None:
            return retry_after + random.uniform(0, 0.1 * max(retry_after, self.backoff_base_s))
        cap = min(self.backoff_max_s, self.backoff_base_s * 2 ** (attempt - 1))
        return cap / 2 + random.uniform(0, cap / 2)

    def _scrub(self, text: str) -> str:
        text = text.replace(self._api_key, "<api key>") if self._api_key else text
        return re.sub(r"sk-[A-Za-z0-9_\-*]{6,}", "sk-<redacted>", text)[:300]

    def _fatal_message(self, e: openai.APIStatusError) -> str:
        where = f"{self.role} at {self.base_url or 'api.openai.com'}"
        detail = self._scrub(e.message)
        if e.status_code in (401, 403):
            what = (
                f"refused the API key (HTTP {e.status_code}, {type(e).__name__}: {detail}); check the key in "
                f"the environment variable {self.role}.api_key_env names"
            )
        elif e.status_code == 404:
            what = f"does not know model {self.model!r} or the path (HTTP 404: {detail}); check {self.role}.model"
        else:
            what = (
                f"rejected the request as invalid (HTTP {e.status_code}: {detail}); every request would fail "
                f"the same way: check {self.role}.model and the sampling settings"
            )
        return f"{where} {what}. Nothing was retried; the run stops here."

    # --- sync API ----------------------------------------------------------------------------------------------

    def complete_many(
        self, conversations: Sequence[list[dict]], desc: str | None = None, **params: Any
    ) -> list[ChatResult]:
        """Send every conversation (a list of messages), `concurrency` at a time; results in input order."""
        return asyncio.run(self._complete_many(list(conversations), desc, params))

    def complete(self, messages: list[dict], **params: Any) -> ChatResult:
        return self.complete_many([messages], **params)[0]

    async def _complete_many(self, convs: list[list[dict]], desc: str | None, params: dict) -> list[ChatResult]:
        bar = tqdm(total=len(convs), desc=desc or f"{self.role} requests", unit="req", disable=not desc)

        async def one(messages: list[dict]) -> ChatResult:
            try:
                return await self.acomplete(messages, **params)
            except ChatOutage as e:  # the caller keeps what finished and records these as failed for now
                return ChatResult(error=str(e), transient=True)
            finally:
                bar.update(1)

        async with self.session():
            tasks = [asyncio.ensure_future(one(m)) for m in convs]
            try:
                return list(await asyncio.gather(*tasks))
            finally:
                for t in tasks:  # after a fatal error: stop the rest now, not after their retries
                    t.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
                bar.close()
