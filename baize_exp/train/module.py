"""The LightningModule: a PEFT LoRA model, AdamW with linear warmup and cosine decay."""

from __future__ import annotations

import math
import time
from typing import Any

import pytorch_lightning as pl
import torch


class LoraLM(pl.LightningModule):
    def __init__(self, model: torch.nn.Module, lr: float, weight_decay: float = 0.0, warmup_steps: int = 0,
                 log_prefix: str = ""):
        super().__init__()
        self.model = model  # a peft model: only LoRA weights require grad
        self.lr, self.weight_decay, self.warmup_steps = lr, weight_decay, warmup_steps
        self.prefix = log_prefix
        self._t0: float | None = None
        self.tokens_seen = 0
        self.supervised_seen = 0

    def forward(self, **batch: torch.Tensor) -> Any:
        return self.model(**batch)

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        if self._t0 is None:
            self._t0 = time.perf_counter()
        loss = self(**batch).loss
        self.tokens_seen += int(batch["attention_mask"].sum())
        self.supervised_seen += int((batch["labels"][:, 1:] != -100).sum())
        elapsed = max(time.perf_counter() - self._t0, 1e-9)
        bs = batch["input_ids"].shape[0]
        self.log(f"{self.prefix}train/loss", loss, prog_bar=True, batch_size=bs)
        self.log(f"{self.prefix}train/tokens_per_s", self.tokens_seen / elapsed, prog_bar=True, batch_size=bs)
        self.log(f"{self.prefix}train/supervised_tokens", float(self.supervised_seen), batch_size=bs)
        self.log(f"{self.prefix}train/lr", self.trainer.optimizers[0].param_groups[0]["lr"], batch_size=bs)
        return loss

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        loss = self(**batch).loss
        n = int((batch["labels"][:, 1:] != -100).sum())
        # weight by supervised tokens so the epoch value is the per-token loss, not a mean of batch means
        self.log(f"{self.prefix}val/loss", loss, prog_bar=True, batch_size=max(n, 1), sync_dist=True)

    def configure_optimizers(self):
        params = [p for p in self.model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=self.lr, weight_decay=self.weight_decay)
        total = max(1, int(self.trainer.estimated_stepping_batches))
        warm = min(self.warmup_steps, total - 1) if total > 1 else 0

        def schedule(step: int) -> float:
            if step < warm:
                return (step + 1) / (warm + 1)
            progress = (step - warm) / max(1, total - warm)
            return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))  # cosine to 10% of lr

        sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}
