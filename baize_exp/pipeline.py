"""The stage loop, and only that: stage order, completion markers, metrics.json, the W&B run's lifetime.

Each stage declares itself (`baize_exp.stages.base.Stage`): `run(cfg, run_dir, backends) -> metrics`, the stages
whose files it reads, the config keys that shape its outputs. A finished stage leaves `<stage>/_COMPLETE.json`
with a fingerprint of those keys and of the upstream stages' fingerprints: a rerun skips it; a rerun with a
different config for that stage is refused (before anything is written) instead of mixing outputs.

W&B (`logger=wandb`; names in `baize_exp.wandb_log`). One run per pipeline run, started here and always finished.
- x axes: a step metric per stage, not one global step. `train/*` and `val/*` are plotted against `train/step`,
  SDF's `sdf/*` against `sdf/step`, collection progress against `collect/progress/elapsed_s`. SDF is a second fit
  starting from v1 with its own optimizer and schedule, so its curves start at its step 0; one global step would
  need train's last step as an offset, which a resumed or `train.data=`-fed run does not reliably know.
- a stage's aggregates (its metrics.json section) go only into the summary as `<stage>/summary/<metric>`, so no
  per-step series (`train/mfu`, `train/tokens_per_s`) gets the stage total as one more point.
- group: `logger.group`, else the multirun's sweep dir, else `run_name`, else the `experiment=` option, else
  "single": every run sits in a group, and the dashboard can group by it without a special case for ungrouped runs.
- each stage's `log_wandb` hook adds its files: tables (eval), artifacts (collect, train, sdf; `logger.artifacts`).
"""

from __future__ import annotations

import functools
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from baize_exp import cpu
from baize_exp.config import NOT_PARAMS, Config, ConfigError, cache_dir, override_dict, to_container, validate
from baize_exp.errors import Interrupted, UserError, resume_command
from baize_exp.io import file_hash, global_rank, read_json, write_json
from baize_exp.serve import Backends
from baize_exp.stages.base import Stage
from baize_exp.wandb_log import define_axes, log_stage_summary

log = logging.getLogger(__name__)


@functools.cache
def stages() -> dict[str, Stage]:
    """The pipeline's stages by name, in pipeline order; `stages=[...]` picks an in-order subset. Imported on first
    use, after `validate`: the stage modules bring torch, transformers and Lightning (~6 s), and a config refused
    for a bad value answers without them."""
    from baize_exp.stages import collect, evaluate, plan, report, sdf, train

    return {s.name: s for s in (plan.STAGE, collect.STAGE, train.STAGE, sdf.STAGE, evaluate.STAGE, report.STAGE)}


def fingerprint(cfg: Config, name: str, memo: dict[str, str] | None = None) -> str:
    """What stage `name`'s outputs depend on: its config part, and its upstream stages' fingerprints (or, for an
    upstream replaced by a file from elsewhere, that file's content hash)."""
    memo = {} if memo is None else memo
    if name not in memo:
        stage = stages()[name]
        external = stage.external(cfg)
        upstream = {up: file_hash(external[up]) if up in external else fingerprint(cfg, up, memo) for up in stage.reads}
        memo[name] = stage.fingerprint(cfg, upstream)
    return memo[name]


def _run_dir(cfg: DictConfig) -> Path:
    from hydra.core.hydra_config import HydraConfig

    if HydraConfig.initialized():
        return Path(HydraConfig.get().runtime.output_dir)
    return Path(cfg.paths.output_dir)


def _start_wandb(cfg: DictConfig, run_dir: Path, overrides: list[str]) -> Any:
    import wandb

    lg = cfg.logger
    mode = os.environ.get("WANDB_MODE") or lg.mode
    name = cfg.run_name or (" ".join(overrides) or "default")[:120]
    sweep = _sweep_name(cfg)
    # A multirun's overrides become tags and config columns, so the dashboard compares its runs without any
    # manual bookkeeping.
    tags = list(lg.tags) + (
        [o.lstrip("+~")[:64] for o in overrides if not NOT_PARAMS.match(o.lstrip("+~"))] if sweep else []
    )
    config = {**to_container(cfg), "overrides": override_dict(overrides)}
    run = wandb.init(
        project=lg.project,
        entity=lg.entity,
        group=wandb_group(cfg, overrides, sweep),
        name=name,
        tags=tags or None,
        config=config,
        dir=str(run_dir),
        mode=mode,
        reinit="finish_previous",
    )
    define_axes(run)
    return run


