"""The shipped reproduction of Baize's claims at the embedded model's scale: `make reproduce`, or

    python -m baize_exp.reproduce [--out results] [--runs outputs/reproduce] [--seeds 42,43,44] [--ranks 4,16,64]
                                  [--judge-all] [override ...]

runs real pipeline runs of `experiment=reproduce` (each its own run dir, resumable like any run: a rerun skips
what is done), every arm with each training seed of `--seeds` on the same split (`train.split_seed`), and writes
`results/` (report.md, report.html, paired.csv, forest.png, the first main run's own page):

  main_s<seed>      base → v1 (LoRA r=8, alpha 16, loss on AI turns) → v2 (SDF, select=best)   (a), (b)
  random_s<seed>    v2 from the same v1 on the same candidates, one drawn at random           (b): the feedback
  teacher_s<seed>   v2 from the same v1 on the prompts' own teacher answers                   (b): more training
  loss_all_s<seed>  v1 trained with the loss on every token (Baize's recipe)                 (c)
  r<r>_s<seed>      v1 at LoRA rank 4, 16, 64 with alpha = 2r (alpha/r = 2 at every rank)     (d)

The SDF arms train the same steps (`sdf.max_steps`) at the same learning rate from the same v1; the control
runs start from a copy of their main run's collection, v1 and ranked candidates, so nothing is sampled or
ranked twice. Every comparison is paired on the same items (held-out dialogs, eval questions) across the
training seeds of both arms (`stats.seed_paired_test`: the between-seed SD beside each effect), each judge-free
measure in both prompt formats (the Baize transcript and the chat template), with Holm's adjustment over every
row of the report. The judge scores the main runs' answers; `--judge-all` judges the other arms too (worth it
with a judge that passes its check, e.g. `judge=openai`). Extra overrides go to every run, e.g.
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
from baize_exp.stages.report.paired import ARM_COLUMNS, Arm, arm_rows, judge_note, paired_table, reliability
from baize_exp.stages.report.runs import fmt
from baize_exp.stages.report.single import write as write_run_report
from baize_exp.stats import NOT_SHOWN_TO_DISCRIMINATE, holm_rows, split_metric, write_csv_rows

SEEDS = (42, 43, 44)
SPLIT_SEED = 42  # every arm and seed holds out the same dialogs: the items are the same across all runs
RANKS = (4, 16, 64)
CONTROLS = ("random_", "teacher_")  # runs that start from their main run's v1 and candidates
# (claim, its rows' `claim` prefix): Baize's claims as this reproduction can test them
CLAIMS = [
    ("(a) LoRA tuning on self-chat dialogs improves the base model", "(a)"),
    ("(b) self-distillation with feedback (SDF) improves v1, and the teacher's ranking is why", "(b)"),
    (
        "(c) this project's ablation of Baize's recipe: the loss on the AI's turns only, against Baize's own "
        "loss on every token",
        "(c)",
    ),
    ("(d) LoRA rank: do 4, 16 or 64 differ from Baize's 8 (alpha = 2r, so alpha/r = 2 at every rank)?", "(d)"),
]
JUDGE_FREE = ("heldout_loss", "heldout_loss_all", "ref_loglik")


def plan(seeds: list[int], judge_all: bool, ranks: tuple[int, ...] = RANKS) -> dict[str, list[str]]:
    """Every run's overrides, in the order they run (a control after the main run it starts from)."""
    judge = [] if judge_all else ["eval.use_judge=false"]
    ablation = ["stages=[collect,train,eval,report]", "eval.models=[v1]", *judge]
    control = ["stages=[sdf,eval,report]", "eval.models=[v2]", *judge]
    runs: dict[str, list[str]] = {}
    for s in seeds:
        seed = [f"train.seed={s}", f"train.split_seed={SPLIT_SEED}"]
        runs[f"main_s{s}"] = seed
        runs[f"random_s{s}"] = [*seed, "sdf.select=random", *control]
        runs[f"teacher_s{s}"] = [*seed, "sdf.select=teacher", *control]
    for s in seeds:
        seed = [f"train.seed={s}", f"train.split_seed={SPLIT_SEED}"]
        runs[f"loss_all_s{s}"] = [*seed, "train.loss_on=all", *ablation]
        runs.update({f"r{r}_s{s}": [*seed, f"lora.r={r}", f"lora.alpha={2 * r}", *ablation] for r in ranks})
    return runs


