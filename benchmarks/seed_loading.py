"""Benchmark: reading StackOverflow seeds from a large `Posts.xml`, streamed (ours) vs parsed whole (the naive way).

A `Posts.xml` of `--mb` MB is generated (question and answer rows with HTML bodies, in the dump's attribute layout).
Each side runs in its own subprocess (its own peak RSS), the sides interleaved A, B, A, B:
- ours: `baize_exp.data.sources.stackoverflow` (iterparse, each element cleared) into `sources.sample` (limit 1000);
- naive: `ElementTree.parse` of the whole file, then the same question filter and sample.
Printed: records/s (question rows read per second), peak RSS, and the ratios. Ours' RSS should not grow with the
file; `--naive-mb` caps the file the naive side gets (it needs several times the file in memory).

    python benchmarks/seed_loading.py [--mb 1024] [--naive-mb 256] [--rounds 2]
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

WORDS = [
    "python",
    "list",
    "dict",
    "memory",
    "thread",
    "lock",
    "socket",
    "query",
    "index",
    "join",
    "table",
    "cache",
    "disk",
    "request",
    "error",
    "value",
    "string",
    "parse",
    "file",
    "stream",
    "buffer",
    "timeout",
    "server",
    "client",
    "array",
    "loop",
    "class",
    "method",
]


def generate(path: Path, mb: int, seed: int = 0) -> int:
    """A Posts.xml of about `mb` MB; returns the number of question rows."""
    if path.is_file() and path.stat().st_size >= mb * 2**20:
        return json.loads(path.with_suffix(".json").read_text())["questions"]
    rng = random.Random(seed)
    questions, n = 0, 0
    with open(path, "w", encoding="utf-8") as f:
        f.write('<?xml version="1.0" encoding="utf-8"?>\n<posts>\n')
        while f.tell() < mb * 2**20:
            n += 1
            body = (
                "&lt;p&gt;"
                + " ".join(rng.choices(WORDS, k=rng.randint(20, 80)))
                + "&lt;/p&gt;&#xA;&lt;pre&gt;&lt;code&gt;x = 1&#xA;&lt;/code&gt;&lt;/pre&gt;"
            )
            if rng.random() < 0.4:
                questions += 1
                title = f"How do I {' '.join(rng.choices(WORDS, k=rng.randint(4, 10)))} ({n})?"
                f.write(
                    f'  <row Id="{n}" PostTypeId="1" Score="{rng.randint(0, 99)}" Title="{title}" Body="{body}" />\n'
                )
            else:
                f.write(f'  <row Id="{n}" PostTypeId="2" ParentId="{max(1, n - 3)}" Score="1" Body="{body}" />\n')
        f.write("</posts>\n")
    path.with_suffix(".json").write_text(json.dumps({"questions": questions}))
    return questions


def side(name: str, path: Path) -> dict:
    from baize_exp.data import sources as S

    t0 = time.perf_counter()
    if name == "ours":
        count = [0]

        def counted():
            for q in S.stackoverflow(path, with_body=True):
                count[0] += 1
                yield q

        sample = S.sample(counted(), 1000, seed=0)
        n = count[0]
    else:
        import xml.etree.ElementTree as ET

        root = ET.parse(path).getroot()
        qs = [
            S._so_seed(r.get("Title", ""), r.get("Body"), True)
            for r in root.iter("row")
            if r.get("PostTypeId") == "1" and r.get("Title")
        ]
        n, sample = len(qs), S.sample(qs, 1000, seed=0)
    dt = time.perf_counter() - t0
    return {
        "records": n,
        "seconds": dt,
        "records_per_s": n / dt,
        "sampled": len(sample),
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--mb", type=int, default=1024)
    ap.add_argument("--naive-mb", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--dir", default="/tmp/baize_bench_seeds")
    ap.add_argument("--side", help=argparse.SUPPRESS)
    ap.add_argument("--file", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.side:
        print(json.dumps(side(args.side, Path(args.file))))
        return
    d = Path(args.dir)
    d.mkdir(parents=True, exist_ok=True)
    big, small = d / f"Posts_{args.mb}MB.xml", d / f"Posts_{args.naive_mb}MB.xml"
    t0 = time.perf_counter()
    nq_big, nq_small = generate(big, args.mb), generate(small, args.naive_mb)
    print(
        f"generated {big} ({big.stat().st_size / 2**20:.0f} MB, {nq_big} questions) and {small.name} "
        f"({nq_small} questions) in {time.perf_counter() - t0:.0f} s"
    )

    def run(name: str, path: Path) -> dict:
        r = subprocess.run(
            [sys.executable, __file__, "--side", name, "--file", str(path)], capture_output=True, text=True, check=True
        )
        return json.loads(r.stdout.strip().splitlines()[-1])

    rows: dict[str, list[dict]] = {"naive small": [], "ours small": [], "ours big": []}
    for k in range(args.rounds):
        for label, name, path in (
            ("naive small", "naive", small),
            ("ours small", "ours", small),
            ("ours big", "ours", big),
        ):
            rows[label].append(r := run(name, path))
            print(
                f"  round {k + 1} {label:<12} {r['records_per_s']:>10.0f} records/s  "
                f"peak RSS {r['peak_rss_mb']:>7.0f} MB",
                flush=True,
            )
    best = {k: max(v, key=lambda r: r["records_per_s"]) for k, v in rows.items()}
    print(f"\n{'side':<12} {'file MB':>8} {'records':>9} {'records/s':>10} {'peak RSS MB':>12}")
    for k, r in best.items():
        mb = args.mb if k.endswith("big") else args.naive_mb
        print(f"{k:<12} {mb:>8} {r['records']:>9} {r['records_per_s']:>10.0f} {r['peak_rss_mb']:>12.0f}")
    speed = [
        o["records_per_s"] / n["records_per_s"] for o, n in zip(rows["ours small"], rows["naive small"], strict=True)
    ]
    print(
        f"ours / naive on the {args.naive_mb} MB file: records/s {min(speed):.2f}-{max(speed):.2f}x per round, "
        f"peak RSS {best['ours small']['peak_rss_mb'] / best['naive small']['peak_rss_mb']:.3f}x; ours' peak RSS on "
        f"{args.mb} MB vs {args.naive_mb} MB: "
        f"{best['ours big']['peak_rss_mb'] / best['ours small']['peak_rss_mb']:.2f}x"
    )


if __name__ == "__main__":
    main()
