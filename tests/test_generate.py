"""Student generation shared out over the ranks of a multi-process launch gives what one process gives."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from baize_exp.errors import UserError
from baize_exp.generate import (
    batch_seed,
    pick_backend,
    sharded_map,
    vllm_lora_rank,
    vllm_sampling,
    vllm_unavailable,
)

# One rank of a torchrun-like launch (RANK/WORLD_SIZE in the environment): SDF candidates (sampled) and eval-style
# greedy answers of the tiny model, each batch on the rank it is dealt to; rank 0 prints what it gathered.
_RANK = r"""
import json, os, sys
from pathlib import Path
import torch
from hydra import compose, initialize_config_dir
from baize_exp.config import CONF_DIR, register_configs
from baize_exp import models as M
from baize_exp.generate import sharded_map
from baize_exp.stages.sdf import sample_candidates

register_configs()
with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
    cfg = compose(config_name="config", overrides=["model=tiny"])
model, tok = M.load_model_and_tokenizer(cfg.model, Path(os.environ["BAIZE_CACHE"]))
prompts = [f"Question number {i}: what do you think about item {i}?" for i in range(7)]
shards = Path(sys.argv[1]) if sys.argv[1] != "-" else None
cands = sample_candidates(model, tok, prompts, n=3, max_new_tokens=6, temperature=1.0, top_p=0.95, batch_size=2,
                          seed=5, shard_dir=shards, key="cands")
greedy = lambda batch, b: [t[0] for t in M.generate_texts(model, tok, batch, 6, batch_size=len(batch))]
answers = (sharded_map(prompts, 2, greedy, shards, "answers") if shards else
           [a for i in range(0, 7, 2) for a in greedy(prompts[i:i + 2], 0)])
