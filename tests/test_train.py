"""Training core on the tiny model: label masking, packing boundaries, caching, batching, overfit, exact resume,
checkpoints without the base, logged metrics, LoRA options, and clear errors."""

from __future__ import annotations

import csv
import json
import os
import time
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from helpers.config import compose_cfg

from baize_exp import models as M
from baize_exp.config import ConfigError, validate
from baize_exp.errors import Interrupted, UserError
from baize_exp.training import data as D
from baize_exp.training import fit, load_base_for_training
from baize_exp.training.data import (
    IGNORE,
    ResumableBatchSampler,
    block_causal_mask,
    collate,
    pack_row,
    tokenize_dialog,
)
from baize_exp.training.module import LoraLM

FAST = [
    "model=tiny",
    "logger=none",
    "trainer.enable_progress_bar=false",
    "train.peak_flops=1e11",
    "train.checkpoint_every_n_steps=0",
]


@pytest.fixture(autouse=True)
def _fixed_threads(monkeypatch) -> None:
    """These tests compare runs bit for bit; a thread count that follows the machine's load (baize_exp.cpu) could
    change the order of float sums between two runs of one test."""
    monkeypatch.setenv("BAIZE_THREADS", str(torch.get_num_threads()))


def dialogs(n: int, seed: int = 0) -> list[dict]:
    """Varied short dialogs (1-3 exchanges) with words that differ between human and AI turns."""
    words = ["apple", "river", "stone", "cloud", "green", "quick", "seven", "table", "music", "light"]
    out = []
    for i in range(n):
        k = 1 + (i + seed) % 3
        turns = []
        for j in range(k):
            turns.append({"role": "human", "text": f"Question {i}.{j}: why {words[(i + j) % 10]}?"})
            turns.append({"role": "ai", "text": " ".join(words[(i * j + m) % 10] for m in range(4 + (i % 5)))})
        out.append({"id": f"d{i}", "turns": turns})
    return out


def tiny_cfg(tmp_path: Path, *overrides: str):
    return compose_cfg([*FAST, f"paths.output_dir={tmp_path}", *overrides])


def tiny_lora(cfg):
    model, tok = M.load_model_and_tokenizer(cfg.model, Path(os.environ["BAIZE_CACHE"]))
    torch.manual_seed(0)  # the LoRA A matrices are drawn at random: the same init for runs that are compared
    return M.attach_lora(model, cfg.lora), tok


class LossRecorder(pl.Callback):
    """The loss of every micro-batch, in order, as training_step returned it."""

    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.losses.append(float(outputs["loss"]))


# --- label masking -----------------------------------------------------------------------------------------------

TURNS = [
    {"role": "human", "text": "Tell me about zebras"},
    {"role": "ai", "text": "Zebras are striped."},
    {"role": "human", "text": "And giraffes"},
    {"role": "ai", "text": "Giraffes are tall."},
]
EXPECTED_TARGET = {
    "baize": " Zebras are striped.\n[|Human|] Giraffes are tall.\n[|Human|]",
    "chat_template": "Zebras are striped.<|im_end|>\nGiraffes are tall.<|im_end|>\n",
}


@pytest.mark.parametrize("fmt", ["baize", "chat_template"])
def test_targets_are_exactly_the_ai_turns(tokenizer, fmt: str) -> None:
    ex = tokenize_dialog(TURNS, tokenizer, 512, "ai", fmt)
    targets = [t for t, lab in zip(ex["input_ids"], ex["labels"], strict=True) if lab != IGNORE]
    assert tokenizer.decode(targets) == EXPECTED_TARGET[fmt]  # no human word, system prompt or role header
    # the tokens are the ones a tokenizer gives for the whole text: splitting into segments changed nothing
    whole = tokenizer.decode(ex["input_ids"])
    assert tokenizer(whole, add_special_tokens=False).input_ids == ex["input_ids"]
    every = tokenize_dialog(TURNS, tokenizer, 512, "all", fmt)
    assert every["input_ids"] == ex["input_ids"] and all(lab != IGNORE for lab in every["labels"])


