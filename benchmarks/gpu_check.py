"""GPU check: the real-scale path in one command, sized for one H200 and a 10-minute command, offline.

    python3 benchmarks/gpu_check.py --out $OUT             # on the GPU machine (make gpu-check)
    python3 benchmarks/gpu_check.py --cpu-dry-run          # here: every row through the same code on CPU (CI)

A budgeted run. The first step is an import and version check (seconds): if a package the check imports is
missing or too old, it stops with one line naming it (exit 2); where `.whl/` holds wheels it installs them into a
target dir first and goes on. Then the rows, in order, each in its own processes with a timeout of
min(its budget, the time left before `--deadline`), so one row's crash or hang never loses the others; the table
(`gpu_check.md`, `gpu_check.json`) is rewritten after every row. Work dirs, checkpoints and logs stay under
`--work` (outside `$OUT`: only a few small files come back from the GPU machine); `$OUT` gets the table, its JSON
and `failing_logs.tar.gz` with the last lines of each failing row's logs.

Rows on the GPU (random-init models built directly on the GPU in bf16, no download):

1. `train deepspeed_stage_2|3|3_offload`: LoRA training of `model=random_1b` (1.17B, TinyLlama's shape) through
   the real `run.py`: straight, then stopped half-way (`train.stop_at_step`, exit 75 with a checkpoint) and rerun by
   the same command. Checks: the loss falls (the data's AI turns are a few fixed sentences, so it falls fast), the
   resumed per-step losses equal the straight ones within a tolerance relative to that fall, the checkpoint holds
   only what trains (its size against the base's), peak memory on the GPU.
2. `generate hf`: SDF candidates (`sdf.sample_candidates`) and greedy eval answers (`models.generate_texts`) with
   the first ZeRO row's v1 adapter, in bf16 on the GPU against fp32 on the CPU on the same prompts, after a warm-up;
   tokens/s counts the tokens the model generated (target >= 10x). `generate vllm` when vllm is installed.
3. `train 7B-shaped`: `run.py` LoRA r=8 bf16 training of a 7B-shaped random model on packed 2048-token rows; MFU
   after the first optimizer step, against the bf16 matmul probe the run measures (target >= 40%).

`--cpu-dry-run` runs the same rows on CPU with a small random model (ZeRO needs CUDA under Lightning, so one
`strategy=auto` row stands in; Lightning's DeepSpeed strategy is driven on CPU in tests/test_strategy.py), plus two
negative controls that must be reported FAIL: a resume whose checkpoint lost its optimizer state, and one whose
data order was shifted by two batches.

Exit status: 0 every row passed; 1 a row failed, crashed or timed out (or a control passed); 2 the import check
failed; 3 rows were cut by the deadline (the table names them), none failed.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tarfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import gpu_deps  # noqa: E402  (benchmarks/ is put on the path above)

EXIT_OK, EXIT_FAIL, EXIT_SETUP, EXIT_CUT = 0, 1, 2, 3
STRATEGIES = ["deepspeed_stage_2", "deepspeed_stage_3", "deepspeed_stage_3_offload"]
# The AI turns of the check's dialogs: a few fixed sentences, so that even a random model's loss falls by nats
# within a few steps and a resume that goes wrong shows against that fall (on varied text it stays near ln(vocab)).
ANSWERS = [
    "The answer is yes, and the reason is simple.",
    "It depends on the context you are in.",
    "Please check the documentation first.",
    "That is a common question with a short answer.",
]


class RowTimeout(Exception):
    """A command of a row ran past the row's timeout (its budget, or the time left before the deadline)."""


@dataclass
class Row:
    """One line of the table: `work(ctx)` returns its figures and whether its checks passed."""

    key: str  # what --rows selects
    label: str
    budget_s: float  # the most this row may take (GPU or dry run, whichever this is)
    work: Callable[[RowContext], tuple[bool | None, dict[str, Any]]]
    control: bool = False  # a negative control: its check must FAIL


@dataclass
class RowContext:
    row: Row
    ends_at: float  # monotonic time this row must finish by
    logs: list[Path] = field(default_factory=list)

    def left(self) -> float:
        return self.ends_at - time.monotonic()


