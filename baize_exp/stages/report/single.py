"""One run's report: `report.md` and a self-contained `report.html` beside it, the charts it draws itself in
`<run>/report_plots/` (the eval stage's own charts stay in `eval/` and are referenced from there)."""

from __future__ import annotations

import math
import re
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
from baize_exp.stats import MIN_CHECK_PARSED, NOT_SHOWN_TO_DISCRIMINATE, TOO_FEW_READABLE

PLOTS = "report_plots"
WARNING = f"{NOT_SHOWN_TO_DISCRIMINATE}: judge-based results below are not evidence"
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


def _run_config(run_dir: Path) -> Any:
    """The run's composed config (`.hydra/config.yaml`), None when it is gone."""
    path = run_dir / ".hydra" / "config.yaml"
    if not path.is_file():
        return None
    from omegaconf import OmegaConf

    return OmegaConf.load(path)


def _headline(rows: list[dict], train_format: str | None) -> list[str]:
    """One line per comparison of the held-out loss (in the training format, else the first format scored):
    the difference with its interval, the verdict and the verdict after Holm's adjustment over the table."""
    held = [r for r in rows if r.get("metric") == "heldout_loss"]
    forms = list(dict.fromkeys(r.get("format") or "" for r in held))
    form = train_format if train_format in forms else (forms[0] if forms else None)
    lines = []
    for r in (r for r in held if (r.get("format") or "") == form):
        holm = (
            f"; after Holm's adjustment over the {len(rows)} comparisons: {r['verdict_holm']}"
            if r.get("verdict_holm")
            else ""
        )
        lines.append(
            f"**{r['comparison']}**: held-out loss {fmt(r['diff'])} nats/token "
            f"{_ci(r['ci_low'], r['ci_high'])} (95% CI, paired over n={r['n']} held-out dialogs"
            + (f", {form} format" if form else "")
            + f"; lower is better): **{r['verdict']}**{holm}"
        )
    return lines


