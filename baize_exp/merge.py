"""Merge a trained LoRA adapter into its base model and save a standalone HF model dir.

    baize-export outputs/2026-11-25/10-00-00 --out baize-7b-merged          # a run dir: v2, else v1
    baize-export outputs/.../train/adapter --out merged --dtype bfloat16
    baize-export some/adapter --out merged --model 7b --model-path /ckpt/llama-7b-hf

The result loads with plain `AutoModelForCausalLM.from_pretrained(out)` / `AutoTokenizer.from_pretrained(out)`
(no peft, no baize_exp), e.g. for vLLM or `teacher=local` serving.

Which base: the run's own resolved config (`<run>/.hydra/config.yaml`, found from a run dir or from an adapter dir
inside a run), so the merge uses exactly the base the adapter was trained on; `--model <conf/model option>` (with
`--model-path`) names it instead, e.g. for an adapter copied out of its run. A plain argparse CLI, not Hydra: the
inputs are two paths and a few flags, and a Hydra run dir for an export would only be clutter.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf
from transformers import AutoTokenizer

from baize_exp import models as M
from baize_exp.config import CONF_DIR as CONF
from baize_exp.config import cache_dir
from baize_exp.errors import ExportError, exit_on_error

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def find_adapter(src: Path, which: str = "auto") -> Path:
    """The adapter dir in `src`: `src` itself, or a run dir's sdf/adapter (v2) / train/adapter (v1)."""
    if (src / "adapter_config.json").is_file():
        return src
    candidates = {"v2": src / "sdf" / "adapter", "v1": src / "train" / "adapter"}
    order = ["v2", "v1"] if which == "auto" else [which]
    for name in order:
        if (candidates[name] / "adapter_config.json").is_file():
            return candidates[name]
    raise ExportError(
        f"{src}: no LoRA adapter here (looked for adapter_config.json in {src} and in "
        f"{', '.join(str(candidates[n]) for n in order)})"
    )


def run_config(adapter: Path) -> Path | None:
    """The `.hydra/config.yaml` of the run an adapter dir lives in (<run>/<stage>/adapter), if any."""
    for parent in list(adapter.parents)[:3]:
        if (parent / ".hydra" / "config.yaml").is_file():
            return parent / ".hydra" / "config.yaml"
    return None


def compose_model(option: str) -> Any:
    """The typed `model` config of a conf/model option, composed by Hydra as run.py would."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from baize_exp.config import register_configs

    if not (CONF / "model" / f"{option}.yaml").is_file():
        options = sorted(p.stem for p in (CONF / "model").glob("*.yaml"))
        raise ExportError(f"--model {option!r}: no such conf/model option (one of {options})")
    register_configs()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name="config", overrides=[f"model={option}"]).model


def base_model_config(adapter: Path, model: str | None, model_path: str | None) -> tuple[Any, str]:
    """The `model` config of the base to merge into, and where it came from."""
    if model:
        mcfg, origin = compose_model(model), f"--model {model}"
    else:
        found = run_config(adapter)
        if found is None:
            raise ExportError(
                f"{adapter}: not inside a run dir (no .hydra/config.yaml above it), so the base model "
                f"is unknown: pass --model <conf/model option> (and --model-path <local HF dir>)"
            )
        mcfg, origin = OmegaConf.load(found).model, str(found)
        if "tie_word_embeddings" not in mcfg:  # a run from before the key existed: only the tiny model was tied
            mcfg.tie_word_embeddings = mcfg.source == "tiny"
    if model_path:
        mcfg = OmegaConf.merge(mcfg, {"path": model_path})
    return mcfg, origin


def export(
    src: Path,
    out: Path,
    which: str = "auto",
    model: str | None = None,
    model_path: str | None = None,
    dtype: str = "float32",
    overwrite: bool = False,
    cache: Path | None = None,
) -> dict:
    """Merge the adapter found at `src` into its base and save base+LoRA as one model dir at `out`."""
    adapter = find_adapter(src, which)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise ExportError(f"--out {out} exists and is not empty (pass --overwrite to replace it)")
    mcfg, origin = base_model_config(adapter, model, model_path)
    # the shared model cache without the run's config (its paths.* need Hydra to resolve)
    cache = cache or cache_dir()
    tok = (
        AutoTokenizer.from_pretrained(str(adapter))
        if (adapter / "tokenizer_config.json").is_file()
        else M.load_tokenizer(mcfg, cache)
    )  # the adapter's own copy is the tokenizer it was trained with
    base = M.load_model(mcfg, cache, dtype=DTYPES[dtype])
    try:
        peft_model = M.load_adapter(base, adapter)
    except (RuntimeError, ValueError) as e:  # shape mismatches: the adapter was trained on another base
        raise ExportError(
            f"adapter {adapter} does not fit base model {mcfg.name} (from {origin}): {str(e).splitlines()[0][:300]}"
        ) from e
    merged = peft_model.merge_and_unload()
    merged.generation_config.pad_token_id = tok.pad_token_id
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    merged.save_pretrained(str(tmp))
    tok.save_pretrained(str(tmp))
    if (adapter / "prompt_format.json").is_file():  # how to prompt the model travels with it
        shutil.copy2(adapter / "prompt_format.json", tmp / "prompt_format.json")
    record = {
        "adapter": str(adapter.resolve()),
        "base": {"name": mcfg.name, "source": mcfg.source, "path": mcfg.path, "hub_id": mcfg.hub_id},
        "base_config_from": origin,
        "dtype": dtype,
        "exported": time.time(),
    }
    (tmp / "baize_export.json").write_text(json.dumps(record, indent=2))
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)  # a half-written export never sits at --out
    return record


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="baize-export", description=__doc__.split("\n\n")[0])
    ap.add_argument("src", type=Path, help="an adapter dir, or a run dir (its sdf/adapter, else train/adapter)")
    ap.add_argument("--out", type=Path, required=True, help="the standalone model dir to write")
    ap.add_argument(
        "--which",
        choices=["auto", "v1", "v2"],
        default="auto",
        help="in a run dir: v1 = train/adapter, v2 = sdf/adapter, auto = v2 if present",
    )
    ap.add_argument("--model", help="conf/model option of the base (default: the run's own config)")
    ap.add_argument("--model-path", help="local HF dir of the base (overrides model.path)")
    ap.add_argument(
        "--dtype",
        choices=list(DTYPES),
        default="float32",
        help="dtype to load, merge and save in (bfloat16 halves memory and size for 7B+)",
    )
    ap.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    args = ap.parse_args(argv)
    with exit_on_error("baize-export"):
        rec = export(args.src, args.out, args.which, args.model, args.model_path, args.dtype, args.overwrite)
    print(f"exported {rec['adapter']} merged into {rec['base']['name']} → {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
