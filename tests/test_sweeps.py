"""Ablations: the shipped sweep configs, Optuna and submitit composition, a real multirun, and the report."""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import pytest
from helpers.cli import run_cli
from helpers.config import CONF, ROOT
from helpers.fault_server import FaultServer
from helpers.scripted_teacher import references, scripted_reply
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import OmegaConf

from baize_exp.errors import UserError
from baize_exp.stages import report

SWEEPS = sorted(p.stem for p in (CONF / "sweep").glob("*.yaml"))
PNG = b"\x89PNG\r\n\x1a\n"


def _compose_hydra(overrides: list[str]):
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name="config", overrides=overrides, return_hydra_config=True)


def test_every_shipped_sweep_has_a_smoke_variant_and_composes() -> None:
    base = [s for s in SWEEPS if not s.endswith("_smoke")]
    assert {"lora_rank", "data_source", "sdf_on_off", "model_size", "seeds"} <= set(base)
    for name in base:
        assert f"{name}_smoke" in SWEEPS
        for variant in (name, f"{name}_smoke"):
            cfg = _compose_hydra([f"+sweep={variant}"])
            params = dict(cfg.hydra.sweeper.params)
            assert len(params) >= 1 and all("," in str(v) for k, v in params.items() if k != "experiment"), params
            assert f"multirun/{variant}/" in OmegaConf.to_container(cfg.hydra.sweep)["dir"]
            if variant.endswith("_smoke"):
                assert params["experiment"] == "smoke"
    assert _compose_hydra(["+sweep=lora_rank"]).hydra.sweeper.params["lora.r"] == "4,8,16,64"


def test_optuna_search_composes_with_a_resumable_sqlite_study(tmp_path: Path) -> None:
    cfg = _compose_hydra(["hparams_search=optuna", f"paths.output_dir={tmp_path}"])
    sw = cfg.hydra.sweeper
    assert "optuna" in sw._target_.lower()
    assert sw.storage == f"sqlite:///{tmp_path}/optuna/baize_lora.db" and sw.study_name
    assert {"train.lr", "lora.r", "lora.alpha", "lora.dropout"} <= set(sw.params)
    assert cfg.optimized_metric


def test_slurm_launcher_takes_gpus_and_nodes_from_the_trainer_config() -> None:
    cfg = _compose_hydra(["hydra/launcher=slurm", "trainer=gpu", "trainer.devices=4", "trainer.num_nodes=2"])
    la = cfg.hydra.launcher
    assert "SlurmLauncher" in la._target_
    assert (la.gpus_per_node, la.tasks_per_node, la.nodes) == (4, 4, 2)
    local = _compose_hydra(["hydra/launcher=local"]).hydra.launcher
    assert "LocalLauncher" in local._target_


def _fake_run(
    d: Path,
    overrides: list[str],
    status: str = "completed",
    loss: float = 2.0,
    judge: float = 5.0,
    error: str | None = None,
) -> None:
    """A run dir as the pipeline writes it (metrics.json, eval scores, a training CSV log)."""
    d.mkdir(parents=True)
    m = {"run": {"overrides": overrides, "status": status, "error": error}}
    if status == "completed":
        m |= {
            "collect": {"dialogs": 7, "rejects": 1, "stage_seconds": 3.0},
            "train": {"val_loss": loss + 0.1, "val_ppl": 9.0, "tokens_per_s": 100.0, "stage_seconds": 5.0},
            "eval": {
                "v1/heldout_loss": loss,
                "v1/judge_mean": judge,
                "v1/judge_ci": [judge - 1, judge + 1],
                "v1/judge_n": 9,
                "stage_seconds": 2.5,
            },
        }
        (d / "train" / "logs").mkdir(parents=True)
        (d / "train" / "logs" / "metrics.csv").write_text(f"epoch,step,train/loss\n0,0,3.0\n0,1,2.5\n1,2,{loss}\n")
    (d / "metrics.json").write_text(json.dumps(m))