def start_from_main(runs_dir: Path, name: str) -> None:
    """A control run's starting point: its main run's collection, v1 and ranked candidates, copied (the stage
    contract is files: the SDF stage takes them as if it had made them, and reuses candidates whose key matches
    the v1 adapter, prompts and settings). Done once; a rerun finds the copy."""
    main, run = runs_dir / f"main_{name.rsplit('_', 1)[1]}", runs_dir / name
    if (run / "train").is_dir():
        return
    run.mkdir(parents=True, exist_ok=True)
    for part in ("collect", "train"):
        shutil.copytree(main / part, run / part)
    (run / "sdf").mkdir(exist_ok=True)
    shutil.copy(main / "sdf" / "candidates.jsonl", run / "sdf" / "candidates.jsonl")


def _finished(run_dir: Path, overrides: list[str]) -> bool:
    """Whether the run completed with exactly these overrides: a rerun of the driver then need not start it (the
    pipeline would skip every stage anyway, after seconds of imports); any other difference starts it, and the
    pipeline decides what to redo or to refuse."""
    path = run_dir / "metrics.json"
    info = read_json(path).get("run", {}) if path.is_file() else {}
    return info.get("status") == "completed" and info.get("overrides") == overrides


def run_all(runs_dir: Path, runs: dict[str, list[str]], extra: list[str]) -> dict[str, float]:
    """Each run through the real entry point, one after the other (a completed one skipped); seconds each took."""
    took = {}
    for name, overrides in runs.items():
        if _finished(runs_dir / name, ["experiment=reproduce", *overrides, *extra]):
            print(f"reproduce: {name}: completed with these overrides, skipped", flush=True)
            continue
        if name.startswith(CONTROLS):
            start_from_main(runs_dir, name)
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


def _arm(runs_dir: Path, label: str, prefix: str, model: str, seeds: list[int]) -> Arm:
    return Arm(label, [(f"seed {s}", runs_dir / f"{prefix}_s{s}", model) for s in seeds])


def gather(runs_dir: Path, seeds: list[int], ranks: tuple[int, ...] = RANKS) -> tuple[list[dict], list[str]]:
    """Every claim's rows (arm against arm across seeds and items), Holm-adjusted as one family; and notes."""
    base = Arm("base", [(f"seed {seeds[0]}", runs_dir / f"main_s{seeds[0]}", "base")], trained=False)
    v1 = _arm(runs_dir, "v1", "main", "v1", seeds)
    v2 = _arm(runs_dir, "v2 (ranked)", "main", "v2", seeds)
    rand = _arm(runs_dir, "v2 random", "random", "v2", seeds)
    teach = _arm(runs_dir, "v1 + teacher answers", "teacher", "v2", seeds)
    pairs = [
        ("(a) v1 vs base", v1, base),
        ("(b) v2 vs v1", v2, v1),
        ("(b) the feedback: ranked vs random", v2, rand),
        ("(b) more training: random vs v1", rand, v1),
        ("(b) more training on teacher data: teacher answers vs v1", teach, v1),
        ("(b) ranked samples vs teacher answers", v2, teach),
        ("(c) ai-only vs all-tokens", v1, _arm(runs_dir, "v1 all-tokens", "loss_all", "v1", seeds)),
        *[(f"(d) rank {r} vs 8", _arm(runs_dir, f"v1 r={r}", f"r{r}", "v1", seeds), v1) for r in ranks],
    ]
    rows: list[dict] = []
    notes: list[str] = []
    for claim, a, b in pairs:
        got, why = arm_rows(a, b, comparison=claim.split(" ", 1)[1])
        rows += [{**r, "claim": claim} for r in got if not r["metric"].endswith("_weighted")]
        notes += why
    return holm_rows(rows), notes