@pytest.mark.parametrize("fmt", ["baize", "chat_template"])
def test_cutoff_drops_whole_exchanges_and_trailing_human_turns(tokenizer, fmt: str) -> None:
    full = tokenize_dialog(TURNS, tokenizer, 512, "ai", fmt)
    first = tokenize_dialog(TURNS[:2], tokenizer, 512, "ai", fmt)
    # one token short of the whole dialog: the second exchange goes as a whole, nothing is cut mid-turn
    assert tokenize_dialog(TURNS, tokenizer, len(full["input_ids"]) - 1, "ai", fmt) == first
    assert tokenize_dialog(TURNS, tokenizer, len(first["input_ids"]) - 1, "ai", fmt) is None
    assert tokenize_dialog([*TURNS, {"role": "human", "text": "Bye"}], tokenizer, 512, "ai", fmt) == full


def test_unknown_format_and_bad_dialog_are_named(tokenizer, tmp_path: Path) -> None:
    with pytest.raises(UserError, match="train.format='alpaca'"):
        tokenize_dialog(TURNS, tokenizer, 512, "ai", "alpaca")
    with pytest.raises(UserError, match="dialog 'x7'"):
        D.encode_dialogs([{"id": "x7", "turns": [{"role": "user", "text": "hi"}]}], tokenizer, 64)


def test_tokenized_cache_is_reused_and_keyed_by_settings(tokenizer, tmp_path: Path, monkeypatch) -> None:
    ds = dialogs(6)
    a, dropped = D.encode_dialogs(ds, tokenizer, 64, "ai", "baize", cache=tmp_path)
    assert len(list((tmp_path / "tokenized").glob("*.arrow"))) == 1

    def boom(*args, **kw):
        raise AssertionError("tokenized again instead of read from the cache")

    monkeypatch.setattr(D, "tokenize_dialogs", boom)
    b, dropped_b = D.encode_dialogs(ds, tokenizer, 64, "ai", "baize", cache=tmp_path)
    assert list(b) == list(a) and dropped_b == dropped
    with pytest.raises(AssertionError, match="tokenized again"):  # other settings, other key
        D.encode_dialogs(ds, tokenizer, 64, "all", "baize", cache=tmp_path)
    with pytest.raises(AssertionError, match="tokenized again"):  # other data, other key
        D.encode_dialogs(dialogs(6, seed=1), tokenizer, 64, "ai", "baize", cache=tmp_path)


# --- packing -------------------------------------------------------------------------------------------------------


