"""Stage 3 — Self-Distillation with Feedback (Baize v2).

The v1 model samples `sdf.num_candidates` answers per prompt in batches; the teacher ranks each prompt's
candidates in one request (shown in a shuffled order whose seed and permutation are recorded, so position bias
cannot favour v1's first sample); one more LoRA pass from the v1 adapter on the preferred answers gives the v2
adapter.

Ranking replies are parsed strictly ("3 > 1 > 2 > 4"), then tolerantly (numbers in order of first mention), then
from the logprobs of the first candidate number (teachers too small to write a ranking); what still fails is sent
back once with the parser's error, and a second failure is recorded (`parse: "failed"`), never dropped.

Selection (`sdf.select`):
- best:     the top-ranked non-empty candidate, once.
- weighted: every candidate repeated (n - 1 - rank) times, i.e. Borda weights n-1, ..., 1, 0 (best first). Since the
            training loss is a sum over examples, one epoch over the repeats has the same expected gradient as a
            loss weighted by Borda score, without a weighted-loss path in the trainer. The worst candidate gets
            weight 0, as do candidates the teacher did not place (a partial, tolerant ranking) and empty ones.
            One epoch sees n(n-1)/2 examples per prompt against best's one: compare at equal steps, not epochs.
The two controls that tell the teacher's feedback from more training (compare them with `best` at the same
`sdf.max_steps`: packing makes an epoch's step count follow the examples' lengths):
- random:   a non-empty candidate drawn uniformly (seeded by `sdf.seed` and the prompt), once: the same prompts,
            candidates, count, steps and learning rate as `best`, without the ranking's choice. best vs random is
            the feedback; random vs v1 is more training on v1's own samples.
- teacher:  the prompt's own teacher answer (the AI turn after it in its training dialog), cut to
            `sdf.max_new_tokens` tokens as the candidates were, once: "more training" on teacher data that v1
            has already seen, at the same steps and learning rate (needs the dialogs' prompts: `sdf.prompts`
            null). best vs teacher asks whether v1's ranked samples beat the teacher's own answers.
Every selection trains on the prompts whose ranking came back (the ones `best` can use), so the arms have the
same prompts and the same count; random and teacher ignore the order the teacher gave.
"""

from __future__ import annotations

import copy
import logging
import random
import re
import time
from collections import Counter
from pathlib import Path
from typing import Any

import torch

from baize_exp import cpu
from baize_exp import models as M
from baize_exp.chat.ask import ask_parsed
from baize_exp.chat.batch import backend_for
from baize_exp.config import Config, cache_dir, to_container
from baize_exp.data import BAIZE_HUMAN, EvalLeakGuard, generation_prompt, load_seed_file, training_dialogs
from baize_exp.errors import Interrupted, UserError
from baize_exp.generate import VllmStudent, batch_seed, pick_backend, rank_and_world, sample_with
from baize_exp.io import content_hash, global_rank, read_jsonl, write_jsonl
from baize_exp.stages.base import BACKEND_KNOBS, Stage
from baize_exp.training import check_machine, fit, save_adapter, trainable_state
from baize_exp.wandb_log import log_adapter

log = logging.getLogger(__name__)
_STRICT = re.compile(r"^\s*\[?(\d+)\]?(\s*>\s*\[?\d+\]?)+\s*$")
_ASCII_INT = re.compile(r"[0-9]+")  # str.isdigit() also accepts "²", which int() refuses


def parse_ranking(reply: str, n: int) -> tuple[list[int] | None, str, int, str | None]:
    """(ranking, how, ranked, error): 0-based shown positions best first, from a reply like "3 > 1 > 2 > 4".

    Strict: a line that is exactly numbers separated by ">" naming each of 1..n once (ranked = n). Tolerant: the
    distinct in-range numbers in order of first mention (ranked = how many), the rest appended in shown order.
    Otherwise (None, "failed", 0, what was wrong)."""
    reply = reply or ""
    strict_error = None
    for line in reply.splitlines():
        if _STRICT.match(line):
            nums = [int(x) for x in re.findall(r"\d+", line)]
            if sorted(nums) == list(range(1, n + 1)):
                return [x - 1 for x in nums], "ok", n, None
            strict_error = f"the ranking {line.strip()!r} must name each of 1..{n} exactly once"
    seen: list[int] = []
    for x in re.findall(r"\d+", reply):
        k = int(x)
        if 1 <= k <= n and k - 1 not in seen:
            seen.append(k - 1)
    if seen:
        return seen + [k for k in range(n) if k not in seen], "tolerant", len(seen), None
    return None, "failed", 0, strict_error or f"the reply names none of the answer numbers 1..{n}"


