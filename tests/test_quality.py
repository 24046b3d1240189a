"""Dialog quality filters: each on dialogs it must reject and on dialogs it must keep."""

from __future__ import annotations

import pytest
from helpers.config import compose_cfg

from baize_exp.data.quality import QualityFilter, template_example


def turns(*texts: str) -> list[dict]:
    return [{"role": "human" if i % 2 == 0 else "ai", "text": t} for i, t in enumerate(texts)]


@pytest.fixture
def qf() -> QualityFilter:
    cfg = compose_cfg([])
    return QualityFilter.from_config(cfg.collect.quality, cfg.collect.template)


# What the embedded teacher (SmolLM2-135M) wrote for the seed "Is Wilson disease inherited, and what is the chance
# of passing it to a child?" in the default run: the template's basil example, with its instruction echoed.
WILSON_COPY = turns(
    "How do you keep basil alive indoors?",
    "Give it at least six hours of sun, water when the top of the soil is dry, and pinch off flower buds.",
    "Why do you pinch the buds?",
    "Flowering makes the plant put its energy into seeds, and the leaves turn bitter.\n\nNow write a new transcript "
    "with at least two [Human] lines and two [AI] lines, in which a human asks an AI assistant about: Is Wilson "
    "disease inherited, and what is the chance of passing it to a child?",
)

# Also the embedded teacher's, for "How do vaccines train the immune system?": only the example's first answer is
# copied, under a question of its own (a partial copy; the threshold was set so these go too).
VACCINE_COPY = turns(
    "How do vaccines train the immune system?",
    "Give it six hours of sun, water when the top of the soil is dry, and pinch off flower buds.",
    "Why?",
    "Because they're creating the ability to learn, to adapt and to increase the amount of cells in the cells that "
    "are just one cell.\n\nSo, the next question is how vaccines train the immune system.\n\nNow write a new "
    "transcript in the same format.",
)

GOOD = turns(
    "Is Wilson disease inherited, and what is the chance of passing it to a child?",
    "Yes. It is autosomal recessive: a child is affected only with two faulty copies of the ATP7B gene.",
    "So if I carry one copy?",
    "If your partner is not a carrier, your children cannot have the disease, though half may be carriers.",
)


def test_the_example_is_read_from_the_template(qf: QualityFilter) -> None:
    example = template_example(compose_cfg([]).collect.template)
    assert example.startswith("How do I keep basil alive indoors?") and "{seed}" not in example
    assert example.count("\n") == 3  # four turns


def test_template_copies_are_rejected_and_real_dialogs_kept(qf: QualityFilter) -> None:
    assert qf.check(WILSON_COPY)[0] == "template_copy"
    assert qf.copy_score(WILSON_COPY) > 0.8
    assert qf.check(VACCINE_COPY)[0] == "template_copy" and 0.3 <= qf.copy_score(VACCINE_COPY) < 0.5
    assert qf.check(GOOD) is None
    # a real dialog about basil shares words with the example but does not reproduce it
    basil = turns(
        "How often should I water basil on a windowsill?",
        "Water when the top inch of soil feels dry; in summer that can be every other day.",
        "Does it need fertiliser?",
        "A weak liquid feed every few weeks is plenty for potted basil.",
    )
    assert qf.copy_score(basil) < 0.2 and qf.check(basil) is None


def test_a_dialog_that_loops_is_rejected(qf: QualityFilter) -> None:
    loop = turns(
        "What is a monad?", "A monad is a way to chain computations. " * 3 + "That is all.", "Anything else?", "No."
    )
    reason, detail = qf.check(loop)
    assert reason == "repetitive" and "3 times" in detail
    twice = turns(
        "What is a monad?",
        "A monad is a way to chain computations. Really, a monad is a way to chain computations.",
        "Ok.",
        "Glad to help with that today.",
    )
    assert qf.check(twice) is None  # said twice (a summary) is still a dialog


def test_echoing_and_empty_ai_turns_are_rejected(qf: QualityFilter) -> None:
    echo = turns(
        "How do I reverse a list in Python quickly?",
        "How do I reverse a list in Python quickly?",
        "Please answer.",
        "Use reversed() or slicing with [::-1].",
    )
    assert qf.check(echo) == ("echo", "AI turn 2 is empty or 100% copied from the human turn before it")
    short = turns("Can you say yes?", "yes", "And more?", "More words about the question here, fully new.")
    assert qf.check(short)[0] == "echo"
    quoting = turns(
        "How do I reverse a list in Python?",
        "To reverse a list in Python, call its reverse() method or take a reversed slice.",
        "Thanks",
        "You're welcome.",
    )
    assert qf.check(quoting) is None  # restating part of the question is how answers start


