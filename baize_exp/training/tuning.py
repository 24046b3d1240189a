"""`fit`: LoRA weights trained in place with Lightning (packing, loss on AI turns, resumable checkpoints of the
trainable weights only, MFU and throughput); the base loaded for it; what a checkpoint's resumability depends on."""

from __future__ import annotations

import logging
import math
import os
import time
import warnings
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch

from baize_exp import models as M
from baize_exp.config import cache_dir, to_container
from baize_exp.errors import Interrupted, UserError
from baize_exp.io import content_hash, write_json
from baize_exp.training.callbacks import FitThreads, SampleCallback, StopAtStep
from baize_exp.training.data import DialogDataModule
from baize_exp.training.fused_lora import use_fused_lora
from baize_exp.training.loggers import build_logger, checkpoint_step
from baize_exp.training.module import LoraLM, measure_matmul_peak, peak_memory_gb
from baize_exp.training.strategy import build_strategy

log = logging.getLogger(__name__)

# train keys that change neither the weights nor the data order: a checkpoint stays resumable across them, and the
# train stage's fingerprint leaves them out too (the dialogs themselves are hashed, not train.data's path)
NOT_TRAINING = frozenset(
    {
        "resume",
        "checkpoint_every_n_steps",
        "stop_at_step",
        "peak_flops",
        "sample_every_n_steps",
        "sample_prompts",
        "sample_max_new_tokens",
        "cache_tokenized",
        "data",
    }
)


def check_machine(cfg: Any) -> None:
    """Before any work: what training asks of this machine (a GPU trainer needs a GPU), and a loadable model."""
    M.check_loadable(cfg.model)
    if cfg.trainer.accelerator in ("gpu", "cuda") and not torch.cuda.is_available():
        raise UserError(
            f"trainer.accelerator={cfg.trainer.accelerator} (trainer=gpu) but no CUDA GPU is visible "
            f"here (torch {torch.__version__}); use trainer=cpu on this machine, or run on a GPU machine"
        )


def _device(cfg: Any) -> torch.device:
    acc = cfg.trainer.accelerator
    return torch.device("cuda" if acc in ("gpu", "cuda") or (acc == "auto" and torch.cuda.is_available()) else "cpu")


def _peak_flops(cfg: Any) -> float:
    """The per-device peak MFU is measured against: configured, or a matmul probe in the training dtype."""
    if cfg.train.peak_flops:
        return float(cfg.train.peak_flops)
    dev = _device(cfg)
    prec = str(cfg.trainer.precision)
    dtype = torch.float32
    if dev.type == "cuda" and prec.startswith("bf16"):
        dtype = torch.bfloat16
    elif dev.type == "cuda" and prec.startswith("16"):
        dtype = torch.float16
    return measure_matmul_peak(dev, dtype)


def _fingerprint(cfg: Any, lr: float, max_epochs: int, prefix: str, train_dialogs: list[dict]) -> str:
    """What a checkpoint's weights and data order depend on; resuming from another config is refused."""
    t = {k: v for k, v in to_container(cfg.train).items() if k not in NOT_TRAINING}
    tr = cfg.trainer
    return content_hash(
        to_container(cfg.model),
        to_container(cfg.lora),
        t,
        lr,
        max_epochs,
        prefix,
        tr.max_steps,
        tr.accumulate_grad_batches,
        tr.gradient_clip_val,
        str(tr.precision),
        [d["turns"] for d in train_dialogs],
    )


def _resume_path(cfg: Any, ckpt_dir: Path) -> str | None:
    r = cfg.train.resume
    if r == "never":
        return None
    if r == "auto":
        last = ckpt_dir / "last.ckpt"  # a file, or under DeepSpeed a directory of per-rank shards
        return str(last) if last.is_file() or (last.is_dir() and any(last.iterdir())) else None
    return str(Path(r).expanduser())


