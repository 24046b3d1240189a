"""Stage 3 — Self-Distillation with Feedback (Baize v2).

The v1 model samples `sdf.num_candidates` answers per prompt; the teacher ranks them in one request (candidates
shown in a shuffled order whose permutation is recorded, so position bias cannot favour v1's first sample); one
more LoRA pass from the v1 adapter on the best answers gives the v2 adapter.
"""

from __future__ import annotations

import logging
import random
import re
from collections import Counter
from pathlib import Path
from typing import Any

import torch

from baize_exp import models as M
from baize_exp.config import cache_dir, to_container
from baize_exp.data import BAIZE_HUMAN, baize_prompt
from baize_exp.io import read_jsonl, write_jsonl
from baize_exp.train import dialogs_path, fit, save_adapter
from baize_exp.train.data import split_dialogs

log = logging.getLogger(__name__)
_STRICT = re.compile(r"^\s*\[?(\d+)\]?(\s*>\s*\[?\d+\]?)+\s*$")


def parse_ranking(reply: str, n: int) -> tuple[list[int] | None, str]:
    """Ranking as 0-based positions, best first, from a reply like "3 > 1 > 2 > 4".

    Strict: a line that is exactly numbers separated by ">" naming each candidate once. Tolerant fallback: the
    distinct in-range numbers in order of first mention (the best one at least). Returns (ranking, how).
    """
    for line in reply.splitlines():
        if _STRICT.match(line):
            nums = [int(x) for x in re.findall(r"\d+", line)]
            if sorted(nums) == list(range(1, n + 1)):
                return [x - 1 for x in nums], "ok"
    seen: list[int] = []
    for x in re.findall(r"\d+", reply):
        k = int(x)
        if 1 <= k <= n and k - 1 not in seen:
            seen.append(k - 1)
    if seen:
        return seen + [k for k in range(n) if k not in seen], "tolerant"
    return None, "failed"


def ranking_from_logprobs(logprobs: dict | None, n: int) -> list[int] | None:
    """Fallback for teachers that will not write a ranking (small local models): at the first generated position
    whose top alternatives include candidate numbers, order those numbers by probability."""
    for pos in (logprobs or {}).get("content") or []:
        probs: dict[int, float] = {}
        for alt in pos.get("top_logprobs") or []:
            tok = alt["token"].strip()
            if tok.isdigit() and 1 <= int(tok) <= n:
                probs[int(tok) - 1] = max(probs.get(int(tok) - 1, float("-inf")), alt["logprob"])
        if probs:
            best = sorted(probs, key=lambda k: -probs[k])
            return best + [k for k in range(n) if k not in best]
    return None


def rank_candidates(client: Any, template: str, prompts: list[str], cands: list[list[str]], seed: int
                    ) -> list[dict]:
    """Ask the teacher to rank each prompt's candidates; one retry with the error for unparsable replies."""
    n = len(cands[0])
    example = " > ".join(str(k) for k in random.Random(0).sample(range(1, n + 1), n))
    records, convs = [], []
    for i, (p, cs) in enumerate(zip(prompts, cands, strict=True)):
        order = list(range(n))
        random.Random(seed * 100003 + i).shuffle(order)  # presentation order: position k shows cs[order[k]]
        shown = "\n\n".join(f"Answer {k + 1}: {cs[j]}" for k, j in enumerate(order))
        convs.append([{"role": "user", "content": template.format(n=n, prompt=p, candidates=shown, example=example)}])
        records.append({"prompt": p, "candidates": cs, "order": order})
    results = client.complete_many(convs, desc="sdf ranking", temperature=0.0, max_tokens=32, logprobs=True,
                                   top_logprobs=20)
    retry = []
    for i, (rec, res) in enumerate(zip(records, results, strict=True)):
        rec["judge_reply"] = res.text if not res.error else None
        ranking, how = parse_ranking(res.text, n) if not res.error else (None, "failed")
        if ranking is None and not res.error:
            ranking = ranking_from_logprobs(res.logprobs[0] if res.logprobs else None, n)
            how = "logprobs" if ranking else how
        rec["_rank"], rec["parse"] = ranking, how
        if ranking is None:
            retry.append(i)
    if retry:  # tell the teacher what was wrong once; what still fails is recorded as failed
        again = [convs[i] + [{"role": "assistant", "content": records[i]["judge_reply"] or ""},
                             {"role": "user", "content": f"I could not read a ranking in that. Reply with only "
                                                         f"the numbers 1 to {n}, best first, like: {example}"}]
                 for i in retry]
        for i, res in zip(retry, client.complete_many(again, desc="sdf ranking retry", temperature=0.0,
                                                           max_tokens=32), strict=True):
            ranking, how = parse_ranking(res.text, n) if not res.error else (None, "failed")
            records[i]["judge_reply_retry"] = res.text if not res.error else res.error
            records[i]["_rank"], records[i]["parse"] = ranking, "retried" if ranking else "failed"
    for rec in records:
        r = rec.pop("_rank")
        rec["ranking"] = [rec["order"][k] for k in r] if r else None  # back to candidate indices, best first
    return records


