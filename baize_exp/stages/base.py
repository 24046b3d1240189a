"""What every stage declares about itself, and the helpers stages share (no stage imports another stage).

A stage module defines `STAGE = Stage(...)`: its name, its `run(cfg, run_dir, backends) -> metrics`, the stages
whose files it reads, the config keys that shape its outputs (its fingerprint) and the key names under them that
do not, the files it writes, and its hooks. The pipeline (`baize_exp.pipeline`) reads only these declarations.
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from baize_exp.data import load_dialogs, split_dialogs
from baize_exp.errors import UserError
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
    }
)


@dataclass(frozen=True)
class Stage:
    """A stage as the pipeline sees it (see the module docstring)."""

    name: str
    run: Callable[[Any, Path, Any], dict]
    reads: tuple[str, ...] = ()  # upstream stages whose files it reads
    shapes: tuple[str, ...] = ()  # config keys (dotted) whose values shape its outputs
    ignores: frozenset[str] = frozenset()  # key names under `shapes` that do not (anywhere in those subtrees)
    writes: tuple[str, ...] = ()  # what it writes, relative to the run dir
    marker: bool = True  # False: it only describes (plan, report): run every time, no completion marker
    # files from outside the run dir that stand in for an upstream stage: {upstream: path} for this config
    external: Callable[[Any], dict[str, str]] = field(default=lambda cfg: {})
    preflight: Callable[[Any], None] | None = None  # what it needs of this machine, checked before any work
    log_wandb: Callable[[Any, Path], None] | None = None  # extra W&B logging, given the run and its stage dir
    joins_ddp: bool = False  # a DDP worker that Lightning re-launches during this stage joins it

    def config_part(self, cfg: Any) -> dict[str, Any]:
        """The config values that shape this stage's outputs, minus `ignores`."""
        return {k: _strip(_plain(OmegaConf.select(cfg, k)), self.ignores) for k in self.shapes}

    def fingerprint(self, cfg: Any, upstream: dict[str, str]) -> str:
        """Hash of what this stage's outputs depend on: its config part and its upstream stages' fingerprints."""
        return content_hash(self.name, {**self.config_part(cfg), **upstream})


def _plain(node: Any) -> Any:
    return OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else node


def _strip(node: Any, ignores: frozenset[str]) -> Any:
    if isinstance(node, dict):
        return {k: _strip(v, ignores) for k, v in node.items() if k not in ignores}
    return node


# --- the dialogs the train and SDF stages both read -------------------------------------------------------------


def dialogs_path(cfg: Any, run_dir: Path) -> Path:
    """This run's collected dialogs, or `train.data` (dialogs from another run or tool)."""
    p = Path(cfg.train.data).expanduser() if cfg.train.data else run_dir / "collect" / "dialogs.jsonl"
    if not p.is_file():
        raise UserError(f"train: no dialogs at {p}; run the collect stage or set train.data=<dialogs.jsonl>")
    return p


def training_dialogs(cfg: Any, run_dir: Path) -> tuple[Path, list[dict], list[dict], list[dict]]:
    """(source file, train dialogs, held-out dialogs, rejects) as the train stage and SDF both see them: the
    dialogs not worth training on are rejects with a reason, the rest split by dialog id."""
    src = dialogs_path(cfg, run_dir)
    dialogs, rejects = load_dialogs(src)
    if not dialogs:
        counts = Counter(r["reason"] for r in rejects)
        raise UserError(
            f"train: no usable dialog in {src}: {len(rejects)} record(s), all rejected "
            f"({', '.join(f'{k}: {v}' for k, v in counts.most_common()) or 'the file is empty'}); "
            f"each dialog needs a human turn then an AI turn, alternating, with text in every turn"
        )
    split_seed = cfg.train.seed if cfg.train.get("split_seed") is None else cfg.train.split_seed
    train_d, val_d = split_dialogs(dialogs, cfg.train.val_fraction, split_seed)
    if cfg.train.get("extra_data"):  # instruction data mixed into training only: held-out loss stays on self-chat
        extra, extra_rejects = instruction_dialogs(cfg.train.extra_data, cfg.train.extra_data_limit, cfg.train.seed)
        train_d, rejects = train_d + extra, rejects + extra_rejects
    return src, train_d, val_d, rejects


def instruction_dialogs(path: str, limit: int | None, seed: int) -> tuple[list[dict], list[dict]]:
    """Alpaca-style instruction/input/output records (alpaca_data.json or .jsonl) as one-exchange dialogs in the
    training format, as the original Baize recipe mixed Alpaca into its self-chat data; a record without an output
    is a reject ("no_output"). A seeded sample of `limit` when set."""
    from baize_exp.data.sources import alpaca_prompt, alpaca_records

    p = Path(path).expanduser()
    if not p.is_file():
        raise UserError(
            f"train.extra_data={path}: no such file (an alpaca_data.json or a .jsonl of "
            f"instruction/input/output records)"
        )
    source = p.stem.split("_")[0] or "extra"
    dialogs, rejects = [], []
    for n, rec in enumerate(alpaca_records(p), 1):
        out = rec.get("output")
        did = f"{source}-{content_hash(rec)[:10]}"
        if not isinstance(out, str) or not out.strip():
            rejects.append({"line": n, "id": did, "reason": "no_output", "detail": f"{p}: record {n} has no output"})
            continue
        dialogs.append(
            {
                "id": did,
                "source": source,
                "turns": [{"role": "human", "text": alpaca_prompt(rec)}, {"role": "ai", "text": out.strip()}],
            }
        )
    if limit is not None and limit < len(dialogs):
        dialogs = random.Random(seed).sample(dialogs, limit)
    return dialogs, rejects
