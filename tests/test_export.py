"""baize-export (python -m baize_exp.merge): adapter + base → a standalone HF model dir plain transformers loads."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers.config import ROOT, compose_cfg
from omegaconf import OmegaConf
from transformers import AutoModelForCausalLM, AutoTokenizer

from baize_exp import models as M


def _export_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "baize_exp.merge", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        env=dict(os.environ),
    )


@pytest.fixture
def trained_run(tmp_path: Path):
    """A run dir as the pipeline leaves it: .hydra/config.yaml and train/adapter with a non-trivial LoRA."""
    cfg = compose_cfg(["model=tiny"])
    run = tmp_path / "run"
    (run / ".hydra").mkdir(parents=True)
    OmegaConf.save(cfg, run / ".hydra" / "config.yaml")
    model, tok = M.load_model_and_tokenizer(cfg.model, Path(os.environ["BAIZE_CACHE"]))
    peft = M.attach_lora(model, cfg.lora)
    torch.manual_seed(1)
    with torch.no_grad():  # B starts at zero: give the adapter something to merge
        for n, p in peft.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.2)
    adapter = run / "train" / "adapter"
    peft.save_pretrained(str(adapter))
    tok.save_pretrained(str(adapter))
    (adapter / "prompt_format.json").write_text(json.dumps({"format": "baize"}))
    peft.eval()
    return run, peft, tok


def test_merged_dir_loads_with_plain_transformers_and_matches_the_adapter(trained_run, tmp_path: Path) -> None:
    run, peft, tok = trained_run
    # as a run made before model.tie_word_embeddings existed wrote it: export must still rebuild the same base
    saved = OmegaConf.load(run / ".hydra" / "config.yaml")
    del saved.model["tie_word_embeddings"]
    OmegaConf.save(saved, run / ".hydra" / "config.yaml")
    out = tmp_path / "merged"
    r = _export_cli(str(run), "--out", str(out))
    assert r.returncode == 0, r.stderr[-3000:]
    assert "merged into tiny" in r.stdout
    assert not (out / "adapter_config.json").exists()  # a plain model, no peft
    merged = AutoModelForCausalLM.from_pretrained(str(out)).eval()
    tok2 = AutoTokenizer.from_pretrained(str(out))
    ids = tok2("[|Human|]Hello there, how are you?\n[|AI|]", return_tensors="pt").input_ids
    assert torch.equal(ids, tok("[|Human|]Hello there, how are you?\n[|AI|]", return_tensors="pt").input_ids)
    with torch.no_grad():
        want = peft(ids).logits
        got = merged(ids).logits
        base = M.load_model(compose_cfg(["model=tiny"]).model, Path(os.environ["BAIZE_CACHE"]))(ids).logits
    assert (want - base).abs().max() > 1e-2  # the adapter changes the output, so equality below means something
    assert torch.allclose(got, want, atol=1e-4), (got - want).abs().max()
    assert json.loads((out / "prompt_format.json").read_text()) == {"format": "baize"}
    rec = json.loads((out / "baize_export.json").read_text())
    assert rec["adapter"] == str((run / "train" / "adapter").resolve()) and rec["base"]["name"] == "tiny"


def _export_main(capsys, *args: str) -> tuple[int, str]:
    """The CLI's own main() in-process (a subprocess per error case would cost seconds each)."""
    from baize_exp.merge import main

    try:
        rc = main(list(args))
    except SystemExit as e:  # the one-line error path (errors.exit_on_error)
        rc = e.code
    return rc, capsys.readouterr().err


def test_adapter_dir_outside_a_run_needs_model_and_a_wrong_base_is_named(trained_run, tmp_path: Path, capsys) -> None:
    run, _, _ = trained_run
    lone = tmp_path / "lone_adapter"
    (run / "train" / "adapter").rename(lone)
    rc, err = _export_main(capsys, str(lone), "--out", str(tmp_path / "a"))
    assert rc == 2 and "--model" in err

    rc, err = _export_main(capsys, str(lone), "--out", str(tmp_path / "b"), "--model", "nosuch")
    assert rc == 2 and "'nosuch'" in err and "tiny" in err

    rc, err = _export_main(capsys, str(lone), "--out", str(tmp_path / "b"), "--model", "tiny")
    assert rc == 0 and (tmp_path / "b" / "config.json").is_file()

    # a run whose base is wider than the one the adapter was trained on: the shapes cannot fit; the error says so
    cfg = OmegaConf.load(run / ".hydra" / "config.yaml")
    cfg.model.hidden_size = 128
    OmegaConf.save(cfg, run / ".hydra" / "config.yaml")
    (run / "train" / "adapter").mkdir(parents=True)
    for f in lone.iterdir():
        (run / "train" / "adapter" / f.name).write_bytes(f.read_bytes())
    rc, err = _export_main(capsys, str(run), "--out", str(tmp_path / "c"))
    assert rc == 2 and "does not fit base model tiny" in err, err
    assert not (tmp_path / "c").exists()


def test_refuses_to_overwrite_and_reports_a_missing_adapter(trained_run, tmp_path: Path, capsys) -> None:
    run, _, _ = trained_run
    out = tmp_path / "busy"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    rc, err = _export_main(capsys, str(run), "--out", str(out))
    assert rc == 2 and "--overwrite" in err
    assert (out / "keep.txt").read_text() == "mine"
    rc, err = _export_main(capsys, str(run), "--out", str(tmp_path / "x"), "--which", "v2")
    assert rc == 2 and "sdf/adapter" in err
