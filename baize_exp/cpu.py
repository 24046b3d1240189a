"""CPU threads for torch: take the cores nobody else is using, never more.

A run on a small machine has two torch processes (the run and its local chat server) and often other people's jobs
beside them. Each torch process starts an OpenMP pool as wide as the machine, and a pool whose threads are not all
scheduled waits at every op's barrier: two busy 2-thread pools on 2 cores, or one beside other work, run several
times slower than one thread each (measured here: ~3.5 s per decode step against ~0.7 s). So the thread count
follows the cores that are free *now*: the cores this process may use, minus the threads of other processes that
are running at this moment (`procs_running` in /proc/stat, less our own running threads). The process doing the
work takes what is free, the one waiting on it holds nothing, and a busy machine gets one thread per process.

`fit_threads()` is cheap (a few small /proc reads, at most every 0.5 s); call it at batch boundaries of long work.
"""

from __future__ import annotations

import os
import statistics
import threading
import time
from pathlib import Path

_state = threading.local()  # OpenMP thread counts are per calling thread: remember what each one last set


def cores() -> int:
    """The cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        return os.cpu_count() or 1


def _running_elsewhere() -> int | None:
    """Threads of other processes running right now, or None where /proc does not tell."""
    try:
        stat = Path("/proc/stat").read_text()
        running = int(next(ln.split()[1] for ln in stat.splitlines() if ln.startswith("procs_running")))
        ours = 0
        for task in Path("/proc/self/task").iterdir():
            try:
                # the state is the field after "(comm)"; comm may hold spaces, so split after the last ")"
                ours += (task / "stat").read_text().rsplit(")", 1)[1].split()[0] == "R"
            except OSError:
                continue  # a thread that ended while we looked
        return max(0, running - max(ours, 1))
    except (OSError, StopIteration, ValueError, IndexError):
        return None


def free_cores(samples: int = 5, interval_s: float = 0.01) -> int:
    """Cores not taken by other processes: the median over a few quick samples (one sample catches a moment)."""
    n = cores()
    seen = []
    for i in range(samples):
        busy = _running_elsewhere()
        if busy is None:
            return n
        seen.append(busy)
        if i + 1 < samples:
            time.sleep(interval_s)
    return max(1, min(n, n - round(statistics.median(seen))))


def fit_threads(every_s: float = 0.5, window: int = 5) -> int:
    """Set this thread's torch thread count to the free cores: one sample every `every_s` at most, the count from
    the median of the last `window` samples (so a moment's spike does not flip it), a call in between costs
    nothing. A count the user fixed (`BAIZE_THREADS`, else `OMP_NUM_THREADS`) is kept. Returns the count in force."""
    import torch  # here: the pipeline's preflight imports this module and needs no torch (a refusal answers sooner)

    fixed = os.environ.get("BAIZE_THREADS") or os.environ.get("OMP_NUM_THREADS")
    if fixed and fixed.isdigit() and int(fixed) > 0:
        if torch.get_num_threads() != int(fixed):
            torch.set_num_threads(int(fixed))
        return int(fixed)
    now = time.monotonic()
    if now - getattr(_state, "checked", -1e9) < every_s:
        return torch.get_num_threads()
    _state.checked = now
    busy = _running_elsewhere()
    if busy is None:
        return torch.get_num_threads()
    _state.samples = (getattr(_state, "samples", []) + [busy])[-window:]
    n = cores()
    want = max(1, min(n, n - round(statistics.median(_state.samples))))
    if want != torch.get_num_threads():
        torch.set_num_threads(want)
    return want
