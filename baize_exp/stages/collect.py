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

Standalone: `baize-collect data=quora teacher=openai ...` (the same conf tree and overrides as run.py; it runs
the pipeline with `stages=[collect]`).
"""

from __future__ import annotations

import asyncio
import copy
import logging
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import open_dict
from tqdm.auto import tqdm

from baize_exp.chat.client import ChatClient, ChatOutage, ChatResult
from baize_exp.config import cache_dir
from baize_exp.data import Seed, load_seeds, parse_transcript, to_baize_text
from baize_exp.data.card import card_markdown, data_card
from baize_exp.data.quality import QualityFilter
from baize_exp.errors import Interrupted, UserError
from baize_exp.io import JsonlWriter, content_hash, file_lock, read_jsonl, write_json, write_jsonl
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


async def _transcript_dialog(seed: Seed, key: str, client: ChatClient, ccfg: Any) -> tuple[dict, list[ChatResult]]:
    res = await client.acomplete(
        [{"role": "user", "content": ccfg.template.format(seed=seed.question)}], seed=request_seed(key)
    )
    bad = _unusable(res, client.defaults["max_tokens"])
    if bad:
        return bad, [res]
    finish = res.finish_reasons[0]
    if finish == "length" and ccfg.on_truncated == "reject":
        return {"reason": "length", "detail": "reply cut by teacher.max_tokens", "raw": res.text}, [res]
    parsed = parse_transcript(res.text, seed.question, ccfg.min_turns, truncated=finish == "length")
    if parsed.turns is None:
        return {"reason": parsed.reason, "detail": parsed.detail, "raw": res.text}, [res]
    return {"turns": parsed.turns, "finish_reason": finish}, [res]


async def _turns_dialog(seed: Seed, key: str, client: ChatClient, ccfg: Any) -> tuple[dict, list[ChatResult]]:
    turns = [{"role": "human", "text": seed.question}]
    results: list[ChatResult] = []
    finish = "stop"
    while len(turns) < ccfg.max_turns:
        role = "ai" if turns[-1]["role"] == "human" else "human"
        if role == "ai":
            messages = [{"role": "system", "content": ccfg.ai_system.format(seed=seed.question)}] + [
                {"role": "user" if t["role"] == "human" else "assistant", "content": t["text"]} for t in turns
            ]
        else:
            messages = [
                {"role": "user", "content": ccfg.human_template.format(seed=seed.question, history=_history(turns))}
            ]
        res = await client.acomplete(messages, seed=request_seed(key, len(turns)))
        results.append(res)
        bad = _unusable(res, client.defaults["max_tokens"], _history(turns))
        if bad:
            where = f"turn {len(turns) + 1}: "
            return (
                {**bad, "detail": where + bad["detail"]} if "reason" in bad else {"failed": where + bad["failed"]}
            ), results
        raw = f"{_history(turns)}\n[{'AI' if role == 'ai' else 'Human'}] {res.text}"
        finish = res.finish_reasons[0]
        if finish == "length":
            if ccfg.on_truncated == "reject":
                return {
                    "reason": "length",
                    "detail": f"turn {len(turns) + 1} cut by teacher.max_tokens",
                    "raw": raw,
                }, results
            break  # drop_turn: keep the complete turns before it
        text, bad = _clean_turn(res.text, role)
        if bad:
            return {
                "reason": bad,
                "detail": f"turn {len(turns) + 1} ({role}): nothing said as the {role}",
                "raw": raw,
            }, results
        turns.append({"role": role, "text": text})
    if turns[-1]["role"] == "human":
        turns.pop()  # a dialog ends on an answer
    if len(turns) < ccfg.min_turns:
        return {
            "reason": "too_few_turns",
            "detail": f"{len(turns)} complete turns, need {ccfg.min_turns}",
            "raw": _history(turns),
        }, results
    return {"turns": turns, "finish_reason": finish}, results


# --- progress ----------------------------------------------------------------------------------------------


class Progress:
    """Counts for the bar (dialogs/s, tokens/s, retries, rejects), and the same figures to W&B when a run is live."""

    def __init__(self, total: int, client: ChatClient, wandb_every_s: float = 5.0):
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
            "retries": self.client.retries,
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


def _log_samples(dialogs: list[dict], n: int) -> None:
    run = _wandb_run()
    if not n or not dialogs or run is None:
        return
    table = sys.modules["wandb"].Table(columns=["id", "source", "seed", "turns", "dialog"])
    for d in dialogs[:n]:
        table.add_data(d["id"], d["source"], d["seed"], len(d["turns"]), to_baize_text(d["turns"]))
    run.log({"collect/samples": table})


# --- the engine --------------------------------------------------------------------------------------------


async def _run_all(
    todo: list[tuple[Seed, str]],
    client: ChatClient,
    ccfg: Any,
    tcfg: Any,
    writers: dict,
    progress: Progress,
    new_dialogs: list[dict],
    history: dict[str, list[dict]],
) -> str | None:
    """Every seed of `todo`, `concurrency` at a time; each outcome is written the moment it is known. Returns the
    outage message if the endpoint went down (the seeds not yet asked stay unfinished), else None."""
    make = _transcript_dialog if ccfg.mode == "transcript" else _turns_dialog
    teacher = {"model": tcfg.model, "temperature": tcfg.temperature, "top_p": tcfg.top_p, "max_tokens": tcfg.max_tokens}
    pending = iter(todo)
    outage: list[str] = []

    async def worker() -> None:
        for seed, key in pending:  # one shared iterator: each worker takes the next seed when it is free
            try:
                out, results = await make(seed, key, client, ccfg)
            except ChatOutage as e:  # the endpoint is down: stop asking; what was asked is written
                outage.append(str(e))
                return
            usage = Counter()
            for r in results:
                usage.update(r.usage)
            base = {"seed": seed.question, "source": seed.source, "key": key, "mode": ccfg.mode}
            spent = {"usage": dict(usage), "requests": sum(r.attempts for r in results)}
            earlier = {"earlier_failures": len(history[key])} if history.get(key) else {}
            if "failed" in out:
                rec = {**base, "error": out["failed"], "time": round(time.time(), 3), **spent}
                writers["failures"].write(rec)
                history.setdefault(key, []).append(rec)
            elif "turns" in out:
                rec = {
                    "id": f"{seed.id}-{key[:8]}",
                    **base,
                    "turns": out["turns"],
                    "teacher": teacher,
                    "finish_reason": out["finish_reason"],
                    **spent,
                    **earlier,
                }
                writers["dialogs"].write(rec)
                new_dialogs.append(rec)
            else:
                writers["rejects"].write({**base, **out, **spent, **earlier})
            progress.update(out, results)

    async with client.session():
        workers = [asyncio.ensure_future(worker()) for _ in range(min(client.concurrency, len(todo)))]
        try:
            await asyncio.gather(*workers)
        finally:  # a fatal error (bad key, bad request) stops every other dialog now
            for w in workers:
                w.cancel()
            await asyncio.gather(*workers, return_exceptions=True)
    return outage[0] if outage else None


def _too_long(seeds: list[tuple[Seed, str]], ccfg: Any, tokenizer: Any) -> list[dict]:
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


def _failure_history(out_dir: Path) -> dict[str, list[dict]]:
    """The transient failures so far (failures.jsonl), by dialog key."""
    history: dict[str, list[dict]] = {}
    for f in read_jsonl(out_dir / "failures.jsonl", repair_tail=True):
        history.setdefault(f["key"], []).append(f)
    return history


@dataclass
class _Resumed:
    """What an earlier attempt left in a collection dir, and what is left to ask for."""

    dialogs: list[dict]
    history: dict[str, list[dict]]  # transient failures by key
    keys: list[str]  # every seed's dialog key, in seed order
    todo: list[tuple[Seed, str]]  # the seeds with neither a dialog nor a reject yet, once each


def resume(seeds: list[Seed], ccfg: Any, tcfg: Any, out_dir: Path) -> _Resumed:
    """Read what is done in `out_dir` (a torn last line repaired): the seeds to request are those with no dialog
    and no reject yet."""
    out_dir.mkdir(parents=True, exist_ok=True)
    old_dialogs = read_jsonl(out_dir / "dialogs.jsonl", repair_tail=True)
    old_rejects = read_jsonl(out_dir / "rejects.jsonl", repair_tail=True)
    history = _failure_history(out_dir)
    done = {r["key"] for r in old_dialogs + old_rejects}
    keys = [dialog_key(s, ccfg, tcfg) for s in seeds]
    todo = list({k: (s, k) for s, k in zip(seeds, keys, strict=True) if k not in done}.values())
    retrying = sum(k in history for _, k in todo)
    log.info(
        "collect: %d seeds, %d already done, %d to request%s",
        len(seeds),
        len(seeds) - len(todo),
        len(todo),
        f" ({retrying} of them failed before, for a transient reason)" if retrying else "",
    )
    return _Resumed(old_dialogs, history, keys, todo)


def request(
    state: _Resumed, client: ChatClient, ccfg: Any, tcfg: Any, out_dir: Path, tokenizer: Any
) -> tuple[list[dict], Progress, str | None]:
    """Ask the teacher for every seed left: (new dialogs, the progress with its counts, the outage that stopped
    it early or None). Each record is flushed as it completes, so a kill loses nothing written; fsyncs are grouped
    per second. A seed over collect.max_seed_tokens is a reject with no request."""
    new_dialogs: list[dict] = []
    progress = Progress(len(state.todo), client)
    outage = None
    try:
        if state.todo:
            with (
                JsonlWriter(out_dir / "dialogs.jsonl", sync_every_s=1.0) as dw,
                JsonlWriter(out_dir / "rejects.jsonl", sync_every_s=1.0) as rw,
                JsonlWriter(out_dir / "failures.jsonl", sync_every_s=1.0) as fw,
            ):
                too_long = _too_long(state.todo, ccfg, tokenizer)
                for rec in too_long:
                    rw.write(rec)
                    progress.update(rec, [])
                long_keys = {r["key"] for r in too_long}
                writers = {"dialogs": dw, "rejects": rw, "failures": fw}
                asked = [(s, k) for s, k in state.todo if k not in long_keys]
                outage = asyncio.run(_run_all(asked, client, ccfg, tcfg, writers, progress, new_dialogs, state.history))
    finally:
        progress.close()
    return new_dialogs, progress, outage


def collect(
    seeds: list[Seed],
    client: ChatClient,
    ccfg: Any,
    tcfg: Any,
    out_dir: Path,
    copy_to: Path | None = None,
    tokenizer: Any = None,
) -> dict:
    """Collect a dialog for every seed that has no dialog or reject yet in `out_dir`; return the stage metrics.
    Raises Interrupted (after writing everything that finished) when seeds are left whose requests failed.

    `out_dir` keeps what the teacher wrote (every parsed dialog); `copy_to` gets these seeds' dialogs that pass
    the quality filters (`collect.quality`), and the rejects with those that did not (a run's copy of a shared
    collection, which may hold the dialogs of a larger data.limit too); without it `out_dir` keeps only the
    dialogs that pass. `tokenizer`: the teacher's, to measure seeds in its tokens. Phases: resume, request, finish."""
    state = resume(seeds, ccfg, tcfg, out_dir)
    t0, cpu0 = time.monotonic(), time.process_time()
    new_dialogs, progress, outage = request(state, client, ccfg, tcfg, out_dir, tokenizer)
    elapsed, cpu = time.monotonic() - t0, time.process_time() - cpu0
    _log_samples(new_dialogs or state.dialogs, ccfg.samples_to_log)
    kept = finish(state, new_dialogs, outage, ccfg, out_dir, copy_to)
    asked = _request_figures(client, progress, elapsed, cpu, len(new_dialogs))
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
        len(new_dialogs),
        metrics["new_rejects"],
        dict(progress.rejects),
        client.requests,
        client.retries,
        elapsed,
    )
    return metrics


