"""What a collection will cost before it is spent, and the guard that stops spending at `teacher.max_cost_usd`.

The estimate (`estimate_collection`) counts requests, prompt tokens and completion tokens for the seeds still to
collect, and prices them online and through the Batch API:

- prompt tokens come from the collect template(s) filled with a random sample of the seeds, counted with the
  teacher's tokenizer rendered as the local server renders a chat (exact for `teacher=local`), else with the rule
  of 4 characters a token plus 3 tokens a message and 3 to start the reply (OpenAI's rule of thumb and its
  chat-format overhead). `tiktoken` is not used: it downloads its tables from the internet on first use, which the
  machines this runs on cannot reach, and the calibration below corrects the rule anyway;
- completion tokens are unknown before the teacher answers: without finished dialogs the estimate is the upper
  bound (every reply `max_tokens` long, and in turns mode every turn too); once a collection has finished records
  (a resumed run), their recorded `usage` gives the mean completion tokens and requests per seed, and the ratio of
  their recorded prompt tokens to what the rule computes for their seeds calibrates the prompt count.

`Budget` keeps the spend so far (earlier runs' records plus this run's replies) and reserves each request's worst
case (its prompt plus `max_tokens`) before it is sent, settling it with the reply's real usage; a request whose
reservation would pass the limit is not sent, and `Budget.exceeded()` is the one line that says how far the run got.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from baize_exp.errors import UserError

CHARS_PER_TOKEN = 4.0  # English text, OpenAI's rule of thumb
TOKENS_PER_MESSAGE = 3  # the chat format's role and separators around each message (OpenAI's count)
TOKENS_TO_REPLY = 3  # the start of the assistant's reply


class BudgetReached(UserError):
    """The next request would pass `<role>.max_cost_usd`: the run stopped before spending it."""


def price_of(bcfg: Any) -> dict[str, float] | None:
    """{prompt, completion} USD per 1M tokens for a teacher/judge config's model, or None without a price."""
    price = bcfg.prices.get(bcfg.model) if bcfg.prices else None
    return None if price is None else {"prompt": float(price["prompt"]), "completion": float(price["completion"])}


def usd(prompt_tokens: float, completion_tokens: float, price: dict[str, float] | None, discount: float = 1.0):
    """USD for these tokens at `price` (per 1M tokens) times `discount`; None without a price."""
    if price is None:
        return None
    return (prompt_tokens * price["prompt"] + completion_tokens * price["completion"]) / 1e6 * discount


class TokenCounter:
    """Tokens of a chat request's prompt, with the teacher's tokenizer when it is known, else by characters."""

    def __init__(self, tokenizer: Any = None):
        self.tokenizer = tokenizer
        self.basis = "the teacher's tokenizer" if tokenizer is not None else f"{CHARS_PER_TOKEN:g} characters a token"

    def text(self, text: str) -> int:
        if self.tokenizer is not None:
            return len(self.tokenizer(text, add_special_tokens=False).input_ids)
        return round(len(text) / CHARS_PER_TOKEN)

    def prompt(self, messages: list[dict]) -> int:
        """The prompt tokens an endpoint counts for `messages`: with a tokenizer, the chat template rendered as the
        local server renders it (BOS once, the reply's start included)."""
        if self.tokenizer is not None:
            from baize_exp.data import with_bos

            tok = self.tokenizer
            text = with_bos(tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True), tok)
            return len(tok(text, add_special_tokens=False).input_ids)
        return sum(self.text(str(m.get("content") or "")) + TOKENS_PER_MESSAGE for m in messages) + TOKENS_TO_REPLY

    def filler(self, tokens: int) -> str:
        """A text about `tokens` tokens long (a turn as long as max_tokens allows, for the upper bound)."""
        if self.tokenizer is None:
            return "x" * int(tokens * CHARS_PER_TOKEN)
        return " word" * tokens  # one token per " word" in BPE vocabularies of English


