"""The fit's callbacks: stop at a step with a checkpoint, follow the free cores, sample answers as training goes."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import pytorch_lightning as pl

from baize_exp import cpu
from baize_exp import models as M
from baize_exp.data import BAIZE_HUMAN, generation_prompt

log = logging.getLogger(__name__)


class StopAtStep(pl.Callback):
    """`train.stop_at_step`: end this session after that optimizer step with a checkpoint, as a preempted job would
    (a time slot on a cluster, or the GPU check's resume test); a rerun continues from it."""

    def __init__(self, step: int, ckpt: Path) -> None:
        self.step, self.ckpt, self.stopped, self.armed = step, ckpt, False, False

    def on_train_start(self, trainer: pl.Trainer, *args: Any) -> None:
        # a session that starts at or past the step (the rerun after the stop) runs to the end: the same command
        # stops once and then continues
        self.armed = trainer.global_step < self.step

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        if (
            self.armed
            and trainer.global_step >= self.step
            and not self.stopped
            and trainer.global_step < trainer.max_steps
        ):
            trainer.save_checkpoint(str(self.ckpt))  # every rank: DeepSpeed writes its shards
            trainer.should_stop = self.stopped = True


class FitThreads(pl.Callback):
    """Training takes the cores that are free, re-read as it goes: a job that starts beside it later gets its
    share instead of two pools spinning against each other (baize_exp.cpu)."""

    def on_train_batch_start(self, *args: Any) -> None:
        cpu.fit_threads(every_s=5.0)


class SampleCallback(pl.Callback):
    """Every N optimizer steps, greedy answers to fixed prompts: a W&B table and `<stage>/samples.jsonl`."""

    def __init__(
        self, tok: Any, prompts: list[str], every: int, max_new_tokens: int, fmt: str, out: Path, prefix: str = ""
    ):
        self.tok, self.every, self.max_new_tokens, self.out, self.prefix = tok, every, max_new_tokens, out, prefix
        self.prompts = [generation_prompt(p, fmt, tok) for p in prompts]
        self.stop: list[str] = [] if fmt == "chat_template" else [BAIZE_HUMAN]
        self.questions = list(prompts)
        self._last = -1

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        step = trainer.global_step
        if step == 0 or step % self.every or step == self._last or not trainer.is_global_zero:
            return
        self._last = step
        model = pl_module.model
        was_training = model.training
        try:  # greedy decoding draws no random numbers, so training's RNG stream is untouched
            texts = M.generate_texts(model, self.tok, self.prompts, self.max_new_tokens, stop=self.stop)
        finally:
            model.train(was_training)
        rows = [[step, q, t[0]] for q, t in zip(self.questions, texts, strict=True)]
        with open(self.out, "a", encoding="utf-8") as f:
            for r in rows:
                f.write(json.dumps({"step": r[0], "prompt": r[1], "sample": r[2]}) + "\n")
        for lg in trainer.loggers:
            if hasattr(lg, "log_table"):  # W&B
                lg.log_table(key=f"{self.prefix}train/samples", columns=["step", "prompt", "sample"], data=rows)
