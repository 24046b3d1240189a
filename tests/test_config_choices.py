"""Config choices are Enums (baize_exp.config.Choice): OmegaConf refuses any other value at composition, the entry
points say so in one line (exit 2), and everything the old plain strings fed (JSON, YAML, W&B config, f-strings,
dict lookups, the stage fingerprints that refuse resuming under another config) sees the same bytes."""

from __future__ import annotations

import dataclasses
import functools
import json
import typing
from collections.abc import Iterator
from enum import Enum
from typing import Any

import pytest
from helpers.cli import run_cli
from helpers.config import compose_cfg
from hydra import compose, initialize_config_dir
from hydra.core.config_store import ConfigStore
from hydra.core.global_hydra import GlobalHydra
from hydra.errors import ConfigCompositionException
from omegaconf import DictConfig, OmegaConf

from baize_exp import config as C
from baize_exp.config import register_configs
from baize_exp.pipeline import fingerprint, stages

CHOICES = [c for c in vars(C).values() if isinstance(c, type) and issubclass(c, C.Choice) and c is not C.Choice]
# Where to run: a fixed root instead of ${hydra:runtime.cwd}, which only a Hydra app resolves.
WHERE = ["paths.root_dir=/tmp/baize_choices"]
OVERRIDES = [
    [],
    ["model=tiny", "train.format=chat_template", "train.loss_on=all", "collect=turns"],
    ["eval=pairwise", "sdf.select=random", "logger=csv", "strategy=ddp", "trainer.accelerator=auto"],
    ["teacher=openai", "judge=openai", "generate.backend=vllm", "model.dtype=bf16", "lora.bias=all"],
]


def _has_choice(cls: type) -> bool:
    return any(
        (isinstance(tp, type) and issubclass(tp, C.Choice)) or (dataclasses.is_dataclass(tp) and _has_choice(tp))
        for tp in typing.get_type_hints(cls).values()
    )


def _plain_type(tp: Any) -> Any:
    if isinstance(tp, type) and issubclass(tp, C.Choice):
        return str
    if dataclasses.is_dataclass(tp) and _has_choice(tp):
        return _plain_class(tp)
    return tp


@functools.cache
@typing.no_type_check
def _plain_class(cls: type) -> type:
    """A copy of a schema dataclass whose choices are plain `str` fields: the schema as it was before the Enums."""
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        if f.default is not dataclasses.MISSING:
            spec = dataclasses.field(default=_plain_value(f.default))
        else:
            spec = dataclasses.field(default_factory=lambda f=f: _plain_value(f.default_factory()))
        out.append((f.name, _plain_type(hints[f.name]), spec))
    return dataclasses.make_dataclass("Plain" + cls.__name__, out)


def _plain_value(value: Any) -> Any:
    if isinstance(value, Enum):
        return value.value
    if dataclasses.is_dataclass(value) and _has_choice(type(value)):
        plain = _plain_class(type(value))
        return plain(**{f.name: _plain_value(getattr(value, f.name)) for f in dataclasses.fields(value)})
    return value


def _compose(schema: type, overrides: list[str]) -> DictConfig:
    """The real config tree composed on `schema` as its `base_config` (the registered schema restored after)."""
    register_configs()
    store = ConfigStore.instance()
    store.store(name="base_config", node=schema)
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(C.CONF_DIR), version_base="1.3"):
            return compose(config_name="config", overrides=overrides)
    finally:
        store.store(name="base_config", node=C.Config)


def _compose_both(overrides: list[str]) -> tuple[DictConfig, DictConfig]:
    """(the config composed now, the same composed on the plain-string schema: what composed before the Enums)."""
    return _compose(C.Config, [*overrides, *WHERE]), _compose(_plain_class(C.Config), [*overrides, *WHERE])


