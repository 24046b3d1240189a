"""The stage loop: validate, run `cfg.stages` in order, record metrics and completion markers, always clean up.

Each stage is `run(cfg, run_dir, backends) -> metrics` and reads only files. A finished stage leaves
`<stage>/_COMPLETE.json` with a fingerprint of the config that produced it (and of the stages it read from): a
rerun skips it; a rerun with a different config for that stage stops with an error instead of mixing outputs.
"""

from __future__ import annotations

import copy
import logging
import os
import re
import shutil
import time
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from baize_exp import cpu
from baize_exp.config import ConfigError, cache_dir, to_container, validate
from baize_exp.errors import Interrupted, UserError, resume_command
from baize_exp.io import (
    content_hash,
    file_hash,
    file_lock,
    global_rank,
    read_json,
    write_json,
)

log = logging.getLogger(__name__)

# What each stage's output depends on: config keys (minus knobs that do not change results) and upstream stages.
STAGE_INPUTS: dict[str, tuple[list[str], list[str]]] = {
    "collect": (["data", "collect", "teacher"], []),
    "train": (["model", "lora", "train", "trainer.max_epochs", "trainer.max_steps", "trainer.precision",
               "trainer.accumulate_grad_batches", "trainer.gradient_clip_val"], ["collect"]),
    "sdf": (["sdf", "teacher"], ["train"]),
    "eval": (["eval", "judge"], ["train", "sdf"]),
}
# Cheap stages that only describe (a plan, a report): run again every time, no completion marker.
ALWAYS_RERUN = {"plan", "report"}
NOT_RESULTS = {"shared", "concurrency", "timeout_s", "max_retries", "startup_timeout_s", "port", "host", "max_batch",
               "backoff_base_s", "backoff_max_s", "requests_per_min", "tokens_per_min", "prices", "samples_to_log",
               "stop_after_failures", "max_n", "max_wait_ms", "queue_size", "request_timeout_s"}


def _strip(node: Any) -> Any:
    if isinstance(node, dict):
        return {k: _strip(v) for k, v in node.items() if k not in NOT_RESULTS}
    return node


def _plain(node: Any) -> Any:
    return OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else node


def fingerprint(cfg: DictConfig, stage: str, memo: dict[str, str] | None = None) -> str:
    """Hash of the config keys a stage's output depends on and of its upstream stages' fingerprints."""
    memo = {} if memo is None else memo
    if stage in memo:
        return memo[stage]
    keys, upstream = STAGE_INPUTS.get(stage, ([], []))
    parts: dict[str, Any] = {k: _strip(_plain(OmegaConf.select(cfg, k))) for k in keys}
    for up in upstream:
        if up == "collect" and cfg.train.data:  # fed from another run: depend on that file's content
            parts["collect"] = file_hash(cfg.train.data)
        else:
            parts[up] = fingerprint(cfg, up, memo)
    memo[stage] = content_hash(stage, parts)
    return memo[stage]


def _run_dir(cfg: DictConfig) -> Path:
    from hydra.core.hydra_config import HydraConfig

    if HydraConfig.initialized():
        return Path(HydraConfig.get().runtime.output_dir)
    return Path(cfg.paths.output_dir)


def _flat(prefix: str, m: dict) -> dict[str, float]:
    out = {}
    for k, v in m.items():
        if isinstance(v, bool):
            continue
        if isinstance(v, (int, float)):
            out[f"{prefix}/{k}"] = v
        elif isinstance(v, dict):
            out.update(_flat(f"{prefix}/{k}", v))
    return out


def _start_wandb(cfg: DictConfig, run_dir: Path, overrides: list[str]) -> Any:
    import wandb

    lg = cfg.logger
    mode = os.environ.get("WANDB_MODE") or lg.mode
    name = cfg.run_name or (" ".join(overrides) or "default")[:120]
    sweep = _sweep_name(cfg)
    # Every job of one multirun shares a group, and its overrides become tags and config columns, so the
    # dashboard groups the sweep and compares its runs without any manual bookkeeping.
    group = lg.group or sweep
    tags = list(lg.tags) + ([o.lstrip("+~")[:64] for o in overrides if not NOT_PARAMS.match(o.lstrip("+~"))]
                            if sweep else [])
    config = {**to_container(cfg), "overrides": override_dict(overrides)}
    return wandb.init(project=lg.project, entity=lg.entity, group=group, name=name, tags=tags or None,
                      config=config, dir=str(run_dir), mode=mode, reinit="finish_previous")


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


