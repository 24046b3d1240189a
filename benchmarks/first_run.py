"""The first `python run.py`: what it shows and what it costs against the default it replaced (issue 24, part 7).

The target is at most 6 minutes on this 2-core box when quiet, training on >= 8 dialogs and holding >= 4 out, and
a report that opens with a held-out-loss comparison and its CI. The default run and the previous default (16 seeds,
truncated transcripts rejected, a tenth held out, an 8-question judge check, one prompt format, 8 answers per
generate call, strict judge replies only) run cold one after the other, A, B, A, B, on today's code. The target is
judged on the slowest default run's own wall time (run it on a quiet box: the load average before and after each
run is printed beside it); the new/old ratio says what the new default costs beyond the old one on the same code
and the same minutes of this box, whose speed drifts. (A ratio times the old default's time from an earlier day
mixes two versions of the code: the old default itself got faster, 248 s on 2026-11-30, 178-183 s on 2026-12-04.)

    python benchmarks/first_run.py [--repeats 1] [--keep DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from busy_machine import one_run  # noqa: E402

OLD_DEFAULT = [
    "data.limit=16",
    "collect.on_truncated=reject",
    "train.val_fraction=0.1",
    "eval.judge_check=8",
    "eval.formats=[baize]",
    "eval.batch_size=8",
    "eval.judge_fallbacks=[]",
]


def opening(run_dir: Path) -> str:
    """The report's first section: what the run can and cannot show."""
    md = (run_dir / "report.md").read_text() if (run_dir / "report.md").is_file() else ""
    parts = md.split("\n## ")
    return parts[1] if len(parts) > 1 else ""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=1, help="new/old pairs, interleaved")
    ap.add_argument("--keep", type=Path, default=None, help="keep the run dirs here (default: a temp dir, removed)")
    a = ap.parse_args()
    work = a.keep or Path(tempfile.mkdtemp(prefix="baize_first_run_"))
    work.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(a.repeats):
        for name, args in ((f"new{i}", []), (f"old{i}", OLD_DEFAULT)):
            load0 = os.getloadavg()[0]
            row = one_run(work, name, 0, {}, args)
            row["load_before"], row["load_after"] = round(load0, 2), round(os.getloadavg()[0], 2)
            row["opening"] = opening(work / name)
            rows.append(row)
            print(json.dumps({k: v for k, v in row.items() if k != "opening"}), flush=True)
    print("\n| run | wall | collect | train | sdf | eval | dialogs (trained / held out) | load 1-min (before, after) |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        st = r["stages"]
        stages = " | ".join(f"{st[s]:.0f} s" if st.get(s) else "-" for s in ("collect", "train", "sdf", "eval"))
        print(
            f"| {r['name']} | {r['wall_s']:.0f} s | {stages} | {r['dialogs']} ({r['train_dialogs']} / "
            f"{r['heldout_dialogs']}) | {r['load_before']}, {r['load_after']} |"
        )
    new = [r for r in rows if r["name"].startswith("new") and r["rc"] == 0]
    old = [r for r in rows if r["name"].startswith("old") and r["rc"] == 0]
    if new and old:
        ratio = statistics.mean(r["wall_s"] for r in new) / statistics.mean(r["wall_s"] for r in old)
        slowest = max(r["wall_s"] for r in new)
        walls = ", ".join(f"{r['wall_s']:.0f} s" for r in new)
        shows = all(
            r["train_dialogs"] >= 8 and r["heldout_dialogs"] >= 4 and "held-out loss" in r["opening"] for r in new
        )
        print(
            f"\nthe default run: {walls}; slowest {slowest:.0f} s "
            f"({slowest / 60:.1f} min; target <= 6 min on a quiet box: {'met' if slowest <= 360 else 'NOT met'}); "
            f"new / old on the same code: {ratio:.2f}x; >= 8 trained, >= 4 held out, held-out loss in the opening: "
            f"{'yes' if shows else 'NO'}"
        )
        print("\nThe new default's report opens with:\n\n" + new[0]["opening"][:2000])
    if a.keep is None:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
