"""Each served model's prompt format: how a list of chat messages becomes the text it answers.

The base answers through its tokenizer's chat template (what it was tuned for); an adapter of a run in the format
it was trained in, which `save_adapter` writes beside it as `prompt_format.json` (`baize`: the Baize markers, or
`chat_template`). An adapter without that file (one made elsewhere) gets the chat template. This is the rendering
the eval stage uses for its single-turn prompts (`data.generation_prompt`), extended to a whole conversation.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from baize_exp.data import BAIZE_HEADER, BAIZE_HUMAN, baize_prompt, with_bos

ROLES = {"user": "human", "assistant": "ai"}


@dataclass(frozen=True)
class PromptFormat:
    """`kind` is `chat_template` or `baize`; `stop` is what the model emits to end its turn besides EOS."""

    kind: str = "chat_template"
    stop: tuple[str, ...] = ()

    @classmethod
    def of_adapter(cls, adapter_dir: str | Path | None) -> PromptFormat:
        """The format an adapter was trained in (its prompt_format.json), else the chat template."""
        doc = Path(adapter_dir) / "prompt_format.json" if adapter_dir else None
        if doc is None or not doc.is_file():
            return cls()
        spec = json.loads(doc.read_text())
        if spec.get("format") == "baize":
            return cls("baize", tuple(spec.get("stop") or [BAIZE_HUMAN]))
        return cls()

    @property
    def label(self) -> str:
        return "Baize format" if self.kind == "baize" else "chat template"

    def render(self, messages: list[dict], tok: Any) -> str:
        """The prompt text for `messages` (OpenAI roles), ending where the model's answer starts. Raises
        ValueError for what the format cannot express."""
        if self.kind == "chat_template":
            text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        else:
            text = _baize_text(messages)
        return with_bos(text, tok)


def _baize_text(messages: list[dict]) -> str:
    """Baize's transcript: its header (any system text on the lines below it), then `[|Human|]`/`[|AI|]` turns,
    ending with the AI marker the answer follows."""
    system = [m["content"] for m in messages if m["role"] == "system"]
    turns = []
    for k, m in enumerate(messages):
        if m["role"] == "system":
            continue
        if m["role"] not in ROLES:
            raise ValueError(f"messages[{k}]: role {m['role']!r}; a Baize-format model knows system, user, assistant")
        turns.append({"role": ROLES[m["role"]], "text": m["content"]})
    if not turns or turns[-1]["role"] != "human":
        raise ValueError("a Baize-format model answers a user message: the last message must have role 'user'")
    text = baize_prompt(turns[-1]["text"], turns[:-1])
    return BAIZE_HEADER + "".join(f"\n{s}" for s in system) + text[len(BAIZE_HEADER) :]
