"""An adapter folder that describes itself: the LoRA weights (gathered whole under ZeRO-3), the tokenizer, the prompt
format the adapter was trained in, and its provenance."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from baize_exp.data import BAIZE_AI, BAIZE_HEADER, BAIZE_HUMAN

PROMPT_FORMAT = {"format": "baize", "header": BAIZE_HEADER, "human": BAIZE_HUMAN, "ai": BAIZE_AI, "stop": [BAIZE_HUMAN]}
CHAT_TEMPLATE_FORMAT = {"format": "chat_template", "note": "prompts through the saved tokenizer's chat template"}


def trainable_state(peft_model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The trainable (LoRA) weights as whole tensors on the CPU. Under DeepSpeed ZeRO-3 each rank holds only a
    shard of every parameter, and `save_pretrained` would write those empty or partial tensors: they are gathered
    first, which is a collective, so every rank must call this."""
    named = [(n, p) for n, p in peft_model.named_parameters() if p.requires_grad]
    partitioned = [p for _, p in named if hasattr(p, "ds_id")]
    if partitioned:
        import deepspeed

        with deepspeed.zero.GatheredParameters(partitioned, modifier_rank=None):
            return {n: p.detach().to("cpu", copy=True) for n, p in named}
    return {n: p.detach().to("cpu", copy=True) for n, p in named}


def save_adapter(
    peft_model: Any,
    tok: Any,
    out: Path,
    extra: dict,
    fmt: str = "baize",
    state_dict: dict[str, torch.Tensor] | None = None,
) -> None:
    """An adapter folder that describes itself: peft weights + config, tokenizer, prompt format, provenance.
    `state_dict`: the weights to write (`trainable_state`, gathered under ZeRO-3), else the model's own."""
    out.mkdir(parents=True, exist_ok=True)
    peft_model.save_pretrained(str(out), state_dict=state_dict)
    tok.save_pretrained(str(out))
    fmt_doc = CHAT_TEMPLATE_FORMAT if fmt == "chat_template" else PROMPT_FORMAT
    (out / "prompt_format.json").write_text(json.dumps(fmt_doc, indent=2))
    (out / "baize_exp.json").write_text(json.dumps(extra, indent=2, default=str))
