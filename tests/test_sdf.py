"""Self-distillation with feedback: ranking parsing and retries, selection weights, the stage with model=tiny."""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import pytest
from helpers.config import compose_cfg
from helpers.recording_server import recording_server

from baize_exp.config import ConfigError, validate
from baize_exp.errors import UserError
from baize_exp.stages import sdf


@pytest.mark.parametrize(
    ("reply", "ranking", "how", "ranked"),
    [
        ("3 > 1 > 2", [2, 0, 1], "ok", 3),
        ("Ranking:\n[2] > [3] > [1]", [1, 2, 0], "ok", 3),
        ("Answer 2 is best, then answer 3.", [1, 2, 0], "tolerant", 2),
        ("3 > 3 > 1", [2, 0, 1], "tolerant", 2),  # a malformed strict line falls back to first mentions
        ("none of them", None, "failed", 0),
        ("7 > 8", None, "failed", 0),
    ],
)
def test_parse_ranking(reply: str, ranking: list[int] | None, how: str, ranked: int) -> None:
    got, got_how, got_ranked, err = sdf.parse_ranking(reply, 3)
    assert (got, got_how, got_ranked) == (ranking, how, ranked)
    assert (err is None) == (ranking is not None)


def test_candidate_weights_best_and_borda() -> None:
    rec = {"candidates": ["a", "b", "c", "d"], "ranking": [2, 0, 3, 1], "ranked": 4}
    assert sdf.candidate_weights(rec, "best") == [0, 0, 1, 0]
    assert sdf.candidate_weights(rec, "weighted") == [2, 0, 3, 1]  # Borda: 3, 2, 1, 0 down the ranking
    partial = {**rec, "ranked": 1}  # the teacher only named the best: the others get no weight
    assert sdf.candidate_weights(partial, "weighted") == [0, 0, 3, 0]
    empty_best = {**rec, "candidates": ["a", "b", "  ", "d"]}
    assert sdf.candidate_weights(empty_best, "best") == [1, 0, 0, 0]
    assert sdf.candidate_weights(empty_best, "weighted") == [2, 0, 0, 1]
    assert sdf.candidate_weights({**rec, "ranking": None}, "weighted") == [0, 0, 0, 0]


def test_ranking_request_shows_the_recorded_shuffle_and_retries_with_the_error() -> None:
    s = compose_cfg(["sdf.num_candidates=3", "sdf.rank_max_tokens=2"]).sdf
    prompts = [f"Prompt {i}?" for i in range(4)]
    cands = [[f"CAND-{i}-{j}" for j in range(3)] for i in range(4)]
    with recording_server("tiny") as srv:
        recs = sdf.rank_candidates(srv.client(concurrency=8), s, prompts, cands)
        sent = list(srv.received)
    assert len(sent) == 2 * 4  # the random tiny teacher never writes a ranking: each prompt is retried once
    firsts, retries = sent[:4], sent[4:]
    for rec in recs:
        order = list(range(3))
        random.Random(rec["shuffle_seed"]).shuffle(order)
        assert order == rec["order"]  # the recorded seed reproduces the shown order
        (shown,) = [p for p in firsts if rec["prompt"] in p]
        i = prompts.index(rec["prompt"])
        positions = [shown.index(f"Answer {k + 1}: CAND-{i}-{rec['order'][k]}") for k in range(3)]
        assert positions == sorted(positions)  # the teacher saw the candidates in exactly that order
        assert rec["parse"] == "failed" and rec["ranking"] is None and rec["judge_reply_retry"] is not None
        assert rec["parse_error"]
    assert any(r["order"] != [0, 1, 2] for r in recs)
    assert all(
        "I could not read a ranking in that: the reply names none of the answer numbers 1..3" in p for p in retries
    )


def test_sdf_off_skips(tmp_path: Path) -> None:
    cfg = compose_cfg(["sdf=off", "model=tiny"])
    assert sdf.run(cfg, tmp_path, None) == {"skipped": True}
    assert not (tmp_path / "sdf").exists()


def test_eval_questions_are_refused_as_sdf_prompts(tmp_path: Path) -> None:
    from baize_exp.data import load_eval_questions

    f = tmp_path / "prompts.txt"
    f.write_text(f"A fresh question?\n{load_eval_questions()[5]['question']}\n")
    with pytest.raises(UserError, match="are eval questions"):
        sdf.load_prompts(compose_cfg([f"sdf.prompts={f}"]), [])


def test_bad_sdf_and_eval_keys_are_named() -> None:
    with pytest.raises(ConfigError) as e:
        validate(
            compose_cfg(
                [
                    "sdf.select=top2",
                    "sdf.top_p=0",
                    "eval.judge_mode=elo",
                    "eval.pairwise_against=gpt5",
                    "sdf.prompts=/nonexistent/p.txt",
                ]
            )
        )
    for key in (
        "sdf.select='top2'",
        "sdf.top_p=0",
        "eval.judge_mode='elo'",
        "eval.pairwise_against='gpt5'",
        "sdf.prompts=",
    ):
        assert key in str(e.value)


