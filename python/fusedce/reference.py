"""The unfused path fusedce replaces: softmax, then log, then nll_loss, each a separate kernel with
its own full-size intermediate (the baseline of the benchmarks). Class-index targets only."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def unfused_cross_entropy(input: torch.Tensor, target: torch.Tensor, weight=None, ignore_index: int = -100,
                          reduction: str = "mean") -> torch.Tensor:
    probs = torch.softmax(input, dim=1 if input.dim() > 1 else 0)
    return F.nll_loss(torch.log(probs), target, weight=weight, ignore_index=ignore_index, reduction=reduction)
