"""The GPU check's CPU dry run (benchmarks/gpu_check.py --cpu-dry-run): every part runs through the same code on
the tiny model, so the one command a lent GPU machine gets is known to work up to the device."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_gpu_check_dry_run_trains_stops_resumes_generates_and_prints_one_table(tmp_path: Path) -> None:
    out = tmp_path / "gpu_check"
    r = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--cpu-dry-run", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=900,
        env={**os.environ, "BAIZE_THREADS": "2"},
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    rows = {row["check"].split(" (")[0]: row for row in json.loads((out / "gpu_check.json").read_text())["rows"]}
    assert set(rows) == {"train auto", "generate hf", "generate vllm", "train tiny"}
    train = rows["train auto"]
    assert train["status"] == "ok" and train["loss_last"] < train["loss_first"]
    assert train["resume_max_diff"] <= 1e-5  # stopped at step 2 (exit 75), the same command continued exactly
    assert 0 < train["ckpt_share_of_base"] < 0.1  # the checkpoint holds the LoRA weights and their state only
    log = (out / "logs" / "auto_resumed.log").read_text()
    assert "stopped after step 2 as train.stop_at_step=2 asks" in log and "Restoring states from the checkpoint" in log
    assert rows["generate hf"]["cpu_sdf_tokens_per_s"] > 0 and rows["generate hf"]["cpu_eval_tokens_per_s"] > 0
    assert rows["generate vllm"]["status"] == "skipped" and rows["generate vllm"]["reason"]
    assert 0 < rows["train tiny"]["mfu"] < 1
    table = (out / "gpu_check.md").read_text()
    assert table in r.stdout and table.count("\n| ") == 5  # header + 4 rows, printed and written alike
