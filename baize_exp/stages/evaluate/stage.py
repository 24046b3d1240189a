"""Stage 4 — evaluation: answers to held-out questions scored by a judge, and held-out loss and perplexity.

Outputs under `<run>/eval/`: answers.jsonl, judgments.jsonl, scores.csv (per model, mode and category: mean with
a 95% bootstrap interval, n and parse failures; category `all` for the total), scores.png (the judge mode's bars
per category) and scores_<mode>.png for the probability-weighted score. Answers come from a disk cache when the
same model, adapter weights, prompt and sampling were generated before (see `answers`); judge modes and parsing
are in `judge`, the statistics in `stats`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from baize_exp import human
from baize_exp import models as M
from baize_exp.config import cache_dir
from baize_exp.data import load_eval_questions
from baize_exp.errors import Interrupted, UserError
from baize_exp.generate import pick_backend, rank_and_world
from baize_exp.io import KeyedJsonl, read_jsonl, write_json, write_jsonl
from baize_exp.stages.base import BACKEND_KNOBS, Stage
from baize_exp.stages.evaluate.answers import (
    answer_cache_dir,
    chat_identity,
    local_answers,
    model_prompts,
    resolve_models,
    teacher_answers,
)
from baize_exp.stages.evaluate.judge import build_jobs, run_judge
from baize_exp.stages.evaluate.likelihood import heldout_items, reference_items, summarize
from baize_exp.stages.evaluate.plots import plot_scores
from baize_exp.stages.evaluate.reliability import (
    check_answers,
    check_items,
    check_records,
    check_summary,
    lc_win_rate,
    pairwise_lengths,
    parse_shares,
    position_agreement,
    self_consistency,
)
from baize_exp.stages.evaluate.wandb_tables import log_wandb
from baize_exp.stats import (
    CANNOT_DISCRIMINATE,
    PAIRED_COLUMNS,
    higher_is_better,
    item_values,
    paired_bootstrap,
    score_table,
    write_csv_rows,
    write_scores_csv,
)

log = logging.getLogger(__name__)


def _heldout(cfg: Any, run_dir: Path) -> tuple[Path, list[dict]]:
    path = Path(cfg.eval.heldout).expanduser() if cfg.eval.heldout else run_dir / "train" / "val_dialogs.jsonl"
    return path, read_jsonl(path) if path.is_file() else []


def run(cfg: Any, run_dir: Path, backends: Any) -> dict:
    """The pipeline's eval stage: answer, judge, score, compare; the last model's figures published as `final/`."""
    stage_dir = run_dir / "eval"
    questions = load_eval_questions(cfg.eval.questions, cfg.eval.limit)
    _check_references(cfg.eval, questions)
    specs, skipped = resolve_models(list(cfg.eval.models), run_dir)
    metrics: dict[str, Any] = {
        "questions": len(questions),
        "judge_mode": cfg.eval.judge_mode,
        "skipped_models": skipped,
    }
    answers, items = answer(cfg, run_dir, questions, specs, metrics)
    if metrics.get("rank", 0) > 0:  # its share of the answers is written; rank 0 gathers, judges and scores
        return {"rank": metrics["rank"], "answers_generated": metrics["answers_generated"]}
    opponent, to_judge = _opponent(cfg, backends, questions, answers, metrics)  # the teacher's answers join
    write_jsonl(stage_dir / "answers.jsonl", answers)
    write_jsonl(stage_dir / "items.jsonl", items)
    judged = ask_judge(cfg, backends, questions, to_judge, opponent, answers, stage_dir, metrics)
    note = score(cfg.eval, judged, answers, stage_dir, metrics)
    compare([s.name for s in specs], judged.judgments, items, cfg.eval, note, stage_dir, metrics)
    metrics.update(human.refresh(run_dir))  # votes already cast (baize-chat): their rows in scores/paired.csv
    publish_final(metrics, [s.name for s in specs])
    return metrics


def _check_references(e: Any, questions: list[dict]) -> None:
    if e.judge_mode == "reference" or (e.judge_mode == "pairwise" and e.pairwise_against == "reference"):
        missing = [q["question_id"] for q in questions if not q.get("reference")]
        if missing:
            raise UserError(
                f"eval.judge_mode={e.judge_mode} needs a 'reference' answer for every question; "
                f"{e.questions or 'the shipped set'} lacks one for {missing[:10]}; use eval.judge_mode=single or "
                f"a question file with references"
            )


def answer(cfg: Any, run_dir: Path, questions: list[dict], specs: list[Any], metrics: dict) -> tuple[list, list]:
    """Each model's answers (cached or generated, sharded over ranks) and its per-item likelihoods: held-out loss
    per held-out dialog, reference log-likelihood per question (items.jsonl)."""
    val_path, val_dialogs = _heldout(cfg, run_dir)
    metrics.update(heldout_dialogs=len(val_dialogs), answers_generated=0, answers_cached=0)
    if not val_dialogs:  # said, not silently missing: too few dialogs for a split, or train.val_fraction=0
        log.warning("eval: no held-out dialogs in %s; held-out loss is not computed", val_path)
    tok = M.load_tokenizer(cfg.model, cache_dir(cfg))
    rank, world = rank_and_world()
    shards = run_dir / "eval" / "shards" if world > 1 else None  # torchrun/srun: every rank answers its share
    backend = metrics["generate_backend"] = pick_backend(cfg)
    answers: list[dict] = []
    items: list[dict] = []
    for spec in specs:
        student = _Student(cfg, spec, tok)
        got, generated = local_answers(cfg, spec, questions, tok, student.load, shards, backend)
        metrics["answers_generated"] += generated
        if rank == 0:
            answers += got
            metrics["answers_cached"] += len(got) - generated
            items += _likelihoods(cfg, spec, student.load, tok, questions, val_dialogs, metrics)
    if rank > 0:
        metrics["rank"] = rank
    return answers, items


class _Student:
    """One model (base, or base + adapter) loaded on first use, where training ran and in its precision."""

    def __init__(self, cfg: Any, spec: Any, tok: Any) -> None:
        self.cfg, self.spec, self.tok, self.model = cfg, spec, tok, None

    def load(self) -> Any:
        if self.model is None:
            cfg, device = self.cfg, M.student_device(self.cfg.trainer.accelerator)
            # a random base is drawn on the device training drew it on
            base = M.load_model(cfg.model, cache_dir(cfg), M.base_dtype(cfg.model, cfg.trainer.precision), device)
            base.generation_config.pad_token_id = self.tok.pad_token_id
            if cfg.model.source == "tiny":
                base.generation_config.eos_token_id = self.tok.eos_token_id
            model = M.load_adapter(base, self.spec.adapter) if self.spec.adapter else base
            self.model = model.to(device)
        return self.model


@dataclass
class Judged:
    """What the judge said: the models' judgments, the judge check's, and the pairwise opponent's answers."""

    judgments: list[dict]
    check: list[dict]
    opponent: dict[str, str] | None


