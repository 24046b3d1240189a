"""Stage 1 — self-chat collection: the teacher writes [Human]/[AI] dialogs from seed questions.

Two modes (`collect.mode`): `transcript`, the paper's, one request in which the teacher writes both sides; `turns`,
the teacher plays the human and the AI in turn, one request per turn, up to `collect.max_turns` turns.

Output: `<run>/collect/dialogs.jsonl` (one dialog a line), `rejects.jsonl` (one reject a line, with the reason
and the raw reply) and `failures.jsonl` (the history of requests that failed for a transient reason: timeouts, 5xx,
connection errors, 429s after the retries). A record is written, flushed and fsynced the moment its dialog is
done, so a crash or `kill -9` loses only dialogs in flight. Every record carries `key`, a hash of what produced it
(seed, mode, templates, teacher model, sampling settings): a rerun sends requests only for keys with no dialog or
reject yet, so an interrupted collection resumes and an unchanged one sends nothing.

A reject is final (the teacher answered, and the answer is unusable, or the seed itself is: `too_long`); a
transient failure never is. A seed whose requests failed stays unfinished: the stage ends with `Interrupted`
(resumable, exit 75) and keeps everything that finished, and every later collection on the same settings asks for
it again, with its failed attempts counted on the record it finally gets (`earlier_failures`).

Dialogs run `teacher.concurrency` at a time on one event loop; the chat client adds the rate limits and retries.
With `teacher.batch=true` the requests go through the OpenAI Batch API instead (`baize_exp.chat.batch`; its state
in `<collection>/batches/`, so a killed run polls the same batches): transcript mode as one stream of batches,
turns mode one round of batches per turn. Those records carry `"batch": true` (they cost `batch_discount`).
`teacher.max_cost_usd` stops the collection before it would spend more (in-flight requests held at their worst
case; what earlier attempts of these seeds spent counts), with one line; the same command with a higher limit
goes on.

Memory stays bounded in the number of dialogs: nothing holds every dialog. What grows is compact: the seeds' keys
and the finished keys as uint64 arrays, the near-duplicate index (`data.quality`), the file offsets of the dialogs
the filters read in seed order, and the data card's per-dialog lengths (benchmarks/collect_scale.py measures it).

Standalone: `baize-collect data=quora teacher=openai ...` (the same conf tree and overrides as run.py; it runs
the pipeline with `stages=[collect]`); `baize-collect ... --estimate` prints what the collection would cost and
sends nothing.
"""

from __future__ import annotations

import array
import asyncio
import copy
import json
import logging
import os
import random
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import open_dict
from tqdm.auto import tqdm

from baize_exp.chat.batch import BatchRunner
from baize_exp.chat.client import ChatClient, ChatOutage, ChatResult
from baize_exp.chat.cost import Budget, Estimate, TokenCounter, estimate_collection, price_of, usd
from baize_exp.config import Config, cache_dir
from baize_exp.data import Seed, load_seeds, parse_transcript, to_baize_text
from baize_exp.data.card import card_markdown, data_card, spent_summary
from baize_exp.data.quality import QualityFilter
from baize_exp.errors import Interrupted, UserError
from baize_exp.io import JsonlError, JsonlWriter, content_hash, file_lock, iter_records, jsonl_entries, write_json
from baize_exp.models import tokenizer_for_serving
from baize_exp.stages.base import BACKEND_KNOBS, Stage
from baize_exp.wandb_log import log_dialogs

log = logging.getLogger(__name__)


def dialog_key(seed: Seed, ccfg: Any, tcfg: Any) -> str:
    """Hash of everything that shapes the teacher's requests for this seed."""
    sampling = {"temperature": tcfg.temperature, "top_p": tcfg.top_p, "max_tokens": tcfg.max_tokens}
    if ccfg.mode == "transcript":
        return content_hash(seed.question, ccfg.mode, ccfg.template, tcfg.model, sampling)
    return content_hash(
        seed.question, ccfg.mode, [ccfg.human_template, ccfg.ai_system, ccfg.max_turns], tcfg.model, sampling
    )


# --- one dialog --------------------------------------------------------------------------------------------


def request_seed(key: str, turn: int = 0) -> int:
    """The sampling seed sent with a dialog's request (OpenAI's `seed`; our server and vLLM honour it): drawn from
    the dialog key, so rerunning a collection on the same settings asks the same questions with the same seeds."""
    return int(content_hash(key, turn)[:8], 16) & 0x7FFFFFFF


def _history(turns: list[dict]) -> str:
    return "\n".join(f"[{'Human' if t['role'] == 'human' else 'AI'}] {t['text']}" for t in turns)


def _clean_turn(text: str, role: str) -> tuple[str, str | None]:
    """A turn reply without its own role prefix, cut where the model starts writing the other side; with the
    reject reason if nothing is left ("role_order" when the reply speaks as the other side from the start)."""
    own, other = ("[Human]", "[AI]") if role == "human" else ("[AI]", "[Human]")
    text = text.strip()
    if text.startswith(other):
        return "", "role_order"
    for prefix in (own, own.strip("[]") + ":"):
        if text.startswith(prefix):
            text = text[len(prefix) :].lstrip(" :")
    text = text.split(other, 1)[0].strip()
    return text, None if text else "empty"


# A token is ~4 characters of English; a reply more than 8x that per allowed token did not honour max_tokens.
OVERSIZED_CHARS_PER_TOKEN = 32
RAW_KEEP_CHARS = 4000
BUDGET_STOP = "stopped before teacher.max_cost_usd"  # the failure of a dialog the budget cut short


def _unusable(res: ChatResult, max_tokens: int, raw: str | None = None) -> dict | None:
    """What to record when a reply cannot be used as such: a transient failure (asked again later), a 400 about
    this request (a `bad_request` reject), or a reply far longer than max_tokens allows (a server that ignores it:
    an `oversized` reject holding only the reply's start, never the whole of it)."""
    if res.error:
        if res.transient:
            return {"failed": res.error}
        return {"reason": "bad_request", "detail": res.error, "raw": raw}
    if len(res.text) > OVERSIZED_CHARS_PER_TOKEN * max_tokens:
        return {
            "reason": "oversized",
            "detail": f"a {len(res.text)}-character reply for max_tokens={max_tokens}; the endpoint ignores max_tokens",
            "raw": res.text[:RAW_KEEP_CHARS],
            "raw_chars": len(res.text),
        }
    return None


def _transcript_messages(seed: Seed, ccfg: Any) -> list[dict]:
    return [{"role": "user", "content": ccfg.template.format(seed=seed.question)}]


