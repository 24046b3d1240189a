"""Stage 5 and the ablation report.

As a stage: the run's `report.md` from `metrics.json` and the eval scores (metrics.json itself is written by the
pipeline after every stage, so a crash never loses a finished stage's figures).

As a command, over a multirun dir or several run dirs, reading only the run dirs (no W&B needed):

    baize-report outputs/multirun/lora_rank/2026-11-25_14-00-00
    baize-report outputs/2026-11-25/10-00-00 outputs/2026-11-25/11-00-00 --out cmp/

writes `report.md`, `report.csv`, `report.html` and PNG plots (loss curves per run, each chosen metric against each
swept parameter) into `<dir>/report/` (or `--out`): one row per run, the swept parameters as columns, failed runs
listed with their error.
"""

from __future__ import annotations

import argparse
import base64
import csv
import html
import math
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from baize_exp.config import NOT_PARAMS, override_dict
from baize_exp.io import read_json
from baize_exp.stages.base import Stage


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return "-" if math.isnan(v) else f"{v:.4g}"
    if isinstance(v, list):
        return "[" + ", ".join(_fmt(x) for x in v) + "]"
    return "-" if v is None else str(v)


def render(run_dir: Path) -> str:
    metrics = read_json(run_dir / "metrics.json") if (run_dir / "metrics.json").is_file() else {}
    info = metrics.get("run", {})
    lines = [f"# baize_exp run `{run_dir.name}`", ""]
    if info:
        lines += [f"- overrides: `{' '.join(info.get('overrides', [])) or '(none)'}`",
                  f"- model: `{info.get('model')}`, LoRA r={info.get('lora_r')}, data: `{info.get('data')}`", ""]
    scores = run_dir / "eval" / "scores.csv"
    if scores.is_file():
        with open(scores, newline="") as f:
            rows = [r for r in csv.DictReader(f) if r["category"] == "all"]
        lines += ["## Judge scores (95% bootstrap CI; single/reference 1-10, pairwise a win rate)", "",
                  "| model | mode | n | mean | 95% CI | parse failures | held-out loss | held-out ppl |",
                  "|---|---|---|---|---|---|---|---|"]
        ev = metrics.get("eval", {})
        for r in rows:
            m = r["model"]
            lines.append(f"| {m} | {r['mode']} | {r['n']} | {float(r['mean']):.2f} | [{float(r['ci_low']):.2f}, "
                         f"{float(r['ci_high']):.2f}] | {r['parse_failures']} | "
                         f"{_fmt(ev.get(f'{m}/heldout_loss', '-'))} | {_fmt(ev.get(f'{m}/heldout_ppl', '-'))} |")
        lines += ["", "![scores per category](eval/scores.png)", ""]
    card = run_dir / "collect" / "data_card.md"
    if card.is_file():
        lines += [card.read_text(), ""]
    for stage in ("collect", "train", "sdf", "eval"):
        if stage not in metrics:
            continue
        lines += [f"## {stage}", "", "| metric | value |", "|---|---|"]
        lines += [f"| {k} | {_fmt(v)} |" for k, v in metrics[stage].items() if not isinstance(v, dict)]
        lines.append("")
    return "\n".join(lines)


def run(cfg: Any, run_dir: Path, backends: Any = None) -> dict:
    """The pipeline's report stage."""
    (run_dir / "report.md").write_text(render(run_dir))
    return {"report": str(run_dir / "report.md")}


# It only describes: it runs every time and leaves no completion marker.
STAGE = Stage("report", run, marker=False, writes=("report.md",))


# ---------------------------------------------------------------------------------------------------------------
# Comparing runs


@dataclass
class RunRecord:
    """What the report knows of one run dir."""

    path: Path
    overrides: dict[str, str]
    metrics: dict[str, Any]
    status: str  # completed | failed | incomplete
    error: str | None = None
    values: dict[str, Any] = field(default_factory=dict)  # the table's metric columns




def _natural_key(p: Path) -> list:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", str(p))]


