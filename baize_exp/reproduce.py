"""The shipped reproduction of Baize's claims at the embedded model's scale: `make reproduce`, or

    python -m baize_exp.reproduce [--out results] [--runs outputs/reproduce] [override ...]

runs six real pipeline runs (`experiment=reproduce`, each its own run dir, resumable like any run: a rerun
skips what is done) and writes `results/` (report.md, report.html, paired.csv, plots):

  main      base → v1 (LoRA r=8, loss on AI turns) → v2 (SDF)      (a) v1 vs base, (b) v2 vs v1
  loss_all  v1 trained with the loss on every token                 (c) loss on AI turns vs all tokens
  r4 r16 r64  v1 at LoRA rank 4, 16, 64 (alpha fixed at 16)         (d) rank 4/16/64 vs 8 (main's v1)
  seed43    main's v1 with another training seed, the same split    the noise floor

Every comparison is paired on the same items (held-out dialogs, eval questions) with a 95% bootstrap interval,
the minimum detectable difference and a verdict; a verdict whose difference is no larger than seed43's is marked
"within seed noise". The other runs share main's collection (the shared store) and its held-out split, so their
held-out dialogs are the same dialogs. Extra overrides go to every run, e.g.
`teacher=openai judge=openai model=7b` for the real reproduction.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import time
from pathlib import Path

from baize_exp.io import read_json
from baize_exp.stages.report import charts
from baize_exp.stages.report.page import Heading, Image, Table, Text, to_html, to_markdown
from baize_exp.stages.report.paired import cross_run_rows, paired_table, read_csv_rows, reliability
from baize_exp.stages.report.single import write as write_run_report
from baize_exp.stats import PAIRED_COLUMNS, write_csv_rows

ABLATION = ["stages=[collect,train,eval,report]", "eval.models=[v1]"]
RUNS: dict[str, list[str]] = {
    "main": [],
    "loss_all": ["train.loss_on=all", *ABLATION],
    "r4": ["lora.r=4", *ABLATION],
    "r16": ["lora.r=16", *ABLATION],
    "r64": ["lora.r=64", *ABLATION],
    # the noise floor: main's v1 again with another training seed (LoRA init, batch order), the same split
    "seed43": ["train.seed=43", "train.split_seed=42", *ABLATION],
}
# (claim, which rows answer it): Baize's claims as this reproduction can test them
CLAIMS = [
    ("(a) LoRA tuning on self-chat dialogs improves the base model", "v1 vs base"),
    ("(b) self-distillation with feedback (SDF) improves v1", "v2 vs v1"),
    ("(c) the loss on the AI's turns only beats the loss on every token", "ai-only vs all-tokens"),
    ("(d) LoRA rank: do 4, 16 or 64 differ from Baize's 8?", "rank"),
]


def run_all(runs_dir: Path, extra: list[str]) -> dict[str, float]:
    """Each run through the real entry point, one after the other; seconds each took (0 when already done)."""
    took = {}
    for name, overrides in RUNS.items():
        cmd = [
            sys.executable,
            "-m",
            "baize_exp",
            "experiment=reproduce",
            f"hydra.run.dir={runs_dir / name}",
            *overrides,
            *extra,
        ]
        print(f"reproduce: {name}: {' '.join(cmd[2:])}", flush=True)
        t0 = time.monotonic()
        rc = subprocess.run(cmd).returncode
        took[name] = time.monotonic() - t0
        if rc != 0:
            raise SystemExit(
                f"reproduce: run {name} failed (exit {rc}); its log is {runs_dir / name / 'run.log'}. "
                f"Rerun the same command: finished stages are kept"
            )
    return took


SEED_CONTROL = "control: training seed 43 vs 42"
WITHIN_NOISE = "within seed noise"


def gather(runs_dir: Path) -> list[dict]:
    """Every comparison row, labelled with the claim it tests, and set against the noise floor: a verdict whose
    difference is no larger than the two training seeds' own difference on that metric is marked "within seed
    noise" (the paired bootstrap sees item noise only; a second seed shows what rerunning training moves)."""
    rows = []
    for r in read_csv_rows(runs_dir / "main" / "eval" / "paired.csv"):
        rows.append({**r, "claim": r["comparison"]})
    pairs = [
        ("ai-only vs all-tokens", "main", "loss_all", "v1 r=8 ai-only", "v1 all-tokens"),
        *[(f"rank {n} vs 8", f"r{n}", "main", f"v1 r={n}", "v1 r=8") for n in (4, 16, 64)],
        (SEED_CONTROL, "seed43", "main", "v1 seed 43", "v1 seed 42"),
    ]
    for claim, a, b, a_label, b_label in pairs:
        got, notes = cross_run_rows([(a_label, runs_dir / a, "v1"), (b_label, runs_dir / b, "v1")], baseline=1)
        for note in notes:
            print(f"reproduce: {note}", flush=True)
        rows += [{**r, "claim": claim} for r in got]
    # the probability-weighted judge score exists for the few replies that stated a score: too few to compare
    rows = [r for r in rows if not r["metric"].endswith("_weighted")]
    floor = {r["metric"]: abs(r["diff"]) for r in rows if r["claim"] == SEED_CONTROL}
    for r in rows:
        r["seed_noise"] = floor.get(r["metric"], float("nan"))
        if r["claim"] != SEED_CONTROL and r["verdict"] in ("better", "worse") and abs(r["diff"]) <= r["seed_noise"]:
            r["note"] = "; ".join(x for x in (r.get("note"), WITHIN_NOISE) if x)
    return rows


