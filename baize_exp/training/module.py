"""The LightningModule: a PEFT LoRA model, AdamW with linear warmup and cosine decay, throughput and MFU.

Checkpoints hold only what training changes: the trainable (LoRA) weights, the optimizer and scheduler state,
Lightning's loop state, the RNG states and how many batches were trained, never the frozen base. Resuming
restores all of it and moves the batch sampler to the next batch, so the loss curve continues exactly.

MFU (model FLOPs utilisation) counts the FLOPs the model needs for the real (non-padding) tokens, per token:
forward 2·N_frozen + 2·N_lora, backward 2·N_frozen (gradients flow through the frozen weights to the inputs, but
no weight gradient is formed for them) + 4·N_lora, so 4·N_frozen + 6·N_lora in all (6·N for full fine-tuning);
N_frozen counts the frozen matmul weights (every nn.Linear; the embedding lookup is not a matmul). The LM head's
4·N_head is counted only for tokens that are targets, since `LoraLM.loss` runs the head only there. Causal
attention adds 6·n_layers·d_attn·len² per dialog (QKᵀ and AV, forward 2·d·len², backward twice that).
Activation recomputation (gradient checkpointing) is not counted: it is overhead, not model work. The
figure is divided by a peak measured in this process with a matmul probe (`measure_matmul_peak`) or configured.
"""

from __future__ import annotations

import math
import resource
import time
from typing import Any

import pytorch_lightning as pl
import torch

from baize_exp.errors import UserError
from baize_exp.training.data import IGNORE, attention_sq_lengths, block_causal_mask, tokens_in


def measure_matmul_peak(
    device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32, seconds: float = 1.0
) -> float:
    """Best FLOP/s of square matmuls on `device` over about `seconds` (the ceiling MFU is measured against)."""
    device = torch.device(device)
    n = 4096 if device.type == "cuda" else 1024
    g = torch.Generator(device=device).manual_seed(0)  # not the global RNG: training's dropout stream stays as is
    a = torch.randn(n, n, device=device, dtype=dtype, generator=g)
    b = torch.randn(n, n, device=device, dtype=dtype, generator=g)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    a @ b  # warm-up (kernel selection, page faults)
    sync()
    best, t_end = 0.0, time.perf_counter() + seconds
    while time.perf_counter() < t_end:
        t0 = time.perf_counter()
        for _ in range(4):
            a @ b
        sync()
        best = max(best, 4 * 2 * n**3 / (time.perf_counter() - t0))
    return best