def learnable_dialogs(n: int, seed: int = 1) -> list[dict]:
    """Dialogs of 3-5 exchanges: shipped seed questions as the human turns, one of ANSWERS as each AI turn."""
    from baize_exp.data import SEEDS_DIR, load_seed_file

    questions = [s.question for src in ("quora", "alpaca") for s in load_seed_file(SEEDS_DIR / f"{src}.jsonl", src)]
    rng = random.Random(seed)
    return [
        {
            "id": f"check-{i}",
            "turns": [
                turn
                for _ in range(rng.randint(3, 5))
                for turn in (
                    {"role": "human", "text": rng.choice(questions)},
                    {"role": "ai", "text": rng.choice(ANSWERS)},
                )
            ],
        }
        for i in range(n)
    ]


def loss_curve(run_dir: Path) -> dict[int, float]:
    """step -> train/loss from the run's CSV log (a resumed run keeps the steps from before the stop)."""
    with open(run_dir / "train" / "logs" / "metrics.csv", newline="") as f:
        return {int(r["step"]): float(r["train/loss"]) for r in csv.DictReader(f) if r.get("train/loss")}


def resume_verdict(straight: dict[int, float], resumed: dict[int, float], rel_tol: float, min_fall: float) -> dict:
    """Whether a stopped-and-resumed run continued as the straight run did: the same steps, and per-step losses
    within `rel_tol` of the loss's fall over the straight run (mean of the first two steps minus mean of the last
    two). The fall must be at least `min_fall`: on a curve that does not move, no tolerance can tell a correct
    resume from a wrong one."""
    steps = sorted(straight)
    fall = (straight[steps[0]] + straight[steps[1]]) / 2 - (straight[steps[-2]] + straight[steps[-1]]) / 2
    diff = max(abs(straight[s] - resumed[s]) for s in steps) if resumed.keys() == straight.keys() else float("inf")
    tol = rel_tol * max(fall, 0.0)
    return {
        "ok": fall >= min_fall and diff <= tol,
        "loss_fall": round(fall, 4),
        "resume_max_diff": round(diff, 6) if diff != float("inf") else "steps differ",
        "resume_tolerance": round(tol, 6),
    }


