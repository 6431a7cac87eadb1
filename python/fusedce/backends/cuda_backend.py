"""CUDA C++ kernels (csrc/cuda, fusedce._cuda) behind the backend interface. CUDA tensors only."""
from __future__ import annotations

import torch

from .. import _native_cuda
from ..options import Options
from . import device_weight_sum


def _soft_target(target):
    # the kernels read float32 / float16 / bfloat16 probabilities (class indices pass unchanged)
    return target.float() if target.dtype == torch.float64 else target


def forward(logits, target, weight, opts: Options, grad_loss=None, dlogits=None):
    rows = logits.shape[0]
    loss = torch.empty(rows, dtype=torch.float32, device=logits.device)
    lse = torch.empty(rows, dtype=torch.float32, device=logits.device)
    target = _soft_target(target)
    _native_cuda.forward(logits, target, weight, device_weight_sum(target, weight), opts, loss, lse,
                         None if grad_loss is None else grad_loss.float(), dlogits)
    return loss, lse


def backward(grad_loss, logits, target, weight, lse, opts: Options, out: torch.Tensor) -> None:
    target = _soft_target(target)
    _native_cuda.backward(grad_loss.float(), logits, target, weight, device_weight_sum(target, weight), lse, opts, out)


def scale_(grad: torch.Tensor, scale: torch.Tensor) -> None:
    _native_cuda.scale_(grad, scale.float())