def find_run_dirs(paths: list[Path]) -> list[Path]:
    """Run dirs under each path: a dir with `metrics.json` or Hydra's `.hydra/` (a job that died before writing
    metrics is still a run to report). Multirun dirs hold one such dir per job."""
    found: list[Path] = []
    for p in paths:
        if not p.is_dir():
            raise FileNotFoundError(f"report: {p} is not a directory")
        if (p / "metrics.json").is_file() or (p / ".hydra").is_dir():
            found.append(p)
            continue
        runs = sorted({m.parent for pat in ("*/metrics.json", "*/.hydra/overrides.yaml", "*/*/metrics.json")
                       for m in p.glob(pat) if "report" not in m.parts},
                      key=_natural_key)
        runs = [r.parent if r.name == ".hydra" else r for r in runs]
        if not runs:
            raise FileNotFoundError(f"report: no run dirs (metrics.json or .hydra/) under {p}")
        found += runs
    return list(dict.fromkeys(found))


def _read_overrides(run_dir: Path, metrics: dict) -> dict[str, str]:
    listed = metrics.get("run", {}).get("overrides")
    if listed is None and (run_dir / ".hydra" / "overrides.yaml").is_file():
        from omegaconf import OmegaConf

        listed = list(OmegaConf.load(run_dir / ".hydra" / "overrides.yaml"))
    return override_dict(listed or [])


def _final_model(ev: dict) -> str | None:
    """The last model of the v1 → v2 chain the run evaluated."""
    for m in ("v2", "v1", "base"):
        if f"{m}/heldout_loss" in ev or f"{m}/judge_mean" in ev:
            return m
    return None


def _metric_values(metrics: dict) -> dict[str, Any]:
    """The table's metric columns from one run's metrics.json (missing ones stay absent)."""
    out: dict[str, Any] = {}
    col, tr, ev, sdf = (metrics.get(s, {}) for s in ("collect", "train", "eval", "sdf"))
    for key, src, name in [("dialogs", col, "dialogs"), ("rejects", col, "rejects"),
                           ("cost_usd", col, "cost_usd"), ("val_loss", tr, "val_loss"),
                           ("val_ppl", tr, "val_ppl"), ("train_tok_s", tr, "tokens_per_s"),
                           ("sup_tok_s", tr, "supervised_tokens_per_s"), ("sdf_parse_failed", sdf, "parse_failed")]:
        if name in src:
            out[key] = src[name]
    final = _final_model(ev)
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
    seconds = [m.get("stage_seconds", 0) for s, m in metrics.items() if s != "run" and isinstance(m, dict)]
    if seconds:
        out["wall_s"] = round(sum(seconds), 1)
    return out


def load_runs(paths: list[Path]) -> list[RunRecord]:
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


def _value_columns(records: list[RunRecord]) -> list[str]:
    order = ["dialogs", "rejects", "cost_usd", "val_loss", "val_ppl", "base_heldout_loss", "v1_heldout_loss",
             "v2_heldout_loss", "base_judge", "v1_judge", "v2_judge", "sdf_parse_failed", "train_tok_s",
             "sup_tok_s", "wall_s"]
    return [c for c in order if any(c in r.values for r in records)]


def _cell(r: RunRecord, col: str) -> str:
    v = r.values.get(col)
    if col.endswith("_judge") and (v is not None or r.values.get(f"{col}_n") is not None):
        if v is None or isinstance(v, float) and math.isnan(v):  # nothing judged (every reply unparsable): say so
            return f"- n={r.values.get(f'{col}_n')}"
        ci = r.values.get(f"{col}_ci")
        ci_s = f" [{_fmt(ci[0])}, {_fmt(ci[1])}]" if ci else ""
        return f"{_fmt(v)}{ci_s} n={r.values.get(f'{col}_n')}"
    return _fmt(v)


def table_rows(records: list[RunRecord]) -> tuple[list[str], list[list[str]]]:
    params, _ = swept_params(records)
    cols = _value_columns(records)
    header = ["run", *params, "status", *cols]
    rows = [[r.path.name, *[r.overrides.get(p, "-") for p in params], r.status, *[_cell(r, c) for c in cols]]
            for r in records]
    return header, rows


