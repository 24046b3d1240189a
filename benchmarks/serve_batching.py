"""Benchmark: the local server's continuous batching. 16 concurrent chat requests (up to 64 new tokens each)
against the same model served with max_batch=16 and with max_batch=1 (one request at a time), in one run; prints
tokens/s of both and the ratio. `--mixed` gives every request its own sampling settings (temperature, top_p,
seed, max_tokens), which now share one batch.

    python benchmarks/serve_batching.py [--model smollm2_135m] [--requests 16] [--max-tokens 64] [--mixed]
"""

from __future__ import annotations

import argparse
import json
import os
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import openai

from baize_exp.serve import LocalServer

TOPICS = [
    "sleep",
    "tea",
    "rust",
    "python lists",
    "volcanoes",
    "chess",
    "bread",
    "saving money",
    "jet lag",
    "bees",
    "tides",
    "git rebase",
    "running shoes",
    "the moon",
    "compost",
    "SQL joins",
]


def request_settings(i: int, max_tokens: int, mixed: bool) -> dict:
    if not mixed:
        return dict(temperature=0.0, max_tokens=max_tokens)
    return dict(
        temperature=[0.0, 0.5, 0.8, 1.0][i % 4],
        top_p=[1.0, 0.9, 0.95][i % 3],
        seed=i,
        max_tokens=max_tokens - 8 * (i % 3),
    )


def measure(model: str, max_batch: int, n: int, max_tokens: int, mixed: bool) -> tuple[float, int, float, dict]:
    with LocalServer(
        model, max_batch=max_batch, cache_dir=os.environ.get("BAIZE_CACHE"), request_timeout_s=3600
    ) as srv:  # one at a time, the last request waits long
        client = openai.OpenAI(base_url=srv.base_url, api_key=srv.api_key, max_retries=0, timeout=3600)

        def ask(i: int) -> int:
            r = client.chat.completions.create(
                model="bench",
                messages=[{"role": "user", "content": f"Explain {TOPICS[i % len(TOPICS)]} in a few sentences."}],
                **request_settings(i, max_tokens, mixed),
            )
            return r.usage.completion_tokens

        ask(0)  # warm up
        with ThreadPoolExecutor(n) as pool:
            t0 = time.perf_counter()
            toks = sum(pool.map(ask, range(n)))
            dt = time.perf_counter() - t0
        with urllib.request.urlopen(f"http://127.0.0.1:{srv.port}/health") as r:
            health = json.loads(r.read())
    return toks / dt, toks, dt, health


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2_135m")
    ap.add_argument("--requests", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--mixed", action="store_true", help="different sampling settings per request")
    a = ap.parse_args()
    one = measure(a.model, 1, a.requests, a.max_tokens, a.mixed)
    batched = measure(a.model, a.requests, a.requests, a.max_tokens, a.mixed)
    kind = "mixed sampling settings" if a.mixed else "greedy"
    print(f"{a.requests} concurrent requests, up to {a.max_tokens} new tokens each, {kind}, model {a.model}")
    print(f"max_batch=1 : {one[0]:7.1f} tok/s ({one[1]} tokens in {one[2]:.1f}s)")
    print(
        f"max_batch={a.requests}: {batched[0]:7.1f} tok/s ({batched[1]} tokens in {batched[2]:.1f}s, "
        f"peak {batched[3]['peak_rows']} rows in one step)"
    )
    print(f"ratio batched/one-at-a-time: {batched[0] / one[0]:.2f}x")


if __name__ == "__main__":
    main()
