"""What the report reads from run dirs: which dirs are runs, their overrides, status, metrics and loss logs."""

from __future__ import annotations

import csv
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from baize_exp.config import NOT_PARAMS, override_dict
from baize_exp.errors import UserError
from baize_exp.io import read_json
from baize_exp.stages.report.charts import Series, finite, shorten


@dataclass
class RunRecord:
    """What the report knows of one run dir."""

    path: Path
    overrides: dict[str, str]
    metrics: dict[str, Any]
    status: str  # completed | failed | incomplete
    error: str | None = None
    values: dict[str, Any] = field(default_factory=dict)  # the table's metric columns


def fmt(v: Any) -> str:
    """A table cell: 4 significant digits, '-' for missing and NaN."""
    if isinstance(v, float):
        return "-" if math.isnan(v) else f"{v:.4g}"
    if isinstance(v, list):
        return "[" + ", ".join(fmt(x) for x in v) + "]"
    return "-" if v is None else str(v)


def _natural_key(p: Path) -> list:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", str(p))]


def find_run_dirs(paths: list[Path]) -> list[Path]:
    """Run dirs under each path: a dir with `metrics.json` or Hydra's `.hydra/` (a job that died before writing
    metrics is still a run to report). Multirun dirs hold one such dir per job."""
    found: list[Path] = []
    for p in paths:
        if not p.is_dir():
            raise UserError(f"report: {p} is not a directory; give run dirs or a multirun dir")
        if (p / "metrics.json").is_file() or (p / ".hydra").is_dir():
            found.append(p)
            continue
        runs = sorted(
            {
                m.parent
                for pat in ("*/metrics.json", "*/.hydra/overrides.yaml", "*/*/metrics.json")
                for m in p.glob(pat)
                if "report" not in m.parts
            },
            key=_natural_key,
        )
        runs = [r.parent if r.name == ".hydra" else r for r in runs]
        if not runs:
            raise UserError(f"report: no run dirs (metrics.json or .hydra/) under {p}; give run dirs or a multirun dir")
        found += runs
    return list(dict.fromkeys(found))


def _read_overrides(run_dir: Path, metrics: dict) -> dict[str, str]:
    listed = metrics.get("run", {}).get("overrides")
    if listed is None and (run_dir / ".hydra" / "overrides.yaml").is_file():
        from omegaconf import OmegaConf

        listed = list(OmegaConf.load(run_dir / ".hydra" / "overrides.yaml"))
    return override_dict(listed or [])


def final_model(ev: dict) -> str | None:
    """The last model of the v1 → v2 chain the run evaluated."""
    for m in ("v2", "v1", "base"):
        if f"{m}/heldout_loss" in ev or f"{m}/judge_mean" in ev:
            return m
    return None


def _metric_values(metrics: dict) -> dict[str, Any]:
    """The table's metric columns from one run's metrics.json (missing ones stay absent)."""
    out: dict[str, Any] = {}
    col, tr, ev, sdf = (metrics.get(s, {}) for s in ("collect", "train", "eval", "sdf"))
    for key, src, name in [
        ("dialogs", col, "dialogs"),
        ("rejects", col, "rejects"),
        ("cost_usd", col, "cost_usd"),
        ("val_loss", tr, "val_loss"),
        ("val_ppl", tr, "val_ppl"),
        ("train_tok_s", tr, "tokens_per_s"),
        ("sup_tok_s", tr, "supervised_tokens_per_s"),
        ("sdf_parse_failed", sdf, "parse_failed"),
    ]:
        if name in src:
            out[key] = src[name]
    final = final_model(ev)
    if final:
        out["final_model"] = final
        for m in ("base", "v1", "v2"):
            if f"{m}/heldout_loss" in ev:
                out[f"{m}_heldout_loss"] = ev[f"{m}/heldout_loss"]
            if f"{m}/judge_mean" in ev:
                out[f"{m}_judge"] = ev[f"{m}/judge_mean"]
                out[f"{m}_judge_ci"] = ev.get(f"{m}/judge_ci")
                out[f"{m}_judge_n"] = ev.get(f"{m}/judge_n")
        out["final_heldout_loss"] = ev.get(f"{final}/heldout_loss")
        out["final_judge"] = ev.get(f"{final}/judge_mean")
        out["final_judge_ci"] = ev.get(f"{final}/judge_ci")
    seconds = [m.get("stage_seconds", 0) for s, m in metrics.items() if s != "run" and isinstance(m, dict)]
    if seconds:
        out["wall_s"] = round(sum(seconds), 1)
    return out


