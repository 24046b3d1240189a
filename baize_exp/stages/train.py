"""Stage 2 — LoRA tuning of the base on the collected dialogs (v1). The training core is `baize_exp.training`."""

from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path
from typing import Any

import pytorch_lightning as pl

from baize_exp import models as M
from baize_exp.config import Config, to_container
from baize_exp.data import training_dialogs
from baize_exp.io import global_rank, write_jsonl
from baize_exp.stages.base import Stage
from baize_exp.training import (
    NOT_TRAINING,
    check_machine,
    fit,
    load_base_for_training,
    save_adapter,
    trainable_state,
)
from baize_exp.wandb_log import log_adapter

log = logging.getLogger(__name__)


def preflight(cfg: Config) -> None:
    """Before any work: what training asks of this machine, and LoRA targets the model has (checked on its
    architecture alone, so a misspelt module fails in a second, not after loading an 8B base)."""
    check_machine(cfg)
    M.check_lora_targets_of(cfg.model, cfg.lora)


def run(cfg: Config, run_dir: Path, backends: Any = None) -> dict:
    """The pipeline's train stage: base + fresh LoRA → `train/adapter` (v1)."""
    stage_dir = run_dir / "train"
    src, train_d, val_d, rejects = training_dialogs(cfg, run_dir)
    if global_rank() == 0:  # under torchrun every rank gets here with the same split; one writes it
        write_jsonl(stage_dir / "val_dialogs.jsonl", val_d)  # the held-out dialogs eval scores loss on
        write_jsonl(stage_dir / "rejected_dialogs.jsonl", rejects)
    if rejects:
        log.warning(
            "train: %d dialog(s) of %s are not trained on (%s); see %s",
            len(rejects),
            src,
            dict(Counter(r["reason"] for r in rejects)),
            stage_dir / "rejected_dialogs.jsonl",
        )
    model, tok = load_base_for_training(cfg)
    pl.seed_everything(cfg.train.seed, verbose=False)  # the LoRA A init is random: same seed, same start
    peft_model = M.attach_lora(model, cfg.lora)
    metrics = fit(peft_model, tok, train_d, val_d, cfg, stage_dir, cfg.train.lr, cfg.trainer.max_epochs)
    weights = trainable_state(peft_model)  # every rank: under ZeRO-3 this gathers the shards
    if metrics["rank"] == 0:  # under DDP every rank gets here; one writes the adapter
        save_adapter(
            peft_model,
            tok,
            stage_dir / "adapter",
            {
                "model": cfg.model.name,
                "lora": to_container(cfg.lora),
                "train": to_container(cfg.train),
                "data": str(src),
                "metrics": metrics,
            },
            fmt=cfg.train.format,
            state_dict=weights,
        )
    metrics["data"] = str(src)
    metrics["rejected_dialogs"] = len(rejects)
    metrics["rejected_by_reason"] = dict(Counter(r["reason"] for r in rejects))
    metrics["dialogs_by_source"] = dict(Counter(d.get("source", "collected") for d in train_d))
    return metrics


STAGE = Stage(
    "train",
    run,
    reads=("collect",),
    shapes=(
        "model",
        "lora",
        "train",
        "trainer.max_epochs",
        "trainer.max_steps",
        "trainer.precision",
        "trainer.accumulate_grad_batches",
        "trainer.gradient_clip_val",
    ),
    ignores=NOT_TRAINING,  # the same keys a checkpoint stays resumable across
    writes=(
        "train/adapter/adapter_config.json",
        "train/adapter/adapter_model.safetensors",
        "train/adapter/prompt_format.json",
        "train/adapter/baize_exp.json",
        "train/val_dialogs.jsonl",
        "train/rejected_dialogs.jsonl",
        "train/logs/metrics.csv",
        "train/train_rank*.json",
    ),
    # the tokenizer's files beside the adapter; checkpoints and Lightning's hparams; the sample table
    may_write=("train/adapter/*", "train/checkpoints/*", "train/logs/*", "train/train_samples.jsonl"),
    log_wandb=lambda wb, stage_dir: log_adapter(wb, stage_dir, "train"),  # v1 as a `model` artifact
    # dialogs from another run (train.data) stand in for this run's collect stage: their content is hashed
    external=lambda cfg: {"collect": cfg.train.data} if cfg.train.data else {},
    joins_ddp=True,
    preflight=preflight,
)
