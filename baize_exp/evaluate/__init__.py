"""Stage 4 — evaluation: answers to held-out questions scored by a judge, and held-out loss.

Outputs under `<run>/eval/`: answers.jsonl, judgments.jsonl, scores.csv (per model and category: mean with a 95%
bootstrap interval, n, parse failures; category `all` for the total) and scores.png. A judge reply with no
readable score is retried once with the error, then recorded as a parse failure: never dropped, never a zero.
"""

from __future__ import annotations

import csv
import logging
import re
from pathlib import Path
from typing import Any

import numpy as np

from baize_exp import models as M
from baize_exp.config import cache_dir
from baize_exp.data import BAIZE_HUMAN, baize_prompt, load_eval_questions
from baize_exp.io import read_jsonl, write_jsonl
from baize_exp.train import heldout_loss

log = logging.getLogger(__name__)
_SCORE = re.compile(r"score\s*[:=]?\s*\**\s*(\d+(?:\.\d+)?)", re.IGNORECASE)


def parse_score(reply: str) -> tuple[float | None, str]:
    """A 1-10 score from "Score: N" (strict), else the first number in 1..10 (tolerant), else None."""
    m = _SCORE.search(reply or "")
    if m and 1 <= float(m.group(1)) <= 10:
        return float(m.group(1)), "ok"
    for x in re.findall(r"\b(\d+(?:\.\d+)?)\b", reply or ""):
        if 1 <= float(x) <= 10:
            return float(x), "tolerant"
    return None, "failed"


def bootstrap_ci(values: list[float], n_boot: int = 1000, seed: int = 0, alpha: float = 0.05
                 ) -> tuple[float, float, float]:
    """(mean, low, high): percentile bootstrap interval of the mean."""
    v = np.asarray(values, dtype=float)
    if len(v) == 0:
        return float("nan"), float("nan"), float("nan")
    if len(v) == 1:
        return float(v[0]), float(v[0]), float(v[0])
    rng = np.random.default_rng(seed)
    means = v[rng.integers(0, len(v), size=(n_boot, len(v)))].mean(axis=1)
    return float(v.mean()), float(np.quantile(means, alpha / 2)), float(np.quantile(means, 1 - alpha / 2))


def score_table(judgments: list[dict], n_boot: int, seed: int) -> list[dict]:
    """Rows of scores.csv from judgment records."""
    rows = []
    for model in dict.fromkeys(j["model"] for j in judgments):
        js = [j for j in judgments if j["model"] == model]
        for cat in ["all", *sorted({j["category"] for j in js})]:
            sel = [j for j in js if cat == "all" or j["category"] == cat]
            vals = [j["score"] for j in sel if j["score"] is not None]
            mean, lo, hi = bootstrap_ci(vals, n_boot, seed)
            rows.append({"model": model, "category": cat, "mode": sel[0]["mode"], "n": len(vals),
                         "mean": round(mean, 4), "ci_low": round(lo, 4), "ci_high": round(hi, 4),
                         "parse_failures": sum(j["score"] is None for j in sel)})
    return rows


def _model_specs(cfg: Any, run_dir: Path) -> tuple[list[tuple[str, Path | None]], list[str]]:
    specs, skipped = [], []
    for name in cfg.eval.models:
        adapter = {"base": None, "v1": run_dir / "train" / "adapter", "v2": run_dir / "sdf" / "adapter"}.get(
            name, Path(name).expanduser())
        if adapter is not None and not (adapter / "adapter_config.json").is_file():
            skipped.append(name)  # e.g. v2 with sdf=off: reported, not an error
            continue
        specs.append((name, adapter))
    return specs, skipped


