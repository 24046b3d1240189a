"""The config's documentation comes from the schema: every field has a docstring, `python run.py --help` lists every
key with its value and doc, and docs/config.md and the README's table are what baize_exp.config_docs generates."""

from __future__ import annotations

import dataclasses

import pytest
from helpers.cli import run_cli
from helpers.config import compose_cfg
from omegaconf import OmegaConf

from baize_exp import config as C
from baize_exp import config_docs as D


@dataclasses.dataclass
class _Sample:
    documented: int = 1
    """What it does,
    over two lines."""
    commented: int = 2  # a comment is no docstring
    # nor is one above
    below_a_comment: int = 3
    last: int = 4


def test_a_docstring_is_the_string_right_under_a_field() -> None:
    assert D.field_docs(_Sample) == {"documented": "What it does, over two lines."}
    assert [k.name for k in D.schema_keys(_Sample) if not k.doc] == ["commented", "below_a_comment", "last"]


def test_every_field_has_a_docstring() -> None:
    assert D.undocumented() == [], "fields without a docstring (the string right under the field in config.py)"
    assert len(D.schema_keys()) > 200  # every leaf: nested groups (teacher.serve.*, collect.quality.*) flattened


def test_the_defaults_shown_are_the_composed_defaults() -> None:
    """A group's own defaults win over its class's (judge: greedy, short replies), and a key an option fills shows
    as set by the option."""
    schema = OmegaConf.to_container(OmegaConf.structured(C.Config), resolve=False)  # "???" where missing
    wrong = []
    for key in D.schema_keys():
        if key.type.endswith("Config]"):  # a dict of groups (teacher.prices) shows its keys only
            continue
        value = schema
        for part in key.name.split("."):
            value = value[part]
        if key.default != D._show(value):
            wrong.append(f"{key.name}: {key.default} != {value}")
    assert wrong == []
    shown = {k.name: k.default for k in D.schema_keys()}
    assert (shown["teacher.temperature"], shown["judge.temperature"], shown["judge.max_tokens"]) == ("0.7", "0.0", "48")
    assert shown["model.source"] == "(set by the option)"
    # negative control: the class's own defaults, which a group made by a factory (judge) does not have
    class_defaults = {k.name: k.default for k in D.schema_keys(C.ChatBackendConfig, "judge.")}
    assert class_defaults["judge.temperature"] == "0.7"


def test_a_choice_shows_its_values_as_its_type() -> None:
    types = {k.name: k.type for k in D.schema_keys()}
    assert types["model.dtype"] == "auto | fp32 | bf16 | fp16"
    assert types["lora.r"] == "int"


def test_help_text_shows_the_composed_values() -> None:
    default, big = D.help_text(compose_cfg()), D.help_text(compose_cfg(["model=13b", "lora.r=16"]))
    assert "\n  model.hidden_size=576\n" in default and "\n  lora.r=8\n" in default  # the embedded SmolLM2
    assert "\n  model.hidden_size=5120\n" in big and "\n  lora.r=16\n" in big
    assert "\n  model.hidden_size=0\n" in D.help_text()  # no config: the schema's own defaults


def test_run_py_help_lists_every_key_with_its_value_and_doc() -> None:
    r = run_cli("--help", "lora.r=16")
    assert r.returncode == 0, r.stderr[-2000:]
    doc = dict((k.name, k.doc) for k in D.schema_keys())["lora.r"]
    assert f"\n  lora.r=16\n      {doc}\n" in r.stdout
    missing = [k.name for k in D.schema_keys() if f"\n  {k.name}=" not in r.stdout]
    assert missing == []
    # `$` survives Hydra's string.Template (a lone `${` there would be an invalid placeholder)
    assert "\n  paths.output_dir=${paths.root_dir}/outputs\n" in r.stdout


def test_markdown_cells_escape_pipes_and_tags() -> None:
    assert D._md("a | b <run>/x `<stage>|y`") == "a \\| b &lt;run>/x `<stage>\\|y`"
    assert D._md("<run>", cell=False) == "&lt;run>"


def _fail_unless_current(stale: list[str]) -> None:
    if stale:
        pytest.fail(f"{' and '.join(stale)} out of date: {D.REGENERATE}", pytrace=False)


def test_docs_config_md_is_current() -> None:
    text = D.REFERENCE.read_text() if D.REFERENCE.is_file() else ""
    _fail_unless_current([s for s in D.out_of_date(text, D.README.read_text()) if s == "docs/config.md"])


def test_readme_config_table_is_current() -> None:
    text = D.REFERENCE.read_text() if D.REFERENCE.is_file() else ""
    _fail_unless_current([s for s in D.out_of_date(text, D.README.read_text()) if s != "docs/config.md"])


def test_an_edited_copy_is_out_of_date() -> None:
    """Negative controls for the two checks above: a changed line, or a README without the markers."""
    reference, readme = D.reference(), f"intro\n{D.TABLE_START}\nold table\n{D.TABLE_END}\nrest\n"
    current = D.readme_with_table(readme)
    assert D.out_of_date(reference, current) == []
    assert D.out_of_date(reference.replace("Rank:", "Rank (edited):"), current) == ["docs/config.md"]
    assert D.out_of_date(reference, current.replace("| `lora` |", "| `lora_edited` |")) == [
        "the config table in README.md"
    ]
    assert D.out_of_date(reference, "a README without the markers\n") == ["the config table in README.md"]
    assert D.out_of_date(reference, readme) == ["the config table in README.md"]  # the table not yet written