@dataclass
class Estimate:
    """Requests, tokens and dollars for the seeds still to collect (expected, and the `_max` upper bounds)."""

    model: str
    mode: str
    seeds: int  # seeds still to collect (each gets its requests)
    too_long: int  # seeds over collect.max_seed_tokens: a reject without a request
    done: int  # seeds finished before (records given)
    requests: int
    requests_max: int
    prompt_tokens: int
    prompt_tokens_max: int
    completion_tokens: int
    completion_tokens_max: int
    price: dict[str, float] | None  # USD per 1M tokens online
    batch_discount: float
    prompt_basis: str
    completion_basis: str

    def usd(self, batch: bool = False, worst: bool = False) -> float | None:
        p, c = (
            (self.prompt_tokens_max, self.completion_tokens_max)
            if worst
            else (self.prompt_tokens, self.completion_tokens)
        )
        return usd(p, c, self.price, self.batch_discount if batch else 1.0)

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        for batch in (False, True):
            for worst in (False, True):
                out[f"usd_{'batch' if batch else 'online'}{'_max' if worst else ''}"] = self.usd(batch, worst)
        return out

    def lines(self) -> list[str]:
        """The estimate as `--estimate` prints it."""

        def dollars(x: float) -> str:
            return f"${x:,.2f}" if x >= 1 else f"${x:.4f}"

        def money(batch: bool) -> str:
            exp, worst = self.usd(batch), self.usd(batch, worst=True)
            return "no price for this model" if exp is None else f"{dollars(exp)} (at most {dollars(worst)})"

        return [
            f"estimate for {self.seeds:,} seeds to collect ({self.done:,} done"
            + (f", {self.too_long:,} over collect.max_seed_tokens get no request" if self.too_long else "")
            + f"), {self.mode} mode, model {self.model}:",
            f"  requests           {self.requests:>14,}  (at most {self.requests_max:,})",
            f"  prompt tokens      {self.prompt_tokens:>14,}  ({self.prompt_basis})",
            f"  completion tokens  {self.completion_tokens:>14,}  ({self.completion_basis})",
            f"  USD online         {money(False)}",
            f"  USD batch          {money(True)}  ({self.batch_discount:.0%} of the online price)",
        ]


def collect_requests(seed: str, ccfg: Any, turn_texts: str | Sequence[str] = "") -> list[list[dict]]:
    """The requests collect sends for one seed, as message lists in the shape the collect stage builds them
    (transcript: one; turns: one per generated turn, up to `collect.max_turns`). `turn_texts`: the generated turns
    (one text for all of them, or one per turn: then the requests that made those turns)."""
    if ccfg.mode == "transcript":
        return [[{"role": "user", "content": ccfg.template.format(seed=seed)}]]
    texts = [turn_texts] * ccfg.max_turns if isinstance(turn_texts, str) else list(turn_texts)
    turns = [{"role": "human", "text": seed}]
    out = []
    while len(turns) < ccfg.max_turns and len(out) < len(texts):
        role = "ai" if turns[-1]["role"] == "human" else "human"
        if role == "ai":
            msgs = [{"role": "system", "content": ccfg.ai_system.format(seed=seed)}] + [
                {"role": "user" if t["role"] == "human" else "assistant", "content": t["text"]} for t in turns
            ]
        else:
            history = "\n".join(f"[{'Human' if t['role'] == 'human' else 'AI'}] {t['text']}" for t in turns)
            msgs = [{"role": "user", "content": ccfg.human_template.format(seed=seed, history=history)}]
        out.append(msgs)
        turns.append({"role": role, "text": texts[len(out) - 1]})
    return out


