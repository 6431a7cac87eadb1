"""Triton kernels (triton_kernels/, installed as fusedce.triton_kernels) behind the backend interface.
Runs on CUDA tensors, and on CPU tensors through Triton's interpreter (TRITON_INTERPRET=1)."""
from __future__ import annotations

import torch

from .. import checks
from ..options import Options
from . import device_weight_sum
from ..triton_kernels import cross_entropy as kernels


def forward(logits, target, weight, opts: Options, grad_loss=None, dlogits=None):
    if not target.is_floating_point():
        checks.check_target_range(target, logits.shape[1], opts.ignore_index)  # CPU (interpreter) only
    rows = logits.shape[0]
    loss = torch.empty(rows, dtype=torch.float32, device=logits.device)
    lse = torch.empty(rows, dtype=torch.float32, device=logits.device)
    kernels.cross_entropy(logits, target, weight, device_weight_sum(target, weight), opts, forward=True,
                          grad_loss=None if grad_loss is None else grad_loss.float(), lse=lse, loss=loss,
                          dlogits=dlogits)
    return loss, lse


def backward(grad_loss, logits, target, weight, lse, opts: Options, out: torch.Tensor) -> None:
    kernels.cross_entropy(logits, target, weight, device_weight_sum(target, weight), opts, forward=False,
                          grad_loss=grad_loss.float(), lse=lse, dlogits=out)


def scale_(grad: torch.Tensor, scale: torch.Tensor) -> None:
    kernels.scale_(grad, scale.float())