def wandb_group(cfg: DictConfig, overrides: list[str], sweep: str | None = None) -> str:
    """The run's W&B group: `logger.group`, else the multirun's sweep name, else `run_name`, else the
    `experiment=` option, else "single" (see the module docstring)."""
    return cfg.logger.group or sweep or cfg.run_name or _experiment_choice(overrides) or "single"


def _experiment_choice(overrides: list[str]) -> str | None:
    """The experiment option this run composed (`experiment=smoke` or `+experiment=...`), if any."""
    from hydra.core.hydra_config import HydraConfig

    if HydraConfig.initialized():
        choice = HydraConfig.get().runtime.choices.get("experiment")
        if choice:
            return str(choice)
    return override_dict(overrides).get("experiment")


def _overrides() -> list[str]:
    from hydra.core.hydra_config import HydraConfig

    return list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []


def _sweep_name(cfg: DictConfig) -> str | None:
    """The multirun's sweep dir relative to the output dir (its W&B group), or None for a single run."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized() or HydraConfig.get().mode != RunMode.MULTIRUN:
        return None
    sweep_dir = Path(HydraConfig.get().sweep.dir)
    try:
        return str(sweep_dir.resolve().relative_to(Path(cfg.paths.output_dir).resolve()))
    except ValueError:
        return str(sweep_dir)


def _check_stages(cfg: DictConfig) -> list[Stage]:
    names, by_name = list(cfg.stages), stages()
    order = list(by_name)
    if not names or any(n not in by_name for n in names) or names != [n for n in order if n in names]:
        raise ConfigError(f"invalid config: stages={names!r}: a non-empty list drawn from {order}, in that order")
    return [by_name[n] for n in names]


def run_pipeline(cfg: DictConfig) -> dict:
    """Run the configured stages in the run dir; return {stage: metrics}. Phases: preflight (everything that can
    refuse the command, before anything is written), the stage loop, and the run's fate into metrics.json and W&B
    (always, also after a failure)."""
    for noisy in ("httpx", "httpx2", "openai", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    run_dir = _run_dir(cfg)
    run_dir.mkdir(parents=True, exist_ok=True)
    if global_rank() != 0:
        return _run_as_worker(cfg, run_dir)
    memo: dict[str, str] = {}
    stages = _preflight(cfg, run_dir, memo)
    _keep_hydra_record(run_dir)
    overrides = _overrides()
    metrics_path = run_dir / "metrics.json"
    metrics: dict[str, Any] = read_json(metrics_path) if metrics_path.is_file() else {}
    metrics["run"] = {
        "run_dir": str(run_dir),
        "overrides": overrides,
        "status": "running",
        "error": None,
        "model": cfg.model.name,
        "lora_r": cfg.lora.r,
        "data": cfg.data.name,
        "stages": list(cfg.stages),
    }
    wb = _start_wandb(cfg, run_dir, overrides) if cfg.logger.name == "wandb" else None
    backends = Backends(cfg, run_dir, cache_dir(cfg))
    error: BaseException | None = None
    try:
        for stage in stages:
            _run_stage(cfg, run_dir, stage, backends, metrics, memo, wb)
    except Interrupted as e:  # transient: say how to pick up where it stopped
        error = Interrupted(f"{e}. Nothing finished is lost; resume with: {resume_command(str(run_dir))}")
        raise error from None
    except BaseException as e:
        error = e
        raise
    finally:
        # The run's fate goes into metrics.json, so a sweep report lists a failed run with its error.
        _finish_status(metrics_path, metrics, error)
        backends.close()
        if wb is not None:
            for s in cfg.stages:  # stages skipped as complete (a rerun) get their recorded figures too
                if s in metrics:
                    log_stage_summary(wb, s, metrics[s])
            wb.finish(exit_code=0 if error is None else 1)  # always finished: one failed run cannot hang a multirun
    return metrics


def _preflight(cfg: Config, run_dir: Path, memo: dict[str, str]) -> list[Stage]:
    """The stages to run, once everything that can refuse the command has been checked: the stage list, the config,
    what each stage needs of this machine, and that a finished stage was made with this config. A refused rerun
    leaves a finished run as it was (its metrics.json, and Hydra's record of its config); a refused new run dir (a
    sweep's job) records why it did not run."""
    try:
        validate(cfg)  # first: it needs no stage module (see `stages`)
        todo = _check_stages(cfg)
        for stage in todo:
            if stage.preflight is not None:
                stage.preflight(cfg)  # what the stage needs of this machine (a GPU, a local model path)
            _check_marker(cfg, run_dir, stage, memo)
        return todo
    except UserError as e:
        if (run_dir / "metrics.json").is_file():
            _restore_hydra_record(run_dir)  # an existing run: left exactly as it was
        else:
            _finish_status(
                run_dir / "metrics.json",
                {"run": {"run_dir": str(run_dir), "overrides": _overrides(), "status": "failed", "error": None}},
                e,
            )
        raise


def _run_stage(
    cfg: DictConfig, run_dir: Path, stage: Stage, backends: Any, metrics: dict, memo: dict[str, str], wb: Any
) -> None:
    """One stage: skipped when its completion marker is there; else run, its declared outputs checked, its metrics
    written, its marker written with its fingerprint, its summary (and files) sent to W&B."""
    marker = run_dir / stage.name / "_COMPLETE.json"
    if stage.marker and marker.is_file():
        log.info("stage %s: already complete in %s, skipped", stage.name, run_dir)
        return
    log.info("stage %s: start", stage.name)
    os.environ[WORKER_STAGE_ENV] = stage.name  # what a re-launched DDP worker process is to join
    t0 = time.monotonic()
    cpu.fit_threads(every_s=0)  # the stage's own torch work takes the cores that are free now
    m = stage.run(cfg, run_dir, backends)
    if not m.get("skipped") and (missing := stage.missing(run_dir)):
        raise StageContractError(
            f"stage {stage.name} finished without writing {missing}, which it declares it writes; this is "
            f"a bug in baize_exp (its Stage declaration or its code), please report it"
        )
    m["stage_seconds"] = round(time.monotonic() - t0, 2)
    metrics[stage.name] = m
    write_json(run_dir / "metrics.json", metrics)
    if stage.marker:
        done = {"stage": stage.name, "fingerprint": fingerprint(cfg, stage.name, memo), "finished": time.time()}
        write_json(marker, {**done, "metrics": m})
    log.info("stage %s: done in %.1fs", stage.name, m["stage_seconds"])
    if wb is not None:
        log_stage_summary(wb, stage.name, m)  # summary only: never a point in a per-step series
        if stage.log_wandb is not None:
            stage.log_wandb(wb, run_dir / stage.name)


def _check_marker(cfg: Config, run_dir: Path, stage: Stage, memo: dict[str, str]) -> None:
    """A finished stage made with another config is refused rather than mixed with this one's outputs."""
    marker = run_dir / stage.name / "_COMPLETE.json"
    if not stage.marker or not marker.is_file():
        return
    fp = fingerprint(cfg, stage.name, memo)
    done = read_json(marker)
    if done.get("fingerprint") != fp:
        raise ConfigError(
            f"stage {stage.name} in {run_dir} was completed with a different config "
            f"(fingerprint {done.get('fingerprint')} != {fp}); use a new run dir, or delete "
            f"{run_dir / stage.name} and the stages after it to redo them"
        )


HYDRA_KEPT = ".hydra_accepted"  # Hydra's record of the last command this run dir accepted


def _keep_hydra_record(run_dir: Path) -> None:
    src = run_dir / ".hydra"
    if src.is_dir():
        shutil.rmtree(run_dir / HYDRA_KEPT, ignore_errors=True)
        shutil.copytree(src, run_dir / HYDRA_KEPT)


def _restore_hydra_record(run_dir: Path) -> None:
    """Hydra rewrote `.hydra/` with the refused command before the pipeline ran: put back the accepted one."""
    kept = run_dir / HYDRA_KEPT
    if kept.is_dir():
        shutil.rmtree(run_dir / ".hydra", ignore_errors=True)
        shutil.copytree(kept, run_dir / ".hydra")


WORKER_STAGE_ENV = "BAIZE_PIPELINE_STAGE"
# Files of the run itself, beside the stages' own (Stage.writes / may_write).
RUN_FILES = ("metrics.json", "run.log", ".hydra/*", f"{HYDRA_KEPT}/*", "wandb/*", "serve-*.log")


class StageContractError(RuntimeError):
    """A stage finished without a file it declares it writes: a bug, not something a user caused."""


def _run_as_worker(cfg: Config, run_dir: Path, poll_s: float = 2.0) -> dict:
    """A rank > 0 process. Rank 0 alone collects, judges and writes metrics, markers and W&B; the workers join the
    stages that declare `joins_ddp` (train and sdf fit together, sdf and eval share out generation):

    - Lightning's DDP launcher re-runs the entry point for every extra device while rank 0 is inside a training
      stage (it says which in WORKER_STAGE_ENV): the worker joins that one stage.
    - Under torchrun/srun every rank starts the pipeline: a worker runs each joining stage in order, once rank 0
      has finished the stages it reads (their completion markers), so it trains on rank 0's dialogs and samples
      from rank 0's adapter."""
    named = os.environ.get(WORKER_STAGE_ENV)
    if named:
        known = stages()
        todo = [known[named]] if named in known and known[named].joins_ddp and named in cfg.stages else []
    else:
        todo = [s for s in stages().values() if s.joins_ddp and s.name in cfg.stages]
    if not todo:
        log.info("rank %d: no stage to join (%s); nothing to do", global_rank(), named)
        return {}
    backends = Backends(cfg, run_dir, cache_dir(cfg))
    out = {}
    try:
        for stage in todo:
            if not named:
                _wait_for_upstream(cfg, run_dir, stage, poll_s)
            out[stage.name] = stage.run(cfg, run_dir, backends)
        return out
    finally:
        backends.close()


def _wait_for_upstream(cfg: Config, run_dir: Path, stage: Stage, poll_s: float) -> None:
    """Until rank 0 has completed every stage of this run that `stage` reads (transitively)."""
    needed, frontier = set(), list(stage.reads)
    while frontier:
        up = frontier.pop()
        if up in cfg.stages and up not in stage.external(cfg) and up not in needed:
            needed.add(up)
            frontier += list(stages()[up].reads)
    t0 = time.monotonic()
    while missing := [u for u in needed if not (run_dir / u / "_COMPLETE.json").is_file()]:
        if int(time.monotonic() - t0) % 60 < poll_s:
            log.info("rank %d: stage %s waits for rank 0 to finish %s", global_rank(), stage.name, missing)
        time.sleep(poll_s)


def optimized_value(metrics: dict, name: str) -> float:
    """`stage/key` of a run's metrics, e.g. `train/val_loss` or `eval/final/judge_mean` (the eval stage publishes
    its last model's figures under `final/`). A missing metric is an error: a sweeper must not optimise a None."""
    stage, _, key = name.partition("/")
    m = metrics.get(stage, {})
    if key not in m:
        raise ConfigError(
            f"optimized_metric={name!r}: no such metric in this run's metrics.json "
            f"(stage {stage!r} has: {', '.join(sorted(m)) or 'nothing'})"
        )
    return float(m[key])


def _finish_status(metrics_path: Path, metrics: dict, error: BaseException | None) -> None:
    metrics["run"]["status"] = (
        "completed" if error is None else "interrupted" if isinstance(error, Interrupted) else "failed"
    )
    metrics["run"]["error"] = None if error is None else f"{type(error).__name__}: {error}"[:2000]
    write_json(metrics_path, metrics)
