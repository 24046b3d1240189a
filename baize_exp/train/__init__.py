"""Stage 2 — LoRA tuning on the collected dialogs (Lightning + PEFT), and the pieces SDF and eval reuse."""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch

from baize_exp import models as M
from baize_exp.config import cache_dir, to_container
from baize_exp.data import BAIZE_AI, BAIZE_HEADER, BAIZE_HUMAN
from baize_exp.io import read_jsonl, write_jsonl
from baize_exp.train.data import IGNORE, DialogDataModule, collate, split_dialogs, tokenize_dialog
from baize_exp.train.module import LoraLM
from baize_exp.train.strategy import build_strategy  # lives in strategy.py; re-exported here

log = logging.getLogger(__name__)
PROMPT_FORMAT = {"format": "baize", "header": BAIZE_HEADER, "human": BAIZE_HUMAN, "ai": BAIZE_AI,
                 "stop": [BAIZE_HUMAN]}


def build_logger(cfg: Any, stage_dir: Path, prefix: str) -> Any:
    if cfg.logger.name == "wandb":
        import wandb
        from pytorch_lightning.loggers import WandbLogger

        # The pipeline owns the W&B run; Lightning logs into it (one run per pipeline run).
        return WandbLogger(experiment=wandb.run) if wandb.run is not None else False
    if cfg.logger.name == "csv":
        from pytorch_lightning.loggers import CSVLogger

        return CSVLogger(save_dir=str(stage_dir), name="logs", version="")
    return False


def fit(peft_model: torch.nn.Module, tok: Any, train_dialogs: list[dict], val_dialogs: list[dict], cfg: Any,
        stage_dir: Path, lr: float, max_epochs: int, prefix: str = "") -> dict:
    """Train the LoRA weights of `peft_model` in place with Lightning; return metrics."""
    t = cfg.train
    pl.seed_everything(t.seed, workers=True, verbose=False)
    dm = DialogDataModule(train_dialogs, val_dialogs, tok, t.max_length, t.batch_size, t.loss_on, t.seed)
    module = LoraLM(peft_model, lr=lr, weight_decay=t.weight_decay, warmup_steps=t.warmup_steps, log_prefix=prefix)
    tr = cfg.trainer
    trainer = pl.Trainer(
        accelerator=tr.accelerator, devices=tr.devices, num_nodes=tr.num_nodes, precision=tr.precision,
        strategy=build_strategy(cfg.strategy), max_epochs=max_epochs, max_steps=tr.max_steps,
        accumulate_grad_batches=tr.accumulate_grad_batches, gradient_clip_val=tr.gradient_clip_val,
        log_every_n_steps=tr.log_every_n_steps, enable_progress_bar=tr.enable_progress_bar,
        logger=build_logger(cfg, stage_dir, prefix), enable_checkpointing=False,
        enable_model_summary=False, default_root_dir=str(stage_dir), num_sanity_val_steps=0,
        limit_val_batches=1.0 if dm.val_set else 0,
    )
    t0 = time.perf_counter()
    trainer.fit(module, datamodule=dm)
    elapsed = time.perf_counter() - t0
    m = {k: float(v) for k, v in trainer.callback_metrics.items()}
    total, trainable = M.count_parameters(peft_model)
    out = {
        "train_dialogs": len(dm.train_set), "val_dialogs": len(dm.val_set), "dropped_too_long": dm.dropped,
        "steps": trainer.global_step, "epochs": trainer.current_epoch, "seconds": round(elapsed, 2),
        "tokens_per_s": round(module.tokens_seen / elapsed, 1) if elapsed else 0.0,
        "supervised_tokens_per_s": round(module.supervised_seen / elapsed, 1) if elapsed else 0.0,
        "params_total": total, "params_trainable": trainable,
        "train_loss": m.get(f"{prefix}train/loss"),
    }
    if f"{prefix}val/loss" in m:
        out["val_loss"] = m[f"{prefix}val/loss"]
        out["val_ppl"] = math.exp(min(out["val_loss"], 50))
    return out


@torch.no_grad()
def heldout_loss(model: torch.nn.Module, tok: Any, dialogs: list[dict], max_length: int,
                 batch_size: int = 4) -> dict:
    """Per-token loss and perplexity on AI turns of held-out dialogs."""
    model.eval()
    enc = [x for x in (tokenize_dialog(d["turns"], tok, max_length, "ai") for d in dialogs) if x]
    total, n = 0.0, 0
    for i in range(0, len(enc), batch_size):
        b = collate(enc[i:i + batch_size], tok.pad_token_id)
        logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits[:, :-1].float()
        tgt = b["labels"][:, 1:]
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), tgt.reshape(-1),
                                                 ignore_index=IGNORE, reduction="sum")
        total += float(loss)
        n += int((tgt != IGNORE).sum())
    if n == 0:
        return {"heldout_loss": None, "heldout_ppl": None, "heldout_tokens": 0}
    return {"heldout_loss": total / n, "heldout_ppl": math.exp(min(total / n, 50)), "heldout_tokens": n}


def save_adapter(peft_model: Any, tok: Any, out: Path, extra: dict) -> None:
    """An adapter folder that describes itself: peft weights + config, tokenizer, prompt format, provenance."""
    out.mkdir(parents=True, exist_ok=True)
    peft_model.save_pretrained(str(out))
    tok.save_pretrained(str(out))
    (out / "prompt_format.json").write_text(json.dumps(PROMPT_FORMAT, indent=2))
    (out / "baize_exp.json").write_text(json.dumps(extra, indent=2, default=str))


def dialogs_path(cfg: Any, run_dir: Path) -> Path:
    p = Path(cfg.train.data).expanduser() if cfg.train.data else run_dir / "collect" / "dialogs.jsonl"
    if not p.is_file():
        raise FileNotFoundError(f"train: no dialogs at {p}; run the collect stage or set train.data=<dialogs.jsonl>")
    return p


def run(cfg: Any, run_dir: Path, backends: Any = None) -> dict:
    """The pipeline's train stage: base + fresh LoRA → `train/adapter` (v1)."""
    stage_dir = run_dir / "train"
    src = dialogs_path(cfg, run_dir)
    dialogs = read_jsonl(src)
    train_d, val_d = split_dialogs(dialogs, cfg.train.val_fraction, cfg.train.seed)
    write_jsonl(stage_dir / "val_dialogs.jsonl", val_d)  # the held-out dialogs eval scores loss on
    model, tok = M.load_model_and_tokenizer(cfg.model, cache_dir(cfg))
    peft_model = M.attach_lora(model, cfg.lora)
    metrics = fit(peft_model, tok, train_d, val_d, cfg, stage_dir, cfg.train.lr, cfg.trainer.max_epochs)
    save_adapter(peft_model, tok, stage_dir / "adapter",
                 {"model": cfg.model.name, "lora": to_container(cfg.lora), "data": str(src), "metrics": metrics})
    metrics["data"] = str(src)
    return metrics
