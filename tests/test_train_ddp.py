"""DDP with 2 CPU processes on gloo through the real entry point (a fresh `python run.py`: under pytest, Lightning's
ddp would re-launch the pytest command itself for rank 1)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from helpers.cli import run_cli
from test_train import dialogs


@pytest.mark.slow
def test_ddp_two_processes_train_disjoint_shards_and_write_one_adapter(tmp_path: Path) -> None:
    data = tmp_path / "dialogs.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in dialogs(20)))
    run_dir = tmp_path / "run"
    r = run_cli(
        "model=tiny",
        "stages=[train]",
        f"train.data={data}",
        "logger=csv",
        "strategy=ddp",
        "trainer.devices=2",
        "trainer.max_steps=4",
        "train.max_length=64",
        "train.peak_flops=1e11",
        "trainer.enable_progress_bar=false",
        f"hydra.run.dir={run_dir}",
        timeout=600,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    stage = run_dir / "train"
    ranks = [json.loads((stage / f"train_rank{k}.json").read_text()) for k in (0, 1)]
    assert [x["rank"] for x in ranks] == [0, 1] and all(x["world_size"] == 2 for x in ranks)
    assert ranks[0]["batches_trained"] == ranks[1]["batches_trained"] == 4  # in step: equal batch counts
    for x in ranks:
        assert x["supervised_seen"] > 0 and all(math.isfinite(v) and 0 < v < 20 for v in x["last_losses"])
    assert ranks[0]["last_losses"] != ranks[1]["last_losses"]  # each rank saw its own shard
    assert (stage / "adapter" / "adapter_model.safetensors").is_file()
    assert json.loads((stage / "adapter" / "adapter_config.json").read_text())["r"] == 8
    m = json.loads((run_dir / "metrics.json").read_text())["train"]
    assert m["world_size"] == 2 and m["steps"] == 4