def _transcript_outcome(res: ChatResult, seed: Seed, ccfg: Any, max_tokens: int) -> dict:
    """A transcript reply as a dialog ({"turns", "finish_reason"}), a reject ({"reason", ...}) or a failure."""
    bad = _unusable(res, max_tokens)
    if bad:
        return bad
    finish = res.finish_reasons[0]
    if finish == "length" and ccfg.on_truncated == "reject":
        return {"reason": "length", "detail": "reply cut by teacher.max_tokens", "raw": res.text}
    parsed = parse_transcript(res.text, seed.question, ccfg.min_turns, truncated=finish == "length")
    if parsed.turns is None:
        return {"reason": parsed.reason, "detail": parsed.detail, "raw": res.text}
    return {"turns": parsed.turns, "finish_reason": finish}


def _turn_messages(seed: Seed, turns: list[dict], ccfg: Any) -> tuple[str, list[dict]]:
    """The role of the next turn and the request that asks the teacher for it."""
    role = "ai" if turns[-1]["role"] == "human" else "human"
    if role == "ai":
        return role, [{"role": "system", "content": ccfg.ai_system.format(seed=seed.question)}] + [
            {"role": "user" if t["role"] == "human" else "assistant", "content": t["text"]} for t in turns
        ]
    return role, [{"role": "user", "content": ccfg.human_template.format(seed=seed.question, history=_history(turns))}]


def _after_turn(res: ChatResult, turns: list[dict], role: str, ccfg: Any, max_tokens: int) -> dict | None:
    """Take one turn's reply: None while the dialog goes on (the turn is appended to `turns`), else its outcome."""
    bad = _unusable(res, max_tokens, _history(turns))
    if bad:
        where = f"turn {len(turns) + 1}: "
        return {**bad, "detail": where + bad["detail"]} if "reason" in bad else {"failed": where + bad["failed"]}
    raw = f"{_history(turns)}\n[{'AI' if role == 'ai' else 'Human'}] {res.text}"
    finish = res.finish_reasons[0]
    if finish == "length":
        if ccfg.on_truncated == "reject":
            return {"reason": "length", "detail": f"turn {len(turns) + 1} cut by teacher.max_tokens", "raw": raw}
        return _turns_end(turns, finish, ccfg)  # drop_turn: keep the complete turns before it
    text, bad = _clean_turn(res.text, role)
    if bad:
        return {"reason": bad, "detail": f"turn {len(turns) + 1} ({role}): nothing said as the {role}", "raw": raw}
    turns.append({"role": role, "text": text})
    return _turns_end(turns, finish, ccfg) if len(turns) >= ccfg.max_turns else None


def _turns_end(turns: list[dict], finish: str, ccfg: Any) -> dict:
    if turns[-1]["role"] == "human":
        turns.pop()  # a dialog ends on an answer
    if len(turns) < ccfg.min_turns:
        return {
            "reason": "too_few_turns",
            "detail": f"{len(turns)} complete turns, need {ccfg.min_turns}",
            "raw": _history(turns),
        }
    return {"turns": turns, "finish_reason": finish}


class _BudgetStop(Exception):
    """The budget refused the next request of a dialog."""


class _Asker:
    """The online client's requests, held to the budget when there is one: each reserved at its worst case (the
    prompt counted as `cost.TokenCounter` counts it, plus max_tokens) before it is sent, settled with its usage."""

    def __init__(self, client: ChatClient, budget: Budget | None, counter: TokenCounter):
        self.client, self.budget, self.counter = client, budget, counter
        self.max_tokens = client.defaults["max_tokens"]

    async def __call__(self, messages: list[dict], seed: int) -> ChatResult:
        if self.budget is None:
            return await self.client.acomplete(messages, seed=seed)
        held = self.budget.reserve(self.counter.prompt(messages), self.max_tokens)
        if held is None:
            raise _BudgetStop
        res = None
        try:
            res = await self.client.acomplete(messages, seed=seed)
            return res
        finally:
            self.budget.settle(held, res.usage if res is not None else None)


async def _transcript_dialog(seed: Seed, key: str, ask: _Asker, ccfg: Any) -> tuple[dict, list[ChatResult]]:
    res = await ask(_transcript_messages(seed, ccfg), request_seed(key))
    return _transcript_outcome(res, seed, ccfg, ask.max_tokens), [res]


async def _turns_dialog(seed: Seed, key: str, ask: _Asker, ccfg: Any) -> tuple[dict, list[ChatResult]]:
    turns = [{"role": "human", "text": seed.question}]
    results: list[ChatResult] = []
    while True:
        role, messages = _turn_messages(seed, turns, ccfg)
        try:
            res = await ask(messages, request_seed(key, len(turns)))
        except _BudgetStop:
            if not results:
                raise  # nothing spent on this seed: it is simply not asked yet
            return {"failed": f"turn {len(turns) + 1}: {BUDGET_STOP}"}, results  # what it cost is recorded
        results.append(res)
        out = _after_turn(res, turns, role, ccfg, ask.max_tokens)
        if out is not None:
            return out, results


# --- progress ----------------------------------------------------------------------------------------------


class Progress:
    """Counts for the bar (dialogs/s, tokens/s, retries, rejects), and the same figures to W&B when a run is live."""

    def __init__(self, total: int, client: Any, wandb_every_s: float = 5.0):
        self.client, self.t0 = client, time.monotonic()
        self.dialogs, self.rejects, self.failed = 0, Counter(), 0
        self.tokens = 0
        self.bar = tqdm(
            total=total, desc="collect", unit="dialog", mininterval=0.5, dynamic_ncols=True, disable=total == 0
        )
        self._next_postfix = self._next_wandb = 0.0
        self.wandb_every_s = wandb_every_s
        self.wb = _wandb_run()

    def figures(self) -> dict[str, float]:
        dt = max(1e-9, time.monotonic() - self.t0)
        return {
            "dialogs": self.dialogs,
            "rejects": sum(self.rejects.values()),
            "failed": self.failed,
            "dialogs_per_s": round(self.dialogs / dt, 3),
            "tokens_per_s": round(self.tokens / dt, 1),
            "requests": self.client.requests,
            "retries": getattr(self.client, "retries", 0),
        }

    def update(self, out: dict, results: list[ChatResult]) -> None:
        if "failed" in out:
            self.failed += 1
        elif "reason" in out:
            self.rejects[out["reason"]] += 1
        else:
            self.dialogs += 1
        self.tokens += sum(r.usage.get("prompt_tokens", 0) + r.usage.get("completion_tokens", 0) for r in results)
        self.bar.update(1)
        now = time.monotonic()
        if now >= self._next_postfix:  # formatting every dialog would cost more CPU than the requests
            self._next_postfix = now + 0.5
            f = self.figures()
            self.bar.set_postfix_str(
                f"{f['dialogs_per_s']:.1f} dlg/s {f['tokens_per_s']:.0f} tok/s "
                f"retries={f['retries']} rejects={f['rejects']} failed={f['failed']}",
                refresh=False,
            )
        if self.wb is not None and now >= self._next_wandb:
            self._next_wandb = now + self.wandb_every_s
            self._log_wandb()

    def close(self) -> None:
        self.bar.close()
        if self.wb is not None:
            self._log_wandb()

    def _log_wandb(self) -> None:
        # elapsed_s is these series' x axis (baize_exp.wandb_log.STEP_AXES): rates against time, not row numbers
        row = {f"collect/progress/{k}": v for k, v in self.figures().items()}
        row["collect/progress/elapsed_s"] = round(time.monotonic() - self.t0, 3)
        self.wb.log(row)


