"""The real Hydra config, composed as run.py composes it (the config tree inside the package)."""

from __future__ import annotations

from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import DictConfig

from baize_exp.config import CONF_DIR, register_configs

ROOT = Path(__file__).resolve().parents[2]
CONF = CONF_DIR


def compose_cfg(overrides: list[str] | None = None) -> DictConfig:
    """Compose the real config (as run.py would) with overrides."""
    register_configs()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name="config", overrides=overrides or [])
