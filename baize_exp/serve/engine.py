"""The running batch and its decode loop (continuous batching over one KV cache; see baize_exp.serve)."""

from __future__ import annotations

import copy
import inspect
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from transformers import DynamicCache

from baize_exp.models import cut_at_stop, stop_token_ids
from baize_exp.serve.formats import PromptFormat

BASE_ADAPTER = "__base__"  # peft's name for "no adapter" in a mixed-adapter batch


@dataclass
class GenRequest:
    """One chat completion request as the worker sees it. `emit` hands events to the HTTP side (thread-safe)."""

    prompt_ids: list[int]
    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    n: int = 1
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    top_logprobs: int | None = None  # None = no logprobs; 0.. = logprobs with that many alternatives
    stream: bool = False
    model: str = ""  # the served name asked for (answered back in the reply)
    adapter: str | None = None  # the LoRA adapter its rows decode with; None = the base (see ServedModel)
    id: str = field(default_factory=lambda: f"chatcmpl-{uuid.uuid4().hex[:24]}")
    # events: ("delta", choice, text, logprobs), ("done", choice, Choice, unsent text, unsent logprobs),
    # ("error", None, message)
    emit: Callable[[tuple], None] = lambda event: None
    cancelled: bool = False  # set by the HTTP side (timeout, client gone); the worker drops the rows
    generator: torch.Generator | None = None

    def __post_init__(self) -> None:
        if self.seed is not None:
            self.generator = torch.Generator().manual_seed(int(self.seed))


@dataclass(frozen=True)
class ServedModel:
    """A model name the server answers: the shared base with one of its LoRA adapters (or none), in that
    adapter's prompt format. `source` says where the adapter came from (shown by /v1/models and the chat page)."""

    name: str
    adapter: str | None = None  # the peft adapter name inside the one loaded model; None = the base alone
    fmt: PromptFormat = PromptFormat()
    source: str | None = None


@dataclass
class Choice:
    text: str
    finish_reason: str
    completion_tokens: int
    logprobs: list[dict] | None = None


@dataclass
class Row:
    """One answer being written: a row of the running batch."""

    req: GenRequest
    index: int  # choice index within the request
    pending: int = -1  # last sampled token, not yet in the KV cache
    tokens: list[int] = field(default_factory=list)
    logprobs: list[dict] = field(default_factory=list)
    streamed_chars: int = 0
    streamed_logprobs: int = 0
    finish: str | None = None
    text: str = ""


