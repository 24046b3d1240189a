"""The GPU check (benchmarks/gpu_check.py) as a lent GPU machine will run it, driven here through its CPU dry run:
the same rows, budgets, deadline, table and files; its negative controls; its import check; its wheel list."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import gpu_check  # noqa: E402
import gpu_deps  # noqa: E402

# Written into a folder on PYTHONPATH: every process of the dry run records the files of the modules it loaded.
_RECORD_IMPORTS = """
import atexit, os, sys
def _record():
    with open(os.path.join(os.environ["BAIZE_IMPORT_LOG"], f"{os.getpid()}.txt"), "w") as f:
        f.write("\\n".join(m.__file__ for m in list(sys.modules.values()) if getattr(m, "__file__", None)))
atexit.register(_record)
"""


def _check(tmp_path: Path, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--cpu-dry-run", "--out", str(tmp_path / "out")]
    cmd += ["--work", str(tmp_path / "work"), "--wheels", str(tmp_path / "no_wheels"), *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=900, env={**os.environ, **(env or {})})


@pytest.mark.slow(seconds=145)  # on this box, 2026-12-03: started first
def test_dry_run_passes_every_row_its_controls_fail_and_only_the_table_comes_back(tmp_path: Path) -> None:
    site, log = tmp_path / "site", tmp_path / "imports"
    site.mkdir()
    log.mkdir()
    (site / "sitecustomize.py").write_text(_RECORD_IMPORTS)
    path = os.pathsep.join(filter(None, [str(site), os.environ.get("PYTHONPATH")]))
    r = _check(tmp_path, env={"PYTHONPATH": path, "BAIZE_IMPORT_LOG": str(log)})
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    out = tmp_path / "out"
    assert sorted(p.name for p in out.iterdir()) == ["gpu_check.json", "gpu_check.md"]  # no failing row, no archive
    rows = {row["key"]: row for row in json.loads((out / "gpu_check.json").read_text())["rows"]}
    assert list(rows) == ["auto", "control_optimizer_reset", "control_data_shift", "generate", "vllm", "mfu"]
    train = rows["auto"]
    assert train["status"] == "ok" and train["loss_fall"] >= 0.5  # a fall the resume check can measure against
    assert train["resume_max_diff"] <= train["resume_tolerance"] and 0 < train["ckpt_share_of_base"] < 0.1
    for key in ("control_optimizer_reset", "control_data_shift"):  # each must be caught, at the GPU's tolerance
        assert rows[key]["status"] == "FAIL (expected: control)", rows[key]
        assert rows[key]["resume_max_diff"] > rows[key]["resume_tolerance"] > train["resume_tolerance"]
    gen = rows["generate"]
    assert gen["status"] == "ok" and gen["cpu_sdf_tokens_per_s"] > 0 and gen["cpu_eval_tokens_per_s"] > 0
    assert rows["vllm"]["status"] == "skipped" and rows["vllm"]["reason"]
    assert rows["mfu"]["status"] == "ok" and 0 < rows["mfu"]["mfu"] < 1 and rows["mfu"]["device"] == "cpu"
    assert all(row["seconds"] >= 0 for row in rows.values())  # measured time per row
    table = (out / "gpu_check.md").read_text()
    assert table in r.stdout and table.count("\n| ") == 1 + len(rows)  # header + a line per row, printed alike
    log_text = (tmp_path / "work" / "logs" / "auto_resumed.log").read_text()  # work files stay outside $OUT
    assert "stopped after step 4 as train.stop_at_step=4 asks" in log_text
    assert "Restoring states from the checkpoint" in log_text

    # the wheel list's closure holds every distribution the dry run's processes imported (so it cannot rot)
    owner = {}
    for dist in gpu_deps.md.distributions():
        for f in dist.files or []:
            owner[str(dist.locate_file(f).resolve())] = gpu_deps.canonical(dist.metadata["Name"])
    files = {line for p in log.glob("*.txt") for line in p.read_text().splitlines()}
    imported = {owner[p] for p in (str(Path(f).resolve()) for f in files) if p in owner}
    # its own process, the import probe, 3 run.py of the train row, one of each control, the generation worker, mfu
    assert len(list(log.glob("*.txt"))) >= 9 and "torch" in imported and "pytorch-lightning" in imported
    closure = {gpu_deps.canonical(d) for d in gpu_deps.probe()["dists"]}
    assert imported - closure - gpu_deps.DISCOVERED_ONLY == set(), "add these imports to gpu_deps.CHECK_IMPORTS"


@pytest.mark.slow(seconds=60)  # on this box, 2026-12-03: started first
def test_a_deadline_cuts_rows_keeps_the_table_and_says_so_in_the_exit_status(tmp_path: Path) -> None:
    """The issue's `make gpu-check ARGS="--cpu-dry-run --deadline 60"`: the first row may finish, the rest cannot."""
    r = _check(tmp_path, "--deadline", "60")
    assert r.returncode == gpu_check.EXIT_CUT, r.stdout[-3000:] + r.stderr[-3000:]
    rows = json.loads((tmp_path / "out" / "gpu_check.json").read_text())["rows"]
    assert len(rows) == 6 and all(row["status"] in ("ok", "cut") for row in rows), rows
    cut = [row["check"] for row in rows if row["status"] == "cut"]
    assert {"generate hf (8 prompts x 4 candidates, 64 new tokens)", "train tiny, packed (dry run)"} <= set(cut)
    assert "cut by the 60 s deadline: " + "; ".join(cut) in r.stdout
    assert (tmp_path / "out" / "gpu_check.md").read_text().count("| cut |") == len(cut)


