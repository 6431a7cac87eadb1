"""C++ CPU kernels (csrc/cpu) behind the backend interface."""
from __future__ import annotations

import torch

from .. import _native
from ..options import Options, accumulation_dtype
from .torch_backend import scale_  # noqa: F401  (the same for CPU tensors)


def forward(logits, target, weight, opts: Options, grad_loss=None, dlogits=None):
    acc = accumulation_dtype(logits.dtype)
    loss = torch.empty(logits.shape[0], dtype=acc, device=logits.device)
    lse = torch.empty(logits.shape[0], dtype=acc, device=logits.device)
    _native.forward(logits, target, weight, opts, loss, lse,
                    None if grad_loss is None else grad_loss.to(acc), dlogits)
    return loss, lse


def backward(grad_loss, logits, target, weight, lse, opts: Options, out: torch.Tensor) -> None:
    _native.backward(grad_loss.to(lse.dtype), logits, target, weight, lse, opts, out)
