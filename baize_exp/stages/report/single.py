"""One run's report: `report.md` and a self-contained `report.html` beside it, the charts it draws itself in
`<run>/report_plots/` (the eval stage's own charts stay in `eval/` and are referenced from there)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from baize_exp.io import read_json, read_jsonl
from baize_exp.stages.report import charts
from baize_exp.stages.report.human import human_blocks
from baize_exp.stages.report.page import (
    Block,
    Heading,
    Image,
    Markdown,
    Samples,
    Table,
    Text,
    to_html,
    to_markdown,
)
from baize_exp.stages.report.paired import paired_table, read_csv_rows, reliability
from baize_exp.stages.report.runs import fmt, loss_history

PLOTS = "report_plots"
WARNING = "judge cannot discriminate: judge-based results below are not evidence"
MODEL_ORDER = ("base", "v1", "v2")


def _ci(lo: Any, hi: Any) -> str:
    return f"[{fmt(lo)}, {fmt(hi)}]" if charts.finite(lo) or charts.finite(hi) else "-"


def _info(run_dir: Path, metrics: dict) -> list[Block]:
    info = metrics.get("run", {})
    if not info:
        return []
    lines = [f"overrides: `{' '.join(info.get('overrides', [])) or '(none)'}`"]
    if info.get("model") is not None:
        lines.append(f"model: `{info.get('model')}`, LoRA r={info.get('lora_r')}, data: `{info.get('data')}`")
    if info.get("status") not in (None, "running"):  # the report stage itself runs before the final status
        lines.append(f"status: {info['status']}" + (f" ({info['error']})" if info.get("error") else ""))
    return [Text("; ".join(lines))]


def judge_check_blocks(rel: dict, ev: dict) -> list[Block]:
    """The judge check (known-order items: can the judge tell a good answer from a degraded one?), position
    agreement, self-consistency and how the judge's replies were parsed."""
    jc = rel.get("judge_check") or {}
    discriminates = jc.get("discriminates", ev.get("judge_check/discriminates"))
    if not rel and discriminates is None:
        return []
    out: list[Block] = [Heading("Judge check")]
    if discriminates is False:
        out.append(Text(WARNING, warn=True))
    if jc and not jc.get("n"):
        unparsed = f" ({jc['unparsed']} replies unparsable)" if jc.get("unparsed") else ""
        out.append(
            Text(
                f"Known-order check: no check item could be judged{unparsed}, so nothing shows the judge "
                "can tell a good answer from a degraded one."
            )
        )
    elif jc:
        verdict = (
            "the judge tells the good answer from the degraded one more often than chance"
            if discriminates
            else "not better than chance"
        )
        out.append(
            Text(
                f"Known-order check: accuracy **{fmt(jc.get('accuracy'))}** "
                f"{_ci(jc.get('ci_low'), jc.get('ci_high'))} (95% Wilson) on n={jc.get('n')} items, "
                f"chance {fmt(jc.get('chance', 0.5))}: {verdict}."
            )
        )
    if jc.get("n"):
        by = jc.get("by_degradation") or {}
        if by:
            out.append(
                Table(
                    ["degradation", "n", "accuracy", "95% CI"],
                    [
                        [k, str(v.get("n")), fmt(v.get("accuracy")), _ci(v.get("ci_low"), v.get("ci_high"))]
                        for k, v in by.items()
                    ],
                )
            )
    agree = [
        (what, m, v)
        for what, key in (
            ("position agreement (both orders agree)", "position_agreement"),
            ("self-consistency (repeats agree)", "self_consistency"),
        )
        for m, v in (rel.get(key) or {}).items()
    ]
    if agree:
        out.append(
            Table(
                ["measure", "model", "n", "agreement", "95% CI"],
                [
                    [what, m, str(v.get("n")), fmt(v.get("agreement")), _ci(v.get("ci_low"), v.get("ci_high"))]
                    for what, m, v in agree
                ],
            )
        )
    shares = rel.get("parse_shares") or {}
    if shares:
        out += [
            Text("How the judge's replies were parsed (share of judgments):"),
            Table(list(shares), [[f"{100 * v:.0f}%" if charts.finite(v) else fmt(v) for v in shares.values()]]),
        ]
    return out