def _label(r: dict) -> str:
    return f"{r['metric']} ({r['format']})" if r.get("format") and " " not in r["format"] else r["metric"]


def _verdict_line(rows: list[dict]) -> str:
    """The verdicts that bear on a claim: every row Holm's adjustment leaves better or worse, with its difference,
    interval and between-seed SDs; where a comparison has none, its held-out loss in the first format as its
    headline; and how many rows show no detectable difference."""
    if not rows:
        return "not measured"

    def one(r: dict) -> str:
        return (
            f"{r['comparison']}, {_label(r)}: {r['verdict_holm']} ({r['diff']:+.3g} [{r['ci_low']:+.3g}, "
            f"{r['ci_high']:+.3g}], seed SD {fmt(r['seed_sd_a'])}/{fmt(r['seed_sd_b'])}, n={r['n']})"
        )

    shown = []
    for comparison in dict.fromkeys(r["comparison"] for r in rows):
        sel = [r for r in rows if r["comparison"] == comparison]
        found = [r for r in sel if r["verdict_holm"] != "no detectable difference"]
        shown += found or [r for r in sel if r["metric"] == "heldout_loss"][:1]
    rest = sum(r["verdict_holm"] == "no detectable difference" and r not in shown for r in rows)
    return "; ".join(one(r) for r in shown) + (f"; the other {rest} rows: no detectable difference" if rest else "")


def _reading(rows: list[dict]) -> str:
    """What this scale can say about one claim, comparison by comparison, from its judge-free rows after Holm's
    adjustment; whether the judge rows are evidence; whether the seed noise was known."""
    parts = []
    for comparison in dict.fromkeys(r["comparison"] for r in rows):
        free = [r for r in rows if r["comparison"] == comparison and split_metric(r["metric"])[0] in JUDGE_FREE]
        by = {v: [_label(r) for r in free if r["verdict_holm"] == v] for v in ("better", "worse")}
        if not free:
            continue
        if by["better"] and by["worse"]:
            said = f"mixed: better on {', '.join(by['better'])}, worse on {', '.join(by['worse'])}"
        elif by["better"] or by["worse"]:
            side = "better" if by["better"] else "worse"
            rest = len(free) - len(by[side])
            said = f"{side} on {', '.join(by[side])}" + (
                f"; no detectable difference on the other {rest}" if rest else ""
            )
        else:
            mde = max(r["mde"] for r in free)
            said = f"no detectable difference on any judge-free measure (largest MDE {mde:.3g})"
        if comparison.startswith("ai-only"):
            neutral = [r for r in free if r["metric"] == "ref_loglik"]
            if neutral:
                said += "; on the measure neither arm trains on (reference log-likelihood): " + ", ".join(
                    f"{r['verdict_holm']} ({r['format']})" for r in neutral
                )
        parts.append(f"{comparison}: {said}.")
    judge = [r for r in rows if r["metric"].startswith("judge_")]
    if judge and any(NOT_SHOWN_TO_DISCRIMINATE in (r.get("note") or "") for r in judge):
        parts.append("The judge's rows are not evidence (it was not shown to discriminate).")
    if any(not r.get("seed_noise_known", True) for r in rows):
        parts.append("Some rows could not include the seed noise (one seed in an arm): read them as item noise only.")
    return " ".join(parts) or "no judge-free measurement"


def _check(run_dir: Path) -> str:
    c = reliability(run_dir).get("judge_check")
    if not c:
        return "-"
    status = c.get("status", "discriminates" if c.get("discriminates") else NOT_SHOWN_TO_DISCRIMINATE)
    acc = f"{c['accuracy']:.2f} [{c['ci_low']:.2f}, {c['ci_high']:.2f}] " if c["n"] else ""
    return f"{acc}n={c['n']} of {c.get('total', c['n'])}: {status}"


