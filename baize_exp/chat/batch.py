"""Chat completions through the OpenAI Batch API: JSONL up, results back within 24 hours, at half the price.

`BatchRunner.run(requests)` takes `(custom_id, chat-completion body)` pairs and returns `{custom_id: ChatResult}`,
the same results the online `ChatClient` gives, so a stage handles both alike. On the way it writes the request
JSONL, splits it by the per-batch limits (requests and bytes), uploads each part (`files.create`), creates a batch
from it (`batches.create`), polls with backoff and a progress bar (`batches.retrieve`), downloads the output and
error files (`files.content`) and maps each line back by `custom_id`. `complete_many` wraps it with the online
client's signature (custom_ids from the request's content), so `ask_parsed` runs over batches unchanged, one batch
per round.

Everything that could cost money twice is written down before the next step, in `state_dir` (one
`chunk-NNNNN.json` per batch, replaced atomically and fsynced):

    writing   the request file is complete locally    -> a rerun drops it (nothing was created)
    uploaded  the input file id is known              -> a rerun looks for a batch made from that file (the kill may
                                                         have hit after the batch was created) and polls it, else
                                                         drops the part (an uploaded file costs nothing)
    created   the batch id is known                   -> a rerun polls the same batch
    done      output and error files are on disk      -> a rerun reads the results from there

So a request with a live or finished batch is never sent again, and a finished result is never lost. A custom_id
is matched together with a hash of its body: the same id with a changed body is a new request.

What comes back per request:
- a completion (`ChatResult.texts`, `usage`, ...);
- a transient failure (`error` set, `transient=True`): an expired or cancelled line, a 5xx or 429 line, a batch that
  failed, expired or was cancelled, a line missing from the results. The caller's next `run` with that request
  submits it again;
- a failure about that request (`transient=False`): a 400 such as a prompt over the context, or a request line
  bigger than `max_bytes`; a rerun returns the same failure without sending it again.
A batch whose every line was refused for the run's settings (401/403/404, or 400 not about one request) raises
`ChatError`, as the online client does; a control call that keeps failing (upload, create, poll) raises `ChatOutage`
(resumable: the state says where to go on).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import random
import time
import uuid
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import openai
from tqdm.auto import tqdm

from baize_exp.chat.client import FATAL_STATUS, ONE_REQUEST_400, RETRY_STATUS, ChatError, ChatOutage, ChatResult
from baize_exp.chat.cost import Budget, Budgeted, price_of, usd
from baize_exp.io import content_hash, file_lock

log = logging.getLogger(__name__)

ENDPOINT = "/v1/chat/completions"
TERMINAL = ("completed", "failed", "expired", "cancelled")
# OpenAI's documented limits for one batch's input file
MAX_REQUESTS = 50_000
MAX_BYTES = 200_000_000
# uploads and downloads of up to 200 MB take longer than a chat request's timeout
TRANSFER_TIMEOUT_S = 1800.0


@dataclass
class Chunk:
    """One batch: what it holds and how far it got (see the module docstring for the states)."""

    seq: int
    requests: dict[str, str]  # custom_id -> body hash
    state: str = "writing"  # writing | uploaded | created | done | dropped
    bytes: int = 0
    input_file_id: str | None = None
    uploaded_at: float | None = None
    batch_id: str | None = None
    batch_status: str | None = None
    output_file_id: str | None = None
    error_file_id: str | None = None
    errors: list[str] = field(default_factory=list)  # the batch's own errors (a failed batch's validation)


def body_hash(body: dict) -> str:
    return content_hash(body, n=16)


class BatchRunner:
    """Chat completions for one model through the Batch API, resumable from `state_dir` (see the module docstring).

    Args:
        client: a synchronous `openai.OpenAI` client for the endpoint (its own retries serve the control calls).
        state_dir: where the batches are recorded (a run dir's `<stage>/batches/`).
        model: the model name `body()` puts in each request.
        defaults: sampling settings `body()` puts in each request unless given (temperature, top_p, max_tokens).
        max_requests, max_bytes: per-batch limits; more work is split into several batches.
        poll_s, poll_max_s: the first wait between polls, and the longest (each poll without progress waits 1.5x).
        max_failures: control calls failing in a row before `ChatOutage`.
        prices: model -> {prompt, completion} USD per 1M tokens at the online price; `discount` applies to batches.
    """

    def __init__(
        self,
        client: openai.OpenAI,
        state_dir: str | Path,
        model: str,
        *,
        defaults: dict[str, Any] | None = None,
        max_requests: int = MAX_REQUESTS,
        max_bytes: int = MAX_BYTES,
        poll_s: float = 30.0,
        poll_max_s: float = 600.0,
        max_failures: int = 8,
        prices: dict[str, Any] | None = None,
        discount: float = 0.5,
        role: str = "teacher",
        progress: bool = True,
    ):
        if max_requests < 1 or max_bytes < 1:
            raise ValueError("max_requests and max_bytes must be >= 1")
        self.client, self.state_dir, self.model, self.role = client, Path(state_dir), model, role
        self.defaults = dict(defaults or {})
        self.max_requests, self.max_bytes = max_requests, max_bytes
        self.poll_s, self.poll_max_s, self.max_failures = poll_s, max(poll_s, poll_max_s), max_failures
        self.prices = {k: dict(v) for k, v in (prices or {}).items()}
        self.discount, self.progress = discount, progress
        self.requests = 0  # result lines this runner downloaded (what its batches were billed for)
        self.usage: Counter[str] = Counter()  # their prompt_tokens, completion_tokens
        self.batches_created = 0

    @classmethod
    def from_config(
        cls,
        bcfg: Any,
        state_dir: str | Path,
        base_url: str | None = None,
        api_key: str | None = None,
        role: str = "teacher",
    ) -> BatchRunner:
        """From a teacher/judge config (`batch_*` fields); the key comes from the environment, never the config."""
        if api_key is None:
            api_key = os.environ.get(bcfg.api_key_env)
            if not api_key:
                raise ChatError(
                    f"{role}.batch=true needs an API key in the environment variable {bcfg.api_key_env!r} "
                    f"({role}.api_key_env names it); it is not set"
                )
        client = openai.OpenAI(
            base_url=base_url if base_url is not None else bcfg.base_url,
            api_key=api_key,
            timeout=bcfg.timeout_s or 120.0,
            max_retries=bcfg.max_retries,
        )
        return cls(
            client,
            state_dir,
            bcfg.model,
            defaults={"temperature": bcfg.temperature, "top_p": bcfg.top_p, "max_tokens": bcfg.max_tokens},
            max_requests=bcfg.batch_max_requests,
            max_bytes=bcfg.batch_max_bytes,
            poll_s=bcfg.batch_poll_s,
            poll_max_s=bcfg.batch_poll_max_s,
            max_failures=bcfg.stop_after_failures or 1_000_000,  # 0 = never give up
            prices=dict(bcfg.prices),
            discount=bcfg.batch_discount,
            role=role,
        )

    def __repr__(self) -> str:  # the client holds the key: never show it
        return f"BatchRunner(role={self.role!r}, model={self.model!r}, state_dir={str(self.state_dir)!r})"

    # --- the API -------------------------------------------------------------------------------------------------

    def body(self, messages: list[dict], **params: Any) -> dict:
        """A chat-completion request body as the online client would send it (model, defaults, then params)."""
        return {"model": self.model, "messages": messages, **self.defaults, **params}

    def run(self, requests: Iterable[tuple[str, dict]], desc: str | None = None) -> dict[str, ChatResult]:
        """A result for every `(custom_id, body)`: submitted, polled and downloaded as needed (module docstring)."""
        return dict(self.iter_results(requests, desc))

    def complete_many(
        self, conversations: Sequence[list[dict]], desc: str | None = None, **params: Any
    ) -> list[ChatResult]:
        """`ChatClient.complete_many` over batches: one result per conversation, in input order. The custom_id is
        the request's content hash, so asking again for the same request reads its earlier result (or polls its
        batch) and identical requests are sent once and share their result."""
        bodies = [self.body(m, **params) for m in conversations]
        ids = ["req-" + content_hash(b, n=32) for b in bodies]
        unique = dict(zip(ids, bodies, strict=True))
        results = self.run(unique.items(), desc)
        return [results[i] for i in ids]

    def iter_results(
        self, requests: Iterable[tuple[str, dict]], desc: str | None = None
    ) -> Iterator[tuple[str, ChatResult]]:
        """`run`, yielding `(custom_id, ChatResult)` as each batch finishes (results already on disk first), so a
        caller can write them out without holding every result at once."""
        self.state_dir.mkdir(parents=True, exist_ok=True)
        with file_lock(self.state_dir / ".lock"):  # one runner per state dir: two would both submit
            yield from self._iter_results(requests, desc)

    def usage_report(self) -> dict[str, dict]:
        """{model: {requests, prompt_tokens, completion_tokens, cost_usd}} of the lines this runner downloaded, at
        the batch price (`discount` x the online price); cost_usd is None for a model without a price."""
        price = self.prices.get(self.model)
        cost = usd(self.usage["prompt_tokens"], self.usage["completion_tokens"], price, self.discount)
        if price is None and self.usage:
            log.warning(
                "%s: no price for model %r in %s.prices; its cost is not estimated", self.role, self.model, self.role
            )
        return {
            self.model: {
                "requests": self.requests,
                "prompt_tokens": self.usage["prompt_tokens"],
                "completion_tokens": self.usage["completion_tokens"],
                "cost_usd": cost,
                "batches": self.batches_created,
            }
        }

    # --- one call ------------------------------------------------------------------------------------------------

    def _iter_results(self, requests: Iterable[tuple[str, dict]], desc: str | None) -> Iterator[tuple[str, ChatResult]]:
        chunks = self._load()
        self._settle_unfinished(chunks)
        by_seq = {ch.seq: ch for ch in chunks}
        latest: dict[str, Chunk] = {}  # custom_id -> the last live or finished batch holding it
        for ch in chunks:
            if ch.state in ("created", "done"):
                for cid in ch.requests:
                    latest[cid] = ch
        live: dict[int, set[str]] = {}  # batch -> the requests of this call it holds
        done: dict[int, set[str]] = {}
        again: dict[int, set[str]] = {}  # finished batch -> its requests that failed for a transient reason

        def fresh() -> Iterator[tuple[str, dict, str]]:
            """The requests to submit, streamed into the batch files (no body is held); the others are noted."""
            seen: set[str] = set()
            for cid, body in requests:
                if cid in seen:
                    raise ValueError(f"custom_id {cid!r} appears twice in one call; each request needs its own id")
                seen.add(cid)
                h = body_hash(body)
                ch = latest.get(cid)
                if ch is not None and ch.requests.get(cid) == h:
                    if ch.state == "created":
                        live.setdefault(ch.seq, set()).add(cid)
                        continue
                    if ch.seq not in again:
                        again[ch.seq] = self._failed_transiently(ch)
                    if cid not in again[ch.seq]:  # a result, or a failure a new request would repeat
                        done.setdefault(ch.seq, set()).add(cid)
                        continue
                yield cid, body, h

        next_seq = max([ch.seq for ch in chunks] + [0]) + 1
        for ch, rejected in self._submit(fresh(), next_seq):
            if ch is not None:
                live[ch.seq] = set(ch.requests)
                by_seq[ch.seq] = ch
            yield from rejected
        if done or next_seq > 1:
            log.info(
                "%s batches: %d results on disk, %d requests in live batches (%d batches created now)",
                self.role,
                sum(len(c) for c in done.values()),
                sum(len(c) for c in live.values()),
                len([s for s in live if s >= next_seq]),
            )
        for seq, cids in done.items():
            yield from self._read_results(by_seq[seq], cids, count=False).items()
        yield from self._wait(live, by_seq, desc)

    # --- state ---------------------------------------------------------------------------------------------------

    def _path(self, seq: int, what: str) -> Path:
        return self.state_dir / f"chunk-{seq:05d}.{what}"

    def _load(self) -> list[Chunk]:
        chunks = []
        for p in sorted(self.state_dir.glob("chunk-*.json")):
            chunks.append(Chunk(**json.loads(p.read_text(encoding="utf-8"))))
        return chunks

    def _save(self, ch: Chunk) -> None:
        _write_atomic(self._path(ch.seq, "json"), json.dumps(asdict(ch), ensure_ascii=False).encode())

    def _settle_unfinished(self, chunks: list[Chunk]) -> None:
        """Batches a killed run left between steps: adopt one created from an uploaded file, drop the rest."""
        for ch in chunks:
            if ch.state == "uploaded":
                found = self._find_batch(ch)
                if found is not None:
                    log.info("%s batches: adopting %s, created before the last run stopped", self.role, found.id)
                    ch.batch_id, ch.state = found.id, "created"
                else:
                    ch.state = "dropped"
                self._save(ch)
            elif ch.state == "writing":
                ch.state = "dropped"
                self._save(ch)
            if ch.state == "dropped":
                self._path(ch.seq, "requests.jsonl").unlink(missing_ok=True)

    def _find_batch(self, ch: Chunk) -> Any:
        """The batch created from `ch`'s input file, if any (the listing is newest first: stop past the upload)."""
        try:
            for b in self.client.batches.list(limit=100):
                if b.input_file_id == ch.input_file_id:
                    return b
                if ch.uploaded_at is not None and b.created_at < ch.uploaded_at - 600:
                    return None
        except openai.APIStatusError as e:
            self._raise_fatal(e, "listing batches")
            raise self._outage("listing batches", e) from None
        except openai.APIError as e:  # not knowing whether the batch exists, creating another could pay twice
            raise self._outage("listing batches", e) from None
        return None

    # --- submit --------------------------------------------------------------------------------------------------

    def _submit(self, fresh: Iterable[tuple[str, dict, str]], seq: int) -> Iterator[tuple[Chunk | None, list]]:
        """Write, upload and create a batch each time `fresh` fills one to the limits; yields each created chunk,
        and per-request failures for lines that cannot fit in any batch."""
        f = None
        ch: Chunk | None = None
        try:
            for cid, body, h in fresh:
                line = json.dumps(
                    {"custom_id": cid, "method": "POST", "url": ENDPOINT, "body": body}, ensure_ascii=False
                )
                data = (line + "\n").encode()
                if len(data) > self.max_bytes:
                    err = (
                        f"the request is {len(data)} bytes, over the {self.max_bytes}-byte file limit of one batch "
                        f"({self.role}.batch_max_bytes)"
                    )
                    yield None, [(cid, ChatResult(error=err, transient=False))]
                    continue
                if ch is not None and (len(ch.requests) >= self.max_requests or ch.bytes + len(data) > self.max_bytes):
                    f.close()
                    yield self._upload_and_create(ch), []
                    seq, ch, f = seq + 1, None, None
                if ch is None:
                    ch = Chunk(seq, {})
                    f = open(self._path(seq, "requests.jsonl"), "wb")
                f.write(data)
                ch.requests[cid] = h
                ch.bytes += len(data)
            if ch is not None:
                f.close()
                f = None
                yield self._upload_and_create(ch), []
        finally:
            if f is not None:
                f.close()

    def _upload_and_create(self, ch: Chunk) -> Chunk:
        path = self._path(ch.seq, "requests.jsonl")
        with open(path, "rb") as f:
            os.fsync(f.fileno())
        self._save(ch)  # writing
        name = f"baize-{self.role}-{ch.seq:05d}-{uuid.uuid4().hex[:8]}.jsonl"
        try:
            with open(path, "rb") as f:
                up = self.client.files.create(
                    file=(name, f, "application/jsonl"), purpose="batch", timeout=TRANSFER_TIMEOUT_S
                )
        except openai.APIStatusError as e:
            hint = {
                400: f"lower {self.role}.batch_max_bytes if it is the size",
                404: f"the endpoint has no Files API; {self.role}.batch=true needs OpenAI's Batch API",
            }.get(e.status_code, "")
            self._raise_fatal(e, "uploading a batch file", hint=hint)
            raise self._outage("uploading a batch file", e) from None
        except openai.APIError as e:
            raise self._outage("uploading a batch file", e) from None
        ch.input_file_id, ch.uploaded_at, ch.state = up.id, time.time() - 1, "uploaded"
        self._save(ch)
        batch = self._create(ch)
        ch.batch_id, ch.batch_status, ch.state = batch.id, batch.status, "created"
        self._save(ch)
        self.batches_created += 1
        path.unlink(missing_ok=True)  # the endpoint holds it now
        log.info("%s batches: %s holds %d requests (%d bytes)", self.role, batch.id, len(ch.requests), ch.bytes)
        return ch

    def _create(self, ch: Chunk) -> Any:
        """Create the batch without the client's blind retries: a create whose answer was lost may have created
        it, so after a failure look for it before trying again (the endpoint knows no idempotency key)."""
        create = self.client.with_options(max_retries=0).batches.create
        for attempt in range(1, self.max_failures + 1):
            try:
                return create(
                    input_file_id=ch.input_file_id,
                    endpoint=ENDPOINT,
                    completion_window="24h",
                    metadata={"baize_role": self.role, "baize_chunk": str(ch.seq)},
                )
            except openai.APIStatusError as e:
                self._raise_fatal(e, "creating a batch", hint=f"check {self.role}.batch_max_requests")
                error: Exception = e
            except openai.APIError as e:
                error = e
            found = self._find_batch(ch)
            if found is not None:
                return found
            if attempt < self.max_failures:
                time.sleep(_backoff_s(attempt, self.poll_s))
        raise self._outage("creating a batch", error)

    # --- wait and download ---------------------------------------------------------------------------------------

    def _wait(
        self, live: dict[int, set[str]], by_seq: dict[int, Chunk], desc: str | None
    ) -> Iterator[tuple[str, ChatResult]]:
        """Poll the live batches holding `live`'s requests until each ends; yield their results as each does."""
        if not live:
            return
        total = sum(len(by_seq[seq].requests) for seq in live)
        bar = tqdm(
            total=total,
            desc=desc or f"{self.role} batches",
            unit="req",
            disable=not self.progress,
            dynamic_ncols=True,
        )
        finished: dict[int, int] = {}
        delay, failures = self.poll_s, 0
        try:
            while live:
                before = sum(finished.values())
                for ch in [by_seq[seq] for seq in live]:
                    try:
                        b = self.client.batches.retrieve(ch.batch_id)
                        counts = b.request_counts
                        finished[ch.seq] = (counts.completed + counts.failed) if counts else 0
                        if b.status in TERMINAL:
                            self._download(ch, b)
                            finished[ch.seq] = len(ch.requests)
                            yield from self._read_results(ch, live.pop(ch.seq), count=True).items()
                        failures = 0
                    except openai.APIStatusError as e:
                        self._raise_fatal(e, f"polling batch {ch.batch_id}", hint=self._lost_hint(ch))
                        failures += 1
                        error: Exception = e
                    except openai.APIError as e:
                        failures += 1
                        error = e
                    if failures >= self.max_failures:
                        raise self._outage(f"polling batch {ch.batch_id}", error)
                bar.n = sum(finished.values())
                bar.set_postfix_str(f"{len(live)} batches live", refresh=False)
                bar.refresh()
                if live:
                    progressed = sum(finished.values()) > before
                    delay = self.poll_s if progressed else min(delay * 1.5, self.poll_max_s)
                    time.sleep(delay * random.uniform(0.9, 1.1))
        finally:
            bar.close()

    def _download(self, ch: Chunk, b: Any) -> None:
        """Output and error files to disk, then the chunk is done (a kill in between downloads them again)."""
        for what, fid in (("output.jsonl", b.output_file_id), ("errors.jsonl", b.error_file_id)):
            if not fid:
                continue
            tmp = self._path(ch.seq, what + ".tmp")
            download = self.client.files.with_streaming_response.content
            try:
                with download(fid, timeout=TRANSFER_TIMEOUT_S) as resp, open(tmp, "wb") as f:
                    for part in resp.iter_bytes():
                        f.write(part)
                    f.flush()
                    os.fsync(f.fileno())
            except openai.APIStatusError as e:
                self._raise_fatal(e, f"downloading {fid} of batch {b.id}")
                raise
            os.replace(tmp, self._path(ch.seq, what))
        ch.output_file_id, ch.error_file_id, ch.batch_status = b.output_file_id, b.error_file_id, b.status
        ch.errors = [f"{e.code}: {e.message}" for e in ((b.errors.data or []) if b.errors else [])][:20]
        ch.state = "done"
        self._save(ch)
        _fsync_dir(self.state_dir)

    def _read_results(self, ch: Chunk, wanted: set[str], count: bool) -> dict[str, ChatResult]:
        """Results for `wanted` from a finished batch's files; `count` (a fresh download) adds the billed usage and
        raises ChatError when every line was refused for the run's settings."""
        out: dict[str, ChatResult] = {}
        ok = refused = 0
        first_refusal = ""
        for what in ("output.jsonl", "errors.jsonl"):
            for rec in _iter_lines(self._path(ch.seq, what)):
                res, settings = _line_result(rec, ch)
                if res.error is None:
                    ok += 1
                    if count:
                        self.requests += 1
                        self.usage.update(res.usage)
                elif settings:
                    refused += 1
                    first_refusal = first_refusal or res.error
                cid = rec.get("custom_id")
                if cid in wanted:
                    out[cid] = res
        if count and refused and not ok:
            raise ChatError(
                f"{self.role}: every line of batch {ch.batch_id} was refused ({refused}; first: {first_refusal}); "
                f"check {self.role}.model and the sampling settings. Nothing is retried; the run stops here."
            )
        why = f"batch {ch.batch_id} {ch.batch_status}" + (f" ({'; '.join(ch.errors[:3])})" if ch.errors else "")
        for cid in wanted - out.keys():
            out[cid] = ChatResult(error=f"no result: {why}", transient=True, attempts=1)
        return out

    def _failed_transiently(self, ch: Chunk) -> set[str]:
        """The requests of a finished batch that a new submission should retry: a transient failure, no line."""
        kept = set()
        for what in ("output.jsonl", "errors.jsonl"):
            for rec in _iter_lines(self._path(ch.seq, what)):
                res, _ = _line_result(rec, ch)
                if not (res.error and res.transient):
                    kept.add(rec.get("custom_id"))
        return set(ch.requests) - kept

    # --- errors --------------------------------------------------------------------------------------------------

    def _raise_fatal(self, e: openai.APIStatusError, doing: str, hint: str = "") -> None:
        """A status that no retry will change stops the run (the key, the path, a request the endpoint refuses)."""
        if e.status_code in FATAL_STATUS or e.status_code == 400:
            body = e.body if isinstance(e.body, dict) else {}
            detail = self._scrub(str(body.get("message") or e.message))
            extra = f"; {hint}" if hint else ""
            raise ChatError(
                f"{self.role} at {self.client.base_url}: HTTP {e.status_code} {doing}: {detail}{extra}"
            ) from None

    def _outage(self, doing: str, e: Exception) -> ChatOutage:
        return ChatOutage(
            f"{self.role} at {self.client.base_url}: {doing} failed ({type(e).__name__}: {self._scrub(str(e))}); "
            f"the batches so far are recorded in {self.state_dir}, a rerun goes on from there"
        )

    def _lost_hint(self, ch: Chunk) -> str:
        return (
            f"batch {ch.batch_id} is recorded in {self._path(ch.seq, 'json')}; if {self.role}.base_url or the key "
            f"changed since, move {self.state_dir} away to submit anew"
        )

    def _scrub(self, text: str) -> str:
        key = getattr(self.client, "api_key", None)
        return (text.replace(key, "<api key>") if key else text)[:300]


