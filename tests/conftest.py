"""Shared fixtures: the real Hydra config composed from baize_exp/conf/, shrunk for tests; a shared model cache."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

from baize_exp.config import CONF_DIR, register_configs

ROOT = Path(__file__).resolve().parents[1]
CONF = CONF_DIR  # the config tree inside the package


@pytest.fixture(scope="session", autouse=True)
def _env(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Keep every cache off the real home; reuse BAIZE_CACHE when set, so the GGUF is converted once."""
    os.environ.setdefault("BAIZE_CACHE", str(tmp_path_factory.mktemp("baize_cache")))
    home = tmp_path_factory.mktemp("home")
    for var in ("WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR", "MPLCONFIGDIR", "TORCH_EXTENSIONS_DIR"):
        os.environ.setdefault(var, str(home / var.lower()))
    os.environ["WANDB_MODE"] = "offline"
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    register_configs()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """`gpu` tests skip (with the reason shown) where there is no CUDA, whatever `-m` the command line gives."""
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (none here); run on a GPU machine")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def compose_cfg(overrides: list[str] | None = None):
    """Compose the real config (as run.py would) with overrides."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name="config", overrides=overrides or [])


@pytest.fixture
def tiny_cfg(tmp_path: Path):
    return compose_cfg(["model=tiny", "logger=none", f"paths.output_dir={tmp_path}"])


def run_cli(*args: str, cwd: Path = ROOT, env: dict | None = None, timeout: float = 900) -> subprocess.CompletedProcess:
    """Run the real entry point (python run.py ...) as a user would."""
    return subprocess.run(
        [sys.executable, str(ROOT / "run.py"), *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )


@pytest.fixture(scope="session")
def tokenizer():
    """The real SmolLM2 tokenizer (from the embedded GGUF, converted once into the cache)."""
    from baize_exp.models import load_tokenizer

    return load_tokenizer(compose_cfg(["model=tiny"]).model, Path(os.environ["BAIZE_CACHE"]))
