"""Benchmark: LoRA training throughput, ours vs the original Baize recipe, on the same dialogs and model, one run.

- baseline: HF `Trainer`, every example padded (and truncated) to 512 tokens, loss on every token, LoRA r=8,
  batch 4, fp32 — what Baize's finetune script does (minus the 8-bit base, which needs CUDA).
- ours: `baize_exp.training.fit` (Lightning), dialogs packed into 512-token rows with block-diagonal attention, loss on
  the AI turns only, same LoRA, batch 4 rows; `--grouped` adds ours without packing (length-grouped batches),
  `--stock-lora` adds ours with peft's own LoRA forward (and `nn.Dropout`) in place of `train.fused_lora`.

- trl (`--trl`, needs the `bench` extra): TRL's `SFTTrainer`, what a practitioner would pick today, with packing
  (best-fit decreasing into 512-token rows, padding-free, 4 rows a batch) and assistant-only loss: the dialogs are
  tokenized by our `tokenize_dialog` and handed over with TRL's `assistant_masks` column, so it trains on exactly
  our labels (TRL's chat-template route to assistant masks needs generation tags the Baize format has no template
  for).

The sides run interleaved, round by round (baseline, ours, trl, baseline, ours, trl, ...: `--rounds`), each in its
own subprocess, because this box's speed drifts within minutes: run one after the other, a 2.2x speed-up of the
machine between them once showed up as an 8.35x "gain". Ratios are taken within a round, then their median.

Both train one epoch over the same synthetic Baize-shaped dialogs (seed questions as the human's turns, reference
answers as the AI's). The figure that matters is supervised (AI-turn) tokens per second: what a run teaches the
model per second. MFU counts the model FLOPs of the real tokens (formula in baize_exp/train/module.py) against a
matmul peak probed before and after the runs (the better reading counts); each variant runs in its own subprocess
so its peak memory (max RSS) is its own. SmolLM2-135M on CPU by default; `--model` takes any conf/model option.

    python benchmarks/train_throughput.py [--model smollm2_135m] [--dialogs 32] [--rounds 2] [--trl]
                                          [--grouped] [--stock-lora]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = ["baseline", "ours_packed", "trl_sft", "ours_grouped", "ours_stock_lora"]


def make_dialogs(n: int, seed: int = 0) -> list[dict]:
    """Dialogs shaped like Baize's self-chat data (paper, Table 1: ~3.9 exchanges, responses ~36 tokens): 3-5
    exchanges, the human asks a seed question, the AI answers with the first sentence of a reference answer."""
    from baize_exp.data import SEEDS_DIR, load_eval_questions, load_seed_file

    questions = [
        s.question
        for src in ("quora", "stackoverflow", "medical", "alpaca")
        for s in load_seed_file(SEEDS_DIR / f"{src}.jsonl", src)
    ]
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


def loop_timer():
    """A Trainer callback timing the training loop alone (as ours reports `loop_seconds`)."""
    from transformers import TrainerCallback

    class LoopTimer(TrainerCallback):
        def on_train_begin(self, *a, **k):
            self.t0 = time.perf_counter()

        def on_train_end(self, *a, **k):
            self.seconds = time.perf_counter() - self.t0

    return LoopTimer()


def run_ours(args: argparse.Namespace, peak: float, variant: str) -> dict:
    from baize_exp.training import fit
    from baize_exp.training.module import peak_memory_gb

    out_dir = Path(args.out) / variant
    packing, fused_lora = variant != "ours_grouped", variant != "ours_stock_lora"
    cfg = compose(
        [
            f"model={args.model}",
            "logger=none",
            "trainer.enable_progress_bar=false",
            "trainer.max_epochs=1",
            "train.checkpoint_every_n_steps=0",
            "train.loss_on=ai",
            f"train.packing={packing}",
            f"train.fused_lora={fused_lora}",
            "train.batch_size=4",
            "train.max_length=512",
            f"train.peak_flops={peak}",
            "train.cache_tokenized=false",
            f"paths.output_dir={out_dir}",
        ]
    )
    pm, tok = load(cfg)
    m = fit(pm, tok, make_dialogs(args.dialogs), [], cfg, out_dir, lr=2e-4, max_epochs=1)
    rank = json.loads((out_dir / "train_rank0.json").read_text())
    return {
        "steps": m["steps"],
        "rows": m["train_rows"],
        "real_tokens": rank["tokens_seen"],
        "supervised_tokens": rank["supervised_seen"],
        "train_seconds": m["loop_seconds"],
        "mfu": m["mfu"],
        "peak_mem_gb": peak_memory_gb(torch.device("cpu")),
    }


def run_baseline(args: argparse.Namespace, peak: float) -> dict:
    """The original recipe: pad/truncate every dialog to 512 tokens, labels = every (non-pad) token."""
    from transformers import Trainer, TrainingArguments

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
        rows.append(
            {
                "input_ids": ids + [tok.pad_token_id] * (width - n),
                "attention_mask": [1] * n + [0] * (width - n),
                "labels": ids + [IGNORE] * (width - n),
            }
        )

    class Data(torch.utils.data.Dataset):
        def __len__(self) -> int:
            return len(rows)

        def __getitem__(self, i: int) -> dict:
            return {k: torch.tensor(v) for k, v in rows[i].items()}

    timer = loop_timer()
    targs = TrainingArguments(
        output_dir=str(Path(args.out) / "baseline"),
        per_device_train_batch_size=4,
        num_train_epochs=1,
        learning_rate=2e-4,
        logging_steps=10**6,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        dataloader_num_workers=0,
        disable_tqdm=True,
        seed=0,
    )
    pm.train()
    Trainer(model=pm, args=targs, train_dataset=Data(), callbacks=[timer]).train()
    flops = model_flops(flop_counts(pm), real_tokens, real_tokens, sq)  # its LM head runs on every token
    return {
        "steps": -(-len(rows) // 4),
        "rows": len(rows),
        "real_tokens": real_tokens,
        "padded_tokens": width * len(rows),
        "supervised_tokens": ai_tokens,
        "train_seconds": timer.seconds,
        "mfu": flops / timer.seconds / peak,
        "peak_mem_gb": peak_memory_gb(torch.device("cpu")),
    }


def run_trl(args: argparse.Namespace, peak: float) -> dict:
    """TRL's SFTTrainer: packing (bfd, padding-free), assistant-only loss through `assistant_masks` = our labels."""
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    from baize_exp.training.data import IGNORE, tokenize_dialog
    from baize_exp.training.module import flop_counts, model_flops, peak_memory_gb

    cfg = compose([f"model={args.model}", "logger=none"])
    pm, tok = load(cfg)
    rows = [t for d in make_dialogs(args.dialogs) if (t := tokenize_dialog(d["turns"], tok, 512, "ai"))]
    data = Dataset.from_list(
        [{"input_ids": t["input_ids"], "assistant_masks": [int(x != IGNORE) for x in t["labels"]]} for t in rows]
    )
    real = sum(len(t["input_ids"]) for t in rows)
    ai = sum(1 for t in rows for x in t["labels"][1:] if x != IGNORE)
    sq = sum(len(t["input_ids"]) ** 2 for t in rows)  # padding-free: attention stays within each dialog

    timer = loop_timer()
    targs = SFTConfig(
        output_dir=str(Path(args.out) / "trl"),
        per_device_train_batch_size=4,
        num_train_epochs=1,
        learning_rate=2e-4,
        logging_steps=10**6,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        dataloader_num_workers=0,
        disable_tqdm=True,
        seed=0,
        packing=True,
        max_length=512,
        dataset_num_proc=None,
        gradient_checkpointing=False,
        bf16=False,
        fp16=False,
    )
    # (TRL defaults to gradient checkpointing and bf16 autocast: ours runs fp32 without checkpointing on CPU)
    pm.train()
    trainer = SFTTrainer(model=pm, args=targs, train_dataset=data, processing_class=tok, callbacks=[timer])
    packed_rows = len(trainer.train_dataset)
    trainer.train()
    flops = model_flops(flop_counts(pm), real, real, sq)  # its LM head runs on every token
    return {
        "steps": -(-packed_rows // 4),
        "rows": packed_rows,
        "real_tokens": real,
        "supervised_tokens": ai,
        "train_seconds": timer.seconds,
        "mfu": flops / timer.seconds / peak,
        "peak_mem_gb": peak_memory_gb(torch.device("cpu")),
    }


def child(variant: str, args: argparse.Namespace) -> dict:
    """Run one variant in a fresh interpreter (its own peak RSS); it prints one JSON line last."""
    cmd = [
        sys.executable,
        __file__,
        "--only",
        variant,
        "--model",
        args.model,
        "--dialogs",
        str(args.dialogs),
        "--peak",
        str(args.peak),
        "--out",
        args.out,
    ]
    r = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    if r.returncode != 0:
        raise SystemExit(f"{variant} failed:\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2_135m")
    ap.add_argument("--dialogs", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=2, help="interleaved rounds of every variant (ratios per round)")
    ap.add_argument("--trl", action="store_true", help="also run TRL's SFTTrainer (pip install -e '.[bench]')")
    ap.add_argument("--grouped", action="store_true", help="also run ours without packing (length-grouped)")
    ap.add_argument("--stock-lora", action="store_true", help="also run ours with peft's own LoRA forward")
    ap.add_argument("--out", default="/tmp/baize_bench_train")
    ap.add_argument("--only", choices=VARIANTS, help=argparse.SUPPRESS)
    ap.add_argument("--peak", type=float, default=0.0, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.only:
        run = {"baseline": lambda: run_baseline(args, args.peak), "trl_sft": lambda: run_trl(args, args.peak)}
        res = run.get(args.only, lambda: run_ours(args, args.peak, args.only))()
        print(json.dumps(res, default=str))
        return

    from baize_exp.training.module import measure_matmul_peak

    args.peak = measure_matmul_peak("cpu", torch.float32, seconds=3.0)
    print(
        f"matmul peak (fp32, 1024^3, best of 3 s): {args.peak / 1e9:.1f} GFLOP/s; {args.dialogs} dialogs, "
        f"model={args.model}, torch threads={torch.get_num_threads()}, {args.rounds} interleaved rounds"
    )
    variants = (
        ["baseline", "ours_packed"]
        + (["trl_sft"] if args.trl else [])
        + (["ours_grouped"] if args.grouped else [])
        + (["ours_stock_lora"] if args.stock_lora else [])
    )
    rounds: list[dict[str, dict]] = []
    for k in range(args.rounds):
        rounds.append({})
        for v in variants:
            rounds[-1][v] = r = child(v, args)
            print(f"  round {k + 1} {v:<16} {r['supervised_tokens'] / r['train_seconds']:8.1f} AI tok/s", flush=True)
    # a shared machine's speed drifts: probe again after the runs and rate MFU against the better reading, so a
    # slow first probe cannot inflate it
    after = measure_matmul_peak("cpu", torch.float32, seconds=3.0)
    peak = max(args.peak, after)
    print(f"matmul peak after the runs: {after / 1e9:.1f} GFLOP/s; MFU below is against {peak / 1e9:.1f}")
    ai_rate = lambda r: r["supervised_tokens"] / r["train_seconds"]  # noqa: E731
    print(
        f"{'variant (median)':<18} {'steps':>5} {'seconds':>8} {'real tok':>9} {'AI tok':>7} {'tok/s':>7} "
        f"{'AI tok/s':>9} {'MFU':>6} {'peak RSS GB':>11}"
    )
    for v in variants:
        runs = sorted((rd[v] for rd in rounds), key=ai_rate)
        r = runs[len(runs) // 2]
        print(
            f"{v:<18} {r['steps']:>5} {r['train_seconds']:>8.1f} {r['real_tokens']:>9} {r['supervised_tokens']:>7} "
            f"{r['real_tokens'] / r['train_seconds']:>7.1f} {ai_rate(r):>9.1f} "
            f"{r['mfu'] * args.peak / peak:>6.1%} {max(x['peak_mem_gb'] for x in runs):>11.2f}"
        )
    against = ["baseline"] + (["trl_sft"] if args.trl else [])
    for ref in against:
        for v in variants:
            if v in against:
                continue
            ratios = sorted(ai_rate(rd[v]) / ai_rate(rd[ref]) for rd in rounds)
            mem = max(rd[v]["peak_mem_gb"] for rd in rounds) / max(rd[ref]["peak_mem_gb"] for rd in rounds)
            print(
                f"AI tokens/s, {v} / {ref}: median {statistics.median(ratios):.2f}x over {len(ratios)} rounds "
                f"(each: {', '.join(f'{x:.2f}' for x in ratios)}); peak RSS {mem:.2f}x"
            )


if __name__ == "__main__":
    main()