def _wandb_run() -> Any:
    """The W&B run someone started (the pipeline's), or None: collect never starts one itself."""
    wandb = sys.modules.get("wandb")
    return getattr(wandb, "run", None) if wandb is not None else None


def _log_samples(new: list[dict], path: Path, n: int) -> None:
    """A table of the first `n` new dialogs (or of the collection's first, when this attempt made none)."""
    run = _wandb_run()
    if not n or run is None:
        return
    dialogs = new or [d for _, d in zip(range(n), iter_records(path), strict=False)]
    if not dialogs:
        return
    table = sys.modules["wandb"].Table(columns=["id", "source", "seed", "turns", "dialog"])
    for d in dialogs[:n]:
        table.add_data(d["id"], d["source"], d["seed"], len(d["turns"]), to_baize_text(d["turns"]))
    run.log({"collect/samples": table})


# --- keys, compactly ---------------------------------------------------------------------------------------------


def _key_int(key: Any) -> int:
    """A dialog key (16 hex digits) as the uint64 the arrays hold; anything else (no key of ours) as 0."""
    try:
        return int(key, 16) if isinstance(key, str) and len(key) == 16 else 0
    except ValueError:
        return 0


def _key_str(k: int | np.integer) -> str:
    return f"{int(k):016x}"


class _Keys:
    """Every seed's dialog key, in seed order, as uint64 (8 bytes a seed, not a string each)."""

    def __init__(self, keys: np.ndarray):
        self.all = keys
        self.unique, first = np.unique(keys, return_index=True)
        self.first = first  # where each unique key first appears: its place in seed order
        _, last_rev = np.unique(keys[::-1], return_index=True)
        self.last = len(keys) - 1 - last_rev  # where it last appears: the seed a request is made from

    def wanted(self, keys: np.ndarray) -> np.ndarray:
        """Which of `keys` belong to these seeds."""
        return np.isin(keys, self.unique)

    def where(self, keys: np.ndarray) -> np.ndarray:
        """Indices into `unique` of `keys` (each must be one of them)."""
        return np.searchsorted(self.unique, keys)

    def in_seed_order(self) -> np.ndarray:
        """The unique keys in the order their seeds first appear."""
        return self.unique[np.argsort(self.first, kind="stable")]


@dataclass
class _Scan:
    """One pass over a records file: each record's key (uint64), where its line starts, and its reason if any."""

    keys: np.ndarray
    offsets: np.ndarray
    reasons: list[str | None]


def _scan(path: Path, repair_tail: bool = False, reasons: bool = False, skip_torn_tail: bool = False) -> _Scan:
    """A torn last line (a killed collection's) is cut off with `repair_tail`, skipped with `skip_torn_tail`."""
    keys, offsets = array.array("Q"), array.array("q")  # 8 bytes a record, not a Python int each
    why: list[str | None] = []
    for line, offset, r in jsonl_entries(path, repair_tail, skip_torn_tail):
        if not isinstance(r, dict):
            raise JsonlError(f"{path}:{line}: expected a JSON object, found {type(r).__name__}; one record per line")
        keys.append(_key_int(r.get("key")))
        offsets.append(offset)
        if reasons:
            why.append(r.get("reason"))
    return _Scan(np.frombuffer(keys, np.uint64), np.frombuffer(offsets, np.int64), why)


def _read_at(f: Any, offset: int) -> dict:
    f.seek(offset)
    return json.loads(f.readline())


def _record_usage(r: dict) -> tuple[dict, bool]:
    """What a record's requests used, and whether they went through a batch (a quality reject holds its dialog)."""
    src = r if "usage" in r else r.get("dialog") or {}
    return src.get("usage") or {}, bool(src.get("batch"))


# --- the engine --------------------------------------------------------------------------------------------


@dataclass
class _Attempt:
    """What this attempt of the collection did, beside the records it wrote."""

    progress: Progress
    samples: list[dict]  # the first collect.samples_to_log new dialogs
    outage: str | None = None  # the endpoint went down: the seeds not yet asked stay unfinished
    budget: Budget | None = None  # teacher.max_cost_usd's
    budget_stop: bool = False  # the budget refused the next request


class _Recorder:
    """Writes each outcome the moment it is known: a dialog, a reject, or a failure (asked again later)."""

    def __init__(self, ccfg: Any, tcfg: Any, writers: dict, history: dict, attempt: _Attempt, batch: bool):
        self.ccfg, self.writers, self.history, self.attempt = ccfg, writers, history, attempt
        self.teacher = {
            "model": tcfg.model,
            "temperature": tcfg.temperature,
            "top_p": tcfg.top_p,
            "max_tokens": tcfg.max_tokens,
        }
        self.batch = {"batch": True} if batch else {}

    def __call__(self, seed: Seed, key: str, out: dict, results: list[ChatResult]) -> None:
        usage = Counter()
        for r in results:
            usage.update(r.usage)
        base = {"seed": seed.question, "source": seed.source, "key": key, "mode": self.ccfg.mode}
        spent = {"usage": dict(usage), "requests": sum(r.attempts for r in results), **self.batch}
        seen = self.history.get(key)
        earlier = {"earlier_failures": seen[0]} if seen else {}
        if "failed" in out:
            now = round(time.time(), 3)
            self.writers["failures"].write({**base, "error": out["failed"], "time": now, **spent})
            self.history[key] = [(seen[0] if seen else 0) + 1, now, out["failed"]]
        elif "turns" in out:
            rec = {
                "id": f"{seed.id}-{key[:8]}",
                **base,
                "turns": out["turns"],
                "teacher": self.teacher,
                "finish_reason": out["finish_reason"],
                **spent,
                **earlier,
            }
            self.writers["dialogs"].write(rec)
            if len(self.attempt.samples) < self.ccfg.samples_to_log:
                self.attempt.samples.append(rec)
        else:
            self.writers["rejects"].write({**base, **out, **spent, **earlier})
        self.attempt.progress.update(out, results)


