"""Concurrent chat completions through the `openai` AsyncOpenAI client.

The client's own retry (exponential backoff, honours Retry-After) handles 429/5xx/timeouts; what still fails is
returned per request as a `ChatResult` with `error` set, so a caller records it instead of losing it. An
authentication or permission error stops everything at once: retrying a bad key only burns quota.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import openai
from tqdm.auto import tqdm


class ChatError(RuntimeError):
    """A backend problem that must stop the run (bad key, missing key, unreachable endpoint)."""


@dataclass
class ChatResult:
    texts: list[str] = field(default_factory=list)  # one per choice (n)
    finish_reasons: list[str] = field(default_factory=list)
    usage: dict[str, int] = field(default_factory=dict)
    logprobs: list[Any] | None = None
    error: str | None = None  # set when the request failed after retries

    @property
    def text(self) -> str:
        return self.texts[0] if self.texts else ""


class ChatClient:
    def __init__(self, base_url: str | None, api_key: str, model: str, *, temperature: float = 0.7,
                 top_p: float = 1.0, max_tokens: int = 256, concurrency: int = 8, timeout_s: float = 120.0,
                 max_retries: int = 3, role: str = "teacher"):
        self.base_url, self._api_key, self.model, self.role = base_url, api_key, model, role
        self.defaults = dict(temperature=temperature, top_p=top_p, max_tokens=max_tokens)
        self.concurrency, self.timeout_s, self.max_retries = concurrency, timeout_s, max_retries
        self.requests = 0

    @classmethod
    def from_config(cls, bcfg: Any, base_url: str | None = None, api_key: str | None = None,
                    role: str = "teacher") -> ChatClient:
        """Build from a teacher/judge config; the key comes from the environment, never from the config."""
        if api_key is None:
            api_key = os.environ.get(bcfg.api_key_env)
            if not api_key:
                raise ChatError(f"{role}={bcfg.backend} needs an API key in the environment variable "
                                f"{bcfg.api_key_env!r} ({role}.api_key_env names it); it is not set")
        return cls(base_url if base_url is not None else bcfg.base_url, api_key, bcfg.model,
                   temperature=bcfg.temperature, top_p=bcfg.top_p, max_tokens=bcfg.max_tokens,
                   concurrency=bcfg.concurrency, timeout_s=bcfg.timeout_s, max_retries=bcfg.max_retries, role=role)

    def __repr__(self) -> str:  # never show the key
        return f"ChatClient(role={self.role!r}, model={self.model!r}, base_url={self.base_url!r})"

    def complete_many(self, conversations: Sequence[list[dict]], desc: str | None = None,
                      **params: Any) -> list[ChatResult]:
        """Send every conversation (a list of messages), `concurrency` at a time; results in input order."""
        return asyncio.run(self._complete_many(list(conversations), desc, params))

    def complete(self, messages: list[dict], **params: Any) -> ChatResult:
        return self.complete_many([messages], **params)[0]

    async def _complete_many(self, convs: list[list[dict]], desc: str | None, params: dict) -> list[ChatResult]:
        client = openai.AsyncOpenAI(base_url=self.base_url, api_key=self._api_key, timeout=self.timeout_s,
                                    max_retries=self.max_retries)
        sem = asyncio.Semaphore(self.concurrency)
        bar = tqdm(total=len(convs), desc=desc or f"{self.role} requests", unit="req", disable=not desc)
        fatal: list[BaseException] = []

        async def one(messages: list[dict]) -> ChatResult:
            async with sem:
                if fatal:
                    return ChatResult(error="cancelled after a fatal error")
                kw = {**self.defaults, **params}
                try:
                    self.requests += 1
                    resp = await client.chat.completions.create(model=self.model, messages=messages, **kw)
                except (openai.AuthenticationError, openai.PermissionDeniedError) as e:
                    fatal.append(e)
                    raise ChatError(f"{self.role} at {self.base_url or 'api.openai.com'} refused the API key "
                                    f"({type(e).__name__}, HTTP {e.status_code}); check the key, nothing was "
                                    f"retried") from None
                except openai.APIConnectionError as e:
                    return ChatResult(error=f"connection: {type(e).__name__}: {e}")
                except openai.APIStatusError as e:
                    return ChatResult(error=f"http {e.status_code}: {str(e)[:300]}")
                except openai.APIError as e:
                    return ChatResult(error=f"{type(e).__name__}: {str(e)[:300]}")
                finally:
                    bar.update(1)
                if not resp.choices:
                    return ChatResult(error="reply has no choices")
                usage = resp.usage.model_dump() if resp.usage else {}
                return ChatResult(
                    texts=[c.message.content or "" for c in resp.choices],
                    finish_reasons=[c.finish_reason or "" for c in resp.choices],
                    usage={k: usage.get(k) or 0 for k in ("prompt_tokens", "completion_tokens")},
                    logprobs=[c.logprobs.model_dump() if c.logprobs else None for c in resp.choices],
                )

        try:
            return list(await asyncio.gather(*(one(m) for m in convs)))
        finally:
            bar.close()
            await client.close()
