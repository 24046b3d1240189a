"""Model loading: the embedded GGUF, the tiny model, LoRA save/load, and the error for unreachable weights."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from helpers.config import compose_cfg

from baize_exp import models as M


def test_big_model_without_local_path_fails_with_what_to_set() -> None:
    cfg = compose_cfg(["model=13b"])
    with pytest.raises(M.ModelLoadError, match=r"model.path=") as e:
        M.load_tokenizer(cfg.model, Path(os.environ["BAIZE_CACHE"]))
    assert "llama-13b" in str(e.value)


def test_model_path_that_is_not_a_model_dir(tmp_path) -> None:
    cfg = compose_cfg(["model=7b", f"model.path={tmp_path}"])
    with pytest.raises(M.ModelLoadError, match="no config.json"):
        M.load_model(cfg.model, tmp_path)


def test_a_random_model_takes_its_tokenizer_from_model_tokenizer_without_the_gguf(tmp_path) -> None:
    """A GPU machine without the embedded GGUF runs random models with a carried tokenizer folder."""
    real = M.load_tokenizer(compose_cfg(["model=tiny"]).model, Path(os.environ["BAIZE_CACHE"]))
    real.save_pretrained(tmp_path / "tok")
    cfg = compose_cfg(["model=random_1b", f"model.tokenizer={tmp_path / 'tok'}"])
    tok = M.load_tokenizer(cfg.model, tmp_path / "cache")
    assert tok.get_vocab() == real.get_vocab() and tok.pad_token == real.pad_token
    assert not (tmp_path / "cache").exists()  # the GGUF was never looked for, nothing converted
    bad = compose_cfg(["model=tiny", f"model.tokenizer={tmp_path}"])
    with pytest.raises(M.ModelLoadError, match="model.tokenizer=.* is not a tokenizer folder"):
        M.load_tokenizer(bad.model, tmp_path / "cache")


def test_tiny_model_is_deterministic_and_lora_roundtrips(tmp_path) -> None:
    cfg = compose_cfg(["model=tiny"])
    cache = Path(os.environ["BAIZE_CACHE"])
    a, tok = M.load_model_and_tokenizer(cfg.model, cache)
    b = M.load_model(cfg.model, cache)
    ids = tok("hello world", return_tensors="pt").input_ids
    assert torch.equal(a(ids).logits, b(ids).logits)
    peft = M.attach_lora(a, cfg.lora)
    total, trainable = M.count_parameters(peft)
    assert 0 < trainable < total
    with torch.no_grad():  # make the adapter non-trivial (B starts at zero)
        for n, p in peft.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)
    peft.eval()  # no LoRA dropout in the comparison
    peft.save_pretrained(tmp_path / "ad")
    back = M.load_adapter(M.load_model(cfg.model, cache), tmp_path / "ad")
    assert torch.allclose(peft(ids).logits, back(ids).logits, atol=1e-5)


@pytest.mark.slow
def test_embedded_gguf_model_loads_and_generates() -> None:
    cfg = compose_cfg([])
    model, tok = M.load_model_and_tokenizer(cfg.model, Path(os.environ["BAIZE_CACHE"]))
    assert sum(p.numel() for p in model.parameters()) > 100e6
    assert not getattr(model, "is_quantized", False)
    prompt = tok.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}], tokenize=False, add_generation_prompt=True
    )
    [[text]] = M.generate_texts(model, tok, [prompt], max_new_tokens=16)
    assert "Paris" in text


def test_the_student_runs_where_the_trainer_runs_in_the_trainer_precision() -> None:
    """model.dtype=auto follows trainer.precision; the inputs of generation follow the model's device and dtype
    (here a bf16 student on the CPU; on a GPU machine the same code path with cuda)."""
    assert M.student_device("cpu") == torch.device("cpu")
    assert M.student_device("gpu") == torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    for precision, dtype in (
        ("32-true", torch.float32),
        ("bf16-mixed", torch.bfloat16),
        ("16-mixed", torch.float16),
        ("bf16-true", torch.bfloat16),
    ):
        assert M.base_dtype(compose_cfg(["model=tiny"]).model, precision) == dtype
    cfg = compose_cfg(["model=tiny", "trainer.precision=bf16-mixed"])
    model, tok = M.load_model_and_tokenizer(
        cfg.model, Path(os.environ["BAIZE_CACHE"]), M.base_dtype(cfg.model, cfg.trainer.precision)
    )
    assert next(model.parameters()).dtype == torch.bfloat16
    (texts,) = M.generate_texts(model, tok, ["Hello there"], max_new_tokens=4)
    assert isinstance(texts[0], str)


def test_a_random_model_is_built_on_the_device_asked_for_without_moving_the_callers_rng() -> None:
    """On a GPU trainer the random base is drawn on the GPU (seconds, where a 7B-shaped model takes minutes on the
    CPU); here the `meta` device shows the device is honoured, and the caller's seeded stream stays where it was."""
    cfg = compose_cfg(["model=tiny"])
    torch.manual_seed(123)
    before = torch.get_rng_state()
    model = M.load_model(cfg.model, Path(os.environ["BAIZE_CACHE"]), device=torch.device("meta"))
    assert {p.device.type for p in model.parameters()} == {"meta"}
    assert torch.equal(torch.get_rng_state(), before)
    on_cpu = M.load_model(cfg.model, Path(os.environ["BAIZE_CACHE"]))  # the default: the CPU, as before
    assert {p.device.type for p in on_cpu.parameters()} == {"cpu"}


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_a_random_model_drawn_on_the_gpu_is_the_same_every_time() -> None:
    cfg = compose_cfg(["model=tiny"])
    torch.cuda.manual_seed(7)
    before = torch.cuda.get_rng_state()
    a, b = (M.load_model(cfg.model, Path(os.environ["BAIZE_CACHE"]), device=torch.device("cuda")) for _ in range(2))
    assert all(torch.equal(p, q) and p.is_cuda for p, q in zip(a.parameters(), b.parameters(), strict=True))
    assert torch.equal(torch.cuda.get_rng_state(), before)
