"""The cross-run report: a table of runs, charts of the chosen metrics, and paired comparisons of each run's final
model against a baseline run's on the same items."""

from __future__ import annotations

import argparse
from pathlib import Path

from baize_exp.errors import UserError, exit_on_error
from baize_exp.stages.report import charts
from baize_exp.stages.report.human import runs_blocks
from baize_exp.stages.report.page import Block, Heading, Image, Table, Text, to_html, to_markdown
from baize_exp.stages.report.paired import (
    ARM_COLUMNS,
    PAIRED_TEST_COLUMNS,
    Arm,
    arm_rows,
    cross_run_rows,
    judge_discriminates,
    write_csv_rows,
)
from baize_exp.stages.report.runs import (
    RunRecord,
    is_sweep,
    load_runs,
    loss_history,
    run_labels,
    swept_params,
    table_rows,
    write_csv,
)
from baize_exp.stages.report.single import WARNING, paired_blocks
from baize_exp.stats import holm_rows

DEFAULT_METRICS = ["final_heldout_loss", "final_judge"]
# Swept keys whose values are replicates, not settings: runs that differ only in one of them are one arm, and the
# paired comparison is across arms, seeds and items (`paired.arm_rows`), not run against run.
REPLICATE_KEYS = ("train.seed",)


def replicate_groups(records: list[RunRecord]) -> tuple[list[str], list[list[int]]] | None:
    """(the replicate keys swept, runs grouped by every other swept parameter: lists of indices in table order),
    or None when no replicate key is swept, every run is one arm, or no arm has two replicates (nothing to
    group: the runs are compared run against run)."""
    params, _ = swept_params(records)
    keys = [k for k in REPLICATE_KEYS if k in params]
    if not keys:
        return None
    groups: dict[tuple, list[int]] = {}
    for i, r in enumerate(records):
        groups.setdefault(tuple(r.overrides.get(p) for p in params if p not in keys), []).append(i)
    if len(groups) < 2 or all(len(g) < 2 for g in groups.values()):  # one arm (the seeds sweep): run against run
        return None
    return keys, list(groups.values())


def grouped_rows(
    records: list[RunRecord], baseline: int, keys: list[str], groups: list[list[int]]
) -> tuple[list[dict], list[str], str]:
    """Each arm (runs that differ only in a replicate key) against the baseline run's arm, by `paired.arm_rows`,
    Holm-adjusted over the table; (rows, notes, the baseline arm's label)."""
    params, _ = swept_params(records)
    others = [p for p in params if p not in keys]
    firsts = [records[g[0]] for g in groups]  # an arm's label: what its runs share, its seed left out
    arm_labels = run_labels(firsts, others) if others else [r.path.name for r in firsts]
    arms = []
    for label, g in zip(arm_labels, groups, strict=True):
        runs = [
            (" ".join(f"{k}={records[i].overrides.get(k)}" for k in keys), records[i].path, final)
            for i in g
            if records[i].status == "completed" and (final := records[i].values.get("final_model"))
        ]
        arms.append(Arm(label, runs))
    b = next(k for k, g in enumerate(groups) if baseline in g)
    rows: list[dict] = []
    notes: list[str] = []
    for k, arm in enumerate(arms):
        if k == b:
            continue
        if not arm.runs or not arms[b].runs:
            notes.append(f"`{arm.label}`: no completed run with per-item values, not compared")
            continue
        got, why = arm_rows(arm, arms[b])
        rows += got
        notes += why
    return holm_rows(rows), notes, arms[b].label


def plot(records: list[RunRecord], out_dir: Path, metrics: list[str]) -> list[Image]:
    """Loss curves of every run, then each metric against each swept parameter (a sweep) or one point per run
    (runs given by hand). A run without a finite value is left out of that chart and the caption says so; a
    metric no run has draws nothing."""
    params, _ = swept_params(records)
    labels = dict(zip((id(r) for r in records), run_labels(records, params), strict=True))
    images: list[Image] = []
    curves = {labels[id(r)]: loss_history(r.path) for r in records}
    if png := charts.loss_curves(
        {k: v for k, v in curves.items() if v}, out_dir / "loss_curves.png", "Loss curves per run"
    ):
        images.append(Image(png, "loss curves"))
    done = [r for r in records if r.status == "completed"]
    per_param = is_sweep(records, params) and bool(params)
    for metric in metrics:
        have = [r for r in done if charts.finite(r.values.get(metric))]
        missing = [labels[id(r)] for r in done if r not in have]
        cap = f"left out, no value for {metric}: {', '.join(missing)}" if missing else ""
        if not have:
            continue
        ys = [float(r.values[metric]) for r in have]
        cis = [r.values.get(f"{metric}_ci") for r in have] if metric.endswith("_judge") else None
        if per_param:
            for p in params:
                png = charts.metric_vs_param(
                    [r.overrides.get(p, "-") for r in have],
                    ys,
                    cis,
                    p,
                    metric,
                    out_dir / f"{metric}_vs_{charts.safe_name(p)}.png",
                )
                if png:
                    images.append(Image(png, f"{metric} vs {p}", cap))
        elif png := charts.metric_per_run(
            [labels[id(r)] for r in have], ys, cis, metric, out_dir / f"{charts.safe_name(metric)}_per_run.png"
        ):
            images.append(Image(png, f"{metric} per run", cap))
    return images


