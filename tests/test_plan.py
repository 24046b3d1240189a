"""The plan stage: parameter counts from the architecture on the meta device, memory per GPU, the CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers.cli import run_cli
from helpers.config import compose_cfg

from baize_exp import models as M
from baize_exp.config import ConfigError, validate
from baize_exp.stages import plan as P

CACHE = lambda: Path(os.environ["BAIZE_CACHE"])  # noqa: E731


def test_tiny_counts_equal_the_real_model_and_peft() -> None:
    cfg = compose_cfg(["model=tiny", "lora.r=4", "lora.target_modules=[q_proj,v_proj,down_proj]"])
    sh = P.model_shape(cfg.model, cfg.lora)
    real = M.attach_lora(M.load_model(cfg.model, CACHE()), cfg.lora)
    assert (sh.total, sh.trainable) == M.count_parameters(real)
    layers = real.get_base_model().model.layers
    linears = sum(
        m.weight.numel()
        for layer in layers
        for m in layer.modules()
        if isinstance(m, torch.nn.Linear) and not m.weight.requires_grad
    )
    assert sh.frozen_linear == linears  # what an 8/4-bit base quantizes
    assert sh.lora_inputs == [64, 64, 128]  # q, v take the hidden size, down the intermediate size
    # nothing was allocated: the meta model has no storage
    assert all(p.is_meta for p in P.build_meta_model(cfg.model, cfg.lora).parameters())


@pytest.mark.parametrize("option, base", [("7b", 6_738_415_616), ("13b", 13_015_864_320), ("30b", 32_528_943_616)])
def test_llama_counts_from_the_architecture_alone(option: str, base: int) -> None:
    """LLaMA-1 sizes as published (6.74B, 13.0B, 32.5B), with no weights anywhere on this machine."""
    cfg = compose_cfg([f"model={option}", "lora.r=8", "lora.target_modules=[q_proj,v_proj]"])
    assert cfg.model.path is None
    sh = P.model_shape(cfg.model, cfg.lora)
    assert sh.total - sh.trainable == base
    # LoRA r=8 on q and v: 2 modules × r × (h + h) per layer
    h, L = cfg.model.hidden_size, cfg.model.num_hidden_layers
    assert sh.trainable == L * 2 * 8 * (h + h)
    if option == "7b":
        assert sh.trainable == 4_194_304


def test_local_model_architecture_comes_from_its_config_json(tmp_path: Path) -> None:
    small = compose_cfg(["model=tiny"]).model
    M.load_model(small, CACHE()).save_pretrained(tmp_path / "m")
    cfg = compose_cfg(["model=7b", f"model.path={tmp_path / 'm'}"])  # 7b's numbers say 6.7B; config.json wins
    sh = P.model_shape(cfg.model, cfg.lora)
    assert sh.total - sh.trainable == sum(p.numel() for p in M.load_model(small, CACHE()).parameters())


def _row(plan: dict, strategy: str, precision: str) -> dict:
    return next(r for r in plan["rows"] if (r["strategy"], r["precision"]) == (strategy, precision))


def test_sharding_divides_by_the_number_of_gpus() -> None:
    one = P.make_plan(compose_cfg(["model=7b", "trainer.devices=1"]))
    eight = P.make_plan(compose_cfg(["model=7b", "trainer.devices=4", "trainer.num_nodes=2"]))
    assert eight["setup"]["world_size"] == 8
    sh = P.model_shape(compose_cfg(["model=7b"]).model, compose_cfg(["model=7b"]).lora)
    working_set = 2 * sh.largest_block * 2 / P.GIB  # two gathered blocks in bf16
    z3_1, z3_8 = _row(one, "deepspeed_stage_3", "bf16-mixed"), _row(eight, "deepspeed_stage_3", "bf16-mixed")
    assert z3_1["weights_gb"] - working_set == pytest.approx(8 * (z3_8["weights_gb"] - working_set), rel=5e-3)
    for key in ("grads_gb", "optimizer_gb"):
        assert z3_1[key] == pytest.approx(8 * z3_8[key], rel=2e-2)
    z2_1, z2_8 = _row(one, "deepspeed_stage_2", "bf16-mixed"), _row(eight, "deepspeed_stage_2", "bf16-mixed")
    assert z2_1["weights_gb"] == z2_8["weights_gb"]  # ZeRO-2 keeps the whole base on every GPU
    assert z2_1["optimizer_gb"] == pytest.approx(8 * z2_8["optimizer_gb"], rel=2e-2)
    d1, d8 = _row(one, "auto/ddp", "bf16-mixed"), _row(eight, "auto/ddp", "bf16-mixed")
    assert d1["total_gb"] == d8["total_gb"]  # DDP replicates everything
    # offload: the GPU keeps only the working set; the node's CPU holds its 4 ranks' shards of the rest
    off = _row(eight, "deepspeed_stage_3_offload", "bf16-mixed")
    assert off["weights_gb"] == pytest.approx(working_set, abs=0.01) and off["optimizer_gb"] == 0
    assert off["cpu_per_node_gb"] == pytest.approx(
        (sh.total - sh.trainable) * 2 / P.GIB / 2 + 16 * sh.trainable / P.GIB / 2, rel=1e-2
    )


def test_precisions_and_quantized_bases_order_memory_as_they_should() -> None:
    plan = P.make_plan(compose_cfg(["model=13b"]))
    w = {p: _row(plan, "auto/ddp", p)["weights_gb"] for p in P.PRECISIONS}
    assert w["32-true"] > w["bf16-mixed"] == w["16-mixed"] > w["int8 base"] > w["nf4 base"]
    assert w["32-true"] == pytest.approx(2 * w["bf16-mixed"], rel=1e-2)
    assert "n/a" in _row(plan, "deepspeed_stage_3", "nf4 base")["note"]
    for r in plan["rows"]:
        if "note" not in r:
            assert r["activations_ckpt_gb"] < r["activations_gb"]
            assert r["fits_ckpt"] or not r["fits"]


def test_fit_and_recommendation_follow_the_card_size() -> None:
    big = P.make_plan(compose_cfg(["model=13b", "plan.gpu_memory_gb=80"]))
    assert big["recommendation"] == "strategy=ddp precision=bf16-mixed"
    small = P.make_plan(compose_cfg(["model=13b", "plan.gpu_memory_gb=16", "trainer.devices=4"]))
    assert not _row(small, "auto/ddp", "bf16-mixed")["fits_ckpt"]  # 24 GiB of bf16 weights on every card
    assert _row(small, "deepspeed_stage_3", "bf16-mixed")["fits_ckpt"]
    assert small["recommendation"] == "strategy=deepspeed_stage_3 precision=bf16-mixed with gradient checkpointing"
    none = P.make_plan(compose_cfg(["model=30b", "plan.gpu_memory_gb=2"]))
    assert none["recommendation"] is None


def _saved_bytes(model: torch.nn.Module, ids: torch.Tensor, autocast: bool) -> int:
    """Bytes of the activations autograd keeps for the backward (parameters excluded), plus the logits output."""
    params = {p.data_ptr() for p in model.parameters()}
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        if t.data_ptr() not in params and t.numel():
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with (
        torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t),
        torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast),
    ):
        out = model(input_ids=ids, labels=ids)
    return sum(storages.values()) + out.logits.untyped_storage().nbytes()


@pytest.mark.parametrize(
    "precision, attention, dropout",
    [
        ("32-true", "sdpa", 0.0),
        ("32-true", "eager", 0.05),
        ("bf16-mixed", "sdpa", 0.05),
        ("bf16-mixed", "eager", 0.0),
    ],
)
def test_activation_formula_matches_what_autograd_saves(precision: str, attention: str, dropout: float) -> None:
    """The activation estimate against the real bytes saved for the backward by a LoRA Llama on CPU."""
    cfg = compose_cfg(
        [
            "model=tiny",
            "model.hidden_size=256",
            "model.intermediate_size=688",
            "model.num_hidden_layers=4",
            "model.num_attention_heads=8",
            "model.num_key_value_heads=4",
            "model.vocab_size=2000",
            f"lora.dropout={dropout}",
        ]
    )
    mixed = precision != "32-true"
    model = M.load_model(cfg.model, CACHE(), dtype=torch.bfloat16 if mixed else torch.float32)
    model.config._attn_implementation = attention
    peft = M.attach_lora(model, cfg.lora).train()
    for p in peft.parameters():  # LoRA weights stay fp32 under mixed precision
        if p.requires_grad:
            p.data = p.data.float()
    seq, batch = 128, 2
    ids = torch.randint(0, cfg.model.vocab_size, (batch, seq), generator=torch.Generator().manual_seed(0))
    measured = _saved_bytes(peft, ids, autocast=mixed)
    est = P.activation_bytes(
        P.model_shape(cfg.model, cfg.lora), seq, batch, precision, attention != "eager", cfg.lora.r, dropout
    )
    # the estimate also counts the transient fp32 copy of the logits under mixed precision (peak, not saved)
    transient = seq * batch * cfg.model.vocab_size * 4 if mixed else 0
    assert 0.8 < (est["full"] - transient) / measured < 1.25, (est, measured)

    model.gradient_checkpointing_enable()
    measured_ckpt = _saved_bytes(peft, ids, autocast=mixed)  # what stays during the forward; recompute is extra
    kept = est["ckpt"] - est["per_layer"] - transient
    assert 0.75 < kept / measured_ckpt < 1.3, (kept, measured_ckpt)


def test_plan_config_is_validated() -> None:
    with pytest.raises(ConfigError, match=r"plan.gpu_memory_gb=0"):
        validate(compose_cfg(["plan.gpu_memory_gb=0"]))


def test_cli_prints_the_table_and_writes_plan_files(tmp_path: Path) -> None:
    run = tmp_path / "p"
    r = subprocess.run(
        [
            sys.executable,
            "-c",
            "from baize_exp.cli import plan; plan()",
            "model=7b",
            "lora.r=16",
            "trainer.devices=2",
            "plan.gpu_memory_gb=24",
            f"hydra.run.dir={run}",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
        env=dict(os.environ),
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert "| deepspeed_stage_3_offload | bf16-mixed |" in r.stdout and "total 6,7" in r.stdout
    assert "2 GPU(s)" in r.stdout and "24.0 GiB" in r.stdout
    plan = json.loads((run / "plan" / "plan.json").read_text())
    assert plan["lora"]["r"] == 16 and plan["setup"]["world_size"] == 2
    assert (run / "plan" / "plan.md").read_text() in r.stdout


@pytest.mark.slow
def test_run_py_plan_stage_runs_again_each_time(tmp_path: Path) -> None:
    run = tmp_path / "r"
    r = run_cli("model=13b", "lora.r=8", "stages=[plan]", "logger=none", f"hydra.run.dir={run}", timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "| auto/ddp |" in r.stdout
    m = json.loads((run / "metrics.json").read_text())["plan"]
    assert m["params_total"] > 13e9 and m["world_size"] == 1
    # no completion marker: a rerun with another card size plans again instead of refusing
    r = run_cli(
        "model=13b",
        "lora.r=8",
        "stages=[plan]",
        "logger=none",
        "plan.gpu_memory_gb=24",
        f"hydra.run.dir={run}",
        timeout=300,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert json.loads((run / "plan" / "plan.json").read_text())["setup"]["gpu_memory_gb"] == 24


@pytest.mark.slow
def test_embedded_model_numbers_match_the_real_converted_model() -> None:
    """smollm2_135m is planned from conf/model numbers (no conversion needed); they must be the real model's."""
    cfg = compose_cfg(["model=smollm2_135m"])
    sh = P.model_shape(cfg.model, cfg.lora)
    real = M.attach_lora(M.load_model(cfg.model, CACHE()), cfg.lora)
    assert (sh.total, sh.trainable) == M.count_parameters(real)