def load_runs(paths: list[Path]) -> list[RunRecord]:
    """A record per run dir found under `paths` (see `find_run_dirs`), in table order."""
    records = []
    for d in find_run_dirs(paths):
        metrics = read_json(d / "metrics.json") if (d / "metrics.json").is_file() else {}
        info = metrics.get("run", {})
        # A job killed hard (OOM, SIGKILL) never writes its status: it is neither completed nor failed.
        status = info.get("status") or ("incomplete" if metrics else "failed")
        error = info.get("error") or (None if metrics else "no metrics.json: the job died before its first stage")
        records.append(RunRecord(d, _read_overrides(d, metrics), metrics, status, error, _metric_values(metrics)))
    return records


def swept_params(records: list[RunRecord]) -> tuple[list[str], dict[str, str]]:
    """(parameters that differ between runs, parameters every run shares)."""
    keys = [k for k in dict.fromkeys(k for r in records for k in r.overrides) if not NOT_PARAMS.match(f"{k}=")]
    varying = [k for k in keys if len({r.overrides.get(k) for r in records}) > 1]
    common = {k: records[0].overrides[k] for k in keys if k not in varying}
    return varying, common


def is_sweep(records: list[RunRecord], params: list[str]) -> bool:
    """Whether a chart per swept parameter means something. Yes for one parameter, for a grid (some two runs
    differ in that one parameter only) and for a big random search (a slice plot per parameter); no for runs
    given by hand, each with its own overrides, where every run differs from every other in several ways."""
    if len(params) <= 1:
        return True
    if any(p not in r.overrides for r in records for p in params):
        return False  # a parameter some runs never set: runs picked by hand, not a sweep
    vals = [tuple(r.overrides[p] for p in params) for r in records]
    if any(sum(x != y for x, y in zip(a, b, strict=True)) == 1 for i, a in enumerate(vals) for b in vals[i + 1 :]):
        return True
    return len(records) > 12


def _abbrev_key(key: str) -> str:
    """`learning_rate` → `lr`, `max_length` → `ml`: a long snake_case key by its initials; short keys stay."""
    return "".join(w[0] for w in key.split("_") if w) if len(key) > 8 and "_" in key else key


def _basename(v: str) -> str:
    return (v.rstrip("/").rsplit("/", 1)[-1] or v) if "/" in v else v


def _differing(values: list[str]) -> dict[str, str]:
    """Each value by the part that differs between them: `seeds_v1_mix.jsonl`, `seeds_v2_mix.jsonl` → `…1…`,
    `…2…` (numbers are left whole: `0.0001` vs `0.001` must not become `…01` vs `…1`)."""
    distinct = sorted(set(values))
    if len(distinct) < 2 or all(_float(v) is not None for v in distinct):
        return {v: v for v in distinct}
    pre = len(os.path.commonprefix(distinct))
    suf = len(os.path.commonprefix([v[::-1] for v in distinct]))
    suf = min(suf, min(map(len, distinct)) - pre)  # prefix and suffix must not overlap in the shortest value
    if pre + suf < 8 or max(map(len, distinct)) <= 14:  # short values, or only an extension in common: whole
        return {v: v for v in distinct}
    return {v: ("…" if pre else "") + v[pre : len(v) - suf] + ("…" if suf else "") for v in distinct}


def run_labels(records: list[RunRecord], params: list[str], cap: int = 36) -> list[str]:
    """A short, unique label per run from its swept parameters only (what tells it apart): a dotted key by its
    last part (initials when long) unless two keys would read alike, a path by its last component, a long value
    by the part that differs between runs; while the label is over `cap` characters its longest value is cut in
    the middle, so every parameter stays in view."""
    tails = [_abbrev_key(p.rsplit(".", 1)[-1]) for p in params]
    keys = [t if tails.count(t) == 1 else p for p, t in zip(params, tails, strict=True)]
    short = {p: _differing([_basename(r.overrides[p]) for r in records if p in r.overrides]) for p in params}
    labels = []
    for r in records:
        parts = [
            [k, short[p][_basename(v)]]
            for p, k in zip(params, keys, strict=True)
            if (v := r.overrides.get(p)) is not None
        ]
        while parts and len(" ".join(f"{k}={v}" for k, v in parts)) > cap:
            longest = max(parts, key=lambda kv: len(kv[1]))
            if len(longest[1]) <= 6:
                break
            longest[1] = shorten(longest[1], len(longest[1]) - 1)
        label = " ".join(f"{k}={v}" for k, v in parts)
        labels.append(shorten(label, cap) if parts else shorten(r.path.name, cap))
    for i, lab in enumerate(labels):  # two runs with the same label: the dir name tells them apart
        if labels.count(lab) > 1:
            labels[i] = shorten(f"{records[i].path.name}: {lab}", cap)
    return labels


