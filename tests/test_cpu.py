"""Threads follow the free cores: one per process on a busy machine, all of them on a quiet one."""

from __future__ import annotations

import subprocess
import sys
import time

import torch

from baize_exp import cpu


def _busy(n: int) -> list[subprocess.Popen]:
    procs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(n)]
    time.sleep(0.5)  # scheduled and running
    return procs


def test_threads_drop_to_one_beside_busy_processes_and_come_back(monkeypatch) -> None:
    monkeypatch.delenv("BAIZE_THREADS", raising=False)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    before = torch.get_num_threads()
    procs = _busy(cpu.cores())
    try:
        assert cpu.free_cores() == 1
        counts = [cpu.fit_threads(every_s=0) for _ in range(5)]  # five samples fill the median's window
        assert counts[-1] == 1 and torch.get_num_threads() == 1
    finally:
        for p in procs:
            p.kill()
            p.wait()
        torch.set_num_threads(before)
    time.sleep(0.3)
    # quiet again (or as quiet as this machine is): never fewer than one, never more than the cores
    assert 1 <= cpu.free_cores() <= cpu.cores()


def test_a_count_the_user_fixed_is_kept(monkeypatch) -> None:
    before = torch.get_num_threads()
    try:
        monkeypatch.setenv("BAIZE_THREADS", "1")
        assert cpu.fit_threads(every_s=0) == 1 == torch.get_num_threads()
        monkeypatch.delenv("BAIZE_THREADS")
        monkeypatch.setenv("OMP_NUM_THREADS", "1")
        torch.set_num_threads(before)
        assert cpu.fit_threads(every_s=0) == 1 == torch.get_num_threads()
    finally:
        torch.set_num_threads(before)
