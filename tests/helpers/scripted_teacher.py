"""A scripted teacher and judge for the loopback fault server: fast, deterministic, and right where it matters.

    with FaultServer(api_key="k", reply=scripted_reply(references())) as srv: ...

A collection request gets a transcript of its own for every seed (words hashed from the seed: no near-duplicates),
a ranking request "2 > 1", and a judge request a knowing score: 9 for an answer that is the question's reference,
3 for anything else. The embedded 135M model stays the teacher of the end-to-end test (tests/test_pipeline.py);
tests about what surrounds the teacher (sweeps, the reproduction's driver) use this one.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable

from baize_exp.data import load_eval_questions

WORDS = [
    "river", "stone", "light", "garden", "market", "signal", "method", "window", "number", "letter",
    "music", "paper", "planet", "theory", "habit", "engine", "bridge", "season", "memory", "pattern",
]  # fmt: skip


def words(key: str, n: int) -> str:
    """`n` words picked by a hash of `key`."""
    h = hashlib.sha256(key.encode()).digest()
    return " ".join(WORDS[b % len(WORDS)] for b in h[:n])


def references() -> dict[str, str]:
    """{question: reference answer} of the shipped eval questions."""
    return {q["question"]: q["reference"].strip() for q in load_eval_questions(None, None) if q.get("reference")}


def scripted_reply(refs: dict[str, str]) -> Callable[[dict], str]:
    def reply(req: dict) -> str:
        text = req["messages"][-1]["content"]
        if "Rank these" in text or "I could not read a ranking" in text:
            return "2 > 1"
        if 'Reply in the form "Score: N"' in text or "I could not read a score" in text:
            question = text.split("Question: ", 1)[1].split("\n\n", 1)[0]
            answer = text.split("\n\nAnswer: ", 1)[-1].rsplit("\n\nReply in the form", 1)[0].strip()
            return "Score: 9" if refs.get(question) == answer else "Score: 3"
        seed = text.strip().splitlines()[-1]  # a transcript of its own for every seed (no near-duplicates)
        return (
            f"[Human] {seed}\n[AI] {words(seed + 'a', 14)}.\n[Human] {words(seed + 'h', 6)}?\n"
            f"[AI] {words(seed + 'b', 16)}.\n"
        )

    return reply
