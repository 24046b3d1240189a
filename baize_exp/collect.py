"""Stage 1 — self-chat collection: the teacher writes [Human]/[AI] dialogs from seed questions.

Two modes (`collect.mode`): `transcript`, the paper's, one request in which the teacher writes both sides; `turns`,
the teacher plays the human and the AI in turn, one request per turn, up to `collect.max_turns` turns.

Output: `<run>/collect/dialogs.jsonl` (one dialog a line) and `rejects.jsonl` (one reject a line, with the reason
and the raw reply). A record is written, flushed and fsynced the moment its dialog is done, so a crash or `kill -9`
loses only dialogs in flight. Every record carries `key`, a hash of what produced it (seed, mode, templates,
teacher model, sampling settings): a rerun sends requests only for keys with no dialog or reject yet, so an
interrupted collection resumes and an unchanged one sends nothing.

Dialogs run `teacher.concurrency` at a time on one event loop; the chat client adds the rate limits and retries.

Standalone: `python -m baize_exp.collect data=quora teacher=openai ...` (the same conf tree and overrides as
run.py; it runs the pipeline with `stages=[collect]`).
"""

from __future__ import annotations

import asyncio
import logging
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from baize_exp.chat.client import ChatClient, ChatResult
from baize_exp.data import Seed, load_seeds, parse_transcript, to_baize_text
from baize_exp.io import JsonlWriter, content_hash, read_jsonl, write_jsonl

log = logging.getLogger(__name__)
CONF_DIR = Path(__file__).resolve().parents[1] / "conf"


def dialog_key(seed: Seed, ccfg: Any, tcfg: Any) -> str:
    """Hash of everything that shapes the teacher's requests for this seed."""
    sampling = {"temperature": tcfg.temperature, "top_p": tcfg.top_p, "max_tokens": tcfg.max_tokens}
    if ccfg.mode == "transcript":
        return content_hash(seed.question, ccfg.mode, ccfg.template, tcfg.model, sampling)
    return content_hash(seed.question, ccfg.mode, [ccfg.human_template, ccfg.ai_system, ccfg.max_turns],
                        tcfg.model, sampling)


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
            text = text[len(prefix):].lstrip(" :")
    text = text.split(other, 1)[0].strip()
    return text, None if text else "empty"


async def _transcript_dialog(seed: Seed, key: str, client: ChatClient, ccfg: Any) -> tuple[dict, list[ChatResult]]:
    res = await client.acomplete([{"role": "user", "content": ccfg.template.format(seed=seed.question)}],
                                 seed=request_seed(key))
    if res.error:
        return {"reason": "api_error", "detail": res.error, "raw": None}, [res]
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
                {"role": "user" if t["role"] == "human" else "assistant", "content": t["text"]} for t in turns]
        else:
            messages = [{"role": "user", "content": ccfg.human_template.format(seed=seed.question,
                                                                               history=_history(turns))}]
        res = await client.acomplete(messages, seed=request_seed(key, len(turns)))
        results.append(res)
        raw = f"{_history(turns)}\n[{'AI' if role == 'ai' else 'Human'}] {res.text}"
        if res.error:
            return {"reason": "api_error", "detail": f"turn {len(turns) + 1}: {res.error}", "raw": raw}, results
        finish = res.finish_reasons[0]
        if finish == "length":
            if ccfg.on_truncated == "reject":
                return {"reason": "length", "detail": f"turn {len(turns) + 1} cut by teacher.max_tokens",
                        "raw": raw}, results
            break  # drop_turn: keep the complete turns before it
        text, bad = _clean_turn(res.text, role)
        if bad:
            return {"reason": bad, "detail": f"turn {len(turns) + 1} ({role}): nothing said as the {role}",
                    "raw": raw}, results
        turns.append({"role": role, "text": text})
    if turns[-1]["role"] == "human":
        turns.pop()  # a dialog ends on an answer
    if len(turns) < ccfg.min_turns:
        return {"reason": "too_few_turns", "detail": f"{len(turns)} complete turns, need {ccfg.min_turns}",
                "raw": _history(turns)}, results
    return {"turns": turns, "finish_reason": finish}, results


# --- progress ----------------------------------------------------------------------------------------------