async def _run_all(
    asked: Iterable[tuple[Seed, str]], n: int, ask: _Asker, ccfg: Any, record: _Recorder, attempt: _Attempt
) -> None:
    """Every seed of `asked` (`n` of them), `concurrency` at a time; each outcome is written the moment it is
    known. An outage or the budget stops the asking: the seeds not yet asked stay unfinished."""
    make = _transcript_dialog if ccfg.mode == "transcript" else _turns_dialog
    pending = iter(asked)
    client = ask.client

    async def worker() -> None:
        for seed, key in pending:  # one shared iterator: each worker takes the next seed when it is free
            if attempt.outage or attempt.budget_stop:
                return
            try:
                out, results = await make(seed, key, ask, ccfg)
            except ChatOutage as e:  # the endpoint is down: stop asking; what was asked is written
                attempt.outage = attempt.outage or str(e)
                return
            except _BudgetStop:
                attempt.budget_stop = True
                return
            if BUDGET_STOP in out.get("failed", ""):
                attempt.budget_stop = True
            record(seed, key, out, results)

    async with client.session():
        workers = [asyncio.ensure_future(worker()) for _ in range(min(client.concurrency, n))]
        try:
            await asyncio.gather(*workers)
        finally:  # a fatal error (bad key, bad request) stops every other dialog now
            for w in workers:
                w.cancel()
            await asyncio.gather(*workers, return_exceptions=True)


def _batch_transcripts(
    asked: list[tuple[int, str]],
    seeds: list[Seed],
    runner: BatchRunner,
    ccfg: Any,
    record: _Recorder,
    attempt: _Attempt,
    budget: Budget | None,
    counter: TokenCounter,
) -> None:
    """Every seed of `asked` ((seed index, key) pairs) in one stream of batches; each result is written as its
    batch comes back. With a budget, only the requests whose worst case fits are submitted."""
    max_tokens = runner.defaults["max_tokens"]
    lookup = _SeedLookup(asked)

    def worst(seed: Seed) -> tuple[int, int]:
        return counter.prompt(_transcript_messages(seed, ccfg)), max_tokens

    def requests() -> Iterator[tuple[str, dict]]:
        for i, key in asked:
            if budget is not None and budget.reserve(*worst(seeds[i])) is None:
                attempt.budget_stop = True
                return
            yield key, runner.body(_transcript_messages(seeds[i], ccfg), seed=request_seed(key))

    for key, res in runner.iter_results(requests(), desc="collect batches"):
        seed = seeds[lookup(key)]
        if budget is not None:
            budget.settle(budget.cost(*worst(seed)), res.usage)
        record(seed, key, _transcript_outcome(res, seed, ccfg, max_tokens), [res])


class _SeedLookup:
    """custom_id (a dialog key) -> seed index, from sorted uint64 arrays instead of a dict of strings."""

    def __init__(self, asked: list[tuple[int, str]]):
        keys = np.fromiter((_key_int(k) for _, k in asked), np.uint64, len(asked))
        idx = np.fromiter((i for i, _ in asked), np.int64, len(asked))
        order = np.argsort(keys)
        self.keys, self.idx = keys[order], idx[order]

    def __call__(self, key: str) -> int:
        return int(self.idx[np.searchsorted(self.keys, _key_int(key))])


def _batch_turns(
    asked: list[tuple[int, str]],
    seeds: list[Seed],
    runner: BatchRunner,
    ccfg: Any,
    record: _Recorder,
    attempt: _Attempt,
    budget: Budget | None,
    counter: TokenCounter,
) -> None:
    """Turn-by-turn dialogs over batches: one round of batches per turn (custom_id `<key>:<turn>`), every dialog
    still going in the same round. Between rounds the dialogs live in a state file, read back by offset when a
    result arrives, so memory does not grow with their number. A rerun after a kill asks the rounds again from the
    start: the runner has their results on disk, so only the round that was live is polled and nothing is paid
    twice. A dialog the budget cuts short leaves no record (its turns so far stay in the runner's results); a
    failed turn's record carries only that turn's usage (the earlier ones come back from disk, unbilled)."""
    runner.state_dir.mkdir(parents=True, exist_ok=True)
    state = _TurnState(runner.state_dir / "turns-1.jsonl")
    for i, key in asked:
        state.add({"i": i, "key": key, "turns": [{"role": "human", "text": seeds[i].question}]})
    state.close()
    turn = 1
    try:
        while state.n and not attempt.budget_stop:
            state = _batch_round(state, turn, seeds, runner, ccfg, record, attempt, budget, counter)
            turn += 1
    finally:
        for p in runner.state_dir.glob("turns-*.jsonl"):
            p.unlink(missing_ok=True)


class _TurnState:
    """The dialogs still going after a round: a JSON-lines file, with each one's key and line offset in arrays."""

    def __init__(self, path: Path):
        self.path, self.n = path, 0
        self._f = open(path, "wb")
        self._keys, self._offsets = array.array("Q"), array.array("q")
        self._pos = 0

    def add(self, st: dict) -> None:
        data = (json.dumps(st, ensure_ascii=False) + "\n").encode()
        self._f.write(data)
        self._keys.append(_key_int(st["key"]))
        self._offsets.append(self._pos)
        self._pos += len(data)
        self.n += 1

    def close(self) -> None:
        self._f.close()
        keys = np.frombuffer(self._keys, np.uint64)
        self.order = np.argsort(keys)
        self.sorted_keys, self.offsets = keys[self.order], np.frombuffer(self._offsets, np.int64)

    def offset_of(self, key: str) -> int:
        return int(self.offsets[self.order[np.searchsorted(self.sorted_keys, _key_int(key))]])