class DecodeEngine:
    """The running batch and its decode loop; used only from the worker thread (see the module docstring)."""

    def __init__(
        self, model: torch.nn.Module, tokenizer: Any, model_name: str, served: list[ServedModel] | None = None
    ):
        """`served`: the names this engine answers (default: `model_name` alone, as the model is). With several
        adapters of one peft model, each row decodes with its request's adapter inside the same batch (peft's
        `adapter_names`), so the base is held once and requests for different models still share every step."""
        self.model = model.eval()
        self.tok = tokenizer  # the HTTP side encodes prompts with it
        self.detok = copy.deepcopy(tokenizer)  # the worker decodes with its own copy: fast tokenizers are not
        # safe to use from two threads at once
        self.served = {s.name: s for s in served or [ServedModel(model_name)]}
        self.model_name = model_name if model_name in self.served else next(iter(self.served))
        self.mixed = hasattr(model, "peft_config") and len({s.adapter for s in self.served.values()}) > 1
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        # EOS and the chat template's end-of-turn token (Llama-3's <|eot_id|>), as the eval stage's generation stops
        self.eos_ids = set(stop_token_ids(model, tokenizer))
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        self.config = base.config
        self.max_positions = int(getattr(self.config, "max_position_embeddings", 0) or 1 << 30)
        # transformers 5 names the cache argument `cache`, older releases `past_key_values`
        self.cache_kw = "cache" if "cache" in inspect.signature(base.forward).parameters else "past_key_values"
        self.rows: list[Row] = []
        self.cache: DynamicCache | None = None
        self.mask: torch.Tensor | None = None  # [rows, cache length], 1 = a real token
        self.decode_steps = self.prefills = self.peak_rows = 0

    def encode_chat(self, messages: list[dict], model: str | None = None) -> list[int]:
        """Token ids of `messages` in the prompt format of the served `model` (default: the engine's own)."""
        text = self.served[model or self.model_name].fmt.render(messages, self.tok)
        return self.tok(text, add_special_tokens=False).input_ids

    def _forward(
        self, ids: torch.Tensor, mask: torch.Tensor, cache: DynamicCache, reqs: list[GenRequest]
    ) -> torch.Tensor:
        """Logits of the last position of each row; `reqs[i]` is row i's request (its adapter)."""
        positions = (mask.cumsum(-1) - 1).clamp(min=0)[:, -ids.shape[1] :]
        extra = {"adapter_names": [r.adapter or BASE_ADAPTER for r in reqs]} if self.mixed else {}
        out = self.model(
            input_ids=ids,
            attention_mask=mask,
            position_ids=positions,
            use_cache=True,
            logits_to_keep=1,
            **{self.cache_kw: cache},
            **extra,
        )
        return out.logits[:, -1, :].float()

    @torch.no_grad()
    def add(self, reqs: list[GenRequest]) -> list[Row]:
        """Prefill `reqs` together, sample their first tokens, merge them into the running batch.
        Returns the new rows (some may already be finished)."""
        width = max(len(r.prompt_ids) for r in reqs)
        ids = torch.tensor([[self.pad_id] * (width - len(r.prompt_ids)) + r.prompt_ids for r in reqs])
        mask = torch.tensor([[0] * (width - len(r.prompt_ids)) + [1] * len(r.prompt_ids) for r in reqs])
        cache = DynamicCache()
        logits = self._forward(ids, mask, cache, reqs)
        self.prefills += 1
        expand = torch.tensor([i for i, r in enumerate(reqs) for _ in range(r.n)])
        new_rows = [Row(r, k) for r in reqs for k in range(r.n)]
        if len(expand) != len(reqs):  # n > 1: the prompt was computed once, its cache row is repeated
            for layer in cache.layers:
                layer.keys, layer.values = layer.keys[expand], layer.values[expand]
            mask, logits = mask[expand], logits[expand]
        self._check_cache(cache)
        if self.cache is None:
            self.cache, self.mask = cache, mask
        else:
            length = max(self.mask.shape[1], mask.shape[1])
            for old, new in zip(self.cache.layers, cache.layers, strict=True):
                old.keys = torch.cat([_pad_left(old.keys, length, -2), _pad_left(new.keys, length, -2)])
                old.values = torch.cat([_pad_left(old.values, length, -2), _pad_left(new.values, length, -2)])
            self.mask = torch.cat([_pad_left(self.mask, length, -1), _pad_left(mask, length, -1)])
        self.rows += new_rows
        self.peak_rows = max(self.peak_rows, len(self.rows))
        self._advance(new_rows, logits)
        return new_rows

    def _check_cache(self, cache: DynamicCache) -> None:
        kinds = {type(layer).__name__ for layer in cache.layers}
        if kinds != {"DynamicLayer"}:
            raise NotImplementedError(
                f"the server's batch merging needs plain full-attention cache layers; this "
                f"model uses {sorted(kinds)} (serve it with vLLM instead)"
            )

    @torch.no_grad()
    def step(self) -> None:
        """Feed every row's pending token; sample the next one per row."""
        ids = torch.tensor([[r.pending] for r in self.rows])
        self.mask = torch.cat([self.mask, torch.ones(len(self.rows), 1, dtype=self.mask.dtype)], dim=1)
        logits = self._forward(ids, self.mask, self.cache, [r.req for r in self.rows])
        self.decode_steps += 1
        self._advance(self.rows, logits)

    def drop_finished(self) -> list[Row]:
        """Take finished (or cancelled) rows out of the batch; their slots are free at once."""
        done = [r for r in self.rows if r.finish is not None or r.req.cancelled]
        if not done:
            return []
        keep = [i for i, r in enumerate(self.rows) if r.finish is None and not r.req.cancelled]
        self.rows = [self.rows[i] for i in keep]
        if not keep:
            self.cache = self.mask = None
            return done
        idx = torch.tensor(keep)
        self.mask = self.mask[idx]
        first = int(self.mask.any(0).nonzero()[0])  # columns left of this are padding in every remaining row
        self.mask = self.mask[:, first:]
        for layer in self.cache.layers:
            layer.keys, layer.values = layer.keys[idx, :, first:], layer.values[idx, :, first:]
        return done

    def _advance(self, rows: list[Row], logits: torch.Tensor) -> None:
        """Sample one token per row with that row's settings and apply the finishing rules."""
        tokens = logits.argmax(-1)
        temps = torch.tensor([r.req.temperature for r in rows])
        sampled = (temps > 0).nonzero().flatten()
        if len(sampled):
            probs = torch.softmax(logits[sampled] / temps[sampled, None], dim=-1)
            for j, i in enumerate(sampled.tolist()):
                tokens[i] = sample_top_p(probs[j], rows[i].req.top_p, rows[i].req.generator)
        want_lp = [i for i, r in enumerate(rows) if r.req.top_logprobs is not None]
        logp = torch.log_softmax(logits[want_lp], -1) if want_lp else None
        for i, (row, tok) in enumerate(zip(rows, tokens.tolist(), strict=True)):
            if tok in self.eos_ids:
                row.finish = "stop"
                continue
            row.pending = tok
            row.tokens.append(tok)
            if logp is not None and i in want_lp:
                row.logprobs.append(self._logprob_entry(logp[want_lp.index(i)], tok, row.req.top_logprobs))
            if row.req.stop or row.req.stream:
                row.text = self.detok.decode(row.tokens, skip_special_tokens=True)
                row.text, stopped = cut_at_stop(row.text, row.req.stop)
                if stopped:
                    row.finish = "stop"
                    continue
            if len(row.tokens) >= row.req.max_tokens or len(row.req.prompt_ids) + len(row.tokens) >= self.max_positions:
                row.finish = "length"

    def _logprob_entry(self, logp: torch.Tensor, tok: int, top: int) -> dict:
        entry = {"token": self.detok.decode([tok]), "logprob": float(logp[tok]), "bytes": None, "top_logprobs": []}
        if top:
            vals, idx = logp.topk(top)
            entry["top_logprobs"] = [
                {"token": self.detok.decode([int(k)]), "logprob": float(v), "bytes": None}
                for v, k in zip(vals, idx, strict=True)
            ]
        return entry

    def final_choice(self, row: Row) -> Choice:
        text = self.detok.decode(row.tokens, skip_special_tokens=True)
        text = cut_at_stop(text, row.req.stop)[0]
        return Choice(
            text=text,
            finish_reason=row.finish or "length",
            completion_tokens=len(row.tokens),
            logprobs=row.logprobs if row.req.top_logprobs is not None else None,
        )

    def stream_delta(self, row: Row) -> tuple[str, list[dict]]:
        """The text and logprobs of `row` not yet streamed, holding back what may still change: a partial UTF-8
        character, or a tail that could be the start of a stop string."""
        text = row.text
        hold = 1 if text.endswith("\ufffd") else 0
        for s in row.req.stop:
            hold = max(hold, max((j for j in range(1, min(len(s), len(text) + 1)) if text.endswith(s[:j])), default=0))
        end = max(row.streamed_chars, len(text) - hold)
        delta, lps = text[row.streamed_chars : end], row.logprobs[row.streamed_logprobs :]
        if delta:
            row.streamed_chars, row.streamed_logprobs = end, len(row.logprobs)
            return delta, lps
        return "", []