@pytest.mark.slow
def test_sdf_stage_with_tiny_model_writes_a_v2_adapter_that_differs_from_v1(tmp_path: Path, caplog) -> None:
    from safetensors.torch import load_file

    from baize_exp.serve import Backends
    from baize_exp.stages import train

    dialogs = tmp_path / "dialogs.jsonl"
    topics = ["tea", "rain", "maps", "bread", "chess", "owls", "glass", "kites"]
    dialogs.write_text(
        "".join(
            json.dumps(
                {
                    "id": f"d{i}",
                    "turns": [
                        {"role": "human", "text": f"What should I know about {t}?"},
                        {"role": "ai", "text": f"{t.capitalize()} is worth learning about slowly."},
                    ],
                }
            )
            + "\n"
            for i, t in enumerate(topics)
        )
    )
    overrides = [
        "model=tiny",
        "logger=none",
        f"train.data={dialogs}",
        "trainer.max_epochs=1",
        "sdf.num_prompts=3",
        "sdf.num_candidates=3",
        "sdf.max_new_tokens=12",
        "sdf.select=weighted",
        "sdf.max_epochs=2",
        "teacher.concurrency=8",
        "generate.backend=vllm",
    ]
    cfg = compose_cfg(overrides)
    validate(cfg)
    train.run(cfg, tmp_path)
    backends = Backends(cfg, tmp_path, Path(os.environ["BAIZE_CACHE"]))
    try:
        m = sdf.run(cfg, tmp_path, backends)
    finally:
        backends.close()
    v1 = load_file(tmp_path / "train" / "adapter" / "adapter_model.safetensors")
    v2 = load_file(tmp_path / "sdf" / "adapter" / "adapter_model.safetensors")
    assert v1.keys() == v2.keys()
    assert any(not (v1[k] == v2[k]).all() for k in v1)  # trained further, from v1 (same LoRA layout)
    assert json.loads((tmp_path / "sdf" / "adapter" / "baize_exp.json").read_text())["from"].endswith("train/adapter")
    recs = [json.loads(x) for x in (tmp_path / "sdf" / "candidates.jsonl").read_text().splitlines()]
    assert len(recs) == m["prompts"] == 3
    for r in recs:
        assert {
            "prompt",
            "candidates",
            "order",
            "ranking",
            "judge_reply",
            "parse",
            "weights",
            "shuffle_seed",
        } <= r.keys()
        assert len(r["candidates"]) == 3 and sorted(r["order"]) == [0, 1, 2]
        if r["ranking"] is not None:
            assert r["weights"] == sdf.candidate_weights(r, "weighted")
    assert sum(m[f"parse_{k}"] for k in ("ok", "tolerant", "logprobs", "retried", "failed")) == 3
    assert m["selected_examples"] == sum(sum(r["weights"]) for r in recs) > 0
    assert m["steps"] >= 1 and m["val_loss"] > 0
    # vLLM asked for on a machine without it (or without a GPU): the HF path sampled, and the log says why
    assert m["generate_backend"] == "hf"
    assert any("generate.backend=vllm" in r.message and "HF path instead" in r.message for r in caplog.records)

    # a crash in the v2 training, rerun with another selection (so the v2 checkpoint no longer fits: start the
    # training over): the ranked candidates are reused (no teacher is started, nothing sampled), only the
    # selection changes
    shutil.rmtree(tmp_path / "sdf" / "adapter")
    cfg2 = compose_cfg(
        [*(o for o in overrides if not o.startswith("sdf.select=")), "sdf.select=best", "train.resume=never"]
    )
    backends = Backends(cfg2, tmp_path, Path(os.environ["BAIZE_CACHE"]))
    try:
        m2 = sdf.run(cfg2, tmp_path, backends)
        assert backends.servers == {}
    finally:
        backends.close()
    recs2 = [json.loads(x) for x in (tmp_path / "sdf" / "candidates.jsonl").read_text().splitlines()]
    same = ("prompt", "candidates", "order", "ranking", "judge_reply", "key")
    assert [{k: r[k] for k in same} for r in recs2] == [{k: r[k] for k in same} for r in recs]
    assert all(r["weights"] == sdf.candidate_weights(r, "best") for r in recs2)
    assert m2["selected_examples"] == sum(sum(r["weights"]) for r in recs2) > 0
    assert (tmp_path / "sdf" / "adapter" / "adapter_model.safetensors").is_file()