@pytest.mark.slow  # a fresh interpreter imports the whole GPU closure (deepspeed, torch): ~20 s
def test_a_missing_package_stops_the_check_in_one_line_naming_it(tmp_path: Path) -> None:
    """The first step: an import of the closure fails (a deepspeed that cannot be imported shadows the real one)."""
    shadow = tmp_path / "shadow" / "deepspeed"
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text("raise ImportError(\"No module named 'deepspeed'\")\n")
    r = _check(tmp_path, env={"PYTHONPATH": str(shadow.parent)})
    assert r.returncode == gpu_check.EXIT_SETUP, r.stdout[-2000:] + r.stderr[-2000:]
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("gpu_check: ") and "import deepspeed failed" in lines[0]
    assert "make gpu-wheels" in lines[0] and not (tmp_path / "out").exists()  # stopped before any row


def test_resume_verdict_tolerance_is_relative_to_the_fall_and_needs_a_fall() -> None:
    straight = {0: 11.0, 1: 10.6, 2: 10.0, 3: 9.6, 4: 9.0, 5: 8.8}  # falls by 1.9 (10.8 -> 8.9)
    same = gpu_check.resume_verdict(straight, {k: v + 0.03 for k, v in straight.items()}, 0.02, 0.5)
    assert same["ok"] and same["loss_fall"] == pytest.approx(1.9) and same["resume_tolerance"] == pytest.approx(0.038)
    off = gpu_check.resume_verdict(straight, {**straight, 4: 9.1}, 0.02, 0.5)  # one step 0.1 off
    assert not off["ok"] and off["resume_max_diff"] == pytest.approx(0.1)
    flat = {k: 10.8 for k in range(6)}
    assert not gpu_check.resume_verdict(flat, dict(flat), 0.02, 0.5)["ok"]  # no fall: nothing could be caught
    assert not gpu_check.resume_verdict(straight, {k: straight[k] for k in range(5)}, 0.02, 0.5)["ok"]


@pytest.mark.slow  # a fresh interpreter imports the whole GPU closure (deepspeed, torch): ~20 s
def test_wheel_list_is_the_closure_minus_the_gpu_image_and_its_pins_meet_every_requirement() -> None:
    """benchmarks/gpu-requirements.txt is what `gpu_deps.py --write` derives (names; the pins are checked against
    every requirement on them, since a fresh install may pick newer versions than the ones listed)."""
    from packaging.version import Version

    dists = gpu_deps.probe()["dists"]
    derived, _ = gpu_deps.carried(dists)
    listed = gpu_deps.listed_requirements()
    assert set(listed) == set(derived), "rerun: python benchmarks/gpu_deps.py --write"
    image = gpu_deps.image_packages()
    assert not set(listed) & {n for n, v in image.items() if v}  # nothing the image has at a known, fine version
    # the ones the issue found missing on the GPU machine are carried: pydantic's, openai's and httpx2's needs
    assert {"pydantic", "openai", "deepspeed", "hydra-core", "typing-extensions", "anyio", "idna"} <= set(listed)
    for name, version in listed.items():
        for dist in set(listed) | {gpu_deps.canonical(d) for d in dists}:
            for req in gpu_deps.requirements_of(dist, gpu_deps.GPU_PYTHON) if dist != "baize-exp" else []:
                if gpu_deps.canonical(req.name) == name and req.specifier:
                    assert req.specifier.contains(Version(version), prereleases=True), (name, version, dist, req)
