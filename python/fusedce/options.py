"""The scalar options of the loss: one object from the public API to the native call."""
from __future__ import annotations

import math
from typing import NamedTuple, Optional

import torch

from .errors import InvalidArgument


class Options(NamedTuple):
    ignore_index: int = -100
    label_smoothing: float = 0.0
    z_loss: float = 0.0
    softcap: float = 0.0  # 0 = off

    @staticmethod
    def checked(ignore_index: int, label_smoothing: float, z_loss: float, softcap: Optional[float]) -> "Options":
        if not 0.0 <= label_smoothing <= 1.0:
            raise InvalidArgument(f"label_smoothing must be between 0.0 and 1.0, got {label_smoothing}")
        if not 0.0 <= z_loss < math.inf:
            raise InvalidArgument(f"z_loss must be a finite non-negative coefficient, got {z_loss}")
        if softcap is not None and not 0.0 < softcap < math.inf:
            raise InvalidArgument(f"softcap must be a finite positive number or None, got {softcap}")
        return Options(int(ignore_index), float(label_smoothing), float(z_loss), float(softcap or 0.0))


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """Per-row loss and lse are fp32, fp64 for fp64 logits (the kernel contract)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def softcapped(x: torch.Tensor, softcap: float) -> torch.Tensor:
    """x -> softcap * tanh(x / softcap); softcap 0 means off."""
    return softcap * torch.tanh(x / softcap) if softcap > 0 else x


class Shard(NamedTuple):
    """A slice of the classes, as one rank of a vocabulary-parallel group holds it: the logits' columns
    are the global classes [start, start + local columns) of `classes` in all."""
    start: int
    classes: int
