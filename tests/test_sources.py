"""Seed loaders for the paper's sources in their public layouts, any dataset through `datasets`, mixtures, and
the seeded streaming sample; fixtures in tests/fixtures/sources were written for the project in each layout."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers.config import ROOT, compose_cfg
from helpers.fault_server import FaultServer

from baize_exp.data import load_seeds
from baize_exp.data import sources as S
from baize_exp.io import read_jsonl

FIX = Path(__file__).parent / "fixtures" / "sources"

QUORA = {
    "How do I learn to cook rice without a rice cooker?",
    "What is the easiest way to cook rice on a stove?",
    "Why is the sky blue during the day?",
    "What makes sunsets look red and orange?",
    "Which countries eat the most rice per person?",
    "What is the best way to learn a second language as an adult?",
    "Is it harder to learn a language after age 30?",
    "How do tides work?",
}
SO_TITLES = {
    "How to convert a Decimal to a Double in C#?",
    "How do I calculate someone's age based on a DateTime type birthday?",
    "Why did the width collapse in the percentage width child element in an absolutely positioned parent?",
}
MEDQUAD = {
    "What is (are) Adult Acute Lymphoblastic Leukemia ?",
    "Who is at risk for Adult Acute Lymphoblastic Leukemia? ?",
    "Is Wilson disease inherited ?",
    "What are the treatments for Wilson disease ?",
}

ALPACA = {
    "Give three tips for staying healthy.",
    "Translate the sentence into French.\n\nThe library opens at nine.",
    "Summarize the paragraph in one sentence.\n\nHoneybees communicate the location of food with a waggle "
    "dance. The angle of the dance shows the direction relative to the sun, and its length shows the distance.",
}


def test_quora_pairs_give_each_question_once() -> None:
    got = list(S.quora(FIX / "quora_duplicate_questions.tsv"))
    assert sorted(got) == sorted(QUORA)  # 10 question slots in 5 pairs, 8 distinct qids
    csv_file = FIX.parent / "quora.csv"  # Kaggle's comma-separated train.csv layout
    hf = FIX / "quora_hf.jsonl"
    try:
        csv_file.write_text('id,qid1,qid2,question1,question2,is_duplicate\n0,1,2,"Why, really?",What now?,0\n')
        assert list(S.quora(csv_file)) == ["Why, really?", "What now?"]
        hf.write_text(json.dumps({"questions": {"id": [1, 2], "text": ["A?", "B?"]}, "is_duplicate": False}) + "\n")
        assert list(S.quora(hf)) == ["A?", "B?"]
    finally:
        csv_file.unlink(missing_ok=True)
        hf.unlink(missing_ok=True)


def test_stackoverflow_posts_xml_questions_only_html_stripped(tmp_path: Path) -> None:
    assert set(S.stackoverflow(FIX / "Posts.xml")) == SO_TITLES  # answers (type 2) and wiki posts left out
    with_body = list(S.stackoverflow(FIX / "Posts.xml", with_body=True))
    assert with_body[0] == (
        "How to convert a Decimal to a Double in C#?\n\nI want to assign the decimal variable "
        "trans to the double variable this.Opacity."
    )  # first paragraph, code block dropped
    assert with_body[1].endswith("several children & one of them collapses.")
    table = tmp_path / "Questions.csv"
    table.write_text(
        "Id,OwnerUserId,CreationDate,ClosedDate,Score,Title,Body\n80,26,2008-08-01,NA,26,"
        '"SQLStatement.execute() - multiple queries in one statement","<p>I have written a script.</p>"\n'
    )
    assert list(S.stackoverflow(table, with_body=True)) == [
        "SQLStatement.execute() - multiple queries in one statement\n\nI have written a script."
    ]


def test_medquad_folders_and_alpaca_with_its_input() -> None:
    assert set(S.medquad(FIX / "medquad")) == MEDQUAD
    prompts = list(S.alpaca(FIX / "alpaca_data.json"))
    assert prompts[1] == "Translate the sentence into French.\n\nThe library opens at nine."  # the text to translate
    assert prompts[0] == "Give three tips for staying healthy."


def test_the_sample_is_seeded_distinct_and_a_prefix_of_larger_ones() -> None:
    qs = [f"Question {i % 50}?" for i in range(200)]  # 50 distinct, each 4 times
    full = S.sample(qs, None, seed=3)
    assert len(full) == 50 and len(set(full)) == 50
    assert S.sample(qs, 10, seed=3) == full[:10]  # a larger limit only adds seeds
    assert S.sample(reversed(qs), 10, seed=3) == full[:10]  # the same sample however the file is ordered
    assert S.sample(qs, 10, seed=4) != full[:10]


def test_layout_errors_name_the_file_and_what_is_expected(tmp_path: Path) -> None:
    bad = tmp_path / "pairs.tsv"
    bad.write_text("a\tb\n1\t2\n")
    with pytest.raises(S.SourceError, match=r"pairs.tsv:1: a Quora pairs file needs columns question1 and question2"):
        list(S.quora(bad))
    (tmp_path / "empty").mkdir()
    with pytest.raises(S.SourceError, match="no .xml files"):
        list(S.medquad(tmp_path / "empty"))
    broken = tmp_path / "Posts.xml"
    broken.write_text('<posts><row Id="1" PostTypeId="1" Title="x"')
    with pytest.raises(S.SourceError, match="not a StackOverflow Posts.xml"):
        list(S.stackoverflow(broken))
    arr = tmp_path / "alpaca.json"
    arr.write_text('[{"instruction": "ok"}, {"input": "no instruction"}]')
    with pytest.raises(S.SourceError, match="record 2: needs a non-empty 'instruction'"):
        list(S.alpaca(arr))


def test_any_dataset_through_datasets_with_a_field_format(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "questions.parquet"
    pq.write_table(
        pa.table({"title": ["Parquet title one", "Parquet title two"], "body": ["first body", None], "score": [1, 2]}),
        path,
    )
    cfg = compose_cfg(["data=hf", f"data.hf.path={path}", 'data.field="{title}\\n{body}"', "data.limit=null"])
    seeds = load_seeds(cfg.data)
    assert sorted(s.question for s in seeds) == [
        "Parquet title one\nfirst body",
        "Parquet title two",
    ]  # a missing body leaves the title
    assert {s.source for s in seeds} == {"hf"}
    cfg = compose_cfg(["data=hf", f"data.hf.path={path}", "data.field=nope"])
    with pytest.raises(S.SourceError, match=r"data.field='nope': no column \['nope'\]"):
        load_seeds(cfg.data)


def test_a_mixture_of_real_sources_keeps_each_seed_source_and_the_weights() -> None:
    cfg = compose_cfg(
        [
            "data.sources=[quora,medical,stackoverflow]",
            f"data.paths.quora={FIX / 'quora_duplicate_questions.tsv'}",
            f"data.paths.medical={FIX / 'medquad'}",
            "data.mix={quora:2,medical:1,stackoverflow:1}",
            "data.limit=8",
        ]
    )
    seeds = load_seeds(cfg.data)
    by = {src: [s.question for s in seeds if s.source == src] for src in ("quora", "medical", "stackoverflow")}
    assert [len(by[s]) for s in by] == [4, 2, 2]  # weights 2:1:1 over 8
    assert set(by["quora"]) <= QUORA and set(by["medical"]) <= MEDQUAD
    shipped = {
        json.loads(x)["question"] for x in (ROOT / "baize_exp/data/seeds/stackoverflow.jsonl").read_text().splitlines()
    }
    assert set(by["stackoverflow"]) <= shipped  # no file given: the shipped sample
    assert load_seeds(cfg.data) == seeds  # deterministic for a seed


LOADERS = [
    ("quora", "quora_duplicate_questions.tsv", QUORA),
    ("stackoverflow", "Posts.xml", SO_TITLES),
    ("medical", "medquad", MEDQUAD),
    ("alpaca", "alpaca_data.json", ALPACA),
]


@pytest.mark.parametrize(("group", "path", "expected"), LOADERS)
def test_each_data_option_reads_its_release_from_data_path(group: str, path: str, expected: set[str]) -> None:
    cfg = compose_cfg([f"data={group}", f"data.path={FIX / path}", "data.limit=null"])
    seeds = load_seeds(cfg.data)
    assert {s.question for s in seeds} == expected and {s.source for s in seeds} == {group}


def test_every_loader_through_run_py_collects_a_dialog_per_question(tmp_path: Path) -> None:
    """One collection over all four releases (one run.py start, not four): each source's seeds become its dialogs,
    and the data card counts each source."""
    from helpers.cli import run_cli

    run_dir = tmp_path / "run"
    with FaultServer() as srv:
        r = run_cli(
            "stages=[collect,report]",
            f"data.sources=[{','.join(g for g, _, _ in LOADERS)}]",
            *(f"data.paths.{g}={FIX / path}" for g, path, _ in LOADERS),
            "data.limit=null",
            "teacher=openai",
            f"teacher.base_url={srv.base_url}",
            "teacher.api_key_env=BAIZE_FAULT_KEY",
            "logger=none",
            f"hydra.run.dir={run_dir}",
            env={"BAIZE_FAULT_KEY": "k"},
            timeout=300,
        )
    assert r.returncode == 0, r.stderr[-3000:]
    dialogs = read_jsonl(run_dir / "collect" / "dialogs.jsonl")
    card = json.loads((run_dir / "collect" / "data_card.json").read_text())
    for group, _, expected in LOADERS:
        mine = [d for d in dialogs if d["source"] == group]
        assert {d["seed"] for d in mine} == expected, group
        assert card["sources"][group] == {"seeds": len(expected), "dialogs": len(mine)}
    assert len(card["sources"]) == len(LOADERS) and card["seeds"] == sum(len(e) for _, _, e in LOADERS)
    assert card["turns_per_dialog"]["n"] == len(dialogs) and card["turns_per_dialog"]["min"] >= 2
    assert card["seed_length"]["max"] >= card["seed_length"]["median"] >= card["seed_length"]["min"] > 0
    assert card["duplicates_removed"] == {"seeds": 0, "dialogs": 0} and card["length_unit"] == "words"
    assert "## Data card (collect)" in (run_dir / "report.md").read_text()  # the report shows it


def test_fastchat_question_files_load_as_eval_questions(caplog) -> None:
    from baize_exp.data import load_eval_questions

    mt = load_eval_questions(FIX / "mt_bench_question.jsonl")
    assert [q["question_id"] for q in mt] == ["81", "111", "121"]
    assert mt[1]["question"].startswith("The vertices of a triangle") and mt[1]["reference"] == "3"
    assert "reference" not in mt[0] and mt[2]["category"] == "coding"
    assert "2 later turns of multi-turn questions are not asked" in caplog.text  # said, not silently dropped
    vicuna = load_eval_questions(FIX / "vicuna_question.jsonl", limit=1)
    assert vicuna == [
        {
            "question_id": "1",
            "text": "How can I improve my time management skills?",
            "category": "generic",
            "question": "How can I improve my time management skills?",
        }
    ]


def test_alpaca_as_training_data_joins_the_train_split_only(tmp_path: Path) -> None:
    from baize_exp.data import training_dialogs

    dialogs = tmp_path / "dialogs.jsonl"
    dialogs.write_text(
        "".join(
            json.dumps(
                {
                    "id": f"d{i}",
                    "turns": [{"role": "human", "text": f"Question {i}?"}, {"role": "ai", "text": f"Answer {i}."}],
                }
            )
            + "\n"
            for i in range(10)
        )
    )
    extra = tmp_path / "alpaca_data.json"
    records = json.loads((FIX / "alpaca_data.json").read_text()) + [
        {"instruction": "Say hi.", "input": "", "output": ""}
    ]
    extra.write_text(json.dumps(records))
    cfg = compose_cfg([f"train.data={dialogs}", f"train.extra_data={extra}", "train.val_fraction=0.2"])
    _, train_d, val_d, rejects = training_dialogs(cfg, tmp_path)
    alpaca = [d for d in train_d if d.get("source") == "alpaca"]
    assert len(alpaca) == 4 and not [d for d in val_d if d.get("source") == "alpaca"]
    translate = next(d for d in alpaca if d["turns"][0]["text"].startswith("Translate"))
    assert translate["turns"] == [
        {"role": "human", "text": "Translate the sentence into French.\n\nThe library opens at nine."},
        {"role": "ai", "text": "La bibliothèque ouvre à neuf heures."},
    ]
    assert [r["reason"] for r in rejects] == ["no_output"]  # recorded, not dropped
    cfg = compose_cfg([f"train.data={dialogs}", f"train.extra_data={extra}", "train.extra_data_limit=2"])
    assert sum(d.get("source") == "alpaca" for d in training_dialogs(cfg, tmp_path)[1]) == 2
