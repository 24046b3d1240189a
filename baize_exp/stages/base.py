"""What every stage declares about itself, and the helpers stages share (no stage imports another stage).

A stage module defines `STAGE = Stage(...)`: its name, its `run(cfg, run_dir, backends) -> metrics`, the stages
whose files it reads, the config keys that shape its outputs (its fingerprint) and the key names under them that
do not, the files it writes, and its hooks. The pipeline (`baize_exp.pipeline`) reads only these declarations.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from baize_exp.config import Config
from baize_exp.io import content_hash

# Keys of a chat backend block (teacher, judge) that change how fast or how persistently it is asked, or where it
# is served from, never what it answers: a finished stage is not redone for them.
BACKEND_KNOBS = frozenset(
    {
        "concurrency",
        "timeout_s",
        "max_retries",
        "backoff_base_s",
        "backoff_max_s",
        "requests_per_min",
        "tokens_per_min",
        "stop_after_failures",
        "prices",
        "port",
        "host",
        "max_batch",
        "max_wait_ms",
        "queue_size",
        "request_timeout_s",
        "startup_timeout_s",
        "max_n",
        # the Batch API and the budget change how the same requests are bought, not what they answer
        "batch",
        "batch_max_requests",
        "batch_max_bytes",
        "batch_poll_s",
        "batch_poll_max_s",
        "batch_discount",
        "max_cost_usd",
    }
)


@dataclass(frozen=True)
class Stage:
    """A stage as the pipeline sees it (see the module docstring)."""

    name: str
    run: Callable[[Config, Path, Any], dict]  # cfg: the validated config (a DictConfig of this shape)
    reads: tuple[str, ...] = ()  # upstream stages whose files it reads
    shapes: tuple[str, ...] = ()  # config keys (dotted) whose values shape its outputs
    ignores: frozenset[str] = frozenset()  # key names under `shapes` that do not (anywhere in those subtrees)
    # What a finished run of it leaves, as globs relative to the run dir (`*` crosses folders): `writes` must each
    # match a file (the pipeline checks after the stage), `may_write` may (outputs of some settings only). Nothing
    # else appears (tests/test_pipeline.py checks a whole run).
    writes: tuple[str, ...] = ()
    may_write: tuple[str, ...] = ()
    marker: bool = True  # False: it only describes (plan, report): run every time, no completion marker
    # files from outside the run dir that stand in for an upstream stage: {upstream: path} for this config
    external: Callable[[Config], dict[str, str]] = field(default=lambda cfg: {})
    preflight: Callable[[Config], None] | None = None  # what it needs of this machine, checked before any work
    log_wandb: Callable[[Any, Path], None] | None = None  # extra W&B logging, given the run and its stage dir
    joins_ddp: bool = False  # a DDP worker that Lightning re-launches during this stage joins it

    def config_part(self, cfg: Config) -> dict[str, Any]:
        """The config values that shape this stage's outputs, minus `ignores`."""
        return {k: _strip(_plain(OmegaConf.select(cfg, k)), self.ignores) for k in self.shapes}

    def fingerprint(self, cfg: Config, upstream: dict[str, str]) -> str:
        """Hash of what this stage's outputs depend on: its config part and its upstream stages' fingerprints."""
        return content_hash(self.name, {**self.config_part(cfg), **upstream})

    def missing(self, run_dir: Path) -> list[str]:
        """The `writes` patterns no file in `run_dir` matches."""
        files = _files(run_dir)
        return [w for w in self.writes if not any(fnmatch.fnmatchcase(f, w) for f in files)]

    def claims(self, relpath: str) -> bool:
        """Whether a file (relative to the run dir) is one this stage declares, its completion marker included."""
        patterns = (*self.writes, *self.may_write, f"{self.name}/_COMPLETE.json")
        return any(fnmatch.fnmatchcase(relpath, p) for p in patterns)


def _files(run_dir: Path) -> list[str]:
    return [p.relative_to(run_dir).as_posix() for p in run_dir.rglob("*") if p.is_file()]


def _plain(node: Any) -> Any:
    return OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else node


def _strip(node: Any, ignores: frozenset[str]) -> Any:
    if isinstance(node, dict):
        return {k: _strip(v, ignores) for k, v in node.items() if k not in ignores}
    return node
