"""Collect at scale: peak memory and time of the whole collect stage at 20k and 200k dialogs (1M with --sizes),
this code against a baseline revision, interleaved size by size; and training-data tokenization at 100k dialogs.

Collection. Each run is `python run.py stages=[collect] teacher=openai data=file ...` as a user runs it (seeds
loaded, collected against a loopback teacher, quality filters, the run's copy, the data card), in its own process
so its peak RSS (`ru_maxrss`) is its own. The teacher is the fault server (tests/helpers/fault_server.py) in a
process of its own, answering after `--latency` seconds with a transcript of realistic length and vocabulary
(`realistic_reply`: 2-4 exchanges, about 1.3 KB of JSONL a dialog). The baseline is the same command on another
revision's source (`--baseline-rev`; ours is `--ours-rev`, both unpacked with `git archive`, so the measured code
is committed code), run right before ours at each size. Then a rerun of the finished
collection from a new run dir (nothing left to ask: resume, filters, copy, card). Printed per size and side: wall
time, CPU, peak RSS; then the slope (peak RSS growth per dialog between the sizes) and what it predicts at 1M.

Tokenization (`--tokenize N`, default 100k): N dialogs of the collection (repeated if it has fewer) through the
train stage's data preparation (`training.data.encode_dialogs` into the cache, then `DialogDataModule` with
packing) in a fresh process each: the baseline revision's, ours, and ours again (the cache reused).

    python benchmarks/collect_scale.py                                   # 20k and 200k, tokenize 100k
    python benchmarks/collect_scale.py --sizes 2000 20000 --tokenize 10000 --baseline-rev 9aaf0cd --ours-rev HEAD
    python benchmarks/collect_scale.py --sizes 1000000 --no-baseline --tokenize 0

Writes --out (JSON, after every row) if given. Target (issue 26): at most 1.5 GB peak RSS for 1M dialogs.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
KEY_ENV, KEY = "BAIZE_SCALE_BENCH_KEY", "sk-scale-bench-0123456789abcdef"
# the revision before the bounded-memory change (issue 26, part 1)
BASELINE_REV = "9aaf0cd"


def serve(port_file: str, latency: float) -> None:
    """The loopback teacher (a process of its own): the fault server with realistic transcripts."""
    sys.path.insert(0, str(ROOT / "tests"))
    from helpers.batch_server import realistic_reply
    from helpers.fault_server import FaultServer

    srv = FaultServer(latency_s=latency, api_key=os.environ[KEY_ENV], reply=realistic_reply)
    asyncio.run(srv.serve(port_file))


def start_server(work: Path, latency: float) -> tuple[subprocess.Popen, str]:
    port_file = work / "port"
    cmd = [sys.executable, __file__, "--serve", str(port_file), "--latency", str(latency)]
    proc = subprocess.Popen(cmd, env={**os.environ, KEY_ENV: KEY})
    for _ in range(400):
        if port_file.is_file() and port_file.read_text():
            return proc, f"http://127.0.0.1:{port_file.read_text()}/v1"
        time.sleep(0.05)
    proc.kill()
    raise RuntimeError("the loopback teacher did not start")


def seed_file(path: Path, n: int) -> None:
    """n distinct questions: the shipped samples with a numbered clause (realistic length, no repeats)."""
    from baize_exp.data.seeds import SEEDS_DIR

    base = []
    for p in sorted(SEEDS_DIR.glob("*.jsonl")):
        base += [json.loads(line)["question"] for line in p.read_text(encoding="utf-8").splitlines()]
    with open(path, "w", encoding="utf-8") as f:
        for i in range(n):
            f.write(json.dumps({"question": f"{base[i % len(base)]} (case {i})"}) + "\n")


def measured(cmd: list[str], env: dict, cwd: Path) -> dict:
    """Run `cmd` in a child of a fresh process: wall seconds, the child's CPU seconds and peak RSS (MB)."""
    probe = (
        "import json, resource, subprocess, sys, time\n"
        "t = time.monotonic()\n"
        "r = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)\n"
        "u = resource.getrusage(resource.RUSAGE_CHILDREN)\n"
        "print(json.dumps({'rc': r.returncode, 'wall_s': time.monotonic() - t, 'cpu_s': u.ru_utime + u.ru_stime,"
        " 'peak_rss_mb': u.ru_maxrss / 1024, 'err': r.stderr[-1500:]}))\n"
    )
    out = subprocess.run([sys.executable, "-c", probe, *cmd], env=env, cwd=cwd, capture_output=True, text=True)
    res = json.loads(out.stdout.strip().splitlines()[-1])
    if res["rc"] != 0:
        raise RuntimeError(f"{' '.join(cmd[:4])} ... failed (exit {res['rc']}): {res['err']}")
    return res