def _batch_round(
    state: _TurnState,
    turn: int,
    seeds: list[Seed],
    runner: BatchRunner,
    ccfg: Any,
    record: _Recorder,
    attempt: _Attempt,
    budget: Budget | None,
    counter: TokenCounter,
) -> _TurnState:
    """One round: turn `turn` (0 is the seed) of every dialog in `state`; returns the state of those still going."""
    max_tokens = runner.defaults["max_tokens"]
    following = _TurnState(runner.state_dir / f"turns-{turn + 1}.jsonl")

    def requests() -> Iterator[tuple[str, dict]]:
        for st in iter_records(state.path):
            _, messages = _turn_messages(seeds[st["i"]], st["turns"], ccfg)
            if budget is not None and budget.reserve(counter.prompt(messages), max_tokens) is None:
                attempt.budget_stop = True
                return
            yield f"{st['key']}:{turn}", runner.body(messages, seed=request_seed(st["key"], turn))

    with open(state.path, "rb") as cur:
        for cid, res in runner.iter_results(requests(), desc=f"collect batches, turn {turn + 1}"):
            st = _read_at(cur, state.offset_of(cid.rsplit(":", 1)[0]))
            seed, turns = seeds[st["i"]], st["turns"]
            role, messages = _turn_messages(seed, turns, ccfg)
            if budget is not None:
                budget.settle(budget.cost(counter.prompt(messages), max_tokens), res.usage)
            out = _after_turn(res, turns, role, ccfg, max_tokens)
            done = [ChatResult(usage=u, attempts=1) for u in st.get("usage", [])] + [res]
            if out is None:
                following.add({**st, "usage": [r.usage for r in done]})
            else:
                record(seed, st["key"], out, [res] if "failed" in out else done)
    following.close()
    state.path.unlink(missing_ok=True)
    return following


def _too_long(seeds: Iterable[tuple[Seed, str]], ccfg: Any, tokenizer: Any) -> list[dict]:
    """Rejects for seeds over collect.max_seed_tokens, decided before any request: counted in the teacher's tokens
    where its tokenizer is known (the local teacher), else in characters (4 a token)."""
    out = []
    for seed, key in seeds:
        if tokenizer is not None:
            n = (
                len(seed.question) // 2
                if len(seed.question) > 16 * ccfg.max_seed_tokens
                else len(tokenizer(seed.question, add_special_tokens=False).input_ids)
            )  # a huge seed: no need to count
            over, unit = n > ccfg.max_seed_tokens, "tokens"
        else:
            n, unit = len(seed.question), "characters"
            over = n > 4 * ccfg.max_seed_tokens
        if over:
            out.append(
                {
                    "seed": seed.question[:RAW_KEEP_CHARS],
                    "source": seed.source,
                    "key": key,
                    "mode": ccfg.mode,
                    "reason": "too_long",
                    "raw": None,
                    "seed_chars": len(seed.question),
                    "requests": 0,
                    "detail": f"the seed has {n} {unit}; collect.max_seed_tokens={ccfg.max_seed_tokens}",
                }
            )
    return out


def _failure_history(out_dir: Path) -> dict[str, list]:
    """The transient failures so far (failures.jsonl), by dialog key: [how many, the time of the latest, its
    error]; only keys that failed take room."""
    history: dict[str, list] = {}
    for f in iter_records(out_dir / "failures.jsonl", repair_tail=True):
        h = history.setdefault(f["key"], [0, -1.0, None])
        h[0] += 1
        if f.get("time", 0) > h[1]:
            h[1], h[2] = f.get("time", 0), f["error"]
    return history


@dataclass
class _Resumed:
    """What an earlier attempt left in a collection dir, and what is left to ask for."""

    seeds: list[Seed]
    history: dict[str, list]  # transient failures by key: [count, time of the latest, its error]
    keys: _Keys  # every seed's dialog key, in seed order
    todo: np.ndarray  # the seeds (indices) with neither a dialog nor a reject yet, once each, in seed order
    spent: dict  # what the records of these seeds used: prompt_tokens, completion_tokens, batch (their share)

    def todo_pairs(self) -> Iterator[tuple[Seed, str]]:
        for i in self.todo.tolist():
            yield self.seeds[i], _key_str(self.keys.all[i])


def _done_keys(out_dir: Path, repair_tail: bool, skip_torn_tail: bool = False) -> np.ndarray:
    """The keys with a dialog or a reject in a collection dir."""
    return np.concatenate(
        [
            _scan(out_dir / "dialogs.jsonl", repair_tail, skip_torn_tail=skip_torn_tail).keys,
            _scan(out_dir / "rejects.jsonl", repair_tail, skip_torn_tail=skip_torn_tail).keys,
        ]
    )


def _seed_keys(seeds: list[Seed], ccfg: Any, tcfg: Any) -> _Keys:
    return _Keys(np.fromiter((_key_int(dialog_key(s, ccfg, tcfg)) for s in seeds), np.uint64, len(seeds)))


def _todo(keys: _Keys, done: np.ndarray) -> np.ndarray:
    """Seed indices to ask: one per key with no record, in the order the keys first appear (the seed it is asked
    from is the key's last, as a dict built over the seeds would keep)."""
    left = ~np.isin(keys.unique, done)
    first, last = keys.first[left], keys.last[left]
    return last[np.argsort(first, kind="stable")]


def _usage_of(out_dir: Path, keys: _Keys) -> dict:
    """What the records of these seeds in a collection dir used (dialogs, rejects, failed attempts)."""
    prompt = completion = batch_prompt = batch_completion = 0
    for name in ("dialogs.jsonl", "rejects.jsonl", "failures.jsonl"):
        path = out_dir / name
        for r in iter_records(path) if path.exists() else ():
            u, batch = _record_usage(r)
            if not u or not _in(keys.unique, r.get("key")):
                continue
            p, c = u.get("prompt_tokens", 0), u.get("completion_tokens", 0)
            prompt, completion = prompt + p, completion + c
            if batch:
                batch_prompt, batch_completion = batch_prompt + p, batch_completion + c
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "batch_prompt_tokens": batch_prompt,
        "batch_completion_tokens": batch_completion,
    }


def resume(seeds: list[Seed], ccfg: Any, tcfg: Any, out_dir: Path) -> _Resumed:
    """Read what is done in `out_dir` (a torn last line repaired): the seeds to request are those with no dialog
    and no reject yet."""
    out_dir.mkdir(parents=True, exist_ok=True)
    done = _done_keys(out_dir, repair_tail=True)
    history = _failure_history(out_dir)
    keys = _seed_keys(seeds, ccfg, tcfg)
    todo = _todo(keys, done)
    retrying = sum(_key_str(keys.all[i]) in history for i in todo.tolist()) if history else 0
    log.info(
        "collect: %d seeds, %d already done, %d to request%s",
        len(seeds),
        len(seeds) - len(todo),
        len(todo),
        f" ({retrying} of them failed before, for a transient reason)" if retrying else "",
    )
    spent = _usage_of(out_dir, keys) if tcfg.get("max_cost_usd") is not None else {}
    return _Resumed(seeds, history, keys, todo, spent)