def ranking_from_logprobs(logprobs: dict | None, n: int) -> list[int] | None:
    """Fallback for teachers that will not write a ranking (small local models): at the first generated position
    whose top alternatives include candidate numbers, order those numbers by probability."""
    for pos in (logprobs or {}).get("content") or []:
        probs: dict[int, float] = {}
        for alt in pos.get("top_logprobs") or []:
            tok = alt["token"].strip()
            if _ASCII_INT.fullmatch(tok) and 1 <= int(tok) <= n:
                probs[int(tok) - 1] = max(probs.get(int(tok) - 1, float("-inf")), alt["logprob"])
        if probs:
            best = sorted(probs, key=lambda k: -probs[k])
            return best + [k for k in range(n) if k not in best]
    return None


def _ranking_parser(n: int) -> Any:
    """A reply's ranking: strict, then tolerant, then from the logprobs of the first candidate number (which counts
    the whole ranking as given). Value: (ranking as shown positions, how many were ranked)."""

    def parse(res: Any) -> tuple[tuple[list[int], int] | None, str, str | None]:
        ranking, how, ranked, err = parse_ranking(res.text, n)
        if ranking is None:
            lp = ranking_from_logprobs(res.logprobs[0] if res.logprobs else None, n)
            if lp is not None:
                return (lp, n), "logprobs", None
            return None, how, err
        return (ranking, ranked), how, None

    return parse


def rank_candidates(
    client: Any, s: Any, prompts: list[str], cands: list[list[str]], index: list[int] | None = None
) -> list[dict]:
    """Ask the teacher to rank each prompt's candidates in one request each; records in candidates.jsonl shape.
    `index`: each prompt's position in the stage's prompt list (its shuffle seed), when ranking a subset again.

    A request that failed for a transient reason is recorded with `failed` (its error) and not sent back with a
    parser's complaint: there is no reply to correct, and a rerun asks for it again."""
    n = len(cands[0])
    example = " > ".join(str(k) for k in random.Random(0).sample(range(1, n + 1), n))
    records, convs = [], []
    for i, p, cs in zip(index or range(len(prompts)), prompts, cands, strict=True):
        order = list(range(n))
        shuffle_seed = s.seed * 100003 + i
        random.Random(shuffle_seed).shuffle(order)  # presentation order: position k shows cs[order[k]]
        shown = "\n\n".join(f"Answer {k + 1}: {cs[j]}" for k, j in enumerate(order))
        convs.append(
            [{"role": "user", "content": s.rank_template.format(n=n, prompt=p, candidates=shown, example=example)}]
        )
        records.append({"prompt": p, "candidates": cs, "order": order, "shuffle_seed": shuffle_seed})
    params = dict(temperature=0.0, max_tokens=s.rank_max_tokens, logprobs=True, top_logprobs=20)
    answers = ask_parsed(
        client,
        convs,
        _ranking_parser(n),
        lambda err: s.retry_template.format(error=err, n=n, example=example),
        "sdf ranking",
        **params,
    )
    for rec, a in zip(records, answers, strict=True):
        shown, ranked = a.value or (None, 0)
        rec.update(
            judge_reply=a.reply,
            parse=a.how,
            ranked=ranked,
            parse_error=None if shown else a.error,
            ranking=[rec["order"][k] for k in shown] if shown else None,
        )  # candidate indices, best first
        if a.retried:
            rec["judge_reply_retry"] = a.retry_reply
        if a.failed:
            rec["failed"] = a.failed
    return records