@pytest.mark.parametrize("overrides", OVERRIDES, ids=lambda o: " ".join(o) or "default")
def test_a_composed_config_writes_the_same_bytes_as_with_plain_strings(overrides: list[str]) -> None:
    new, old = _compose_both(overrides)
    assert any(isinstance(v, C.Choice) for v in _leaves(OmegaConf.to_container(new)))  # the Enums are in play
    assert not any(isinstance(v, Enum) for v in _leaves(OmegaConf.to_container(old)))  # and not in the copy
    for resolve in (False, True):
        assert json.dumps(OmegaConf.to_container(new, resolve=resolve)) == json.dumps(
            OmegaConf.to_container(old, resolve=resolve)
        )
    assert OmegaConf.to_yaml(new) == OmegaConf.to_yaml(old)
    plain = C.to_container(new)  # W&B config and run records
    assert plain == C.to_container(old)
    assert not any(isinstance(v, Enum) for v in _leaves(plain))  # plain str: any YAML writer takes them
    for stage in stages().values():  # the markers' fingerprints: a finished run is still recognised as this config's
        assert fingerprint(new, stage.name) == fingerprint(old, stage.name), stage.name


def test_a_changed_value_changes_the_bytes() -> None:
    """Negative control: the comparison above sees a difference in one choice."""
    new = _compose(C.Config, ["model.dtype=bf16", *WHERE])
    old = _compose(_plain_class(C.Config), ["model.dtype=fp16", *WHERE])
    assert json.dumps(OmegaConf.to_container(new)) != json.dumps(OmegaConf.to_container(old))
    assert fingerprint(new, "train") != fingerprint(old, "train")


def _leaves(node: Any) -> Iterator[Any]:
    if isinstance(node, dict):
        for v in node.values():
            yield from _leaves(v)
    elif isinstance(node, list):
        for v in node:
            yield from _leaves(v)
    else:
        yield node


def _behaves_as_its_string(member: Enum) -> list[str]:
    """What differs between a choice and its plain string, where code used the string before."""
    s = member.value
    checks = {
        "==": member == s,
        "hash": hash(member) == hash(s),
        "dict key": {s: 1}.get(member) == 1,
        "str": str(member) == s,
        "f-string": f"{member}|{member:>12}" == f"{s}|{s:>12}",
        "repr": repr(member) == repr(s) and f"{member!r}" == f"{s!r}",
        "json": json.dumps({member: [member]}) == json.dumps({s: [s]}),
        "isinstance str": isinstance(member, str),
        "name": member.name == s,  # what OmegaConf writes (to_yaml, enum_to_str) and reads back (a name lookup)
    }
    return [name for name, ok in checks.items() if not ok]


@pytest.mark.parametrize("choice", CHOICES, ids=lambda c: c.__name__)
def test_every_choice_behaves_as_its_string(choice: type[C.Choice]) -> None:
    for member in choice:
        assert _behaves_as_its_string(member) == [], member


def test_a_str_enum_without_choice_does_not_behave_as_its_string() -> None:
    """Negative controls: a plain str Enum, and a Choice whose names are not its values, fail the same checks."""

    class Plain(str, Enum):
        fp32 = "fp32"

    class Renamed(C.Choice):
        FP32 = "fp32"

    assert {"str", "repr"} <= set(_behaves_as_its_string(Plain.fp32))
    assert _behaves_as_its_string(Renamed.FP32) == ["name"]


# key -> a value outside its choices; every identifier-valued choice of the schema
REFUSED = {
    "model.source": "safetensors",
    "model.family": "gpt2",
    "model.dtype": "fp64",
    "lora.bias": "some",
    "teacher.backend": "vllm",
    "judge.backend": "anthropic",
    "collect.mode": "chat",
    "collect.on_truncated": "keep",
    "train.format": "alpaca",
    "train.loss_on": "human",
    "sdf.select": "worst",
    "eval.judge_mode": "elo",
    "generate.backend": "tgi",
    "trainer.accelerator": "tpu",
    "strategy.name": "fsdp",
    "logger.name": "tensorboard",
    "logger.mode": "dryrun",
}


def test_every_choice_is_covered() -> None:
    typed = {k for k in _choice_keys(C.Config)}
    assert typed == set(REFUSED)


