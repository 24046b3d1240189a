"""What the judge check costs on the embedded judge, by its size: `eval.judge_check` questions (3 known-order items
each in single mode: the good answer judged once, each degraded copy once), sent through the eval stage's own
judge path (`_judge_check_jobs` -> `run_judge`) to the local server the default run starts, without the judge cache.
Sizes are interleaved (A, B, C, A, B, C) so the box's drift falls on all of them; prints seconds per size, per
request, and how many items the strict judge could read against the minimum of `stats.MIN_CHECK_PARSED`.

    python benchmarks/judge_check_cost.py [--sizes 8 10 12] [--rounds 2] [--fallbacks]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from helpers.config import compose_cfg  # noqa: E402

from baize_exp import stats as S  # noqa: E402
from baize_exp.config import cache_dir  # noqa: E402
from baize_exp.serve import Backends  # noqa: E402
from baize_exp.stages.evaluate import reliability as R  # noqa: E402
from baize_exp.stages.evaluate.judge import run_judge  # noqa: E402
from baize_exp.stages.evaluate.stage import _judge_check_jobs  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[8, 10, 12], help="eval.judge_check values")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--fallbacks", action="store_true", help="also read replies tolerantly and from logprobs")
    a = ap.parse_args()
    cfg = compose_cfg(["logger=none"])
    e = cfg.eval
    fallbacks = ("tolerant", "logprob") if a.fallbacks else tuple(e.judge_fallbacks)
    seconds: dict[int, list[float]] = {n: [] for n in a.sizes}
    readable: dict[int, tuple[int, int, int]] = {}  # (items readable, items, requests sent)
    with tempfile.TemporaryDirectory() as tmp:
        backends = Backends(cfg, Path(tmp), cache_dir(cfg))
        try:
            client = backends.client("judge")  # starts the local server (its start-up is not timed)
            for r in range(a.rounds):
                for n in a.sizes:
                    ec = e.copy()
                    ec.judge_check = n
                    jobs = _judge_check_jobs(ec, {})
                    t0 = time.monotonic()
                    recs = run_judge(
                        client, "single", jobs, e.score_retry, logprobs=e.judge_logprobs, fallbacks=fallbacks
                    )
                    seconds[n].append(time.monotonic() - t0)
                    c = S.judge_check_clustered(R.check_records("single", recs))
                    sent = len(jobs) + sum("judge_reply_retry" in x for x in recs)  # an unreadable reply: once more
                    readable[n] = (c["n"], c["total"], sent)
                    print(
                        f"round {r} judge_check={n}: {sent} requests, {seconds[n][-1]:.1f} s, "
                        f"{c['n']} of {c['total']} items readable ({c['status']})",
                        flush=True,
                    )
        finally:
            backends.close()
    print("\n| eval.judge_check | requests | seconds (median) | s/request | items readable | minimum |")
    print("|---|---|---|---|---|---|")
    for n in a.sizes:
        med = statistics.median(seconds[n])
        reqs = readable[n][2]
        print(
            f"| {n} | {reqs} | {med:.1f} | {med / reqs:.2f} | {readable[n][0]} of {readable[n][1]} | "
            f"{S.MIN_CHECK_PARSED} |"
        )


if __name__ == "__main__":
    main()
