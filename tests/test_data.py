"""Seeds, transcript parsing, JSONL robustness, and label masking with the real tokenizer."""

from __future__ import annotations

import json

import pytest
from helpers.config import compose_cfg

from baize_exp.data import (
    BAIZE_AI,
    BAIZE_HUMAN,
    SeedFileError,
    load_eval_questions,
    load_seed_file,
    load_seeds,
    parse_transcript,
    split_dialogs,
    to_baize_text,
    to_chat_messages,
)
from baize_exp.errors import UserError
from baize_exp.io import JsonlError, JsonlWriter, read_jsonl
from baize_exp.training.data import IGNORE, collate, tokenize_dialog


def test_shipped_seed_sets_load_and_mix_by_weight() -> None:
    cfg = compose_cfg(["data=mixed", "data.limit=40", "data.mix={quora:3,medical:1}", "data.sources=[quora,medical]"])
    seeds = load_seeds(cfg.data)
    assert len(seeds) == 40
    by = {s: sum(x.source == s for x in seeds) for s in ("quora", "medical")}
    assert by == {"quora": 30, "medical": 10}
    assert len({s.question for s in seeds}) == 40


def test_seed_selection_is_deterministic_and_limit_applies() -> None:
    a = load_seeds(compose_cfg(["data=quora", "data.limit=5"]).data)
    b = load_seeds(compose_cfg(["data=quora", "data.limit=5"]).data)
    c = load_seeds(compose_cfg(["data=quora", "data.limit=5", "data.seed=1"]).data)
    assert [s.id for s in a] == [s.id for s in b] != [s.id for s in c]


@pytest.mark.parametrize("fmt", ["jsonl", "txt", "csv"])
def test_seed_files_of_each_format_dedup(tmp_path, fmt: str) -> None:
    p = tmp_path / f"mine.{fmt}"
    qs = ["What is X?", "Why is Y?", "what is  x?"]  # the third duplicates the first (case, spaces)
    if fmt == "jsonl":
        p.write_text("".join(json.dumps({"question": q}) + "\n" for q in qs))
    elif fmt == "txt":
        p.write_text("\n".join(qs) + "\n\n")
    else:
        p.write_text("question\n" + "\n".join(qs) + "\n")
    cfg = compose_cfg(["data=file", f"data.path={p}"])
    seeds = load_seeds(cfg.data)
    assert sorted(s.question for s in seeds) == ["What is X?", "Why is Y?"]


# a bad seed file -> what the one-line error must say (file:line and the thing to fix)
BAD_SEED_FILES = {
    "empty.jsonl": (b"", r"empty.jsonl: no seeds"),
    "blank.txt": (b"\n  \n", r"blank.txt: no seeds"),
    "field.jsonl": (
        b'{"question": "ok?"}\n\n{"text": ""}\n',
        r"field.jsonl:3: needs a non-empty string field 'question'",
    ),
    "list.jsonl": (b'{"question": "ok?"}\n["a"]\n', r"list.jsonl:2: .*found a JSON list"),
    "torn.jsonl": (b'{"question": "ok?"}\n{"question": "cut', r"torn.jsonl:2: not valid JSON .*ends mid-line"),
    "nojson.jsonl": (b'{"question": "ok?"}\nquestion: what?\n{"question": "b"}\n', r"nojson.jsonl:2: not valid JSON"),
    "latin1.jsonl": (
        '{"question": "ok?"}\n{"question": "caf\u00e9"}\n'.encode("latin-1"),
        r"latin1.jsonl:2: not UTF-8 text \(byte 0xe9 at column 18\)",
    ),
    "latin1.txt": ("one\ntwo\ncaf\u00e9?\n".encode("latin-1"), r"latin1.txt:3: not UTF-8"),
    "latin1.csv": ("question\ncaf\u00e9?\n".encode("latin-1"), r"latin1.csv:2: not UTF-8"),
    "nocol.csv": (b"title,body\na,b\n", r"nocol.csv:1: needs a 'question' .*\['title', 'body'\]"),
    "quote.csv": (
        b'question\nWhat is a "good" thing?\n"Why do birds, fly?\n"Is it ok?"\nLast one\n',
        r"quote.csv:3-4: one CSV record runs over 2 lines",
    ),
    "unclosed.csv": (b'question\nok\n"unclosed\nmore\n', r"unclosed.csv:3-4: one CSV record runs over 2 lines"),
    "commas.csv": (b"question\nwhy, though?\n", r"commas.csv:2: more fields than the header"),
    "x.parquet": (b"", "unsupported seed file type"),
}


@pytest.mark.parametrize("name", list(BAD_SEED_FILES))
def test_seed_file_errors_name_the_file_and_line(tmp_path, name: str) -> None:
    data, message = BAD_SEED_FILES[name]
    (tmp_path / name).write_bytes(data)
    with pytest.raises(UserError, match=message):
        load_seed_file(tmp_path / name)