def estimate_collection(
    seeds: Sequence[str],
    ccfg: Any,
    tcfg: Any,
    *,
    tokenizer: Any = None,
    finished: Iterable[dict] = (),
    sample: int = 256,
    rng_seed: int = 0,
    done: int | None = None,
) -> Estimate:
    """The estimate for collecting `seeds` (the questions still to ask) with collect config `ccfg` and teacher
    `tcfg`; `finished`: the collection's records so far (dialogs and rejects, with their recorded `usage` and
    `requests`), which refine it (see the module docstring), or a sample of them with `done` saying how many seeds
    are finished (a large collection's records are never all read into memory). `tokenizer`: the teacher's, when
    it is local."""
    finished = list(finished)
    counter = TokenCounter(tokenizer)
    max_tokens = int(tcfg.max_tokens)
    fill = counter.filler(max_tokens) if ccfg.mode == "turns" else ""
    rng = random.Random(rng_seed)
    limit = getattr(ccfg, "max_seed_tokens", None)

    def too_long(q: str) -> bool:  # the collect stage's rule: no request for a seed over collect.max_seed_tokens
        if not limit:
            return False
        if tokenizer is None:
            return len(q) > CHARS_PER_TOKEN * limit
        return len(q.encode()) > limit and counter.text(q) > limit  # a (byte-level) token is at least a byte

    every = list(seeds)
    seeds = [q for q in every if not too_long(q)]
    picked = seeds if len(seeds) <= sample else rng.sample(seeds, sample)
    per_seed_max = len(collect_requests("", ccfg))

    def model_prompt(seed: str) -> int:  # the upper-bound prompt tokens of one seed's requests
        return sum(counter.prompt(m) for m in collect_requests(seed, ccfg, fill))

    mean_prompt = sum(model_prompt(s) for s in picked) / len(picked) if picked else 0.0
    records = [
        r
        for r in finished
        if r.get("mode", ccfg.mode) == ccfg.mode and isinstance(r.get("usage"), dict) and r.get("requests")
    ]
    if len(records) > sample:
        records = rng.sample(records, sample)
    n = len(seeds)
    prompt_max = round(mean_prompt * n)
    requests_max = per_seed_max * n
    completion_max = requests_max * max_tokens
    if records:
        recorded_prompt = sum(r["usage"].get("prompt_tokens", 0) for r in records)
        modelled = sum(model_prompt(r["seed"]) for r in records)
        ratio = recorded_prompt / modelled if modelled else 1.0
        prompt = round(mean_prompt * ratio * n)
        completion = round(sum(r["usage"].get("completion_tokens", 0) for r in records) / len(records) * n)
        requests = round(min(per_seed_max, sum(r["requests"] for r in records) / len(records)) * n)
        prompt_basis = (
            f"the template(s) and {len(picked)} sampled seeds, {counter.basis}, x{ratio:.2f} as measured on "
            f"{len(records)} finished dialogs"
        )
        completion_basis = (
            f"mean of {len(records)} finished dialogs; at most {completion_max:,} at max_tokens={max_tokens}"
        )
    else:
        prompt, completion, requests = prompt_max, completion_max, requests_max
        prompt_basis = f"the template(s) and {len(picked)} sampled seeds, {counter.basis}"
        if ccfg.mode == "turns":
            prompt_basis += f", every turn max_tokens={max_tokens} long (an upper bound)"
        completion_basis = f"every reply max_tokens={max_tokens} long: an upper bound until some dialogs finish"
    return Estimate(
        model=tcfg.model,
        mode=ccfg.mode,
        seeds=n,
        too_long=len(every) - n,
        done=len({r.get("key") for r in finished}) if done is None else done,
        requests=requests,
        requests_max=requests_max,
        prompt_tokens=prompt,
        prompt_tokens_max=max(prompt, prompt_max),
        completion_tokens=completion,
        completion_tokens_max=completion_max,
        price=price_of(tcfg),
        batch_discount=float(getattr(tcfg, "batch_discount", 0.5)),
        prompt_basis=prompt_basis,
        completion_basis=completion_basis,
    )


def spent_usd(records: Iterable[dict], price: dict[str, float] | None, discount: float = 0.5) -> float | None:
    """What finished records cost (their recorded `usage`); a record marked `"batch": true` at the batch
    `discount`. None without a price."""
    if price is None:
        return None
    total = 0.0
    for r in records:
        u = r.get("usage") or {}
        total += usd(u.get("prompt_tokens", 0), u.get("completion_tokens", 0), price, discount if r.get("batch") else 1)
    return total