def _stage_parts(run_dir: Path) -> dict[str, float]:
    """The stages' own seconds from metrics.json (a cached collection counts what copying it took)."""
    m = read_json(run_dir / "metrics.json") if (run_dir / "metrics.json").is_file() else {}
    return {s: v["stage_seconds"] for s, v in m.items() if isinstance(v, dict) and "stage_seconds" in v}


def _stage_minutes(parts: dict[str, float]) -> str:
    return (
        f"{sum(parts.values()) / 60:.1f} min (" + ", ".join(f"{s} {v / 60:.1f}" for s, v in parts.items()) + ")"
        if parts
        else "-"
    )


def _sdf_steps(runs_dir: Path, runs: dict[str, list[str]]) -> str:
    """The SDF arms' optimizer steps and examples per run (they must match for the controls to mean anything)."""
    out = []
    for name in runs:
        m = read_json(runs_dir / name / "metrics.json") if (runs_dir / name / "metrics.json").is_file() else {}
        sdf = m.get("sdf", {})
        if "steps" in sdf:
            out.append(f"{name}: {sdf['select']} {sdf['steps']} steps on {sdf['selected_examples']} examples")
    return "; ".join(out)


def write_results(
    runs_dir: Path,
    out: Path,
    seeds: list[int],
    runs: dict[str, list[str]],
    ranks: tuple[int, ...] = RANKS,
) -> Path:
    """results/: report.md and report.html (what this can and cannot show, the claims, every row, the judge
    check, the forest plot, the runs), paired.csv, and the first main run's own report (main_run.html). Written
    from the run dirs alone, so `--report-only` rewrites them byte for byte."""
    out.mkdir(parents=True, exist_ok=True)
    rows, notes = gather(runs_dir, seeds, ranks)
    write_csv_rows(rows, out / "paired.csv", ["claim", *ARM_COLUMNS])
    for old in out.glob("*.png"):
        old.unlink()
    main = runs_dir / f"main_s{seeds[0]}"
    metrics = read_json(main / "metrics.json")
    rel = reliability(main).get("judge_check", {})
    ev, col = metrics.get("eval", {}), metrics.get("collect", {})
    blocks: list = [
        Text(
            f"Runs of `experiment=reproduce` on the embedded SmolLM2-135M (student, teacher and judge), every arm "
            f"trained with {len(seeds)} seeds ({', '.join(map(str, seeds))}) on one split: {col.get('seeds', '?')} "
            f"seeds → {col.get('dialogs', '?')} dialogs after the parser and the quality filters; "
            f"{ev.get('heldout_dialogs', '?')} held out for the paired held-out losses, {ev.get('questions', '?')} "
            f"eval questions. Regenerate with `make reproduce` (run dirs under `{runs_dir}`)."
        ),
        Text(
            f"What this can show: whether two arms differ on these held-out dialogs and eval questions beyond what "
            f"another of {len(seeds)} training seeds moves (each row's interval counts the seeds and the items; "
            f"Holm's adjustment over all {len(rows)} rows). What it cannot show: chat quality (the 135M judge "
            f"is not evidence unless its check passes), SDF with a capable ranker, or behaviour at 7B-30B; and "
            f"the held-out loss measures how well a model predicts the 135M teacher's dialogs, not better answers."
        ),
    ]
    if rel:
        note = judge_note(main)
        blocks.append(
            Text(
                f"The judge check: {rel['correct']:g} of {rel['n']} readable known-order pairs right "
                f"({rel.get('unparsed', 0)} unreadable), accuracy {rel['accuracy']:.2f} "
                f"[{rel['ci_low']:.2f}, {rel['ci_high']:.2f}] (chance 0.5, clustered by question). "
                + (
                    "The judge discriminates."
                    if rel["discriminates"]
                    else f"{note[0].upper() + note[1:]}: its scores below are not evidence either way; the "
                    "judge-free rows (held-out losses, reference log-likelihood) are what this scale can show."
                ),
                warn=not rel["discriminates"],
            )
        )
    by_claim = {c: [r for r in rows if r["claim"].startswith(key)] for c, key in CLAIMS}
    blocks += [
        Heading("Verdicts per claim"),
        Table(
            ["claim", "what this scale shows (judge-free rows, after Holm)", "verdicts (a − b [95% CI], seed SD a/b)"],
            [[c, _reading(sel), _verdict_line(sel)] for c, sel in by_claim.items()],
        ),
    ]
    header, cells, classes = paired_table(rows)
    blocks += [
        Heading("Every comparison"),
        Text(
            "diff = a − b per item (held-out dialog or eval question), the mean over items and training seeds; "
            "95% interval and p from a seeds × items mixed model (t with Satterthwaite's degrees of freedom); "
            "seed SD = the SD over an arm's seeds of its mean; verdict (Holm) = after Holm's adjustment over every "
            "row; format = the prompt format a measure was scored in (both models in the same one)."
        ),
        Table(header, cells, row_classes=classes),
        *[Text(n) for n in notes],
    ]
    if png := charts.forest(rows, out / "forest.png", "Paired differences (a − b) over seeds and items, 95% CI"):
        blocks.append(Image(png, "forest plot of every paired comparison"))
    steps = _sdf_steps(runs_dir, runs)
    parts = {n: _stage_parts(runs_dir / n) for n in runs}
    blocks += [
        Heading("Runs"),
        *([Text(f"SDF arms: {steps}.")] if steps else []),
        Table(
            ["run", "overrides", "judge check", "stage time (this machine)"],
            [
                [n, " ".join(o) or "(experiment=reproduce)", _check(runs_dir / n), _stage_minutes(parts[n])]
                for n, o in runs.items()
            ],
        ),
        Text(f"Stage time of all runs: {sum(sum(p.values()) for p in parts.values()) / 60:.1f} min."),
    ]
    (out / "report.md").write_text(to_markdown("Baize's claims at 135M scale", blocks, out))
    (out / "report.html").write_text(to_html("Baize's claims at 135M scale", blocks))
    _, page = write_run_report(main)
    shutil.copy(page, out / "main_run.html")
    return out / "report.md"