def sample_candidates(
    model: torch.nn.Module,
    tok: Any,
    prompts: list[str],
    n: int,
    max_new_tokens: int,
    temperature: float,
    top_p: float,
    batch_size: int = 8,
    stop: list[str] | None = None,
    seed: int = 0,
    shard_dir: Path | None = None,
    key: str = "candidates",
) -> list[list[str]] | None:
    """`n` sampled answers per prompt, `batch_size` prompts per `generate` (left padding, KV cache).

    Unlike `generate(num_return_sequences=n)`, which runs the prompt through the model n times, each prompt is
    run once and its KV cache repeated n times: prompts (the Baize header + question, ~100 tokens) outweigh short
    answers, so this is most of the sampling cost saved. Greedy output equals `models.generate_texts`'s.

    Each batch samples from the torch RNG seeded for that batch alone (`generate.batch_seed`), so with `shard_dir`
    the batches are dealt over the ranks of a multi-process launch (`generate.sharded_map`, `key` names the work)
    and rank 0 gets exactly the candidates one process makes; the other ranks get None."""
    model.eval()
    eos_ids = M.stop_token_ids(model, tok)  # the template's end-of-turn too, as in models.generate_texts
    side, tok.padding_side = tok.padding_side, "left"

    @torch.no_grad()
    def one_batch(batch: list[str], index: int) -> list[list[str]]:
        cpu.fit_threads()
        torch.manual_seed(batch_seed(seed, index))
        enc = tok(batch, return_tensors="pt", padding=True, add_special_tokens=False)
        dev = next(model.parameters()).device
        ids, mask = enc.input_ids.to(dev), enc.attention_mask.to(dev)
        # the cache covers all but the last prompt token, which generate feeds to make the first new token
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        past = model(
            input_ids=ids[:, :-1], attention_mask=mask[:, :-1], position_ids=pos[:, :-1], use_cache=True
        ).past_key_values
        past.batch_repeat_interleave(n)
        kw: dict[str, Any] = dict(do_sample=True, temperature=temperature, top_p=top_p, top_k=0)
        if temperature <= 0:
            kw = dict(do_sample=False, temperature=None, top_p=None, top_k=None)
        seqs = model.generate(
            input_ids=ids.repeat_interleave(n, 0),
            attention_mask=mask.repeat_interleave(n, 0),
            past_key_values=past,
            max_new_tokens=max_new_tokens,
            pad_token_id=tok.pad_token_id,
            eos_token_id=eos_ids,
            **kw,
        )[:, ids.shape[1] :]
        texts = tok.batch_decode(seqs, skip_special_tokens=True)
        return [[M.cut_at_stop(t, stop or [])[0].strip() for t in texts[j : j + n]] for j in range(0, len(texts), n)]

    try:
        return sample_with(one_batch, prompts, batch_size, shard_dir, key, desc="sdf: v1 candidates")
    finally:
        tok.padding_side = side


def candidate_weights(rec: dict, select: str, seed: int | str = 0) -> list[int]:
    """How many times each candidate is trained on (see the module docstring): `random` draws with
    random.Random(seed); `teacher` trains on no candidate."""
    n = len(rec["candidates"])
    w = [0] * n
    if rec["ranking"] is None or select == "teacher":
        return w
    nonempty = [j for j in rec["ranking"] if rec["candidates"][j].strip()]
    if select == "best":
        if nonempty:
            w[nonempty[0]] = 1
        return w
    if select == "random":
        if nonempty:
            w[random.Random(seed).choice(sorted(nonempty))] = 1
        return w
    for rank, j in enumerate(rec["ranking"][: rec["ranked"]]):
        if rec["candidates"][j].strip():
            w[j] = n - 1 - rank
    return w


def load_prompts(cfg: Any, train_dialogs: list[dict], dropped: list[dict] | None = None) -> list[str]:
    """SDF prompts: a file's, or the first human turn of each training dialog (held-out dialogs stay unseen).
    Evaluation must stay on questions no stage trained on, so a prompt that copies an eval question
    (`data.EvalLeakGuard`: an exact copy, or a near one at word overlap >= `data.EVAL_OVERLAP`) is refused in an
    `sdf.prompts` file (the user's input: one line saying what to remove) and dropped from the dialogs' prompts
    (the teacher's: logged, and appended to `dropped` as {"prompt", "eval_question", "overlap"})."""
    s = cfg.sdf
    if s.prompts:
        prompts = list(dict.fromkeys(x.question for x in load_seed_file(s.prompts)))
    else:
        prompts = list(dict.fromkeys(d["turns"][0]["text"] for d in train_dialogs if d["turns"]))
    guard = EvalLeakGuard.for_eval_questions(cfg.eval.questions)
    leaked = [(p, *copied) for p in prompts if (copied := guard.match(p))]
    if leaked and s.prompts:
        raise UserError(
            f"sdf: {len(leaked)} prompt(s) are eval questions or near-copies of them (word overlap >= "
            f"{guard.threshold}; e.g. {leaked[0][0][:80]!r}, like {leaked[0][1][:80]!r}); remove them from "
            f"{s.prompts} so evaluation stays held out"
        )
    for p, question, overlap in leaked:
        log.warning("sdf: prompt %r dropped: a near-copy (word overlap %.2f) of eval question %r", p, overlap, question)
        if dropped is not None:
            dropped.append({"prompt": p, "eval_question": question, "overlap": round(overlap, 3)})
    kept = [p for p in prompts if p not in {x[0] for x in leaked}]
    return kept[: s.num_prompts] if s.num_prompts else kept


