"""W&B names the pipeline and the stages share: each stage's step axis, the stage summaries, the artifacts.

The naming, in one place (the pipeline's docstring says why):

- per-step series, each against its own stage's step (`define_metric`, see `STEP_AXES`):
  `collect/progress/*` against `collect/progress/elapsed_s` (seconds into the collection), `train/*` and `val/*`
  against `train/step`, `sdf/*` (SDF's `sdf/train/*`, `sdf/val/*`) against `sdf/step`; Lightning's `epoch` is
  renamed `train/epoch` / `sdf/epoch` so the two fits never share a series;
- a stage's aggregates (its metrics.json section) go only into the run summary, as `<stage>/summary/<metric>`:
  never a history point, so no chart mixes them into a per-step series;
- artifacts (with `logger.artifacts`): `collect-dialogs` (type `dataset`: dialogs.jsonl, rejects.jsonl,
  data_card.json), `train-adapter` and `sdf-adapter` (type `model`: the adapter folder).

wandb is imported only where a run exists: this module is imported by stages that run without W&B too.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

# step metric -> the key patterns plotted against it
STEP_AXES: dict[str, tuple[str, ...]] = {
    "collect/progress/elapsed_s": ("collect/progress/*",),
    "train/step": ("train/*", "val/*"),
    "sdf/step": ("sdf/*",),
}
SUMMARY = "summary"  # <stage>/summary/<metric>: stage aggregates, summary only


def define_axes(run: Any) -> None:
    """Declare every stage's step axis on the run, once, before anything is logged."""
    for step, patterns in STEP_AXES.items():
        # the step key itself first: an explicit definition is not taken by its own stage's glob
        run.define_metric(step)
        for pattern in patterns:
            # step_sync: a row holding a series but not its step (a table logged between steps) gets the last step
            run.define_metric(pattern, step_metric=step, step_sync=True)


def step_key(stage: str) -> str:
    """The step metric a training stage (`train` or `sdf`) logs with every row."""
    return f"{stage}/step"


def flatten(prefix: str, m: dict) -> dict[str, float]:
    """`{"a": {"b": 1}, "s": "x", "ok": True}` -> `{"<prefix>/a/b": 1}`: numbers only (strings and flags are in
    metrics.json, and W&B summaries that change type between runs break the runs table's columns)."""
    out: dict[str, float] = {}
    for k, v in m.items():
        if isinstance(v, bool):
            continue
        if isinstance(v, (int, float)):
            out[f"{prefix}/{k}"] = v
        elif isinstance(v, dict):
            out.update(flatten(f"{prefix}/{k}", v))
    return out


def log_stage_summary(run: Any, stage: str, metrics: dict) -> None:
    """A stage's aggregates into the run summary (`<stage>/summary/...`), never into the history."""
    run.summary.update(flatten(f"{stage}/{SUMMARY}", metrics))


def artifacts_enabled(run: Any) -> bool:
    """`logger.artifacts` as the pipeline logged it into the run's config (a run without our config: True)."""
    logger = run.config.get("logger") or {}
    return bool(logger.get("artifacts", True)) if isinstance(logger, dict) else True


def log_files_artifact(run: Any, name: str, kind: str, paths: Iterable[Path], metadata: dict | None = None) -> bool:
    """Log files or folders as one artifact; True if one was logged.

    Offline, the artifact is a *reference* (`file://` entries with each file's digest and size): the manifest lands
    in the run's .wandb file and nothing is copied into W&B's staging dir, so a 100k-dialog collection or a 13B
    adapter costs no second copy on disk; `wandb sync` later uploads the manifest, which still points at this
    machine's files. Online, the files are uploaded. Skipped when `logger.artifacts` is false or nothing exists."""
    if run.disabled or not artifacts_enabled(run):  # disabled: add_dir would still stage a copy of the files
        return False
    present = [p for p in paths if p.exists()]
    if not present:
        return False
    import wandb

    art = wandb.Artifact(name, type=kind, metadata=_jsonable(metadata or {}))
    for p in present:
        if run.offline:
            art.add_reference(p.resolve().as_uri(), name=None if p.is_dir() else p.name)
        elif p.is_dir():
            art.add_dir(str(p))
        else:
            art.add_file(str(p))
    run.log_artifact(art)
    return True


def log_adapter(run: Any, stage_dir: Path, stage: str) -> bool:
    """`<stage_dir>/adapter` as a `model` artifact `<stage>-adapter`, its LoRA settings and the stage's numeric
    metrics as metadata."""
    adapter = stage_dir / "adapter"
    meta: dict[str, Any] = {"stage": stage}
    cfg_file = adapter / "adapter_config.json"
    if cfg_file.is_file():
        ac = json.loads(cfg_file.read_text())
        meta["lora"] = {
            k: ac.get(k)
            for k in ("peft_type", "r", "lora_alpha", "lora_dropout", "target_modules", "base_model_name_or_path")
        }
    meta["metrics"] = _stage_metrics(stage_dir)
    return log_files_artifact(run, f"{stage}-adapter", "model", [adapter], meta)


def log_dialogs(run: Any, stage_dir: Path) -> bool:
    """The collection as a `dataset` artifact `collect-dialogs`: dialogs, rejects and the data card."""
    meta: dict[str, Any] = {"stage": "collect", "metrics": _stage_metrics(stage_dir)}
    files = [stage_dir / f for f in ("dialogs.jsonl", "rejects.jsonl", "data_card.json")]
    return log_files_artifact(run, "collect-dialogs", "dataset", files, meta)


def _stage_metrics(stage_dir: Path) -> dict[str, float]:
    """The numbers of the stage's completion marker (what the pipeline recorded for this run of the stage)."""
    marker = stage_dir / "_COMPLETE.json"
    if not marker.is_file():
        return {}
    m = json.loads(marker.read_text()).get("metrics") or {}
    return {k.removeprefix("m/"): v for k, v in flatten("m", m).items()}


def _jsonable(x: Any) -> Any:
    return json.loads(json.dumps(x, default=str))