def _ints(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x]
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"{text!r}: comma-separated integers, e.g. 42,43,44") from e


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m baize_exp.reproduce",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--out", type=Path, default=Path("results"), help="where the results go (default: results/)")
    ap.add_argument("--runs", type=Path, default=Path("outputs/reproduce"), help="the run dirs (default: %(default)s)")
    ap.add_argument(
        "--seeds",
        type=_ints,
        default=list(SEEDS),
        help=f"training seeds per arm, comma-separated (default: {','.join(map(str, SEEDS))})",
    )
    ap.add_argument(
        "--ranks",
        type=_ints,
        default=list(RANKS),
        help=f"LoRA ranks compared with 8, comma-separated (default: {','.join(map(str, RANKS))})",
    )
    ap.add_argument("--judge-all", action="store_true", help="judge every arm's answers, not only the main runs'")
    ap.add_argument("--report-only", action="store_true", help="only rewrite results/ from finished runs")
    ap.add_argument("overrides", nargs="*", help="Hydra overrides for every run, e.g. teacher=openai judge=openai")
    args = ap.parse_args(argv)
    if len(args.seeds) < 2:
        ap.error("--seeds: at least 2 training seeds per arm (3 or more to see the seed noise)")
    t0 = time.monotonic()
    runs = plan(args.seeds, args.judge_all, args.ranks)
    took = {} if args.report_only else run_all(args.runs, runs, args.overrides)
    md = write_results(args.runs, args.out, args.seeds, runs, args.ranks)
    print(md.read_text())
    for name, seconds in took.items():  # this invocation's wall times: the console's, not results/'s
        print(f"reproduce: {name} took {seconds / 60:.1f} min", flush=True)
    print(f"reproduce: {md} and {args.out / 'report.html'} written in {(time.monotonic() - t0) / 60:.1f} min")
    return 0


if __name__ == "__main__":
    sys.exit(main())
