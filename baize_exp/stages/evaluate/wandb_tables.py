"""The eval stage's W&B logging: it reads only the files the stage wrote (the stage's `writes` and `may_write`);
a file an older run did not write is skipped, with its table."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Any

from baize_exp.io import read_jsonl

# Column types of the CSVs, so W&B tables hold numbers (sortable, plottable) rather than the CSV's strings; a
# column not named here stays a string (model, category, mode, note, verdict, ...).
INT_COLUMNS = frozenset({"n", "parse_failures", "k_a", "k_b"})
FLOAT_COLUMNS = frozenset(
    {"mean", "ci_low", "ci_high", "mean_a", "mean_b", "diff", "mde", "p", "p_holm", "seed_sd_a", "seed_sd_b", "df"}
)
JUDGE_CHECK_COLUMNS = ["question_id", "degradation", "mode", "correct", "good_score", "bad_score", "verdicts", "parse"]
# n counts the readable items, unparsed the others; status: discriminates, "judge not shown to discriminate" or
# "too few readable" (stats.judge_check_clustered; an older run's check has neither and leaves them empty)
JUDGE_ACCURACY_COLUMNS = [
    "degradation",
    "n",
    "correct",
    "accuracy",
    "ci_low",
    "ci_high",
    "chance",
    "discriminates",
    "unparsed",
    "status",
]


def log_wandb(wb: Any, stage_dir: Path) -> None:
    """The eval results into the pipeline's W&B run: per-judgment samples, the scores table, the judge check
    (per item and its accuracy), the paired comparisons, the charts, and the `all` score rows in the summary."""
    import wandb

    tables: dict[str, Any] = {}
    if (stage_dir / "judgments.jsonl").is_file():
        answers = {(a["question_id"], a["model"]): a for a in read_jsonl(stage_dir / "answers.jsonl")}
        samples = wandb.Table(
            columns=[
                "model",
                "category",
                "question_id",
                "mode",
                "swap",
                "answer",
                "score",
                "weighted_score",
                "winner",
                "parse",
                "judge_reply",
            ]
        )
        for j in read_jsonl(stage_dir / "judgments.jsonl"):
            a = answers.get((j["question_id"], j["model"]), {})
            samples.add_data(
                j["model"],
                j["category"],
                j["question_id"],
                j["mode"],
                j.get("swap"),
                a.get("answer"),
                j.get("score"),
                j.get("weighted_score"),
                j.get("winner"),
                j.get("parse"),
                j.get("judge_reply"),
            )
        tables["eval/samples"] = samples
    scores = _typed_csv(stage_dir / "scores.csv")
    if scores is not None:
        tables["eval/scores"] = wandb.Table(columns=scores[0], data=scores[1])
    if (stage_dir / "judge_check.jsonl").is_file():
        tables["eval/judge_check"] = wandb.Table(
            columns=JUDGE_CHECK_COLUMNS, data=judge_check_rows(read_jsonl(stage_dir / "judge_check.jsonl"))
        )
    reliability = stage_dir / "reliability.json"
    if reliability.is_file() and (jc := json.loads(reliability.read_text()).get("judge_check")):
        tables["eval/judge_check_accuracy"] = wandb.Table(columns=JUDGE_ACCURACY_COLUMNS, data=judge_accuracy_rows(jc))
    paired = _typed_csv(stage_dir / "paired.csv")
    if paired is not None:
        tables["eval/paired"] = wandb.Table(columns=paired[0], data=paired[1])
    images = {f"eval/chart_{p.stem}": wandb.Image(str(p)) for p in sorted(stage_dir.glob("scores*.png"))}
    if tables or images:
        wb.log({**tables, **images})
    if scores is not None:  # the totals, where the runs table shows them (beside the stage's metrics.json figures)
        cols, rows = scores
        for r in (dict(zip(cols, row, strict=True)) for row in rows):
            if r.get("category") == "all":
                for k in ("mean", "n", "ci_low", "ci_high"):
                    if r.get(k) is not None:
                        wb.summary[f"eval/summary/scores/{r['model']}/{r['mode']}/{k}"] = r[k]


def judge_check_rows(records: list[dict]) -> list[list[Any]]:
    """One table row per known-order check item; a pairwise item's verdicts as one string (a table cell of a
    list would need every row's list to have one element type)."""
    rows = []
    for r in records:
        verdicts = r.get("verdicts")
        rows.append(
            [
                r.get("question_id"),
                r.get("degradation"),
                r.get("mode"),
                r.get("correct"),
                _number(r.get("good_score"), float),
                _number(r.get("bad_score"), float),
                None if verdicts is None else ", ".join(map(str, verdicts)),
                r.get("parse"),
            ]
        )
    return rows


def judge_accuracy_rows(jc: dict) -> list[list[Any]]:
    """reliability.json's judge_check: the overall row ("all") then one per degradation, each with its unreadable
    items beside the readable n."""
    rows = [
        [
            "all",
            _number(jc.get("n"), int),
            _number(jc.get("correct"), int),
            _number(jc.get("accuracy"), float),
            _number(jc.get("ci_low"), float),
            _number(jc.get("ci_high"), float),
            _number(jc.get("chance"), float),
            jc.get("discriminates"),
            _number(jc.get("unparsed"), int),
            jc.get("status"),
        ]
    ]
    for name, d in (jc.get("by_degradation") or {}).items():
        rows.append(
            [
                name,
                _number(d.get("n"), int),
                None,
                _number(d.get("accuracy"), float),
                _number(d.get("ci_low"), float),
                _number(d.get("ci_high"), float),
                _number(jc.get("chance"), float),
                None,
                _number(d.get("unparsed"), int),
                None,
            ]
        )
    return rows


def _typed_csv(path: Path) -> tuple[list[str], list[list[Any]]] | None:
    """A CSV's header and rows with INT_COLUMNS as ints and FLOAT_COLUMNS as floats (empty or NaN: None, which
    W&B keeps as a missing value in a numeric column); None when the file is absent or has no header."""
    if not path.is_file():
        return None
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        cols = list(reader.fieldnames or [])
        rows = [[_cell(c, r.get(c)) for c in cols] for r in reader]
    return (cols, rows) if cols else None


def _cell(col: str, v: str | None) -> Any:
    if col in INT_COLUMNS:
        return _number(v, int)
    if col in FLOAT_COLUMNS:
        return _number(v, float)
    return v if v is not None else ""


def _number(v: Any, kind: type) -> Any:
    if v is None or v == "" or isinstance(v, bool):
        return None
    try:
        x = float(v)
    except (TypeError, ValueError):
        return None
    if math.isnan(x) or math.isinf(x):
        return None  # strict JSON in the table file, and a gap in the chart rather than a string
    return int(x) if kind is int else x
