"""Benchmark: one server holding the base once with every adapter (what `baize-chat` runs) against one raw server
per model (`baize-serve --model M [--adapter DIR]`, three processes for base, v1 and v2). Measures each side's
resident memory after warm-up and the time to first token of a streamed answer: one request alone, and three at
once (one per model, as the page's three panes ask), interleaved A, B, A, B over the rounds.

    python benchmarks/chat_memory.py [--model smollm2_135m] [--rounds 5] [--max-tokens 16]

The two LoRA adapters (r=8 on every projection, like lora=default) get random non-zero weights, so each model
answers differently; v1 is in the Baize format, v2 in the chat template, as a run's would be.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import openai

from baize_exp.serve import LocalServer

PROMPTS = ["How do I keep basil alive indoors?", "What is a good first programming language?", "Why do cats purr?"]


def make_adapters(model: str, out: Path) -> dict[str, Path]:
    import torch
    from peft import LoraConfig, get_peft_model

    from baize_exp.config import cache_dir
    from baize_exp.models import load_for_serving
    from baize_exp.training import CHAT_TEMPLATE_FORMAT, PROMPT_FORMAT

    adapters = {}
    for seed, (name, fmt) in enumerate([("v1", PROMPT_FORMAT), ("v2", CHAT_TEMPLATE_FORMAT)], start=1):
        net, _, _ = load_for_serving(model, None, cache_dir())
        targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
        torch.manual_seed(seed)
        lora = LoraConfig(r=8, lora_alpha=16, target_modules=targets, init_lora_weights=False)
        peft = get_peft_model(net, lora)
        for n, p in peft.named_parameters():
            if "lora_" in n:  # small, like a trained adapter's update, not peft's unit-scale random init
                p.data.mul_(0.05)
        peft.save_pretrained(out / name)
        (out / name / "prompt_format.json").write_text(json.dumps(fmt))
        adapters[name] = out / name
    return adapters


def rss_mib(server: LocalServer) -> float:
    """Resident memory of the server process (VmRSS), MiB."""
    for line in Path(f"/proc/{server.proc.pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def ttft(server: LocalServer, model: str, prompt: str, max_tokens: int) -> float:
    """Seconds from sending a streamed request to its first non-empty content delta."""
    client = openai.OpenAI(base_url=server.base_url, api_key=server.api_key, max_retries=0, timeout=600)
    t0 = time.perf_counter()
    first = None
    stream = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": prompt}], max_tokens=max_tokens, temperature=0, stream=True
    )
    for chunk in stream:
        if first is None and chunk.choices and chunk.choices[0].delta.content:
            first = time.perf_counter() - t0
    return first if first is not None else float("nan")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2_135m")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--max-tokens", type=int, default=16)
    args = ap.parse_args()
    cache = os.environ.get("BAIZE_CACHE")
    tmp = Path(tempfile.mkdtemp(prefix="chat_memory_"))
    adapters = make_adapters(args.model, tmp)
    raw = {
        "base": LocalServer(args.model, cache_dir=cache, served_name="base"),
        "v1": LocalServer(args.model, adapter=str(adapters["v1"]), cache_dir=cache, served_name="v1"),
        "v2": LocalServer(args.model, adapter=str(adapters["v2"]), cache_dir=cache, served_name="v2"),
    }
    multi = LocalServer(
        args.model, adapter=[f"{n}={p}" for n, p in adapters.items()], cache_dir=cache, served_name="base"
    )
    for s in [*raw.values(), multi]:
        s.start()
    try:
        for name, s in raw.items():  # warm-up: every model answers once on both sides
            ttft(s, name, PROMPTS[0], 4)
            ttft(multi, name, PROMPTS[0], 4)
        memory = {"raw_base": rss_mib(raw["base"]), "raw_three": sum(rss_mib(s) for s in raw.values())}
        memory["one_process"] = rss_mib(multi)
        alone: dict[str, list[float]] = {"raw": [], "one_process": []}
        three: dict[str, list[float]] = {"raw": [], "one_process": []}
        for r in range(args.rounds):
            prompt = PROMPTS[r % len(PROMPTS)]
            for name in raw:  # one request alone, A then B
                alone["raw"].append(ttft(raw[name], name, prompt, args.max_tokens))
                alone["one_process"].append(ttft(multi, name, prompt, args.max_tokens))
            with ThreadPoolExecutor(3) as pool:  # three panes at once: three processes vs one batch of three
                names = list(raw)
                three["raw"] += list(
                    pool.map(ttft, [raw[n] for n in names], names, [prompt] * 3, [args.max_tokens] * 3)
                )
                three["one_process"] += list(pool.map(ttft, [multi] * 3, names, [prompt] * 3, [args.max_tokens] * 3))
        memory["one_process_after"] = rss_mib(multi)
        memory["raw_three_after"] = sum(rss_mib(s) for s in raw.values())
    finally:
        for s in [*raw.values(), multi]:
            s.stop()
    result = {
        "model": args.model,
        "rounds": args.rounds,
        "rss_mib": {k: round(v, 1) for k, v in memory.items()},
        "ttft_s_median": {
            "alone": {k: round(statistics.median(v), 3) for k, v in alone.items()},
            "three_at_once": {k: round(statistics.median(v), 3) for k, v in three.items()},
        },
    }
    print(json.dumps(result, indent=2))
    m = result["rss_mib"]
    print(
        f"memory: one process {m['one_process']:.0f} MiB vs one raw server {m['raw_base']:.0f} MiB "
        f"(x{m['one_process'] / m['raw_base']:.2f}) vs three raw servers {m['raw_three']:.0f} MiB "
        f"(x{m['one_process'] / m['raw_three']:.2f})"
    )
    for k, v in result["ttft_s_median"].items():
        print(
            f"TTFT {k}: one process {v['one_process']:.3f} s, raw {v['raw']:.3f} s (x{v['one_process'] / v['raw']:.2f})"
        )


if __name__ == "__main__":
    main()
