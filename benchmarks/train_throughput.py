"""Benchmark: LoRA training throughput, ours vs the original Baize recipe, on the same dialogs and model, one run.

- baseline: HF `Trainer`, every example padded (and truncated) to 512 tokens, loss on every token, LoRA r=8,
  batch 4, fp32 — what Baize's finetune script does (minus the 8-bit base, which needs CUDA).
- ours: `baize_exp.training.fit` (Lightning), dialogs packed into 512-token rows with block-diagonal attention, loss on
  the AI turns only, same LoRA, batch 4 rows; `--grouped` adds ours without packing (length-grouped batches),
  `--stock-lora` adds ours with peft's own LoRA forward (and `nn.Dropout`) in place of `train.fused_lora`.

Both train one epoch over the same synthetic Baize-shaped dialogs (seed questions as the human's turns, reference
answers as the AI's). The figure that matters is supervised (AI-turn) tokens per second: what a run teaches the
model per second. MFU counts the model FLOPs of the real tokens (formula in baize_exp/train/module.py) against a
matmul peak probed before and after the runs (the better reading counts); each variant runs in its own subprocess
so its peak memory (max RSS) is its own. SmolLM2-135M on CPU by default; `--model` takes any conf/model option.

    python benchmarks/train_throughput.py [--model smollm2_135m] [--dialogs 32] [--grouped] [--stock-lora]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = ["baseline", "ours_packed", "ours_grouped", "ours_stock_lora"]


def make_dialogs(n: int, seed: int = 0) -> list[dict]:
    """Dialogs shaped like Baize's self-chat data (paper, Table 1: ~3.9 exchanges, responses ~36 tokens): 3-5
    exchanges, the human asks a seed question, the AI answers with the first sentence of a reference answer."""
    from baize_exp.data import SEEDS_DIR, load_eval_questions, load_seed_file

    questions = [s.question for src in ("quora", "stackoverflow", "medical", "alpaca")
                 for s in load_seed_file(SEEDS_DIR / f"{src}.jsonl", src)]
    answers = [q["reference"].split(". ")[0].rstrip(".") + "." for q in load_eval_questions() if q.get("reference")]
    rng = random.Random(seed)
    out = []
    for i in range(n):
        turns = []
        for _ in range(rng.randint(3, 5)):
            turns.append({"role": "human", "text": rng.choice(questions)})
            turns.append({"role": "ai", "text": rng.choice(answers)})
        out.append({"id": f"bench-{i}", "turns": turns})
    return out


def compose(overrides: list[str]):
    from hydra import compose as hcompose
    from hydra import initialize_config_dir

    from baize_exp.config import CONF_DIR, register_configs

    register_configs()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return hcompose(config_name="config", overrides=overrides)


def load(cfg):
    from baize_exp import models as M
    from baize_exp.config import cache_dir

    model, tok = M.load_model_and_tokenizer(cfg.model, cache_dir(cfg))
    torch.manual_seed(0)
    return M.attach_lora(model, cfg.lora), tok


def run_ours(args: argparse.Namespace, peak: float, variant: str) -> dict:
    from baize_exp.training import fit
    from baize_exp.training.module import peak_memory_gb

    out_dir = Path(args.out) / variant
    packing, fused_lora = variant != "ours_grouped", variant != "ours_stock_lora"
    cfg = compose([f"model={args.model}", "logger=none", "trainer.enable_progress_bar=false", "trainer.max_epochs=1",
                   "train.checkpoint_every_n_steps=0", "train.loss_on=ai", f"train.packing={packing}",
                   f"train.fused_lora={fused_lora}",
                   "train.batch_size=4", "train.max_length=512", f"train.peak_flops={peak}",
                   "train.cache_tokenized=false", f"paths.output_dir={out_dir}"])
    pm, tok = load(cfg)
    m = fit(pm, tok, make_dialogs(args.dialogs), [], cfg, out_dir, lr=2e-4, max_epochs=1)
    rank = json.loads((out_dir / "train_rank0.json").read_text())
    return {"steps": m["steps"], "rows": m["train_rows"], "real_tokens": rank["tokens_seen"],
            "supervised_tokens": rank["supervised_seen"], "train_seconds": m["loop_seconds"], "mfu": m["mfu"],
            "peak_mem_gb": peak_memory_gb(torch.device("cpu"))}


def run_baseline(args: argparse.Namespace, peak: float) -> dict:
    """The original recipe: pad/truncate every dialog to 512 tokens, labels = every (non-pad) token."""
    from transformers import Trainer, TrainerCallback, TrainingArguments

    from baize_exp.training.data import IGNORE, tokenize_dialog
    from baize_exp.training.module import flop_counts, model_flops, peak_memory_gb

    cfg = compose([f"model={args.model}", "logger=none"])
    pm, tok = load(cfg)
    width = 512
    rows, ai_tokens, real_tokens, sq = [], 0, 0, 0
    for d in make_dialogs(args.dialogs):
        full = tokenize_dialog(d["turns"], tok, 10**6, "ai")  # the whole Baize text, labels marking the AI's
        ids = full["input_ids"][:width]  # truncation mid-turn, as the original does
        ai_tokens += sum(1 for x in full["labels"][1:width] if x != IGNORE)
        real_tokens += len(ids)
        sq += len(ids) ** 2
        n = len(ids)
        rows.append({"input_ids": ids + [tok.pad_token_id] * (width - n), "attention_mask": [1] * n + [0] * (width - n),
                     "labels": ids + [IGNORE] * (width - n)})

    class Data(torch.utils.data.Dataset):
        def __len__(self) -> int:
            return len(rows)

        def __getitem__(self, i: int) -> dict:
            return {k: torch.tensor(v) for k, v in rows[i].items()}

    class LoopTimer(TrainerCallback):
        def on_train_begin(self, *a, **k):
            self.t0 = time.perf_counter()

        def on_train_end(self, *a, **k):
            self.seconds = time.perf_counter() - self.t0

    timer = LoopTimer()
    targs = TrainingArguments(output_dir=str(Path(args.out) / "baseline"), per_device_train_batch_size=4,
                              num_train_epochs=1, learning_rate=2e-4, logging_steps=10**6, save_strategy="no",
                              report_to=[], use_cpu=True, dataloader_num_workers=0, disable_tqdm=True, seed=0)
    pm.train()
    Trainer(model=pm, args=targs, train_dataset=Data(), callbacks=[timer]).train()
    flops = model_flops(flop_counts(pm), real_tokens, real_tokens, sq)  # its LM head runs on every token
    return {"steps": -(-len(rows) // 4), "rows": len(rows), "real_tokens": real_tokens, "padded_tokens": width * len(rows),
            "supervised_tokens": ai_tokens, "train_seconds": timer.seconds, "mfu": flops / timer.seconds / peak,
            "peak_mem_gb": peak_memory_gb(torch.device("cpu"))}


def child(variant: str, args: argparse.Namespace) -> dict:
    """Run one variant in a fresh interpreter (its own peak RSS); it prints one JSON line last."""
    cmd = [sys.executable, __file__, "--only", variant, "--model", args.model, "--dialogs", str(args.dialogs),
           "--peak", str(args.peak), "--out", args.out]
    r = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    if r.returncode != 0:
        raise SystemExit(f"{variant} failed:\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2_135m")
    ap.add_argument("--dialogs", type=int, default=32)
    ap.add_argument("--grouped", action="store_true", help="also run ours without packing (length-grouped)")
    ap.add_argument("--stock-lora", action="store_true", help="also run ours with peft's own LoRA forward")
    ap.add_argument("--out", default="/tmp/baize_bench_train")
    ap.add_argument("--only", choices=VARIANTS, help=argparse.SUPPRESS)
    ap.add_argument("--peak", type=float, default=0.0, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.only:
        res = run_baseline(args, args.peak) if args.only == "baseline" else run_ours(args, args.peak, args.only)
        print(json.dumps(res, default=str))
        return

    from baize_exp.training.module import measure_matmul_peak

    args.peak = measure_matmul_peak("cpu", torch.float32, seconds=3.0)
    print(f"matmul peak (fp32, 1024^3, best of 3 s): {args.peak / 1e9:.1f} GFLOP/s; {args.dialogs} dialogs, "
          f"model={args.model}, torch threads={torch.get_num_threads()}")
    variants = (["baseline", "ours_packed"] + (["ours_grouped"] if args.grouped else [])
                + (["ours_stock_lora"] if args.stock_lora else []))
    res = {v: child(v, args) for v in variants}
    # a shared machine's speed drifts: probe again after the runs and rate MFU against the better reading, so a
    # slow first probe cannot inflate it
    after = measure_matmul_peak("cpu", torch.float32, seconds=3.0)
    peak = max(args.peak, after)
    for r in res.values():
        r["mfu"] *= args.peak / peak
    print(f"matmul peak after the runs: {after / 1e9:.1f} GFLOP/s; MFU below is against {peak / 1e9:.1f}")
    base = res["baseline"]
    print(f"{'variant':<18} {'steps':>5} {'seconds':>8} {'real tok':>9} {'AI tok':>7} {'tok/s':>7} {'AI tok/s':>9} "
          f"{'MFU':>6} {'peak RSS GB':>11}")
    for v, r in res.items():
        print(f"{v:<18} {r['steps']:>5} {r['train_seconds']:>8.1f} {r['real_tokens']:>9} {r['supervised_tokens']:>7} "
              f"{r['real_tokens'] / r['train_seconds']:>7.1f} {r['supervised_tokens'] / r['train_seconds']:>9.1f} "
              f"{r['mfu']:>6.1%} {r['peak_mem_gb']:>11.2f}")
    for v in variants[1:]:
        ratio = (res[v]["supervised_tokens"] / res[v]["train_seconds"]) / (base["supervised_tokens"] / base["train_seconds"])
        print(f"supervised (AI) tokens/s, {v} / baseline: {ratio:.2f}x (target >= 2x)")


if __name__ == "__main__":
    main()