def test_pack_examples_fills_rows_without_overflow() -> None:
    lengths = [5, 3, 4, 2, 1, 7, 8, 6]
    rows = D.pack_examples(lengths, 8)
    assert sorted(i for r in rows for i in r) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in r) <= 8 for r in rows)
    assert len(rows) == -(-sum(lengths) // 8)  # these lengths pack perfectly: no row more than needed


def test_block_causal_mask_never_crosses_dialogs() -> None:
    doc = torch.tensor([[1, 1, 2, 2, 2, 0]])
    m = block_causal_mask(doc)[0, 0]
    for q in range(6):
        for k in range(6):
            assert bool(m[q, k]) == (k <= q and doc[0, q] == doc[0, k]), (q, k)


def test_packed_row_attends_only_within_each_dialog(tokenizer, tmp_path: Path) -> None:
    """The logits of a dialog inside a packed row equal its logits alone; without the mask they would not."""
    cfg = tiny_cfg(tmp_path, "lora.dropout=0")
    pm, tok = tiny_lora(cfg)
    pm.eval()
    lm = LoraLM(pm, lr=1e-3)
    ex = [tokenize_dialog(d["turns"], tok, 128) for d in dialogs(3)]
    packed = collate([pack_row(ex)], tok.pad_token_id)
    with torch.no_grad():
        logits = lm(**{**packed, "labels": None}).logits[0]
        off = 0
        for x in ex:
            alone = pm(input_ids=torch.tensor([x["input_ids"]])).logits[0]
            n = len(x["input_ids"])
            assert torch.allclose(logits[off : off + n], alone, atol=1e-4), "attention crossed a dialog boundary"
            off += n
        leaky = pm(input_ids=packed["input_ids"], position_ids=packed["position_ids"]).logits[0]  # no mask
    n0 = len(ex[0]["input_ids"])
    assert not torch.allclose(
        leaky[n0 : n0 + len(ex[1]["input_ids"])], logits[n0 : n0 + len(ex[1]["input_ids"])], atol=1e-4
    )


@pytest.mark.parametrize("loss_on", ["ai", "all"])
def test_packed_loss_equals_unpacked_loss(tokenizer, tmp_path: Path, loss_on: str) -> None:
    cfg = tiny_cfg(tmp_path, "lora.dropout=0")
    pm, tok = tiny_lora(cfg)
    pm.eval()
    lm = LoraLM(pm, lr=1e-3)
    ex = [tokenize_dialog(d["turns"], tok, 128, loss_on) for d in dialogs(5)]
    with torch.no_grad():
        unpacked = lm(**collate(ex, tok.pad_token_id)).loss  # the HF model's own loss, every logit made
        packed = lm.loss(collate([pack_row(ex[:3]), pack_row(ex[3:])], tok.pad_token_id))  # head on targets only
        assert abs(float(lm.loss(collate(ex, tok.pad_token_id))) - float(unpacked)) < 1e-5
    assert abs(float(packed) - float(unpacked)) < 1e-4


# --- batching ----------------------------------------------------------------------------------------------------


def test_batch_sampler_shards_ranks_and_resumes_mid_epoch() -> None:
    lengths = [(i * 7) % 23 + 1 for i in range(21)]

    def make(rank: int) -> ResumableBatchSampler:
        return ResumableBatchSampler(lengths, 2, True, seed=3, group_by_length=True, rank=rank, world_size=2)

    r0, r1 = make(0), make(1)
    b0, b1 = list(r0), list(r1)
    assert len(b0) == len(b1) == len(r0) == 5  # 11 batches over 2 ranks: both get 5
    assert not ({i for b in b0 for i in b} & {i for b in b1 for i in b})
    r0.set_epoch(1)
    epoch1 = list(r0)
    assert epoch1 != b0  # a new order each epoch
    fresh = make(0)
    fresh.resume_at(len(r0) + 2)  # two batches into epoch 1
    assert list(fresh) == epoch1[2:]
    fresh.set_epoch(1)
    assert list(fresh) == epoch1  # the skip applies once


def test_length_grouping_cuts_padding() -> None:
    lengths = [(i * 37) % 200 + 10 for i in range(256)]
    pad = lambda s: sum(max(lengths[i] for i in b) * len(b) - sum(lengths[i] for i in b) for b in s)  # noqa: E731
    grouped = pad(ResumableBatchSampler(lengths, 4, True, 0, group_by_length=True))
    plain = pad(ResumableBatchSampler(lengths, 4, True, 0, group_by_length=False))
    assert grouped < plain / 5


# --- training runs -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("fmt", "packing"), [("baize", True), ("chat_template", False)])
def test_overfits_a_handful_of_dialogs(tmp_path: Path, fmt: str, packing: bool) -> None:
    cfg = tiny_cfg(
        tmp_path,
        f"train.format={fmt}",
        f"train.packing={packing}",
        "train.batch_size=4",
        "lora.r=16",
        "lora.dropout=0",
        "trainer.max_steps=20",
        "trainer.max_epochs=100",
        # the tiny model's random tied head caps its logits near +-1: give LoRA the head too
        "lora.target_modules=[q_proj,v_proj,down_proj,lm_head]",
    )
    pm, tok = tiny_lora(cfg)
    rec = LossRecorder()
    out = fit(pm, tok, dialogs(4), [], cfg, tmp_path / "stage", lr=1e-2, max_epochs=100, callbacks=[rec])
    assert out["steps"] == 20 and len(rec.losses) == 20
    assert out["params_trainable"] == sum(p.numel() for n, p in pm.named_parameters() if "lora_" in n)
    assert rec.losses[-1] < 0.3 * rec.losses[0], rec.losses  # from ~10.8 (random init) to a fraction of it


class Crash(pl.Callback):
    """A crash at the start of the first micro-batch after optimizer step `at` (its checkpoint is written)."""

    def __init__(self, at: int) -> None:
        self.at = at

    def on_train_batch_start(self, trainer, *args) -> None:
        if trainer.global_step == self.at:
            raise RuntimeError("simulated crash")


def test_resume_continues_exactly_and_checkpoints_hold_no_base_weights(tmp_path: Path) -> None:
    """8 steps straight vs 4 steps, a crash, and train.resume=auto: the same batches, losses and weights.

    Mid-epoch crash, LoRA dropout on (the RNG must be restored), gradient accumulation, validation between."""
    over = [
        "train.max_length=64",
        "train.batch_size=2",
        "lora.dropout=0.1",
        "trainer.accumulate_grad_batches=2",
        "trainer.max_steps=8",
        "trainer.max_epochs=100",
        "train.checkpoint_every_n_steps=2",
        "train.warmup_steps=2",
    ]
    ds = dialogs(14)
    train_d, val_d = ds[:12], ds[12:]

    def run(stage: Path, callbacks: list) -> tuple[dict, torch.nn.Module]:
        cfg = tiny_cfg(tmp_path, *over)
        pm, tok = tiny_lora(cfg)
        return fit(pm, tok, train_d, val_d, cfg, stage, lr=5e-3, max_epochs=100, callbacks=callbacks), pm

    straight = LossRecorder()
    out_a, pm_a = run(tmp_path / "a", [straight])
    assert out_a["steps"] == 8 and len(straight.losses) == 16 and out_a["train_rows"] > 4  # several epochs

    first = LossRecorder()
    with pytest.raises(RuntimeError, match="simulated crash"):
        run(tmp_path / "b", [first, Crash(at=4)])
    ckpt = torch.load(tmp_path / "b" / "checkpoints" / "last.ckpt", weights_only=False)
    assert ckpt["global_step"] == 4 and ckpt["baize"]["batches_trained"] == 8
    trainable = {n for n, p in pm_a.named_parameters() if p.requires_grad}
    assert {k.removeprefix("model.") for k in ckpt["state_dict"]} == trainable  # LoRA only, all of it
    assert ckpt["optimizer_states"] and ckpt["lr_schedulers"]
    base_bytes = sum(p.numel() * 4 for p in pm_a.parameters())
    assert (tmp_path / "b" / "checkpoints" / "last.ckpt").stat().st_size < base_bytes / 10

    rest = LossRecorder()
    out_b, pm_b = run(tmp_path / "b", [rest])
    assert out_b["resumed_from"].endswith("last.ckpt") and out_b["steps"] == 8
    assert first.losses == straight.losses[:8]
    assert rest.losses == pytest.approx(straight.losses[8:], abs=1e-6)
    for (n, a), b in zip(pm_a.named_parameters(), pm_b.parameters(), strict=True):
        if a.requires_grad:
            assert torch.allclose(a, b, atol=1e-6), n
    assert out_b["val_loss"] == pytest.approx(out_a["val_loss"], abs=1e-6)
    # the CSV loss curve of the resumed run holds the steps from before the crash too, as the straight one does
    curve = {}
    for run_name in ("a", "b"):
        with open(tmp_path / run_name / "logs" / "metrics.csv", newline="") as f:
            curve[run_name] = [(int(r["step"]), float(r["train/loss"])) for r in csv.DictReader(f) if r["train/loss"]]
    assert [s for s, _ in curve["b"]] == [s for s, _ in curve["a"]] == list(range(8))
    assert [x for _, x in curve["b"]] == pytest.approx([x for _, x in curve["a"]], abs=1e-6)

    # train.stop_at_step: the session ends after step 4 with a checkpoint (a time slot on a cluster) and says how
    # to continue; the rerun continues exactly, like the crash above
    stopped = LossRecorder()
    cfg_c = tiny_cfg(tmp_path, *over, "train.stop_at_step=4", "train.checkpoint_every_n_steps=0")
    pm_c, tok = tiny_lora(cfg_c)
    with pytest.raises(Interrupted, match="stopped after step 4 as train.stop_at_step=4 asks"):
        fit(pm_c, tok, train_d, val_d, cfg_c, tmp_path / "c", lr=5e-3, max_epochs=100, callbacks=[stopped])
    assert stopped.losses == straight.losses[:8]
    out_c, _ = run(tmp_path / "c", [rest_c := LossRecorder()])
    assert out_c["resumed_from"].endswith("last.ckpt") and out_c["steps"] == 8
    assert rest_c.losses == pytest.approx(straight.losses[8:], abs=1e-6)


def test_resume_refuses_a_checkpoint_of_another_config(tmp_path: Path) -> None:
    over = ["train.max_length=64", "trainer.max_steps=2", "train.checkpoint_every_n_steps=1"]
    cfg = tiny_cfg(tmp_path, *over)
    pm, tok = tiny_lora(cfg)
    fit(pm, tok, dialogs(6), [], cfg, tmp_path / "s", lr=1e-3, max_epochs=5)
    cfg2 = tiny_cfg(tmp_path, *over, "train.loss_on=all")
    pm2, _ = tiny_lora(cfg2)
    with pytest.raises(UserError, match="different model/LoRA/train config"):
        fit(pm2, tok, dialogs(6), [], cfg2, tmp_path / "s", lr=1e-3, max_epochs=5)
    cfg3 = tiny_cfg(tmp_path, *over, "train.loss_on=all", "train.resume=never")
    assert fit(pm2, tok, dialogs(6), [], cfg3, tmp_path / "s", lr=1e-3, max_epochs=5)["resumed_from"] is None


class SlowFirstStep(pl.Callback):
    """A first optimizer step that takes `seconds` longer, as kernel selection and warm-up make it on a GPU."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds

    def on_train_batch_start(self, trainer: pl.Trainer, *args) -> None:
        if trainer.global_step == 0:
            time.sleep(self.seconds)


def test_mfu_is_measured_after_the_first_optimizer_step(tmp_path: Path) -> None:
    """MFU's window starts when the first optimizer step is over: a slow first step (here 2 s of sleep, on a GPU the
    warm-up) leaves the MFU figure as it is, where the whole loop's time would halve it or worse."""
    cfg = tiny_cfg(tmp_path, "logger=none", "trainer.max_steps=4", "train.max_length=64", "train.peak_flops=1e11")
    pm, tok = tiny_lora(cfg)
    out = fit(pm, tok, dialogs(10), [], cfg, tmp_path / "w", lr=1e-3, max_epochs=5, callbacks=[SlowFirstStep(2.0)])
    assert out["loop_seconds"] - out["mfu_seconds"] >= 2.0  # the first step (with its sleep) is outside the window
    assert out["device"] == "cpu" and out["peak_mem_gb"] > 0.05
    whole_loop_mfu = out["mfu"] * out["mfu_seconds"] / out["loop_seconds"]  # the steady FLOPs over the whole loop
    assert out["mfu"] > 1.5 * whole_loop_mfu  # negative control: the old window would have read this much lower