def _claim_rows(rows: list[dict], claim: str) -> list[dict]:
    return [r for r in rows if r["claim"] == claim or (claim == "rank" and r["claim"].startswith("rank"))]


def _verdict_line(rows: list[dict], claim: str) -> str:
    """Every verdict that bears on a claim, with its difference and interval."""
    sel = _claim_rows(rows, claim)
    if not sel:
        return "not measured"
    return "; ".join(
        f"{r['comparison']}, {r['metric']}: {r['verdict']} ({r['diff']:+.3g} "
        f"[{r['ci_low']:+.3g}, {r['ci_high']:+.3g}], n={r['n']})" + (f" ({r['note']})" if r.get("note") else "")
        for r in sel
    )


def _reading(rows: list[dict], claim: str, judge_note: bool = True) -> str:
    """What this scale can say about a claim, from the judge-free rows (held-out loss, reference log-likelihood)
    and whether the judge rows are evidence at all."""
    if claim == "rank":  # three comparisons, each its own reading; what the judge is worth, once
        blind = any(r.get("note") and r["metric"].startswith("judge_") for r in _claim_rows(rows, claim))
        return " ".join(
            f"{c}: {_reading(rows, c, judge_note=False)}"
            for c in dict.fromkeys(r["claim"] for r in rows)
            if c.startswith("rank")
        ) + (" The judge's rows are not evidence (it failed its check)." if blind else "")
    sel = _claim_rows(rows, claim)
    free = [r for r in sel if not r["metric"].startswith("judge_")]
    if not free:
        return "no judge-free measurement"

    def effective(r: dict) -> str:
        return WITHIN_NOISE if WITHIN_NOISE in (r.get("note") or "") else r["verdict"]

    by = {
        v: sorted({r["metric"] for r in free if effective(r) == v})
        for v in ("better", "worse", "no detectable difference", WITHIN_NOISE)
    }
    judge_blind = any(r.get("note") for r in sel if r["metric"].startswith("judge_"))
    tail = " The judge's rows are not evidence (it failed its check)." if judge_blind and judge_note else ""
    if by["better"] and by["worse"]:
        return (
            f"mixed: better on {', '.join(by['better'])}, worse on {', '.join(by['worse'])}; the measures "
            f"disagree about what changed." + tail
        )
    if by["better"] or by["worse"]:
        side = "better" if by["better"] else "worse"
        rest = "".join(f"; {v} on {', '.join(by[v])}" for v in ("no detectable difference", WITHIN_NOISE) if by[v])
        return f"{side} on {', '.join(by[side])}{rest}." + tail
    if by[WITHIN_NOISE]:
        return (
            f"not shown: the difference on {', '.join(by[WITHIN_NOISE])} is no larger than a second training "
            f"seed's own"
            + (
                f"; no detectable difference on {', '.join(by['no detectable difference'])}"
                if by["no detectable difference"]
                else ""
            )
            + "."
            + tail
        )
    mde = max(r["mde"] for r in free)
    return (
        f"cannot be shown at this scale: no detectable difference (the largest MDE is {mde:.3g}; a smaller "
        f"true effect would go unseen)." + tail
    )


def _check(run_dir: Path) -> str:
    c = reliability(run_dir).get("judge_check")
    return f"{c['accuracy']:.2f} [{c['ci_low']:.2f}, {c['ci_high']:.2f}] n={c['n']}" if c and c["n"] else "-"


def _stage_minutes(run_dir: Path) -> str:
    """The stages' own seconds from metrics.json (a cached collection counts what copying it took)."""
    m = read_json(run_dir / "metrics.json") if (run_dir / "metrics.json").is_file() else {}
    parts = {s: v["stage_seconds"] for s, v in m.items() if isinstance(v, dict) and "stage_seconds" in v}
    return (
        f"{sum(parts.values()) / 60:.1f} min (" + ", ".join(f"{s} {v / 60:.1f}" for s, v in parts.items()) + ")"
        if parts
        else "-"
    )


