"""Where a fit logs: a CSV log that survives a resume, and W&B with one step axis per stage."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import torch
from pytorch_lightning.loggers import CSVLogger, WandbLogger
from pytorch_lightning.utilities import rank_zero_only

from baize_exp.wandb_log import step_key


class ResumedCSVLogger(CSVLogger):
    """Lightning's CSV logger deletes metrics.csv when it starts. A fit resumed from a checkpoint at step k keeps
    the rows logged before step k instead, so the loss curve from before a crash is not lost (the steps after k
    are logged again by the resumed fit)."""

    def __init__(self, save_dir: str, keep_before_step: int | None = None):
        super().__init__(save_dir=save_dir, name="logs", version="")
        self._kept: list[dict] = []
        self._kept_keys: list[str] = []
        old = Path(self.log_dir) / "metrics.csv"
        if keep_before_step is not None and old.is_file():
            with open(old, newline="") as f:
                reader = csv.DictReader(f)
                self._kept = [r for r in reader if r.get("step") and int(float(r["step"])) < keep_before_step]
                self._kept_keys = list(reader.fieldnames or [])

    @property
    def experiment(self) -> Any:
        fresh = self._experiment is None
        exp = super().experiment  # creating the writer deletes the old file
        if fresh and self._kept:
            with open(exp.metrics_file_path, "w", newline="") as f:
                writer = csv.DictWriter(f, fieldnames=self._kept_keys)
                writer.writeheader()
                writer.writerows(self._kept)
            exp.metrics_keys = sorted(self._kept_keys)  # new columns are merged into this header
        return exp


def checkpoint_step(path: str | None) -> int | None:
    """The optimizer step a checkpoint was written at: a Lightning file, or the client state in a DeepSpeed
    checkpoint dir (Lightning writes `last.ckpt/` there, with the loop state in its model-states file)."""
    if not path:
        return None
    p = Path(path)
    if p.is_dir():
        states = sorted(p.glob("*/*model_states.pt")) or sorted(p.glob("*model_states.pt"))
        if not states:
            return None
        p = states[0]
    return int(torch.load(p, map_location="cpu", weights_only=False).get("global_step", 0)) if p.is_file() else None


def build_logger(cfg: Any, stage_dir: Path, prefix: str, resumed_step: int | None = None) -> list[Any]:
    """Loggers for a training stage. The CSV log in the stage dir is always written: it is the run's own loss
    history (the multi-run report plots it) and survives without W&B; W&B is added when the pipeline has a run."""
    loggers: list[Any] = [ResumedCSVLogger(str(stage_dir), keep_before_step=resumed_step)]
    if cfg.logger.name == "wandb":
        import wandb

        # The pipeline owns the W&B run; Lightning logs into it (one run per pipeline run).
        if wandb.run is not None:
            loggers.append(StageWandbLogger(wandb.run, prefix.strip("/") or "train"))
    return loggers


class StageWandbLogger(WandbLogger):
    """Lightning's WandbLogger into the pipeline's run, writing the stage's own step axis (`train/step`,
    `sdf/step`; baize_exp.wandb_log) instead of `trainer/global_step`, which SDF's second fit would restart at 0
    inside the same series."""

    def __init__(self, run: Any, stage: str) -> None:
        super().__init__(experiment=run)
        self.stage = stage

    @rank_zero_only
    def log_metrics(self, metrics: Any, step: int | None = None) -> None:
        # Lightning adds `epoch` to every row: one per stage, or the two fits would share a series
        row = {(f"{self.stage}/epoch" if k == "epoch" else k): v for k, v in metrics.items()}
        if step is not None:
            row[step_key(self.stage)] = step
        self.experiment.log(row)