def backend_for(backends: Any, role: str, state_dir: str | Path) -> Any:
    """What a stage asks `role` (teacher, judge) through with `ask_parsed`: a `BatchRunner` when `<role>.batch=true`
    (its batches recorded in `state_dir`, so a killed stage polls them again), else the run's online client; held
    to `<role>.max_cost_usd` when that is set (this stage's requests; `cost.Budgeted`)."""
    bcfg = backends.cfg[role]
    backend = BatchRunner.from_config(bcfg, state_dir, role=role) if bcfg.batch else backends.client(role)
    if bcfg.get("max_cost_usd") is None:
        return backend
    discount = float(bcfg.batch_discount) if bcfg.batch else 1.0
    return Budgeted(backend, Budget(bcfg.max_cost_usd, price_of(bcfg), discount=discount, role=role))


def _line_result(rec: dict, ch: Chunk) -> tuple[ChatResult, bool]:
    """One output/error line as a ChatResult, and whether its failure is about the run's settings."""
    resp, err = rec.get("response") or {}, rec.get("error")
    status = resp.get("status_code")
    body = resp.get("body") if isinstance(resp.get("body"), dict) else {}
    if status == 200 and not err:
        choices = body.get("choices") or []
        usage = body.get("usage") or {}
        usage = {k: int(usage.get(k) or 0) for k in ("prompt_tokens", "completion_tokens")}
        if not choices:
            return ChatResult(error="reply has no choices", transient=True, usage=usage, attempts=1), False
        return ChatResult(
            texts=[(c.get("message") or {}).get("content") or "" for c in choices],
            finish_reasons=[c.get("finish_reason") or "" for c in choices],
            usage=usage,
            logprobs=[c.get("logprobs") for c in choices],
            attempts=1,
        ), False
    if status is None:  # a line the batch never ran: expired, cancelled
        err = err if isinstance(err, dict) else {}
        error = f"{err.get('code') or f'batch {ch.batch_status}'}: {err.get('message') or 'no message'}"
        return ChatResult(error=error, transient=True, attempts=1), False
    detail = (body.get("error") or {}) if isinstance(body.get("error"), dict) else {}
    text = " ".join(str(x) for x in (detail.get("message"), detail.get("code"), detail.get("type")) if x)
    error = f"http {status}: {text or 'no message'}"[:300]
    if status in RETRY_STATUS or status >= 500:
        return ChatResult(error=error, transient=True, attempts=1), False
    if status == 400 and ONE_REQUEST_400.search(text):
        return ChatResult(error=error, transient=False, attempts=1), False
    # refused for the settings (key, model, a parameter): transient here, and ChatError if no line succeeded
    return ChatResult(error=error, transient=True, attempts=1), True


def _iter_lines(path: Path) -> Iterator[dict]:
    """The JSON objects of a downloaded results file, streamed (a file can be hundreds of MB)."""
    if not path.exists():
        return
    with open(path, "rb") as f:
        for n, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            try:
                rec = json.loads(raw)
            except ValueError:
                log.warning("%s:%d: not JSON, skipped (its request gets no result and is asked again)", path, n)
                continue
            if isinstance(rec, dict):
                yield rec


def _write_atomic(path: Path, data: bytes) -> None:
    """Replace `path` with `data` so that a kill leaves the old or the new file, and a power loss too."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):  # not every filesystem lets a directory be opened
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _backoff_s(attempt: int, base_s: float) -> float:
    cap = min(300.0, base_s * 2 ** (attempt - 1))
    return cap / 2 + random.uniform(0, cap / 2)