@pytest.mark.parametrize("option", ["tiny", "smollm2_135m"])
@pytest.mark.parametrize(("precision", "dtype"), [("32-true", torch.float32), ("bf16-mixed", torch.bfloat16)])
def test_planned_weight_bytes_are_the_loaded_models_bytes(option: str, precision: str, dtype: torch.dtype) -> None:
    """The planner counts the base as the trainer loads it: model.dtype=auto follows the precision, so the plan's
    weight bytes are the loaded model's parameter bytes, byte for byte."""
    cfg = compose_cfg([f"model={option}", f"trainer.precision={precision}"])
    assert M.base_dtype(cfg.model, precision) == dtype
    loaded = M.load_model(cfg.model, Path(os.environ["BAIZE_CACHE"]), M.base_dtype(cfg.model, precision))
    loaded_bytes = sum(p.numel() * p.element_size() for p in loaded.parameters())
    assert {p.dtype for p in loaded.parameters()} == {dtype}
    assert P.base_weight_bytes(P.model_shape(cfg.model, cfg.lora), cfg.model, precision) == loaded_bytes
    # an explicit model.dtype wins in every row, for the trainer and the planner alike
    fixed = compose_cfg([f"model={option}", "model.dtype=fp32"])
    assert M.base_dtype(fixed.model, "bf16-mixed") == torch.float32
    assert P.base_weight_bytes(P.model_shape(fixed.model, fixed.lora), fixed.model, "bf16-mixed") == sum(
        p.numel() * 4 for p in loaded.parameters()
    )
