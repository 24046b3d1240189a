"""Self-distillation with feedback: ranking parsing and retries, selection weights, the stage with model=tiny."""

from __future__ import annotations

import json
import os
import random
import re
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
    # a near-copy is refused too, naming the eval question it copies; a file without one is read as it is
    f.write_text("A fresh question?\nExplain the difference between a virus and a bacterium.\n")
    with pytest.raises(UserError, match="near-copies .*What is the difference between a virus and a bacterium"):
        sdf.load_prompts(compose_cfg([f"sdf.prompts={f}"]), [])
    f.write_text("A fresh question?\nWhat is the difference between git fetch and git pull?\n")
    assert len(sdf.load_prompts(compose_cfg([f"sdf.prompts={f}"]), [])) == 2


def test_near_copies_of_eval_questions_are_dropped_from_the_dialogs_prompts_and_counted() -> None:
    def dialog(q: str) -> dict:
        return {"turns": [{"role": "human", "text": q}, {"role": "ai", "text": "An answer."}]}

    copies = [
        "Write a short poem about the first snowfall of winter.",
        "What is the difference between weather and climate?",
    ]
    fresh = ["How do I fold a paper crane?", "What is the difference between a list and a tuple in Python?"]
    dropped: list[dict] = []
    got = sdf.load_prompts(compose_cfg(["sdf.num_prompts=null"]), [dialog(q) for q in [*copies, *fresh]], dropped)
    assert got == fresh
    assert [d["prompt"] for d in dropped] == copies and dropped[1]["overlap"] == 1.0  # an exact copy: overlap 1
    assert dropped[0]["eval_question"].startswith("Write a short poem (8 to 12 lines)") and dropped[0]["overlap"] > 0.7


def test_random_selection_is_uniform_over_nonempty_candidates_seeded_and_only_where_best_selects() -> None:
    rec = {"candidates": ["a", " ", "c", "d"], "ranking": [1, 0, 2, 3], "ranked": 4}
    picks = [sdf.candidate_weights(rec, "random", f"0:{i}").index(1) for i in range(3000)]
    counts = [picks.count(j) for j in range(4)]
    assert counts[1] == 0 and all(900 < c < 1100 for c in (counts[0], counts[2], counts[3]))  # 1000, SD 26
    assert sdf.candidate_weights(rec, "random", "7:3") == sdf.candidate_weights(rec, "random", "7:3")  # seeded
    # the same prompts as best: none where the ranking did not come back; never a ranking's choice of order
    assert sdf.candidate_weights({**rec, "ranking": None}, "random") == [0, 0, 0, 0]
    reordered = {**rec, "ranking": [3, 2, 0, 1]}
    assert sdf.candidate_weights(reordered, "random", "0:1") == sdf.candidate_weights(rec, "random", "0:1")
    assert sdf.candidate_weights(rec, "teacher") == [0, 0, 0, 0]


def test_teacher_selection_trains_on_the_prompts_own_answers_cut_to_the_candidates_length(tokenizer) -> None:
    long = " ".join(["word"] * 50)
    train = [
        {"turns": [{"role": "human", "text": "P1?"}, {"role": "ai", "text": "Short answer."}]},
        {"turns": [{"role": "human", "text": "P2?"}, {"role": "ai", "text": long}]},
        {"turns": [{"role": "human", "text": "P1?"}, {"role": "ai", "text": "A later dialog's answer."}]},
    ]
    answers = sdf.teacher_answers(train, ["P1?", "P2?", "P3?"], tokenizer, max_tokens=8)
    assert answers["P1?"] == "Short answer." and "P3?" not in answers  # the first dialog that opens with it
    assert len(tokenizer(answers["P2?"], add_special_tokens=False).input_ids) <= 8 and long.startswith(answers["P2?"])
    records = [
        {"prompt": p, "candidates": ["x", "y"], "ranking": r, "ranked": 2}
        for p, r in (("P1?", [1, 0]), ("P2?", None), ("P3?", [0, 1]))
    ]
    chosen = sdf.select(records, "teacher", 0, answers)
    assert [(d["turns"][0]["text"], d["turns"][1]["text"]) for d in chosen] == [("P1?", "Short answer.")]
    assert [r.get("teacher_answer") for r in records] == ["Short answer.", None, None]
    assert all(r["weights"] == [0, 0] for r in records)  # no candidate is trained on


def test_sdf_max_steps_makes_every_selection_train_the_same_steps() -> None:
    cfg = compose_cfg(["model=tiny", "sdf.max_steps=5", "sdf.max_epochs=1"])
    fit_cfg = sdf._fit_cfg(cfg)
    assert fit_cfg.trainer.max_steps == 5 and cfg.trainer.max_steps == -1  # a copy: the run's config is unchanged
    assert sdf._fit_epochs(cfg.sdf) == 5  # enough epochs that the steps, not the epochs, end the fit
    plain = compose_cfg(["model=tiny"])
    assert sdf._fit_cfg(plain) is plain and sdf._fit_epochs(plain.sdf) == 1