def teacher_answers(train_dialogs: list[dict], prompts: list[str], tok: Any, max_tokens: int) -> dict[str, str]:
    """{prompt: the teacher's answer to it}: the AI turn after the prompt in the first training dialog that opens
    with it, cut to `max_tokens` tokens (the candidates' length cap, so `select=teacher` is not longer data)."""
    want, out = set(prompts), {}
    for d in train_dialogs:
        turns = d["turns"]
        if len(turns) > 1 and turns[0]["text"] in want and turns[0]["text"] not in out and turns[1]["role"] == "ai":
            ids = tok(turns[1]["text"], add_special_tokens=False).input_ids
            out[turns[0]["text"]] = tok.decode(ids[:max_tokens], skip_special_tokens=True).strip()
    return out


# sdf keys that act after the candidates are ranked: changing them reuses the ranked candidates
AFTER_RANKING = ("enabled", "select", "lr", "max_epochs", "max_steps")


def candidates_key(cfg: Any, v1: Path, prompts: list[str], backend: str = "hf") -> str:
    """What the ranked candidates depend on: the v1 adapter's weights, the model, the prompts, the sampling and
    ranking settings, the generation backend that sampled them, and the teacher."""
    s = {k: v for k, v in to_container(cfg.sdf).items() if k not in AFTER_RANKING}
    t = cfg.teacher
    return content_hash(
        M.adapter_hash(v1),
        to_container(cfg.model),
        cfg.train.format,
        s,
        prompts,
        [t.backend, t.model, t.temperature, t.top_p],
        *([backend] if backend != "hf" else []),
    )


def _finished_candidates(path: Path, key: str) -> list[dict] | None:
    """The records of an earlier attempt of this stage (a crash in training, a rerun of a DDP worker), if they were
    made with the same key; None if there are none or they belong to other settings."""
    if not path.is_file():
        return None
    records = read_jsonl(path)
    return records if records and all(r.get("key") == key for r in records) else None


def _wait_for_candidates(path: Path, key: str, poll_s: float = 2.0) -> list[dict]:
    """Rank 0's records once every prompt is ranked."""
    t0 = time.monotonic()
    while (records := _finished_candidates(path, key)) is None or any(r.get("failed") for r in records):
        if int(time.monotonic() - t0) % 60 < poll_s:
            log.info("rank %d: waiting for rank 0 to write %s", global_rank(), path)
        time.sleep(poll_s)
    return records


def run(cfg: Config, run_dir: Path, backends: Any) -> dict:
    """The pipeline's sdf stage: v1 samples candidates, the teacher ranks them, v1 is tuned further on the chosen
    ones -> v2 (sample, rank, select, fit)."""
    s = cfg.sdf
    if not s.enabled:
        return {"skipped": True}
    stage_dir = run_dir / "sdf"
    v1 = run_dir / "train" / "adapter"
    if not (v1 / "adapter_config.json").is_file():
        raise UserError(f"sdf: no v1 adapter at {v1}; run the train stage first (stages=[train,sdf,...])")
    _, train_d, val_d, _ = training_dialogs(cfg, run_dir)
    leaks: list[dict] = []
    prompts = load_prompts(cfg, train_d, leaks)
    dtype, device = M.base_dtype(cfg.model, cfg.trainer.precision), M.student_device(cfg.trainer.accelerator)
    base, tok = M.load_model_and_tokenizer(cfg.model, cache_dir(cfg), dtype, device)  # as the train stage built it
    model = M.load_adapter(base, v1, trainable=True)
    backend = pick_backend(cfg)
    sampler = _Sampler(cfg, model, tok, v1, prompts, backend, stage_dir)
    records = sample_and_rank(backends, s, sampler, stage_dir / "candidates.jsonl")
    answers = teacher_answers(train_d, prompts, tok, s.max_new_tokens) if s.select == "teacher" else None
    chosen = select(records, s.select, s.seed, answers)
    if global_rank() == 0:  # before training: a crash there loses none of the teacher's rankings
        write_jsonl(stage_dir / "candidates.jsonl", records)
    _stop_if_unranked(records, stage_dir / "candidates.jsonl")
    metrics = {**_summary(records, s, backend, chosen), "eval_near_duplicates": len(leaks)}
    if not chosen:
        raise UserError(
            f"sdf: no candidate was selected: every ranking was unparsable or every candidate empty "
            f"(see {stage_dir / 'candidates.jsonl'}); a stronger teacher ranks reliably, a larger "
            f"sdf.max_new_tokens gives longer candidates"
        )
    metrics.update(fit(model, tok, chosen, val_d, _fit_cfg(cfg), stage_dir, s.lr, _fit_epochs(s), prefix="sdf/"))
    weights = trainable_state(model)  # every rank: under ZeRO-3 this gathers the shards
    if metrics["rank"] == 0:  # under DDP every rank gets here; one writes the adapter (as train.run does)
        save_adapter(
            model,
            tok,
            stage_dir / "adapter",
            {"model": cfg.model.name, "from": str(v1), "sdf": to_container(s), "metrics": metrics},
            fmt=cfg.train.format,
            state_dict=weights,
        )
    return metrics


