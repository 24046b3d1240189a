"""Paired comparisons in the report: the eval stage's own (eval/paired.csv, models of one run), across runs (each
run's final model against a baseline run's, item by item, from the per-item files the eval stage wrote), and
between arms trained with several seeds each (`arm_rows`: a sweep's `train.seed` replicates, the reproduction's
arms), where the verdict accounts for what another training seed would change."""

from __future__ import annotations

import contextlib
import csv
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from baize_exp.io import read_json, read_jsonl
from baize_exp.stages.report.runs import fmt

# The same outcomes and the same tests as the eval stage's own eval/paired.csv (baize_exp.stats, the layer both
# stand on), so a cross-run row and an in-run row mean the same thing.
from baize_exp.stats import (
    FORMATS,
    ITEM_METRICS,
    NOT_SHOWN_TO_DISCRIMINATE,
    PAIRED_TEST_COLUMNS,
    SEED_PAIRED_COLUMNS,
    higher_is_better,
    holm_rows,
    judge_check_note,
    pair_counts,
    paired_test,
    seed_paired_test,
    split_metric,
    write_csv_rows,
)
from baize_exp.stats import item_values as stats_item_values

CHAIN = ("v2", "v1", "base")  # the final model of a run is the last of this chain it evaluated
# what a seed-aware table adds to the paired columns
ARM_COLUMNS = [*PAIRED_TEST_COLUMNS, *SEED_PAIRED_COLUMNS]
INT_FIELDS = frozenset({"n", "parse_failures", "k_a", "k_b"})
FLOAT_FIELDS = frozenset(
    {
        "mean",
        "ci_low",
        "ci_high",
        "mean_a",
        "mean_b",
        "diff",
        "mde",
        "p",
        "p_holm",
        "seed_sd_a",
        "seed_sd_b",
        "seed_sd_pooled",
        "df",
    }
)


def read_csv_rows(path: Path) -> list[dict[str, Any]]:
    """A CSV's rows with numeric-looking fields as numbers (empty and 'nan' become NaN, not strings; 'inf' stays
    infinite: a studentized interval at n of 2-3 can be unbounded)."""
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    for r in rows:
        for k, v in r.items():
            if k in INT_FIELDS and v not in (None, ""):
                with contextlib.suppress(ValueError):
                    r[k] = int(float(v))
            elif k in FLOAT_FIELDS:
                try:
                    r[k] = float(v) if v not in (None, "") else float("nan")
                except ValueError:
                    r[k] = float("nan")
    return rows


def reliability(run_dir: Path) -> dict:
    path = run_dir / "eval" / "reliability.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def judge_discriminates(run_dir: Path) -> bool | None:
    """False when the run's judge check did not show the judge can discriminate; None when there was no check."""
    return reliability(run_dir).get("judge_check", {}).get("discriminates")


def judge_note(run_dir: Path) -> str:
    """The note a run's judge-based rows carry (`stats.judge_check_note`); an older run's check, which has no
    status, gets the bare wording when it failed."""
    check = reliability(run_dir).get("judge_check")
    if not check or check.get("discriminates"):
        return ""
    return judge_check_note(check) if "status" in check else NOT_SHOWN_TO_DISCRIMINATE


def item_values(run_dir: Path, keep_failures: bool = False) -> dict[str, dict[str, dict[str, float | None]]]:
    """{model: {metric key: {item id: value}}} from a run's eval/judgments.jsonl and eval/items.jsonl, computed by
    `stats.item_values` as the eval stage computes its own paired.csv (so the report and the stage cannot
    disagree); `keep_failures` keeps a judge parse failure as None."""
    ev = run_dir / "eval"
    return stats_item_values(
        *(read_jsonl(ev / f) if (ev / f).is_file() else [] for f in ("judgments.jsonl", "items.jsonl")),
        keep_failures=keep_failures,
    )


def answer_formats(run_dir: Path) -> dict[str, str]:
    """{model: the prompt format it answered the eval questions in} from the run's metrics (older runs: none)."""
    m = read_json(run_dir / "metrics.json") if (run_dir / "metrics.json").is_file() else {}
    ev = m.get("eval", {})
    return {k.split("/", 1)[0]: v for k, v in ev.items() if k.endswith("/answer_format")}


def pick_final(models: list[str], metrics_final: str | None) -> str | None:
    """The run's final model: what metrics.json names (even when it has no per-item value: then it is not
    compared, rather than its predecessor standing in for it), else the last of base → v1 → v2 that has values."""
    if metrics_final:
        return metrics_final
    return next((m for m in CHAIN if m in models), None)