def score_blocks(run_dir: Path, ev: dict, plots: Path) -> list[Block]:
    """The judge-scores table (category "all"), the eval stage's charts per category, and the win-rate chart."""
    path = run_dir / "eval" / "scores.csv"
    if not path.is_file():
        return []
    rows = read_csv_rows(path)
    total = [r for r in rows if r["category"] == "all"]
    with_note = any(r.get("note") for r in total)
    with_ref = any(f"{r['model']}/ref_loglik" in ev for r in total)
    header = ["model", "mode", "n", "mean", "95% CI", "parse failures", "held-out loss", "held-out ppl"]
    header += ["ref log-lik"] * with_ref + ["note"] * with_note
    cells = []
    for r in total:
        m = r["model"]
        row = [
            m,
            r["mode"],
            str(r["n"]),
            fmt(r["mean"]),
            _ci(r["ci_low"], r["ci_high"]),
            str(r["parse_failures"]),
            fmt(ev.get(f"{m}/heldout_loss")),
            fmt(ev.get(f"{m}/heldout_ppl")),
        ]
        cells.append(row + [fmt(ev.get(f"{m}/ref_loglik"))] * with_ref + [r.get("note") or ""] * with_note)
    out: list[Block] = [
        Heading("Judge scores (95% bootstrap CI; single/reference 1-10, pairwise a win rate)"),
        Table(header, cells),
    ]
    pngs = sorted((run_dir / "eval").glob("scores*.png"), key=lambda p: (p.name != "scores.png", p.name))
    out += [Image(p, f"judge scores per category ({p.stem})") for p in pngs]
    wins = [r for r in total if r["mode"] in ("pairwise", "pairwise_lc")]
    if wins and not any(r["mode"] == "pairwise_lc" for r in wins):  # older runs: the LC rate only in reliability
        for m, v in (reliability(run_dir).get("lc_win_rate") or {}).items():
            wins.append(
                {
                    "model": m,
                    "mode": "pairwise_lc",
                    "n": v.get("n"),
                    "mean": v.get("lc", math.nan),
                    "ci_low": v.get("ci_low", math.nan),
                    "ci_high": v.get("ci_high", math.nan),
                }
            )
    if wins and (png := charts.win_rates(wins, plots / "win_rate.png")):
        out.append(
            Image(
                png,
                "pairwise win rate",
                "raw and length-controlled win rate against the opponent; the dashed line is a tie (0.5)",
            )
        )
    return out


def paired_blocks(rows: list[dict], plots: Path, what: str) -> list[Block]:
    """The paired comparison table and its forest plot."""
    if not rows:
        return []
    header, cells, classes = paired_table(rows)
    out: list[Block] = [
        Heading(f"Paired comparisons ({what})"),
        Text(
            "diff = mean over the same items of (a - b) in the metric's units, 95% paired "
            "bootstrap CI; MDE = the smallest difference this n would detect 80% of the time."
        ),
        Table(header, cells, row_classes=classes),
    ]
    png = charts.forest(rows, plots / "paired_forest.png")
    left = [r for r in rows if not charts.finite(r.get("diff"))]
    if png:
        cap = f"left out (no value): {', '.join(r['comparison'] + ' ' + r['metric'] for r in left)}" if left else ""
        out.append(Image(png, "paired differences", cap))
    return out


def _question_texts(run_dir: Path) -> dict[str, str]:
    """Question text by id from the run's own question file (answers.jsonl does not repeat it)."""
    try:
        from omegaconf import OmegaConf

        from baize_exp.data import load_eval_questions

        cfg = run_dir / ".hydra" / "config.yaml"
        path = OmegaConf.select(OmegaConf.load(cfg), "eval.questions") if cfg.is_file() else None
        return {q["question_id"]: q["question"] for q in load_eval_questions(path)}
    except Exception:  # a moved or deleted question file: the samples show ids only
        return {}


