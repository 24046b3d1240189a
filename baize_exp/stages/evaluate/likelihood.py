"""Judge-free signals, per item so two models can be compared on the same items (paired):

- held-out loss: per held-out teacher dialog, the summed log-probability of its AI turns (the training labels);
  the stage's `heldout_loss` is the token-weighted mean over dialogs, as before. With `eval.heldout_all_tokens`
  also over every token of the dialog (`heldout_all`): the objective of `train.loss_on=all`, beside that of
  `loss_on=ai`, so neither arm of that ablation is scored only on its own objective.
- reference log-likelihood: per eval question, the log-probability of the shipped reference answer after the
  question's prompt, per token. A 135M judge may not tell two models apart; this does not need one.

Every model is scored in every format of `eval.formats` (`likelihood_formats`: the Baize transcript and the
chat template), each item recording its format: a tuned model and its base are then compared in the same
format, not each in its own, so "v1 beats base" is not just "v1 knows the format it was trained in".
"""

from __future__ import annotations

import math
from typing import Any

import torch

from baize_exp.training.data import IGNORE, collate, tokenize_dialog


@torch.no_grad()
def item_logprobs(
    model: torch.nn.Module, encoded: list[dict], pad_id: int, batch_size: int = 4
) -> list[tuple[float, int]]:
    """(sum of the labelled tokens' log-probabilities, number of labelled tokens) per encoded item
    ({"input_ids", "labels"}, labels IGNORE where not scored), in the items' order. Batched by length (shortest
    first), so a batch pads little: the forward pass is the whole cost here."""
    model.eval()
    device = next(model.parameters()).device
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]["input_ids"]))
    out: dict[int, tuple[float, int]] = {}
    for start in range(0, len(order), batch_size):
        rows = order[start : start + batch_size]
        b = {k: v.to(device) for k, v in collate([encoded[i] for i in rows], pad_id).items()}
        logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits[:, :-1].float()
        tgt = b["labels"][:, 1:]
        keep = tgt != IGNORE
        # log p(target) = its logit - logsumexp over the vocabulary (no second vocabulary-sized tensor)
        tok_lp = (logits.gather(-1, tgt.clamp(min=0).unsqueeze(-1)).squeeze(-1) - logits.logsumexp(-1)) * keep
        sums, counts = tok_lp.sum(1).tolist(), keep.sum(1).tolist()
        out.update({i: (float(sm), int(n)) for i, sm, n in zip(rows, sums, counts, strict=True)})
    return [out[i] for i in range(len(encoded))]


def likelihood_formats(tok: Any, wanted: list[str], use_chat_template: bool) -> tuple[list[str], list[str]]:
    """(the formats of `wanted` the likelihoods can be scored in, those that cannot): `chat_template` needs a
    tokenizer with a template and `model.chat_template`."""
    ok = [f for f in wanted if f != "chat_template" or (use_chat_template and tok.chat_template)]
    return ok, [f for f in wanted if f not in ok]


def heldout_items(
    model: torch.nn.Module,
    tok: Any,
    dialogs: list[dict],
    max_length: int,
    fmt: str = "baize",
    batch_size: int = 4,
    loss_on: str = "ai",
) -> list[dict]:
    """Per held-out dialog: {"item_id", "tokens", "logprob_sum"} over its AI turns (`loss_on="all"`: over all its
    tokens) in format `fmt` (dialogs with no exchange that fits `max_length` are left out, as training leaves
    them out)."""
    enc, ids = [], []
    for k, d in enumerate(dialogs):
        e = tokenize_dialog(d["turns"], tok, max_length, loss_on, fmt)
        if e:
            enc.append(e)
            ids.append(str(d.get("id") or d.get("key") or k))
    return [
        {"item_id": i, "tokens": n, "logprob_sum": s}
        for i, (s, n) in zip(ids, item_logprobs(model, enc, tok.pad_token_id, batch_size), strict=True)
        if n
    ]


def reference_items(
    model: torch.nn.Module,
    tok: Any,
    questions: list[dict],
    prompts: list[str],
    max_length: int = 1024,
    batch_size: int = 4,
) -> list[dict]:
    """Per question with a reference: {"item_id", "tokens", "logprob_sum"} of the reference's tokens after the
    model's prompt (ids as generation sees them: no special tokens added), cut to `max_length` in all."""
    enc, ids = [], []
    for q, p in zip(questions, prompts, strict=True):
        if not q.get("reference"):
            continue
        p_ids = tok(p, add_special_tokens=False)["input_ids"]
        r_ids = tok(q["reference"], add_special_tokens=False)["input_ids"][: max(1, max_length - len(p_ids))]
        enc.append({"input_ids": p_ids + r_ids, "labels": [IGNORE] * len(p_ids) + r_ids})
        ids.append(q["question_id"])
    return [
        {"item_id": i, "tokens": n, "logprob_sum": s}
        for i, (s, n) in zip(ids, item_logprobs(model, enc, tok.pad_token_id, batch_size), strict=True)
        if n
    ]


def summarize(items: list[dict]) -> dict:
    """Token-weighted loss and perplexity over items (the held-out figures the stage always reported)."""
    n = sum(i["tokens"] for i in items)
    if n == 0:
        return {"loss": None, "ppl": None, "tokens": 0}
    loss = -sum(i["logprob_sum"] for i in items) / n
    return {"loss": loss, "ppl": math.exp(min(loss, 50)), "tokens": n}