def scope_blocks(run_dir: Path, metrics: dict, rows: list[dict]) -> list[Block]:
    """What this run can and cannot show, first: the held-out-loss comparisons with their intervals, and the
    limits of one training run, of the judge and of the teacher's data."""
    ev = metrics.get("eval")
    if not ev:
        return []
    cfg = _run_config(run_dir)
    train_format = cfg.train.format if cfg is not None else None

    def most(metric: str) -> int | None:  # an older run's metrics lack the counts: its paired rows have them
        ns = [r["n"] for r in rows if r.get("metric") == metric and isinstance(r.get("n"), int)]
        return max(ns) if ns else None

    held = ev.get("heldout_dialogs", most("heldout_loss"))
    questions = ev.get("questions", most("ref_loglik"))
    on = " and ".join(
        x
        for x in (
            f"these {held} held-out dialogs" if held is not None else "",
            f"these {questions} eval questions" if questions else "",
        )
        if x
    )
    can = (
        f"whether the models of this run differ{' on ' + on if on else ''}, given this one training run: each "
        "comparison is paired per item, and Holm's adjustment keeps the chance of any false verdict in the table "
        "at or below 5%."
    )
    cannot = [
        "whether another training seed would give the same verdicts: one seed per model, so the seed noise is "
        "unknown (`python -m baize_exp.reproduce` trains 3 seeds per arm and tests across them)"
    ]
    if held is not None and held < 4:
        cannot.insert(0, f"much from the held-out loss: only {held} held-out dialog(s)")
    check = reliability(run_dir).get("judge_check") or {}
    if ev.get("judge_check/discriminates") is False or check.get("discriminates") is False:
        cannot.append(f"anything from the judge's scores ({check.get('status') or NOT_SHOWN_TO_DISCRIMINATE})")
    elif not check:
        cannot.append("whether the judge's scores mean anything (no judge check ran)")
    cannot.append(
        "answer quality beyond the teacher: the held-out loss measures how well a model predicts the teacher's "
        "held-out dialogs"
        + (
            f" (here the {cfg.teacher.serve.model} model served locally)"
            if cfg is not None and cfg.teacher.backend == "local"
            else ""
        )
    )
    out: list[Block] = [Heading("What this run can and cannot show")]
    out += [Text(line) for line in _headline(rows, train_format)]
    out += [Text(f"It can show {can}"), Text("It cannot show " + "; ".join(cannot) + ".")]
    return out


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
    unparsed = (
        f"; {jc['unparsed']} of {jc.get('total', jc['n'] + jc['unparsed'])} replies unreadable"
        if jc.get("unparsed")
        else ""
    )
    if jc and not jc.get("n"):
        out.append(
            Text(
                f"Known-order check: no check item could be judged{unparsed}, so nothing shows the judge "
                "can tell a good answer from a degraded one."
            )
        )
    elif jc:
        if jc.get("status") == TOO_FEW_READABLE:
            verdict = (
                f"{TOO_FEW_READABLE}: fewer than {jc.get('min_parsed', MIN_CHECK_PARSED)} readable items cannot "
                "show much either way, so the judge is not shown to discriminate"
            )
        elif discriminates:
            verdict = "the judge tells the good answer from the degraded one more often than chance"
        else:
            verdict = "not shown to be better than chance (which is not proof that it is blind)"
        clustered = (
            f" at the design-effect n={fmt(jc['n_effective'])} of {jc.get('questions')} questions"
            if "n_effective" in jc
            else ""
        )
        out.append(
            Text(
                f"Known-order check: accuracy **{fmt(jc.get('accuracy'))}** "
                f"{_ci(jc.get('ci_low'), jc.get('ci_high'))} (95% Wilson{clustered}) on n={jc.get('n')} readable "
                f"items{unparsed}, chance {fmt(jc.get('chance', 0.5))}: {verdict}."
            )
        )
    if jc.get("n"):
        by = jc.get("by_degradation") or {}
        if by:
            out.append(
                Table(
                    ["degradation", "n", "unreadable", "accuracy", "95% CI"],
                    [
                        [
                            k,
                            str(v.get("n")),
                            str(v.get("unparsed", "-")),
                            fmt(v.get("accuracy")),
                            _ci(v.get("ci_low"), v.get("ci_high")),
                        ]
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
    if not total:  # no judged answer (eval.use_judge=false): the judge-free measures only
        return likelihood_blocks(ev)
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
        *likelihood_blocks(ev),
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


_LIKELIHOOD_KEY = re.compile(r"^([^/]+)/(heldout_loss|heldout_loss_all|ref_loglik)@(\w+)$")
_LIKELIHOOD_NAMES = {
    "heldout_loss": "held-out loss",
    "heldout_loss_all": "held-out loss, all tokens",
    "ref_loglik": "ref log-lik",
}


def likelihood_blocks(ev: dict) -> list[Block]:
    """The judge-free measures per model in every format they were scored in (`<model>/<metric>@<format>`)."""
    found = [m.groups() for k in ev if (m := _LIKELIHOOD_KEY.match(k)) and m.group(1) != "final"]
    if not found:
        return []
    models = list(dict.fromkeys(m for m, _, _ in found))
    models = [m for m in MODEL_ORDER if m in models] + [m for m in models if m not in MODEL_ORDER]
    cols = sorted(
        {(metric, form) for _, metric, form in found}, key=lambda c: (list(_LIKELIHOOD_NAMES).index(c[0]), c[1])
    )
    header = ["model", *(f"{_LIKELIHOOD_NAMES[metric]} ({form})" for metric, form in cols)]
    return [
        Text(
            "Judge-free measures, every model in every prompt format (held-out losses in nats/token, lower is "
            "better; reference log-likelihood per token, higher is better):"
        ),
        Table(header, [[m, *(fmt(ev.get(f"{m}/{metric}@{form}")) for metric, form in cols)] for m in models]),
    ]


def paired_blocks(rows: list[dict], plots: Path, what: str) -> list[Block]:
    """The paired comparison table and its forest plot."""
    if not rows:
        return []
    header, cells, classes = paired_table(rows)
    seeds = any(r.get("k_a") not in (None, "") for r in rows)
    out: list[Block] = [
        Heading(f"Paired comparisons ({what})"),
        Text(
            "diff = mean over the same items of (a - b) in the metric's units, with its 95% interval: "
            + (
                "over training seeds and items (a mixed model, t with Satterthwaite's degrees of freedom), "
                if seeds
                else "a studentized bootstrap over items (judge scores: with the exact signed-rank test), "
            )
            + "p its test of no difference; verdict (Holm): the verdict after Holm's adjustment over every row "
            "of the table; MDE = the smallest difference this n would detect 80% of the time; format = the "
            "prompt format the measure was scored in (judge rows: the formats the answers were generated in)."
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
    paired_path = run_dir / "eval" / "paired.csv"
    rows = read_csv_rows(paired_path) if paired_path.is_file() else []
    blocks: list[Block] = scope_blocks(run_dir, metrics, rows) + _info(run_dir, metrics)
    blocks += judge_check_blocks(reliability(run_dir), ev)
    blocks += human_blocks(run_dir)  # also refreshes eval/scores.csv and paired.csv with the votes
    blocks += score_blocks(run_dir, ev, plots)
    if paired_path.is_file():
        blocks += paired_blocks(read_csv_rows(paired_path), plots, "models of this run")
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