def metric_order(key: str) -> tuple[int, int, int]:
    """Judge rows first, then held-out loss, its all-token twin and the reference log-likelihood, each by format."""
    metric, form = split_metric(key)
    order = list(ITEM_METRICS.values())
    if metric.startswith("judge_"):
        return (0, 0, 0)
    return (1, order.index(metric) if metric in order else len(order), FORMATS.index(form) if form in FORMATS else -1)


def _judge_format(a: str, fa: str, b: str, fb: str) -> str:
    if not (fa or fb):
        return ""
    return fa if fa == fb else f"{a}: {fa or '?'}; {b}: {fb or '?'}"


def cross_run_rows(
    runs: list[tuple[str, Path, str | None]], baseline: int, n_boot: int = 2000, seed: int = 0
) -> tuple[list[dict], list[str]]:
    """Rows of paired.csv: each run's final model against the baseline run's, on the items both have
    (`stats.paired_test`; Holm's adjustment over the whole table; a judge row's parse failures in `items`).

    `runs` are (label, run dir, final model from metrics.json or None). Returns (rows, notes) where the notes
    say which runs could not be compared and why."""
    notes: list[str] = []
    values = [item_values(d, keep_failures=True) for _, d, _ in runs]
    finals = [pick_final(list(v), f) for v, (_, _, f) in zip(values, runs, strict=True)]
    b_label, b_dir, _ = runs[baseline]
    b_model = finals[baseline]
    if b_model is None:
        return [], [
            f"the baseline run `{b_label}` has no per-item values (eval/judgments.jsonl, eval/items.jsonl): "
            "no paired comparison across runs"
        ]
    b_vals = values[baseline].get(b_model, {})
    b_note, b_form = judge_note(b_dir), answer_formats(b_dir).get(b_model, "")
    rows: list[dict] = []
    for i, (label, d, _) in enumerate(runs):
        if i == baseline:
            continue
        model = finals[i]
        if model is None:
            notes.append(f"`{label}`: no per-item values, not compared")
            continue
        a_vals = values[i].get(model, {})
        common = sorted((m for m in a_vals if m in b_vals), key=metric_order)
        if not common:
            notes.append(
                f"`{label}` ({model}) and `{b_label}` ({b_model}) have no per-item metric in common: not compared"
            )
        a_name, b_name = f"{label} ({model})", f"{b_label} ({b_model})"
        for key in common:
            res = paired_test(a_vals[key], b_vals[key], higher_is_better(key), n_boot=n_boot, seed=seed)
            if res["n"] == 0:
                notes.append(f"`{label}` vs `{b_label}`, {key}: no item in common")
                continue
            metric, form = split_metric(key)
            note = res["note"]
            if metric.startswith("judge_"):
                form = _judge_format(a_name, answer_formats(d).get(model, ""), b_name, b_form)
                blind = "; ".join(dict.fromkeys(x for x in (judge_note(d), b_note) if x))
                note = "; ".join(x for x in (blind, note) if x)
            rows.append(
                {
                    "comparison": f"{label} vs {b_label}",
                    "a": a_name,
                    "b": b_name,
                    "metric": metric,
                    **res,
                    "format": form,
                    "items": pair_counts(a_vals[key], b_vals[key], label, b_label)["text"],
                    "note": note,
                }
            )
    return holm_rows(rows), notes


@dataclass
class Arm:
    """One arm of a seed-aware comparison: its label, and per training seed (seed label, run dir, model name);
    `trained` False for a model no training seed touches (the base), which has one evaluation."""

    label: str
    runs: list[tuple[str, Path, str]]
    trained: bool = True


def _arm_values(arm: Arm) -> dict[str, dict[str, dict[str, float | None]]]:
    """{metric key: {seed label: {item id: value}}} of an arm (judge parse failures kept as None)."""
    out: dict[str, dict[str, dict[str, float | None]]] = {}
    for seed_label, run_dir, model in arm.runs:
        for key, vals in item_values(run_dir, keep_failures=True).get(model, {}).items():
            out.setdefault(key, {})[seed_label] = vals
    return out


def _unparsed(arm: Arm, per_seed: dict[str, dict[str, float | None]]) -> int:
    return sum(v is None for vals in per_seed.values() for v in vals.values())


