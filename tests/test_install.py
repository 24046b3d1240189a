"""A non-editable install works: the configs ship inside the package, and the console scripts run from any
directory."""

from __future__ import annotations

import os
import shutil
import site
import subprocess
import sys
from pathlib import Path

import pytest
from helpers.config import ROOT


@pytest.mark.slow
def test_a_wheel_installed_into_a_fresh_venv_runs_from_another_directory(tmp_path: Path) -> None:
    # built from a copy of the sources, so the build leaves nothing (build/, egg-info) in the checkout
    src = tmp_path / "src"
    shutil.copytree(
        ROOT,
        src,
        symlinks=True,
        ignore=shutil.ignore_patterns(
            ".git", ".venv", ".cache", "outputs", "multirun", "build", "*.egg-info", "__pycache__", ".pytest_cache"
        ),
    )
    wheels = tmp_path / "wheels"
    r = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(wheels), str(src)],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=tmp_path,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    (wheel,) = wheels.glob("baize_exp-*.whl")
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    py = venv / "bin" / "python"
    fresh_site = Path(
        subprocess.run(
            [str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    # --ignore-installed: the build left baize_exp.egg-info in the checkout, which pip must not take as installed
    r = subprocess.run(
        [str(py), "-m", "pip", "install", "--no-deps", "--no-index", "--ignore-installed", "-q", str(wheel)],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=tmp_path,
        env=env,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    # then the dependencies (torch, hydra, ...) from this test's environment, not the network: a path entry, whose
    # own .pth files (this checkout's editable install among them) are not processed. (Before the install, pip
    # would see that editable install through it and take baize_exp as installed already.)
    (fresh_site / "deps.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    where = subprocess.run(
        [str(py), "-c", "import baize_exp; print(baize_exp.__file__)"],
        cwd=elsewhere,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert where.stdout.startswith(str(fresh_site)), where.stdout + where.stderr  # the wheel, not this checkout

    job = subprocess.run(
        [str(venv / "bin" / "baize-run"), "model=13b", "lora.r=8", "--cfg", "job"],
        cwd=elsewhere,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert job.returncode == 0, job.stderr[-3000:]
    assert "name: llama_13b" in job.stdout and "\n  r: 8\n" in job.stdout
    plan = subprocess.run(
        [
            str(venv / "bin" / "baize-run"),
            "stages=[plan]",
            "model=7b",
            "logger=none",
            f"hydra.run.dir={elsewhere / 'run'}",
        ],
        cwd=elsewhere,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert plan.returncode == 0, plan.stderr[-3000:]
    assert (elsewhere / "run" / "plan" / "plan.md").is_file() and "ZeRO" in plan.stdout
    sweep = subprocess.run(
        [str(venv / "bin" / "baize-plan"), "--help"],
        cwd=elsewhere,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert sweep.returncode == 0 and "baize-plan" in sweep.stdout
    shipped = subprocess.run(
        [
            str(py),
            "-c",
            "from baize_exp.config import CONF_DIR; print(sorted(p.name for p in (CONF_DIR / 'sweep').glob('*.yaml')))",
        ],
        cwd=elsewhere,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert "lora_rank.yaml" in shipped.stdout  # the sweeps ship too
