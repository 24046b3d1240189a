"""W&B (offline, real run files read back with wandb's own inspector): each stage's step axis, stage aggregates
only in the summary, numeric eval tables, a group for a single run, artifacts behind logger.artifacts."""

from __future__ import annotations

import hashlib
import json
import random
import subprocess
import sys
from pathlib import Path

import pytest
from helpers.cli import run_cli
from helpers.fault_server import FaultServer

from baize_exp import stats as S
from baize_exp.wandb_log import STEP_AXES

WORDS = [
    "soil",
    "light",
    "water",
    "roots",
    "leaves",
    "prune",
    "feed",
    "repot",
    "drain",
    "mist",
    "shade",
    "compost",
    "season",
    "window",
    "gentle",
    "steady",
    "humid",
    "warm",
    "cool",
    "morning",
    "evening",
    "weekly",
    "monthly",
    "fertilizer",
    "pot",
    "tray",
    "pebbles",
    "rotate",
    "trim",
    "stem",
    "bud",
]


def wandb_records(run_dir: Path) -> list[dict]:
    """Every record of the run's .wandb file, as `wandb leet inspect --json` prints them."""
    (path,) = run_dir.glob("wandb/offline-run-*/run-*.wandb")
    out = subprocess.run(
        [str(Path(sys.executable).parent / "wandb"), "leet", "inspect", "--json", str(path)],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    ).stdout
    return [json.loads(line) for line in out.splitlines() if line.strip()]


def _of(records: list[dict], kind: str) -> list[dict]:
    return [r[kind] for r in records if r.get("type") == kind]


def _table(run_dir: Path, key: str) -> dict:
    """A logged table's file (`files/media/table/<key>_<step>_<hash>.table.json`)."""
    (p,) = run_dir.glob(f"wandb/offline-run-*/files/media/table/{key}_[0-9]*.table.json")
    return json.loads(p.read_text())


def _teacher(request: dict) -> str:
    """Teacher and judge in one: a varied transcript per seed (so the quality filters keep it), a ranking, a
    score, else a sentence."""
    prompt = " ".join(str(m.get("content", "")) for m in request["messages"])
    if "Now write a new transcript" in prompt:
        seed = prompt.rsplit("about:", 1)[-1].strip()
        rng = random.Random(hashlib.sha256(seed.encode()).hexdigest())
        say = lambda n: " ".join(rng.choice(WORDS) for _ in range(n)).capitalize() + "."  # noqa: E731
        return f"[Human] {seed}\n[AI] {say(24)}\n[Human] {say(8)}?\n[AI] {say(30)}\n"
    if "Rank these" in prompt or "ranking" in prompt:
        return "2 > 1"
    if "Score: N" in prompt:
        return "Score: 7"
    return "A short answer about watering and light."


def _run(run_dir: Path, srv: FaultServer, *extra: str) -> subprocess.CompletedProcess:
    backend = [f"{role}={x}" for role in ("teacher", "judge") for x in ("openai",)] + [
        f"{role}.{k}={v}"
        for role in ("teacher", "judge")
        for k, v in (("base_url", srv.base_url), ("api_key_env", "BAIZE_TEST_KEY"), ("model", "fault-model"))
    ]
    return run_cli(
        "model=tiny",
        "data.limit=6",
        "sdf.num_prompts=3",
        "sdf.num_candidates=2",
        "sdf.max_new_tokens=8",
        "eval.limit=2",
        "eval.max_new_tokens=8",
        "eval.bootstrap=100",
        "trainer.max_epochs=2",
        "trainer.log_every_n_steps=1",
        *backend,
        "logger=wandb",
        f"hydra.run.dir={run_dir}",
        *extra,
        env={"BAIZE_TEST_KEY": "k"},
    )


