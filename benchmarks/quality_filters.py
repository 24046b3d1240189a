"""Measure: what share of the embedded teacher's dialogs each quality filter removes, and the score distributions
the thresholds (collect.quality.*) were set from.

Collects `--seeds` seeds (the shipped mixed set) with the local SmolLM2-135M teacher through the real run.py
(`collect.on_truncated=drop_turn`, so the filters see every dialog the parser accepts), then scores every dialog
the teacher wrote with each check alone, and prints the share each threshold removes and a few examples.

    python benchmarks/quality_filters.py [--seeds 200] [--run-dir /tmp/baize_quality]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def quantiles(v: list[float]) -> str:
    v = sorted(v)
    return (
        " ".join(f"p{q}={v[min(len(v) - 1, int(q / 100 * len(v)))]:.2f}" for q in (10, 50, 90, 99))
        + f" max={v[-1]:.2f}"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", type=int, default=200)
    ap.add_argument("--run-dir", default="/tmp/baize_quality")
    args = ap.parse_args()
    run_dir = Path(args.run_dir)
    if not (run_dir / "collect" / "_COMPLETE.json").is_file():
        r = subprocess.run(
            [
                sys.executable,
                str(ROOT / "run.py"),
                "stages=[collect]",
                f"data.limit={args.seeds}",
                "collect.on_truncated=drop_turn",
                "logger=none",
                f"hydra.run.dir={run_dir}",
            ],
            cwd=ROOT,
        )
        if r.returncode != 0:
            raise SystemExit(f"collect failed (exit {r.returncode})")

    from hydra import compose, initialize_config_dir

    from baize_exp.config import CONF_DIR, register_configs
    from baize_exp.data.quality import QualityFilter
    from baize_exp.io import read_jsonl

    register_configs()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="config")
    kept = read_jsonl(run_dir / "collect" / "dialogs.jsonl")
    rejects = read_jsonl(run_dir / "collect" / "rejects.jsonl")
    teacher = kept + [r["dialog"] for r in rejects if "dialog" in r]
    q = cfg.collect.quality
    qf = QualityFilter.from_config(q, cfg.collect.template)
    rows = []
    for d in teacher:
        t = d["turns"]
        rows.append(
            {
                "seed": d["seed"],
                "copy": qf.copy_score(t),
                "repeat": qf.most_repeated_line(t)[1],
                "echo": qf.echo_score(t)[0],
                "dup": qf.duplicate_of(t, exhaustive=True)[1],
                "turns": t,
            }
        )
        qf.add(t)
    n = len(rows)
    parse_rejects = [r for r in rejects if "dialog" not in r]
    print(
        f"{args.seeds} seeds -> {n} dialogs the parser accepted ({len(parse_rejects)} parse/length rejects); "
        f"kept after the filters: {len(kept)}"
    )
    checks = [
        ("template_copy", "copy", q.copy_overlap),
        ("repetitive", "repeat", q.repeat_lines),
        ("echo", "echo", q.echo_overlap),
        ("near_duplicate", "dup", q.near_duplicate),
    ]
    print(f"{'filter':<15} {'threshold':>9} {'removes':>8} {'share':>6}  score distribution over all {n} dialogs")
    for name, key, thr in checks:
        hit = [r for r in rows if r[key] >= thr]
        print(f"{name:<15} {thr:>9} {len(hit):>8} {len(hit) / max(1, n):>6.1%}  {quantiles([r[key] for r in rows])}")
    survive = [r for r in rows if all(r[key] < thr for _, key, thr in checks)]
    print(
        f"kept with these thresholds: {len(survive)} of {n} ({len(survive) / max(1, n):.0%}); any filter removes "
        f"{n - len(survive)}"
    )
    by_reason: dict[str, int] = {}
    for r in rejects:
        by_reason[r["reason"]] = by_reason.get(r["reason"], 0) + 1
    print("rejects by first reason, as the collection was filtered:", json.dumps(by_reason))
    for name, key, thr in checks:
        hit = [r for r in rows if r[key] >= thr][:2]
        for r in hit:
            text = " / ".join(f"{t['role']}: {t['text'][:70]}" for t in r["turns"][:4])
            print(f"  e.g. {name} ({key}={r[key]:.2f}) seed {r['seed'][:50]!r}: {text}")


if __name__ == "__main__":
    main()
