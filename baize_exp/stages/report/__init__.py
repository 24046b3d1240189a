"""Stage 5 and the ablation report.

As a stage: the run's `report.md` and a self-contained `report.html` (charts inlined) from `metrics.json` and the
eval stage's files: judge check, judge scores per category with 95% intervals, win rates, paired comparisons with
a forest plot, loss curves, sample answers side by side, the data card. Charts the report draws itself go to
`<run>/report_plots/`. metrics.json itself is written by the pipeline after every stage, so a crash never loses
a finished stage's figures.

As a command, over a multirun dir or several run dirs, reading only the run dirs (no W&B needed):

    baize-report outputs/multirun/lora_rank/2026-11-25_14-00-00
    baize-report outputs/2026-11-25/10-00-00 outputs/2026-11-25/11-00-00 --out cmp/ --baseline 10-00-00

writes `report.md`, `report.csv`, `report.html`, `paired.csv` and PNG charts into `<dir>/report/` (or `--out`):
one row per run, the swept parameters as columns, failed runs listed with their error; loss curves; each chosen
metric against each swept parameter (a sweep) or one point per run (runs given by hand); and each run's final
model paired against the baseline run's on the same questions and held-out dialogs.
"""

from baize_exp.stages.report.cross_runs import compare, main, plot
from baize_exp.stages.report.runs import (
    RunRecord,
    find_run_dirs,
    load_runs,
    loss_history,
    swept_params,
    table_rows,
    write_csv,
)
from baize_exp.stages.report.single import render, write
from baize_exp.stages.report.stage import STAGE, run

__all__ = [
    "STAGE",
    "RunRecord",
    "compare",
    "find_run_dirs",
    "load_runs",
    "loss_history",
    "main",
    "plot",
    "render",
    "run",
    "swept_params",
    "table_rows",
    "write",
    "write_csv",
]
