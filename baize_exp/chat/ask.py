"""Ask for something the reply must state in a given form, parse it strictly, retry once with the parser's error,
record what still fails: the one loop behind SDF's rankings and the judge's scores and verdicts.

A request that failed for a transient reason (see `ChatClient`) is not sent back with a complaint (there is no
reply to correct): its answer carries `failed`, so the caller keeps it out of caches and a rerun asks again.

The backend is anything with the online client's `complete_many` and `defaults` (`Asker`): the `ChatClient`, a
`BatchRunner` (one batch per round), or either held to `<role>.max_cost_usd` (`cost.Budgeted`). A budget that
refuses the first round stops before anything is sent (`BudgetReached`); one that refuses the retries leaves
them failed, the first replies kept.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from baize_exp.chat.client import ChatResult
from baize_exp.chat.cost import BudgetReached

# parse(result) -> (value or None, how it was read, the parser's error); `how` is the parser's own word ("ok",
# "tolerant", "logprobs", ...), "failed" when value is None
Parser = Callable[[ChatResult], tuple[Any, str, str | None]]


class Asker(Protocol):
    """What `ask_parsed` asks through: the online client, a batch runner, or a budgeted one of them."""

    defaults: dict[str, Any]

    def complete_many(
        self, conversations: Sequence[list[dict]], desc: str | None = None, **params: Any
    ) -> list[ChatResult]: ...


@dataclass
class Answer:
    value: Any  # what the parser read, None if nothing could be
    how: str  # the parser's `how` for the first reply, "retried" if only the retry parsed, else "failed"
    reply: str | None  # the first reply (None if its request failed)
    retry_reply: str | None = None  # the reply to the retry prompt, when there was one
    error: str | None = None  # why it is unparsed (the parser's error or the request's), else None
    failed: str | None = None  # the request failed for a transient reason: ask again later
    logprobs: dict | None = None  # the logprobs of the reply the value was read from
    retried: bool = False


def ask_parsed(
    client: Asker,
    convs: list[list[dict]],
    parse: Parser,
    retry_prompt: Callable[[str], str],
    desc: str,
    **params: Any,
) -> list[Answer]:
    """One request per conversation, `client.concurrency` at a time; a reply the parser cannot read is sent back
    once as `[..., the reply, retry_prompt(error)]`. Answers in input order."""
    answers = []
    for res in client.complete_many(convs, desc=desc, **params):
        answers.append(_read(res, parse))
    again = [i for i, a in enumerate(answers) if a.value is None and not a.failed]
    if again:
        retries = [
            convs[i]
            + [
                {"role": "assistant", "content": answers[i].reply or ""},
                {"role": "user", "content": retry_prompt(answers[i].error or "no reply")},
            ]
            for i in again
        ]
        try:
            second_round = client.complete_many(retries, desc=f"{desc} retry", **params)
        except BudgetReached as e:  # the first replies are kept; the retries are asked again by a rerun
            second_round = [ChatResult(error=str(e), transient=True) for _ in retries]
        for i, res in zip(again, second_round, strict=True):
            second = _read(res, parse)
            a = answers[i]
            a.retried, a.retry_reply, a.failed = True, second.reply, second.failed
            a.value, a.error, a.logprobs = second.value, second.error, second.logprobs
            a.how = "retried" if second.value is not None else "failed"
    return answers


def _read(res: ChatResult, parse: Parser) -> Answer:
    logprobs = res.logprobs[0] if res.logprobs else None
    if res.error:
        return Answer(
            None, "failed", None, error=f"request failed: {res.error}", failed=res.error if res.transient else None
        )
    value, how, error = parse(res)
    return Answer(value, how if value is not None else "failed", res.text, error=error, logprobs=logprobs)
