"""baize_exp entry point: compose the config with Hydra and run the pipeline's stages.

    python run.py                       # all stages on the embedded SmolLM2-135M, CPU, offline
    python run.py model=tiny            # the same on a random tiny Llama (~1 min)
    python run.py --help                # config groups and options
"""

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from baize_exp.config import register_configs
from baize_exp.errors import exit_on_error
from baize_exp.pipeline import optimized_value, run_pipeline

register_configs()


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> float | None:
    # A user's mistake or a transient stop is one line and an exit status, not a traceback; in a multirun the
    # error goes through so Hydra marks that job failed and the sweep's other jobs still run.
    with exit_on_error("baize_exp", reraise=HydraConfig.get().mode == RunMode.MULTIRUN):
        metrics = run_pipeline(cfg)
        # What a Hydra sweeper (Optuna) optimises; hparams_search configs name it.
        return optimized_value(metrics, cfg.optimized_metric) if cfg.optimized_metric else None


if __name__ == "__main__":
    main()
