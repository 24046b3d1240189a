"""Stage 5 — the run's report: `report.md` from `metrics.json` and the eval scores (metrics.json itself is written
by the pipeline after every stage, so a crash never loses a finished stage's figures)."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

from baize_exp.io import read_json


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, list):
        return "[" + ", ".join(_fmt(x) for x in v) + "]"
    return str(v)


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
