"""The fused CPU LoRA layer: its dropout mask has the right distribution and follows the seed; its output and
gradients are peft's for the same mask; a routed model trains exactly like peft's; it stands aside where it would
not compute the same thing."""

from __future__ import annotations

import copy
import os
from pathlib import Path

import pytest
import torch
from helpers.config import compose_cfg

from baize_exp import models as M
from baize_exp.training.fused_lora import KEEP_BITS, _fusable, _LoraLinear, keep_mask, use_fused_lora


@pytest.mark.parametrize("p", [0.05, 0.3, 0.5])
def test_mask_drops_at_rate_p_independently(p: float) -> None:
    torch.manual_seed(0)
    n = 2_000_001  # odd: the last random word is half used
    dropped = ~keep_mask((n,), p)
    q = round(p * 2**KEEP_BITS) / 2**KEEP_BITS  # p to 15 bits
    assert abs(q - p) <= 2**-16
    sigma = (q * (1 - q) / n) ** 0.5
    assert abs(dropped.float().mean().item() - q) < 5 * sigma
    # each random word feeds two neighbours: each half must drop at rate p, and independently (P(both) = p^2)
    for half in (dropped[:-1:2], dropped[1::2]):
        assert abs(half.float().mean().item() - q) < 5 * (2**0.5) * sigma
    both = (dropped[:-1:2] & dropped[1::2]).float().mean().item()
    assert abs(both - q * q) < 5 * (q * q * (1 - q * q) / (n // 2)) ** 0.5


def test_mask_follows_the_torch_seed() -> None:
    torch.manual_seed(3)
    a = keep_mask((64, 48), 0.1)
    torch.manual_seed(3)
    b = keep_mask((64, 48), 0.1)
    c = keep_mask((64, 48), 0.1)
    assert a.shape == (64, 48) and a.dtype == torch.bool and torch.equal(a, b) and not torch.equal(b, c)


def _peft_maths(x, w, bias, a, b, scaling, p, keep):
    """What peft computes, `base(x) + lora_B(lora_A(dropout(x))) * scaling`, with a given dropout mask."""
    dropped_x = torch.where(keep, x, 0.0) / (1 - p) if keep is not None else x
    return torch.nn.functional.linear(x, w, bias) + (dropped_x @ a.t() @ b.t()) * scaling


@pytest.mark.parametrize("p,with_bias", [(0.2, False), (0.2, True), (0.0, True)])
def test_output_and_gradients_are_peft_maths_for_the_same_mask(p: float, with_bias: bool) -> None:
    torch.manual_seed(0)
    x = torch.randn(3, 17, 24, requires_grad=True)  # (batch, tokens, in): 3-d like a transformer's activations
    w = torch.randn(40, 24) / 5
    bias = torch.randn(40, requires_grad=True) if with_bias else None
    a = (torch.randn(8, 24) / 5).requires_grad_()
    b = torch.randn(40, 8).requires_grad_()  # nonzero, unlike peft's init, so the update shows
    g = torch.randn(3, 17, 40)
    inputs = [t for t in (x, a, b, bias) if t is not None]

    torch.manual_seed(7)
    y = _LoraLinear.apply(x, w, bias, a, b, 2.0, p)
    grads = torch.autograd.grad(y, inputs, g)
    torch.manual_seed(7)  # the same draws give the same mask
    keep = keep_mask(x.shape, p) if p > 0 else None
    ref = _peft_maths(x, w, bias, a, b, 2.0, p, keep)
    ref_grads = torch.autograd.grad(ref, inputs, g)

    assert y.shape == ref.shape == (3, 17, 40)
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)
    for got, want in zip(grads, ref_grads, strict=True):  # the same sums in another order: fp32 rounding only
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6 * float(want.abs().max()))
    if p > 0:  # the mask really dropped some inputs: their gradient is exactly the base layer's
        base_only = (g.reshape(-1, 40) @ w).view_as(x)
        assert (~keep).any() and torch.equal(grads[0][~keep], base_only[~keep])


