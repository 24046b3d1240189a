"""The stage loop: validate, run `cfg.stages` in order, record metrics and completion markers, always clean up.

Each stage is `run(cfg, run_dir, backends) -> metrics` and reads only files. A finished stage leaves
`<stage>/_COMPLETE.json` with a fingerprint of the config that produced it (and of the stages it read from): a
rerun skips it; a rerun with a different config for that stage stops with an error instead of mixing outputs.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from baize_exp.config import ConfigError, cache_dir, to_container, validate
from baize_exp.io import content_hash, file_hash, read_json, write_json

log = logging.getLogger(__name__)

# What each stage's output depends on: config keys (minus knobs that do not change results) and upstream stages.
STAGE_INPUTS: dict[str, tuple[list[str], list[str]]] = {
    "collect": (["data", "collect", "teacher"], []),
    "train": (["model", "lora", "train", "trainer.max_epochs", "trainer.max_steps", "trainer.precision",
               "trainer.accumulate_grad_batches", "trainer.gradient_clip_val"], ["collect"]),
    "sdf": (["sdf", "teacher"], ["train"]),
    "eval": (["eval", "judge"], ["train", "sdf"]),
}
NOT_RESULTS = {"concurrency", "timeout_s", "max_retries", "startup_timeout_s", "port", "host", "max_batch"}


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
    return wandb.init(project=lg.project, entity=lg.entity, group=lg.group, name=name, tags=list(lg.tags) or None,
                      config=to_container(cfg), dir=str(run_dir), mode=mode, reinit="finish_previous")


def _overrides() -> list[str]:
    from hydra.core.hydra_config import HydraConfig

    return list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []


def run_pipeline(cfg: DictConfig) -> dict:
    """Run the configured stages in the run dir; return {stage: metrics}."""
    validate(cfg)
    from baize_exp import collect, evaluate, report, sdf, train
    from baize_exp.chat import Backends

    runners = {"collect": collect.run, "train": train.run, "sdf": sdf.run, "eval": evaluate.run,
               "report": report.run}
    for noisy in ("httpx", "httpx2", "openai", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    run_dir = _run_dir(cfg)
    run_dir.mkdir(parents=True, exist_ok=True)
    overrides = _overrides()
    metrics_path = run_dir / "metrics.json"
    metrics: dict[str, Any] = read_json(metrics_path) if metrics_path.is_file() else {}
    metrics["run"] = {"run_dir": str(run_dir), "overrides": overrides, "model": cfg.model.name,
                      "lora_r": cfg.lora.r, "data": cfg.data.name, "stages": list(cfg.stages)}

    wb = _start_wandb(cfg, run_dir, overrides) if cfg.logger.name == "wandb" else None
    backends = Backends(cfg, run_dir, cache_dir(cfg))
    memo: dict[str, str] = {}
    exit_code = 1
    try:
        for stage in cfg.stages:
            marker = run_dir / stage / "_COMPLETE.json"
            fp = fingerprint(cfg, stage, memo)
            if stage != "report" and marker.is_file():
                done = read_json(marker)
                if done.get("fingerprint") == fp:
                    log.info("stage %s: already complete in %s, skipped", stage, run_dir)
                    continue
                raise ConfigError(f"stage {stage} in {run_dir} was completed with a different config "
                                  f"(fingerprint {done.get('fingerprint')} != {fp}); use a new run dir, or delete "
                                  f"{run_dir / stage} and the stages after it to redo them")
            log.info("stage %s: start", stage)
            t0 = time.monotonic()
            m = runners[stage](cfg, run_dir, backends)
            m["stage_seconds"] = round(time.monotonic() - t0, 2)
            metrics[stage] = m
            write_json(metrics_path, metrics)
            if stage != "report":
                write_json(marker, {"stage": stage, "fingerprint": fp, "finished": time.time(), "metrics": m})
            log.info("stage %s: done in %.1fs", stage, m["stage_seconds"])
            if wb is not None:
                wb.log(_flat(stage, m))
                if stage == "eval":
                    evaluate.log_wandb(wb, run_dir / "eval")
        exit_code = 0
    finally:
        backends.close()
        if wb is not None:
            for k, v in _flat("final", {s: metrics[s] for s in cfg.stages if s in metrics}).items():
                wb.summary[k] = v
            wb.finish(exit_code=exit_code)  # always finished, so one failed run cannot hang a multirun
    return metrics

