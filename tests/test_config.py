"""Every config option composes and validates; the CLI prints configs, help and clear errors."""

from __future__ import annotations

import pytest
from helpers.cli import run_cli
from helpers.config import CONF, compose_cfg

from baize_exp.config import ConfigError, validate

GROUP_OPTIONS = sorted(
    (p.parent.name, p.stem)
    for p in CONF.glob("*/*.yaml")
    if p.parent.name not in ("hydra", "sweep", "hparams_search")  # these set hydra.*: tests/test_sweeps.py
)
NEEDS = {
    ("data", "file"): [f"data.path={CONF / 'config.yaml'}"],  # any existing file satisfies validate
    ("data", "hf"): [f"data.hf.path={CONF / 'config.yaml'}"],
}


@pytest.mark.parametrize(("group", "option"), GROUP_OPTIONS, ids=[f"{g}={o}" for g, o in GROUP_OPTIONS])
def test_every_option_composes_and_validates(group: str, option: str) -> None:
    overrides = [f"{group}={option}", *NEEDS.get((group, option), [])]
    if group in ("strategy",) and option.startswith("deepspeed"):
        overrides.append("trainer=gpu")  # ZeRO runs on CUDA only; validate says so otherwise
    cfg = compose_cfg(overrides)
    validate(cfg)
    if group not in ("experiment", "debug"):
        assert cfg[group] is not None


def test_every_group_is_covered() -> None:
    groups = {g for g, _ in GROUP_OPTIONS}
    assert {
        "data",
        "model",
        "lora",
        "sdf",
        "teacher",
        "judge",
        "trainer",
        "strategy",
        "logger",
        "paths",
        "experiment",
    } <= groups


def test_deepspeed_on_cpu_is_refused_with_the_reason() -> None:
    with pytest.raises(ConfigError, match="trainer.accelerator.*CUDA"):
        validate(compose_cfg(["strategy=deepspeed_stage_2"]))


def test_validate_lists_every_problem_at_once() -> None:
    cfg = compose_cfg(["lora.r=-3", "data.limit=0", "lora.dropout=1.5", "judge.serve.max_batch=0"])
    with pytest.raises(ConfigError) as e:
        validate(cfg)
    msg = str(e.value)
    for needle in ("lora.r=-3", "data.limit=0", "lora.dropout=1.5", "judge.serve.max_batch=0"):
        assert needle in msg
    assert "\n" not in msg  # one line


def test_stages_are_an_in_order_subset_of_the_pipeline() -> None:
    from baize_exp.pipeline import _check_stages, stages

    assert [s.name for s in _check_stages(compose_cfg(["stages=[collect,eval]"]))] == ["collect", "eval"]
    for bad in ("stages=[train,collect]", "stages=[]", "stages=[colect]"):
        with pytest.raises(ConfigError, match=r"stages=.*in that order"):
            _check_stages(compose_cfg([bad]))
    assert list(stages()) == ["plan", "collect", "train", "sdf", "eval", "report"]


def _leaves(node, path=()):
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _leaves(v, (*path, k))
    else:
        yield path, node


def test_yaml_options_hold_only_what_differs_from_the_dataclass_defaults() -> None:
    """The dataclasses are the one source of defaults and field docs: an option file repeats a default only with a
    comment on that line saying why (the word "default" in it)."""
    from omegaconf import OmegaConf

    from baize_exp.config import Config

    defaults = OmegaConf.to_container(OmegaConf.structured(Config()), resolve=False)
    repeated = []
    for path in sorted(CONF.glob("*/*.yaml")):
        group, text = path.parent.name, path.read_text()
        if group not in defaults or "@package" in text:
            continue
        lines = text.splitlines()
        for keys, value in _leaves(OmegaConf.to_container(OmegaConf.load(path), resolve=False) or {}):
            default = defaults[group]
            for k in keys:
                default = default.get(k, "<absent>") if isinstance(default, dict) else "<absent>"
            if keys == ("defaults",) or value != default or default == "???":
                continue
            line = next((ln for ln in lines if ln.lstrip().startswith(f"{keys[-1]}:")), "")
            if "#" not in line or "default" not in line.split("#", 1)[1]:
                repeated.append(f"{path.relative_to(CONF)}: {'.'.join(keys)}={value!r}")
    assert not repeated, "options repeating a dataclass default (remove them, or say why on that line): " + "; ".join(
        repeated
    )


