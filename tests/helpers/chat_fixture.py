"""A run dir for the chat page: a small random base whose greedy answers depend on the whole prompt (saved as an
HF dir the run's config names), v1 (Baize format) and v2 (chat template) as LoRA adapters with non-zero weights,
and eval files whose recorded answers carry markup (<script>, <b>) that the page must show as text."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from baize_exp.data import load_eval_questions
from baize_exp.training import CHAT_TEMPLATE_FORMAT, PROMPT_FORMAT

CACHE = Path(os.environ.get("BAIZE_CACHE") or "~/.cache/baize_exp").expanduser()
MARKUP = '<script>window.__pwned = 1</script><b>bold</b><img src=x onerror="window.__pwned = 2">'


def make_base(out: Path) -> Path:
    """A random 2-layer Llama with untied embeddings and a wide init: unlike model=tiny it does not just repeat
    its last input token, so another adapter or prompt format changes its greedy answer."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from baize_exp.models import tokenizer_dir

    tok = AutoTokenizer.from_pretrained(tokenizer_dir(CACHE))
    cfg = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        tie_word_embeddings=False,
        initializer_range=0.2,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        LlamaForCausalLM(cfg).save_pretrained(out)
    tok.save_pretrained(out)
    return out


def make_adapter(base_dir: Path, out: Path, seed: int, fmt: dict) -> Path:
    """A LoRA adapter with random, non-zero A and B (so it changes the answers) and its prompt_format.json."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        base = AutoModelForCausalLM.from_pretrained(base_dir)
        lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False)
        get_peft_model(base, lora).save_pretrained(out)
    (out / "prompt_format.json").write_text(json.dumps(fmt))
    return out


def make_chat_run(run: Path, base_dir: Path) -> Path:
    """<run>/.hydra/config.yaml naming `base_dir`, train/adapter (v1), sdf/adapter (v2), and eval/answers.jsonl
    for the first three shipped questions, every answer holding MARKUP."""
    (run / ".hydra").mkdir(parents=True)
    (run / ".hydra" / "config.yaml").write_text(
        f"model:\n  name: ctx\n  source: hf\n  path: {base_dir}\n  tie_word_embeddings: false\n"
        "eval:\n  questions: null\n  limit: 3\n  max_new_tokens: 12\n  judge_mode: single\n"
    )
    make_adapter(base_dir, run / "train" / "adapter", 1, PROMPT_FORMAT)
    make_adapter(base_dir, run / "sdf" / "adapter", 2, CHAT_TEMPLATE_FORMAT)
    (run / "eval").mkdir()
    rows = [
        {"question_id": q["question_id"], "category": q["category"], "model": m, "answer": f"{m} says {MARKUP}"}
        for q in load_eval_questions(None, 3)
        for m in ("base", "v1", "v2")
    ]
    (run / "eval" / "answers.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return run