def _budget(state: _Resumed, tcfg: Any, batch: bool) -> Budget | None:
    """The budget of `teacher.max_cost_usd`, what these seeds' records already cost counted as spent (a batch
    record's tokens at the batch price)."""
    if tcfg.get("max_cost_usd") is None:
        return None
    price, discount, s = price_of(tcfg), float(tcfg.batch_discount), state.spent
    bp, bc = s["batch_prompt_tokens"], s["batch_completion_tokens"]
    earlier = (usd(s["prompt_tokens"] - bp, s["completion_tokens"] - bc, price) or 0.0) + (
        usd(bp, bc, price, discount) or 0.0
    )
    return Budget(tcfg.max_cost_usd, price, discount=discount if batch else 1.0, spent_usd=earlier, role="teacher")


def request(
    state: _Resumed, teacher: ChatClient | BatchRunner, ccfg: Any, tcfg: Any, out_dir: Path, tokenizer: Any
) -> _Attempt:
    """Ask the teacher for every seed left; return what this attempt did (its counts, the first new dialogs, an
    outage or the budget that stopped it early). Each record is flushed as it completes, so a kill loses nothing
    written; fsyncs are grouped per second. A seed over collect.max_seed_tokens is a reject with no request."""
    batch = isinstance(teacher, BatchRunner)
    budget = _budget(state, tcfg, batch)
    attempt = _Attempt(Progress(len(state.todo), teacher), [], budget=budget)
    counter = TokenCounter(tokenizer)
    try:
        if len(state.todo):
            with (
                JsonlWriter(out_dir / "dialogs.jsonl", sync_every_s=1.0) as dw,
                JsonlWriter(out_dir / "rejects.jsonl", sync_every_s=1.0) as rw,
                JsonlWriter(out_dir / "failures.jsonl", sync_every_s=1.0) as fw,
            ):
                too_long = _too_long(state.todo_pairs(), ccfg, tokenizer)
                for rec in too_long:
                    rw.write(rec)
                    attempt.progress.update(rec, [])
                long_keys = {r["key"] for r in too_long}
                writers = {"dialogs": dw, "rejects": rw, "failures": fw}
                record = _Recorder(ccfg, tcfg, writers, state.history, attempt, batch)
                n = len(state.todo) - len(long_keys)
                asked = ((s, k) for s, k in state.todo_pairs() if k not in long_keys)
                if batch:
                    pairs = [(i, _key_str(state.keys.all[i])) for i in state.todo.tolist()]
                    pairs = [(i, k) for i, k in pairs if k not in long_keys]
                    run = _batch_transcripts if ccfg.mode == "transcript" else _batch_turns
                    try:
                        run(pairs, state.seeds, teacher, ccfg, record, attempt, budget, counter)
                    except ChatOutage as e:
                        attempt.outage = str(e)
                else:
                    asyncio.run(_run_all(asked, n, _Asker(teacher, budget, counter), ccfg, record, attempt))
    finally:
        attempt.progress.close()
    return attempt


def collect(
    seeds: list[Seed],
    client: ChatClient | BatchRunner,
    ccfg: Any,
    tcfg: Any,
    out_dir: Path,
    copy_to: Path | None = None,
    tokenizer: Any = None,
) -> dict:
    """Collect a dialog for every seed that has no dialog or reject yet in `out_dir`; return the stage metrics.
    Raises Interrupted (after writing everything that finished) when seeds are left whose requests failed, and
    BudgetReached (a UserError) when `teacher.max_cost_usd` stopped it.

    `client`: the online client, or a `BatchRunner` for the Batch API. `out_dir` keeps what the teacher wrote
    (every parsed dialog); `copy_to` gets these seeds' dialogs that pass the quality filters (`collect.quality`),
    and the rejects with those that did not (a run's copy of a shared collection, which may hold the dialogs of a
    larger data.limit too); without it `out_dir` keeps only the dialogs that pass. `tokenizer`: the teacher's, to
    measure seeds in its tokens. Phases: resume, request, finish."""
    state = resume(seeds, ccfg, tcfg, out_dir)
    t0, cpu0 = time.monotonic(), time.process_time()
    attempt = request(state, client, ccfg, tcfg, out_dir, tokenizer)
    elapsed, cpu = time.monotonic() - t0, time.process_time() - cpu0
    progress = attempt.progress
    if attempt.budget_stop:
        done = len(state.keys.unique) - int(np.isin(state.keys.unique, _done_keys(out_dir, False), invert=True).sum())
        raise attempt.budget.exceeded(f"{done:,} of {len(state.keys.unique):,} seeds are done")
    _log_samples(attempt.samples, out_dir / "dialogs.jsonl", ccfg.samples_to_log)
    kept = finish(state, attempt.outage, ccfg, out_dir, copy_to)
    asked = _request_figures(client, progress, elapsed, cpu, progress.dialogs)
    metrics = {
        "seeds": len(seeds),
        "requested": len(state.todo),
        **{k: asked.pop(k) for k in ("new_dialogs", "new_rejects", "new_rejects_by_reason")},
        **{k: v for k, v in kept.items() if k != "avg_turns"},
        **asked,
        "avg_turns": kept["avg_turns"],
    }
    log.info(
        "collect: %d new dialogs, %d new rejects %s, %d requests (%d retries) in %.1fs",
        progress.dialogs,
        metrics["new_rejects"],
        dict(progress.rejects),
        client.requests,
        getattr(client, "retries", 0),
        elapsed,
    )
    return metrics