def dir_bytes(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.is_dir() else 0


class GpuCheck:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args, self.dry = args, args.cpu_dry_run
        self.out = Path(args.out).resolve()
        self.work = Path(args.work).resolve()
        self.out.mkdir(parents=True, exist_ok=True)
        self.work.mkdir(parents=True, exist_ok=True)
        self.started = args.started  # the deadline counts from the start of the command, the import check included
        self.deadline = self.started + args.deadline
        self.results: list[dict[str, Any]] = []
        self.env = {
            **os.environ,
            "HF_HUB_OFFLINE": "1",
            "WANDB_MODE": "offline",
            "PYTHONUNBUFFERED": "1",
            "DS_BUILD_OPS": "0",
            # the converted-model cache where one is set (the dry run's tokenizer), else the work dir's
            "BAIZE_CACHE": os.environ.get("BAIZE_CACHE") or str(self.work / "cache"),
            "TORCH_EXTENSIONS_DIR": str(self.work / "torch_extensions"),
            "MPLCONFIGDIR": str(self.work / "mpl"),
        }
        tokenizer = args.tokenizer or (ROOT / ".whl" / "tokenizer" if (ROOT / ".whl" / "tokenizer").is_dir() else None)
        self.tok = [f"model.tokenizer={Path(tokenizer).resolve()}"] if tokenizer else []
        if self.dry:  # a random model small enough for CPU, wide enough that its loss can fall (see ANSWERS)
            self.model = ["model=tiny", "model.hidden_size=512", "model.intermediate_size=1024"]
            self.device = ["trainer=cpu"]
        else:
            self.model = ["model=random_1b"]
            self.device = ["trainer=gpu", "trainer.devices=1"]
        self.data = self.work / "dialogs.jsonl"
        self.data.write_text("".join(json.dumps(d) + "\n" for d in learnable_dialogs(400)))
        self.straight: dict[str, dict[int, float]] = {}  # strategy -> its straight run's loss curve
        self.adapter: Path | None = None  # the first ZeRO row's v1, for the generation rows

    # --- running commands within a row's time ---------------------------------------------------------------------
    def command(self, ctx: RowContext, name: str, cmd: list[str]) -> int:
        """Run `cmd` with its output in <work>/logs/<name>.log; kill its whole process group at the row's timeout."""
        log = self.work / "logs" / f"{name}.log"
        log.parent.mkdir(exist_ok=True)
        if log not in ctx.logs:
            ctx.logs.append(log)
        timeout = ctx.left()
        if timeout <= 1:
            raise RowTimeout(f"no time left for {name}")
        with open(log, "a") as f:
            f.write("$ " + " ".join(cmd) + "\n")
            f.flush()
            proc = subprocess.Popen(
                cmd, cwd=ROOT, env=self.env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True
            )
            try:
                return proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)  # run.py's children (DeepSpeed, loaders) too
                proc.wait()
                raise RowTimeout(f"{name} ran past the row's {timeout:.0f} s") from None

    def run_py(self, ctx: RowContext, name: str, overrides: list[str], run_dir: Path) -> int:
        return self.command(ctx, name, [sys.executable, str(ROOT / "run.py"), *overrides, f"hydra.run.dir={run_dir}"])

    def worker(self, ctx: RowContext, name: str, task: str, **kw: Any) -> dict:
        """This script's own `--worker` mode in a fresh process: its figures come back as JSON."""
        result = self.work / f"{name}.json"
        result.unlink(missing_ok=True)
        cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", task, "--work", str(self.work)]
        cmd += ["--cpu-dry-run"] if self.dry else []
        cmd += [f"--{k.replace('_', '-')}={v}" for k, v in kw.items()] + ["--result", str(result)]
        rc = self.command(ctx, name, cmd)
        if rc != 0 or not result.is_file():
            raise RuntimeError(f"worker {task} exited {rc}; see its log")
        return json.loads(result.read_text())

    # --- 1. training: straight, stopped, resumed -------------------------------------------------------------------
    def train_overrides(self, strategy: str) -> list[str]:
        steps = 8
        return [
            *self.model,
            *self.tok,
            *self.device,
            f"strategy={strategy}",
            "stages=[train]",
            f"train.data={self.data}",
            "logger=csv",
            "trainer.enable_progress_bar=false",
            f"trainer.max_steps={steps}",
            "trainer.max_epochs=100",
            "trainer.log_every_n_steps=1",
            "train.checkpoint_every_n_steps=0",
            "train.val_fraction=0.05",
            f"train.max_length={64 if self.dry else 512}",
            "train.batch_size=4",
            f"train.lr={3e-3 if self.dry else 1e-3}",
            "lora.dropout=0.0",
        ]

    # (share of the loss's fall a resumed step may differ by, the least fall that makes the check meaningful). On
    # the GPU, bf16 attention backward kernels are not bit-deterministic; the CPU in fp32 is. The dry run's controls
    # are judged at the GPU tolerance, the looser one: what they catch, the GPU rows catch too.
    GPU_TOLERANCE, CPU_TOLERANCE = (0.02, 0.5), (1e-3, 0.5)

    def tolerance(self, control: bool = False) -> tuple[float, float]:
        return self.CPU_TOLERANCE if self.dry and not control else self.GPU_TOLERANCE

    def train_row(self, strategy: str) -> Callable[[RowContext], tuple[bool | None, dict]]:
        def work(ctx: RowContext) -> tuple[bool | None, dict]:
            over = self.train_overrides(strategy)
            base = self.work / strategy
            shutil.rmtree(base, ignore_errors=True)
            half = f"train.stop_at_step={4}"
            t0 = time.monotonic()
            codes = [self.run_py(ctx, f"{strategy}_straight", over, base / "straight")]
            straight_s = time.monotonic() - t0
            codes.append(self.run_py(ctx, f"{strategy}_resumed", [*over, half], base / "resumed"))
            ckpt_bytes = dir_bytes(base / "resumed" / "train" / "checkpoints" / "last.ckpt")
            if self.dry and codes[-1] == 75:  # the stopped run, as the negative controls start from it
                shutil.rmtree(self.work / "stopped_auto", ignore_errors=True)
                shutil.copytree(base / "resumed", self.work / "stopped_auto")
            # the same command again, as a job scheduler would rerun it: it continues from the checkpoint
            codes.append(self.run_py(ctx, f"{strategy}_resumed", [*over, half], base / "resumed"))
            if codes != [0, 75, 0]:
                return False, {"exit_codes": codes, "expected": [0, 75, 0]}
            straight = self.straight[strategy] = loss_curve(base / "straight")
            metrics = json.loads((base / "straight" / "metrics.json").read_text())["train"]
            base_bytes = metrics["params_total"] * (4 if self.dry else 2)
            verdict = resume_verdict(straight, loss_curve(base / "resumed"), *self.tolerance())
            if self.adapter is None:
                self.adapter = base / "straight" / "train" / "adapter"
            figures = {
                "loss_first": round(straight[min(straight)], 4),
                "loss_last": round(straight[max(straight)], 4),
                **{k: v for k, v in verdict.items() if k != "ok"},
                "ckpt_mb": round(ckpt_bytes / 2**20, 1),
                "ckpt_share_of_base": round(ckpt_bytes / base_bytes, 4),
                "params_b": round(metrics["params_total"] / 1e9, 3),
                "straight_run_s": round(straight_s, 1),
                "device": metrics.get("device"),
                "peak_mem_gb": metrics["peak_mem_gb"],
                "tokens_per_s": metrics["tokens_per_s"],
            }
            return verdict["ok"] and 0 < ckpt_bytes < base_bytes / 10, figures

        return work

    def control_row(self, damage: str) -> Callable[[RowContext], tuple[bool | None, dict]]:
        """A resume that must be caught: the dry run's checkpoint (one file) damaged between the stop and the rerun."""

        def work(ctx: RowContext) -> tuple[bool | None, dict]:
            import torch

            straight, stopped = self.straight.get("auto"), self.work / "stopped_auto"
            if straight is None or not stopped.is_dir():
                return None, {"reason": "no stopped run to start from (the train auto row did not finish)"}
            over = self.train_overrides("auto")
            run_dir = self.work / f"control_{damage}"
            shutil.rmtree(run_dir, ignore_errors=True)
            shutil.copytree(stopped, run_dir)  # the auto row's run as its stop left it: its checkpoint at step 4
            path = run_dir / "train" / "checkpoints" / "last.ckpt"
            ckpt = torch.load(path, weights_only=False)
            if damage == "optimizer_reset":
                for state in ckpt["optimizer_states"]:
                    state["state"] = {}  # Adam's moments and step counts gone, as if the optimizer restarted
            else:
                ckpt["baize"]["batches_trained"] += 2  # the batch sampler resumes two batches further on
            torch.save(ckpt, path)
            rerun = self.run_py(ctx, f"control_{damage}", [*over, "train.stop_at_step=4"], run_dir)
            if rerun != 0:
                return False, {"exit_codes": [rerun]}
            verdict = resume_verdict(straight, loss_curve(run_dir), *self.tolerance(control=True))
            return verdict["ok"], {k: v for k, v in verdict.items() if k != "ok"}

        return work

    # --- 2. student generation --------------------------------------------------------------------------------------
    def generate_row(self, ctx: RowContext) -> tuple[bool | None, dict]:
        if self.adapter is None or not (self.adapter / "adapter_config.json").is_file():
            return None, {"reason": "no v1 adapter (the first training row did not finish)"}
        figures = self.worker(
            ctx, "generate_hf", "generate", adapter=self.adapter, model=" ".join(self.model + self.tok)
        )
        ok = all(figures[f"{d}_{k}_tokens_per_s"] > 0 for d in figures["devices"] for k in ("sdf", "eval"))
        if not self.dry:
            ok = ok and figures["gpu_over_cpu_sdf"] >= 10 and figures["gpu_over_cpu_eval"] >= 10
            figures["target"] = ">= 10x"
        figures.pop("devices")
        return ok, figures

    def vllm_row(self, ctx: RowContext) -> tuple[bool | None, dict]:
        import importlib.util

        if importlib.util.find_spec("vllm") is None or self.dry:
            return None, {"reason": "vllm is not installed" if not self.dry else "vLLM needs a CUDA GPU"}
        if self.adapter is None:
            return None, {"reason": "no v1 adapter (the first training row did not finish)"}
        figures = self.worker(ctx, "generate_vllm", "vllm", adapter=self.adapter, model=" ".join(self.model + self.tok))
        return figures["sdf_tokens_per_s"] > 0, figures

    # --- 3. 7B-shaped throughput and MFU ----------------------------------------------------------------------------
    def mfu_row(self, ctx: RowContext) -> tuple[bool | None, dict]:
        run_dir = self.work / "mfu"
        shutil.rmtree(run_dir, ignore_errors=True)
        model = self.model if self.dry else ["model=7b", "model.source=tiny", "model.vocab_size=49152"]
        over = [
            *model,
            *self.tok,
            *self.device,
            "stages=[train]",
            f"train.data={self.data}",
            "logger=csv",
            "trainer.enable_progress_bar=false",
            f"trainer.max_steps={4 if self.dry else 12}",
            "trainer.max_epochs=100",
            "train.checkpoint_every_n_steps=0",
            "train.val_fraction=0",
            f"train.max_length={256 if self.dry else 2048}",
            "train.batch_size=2",
            "train.packing=true",
            "lora.r=8",
        ]
        if not self.dry:
            over.append("model.max_position_embeddings=2048")
        rc = self.run_py(ctx, "mfu", over, run_dir)
        if rc != 0:
            return False, {"exit_code": rc}
        m = json.loads((run_dir / "metrics.json").read_text())["train"]
        figures = {
            "mfu": m.get("mfu"),
            "mfu_seconds": m.get("mfu_seconds"),
            "tokens_per_s": round(m["tokens_per_s"] * m["seconds"] / m["loop_seconds"], 1),
            "probe_tflops": round(m["peak_flops"] / 1e12, 3),
            "peak_mem_gb": m["peak_mem_gb"],
            "device": m.get("device"),
            "params_b": round(m["params_total"] / 1e9, 2),
        }
        if not self.dry:
            figures["target"] = ">= 40% MFU"
        return m.get("mfu") is not None and 0 < m["mfu"] < 1, figures

    # --- the run ----------------------------------------------------------------------------------------------------
    def rows(self) -> list[Row]:
        if self.dry:
            rows = [
                Row("auto", "train auto (dry run: stands in for ZeRO-2/3/offload)", 150, self.train_row("auto")),
                Row(
                    "control_optimizer_reset",
                    "control: resume with the optimizer state lost",
                    100,
                    self.control_row("optimizer_reset"),
                    control=True,
                ),
                Row(
                    "control_data_shift",
                    "control: resume two batches further on",
                    100,
                    self.control_row("data_shift"),
                    control=True,
                ),
            ]
        else:
            budgets = {"deepspeed_stage_2": 110, "deepspeed_stage_3": 110, "deepspeed_stage_3_offload": 120}
            rows = [
                Row(s.replace("deepspeed_stage_", "zero"), f"train {s}", budgets[s], self.train_row(s))
                for s in STRATEGIES
            ]
        rows += [
            Row(
                "generate",
                "generate hf (8 prompts x 4 candidates, 64 new tokens)",
                100 if self.dry else 90,
                self.generate_row,
            ),
            Row("vllm", "generate vllm", 90, self.vllm_row),
            Row(
                "mfu",
                "train tiny, packed (dry run)" if self.dry else "train 7B-shaped, LoRA r=8, bf16, packed 2048",
                100 if self.dry else 130,
                self.mfu_row,
            ),
        ]
        wanted = [k.strip() for k in self.args.rows.split(",")] if self.args.rows else None
        return [r for r in rows if wanted is None or r.key in wanted]

    def execute(self, row: Row) -> None:
        left = self.deadline - time.monotonic()
        result: dict[str, Any] = {"check": row.label, "key": row.key}
        if left < 5:
            result.update(status="cut", reason=f"not started: {max(left, 0):.0f} s left before the deadline")
            self.results.append(result)
            return
        ctx = RowContext(row, time.monotonic() + min(row.budget_s, left))
        t0 = time.monotonic()
        try:
            ok, figures = row.work(ctx)
            status = "skipped" if ok is None else "ok" if ok else "FAIL"
            if row.control and ok is not None:
                status = "FAIL (expected: control)" if not ok else "PASSED (a control must fail)"
        except RowTimeout as e:
            cut = ctx.ends_at >= self.deadline - 1
            status, figures = ("cut" if cut else "timeout"), {"reason": str(e) + (" (deadline)" if cut else "")}
        except Exception as e:  # one row's crash never loses the others
            status, figures = "crashed", {"error": f"{type(e).__name__}: {e}"[:300]}
            log = self.work / "logs" / f"{row.key}_crash.log"
            log.parent.mkdir(exist_ok=True)
            log.write_text(traceback.format_exc())
            ctx.logs.append(log)
        result.update(status=status, seconds=round(time.monotonic() - t0, 1), **figures)
        result["logs"] = [str(p) for p in ctx.logs]
        self.results.append(result)
        print(f"[{status}] {row.label}: {json.dumps({k: v for k, v in figures.items()}, default=str)}", flush=True)

    def failed(self, r: dict) -> bool:
        return r["status"] in ("FAIL", "crashed", "timeout", "PASSED (a control must fail)")

    def write(self, device: str) -> None:
        """The table and its JSON in --out, and the failing rows' log tails (rewritten after every row)."""
        head = (
            f"GPU check on {device}, {time.strftime('%Y-%m-%d %H:%M')}, "
            f"{time.monotonic() - self.started:.0f} s of a {self.args.deadline:.0f} s deadline"
        )
        lines = [head, "", "| check | status | s | figures |", "|---|---|---|---|"]
        for r in self.results:
            figs = ", ".join(
                f"{k}={v}"
                for k, v in r.items()
                if k not in ("check", "key", "status", "seconds", "logs") and v is not None
            )
            lines.append(f"| {r['check']} | {r['status']} | {r.get('seconds', '')} | {figs} |")
        text = "\n".join(lines) + "\n"
        (self.out / "gpu_check.md").write_text(text)
        (self.out / "gpu_check.json").write_text(json.dumps({"device": device, "rows": self.results}, indent=1))
        failing = [Path(p) for r in self.results if self.failed(r) for p in r.get("logs", [])]
        archive = self.out / "failing_logs.tar.gz"
        archive.unlink(missing_ok=True)
        if failing:
            with tarfile.open(archive, "w:gz") as tar:
                for log in failing:
                    if log.is_file():
                        tail = "".join(log.read_text(errors="replace").splitlines(keepends=True)[-300:]).encode()
                        info = tarfile.TarInfo(log.name)
                        info.size = len(tail)
                        tar.addfile(info, io.BytesIO(tail))

    def main(self) -> int:
        device = gpu_deps.device_name(self.dry)
        for row in self.rows():
            self.execute(row)
            self.write(device)
        print("\n" + (self.out / "gpu_check.md").read_text(), flush=True)
        if any(self.failed(r) for r in self.results):
            return EXIT_FAIL
        cut = [r["check"] for r in self.results if r["status"] == "cut"]
        if cut:
            print(f"gpu_check: cut by the {self.args.deadline:.0f} s deadline: {'; '.join(cut)}", flush=True)
            return EXIT_CUT
        return EXIT_OK


