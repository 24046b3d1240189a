"""The console entry points (`[project.scripts]` in pyproject.toml), all on the config tree shipped in the package:

baize-run     [overrides]   the pipeline (= python run.py = python -m baize_exp)
baize-collect [overrides]   the pipeline with stages=[collect] (its own --help); with --estimate, what the
                            collection would cost (requests, tokens, USD online and batch), nothing sent
baize-plan    [overrides]   the memory plan alone, no pipeline, no run state
baize-serve / baize-report / baize-export / baize-export-dialogs: see their --help
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.errors import ConfigCompositionException, OverrideParseException
from hydra.types import RunMode
from omegaconf import DictConfig, open_dict

from baize_exp.config import CONF_DIR, CONFIG_PATH, composition_error, register_configs, validate
from baize_exp.config_docs import register_help_resolver
from baize_exp.errors import exit_on_error

# The pipeline (torch, transformers, Lightning: ~6 s of imports) is imported once a config has composed, so
# `--help`, `--cfg job` and a config error answer in about a second.

register_configs()
register_help_resolver()  # `${baize_keys:}`: every key in `--help`
_FULL_ERROR = "HYDRA_FULL_ERROR"
_set_full_error = False  # whether we set it (a user's own setting is left alone)


def _composed(prog: str, hydra_main: Callable[[], Any]) -> None:
    """Run a `@hydra.main` entry so that a config that does not compose (a value outside a choice, a wrong type,
    a misspelt key or option) ends as one line and exit 2, like every other user error. Hydra prints those over
    several lines and exits 1 unless HYDRA_FULL_ERROR=1, when it raises them: so that is set until the config has
    composed, and the task function drops it again (`_composed_ok`), leaving Hydra's own report of a failing job."""
    global _set_full_error
    _set_full_error = _FULL_ERROR not in os.environ
    if _set_full_error:
        os.environ[_FULL_ERROR] = "1"
    try:
        with exit_on_error(prog):
            try:
                hydra_main()
            except (ConfigCompositionException, OverrideParseException) as e:
                if not _set_full_error:
                    raise  # the user asked for Hydra's full report
                raise composition_error(e) from None
    finally:
        _composed_ok()


def _composed_ok() -> None:
    global _set_full_error
    if _set_full_error:
        os.environ.pop(_FULL_ERROR, None)
        _set_full_error = False


def run() -> None:
    """`baize-run` / `python run.py` / `python -m baize_exp`: the pipeline."""
    _composed("baize_exp", _run)


def collect() -> None:
    """`baize-collect [overrides]`, or with `--estimate` among them: the cost of the collection those overrides
    describe, printed, with nothing sent and nothing written. Hydra owns the command line (it would refuse the
    flag), so the flag is taken off and the same overrides are composed without a run: no run dir, no `.hydra`
    record (an existing run's stays as it was)."""
    if "--estimate" not in sys.argv[1:]:
        return _composed("baize-collect", _collect)
    with exit_on_error("baize-collect"):
        estimate_collection([a for a in sys.argv[1:] if a != "--estimate"])


def plan() -> None:
    """`baize-plan [overrides]`: the memory plan alone."""
    _composed("baize-plan", _plan)


@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="config")
def _run(cfg: DictConfig) -> float | None:
    _composed_ok()
    # A user's mistake or a transient stop is one line and an exit status, not a traceback; in a multirun the
    # error goes through so Hydra marks that job failed and the sweep's other jobs still run.
    with exit_on_error("baize_exp", reraise=HydraConfig.get().mode == RunMode.MULTIRUN):
        from baize_exp.pipeline import optimized_value, run_pipeline

        metrics = run_pipeline(cfg)
        # What a Hydra sweeper (Optuna) optimises; hparams_search configs name it.
        return optimized_value(metrics, cfg.optimized_metric) if cfg.optimized_metric else None


@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="collect")
def _collect(cfg: DictConfig) -> None:
    _composed_ok()
    with exit_on_error("baize-collect"):
        from baize_exp.pipeline import run_pipeline

        run_pipeline(cfg)


def estimate_collection(overrides: list[str]) -> None:
    """Print what collecting with these overrides would cost (`stages.collect.estimate`)."""
    from hydra import compose, initialize_config_dir

    from baize_exp.stages import collect as collect_stage

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        try:
            cfg = compose(config_name="collect", overrides=overrides, return_hydra_config=True)
        except (ConfigCompositionException, OverrideParseException) as e:
            raise composition_error(e) from None
    with open_dict(cfg):
        cfg.hydra.runtime.cwd = os.getcwd()  # what a run fills in (paths.root_dir refers to it)
    HydraConfig.instance().set_config(cfg)
    run_dir = Path(cfg.hydra.run.dir)  # a real run's dir: collect.shared=false keeps its collection there
    os.environ.update({k: str(v) for k, v in cfg.hydra.job.env_set.items()})  # as a run would (HF offline)
    with open_dict(cfg):
        del cfg["hydra"]
    validate(cfg)
    print("\n".join(collect_stage.estimate(cfg, run_dir).lines()), flush=True)


@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="plan")
def _plan(cfg: DictConfig) -> None:
    _composed_ok()
    from baize_exp.stages import plan as plan_stage

    with exit_on_error("baize-plan"):
        validate(cfg)
        plan_stage.run(cfg, Path(HydraConfig.get().runtime.output_dir))