def finish(state: _Resumed, outage: str | None, ccfg: Any, out_dir: Path, copy_to: Path | None) -> dict:
    """Stop (transient, everything kept) if a seed is unfinished; else apply the quality filters, write the run's
    files, and return the figures about these seeds (a shared collection may hold a larger data.limit's too).

    Streams: the dialogs are read back one at a time by file offset, in seed order, so which of two near duplicates
    is kept does not depend on which answer came back first; kept ones go straight to the run's file."""
    keys, history = state.keys, state.history
    dialogs = _scan(out_dir / "dialogs.jsonl")
    rejects = _scan(out_dir / "rejects.jsonl", reasons=True)
    d_wanted, r_wanted = keys.wanted(dialogs.keys), keys.wanted(rejects.keys)
    finished = np.union1d(dialogs.keys[d_wanted], rejects.keys[r_wanted])
    order = keys.in_seed_order()
    unfinished = order[~np.isin(order, finished)]
    if len(unfinished):
        failed = [k for k in (_key_str(x) for x in unfinished.tolist()) if k in history]
        last = _last_error(out_dir, failed[-1]) if failed else None
        why = outage or f"{len(failed)} failed after their retries (last: {last})"
        raise Interrupted(
            f"collect: {len(unfinished)} of {len(keys.unique)} seeds are unfinished: {why}. The {len(finished)} "
            f"finished are kept in {out_dir}; the unfinished ones are asked again by a rerun"
        )
    teacher_reasons = Counter(r for r, w in zip(rejects.reasons, r_wanted.tolist(), strict=True) if w)
    teacher_dialogs = int(d_wanted.sum())
    target = copy_to if copy_to is not None else out_dir
    target.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".quality-", dir=target) as tmp:
        kept_path, spill = Path(tmp) / "dialogs.jsonl", Path(tmp) / "quality_rejects.jsonl"
        positions = keys.first[keys.where(dialogs.keys[d_wanted])]
        offsets = dialogs.offsets[d_wanted][np.argsort(positions, kind="stable")]
        q = filter_quality(out_dir / "dialogs.jsonl", offsets, ccfg, kept_path, spill, spill_dir=tmp)
        if copy_to is not None:
            os.replace(kept_path, copy_to / "dialogs.jsonl")
            _write_stream(copy_to / "rejects.jsonl", _wanted(out_dir / "rejects.jsonl", keys), iter_records(spill))
            _write_stream(copy_to / "failures.jsonl", _wanted(out_dir / "failures.jsonl", keys))
        elif q["rejects"]:  # in place: the dialogs that failed a filter move to the rejects, whole
            gone = np.unique(np.array([_key_int(r["key"]) for r in iter_records(spill)], np.uint64))
            kept_all = (d for d in iter_records(out_dir / "dialogs.jsonl") if not _in(gone, d.get("key")))
            _write_stream(out_dir / "dialogs.jsonl", kept_all)
            _write_stream(out_dir / "rejects.jsonl", iter_records(out_dir / "rejects.jsonl"), iter_records(spill))
    recovered = [(k, h) for k, h in history.items() if _in(keys.unique, k)]
    last_failure = max(recovered, key=lambda kh: kh[1][1], default=None)
    return {
        "dialogs": q["kept"],
        "rejects": int(r_wanted.sum()) + q["rejects"],
        "teacher_dialogs": teacher_dialogs,
        "quality_rejects": dict(q["reasons"]),
        "rejects_by_reason": dict(teacher_reasons + q["reasons"]),
        # seeds whose requests failed (transient) on some attempt before they got their dialog or reject
        "seeds_that_failed_before": len(recovered),
        "failed_attempts": sum(h[0] for _, h in recovered),
        "last_failure": last_failure[1][2] if last_failure else None,
        "avg_turns": round(q["turns"] / max(1, q["kept"]), 2),
    }


def _in(sorted_keys: np.ndarray, key: Any) -> bool:
    k = _key_int(key)
    i = int(np.searchsorted(sorted_keys, k))
    return i < len(sorted_keys) and int(sorted_keys[i]) == k


def _wanted(path: Path, keys: _Keys) -> Iterator[dict]:
    """The records of a file that belong to these seeds, in file order."""
    if not path.exists():
        return
    for r in iter_records(path):
        if _in(keys.unique, r.get("key")):
            yield r


def _last_error(out_dir: Path, key: str) -> str | None:
    last = None
    for f in iter_records(out_dir / "failures.jsonl"):
        if f.get("key") == key:
            last = f["error"]
    return last


def _write_stream(path: Path, *parts: Iterable[dict]) -> None:
    """Write a whole JSON-lines file from streams of records, atomically (temp file + rename)."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for part in parts:
            for r in part:
                f.write(json.dumps(r, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


def _request_figures(
    teacher: ChatClient | BatchRunner, progress: Progress, elapsed: float, cpu: float, n_ok: int
) -> dict:
    """What this attempt's requests made, did and cost (a batch runner's at the batch price)."""
    by_model = teacher.usage_report()
    costs = [m["cost_usd"] for m in by_model.values()]
    return {
        "new_dialogs": n_ok,
        "new_rejects": sum(progress.rejects.values()),
        "new_rejects_by_reason": dict(progress.rejects),
        "requests": teacher.requests,
        "retries": getattr(teacher, "retries", 0),
        "prompt_tokens": teacher.usage["prompt_tokens"],
        "completion_tokens": teacher.usage["completion_tokens"],
        "usage_by_model": by_model,
        "cost_usd": None if None in costs else sum(costs),
        "seconds": round(elapsed, 2),
        "cpu_seconds": round(cpu, 3),
        "dialogs_per_s": round(n_ok / elapsed, 3) if elapsed and n_ok else 0.0,
        "tokens_per_s": round(progress.tokens / elapsed, 1) if elapsed else 0.0,
    }


# What to change for each reject reason, when nothing usable came out of a collection.
ADVICE = {
    "length": "collect.on_truncated=drop_turn keeps the complete turns before a cut, or raise teacher.max_tokens",
    "no_transcript": "a stronger teacher (teacher=openai, or a larger local model) writes the [Human]/[AI] format",
    "role_order": "a stronger teacher keeps the [Human]/[AI] turns in order",
    "too_few_turns": "raise teacher.max_tokens, or lower collect.min_turns",
    "empty": "check the teacher's replies in rejects.jsonl (an empty reply is a teacher or template problem)",
    "too_long": "shorten the seeds, or raise collect.max_seed_tokens",
    "bad_request": "read the endpoint's message in rejects.jsonl (a prompt it refuses)",
    "oversized": "the endpoint ignores max_tokens: check teacher.base_url / the server",
    "template_copy": "the teacher copies the template's example: a stronger teacher, or collect.mode=turns",
    "repetitive": "the teacher loops: a stronger teacher, or a lower teacher.temperature",
    "near_duplicate": "the teacher writes the same dialog for different seeds: a stronger teacher",
    "echo": "the AI turns repeat the human's: a stronger teacher",
}


def filter_quality(
    dialogs_path: Path, offsets: np.ndarray, ccfg: Any, kept_path: Path, rejects_path: Path, spill_dir: Any = None
) -> dict:
    """The quality filters over the dialogs at `offsets` of `dialogs_path` (in the order given: seed order): each
    kept dialog is written to `kept_path`, each reject (holding the whole dialog) to `rejects_path`. Returns the
    counts: kept, rejects, reasons (a Counter), turns (of the kept dialogs)."""
    qf = QualityFilter.from_config(ccfg.quality, ccfg.template if ccfg.mode == "transcript" else "", spill_dir)
    kept = turns = 0
    reasons: Counter[str] = Counter()
    try:
        with (
            open(dialogs_path, "rb") as src,
            open(kept_path, "w", encoding="utf-8") as out,
            open(rejects_path, "w", encoding="utf-8") as rej,
        ):
            for off in offsets.tolist():
                d = _read_at(src, off)
                why = qf.check(d["turns"])
                if why is None:
                    out.write(json.dumps(d, ensure_ascii=False) + "\n")
                    kept, turns = kept + 1, turns + len(d["turns"])
                    continue
                reasons[why[0]] += 1
                r = {
                    "seed": d["seed"],
                    "source": d["source"],
                    "key": d["key"],
                    "mode": d["mode"],
                    "reason": why[0],
                    "detail": why[1],
                    "dialog": d,
                }
                rej.write(json.dumps(r, ensure_ascii=False) + "\n")
    finally:
        qf.close()
    return {"kept": kept, "rejects": sum(reasons.values()), "reasons": reasons, "turns": turns}


def no_usable_dialog(metrics: dict, rejects_path: Path) -> UserError:
    by_reason = Counter(metrics.get("rejects_by_reason") or {})
    counts = ", ".join(f"{r}: {n}" for r, n in by_reason.most_common()) or "no rejects either"
    advice = "; ".join(f"{r}: {ADVICE[r]}" for r, _ in by_reason.most_common(3) if r in ADVICE)
    return UserError(
        f"collect: no usable dialog out of {metrics['seeds']} seeds ({counts}; see {rejects_path}). "
        f"What to change: {advice or 'a stronger teacher'}"
    )


def teacher_tokenizer(cfg: Any) -> Any:
    """The local teacher's tokenizer (to measure seeds in its tokens), or None for a remote teacher."""
    if cfg.teacher.backend != "local":
        return None
    return tokenizer_for_serving(cfg.teacher.serve.model, cache_dir(cfg))


