"""Strategies from `strategy=` and `trainer=`: every config builds; the DeepSpeed dict we generate; cluster envs;
a raw ZeRO step on CPU (slow); ZeRO runs through run.py (gpu)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from helpers.cli import run_cli
from helpers.config import CONF, compose_cfg

from baize_exp.config import ConfigError, validate
from baize_exp.training.strategy import build_strategy, deepspeed_config

DS_OPTIONS = ["deepspeed_stage_2", "deepspeed_stage_3", "deepspeed_stage_3_offload"]


def test_auto_and_ddp_build_and_pass_devices_and_nodes_through() -> None:
    cfg = compose_cfg(["strategy=auto"])
    assert build_strategy(cfg.strategy, cfg.trainer, 4) == "auto"
    cfg = compose_cfg(["strategy=ddp", "trainer.devices=2", "trainer.num_nodes=3"])
    validate(cfg)
    strategy = build_strategy(cfg.strategy, cfg.trainer, cfg.train.batch_size)
    assert isinstance(strategy, pl.strategies.DDPStrategy)
    tr = cfg.trainer
    trainer = pl.Trainer(
        accelerator=tr.accelerator,
        devices=tr.devices,
        num_nodes=tr.num_nodes,
        strategy=strategy,
        logger=False,
        enable_checkpointing=False,
    )
    assert trainer.strategy is strategy and trainer.world_size == 6 and trainer.num_nodes == 3


@pytest.mark.parametrize(
    "option, stage, offload",
    [("deepspeed_stage_2", 2, False), ("deepspeed_stage_3", 3, False), ("deepspeed_stage_3_offload", 3, True)],
)
@pytest.mark.parametrize("precision, half", [("bf16-mixed", "bf16"), ("16-mixed", "fp16"), ("32-true", None)])
def test_deepspeed_configs_build_their_dict(option: str, stage: int, offload: bool, precision: str, half: str) -> None:
    cfg = compose_cfg(
        [
            f"strategy={option}",
            "trainer=gpu",
            f"trainer.precision={precision}",
            "trainer.accumulate_grad_batches=4",
            "trainer.gradient_clip_val=0.5",
            "train.batch_size=3",
        ]
    )
    validate(cfg)
    ds = deepspeed_config(cfg.strategy, cfg.trainer, cfg.train.batch_size)
    zero = ds["zero_optimization"]
    assert zero["stage"] == stage
    assert ("offload_optimizer" in zero) == offload and ("offload_param" in zero) == offload
    if offload:
        assert zero["offload_optimizer"]["device"] == zero["offload_param"]["device"] == "cpu"
    assert ds["gradient_accumulation_steps"] == 4 and ds["gradient_clipping"] == 0.5
    assert ds["train_micro_batch_size_per_gpu"] == 3
    assert ("bf16" in ds) == (half == "bf16") and ("fp16" in ds) == (half == "fp16")
    if half == "fp16":
        assert ds["fp16"]["enabled"] and ds["fp16"]["loss_scale"] == 0  # dynamic loss scaling
    json.dumps(ds)  # plain data: what DeepSpeed (and a json file) takes

    strategy = build_strategy(cfg.strategy, cfg.trainer, cfg.train.batch_size)
    assert isinstance(strategy, pl.strategies.DeepSpeedStrategy)
    assert strategy.exclude_frozen_parameters  # checkpoints hold what trains, never the frozen base
    # Lightning gets the same dict minus accumulation, which it takes from Trainer(accumulate_grad_batches=...)
    assert strategy.config == {k: v for k, v in ds.items() if k != "gradient_accumulation_steps"}


def test_deepspeed_without_trainer_config_or_on_cpu_is_refused() -> None:
    cfg = compose_cfg(["strategy=deepspeed_stage_2"])  # trainer=cpu
    with pytest.raises(ConfigError, match=r"trainer.accelerator='cpu'.*trainer=gpu"):
        validate(cfg)
    with pytest.raises(ValueError, match="needs the trainer config"):
        build_strategy(cfg.strategy)
    with pytest.raises(ConfigError, match="strategy.offload_parameters"):
        validate(compose_cfg(["strategy=deepspeed_stage_2", "trainer=gpu", "strategy.offload_parameters=true"]))


def test_slurm_and_torchrun_environments_are_picked_up(monkeypatch: pytest.MonkeyPatch) -> None:
    """Multi-node is Lightning's own: under srun/torchrun the ranks come from the environment, not from us."""
    from lightning_fabric.plugins.environments import SLURMEnvironment, TorchElasticEnvironment
    from pytorch_lightning.utilities.rank_zero import rank_zero_only

    # building a Trainer sets the process-wide rank_zero_only.rank (here 3, then 2): restore it afterwards, or every
    # later test in this process would have its rank-zero-only logging (CSV logs, checkpoints) silently skipped
    monkeypatch.setattr(rank_zero_only, "rank", rank_zero_only.rank)
    cfg = compose_cfg(["strategy=ddp", "trainer.devices=2", "trainer.num_nodes=2"])
    tr = cfg.trainer

    def trainer() -> pl.Trainer:
        return pl.Trainer(
            accelerator=tr.accelerator,
            devices=tr.devices,
            num_nodes=tr.num_nodes,
            strategy=build_strategy(cfg.strategy, tr, 1),
            logger=False,
            enable_checkpointing=False,
        )

    slurm = {
        "SLURM_NTASKS": "4",
        "SLURM_NTASKS_PER_NODE": "2",
        "SLURM_JOB_NAME": "baize",
        "SLURM_JOB_ID": "7",
        "SLURM_PROCID": "3",
        "SLURM_LOCALID": "1",
        "SLURM_NODEID": "1",
        "SLURM_NODELIST": "node[1-2]",
    }
    with monkeypatch.context() as m:
        for k, v in slurm.items():
            m.setenv(k, v)
        t = trainer()
        assert isinstance(t.strategy.cluster_environment, SLURMEnvironment)
        assert (t.global_rank, t.local_rank, t.node_rank, t.world_size) == (3, 1, 1, 4)

    elastic = {
        "TORCHELASTIC_RUN_ID": "r1",
        "RANK": "2",
        "LOCAL_RANK": "0",
        "GROUP_RANK": "1",
        "WORLD_SIZE": "4",
        "LOCAL_WORLD_SIZE": "2",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": "29512",
    }
    with monkeypatch.context() as m:
        for k in slurm:
            m.delenv(k, raising=False)
        for k, v in elastic.items():
            m.setenv(k, v)
        t = trainer()
        assert isinstance(t.strategy.cluster_environment, TorchElasticEnvironment)
        assert (t.global_rank, t.local_rank, t.world_size) == (2, 0, 4)


