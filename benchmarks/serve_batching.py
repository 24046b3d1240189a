"""Benchmark: the local server's batching. 16 concurrent chat requests (up to 64 new tokens each, greedy) against
the same model served with max_batch=16 and with max_batch=1, in one run; prints tokens/s of both and the ratio.

    python benchmarks/serve_batching.py [--model smollm2_135m] [--requests 16] [--max-tokens 64]
"""

from __future__ import annotations

import argparse
import os
import time

from baize_exp.chat import ChatClient, LocalServer

TOPICS = ["sleep", "tea", "rust", "python lists", "volcanoes", "chess", "bread", "saving money", "jet lag",
          "bees", "tides", "git rebase", "running shoes", "the moon", "compost", "SQL joins"]


def measure(model: str, max_batch: int, n: int, max_tokens: int) -> tuple[float, int, float]:
    with LocalServer(model, max_batch=max_batch, cache_dir=os.environ.get("BAIZE_CACHE")) as srv:
        client = ChatClient(srv.base_url, srv.api_key, "bench", temperature=0.0, max_tokens=max_tokens,
                            concurrency=n)
        client.complete([{"role": "user", "content": "warm up"}], max_tokens=4)
        convs = [[{"role": "user", "content": f"Explain {TOPICS[i % len(TOPICS)]} in a few sentences."}]
                 for i in range(n)]
        t0 = time.perf_counter()
        rs = client.complete_many(convs)
        dt = time.perf_counter() - t0
    assert not [r.error for r in rs if r.error]
    toks = sum(r.usage["completion_tokens"] for r in rs)
    return toks / dt, toks, dt


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2_135m")
    ap.add_argument("--requests", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=64)
    a = ap.parse_args()
    one = measure(a.model, 1, a.requests, a.max_tokens)
    batched = measure(a.model, a.requests, a.requests, a.max_tokens)
    print(f"max_batch=1 : {one[0]:7.1f} tok/s ({one[1]} tokens in {one[2]:.1f}s)")
    print(f"max_batch={a.requests}: {batched[0]:7.1f} tok/s ({batched[1]} tokens in {batched[2]:.1f}s)")
    print(f"ratio batched/one-at-a-time: {batched[0] / one[0]:.2f}x")


if __name__ == "__main__":
    main()
