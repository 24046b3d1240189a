"""Stage 4 — evaluation: answers to held-out questions scored by a judge, and held-out loss and perplexity.

Outputs under `<run>/eval/`: answers.jsonl, judgments.jsonl, scores.csv (per model, mode and category: mean with
a 95% bootstrap interval, n and parse failures; category `all` for the total), scores.png (the judge mode's bars
per category) and scores_<mode>.png for the probability-weighted score. Answers come from a disk cache when the
same model, adapter weights, prompt and sampling were generated before (see `answers`); judge modes and parsing
are in `judge`, the statistics in `stats`.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from baize_exp import models as M
from baize_exp.config import cache_dir
from baize_exp.data import load_eval_questions
from baize_exp.errors import Interrupted
from baize_exp.generate import pick_backend, rank_and_world
from baize_exp.io import KeyedJsonl, read_jsonl, write_jsonl
from baize_exp.stages.base import BACKEND_KNOBS, Stage
from baize_exp.stages.evaluate.answers import (
    answer_cache_dir,
    chat_identity,
    local_answers,
    resolve_models,
    teacher_answers,
)
from baize_exp.stages.evaluate.judge import build_jobs, parse_score, parse_verdict, run_judge, weighted_score
from baize_exp.stages.evaluate.plots import plot_scores
from baize_exp.stages.evaluate.stats import bootstrap_ci, score_table, write_scores_csv
from baize_exp.stages.evaluate.wandb_log import log_wandb
from baize_exp.training import heldout_loss

__all__ = ["STAGE", "run", "log_wandb", "parse_score", "parse_verdict", "weighted_score", "bootstrap_ci", "score_table"]
log = logging.getLogger(__name__)


def _heldout(cfg: Any, run_dir: Path) -> tuple[Path, list[dict]]:
    path = Path(cfg.eval.heldout).expanduser() if cfg.eval.heldout else run_dir / "train" / "val_dialogs.jsonl"
    return path, read_jsonl(path) if path.is_file() else []


def run(cfg: Any, run_dir: Path, backends: Any) -> dict:
    """The pipeline's eval stage."""
    e = cfg.eval
    stage_dir = run_dir / "eval"
    questions = load_eval_questions(e.questions, e.limit)
    if e.judge_mode == "reference" or (e.judge_mode == "pairwise" and e.pairwise_against == "reference"):
        missing = [q["question_id"] for q in questions if not q.get("reference")]
        if missing:
            raise ValueError(f"eval.judge_mode={e.judge_mode} needs a 'reference' answer for every question; "
                             f"{e.questions or 'the shipped set'} lacks one for {missing[:10]}")
    val_path, val_dialogs = _heldout(cfg, run_dir)
    specs, skipped = resolve_models(list(e.models), run_dir)
    metrics: dict[str, Any] = {"questions": len(questions), "judge_mode": e.judge_mode, "skipped_models": skipped,
                               "heldout_dialogs": len(val_dialogs), "answers_generated": 0, "answers_cached": 0}
    if not val_dialogs:  # said, not silently missing: too few dialogs for a split, or train.val_fraction=0
        log.warning("eval: no held-out dialogs in %s; held-out loss is not computed", val_path)

    tok = M.load_tokenizer(cfg.model, cache_dir(cfg))
    rank, world = rank_and_world()
    shards = stage_dir / "shards" if world > 1 else None  # torchrun/srun: every rank answers its share
    backend = metrics["generate_backend"] = pick_backend(cfg)
    answers: list[dict] = []
    for spec in specs:
        loaded: list[Any] = []

        def load(spec=spec, loaded=loaded) -> Any:
            if not loaded:
                base = M.load_model(cfg.model, cache_dir(cfg), M.base_dtype(cfg.model, cfg.trainer.precision))
                base.generation_config.pad_token_id = tok.pad_token_id
                if cfg.model.source == "tiny":
                    base.generation_config.eos_token_id = tok.eos_token_id
                model = M.load_adapter(base, spec.adapter) if spec.adapter else base
                loaded.append(model.to(M.student_device(cfg.trainer.accelerator)))  # where training runs
            return loaded[0]

        got, generated = local_answers(cfg, spec, questions, tok, load, shards, backend)
        if rank > 0:  # its share is written; rank 0 gathers, scores held-out loss and judges
            loaded.clear()
            continue
        answers += got
        metrics["answers_generated"] += generated
        metrics["answers_cached"] += len(got) - generated
        if val_dialogs:
            hl = heldout_loss(load(), tok, val_dialogs, cfg.train.max_length, fmt=cfg.train.format)
            metrics[f"{spec.name}/heldout_loss"] = hl["heldout_loss"]
            metrics[f"{spec.name}/heldout_ppl"] = hl["heldout_ppl"]
            metrics[f"{spec.name}/heldout_tokens"] = hl["heldout_tokens"]
        loaded.clear()

    if rank > 0:
        return {"rank": rank, "answers_generated": metrics["answers_generated"]}
    opponent: dict[str, str] | None = None
    judged = answers
    if e.judge_mode == "pairwise":
        if e.pairwise_against == "teacher":
            opp, sent = teacher_answers(cfg, backends.client("teacher"), questions)
            metrics["teacher_answers_requested"] = sent
            answers += opp
        elif e.pairwise_against == "reference":
            opp = [{"question_id": q["question_id"], "answer": q["reference"]} for q in questions]
        else:
            opp = [a for a in answers if a["model"] == e.pairwise_against]
        opponent = {a["question_id"]: a["answer"] for a in opp if a.get("answer") is not None}
        judged = [a for a in answers if a["model"] not in (e.pairwise_against, "teacher")]
    write_jsonl(stage_dir / "answers.jsonl", answers)

    jobs = build_jobs(e.judge_mode, e, {q["question_id"]: q for q in questions}, judged, opponent)
    retry = e.verdict_retry if e.judge_mode == "pairwise" else e.score_retry
    judge_cache = KeyedJsonl(answer_cache_dir(cfg) / "judgments" / f"{chat_identity(cfg.judge)}.jsonl")
    judgments = run_judge(backends.client("judge"), e.judge_mode, jobs, retry, logprobs=e.judge_logprobs,
                          cache=judge_cache)
    write_jsonl(stage_dir / "judgments.jsonl", judgments)
    failed = [x for x in answers + judgments if x.get("failed")]
    if failed:  # the answers and the judgments that came back are cached: a rerun sends only these again
        raise Interrupted(f"eval: {len(failed)} judge or teacher request(s) failed (last: {failed[-1]['failed']}). "
                          f"Everything that came back is cached; a rerun asks only for the missing ones")
    sent = [j for job, j in zip(jobs, judgments, strict=True) if job["messages"] is not None and not j.get("cached")]
    metrics["judge_requests"] = len(sent) + sum("judge_reply_retry" in j for j in sent)
    metrics["judge_cached"] = sum(bool(j.get("cached")) for j in judgments)
    for how in ("ok", "tolerant", "retried", "failed"):
        metrics[f"judge_parse_{how}"] = sum(j["parse"] == how for j in judgments)

    rows = score_table(judgments, e.bootstrap, e.seed)
    write_scores_csv(rows, stage_dir / "scores.csv")
    plot_scores(rows, stage_dir / "scores.png", e.judge_mode)
    for mode in dict.fromkeys(r["mode"] for r in rows if r["mode"] != e.judge_mode):
        plot_scores(rows, stage_dir / f"scores_{mode}.png", mode)
    for r in rows:
        if r["category"] == "all":
            key = r["model"] if r["mode"] == e.judge_mode else f"{r['model']}/{r['mode']}"
            metrics[f"{key}/judge_mean"] = r["mean"]
            metrics[f"{key}/judge_ci"] = [r["ci_low"], r["ci_high"]]
            metrics[f"{key}/judge_n"] = r["n"]
            metrics[f"{key}/parse_failures"] = r["parse_failures"]
    return metrics


STAGE = Stage(
    "eval", run, reads=("train", "sdf"), shapes=("eval", "judge", "generate.backend"), ignores=BACKEND_KNOBS,
    writes=("eval/answers.jsonl", "eval/judgments.jsonl", "eval/scores.csv", "eval/scores.png"),
    log_wandb=log_wandb, joins_ddp=True,  # under torchrun/srun the other ranks generate their share of answers
    preflight=lambda cfg: M.check_loadable(cfg.model),
)