@pytest.mark.slow
def test_pipeline_run_file_has_stage_axes_no_collision_numeric_tables_group_and_artifacts(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    with FaultServer(api_key="k", reply=_teacher) as srv:
        r = _run(run_dir, srv, "stages=[collect,train,sdf,eval]")  # report: no W&B of its own
    assert r.returncode == 0, r.stderr[-4000:]
    recs = wandb_records(run_dir)

    # one step axis per stage, declared before any row
    metrics = _of(recs, "metric")
    declared = {m.get("name") for m in metrics} | {(m.get("glob_name"), m.get("step_metric")) for m in metrics}
    for step, patterns in STEP_AXES.items():
        assert step in declared and all((p, step) in declared for p in patterns), (step, declared)
    history = [h["item"] for h in _of(recs, "history")]
    assert not any(k == "trainer/global_step" or k == "epoch" for row in history for k in row)
    for row in history:  # every per-step point carries its own stage's step
        keys = {k for k in row if not k.startswith("_")}
        if any(k.startswith("sdf/") for k in keys):
            assert "sdf/step" in row and not any(k.startswith(("train/", "val/")) for k in keys), row
        elif any(k.startswith(("train/", "val/")) for k in keys):
            assert "train/step" in row, row
        elif any(k.startswith("collect/progress/") for k in keys):
            assert "collect/progress/elapsed_s" in row, row
    sdf_steps = [row["sdf/step"] for row in history if "sdf/train/loss" in row]
    train_steps = [row["train/step"] for row in history if "train/loss" in row]
    assert sdf_steps and train_steps and sdf_steps == sorted(sdf_steps) and train_steps == sorted(train_steps)
    assert sdf_steps[0] == train_steps[0] == 0  # SDF's own axis from 0, not train's continued or shared
    run_m = json.loads((run_dir / "metrics.json").read_text())
    assert len([row for row in history if "train/tokens_per_s" in row]) == run_m["train"]["steps"]

    # no key is both a per-step series and a stage aggregate: aggregates are summary-only, under <stage>/summary/
    history_keys = {k for row in history for k in row}
    summary = {}
    for s in _of(recs, "summary"):
        summary.update(s.get("update", {}))
    aggregates = {k for k in summary if "/summary/" in k}
    assert not history_keys & aggregates and not any("/summary/" in k for k in history_keys)
    for stage, key in (("collect", "dialogs"), ("train", "mfu"), ("train", "tokens_per_s"), ("sdf", "steps")):
        assert summary[f"{stage}/summary/{key}"] == run_m[stage][key]

    # the scores table holds numbers
    scores = _table(run_dir, "eval/scores")
    cols = scores["columns"]
    assert cols[:8] == ["model", "category", "mode", "n", "mean", "ci_low", "ci_high", "parse_failures"]
    for row in scores["data"]:
        cell = dict(zip(cols, row, strict=True))
        assert isinstance(cell["n"], int) and isinstance(cell["parse_failures"], int)
        assert all(cell[c] is None or isinstance(cell[c], float) for c in ("mean", "ci_low", "ci_high"))
        assert isinstance(cell["model"], str)

    # a single run has a group: no group, sweep, run_name or experiment given -> "single"
    (run_rec,) = _of(recs, "run")
    assert run_rec["run_group"] == "single"

    # artifacts: references to the run dir's files, the manifest in the run file
    arts = {a["name"]: a for a in _of(recs, "artifact") if a["type"] in ("model", "dataset")}
    assert set(arts) == {"collect-dialogs", "train-adapter", "sdf-adapter"}
    assert arts["collect-dialogs"]["type"] == "dataset" and arts["train-adapter"]["type"] == "model"
    for name, stage, must in (
        ("collect-dialogs", "collect", "dialogs.jsonl"),
        ("train-adapter", "train/adapter", "adapter_model.safetensors"),
        ("sdf-adapter", "sdf/adapter", "adapter_config.json"),
    ):
        entries = {e["path"]: e for e in arts[name]["manifest"]["contents"]}
        assert must in entries, (name, sorted(entries))
        assert entries[must]["ref"] == (run_dir / stage / must).resolve().as_uri()  # a reference, not a copy
        assert int(entries[must]["size"]) == (run_dir / stage / must).stat().st_size
    assert json.loads(arts["train-adapter"]["metadata"])["lora"]["r"] == 8


def test_artifacts_off_and_group_from_run_name(tmp_path: Path) -> None:
    """~15 s: the collect stage alone through run.py."""
    run_dir = tmp_path / "run"
    with FaultServer(api_key="k", reply=_teacher) as srv:
        r = _run(run_dir, srv, "stages=[collect]", "logger.artifacts=false", "run_name=nightly")
    assert r.returncode == 0, r.stderr[-4000:]
    recs = wandb_records(run_dir)
    assert not [a for a in _of(recs, "artifact") if a["type"] in ("model", "dataset")]
    assert _of(recs, "run")[0]["run_group"] == "nightly"


def test_group_order() -> None:
    from helpers.config import compose_cfg

    from baize_exp.pipeline import wandb_group

    cfg = compose_cfg(["logger=wandb"])
    assert wandb_group(cfg, []) == "single"
    assert wandb_group(cfg, ["experiment=smoke"]) == "smoke"
    cfg.run_name = "nightly"
    assert wandb_group(cfg, ["experiment=smoke"]) == "nightly"
    assert wandb_group(cfg, [], sweep="multirun/lora_rank/x") == "multirun/lora_rank/x"
    cfg.logger.group = "mine"
    assert wandb_group(cfg, [], sweep="multirun/lora_rank/x") == "mine"


def test_eval_tables_are_typed_and_absent_files_are_skipped(tmp_path: Path) -> None:
    """The eval stage's files as numeric W&B tables; an older run's eval dir (no judge
    check, no paired comparisons) logs what it has."""
    import wandb

    from baize_exp.stages.evaluate.wandb_tables import log_wandb

    new, old = tmp_path / "new" / "eval", tmp_path / "old" / "eval"
    for d in (new, old):
        d.mkdir(parents=True)
    (new / "scores.csv").write_text(
        "model,category,mode,n,mean,ci_low,ci_high,parse_failures,note\n"
        "v1,all,single,9,6.5,5.9,7.1,1,judge cannot discriminate\nv1,coding,single,1,7.0,,,0,\n"
    )
    (old / "scores.csv").write_text(
        "model,category,mode,n,mean,ci_low,ci_high,parse_failures\nbase,all,single,3,5.0,4.0,6.0,0\n"
    )
    (new / "judge_check.jsonl").write_text(
        json.dumps(
            {
                "question_id": "q1",
                "degradation": "truncated",
                "mode": "single",
                "correct": True,
                "good_score": 8,
                "bad_score": 3,
                "parse": "ok",
            }
        )
        + "\n"
        + json.dumps(
            {
                "question_id": "q2",
                "degradation": "shuffled",
                "mode": "pairwise",
                "correct": None,
                "verdicts": ["A", "C"],
                "parse": "failed",
            }
        )
        + "\n"
    )
    (new / "reliability.json").write_text(
        json.dumps(
            {
                "judge_check": {
                    "n": 2,
                    "correct": 1,
                    "accuracy": 0.5,
                    "ci_low": 0.09,
                    "ci_high": 0.91,
                    "chance": 0.5,
                    "discriminates": False,
                    "unparsed": 3,
                    "status": S.NOT_SHOWN_TO_DISCRIMINATE,
                    "by_degradation": {"truncated": {"n": 1, "accuracy": 1.0, "ci_low": 0.2, "ci_high": 1.0}},
                }
            }
        )
    )
    (new / "paired.csv").write_text(
        "comparison,a,b,metric,better_if,n,mean_a,mean_b,diff,ci_low,ci_high,mde,verdict,note\n"
        "v1 vs base,v1,base,heldout_loss,lower,4,2.1,2.5,-0.4,-0.6,-0.2,0.15,better,\n"
        "v1 vs base,v1,base,judge_single,higher,9,6.5,6.1,0.4,-0.3,1.1,nan,no detectable difference,"
        "judge cannot discriminate\n"
    )
    for d in (new, old):
        wb = wandb.init(project="t", dir=str(d.parent), mode="offline")
        log_wandb(wb, d)
        wb.finish()

    scores = _table(new.parent, "eval/scores")
    assert scores["data"] == [
        ["v1", "all", "single", 9, 6.5, 5.9, 7.1, 1, "judge cannot discriminate"],
        ["v1", "coding", "single", 1, 7.0, None, None, 0, ""],
    ]
    check = _table(new.parent, "eval/judge_check")
    assert check["columns"][:4] == ["question_id", "degradation", "mode", "correct"]
    assert check["data"][0][3:6] == [True, 8.0, 3.0] and check["data"][1][3] is None
    acc = _table(new.parent, "eval/judge_check_accuracy")
    assert acc["data"][0] == ["all", 2, 1, 0.5, 0.09, 0.91, 0.5, False, 3, S.NOT_SHOWN_TO_DISCRIMINATE]
    assert acc["data"][1][0] == "truncated" and acc["data"][1][-2:] == [None, None]  # an older record: left empty
    paired = _table(new.parent, "eval/paired")
    assert paired["columns"][-2:] == ["verdict", "note"]
    assert paired["data"][0][5:13] == [4, 2.1, 2.5, -0.4, -0.6, -0.2, 0.15, "better"]
    assert paired["data"][1][11] is None  # NaN: a missing value, not a string
    # the older run: its scores table and nothing invented
    names = {p.name.split("_", 1)[0] for p in old.parent.glob("wandb/offline-run-*/files/media/table/eval/*.json")}
    assert names == {"scores"}