# A raw DeepSpeed step on CPU: the dict our ZeRO config generates, the tiny model with LoRA, a torch AdamW. Each
# rank trains on its own batch; it reports its losses, the Adam state it holds and a checksum of the LoRA weights.
_RAW_ZERO = r"""
import json, sys, torch, deepspeed
from hydra import compose, initialize_config_dir
from baize_exp.config import register_configs
from baize_exp import models as M
from baize_exp.training.fused_lora import use_fused_lora
from baize_exp.training.strategy import deepspeed_config

register_configs()
with initialize_config_dir(config_dir=sys.argv[1], version_base="1.3"):
    cfg = compose(config_name="config", overrides=["model=tiny", f"strategy={sys.argv[2]}", "trainer=gpu",
                  "trainer.precision=32-true", "trainer.accumulate_grad_batches=2", "trainer.gradient_clip_val=1.0",
                  "lora.dropout=0.0", "train.batch_size=2"])
model = M.attach_lora(M.load_model(cfg.model, None), cfg.lora).train()
use_fused_lora(model)  # as fit() does: it must train under ZeRO-2 and stand aside for ZeRO-3's partitioned weights
grad_fns = set()
model.get_submodule("base_model.model.model.layers.0.self_attn.q_proj").register_forward_hook(
    lambda mod, inp, out: grad_fns.add(type(out.grad_fn).__name__))
ds = deepspeed_config(cfg.strategy, cfg.trainer, cfg.train.batch_size)
params = [p for p in model.parameters() if p.requires_grad]
n_trainable = sum(p.numel() for p in params)
opt = torch.optim.AdamW(params, lr=1e-2)
engine, zero_opt, _, _ = deepspeed.initialize(model=model, optimizer=opt, model_parameters=params, config=ds)
rank = engine.global_rank
ids = torch.randint(0, cfg.model.vocab_size, (2, 32), generator=torch.Generator().manual_seed(rank))
losses = []
for _ in range(12):
    loss = engine(input_ids=ids, labels=ids).loss
    engine.backward(loss)
    engine.step()
    losses.append(loss.item())
adam_state = sum(v.numel() for st in zero_opt.optimizer.state.values() for v in st.values()
                 if torch.is_tensor(v) and v.dim() > 0)
with deepspeed.zero.GatheredParameters(params):  # ZeRO-3 keeps only a shard in each parameter; gather to read it
    checksum = sum(float(p.double().sum()) for p in params)
print("RESULT " + json.dumps({"losses": losses, "stage": engine.zero_optimization_stage(), "rank": rank,
                              "accum": engine.gradient_accumulation_steps(), "steps": engine.global_steps,
                              "trainable": n_trainable, "adam_state": adam_state, "checksum": checksum,
                              "q_proj_grad_fns": sorted(grad_fns)}))
"""