def ask_judge(
    cfg: Any,
    backends: Any,
    questions: list[dict],
    to_judge: list[dict],
    opponent: dict[str, str] | None,
    answers: list[dict],
    stage_dir: Path,
    metrics: dict,
) -> Judged:
    """The judge's verdicts on `to_judge` (against `opponent` in pairwise mode) and on the judge check's
    known-order pairs, in one batch of requests through the judge cache (judgments.jsonl). A failed request among
    them or among `answers` (the teacher's) stops the stage, transiently: everything that came back is cached."""
    e = cfg.eval
    qmap = {q["question_id"]: q for q in questions}
    jobs = build_jobs(e.judge_mode, e, qmap, to_judge, opponent, e.judge_repeats)
    check_jobs = _judge_check_jobs(e, qmap)
    retry = e.verdict_retry if e.judge_mode == "pairwise" else e.score_retry
    judge_cache = KeyedJsonl(answer_cache_dir(cfg) / "judgments" / f"{chat_identity(cfg.judge)}.jsonl")
    replies = run_judge(
        backends.client("judge"),
        e.judge_mode,
        jobs + check_jobs,
        retry,
        logprobs=e.judge_logprobs,
        cache=judge_cache,
        fallbacks=tuple(e.judge_fallbacks),
    )
    judgments, check_judgments = replies[: len(jobs)], replies[len(jobs) :]
    write_jsonl(stage_dir / "judgments.jsonl", judgments)
    failed = [x for x in answers + replies if x.get("failed")]
    if failed:  # the answers and the judgments that came back are cached: a rerun sends only these again
        raise Interrupted(
            f"eval: {len(failed)} judge or teacher request(s) failed (last: {failed[-1]['failed']}). "
            f"Everything that came back is cached; a rerun asks only for the missing ones"
        )
    sent = [
        j
        for job, j in zip(jobs + check_jobs, replies, strict=True)
        if job["messages"] is not None and not j.get("cached")
    ]
    metrics["judge_requests"] = len(sent) + sum("judge_reply_retry" in j for j in sent)
    metrics["judge_cached"] = sum(bool(j.get("cached")) for j in judgments)  # of the models' judgments
    for how in ("ok", "tolerant", "logprob", "retried", "failed"):
        metrics[f"judge_parse_{how}"] = sum(j["parse"] == how for j in judgments)
    return Judged(judgments, check_judgments, opponent)