def write_results(runs_dir: Path, out: Path, took: dict[str, float]) -> Path:
    """results/: report.md and report.html (the claims, every paired row, the judge check, the forest plot),
    paired.csv, and the main run's own report (main_run.html, self-contained)."""
    out.mkdir(parents=True, exist_ok=True)
    rows = gather(runs_dir)
    write_csv_rows(rows, out / "paired.csv", ["claim", *PAIRED_COLUMNS, "seed_noise"])
    for old in out.glob("*.png"):
        old.unlink()
    main = runs_dir / "main"
    metrics = read_json(main / "metrics.json")
    rel = reliability(main).get("judge_check", {})
    ev, col = metrics.get("eval", {}), metrics.get("collect", {})
    blocks: list = [
        Text(
            f"Six runs of `experiment=reproduce` on the embedded SmolLM2-135M (student, teacher and judge): "
            f"{col.get('seeds', '?')} seeds → {col.get('dialogs', '?')} dialogs after the parser and the quality "
            f"filters; {ev.get('heldout_dialogs', '?')} held out for the paired held-out loss, "
            f"{ev.get('questions', '?')} eval questions. Regenerate with `make reproduce` "
            f"(run dirs under `{runs_dir}`)."
        ),
    ]
    if rel:
        acc = (
            f"The judge check: {rel['correct']:g} of {rel['n']} known-order pairs right, accuracy "
            f"{rel['accuracy']:.2f} [{rel['ci_low']:.2f}, {rel['ci_high']:.2f}] (chance 0.5)."
        )
        blocks.append(
            Text(
                acc
                + (
                    " The judge discriminates."
                    if rel["discriminates"]
                    else " The judge cannot discriminate: its scores below are not evidence either way; "
                    "the judge-free rows (held-out loss, reference log-likelihood) are what this "
                    "scale can show."
                ),
                warn=not rel["discriminates"],
            )
        )
    floor = {r["metric"]: r for r in rows if r["claim"] == SEED_CONTROL}
    blocks += [
        Heading("Verdicts per claim"),
        Table(
            ["claim", "what this scale shows", "verdicts (a − b, paired 95% CI)"],
            [[c, _reading(rows, key), _verdict_line(rows, key)] for c, key in CLAIMS]
            + [
                [
                    "the noise floor: the same v1 with a second training seed",
                    "a rerun of training moves "
                    + ", ".join(f"{m} by {abs(r['diff']):.3g}" for m, r in floor.items() if not m.startswith("judge_"))
                    + " (one seed pair: a rough floor, not an interval)",
                    _verdict_line(rows, SEED_CONTROL),
                ]
            ]
            if floor
            else [],
        ),
    ]
    header, cells, classes = paired_table(rows)
    blocks += [
        Heading("Every comparison"),
        Text(
            "diff = a − b per item (held-out dialog or eval question), mean "
            "over items; MDE = the smallest difference this n and this noise "
            "would detect 80% of the time."
        ),
        Table(header, cells, row_classes=classes),
    ]
    if png := charts.forest(rows, out / "forest.png", "Paired differences (a − b), 95% CI"):
        blocks.append(Image(png, "forest plot of every paired comparison"))
    blocks += [
        Heading("Runs"),
        Table(
            ["run", "overrides", "judge check", "stage time (this machine)", "this invocation"],
            [
                [
                    n,
                    " ".join(o) or "(experiment=reproduce)",
                    _check(runs_dir / n),
                    _stage_minutes(runs_dir / n),
                    f"{took[n] / 60:.1f} min" if n in took else "-",
                ]
                for n, o in RUNS.items()
            ],
        ),
    ]
    (out / "report.md").write_text(to_markdown("Baize's claims at 135M scale", blocks, out))
    (out / "report.html").write_text(to_html("Baize's claims at 135M scale", blocks))
    _, page = write_run_report(main)
    shutil.copy(page, out / "main_run.html")
    return out / "report.md"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m baize_exp.reproduce",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--out", type=Path, default=Path("results"), help="where the results go (default: results/)")
    ap.add_argument("--runs", type=Path, default=Path("outputs/reproduce"), help="the run dirs (default: %(default)s)")
    ap.add_argument("--report-only", action="store_true", help="only rewrite results/ from finished runs")
    ap.add_argument("overrides", nargs="*", help="Hydra overrides for every run, e.g. teacher=openai judge=openai")
    args = ap.parse_args(argv)
    t0 = time.monotonic()
    took = {} if args.report_only else run_all(args.runs, args.overrides)
    md = write_results(args.runs, args.out, took)
    print(md.read_text())
    print(f"reproduce: {md} and {args.out / 'report.html'} written in {(time.monotonic() - t0) / 60:.1f} min")
    return 0


if __name__ == "__main__":
    sys.exit(main())