def _choice_keys(cls: type, prefix: str = "") -> Iterator[str]:
    for name, tp in typing.get_type_hints(cls).items():
        if dataclasses.is_dataclass(tp):
            yield from _choice_keys(tp, f"{prefix}{name}.")
        elif isinstance(tp, type) and issubclass(tp, C.Choice):
            yield prefix + name


@pytest.mark.parametrize("key", list(REFUSED))
def test_a_value_outside_a_choice_is_refused_at_composition(key: str) -> None:
    bad = f"{key}={REFUSED[key]}"
    old = _compose(_plain_class(C.Config), [bad])
    assert OmegaConf.select(old, key) == REFUSED[key]  # negative control: a plain str field takes it
    with pytest.raises(ConfigCompositionException) as e:
        _compose(C.Config, [bad])
    allowed = ", ".join(m.value for m in C._schema_type(key))
    assert str(C.composition_error(e.value)) == f"invalid config: {key}={REFUSED[key]!r}: one of {allowed}"


def test_a_good_value_composes_as_its_choice() -> None:
    cfg = compose_cfg(["model.dtype=bf16", "trainer.accelerator=auto"])
    assert cfg.model.dtype is C.ModelDtype.bf16 and cfg.model.dtype == "bf16"
    assert cfg.trainer.accelerator is C.Accelerator.auto


@pytest.mark.parametrize(
    ("override", "line"),
    [
        ("lora.rank_typo=8", "invalid config: lora.rank_typo: no such key (python run.py --help lists every key)"),
        # a key without its group is answered with where it lives (no top-level seed: each stage has its own)
        (
            "seed=1",
            "invalid config: seed: no such key; did you mean data.seed or model.seed or train.seed or sdf.seed or "
            "eval.seed? (python run.py --help lists every key)",
        ),
        ("r=8", "invalid config: r: no such key; did you mean lora.r? (python run.py --help lists every key)"),
        (
            "teacher.prices.gpt-x.prompt=1",
            "invalid config: teacher.prices.gpt-x: not there yet; add it with a leading +",
        ),
        ("lora.r=abc", "invalid config: lora.r='abc': Value 'abc' of type 'str' could not be converted to Integer"),
        ("model=70b", "In 'config': Could not find 'model/70b'; the options are 13b, 30b, 7b, llama3_8b, mistral_7b"),
        (
            "lora.r=1,2",
            "Ambiguous value for argument 'lora.r=1,2'; 1. To use it as a list, use key=[value1,value2]; 2.",
        ),
    ],
    ids=["key", "seed", "r", "dict entry", "type", "option", "sweep syntax"],
)
def test_other_composition_errors_are_one_line_too(override: str, line: str) -> None:
    with pytest.raises(ConfigCompositionException) as e:
        _compose(C.Config, [override])
    message = str(C.composition_error(e.value))
    assert message.startswith(line) and "\n" not in message, message


def test_run_py_says_a_value_outside_a_choice_in_one_line_exit_2(tmp_path) -> None:
    r = run_cli("model.dtype=fp64", f"hydra.run.dir={tmp_path / 'run'}", timeout=300)
    assert r.returncode == 2, r.stderr[-2000:]
    assert r.stderr == "baize_exp: invalid config: model.dtype='fp64': one of auto, fp32, bf16, fp16\n"
    assert not (tmp_path / "run").exists()  # refused before a run dir


def test_hydra_full_error_keeps_hydras_own_report(tmp_path) -> None:
    """Negative control: a user who asks Hydra for its full report gets it (a traceback, exit 1), not our line."""
    r = run_cli("model.dtype=fp64", f"hydra.run.dir={tmp_path / 'run'}", env={"HYDRA_FULL_ERROR": "1"}, timeout=300)
    assert r.returncode == 1
    assert "Traceback" in r.stderr and "ConfigCompositionException" in r.stderr
    assert "baize_exp: invalid config" not in r.stderr
