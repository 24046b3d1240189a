"""One base, several LoRA adapters: what the server answers as which model name.

The base is loaded once and every adapter is loaded onto it under its own name (`PeftModel.load_adapter`), so
serving base, v1 and v2 costs one base plus three small adapters, not three models. The decode loop picks each
row's adapter per forward pass (peft's mixed-adapter batches), so requests for different models share a batch.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from baize_exp.errors import UserError
from baize_exp.serve.engine import ServedModel
from baize_exp.serve.formats import PromptFormat


class AdapterError(UserError):
    """An adapter argument or directory the server cannot serve, with what to do instead."""


def parse_adapter_args(values: list[str]) -> tuple[dict[str, Path], bool]:
    """`--adapter [NAME=]DIR` values as {name: dir}, and whether they were named. One unnamed adapter is the old
    single-model server (served as `<base>+<dir name>`); several need names."""
    named = any("=" in v for v in values)
    if len(values) > 1 and not all("=" in v for v in values):
        raise AdapterError("--adapter: several adapters need a name each: --adapter v1=DIR --adapter v2=DIR")
    out: dict[str, Path] = {}
    for v in values:
        name, _, path = v.rpartition("=") if named else ("", "", v)
        name = name or Path(path).name
        if name in out:
            raise AdapterError(f"--adapter {v}: the name {name!r} is given twice")
        out[name] = check_adapter_dir(Path(path).expanduser(), f"--adapter {v}")
    return out, named


def check_adapter_dir(path: Path, what: str) -> Path:
    """`path` when it holds a LoRA adapter that can share a batch with others; AdapterError otherwise."""
    config = path / "adapter_config.json"
    if not config.is_file():
        raise AdapterError(f"{what}: {path} is not a LoRA adapter dir (no adapter_config.json there)")
    if json.loads(config.read_text()).get("use_dora"):
        raise AdapterError(f"{what}: a DoRA adapter cannot share a batch with other adapters (peft); merge it first")
    return path


def attach_adapters(net: torch.nn.Module, adapters: dict[str, Path]) -> torch.nn.Module:
    """`net` with every adapter loaded under its key in `adapters` (a PeftModel), or `net` itself when there is
    none. The keys become module names inside the model: no dots."""
    from peft import PeftModel

    if not adapters:
        return net
    (first, path), *rest = adapters.items()
    model = PeftModel.from_pretrained(net, str(path), adapter_name=first, is_trainable=False)
    for name, p in rest:
        model.load_adapter(str(p), adapter_name=name, is_trainable=False)
    return model.eval()


def served_models(base_name: str | None, adapters: dict[str, Path], peft_names: dict[str, str]) -> list[ServedModel]:
    """The names to answer: the base as `base_name` (None: not served) and each adapter under its name, in the
    prompt format it was trained in. `peft_names` maps a served name to the adapter's name inside the model."""
    base = [ServedModel(base_name)] if base_name is not None else []
    return base + [
        ServedModel(name, peft_names[name], PromptFormat.of_adapter(path), str(path)) for name, path in adapters.items()
    ]


def load_served(
    net: torch.nn.Module, base_name: str, adapters: dict[str, Path], serve_base: bool = True
) -> tuple[Any, list[ServedModel]]:
    """The one model to decode with (base + every adapter) and the names it answers. Inside the model the
    adapters are `adapter0`, `adapter1`, ...: a served name may hold characters a module name cannot."""
    if serve_base and base_name in adapters:
        raise AdapterError(f"--adapter {base_name}=...: {base_name!r} is the base model's name; pick another")
    internal = {name: f"adapter{i}" for i, name in enumerate(adapters)}
    model = attach_adapters(net, {internal[n]: p for n, p in adapters.items()})
    return model, served_models(base_name if serve_base else None, adapters, internal)