class _Sampler:
    """v1's candidates for the prompts, sampled where training runs (or by vLLM), sharded over the ranks of a
    multi-process launch; `key` names these exact candidates (adapter, prompts, sampling settings)."""

    def __init__(
        self, cfg: Any, model: Any, tok: Any, v1: Path, prompts: list[str], backend: str, stage_dir: Path
    ) -> None:
        self.cfg, self.model, self.tok, self.v1, self.prompts, self.backend = cfg, model, tok, v1, prompts, backend
        self.key = candidates_key(cfg, v1, prompts, backend)
        _, world = rank_and_world()
        self.shards = stage_dir / "shards" if world > 1 else None  # torchrun/srun: every rank samples its share

    def __call__(self) -> list[list[str]] | None:
        s, cfg = self.cfg.sdf, self.cfg
        texts = [generation_prompt(p, cfg.train.format, self.tok) for p in self.prompts]
        if self.backend == "vllm":
            student = VllmStudent(cfg, self.tok)

            def generate(batch: list[str], b: int) -> list[list[str]]:
                return student.generate(
                    batch, self.v1, b * s.batch_size, s.num_candidates, s.temperature, s.top_p, s.max_new_tokens,
                    [BAIZE_HUMAN], s.seed,
                )  # fmt: skip

            return sample_with(generate, texts, s.batch_size, self.shards, self.key, desc="sdf: v1 candidates")
        self.model.to(M.student_device(cfg.trainer.accelerator))  # v1 samples where training runs
        return sample_candidates(
            self.model,
            self.tok,
            texts,
            s.num_candidates,
            s.max_new_tokens,
            s.temperature,
            s.top_p,
            s.batch_size,
            stop=[BAIZE_HUMAN],
            seed=s.seed,
            shard_dir=self.shards,
            key=self.key,
        )


def sample_and_rank(backends: Any, s: Any, sampler: _Sampler, cand_path: Path) -> list[dict]:
    """Every prompt's candidates with the teacher's ranking. An earlier attempt's candidates (same key) are reused
    and only its failed rankings asked again; fresh candidates are written before any ranking request, so a crash
    keeps the samples. Ranks other than 0 sample their share and wait for rank 0's rankings."""
    key, prompts = sampler.key, sampler.prompts
    records = _finished_candidates(cand_path, key)
    if global_rank() > 0 and (records is None or any(r.get("failed") for r in records)):
        if records is None:
            sampler()  # its share of the batches; rank 0 gathers them, ranks, and writes the candidates
        return _wait_for_candidates(cand_path, key)
    if records is None:
        cands = sampler()
        if global_rank() == 0:
            unranked = [
                {"prompt": p, "candidates": c, "key": key, "failed": "not ranked yet"}
                for p, c in zip(prompts, cands, strict=True)
            ]
            write_jsonl(cand_path, unranked)
        teacher = backend_for(backends, "teacher", cand_path.parent / "batches")  # teacher.batch: over batches
        return [{**r, "key": key} for r in rank_candidates(teacher, s, prompts, cands)]
    log.info(
        "sdf: reusing the %d sampled prompts in %s (same v1 adapter, prompts and settings)", len(records), cand_path
    )
    todo = [i for i, r in enumerate(records) if r.get("failed")]
    if todo and global_rank() == 0:  # rankings that failed for a transient reason: asked again, only those
        again = rank_candidates(
            backend_for(backends, "teacher", cand_path.parent / "batches"),
            s,
            [records[i]["prompt"] for i in todo],
            [records[i]["candidates"] for i in todo],
            index=todo,
        )
        for i, rec in zip(todo, again, strict=True):
            records[i] = {**rec, "key": key}
    return records