def test_bad_sdf_and_eval_keys_are_named() -> None:
    with pytest.raises(ConfigError) as e:
        validate(
            compose_cfg(
                [
                    "sdf.top_p=0",  # sdf.select, eval.judge_mode: refused at composition (test_config_choices)
                    "eval.pairwise_against=gpt5",
                    "sdf.prompts=/nonexistent/p.txt",
                ]
            )
        )
    with pytest.raises(ConfigError) as teacher:
        validate(compose_cfg(["sdf.select=teacher", f"sdf.prompts={Path(__file__)}", "sdf.max_steps=0"]))
    assert "sdf.select='teacher'" in str(teacher.value) and "sdf.prompts=null" in str(teacher.value)
    assert "sdf.max_steps=0" in str(teacher.value)
    for key in (
        "sdf.top_p=0",
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
                "train.val_fraction=0.1",  # 7 training dialogs, 1 held out: the 7 prompts counted below
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


SHOWN = re.compile(r"Answer (\d+): (.*?)(?=\n\nAnswer \d+: |\n\nRank these)", re.S)


def _random_ranker(req: dict) -> str:
    """A teacher whose ranking carries no information: the shown answers in an order drawn from the request."""
    text = req["messages"][-1]["content"]
    order = sorted(int(k) for k, _ in SHOWN.findall(text))
    random.Random(text).shuffle(order)
    return " > ".join(map(str, order))


@pytest.mark.slow
def test_ranked_vs_random_on_a_teacher_that_ranks_at_random_shows_no_feedback_effect(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The SDF control: from one v1, select=best and select=random at three SDF seeds each (the same candidates,
    steps and learning rate per seed), with a teacher whose ranking is noise. Across seeds and held-out dialogs
    there is no feedback effect; the old item-only test on a single seed pair finds one that is not there; and
    the same seed-aware test does find what the SDF pass itself did to v1 (it has power)."""
    from helpers.fault_server import FaultServer

    from baize_exp import models as M
    from baize_exp import stats as S
    from baize_exp.serve import Backends
    from baize_exp.stages import train
    from baize_exp.stages.evaluate.likelihood import heldout_items

    topics = ["tea", "rain", "maps", "bread", "chess", "owls", "glass", "kites", "rivers", "clocks"]
    topics += ["bees", "salt", "ships", "paper", "lamps", "moss", "wool", "caves", "snow", "ink"]
    dialogs = tmp_path / "dialogs.jsonl"
    dialogs.write_text(
        "".join(
            json.dumps(
                {
                    "id": f"d{i}",
                    "turns": [
                        {"role": "human", "text": f"What should I know about {t}?"},
                        {"role": "ai", "text": f"{t.capitalize()} is worth learning about slowly and with care."},
                    ],
                }
            )
            + "\n"
            for i, t in enumerate(topics)
        )
    )
    monkeypatch.setenv("BAIZE_TEST_KEY", "k")
    common = [
        "model=tiny",
        "logger=none",
        f"train.data={dialogs}",
        "train.val_fraction=0.4",
        "trainer.max_epochs=1",
        "sdf.num_prompts=8",
        "sdf.num_candidates=4",
        "sdf.max_new_tokens=24",
        "sdf.lr=5e-3",  # a large step, so the SDF pass moves v1 by more than the noise
        "sdf.max_steps=8",
        "teacher=openai",
        "teacher.api_key_env=BAIZE_TEST_KEY",
    ]
    cache = Path(os.environ["BAIZE_CACHE"])
    cfg = compose_cfg(common)
    train.run(cfg, tmp_path / "v1")
    held = [json.loads(x) for x in (tmp_path / "v1" / "train" / "val_dialogs.jsonl").read_text().splitlines()]
    tok = M.load_tokenizer(cfg.model, cache)

    def losses(adapter: Path) -> dict[str, float]:
        model = M.load_adapter(M.load_model_and_tokenizer(cfg.model, cache)[0], adapter)
        return {h["item_id"]: -h["logprob_sum"] / h["tokens"] for h in heldout_items(model, tok, held, 512)}

    arms: dict[str, dict[int, dict[str, float]]] = {"best": {}, "random": {}}
    with FaultServer(api_key="k", reply=_random_ranker) as srv:
        for seed in (0, 1, 2):
            for select in ("best", "random"):
                run = tmp_path / f"{select}_{seed}"
                shutil.copytree(tmp_path / "v1" / "train", run / "train")
                if select == "random":  # the ranked run's candidates: the arms differ only in the choice
                    (run / "sdf").mkdir()
                    shutil.copy(tmp_path / f"best_{seed}" / "sdf" / "candidates.jsonl", run / "sdf")
                c = compose_cfg(
                    [*common, f"teacher.base_url={srv.base_url}", f"sdf.seed={seed}", f"sdf.select={select}"]
                )
                backends = Backends(c, run, cache)
                try:
                    m = sdf.run(c, run, backends)
                finally:
                    backends.close()
                assert m["steps"] == 8 and m["selected_examples"] == m["prompts_used"] == 8
                arms[select][seed] = losses(run / "sdf" / "adapter")
        rankings = srv.requests
    assert rankings == 3 * 8  # the random arms ranked nothing: they reused the ranked runs' candidates
    feedback = S.seed_paired_test(arms["best"], arms["random"], higher_is_better=False)
    assert feedback["verdict"] == "no detectable difference" and feedback["seed_noise_known"]
    assert len(held) == feedback["n"] == 8
    # negative control: one seed pair at a time, item noise only, reads the seed's luck as a feedback effect
    single = [S.paired_test(arms["best"][s], arms["random"][s], higher_is_better=False) for s in (0, 1, 2)]
    assert any(r["verdict"] != "no detectable difference" for r in single), single
    # and the seed-aware test has power: what the SDF pass did to v1 (one fixed model) stands out of the seeds
    moved = S.seed_paired_test(
        arms["random"], {0: losses(tmp_path / "v1" / "train" / "adapter")}, False, b_trained=False
    )
    assert moved["verdict"] != "no detectable difference", moved
