"""Lightning's DeepSpeed strategy on CPU, for tests: the same `LoraDeepSpeedStrategy` class `fit()` builds, with the
three CUDA-only steps replaced (STACK-NOTES: Lightning refuses DeepSpeed on a CPU accelerator; DeepSpeed itself
runs ZeRO on CPU with `DS_ACCELERATOR=cpu` and gloo). Everything else -- `deepspeed.initialize`, ZeRO partitioning,
`save_checkpoint` handing DeepSpeed the client state, `load_checkpoint` returning it -- is the libraries' own.

Run as a script (one rank; the caller sets DS_ACCELERATOR=cpu, RANK, WORLD_SIZE, MASTER_ADDR/PORT, LOCAL_RANK):

    python tests/helpers/zero_on_cpu.py <deepspeed option> <out dir> <cache dir>

It trains the tiny model straight for 6 steps, then stopped at step 3 (`train.stop_at_step`, a DeepSpeed checkpoint)
and resumed by the same call, through `baize_exp.training.tuning`, and prints one `RESULT {json}` line.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from safetensors.torch import load_file

import baize_exp.training as T
import baize_exp.training.tuning as training_tuning
from baize_exp import models as M
from baize_exp.errors import Interrupted
from baize_exp.training.strategy import build_strategy


def cpu_zero(strategy: Any) -> Any:
    """Turn the strategy `build_strategy` made into one that runs on CPU ranks with gloo."""
    from pytorch_lightning.strategies import DDPStrategy

    class CpuZero(type(strategy)):
        def setup_environment(self) -> None:  # Lightning's DeepSpeedStrategy raises here unless on CUDA
            DDPStrategy.setup_environment(self)

        def setup_distributed(self) -> None:  # without the CUDA device-index check
            self.set_world_ranks()
            self._init_deepspeed_distributed()

        def _get_process_group_backend(self) -> str:
            return "gloo"

        @property
        def root_device(self) -> torch.device:
            # DeepSpeed reads the device index (None for a plain "cpu"): rank 0's CPU device, as cuda:0 on a GPU
            return torch.device("cpu", self.local_rank)

    strategy.__class__ = CpuZero
    return strategy


class LossRecorder(pl.Callback):
    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: Any, outputs: Any, *args: Any) -> None:
        self.losses.append(float(outputs["loss"]))


def dialogs(n: int) -> list[dict]:
    words = ["apple", "river", "stone", "cloud", "green", "quick", "seven", "table"]
    return [
        {
            "id": f"d{i}",
            "turns": [
                {"role": "human", "text": f"Why {words[i % 8]} {i}?"},
                {"role": "ai", "text": " ".join(words[(i * k) % 8] for k in range(3 + i % 4))},
            ],
        }
        for i in range(n)
    ]


def main() -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from helpers.config import compose_cfg

    option, out, cache = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3])
    training_tuning.build_strategy = lambda *a, **k: cpu_zero(build_strategy(*a, **k))  # fit() builds it by this name
    loaded_keys: list[list[str]] = []  # what LoraLM.on_load_checkpoint was handed on resume
    on_load = T.LoraLM.on_load_checkpoint
    T.LoraLM.on_load_checkpoint = lambda self, ckpt: (loaded_keys.append(sorted(ckpt)), on_load(self, ckpt))[1]
    data = dialogs(16)
    common = [
        "model=tiny",
        "logger=none",
        f"paths.output_dir={out}",
        f"strategy={option}",
        "trainer=gpu",  # DeepSpeed configs validate only with a GPU trainer; the accelerator is swapped below
        "trainer.accelerator=cpu",
        "trainer.devices=1",
        "trainer.precision=32-true",
        "trainer.max_steps=6",
        "trainer.max_epochs=100",
        "train.max_length=64",
        "train.batch_size=2",
        "train.checkpoint_every_n_steps=0",
        "lora.dropout=0.0",
    ]

    def run(stage: str, *extra: str) -> tuple[dict | None, list[float], Any]:
        cfg = compose_cfg([*common, *extra])
        base, tok = M.load_model_and_tokenizer(cfg.model, cache)
        torch.manual_seed(0)
        peft_model = M.attach_lora(base, cfg.lora)
        losses = LossRecorder()
        try:
            metrics = T.fit(peft_model, tok, data[:14], data[14:], cfg, out / stage, 5e-3, 100, callbacks=[losses])
        except Interrupted:
            metrics = None
        return metrics, losses.losses, peft_model

    straight, straight_losses, model = run("straight")
    module_device_after_fit = str(next(model.parameters()).device)
    plain_cfg = compose_cfg(common)
    plain = M.attach_lora(M.load_model(plain_cfg.model, cache), plain_cfg.lora)  # never given to DeepSpeed
    gathered = T.trainable_state(model)  # what the train stage saves: whole tensors even where ZeRO-3 partitioned
    T.save_adapter(model, M.load_tokenizer(plain_cfg.model, cache), out / "adapter", {}, state_dict=gathered)
    partitioned = sum(1 for p in model.parameters() if p.numel() == 0 and hasattr(p, "ds_numel"))
    naive_total = sum(p.numel() for p in model.parameters())  # what the count was before it read ds_numel
    saved = {k: v.numel() for k, v in load_file(str(out / "adapter" / "adapter_model.safetensors")).items()}
    stopped, first_losses, _ = run("resumed", "train.stop_at_step=3")
    resumed, rest_losses, _ = run("resumed", "train.stop_at_step=3")
    ckpt = out / "resumed" / "checkpoints" / "last.ckpt"
    print(
        "RESULT "
        + json.dumps(
            {
                "straight": straight_losses,
                "first": first_losses,
                "rest": rest_losses,
                "stopped": stopped is None,
                "resumed_from": resumed and resumed["resumed_from"],
                "steps": resumed and resumed["steps"],
                "params_total": straight["params_total"],
                "params_trainable": straight["params_trainable"],
                "params_plain": list(M.count_parameters(plain)),
                "lora_sizes_plain": {n: q.numel() for n, q in plain.named_parameters() if q.requires_grad},
                "partitioned_params": partitioned,
                "naive_total": naive_total,
                "loaded_keys": loaded_keys,
                "saved_adapter": saved,
                "device": straight["device"],
                "module_device_after_fit": module_device_after_fit,
                "ckpt_is_deepspeed_dir": ckpt.is_dir(),
                "gathered": {n: t.numel() for n, t in gathered.items()},
            }
        )
    )


if __name__ == "__main__":
    main()