class Progress:
    """Counts for the bar (dialogs/s, tokens/s, retries, rejects), and the same figures to W&B when a run is live."""

    def __init__(self, total: int, client: ChatClient, wandb_every_s: float = 5.0):
        self.client, self.t0 = client, time.monotonic()
        self.dialogs, self.rejects = 0, Counter()
        self.tokens = 0
        self.bar = tqdm(total=total, desc="collect", unit="dialog", mininterval=0.5, dynamic_ncols=True,
                        disable=total == 0)
        self._next_postfix = self._next_wandb = 0.0
        self.wandb_every_s = wandb_every_s
        self.wb = _wandb_run()

    def figures(self) -> dict[str, float]:
        dt = max(1e-9, time.monotonic() - self.t0)
        return {"dialogs": self.dialogs, "rejects": sum(self.rejects.values()),
                "dialogs_per_s": round(self.dialogs / dt, 3), "tokens_per_s": round(self.tokens / dt, 1),
                "requests": self.client.requests, "retries": self.client.retries}

    def update(self, rejected: str | None, results: list[ChatResult]) -> None:
        if rejected:
            self.rejects[rejected] += 1
        else:
            self.dialogs += 1
        self.tokens += sum(r.usage.get("prompt_tokens", 0) + r.usage.get("completion_tokens", 0) for r in results)
        self.bar.update(1)
        now = time.monotonic()
        if now >= self._next_postfix:  # formatting every dialog would cost more CPU than the requests
            self._next_postfix = now + 0.5
            f = self.figures()
            self.bar.set_postfix_str(f"{f['dialogs_per_s']:.1f} dlg/s {f['tokens_per_s']:.0f} tok/s "
                                     f"retries={f['retries']} rejects={f['rejects']}", refresh=False)
        if self.wb is not None and now >= self._next_wandb:
            self._next_wandb = now + self.wandb_every_s
            self.wb.log({f"collect/progress/{k}": v for k, v in self.figures().items()})

    def close(self) -> None:
        self.bar.close()
        if self.wb is not None:
            self.wb.log({f"collect/progress/{k}": v for k, v in self.figures().items()})


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

async def _run_all(todo: list[tuple[Seed, str]], client: ChatClient, ccfg: Any, tcfg: Any, dw: JsonlWriter,
                   rw: JsonlWriter, progress: Progress, new_dialogs: list[dict]) -> None:
    make = _transcript_dialog if ccfg.mode == "transcript" else _turns_dialog
    teacher = {"model": tcfg.model, "temperature": tcfg.temperature, "top_p": tcfg.top_p,
               "max_tokens": tcfg.max_tokens}
    pending = iter(todo)

    async def worker() -> None:
        for seed, key in pending:  # one shared iterator: each worker takes the next seed when it is free
            out, results = await make(seed, key, client, ccfg)
            usage = Counter()
            for r in results:
                usage.update(r.usage)
            base = {"seed": seed.question, "source": seed.source, "key": key, "mode": ccfg.mode}
            spent = {"usage": dict(usage), "requests": sum(r.attempts for r in results)}
            if "turns" in out:
                rec = {"id": f"{seed.id}-{key[:8]}", **base, "turns": out["turns"], "teacher": teacher,
                       "finish_reason": out["finish_reason"], **spent}
                dw.write(rec)
                new_dialogs.append(rec)
            else:
                rw.write({**base, **out, **spent})
            progress.update(out.get("reason"), results)

    async with client.session():
        workers = [asyncio.ensure_future(worker()) for _ in range(min(client.concurrency, len(todo)))]
        try:
            await asyncio.gather(*workers)
        finally:  # a fatal error (bad key, bad request) stops every other dialog now
            for w in workers:
                w.cancel()
            await asyncio.gather(*workers, return_exceptions=True)