def flop_counts(model: torch.nn.Module) -> dict[str, int]:
    """Parameter counts the FLOP formula needs (see the module docstring)."""
    frozen = sum(
        m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear) and not m.weight.requires_grad
    )
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    head_n = head.weight.numel() if head is not None and not head.weight.requires_grad else 0
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    cfg = getattr(model, "config", None)
    layers = getattr(cfg, "num_hidden_layers", 0) or 0
    heads = getattr(cfg, "num_attention_heads", 0) or 0
    head_dim = getattr(cfg, "head_dim", None) or ((getattr(cfg, "hidden_size", 0) or 0) // max(heads, 1))
    return {
        "frozen_matmul": frozen - head_n,
        "lm_head": head_n,
        "trainable": trainable,
        "layers": layers,
        "d_attn": heads * head_dim,
    }


def model_flops(f: dict[str, int], tokens: int, head_tokens: int, sq_lengths: int) -> float:
    """FLOPs of one forward+backward over `tokens` real tokens (the LM head over `head_tokens` of them)."""
    return (
        (4 * f["frozen_matmul"] + 6 * f["trainable"]) * tokens
        + 4 * f["lm_head"] * head_tokens
        + 6 * f["layers"] * f["d_attn"] * sq_lengths
    )


def peak_memory_gb(device: torch.device) -> float:
    """Peak memory of this process: CUDA allocator peak on a GPU, peak resident set size on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class LoraLM(pl.LightningModule):
    def __init__(
        self,
        model: torch.nn.Module,
        lr: float,
        weight_decay: float = 0.0,
        warmup_steps: int = 0,
        log_prefix: str = "",
        min_lr_ratio: float = 0.1,
        peak_flops: float | None = None,
        fingerprint: str | None = None,
    ):
        super().__init__()
        self.model = model  # a peft model: only LoRA weights require grad
        self.lr, self.weight_decay, self.warmup_steps = lr, weight_decay, warmup_steps
        self.min_lr_ratio, self.peak_flops, self.fingerprint = min_lr_ratio, peak_flops, fingerprint
        self.prefix = log_prefix
        self.strict_loading = False  # checkpoints hold the trainable weights only; on_load_checkpoint checks them
        self.flops = flop_counts(model)
        self.tokens_seen = 0  # real tokens trained on by this rank
        self.supervised_seen = 0  # of which targets of the loss
        self.run_tokens = self.run_supervised = 0  # the same, by this process only (not restored on resume)
        self.run_flops = 0.0
        # The steady window MFU is measured over: from the end of this session's first optimizer step (kernel
        # selection, allocator growth, lazy init) to the end of training.
        self._steady: dict[str, float] | None = None
        self.steady_seconds = self.steady_flops = 0.0
        self.batches_trained = 0  # micro-batches trained by this rank since the start (drives exact resume)
        self.step_losses: list[float] = []  # per micro-batch, for tests and the fit summary
        self._window = {"t": 0.0, "tokens": 0, "supervised": 0, "flops": 0.0}
        self._resume: dict | None = None
        self.train_seconds = 0.0

    # --- forward ---------------------------------------------------------------------------------------------------
    def _inputs(self, batch: dict[str, torch.Tensor]) -> dict[str, Any]:
        kw: dict[str, Any] = {"input_ids": batch["input_ids"], "use_cache": False}
        if "doc_ids" in batch:  # packed rows: positions restart per dialog, attention stays inside each
            kw["position_ids"] = batch["position_ids"]
            impl = getattr(self.model.config, "_attn_implementation", "sdpa")
            if "flash" not in str(impl):  # flash-attention finds the boundaries from position_ids alone
                mask = block_causal_mask(batch["doc_ids"])
                if impl == "eager":  # eager adds the mask to the scores
                    mask = torch.zeros(mask.shape, device=mask.device).masked_fill(
                        ~mask, torch.finfo(torch.float32).min
                    )
                kw["attention_mask"] = mask
        else:
            kw["attention_mask"] = batch["attention_mask"]
        return kw

    def forward(self, **batch: torch.Tensor) -> Any:
        """The HF model's output (logits for every position, and its loss when labels are given)."""
        return self.model(**self._inputs(batch), labels=batch.get("labels"))

    def loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Mean cross-entropy over the target tokens, with the LM head run only where there is a target.

        The same value as the HF loss, but with loss on the AI turns only, a third or more of the positions
        have no target: their vocabulary-wide logits (the largest activation in a small model) are never made.
        """
        base = self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model
        body = getattr(base, getattr(base, "base_model_prefix", "model"), None)
        if body is None or getattr(base.config, "final_logit_softcapping", None):
            return self(**batch).loss  # an architecture this shortcut does not know: the HF loss
        hidden = body(**self._inputs(batch)).last_hidden_state[:, :-1]
        target = batch["labels"][:, 1:]
        keep = target != IGNORE
        logits = base.get_output_embeddings()(hidden[keep]).float()
        return torch.nn.functional.cross_entropy(logits, target[keep])

    def _model_flops(self, batch: dict[str, torch.Tensor], tokens: int, supervised: int) -> float:
        return model_flops(self.flops, tokens, supervised, attention_sq_lengths(batch))

    # --- steps -----------------------------------------------------------------------------------------------------
    def on_train_start(self) -> None:
        if self._resume is not None:  # continue with the batch after the last one trained, with the same RNG
            self.trainer.train_dataloader.batch_sampler.resume_at(self._resume["batches_trained"])
            _set_rng_state(self._resume["rng"])
            self._resume = None
        self._window["t"] = time.perf_counter()
        self._t_start = time.perf_counter()
        self._first_step, self._steady = self.trainer.global_step, None

    def on_train_epoch_start(self) -> None:
        # Lightning calls set_epoch on a loader's sampler, not on a batch sampler: a new order per epoch
        self.trainer.train_dataloader.batch_sampler.set_epoch(self.current_epoch)

    def on_train_end(self) -> None:
        now = time.perf_counter()
        self.train_seconds = now - self._t_start
        if self._steady is not None:
            self.steady_seconds = now - self._steady["t"]
            self.steady_flops = self.run_flops - self._steady["flops"]

    def on_train_batch_end(self, *args: Any) -> None:
        # the first optimizer step of this session is over once global_step has moved past where it started
        if self._steady is None and self.trainer.global_step > self._first_step:
            self._steady = {"t": time.perf_counter(), "flops": self.run_flops}

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = self.loss(batch)
        tokens = tokens_in(batch)
        supervised = int((batch["labels"][:, 1:] != IGNORE).sum())
        flops = self._model_flops(batch, tokens, supervised)
        self.tokens_seen += tokens
        self.supervised_seen += supervised
        self.run_tokens += tokens
        self.run_supervised += supervised
        self.run_flops += flops
        self.batches_trained += 1
        w = self._window
        w["tokens"], w["supervised"], w["flops"] = (
            w["tokens"] + tokens,
            w["supervised"] + supervised,
            w["flops"] + flops,
        )
        self.step_losses.append(float(loss.detach()))
        self.log(f"{self.prefix}train/loss", loss, prog_bar=True, batch_size=max(supervised, 1))
        return loss

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        """Once per optimizer step (after accumulation, before clipping): grad norm, lr and throughput."""
        grads = [p.grad for p in self.model.parameters() if p.requires_grad and p.grad is not None]
        if grads:
            norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in grads]))
            self.log(f"{self.prefix}train/grad_norm", norm, batch_size=1)
        p = self.prefix
        self.log(f"{p}train/lr", optimizer.param_groups[0]["lr"], batch_size=1)
        now, w = time.perf_counter(), self._window
        dt = max(now - w["t"], 1e-9)
        world = self.trainer.world_size
        self.log(f"{p}train/tokens_per_s", w["tokens"] * world / dt, prog_bar=True, batch_size=1)
        self.log(f"{p}train/supervised_tokens_per_s", w["supervised"] * world / dt, batch_size=1)
        if self.peak_flops:
            self.log(f"{p}train/mfu", w["flops"] / dt / self.peak_flops, batch_size=1)
        self.log(f"{p}train/peak_mem_gb", peak_memory_gb(self.device), batch_size=1)
        self._window = {"t": now, "tokens": 0, "supervised": 0, "flops": 0.0}

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        loss = self.loss(batch)
        n = int((batch["labels"][:, 1:] != IGNORE).sum())
        # weight by supervised tokens so the epoch value is the per-token loss, not a mean of batch means
        self.log(f"{self.prefix}val/loss", loss, prog_bar=True, batch_size=max(n, 1), sync_dist=True)

    def on_validation_epoch_end(self) -> None:
        loss = self.trainer.callback_metrics.get(f"{self.prefix}val/loss")
        if loss is not None:
            self.log(f"{self.prefix}val/ppl", math.exp(min(float(loss), 50)), batch_size=1, sync_dist=True)

    def configure_optimizers(self):
        params = [p for p in self.model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=self.lr, weight_decay=self.weight_decay)
        total = max(1, int(self.trainer.estimated_stepping_batches))
        warm = min(self.warmup_steps, total - 1) if total > 1 else 0
        floor = self.min_lr_ratio

        def schedule(step: int) -> float:
            if step < warm:
                return (step + 1) / (warm + 1)
            progress = (step - warm) / max(1, total - warm)
            return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

        sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    # --- checkpoints: trainable weights + state, never the frozen base ----------------------------------------------
    def _trainable_keys(self) -> set[str]:
        return {n for n, p in self.named_parameters() if p.requires_grad}

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        keep = self._trainable_keys()
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in keep}
        checkpoint["baize"] = {
            "batches_trained": self.batches_trained,
            "rng": _rng_state(),
            "fingerprint": self.fingerprint,
            "tokens_seen": self.tokens_seen,
            "supervised_seen": self.supervised_seen,
        }

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        state = checkpoint.get("baize")
        if state is None:
            raise UserError(
                "train.resume: the checkpoint was not written by baize_exp (no 'baize' state); cannot resume from "
                "it: set train.resume=never, or point train.resume at a baize_exp checkpoint"
            )
        if self.fingerprint and state.get("fingerprint") and state["fingerprint"] != self.fingerprint:
            raise UserError(
                f"train.resume: the checkpoint was written for a different model/LoRA/train config or data "
                f"({state['fingerprint']} != {self.fingerprint}); set train.resume=never or use a "
                f"new run dir"
            )
        # Under DeepSpeed there is no `state_dict` here: Lightning's DeepSpeedStrategy hands DeepSpeed the checkpoint
        # minus `state_dict` and `optimizer_states` as its client state, and on resume returns only that client
        # state; DeepSpeed has restored the weights and optimizer itself by then.
        weights = checkpoint.get("state_dict")
        missing = self._trainable_keys() - set(weights) if weights is not None else set()
        if missing:
            raise UserError(
                f"train.resume: the checkpoint lacks {len(missing)} trainable weight(s), e.g. {sorted(missing)[:3]}; "
                f"it was made for other LoRA targets: set train.resume=never or use a new run dir"
            )
        self.batches_trained = state["batches_trained"]
        self.tokens_seen, self.supervised_seen = state["tokens_seen"], state["supervised_seen"]
        self._resume = state