# --- worker mode: one row's in-process work, in a process of its own ---------------------------------------------
def generated_tokens(model: Any, tok: Any) -> list[int]:
    """Count, across every `model.generate` call, the tokens generated (each row up to and including its first
    end-of-sequence token): the decode work done, not the tokens of the text that survived the stop strings."""
    counter = [0]
    original = model.generate
    eos = set(tok.all_special_ids) | {tok.pad_token_id, tok.eos_token_id}

    def counted(*args: Any, **kwargs: Any) -> Any:
        seqs = original(*args, **kwargs)
        for row in seqs[:, kwargs["input_ids"].shape[1] :].tolist():
            ends = [i for i, t in enumerate(row) if t in eos]
            counter[0] += ends[0] + 1 if ends else len(row)
        return seqs

    model.generate = counted
    return counter


def worker_generate(args: argparse.Namespace) -> dict:
    import torch
    from train_throughput import compose

    from baize_exp import models as M
    from baize_exp.data import BAIZE_HUMAN, SEEDS_DIR, generation_prompt, load_seed_file
    from baize_exp.stages.sdf import sample_candidates

    cfg = compose([*args.model.split(), "trainer=cpu" if args.cpu_dry_run else "trainer=gpu"])
    questions = [s.question for s in load_seed_file(SEEDS_DIR / "quora.jsonl", "quora")][:8]
    n, new = 4, 64
    out: dict[str, Any] = {"devices": ["cpu"] if args.cpu_dry_run else ["cuda", "cpu"]}
    train_dtype, train_device = (
        M.base_dtype(cfg.model, cfg.trainer.precision),
        M.student_device(cfg.trainer.accelerator),
    )
    for dev in out["devices"]:
        # the base as training drew it (a random model's weights depend on the device it is drawn on), then: on the
        # GPU as the pipeline's student runs (base in the training dtype), on the CPU in fp32
        base, tok = M.load_model_and_tokenizer(cfg.model, Path(os.environ["BAIZE_CACHE"]), train_dtype, train_device)
        model = M.load_adapter(base, args.adapter)
        model = model.to(dev) if dev == "cuda" else model.to("cpu", dtype=torch.float32)
        dtype = next(model.get_base_model().parameters()).dtype
        prompts = [generation_prompt(q, "baize", tok) for q in questions]
        sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)
        M.generate_texts(model, tok, prompts[:2], 4, stop=[BAIZE_HUMAN])  # warm-up: kernels, allocator, caches
        sync()
        count = generated_tokens(model, tok)
        t0 = time.perf_counter()
        sample_candidates(model, tok, prompts, n, new, 1.0, 0.95, batch_size=8, stop=[BAIZE_HUMAN])
        sync()
        t1 = time.perf_counter()
        sdf_tokens, count[0] = count[0], 0
        M.generate_texts(model, tok, prompts, new, stop=[BAIZE_HUMAN], batch_size=8)
        sync()
        t2 = time.perf_counter()
        out[f"{dev}_sdf_tokens_per_s"] = round(sdf_tokens / (t1 - t0), 1)
        out[f"{dev}_eval_tokens_per_s"] = round(count[0] / (t2 - t1), 1)
        out[f"{dev}_dtype"] = str(dtype).removeprefix("torch.")
        del model, base
    if "cuda" in out["devices"]:
        for k in ("sdf", "eval"):
            out[f"gpu_over_cpu_{k}"] = round(out[f"cuda_{k}_tokens_per_s"] / out[f"cpu_{k}_tokens_per_s"], 1)
    return out


