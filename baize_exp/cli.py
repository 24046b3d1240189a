"""The console entry points (`[project.scripts]` in pyproject.toml), all on the config tree shipped in the package:

baize-run     [overrides]   the pipeline (= python run.py = python -m baize_exp)
baize-collect [overrides]   the pipeline with stages=[collect] (its own --help)
baize-plan    [overrides]   the memory plan alone, no pipeline, no run state
baize-serve / baize-report / baize-export / baize-export-dialogs: see their --help
"""

from __future__ import annotations

from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from baize_exp.config import CONFIG_PATH, register_configs, validate
from baize_exp.errors import exit_on_error
from baize_exp.pipeline import optimized_value, run_pipeline

register_configs()


@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="config")
def run(cfg: DictConfig) -> float | None:
    # A user's mistake or a transient stop is one line and an exit status, not a traceback; in a multirun the
    # error goes through so Hydra marks that job failed and the sweep's other jobs still run.
    with exit_on_error("baize_exp", reraise=HydraConfig.get().mode == RunMode.MULTIRUN):
        metrics = run_pipeline(cfg)
        # What a Hydra sweeper (Optuna) optimises; hparams_search configs name it.
        return optimized_value(metrics, cfg.optimized_metric) if cfg.optimized_metric else None


@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="collect")
def collect(cfg: DictConfig) -> None:
    with exit_on_error("baize-collect"):
        run_pipeline(cfg)


@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="plan")
def plan(cfg: DictConfig) -> None:
    from baize_exp.stages import plan as plan_stage

    with exit_on_error("baize-plan"):
        validate(cfg)
        plan_stage.run(cfg, Path(HydraConfig.get().runtime.output_dir))
