"""The blind arena: two anonymous models answer the same prompt or eval question; a person votes; only then are
the names revealed. Pairs live in memory until voted on; each vote is appended to the votes file as it is cast
(`baize_exp.human.VoteLog`: flushed and fsynced), so a crash loses at most the vote in flight."""

from __future__ import annotations

import random
import secrets
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

from baize_exp.human import VOTES, VoteLog
from baize_exp.serve.ui.catalog import Catalog, ChatModel

SLOTS = ("A", "B")
MAX_PENDING = 1000  # pairs shown but not voted on that are kept (the oldest are forgotten first)


class VoteRefused(Exception):
    """A vote request that is refused; `status` is the HTTP status to answer with."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


@dataclass
class Pair:
    """One battle: the question, the two models in the order shown (A, B), and their answers once complete."""

    pair_id: str
    question: str
    question_id: str | None
    models: dict[str, ChatModel]
    settings: dict
    answer_source: str  # "eval": the answers the eval stage recorded; "live": generated now
    answers: dict[str, str | None] = field(default_factory=lambda: {"A": None, "B": None})
    voted: bool = False


class Arena:
    def __init__(self, catalog: Catalog, votes: VoteLog, rng: random.Random | None = None):
        self.catalog, self.votes = catalog, votes
        self.rng = rng or random.Random(secrets.randbits(64))
        self.pending: OrderedDict[str, Pair] = OrderedDict()

    def new_pair(self, prompt: str | None, settings: dict) -> Pair:
        """Draw two different models in a random order and, without a prompt, an eval question; an eval question
        both models have recorded eval answers for is preferred (then those answers are shown)."""
        if len(self.catalog.models) < 2:
            raise VoteRefused(400, "the arena needs at least two models; pass a run dir with v1 (or more adapters)")
        a, b = self.rng.sample(self.catalog.models, 2)
        qid, source = None, "live"
        if prompt is None:
            rec = self.catalog.recorded
            both = [
                q
                for q in self.catalog.questions
                if (a.label, str(q["question_id"])) in rec and (b.label, str(q["question_id"])) in rec
            ]
            q = self.rng.choice(both or self.catalog.questions)
            prompt, qid, source = q["question"], str(q["question_id"]), "eval" if both else "live"
            settings = {"temperature": 0.0, "max_tokens": self.catalog.eval_max_tokens}  # as the eval stage asks
        pair = Pair(secrets.token_hex(8), prompt, qid, {"A": a, "B": b}, settings, source)
        if source == "eval":
            pair.answers = {s: self.catalog.recorded[(m.label, qid)] for s, m in pair.models.items()}
        self.pending[pair.pair_id] = pair
        while len(self.pending) > MAX_PENDING:
            self.pending.popitem(last=False)
        return pair

    def vote(self, body: Any) -> dict:
        """Check a vote request, append the vote, and reveal the names. Raises VoteRefused (nothing written)."""
        if not isinstance(body, dict):
            raise VoteRefused(422, 'the body must be a JSON object {"pair_id": ..., "vote": ...}')
        missing = [k for k in ("pair_id", "vote") if k not in body]
        if missing:
            raise VoteRefused(
                422, f"missing field(s) {missing}: a vote is {{'pair_id': str, 'vote': one of {list(VOTES)}}}"
            )
        if body["vote"] not in VOTES:
            raise VoteRefused(422, f"vote={body['vote']!r}: must be one of {list(VOTES)}")
        pair = self.pending.get(body["pair_id"]) if isinstance(body["pair_id"], str) else None
        if pair is None:
            raise VoteRefused(
                400,
                f"pair_id={body['pair_id']!r} is not a battle this server showed (a restart forgets unvoted "
                "battles): start a new one",
            )
        if pair.voted:
            raise VoteRefused(409, f"pair {pair.pair_id} has been voted on already")
        if any(pair.answers[s] is None for s in SLOTS):
            raise VoteRefused(409, f"pair {pair.pair_id}: both answers must be complete before a vote")
        record = {
            "pair_id": pair.pair_id,
            "time": round(time.time(), 3),
            "question": pair.question,
            "question_id": pair.question_id,
            "source": "eval" if pair.question_id is not None else "prompt",
            "order": [pair.models[s].label for s in SLOTS],
            "models": {s: pair.models[s].record() for s in SLOTS},
            "answers": dict(pair.answers),
            "answer_source": pair.answer_source,
            "settings": pair.settings,
            "vote": body["vote"],
        }
        self.votes.append(record)  # raises (and nothing is marked) if the disk refuses
        pair.voted = True  # kept (bounded by MAX_PENDING), so a second vote on it is told so
        return {"recorded": True, "reveal": record["order"], "votes": self.votes.count}
