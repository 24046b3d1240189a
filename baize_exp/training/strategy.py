"""How training is spread over devices: the Lightning strategy object built from `strategy=` and `trainer=`.

    strategy=auto                       Lightning picks (one device; DDP when trainer.devices > 1)
    strategy=ddp                        one full replica per device; only the LoRA grads are all-reduced
    strategy=deepspeed_stage_2          ZeRO-2: optimizer state and gradients sharded over the ranks
    strategy=deepspeed_stage_3          ZeRO-3: the (frozen) base weights sharded too
    strategy=deepspeed_stage_3_offload  ZeRO-3 with parameters and optimizer state in CPU memory

For DeepSpeed we write the whole DeepSpeed config dict ourselves (`deepspeed_config`), so what DeepSpeed runs with
is one plain dict that a test can read and that a raw `deepspeed.initialize` accepts too, instead of flags that
Lightning turns into a dict somewhere inside. Precision, clipping and accumulation come from the `trainer` config,
so the dict and the Trainer cannot disagree.

Many devices and nodes: `trainer.devices` and `trainer.num_nodes` go to the Trainer unchanged. Lightning finds the
cluster itself (its `SLURMEnvironment` under `srun`, `TorchElasticEnvironment` under `torchrun`, otherwise it
launches the local ranks itself), so the same config runs on one CPU, one GPU or many nodes; see the README.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

# Precision names Lightning uses → which DeepSpeed half-precision section they turn on.
_DS_HALF = {"bf16-mixed": "bf16", "bf16-true": "bf16", "16-mixed": "fp16", "16-true": "fp16"}


def deepspeed_config(scfg: Any, tcfg: Any, micro_batch_size: int) -> dict[str, Any]:
    """The complete DeepSpeed config for a `strategy.name=deepspeed` config, the trainer config and the per-device
    batch size. It is what `deepspeed.initialize(config=...)` takes; Lightning gets it minus
    `gradient_accumulation_steps` (see `build_strategy`)."""
    if scfg.name != "deepspeed":
        raise ValueError(f"strategy.name={scfg.name!r}: deepspeed_config is only for strategy.name=deepspeed")
    zero: dict[str, Any] = {
        "stage": int(scfg.stage),
        "contiguous_gradients": True,
        "overlap_comm": bool(scfg.overlap_comm),
        "allgather_bucket_size": int(scfg.bucket_size),
        "reduce_bucket_size": int(scfg.bucket_size),
    }
    if scfg.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": bool(scfg.pin_memory)}
    if scfg.offload_parameters:
        zero["offload_param"] = {"device": "cpu", "pin_memory": bool(scfg.pin_memory)}
    cfg: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": int(micro_batch_size),
        "gradient_accumulation_steps": int(tcfg.accumulate_grad_batches),
        "gradient_clipping": float(tcfg.gradient_clip_val or 0.0),
        "zero_optimization": zero,
        # The optimizer is the LightningModule's torch AdamW, not one from this dict.
        "zero_allow_untested_optimizer": True,
        # With offload DeepSpeed insists on its own CPU Adam unless told otherwise; a torch AdamW over the few LoRA
        # weights is cheap, and keeping one optimizer for every strategy keeps runs comparable.
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 10**9,  # Lightning logs; keep DeepSpeed's own step prints out of the way
    }
    half = _DS_HALF.get(str(tcfg.precision))
    if half == "bf16":
        cfg["bf16"] = {"enabled": True}
    elif half == "fp16":
        # Dynamic loss scaling (loss_scale 0) as fp16 training needs; the rest are DeepSpeed's defaults spelt out.
        cfg["fp16"] = {
            "enabled": True,
            "loss_scale": 0,
            "initial_scale_power": 16,
            "loss_scale_window": 1000,
            "hysteresis": 2,
            "min_loss_scale": 1,
        }
    return cfg


@contextlib.contextmanager
def frozen_weights_left_out(engine: Any) -> Iterator[None]:
    """While it is open, `engine.save_checkpoint` writes no frozen weight. DeepSpeed's own
    `exclude_frozen_parameters` walks `named_parameters()`, which names a tied weight once, so the other name of a
    tied embedding (SmolLM2's lm_head) stayed in every checkpoint: a whole embedding matrix beside a few MB of LoRA."""
    frozen = {n for n, p in engine.module.named_parameters(remove_duplicate=False) if not p.requires_grad}
    original = engine.module_state_dict

    def trainable_only(*args: Any, **kwargs: Any) -> dict:
        sd = original(*args, **kwargs)
        for name in [k for k in sd if k in frozen]:
            del sd[name]
        return sd

    engine.module_state_dict = trainable_only
    try:
        yield
    finally:
        engine.module_state_dict = original


def _lora_deepspeed_strategy() -> type:
    from pytorch_lightning.strategies import DeepSpeedStrategy

    class LoraDeepSpeedStrategy(DeepSpeedStrategy):
        """Lightning's DeepSpeed strategy whose checkpoints hold only what trains (see `frozen_weights_left_out`);
        loading accepts the missing frozen weights (LoraLM.strict_loading is False)."""

        def save_checkpoint(self, checkpoint: dict, filepath: Any, storage_options: Any = None) -> None:
            with frozen_weights_left_out(self.deepspeed_engine):
                super().save_checkpoint(checkpoint, filepath, storage_options)

    return LoraDeepSpeedStrategy


def build_strategy(scfg: Any, tcfg: Any = None, micro_batch_size: int = 1) -> Any:
    """The Lightning strategy for a `strategy` config (and, for DeepSpeed, the `trainer` config and batch size)."""
    if scfg.name == "auto":
        return "auto"
    if scfg.name == "ddp":
        from pytorch_lightning.strategies import DDPStrategy

        # LoRA leaves most of the graph frozen but every LoRA weight gets a gradient each step, so DDP need not
        # search for unused parameters (that search costs a graph traversal per step).
        return DDPStrategy(find_unused_parameters=bool(scfg.find_unused_parameters))
    if scfg.name == "deepspeed":
        if tcfg is None:
            raise ValueError(
                "build_strategy(strategy.name=deepspeed) needs the trainer config for precision, "
                "clipping and accumulation"
            )
        config = deepspeed_config(scfg, tcfg, micro_batch_size)
        # Lightning sets accumulation from Trainer(accumulate_grad_batches=...) and refuses it in the dict.
        config.pop("gradient_accumulation_steps")
        # checkpoints hold what trains (LoRA weights, optimizer, loop state), never the frozen base: a 7B base
        # would put ~13-27 GB into every checkpoint for a few MB of adapter
        return _lora_deepspeed_strategy()(config=config, exclude_frozen_parameters=True)
    raise ValueError(f"strategy.name={scfg.name!r}: unknown (auto, ddp, deepspeed)")
