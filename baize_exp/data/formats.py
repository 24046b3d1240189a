"""The text formats models are trained on and prompted in: the Baize transcript (`[|Human|]`/`[|AI|]` markers,
labels on what the AI says) and the tokenizer's chat template; the tokenizer's BOS first, exactly once."""

from __future__ import annotations

from typing import Any

BAIZE_HEADER = "The conversation between human and AI assistant."
BAIZE_HUMAN, BAIZE_AI = "[|Human|]", "[|AI|]"


def baize_segments(turns: list[dict]) -> list[tuple[str, bool]]:
    """The Baize training text as (segment, is_ai_text) pieces, so labels can cover only what the AI says.

    Layout: header, then `[|Human|] text` / `[|AI|] text` lines; the marker of the next turn closes an AI turn,
    so the final AI turn is closed with a trailing `[|Human|]` marker, which the model learns to emit to stop.
    """
    segs: list[tuple[str, bool]] = [(BAIZE_HEADER, False)]
    for t in turns:
        if t["role"] == "human":
            segs.append((f"\n{BAIZE_HUMAN} {t['text']}\n{BAIZE_AI}", False))
        else:
            segs.append((f" {t['text']}", True))
    segs.append((f"\n{BAIZE_HUMAN}", True))
    return segs


def baize_prompt(question: str, history: list[dict] | None = None) -> str:
    """Prompt for generation in the Baize format: header, history, the question, then the AI marker.

    The training text up to where the AI's answer starts (without the closing marker training adds)."""
    segs = baize_segments([*(history or []), {"role": "human", "text": question}])
    return "".join(s for s, _ in segs[:-1])


def bos_text(tok: Any) -> str:
    """The BOS token the tokenizer puts before plain text (Llama-3's `<|begin_of_text|>`, Mistral's `<s>`), or ""
    for one that puts none (SmolLM2, Qwen2). Read from what encoding does, not from a flag: Llama-3's tokenizer
    adds it through its post-processor and has no `add_bos_token`."""
    if tok is None or tok.bos_token_id is None:
        return ""
    ids = tok("a", add_special_tokens=True).input_ids
    added = ids[: len(ids) - len(tok("a", add_special_tokens=False).input_ids)]
    return tok.bos_token if added[:1] == [tok.bos_token_id] else ""


def with_bos(text: str, tok: Any) -> str:
    """`text` starting with the tokenizer's BOS exactly once: the model was trained with it first, and text is
    tokenized with add_special_tokens=False everywhere (so a chat template that renders BOS itself gets no second)."""
    bos = bos_text(tok)
    return text if not bos or text.startswith(bos) else bos + text


def generation_prompt(question: str, fmt: str = "baize", tok: Any = None) -> str:
    """The prompt a model tuned in `fmt` (train.format) answers: the Baize markers, or the tokenizer's chat
    template (what chat_template training supervised); with the tokenizer's BOS first, once (`with_bos`)."""
    if fmt == "chat_template":
        text = tok.apply_chat_template(
            [{"role": "user", "content": question}], tokenize=False, add_generation_prompt=True
        )
    else:
        text = baize_prompt(question)
    return with_bos(text, tok)


def to_baize_text(turns: list[dict]) -> str:
    return "".join(s for s, _ in baize_segments(turns))


def to_chat_messages(turns: list[dict]) -> list[dict]:
    """OpenAI/ChatML messages for export to other tools."""
    return [{"role": "user" if t["role"] == "human" else "assistant", "content": t["text"]} for t in turns]
