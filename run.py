"""baize_exp entry point: compose the config with Hydra and run the pipeline's stages.

    python run.py                       # all stages on the embedded SmolLM2-135M, CPU, offline
    python run.py model=tiny            # the same on a random tiny Llama (~1 min)
    python run.py --help                # config groups and options
"""

import sys

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from baize_exp.chat import ChatError
from baize_exp.config import ConfigError, register_configs
from baize_exp.pipeline import optimized_value, run_pipeline

register_configs()


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> float | None:
    try:
        metrics = run_pipeline(cfg)
    except (ConfigError, ChatError) as e:  # a config or key problem is the user's to fix: the message, not a traceback
        if HydraConfig.get().mode == RunMode.MULTIRUN:
            raise  # Hydra marks this job failed and the sweep's other jobs still run
        print(f"baize_exp: {e}", file=sys.stderr)
        sys.exit(2)
    # What a Hydra sweeper (Optuna) optimises; hparams_search configs name it.
    return optimized_value(metrics, cfg.optimized_metric) if cfg.optimized_metric else None


if __name__ == "__main__":
    main()
