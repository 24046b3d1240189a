"""Benchmark: SDF candidate sampling. The same prompts (Baize-format, from the shipped Quora seeds) and the same
number of new tokens per candidate (min_new_tokens = max_new_tokens, so no row stops early), sampled the way the
sdf stage does it (`sdf.sample_candidates`: left-padded batches of `--batch-size` prompts, each prompt run once and
its KV cache repeated for `--candidates` rows), against one `generate` per prompt (its candidates through
num_return_sequences). Also shown: batched `generate(num_return_sequences=n)`, which runs each prompt n times, and
(optionally) one `generate` per candidate. Prints new tokens/s of each and the ratios, measured in one run.

    python benchmarks/sdf_sampling.py [--model smollm2_135m] [--prompts 8] [--candidates 4] [--new-tokens 32]
        [--batch-size 8] [--rounds 3] [--threads N] [--skip-per-candidate]
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import torch

from baize_exp.data import SEEDS_DIR, baize_prompt, load_seed_file
from baize_exp.models import generate_texts, load_for_serving
from baize_exp.stages.sdf import sample_candidates


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2_135m")
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--candidates", type=int, default=4)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--batch-size", type=int, default=8, help="prompts per generate call (sdf.batch_size)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch threads; 1 on a machine shared with other jobs (2 oversubscribed threads ran ~30x slower)",
    )
    ap.add_argument("--skip-per-candidate", action="store_true", help="skip the slowest reference loop")
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    model, tok, _ = load_for_serving(
        a.model, None, Path(os.environ.get("BAIZE_CACHE", "~/.cache/baize_exp")).expanduser()
    )
    model.generation_config.min_new_tokens = a.new_tokens  # equal lengths: every row makes exactly new_tokens
    prompts = [baize_prompt(s.question) for s in load_seed_file(SEEDS_DIR / "quora.jsonl")[: a.prompts]]
    kw = dict(temperature=1.0, top_p=0.95)
    tokens = a.prompts * a.candidates * a.new_tokens
    torch.manual_seed(0)
    generate_texts(model, tok, prompts[:2], 4, num_return_sequences=2, **kw)  # warm-up

    # Rounds alternate the two ways, so a change in machine load hits both alike (shared machines are noisy).
    per_prompt = batched = nrs = 0.0
    for r in range(a.rounds):
        per_prompt += timed(
            lambda: [
                generate_texts(model, tok, [p], a.new_tokens, batch_size=1, num_return_sequences=a.candidates, **kw)
                for p in prompts
            ]
        )
        batched += timed(
            lambda: sample_candidates(model, tok, prompts, a.candidates, a.new_tokens, batch_size=a.batch_size, **kw)
        )
        nrs += timed(
            lambda: generate_texts(
                model, tok, prompts, a.new_tokens, num_return_sequences=a.candidates, batch_size=a.batch_size, **kw
            )
        )
        print(
            f"round {r + 1}: one generate per prompt {per_prompt:.1f}s, sdf batched {batched:.1f}s, "
            f"batched without the shared prefill {nrs:.1f}s (cumulative)"
        )
    tokens *= a.rounds
    print(
        f"SmolLM2 CPU ({torch.get_num_threads()} threads): {a.rounds} rounds x {a.prompts} prompts x "
        f"{a.candidates} candidates x {a.new_tokens} new tokens = {tokens} tokens each way"
    )
    print(f"one generate per prompt : {tokens / per_prompt:7.1f} tok/s ({per_prompt:.1f}s)")
    print(
        f"sdf batched ({a.batch_size} prompts/call, prompt run once) : {tokens / batched:7.1f} tok/s ({batched:.1f}s)"
    )
    print(
        f"batched, num_return_sequences (prompt run n times): {tokens / nrs:7.1f} tok/s ({nrs:.1f}s); "
        f"ratio to one per prompt {per_prompt / nrs:.2f}x"
    )
    if not a.skip_per_candidate:
        per_cand = timed(
            lambda: [
                generate_texts(model, tok, [p], a.new_tokens, batch_size=1, **kw)
                for p in prompts
                for _ in range(a.candidates)
            ]
        )
        print(
            f"one generate per candidate (1 round): {tokens / a.rounds / per_cand:7.1f} tok/s ({per_cand:.1f}s); "
            f"batched/that: {per_cand * a.rounds / batched:.2f}x"
        )
    print(f"ratio batched / one-generate-per-prompt: {per_prompt / batched:.2f}x")


if __name__ == "__main__":
    main()