def test_logs_throughput_mfu_memory_and_samples_to_csv_and_wandb(tmp_path: Path) -> None:
    """CSV columns, the samples file, and a W&B (offline) run holding the samples table."""
    import csv

    import wandb

    cfg = tiny_cfg(
        tmp_path,
        "logger=csv",
        "trainer.max_steps=4",
        "train.sample_every_n_steps=2",
        "train.sample_max_new_tokens=4",
        "train.max_length=64",
    )
    pm, tok = tiny_lora(cfg)
    out = fit(pm, tok, dialogs(10), dialogs(12)[10:], cfg, tmp_path / "csv", lr=1e-3, max_epochs=5)
    rows = list(csv.DictReader(open(tmp_path / "csv" / "logs" / "metrics.csv")))
    cols = set(rows[0])
    for key in (
        "train/loss",
        "train/lr",
        "train/grad_norm",
        "train/tokens_per_s",
        "train/supervised_tokens_per_s",
        "train/mfu",
        "train/peak_mem_gb",
        "val/loss",
        "val/ppl",
    ):
        assert key in cols, key
    mfu = [float(r["train/mfu"]) for r in rows if r.get("train/mfu")]
    assert len(mfu) == 4 and all(0 < x < 1 for x in mfu)  # against the configured 1e11 FLOP/s peak
    sup = [float(r["train/supervised_tokens_per_s"]) for r in rows if r.get("train/supervised_tokens_per_s")]
    tot = [float(r["train/tokens_per_s"]) for r in rows if r.get("train/tokens_per_s")]
    assert all(0 < s < t for s, t in zip(sup, tot, strict=True))  # the human's tokens are not supervised
    assert 0 < out["supervised_tokens_per_s"] < out["tokens_per_s"] and out["peak_mem_gb"] > 0.05
    samples = [json.loads(x) for x in open(tmp_path / "csv" / "train_samples.jsonl")]
    assert [s["step"] for s in samples] == [2, 2, 4, 4]
    assert samples[0]["prompt"] == cfg.train.sample_prompts[0]

    run = wandb.init(mode="offline", dir=str(tmp_path), project="t")
    try:
        cfg_w = tiny_cfg(
            tmp_path,
            "logger=wandb",
            "trainer.max_steps=2",
            "train.sample_every_n_steps=2",
            "train.sample_max_new_tokens=4",
            "train.max_length=64",
        )
        fit(pm, tok, dialogs(10), [], cfg_w, tmp_path / "wb", lr=1e-3, max_epochs=5)
    finally:
        run.finish()
    tables = list(Path(run.dir).glob("media/table/train/samples*.table.json"))
    assert tables and json.loads(tables[0].read_text())["columns"] == ["step", "prompt", "sample"]
    # with W&B the run dir still keeps its own loss history (what the multi-run report plots)
    wb_rows = list(csv.DictReader(open(tmp_path / "wb" / "logs" / "metrics.csv")))
    assert len([r for r in wb_rows if r.get("train/loss")]) == 2


