"""FastDropout: the same distribution as nn.Dropout (rate, scale, independence of the two halves of each random
word), reproducible from the seed, identity in eval, the right gradient, and swapped into every LoRA layer."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from conftest import compose_cfg

from baize_exp import models as M
from baize_exp.train.dropout import FastDropout, use_fast_dropout


@pytest.mark.parametrize("p", [0.05, 0.3, 0.5])
def test_drops_at_rate_p_and_scales_the_rest(p: float) -> None:
    torch.manual_seed(0)
    n = 2_000_001  # odd: the last random word is half used
    y = FastDropout(p).train()(torch.ones(n))
    dropped = y == 0
    sigma = (p * (1 - p) / n) ** 0.5
    assert abs(dropped.float().mean().item() - p) < 5 * sigma
    assert torch.allclose(y[~dropped], torch.full_like(y[~dropped], 1 / (1 - p)))
    # each word feeds two neighbours through different thresholds: both must drop at rate p
    for half in (dropped[:-1:2], dropped[1::2]):
        assert abs(half.float().mean().item() - p) < 5 * (2 ** 0.5) * sigma
    # and independently of each other (P(both) = p^2)
    both = (dropped[:-1:2] & dropped[1::2]).float().mean().item()
    assert abs(both - p * p) < 5 * (p * p * (1 - p * p) / (n // 2)) ** 0.5


def test_masks_follow_the_torch_seed_and_eval_is_identity() -> None:
    d = FastDropout(0.1).train()
    x = torch.randn(64, 48)
    torch.manual_seed(3)
    a = d(x)
    torch.manual_seed(3)
    b = d(x)
    c = d(x)
    assert torch.equal(a, b) and not torch.equal(b, c)
    assert d.eval()(x) is x
    with pytest.raises(ValueError, match="dropout probability"):
        FastDropout(1.0)


def test_gradient_is_the_mask_times_the_scale() -> None:
    torch.manual_seed(1)
    x = torch.randn(33, 17, requires_grad=True)
    g = torch.randn(33, 17)
    y = FastDropout(0.25).train()(x)
    y.backward(g)
    kept = y.detach() != 0
    assert torch.allclose(x.grad, torch.where(kept, g / 0.75, 0.0))
    assert torch.allclose(y.detach(), torch.where(kept, x.detach() / 0.75, 0.0))


def test_every_lora_dropout_is_swapped_once() -> None:
    cfg = compose_cfg(["model=tiny", "lora.dropout=0.1"])
    model, _ = M.load_model_and_tokenizer(cfg.model, Path(os.environ["BAIZE_CACHE"]))
    pm = M.attach_lora(model, cfg.lora)
    n_layers = model.config.num_hidden_layers
    assert use_fast_dropout(pm) == n_layers * len(cfg.lora.target_modules)
    assert use_fast_dropout(pm) == 0
    drops = [d for m in pm.modules() if isinstance(getattr(m, "lora_dropout", None), torch.nn.ModuleDict)
             for d in m.lora_dropout.values()]
    assert drops and all(isinstance(d, FastDropout) and d.p == 0.1 for d in drops)