def sample_top_p(probs: torch.Tensor, top_p: float, generator: torch.Generator | None, candidates: int = 1024) -> int:
    """Draw one token from `probs` restricted to the smallest set of most likely tokens whose mass reaches
    `top_p` (the most likely token always stays). Inverse-CDF with one uniform draw from `generator`: a full
    sort or `multinomial` over a 49k vocabulary costs more than a small model's decode step on a CPU, so only the
    `candidates` most likely tokens are sorted when they already hold `top_p` of the mass (they almost always do
    for a trained model)."""
    if top_p >= 1:
        values, index = probs, None
    else:
        values, index = probs.topk(min(candidates, probs.numel()))
        if float(values.sum()) < top_p:  # a flat distribution: fall back to sorting everything
            values, index = probs.sort(descending=True)
        keep = (values.cumsum(-1) - values) < top_p
        index, by_id = index[keep].sort()  # draw in token-id order: near-equal probabilities that swap places
        values = values[keep][by_id]  # in a batch (float noise) then move the draw only at a bucket edge
    cdf = values.cumsum(-1)
    u = torch.rand((), generator=generator) * cdf[-1]
    pick = min(int(torch.searchsorted(cdf, u, right=True)), len(cdf) - 1)
    return pick if index is None else int(index[pick])


def _pad_left(t: torch.Tensor, length: int, dim: int) -> torch.Tensor:
    missing = length - t.shape[dim]
    if missing == 0:
        return t
    pad = [0, 0] * (-dim - 1) + [missing, 0]  # F.pad counts dimensions from the last one
    return F.pad(t, pad)