def test_lora_options_reach_peft(tmp_path: Path) -> None:
    cfg = tiny_cfg(
        tmp_path,
        "lora.r=4",
        "lora.alpha=8",
        "lora.use_rslora=true",
        "lora.use_dora=true",
        "lora.target_modules=[q_proj,v_proj]",
    )
    pm, _ = tiny_lora(cfg)
    q = pm.base_model.model.model.layers[0].self_attn.q_proj
    assert q.scaling["default"] == pytest.approx(8 / 4**0.5)  # rsLoRA: alpha / sqrt(r)
    assert "default" in q.lora_magnitude_vector  # DoRA
    assert not hasattr(pm.base_model.model.model.layers[0].mlp.up_proj, "lora_A")
    with pytest.raises(ValueError, match=r"lora.target_modules: \['qproj'\]"):
        tiny_lora(tiny_cfg(tmp_path, "lora.target_modules=[q_proj,qproj]"))


def test_gradient_checkpointing_gives_the_same_step(tmp_path: Path) -> None:
    def losses(*extra: str) -> list[float]:
        cfg = tiny_cfg(tmp_path, "trainer.max_steps=3", "lora.dropout=0", "train.max_length=64", *extra)
        pm, tok = tiny_lora(cfg)
        rec = LossRecorder()
        fit(pm, tok, dialogs(6), [], cfg, tmp_path / "gc", lr=1e-2, max_epochs=5, callbacks=[rec])
        return rec.losses

    assert losses("train.gradient_checkpointing=true") == pytest.approx(losses(), abs=1e-5)


