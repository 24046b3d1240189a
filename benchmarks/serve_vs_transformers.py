"""The project's local server against the library that now does the same job: `transformers serve
--continuous-batching`, on the same model and the same 16-request workload, and what each supports of what the
stages need (n, logprobs/top_logprobs, stop, seed, per-request max_tokens).

    python benchmarks/serve_vs_transformers.py [--rounds 2 --requests 16 --max-tokens 64]

Both servers load the converted SmolLM2-135M-Instruct on this CPU and stay up; the workload alternates between them
(ours, theirs, ours, theirs), so the box's speed drift hits both alike. Greedy, no logprobs (what both accept).
"""

from __future__ import annotations

import argparse
import json
import socket
import subprocess
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import openai

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from baize_exp.config import cache_dir  # noqa: E402
from baize_exp.data import load_eval_questions  # noqa: E402
from baize_exp.models import model_option, resolve_model_dir  # noqa: E402
from baize_exp.serve import LocalServer  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_transformers(model_dir: str, port: int) -> subprocess.Popen:
    exe = Path(sys.executable).parent / "transformers"
    proc = subprocess.Popen(
        [
            str(exe),
            "serve",
            model_dir,
            "--continuous-batching",
            "--device",
            "cpu",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"transformers serve exited: {proc.stderr.read().decode()[-2000:]}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=2):
                return proc
        except OSError:
            time.sleep(0.5)
    proc.kill()
    raise RuntimeError("transformers serve did not come up in 600 s")


def workload(client: openai.OpenAI, model: str, questions: list[str], max_tokens: int) -> tuple[float, int]:
    """All questions at once, greedy; (seconds, completion tokens)."""

    def one(q: str) -> int:
        r = client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": q}], max_tokens=max_tokens, temperature=0
        )
        return r.usage.completion_tokens if r.usage else 0

    t0 = time.monotonic()
    with ThreadPoolExecutor(len(questions)) as pool:
        tokens = sum(pool.map(one, questions))
    return time.monotonic() - t0, tokens


def features(client: openai.OpenAI, model: str) -> dict[str, str]:
    """What the server does with each request feature the stages use: 'yes', or what went wrong."""
    msg = [{"role": "user", "content": "Name three fruits and say why each is healthy."}]
    out = {}

    def probe(name: str, fn) -> None:
        try:
            out[name] = fn()
        except openai.APIStatusError as e:
            out[name] = f"refused (HTTP {e.status_code}: {str(e.message)[:80]})"
        except Exception as e:  # noqa: BLE001 - a probe reports whatever went wrong
            out[name] = f"error ({type(e).__name__}: {str(e)[:80]})"

    def n2() -> str:
        r = client.chat.completions.create(model=model, messages=msg, max_tokens=8, temperature=1.0, n=2)
        return "yes" if len(r.choices) == 2 else f"no ({len(r.choices)} choice)"

    def logprobs() -> str:
        r = client.chat.completions.create(
            model=model, messages=msg, max_tokens=4, temperature=0, logprobs=True, top_logprobs=5
        )
        lp = r.choices[0].logprobs
        ok = lp is not None and lp.content and len(lp.content[0].top_logprobs) == 5
        return "yes" if ok else "no (no logprobs in the reply)"

    def stop() -> str:
        r = client.chat.completions.create(model=model, messages=msg, max_tokens=64, temperature=0, stop=[","])
        text = r.choices[0].message.content or ""
        return "yes" if "," not in text and r.choices[0].finish_reason == "stop" else f"no ({text[:40]!r})"

    def seed() -> str:
        def ask() -> str:
            return (
                client.chat.completions.create(model=model, messages=msg, max_tokens=16, temperature=1.0, seed=1234)
                .choices[0]
                .message.content
                or ""
            )

        alone = [ask(), ask()]
        with ThreadPoolExecutor(4) as pool:  # the same seeded request beside three other sampled ones
            others = [
                pool.submit(
                    client.chat.completions.create,
                    model=model,
                    max_tokens=16,
                    temperature=1.0,
                    messages=[{"role": "user", "content": f"Tell me about the number {k}."}],
                )
                for k in range(3)
            ]
            batched = pool.submit(ask).result()
            for f in others:
                f.result()
        if alone[0] != alone[1]:
            return "no (two seeded requests differ)"
        return "yes" if batched == alone[0] else "alone only (differs inside a batch)"

    def max_tokens() -> str:
        with ThreadPoolExecutor(2) as pool:
            a = pool.submit(client.chat.completions.create, model=model, messages=msg, max_tokens=3, temperature=0)
            b = pool.submit(client.chat.completions.create, model=model, messages=msg, max_tokens=40, temperature=0)
            ra, rb = a.result(), b.result()
        ok = ra.usage.completion_tokens <= 3 and rb.usage.completion_tokens > 3
        return "yes" if ok else f"no ({ra.usage.completion_tokens}, {rb.usage.completion_tokens} tokens)"

    for name, fn in (
        ("n", n2),
        ("logprobs/top_logprobs", logprobs),
        ("stop", stop),
        ("seed", seed),
        ("per-request max_tokens", max_tokens),
    ):
        probe(name, fn)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--requests", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=64)
    a = ap.parse_args()
    model_dir = resolve_model_dir(model_option("smollm2_135m"), cache_dir())
    questions = [q["question"] for q in load_eval_questions()][: a.requests]
    port = free_port()
    theirs_proc = start_transformers(model_dir, port)
    try:
        with LocalServer("smollm2_135m", cache_dir=cache_dir(), max_batch=a.requests) as ours:
            servers = {
                "ours (baize_exp.serve)": (
                    openai.OpenAI(base_url=ours.base_url, api_key=ours.api_key, max_retries=0, timeout=None),
                    "smollm2-135m-instruct",
                ),
                "transformers serve --continuous-batching": (
                    openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0, timeout=None),
                    model_dir,
                ),
            }
            for client, model in servers.values():  # warm-up: first requests load kernels and caches
                workload(client, model, questions[:2], 4)
            runs: dict[str, list[tuple[float, int]]] = {name: [] for name in servers}
            for _ in range(a.rounds):
                for name, (client, model) in servers.items():
                    runs[name].append(workload(client, model, questions, a.max_tokens))
                    print(
                        json.dumps(
                            {
                                "server": name,
                                "seconds": round(runs[name][-1][0], 2),
                                "completion_tokens": runs[name][-1][1],
                            }
                        ),
                        flush=True,
                    )
            feats = {name: features(client, model) for name, (client, model) in servers.items()}
    finally:
        theirs_proc.terminate()
        theirs_proc.wait(timeout=60)
    print(
        f"\n| server | {a.requests} requests x <= {a.max_tokens} new tokens, greedy: completion tok/s per round "
        f"| mean |"
    )
    print("|---|---|---|")
    for name, rs in runs.items():
        rates = [tok / s for s, tok in rs]
        print(f"| {name} | {', '.join(f'{r:.1f}' for r in rates)} | {sum(rates) / len(rates):.1f} |")
    names = list(feats)
    print("\n| what the stages send | " + " | ".join(names) + " |")
    print("|---|" + "---|" * len(names))
    for feature in feats[names[0]]:
        print(f"| {feature} | " + " | ".join(feats[n][feature] for n in names) + " |")


if __name__ == "__main__":
    main()