def collect(seeds: list[Seed], client: ChatClient, ccfg: Any, tcfg: Any, out_dir: Path,
            copy_to: Path | None = None) -> dict:
    """Collect a dialog for every seed that has no dialog or reject yet in `out_dir`; return the stage metrics.

    `copy_to`: also write these seeds' dialogs and rejects there (a run's copy of a shared collection, which may
    hold the dialogs of a larger data.limit too)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    dialogs_path, rejects_path = out_dir / "dialogs.jsonl", out_dir / "rejects.jsonl"
    old_dialogs = read_jsonl(dialogs_path, repair_tail=True)
    old_rejects = read_jsonl(rejects_path, repair_tail=True)
    if ccfg.retry_errors and any(r["reason"] == "api_error" for r in old_rejects):
        # after an outage: forget the requests that failed (atomic rewrite), so they are asked again below
        old_rejects = [r for r in old_rejects if r["reason"] != "api_error"]
        write_jsonl(rejects_path, old_rejects)
    done = {r["key"] for r in old_dialogs + old_rejects}
    keys = [dialog_key(s, ccfg, tcfg) for s in seeds]
    todo, queued = [], set()
    for s, k in zip(seeds, keys, strict=True):
        if k not in done and k not in queued:
            todo.append((s, k))
            queued.add(k)
    log.info("collect: %d seeds, %d already done, %d to request", len(seeds), len(seeds) - len(todo), len(todo))

    t0, cpu0 = time.monotonic(), time.process_time()
    new_dialogs: list[dict] = []
    progress = Progress(len(todo), client)
    try:
        if todo:
            # each record is flushed as it completes (a kill loses nothing written); fsyncs grouped per second
            with JsonlWriter(dialogs_path, sync_every_s=1.0) as dw, JsonlWriter(rejects_path, sync_every_s=1.0) as rw:
                asyncio.run(_run_all(todo, client, ccfg, tcfg, dw, rw, progress, new_dialogs))
    finally:
        progress.close()
    elapsed, cpu = time.monotonic() - t0, time.process_time() - cpu0
    _log_samples(new_dialogs or old_dialogs, ccfg.samples_to_log)

    # the figures describe these seeds: a shared collection may also hold the dialogs of a larger data.limit
    wanted = set(keys)
    all_dialogs = [d for d in old_dialogs + new_dialogs if d["key"] in wanted]
    all_rejects = [r for r in read_jsonl(rejects_path) if r["key"] in wanted]
    if copy_to is not None:
        write_jsonl(copy_to / "dialogs.jsonl", all_dialogs)
        write_jsonl(copy_to / "rejects.jsonl", all_rejects)
    by_model = client.usage_report()
    costs = [m["cost_usd"] for m in by_model.values()]
    n_ok = len(new_dialogs)
    metrics = {
        "seeds": len(seeds), "requested": len(todo), "new_dialogs": n_ok,
        "new_rejects": sum(progress.rejects.values()), "new_rejects_by_reason": dict(progress.rejects),
        "dialogs": len(all_dialogs), "rejects": len(all_rejects),
        "rejects_by_reason": dict(Counter(r["reason"] for r in all_rejects)),
        "requests": client.requests, "retries": client.retries,
        "prompt_tokens": client.usage["prompt_tokens"], "completion_tokens": client.usage["completion_tokens"],
        "usage_by_model": by_model, "cost_usd": None if None in costs else sum(costs),
        "seconds": round(elapsed, 2), "cpu_seconds": round(cpu, 3),
        "dialogs_per_s": round(n_ok / elapsed, 3) if elapsed and n_ok else 0.0,
        "tokens_per_s": round(progress.tokens / elapsed, 1) if elapsed else 0.0,
        "avg_turns": round(sum(len(d["turns"]) for d in all_dialogs) / max(1, len(all_dialogs)), 2),
    }
    log.info("collect: %d new dialogs, %d new rejects %s, %d requests (%d retries) in %.1fs", n_ok,
             metrics["new_rejects"], dict(progress.rejects), client.requests, client.retries, elapsed)
    return metrics


def run(cfg: Any, run_dir: Path, backends: Any, copy_to: Path | None = None) -> dict:
    """The pipeline's collect stage (into `run_dir/collect`; `copy_to` as in `collect`)."""
    seeds = load_seeds(cfg.data)
    metrics = collect(seeds, backends.client("teacher"), cfg.collect, cfg.teacher, run_dir / "collect", copy_to)
    if metrics["dialogs"] == 0:
        raise RuntimeError(f"collect: no usable dialog out of {len(seeds)} seeds; see "
                           f"{run_dir / 'collect' / 'rejects.jsonl'} for the reasons")
    return metrics


def main() -> None:
    """`python -m baize_exp.collect [overrides]`: the pipeline with only the collect stage."""
    import hydra
    from omegaconf import DictConfig

    from baize_exp.config import register_configs
    from baize_exp.errors import exit_on_error
    from baize_exp.pipeline import run_pipeline

    register_configs()

    @hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="config")
    def _main(cfg: DictConfig) -> None:
        cfg.stages = ["collect"]
        with exit_on_error("baize_exp.collect"):
            run_pipeline(cfg)

    _main()


if __name__ == "__main__":
    main()
