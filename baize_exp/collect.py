"""Stage 1 — self-chat collection: the teacher writes whole [Human]/[AI] dialogs from seed questions.

Output: `<run>/collect/dialogs.jsonl` (one dialog a line) and `rejects.jsonl` (one reject a line, with the reason
and the raw reply). Every record carries `key`, a hash of what produced it (seed, mode, template, teacher model,
sampling settings): a rerun sends requests only for keys with no dialog or reject yet, so an interrupted
collection resumes and an unchanged one costs nothing.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from pathlib import Path
from typing import Any

from baize_exp.data import Seed, load_seeds, parse_transcript
from baize_exp.io import JsonlWriter, content_hash, read_jsonl

log = logging.getLogger(__name__)


def dialog_key(seed: Seed, ccfg: Any, tcfg: Any) -> str:
    return content_hash(seed.question, ccfg.mode, ccfg.template, tcfg.model,
                        {"temperature": tcfg.temperature, "top_p": tcfg.top_p, "max_tokens": tcfg.max_tokens})


def collect(seeds: list[Seed], client: Any, ccfg: Any, tcfg: Any, out_dir: Path) -> dict:
    """Collect a dialog for every seed that has none yet in `out_dir`; return the stage metrics."""
    out_dir.mkdir(parents=True, exist_ok=True)
    dialogs_path, rejects_path = out_dir / "dialogs.jsonl", out_dir / "rejects.jsonl"
    old_dialogs = read_jsonl(dialogs_path, repair_tail=True)
    old_rejects = read_jsonl(rejects_path, repair_tail=True)
    done = {r["key"] for r in old_dialogs + old_rejects}
    todo = [(s, dialog_key(s, ccfg, tcfg)) for s in seeds]
    todo = [(s, k) for s, k in todo if k not in done]
    log.info("collect: %d seeds, %d already done, %d to request", len(seeds), len(seeds) - len(todo), len(todo))

    t0 = time.monotonic()
    convs = [[{"role": "user", "content": ccfg.template.format(seed=s.question)}] for s, _ in todo]
    results = client.complete_many(convs, desc="collect dialogs") if convs else []
    new_dialogs: list[dict] = []
    new_rejects: list[dict] = []
    usage = Counter()
    with JsonlWriter(dialogs_path) as dw, JsonlWriter(rejects_path) as rw:
        for (seed, key), res in zip(todo, results, strict=True):
            usage.update(res.usage)
            base = {"seed": seed.question, "source": seed.source, "key": key}
            if res.error:
                new_rejects.append({**base, "reason": "api_error", "detail": res.error, "raw": None})
                rw.write(new_rejects[-1])
                continue
            parsed = parse_transcript(res.text, seed.question, ccfg.min_turns,
                                      truncated=res.finish_reasons[0] == "length")
            if parsed.turns is None:
                new_rejects.append({**base, "reason": parsed.reason, "detail": parsed.detail, "raw": res.text})
                rw.write(new_rejects[-1])
                continue
            new_dialogs.append({"id": f"{seed.id}-{key[:8]}", **base, "mode": ccfg.mode, "turns": parsed.turns,
                                "teacher": {"model": tcfg.model, "temperature": tcfg.temperature,
                                            "top_p": tcfg.top_p, "max_tokens": tcfg.max_tokens},
                                "finish_reason": res.finish_reasons[0], "usage": dict(res.usage)})
            dw.write(new_dialogs[-1])
    elapsed = time.monotonic() - t0
    n_ok = len(new_dialogs)
    reasons = Counter(r["reason"] for r in new_rejects)
    all_dialogs = old_dialogs + new_dialogs
    all_rejects = old_rejects + new_rejects
    metrics = {
        "seeds": len(seeds), "requested": len(todo), "new_dialogs": n_ok, "new_rejects": len(new_rejects),
        "dialogs": len(all_dialogs), "rejects": len(all_rejects),
        "rejects_by_reason": dict(Counter(r["reason"] for r in all_rejects)),
        "prompt_tokens": usage["prompt_tokens"], "completion_tokens": usage["completion_tokens"],
        "seconds": round(elapsed, 2), "dialogs_per_s": round(n_ok / elapsed, 3) if elapsed and n_ok else 0.0,
        "avg_turns": round(sum(len(d["turns"]) for d in all_dialogs) / max(1, len(all_dialogs)), 2),
    }
    log.info("collect: %d new dialogs, %d new rejects %s in %.1fs", n_ok, metrics["new_rejects"],
             dict(reasons), elapsed)
    return metrics


def run(cfg: Any, run_dir: Path, backends: Any) -> dict:
    """The pipeline's collect stage."""
    seeds = load_seeds(cfg.data)
    metrics = collect(seeds, backends.client("teacher"), cfg.collect, cfg.teacher, run_dir / "collect")
    if metrics["dialogs"] == 0:
        raise RuntimeError(f"collect: no usable dialog out of {len(seeds)} seeds; see "
                           f"{run_dir / 'collect' / 'rejects.jsonl'} for the reasons")
    return metrics