def select(records: list[dict], how: str, seed: int = 0, teacher: dict[str, str] | None = None) -> list[dict]:
    """v2's training dialogs: each candidate as a one-exchange dialog, repeated by its weight (`candidate_weights`:
    the best alone, Borda weights, or one drawn at random with seed `<seed>:<prompt index>`); with `how="teacher"`
    the prompt's teacher answer from `teacher` instead, for every prompt whose ranking came back. Each record gets
    its `weights` (and `teacher_answer` when one is trained on)."""
    chosen = []
    for i, rec in enumerate(records):
        rec["weights"] = candidate_weights(rec, how, f"{seed}:{i}")
        pairs = [(f"sdf-{i}-{j}", rec["candidates"][j], w) for j, w in enumerate(rec["weights"])]
        answer = (teacher or {}).get(rec["prompt"]) if how == "teacher" and rec["ranking"] is not None else None
        if answer:
            rec["teacher_answer"] = answer
            pairs.append((f"sdf-{i}-teacher", answer, 1))
        for did, text, w in pairs:
            dialog = {"id": did, "turns": [{"role": "human", "text": rec["prompt"]}, {"role": "ai", "text": text}]}
            chosen += [dialog] * w
    return chosen


def _fit_cfg(cfg: Any) -> Any:
    """The config SDF's fit runs with: with `sdf.max_steps`, exactly that many optimizer steps (Lightning's
    max_steps, the epochs repeating the examples as needed), so selections of other lengths train alike."""
    if cfg.sdf.max_steps is None:
        return cfg
    fit_cfg = copy.deepcopy(cfg)
    fit_cfg.trainer.max_steps = cfg.sdf.max_steps
    return fit_cfg


def _fit_epochs(s: Any) -> int:
    # every epoch has at least one step: max_steps epochs never end the fit before max_steps steps
    return s.max_epochs if s.max_steps is None else max(s.max_epochs, s.max_steps)


def _stop_if_unranked(records: list[dict], cand_path: Path) -> None:
    failed = [r for r in records if r.get("failed")]
    if failed:
        raise Interrupted(
            f"sdf: {len(failed)} of {len(records)} rankings are unfinished: the teacher's requests "
            f"failed (last: {failed[-1]['failed']}). The candidates and the {len(records) - len(failed)} "
            f"rankings that came back are kept in {cand_path}; a rerun asks only for the missing ones"
        )


def _summary(records: list[dict], s: Any, backend: str, chosen: list[dict]) -> dict[str, Any]:
    parse = Counter(r["parse"] for r in records)
    return {
        "prompts": len(records),
        "candidates": len(records) * s.num_candidates,
        "empty_candidates": sum(not c.strip() for r in records for c in r["candidates"]),
        **{f"parse_{k}": parse[k] for k in ("ok", "tolerant", "logprobs", "retried", "failed")},
        "generate_backend": backend,
        "select": s.select,
        "selected_examples": len(chosen),
        "prompts_used": sum(any(r["weights"]) or "teacher_answer" in r for r in records),
    }


STAGE = Stage(
    "sdf",
    run,
    reads=("train",),
    shapes=("sdf", "teacher", "generate.backend"),
    ignores=BACKEND_KNOBS,
    writes=(
        "sdf/candidates.jsonl",
        "sdf/adapter/adapter_config.json",
        "sdf/adapter/adapter_model.safetensors",
        "sdf/adapter/prompt_format.json",
        "sdf/adapter/baize_exp.json",
        "sdf/logs/metrics.csv",
        "sdf/sdf_rank*.json",
    ),
    # as train's, and the per-rank sample shards of a multi-process launch
    may_write=(
        "sdf/adapter/*",
        "sdf/checkpoints/*",
        "sdf/logs/*",
        "sdf/sdf_samples.jsonl",
        "sdf/shards/*",
        "sdf/batches/*",  # teacher.batch=true: the ranking batches
    ),
    joins_ddp=True,
    preflight=check_machine,
    log_wandb=lambda wb, stage_dir: log_adapter(wb, stage_dir, "sdf"),  # v2 as a `model` artifact
)