def worker_vllm(args: argparse.Namespace) -> dict:
    from train_throughput import compose

    from baize_exp import models as M
    from baize_exp.data import BAIZE_HUMAN, SEEDS_DIR, generation_prompt, load_seed_file
    from baize_exp.generate import VllmStudent

    cfg = compose([*args.model.split(), "trainer=gpu"])
    tok = M.load_tokenizer(cfg.model, Path(os.environ["BAIZE_CACHE"]))
    student = VllmStudent(cfg, tok)
    prompts = [generation_prompt(s.question, "baize", tok) for s in load_seed_file(SEEDS_DIR / "quora.jsonl")][:8]
    student.generate(prompts[:2], Path(args.adapter), 0, 1, 1.0, 0.95, 4, [BAIZE_HUMAN], 0)  # warm-up
    t0 = time.perf_counter()
    outs = student.generate(prompts, Path(args.adapter), 0, 4, 1.0, 0.95, 64, [BAIZE_HUMAN], 0)
    seconds = time.perf_counter() - t0
    tokens = sum(len(tok(t, add_special_tokens=False).input_ids) for o in outs for t in o)  # vLLM cuts at stops
    return {"sdf_tokens_per_s": round(tokens / seconds, 1), "note": "tokens of the returned texts"}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cpu-dry-run", action="store_true", help="every row on CPU with a small random model (CI)")
    ap.add_argument(
        "--out",
        default=os.environ.get("OUT") or str(ROOT / "outputs" / "gpu_check"),
        help="where the table, its JSON and the failing rows' log tails go ($OUT on the GPU machine)",
    )
    ap.add_argument("--work", default=None, help="work dirs, checkpoints and logs (default: a folder under /tmp)")
    ap.add_argument(
        "--deadline",
        type=float,
        default=540.0,
        help="seconds for the whole check (default 540: a minute of a 10-minute command left for the copy back)",
    )
    ap.add_argument("--rows", default=None, help="comma-separated row keys (default: all)")
    ap.add_argument("--tokenizer", help="tokenizer folder for the random models (default .whl/tokenizer if there)")
    ap.add_argument("--wheels", default=str(ROOT / ".whl"), help="wheels to install when imports are missing")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--adapter", help=argparse.SUPPRESS)
    ap.add_argument("--model", help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.work is None:
        args.work = str(Path(os.environ.get("TMPDIR", "/tmp")) / f"baize_gpu_check{'_dry' if args.cpu_dry_run else ''}")
    return args


def main() -> None:
    started = time.monotonic()
    args = parse_args()
    args.started = started
    if args.worker:
        result = {"generate": worker_generate, "vllm": worker_vllm}[args.worker](args)
        Path(args.result).write_text(json.dumps(result))
        return
    problem = gpu_deps.preflight(args.wheels, gpu=not args.cpu_dry_run)
    if problem:
        print(f"gpu_check: {problem}", file=sys.stderr)
        raise SystemExit(EXIT_SETUP)
    raise SystemExit(GpuCheck(args).main())


if __name__ == "__main__":
    main()
