"""The default `python run.py` on a quiet machine and beside CPU-bound jobs: a busy machine may slow a run down, it
must not fail it. Target: the run completes under load, in at most 3x its quiet wall time.

    python benchmarks/busy_machine.py                  # quiet, loaded (2 busy processes), one pair
    python benchmarks/busy_machine.py --repeats 2      # quiet, loaded, quiet, loaded (the box's speed drifts)
    python benchmarks/busy_machine.py --fixed-threads  # also the old policy: every process takes all cores

Each run starts cold (its own cache dir with only the converted model copied in, so the teacher, the answers and
the judge all run) and writes its own run dir; the load is `busy` processes of `while True: pass` started before
the run and killed after it. Prints one row per run (wall time, stage times, status) and the loaded/quiet ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from baize_exp.config import cache_dir  # noqa: E402


def one_run(work: Path, name: str, busy: int, extra_env: dict, args: list[str]) -> dict:
    cache = work / f"cache-{name}"
    shutil.copytree(cache_dir() / "models", cache / "models")  # the conversion is a one-time cost, not the run's
    env = {**os.environ, "BAIZE_CACHE": str(cache), "WANDB_MODE": "offline", **extra_env}
    load = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(busy)]
    t0 = time.monotonic()
    try:
        r = subprocess.run(
            [sys.executable, str(ROOT / "run.py"), f"hydra.run.dir={work / name}", *args],
            env=env,
            cwd=ROOT,
            capture_output=True,
            text=True,
        )
    finally:
        wall = time.monotonic() - t0
        for p in load:
            p.kill()
            p.wait()
    metrics = json.loads((work / name / "metrics.json").read_text()) if (work / name / "metrics.json").is_file() else {}
    stages = {s: m.get("stage_seconds") for s, m in metrics.items() if s != "run" and isinstance(m, dict)}
    return {
        "name": name,
        "busy": busy,
        "wall_s": round(wall, 1),
        "rc": r.returncode,
        "stages": stages,
        "status": metrics.get("run", {}).get("status"),
        "dialogs": metrics.get("collect", {}).get("dialogs"),
        # what the first run can show (issue 24, part 7): >= 8 dialogs trained on, >= 4 held out
        "train_dialogs": metrics.get("train", {}).get("train_dialogs"),
        "heldout_dialogs": metrics.get("eval", {}).get("heldout_dialogs"),
        "judge_check": metrics.get("eval", {}).get("judge_check/status"),
        "error": r.stderr.strip().splitlines()[-1][:300] if r.returncode else None,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--busy", type=int, default=2, help="CPU-bound processes beside the loaded run")
    ap.add_argument("--repeats", type=int, default=1, help="quiet/loaded pairs, interleaved")
    ap.add_argument(
        "--fixed-threads",
        action="store_true",
        help="also run the old policy (BAIZE_THREADS = all cores in every process) under load",
    )
    ap.add_argument("--keep", type=Path, default=None, help="keep the run dirs here (default: a temp dir, removed)")
    ap.add_argument("args", nargs="*", help="overrides for run.py (default: none, the default run)")
    a = ap.parse_args()
    work = a.keep or Path(tempfile.mkdtemp(prefix="baize_busy_"))
    work.mkdir(parents=True, exist_ok=True)
    plan = []
    for i in range(a.repeats):
        plan += [(f"quiet{i}", 0, {}), (f"loaded{i}", a.busy, {})]
        if a.fixed_threads:
            plan.append((f"loaded_fixed{i}", a.busy, {"BAIZE_THREADS": str(len(os.sched_getaffinity(0)))}))
    rows = []
    for name, busy, env in plan:
        row = one_run(work, name, busy, env, a.args)
        rows.append(row)
        print(json.dumps(row), flush=True)
    print("\n| run | busy processes | wall | collect | train | sdf | eval | dialogs (trained / held out) | status |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        st = r["stages"]
        print(
            f"| {r['name']} | {r['busy']} | {r['wall_s']:.0f} s | "
            + " | ".join(
                f"{st[s]:.0f} s" if st.get(s) is not None else "-" for s in ("collect", "train", "sdf", "eval")
            )
            + f" | {r['dialogs']} ({r['train_dialogs']} / {r['heldout_dialogs']}) | {r['status'] or r['error']} |"
        )
    quiet = [r["wall_s"] for r in rows if r["busy"] == 0 and r["rc"] == 0]
    loaded = [r["wall_s"] for r in rows if r["busy"] and r["rc"] == 0 and not r["name"].startswith("loaded_fixed")]
    if quiet and loaded:
        ratio = (sum(loaded) / len(loaded)) / (sum(quiet) / len(quiet))
        ok = ratio <= 3 and all(r["rc"] == 0 for r in rows if not r["name"].startswith("loaded_fixed"))
        print(
            f"\nloaded / quiet wall time: {ratio:.2f}x (target <= 3x, every run completed: "
            f"{'met' if ok else 'NOT met'}); n={len(quiet)}+{len(loaded)}"
        )
    if a.keep is None:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
