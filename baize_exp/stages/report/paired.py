"""Paired comparisons in the report: the eval stage's own (eval/paired.csv, models of one run) and across runs
(each run's final model against a baseline run's, item by item, from the per-item files the eval stage wrote)."""

from __future__ import annotations

import contextlib
import csv
import json
from pathlib import Path
from typing import Any

from baize_exp.io import read_jsonl
from baize_exp.stages.report.runs import fmt

# The same outcomes and the same paired bootstrap as the eval stage's own eval/paired.csv (baize_exp.stats, the
# layer both stand on), so a cross-run row and an in-run row mean the same thing.
from baize_exp.stats import (
    CANNOT_DISCRIMINATE,
    PAIRED_COLUMNS,
    higher_is_better,
    paired_bootstrap,
    write_csv_rows,
)
from baize_exp.stats import item_values as stats_item_values

CHAIN = ("v2", "v1", "base")  # the final model of a run is the last of this chain it evaluated


def read_csv_rows(path: Path) -> list[dict[str, Any]]:
    """A CSV's rows with numeric-looking fields as floats (empty and 'nan' become NaN, not strings)."""
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    for r in rows:
        for k, v in r.items():
            if k in ("n", "parse_failures") and v not in (None, ""):
                with contextlib.suppress(ValueError):
                    r[k] = int(float(v))
            elif k in ("mean", "ci_low", "ci_high", "mean_a", "mean_b", "diff", "mde"):
                try:
                    r[k] = float(v) if v not in (None, "") else float("nan")
                except ValueError:
                    r[k] = float("nan")
    return rows


def reliability(run_dir: Path) -> dict:
    path = run_dir / "eval" / "reliability.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def judge_discriminates(run_dir: Path) -> bool | None:
    """False when the run's judge check found the judge at chance; None when there was no check."""
    return reliability(run_dir).get("judge_check", {}).get("discriminates")


def item_values(run_dir: Path) -> dict[str, dict[str, dict[str, float]]]:
    """{model: {metric: {item id: value}}} from a run's eval/judgments.jsonl and eval/items.jsonl, computed by
    `stats.item_values` as the eval stage computes its own paired.csv (so the report and the stage cannot
    disagree)."""
    ev = run_dir / "eval"
    return stats_item_values(
        *(read_jsonl(ev / f) if (ev / f).is_file() else [] for f in ("judgments.jsonl", "items.jsonl"))
    )


def pick_final(models: list[str], metrics_final: str | None) -> str | None:
    """The run's final model: what metrics.json names (even when it has no per-item value: then it is not
    compared, rather than its predecessor standing in for it), else the last of base → v1 → v2 that has values."""
    if metrics_final:
        return metrics_final
    return next((m for m in CHAIN if m in models), None)


def cross_run_rows(
    runs: list[tuple[str, Path, str | None]], baseline: int, n_boot: int = 2000, seed: int = 0
) -> tuple[list[dict], list[str]]:
    """Rows of paired.csv: each run's final model against the baseline run's, on the items both have.

    `runs` are (label, run dir, final model from metrics.json or None). Returns (rows, notes) where the notes
    say which runs could not be compared and why."""
    notes: list[str] = []
    values = [item_values(d) for _, d, _ in runs]
    finals = [pick_final(list(v), f) for v, (_, _, f) in zip(values, runs, strict=True)]
    b_label, b_dir, _ = runs[baseline]
    b_model = finals[baseline]
    if b_model is None:
        return [], [
            f"the baseline run `{b_label}` has no per-item values (eval/judgments.jsonl, eval/items.jsonl): "
            "no paired comparison across runs"
        ]
    b_vals = values[baseline].get(b_model, {})
    b_blind = judge_discriminates(b_dir) is False
    rows: list[dict] = []
    for i, (label, d, _) in enumerate(runs):
        if i == baseline:
            continue
        model = finals[i]
        if model is None:
            notes.append(f"`{label}`: no per-item values, not compared")
            continue
        a_vals = values[i].get(model, {})
        blind = b_blind or judge_discriminates(d) is False
        common = [m for m in a_vals if m in b_vals]
        if not common:
            notes.append(
                f"`{label}` ({model}) and `{b_label}` ({b_model}) have no per-item metric in common: not compared"
            )
        for metric in common:
            res = paired_bootstrap(a_vals[metric], b_vals[metric], higher_is_better(metric), n_boot, seed)
            if res["n"] == 0:
                notes.append(f"`{label}` vs `{b_label}`, {metric}: no item in common")
                continue
            note = CANNOT_DISCRIMINATE if blind and metric.startswith("judge_") else ""
            rows.append(
                {
                    "comparison": f"{label} vs {b_label}",
                    "a": f"{label} ({model})",
                    "b": f"{b_label} ({b_model})",
                    "metric": metric,
                    **res,
                    "note": note,
                }
            )
    return rows, notes


def paired_table(rows: list[dict]) -> tuple[list[str], list[list[str]], list[str]]:
    """(header, cells, row classes) of the paired comparison table shown in the report."""
    header = ["comparison", "metric", "n", "diff [95% CI]", "MDE", "verdict"]
    with_note = any(r.get("note") for r in rows)
    header += ["note"] if with_note else []
    cells, classes = [], []
    for r in rows:
        better = f" ({r['better_if']} is better)" if r.get("better_if") else ""
        row = [
            r["comparison"],
            f"{r['metric']}{better}",
            str(r["n"]),
            f"{fmt(r['diff'])} [{fmt(r['ci_low'])}, {fmt(r['ci_high'])}]",
            fmt(r["mde"]),
            r["verdict"],
        ]
        cells.append(row + ([r.get("note") or ""] if with_note else []))
        classes.append(r["verdict"] if r["verdict"] in ("better", "worse") else "")
    return header, cells, classes


__all__ = ["PAIRED_COLUMNS", "cross_run_rows", "item_values", "paired_table", "read_csv_rows", "write_csv_rows"]