def run(cfg: Any, run_dir: Path, backends: Any) -> dict:
    """The pipeline's sdf stage: v1 adapter → candidates.jsonl → v2 adapter."""
    s = cfg.sdf
    if not s.enabled:
        return {"skipped": True}
    stage_dir = run_dir / "sdf"
    v1 = run_dir / "train" / "adapter"
    if not (v1 / "adapter_config.json").is_file():
        raise FileNotFoundError(f"sdf: no v1 adapter at {v1}; run the train stage first")
    train_d, _ = split_dialogs(read_jsonl(dialogs_path(cfg, run_dir)), cfg.train.val_fraction, cfg.train.seed)
    prompts = list(dict.fromkeys(d["turns"][0]["text"] for d in train_d))  # held-out dialogs stay unseen
    prompts = prompts[: s.num_prompts] if s.num_prompts else prompts

    base, tok = M.load_model_and_tokenizer(cfg.model, cache_dir(cfg))
    model = M.load_adapter(base, v1, trainable=True)
    torch.manual_seed(s.seed)
    cands = M.generate_texts(model, tok, [baize_prompt(p) for p in prompts], s.max_new_tokens,
                             temperature=s.temperature, top_p=s.top_p, num_return_sequences=s.num_candidates,
                             stop=[BAIZE_HUMAN])
    records = rank_candidates(backends.client("teacher"), s.rank_template, prompts, cands, s.seed)
    write_jsonl(stage_dir / "candidates.jsonl", records)

    chosen = []
    for i, rec in enumerate(records):
        if rec["ranking"] is None:
            continue
        best = next((rec["candidates"][j] for j in rec["ranking"] if rec["candidates"][j].strip()), None)
        if best:
            chosen.append({"id": f"sdf-{i}", "turns": [{"role": "human", "text": rec["prompt"]},
                                                       {"role": "ai", "text": best}]})
    parse = Counter(r["parse"] for r in records)
    metrics: dict[str, Any] = {"prompts": len(prompts), "candidates": len(prompts) * s.num_candidates,
                               "parse_ok": parse["ok"], "parse_tolerant": parse["tolerant"],
                               "parse_logprobs": parse["logprobs"],
                               "parse_retried": parse["retried"], "parse_failed": parse["failed"],
                               "selected": len(chosen)}
    if not chosen:
        raise RuntimeError(f"sdf: the teacher's rankings could not be parsed for any prompt; see "
                           f"{stage_dir / 'candidates.jsonl'}")
    metrics.update(fit(model, tok, chosen, [], cfg, stage_dir, s.lr, s.max_epochs, prefix="sdf/"))
    save_adapter(model, tok, stage_dir / "adapter", {"model": cfg.model.name, "from": str(v1),
                                                    "sdf": to_container(s),
                                                    "metrics": metrics})
    return metrics