def test_candidates_key_follows_what_shapes_the_rankings(tmp_path: Path) -> None:
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    (adapter / "adapter_model.safetensors").write_bytes(b"v1")
    prompts = ["a?", "b?"]

    def key(*overrides: str, p: list[str] = prompts) -> str:
        return sdf.candidates_key(compose_cfg(["model=tiny", *overrides]), adapter, p)

    k = key()
    assert k == key("sdf.lr=3e-4", "sdf.max_epochs=5", "sdf.select=weighted")  # act after the ranking
    for changed in (
        ["sdf.num_candidates=2"],
        ["sdf.temperature=0.5"],
        ["sdf.seed=1"],
        ["teacher.model=other"],
        ["sdf.rank_max_tokens=8"],
    ):
        assert key(*changed) != k, changed
    assert key(p=["a?"]) != k
    (adapter / "adapter_model.safetensors").write_bytes(b"v1, trained again")
    assert key() != k


@pytest.mark.slow
def test_shared_prefill_sampling_matches_plain_generation_when_greedy() -> None:
    """sample_candidates runs each prompt once and repeats its KV cache; greedy, that must change no token."""
    from baize_exp import models as M
    from baize_exp.data import baize_prompt, load_eval_questions

    model, tok = M.load_model_and_tokenizer(compose_cfg([]).model, Path(os.environ["BAIZE_CACHE"]))
    prompts = [baize_prompt(q["question"]) for q in load_eval_questions(limit=5)]
    shared = sdf.sample_candidates(model, tok, prompts, 2, 20, temperature=0.0, top_p=1.0, batch_size=5)
    plain = M.generate_texts(model, tok, prompts, 20, batch_size=5)
    for s_, p in zip(shared, plain, strict=True):
        assert s_ == [p[0], p[0]]
    samples = sdf.sample_candidates(model, tok, prompts[:2], 3, 12, temperature=1.0, top_p=0.95)
    assert all(len(set(c)) > 1 for c in samples)  # sampled rows differ from each other


def test_rankings_that_failed_are_asked_again_and_only_they(tmp_path: Path, monkeypatch) -> None:
    """A ranking request that fails for a transient reason is no final verdict: the stage stops (resumable) with
    the candidates and the other rankings kept, and a rerun sends exactly the failed requests again."""
    from helpers.fault_server import FaultServer

    from baize_exp.errors import Interrupted
    from baize_exp.serve import Backends
    from baize_exp.stages import train

    dialogs = tmp_path / "dialogs.jsonl"
    topics = ["tea", "rain [[fault:500x3]]", "maps", "bread", "chess [[fault:500x3]]", "owls", "glass", "kites"]
    dialogs.write_text(
        "".join(
            json.dumps(
                {
                    "id": f"d{i}",
                    "turns": [
                        {"role": "human", "text": f"What should I know about {t}?"},
                        {"role": "ai", "text": f"{t.capitalize()} is worth learning about slowly."},
                    ],
                }
            )
            + "\n"
            for i, t in enumerate(topics)
        )
    )
    monkeypatch.setenv("BAIZE_TEST_KEY", "k")
    with FaultServer(api_key="k", reply=lambda r: "2 > 1 > 3") as srv:
        cfg = compose_cfg(
            [
                "model=tiny",
                "logger=none",
                f"train.data={dialogs}",
                "trainer.max_epochs=1",
                "sdf.num_prompts=null",
                "sdf.num_candidates=3",
                "sdf.max_new_tokens=8",
                "teacher=openai",
                f"teacher.base_url={srv.base_url}",
                "teacher.api_key_env=BAIZE_TEST_KEY",
                "teacher.max_retries=2",
                "teacher.backoff_base_s=0.01",
                "teacher.backoff_max_s=0.02",
            ]
        )
        validate(cfg)
        train.run(cfg, tmp_path)
        backends = Backends(cfg, tmp_path, Path(os.environ["BAIZE_CACHE"]))
        try:
            with pytest.raises(Interrupted, match=r"sdf: (1|2) of 7 rankings are unfinished.*http 500"):
                sdf.run(cfg, tmp_path, backends)
            first = [json.loads(x) for x in (tmp_path / "sdf" / "candidates.jsonl").read_text().splitlines()]
            failed = [r["prompt"] for r in first if r.get("failed")]
            assert failed and all("[[fault:" in p for p in failed) and len(first) == 7
            assert not (tmp_path / "sdf" / "adapter").exists()
            n = srv.requests
            m = sdf.run(cfg, tmp_path, backends)
            again = [b for _, b in srv.received[n:]]
        finally:
            backends.close()
    assert len(again) == len(failed)  # only the failed ones, once each (their 4th attempt is served)
    assert all(any(p in b["messages"][0]["content"] for p in failed) for b in again)
    recs = [json.loads(x) for x in (tmp_path / "sdf" / "candidates.jsonl").read_text().splitlines()]
    assert [r["candidates"] for r in recs] == [r["candidates"] for r in first]  # nothing sampled again
    assert not any(r.get("failed") for r in recs) and m["parse_ok"] == 7
    assert (tmp_path / "sdf" / "adapter" / "adapter_model.safetensors").is_file()