def finish(
    state: _Resumed, new_dialogs: list[dict], outage: str | None, ccfg: Any, out_dir: Path, copy_to: Path | None
) -> dict:
    """Stop (transient, everything kept) if a seed is unfinished; else apply the quality filters, write the run's
    files, and return the figures about these seeds (a shared collection may hold a larger data.limit's too)."""
    history, wanted = state.history, set(state.keys)
    all_dialogs = [d for d in state.dialogs + new_dialogs if d["key"] in wanted]
    all_rejects = [r for r in read_jsonl(out_dir / "rejects.jsonl") if r["key"] in wanted]
    finished = {r["key"] for r in all_dialogs + all_rejects}
    unfinished = [k for k in dict.fromkeys(state.keys) if k not in finished]
    if unfinished:
        failed = [k for k in unfinished if k in history]
        last = history[failed[-1]][-1]["error"] if failed else None
        why = outage or f"{len(failed)} failed after their retries (last: {last})"
        raise Interrupted(
            f"collect: {len(unfinished)} of {len(wanted)} seeds are unfinished: {why}. The {len(finished)} finished "
            f"are kept in {out_dir}; the unfinished ones are asked again by a rerun"
        )
    teacher_dialogs = len(all_dialogs)
    all_dialogs, quality_rejects = filter_quality(all_dialogs, state.keys, ccfg)
    all_rejects += quality_rejects
    if copy_to is not None:
        copy_to.mkdir(parents=True, exist_ok=True)
        write_jsonl(copy_to / "dialogs.jsonl", all_dialogs)
        write_jsonl(copy_to / "rejects.jsonl", all_rejects)
        write_jsonl(copy_to / "failures.jsonl", [f for k in wanted for f in history.get(k, [])])
    elif quality_rejects:  # in place: the dialogs that failed a filter move to the rejects, whole
        gone = {r["key"] for r in quality_rejects}
        write_jsonl(out_dir / "dialogs.jsonl", [d for d in state.dialogs + new_dialogs if d["key"] not in gone])
        write_jsonl(out_dir / "rejects.jsonl", read_jsonl(out_dir / "rejects.jsonl") + quality_rejects)
    recovered = [k for k in wanted if k in history]
    last_failure = max((f for k in recovered for f in history[k]), key=lambda f: f.get("time", 0), default=None)
    return {
        "dialogs": len(all_dialogs),
        "rejects": len(all_rejects),
        "teacher_dialogs": teacher_dialogs,
        "quality_rejects": dict(Counter(r["reason"] for r in quality_rejects)),
        "rejects_by_reason": dict(Counter(r["reason"] for r in all_rejects)),
        # seeds whose requests failed (transient) on some attempt before they got their dialog or reject
        "seeds_that_failed_before": len(recovered),
        "failed_attempts": sum(len(history[k]) for k in recovered),
        "last_failure": last_failure["error"] if last_failure else None,
        "avg_turns": round(sum(len(d["turns"]) for d in all_dialogs) / max(1, len(all_dialogs)), 2),
    }