# Save, then resume, with raw DeepSpeed on CPU: the checkpoint holds what trains (frozen base excluded), the adapter
# written from the gathered weights is complete, and a fresh engine loading the checkpoint continues exactly.
_RAW_ZERO_CKPT = r"""
import json, sys, torch, deepspeed
from pathlib import Path
from hydra import compose, initialize_config_dir
from peft import PeftModel
from safetensors.torch import load_file
from baize_exp.config import register_configs
from baize_exp import models as M
from baize_exp.training import save_adapter, trainable_state
from baize_exp.training.strategy import deepspeed_config, frozen_weights_left_out

register_configs()
with initialize_config_dir(config_dir=sys.argv[1], version_base="1.3"):
    cfg = compose(config_name="config", overrides=["model=tiny", f"strategy={sys.argv[2]}", "trainer=gpu",
                  "trainer.precision=32-true", "lora.dropout=0.0", "train.batch_size=2"])
out = Path(sys.argv[3])
ds = deepspeed_config(cfg.strategy, cfg.trainer, cfg.train.batch_size)

def engine_for(seed):
    torch.manual_seed(seed)  # a different LoRA init for the resumed engine: the checkpoint must overwrite it
    model = M.attach_lora(M.load_model(cfg.model, None), cfg.lora).train()
    params = [p for p in model.parameters() if p.requires_grad]
    engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.AdamW(params, lr=1e-2),
                                      model_parameters=params, config=ds)
    return model, engine

def steps(engine, n, rank):
    losses = []
    for k in range(n):
        ids = torch.randint(0, cfg.model.vocab_size, (2, 32), generator=torch.Generator().manual_seed(100 * rank + k))
        loss = engine(input_ids=ids, labels=ids).loss
        engine.backward(loss)
        engine.step()
        losses.append(loss.item())
    return losses

model, engine = engine_for(0)
rank = engine.global_rank
base_bytes = sum(getattr(p, "ds_numel", p.numel()) * 4 for p in model.parameters() if not p.requires_grad)
steps(engine, 6, rank)
with frozen_weights_left_out(engine):  # what our Lightning strategy does around every checkpoint
    engine.save_checkpoint(str(out / "ckpt"), tag="step6", exclude_frozen_parameters=True)
gathered = trainable_state(model)  # a collective under ZeRO-3: every rank calls it
if rank == 0:
    save_adapter(model, M.load_tokenizer(cfg.model, Path(sys.argv[4])), out / "adapter", {}, state_dict=gathered)
shards = {n: p.ds_numel if hasattr(p, "ds_numel") else p.numel() for n, p in model.named_parameters()
          if p.requires_grad}
continued = steps(engine, 4, rank)
model2, engine2 = engine_for(1)
engine2.load_checkpoint(str(out / "ckpt"), tag="step6", load_module_strict=False)
resumed = steps(engine2, 4, rank)
result = {"rank": rank, "stage": engine.zero_optimization_stage(), "continued": continued, "resumed": resumed,
          "ckpt_bytes": sum(f.stat().st_size for f in (out / "ckpt").rglob("*") if f.is_file()),
          "base_bytes": base_bytes, "trainable": len(gathered),
          "gathered_complete": all(gathered[n].numel() == shards[n] for n in gathered)}
if rank == 0:  # the adapter on disk: every LoRA tensor, whole, equal to the gathered weights
    saved = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    want = {n.replace(".default.", "."): t for n, t in gathered.items()}  # peft drops the adapter name on disk
    result["saved_keys"] = len(saved)
    result["saved_equal"] = saved.keys() == want.keys() and all(torch.equal(saved[k], want[k]) for k in saved)
    reloaded = PeftModel.from_pretrained(M.load_model(cfg.model, None), str(out / "adapter"))
    got = {n: p for n, p in reloaded.named_parameters() if "lora_" in n}
    result["reloaded_equal"] = all(torch.equal(got[n].cpu(), gathered[n]) for n in gathered)
print("RESULT " + json.dumps(result))
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _raw_zero(option: str, world: int, cwd: Path, script: str = _RAW_ZERO) -> list[dict]:
    """Run a script above as `world` DeepSpeed ranks on CPU (fresh processes, one rendezvous on loopback)."""
    port = str(_free_port())
    procs = []
    for rank in range(world):
        env = {
            **os.environ,
            "DS_ACCELERATOR": "cpu",
            "RANK": str(rank),
            "LOCAL_RANK": str(rank),
            "WORLD_SIZE": str(world),
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": port,
            "CUDA_VISIBLE_DEVICES": "",
            # DeepSpeed JIT-compiles its CPU comm op (~20-35 s, minutes on a busy machine): build it once into
            # the shared model cache (conftest points BAIZE_CACHE at a test-owned dir when it is not set)
            "TORCH_EXTENSIONS_DIR": str(Path(os.environ["BAIZE_CACHE"]) / "torch_extensions"),
        }
        procs.append(
            subprocess.Popen(
                [sys.executable, "-c", script, str(CONF), option, str(cwd), os.environ["BAIZE_CACHE"]],
                cwd=cwd,
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
        )
    outs = [p.communicate(timeout=900)[0] for p in procs]
    for p, out in zip(procs, outs, strict=True):
        assert p.returncode == 0, out[-4000:]
    return [json.loads(next(line[7:] for line in out.splitlines() if line.startswith("RESULT "))) for out in outs]


@pytest.mark.slow(seconds=55)  # on this box, 2026-12-03: started first
@pytest.mark.parametrize("option, stage", [("deepspeed_stage_2", 2), ("deepspeed_stage_3", 3)])
def test_raw_deepspeed_zero_step_on_cpu_changes_the_loss(option: str, stage: int, tmp_path: Path) -> None:
    """`deepspeed.initialize` with the dict we generate trains on CPU (DS_ACCELERATOR=cpu, one rank)."""
    [out] = _raw_zero(option, 1, tmp_path)
    assert out["stage"] == stage and out["accum"] == 2
    assert out["steps"] == 6  # 12 micro-batches, an optimizer step every 2
    losses = out["losses"]
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)  # no step before the accumulation boundary
    assert losses[-1] < losses[0] - 0.05, losses  # the LoRA weights moved and the loss fell
    # the fused CPU LoRA layer trains under ZeRO-2; under ZeRO-3 (partitioned weights) peft's own forward runs
    fused = "_LoraLinearBackward" in out["q_proj_grad_fns"]
    assert fused == (stage == 2), out["q_proj_grad_fns"]


@pytest.mark.slow
@pytest.mark.parametrize("option", ["deepspeed_stage_2", "deepspeed_stage_3"])
def test_raw_deepspeed_checkpoint_holds_only_what_trains_and_resumes_exactly(option: str, tmp_path: Path) -> None:
    """Two ranks on CPU: the checkpoint (frozen base excluded, the tied lm_head too) is under a tenth of the base;
    the adapter written from the gathered weights holds every LoRA tensor whole (under ZeRO-3 each rank has only a
    shard: saved without gathering, they are empty and the reload fails); a fresh engine that loads the checkpoint
    continues with the same losses as the engine that never stopped."""
    outs = _raw_zero(option, 2, tmp_path, _RAW_ZERO_CKPT)
    for o in outs:
        assert o["stage"] == int(option[-1])
        assert o["ckpt_bytes"] < o["base_bytes"] / 10, (o["ckpt_bytes"], o["base_bytes"])
        assert o["gathered_complete"] and o["trainable"] == 2 * 7 * 2  # 2 layers x 7 modules x (A, B)
        assert o["resumed"] == pytest.approx(o["continued"], abs=1e-6)
    (first,) = [o for o in outs if o["rank"] == 0]
    assert first["saved_keys"] == first["trainable"] and first["saved_equal"] and first["reloaded_equal"]


@pytest.mark.slow
def test_two_rank_zero2_on_cpu_shards_the_optimizer_state(tmp_path: Path) -> None:
    """What the plan assumes for ZeRO-2: each of D ranks holds 1/D of the Adam state; the weights stay in sync."""
    outs = _raw_zero("deepspeed_stage_2", 2, tmp_path)
    assert sorted(o["rank"] for o in outs) == [0, 1]
    for o in outs:
        assert o["adam_state"] == o["trainable"]  # exp_avg + exp_avg_sq over half of the LoRA weights
        assert o["losses"][-1] < o["losses"][0] - 0.05
    assert outs[0]["losses"][0] != outs[1]["losses"][0]  # each rank saw its own batch ...
    assert outs[0]["checksum"] == pytest.approx(outs[1]["checksum"], rel=1e-9)  # ... and the updates agree


@pytest.mark.slow
@pytest.mark.parametrize("option", ["deepspeed_stage_2", "deepspeed_stage_3"])
def test_lightning_deepspeed_stop_and_resume_counts_and_device_on_cpu(option: str, tmp_path: Path) -> None:
    """`fit()` through Lightning's own DeepSpeedStrategy (our LoraDeepSpeedStrategy, with only its three CUDA-only
    steps swapped for gloo on CPU: tests/helpers/zero_on_cpu.py): straight for 6 steps, then stopped at step 3 and
    resumed by the same call.

    - resume: Lightning hands DeepSpeed the checkpoint minus `state_dict`, and on resume `on_load_checkpoint` gets
      only that client state (the old code read `checkpoint["state_dict"]`: KeyError); the resumed losses equal the
      straight run's;
    - ZeRO-3 partitions the parameters (numel() == 0): `count_parameters` still counts the whole model, and the
      adapter written from the gathered weights holds every LoRA tensor whole;
    - peak memory is read from the device the strategy trained on (cpu:0 here, as cuda:0 on a GPU), not from where
      Lightning's teardown left the module (cpu)."""
    env = {
        **os.environ,
        "DS_ACCELERATOR": "cpu",
        "RANK": "0",
        "LOCAL_RANK": "0",
        "WORLD_SIZE": "1",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(_free_port()),
        "CUDA_VISIBLE_DEVICES": "",
        "TORCH_EXTENSIONS_DIR": str(Path(os.environ["BAIZE_CACHE"]) / "torch_extensions"),
    }
    script = Path(__file__).parent / "helpers" / "zero_on_cpu.py"
    r = subprocess.run(
        [sys.executable, str(script), option, str(tmp_path), os.environ["BAIZE_CACHE"]],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    out = json.loads(next(line[7:] for line in r.stdout.splitlines() if line.startswith("RESULT ")))
    # resume through DeepSpeed's checkpoint directory: on_load_checkpoint saw the client state, without state_dict
    assert out["stopped"] and out["ckpt_is_deepspeed_dir"] and out["resumed_from"].endswith("last.ckpt")
    assert len(out["loaded_keys"]) == 1 and "baize" in out["loaded_keys"][0]
    assert "state_dict" not in out["loaded_keys"][0] and "optimizer_states" not in out["loaded_keys"][0]
    assert out["steps"] == 6 and out["first"] == out["straight"][:3]
    assert out["rest"] == pytest.approx(out["straight"][3:], abs=1e-6)
    assert out["straight"][-1] < out["straight"][0]  # it trained
    # counting: partitioned under ZeRO-3 (the naive count misses the base), whole under ZeRO-2; ours is right in both
    assert out["params_total"] == out["params_plain"][0] and out["params_trainable"] == out["params_plain"][1]
    if option.endswith("3"):
        assert out["partitioned_params"] > 0 and out["naive_total"] < out["params_plain"][0] / 10
    else:
        assert out["partitioned_params"] == 0 and out["naive_total"] == out["params_plain"][0]
    assert out["gathered"] == out["lora_sizes_plain"]  # every LoRA tensor whole
    saved = {k.replace(".default.", "."): v for k, v in out["lora_sizes_plain"].items()}  # peft's names on disk
    assert out["saved_adapter"] == saved
    # the device the strategy trained on, not the one Lightning's teardown moved the module to
    assert out["device"] == "cpu:0" and out["module_device_after_fit"] == "cpu"


def _dialogs(path: Path, n: int = 16) -> Path:
    def turns(i: int) -> list[dict]:
        return [
            {"role": "human", "text": f"What is {i} plus {i}?"},
            {"role": "ai", "text": f"{i} plus {i} is {2 * i}."},
        ]

    path.write_text("".join(json.dumps({"id": f"d{i}", "turns": turns(i)}) + "\n" for i in range(n)))
    return path


def _train_losses(run_dir: Path) -> list[float]:
    """Per-step training losses from the CSV logger, whatever the loss column is called."""
    import csv

    rows = [r for f in sorted(run_dir.rglob("metrics.csv")) for r in csv.DictReader(open(f))]
    names = [k for k in rows[0] if "train" in k and "loss" in k and "epoch" not in k]
    key = next((k for k in ("train/loss_step", "train/loss", "train_loss") if k in names), names[0])
    return [float(r[key]) for r in rows if r.get(key)]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="DeepSpeed through Lightning needs a CUDA GPU")
@pytest.mark.parametrize("option", DS_OPTIONS)
def test_zero_runs_through_run_py_change_the_loss(option: str, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    r = run_cli(
        "model=tiny",
        "stages=[train]",
        f"train.data={_dialogs(tmp_path / 'd.jsonl')}",
        "logger=csv",
        f"strategy={option}",
        "trainer=gpu",
        "trainer.devices=1",
        "trainer.max_epochs=4",
        "trainer.log_every_n_steps=1",
        "train.lr=1e-2",
        "lora.dropout=0.0",
        f"hydra.run.dir={run_dir}",
    )
    assert r.returncode == 0, r.stderr[-4000:]
    losses = _train_losses(run_dir)
    assert len(losses) >= 4 and losses[-1] < losses[0], losses