def test_a_csv_with_quotes_done_right_loads_every_row(tmp_path) -> None:
    p = tmp_path / "ok.csv"
    p.write_text('id,question\n1,"Why do birds, fly?"\n2,"Is a ""quoted"" word ok?"\n3,\n4,Last one\n')
    assert [s.question for s in load_seed_file(p)] == ["Why do birds, fly?", 'Is a "quoted" word ok?', "Last one"]
    q = tmp_path / "x.parquet"
    q.write_text("")
    with pytest.raises(SeedFileError, match="unsupported"):
        load_seed_file(q)


def test_parse_transcript_strict_rules() -> None:
    ok = parse_transcript("Sure!\n[Human] Hi?\n[AI] Hello.\n[Human] More?\n[AI] Yes.", "Hi?")
    assert [t["role"] for t in ok.turns] == ["human", "ai", "human", "ai"]
    assert ok.turns[1]["text"] == "Hello."
    assert parse_transcript("", "s").reason == "empty"
    assert parse_transcript("Just an answer.", "s").reason == "no_transcript"
    assert parse_transcript("[Human] a\n[Human] b\n[AI] c", "s").reason == "role_order"
    assert parse_transcript("[Human] only a question", "s").reason == "too_few_turns"
    starts_ai = parse_transcript("[AI] An answer.\n[Human] Thanks", "The seed?")
    assert starts_ai.turns[0] == {"role": "human", "text": "The seed?"}
    # cut by the length limit: the unfinished last turn goes, the rest stays
    cut = parse_transcript("[Human] a\n[AI] b\n[Human] c\n[AI] d is cut mid-sen", "a", truncated=True)
    assert [t["text"] for t in cut.turns] == ["a", "b"]
    # a model looping on the same exchange: the dialog ends at the first repeat
    loop = parse_transcript("[Human] a\n[AI] b\n[Human] a\n[AI] b\n[Human] a\n[AI] b", "a")
    assert len(loop.turns) == 2


def test_formats() -> None:
    turns = [{"role": "human", "text": "Hi"}, {"role": "ai", "text": "Hello"}]
    text = to_baize_text(turns)
    assert text.startswith("The conversation between human and AI assistant.")
    assert f"{BAIZE_HUMAN} Hi\n{BAIZE_AI} Hello" in text
    assert to_chat_messages(turns) == [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]


def test_jsonl_truncated_tail_is_repaired_but_corrupt_middle_is_an_error(tmp_path) -> None:
    p = tmp_path / "d.jsonl"
    with JsonlWriter(p) as w:
        w.write({"a": 1})
        w.write({"a": 2})
    with open(p, "a") as f:
        f.write('{"a": 3, "trunc')  # what kill -9 mid-write leaves
    assert [r["a"] for r in read_jsonl(p, repair_tail=True)] == [1, 2]
    assert p.read_text().endswith("}\n")  # repaired on disk, appends continue cleanly
    p.write_text('{"a": 1}\nnot json\n{"a": 3}\n')
    with pytest.raises(JsonlError, match=r"d.jsonl:2"):
        read_jsonl(p, repair_tail=True)


def test_eval_questions_shipped_and_limit_spreads_categories() -> None:
    qs = load_eval_questions()
    assert len(qs) == 80 and len({q["question_id"] for q in qs}) == 80
    picked = load_eval_questions(limit=9)
    assert len({q["category"] for q in picked}) == 9


def test_labels_cover_only_ai_text(tokenizer) -> None:
    turns = [
        {"role": "human", "text": "What is the capital of France?"},
        {"role": "ai", "text": "Paris is the capital."},
        {"role": "human", "text": "And of Italy?"},
        {"role": "ai", "text": "Rome."},
    ]
    ex = tokenize_dialog(turns, tokenizer, 512, "ai")
    supervised = tokenizer.decode([t for t, lab in zip(ex["input_ids"], ex["labels"], strict=True) if lab != IGNORE])
    assert "Paris is the capital." in supervised and "Rome." in supervised
    assert "France" not in supervised and "Italy" not in supervised and "conversation" not in supervised
    every = tokenize_dialog(turns, tokenizer, 512, "all")
    assert all(lab != IGNORE for lab in every["labels"])


def test_cutoff_keeps_whole_exchanges(tokenizer) -> None:
    turns = [
        {"role": "human", "text": "Q1"},
        {"role": "ai", "text": "A1 " * 5},
        {"role": "human", "text": "Q2"},
        {"role": "ai", "text": "A2 " * 200},
    ]
    ex = tokenize_dialog(turns, tokenizer, 64, "ai")
    text = tokenizer.decode(ex["input_ids"])
    assert "A1" in text and "Q2" not in text  # the second exchange does not fit: dropped whole
    assert tokenize_dialog(turns[:2], tokenizer, 8, "ai") is None


def test_split_by_dialog_and_collate(tokenizer) -> None:
    dialogs = [{"id": f"d{i}", "turns": []} for i in range(20)]
    tr, va = split_dialogs(dialogs, 0.2, seed=1)
    assert len(va) == 4 and not ({d["id"] for d in tr} & {d["id"] for d in va})
    b = collate([{"input_ids": [5, 6, 7], "labels": [IGNORE, 6, 7]}, {"input_ids": [8], "labels": [8]}], 0)
    assert b["input_ids"].shape == (2, 3) and b["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert b["labels"][1].tolist() == [8, IGNORE, IGNORE]