def test_bf16_mixed_precision_trains_on_cpu(tmp_path: Path) -> None:
    cfg = tiny_cfg(tmp_path, "trainer.precision=bf16-mixed", "trainer.max_steps=2", "train.max_length=64")
    validate(cfg)
    pm, tok = tiny_lora(cfg)
    rec = LossRecorder()
    fit(pm, tok, dialogs(6), [], cfg, tmp_path / "bf16", lr=1e-3, max_epochs=5, callbacks=[rec])
    assert len(rec.losses) == 2 and all(8 < x < 12 for x in rec.losses)  # ~ln(49152) = 10.8 at random init


def test_quantized_base_and_bad_train_keys_are_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as e:
        validate(
            compose_cfg(
                [
                    "model.quantization=8bit",
                    "train.resume=/no/such.ckpt",  # train.format=jinja: refused at composition (test_config_choices)
                    "train.checkpoint_every_n_steps=-1",
                    "trainer.precision=16-mixed",
                    "model.dtype=fp16",
                ]
            )
        )
    msg = str(e.value)
    for key in (
        "model.quantization='8bit'",
        "train.resume='/no/such.ckpt'",
        "train.checkpoint_every_n_steps=-1",
        "trainer.precision='16-mixed'",
        "model.dtype='fp16'",
    ):
        assert key in msg
    if not torch.cuda.is_available():  # past validate (e.g. a GPU config on a CPU box): the load says why
        cfg = tiny_cfg(tmp_path, "model.quantization=4bit")
        with pytest.raises(UserError, match="needs a CUDA GPU"):
            load_base_for_training(cfg)


def test_resume_auto_finds_a_deepspeed_checkpoint_directory(tmp_path: Path) -> None:
    """Under DeepSpeed Lightning writes last.ckpt as a directory of per-rank shards: resume=auto must take it (it
    used to check is_file() and silently start over), and the CSV log keeps the rows before its step."""
    from baize_exp.training.loggers import checkpoint_step as _checkpoint_step
    from baize_exp.training.tuning import _resume_path

    cfg = tiny_cfg(tmp_path)
    ckpt_dir = tmp_path / "checkpoints"
    assert _resume_path(cfg, ckpt_dir) is None
    shard = ckpt_dir / "last.ckpt" / "checkpoint" / "mp_rank_00_model_states.pt"
    shard.parent.mkdir(parents=True)
    torch.save({"global_step": 7, "module": {}}, shard)
    assert _resume_path(cfg, ckpt_dir) == str(ckpt_dir / "last.ckpt")
    assert _checkpoint_step(str(ckpt_dir / "last.ckpt")) == 7
    (ckpt_dir / "other").mkdir()
    assert _resume_path(tiny_cfg(tmp_path, "train.resume=never"), ckpt_dir) is None
