"""peft's LoRA linear layer as one autograd function on CPU: the same maths, fewer passes over the activations.

peft computes `base(x) + lora_B(lora_A(dropout(x))) * scaling`. On a CPU with a 576-wide model the two rank-8
matmuls are cheap, but what surrounds them is not: `nn.Dropout` draws one Mersenne-Twister variate per element and
keeps a float copy of the dropped input for backward, and the scaling and the sum each make a (tokens x out) pass.
`_LoraLinear` does the same computation with
- a dropout mask drawn as 15-bit halves of 31-bit words (one draw per two elements; each element is dropped with
  probability round(p * 2^15) / 2^15, independently) and kept as bools, not as a copy of the input;
- the scaling and 1 / (1 - p) folded into the rank-8 side, and the update added into the base output in place
  (`addmm_`), so no (tokens x out) temporary is made;
- backward recomputing the masked input for A's gradient rather than storing it.
Outputs and gradients equal peft's for the same mask (tests/test_fused_lora.py). It runs only where it is known to
be the same computation (CPU, training, one plain LoRA adapter, no autocast, nn.Linear base); everywhere else,
GPU included, peft's own forward runs.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import torch

KEEP_BITS = 15  # each element's dropout decision reads 15 random bits


def keep_mask(shape: torch.Size | tuple[int, ...], p: float) -> torch.Tensor:
    """Bool mask, True with probability 1 - round(p * 2^15) / 2^15 per element, independently (global torch RNG)."""
    n = math.prod(shape)
    # a word of random_() is uniform in [0, 2^31): as two int16 halves with the sign bit cleared, both halves are
    # uniform over [0, 2^KEEP_BITS) and independent
    halves = torch.empty((n + 1) // 2, dtype=torch.int32).random_().view(torch.int16).bitwise_and_((1 << KEEP_BITS) - 1)
    return (halves[:n] >= round(p * 2**KEEP_BITS)).view(shape)


class _LoraLinear(torch.autograd.Function):
    """y = x W^T + b + c (mask(x) A^T) B^T with c = scaling / (1 - p); W and b frozen, A and B trained.

    Backward writes the rank-8 products narrow side first (`(h^T g)^T`, not `g^T h`): CPU BLAS runs a
    (tokens x out)^T @ (tokens x 8) product 3-4x slower than the same product the other way round.
    """

    @staticmethod
    def forward(
        ctx: Any,
        x: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        a: torch.Tensor,
        b: torch.Tensor,
        scaling: float,
        p: float,
    ) -> torch.Tensor:
        x2 = x.reshape(-1, x.shape[-1])
        y = torch.nn.functional.linear(x2, weight, bias)
        keep = keep_mask(x2.shape, p) if p > 0 else None
        h = (x2 if keep is None else torch.where(keep, x2, 0.0)) @ a.t()  # (tokens x r)
        c = scaling / (1.0 - p)
        y.addmm_(h, b.t(), alpha=c)
        ctx.save_for_backward(x2, keep, weight, a, b, h)
        ctx.c, ctx.x_shape = c, x.shape
        return y.view(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x2, keep, weight, a, b, h = ctx.saved_tensors
        g = grad.reshape(-1, grad.shape[-1])
        gh_t = (b.t() @ g.t()).mul_(ctx.c)  # the gradient wrt h, transposed: (r x tokens)
        grad_b = (h.t() @ g).t().mul_(ctx.c)
        grad_a = gh_t @ (x2 if keep is None else torch.where(keep, x2, 0.0))
        grad_x = grad_bias = None
        if ctx.needs_input_grad[0]:
            lora = gh_t.t() @ a
            if keep is not None:
                lora.mul_(keep)
            grad_x = (g @ weight).add_(lora).view(ctx.x_shape)
        if ctx.needs_input_grad[2]:
            grad_bias = g.sum(0)
        return grad_x, None, grad_bias, grad_a, grad_b, None, None


def _fusable(layer: Any, x: torch.Tensor, args: tuple, kwargs: dict) -> str | None:
    """The adapter name when `_LoraLinear` computes exactly what peft would for this call, else None."""
    if args or kwargs or not layer.training or x.device.type != "cpu" or layer.disable_adapters or layer.merged:
        return None
    if torch.is_autocast_enabled("cpu"):
        return None
    active = [a for a in layer.active_adapters if a in layer.lora_A]
    if len(active) != 1:
        return None
    name = active[0]
    if name in getattr(layer, "lora_variant", {}) or getattr(layer, "use_dora", {}).get(name):  # DoRA and the like
        return None
    base = layer.get_base_layer()
    a, b = layer.lora_A[name], layer.lora_B[name]
    if (
        type(base) is not torch.nn.Linear
        or getattr(layer, "fan_in_fan_out", False)
        or base.weight.requires_grad
        or b.bias is not None
        or not isinstance(layer.lora_dropout[name], (torch.nn.Dropout, torch.nn.Identity))
    ):
        return None
    if not (x.dtype == base.weight.dtype == a.weight.dtype == b.weight.dtype):
        return None
    if any(hasattr(w, "ds_id") for w in (base.weight, a.weight, b.weight)):
        return None  # DeepSpeed ZeRO-3 gathers a module's weights only around that module's own forward
    return name


def _forward(layer: Any, peft_forward: Any, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    name = _fusable(layer, x, args, kwargs)
    if name is None:
        return peft_forward(x, *args, **kwargs)
    base, drop = layer.get_base_layer(), layer.lora_dropout[name]
    p = drop.p if isinstance(drop, torch.nn.Dropout) and drop.training else 0.0
    return _LoraLinear.apply(
        x,
        base.weight,
        base.bias,
        layer.lora_A[name].weight,
        layer.lora_B[name].weight,
        float(layer.scaling[name]),
        float(p),
    )


def use_fused_lora(model: torch.nn.Module) -> int:
    """Route each peft LoRA `Linear` of `model` through `_LoraLinear` where it applies (see the module docstring);
    returns how many layers were routed (0 on a second call)."""
    from peft.tuners.lora.layer import Linear as LoraLinear

    routed = 0
    for module in model.modules():
        if type(module) is LoraLinear and not hasattr(module.forward, "_baize_fused"):
            fwd = functools.partial(_forward, module, module.forward)
            fwd._baize_fused = True  # type: ignore[attr-defined]
            module.forward = fwd
            routed += 1
    return routed