def collection_dir(cfg: Any, run_dir: Path) -> Path:
    """Where the teacher's records of this collection live: the shared dir (`collect.shared`), keyed by the stage's
    fingerprint without `data.limit` and the quality filters, or the run's own `collect/teacher`."""
    if not cfg.collect.shared:
        return run_dir / "collect" / "teacher"
    unlimited = copy.deepcopy(cfg)
    unlimited.data.limit = None
    with open_dict(unlimited.collect):  # the filters act on what was collected: new thresholds ask nothing
        del unlimited.collect["quality"]
    return cache_dir(cfg) / "collect" / STAGE.fingerprint(unlimited, {})


def _teacher(cfg: Any, backends: Any, collection: Path) -> ChatClient | BatchRunner:
    if cfg.teacher.batch:  # the batches are recorded beside the collection they fill
        return BatchRunner.from_config(cfg.teacher, collection / "batches", role="teacher")
    return backends.client("teacher")


def estimate(cfg: Config, run_dir: Path, sample: int = 256) -> Estimate:
    """What collecting this config's seeds would cost, for the seeds with no record yet in its collection dir
    (nothing is written, nothing is sent): refined by a sample of the finished records of these seeds."""
    seeds = load_seeds(cfg.data)
    out = collection_dir(cfg, run_dir)
    keys = _seed_keys(seeds, cfg.collect, cfg.teacher)
    todo = _todo(keys, _done_keys(out, repair_tail=False, skip_torn_tail=True))
    rng, picked, seen = random.Random(0), [], 0
    for name in ("dialogs.jsonl", "rejects.jsonl"):  # a reservoir sample: the records are never all held
        for r in iter_records(out / name, skip_torn_tail=True):
            if not _in(keys.unique, r.get("key")):
                continue
            seen += 1
            if len(picked) < sample:
                picked.append(r)
            elif (j := rng.randrange(seen)) < sample:
                picked[j] = r
    return estimate_collection(
        [seeds[i].question for i in todo.tolist()],
        cfg.collect,
        cfg.teacher,
        tokenizer=teacher_tokenizer(cfg),
        finished=picked,
        done=len(keys.unique) - len(todo),
        sample=sample,
    )


def run(cfg: Config, run_dir: Path, backends: Any) -> dict:
    """The pipeline's collect stage, into `run_dir/collect`.

    With `collect.shared` (the default) it collects into `<cache_dir>/collect/<fingerprint>` and copies this run's
    seeds' dialogs and rejects into the run. The dir is keyed by the stage's fingerprint without `data.limit`: the
    seeds of a larger limit begin with those of a smaller one, so growing a corpus (a new run with
    data.limit=10000 after 1000) asks only for the new seeds, and a smaller limit asks for nothing. The lock
    serialises the jobs of a sweep that start together: the first collects, the others find every dialog done
    (collect resumes by key) and send no request. A filtered copy, not a link, so a later growth of the shared
    collection never changes a finished run's inputs."""
    seed_stats: dict = {}
    seeds = load_seeds(cfg.data, seed_stats)
    tokenizer = teacher_tokenizer(cfg)
    out = run_dir / "collect"
    shared = collection_dir(cfg, run_dir)
    teacher = _teacher(cfg, backends, shared)
    if cfg.collect.shared:
        with file_lock(shared / ".lock"):
            metrics = collect(seeds, teacher, cfg.collect, cfg.teacher, shared, copy_to=out, tokenizer=tokenizer)
        metrics["shared_dir"] = str(shared)
    else:  # the teacher's dialogs in the run, the filtered ones beside them
        metrics = collect(seeds, teacher, cfg.collect, cfg.teacher, shared, copy_to=out, tokenizer=tokenizer)
    spent = spent_summary(
        (iter_records(out / name) for name in ("dialogs.jsonl", "rejects.jsonl", "failures.jsonl")),
        price_of(cfg.teacher),
        float(cfg.teacher.batch_discount),
    )
    card = data_card(
        seeds,
        iter_records(out / "dialogs.jsonl"),
        iter_records(out / "rejects.jsonl"),
        metrics,
        tokenizer,
        seed_stats.get("duplicate_seeds", 0),
        spent=spent,
    )
    write_json(out / "data_card.json", card)
    (out / "data_card.md").write_text(card_markdown(card))
    metrics["duplicate_seeds"] = card["duplicates_removed"]["seeds"]
    metrics["spent_usd"] = spent["cost_usd"]
    if metrics["dialogs"] == 0:
        raise no_usable_dialog(metrics, out / "rejects.jsonl")
    return metrics


STAGE = Stage(
    "collect",
    run,
    shapes=("data", "collect", "teacher"),
    ignores=BACKEND_KNOBS | {"shared", "samples_to_log"},
    writes=(
        "collect/dialogs.jsonl",
        "collect/rejects.jsonl",
        "collect/failures.jsonl",
        "collect/data_card.json",
        "collect/data_card.md",
    ),
    # collect.shared=false: the teacher's own files, before the filters, and with teacher.batch=true its batches
    may_write=("collect/teacher/*.jsonl", "collect/teacher/batches/*"),
    log_wandb=log_dialogs,  # the dialogs, rejects and data card as a `dataset` artifact (logger.artifacts)
)
