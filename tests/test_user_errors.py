"""A walk over the failures a user causes inside a stage (after the config is valid): each ends, through the entry
points' own `exit_on_error`, as one line naming the file, key or path and the fix, with exit status 2. In process,
so each case costs a second or two (tests/test_errors.py runs the config and data cases through run.py itself)."""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable
from pathlib import Path

import pytest
from helpers.config import compose_cfg

from baize_exp.data import load_eval_questions
from baize_exp.errors import exit_on_error
from baize_exp.pipeline import run_pipeline

DIALOG = {"id": "d0", "turns": [{"role": "human", "text": "Why is the sky blue?"}, {"role": "ai", "text": "Light."}]}


def _dialogs(tmp: Path) -> str:
    path = tmp / "d.jsonl"
    path.write_text("".join(json.dumps({**DIALOG, "id": f"d{i}"}) + "\n" for i in range(4)))
    return str(path)


def _fake_v1(tmp: Path) -> None:
    """A run dir whose train stage left an adapter folder (what the SDF stage looks for first)."""
    (tmp / "run" / "train" / "adapter").mkdir(parents=True)
    (tmp / "run" / "train" / "adapter" / "adapter_config.json").write_text("{}")


def _tokenizer_without_template(tmp: Path) -> str:
    from transformers import AutoTokenizer

    from baize_exp.models import tokenizer_dir

    tok = AutoTokenizer.from_pretrained(tokenizer_dir(Path(os.environ["BAIZE_CACHE"])))
    tok.chat_template = None
    tok.save_pretrained(tmp / "tok")
    (tmp / "tok" / "chat_template.jinja").unlink(missing_ok=True)
    return str(tmp / "tok")


def _questions_without_references(tmp: Path) -> str:
    path = tmp / "q.jsonl"
    path.write_text(json.dumps({"question_id": "q1", "category": "x", "question": "Why?"}) + "\n")
    return str(path)


def _eval_question_as_prompt(tmp: Path) -> str:
    path = tmp / "prompts.jsonl"
    path.write_text(json.dumps({"question": load_eval_questions()[0]["question"]}) + "\n")
    return str(path)


# case -> (setup: tmp dir -> overrides, what the one line must say)
CASES: dict[str, tuple[Callable[[Path], list[str]], str]] = {
    "sdf before train": (lambda tmp: ["stages=[sdf]"], r"sdf: no v1 adapter at .*; run the train stage first"),
    "sdf prompts are eval questions": (
        lambda tmp: (
            _fake_v1(tmp),
            ["stages=[sdf]", f"train.data={_dialogs(tmp)}", f"sdf.prompts={_eval_question_as_prompt(tmp)}"],
        )[1],
        r"sdf: 1 prompt\(s\) are eval questions .* remove them from .*prompts.jsonl",
    ),
    "eval.models names a folder that is no adapter": (
        lambda tmp: ["stages=[eval]", f"eval.models=[{tmp}]"],
        r"eval.models: '.*' is neither an adapter dir \(adapter_config.json\) nor a run dir",
    ),
    "reference judging without references": (
        lambda tmp: [
            "stages=[eval]",
            "eval.judge_mode=reference",
            f"eval.questions={_questions_without_references(tmp)}",
        ],
        r"eval.judge_mode=reference needs a 'reference' answer .* lacks one for \['q1'\]; use eval.judge_mode=single",
    ),
    "chat_template format on a tokenizer without one": (
        lambda tmp: [
            "stages=[train]",
            f"train.data={_dialogs(tmp)}",
            "train.format=chat_template",
            f"model.tokenizer={_tokenizer_without_template(tmp)}",
        ],
        r"train.format=chat_template: the tokenizer has no chat template; use train.format=baize",
    ),
    "a LoRA target that is not in the model": (
        lambda tmp: ["stages=[train]", f"train.data={_dialogs(tmp)}", "lora.target_modules=[q_proj,qproj]"],
        r"lora.target_modules: \['qproj'\] match no module of LlamaForCausalLM; its linear layers are",
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_a_user_error_inside_a_stage_is_one_line_and_exit_2(
    case: str, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    setup, message = CASES[case]
    cfg = compose_cfg(["model=tiny", "logger=none", f"paths.output_dir={tmp_path / 'run'}", *setup(tmp_path)])
    with pytest.raises(SystemExit) as stop, exit_on_error("baize_exp"):
        run_pipeline(cfg)
    assert stop.value.code == 2
    err = capsys.readouterr().err
    (line,) = [x for x in err.splitlines() if x.startswith("baize_exp:")]
    assert re.search(message, line), line
    assert "Traceback" not in err


def test_baize_report_on_a_path_that_is_no_run_is_one_line_and_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    from baize_exp.stages.report import main

    (tmp_path / "empty").mkdir()
    for path, message in (
        (tmp_path / "missing", r"report: .*missing is not a directory; give run dirs or a multirun dir"),
        (tmp_path / "empty", r"report: no run dirs \(metrics.json or .hydra/\) under .*empty"),
    ):
        with pytest.raises(SystemExit) as stop:
            main([str(path)])
        assert stop.value.code == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("baize-report: ") and re.search(message, err[0]), err
