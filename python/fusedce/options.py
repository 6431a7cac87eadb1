"""The scalar options every kernel takes, bundled so backends share one signature."""
from __future__ import annotations

from typing import NamedTuple

import torch


class Options(NamedTuple):
    ignore_index: int = -100
    label_smoothing: float = 0.0
    z_loss: float = 0.0
    softcap: float = 0.0  # 0 = off


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """Per-row loss and lse are fp32, fp64 for fp64 logits (the kernel contract)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def softcapped(x: torch.Tensor, softcap: float) -> torch.Tensor:
    """x -> softcap * tanh(x / softcap); softcap 0 means off."""
    return softcap * torch.tanh(x / softcap) if softcap > 0 else x
