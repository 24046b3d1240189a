"""The eval stage's W&B logging: it reads only the files the stage wrote (see the stage's docstring)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from baize_exp.io import read_jsonl


def log_wandb(wb: Any, stage_dir: Path) -> None:
    """The eval results into the pipeline's W&B run: per-judgment samples, the scores table, the charts, and the
    `all` rows in the summary."""
    import csv

    import wandb

    answers = {(a["question_id"], a["model"]): a for a in read_jsonl(stage_dir / "answers.jsonl")}
    samples = wandb.Table(columns=["model", "category", "question_id", "mode", "swap", "answer", "score",
                                   "weighted_score", "winner", "parse", "judge_reply"])
    for j in read_jsonl(stage_dir / "judgments.jsonl"):
        a = answers.get((j["question_id"], j["model"]), {})
        samples.add_data(j["model"], j["category"], j["question_id"], j["mode"], j["swap"], a.get("answer"),
                         j.get("score"), j.get("weighted_score"), j.get("winner"), j["parse"], j["judge_reply"])
    with open(stage_dir / "scores.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    scores = wandb.Table(columns=list(rows[0].keys()) if rows else [], data=[list(r.values()) for r in rows])
    images = {f"eval/chart_{p.stem}": wandb.Image(str(p)) for p in sorted(stage_dir.glob("scores*.png"))}
    wb.log({"eval/samples": samples, "eval/scores": scores, **images})
    for r in rows:
        if r["category"] == "all":
            wb.summary[f"eval/{r['model']}/{r['mode']}/mean"] = float(r["mean"])
            wb.summary[f"eval/{r['model']}/{r['mode']}/n"] = int(r["n"])