def _tiny_peft(dropout: float):
    cfg = compose_cfg(["model=tiny", f"lora.dropout={dropout}"])
    model, tok = M.load_model_and_tokenizer(cfg.model, Path(os.environ["BAIZE_CACHE"]))
    torch.manual_seed(0)
    pm = M.attach_lora(model, cfg.lora)
    with torch.no_grad():  # peft starts B at zero; give it values so the LoRA path changes the loss and gradients
        for n, prm in pm.named_parameters():
            if "lora_B" in n:
                prm.normal_(0, 0.05)
    return pm, tok, cfg


def test_a_routed_model_trains_exactly_like_peft() -> None:
    stock, tok, cfg = _tiny_peft(dropout=0.0)  # no dropout: both must agree to rounding
    fused = copy.deepcopy(stock)
    n_layers = stock.config.num_hidden_layers
    assert use_fused_lora(fused) == n_layers * len(cfg.lora.target_modules)
    assert use_fused_lora(fused) == 0
    seen = []
    fused.get_submodule("base_model.model.model.layers.0.self_attn.q_proj").register_forward_hook(
        lambda mod, inp, out: seen.append(type(out.grad_fn).__name__)
    )
    ids = tok(["[|Human|] hello there [|AI|] hi, how can I help?"] * 2, return_tensors="pt")["input_ids"]
    losses, grads = [], []
    for m in (stock, fused):
        m.train()
        loss = m(input_ids=ids, labels=ids).loss
        loss.backward()
        losses.append(loss.detach())
        grads.append({n: p.grad for n, p in m.named_parameters() if p.requires_grad})
    assert seen == ["_LoraLinearBackward"]  # the fused function really ran
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-5, atol=1e-6)
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) == 2 * n_layers * len(cfg.lora.target_modules)
    for n in grads[0]:
        torch.testing.assert_close(grads[1][n], grads[0][n], rtol=1e-4, atol=1e-6, msg=n)
    fused.eval()  # eval: peft's own forward (no dropout), the same output
    stock.eval()
    with torch.no_grad():
        torch.testing.assert_close(fused(input_ids=ids).logits, stock(input_ids=ids).logits)


def test_it_stands_aside_where_it_would_not_compute_the_same() -> None:
    pm, _, _ = _tiny_peft(dropout=0.1)
    layer = pm.get_submodule("base_model.model.model.layers.0.mlp.down_proj")
    x = torch.randn(2, 5, layer.in_features)
    layer.train()
    assert _fusable(layer, x, (), {}) == "default"
    assert _fusable(layer, x, (), {"adapter_names": ["default"] * 2}) is None  # mixed-batch adapters
    assert _fusable(layer, x.double(), (), {}) is None  # dtypes differ from the weights'
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert _fusable(layer, x, (), {}) is None
    assert use_fused_lora(pm) > 0
    layer.lora_dropout["default"].eval()  # a dropout switched off on its own: the fused layer must not drop either
    with torch.no_grad():
        want = (
            layer.get_base_layer()(x) + layer.lora_B["default"](layer.lora_A["default"](x)) * layer.scaling["default"]
        )
        torch.testing.assert_close(layer(x), want)
    layer.lora_dropout["default"].train()
    layer.eval()
    assert _fusable(layer, x, (), {}) is None
    layer.train()
    layer.merge()
    assert _fusable(layer, x, (), {}) is None
    layer.unmerge()
    dora = compose_cfg(["model=tiny", "lora.use_dora=true"])
    model, _ = M.load_model_and_tokenizer(dora.model, Path(os.environ["BAIZE_CACHE"]))
    dlayer = M.attach_lora(model, dora.lora).get_submodule("base_model.model.model.layers.0.mlp.down_proj").train()
    assert _fusable(dlayer, x, (), {}) is None