# Overrides that say where or how a run ran, not what it tested: neither W&B tags nor report columns.
NOT_PARAMS = re.compile(r"^(hydra\.|hydra/|paths\.|logger|run_name=|trainer\.enable_progress_bar=)")


def override_dict(overrides: list[str]) -> dict[str, str]:
    """`['lora.r=8', '+sweep=x']` -> `{'lora.r': '8', 'sweep': 'x'}` (values as typed on the command line)."""
    return dict(o.lstrip("+~").split("=", 1) for o in overrides if "=" in o)


def run_pipeline(cfg: DictConfig) -> dict:
    """Run the configured stages in the run dir; return {stage: metrics}."""
    from baize_exp import collect, evaluate, plan, report, sdf, train
    from baize_exp.chat import Backends

    runners = {"plan": plan.run, "collect": collect.run, "train": train.run, "sdf": sdf.run, "eval": evaluate.run,
               "report": report.run}
    for noisy in ("httpx", "httpx2", "openai", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    run_dir = _run_dir(cfg)
    run_dir.mkdir(parents=True, exist_ok=True)
    if global_rank() != 0:
        return _run_as_worker(cfg, run_dir, runners, Backends)
    memo: dict[str, str] = {}
    try:
        # Everything that can refuse the command is checked before anything in the run dir is written, so a
        # refused rerun leaves a finished run as it was (its metrics.json, and Hydra's record of its config).
        validate(cfg)
        _preflight(cfg)
        for stage in cfg.stages:
            _check_marker(cfg, run_dir, stage, memo)
    except UserError as e:
        if (run_dir / "metrics.json").is_file():
            _restore_hydra_record(run_dir)  # an existing run: left exactly as it was
        else:  # a new run dir (a sweep's job): its record says why it did not run
            _finish_status(run_dir / "metrics.json", {"run": {"run_dir": str(run_dir), "overrides": _overrides(),
                                                              "status": "failed", "error": None}}, e)
        raise
    _keep_hydra_record(run_dir)
    overrides = _overrides()
    metrics_path = run_dir / "metrics.json"
    metrics: dict[str, Any] = read_json(metrics_path) if metrics_path.is_file() else {}
    metrics["run"] = {"run_dir": str(run_dir), "overrides": overrides, "status": "running", "error": None,
                      "model": cfg.model.name, "lora_r": cfg.lora.r, "data": cfg.data.name,
                      "stages": list(cfg.stages)}

    wb = _start_wandb(cfg, run_dir, overrides) if cfg.logger.name == "wandb" else None
    backends = Backends(cfg, run_dir, cache_dir(cfg))
    exit_code = 1
    error: BaseException | None = None
    try:
        for stage in cfg.stages:
            marker = run_dir / stage / "_COMPLETE.json"
            fp = fingerprint(cfg, stage, memo)
            if stage not in ALWAYS_RERUN and marker.is_file():
                log.info("stage %s: already complete in %s, skipped", stage, run_dir)
                continue
            log.info("stage %s: start", stage)
            os.environ[WORKER_STAGE_ENV] = stage  # what a re-launched DDP worker process is to join (see below)
            t0 = time.monotonic()
            cpu.fit_threads(every_s=0)  # the stage's own torch work takes the cores that are free now
            if stage == "collect" and cfg.collect.shared:
                m = _shared_collect(cfg, run_dir, backends)
            else:
                m = runners[stage](cfg, run_dir, backends)
            m["stage_seconds"] = round(time.monotonic() - t0, 2)
            metrics[stage] = m
            write_json(metrics_path, metrics)
            if stage not in ALWAYS_RERUN:
                write_json(marker, {"stage": stage, "fingerprint": fp, "finished": time.time(), "metrics": m})
            log.info("stage %s: done in %.1fs", stage, m["stage_seconds"])
            if wb is not None:
                wb.log(_flat(stage, m))
                if stage == "eval":
                    evaluate.log_wandb(wb, run_dir / "eval")
        exit_code = 0
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
            for k, v in _flat("final", {s: metrics[s] for s in cfg.stages if s in metrics}).items():
                wb.summary[k] = v
            wb.finish(exit_code=exit_code)  # always finished, so one failed run cannot hang a multirun
    return metrics


def _check_marker(cfg: DictConfig, run_dir: Path, stage: str, memo: dict[str, str]) -> None:
    """A finished stage made with another config is refused rather than mixed with this one's outputs."""
    marker = run_dir / stage / "_COMPLETE.json"
    if stage in ALWAYS_RERUN or not marker.is_file():
        return
    fp = fingerprint(cfg, stage, memo)
    done = read_json(marker)
    if done.get("fingerprint") != fp:
        raise ConfigError(f"stage {stage} in {run_dir} was completed with a different config "
                          f"(fingerprint {done.get('fingerprint')} != {fp}); use a new run dir, or delete "
                          f"{run_dir / stage} and the stages after it to redo them")


def _preflight(cfg: DictConfig) -> None:
    """What the config asks of this machine, checked before any work: a GPU trainer needs a GPU; a hub model
    needs a hub or a local path."""
    import torch

    needs_model = any(s in cfg.stages for s in ("train", "sdf", "eval"))
    if any(s in cfg.stages for s in ("train", "sdf")) and cfg.trainer.accelerator in ("gpu", "cuda") \
            and not torch.cuda.is_available():
        raise UserError(f"trainer.accelerator={cfg.trainer.accelerator} (trainer=gpu) but no CUDA GPU is visible "
                        f"here (torch {torch.__version__}); use trainer=cpu on this machine, or run on a GPU machine")
    m = cfg.model
    if needs_model and m.source == "hf" and not m.path and os.environ.get("HF_HUB_OFFLINE") == "1":
        raise UserError(f"model={m.name} needs model.path=<local HF checkpoint dir>: the hub id {m.hub_id!r} "
                        f"cannot be downloaded here (HF_HUB_OFFLINE=1)")


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


def _run_as_worker(cfg: DictConfig, run_dir: Path, runners: dict, backends_cls: Any) -> dict:
    """A rank > 0 process: Lightning's DDP launcher re-runs the entry point for every extra device while rank 0 is
    inside a training stage. The worker joins that one stage and nothing else: rank 0 alone collects, evaluates and
    writes metrics, markers and W&B. Under torchrun/srun (no rank 0 stage to follow) the workers run `train`, so the
    dialogs must exist already (a collect-only run first, or train.data=...)."""
    stage = os.environ.get(WORKER_STAGE_ENV, "train")
    if stage not in ("train", "sdf") or stage not in cfg.stages:
        log.info("rank %d: no training stage to join (%s); nothing to do", global_rank(), stage)
        return {}
    backends = backends_cls(cfg, run_dir, cache_dir(cfg))
    try:
        return {stage: runners[stage](cfg, run_dir, backends)}
    finally:
        backends.close()


def _shared_collect(cfg: DictConfig, run_dir: Path, backends: Any) -> dict:
    """Collect into the content-keyed cache dir, then copy this run's dialogs and rejects into the run.

    The dir is keyed by the collect fingerprint without `data.limit`: the seeds of a larger limit begin with those
    of a smaller one, so growing a corpus (a new run with data.limit=10000 after 1000) asks only for the new seeds,
    and a smaller limit asks for nothing. The lock serialises the jobs of a sweep that start together: the first
    collects, the others find every dialog done (collect resumes by key) and send no request. A filtered copy, not
    a link, so a later growth of the shared collection never changes a finished run's inputs."""
    from baize_exp import collect

    unlimited = copy.deepcopy(cfg)
    unlimited.data.limit = None
    shared = cache_dir(cfg) / "collect" / fingerprint(unlimited, "collect")
    with file_lock(shared / ".lock"):
        m = collect.run(cfg, shared, backends, copy_to=run_dir / "collect")
    return {**m, "shared_dir": str(shared)}


def optimized_value(metrics: dict, name: str) -> float:
    """`stage/key` of a run's metrics, e.g. `train/val_loss` or `eval/v1/judge_mean`; in `eval/final/<key>`, final
    is the last model evaluated (v2, else v1). A missing metric is an error: a sweeper must not optimise a None."""
    stage, _, key = name.partition("/")
    m = metrics.get(stage, {})
    if key.startswith("final/"):
        rest = key.removeprefix("final/")
        key = next((f"{v}/{rest}" for v in ("v2", "v1", "base") if f"{v}/{rest}" in m), key)
    if key not in m:
        raise ConfigError(f"optimized_metric={name!r}: no such metric in this run's metrics.json "
                          f"(stage {stage!r} has: {', '.join(sorted(m)) or 'nothing'})")
    return float(m[key])


def _finish_status(metrics_path: Path, metrics: dict, error: BaseException | None) -> None:
    metrics["run"]["status"] = ("completed" if error is None else "interrupted" if isinstance(error, Interrupted)
                                else "failed")
    metrics["run"]["error"] = None if error is None else f"{type(error).__name__}: {error}"[:2000]
    write_json(metrics_path, metrics)