def _opponent(
    cfg: Any, backends: Any, questions: list[dict], answers: list[dict], metrics: dict
) -> tuple[dict[str, str] | None, list[dict]]:
    """(the pairwise opponent's answer per question, the answers to judge); no opponent outside pairwise mode."""
    e = cfg.eval
    if e.judge_mode != "pairwise":
        return None, answers
    if e.pairwise_against == "teacher":
        against, sent = teacher_answers(cfg, backends.client("teacher"), questions)
        metrics["teacher_answers_requested"] = sent
        answers += against
    elif e.pairwise_against == "reference":
        against = [{"question_id": q["question_id"], "answer": q["reference"]} for q in questions]
    else:
        against = [a for a in answers if a["model"] == e.pairwise_against]
    opponent = {a["question_id"]: a["answer"] for a in against if a.get("answer") is not None}
    return opponent, [a for a in answers if a["model"] not in (e.pairwise_against, "teacher")]


def score(e: Any, judged: Judged, answers: list[dict], stage_dir: Path, metrics: dict) -> str:
    """scores.csv and its charts (per model, mode and category), the judge's reliability; returns the note every
    judge-based row carries ("judge cannot discriminate" when the judge check failed, else "")."""
    reliability = _reliability(e, judged.judgments, judged.check, answers, judged.opponent, stage_dir)
    check = reliability.get("judge_check")
    note = CANNOT_DISCRIMINATE if check is not None and not check["discriminates"] else ""
    if check is not None:
        metrics.update(
            {
                "judge_check/accuracy": check["accuracy"],
                "judge_check/ci": [check["ci_low"], check["ci_high"]],
                "judge_check/n": check["n"],
                "judge_check/discriminates": check["discriminates"],
            }
        )
    rows = score_table(judged.judgments, e.bootstrap, e.seed)
    for model, lc in reliability.get("lc_win_rate", {}).items():
        rows.append(
            {
                "model": model,
                "category": "all",
                "mode": "pairwise_lc",
                "n": lc["n"],
                "mean": round(lc["lc"], 4),
                "ci_low": round(lc["ci_low"], 4),
                "ci_high": round(lc["ci_high"], 4),
                "parse_failures": 0,
            }
        )
        metrics[f"{model}/lc_win_rate"] = lc["lc"]
    for model, agreement in reliability.get("position_agreement", {}).items():
        metrics[f"{model}/position_agreement"] = agreement["agreement"]
    for r in rows:
        r["note"] = note
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
    return note


