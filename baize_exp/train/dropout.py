"""A LoRA dropout that costs less on CPU than `nn.Dropout`, with the same distribution.

peft puts an `nn.Dropout` on the input of every LoRA layer: 7 per decoder layer with Baize's target modules, each
over the whole (tokens x width) activation. On CPU, `F.dropout` draws one Bernoulli variate per element from torch's
Mersenne Twister, and the draws are most of its cost (a 2048x576 input: ~6 ms of ~7.5 ms; the multiply is 0.1 ms).
`FastDropout` draws one 31-bit word per two elements and compares each 16- or 15-bit half with a threshold, so each
element is kept with probability 1 - p (exact to 2^-15), independently, and scaled by 1 / (1 - p); the mask is kept
as bools for backward. Same seeded generator, so runs stay reproducible. On CUDA it is `F.dropout`.
"""

from __future__ import annotations

import sys
from typing import Any

import torch
import torch.nn.functional as F


class _BitsDropout(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, p: float) -> torch.Tensor:
        n = x.numel()
        # a word is uniform in [0, 2^31): read as two int16, one half is uniform over all 2^16 values and the other
        # over [0, 2^15); each half is compared with its own threshold
        words = torch.empty((n + 1) // 2, dtype=torch.int32).random_().view(torch.int16).view(-1, 2)
        full, top_clear = round(p * 65536) - 32768, round(p * 32768)
        threshold = torch.tensor([full, top_clear] if sys.byteorder == "little" else [top_clear, full],
                                 dtype=torch.int16)
        keep = (words >= threshold).view(-1)[:n].view(x.shape)
        ctx.save_for_backward(keep)
        ctx.scale = 1.0 / (1.0 - p)
        return torch.where(keep, x, 0.0).mul_(ctx.scale)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        (keep,) = ctx.saved_tensors
        return torch.where(keep, grad, 0.0).mul_(ctx.scale), None


class FastDropout(torch.nn.Module):
    """`nn.Dropout(p)` with fewer random draws on CPU (see the module docstring)."""

    def __init__(self, p: float):
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise ValueError(f"dropout probability must be in [0, 1), got {p}")
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        if x.device.type != "cpu":
            return F.dropout(x, self.p, True)
        return _BitsDropout.apply(x, self.p)

    def extra_repr(self) -> str:
        return f"p={self.p}"


def use_fast_dropout(model: torch.nn.Module) -> int:
    """Swap each `nn.Dropout` of peft's LoRA layers (their `lora_dropout` dicts) for `FastDropout`; returns how
    many were swapped (0 on a second call)."""
    swapped = 0
    for module in model.modules():
        drops = getattr(module, "lora_dropout", None)
        if isinstance(drops, torch.nn.ModuleDict):
            for name, d in drops.items():
                if type(d) is torch.nn.Dropout and d.p > 0:
                    drops[name] = FastDropout(d.p)
                    swapped += 1
    return swapped