def _plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(dict.fromkeys(r["model"] for r in rows))
    cats = list(dict.fromkeys(r["category"] for r in rows))
    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(cats) * max(1, len(models)) / 2), 4))
    width = 0.8 / max(1, len(models))
    for k, m in enumerate(models):
        by = {r["category"]: r for r in rows if r["model"] == m}
        xs = [i + k * width for i in range(len(cats))]
        means = [by[c]["mean"] if c in by and by[c]["n"] else 0 for c in cats]
        err = [[max(0, by[c]["mean"] - by[c]["ci_low"]) if c in by and by[c]["n"] else 0 for c in cats],
               [max(0, by[c]["ci_high"] - by[c]["mean"]) if c in by and by[c]["n"] else 0 for c in cats]]
        ax.bar(xs, means, width, yerr=err, capsize=3, label=m)
    ax.set_xticks([i + width * (len(models) - 1) / 2 for i in range(len(cats))], cats, rotation=30, ha="right")
    ax.set_ylabel("judge score (1-10), 95% CI")
    ax.set_ylim(0, 10)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def run(cfg: Any, run_dir: Path, backends: Any) -> dict:
    """The pipeline's eval stage."""
    e = cfg.eval
    stage_dir = run_dir / "eval"
    questions = load_eval_questions(e.questions, e.limit)
    val_path = run_dir / "train" / "val_dialogs.jsonl"
    val_dialogs = read_jsonl(val_path) if val_path.is_file() else []
    specs, skipped = _model_specs(cfg, run_dir)
    answers: list[dict] = []
    metrics: dict[str, Any] = {"questions": len(questions), "skipped_models": skipped,
                               "heldout_dialogs": len(val_dialogs)}
    if not val_dialogs:  # said, not silently missing: too few dialogs for a split, or train.val_fraction=0
        log.warning("eval: no held-out dialogs in %s; held-out loss is not computed", val_path)
    for name, adapter in specs:
        base, tok = M.load_model_and_tokenizer(cfg.model, cache_dir(cfg))
        model = M.load_adapter(base, adapter) if adapter else base
        if adapter is None and cfg.model.chat_template and tok.chat_template:
            prompts = [tok.apply_chat_template([{"role": "user", "content": q["question"]}], tokenize=False,
                                               add_generation_prompt=True) for q in questions]
        else:  # tuned models answer in the format they were trained on
            prompts = [baize_prompt(q["question"]) for q in questions]
        texts = M.generate_texts(model, tok, prompts, e.max_new_tokens, stop=[BAIZE_HUMAN])
        for q, t in zip(questions, texts, strict=True):
            answers.append({"question_id": q["question_id"], "category": q["category"], "model": name,
                            "adapter": str(adapter) if adapter else None, "answer": t[0]})
        if val_dialogs:
            hl = heldout_loss(model, tok, val_dialogs, cfg.train.max_length)
            metrics[f"{name}/heldout_loss"] = hl["heldout_loss"]
            metrics[f"{name}/heldout_ppl"] = hl["heldout_ppl"]
        del model, base
    write_jsonl(stage_dir / "answers.jsonl", answers)

    judge = backends.client("judge")
    qtext = {q["question_id"]: q["question"] for q in questions}
    convs = [[{"role": "user", "content": e.judge_template.format(question=qtext[a["question_id"]],
                                                                   answer=a["answer"])}] for a in answers]
    results = judge.complete_many(convs, desc="judge")
    judgments, retry = [], []
    for i, (a, res) in enumerate(zip(answers, results, strict=True)):
        score, how = parse_score(res.text) if not res.error else (None, "failed")
        judgments.append({"question_id": a["question_id"], "category": a["category"], "model": a["model"],
                          "mode": e.judge_mode, "score": score, "judge_reply": res.text if not res.error else None,
                          "error": res.error, "swap": False, "parse": how})
        if score is None:
            retry.append(i)
    if retry:
        again = [convs[i] + [{"role": "assistant", "content": judgments[i]["judge_reply"] or ""},
                             {"role": "user", "content": "Reply with only: Score: N (N from 1 to 10)."}]
                 for i in retry]
        for i, res in zip(retry, judge.complete_many(again, desc="judge retry"), strict=True):
            score, _ = parse_score(res.text) if not res.error else (None, "failed")
            judgments[i].update(score=score, parse="retried" if score is not None else "failed",
                                judge_reply_retry=res.text if not res.error else res.error)
    write_jsonl(stage_dir / "judgments.jsonl", judgments)

    rows = score_table(judgments, e.bootstrap, e.seed)
    with open(stage_dir / "scores.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["model", "category", "mode", "n", "mean", "ci_low", "ci_high",
                                          "parse_failures"])
        w.writeheader()
        w.writerows(rows)
    _plot(rows, stage_dir / "scores.png")
    for r in rows:
        if r["category"] == "all":
            metrics[f"{r['model']}/judge_mean"] = r["mean"]
            metrics[f"{r['model']}/judge_ci"] = [r["ci_low"], r["ci_high"]]
            metrics[f"{r['model']}/judge_n"] = r["n"]
            metrics[f"{r['model']}/parse_failures"] = r["parse_failures"]
    return metrics