def resolve_baseline(records: list[RunRecord], labels: list[str], baseline: str | Path | None) -> int:
    """Index of the baseline run: the first by default, else the run whose dir, dir name or label matches."""
    if baseline is None:
        return 0
    want = str(baseline)
    for i, r in enumerate(records):
        if want in (r.path.name, labels[i]) or Path(want).resolve() == r.path.resolve():
            return i
    raise UserError(f"report: --baseline {want} is none of the runs: " + ", ".join(r.path.name for r in records))


def blocks_for(
    records: list[RunRecord], images: list[Image], paired: list[dict], notes: list[str], baseline: str, out_dir: Path
) -> list[Block]:
    header, rows = table_rows(records)
    _, common = swept_params(records)
    blocks: list[Block] = []
    if common:
        blocks.append(Text("Shared by every run: " + ", ".join(f"`{k}={v}`" for k, v in common.items())))
    blind = [r.path.name for r in records if judge_discriminates(r.path) is False]
    if blind:
        blocks.append(Text(f"{WARNING} (runs: {', '.join(blind)})", warn=True))
    blocks.append(
        Table(header, rows, row_classes=[r.status for r in records], row_titles=[r.error or "" for r in records])
    )
    failed = [r for r in records if r.status != "completed"]
    if failed:
        blocks += [
            Heading("Runs that did not complete"),
            *[Text(f"`{r.path}` ({r.status}): {r.error or 'no error recorded'}") for r in failed],
        ]
    blocks.append(Text("Judge scores: mean on 1-10 [95% bootstrap CI] n=judged answers. Losses: held-out dialogs."))
    what = f"each run's final model against `{baseline}`, on the same items"
    blocks += paired_blocks(paired, out_dir, what) or ([Heading(f"Paired comparisons ({what})")] if notes else [])
    blocks += [Text(n) for n in notes]
    if images:
        blocks += [Heading("Charts"), *images]
    return blocks


def compare(
    paths: list[Path], out_dir: Path, metrics: list[str] | None = None, baseline: str | Path | None = None
) -> list[RunRecord]:
    """Write the comparison of the runs under `paths` into `out_dir` (report.md, report.csv, report.html,
    paired.csv, PNG charts); return what was read. `baseline`: the run the others are paired against (a run dir,
    its name or its label; default the first run)."""
    records = load_runs(paths)
    out_dir.mkdir(parents=True, exist_ok=True)
    params, _ = swept_params(records)
    labels = run_labels(records, params)
    base = resolve_baseline(records, labels, baseline)
    images = plot(records, out_dir, metrics or DEFAULT_METRICS)
    finals = [r.values.get("final_model") for r in records]
    grouping = replicate_groups(records) if len(records) > 1 else None
    if grouping:  # replicates of a setting (train.seed): arm against arm, across seeds and items
        paired, notes, base_label = grouped_rows(records, base, *grouping)
        notes.insert(
            0,
            f"Runs that differ only in {', '.join(grouping[0])} are replicates of one arm: each arm "
            "is compared with the baseline's across its seeds and items (seed SD beside each effect).",
        )
        columns = ARM_COLUMNS
    else:
        paired, notes = (
            cross_run_rows([(lab, r.path, f) for lab, r, f in zip(labels, records, finals, strict=True)], base)
            if len(records) > 1
            else ([], [])
        )
        base_label, columns = labels[base], PAIRED_TEST_COLUMNS
    write_csv_rows(paired, out_dir / "paired.csv", columns)
    title = f"Ablation report: {len(records)} runs"
    blocks = blocks_for(records, images, paired, notes, base_label, out_dir)
    blocks += runs_blocks([r.path for r in records])
    (out_dir / "report.md").write_text(to_markdown(title, blocks, out_dir))
    write_csv(records, out_dir / "report.csv")
    (out_dir / "report.html").write_text(to_html(title, blocks))
    return records


def main(argv: list[str] | None = None) -> int:
    """`baize-report`: compare run dirs (or every run of a multirun dir)."""
    from baize_exp.stages import report

    doc = report.__doc__ or ""
    ap = argparse.ArgumentParser(
        prog="baize-report",
        description=doc[doc.find("As a command") :],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("paths", nargs="+", type=Path, help="a multirun dir, or run dirs, or both")
    ap.add_argument("--out", type=Path, help="where to write (default: <path>/report for one path, else ./report)")
    ap.add_argument(
        "--metric",
        action="append",
        dest="metrics",
        help="metric to chart (repeatable); default: final_heldout_loss and final_judge; any column "
        "of the table works, e.g. val_loss, v1_judge",
    )
    ap.add_argument(
        "--baseline",
        help="the run every other run's final model is paired against, item by item "
        "(a run dir or its name; default: the first run of the table)",
    )
    args = ap.parse_args(argv)
    out = args.out or (args.paths[0] / "report" if len(args.paths) == 1 else Path("report"))
    with exit_on_error("baize-report"):
        try:
            records = compare(args.paths, out, args.metrics, args.baseline)
        except FileNotFoundError as e:  # a file a run dir should hold and does not
            raise UserError(f"report: {e}") from e
    print((out / "report.md").read_text())
    failed = sum(r.status != "completed" for r in records)
    print(f"{len(records)} runs ({failed} not completed) -> {out}/report.md, report.csv, report.html, paired.csv")
    return 0
