"""Answers to the eval questions: which models, batched generation, and a disk cache so reruns regenerate nothing.

A cached answer is keyed by what determines it: the model (its config), the adapter's weights (a hash of the
files, not the path), the exact prompt text (question + prompt format) and the sampling settings. The cache is a
JSONL file per model under `eval.answer_cache` (default `<cache_dir>/eval_answers`), appended and fsynced as
answers are made, so a crash mid-eval keeps what was generated and sweeps share it.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from baize_exp import models as M
from baize_exp.config import cache_dir, to_container
from baize_exp.data import BAIZE_HUMAN, generation_prompt
from baize_exp.errors import UserError
from baize_exp.generate import VllmStudent, sample_with
from baize_exp.io import KeyedJsonl, content_hash

log = logging.getLogger(__name__)


@dataclass
class ModelSpec:
    name: str  # as written in eval.models
    adapter: Path | None  # None = the base model


def resolve_models(names: list[str], run_dir: Path) -> tuple[list[ModelSpec], list[str]]:
    """base / v1 / v2 of this run, an adapter dir, or another run dir (its v2 adapter if it has one, else v1).
    A v1/v2 this run has not made (e.g. v2 with sdf=off) is skipped and reported, not an error."""
    specs, skipped = [], []
    for name in names:
        if name == "base":
            specs.append(ModelSpec(name, None))
            continue
        path = {"v1": run_dir / "train" / "adapter", "v2": run_dir / "sdf" / "adapter"}.get(name)
        if path is None:
            p = Path(name).expanduser()
            path = next(
                (
                    d
                    for d in (p, p / "sdf" / "adapter", p / "train" / "adapter")
                    if (d / "adapter_config.json").is_file()
                ),
                None,
            )
            if path is None:
                raise UserError(
                    f"eval.models: {name!r} is neither an adapter dir (adapter_config.json) "
                    f"nor a run dir with sdf/adapter or train/adapter"
                )
        if not (path / "adapter_config.json").is_file():
            skipped.append(name)
            continue
        specs.append(ModelSpec(name, path))
    return specs, skipped


def answer_cache_dir(cfg: Any) -> Path:
    return Path(cfg.eval.answer_cache).expanduser() if cfg.eval.answer_cache else cache_dir(cfg) / "eval_answers"


def chat_identity(bcfg: Any) -> str:
    """Who answers through a teacher/judge config: the backend, the model name, and where it is served (for our
    local server its model and the adapter's weights, since a tuned local teacher is another model)."""
    if bcfg.backend == "local":
        adapter = Path(bcfg.serve.adapter).expanduser() if bcfg.serve.adapter else None
        where = [bcfg.serve.model, M.adapter_hash(adapter) if adapter and adapter.is_dir() else bcfg.serve.adapter]
    else:
        where = bcfg.base_url or "api.openai.com"
    return content_hash("chat", bcfg.backend, bcfg.model, where)


def adapter_format(adapter: Path | None, default: str) -> str:
    """The prompt format an adapter was trained in (its prompt_format.json), else `default` (train.format)."""
    doc = adapter / "prompt_format.json" if adapter else None
    return json.loads(doc.read_text()).get("format", default) if doc and doc.is_file() else default


def answer_format(tok: Any, adapter: Path | None, use_chat_template: bool, train_format: str = "baize") -> str:
    """The prompt format a model answers in: the base through its chat template (what it was tuned for), an
    adapter in the format it was trained in."""
    if adapter is None:
        return "chat_template" if use_chat_template and tok.chat_template else "baize"
    return adapter_format(adapter, train_format)


def model_prompts(
    tok: Any, questions: list[dict], adapter: Path | None, use_chat_template: bool, train_format: str = "baize"
) -> list[str]:
    """Each question as the model answers it (`answer_format`). Each prompt starts with the tokenizer's BOS once,
    where it has one (`data.generation_prompt`)."""
    fmt = answer_format(tok, adapter, use_chat_template, train_format)
    return [generation_prompt(q["question"], fmt, tok) for q in questions]


def local_answers(
    cfg: Any,
    spec: ModelSpec,
    questions: list[dict],
    tok: Any,
    load: Any,
    shard_dir: Path | None = None,
    backend: str = "hf",
) -> tuple[list[dict], int]:
    """Answers of one local model, generated in batches for the questions the cache lacks; (answers, generated).

    `load()` returns the model and is only called when something must be generated. With `shard_dir` (a
    multi-process launch) each rank generates its share of the batches; the ranks other than 0 get no answers.
    `backend="vllm"` generates with vLLM's engine (`generate.VllmStudent`) instead of `load()`'s model."""
    e = cfg.eval
    sampling = {
        "max_new_tokens": e.max_new_tokens,
        "temperature": 0.0,
        "stop": [BAIZE_HUMAN],
        **({"backend": backend} if backend != "hf" else {}),
    }  # hf answers cached before keep their keys
    model_key = content_hash("local", to_container(cfg.model), M.adapter_hash(spec.adapter))
    cache = KeyedJsonl(answer_cache_dir(cfg) / f"{model_key}.jsonl")
    prompts = model_prompts(tok, questions, spec.adapter, cfg.model.chat_template, cfg.train.format)
    keys = [content_hash(p, sampling) for p in prompts]
    todo = [i for i, k in enumerate(keys) if cache.get(k) is None]
    if todo:
        if backend == "vllm":
            student = VllmStudent(cfg, tok)

            def one_batch(batch: list[str], index: int) -> list[str]:
                return [
                    t[0]
                    for t in student.generate(
                        batch,
                        spec.adapter,
                        index * e.batch_size,
                        1,
                        0.0,
                        1.0,
                        e.max_new_tokens,
                        [BAIZE_HUMAN],
                        cfg.eval.seed,
                    )
                ]
        else:
            model = load()

            def one_batch(batch: list[str], index: int) -> list[str]:
                return [
                    t[0]
                    for t in M.generate_texts(
                        model, tok, batch, e.max_new_tokens, stop=[BAIZE_HUMAN], batch_size=len(batch)
                    )
                ]

        # greedy, batch by batch: under torchrun/srun the batches are dealt over the ranks and rank 0 gathers them
        texts = sample_with(
            one_batch,
            [prompts[i] for i in todo],
            e.batch_size,
            shard_dir,
            content_hash(model_key, [keys[i] for i in todo]),
            desc=f"eval: {spec.name} answers",
            unit="answer",
        )
        if texts is None:  # another rank's share is done; rank 0 writes the cache and judges
            return [], len(todo)
        cache.put_many(
            [
                (keys[i], {"question_id": questions[i]["question_id"], "answer": t})
                for i, t in zip(todo, texts, strict=True)
            ]
        )
    log.info("eval: %s: %d answers generated, %d from the cache", spec.name, len(todo), len(keys) - len(todo))
    return [
        {
            "question_id": q["question_id"],
            "category": q["category"],
            "model": spec.name,
            "adapter": str(spec.adapter) if spec.adapter else None,
            "adapter_hash": M.adapter_hash(spec.adapter),
            "answer": cache.get(k)["answer"],
            "cached": i not in todo,
        }
        for i, (q, k) in enumerate(zip(questions, keys, strict=True))
    ], len(todo)


def teacher_answers(cfg: Any, client: Any, questions: list[dict]) -> tuple[list[dict], int]:
    """The teacher's answers (the default pairwise opponent), cached like the local models'; (answers, sent).
    A failed request is recorded with its error and not cached."""
    e, t = cfg.eval, cfg.teacher
    sampling = {"max_tokens": e.max_new_tokens, "temperature": 0.0}
    cache = KeyedJsonl(answer_cache_dir(cfg) / f"{chat_identity(t)}.jsonl")
    keys = [content_hash(q["question"], sampling) for q in questions]
    todo = [i for i, k in enumerate(keys) if cache.get(k) is None]
    errors: dict[int, str] = {}
    if todo:
        results = client.complete_many(
            [[{"role": "user", "content": questions[i]["question"]}] for i in todo], desc="teacher answers", **sampling
        )
        cache.put_many(
            [
                (keys[i], {"question_id": questions[i]["question_id"], "answer": r.text})
                for i, r in zip(todo, results, strict=True)
                if not r.error
            ]
        )
        errors = {i: r for i, r in zip(todo, results, strict=True) if r.error}
    return [
        {
            "question_id": q["question_id"],
            "category": q["category"],
            "model": "teacher",
            "role": "opponent",
            "answer": (cache.get(k) or {}).get("answer"),
            "error": errors[i].error if i in errors else None,
            **({"failed": errors[i].error} if i in errors and errors[i].transient else {}),
            "cached": i not in todo,
        }
        for i, (q, k) in enumerate(zip(questions, keys, strict=True))
    ], len(todo)
