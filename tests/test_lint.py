"""The tree stays ruff-clean and ruff-formatted (CI runs this with the rest)."""

import subprocess
import sys

import pytest
from helpers.config import ROOT


@pytest.mark.parametrize("command", [["check"], ["format", "--check"]], ids=["check", "format"])
def test_ruff_clean(command: list[str]) -> None:
    r = subprocess.run([sys.executable, "-m", "ruff", *command, str(ROOT)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