def test_report_table_csv_plots_and_failed_runs(tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    _fake_run(sweep / "0", ["+sweep=x", "lora.r=4", "train.seed=0"], loss=2.5, judge=4.0)
    _fake_run(sweep / "1", ["+sweep=x", "lora.r=16", "train.seed=0"], loss=2.0, judge=6.0)
    _fake_run(sweep / "2", ["+sweep=x", "lora.r=64", "train.seed=0"], status="failed", error="RuntimeError: boom")
    (sweep / "3" / ".hydra").mkdir(parents=True)  # died before its first stage: still a row
    (sweep / "3" / ".hydra" / "overrides.yaml").write_text("- +sweep=x\n- lora.r=8\n- train.seed=0\n")

    records = report.compare([sweep], sweep / "report")
    assert [r.path.name for r in records] == ["0", "1", "2", "3"]
    assert [r.status for r in records] == ["completed", "completed", "failed", "failed"]
    rows = list(csv.DictReader(open(sweep / "report" / "report.csv")))
    assert [r["lora.r"] for r in rows] == ["4", "16", "64", "8"]
    assert "sweep" not in rows[0] and "train.seed" not in rows[0]  # the same for every run: not a column
    assert float(rows[1]["v1_heldout_loss"]) == 2.0 and float(rows[1]["v1_judge_ci_high"]) == 7.0
    assert rows[2]["error"] == "RuntimeError: boom" and rows[2]["v1_heldout_loss"] == ""
    md = (sweep / "report" / "report.md").read_text()
    assert "| 1 | 16 | completed |" in md and "RuntimeError: boom" in md and "`train.seed=0`" in md
    for png in ("loss_curves.png", "final_heldout_loss_vs_lora.r.png", "final_judge_vs_lora.r.png"):
        data = (sweep / "report" / png).read_bytes()
        assert data.startswith(PNG) and len(data) > 8000, png
    page = (sweep / "report" / "report.html").read_text()
    assert page.count("data:image/png;base64,") == 3 and "class='failed'" in page

    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no run dirs"):
        report.compare([tmp_path / "empty"], tmp_path / "r")


# ---------------------------------------------------------------------------------------------------------------
# Real multiruns through run.py


@pytest.fixture(scope="module")
def teacher_server():
    """A scripted teacher and judge on loopback for the whole module (tests/helpers/scripted_teacher.py): the
    sweep's machinery is under test here, not the embedded model (tests/test_pipeline.py runs that end to end)."""
    with FaultServer(api_key="sk-sweeps-0123456789", reply=scripted_reply(references())) as s:
        yield s


def _openai_backend(server: FaultServer) -> list[str]:
    return (
        [f"{role}=openai" for role in ("teacher", "judge")]
        + [
            f"{role}.{k}={v}"
            for role in ("teacher", "judge")
            for k, v in (
                ("base_url", server.base_url),
                ("api_key_env", "BAIZE_TEST_KEY"),
                ("model", "scripted"),
                ("concurrency", 16),
            )
        ]
        + ["eval.judge_logprobs=false"]
    )


@pytest.mark.slow
def test_two_by_two_multirun_shares_one_collection_and_reports(tmp_path: Path, teacher_server: FaultServer) -> None:
    sweep_dir = tmp_path / "multirun"
    # lora.r=0 is invalid: those two jobs run first, fail, and must not stop the four others.
    args = [
        "-m",
        "model=tiny",
        "lora.r=0,4,8",
        "sdf=default,off",
        "data.limit=10",
        "teacher.temperature=0",
        "teacher.max_tokens=160",
        "collect.on_truncated=drop_turn",
        "train.val_fraction=0.3",
        "sdf.num_prompts=2",
        "sdf.num_candidates=2",
        "sdf.max_new_tokens=16",
        "eval.limit=2",
        "eval.max_new_tokens=16",
        "eval.bootstrap=100",
        "trainer.max_epochs=1",
        "logger=csv",
        *_openai_backend(teacher_server),
        f"hydra.sweep.dir={sweep_dir}",
    ]
    r = run_cli(*args, env={"BAIZE_TEST_KEY": teacher_server.api_key})
    assert r.returncode != 0 and "lora.r" in r.stderr  # the sweep reports its failed jobs

    jobs = sorted((p for p in sweep_dir.iterdir() if p.name.isdigit()), key=lambda p: int(p.name))
    assert len(jobs) == 6
    metrics = {j.name: json.loads((j / "metrics.json").read_text()) for j in jobs}
    status = {j: m["run"]["status"] for j, m in metrics.items()}
    assert status == {
        "0": "failed",
        "1": "failed",
        "2": "completed",
        "3": "completed",
        "4": "completed",
        "5": "completed",
    }
    assert "lora.r" in metrics["0"]["run"]["error"]
    done = [metrics[j] for j in ("2", "3", "4", "5")]
    # one collection for all four: the first sent the requests, the others read the shared cache
    shared = {m["collect"]["shared_dir"] for m in done}
    assert len(shared) == 1
    assert [m["collect"]["requested"] > 0 for m in done] == [True, False, False, False]
    texts = {(sweep_dir / j / "collect" / "dialogs.jsonl").read_text() for j in ("2", "3", "4", "5")}
    assert len(texts) == 1 and texts.pop().count("\n") == done[0]["collect"]["dialogs"] >= 1
    assert [m["sdf"].get("skipped", False) for m in done] == [False, True, False, True]  # sdf=default,off

    out = tmp_path / "report"
    rep = subprocess_report(sweep_dir, out)
    assert rep.returncode == 0, rep.stderr
    rows = list(csv.DictReader(open(out / "report.csv")))
    assert [(x["lora.r"], x["sdf"], x["status"]) for x in rows] == [
        ("0", "default", "failed"),
        ("0", "off", "failed"),
        ("4", "default", "completed"),
        ("4", "off", "completed"),
        ("8", "default", "completed"),
        ("8", "off", "completed"),
    ]
    for row, m in zip(rows[2:], done, strict=True):
        assert m["eval"]["heldout_dialogs"] >= 1
        assert float(row["v1_heldout_loss"]) == pytest.approx(m["eval"]["v1/heldout_loss"])
        assert float(row["val_loss"]) == pytest.approx(m["train"]["val_loss"])
        assert int(row["dialogs"]) == m["collect"]["dialogs"]
        assert (row["v2_heldout_loss"] != "") == (not m["sdf"].get("skipped", False))
    for png in out.glob("*.png"):
        assert png.read_bytes().startswith(PNG) and png.stat().st_size > 8000
    assert {"loss_curves.png", "final_heldout_loss_vs_lora.r.png", "final_heldout_loss_vs_sdf.png"} <= {
        p.name for p in out.glob("*.png")
    }


def subprocess_report(*args: Path):
    import subprocess

    paths = [str(a) for a in args[:-1]]
    return subprocess.run(
        [sys.executable, "-m", "baize_exp.stages.report", *paths, "--out", str(args[-1])],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
    )


@pytest.mark.slow
def test_multirun_runs_share_a_wandb_group_with_override_tags(tmp_path: Path) -> None:
    sweep_dir = tmp_path / "mr"
    r = run_cli("-m", "stages=[report]", "logger=wandb", "train.seed=0,1", f"hydra.sweep.dir={sweep_dir}")
    assert r.returncode == 0, r.stderr[-3000:]
    groups, tags = set(), []
    for job in ("0", "1"):
        (run_file,) = (sweep_dir / job).glob("wandb/offline-run-*/run-*.wandb")
        rec = _wandb_run_record(run_file)
        groups.add(rec["run_group"])
        tags.append(rec["tags"])
        assert rec["config"]["update"]["overrides"]["train.seed"] == job  # the sweep's overrides as config columns
    assert groups == {str(sweep_dir)}  # outside outputs/: the sweep dir itself names the group
    assert tags == [["stages=[report]", "train.seed=0"], ["stages=[report]", "train.seed=1"]]  # not logger=...


def _wandb_run_record(path: Path) -> dict:
    """The run record (group, tags, config) of an offline .wandb file, read back with wandb's own inspector."""
    import subprocess

    out = subprocess.run(
        [str(Path(sys.executable).parent / "wandb"), "leet", "inspect", "--json", str(path)],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    ).stdout
    return next(r["run"] for r in map(json.loads, out.splitlines()) if r.get("type") == "run")


@pytest.mark.slow
def test_submitit_local_launcher_runs_a_tiny_job(tmp_path: Path) -> None:
    sweep_dir = tmp_path / "sub"
    r = run_cli(
        "-m", "hydra/launcher=local", "stages=[report]", "logger=csv", "train.seed=3", f"hydra.sweep.dir={sweep_dir}"
    )
    assert r.returncode == 0, r.stderr[-3000:]
    m = json.loads((sweep_dir / "0" / "metrics.json").read_text())
    assert m["run"]["status"] == "completed" and "train.seed=3" in m["run"]["overrides"]
    assert list((sweep_dir / ".submitit").glob("*/*_log.out"))  # it really went through submitit


@pytest.mark.slow
def test_optuna_study_resumes_from_sqlite(tmp_path: Path) -> None:
    dialogs = tmp_path / "dialogs.jsonl"

    def turns(i: int) -> list[dict]:
        return [{"role": "human", "text": f"Question {i}?"}, {"role": "ai", "text": f"Answer {i}."}]

    dialogs.write_text("".join(json.dumps({"id": f"d{i}", "turns": turns(i)}) + "\n" for i in range(6)))
    common = [
        "-m",
        "hparams_search=optuna",
        "model=tiny",
        "stages=[train]",
        f"train.data={dialogs}",
        "logger=csv",
        "optimized_metric=train/val_loss",
        "hydra.sweeper.n_trials=1",
        f"paths.output_dir={tmp_path}",
    ]
    for i in range(2):
        r = run_cli(*common, f"hydra.sweep.dir={tmp_path}/sweep{i}")
        assert r.returncode == 0, r.stderr[-3000:]
    import optuna

    study = optuna.load_study(study_name="baize_lora", storage=f"sqlite:///{tmp_path}/optuna/baize_lora.db")
    trials = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(trials) == 2 and all(t.value > 0 for t in trials)
    assert {"train.lr", "lora.r"} <= trials[0].params.keys()
