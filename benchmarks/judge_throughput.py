"""Judge throughput: the eval stage's judge path (build_jobs → run_judge → ChatClient) against a server with fixed
latency, one request at a time vs `judge.concurrency` at once.

The fault server (`python tests/helpers/fault_server.py --latency L --reply "Score: 7"`, its own process so its CPU
is not counted) stands in for GPT-4: every request waits L seconds and gets a parsable verdict. Prompts are the real
judge prompts (the shipped held-out questions, the configured rubric). Prints judgments/s for both, the ratio, and
ours as a fraction of the ideal bound (concurrency / latency). Target: >= 80% of the bound.

    python benchmarks/judge_throughput.py                     # 256 judgments at concurrency 32, 0.5 s latency
    python benchmarks/judge_throughput.py --judgments 512 --concurrency 64 --latency 1.0
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

from hydra import compose, initialize_config_dir

from baize_exp.chat import ChatClient
from baize_exp.config import CONF_DIR, register_configs
from baize_exp.data import load_eval_questions
from baize_exp.stages.evaluate.judge import build_jobs, run_judge

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # the fault server is a test tool, not product code
from helpers.fault_server import spawn  # noqa: E402

KEY_ENV = "BAIZE_BENCH_KEY"


def judge_rate(cfg, base_url: str, jobs: list[dict], concurrency: int) -> tuple[float, int]:
    """(judgments/s, parsed judgments) through the eval stage's own judge path."""
    client = ChatClient(
        base_url,
        os.environ[KEY_ENV],
        "judge-bench",
        max_tokens=cfg.judge.max_tokens,
        concurrency=concurrency,
        timeout_s=60,
        max_retries=2,
        role="judge",
    )
    t0 = time.monotonic()
    records = run_judge(client, "single", jobs, cfg.eval.score_retry)
    dt = time.monotonic() - t0
    return len(records) / dt, sum(r["score"] == 7 for r in records)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--judgments", type=int, default=256)
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--latency", type=float, default=0.5, help="seconds the server takes per request")
    ap.add_argument("--baseline-judgments", type=int, default=8)
    a = ap.parse_args()

    os.environ.setdefault(KEY_ENV, "sk-bench-local-only")
    register_configs()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="config", overrides=["judge=openai"])
    questions = load_eval_questions(cfg.eval.questions, None)
    by_id = {q["question_id"]: q for q in questions}
    answers = [
        {
            "question_id": q["question_id"],
            "category": q["category"],
            "model": f"m{i}",
            "answer": f"An answer of model {i} to: {q['question']}",
        }
        for i in range(a.judgments // len(questions) + 1)
        for q in questions
    ][: a.judgments]
    jobs = build_jobs("single", cfg.eval, by_id, answers)

    with tempfile.TemporaryDirectory(prefix="baize_bench_") as tmp:
        proc, base_url = spawn(a.latency, Path(tmp), KEY_ENV, reply="Score: 7")
        try:
            base_rate, base_ok = judge_rate(cfg, base_url, jobs[: a.baseline_judgments], 1)
            ours_rate, ours_ok = judge_rate(cfg, base_url, jobs, a.concurrency)
        finally:
            proc.terminate()
            proc.wait(10)
    assert base_ok == a.baseline_judgments and ours_ok == len(jobs), "judge replies did not parse"
    bound = a.concurrency / a.latency
    print(f"judge, {a.latency:.2f} s per request, real judge prompts ({len(questions)} held-out questions)")
    print(f"  sequential (concurrency 1, {a.baseline_judgments} judgments): {base_rate:8.2f} judgments/s")
    print(f"  ours (concurrency {a.concurrency}, {len(jobs)} judgments):     {ours_rate:8.2f} judgments/s")
    print(f"  ratio: {ours_rate / base_rate:.1f}x   of the bound ({bound:.0f}/s): {ours_rate / bound:.1%}")


if __name__ == "__main__":
    main()