def compare(
    models: list[str], judgments: list[dict], items: list[dict], e: Any, note: str, stage_dir: Path, metrics: dict
) -> None:
    """paired.csv: each model against the one before it, per item, with a verdict (see `paired_rows`)."""
    paired = paired_rows(models, judgments, items, e.judge_mode, e.bootstrap, e.seed, note)
    write_csv_rows(paired, stage_dir / "paired.csv", PAIRED_COLUMNS)
    for p in paired:
        key = f"paired/{p['comparison']}/{p['metric']}"
        metrics[f"{key}/diff"], metrics[f"{key}/ci"] = p["diff"], [p["ci_low"], p["ci_high"]]
        metrics[f"{key}/verdict"] = p["verdict"]


def publish_final(metrics: dict, models: list[str]) -> None:
    """The run's result as `final/<metric>`: the figures of the last model of eval.models that was evaluated (v2,
    else v1 in the default order), so a sweeper or a report reads `eval/final/judge_mean` without knowing names."""
    evaluated = [m for m in models if any(k.startswith(f"{m}/") for k in metrics)]
    if not evaluated:
        return
    last = evaluated[-1]
    metrics["final_model"] = last
    for k, v in list(metrics.items()):
        if k.startswith(f"{last}/"):
            metrics[f"final/{k.removeprefix(last + '/')}"] = v


def _likelihoods(
    cfg: Any, spec: Any, load: Any, tok: Any, questions: list[dict], val_dialogs: list[dict], metrics: dict
) -> list[dict]:
    """One model's per-item held-out loss and reference log-likelihood (items.jsonl), and their totals."""
    e, out = cfg.eval, []
    if val_dialogs:
        held = heldout_items(load(), tok, val_dialogs, cfg.train.max_length, fmt=cfg.train.format)
        total = summarize(held)
        metrics[f"{spec.name}/heldout_loss"] = total["loss"]
        metrics[f"{spec.name}/heldout_ppl"] = total["ppl"]
        metrics[f"{spec.name}/heldout_tokens"] = total["tokens"]
        out += [{"model": spec.name, "kind": "heldout", **h} for h in held]
    if e.reference_loglik and any(q.get("reference") for q in questions):
        prompts = model_prompts(tok, questions, spec.adapter, cfg.model.chat_template, cfg.train.format)
        ref = reference_items(load(), tok, questions, prompts, cfg.train.max_length)
        total = summarize(ref)
        metrics[f"{spec.name}/ref_loglik"] = None if total["loss"] is None else -total["loss"]
        out += [{"model": spec.name, "kind": "ref_loglik", **r} for r in ref]
    return out


def _judge_check_jobs(e: Any, qmap: dict[str, dict]) -> list[dict]:
    """The judge check's requests: known-order pairs from questions with a reference (the whole question file,
    not only the `eval.limit` asked, so the check's n does not shrink with a small eval)."""
    if e.judge_check <= 0:
        return []
    items = check_items(load_eval_questions(e.questions, None), e.judge_check, e.seed)
    if not items:
        log.warning(
            "eval: no question in %s has a reference answer; the judge check is skipped",
            e.questions or "the shipped set",
        )
        return []
    cmap = {**qmap, **{i["question_id"]: i for i in items}}
    good, opponents = check_answers(items)
    if e.judge_mode != "pairwise":
        jobs = build_jobs(e.judge_mode, e, cmap, good)
    else:
        first = {a["question_id"]: a for a in good if a["model"] == "check/good"}
        jobs = [
            job
            for how, opp in opponents.items()
            for job in build_jobs("pairwise", e, cmap, [{**first[q], "model": f"check/{how}"} for q in opp], opp)
        ]
    for j in jobs:
        j["record"]["check"] = True
    return jobs