def test_near_duplicates_of_a_kept_dialog_are_rejected_exact_or_nearly(qf: QualityFilter) -> None:
    assert qf.check(GOOD) is None
    assert qf.check(GOOD)[0] == "near_duplicate"  # exact
    near = [dict(t) for t in GOOD]
    near[3]["text"] = near[3]["text"].replace("cannot", "can't")  # one word changed
    reason, detail = qf.check(near)
    assert reason == "near_duplicate" and "kept dialog #1" in detail
    other = turns(
        "What causes Wilson disease?",
        "A mutation in ATP7B stops the liver moving copper into bile.",
        "What are the signs?",
        "Liver disease, tremor, and Kayser-Fleischer rings in the eyes.",
    )
    assert qf.check(other) is None  # same topic, another dialog


def test_filters_can_be_switched_off_and_thresholds_are_checked() -> None:
    cfg = compose_cfg(["collect.quality.enabled=false"])
    qf = QualityFilter.from_config(cfg.collect.quality, cfg.collect.template)
    assert qf.check(WILSON_COPY) is None and qf.check(WILSON_COPY) is None
    from baize_exp.config import ConfigError, validate

    with pytest.raises(ConfigError, match=r"collect.quality.copy_overlap=1.5.*collect.quality.repeat_lines=1"):
        validate(compose_cfg(["collect.quality.copy_overlap=1.5", "collect.quality.repeat_lines=1"]))


# --- the near-duplicate index at scale ---------------------------------------------------------------------------


def _brute_force(dialogs: list[list[dict]], threshold: float, k: int = 64) -> list[tuple[str, int] | None]:
    """The near-duplicate decisions by comparing each dialog with every kept one (the all-pairs definition)."""
    probe = QualityFilter(near_duplicate=threshold, sketch=k)
    kept: list[set[int]] = []
    out = []
    for t in dialogs:
        mine = set(probe._sketch(t).tolist())
        best, score = -1, 0.0
        for j, other in enumerate(kept):
            union = sorted(mine | other)[:k]
            est = sum(1 for h in union if h in mine and h in other) / len(union)
            if est > score:
                best, score = j, est
        if score >= threshold:
            out.append(("near_duplicate", best))
        else:
            kept.append(mine)
            out.append(None)
    return out


def _family_dialogs(n: int, seed: int) -> list[list[dict]]:
    """Dialogs in families of near copies (a few words changed each), some short (fewer 5-grams than a sketch)."""
    import random

    rng = random.Random(seed)
    vocab = [f"w{i}" for i in range(400)]
    bases = [[rng.choice(vocab) for _ in range(rng.choice([6, 40, 120, 200]))] for _ in range(n // 4)]
    out = []
    for _ in range(n):
        words = list(rng.choice(bases))
        for _ in range(rng.choice([0, 1, 2, 3, 5, 8])):
            words[rng.randrange(len(words))] = rng.choice(vocab)
        half = len(words) // 2
        out.append(turns(" ".join(words[:half]) or "hi", " ".join(words[half:]) or "yes"))
    return out


@pytest.mark.parametrize("threshold", [0.8, 0.5, 0.95])
def test_the_compact_index_finds_every_near_duplicate_the_all_pairs_check_finds(threshold: float, tmp_path) -> None:
    from baize_exp.data.quality import _HashIndex

    dialogs = _family_dialogs(400, seed=int(threshold * 100))
    expected = _brute_force(dialogs, threshold)
    assert 20 < sum(e is not None for e in expected) < 350  # both outcomes are exercised
    qf = QualityFilter(near_duplicate=threshold, spill_dir=tmp_path)
    qf._index = _HashIndex(buffer=37, max_run=300)  # tiny runs: the merges and the size cap are exercised
    got = []
    for t in dialogs:
        why = qf.check(t)
        got.append(None if why is None else (why[0], int(why[1].rsplit("#", 1)[1]) - 1))
    assert got == expected
    assert len(qf._index._runs) > 1 and max(len(k) for k, _ in qf._index._runs) <= 300
    assert list(tmp_path.iterdir()) == []  # the sketches' file has no name: nothing is left behind

    # negative control: an index of each kept dialog's smallest hash alone misses near duplicates the all-pairs
    # check finds (the bound is a worst case: one hash fewer than it misses none of these)
    short = QualityFilter(near_duplicate=threshold)
    short._indexed = 1
    assert [short.check(t) is not None for t in dialogs] != [e is not None for e in expected]