def source_tree(rev: str, work: Path) -> Path:
    """The package at `rev`, unpacked from git (the baseline's code, run with PYTHONPATH pointing at it)."""
    dest = work / f"src-{rev.replace('~', '_')}"
    if not dest.is_dir():
        dest.mkdir(parents=True)
        archive = subprocess.run(["git", "archive", rev], cwd=ROOT, capture_output=True, check=True).stdout
        subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)
    return dest


def collect_cmd(src: Path, base_url: str, seeds: Path, n: int, run_dir: Path, concurrency: int) -> list[str]:
    return [
        sys.executable,
        str(src / "run.py"),
        "stages=[collect]",
        "logger=none",
        "teacher=openai",
        f"teacher.base_url={base_url}",
        f"teacher.api_key_env={KEY_ENV}",
        f"teacher.concurrency={concurrency}",
        "teacher.max_retries=5",
        "data=file",
        f"data.path={seeds}",
        f"data.limit={n}",
        "collect.samples_to_log=0",
        f"hydra.run.dir={run_dir}",
    ]


def tokenize_child(src: str, dialogs: str, n: int, cache: str, out: str) -> None:
    """In a fresh process: the train stage's data preparation on n dialogs (the module of `src`)."""
    sys.path.insert(0, src)
    from baize_exp.io import read_jsonl
    from baize_exp.models import tokenizer_for_serving
    from baize_exp.training.data import DialogDataModule

    base = read_jsonl(dialogs)
    ds = [{**base[i % len(base)], "id": f"d{i}"} for i in range(n)]
    tok = tokenizer_for_serving("smollm2_135m", Path(os.environ["BAIZE_CACHE"]))
    t = time.monotonic()
    dm = DialogDataModule(ds[: n - n // 10], ds[n - n // 10 :], tok, 512, 4, packing=True, cache=Path(cache))
    rows = len(dm.train_set)
    Path(out).write_text(
        json.dumps({"seconds": time.monotonic() - t, "rows": rows, "examples": len(dm.train_examples)})
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[20_000, 200_000])
    ap.add_argument("--latency", type=float, default=0.05, help="seconds the teacher takes per request")
    ap.add_argument("--concurrency", type=int, default=64)
    ap.add_argument("--baseline-rev", default=BASELINE_REV)
    ap.add_argument("--ours-rev", default="HEAD", help="the revision measured as ours (committed code only)")
    ap.add_argument("--no-baseline", action="store_true")
    ap.add_argument("--tokenize", type=int, default=100_000, help="dialogs to tokenize (0: skip)")
    ap.add_argument("--work", default=None, help="keep the work files here (default: a temp dir)")
    ap.add_argument("--out", default=None)
    ap.add_argument("--serve", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--tokenize-child", nargs=5, default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.serve:
        return serve(a.serve, a.latency)
    if a.tokenize_child:
        src, dialogs, n, cache, out = a.tokenize_child
        return tokenize_child(src, dialogs, int(n), cache, out)

    work = Path(a.work or tempfile.mkdtemp(prefix="baize_scale_"))
    work.mkdir(parents=True, exist_ok=True)
    env = {
        **os.environ,
        KEY_ENV: KEY,
        "BAIZE_CACHE": str(work / "cache"),
        "HF_HUB_OFFLINE": "1",
        "TQDM_DISABLE": "1",
    }
    revs = {"baseline": a.baseline_rev, "ours": a.ours_rev}
    revs = {
        k: subprocess.run(
            ["git", "rev-parse", "--short", v], cwd=ROOT, capture_output=True, text=True, check=True
        ).stdout.strip()
        for k, v in revs.items()
    }
    sides = {side: source_tree(rev, work) for side, rev in revs.items() if not (a.no_baseline and side == "baseline")}
    seeds = work / "seeds.jsonl"
    seed_file(seeds, max(a.sizes))
    results: dict = {"args": vars(a), "revisions": revs, "collect": {}, "tokenize": {}}
    print(f"revisions: {revs}", flush=True)

    def save() -> None:
        if a.out:
            Path(a.out).write_text(json.dumps(results, indent=2))

    proc, base_url = start_server(work, a.latency)
    try:
        for n in sorted(a.sizes):
            for side, src in sides.items():  # interleaved: baseline then ours at each size
                side_env = {**env, "PYTHONPATH": str(src), "BAIZE_CACHE": str(work / f"cache-{side}")}
                run_dir = work / f"{side}-{n}"
                r = measured(collect_cmd(src, base_url, seeds, n, run_dir, a.concurrency), side_env, src)
                again = measured(
                    collect_cmd(src, base_url, seeds, n, work / f"{side}-{n}-rerun", a.concurrency), side_env, src
                )
                m = json.loads((run_dir / "metrics.json").read_text())["collect"]
                r.update(rerun_s=again["wall_s"], rerun_peak_rss_mb=again["peak_rss_mb"], dialogs=m["dialogs"])
                r.update(new_dialogs=m["new_dialogs"], rejects=m["rejects"], requests=m["requests"])
                results["collect"].setdefault(side, {})[n] = r
                save()
                print(
                    f"{side:>8} {n:>9,} dialogs: {r['wall_s']:7.1f} s wall, {r['cpu_s']:7.1f} s CPU "
                    f"({1000 * r['cpu_s'] / n:.2f} ms/dialog), peak RSS {r['peak_rss_mb']:7.0f} MB; "
                    f"{m['dialogs']:,} kept, {m['rejects']:,} rejects; rerun {again['wall_s']:.1f} s, "
                    f"{again['peak_rss_mb']:.0f} MB",
                    flush=True,
                )
    finally:
        proc.terminate()
        proc.wait()

    sizes = sorted(a.sizes)
    if len(sizes) > 1:
        lo, hi = sizes[0], sizes[-1]
        for side, rows in results["collect"].items():
            slope = (rows[hi]["peak_rss_mb"] - rows[lo]["peak_rss_mb"]) * 1e6 / (hi - lo)
            at_1m = rows[hi]["peak_rss_mb"] + slope * (1_000_000 - hi) / 1e6
            results.setdefault("slope_bytes_per_dialog", {})[side] = slope
            print(f"{side:>8}: peak RSS grows {slope:,.0f} bytes a dialog ({lo:,} -> {hi:,}); at 1M: ~{at_1m:,.0f} MB")
        save()

    if a.tokenize:
        dialogs = work / f"ours-{sizes[-1]}" / "collect" / "dialogs.jsonl"
        for side, src in [*sides.items(), ("ours, cache reused", sides["ours"])]:
            cache, out = work / f"tok-cache-{side.split(',')[0]}", work / "tokenize.json"
            cmd = [sys.executable, __file__, "--tokenize-child", str(src), str(dialogs), str(a.tokenize), str(cache)]
            child_env = {**env, "PYTHONPATH": str(src), "BAIZE_CACHE": str(ROOT / ".cache" / "baize")}
            r = measured([*cmd, str(out)], child_env, ROOT)
            r.update(json.loads(out.read_text()))
            results["tokenize"][side] = r
            save()
            print(
                f"tokenize {a.tokenize:,} dialogs, {side}: {r['seconds']:.1f} s preparing the data "
                f"({r['examples']:,} examples, {r['rows']:,} packed rows), {r['wall_s']:.1f} s in all, "
                f"peak RSS {r['peak_rss_mb']:.0f} MB",
                flush=True,
            )


if __name__ == "__main__":
    main()