def _reliability(
    e: Any,
    judgments: list[dict],
    check_judgments: list[dict],
    answers: list[dict],
    opponent: dict[str, str] | None,
    stage_dir: Path,
) -> dict:
    """reliability.json and judge_check.jsonl: what the judge check, position agreement, self-consistency,
    parse shares and the length-controlled win rate say about this run's judge."""
    out: dict[str, Any] = {"parse_shares": parse_shares(judgments)}
    if check_judgments:
        if e.judge_mode == "pairwise":
            for j in check_judgments:
                j["degradation"] = j["model"].split("/", 1)[1]
        records = check_records(e.judge_mode, check_judgments)
        write_jsonl(stage_dir / "judge_check.jsonl", records)
        out["judge_check"] = check_summary(records)
        c = out["judge_check"]
        said = (
            "the judge discriminates"
            if c["discriminates"]
            else f"{CANNOT_DISCRIMINATE}: judge-based results of this run are not evidence"
        )
        if c["n"]:
            log.info(
                "eval: judge check: %g of %d known-order pairs right (%.0f%% [%.0f%%, %.0f%%]); %s",
                c["correct"],
                c["n"],
                100 * c["accuracy"],
                100 * c["ci_low"],
                100 * c["ci_high"],
                said,
            )
        else:  # every check reply unreadable: there is no accuracy to print, only that nothing was shown
            log.info("eval: judge check: none of %d known-order pairs got a readable judgment; %s", c["unparsed"], said)
    if e.judge_mode == "pairwise":
        out["position_agreement"] = position_agreement(judgments)
        mine = {(a["model"], a["question_id"]): a["answer"] for a in answers if a.get("answer") is not None}
        out["lc_win_rate"] = {
            m: lc_win_rate(rows, seed=e.seed) for m, rows in pairwise_lengths(judgments, mine, opponent or {}).items()
        }
    if e.judge_repeats > 1:
        out["self_consistency"] = self_consistency(judgments)
    write_json(stage_dir / "reliability.json", out)
    return out


def paired_rows(
    models: list[str],
    judgments: list[dict],
    items: list[dict],
    judge_mode: str,
    n_boot: int,
    seed: int,
    judge_note: str = "",
) -> list[dict]:
    """paired.csv: each model against the one before it in eval.models, per metric: the judge's value per
    question (score, or the pairwise win value), held-out loss per dialog, reference log-likelihood per question."""
    values = item_values(judgments, items)
    rows = []
    for a, b in zip(models[1:], models[:-1], strict=False):
        for name in (f"judge_{judge_mode}", "heldout_loss", "ref_loglik"):
            va, vb = values.get(a, {}).get(name), values.get(b, {}).get(name)
            if va and vb:
                r = paired_bootstrap(va, vb, higher_is_better(name), n_boot, seed)
                rows.append(
                    {
                        "comparison": f"{a} vs {b}",
                        "a": a,
                        "b": b,
                        "metric": name,
                        **r,
                        "note": judge_note if name.startswith("judge_") else "",
                    }
                )
    return rows


STAGE = Stage(
    "eval",
    run,
    reads=("train", "sdf"),
    shapes=("eval", "judge", "generate.backend"),
    ignores=BACKEND_KNOBS,
    writes=(
        "eval/answers.jsonl",
        "eval/judgments.jsonl",
        "eval/scores.csv",
        "eval/scores.png",
        "eval/items.jsonl",
        "eval/paired.csv",
        "eval/reliability.json",
    ),
    # the judge check's records (when on), charts of further modes, per-rank answer shards, and the arena's votes
    # (baize-chat appends them after the stage; the stage reads them when there)
    may_write=("eval/judge_check.jsonl", "eval/scores_*.png", "eval/shards/*", "eval/human_votes.jsonl"),
    log_wandb=log_wandb,
    joins_ddp=True,  # under torchrun/srun the other ranks generate their share of answers
    preflight=lambda cfg: M.check_loadable(cfg.model),
)