def write_csv(records: list[RunRecord], path: Path) -> None:
    """Machine-readable twin of the table: raw numbers, CI bounds in their own columns."""
    params, _ = swept_params(records)
    cols = _value_columns(records)
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


def render_markdown(records: list[RunRecord], plots: list[Path]) -> str:
    header, rows = table_rows(records)
    _, common = swept_params(records)
    lines = [f"# Ablation report: {len(records)} runs", ""]
    if common:
        lines += ["Shared by every run: " + ", ".join(f"`{k}={v}`" for k, v in common.items()), ""]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    failed = [r for r in records if r.status != "completed"]
    if failed:
        lines += ["", "## Runs that did not complete", ""]
        lines += [f"- `{r.path}` ({r.status}): {r.error or 'no error recorded'}" for r in failed]
    lines += ["", "Judge scores: mean on 1-10 [95% bootstrap CI] n=judged answers. Losses: held-out dialogs.", ""]
    lines += [f"![{p.stem}]({p.name})" for p in plots]
    return "\n".join(lines) + "\n"


def render_html(records: list[RunRecord], plots: list[Path]) -> str:
    """One self-contained page (plots inlined), so it can be mailed or attached as is."""
    header, rows = table_rows(records)
    _, common = swept_params(records)
    out = ["<!doctype html><html><head><meta charset='utf-8'><title>baize_exp ablation report</title><style>",
           "body{font-family:sans-serif;margin:2em} table{border-collapse:collapse}",
           "td,th{border:1px solid #ccc;padding:4px 8px;text-align:right} th{background:#f3f3f3}",
           "tr.failed td{background:#fde2e2} tr.incomplete td{background:#fff4d6} img{max-width:48%;margin:4px}",
           "</style></head><body>", f"<h1>Ablation report: {len(records)} runs</h1>"]
    if common:
        out.append("<p>Shared by every run: " + ", ".join(html.escape(f"{k}={v}") for k, v in common.items())
                   + "</p>")
    out.append("<table><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in header) + "</tr>")
    for r, row in zip(records, rows, strict=True):
        cells = "".join(f"<td>{html.escape(c)}</td>" for c in row)
        title = f" title='{html.escape(r.error)}'" if r.error else ""
        out.append(f"<tr class='{r.status}'{title}>{cells}</tr>")
    out.append("</table>")
    failed = [r for r in records if r.status != "completed"]
    if failed:
        out.append("<h2>Runs that did not complete</h2><ul>")
        out += [f"<li><code>{html.escape(str(r.path))}</code> ({r.status}): {html.escape(r.error or '')}</li>"
                for r in failed]
        out.append("</ul>")
    for p in plots:
        data = base64.b64encode(p.read_bytes()).decode()
        out.append(f"<img alt='{html.escape(p.stem)}' src='data:image/png;base64,{data}'>")
    out.append("</body></html>")
    return "\n".join(out)


def loss_history(run_dir: Path) -> dict[str, tuple[list[float], list[float]]]:
    """{series: (steps, losses)} from the CSV logs training writes in the run dir (train and sdf stages)."""
    series: dict[str, tuple[list[float], list[float]]] = {}
    for stage in ("train", "sdf"):
        for path in sorted((run_dir / stage).glob("**/metrics.csv")):
            with open(path, newline="") as f:
                rows = list(csv.DictReader(f))
            for col in ("train/loss", "val/loss"):
                pts = [(float(r["step"]), float(r[col])) for r in rows if r.get(col) not in (None, "")]
                if pts:
                    series[f"{stage} {col}"] = ([s for s, _ in pts], [v for _, v in pts])
    return series


def _as_number(v: str) -> float | None:
    try:
        return float(v)
    except (TypeError, ValueError):
        return None


def plot(records: list[RunRecord], out_dir: Path, metrics: list[str]) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written: list[Path] = []
    params, _ = swept_params(records)
    label = {id(r): " ".join(f"{p}={r.overrides.get(p, '-')}" for p in params) or r.path.name for r in records}

    curves = {id(r): loss_history(r.path) for r in records}
    if any(curves.values()):
        fig, ax = plt.subplots(figsize=(8, 5))
        for r in records:
            for name, (steps, losses) in curves[id(r)].items():
                ax.plot(steps, losses, marker=".", label=f"{label[id(r)]} ({name})")
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("loss")
        ax.set_title("Loss curves per run")
        ax.legend(fontsize=7)
        fig.tight_layout()
        written.append(out_dir / "loss_curves.png")
        fig.savefig(written[-1], dpi=110)
        plt.close(fig)

    done = [r for r in records if r.status == "completed"]
    for metric in metrics:
        have = [r for r in done if r.values.get(metric) is not None]
        if not have:
            continue
        for p in params:
            xs = [r.overrides.get(p, "-") for r in have]
            nums = [_as_number(x) for x in xs]
            numeric = all(n is not None for n in nums)
            cats = sorted(set(xs), key=lambda x: (_as_number(x) is None, _as_number(x) or 0, x))
            fig, ax = plt.subplots(figsize=(6, 4))
            ys = [r.values[metric] for r in have]
            pos = nums if numeric else [cats.index(x) for x in xs]
            ci = [r.values.get(f"{metric}_ci") for r in have] if metric.endswith("_judge") else []
            if ci and all(ci):
                err = [[y - c[0] for y, c in zip(ys, ci, strict=True)], [c[1] - y for y, c in zip(ys, ci, strict=True)]]
                ax.errorbar(pos, ys, yerr=err, fmt="o", capsize=4)
            else:
                ax.plot(pos, ys, "o")
            if numeric and len(set(nums)) > 1 and min(nums) > 0 and max(nums) / min(nums) >= 8:
                ax.set_xscale("log", base=2)  # ranks 4..64, learning rates: even spacing reads better
            if not numeric:
                ax.set_xticks(range(len(cats)), cats)
            ax.set_xlabel(p)
            ax.set_ylabel(metric)
            ax.set_title(f"{metric} vs {p} ({len(have)} runs)")
            fig.tight_layout()
            written.append(out_dir / f"{metric}_vs_{re.sub(r'[^A-Za-z0-9_.-]', '_', p)}.png")
            fig.savefig(written[-1], dpi=110)
            plt.close(fig)
    return written


def compare(paths: list[Path], out_dir: Path, metrics: list[str] | None = None) -> list[RunRecord]:
    """Write the comparison of the runs under `paths` into `out_dir`; return what was read."""
    records = load_runs(paths)
    out_dir.mkdir(parents=True, exist_ok=True)
    plots = plot(records, out_dir, metrics or ["final_heldout_loss", "final_judge"])
    (out_dir / "report.md").write_text(render_markdown(records, plots))
    write_csv(records, out_dir / "report.csv")
    (out_dir / "report.html").write_text(render_html(records, plots))
    return records


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="baize-report", description=__doc__.split("\n\n")[1],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("paths", nargs="+", type=Path, help="a multirun dir, or run dirs, or both")
    ap.add_argument("--out", type=Path, help="where to write (default: <path>/report for one path, else ./report)")
    ap.add_argument("--metric", action="append", dest="metrics",
                    help="metric to plot against each swept parameter (repeatable); default: final_heldout_loss "
                         "and final_judge; any column of the table works, e.g. val_loss, v1_judge")
    args = ap.parse_args(argv)
    out = args.out or (args.paths[0] / "report" if len(args.paths) == 1 else Path("report"))
    try:
        records = compare(args.paths, out, args.metrics)
    except FileNotFoundError as e:
        print(e, file=sys.stderr)
        return 2
    print((out / "report.md").read_text())
    failed = sum(r.status != "completed" for r in records)
    print(f"{len(records)} runs ({failed} not completed) -> {out}/report.md, report.csv, report.html")
    return 0


if __name__ == "__main__":
    sys.exit(main())
