"""Collect throughput: the original Baize collector's loop vs our engine, against a server with fixed latency.

The fault server (`python tests/helpers/fault_server.py --latency L`, its own process so its CPU is not counted)
answers every request after L seconds. (a) baseline: what Baize's collector did, one request at a time and a 1 s
sleep after each (measured on fewer dialogs: its rate does not depend on how many); (b) ours: `collect()` with the
real config (`teacher=openai` pointed at the server), `teacher.concurrency` at once, writing dialogs.jsonl.
Prints dialogs/s for both, the ratio, ours as a fraction of the ideal bound (concurrency / latency), and the
engine's CPU per dialog (this process's CPU time during `collect`, the openai client's included).

    python benchmarks/collect_throughput.py                    # 512 dialogs at concurrency 64, 1 s latency
    python benchmarks/collect_throughput.py --dialogs 128 --baseline-dialogs 4
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys
import tempfile
import time
from pathlib import Path

import openai
from hydra import compose, initialize_config_dir

from baize_exp.chat import ChatClient
from baize_exp.config import CONF_DIR, register_configs, validate
from baize_exp.data import load_seeds, parse_transcript
from baize_exp.stages.collect import collect

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # the fault server is a test tool, not product code
from helpers.fault_server import spawn  # noqa: E402

KEY_ENV = "BAIZE_BENCH_KEY"


def baseline(base_url: str, template: str, questions: list[str], sleep_s: float) -> float:
    """The original collector's loop: one request, parse, sleep, next. Returns dialogs/s."""
    client = openai.OpenAI(base_url=base_url, api_key=os.environ[KEY_ENV], max_retries=0)
    t0 = time.monotonic()
    ok = 0
    for q in questions:
        r = client.chat.completions.create(
            model="gpt-3.5-turbo",
            max_tokens=512,
            temperature=0.7,
            messages=[{"role": "user", "content": template.format(seed=q)}],
        )
        ok += parse_transcript(r.choices[0].message.content, q).turns is not None
        time.sleep(sleep_s)
    assert ok == len(questions), "the baseline's dialogs did not parse"
    return ok / (time.monotonic() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dialogs", type=int, default=512)
    ap.add_argument("--concurrency", type=int, default=64)
    ap.add_argument("--latency", type=float, default=1.0, help="seconds the server takes per request")
    ap.add_argument("--baseline-dialogs", type=int, default=8)
    ap.add_argument("--baseline-sleep", type=float, default=1.0)
    a = ap.parse_args()

    os.environ.setdefault(KEY_ENV, "sk-bench-local-only")
    register_configs()
    with tempfile.TemporaryDirectory(prefix="baize_bench_") as tmp:
        work = Path(tmp)
        proc, base_url = spawn(a.latency, work, KEY_ENV)
        try:
            with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
                cfg = compose(
                    config_name="config",
                    overrides=[
                        "teacher=openai",
                        f"teacher.base_url={base_url}",
                        f"teacher.api_key_env={KEY_ENV}",
                        f"teacher.concurrency={a.concurrency}",
                        f"data.limit={a.dialogs}",
                        "logger=none",
                        f"paths.output_dir={work}",
                    ],
                )
            validate(cfg)
            seeds = load_seeds(cfg.data)
            if len(seeds) < a.dialogs:  # more than the shipped sets hold: number the questions apart
                seeds = [
                    type(s)(f"{s.id}-{i}", s.source, f"{s.question} (#{i})")
                    for i, s in enumerate(itertools.islice(itertools.cycle(seeds), a.dialogs))
                ]

            base_rate = baseline(
                base_url, cfg.collect.template, [s.question for s in seeds[: a.baseline_dialogs]], a.baseline_sleep
            )

            client = ChatClient.from_config(cfg.teacher)
            m = collect(seeds, client, cfg.collect, cfg.teacher, work / "collect")
        finally:
            proc.terminate()
            proc.wait()

    assert m["new_dialogs"] == a.dialogs, m
    ours = m["dialogs_per_s"]
    bound = a.concurrency / a.latency
    cpu_ms = 1000 * m["cpu_seconds"] / m["new_dialogs"]
    print(f"\nlatency {a.latency:g} s/request, {a.dialogs} dialogs, concurrency {a.concurrency}")
    print(
        f"baseline (sequential + {a.baseline_sleep:g} s sleep, {a.baseline_dialogs} dialogs): {base_rate:.3f} dialogs/s"
    )
    print(
        f"ours (collect, concurrency {a.concurrency}): {ours:.2f} dialogs/s in {m['seconds']:.1f} s, "
        f"{m['requests']} requests, {m['retries']} retries"
    )
    print(f"ratio: {ours / base_rate:.1f}x the baseline (target >= 30x)")
    print(f"fraction of the ideal bound {bound:g} dialogs/s: {ours / bound:.1%} (target >= 80%)")
    print(f"engine CPU: {cpu_ms:.2f} ms per dialog (target < 5 ms)")


if __name__ == "__main__":
    main()
