"""GPU check: the real-scale path in one command, sized for one H200 in under 8 minutes, offline.

What it runs, each part timed and checked, one table at the end (also `<out>/gpu_check.md` and `.json`):

1. ZeRO through the real `run.py`: LoRA training of `model=random_1b` (a random-init LLaMA of 1.2B parameters built
   from its config, no download) under `strategy=deepspeed_stage_2`, `deepspeed_stage_3` and
   `deepspeed_stage_3_offload`: a straight run, and the same run stopped half-way (`train.stop_at_step`, exit 75 with
   a checkpoint) then rerun. Checked: the loss falls, the resumed curve equals the straight one (max |diff|), the
   checkpoint holds only what trains (its size against the base's).
2. Student generation on the GPU, with the stages' own functions on the ZeRO-2 run's v1 adapter: SDF candidates
   (`sdf.sample_candidates`, 4 per prompt) and greedy eval answers (`models.generate_texts`), tokens/s on the GPU in
   the training precision against the CPU path (fp32) on the same prompts; the vLLM path too when vllm is installed.
3. Throughput and MFU: `run.py` LoRA training (r=8, bf16) of a 7B-shaped random model (`model=7b model.source=tiny`)
   on packed 2048-token rows; MFU against the bf16 matmul probe the run itself measures.

On a CPU machine `--cpu-dry-run` runs every part with the tiny model (ZeRO needs CUDA under Lightning, so one
`strategy=auto` row stands in; raw DeepSpeed ZeRO-2/3 on CPU is tested in tests/test_deepspeed_cpu.py): CI runs it.

The GPU machine lacks some packages and cannot download: `make gpu-wheels` (here, online) puts them as wheels in
`.whl/`, with the SmolLM2 tokenizer the random models use in `.whl/tokenizer` (the 98 MB GGUF it comes from is
over the carry limit); then, there:

    python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
    python3 benchmarks/gpu_check.py --tokenizer .whl/tokenizer --out $OUT
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

STRATEGIES = ["deepspeed_stage_2", "deepspeed_stage_3", "deepspeed_stage_3_offload"]


def _tokens(tok: Any, texts: list[str]) -> int:
    return sum(len(tok(t, add_special_tokens=False).input_ids) for t in texts)


class Check:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args, self.dry = args, args.cpu_dry_run
        self.out = Path(args.out).resolve()
        self.out.mkdir(parents=True, exist_ok=True)
        self.rows: list[dict[str, Any]] = []
        self.env = {
            **os.environ,
            "HF_HUB_OFFLINE": "1",
            "WANDB_MODE": "offline",
            "PYTHONUNBUFFERED": "1",
            "TORCH_EXTENSIONS_DIR": str(self.out / "torch_extensions"),
            "MPLCONFIGDIR": str(self.out / "mpl"),
            "DS_BUILD_OPS": "0",
        }
        self.model = "tiny" if self.dry else "random_1b"
        self.device = ["trainer=cpu"] if self.dry else ["trainer=gpu", "trainer.devices=1"]
        self.tok = [f"model.tokenizer={Path(args.tokenizer).resolve()}"] if args.tokenizer else []

    # --- helpers ---------------------------------------------------------------------------------------------------
    def run_py(self, name: str, overrides: list[str], run_dir: Path, timeout: float = 600) -> int:
        """One `python run.py` (the real entry point); its output goes to <out>/logs/<name>.log."""
        log = self.out / "logs" / f"{name}.log"
        log.parent.mkdir(exist_ok=True)
        cmd = [sys.executable, str(ROOT / "run.py"), *overrides, f"hydra.run.dir={run_dir}"]
        with open(log, "a") as f:
            f.write("$ " + " ".join(cmd) + "\n")
            f.flush()
            r = subprocess.run(cmd, cwd=ROOT, env=self.env, stdout=f, stderr=subprocess.STDOUT, timeout=timeout)
        return r.returncode

    def dialogs(self, n: int) -> Path:
        from train_throughput import make_dialogs

        path = self.out / f"dialogs_{n}.jsonl"
        path.write_text("".join(json.dumps(d) + "\n" for d in make_dialogs(n, seed=1)))
        return path

    @staticmethod
    def curve(run_dir: Path) -> dict[int, float]:
        """step -> train/loss from the run's CSV log (a resumed run keeps the steps from before the stop)."""
        with open(run_dir / "train" / "logs" / "metrics.csv", newline="") as f:
            return {int(r["step"]): float(r["train/loss"]) for r in csv.DictReader(f) if r.get("train/loss")}

    def row(self, check: str, ok: bool | None, **figures: Any) -> None:
        self.rows.append({"check": check, "status": "ok" if ok else "skipped" if ok is None else "FAIL", **figures})
        print(f"[{self.rows[-1]['status']}] {check}: {json.dumps(figures, default=str)}", flush=True)

    # --- 1. ZeRO training, stop and resume ---------------------------------------------------------------------------
    def zero(self) -> None:
        steps = 4 if self.dry else 8
        data = self.dialogs(64 if self.dry else 400)
        common = [
            f"model={self.model}",
            *self.tok,
            *self.device,
            "stages=[train]",
            f"train.data={data}",
            "logger=csv",
            "trainer.enable_progress_bar=false",
            f"trainer.max_steps={steps}",
            "trainer.max_epochs=100",
            "trainer.log_every_n_steps=1",
            "train.checkpoint_every_n_steps=0",
            "train.val_fraction=0.05",
            f"train.max_length={64 if self.dry else 512}",
            "train.batch_size=4",
            "train.lr=1e-3",
        ]
        strategies = ["auto"] if self.dry else STRATEGIES
        tol = 1e-5 if self.dry else 2e-2  # GPU attention backward kernels are not bit-deterministic
        for strategy in strategies:
            over = [*common, f"strategy={strategy}"]
            base = self.out / strategy
            shutil.rmtree(base, ignore_errors=True)
            t0 = time.perf_counter()
            rc_straight = self.run_py(f"{strategy}_straight", over, base / "straight")
            seconds = time.perf_counter() - t0
            rc_stop = self.run_py(f"{strategy}_resumed", [*over, f"train.stop_at_step={steps // 2}"], base / "resumed")
            ckpt = base / "resumed" / "train" / "checkpoints" / "last.ckpt"
            ckpt_bytes = (
                sum(f.stat().st_size for f in ckpt.rglob("*") if f.is_file())
                if ckpt.is_dir()
                else ckpt.stat().st_size
                if ckpt.is_file()
                else 0
            )
            # the same command again, as a job scheduler would rerun it: it continues from the checkpoint
            rc_resume = self.run_py(
                f"{strategy}_resumed", [*over, f"train.stop_at_step={steps // 2}"], base / "resumed"
            )
            label = f"train {strategy}" + (" (dry run: stands in for ZeRO-2/3/offload)" if self.dry else "")
            if (rc_straight, rc_stop, rc_resume) != (0, 75, 0):
                self.row(
                    label,
                    False,
                    exit_codes=[rc_straight, rc_stop, rc_resume],
                    log=str(self.out / "logs" / f"{strategy}_straight.log"),
                )
                continue
            a, b = self.curve(base / "straight"), self.curve(base / "resumed")
            m = json.loads((base / "straight" / "metrics.json").read_text())["train"]
            base_bytes = m["params_total"] * (4 if self.dry else 2)
            diff = max(abs(a[s] - b[s]) for s in a) if a.keys() == b.keys() else float("inf")
            falling = sum(list(a.values())[-2:]) / 2 < list(a.values())[0]
            self.row(
                label,
                falling and diff <= tol and ckpt_bytes < base_bytes / 10,
                loss_first=round(a[min(a)], 4),
                loss_last=round(a[max(a)], 4),
                resume_max_diff=diff,
                resume_tolerance=tol,
                ckpt_mb=round(ckpt_bytes / 2**20, 1),
                ckpt_share_of_base=round(ckpt_bytes / base_bytes, 4),
                run_seconds=round(seconds, 1),
                peak_mem_gb=m["peak_mem_gb"],
                tokens_per_s=m["tokens_per_s"],
            )
        self.v1 = self.out / strategies[0] / "straight" / "train" / "adapter"

    # --- 2. student generation --------------------------------------------------------------------------------------
    def generate(self) -> None:
        import torch
        from train_throughput import compose

        from baize_exp import models as M
        from baize_exp.config import cache_dir
        from baize_exp.data import BAIZE_HUMAN, SEEDS_DIR, generation_prompt, load_seed_file
        from baize_exp.generate import VllmStudent, vllm_unavailable
        from baize_exp.stages.sdf import sample_candidates

        v1 = getattr(self, "v1", None)
        if v1 is None or not (v1 / "adapter_config.json").is_file():
            self.row("generate", None, reason="no v1 adapter (the ZeRO part did not run or failed)")
            return
        cfg = compose([f"model={self.model}", *self.tok, *self.device])
        questions = [s.question for s in load_seed_file(SEEDS_DIR / "quora.jsonl", "quora")][:8]
        n, new = 4, 64
        devices = ["cpu"] if self.dry else ["cuda", "cpu"]
        res: dict[str, dict] = {}
        for dev in devices:
            dtype = torch.float32 if dev == "cpu" else M.base_dtype(cfg.model, cfg.trainer.precision)
            base, tok = M.load_model_and_tokenizer(cfg.model, cache_dir(cfg), dtype)
            model = M.load_adapter(base, v1).to(dev)
            prompts = [generation_prompt(q, "baize", tok) for q in questions]
            t0 = time.perf_counter()
            cands = sample_candidates(model, tok, prompts, n, new, 1.0, 0.95, batch_size=8, stop=[BAIZE_HUMAN])
            t1 = time.perf_counter()
            answers = M.generate_texts(model, tok, prompts, new, stop=[BAIZE_HUMAN], batch_size=8)
            t2 = time.perf_counter()
            res[dev] = {
                "sdf_tokens_per_s": _tokens(tok, [c for cs in cands for c in cs]) / (t1 - t0),
                "eval_tokens_per_s": _tokens(tok, [a[0] for a in answers]) / (t2 - t1),
                "dtype": str(dtype),
            }
            del model, base
        ok = all(r["sdf_tokens_per_s"] > 0 for r in res.values())
        figures: dict[str, Any] = {
            f"{d}_{k}": (round(v, 1) if isinstance(v, float) else v) for d, r in res.items() for k, v in r.items()
        }
        if not self.dry:
            for k in ("sdf_tokens_per_s", "eval_tokens_per_s"):
                figures[f"gpu_over_cpu_{k.split('_')[0]}"] = round(res["cuda"][k] / res["cpu"][k], 1)
            figures["target"] = ">= 10x"
        self.row(f"generate hf ({len(questions)} prompts x {n} candidates, {new} new tokens)", ok, **figures)

        why = vllm_unavailable(cfg.trainer.accelerator)
        if why:
            self.row("generate vllm", None, reason=why)
            return
        tok = M.load_tokenizer(cfg.model, cache_dir(cfg))
        student = VllmStudent(cfg, tok)
        prompts = [generation_prompt(q, "baize", tok) for q in questions]
        t0 = time.perf_counter()
        outs = student.generate(prompts, v1, 0, n, 1.0, 0.95, new, [BAIZE_HUMAN], 0)
        dt = time.perf_counter() - t0
        tps = _tokens(tok, [t for o in outs for t in o]) / dt
        self.row(
            "generate vllm",
            len(outs) == len(prompts),
            sdf_tokens_per_s=round(tps, 1),
            over_hf_gpu=round(tps / res["cuda"]["sdf_tokens_per_s"], 1) if "cuda" in res else None,
        )

    # --- 3. 7B-shaped throughput and MFU ----------------------------------------------------------------------------
    def mfu(self) -> None:
        data = self.dialogs(64 if self.dry else 800)
        run_dir = self.out / "mfu"
        shutil.rmtree(run_dir, ignore_errors=True)
        model = (
            [f"model={self.model}"]
            if self.dry
            else ["model=7b", "model.source=tiny", "model.vocab_size=49152", "model.max_position_embeddings=2048"]
        )
        over = [
            *model,
            *self.tok,
            *self.device,
            "stages=[train]",
            f"train.data={data}",
            "logger=csv",
            "trainer.enable_progress_bar=false",
            f"trainer.max_steps={3 if self.dry else 12}",
            "trainer.max_epochs=100",
            "train.checkpoint_every_n_steps=0",
            "train.val_fraction=0",
            f"train.max_length={256 if self.dry else 2048}",
            "train.batch_size=2",
            "train.packing=true",
            "lora.r=8",
        ]
        rc = self.run_py("mfu", over, run_dir)
        label = "train 7B-shaped, LoRA r=8, bf16, packed 2048-token rows" if not self.dry else "train tiny (dry run)"
        if rc != 0:
            self.row(label, False, exit_code=rc, log=str(self.out / "logs" / "mfu.log"))
            return
        m = json.loads((run_dir / "metrics.json").read_text())["train"]
        loop_tps = m["tokens_per_s"] * m["seconds"] / m["loop_seconds"]
        self.row(
            label,
            m.get("mfu", 0) > 0,
            tokens_per_s=round(loop_tps, 1),
            mfu=m.get("mfu"),
            probe_tflops=round(m["peak_flops"] / 1e12, 2),
            peak_mem_gb=m["peak_mem_gb"],
            params_b=round(m["params_total"] / 1e9, 2),
            target=">= 40% MFU" if not self.dry else None,
        )

    def report(self, started: float) -> bool:
        import torch

        dev = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CPU (dry run)"
        lines = [
            f"GPU check on {dev}, torch {torch.__version__}, {time.strftime('%Y-%m-%d')}, "
            f"{time.perf_counter() - started:.0f} s in all",
            "",
            "| check | status | figures |",
            "|---|---|---|",
        ]
        for r in self.rows:
            figs = ", ".join(f"{k}={v}" for k, v in r.items() if k not in ("check", "status") and v is not None)
            lines.append(f"| {r['check']} | {r['status']} | {figs} |")
        text = "\n".join(lines)
        print("\n" + text)
        (self.out / "gpu_check.md").write_text(text + "\n")
        (self.out / "gpu_check.json").write_text(json.dumps({"device": dev, "rows": self.rows}, indent=1, default=str))
        return all(r["status"] != "FAIL" for r in self.rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cpu-dry-run", action="store_true", help="every part on CPU with the tiny model (CI)")
    ap.add_argument("--out", default=os.environ.get("OUT") or str(ROOT / "outputs" / "gpu_check"))
    ap.add_argument("--tokenizer", help="tokenizer folder for the random models (the GPU machine has no GGUF)")
    ap.add_argument("--parts", default="zero,generate,mfu", help="comma-separated: zero, generate, mfu")
    args = ap.parse_args()
    import torch

    if not args.cpu_dry_run and not torch.cuda.is_available():
        raise SystemExit("gpu_check: no CUDA GPU visible here; run it on a GPU machine, or --cpu-dry-run")
    check, started = Check(args), time.perf_counter()
    for part in args.parts.split(","):
        getattr(check, part.strip())()
    raise SystemExit(0 if check.report(started) else 1)


if __name__ == "__main__":
    main()