print("RESULT " + json.dumps({"cands": cands, "answers": answers}))
"""


def _run(world: int, shard_dir: Path | None) -> list[dict]:
    procs = []
    for rank in range(world):
        env = {**os.environ, "RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank), "BAIZE_THREADS": "1"}
        procs.append(
            subprocess.Popen(
                [sys.executable, "-c", _RANK, str(shard_dir) if shard_dir else "-"],
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
        )
    outs = [p.communicate(timeout=600)[0] for p in procs]
    for p, out in zip(procs, outs, strict=True):
        assert p.returncode == 0, out[-3000:]
    return [json.loads(next(ln[7:] for ln in out.splitlines() if ln.startswith("RESULT "))) for out in outs]


@pytest.mark.slow
def test_two_ranks_give_exactly_what_one_process_gives(tmp_path: Path) -> None:
    (single,) = _run(1, None)
    shards = tmp_path / "shards"
    rank0, rank1 = _run(2, shards)
    assert rank0 == single  # sampled candidates and greedy answers alike, in input order
    assert rank1 == {"cands": None, "answers": None}  # the other rank hands its share over and gets nothing back
    assert len(single["cands"]) == 7 and all(len(c) == 3 for c in single["cands"])
    # every batch exactly once, on the rank it was dealt to (4 batches of 2: ranks 0, 1, 0, 1)
    for key in ("cands", "answers"):
        done = {
            r: [json.loads(x)["batch"] for x in (shards / f"{key}.rank{r}.jsonl").read_text().splitlines()]
            for r in (0, 1)
        }
        assert done == {0: [0, 2], 1: [1, 3]}


def test_sharded_map_deals_batches_round_robin_and_reuses_finished_ones(tmp_path: Path) -> None:
    calls: list[int] = []

    def double(batch: list[int], index: int) -> list[int]:
        calls.append(index)
        return [2 * x for x in batch]

    # rank 1 of 2 writes its batches and gets nothing back; rank 0 then gathers everything in order
    assert sharded_map(list(range(9)), 2, double, tmp_path, "k", rank=1, world=2) is None
    assert calls == [1, 3]
    assert sharded_map(list(range(9)), 2, double, tmp_path, "k", rank=0, world=2) == [2 * x for x in range(9)]
    assert calls == [1, 3, 0, 2, 4]
    # a rerun (a restarted job) redoes nothing that was finished; another key is other work
    assert sharded_map(list(range(9)), 2, double, tmp_path, "k", rank=0, world=2) == [2 * x for x in range(9)]
    assert calls == [1, 3, 0, 2, 4]
    assert batch_seed(5, 3) != batch_seed(5, 4) and batch_seed(5, 3) == batch_seed(5, 3)


def test_vllm_backend_falls_back_to_hf_saying_why(caplog) -> None:
    from helpers.config import compose_cfg

    assert pick_backend(compose_cfg(["model=tiny"])) == "hf"
    assert not caplog.records  # the default says nothing
    cfg = compose_cfg(["model=tiny", "generate.backend=vllm"])
    why = vllm_unavailable("cpu")
    if why is None:  # vllm and a GPU here: only trainer.accelerator=cpu keeps it off
        pytest.skip("vllm and a CUDA GPU are present")
    assert pick_backend(cfg) == "hf"
    (rec,) = [r for r in caplog.records if r.levelname == "WARNING"]
    assert rec.getMessage().startswith(f"generate.backend=vllm: {why}; generating with the HF path instead")
    assert ("not installed" in why) or ("CUDA" in why)


def test_vllm_sampling_means_what_the_hf_path_means() -> None:
    sampled = vllm_sampling(4, 1.0, 0.95, 96, ["[|Human|]"], 7)
    assert sampled == {
        "n": 4,
        "temperature": 1.0,
        "top_p": 0.95,
        "top_k": -1,
        "max_tokens": 96,
        "stop": ["[|Human|]"],
        "stop_token_ids": [],
        "seed": 7,
        "skip_special_tokens": True,
    }
    assert vllm_sampling(1, 1.0, 1.0, 8, [], 0, [128009])["stop_token_ids"] == [128009]  # e.g. Llama-3's <|eot_id|>
    greedy = vllm_sampling(1, 0.0, 0.95, 128, [], 0)
    assert greedy["temperature"] == 0.0 and greedy["top_p"] == 1.0  # greedy ignores top_p, as generate does
    assert [vllm_lora_rank(r) for r in (1, 8, 9, 64, 65)] == [8, 8, 16, 64, 128]
    with pytest.raises(UserError, match="lora.r=1024"):
        vllm_lora_rank(1024)


@pytest.mark.slow  # builds, saves and reloads a random model: ~20 s
def test_a_random_model_is_written_once_as_a_folder_an_engine_can_load(tmp_path: Path) -> None:
    import torch
    from helpers.config import compose_cfg
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from baize_exp import models as M

    cfg = compose_cfg(["model=tiny"])
    cache = Path(os.environ["BAIZE_CACHE"])
    folder = Path(M.model_folder(cfg.model, tmp_path))
    assert folder.parent == tmp_path / "models" and (folder / "DONE").is_file()
    stamp = (folder / "config.json").stat().st_mtime_ns
    assert M.model_folder(cfg.model, tmp_path) == str(folder)  # written once
    assert (folder / "config.json").stat().st_mtime_ns == stamp
    loaded = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    ours = M.load_model(cfg.model, cache)
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), ours.state_dict().values(), strict=True))
    assert AutoTokenizer.from_pretrained(folder).get_vocab() == M.load_tokenizer(cfg.model, cache).get_vocab()
    other = compose_cfg(["model=tiny", "model.seed=1"])
    assert M.model_folder(other.model, tmp_path) != str(folder)  # other weights, other folder


def test_sampling_shows_a_progress_bar_with_its_rate(capsys) -> None:
    """SDF's sampling and eval's answers go through `sample_with`: with a desc it counts items and their rate on
    stderr (a long sampling run is not silent); without one it prints nothing."""
    from baize_exp.generate import sample_with

    def double(batch: list[int], index: int) -> list[int]:
        return [2 * x for x in batch]

    assert sample_with(double, list(range(9)), 4, None, "k", desc="sdf: v1 candidates") == [2 * x for x in range(9)]
    err = capsys.readouterr().err
    assert "sdf: v1 candidates" in err and "9/9" in err and "prompt/s" in err
    assert sample_with(double, list(range(9)), 4, None, "k") == [2 * x for x in range(9)]
    assert capsys.readouterr().err == ""