def pick_samples(answers: list[dict], k: int = 3) -> tuple[list[str], list[dict]]:
    """`k` questions spread over the categories (one per category in turn) with every model's answer."""
    models = list(dict.fromkeys(a["model"] for a in answers))
    models = (
        [m for m in MODEL_ORDER if m in models]
        + [m for m in models if m not in MODEL_ORDER + ("teacher",)]
        + [m for m in models if m == "teacher"]
    )
    by_q: dict[str, dict] = {}
    for a in answers:
        it = by_q.setdefault(
            str(a["question_id"]),
            {
                "question_id": str(a["question_id"]),
                "answers": {},
                "category": a.get("category", "?"),
                "question": a.get("question"),
            },
        )
        it["answers"][a["model"]] = a.get("answer")
    cats: dict[str, list[dict]] = {}
    for it in by_q.values():
        cats.setdefault(it["category"], []).append(it)
    picked: list[dict] = []
    while len(picked) < k and any(cats.values()):
        for c in list(cats):
            if cats[c] and len(picked) < k:
                picked.append(cats[c].pop(0))
    return models, picked


def sample_blocks(run_dir: Path, k: int) -> list[Block]:
    path = run_dir / "eval" / "answers.jsonl"
    if k <= 0 or not path.is_file():
        return []
    models, picked = pick_samples(read_jsonl(path), k)
    if not picked:
        return []
    texts = _question_texts(run_dir) if any(not it["question"] for it in picked) else {}
    for it in picked:
        it["question"] = it["question"] or texts.get(it["question_id"])
    return [Heading("Sample answers"), Samples(models, picked)]


def build(run_dir: Path, samples: int = 3) -> tuple[str, list[Block]]:
    """(title, blocks) of one run's report; draws its charts into `<run>/report_plots/`."""
    metrics = read_json(run_dir / "metrics.json") if (run_dir / "metrics.json").is_file() else {}
    ev = metrics.get("eval", {})
    plots = run_dir / PLOTS
    for old in plots.glob("*.png"):  # a chart that no longer applies must not linger beside the new report
        old.unlink()
    blocks: list[Block] = _info(run_dir, metrics)
    blocks += judge_check_blocks(reliability(run_dir), ev)
    blocks += human_blocks(run_dir)  # also refreshes eval/scores.csv and paired.csv with the votes
    blocks += score_blocks(run_dir, ev, plots)
    if (run_dir / "eval" / "paired.csv").is_file():
        blocks += paired_blocks(read_csv_rows(run_dir / "eval" / "paired.csv"), plots, "models of this run")
    if png := charts.loss_curves({run_dir.name: loss_history(run_dir)}, plots / "loss_curves.png"):
        blocks += [Heading("Loss curves"), Image(png, "loss curves")]
    blocks += sample_blocks(run_dir, samples)
    card = run_dir / "collect" / "data_card.md"
    if card.is_file():
        blocks.append(Markdown(card.read_text()))
    for stage in ("collect", "train", "sdf", "eval"):
        if stage in metrics:
            blocks += [
                Heading(stage),
                Table(["metric", "value"], [[k, fmt(v)] for k, v in metrics[stage].items() if not isinstance(v, dict)]),
            ]
    return f"baize_exp run `{run_dir.name}`", blocks


def render(run_dir: Path, samples: int = 3) -> str:
    """The run's report as markdown (charts drawn into `<run>/report_plots/`, referenced relatively)."""
    title, blocks = build(run_dir, samples)
    return to_markdown(title, blocks, run_dir)


def write(run_dir: Path, samples: int = 3) -> tuple[Path, Path]:
    """Write `<run>/report.md` and the self-contained `<run>/report.html`; return both paths."""
    title, blocks = build(run_dir, samples)
    md, page = run_dir / "report.md", run_dir / "report.html"
    md.write_text(to_markdown(title, blocks, run_dir))
    page.write_text(to_html(title, blocks))
    return md, page
