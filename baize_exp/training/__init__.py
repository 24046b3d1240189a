"""LoRA tuning with Lightning + PEFT: the training core the train and SDF stages share.

The pieces: `tuning` (`fit`: LoRA weights trained in place with Lightning: packing, loss on AI turns, resumable
checkpoints of the trainable weights only, MFU and throughput), `adapter` (the adapter folder that describes
itself), `data` (tokenize, pack, batch), `module` (the LightningModule), `callbacks` (stop at a step, threads,
samples), `loggers` (CSV and W&B), `fused_lora` (the CPU LoRA layer), `strategy` (DDP / DeepSpeed ZeRO). Held-out
loss per dialog is the eval stage's (`stages/evaluate/likelihood.py`).
"""

from baize_exp.training.adapter import CHAT_TEMPLATE_FORMAT, PROMPT_FORMAT, save_adapter, trainable_state
from baize_exp.training.module import LoraLM
from baize_exp.training.tuning import NOT_TRAINING, check_machine, fit, load_base_for_training

__all__ = [
    "CHAT_TEMPLATE_FORMAT",
    "NOT_TRAINING",
    "PROMPT_FORMAT",
    "LoraLM",
    "check_machine",
    "fit",
    "load_base_for_training",
    "save_adapter",
    "trainable_state",
]
