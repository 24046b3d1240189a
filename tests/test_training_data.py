"""Training data at scale: dialogs tokenized a chunk at a time into a memory-mapped Arrow file (the cache a rerun
maps instead of tokenizing again), and packed rows made on demand: the same tokens, rows and batches as tokenizing
and packing every dialog up front in Python lists."""

from __future__ import annotations

import random
from pathlib import Path

import datasets
import pytest

from baize_exp.training import data as D


def _dialogs(n: int, seed: int = 0) -> list[dict]:
    """Dialogs of 1-4 exchanges and very different lengths (some over a short max_length), a trailing human turn
    on some."""
    rng = random.Random(seed)
    words = [
        "apple",
        "river",
        "stone",
        "cloud",
        "green",
        "quick",
        "seven",
        "table",
        "music",
        "light",
        "garden",
        "window",
    ]
    out = []
    for i in range(n):
        turns = []
        for _ in range(rng.randint(1, 4)):
            turns.append({"role": "human", "text": " ".join(rng.choices(words, k=rng.randint(2, 12))) + "?"})
            turns.append({"role": "ai", "text": " ".join(rng.choices(words, k=rng.randint(1, 60))) + "."})
        if i % 5 == 0:
            turns.append({"role": "human", "text": "Thanks!"})
        out.append({"id": f"d{i}", "turns": turns})
    return out


@pytest.mark.parametrize("fmt", ["baize", "chat_template"])
def test_tokenizing_many_dialogs_in_one_call_gives_each_dialogs_own_tokens(tokenizer, fmt: str) -> None:
    ds = _dialogs(60)
    for max_length in (48, 512):
        one_by_one = [D.tokenize_dialog(d["turns"], tokenizer, max_length, "ai", fmt) for d in ds]
        assert D.tokenize_dialogs([d["turns"] for d in ds], tokenizer, max_length, "ai", fmt) == one_by_one
        assert None in one_by_one or max_length == 512  # the cutoff is exercised
    # negative control: the same call with the dialogs in another order is not the per-dialog result
    shuffled = D.tokenize_dialogs([d["turns"] for d in ds[::-1]], tokenizer, 512, "ai", fmt)
    assert shuffled != [D.tokenize_dialog(d["turns"], tokenizer, 512, "ai", fmt) for d in ds]


def test_encoded_dialogs_are_a_memory_mapped_arrow_file_that_a_rerun_maps_again(
    tokenizer, tmp_path: Path, monkeypatch
) -> None:
    ds = _dialogs(2 * D.ENCODE_CHUNK + 37)  # three chunks, the last one short
    eager = [D.tokenize_dialog(d["turns"], tokenizer, 64) for d in ds]
    examples, dropped = D.encode_dialogs(ds, tokenizer, 64, cache=tmp_path)
    assert isinstance(examples, datasets.Dataset)
    (arrow,) = (tmp_path / "tokenized").glob("*.arrow")
    assert [f["filename"] for f in examples.cache_files] == [str(arrow)]  # read from the file, not held
    assert [{"input_ids": x["input_ids"], "labels": x["labels"]} for x in examples] == [x for x in eager if x]
    assert dropped == [d["id"] for d, x in zip(ds, eager, strict=True) if x is None] and dropped
    assert D.lengths_of(examples).tolist() == [len(x["input_ids"]) for x in eager if x]

    def boom(*args, **kw):
        raise AssertionError("tokenized again instead of read from the cache")

    monkeypatch.setattr(D, "tokenize_dialogs", boom)
    again, dropped_again = D.encode_dialogs(ds, tokenizer, 64, cache=tmp_path)
    assert list(again) == list(examples) and dropped_again == dropped
    with pytest.raises(AssertionError, match="tokenized again"):  # negative control: one dialog changed
        D.encode_dialogs([*ds[:-1], _dialogs(1, seed=9)[0]], tokenizer, 64, cache=tmp_path)
    monkeypatch.undo()
    no_cache, _ = D.encode_dialogs(ds[:10], tokenizer, 64)  # no cache: a temporary file, gone with the dataset
    path = Path(no_cache.cache_files[0]["filename"])
    assert path.is_file() and not path.is_relative_to(tmp_path)
    del no_cache
    import gc

    gc.collect()
    assert not path.exists()


def test_packed_rows_and_batches_are_those_of_packing_everything_up_front(tokenizer, tmp_path: Path) -> None:
    train, val = _dialogs(300), _dialogs(20, seed=1)
    dm = D.DialogDataModule(train, val, tokenizer, 256, 4, seed=3, packing=True, cache=tmp_path)
    eager = [x for x in (D.tokenize_dialog(d["turns"], tokenizer, 256) for d in train) if x]
    rows = D.pack_examples([len(x["input_ids"]) for x in eager], 256)
    expected = [D.pack_row([eager[i] for i in r]) for r in rows]
    assert len(dm.train_set) == len(expected) < len(eager)  # several dialogs a row
    assert [dm.train_set[r] for r in range(len(expected))] == expected
    assert dm.supervised_tokens == sum(sum(1 for t in x["labels"][1:] if t != D.IGNORE) for x in eager)
    # the batches, in the sampler's order: the same as over the eager rows (what exact resume relies on)
    got = [b["input_ids"].tolist() for b in dm._loader(dm.train_set, True, 0, 1)]
    eager_loader = dm._loader(expected, True, 0, 1)
    assert got == [b["input_ids"].tolist() for b in eager_loader]
    # negative control: another seed orders the batches otherwise
    other = D.DialogDataModule(train, val, tokenizer, 256, 4, seed=4, packing=True, cache=tmp_path)
    assert [b["input_ids"].tolist() for b in other._loader(other.train_set, True, 0, 1)] != got