def _request_figures(client: ChatClient, progress: Progress, elapsed: float, cpu: float, n_ok: int) -> dict:
    """What this attempt's requests made, did and cost."""
    by_model = client.usage_report()
    costs = [m["cost_usd"] for m in by_model.values()]
    return {
        "new_dialogs": n_ok,
        "new_rejects": sum(progress.rejects.values()),
        "new_rejects_by_reason": dict(progress.rejects),
        "requests": client.requests,
        "retries": client.retries,
        "prompt_tokens": client.usage["prompt_tokens"],
        "completion_tokens": client.usage["completion_tokens"],
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


def filter_quality(dialogs: list[dict], keys: list[str], ccfg: Any) -> tuple[list[dict], list[dict]]:
    """(kept, rejects): the quality filters over the teacher's dialogs in seed order, so which of two near
    duplicates is kept does not depend on which answer came back first. A reject keeps the whole dialog."""
    order = {k: i for i, k in enumerate(dict.fromkeys(keys))}
    qf = QualityFilter.from_config(ccfg.quality, ccfg.template if ccfg.mode == "transcript" else "")
    kept, rejects = [], []
    for d in sorted(dialogs, key=lambda d: order.get(d["key"], len(order))):
        why = qf.check(d["turns"])
        if why is None:
            kept.append(d)
        else:
            rejects.append(
                {
                    "seed": d["seed"],
                    "source": d["source"],
                    "key": d["key"],
                    "mode": d["mode"],
                    "reason": why[0],
                    "detail": why[1],
                    "dialog": d,
                }
            )
    return kept, rejects


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


def run(cfg: Any, run_dir: Path, backends: Any) -> dict:
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
    client, tokenizer = backends.client("teacher"), teacher_tokenizer(cfg)
    out = run_dir / "collect"
    if cfg.collect.shared:
        unlimited = copy.deepcopy(cfg)
        unlimited.data.limit = None
        with open_dict(unlimited.collect):  # the filters act on what was collected: new thresholds ask nothing
            del unlimited.collect["quality"]
        shared = cache_dir(cfg) / "collect" / STAGE.fingerprint(unlimited, {})
        with file_lock(shared / ".lock"):
            metrics = collect(seeds, client, cfg.collect, cfg.teacher, shared, copy_to=out, tokenizer=tokenizer)
        metrics["shared_dir"] = str(shared)
    else:  # the teacher's dialogs in the run, the filtered ones beside them
        metrics = collect(seeds, client, cfg.collect, cfg.teacher, out / "teacher", copy_to=out, tokenizer=tokenizer)
    card = data_card(
        seeds,
        read_jsonl(out / "dialogs.jsonl"),
        read_jsonl(out / "rejects.jsonl"),
        metrics,
        tokenizer,
        seed_stats.get("duplicate_seeds", 0),
    )
    write_json(out / "data_card.json", card)
    (out / "data_card.md").write_text(card_markdown(card))
    metrics["duplicate_seeds"] = card["duplicates_removed"]["seeds"]
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
    may_write=("collect/teacher/*.jsonl",),  # collect.shared=false: the teacher's own files, before the filters
    log_wandb=log_dialogs,  # the dialogs, rejects and data card as a `dataset` artifact (logger.artifacts)
)
