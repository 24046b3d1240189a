"""Stage 4 — evaluation: answers to held-out questions scored by a judge, and held-out loss and perplexity.

Outputs under `<run>/eval/`: answers.jsonl, judgments.jsonl, scores.csv (per model, mode and category: mean with
a 95% bootstrap interval, n and parse failures; category `all` for the total), scores.png (the judge mode's bars
per category) and scores_<mode>.png for the probability-weighted score. Answers come from a disk cache when the
same model, adapter weights, prompt and sampling were generated before (see `answers`); judge modes and parsing
are in `judge`, the statistics in `stats`.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from baize_exp import human
from baize_exp import models as M
from baize_exp.chat.batch import backend_for
from baize_exp.config import Config, cache_dir
from baize_exp.data import generation_prompt, load_eval_questions
from baize_exp.errors import Interrupted, UserError
from baize_exp.generate import pick_backend, rank_and_world
from baize_exp.io import KeyedJsonl, read_jsonl, write_json, write_jsonl
from baize_exp.stages.base import BACKEND_KNOBS, Stage
from baize_exp.stages.evaluate.answers import (
    answer_cache_dir,
    answer_format,
    chat_identity,
    local_answers,
    resolve_models,
    teacher_answers,
)
from baize_exp.stages.evaluate.judge import build_jobs, run_judge
from baize_exp.stages.evaluate.likelihood import heldout_items, likelihood_formats, reference_items, summarize
from baize_exp.stages.evaluate.plots import plot_scores
from baize_exp.stages.evaluate.reliability import (
    check_answers,
    check_items,
    check_records,
    lc_win_rate,
    pairwise_lengths,
    parse_shares,
    position_agreement,
    self_consistency,
)
from baize_exp.stages.evaluate.wandb_tables import log_wandb
from baize_exp.stats import (
    FORMATS,
    ITEM_METRICS,
    PAIRED_TEST_COLUMNS,
    higher_is_better,
    holm_rows,
    item_values,
    judge_check_clustered,
    judge_check_note,
    judge_item_values,
    pair_counts,
    paired_test,
    score_table,
    split_metric,
    write_csv_rows,
    write_scores_csv,
)

log = logging.getLogger(__name__)


def _heldout(cfg: Any, run_dir: Path) -> tuple[Path, list[dict]]:
    path = Path(cfg.eval.heldout).expanduser() if cfg.eval.heldout else run_dir / "train" / "val_dialogs.jsonl"
    return path, read_jsonl(path) if path.is_file() else []


def run(cfg: Config, run_dir: Path, backends: Any) -> dict:
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
    # where the stage's time went: answers (generation), likelihoods, judge, score, compare
    seconds = metrics["phase_seconds"] = {"answer": 0.0, "likelihood": 0.0}
    answers, items = answer(cfg, run_dir, questions, specs, metrics)
    t0 = time.monotonic()
    if metrics.get("rank", 0) > 0:  # its share of the answers is written; rank 0 gathers, judges and scores
        return {"rank": metrics["rank"], "answers_generated": metrics["answers_generated"]}
    write_jsonl(stage_dir / "items.jsonl", items)
    if cfg.eval.use_judge:
        opponent, to_judge = _opponent(cfg, backends, questions, answers, metrics)  # the teacher's answers join
        write_jsonl(stage_dir / "answers.jsonl", answers)
        judged = ask_judge(cfg, backends, questions, to_judge, opponent, answers, stage_dir, metrics)
    else:  # the judge-free signals only: no answer is generated and no judge is asked
        write_jsonl(stage_dir / "answers.jsonl", [])
        write_jsonl(stage_dir / "judgments.jsonl", [])
        judged = Judged([], [], None)
    t0 = _add_seconds(seconds, "ask_judge", t0)
    note = score(cfg.eval, judged, answers, stage_dir, metrics)
    t0 = _add_seconds(seconds, "score", t0)
    formats = {s.name: metrics.get(f"{s.name}/answer_format", "") for s in specs}
    compare([s.name for s in specs], judged.judgments, items, cfg.eval, note, stage_dir, metrics, formats)
    _add_seconds(seconds, "compare", t0)
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
    """Each model's answers (cached or generated, sharded over ranks; none with `eval.use_judge=false`) and its
    per-item likelihoods: held-out loss per held-out dialog, reference log-likelihood per question, in every
    format of `eval.formats` (items.jsonl)."""
    val_path, val_dialogs = _heldout(cfg, run_dir)
    metrics.update(heldout_dialogs=len(val_dialogs), answers_generated=0, answers_cached=0)
    if not val_dialogs:  # said, not silently missing: too few dialogs for a split, or train.val_fraction=0
        log.warning("eval: no held-out dialogs in %s; held-out loss is not computed", val_path)
    tok = M.load_tokenizer(cfg.model, cache_dir(cfg))
    formats, unavailable = likelihood_formats(tok, list(cfg.eval.formats), cfg.model.chat_template)
    metrics["formats"] = formats
    if unavailable:
        log.warning("eval: the likelihoods are not scored in %s: the tokenizer has no chat template", unavailable)
    rank, world = rank_and_world()
    shards = run_dir / "eval" / "shards" if world > 1 else None  # torchrun/srun: every rank answers its share
    backend = metrics["generate_backend"] = pick_backend(cfg)
    answers: list[dict] = []
    items: list[dict] = []
    for spec in specs:
        student = _Student(cfg, spec, tok)
        got, generated = [], 0
        t0 = time.monotonic()
        if cfg.eval.use_judge:  # answers exist for the judge (and the report's samples)
            got, generated = local_answers(cfg, spec, questions, tok, student.load, shards, backend)
            fmt = answer_format(tok, spec.adapter, cfg.model.chat_template, cfg.train.format)
            metrics[f"{spec.name}/answer_format"] = fmt
        metrics["answers_generated"] += generated
        t0 = _add_seconds(metrics["phase_seconds"], "answer", t0)
        if rank == 0:
            answers += got
            metrics["answers_cached"] += len(got) - generated
            items += _likelihoods(cfg, spec, student.load, tok, questions, val_dialogs, metrics)
            _add_seconds(metrics["phase_seconds"], "likelihood", t0)
    if rank > 0:
        metrics["rank"] = rank
    return answers, items


def _add_seconds(seconds: dict[str, float], phase: str, since: float) -> float:
    """Add the time since `since` to `phase`; return now."""
    now = time.monotonic()
    seconds[phase] = round(seconds.get(phase, 0.0) + now - since, 2)
    return now


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
        backend_for(backends, "judge", stage_dir / "batches"),  # judge.batch=true: over batches
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
    judge-based row carries (`stats.judge_check_note`: "judge not shown to discriminate (...)" unless the judge
    check showed it can, "" without a check)."""
    reliability = _reliability(e, judged.judgments, judged.check, answers, judged.opponent, stage_dir)
    check = reliability.get("judge_check")
    note = judge_check_note(check)
    if check is not None:
        metrics.update(
            {
                "judge_check/accuracy": check["accuracy"],
                "judge_check/ci": [check["ci_low"], check["ci_high"]],
                "judge_check/n": check["n"],
                "judge_check/unparsed": check["unparsed"],
                "judge_check/status": check["status"],
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
    if rows:  # no chart without a judged answer (eval.use_judge=false): an empty chart would read as a result
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
    models: list[str],
    judgments: list[dict],
    items: list[dict],
    e: Any,
    note: str,
    stage_dir: Path,
    metrics: dict,
    answer_formats: dict[str, str] | None = None,
) -> None:
    """paired.csv: each model against the one before it, per item, with a verdict (see `paired_rows`)."""
    paired = paired_rows(models, judgments, items, e.judge_mode, e.bootstrap, e.seed, note, answer_formats)
    write_csv_rows(paired, stage_dir / "paired.csv", PAIRED_TEST_COLUMNS)
    for p in paired:
        key = f"paired/{p['comparison']}/{p['metric']}" + (f"@{p['format']}" if p["format"] in FORMATS else "")
        metrics[f"{key}/diff"], metrics[f"{key}/ci"] = p["diff"], [p["ci_low"], p["ci_high"]]
        metrics[f"{key}/p"], metrics[f"{key}/verdict"] = p["p"], p["verdict"]
        metrics[f"{key}/verdict_holm"] = p["verdict_holm"]


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
    """One model's per-item held-out loss (AI turns; all tokens too with `eval.heldout_all_tokens`) and reference
    log-likelihood (items.jsonl), each in every format of `eval.formats`, and their totals: `<model>/<metric>`
    in `train.format` (what earlier runs reported) and `<model>/<metric>@<format>` per format."""
    e, out = cfg.eval, []
    formats, _ = likelihood_formats(tok, list(e.formats), cfg.model.chat_template)
    kinds = [("heldout", "ai"), *([("heldout_all", "all")] if e.heldout_all_tokens else [])] if val_dialogs else []
    with_ref = e.reference_loglik and any(q.get("reference") for q in questions)
    for fmt in formats:
        per_kind: dict[str, list[dict]] = {}
        for kind, loss_on in kinds:
            per_kind[kind] = heldout_items(load(), tok, val_dialogs, cfg.train.max_length, fmt=fmt, loss_on=loss_on)
        if with_ref:
            prompts = [generation_prompt(q["question"], fmt, tok) for q in questions]
            per_kind["ref_loglik"] = reference_items(load(), tok, questions, prompts, cfg.train.max_length)
        for kind, got in per_kind.items():
            total, metric = summarize(got), ITEM_METRICS[kind]
            value = total["loss"] if metric != "ref_loglik" or total["loss"] is None else -total["loss"]
            names = [f"{metric}@{fmt}", *([metric] if fmt == cfg.train.format else [])]
            for name in names:
                metrics[f"{spec.name}/{name}"] = value
                if kind == "heldout":
                    metrics[f"{spec.name}/{name.replace('loss', 'ppl')}"] = total["ppl"]
                    metrics[f"{spec.name}/{name.replace('loss', 'tokens')}"] = total["tokens"]
            out += [{"model": spec.name, "kind": kind, "format": fmt, **g} for g in got]
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
    """reliability.json and judge_check.jsonl: what the judge check (`stats.judge_check_clustered`), position
    agreement, self-consistency, parse shares and the length-controlled win rate say about this run's judge."""
    if not e.use_judge:
        write_json(stage_dir / "reliability.json", {"use_judge": False})
        return {}
    out: dict[str, Any] = {"parse_shares": parse_shares(judgments)}
    if check_judgments:
        if e.judge_mode == "pairwise":
            for j in check_judgments:
                j["degradation"] = j["model"].split("/", 1)[1]
        records = check_records(e.judge_mode, check_judgments)
        write_jsonl(stage_dir / "judge_check.jsonl", records)
        c = out["judge_check"] = judge_check_clustered(records)
        said = (
            "the judge discriminates"
            if c["discriminates"]
            else f"{judge_check_note(c)}: judge-based results of this run are not evidence"
        )
        if c["n"]:
            log.info(
                "eval: judge check: %g of %d readable known-order pairs right (%.0f%% [%.0f%%, %.0f%%], clustered "
                "by question); %d of %d unreadable; %s",
                c["correct"],
                c["n"],
                100 * c["accuracy"],
                100 * c["ci_low"],
                100 * c["ci_high"],
                c["unparsed"],
                c["total"],
                said,
            )
        else:  # every check reply unreadable: there is no accuracy to print, only that nothing was shown
            log.info("eval: judge check: none of %d known-order pairs got a readable judgment; %s", c["total"], said)
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


def judge_format(a: str, b: str, answer_formats: dict[str, str] | None) -> str:
    """The prompt formats a judge row's answers were generated in: one name when both models answered in it,
    else each model's ("v1: baize; base: chat_template"); "" when unknown (an older run)."""
    fa, fb = ((answer_formats or {}).get(m, "") for m in (a, b))
    if not (fa or fb):
        return ""
    return fa if fa == fb else f"{a}: {fa or '?'}; {b}: {fb or '?'}"


def _likelihood_order(key: str) -> tuple[int, int]:
    metric, fmt = split_metric(key)
    order = list(ITEM_METRICS.values())
    return (order.index(metric) if metric in order else len(order), FORMATS.index(fmt) if fmt in FORMATS else -1)


def paired_rows(
    models: list[str],
    judgments: list[dict],
    items: list[dict],
    judge_mode: str,
    n_boot: int,
    seed: int,
    judge_note: str = "",
    answer_formats: dict[str, str] | None = None,
) -> list[dict]:
    """paired.csv: each model against the one before it in eval.models, per metric: the judge's value per
    question (score, or the pairwise win value; its parse failures per model in `items`), and per format the
    held-out losses per dialog and the reference log-likelihood per question (`format`: the judge rows' answer
    formats, `answer_formats` by model).

    Each row is `stats.paired_test` (a studentized bootstrap interval; for discrete judge values the exact
    signed-rank test as well), and the rows together are one family for Holm's adjustment (`p_holm`,
    `verdict_holm`): with a dozen rows, one "better" at p = 0.04 is what chance alone gives. They see item noise
    only: what another training seed would change is the reproduction's seed-aware comparison."""
    values = item_values(judgments, items)
    rows = []
    judge_metric = f"judge_{judge_mode}"
    for a, b in zip(models[1:], models[:-1], strict=False):
        base = {"comparison": f"{a} vs {b}", "a": a, "b": b}
        ja, jb = (judge_item_values(judgments, m, judge_mode) for m in (a, b))
        if ja and jb:
            r = paired_test(ja, jb, higher_is_better(judge_metric), n_boot=n_boot, seed=seed)
            rows.append(
                {
                    **base,
                    "metric": judge_metric,
                    **r,
                    "format": judge_format(a, b, answer_formats),
                    "items": pair_counts(ja, jb, a, b)["text"],
                    "note": "; ".join(x for x in (judge_note, r["note"]) if x),
                }
            )
        va, vb = values.get(a, {}), values.get(b, {})
        shared = sorted((k for k in va if k in vb and not k.startswith("judge_")), key=_likelihood_order)
        for key in shared:
            metric, fmt = split_metric(key)
            r = paired_test(va[key], vb[key], higher_is_better(key), n_boot=n_boot, seed=seed)
            rows.append({**base, "metric": metric, **r, "format": fmt, "items": pair_counts(va[key], vb[key])["text"]})
    return holm_rows(rows)


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
        "eval/items.jsonl",
        "eval/paired.csv",
        "eval/reliability.json",
    ),
    # the judge's chart (not with eval.use_judge=false), the judge check's records (when on), charts of further
    # modes, per-rank answer shards, and the arena's votes (baize-chat appends them after the stage; the stage
    # reads them when there)
    may_write=(
        "eval/scores.png",
        "eval/judge_check.jsonl",
        "eval/scores_*.png",
        "eval/shards/*",
        "eval/human_votes.jsonl",
        "eval/batches/*",  # judge.batch=true: the judge's batches
    ),
    log_wandb=log_wandb,
    joins_ddp=True,  # under torchrun/srun the other ranks generate their share of answers
    preflight=lambda cfg: M.check_loadable(cfg.model),
)