def fit(
    peft_model: torch.nn.Module,
    tok: Any,
    train_dialogs: list[dict],
    val_dialogs: list[dict],
    cfg: Any,
    stage_dir: Path,
    lr: float,
    max_epochs: int,
    prefix: str = "",
    callbacks: list[pl.Callback] | None = None,
) -> dict:
    """Train the LoRA weights of `peft_model` in place with Lightning; return metrics.

    Checkpoints (trainable weights + optimizer/scheduler/loop/RNG state) go to `<stage_dir>/checkpoints`;
    with `train.resume=auto` a rerun continues from `last.ckpt` exactly where the interrupted run was.
    """
    t = cfg.train
    peak = _peak_flops(cfg)  # before seeding: the probe must not shift the seeded RNG stream
    pl.seed_everything(t.seed, workers=True, verbose=False)
    dm = DialogDataModule(
        train_dialogs,
        val_dialogs,
        tok,
        t.max_length,
        t.batch_size,
        t.loss_on,
        t.seed,
        fmt=t.format,
        packing=t.packing,
        cache=cache_dir(cfg) if t.cache_tokenized else None,
    )
    _prepare_model(peft_model, t)
    fingerprint = _fingerprint(cfg, lr, max_epochs, prefix, train_dialogs)
    module = LoraLM(
        peft_model,
        lr=lr,
        weight_decay=t.weight_decay,
        warmup_steps=t.warmup_steps,
        log_prefix=prefix,
        min_lr_ratio=t.min_lr_ratio,
        peak_flops=peak,
        fingerprint=fingerprint,
    )
    ckpt_dir = stage_dir / "checkpoints"
    ckpt_path = _resume_path(cfg, ckpt_dir)
    stop = StopAtStep(t.stop_at_step, ckpt_dir / "last.ckpt") if t.stop_at_step else None
    cbs = [*(callbacks or []), *_callbacks(cfg, tok, stage_dir, prefix), *([stop] if stop else [])]
    logger = build_logger(cfg, stage_dir, prefix, checkpoint_step(ckpt_path))
    trainer = _trainer(cfg, max_epochs, cbs, logger, dm, stage_dir)
    peft_model.train()  # from_pretrained leaves eval mode, which would switch LoRA dropout off
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        # Lightning cannot see that our batch sampler resumes mid-epoch (LoraLM.on_train_start moves it)
        warnings.filterwarnings("ignore", message="You're resuming from a checkpoint that ended before the epoch")
        trainer.fit(module, datamodule=dm, ckpt_path=ckpt_path)
    elapsed = time.perf_counter() - t0
    if stop and stop.stopped:
        raise Interrupted(
            f"{prefix or 'train/'}: stopped after step {trainer.global_step} as train.stop_at_step="
            f"{t.stop_at_step} asks; the checkpoint is {ckpt_dir / 'last.ckpt'}; the same command "
            f"continues from it"
        )
    out = _summary(trainer, module, dm, peft_model, prefix, elapsed, peak)
    out["resumed_from"] = ckpt_path
    _write_rank_record(stage_dir, prefix, trainer, module)
    return out


def _prepare_model(peft_model: torch.nn.Module, t: Any) -> None:
    """Gradient checkpointing and the fused CPU LoRA layer, as `train` asks."""
    if t.gradient_checkpointing:
        # non-reentrant checkpointing works with frozen inputs (no enable_input_require_grads trick needed)
        if hasattr(peft_model, "activation_checkpointing_enable"):  # transformers >= 5 name
            peft_model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            peft_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if t.fused_lora:
        use_fused_lora(peft_model)


def _callbacks(cfg: Any, tok: Any, stage_dir: Path, prefix: str) -> list[pl.Callback]:
    """Threads that follow the free cores, periodic checkpoints, periodic samples, as `train` asks."""
    t = cfg.train
    cbs: list[pl.Callback] = [FitThreads()]
    if t.checkpoint_every_n_steps > 0:
        from pytorch_lightning.callbacks import ModelCheckpoint

        cbs.append(
            ModelCheckpoint(
                dirpath=str(stage_dir / "checkpoints"),
                filename="step{step}",
                save_top_k=0,
                save_last=True,
                every_n_train_steps=t.checkpoint_every_n_steps,
                auto_insert_metric_name=False,
            )
        )
    if t.sample_every_n_steps > 0:
        stage_dir.mkdir(parents=True, exist_ok=True)
        samples = stage_dir / f"{prefix.strip('/') or 'train'}_samples.jsonl"
        cbs.append(
            SampleCallback(
                tok, list(t.sample_prompts), t.sample_every_n_steps, t.sample_max_new_tokens, t.format, samples, prefix
            )
        )
    return cbs


def _trainer(
    cfg: Any, max_epochs: int, callbacks: list[pl.Callback], logger: Any, dm: Any, stage_dir: Path
) -> pl.Trainer:
    tr = cfg.trainer
    return pl.Trainer(
        accelerator=tr.accelerator,
        devices=tr.devices,
        num_nodes=tr.num_nodes,
        precision=tr.precision,
        strategy=build_strategy(cfg.strategy, cfg.trainer, cfg.train.batch_size),
        max_epochs=max_epochs,
        max_steps=tr.max_steps,
        accumulate_grad_batches=tr.accumulate_grad_batches,
        gradient_clip_val=tr.gradient_clip_val,
        log_every_n_steps=tr.log_every_n_steps,
        enable_progress_bar=tr.enable_progress_bar,
        logger=logger,
        enable_checkpointing=cfg.train.checkpoint_every_n_steps > 0,
        callbacks=callbacks,
        enable_model_summary=False,
        default_root_dir=str(stage_dir),
        num_sanity_val_steps=0,
        limit_val_batches=1.0 if dm.val_set else 0,
        use_distributed_sampler=False,  # our batch sampler shards by rank itself and can resume mid-epoch
    )