def arm_rows(
    a: Arm, b: Arm, comparison: str | None = None, metrics: list[str] | None = None, n_boot: int = 2000, seed: int = 0
) -> tuple[list[dict], list[str]]:
    """Rows comparing arm a with arm b by `stats.seed_paired_test` (seeds and items: the between-seed SD beside
    each effect, a t interval with Satterthwaite's degrees of freedom), one per metric key both arms have in every
    seed (`metrics`: only these keys). A judge row says its parse failures per arm (summed over the seeds) and
    the items no seed could use. Not Holm-adjusted: the caller adjusts the table it builds (`holm_rows`).
    Returns (rows, notes)."""
    va, vb = _arm_values(a), _arm_values(b)
    keys = sorted((k for k in va if k in vb and (metrics is None or k in metrics)), key=metric_order)
    notes: list[str] = []
    rows: list[dict] = []
    for key in keys:
        sa, sb = va[key], vb[key]
        if len(sa) < len(a.runs) or len(sb) < len(b.runs):
            notes.append(f"{comparison or a.label + ' vs ' + b.label}, {key}: not in every seed's run, not compared")
            continue
        r = seed_paired_test(
            sa, sb, higher_is_better(key), a_trained=a.trained, b_trained=b.trained, n_boot=n_boot, seed=seed
        )
        metric, form = split_metric(key)
        items = f"n={r['n']}" + (
            f"; {len(r['items_dropped'])} dropped (unparsed or missing in a seed)" if r["items_dropped"] else ""
        )
        note = r["note"]
        if metric.startswith("judge_"):
            counts = {arm.label: _unparsed(arm, s) for arm, s in ((a, sa), (b, sb))}
            items += "; unparsed: " + ", ".join(f"{c} in {name}" for name, c in counts.items())
            blind = "; ".join(dict.fromkeys(x for arm in (a, b) for _, d, _ in arm.runs if (x := judge_note(d))))
            note = "; ".join(x for x in (blind, note) if x)
            form = _judge_format(
                a.label,
                answer_formats(a.runs[0][1]).get(a.runs[0][2], ""),
                b.label,
                answer_formats(b.runs[0][1]).get(b.runs[0][2], ""),
            )
        rows.append(
            {
                "comparison": comparison or f"{a.label} vs {b.label}",
                "a": a.label,
                "b": b.label,
                "metric": metric,
                "format": form,
                **{k: v for k, v in r.items() if k not in ("items_dropped", "note")},
                "items": items,
                "note": note,
            }
        )
    return rows, notes


def _cell_ci(r: dict) -> str:
    return f"{fmt(r['diff'])} [{fmt(r['ci_low'])}, {fmt(r['ci_high'])}]"


def _p(v: Any) -> str:
    return "-" if not isinstance(v, (int, float)) or math.isnan(v) else f"{v:.2g}" if v >= 0.001 else "<0.001"


def paired_table(rows: list[dict]) -> tuple[list[str], list[list[str]], list[str]]:
    """(header, cells, row classes) of a paired comparison table: comparison, metric (and the prompt format it was
    scored in), what the items were, diff [95% CI], MDE, p, the row's verdict and the verdict after Holm's
    adjustment over the table; seed-aware rows add the seeds per arm and their between-seed SDs. Row classes
    follow the Holm verdict where there is one."""
    with_format = any(r.get("format") for r in rows)
    with_seeds = any("k_a" in r and r.get("k_a") not in (None, "") for r in rows)
    with_holm = any("verdict_holm" in r and r.get("verdict_holm") for r in rows)
    with_note = any(r.get("note") for r in rows)
    header = ["comparison", "metric"] + ["format"] * with_format + ["items", "diff [95% CI]", "MDE", "p", "verdict"]
    header += ["verdict (Holm)"] * with_holm + ["seeds a/b", "seed SD a / b"] * with_seeds + ["note"] * with_note
    cells, classes = [], []
    for r in rows:
        better = f" ({r['better_if']} is better)" if r.get("better_if") else ""
        row = [r["comparison"], f"{r['metric']}{better}"] + [r.get("format") or "-"] * with_format
        row += [r.get("items") or f"n={r['n']}", _cell_ci(r), fmt(r["mde"]), _p(r.get("p")), r["verdict"]]
        row += [r.get("verdict_holm") or "-"] * with_holm
        if with_seeds:
            row += [
                f"{r.get('k_a', '-')}/{r.get('k_b', '-')}",
                f"{fmt(r.get('seed_sd_a'))} / {fmt(r.get('seed_sd_b'))}",
            ]
        cells.append(row + [r.get("note") or ""] * with_note)
        shown = r.get("verdict_holm") if with_holm and r.get("verdict_holm") else r["verdict"]
        classes.append(shown if shown in ("better", "worse") else "")
    return header, cells, classes


__all__ = [
    "ARM_COLUMNS",
    "PAIRED_TEST_COLUMNS",
    "Arm",
    "arm_rows",
    "cross_run_rows",
    "item_values",
    "paired_table",
    "read_csv_rows",
    "write_csv_rows",
]
