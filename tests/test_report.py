"""The report on constructed run dirs with known answers: loss curves (SDF included), runs without a value, runs
given by hand, n=0 categories, the run-level sections, and paired comparisons across runs."""

from __future__ import annotations

import csv
import json
import struct
from pathlib import Path

import matplotlib
import numpy as np
import pytest
from helpers.report_fixture import make_run

from baize_exp import stats as S
from baize_exp.stages import report
from baize_exp.stages.evaluate.plots import draw_scores

matplotlib.use("Agg")


def _png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", path
    return struct.unpack(">II", data[16:24])


def _set_eval(d: Path, **values: float) -> None:
    m = json.loads((d / "metrics.json").read_text())
    m["eval"].update({k.replace("__", "/"): v for k, v in values.items()})
    (d / "metrics.json").write_text(json.dumps(m))


def test_sdf_loss_curves_are_read_and_drawn(tmp_path: Path) -> None:
    d = make_run(tmp_path / "run", ["lora.r=8"])
    hist = report.loss_history(d)
    # the SDF stage logs under its own prefix: those columns were never read before
    assert set(hist) == {"train", "sdf"}
    assert set(hist["sdf"]) == {"sdf/train/loss", "sdf/val/loss"}
    assert hist["sdf"]["sdf/train/loss"][0] == [0, 1, 2, 3, 4, 5] and len(hist["sdf"]["sdf/val/loss"][0]) == 3
    report.write(d)
    w_both, _ = _png_size(d / "report_plots" / "loss_curves.png")
    for f in (d / "sdf" / "logs").iterdir():  # without the SDF log: one panel, half as wide
        f.unlink()
    report.write(d)
    w_train, _ = _png_size(d / "report_plots" / "loss_curves.png")
    assert w_both > 1.7 * w_train


def test_resumed_log_joins_the_curve_and_nan_losses_are_dropped(tmp_path: Path) -> None:
    d = tmp_path / "run"
    for version, body in (("version_0", "0,nan\n1,2.5\n"), ("version_1", "1,2.4\n2,2.2\n")):
        (d / "train" / "logs" / version).mkdir(parents=True)
        (d / "train" / "logs" / version / "metrics.csv").write_text("step,train/loss\n" + body)
    assert report.loss_history(d) == {"train": {"train/loss": ([1.0, 2.0], [2.4, 2.2])}}