def test_the_shipped_defaults_are_the_dataclass_defaults() -> None:
    """`python run.py` runs with what the dataclasses say (the default options add only the templates)."""
    from omegaconf import OmegaConf

    from baize_exp.config import Config

    cfg = OmegaConf.to_container(compose_cfg([]), resolve=False)
    want = OmegaConf.to_container(OmegaConf.structured(Config()), resolve=False)
    for group in ("data", "lora", "teacher", "judge", "train", "trainer", "strategy", "plan", "logger", "paths"):
        assert cfg[group] == want[group], group
    for group in ("collect", "sdf", "eval"):
        assert {k: v for k, v in cfg[group].items() if want[group][k] != "???"} == {
            k: v for k, v in want[group].items() if v != "???"
        }, group


@pytest.mark.parametrize(
    ("entry", "needle"), [("collect", "baize-collect: self-chat collection only"), ("plan", "baize-plan: will it fit?")]
)
def test_collect_and_plan_entry_points_have_their_own_help(entry: str, needle: str) -> None:
    import subprocess
    import sys

    r = subprocess.run(
        [sys.executable, "-c", f"from baize_exp.cli import {entry}; {entry}()", "--help"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr
    assert needle in r.stdout and "stages" in r.stdout


def test_api_key_in_place_of_its_env_var_name_is_refused() -> None:
    with pytest.raises(ConfigError, match="teacher.api_key_env") as e:
        validate(compose_cfg(["teacher=openai", "teacher.api_key_env=sk-abc123"]))
    assert "sk-abc123" not in str(e.value)  # the error must not echo the secret


def test_card_command_prints_13b_with_r8() -> None:
    r = run_cli("model=13b", "lora.r=8", "--cfg", "job")
    assert r.returncode == 0, r.stderr
    assert "name: llama_13b" in r.stdout and "hidden_size: 5120" in r.stdout
    assert "\n  r: 8\n" in r.stdout


def test_help_lists_groups_and_options() -> None:
    r = run_cli("--help")
    assert r.returncode == 0
    assert "baize_exp" in r.stdout
    for line in (
        "model: 13b, 30b, 7b, llama3_8b, mistral_7b, qwen2_5_7b, random_1b, smollm2_135m, tiny",
        "teacher: local, openai, vllm",
        "strategy: auto, ddp, deepspeed_stage_2, deepspeed_stage_3, deepspeed_stage_3_offload",
        "data: quora, stackoverflow, medical, alpaca are the shipped 200-question samples unless data.path",
    ):
        assert line in r.stdout


@pytest.mark.parametrize(
    ("override", "needles"),
    [
        ("lora.rank_typo=8", ["lora.rank_typo"]),
        ("lora.r=abc", ["lora.r", "abc"]),
        ("lora.r=-3", ["lora.r=-3", ">= 1"]),
        ("data.limit=0", ["data.limit=0", ">= 1"]),
        ("model=70b", ["model", "70b"]),
    ],
)
def test_bad_override_stops_before_any_work(tmp_path, override: str, needles: list[str]) -> None:
    r = run_cli(override, f"hydra.run.dir={tmp_path / 'run'}", "logger=none")
    assert r.returncode != 0
    out = r.stdout + r.stderr
    for n in needles:
        assert n in out, out[-2000:]
    assert not (tmp_path / "run" / "collect").exists()  # no stage started


def test_missing_data_path_for_file_source() -> None:
    with pytest.raises(ConfigError, match="data.path"):
        validate(compose_cfg(["data=file", "data.path=/nonexistent/seeds.jsonl"]))