class Budget:
    """Spending against `max_usd` (None = no limit): reserve a request's worst case before sending it, settle it
    with the real usage after. Reservations make concurrent requests safe: those in flight count at their worst.

    Args:
        max_usd: the limit (`<role>.max_cost_usd`).
        price: {prompt, completion} USD per 1M tokens online (`price_of(bcfg)`); a limit needs one.
        discount: the share of the online price these requests cost (1 online, `batch_discount` for batches).
        spent_usd: what earlier runs spent on this collection (`spent_usd(records, ...)`).
        role: `teacher` or `judge`, for the message.
    """

    def __init__(
        self,
        max_usd: float | None,
        price: dict[str, float] | None,
        *,
        discount: float = 1.0,
        spent_usd: float = 0.0,
        role: str = "teacher",
    ):
        if max_usd is not None and price is None:
            raise UserError(f"{role}.max_cost_usd={max_usd} needs a price: set {role}.prices.<model>")
        self.max_usd, self.price, self.discount, self.role = max_usd, price, discount, role
        self.earlier_usd = spent_usd or 0.0
        self.spent_usd = self.earlier_usd  # earlier runs + settled requests of this run
        self.reserved_usd = 0.0  # requests in flight, at their worst case
        self.requests = 0  # settled requests of this run
        self.refused_usd: float | None = None  # the reservation that was refused, for the message

    def cost(self, prompt_tokens: float, completion_tokens: float) -> float:
        return usd(prompt_tokens, completion_tokens, self.price, self.discount) or 0.0

    def reserve(self, prompt_tokens: float, max_completion_tokens: float) -> float | None:
        """Reserve a request's worst case; None if it would pass the limit (send nothing, see `exceeded`)."""
        need = self.cost(prompt_tokens, max_completion_tokens)
        if self.max_usd is not None and self.spent_usd + self.reserved_usd + need > self.max_usd:
            self.refused_usd = need
            return None
        self.reserved_usd += need
        return need

    def settle(self, reserved: float, usage: dict | None) -> None:
        """A reserved request ended: its real cost replaces the reservation (no usage: it cost nothing)."""
        self.reserved_usd = max(0.0, self.reserved_usd - reserved)
        u = usage or {}
        self.spent_usd += self.cost(u.get("prompt_tokens", 0), u.get("completion_tokens", 0))
        self.requests += 1

    def fit(self, worst_cases: Iterable[tuple[float, float]]) -> int:
        """How many of the next requests (prompt tokens, max completion tokens) fit, reserving them (a batch is
        reserved as a whole; settle each request after)."""
        n = 0
        for p, c in worst_cases:
            if self.reserve(p, c) is None:
                break
            n += 1
        return n

    def exceeded(self, progress: str = "") -> BudgetReached:
        """The one line for a run stopped at the limit; `progress` says what got done (e.g. "812 of 10,000 seeds")."""
        nxt = f"; the next request could cost up to ${self.refused_usd:.4f}" if self.refused_usd is not None else ""
        earlier = f" (${self.earlier_usd:.4f} of it by earlier runs)" if self.earlier_usd else ""
        done = f" {progress}." if progress else ""
        return BudgetReached(
            f"{self.role}.max_cost_usd={self.max_usd:g} reached: ${self.spent_usd:.4f} spent{earlier}, "
            f"{self.requests:,} requests in this run{nxt}; stopped before passing it.{done} Raise "
            f"{self.role}.max_cost_usd and run the same command again to go on from here (nothing finished is lost)"
        )


class Budgeted:
    """A backend (`ChatClient` or `BatchRunner`) whose `complete_many` rounds are held to a `Budget`: a round whose
    worst case (every prompt as `TokenCounter` counts it, plus max_tokens x n) does not fit is refused whole,
    before any of it is sent (`BudgetReached`); a round that fits is settled with its replies' usage. Everything
    else is the backend's."""

    def __init__(self, backend: Any, budget: Budget, counter: TokenCounter | None = None):
        self.backend, self.budget, self.counter = backend, budget, counter or TokenCounter()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.backend, name)

    def complete_many(self, conversations: Sequence[list[dict]], desc: str | None = None, **params: Any) -> list:
        kw = {**self.backend.defaults, **params}
        worst = int(kw.get("max_tokens") or 0) * int(kw.get("n") or 1)
        held = [self.budget.reserve(self.counter.prompt(m), worst) for m in conversations]
        if None in held:
            for h in held:  # nothing of this round is sent
                if h is not None:
                    self.budget.reserved_usd = max(0.0, self.budget.reserved_usd - h)
            raise self.budget.exceeded(f"{len(conversations):,} requests ({desc or 'a round'}) were not sent.")
        results = self.backend.complete_many(conversations, desc, **params)
        for h, res in zip(held, results, strict=True):
            self.budget.settle(h, res.usage)
        return results