def _summary(
    trainer: pl.Trainer, module: LoraLM, dm: Any, peft_model: torch.nn.Module, prefix: str, elapsed: float, peak: float
) -> dict:
    """The fit's metrics: data, steps, throughput, parameters, the device and its peak memory, MFU, losses."""
    m = {k: float(v) for k, v in trainer.callback_metrics.items()}
    total, trainable = M.count_parameters(peft_model)
    world = trainer.world_size
    out = {
        "train_dialogs": len(dm.train_examples),
        "val_dialogs": len(dm.val_set),
        "dropped_too_long": dm.dropped,
        "train_rows": len(dm.train_set),
        "steps": trainer.global_step,
        "epochs": trainer.current_epoch,
        "seconds": round(elapsed, 2),
        "resumed_from": None,
        "world_size": world,
        # this process's work over the whole fit (setup and validation included); per-step rates are logged
        "tokens_per_s": round(world * module.run_tokens / elapsed, 1),
        "supervised_tokens_per_s": round(world * module.run_supervised / elapsed, 1),
        "params_total": total,
        "params_trainable": trainable,
        "peak_flops": peak,
        # the device the strategy trained on: after fit, Lightning's teardown has moved the module back to the CPU,
        # so module.device would read the host's peak RSS on a GPU run
        "device": str(trainer.strategy.root_device),
        "peak_mem_gb": round(peak_memory_gb(trainer.strategy.root_device), 3),
        "train_loss": m.get(f"{prefix}train/loss"),
        "loop_seconds": round(module.train_seconds, 2),  # the training loop alone
    }
    if module.steady_seconds:  # after the first optimizer step, which pays kernel selection and warm-up
        out["mfu"] = round(module.steady_flops / module.steady_seconds / peak, 4)
        out["mfu_seconds"] = round(module.steady_seconds, 2)
    if f"{prefix}val/loss" in m:
        out["val_loss"] = m[f"{prefix}val/loss"]
        out["val_ppl"] = math.exp(min(out["val_loss"], 50))
    out["rank"] = trainer.global_rank
    return out


def _write_rank_record(stage_dir: Path, prefix: str, trainer: pl.Trainer, module: LoraLM) -> None:
    """What each rank did: a DDP run can be checked rank by rank (equal batch counts, disjoint shards)."""
    write_json(
        stage_dir / f"{prefix.strip('/') or 'train'}_rank{trainer.global_rank}.json",
        {
            "rank": trainer.global_rank,
            "world_size": trainer.world_size,
            "batches_trained": module.batches_trained,
            "tokens_seen": module.tokens_seen,
            "supervised_seen": module.supervised_seen,
            "last_losses": module.step_losses[-5:],
        },
    )


def load_base_for_training(cfg: Any) -> tuple[torch.nn.Module, Any]:
    """The base model and its tokenizer: in `model.dtype` (auto: the trainer precision's), or 8/4-bit through
    bitsandbytes on CUDA (`model.quantization`, QLoRA-style)."""
    q = cfg.model.quantization
    if q == "none":  # a random model is built where it will train (this rank's GPU under a GPU trainer)
        dtype, device = M.base_dtype(cfg.model, cfg.trainer.precision), M.student_device(cfg.trainer.accelerator)
        return M.load_model_and_tokenizer(cfg.model, cache_dir(cfg), dtype, device)
    if not torch.cuda.is_available():
        raise UserError(
            f"model.quantization={q}: bitsandbytes quantization needs a CUDA GPU and none is visible; "
            f"use model.quantization=none on CPU"
        )
    try:
        import bitsandbytes  # noqa: F401
    except ImportError as e:
        raise UserError(f"model.quantization={q} needs bitsandbytes: pip install bitsandbytes") from e
    if cfg.model.source == "tiny":
        raise UserError(f"model.quantization={q}: model=tiny is built in memory; quantize a real checkpoint")
    from peft import prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    qc = (
        BitsAndBytesConfig(load_in_8bit=True)
        if q == "8bit"
        else BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16,
        )
    )
    tok = M.load_tokenizer(cfg.model, cache_dir(cfg))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    model = AutoModelForCausalLM.from_pretrained(
        M.resolve_model_dir(cfg.model, cache_dir(cfg)), quantization_config=qc, device_map={"": local_rank}
    )
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=cfg.train.gradient_checkpointing)
    model.generation_config.pad_token_id = tok.pad_token_id
    return model, tok
