"""Shared fixtures: the environment every test runs in (a shared model cache, caches off the home dir, no hub),
the real config shrunk for tests, the real tokenizer. Helpers the tests import live in tests/helpers/."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from helpers.config import compose_cfg

from baize_exp.config import register_configs

# Set before any test module is imported: huggingface_hub reads HF_HUB_OFFLINE when it is first imported, and a
# test module importing transformers at collection would otherwise try the (unreachable) hub with retries, ~45 s
# for one missing model.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["WANDB_MODE"] = "offline"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session", autouse=True)
def _env(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Keep every cache off the real home; reuse BAIZE_CACHE when set, so the GGUF is converted once."""
    os.environ.setdefault("BAIZE_CACHE", str(tmp_path_factory.mktemp("baize_cache")))
    home = tmp_path_factory.mktemp("home")
    for var in ("WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR", "MPLCONFIGDIR", "TORCH_EXTENSIONS_DIR"):
        os.environ.setdefault(var, str(home / var.lower()))
    register_configs()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Slow tests first, the longest (`@pytest.mark.slow(seconds=N)`, measured) before the rest, in a stable sort
    so files stay together: under pytest-xdist (worksteal) the long ones start at once and the short ones fill the
    gaps, instead of one worker finishing a 3-minute test alone at the end. `gpu` tests skip (with the reason
    shown) where there is no CUDA, whatever `-m` the command line gives."""
    import torch

    def order(item: pytest.Item) -> tuple[bool, float]:
        slow = item.get_closest_marker("slow")
        return slow is None, -(slow.kwargs.get("seconds", 0) if slow else 0)

    items.sort(key=order)
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (none here); run on a GPU machine")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def tiny_cfg(tmp_path: Path):
    return compose_cfg(["model=tiny", "logger=none", f"paths.output_dir={tmp_path}"])


@pytest.fixture(scope="session")
def tokenizer():
    """The real SmolLM2 tokenizer (from the embedded GGUF, converted once into the cache)."""
    from baize_exp.models import load_tokenizer

    return load_tokenizer(compose_cfg(["model=tiny"]).model, Path(os.environ["BAIZE_CACHE"]))
