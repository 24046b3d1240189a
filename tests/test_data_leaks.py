"""The leak guard: no seed (and no SDF prompt, tests/test_sdf.py) may be a near-copy of an eval question. The
threshold is checked on the shipped pools, where the two known near-copies must be caught and nothing else; the
fast matcher is checked against the brute-force comparison it replaces."""

from __future__ import annotations

import random

from helpers.config import compose_cfg

from baize_exp.data import EVAL_OVERLAP, EvalLeakGuard, load_eval_questions, load_seed_file, load_seeds
from baize_exp.data.card import card_markdown, data_card
from baize_exp.data.seeds import SEEDS_DIR, _word_set

NEAR_COPIES = {
    "Write a short poem about the first snowfall of winter.": "Write a short poem (8 to 12 lines) about the first "
    "snowfall of winter.",
    "Explain the difference between a virus and a bacterium.": "What is the difference between a virus and a "
    "bacterium?",
}


def _jaccard(a: str, b: str) -> float:
    x, y = _word_set(a), _word_set(b)
    return len(x & y) / len(x | y)


def test_the_threshold_catches_the_shipped_pools_two_near_copies_and_nothing_else() -> None:
    seeds = [s.question for f in sorted(SEEDS_DIR.glob("*.jsonl")) for s in load_seed_file(f)]
    questions = [q["question"] for q in load_eval_questions()]
    guard = EvalLeakGuard(questions)
    caught = {s: guard.match(s) for s in seeds if guard.match(s)}
    assert {s: q for s, (q, _) in caught.items()} == NEAR_COPIES
    assert [round(j, 2) for _, j in caught.values()] == [0.71, 0.7]
    # what the threshold leaves: the closest other pair of the 800 x 80 is well below it (templated questions)
    rest = max(_jaccard(s, q) for s in seeds if s not in NEAR_COPIES for q in questions)
    assert rest == 0.6 < EVAL_OVERLAP
    assert EvalLeakGuard(questions, threshold=0.6).match("Write a short poem about a city at night.")  # control


def test_the_prefix_filter_finds_exactly_what_comparing_every_pair_finds() -> None:
    rng = random.Random(0)
    vocab = [f"w{i}" for i in range(30)]
    questions = [" ".join(rng.sample(vocab, rng.randint(2, 9))) for _ in range(60)]
    texts = [" ".join(rng.sample(vocab, rng.randint(1, 9))) for _ in range(400)]
    texts += [q.replace(q.split()[0], "new", 1) for q in questions[:40]]  # near-copies with one word changed
    for t in (0.3, 0.5, EVAL_OVERLAP, 0.8, 1.0):
        guard = EvalLeakGuard(questions, threshold=t)
        for text in texts:
            best = max((_jaccard(text, q), q) for q in questions)
            got = guard.match(text)
            if best[0] >= t:
                assert got is not None and got[1] == best[0], (t, text)
            else:
                assert got is None, (t, text, got)
    assert EvalLeakGuard(questions).match("") is None and EvalLeakGuard([]).match(questions[0]) is None


def test_seeds_that_copy_an_eval_question_are_dropped_before_the_limit_and_counted() -> None:
    dcfg = compose_cfg(["data=mixed", "data.limit=null"]).data
    stats: dict = {}
    kept = {s.question for s in load_seeds(dcfg, stats)}
    assert stats["eval_near_duplicates"] == 2 and not kept & set(NEAR_COPIES)
    off: dict = {}
    everything = {s.question for s in load_seeds(dcfg, off, guard=EvalLeakGuard([]))}  # negative control
    assert off["eval_near_duplicates"] == 0 and set(NEAR_COPIES) <= everything and len(everything) == len(kept) + 2
    # a limit still gives that many seeds: the dropped ones are replaced, not missing
    assert len(load_seeds(compose_cfg(["data=mixed", "data.limit=790"]).data)) == 790


def test_the_data_card_counts_the_dropped_seeds_where_the_caller_counted_them() -> None:
    card = data_card([], [], [], {}, eval_near_duplicates=2)
    assert card["duplicates_removed"]["eval_near_duplicates"] == 2
    assert "2 seeds that copy an eval question" in card_markdown(card)
    assert "eval_near_duplicates" not in data_card([], [], [], {})["duplicates_removed"]