def test_a_run_without_a_value_is_left_out_of_the_chart_and_named(tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    for i, r in enumerate((4, 8, 16)):
        make_run(sweep / str(i), ["+sweep=x", f"lora.r={r}"], loss=2.0 - 0.1 * i)
    _set_eval(sweep / "1", v2__judge_mean=float("nan"))
    for i in range(3):  # no run has a value: no chart at all, not an empty one
        _set_eval(sweep / str(i), v2__heldout_loss=None)
    report.compare([sweep], sweep / "report")
    md = (sweep / "report" / "report.md").read_text()
    assert (sweep / "report" / "final_judge_vs_lora.r.png").is_file()
    assert "left out, no value for final_judge: r=8" in md
    assert not list((sweep / "report").glob("final_heldout_loss*"))
    assert "final_heldout_loss" not in md.split("## Charts")[1]


def test_runs_given_by_hand_get_one_chart_per_metric(tmp_path: Path) -> None:
    runs = [
        make_run(tmp_path / "a", ["lora.r=4", "train.learning_rate=1e-4"]),
        make_run(tmp_path / "b", ["data=/data/a/very/long/path/to/a/seed/file_with_a_long_name.jsonl"], loss=1.8),
        make_run(tmp_path / "c", ["sdf=off", "lora.dropout=0.1"], loss=1.9),
    ]
    out = tmp_path / "cmp"
    report.compare(runs, out)
    assert sorted(p.name for p in out.glob("final_*.png")) == [
        "final_heldout_loss_per_run.png",
        "final_judge_per_run.png",
    ]
    # a grid over the same runs' parameters is a sweep: one chart per parameter
    grid = [
        make_run(tmp_path / "g" / str(i), [f"lora.r={r}", f"sdf={s}"], loss=2 - 0.1 * i)
        for i, (r, s) in enumerate([(4, "off"), (8, "off"), (4, "default")])
    ]
    report.compare(grid, tmp_path / "gcmp")
    assert {p.name for p in (tmp_path / "gcmp").glob("final_judge*.png")} == {
        "final_judge_vs_lora.r.png",
        "final_judge_vs_sdf.png",
    }


def test_run_labels_are_short_and_unique(tmp_path: Path) -> None:
    recs = [
        report.RunRecord(tmp_path / n, ov, {}, "completed")
        for n, ov in [
            (
                "0",
                {"data.path": "/very/long/directory/name/seeds_from_quora_2023.jsonl", "train.learning_rate": "1e-4"},
            ),
            ("1", {"data.path": "/x/y.jsonl", "train.learning_rate": "3e-4"}),
            ("2", {"train.learning_rate": "3e-4"}),
        ]
    ]
    from baize_exp.stages.report.runs import run_labels

    labels = run_labels(recs, ["data.path", "train.learning_rate"])
    assert labels[1] == "path=y.jsonl lr=3e-4" and labels[2] == "lr=3e-4"
    assert all(len(lab) <= 36 for lab in labels) and len(set(labels)) == 3
    # long values alike but for a middle part: the part that differs is what the label keeps
    recs = [
        report.RunRecord(
            tmp_path / str(i), {"data.path": f"/d/seeds_variant_{i}_of_the_big_mix.jsonl"}, {}, "completed"
        )
        for i in (1, 2)
    ]
    assert run_labels(recs, ["data.path"]) == ["path=…1…", "path=…2…"]


def test_n0_category_has_no_bar_but_a_label(tmp_path: Path) -> None:
    import matplotlib.pyplot as plt

    js = [
        {
            "question_id": f"q{i}",
            "category": c,
            "model": m,
            "mode": "single",
            "score": None if c == "empty" else 7,
            "swap": False,
        }
        for m in ("base", "a/very/long/adapter/dir/name_of_some_checkpoint")
        for i, c in enumerate(["good", "empty", "good"])
    ]
    rows = S.score_table(js, 100, 0)
    assert [r["n"] for r in rows if r["category"] == "empty"] == [0, 0]
    fig, ax = plt.subplots(figsize=(6, 4))
    draw_scores(ax, rows, "single")
    cats = [t.get_text() for t in ax.get_xticklabels()]
    empty_x = cats.index("empty")
    assert all(p.get_height() > 0 for p in ax.patches)  # no zero-height bar
    assert not any(abs(p.get_x() + p.get_width() / 2 - empty_x) < 0.45 for p in ax.patches)
    labels = [t for t in ax.texts if t.get_text() == "n=0"]
    assert len(labels) == 2 and all(abs(t.get_position()[0] - empty_x) < 0.45 for t in labels)
    fig.canvas.draw()  # the legend sits right of the axes, not over the bars; its labels are cut to size
    legend = ax.get_legend()
    assert legend.get_window_extent().x0 >= ax.get_window_extent().x1
    assert all(len(t.get_text()) <= 22 for t in legend.get_texts())
    plt.close(fig)


def test_run_report_has_every_section(tmp_path: Path) -> None:
    d = make_run(tmp_path / "run", ["eval=pairwise"], mode="pairwise", discriminates=False)
    md_path, html_path = report.write(d)
    md, page = md_path.read_text(), html_path.read_text()
    # first: what the run can and cannot show, with its held-out-loss comparisons and their intervals
    first = md.split("\n## ")[1]
    assert first.startswith("What this run can and cannot show")
    assert "**v1 vs base**: held-out loss -0.12 nats/token [-0.13, -0.11] (95% CI, paired over n=8" in first
    assert "**v2 vs base**: held-out loss -0.2025" in first and "on these 8 held-out dialogs and these 10 eval" in first
    assert "It cannot show whether another training seed" in first
    assert f"anything from the judge's scores ({S.NOT_SHOWN_TO_DISCRIMINATE})" in first
    assert f"{S.NOT_SHOWN_TO_DISCRIMINATE}: judge-based results below are not evidence" in md
    assert md.index("## Judge check") < md.index("## Judge scores")
    assert "| truncated | 7 | - | 0.5 |" in md and "position agreement" in md and "| 70% | 10% |" in md
    assert "| note |" in md and "| judge cannot discriminate |" in md  # an older run's scores.csv note, as written
    assert "## Paired comparisons" in md and "| v2 vs base | heldout_loss (lower is better) | n=8 |" in md
    for png in (
        "eval/scores.png",
        "report_plots/win_rate.png",
        "report_plots/paired_forest.png",
        "report_plots/loss_curves.png",
    ):
        assert f"]({png})" in md and (d / png).is_file()
    # samples: 3 questions from 3 categories, question text from the shipped set, answers escaped
    assert md.count("](") == page.count("data:image/png;base64,") == 4
    assert "**1. generic**" in md and "**2. knowledge**" in md and "**3. roleplay**" in md
    assert "remembering people's names" in md and "&lt;b&gt;v2&lt;/b&gt;" in md and "<b>" not in md
    assert "<th>base</th><th>v1</th><th>v2</th><th>teacher</th>" in page and "<b>v2</b>" not in page
    assert "## Data card (collect)" in md and "<h2>Data card (collect)</h2>" in page
    assert "class='warn'" in page


def test_old_run_without_the_new_files_still_reports(tmp_path: Path) -> None:
    d = make_run(tmp_path / "run", [])
    for name in ("reliability.json", "paired.csv", "items.jsonl", "answers.jsonl"):
        (d / "eval" / name).unlink()
    md = report.render(d)
    assert "## Judge scores" in md and "Judge check" not in md and "Paired" not in md and "Sample" not in md
    assert sorted(p.name for p in (d / "report_plots").iterdir()) == ["loss_curves.png"]  # stale charts gone


def test_cross_run_paired_verdicts(tmp_path: Path) -> None:
    base = make_run(tmp_path / "base", ["lora.r=4"])
    better = make_run(tmp_path / "better", ["lora.r=8"], shift=1.0)  # better on every question and dialog
    same = make_run(tmp_path / "same", ["lora.r=16"])  # the same values item by item
    # a held-out dialog only the better run has is not paired
    with open(better / "eval" / "items.jsonl", "a") as f:
        f.write(
            json.dumps({"model": "v2", "kind": "heldout", "item_id": "extra", "tokens": 5, "logprob_sum": -1}) + "\n"
        )
    out = tmp_path / "cmp"
    assert report.main([str(base), str(better), str(same), "--out", str(out)]) == 0
    rows = list(csv.DictReader(open(out / "paired.csv")))
    assert list(rows[0]) == S.PAIRED_TEST_COLUMNS
    got = {(r["comparison"], r["metric"]): r for r in rows}
    for metric, n in (("judge_single", "9"), ("heldout_loss", "8"), ("ref_loglik", "10")):
        assert got[("r=8 vs r=4", metric)]["verdict"] == "better"
        assert got[("r=8 vs r=4", metric)]["n"] == n
        assert got[("r=16 vs r=4", metric)]["verdict"] == "no detectable difference"
    assert float(got[("r=8 vs r=4", "judge_single")]["diff"]) == 1.0
    assert float(got[("r=8 vs r=4", "heldout_loss")]["diff"]) == pytest.approx(-0.1)
    assert got[("r=8 vs r=4", "judge_single")]["items"] == "n=9 of 10; unparsed: 1 in r=8, 1 in r=4"
    assert got[("r=8 vs r=4", "judge_single")]["method"].startswith("wilcoxon exact")  # discrete scores
    assert all(float(r["p_holm"]) >= float(r["p"]) for r in rows) and {r["verdict_holm"] for r in rows} >= {"better"}
    md = (out / "report.md").read_text()
    assert "against `r=4`" in md and "](paired_forest.png)" in md
    assert (out / "report.html").read_text().count("data:image/png;base64,") == md.count("](")

    # --baseline by dir name: the better run is now the reference, so the base run is worse
    assert report.main([str(base), str(better), "--out", str(out), "--baseline", "better"]) == 0
    rows = list(csv.DictReader(open(out / "paired.csv")))
    assert {r["verdict"] for r in rows} == {"worse"} and rows[0]["comparison"] == "r=4 vs r=8"
    with pytest.raises(SystemExit) as stop:  # one line naming the runs there are, exit 2
        report.main([str(base), str(better), "--out", str(out), "--baseline", "nope"])
    assert stop.value.code == 2


def test_cross_run_pairwise_uses_both_orders(tmp_path: Path) -> None:
    a = make_run(tmp_path / "a", ["lora.r=4"], mode="pairwise", discriminates=False)
    b = make_run(tmp_path / "b", ["lora.r=8"], mode="pairwise")
    report.compare([a, b], tmp_path / "cmp")
    rows = {r["metric"]: r for r in csv.DictReader(open(tmp_path / "cmp" / "paired.csv"))}
    # the same verdicts in both runs: identical per-question outcomes; the empty category's failures are unpaired
    assert rows["judge_pairwise"]["n"] == "9" and float(rows["judge_pairwise"]["diff"]) == 0.0
    assert rows["judge_pairwise"]["note"] == S.NOT_SHOWN_TO_DISCRIMINATE and rows["heldout_loss"]["note"] == ""
    assert (
        f"{S.NOT_SHOWN_TO_DISCRIMINATE}: judge-based results below are not evidence (runs: a)"
        in (tmp_path / "cmp" / "report.md").read_text()
    )


def test_a_final_model_without_per_item_values_is_not_replaced_by_its_predecessor(tmp_path: Path) -> None:
    a = make_run(tmp_path / "a", ["lora.r=4"])
    b = make_run(tmp_path / "b", ["lora.r=8"], shift=1.0)
    for name in ("judgments.jsonl", "items.jsonl"):  # b's v2 has no per-item value; its v1 and base do
        path = b / "eval" / name
        path.write_text("".join(x + "\n" for x in path.read_text().splitlines() if '"model": "v2"' not in x))
    report.compare([a, b], tmp_path / "cmp")
    assert list(csv.DictReader(open(tmp_path / "cmp" / "paired.csv"))) == []
    md = (tmp_path / "cmp" / "report.md").read_text()
    assert "## Paired comparisons" in md and "`r=8` (v2) and `r=4` (v2) have no per-item metric in common" in md


def _replicate_sweep(root: Path, shifts: dict[str, list[float]]) -> Path:
    """A sweep of lora.r x train.seed: each (rank, seed) run shifted by its own seed's luck (`shifts[rank][k]`)."""
    job = 0
    for r, per_seed in shifts.items():
        for seed, shift in zip((42, 43, 44), per_seed, strict=True):
            make_run(root / str(job), ["+sweep=x", f"lora.r={r}", f"train.seed={seed}"], shift=shift)
            job += 1
    return root


def test_train_seed_replicates_are_one_arm_and_a_seed_shift_is_no_treatment_effect(tmp_path: Path) -> None:
    # each arm's seeds shift it by +0.5, -0.3, -0.2 or the mirror image: equal means, unequal first seeds
    sweep = _replicate_sweep(tmp_path / "sweep", {"4": [0.5, -0.3, -0.2], "8": [-0.5, 0.3, 0.2]})
    report.compare([sweep], sweep / "report")
    rows = {r["metric"]: r for r in csv.DictReader(open(sweep / "report" / "paired.csv"))}
    assert set(rows) == {"judge_single", "heldout_loss", "ref_loglik"}
    for r in rows.values():  # one arm per rank, its three seeds together
        assert (r["comparison"], r["k_a"], r["k_b"]) == ("r=8 vs r=4", "3", "3")
        assert r["verdict"] == r["verdict_holm"] == "no detectable difference"
        assert r["seed_noise_known"] == "True" and float(r["seed_sd_a"]) > 0
    assert float(rows["heldout_loss"]["seed_sd_b"]) == pytest.approx(0.1 * np.std([0.5, -0.3, -0.2], ddof=1))
    assert "unparsed: 3 in r=8, 3 in r=4" in rows["judge_single"]["items"]  # the empty category, in every seed
    md = (sweep / "report" / "report.md").read_text()
    assert "replicates of one arm" in md and "seed SD a / b" in md
    # negative control: the two seed-42 runs alone, item by item, call that seed's luck an effect of the rank
    pair = tmp_path / "pair"
    report.compare([sweep / "3", sweep / "0"], pair)  # r=8 seed 42 the baseline, r=4 seed 42 against it
    assert {r["verdict_holm"] for r in csv.DictReader(open(pair / "paired.csv"))} == {"better"}
    # a real difference between the arms, larger than the seeds' spread, is still found
    real = _replicate_sweep(tmp_path / "real", {"4": [0.5, -0.3, -0.2], "8": [2.5, 3.3, 3.2]})
    report.compare([real], real / "report")
    verdicts = {r["metric"]: r["verdict_holm"] for r in csv.DictReader(open(real / "report" / "paired.csv"))}
    assert verdicts == {"judge_single": "better", "heldout_loss": "better", "ref_loglik": "better"}


def test_forest_draws_an_unbounded_interval_to_the_panels_edge(tmp_path: Path) -> None:
    from baize_exp.stages.report import charts

    rows = [
        {"comparison": "a vs b", "metric": "heldout_loss", "format": "baize", "n": 3, "diff": -0.1},
        {"comparison": "c vs b", "metric": "heldout_loss", "format": "baize", "n": 9, "diff": 0.05},
    ]
    rows[0].update(ci_low=float("-inf"), ci_high=0.2, verdict="no detectable difference")  # n=3: unbounded below
    rows[1].update(ci_low=0.01, ci_high=0.09, verdict="worse", verdict_holm="no detectable difference")
    fig_path = charts.forest(rows, tmp_path / "f.png")
    assert fig_path is not None and fig_path.stat().st_size > 5000
    img = matplotlib.image.imread(fig_path)
    assert img.shape[0] > 100  # drawn, not refused: an infinite end is a finding, not an error
