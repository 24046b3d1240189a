"""How close the collect cost estimate (baize_exp.chat.cost) comes to what a collection really uses.

A loopback teacher (the online endpoint of tests/helpers/batch_server.py) answers every request with a reply of
realistic length and vocabulary (`realistic_reply`) and reports usage counted with the real SmolLM2 tokenizer
(prompts through its chat template, as a server counts them), so the estimator's rule of 4 characters a token
is measured against a real tokenizer it does not know. Steps, each through `run.py stages=[collect]` as a user runs it:

1. the cold estimate for all N seeds (template and sampled seeds only, no dialog yet);
2. collect the first `--first` seeds (`data.limit`; into the shared collection of a throwaway cache dir);
3. the refined estimate for the N - first seeds left (calibrated on the finished records, as on a resume);
4. a new run collects all N (the shared collection grows: only the seeds left are asked);
5. compare the refined estimate with the usage the collect stage recorded for the seeds of step 4, and the cold one
   with the whole collection's.

    python benchmarks/cost_estimate.py [--seeds 1000 --first 100 --mode transcript|turns]

Prints one table row per quantity (estimate, actual, error) and writes --out (JSON) if given. The target (issue
26): the refined estimate within 20% of the actual tokens.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from hydra import compose, initialize_config_dir

from baize_exp.chat.cost import estimate_collection
from baize_exp.config import CONF_DIR, register_configs
from baize_exp.data import load_seeds
from baize_exp.data.seeds import SEEDS_DIR
from baize_exp.io import read_jsonl
from baize_exp.models import tokenizer_for_serving

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # the fake endpoint is a test tool, not product code
from helpers.batch_server import BatchServer, realistic_reply  # noqa: E402

KEY_ENV, KEY = "BAIZE_COST_BENCH_KEY", "sk-cost-bench-0123456789abcdef"


def seed_file(path: Path, n: int) -> Path:
    """n distinct seed questions: the shipped samples (800), then variants of them (a follow-on clause)."""
    questions = []
    for p in sorted(SEEDS_DIR.glob("*.jsonl")):
        questions += [json.loads(line)["question"] for line in p.read_text(encoding="utf-8").splitlines()]
    tails = ["Please explain it for a beginner.", "What are the most common mistakes?", "How would an expert see it?"]
    out = list(questions)
    k = 0
    while len(out) < n:
        out.append(f"{questions[k % len(questions)]} {tails[k // len(questions) % len(tails)]}")
        k += 1
    path.write_text("".join(json.dumps({"question": q}) + "\n" for q in out[:n]), encoding="utf-8")
    return path


def overrides(base_url: str, seeds: Path, limit: int, mode: str, run_dir: Path) -> list[str]:
    return [
        "stages=[collect]",
        "teacher=openai",
        f"teacher.base_url={base_url}",
        f"teacher.api_key_env={KEY_ENV}",
        "teacher.model=gpt-4o-mini",
        "teacher.concurrency=16",
        "data=file",
        f"data.path={seeds}",
        f"data.limit={limit}",
        f"collect={mode}",
        "logger=none",
        f"hydra.run.dir={run_dir}",
    ]


def collect(args: list[str], log: Path, cache: Path) -> float:
    t0 = time.monotonic()
    env = {**os.environ, KEY_ENV: KEY, "BAIZE_CACHE": str(cache)}
    with open(log, "ab") as f:
        r = subprocess.run([sys.executable, str(ROOT / "run.py"), *args], stdout=f, stderr=subprocess.STDOUT, env=env)
    if r.returncode != 0:
        raise SystemExit(f"run.py failed ({r.returncode}); see {log}:\n{log.read_text()[-3000:]}")
    return time.monotonic() - t0


def records(store: Path) -> list[dict]:
    return read_jsonl(store / "dialogs.jsonl") + read_jsonl(store / "rejects.jsonl")


def totals(recs: list[dict]) -> dict[str, int]:
    return {
        "requests": sum(r.get("requests", 0) for r in recs),
        "prompt_tokens": sum((r.get("usage") or {}).get("prompt_tokens", 0) for r in recs),
        "completion_tokens": sum((r.get("usage") or {}).get("completion_tokens", 0) for r in recs),
    }


def compare(name: str, est: dict, actual: dict) -> list[dict]:
    rows = []
    est = {**est, "total_tokens": est["prompt_tokens"] + est["completion_tokens"]}
    actual = {**actual, "total_tokens": actual["prompt_tokens"] + actual["completion_tokens"]}
    for k in ("requests", "prompt_tokens", "completion_tokens", "total_tokens"):
        err = (est[k] - actual[k]) / actual[k] if actual[k] else float("nan")
        rows.append({"estimate": name, "quantity": k, "estimated": est[k], "actual": actual[k], "error": err})
        print(f"{name:<8} {k:<18} {est[k]:>12,} {actual[k]:>12,} {err:>+8.1%}", flush=True)
    return rows


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", type=int, default=1000)
    ap.add_argument("--first", type=int, default=100, help="seeds collected before the refined estimate")
    ap.add_argument("--mode", default="transcript", choices=["transcript", "turns"])
    ap.add_argument("--out", type=Path, default=None)
    a = ap.parse_args(argv)
    cache = Path(os.environ.setdefault("BAIZE_CACHE", str(ROOT / ".cache" / "baize")))
    tok = tokenizer_for_serving("tiny", cache)  # the real SmolLM2 tokenizer

    def count_prompt(messages: list[dict]) -> int:
        text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return len(tok(text, add_special_tokens=False).input_ids)

    def count_text(text: str) -> int:
        return len(tok(text, add_special_tokens=False).input_ids)

    work = Path(tempfile.mkdtemp(prefix="cost-bench-"))
    seeds, log, runs_cache = seed_file(work / "seeds.jsonl", a.seeds), work / "run.log", work / "cache"
    register_configs()
    with BatchServer(api_key=KEY, reply=realistic_reply, count_prompt=count_prompt, count_text=count_text) as srv:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            cfg = compose("config", overrides=overrides(srv.base_url, seeds, a.seeds, a.mode, work)[:-1])
        all_seeds = [s.question for s in load_seeds(cfg.data)]
        cold = estimate_collection(all_seeds, cfg.collect, cfg.teacher)
        t_first = collect(overrides(srv.base_url, seeds, a.first, a.mode, work / "run1"), log, runs_cache)
        (store,) = (runs_cache / "collect").iterdir()  # the shared collection both runs grow
        first = records(store)
        done = {r["seed"] for r in first}
        left = [q for q in all_seeds if q not in done]
        t0 = time.monotonic()
        refined = estimate_collection(left, cfg.collect, cfg.teacher, finished=first)
        t_estimate = time.monotonic() - t0
        t_rest = collect(overrides(srv.base_url, seeds, a.seeds, a.mode, work / "run2"), log, runs_cache)
    every = records(store)
    rest = [r for r in every if r["seed"] not in done]
    print("\n".join(refined.lines()))
    print(f"\n{'estimate':<8} {'quantity':<18} {'estimated':>12} {'actual':>12} {'error':>8}")
    rows = compare("refined", refined.as_dict(), totals(rest))
    rows += compare("cold", cold.as_dict(), totals(every))
    worst = max(abs(r["error"]) for r in rows if r["estimate"] == "refined" and r["quantity"] != "requests")
    result = {
        "seeds": a.seeds,
        "first": a.first,
        "mode": a.mode,
        "collected": len(every),
        "rows": rows,
        "refined_worst_token_error": worst,
        "target_met": worst <= 0.2,
        "seconds": {"first_run": t_first, "estimate": t_estimate, "second_run": t_rest},
        "chat_requests": srv.chat_requests,
    }
    print(
        f"\n{len(every)} seeds collected ({srv.chat_requests} requests; run.py {t_first:.1f} s + {t_rest:.1f} s, "
        f"estimate {t_estimate:.2f} s); refined estimate's worst token error {worst:.1%} "
        f"(target <= 20%: {'met' if worst <= 0.2 else 'NOT met'})"
    )
    if a.out:
        a.out.write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