def value_columns(records: list[RunRecord]) -> list[str]:
    order = [
        "dialogs",
        "rejects",
        "cost_usd",
        "val_loss",
        "val_ppl",
        "base_heldout_loss",
        "v1_heldout_loss",
        "v2_heldout_loss",
        "base_judge",
        "v1_judge",
        "v2_judge",
        "sdf_parse_failed",
        "train_tok_s",
        "sup_tok_s",
        "wall_s",
    ]
    return [c for c in order if any(c in r.values for r in records)]


def _cell(r: RunRecord, col: str) -> str:
    v = r.values.get(col)
    if col.endswith("_judge") and (v is not None or r.values.get(f"{col}_n") is not None):
        if v is None or isinstance(v, float) and math.isnan(v):  # nothing judged (every reply unparsable): say so
            return f"- n={r.values.get(f'{col}_n')}"
        ci = r.values.get(f"{col}_ci")
        ci_s = f" [{fmt(ci[0])}, {fmt(ci[1])}]" if ci else ""
        return f"{fmt(v)}{ci_s} n={r.values.get(f'{col}_n')}"
    return fmt(v)


def table_rows(records: list[RunRecord]) -> tuple[list[str], list[list[str]]]:
    """The comparison table: run, swept parameters, status, metric columns."""
    params, _ = swept_params(records)
    cols = value_columns(records)
    header = ["run", *params, "status", *cols]
    rows = [
        [r.path.name, *[r.overrides.get(p, "-") for p in params], r.status, *[_cell(r, c) for c in cols]]
        for r in records
    ]
    return header, rows


def write_csv(records: list[RunRecord], path: Path) -> None:
    """Machine-readable twin of the table: raw numbers, CI bounds in their own columns."""
    params, _ = swept_params(records)
    cols = value_columns(records)
    header = ["run_dir", *params, "status", "error"]
    for c in cols:
        header += [c, f"{c}_ci_low", f"{c}_ci_high", f"{c}_n"] if c.endswith("_judge") else [c]
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        for r in records:
            row: list[Any] = [str(r.path), *[r.overrides.get(p, "") for p in params], r.status, r.error or ""]
            for c in cols:
                row.append(r.values.get(c, ""))
                if c.endswith("_judge"):
                    ci = r.values.get(f"{c}_ci") or ["", ""]
                    row += [ci[0], ci[1], r.values.get(f"{c}_n", "")]
            w.writerow(row)


# The Lightning CSV columns that hold losses: train's "train/loss", "val/loss"; SDF logs under its own prefix
# ("sdf/train/loss", "sdf/val/loss") so its curves are not confused with v1's in W&B.
_LOSS_COLUMN = re.compile(r"^(?:[a-z0-9_]+/)?(train|val)/loss(?:_step)?$")


def loss_history(run_dir: Path) -> dict[str, Series]:
    """{stage: {column: (steps, losses)}} from the CSV logs the train and sdf stages write in the run dir.
    A resumed stage logs into a new version folder: its points join the same curve, the later log winning a step
    both hold. Non-finite losses are left out (a diverged step is not a point on the curve)."""
    points: dict[str, dict[str, dict[float, float]]] = {}
    for stage in ("train", "sdf"):
        for path in sorted((run_dir / stage).glob("**/metrics.csv"), key=_natural_key):
            with open(path, newline="") as f:
                reader = csv.DictReader(f)
                cols = [c for c in reader.fieldnames or [] if _LOSS_COLUMN.match(c)]
                rows = list(reader)
            for col in cols:
                for r in rows:
                    v = _float(r.get(col))
                    if v is not None and finite(v) and _float(r.get("step")) is not None:
                        points.setdefault(stage, {}).setdefault(col, {})[float(r["step"])] = v
    return {
        stage: {col: (sorted(pts), [pts[s] for s in sorted(pts)]) for col, pts in by.items() if pts}
        for stage, by in points.items()
    }


def _float(v: str | None) -> float | None:
    try:
        return float(v)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
