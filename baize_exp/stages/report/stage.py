"""The pipeline's report stage: the run's report.md and report.html (see the package docstring)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from baize_exp.config import Config
from baize_exp.human import log_wandb as log_human
from baize_exp.stages.base import Stage
from baize_exp.stages.report.single import write


def run(cfg: Config, run_dir: Path, backends: Any = None) -> dict:
    """The pipeline's report stage."""
    md, page = write(run_dir)
    return {"report": str(md), "report_html": str(page)}


# It only describes: it runs every time and leaves no completion marker.
STAGE = Stage(
    "report",
    run,
    marker=False,
    writes=("report.md", "report.html"),
    may_write=("report_plots/*",),
    log_wandb=lambda wb, d: log_human(wb, d.parent),
)
