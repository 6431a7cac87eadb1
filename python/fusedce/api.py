"""Public API: drop-in replacements for torch.nn.functional.cross_entropy and torch.nn.CrossEntropyLoss.

This layer checks arguments, reshapes (N, C, d1..dk) inputs to rows x C, picks the backend and
applies the reduction with tensor ops (never .item(), so there is no host sync)."""
from __future__ import annotations

from typing import Optional

import torch
from torch.nn import _reduction

from . import backends, checks
from .function import CrossEntropyFunction, FusedCrossEntropyFunction
from .options import accumulation_dtype


def _to_rows(x: torch.Tensor) -> torch.Tensor:
    """(C,) -> (1, C); (N, C) -> itself; (N, C, d1..dk) -> (N d1..dk, C) with the class dim last."""
    if x.dim() == 1:
        x = x.unsqueeze(0)
    elif x.dim() > 2:
        x = x.movedim(1, -1).reshape(-1, x.shape[1])
    return x if x.stride(-1) == 1 else x.contiguous()  # the kernels need unit stride along classes


def cross_entropy(input: torch.Tensor, target: torch.Tensor, weight: Optional[torch.Tensor] = None,
                  size_average: Optional[bool] = None, ignore_index: int = -100, reduce: Optional[bool] = None,
                  reduction: str = "mean", label_smoothing: float = 0.0, *, z_loss: float = 0.0,
                  softcap: Optional[float] = None, return_lse: bool = False, inplace_backward: bool = False,
                  fused: Optional[bool] = None, backend: str = "auto"):
    """Same signature and results as torch.nn.functional.cross_entropy, computed by a fused
    single-pass kernel that accumulates in fp32 (fp64 for fp64 input). Keyword-only extras:

    z_loss: coefficient of the auxiliary z-loss, adds z_loss * lse**2 for every non-ignored row.
    softcap: if set, logits -> softcap * tanh(logits / softcap) before the softmax (Gemma 2 style).
    return_lse: also return the per-row log-sum-exp (fp32, fp64 for fp64 input; the shape of the
        unreduced loss).
    inplace_backward: write the logits' gradient into the logits' memory (see CrossEntropyFunction);
        in the fused mode this happens in the forward, so the logits hold their gradient from then on.
    fused: compute the logits' gradient during the forward (see FusedCrossEntropyFunction). None (the
        default) turns it on when it applies: a "mean" or "sum" loss in eager mode whose logits
        require grad and no return_lse. The gradient's memory is then taken at the forward. Ignored
        under torch.compile, whose backward would copy that gradient before rescaling it.
    backend: "auto" | "cpu" | "cuda" | "triton" | "torch".

    "mean" divides by the summed weight of the non-ignored targets (the number of rows for class
    probabilities), exactly as torch; the z-loss term is included in what is averaged.
    """
    if size_average is not None or reduce is not None:
        reduction = _reduction.legacy_get_string(size_average, reduce)
    checks.check_reduction(reduction)
    checks.check_options(label_smoothing, z_loss, softcap)
    checks.check_logits(input)
    checks.check_target(input, target, ignore_index)
    checks.check_weight(weight, input)
    name = backends.resolve(backend, input.device, input.dtype)

    soft = target.is_floating_point()
    logits = _to_rows(input)
    rows_target = _to_rows(target) if soft else target.reshape(-1).to(torch.int64).contiguous()
    acc = accumulation_dtype(input.dtype)
    w = weight.to(acc).contiguous() if weight is not None else None

    options = (ignore_index, float(label_smoothing), float(z_loss), float(softcap or 0.0), name)
    out_dtype = torch.result_type(input, target) if soft else input.dtype
    if fused is None:
        fused = (reduction != "none" and not return_lse and input.requires_grad and torch.is_grad_enabled()
                 and not (soft and target.requires_grad))
    if fused and (reduction == "none" or return_lse or (soft and target.requires_grad)):
        raise ValueError("fused=True needs reduction 'mean' or 'sum', return_lse=False and a target that "
                         "does not require grad: only the logits' gradient of the reduced loss is computed")
    # a compiled backward copies the gradient saved by the forward before rescaling it: 4 passes, not 3
    if fused and not torch.compiler.is_compiling():
        denominator = None if reduction == "sum" else (
            torch.full((), logits.shape[0], dtype=acc, device=logits.device) if soft  # no host-to-device copy
            else _mean_denominator(rows_target, w, ignore_index, acc))
        result = FusedCrossEntropyFunction.apply(logits, rows_target, w, denominator, options, inplace_backward)
        return result.to(out_dtype)

    out = CrossEntropyFunction.apply(logits, rows_target, w, *options, inplace_backward, return_lse)
    loss, lse = out if return_lse else (out, None)
    batch_shape = target.shape[:1] + target.shape[2:] if soft and target.dim() > 1 else (
        () if soft else target.shape)
    if reduction == "none":
        result = loss.reshape(batch_shape)
    elif reduction == "sum":
        result = loss.sum()
    elif soft:
        result = loss.sum() / loss.numel()
    else:
        result = loss.sum() / _mean_denominator(rows_target, w, ignore_index, acc)
    result = result.to(out_dtype)
    return (result, lse.reshape(batch_shape)) if return_lse else result


def _mean_denominator(target: torch.Tensor, weight: Optional[torch.Tensor], ignore_index: int, acc) -> torch.Tensor:
    """Summed weight of the non-ignored targets (their count without weight): torch's "mean"."""
    valid = target != ignore_index
    if weight is None:
        return valid.sum().to(acc)
    safe = torch.where(valid, target, torch.zeros_like(target)).clamp(0, weight.shape[0] - 1)
    return torch.where(valid, weight[safe], torch.zeros((), dtype=acc, device=weight.device)).sum()


class CrossEntropyLoss(torch.nn.Module):
    """Drop-in for torch.nn.CrossEntropyLoss (same constructor), plus the keyword-only extras of
    fusedce.cross_entropy."""

    def __init__(self, weight: Optional[torch.Tensor] = None, size_average=None, ignore_index: int = -100,
                 reduce=None, reduction: str = "mean", label_smoothing: float = 0.0, *, z_loss: float = 0.0,
                 softcap: Optional[float] = None, return_lse: bool = False, inplace_backward: bool = False,
                 fused: Optional[bool] = None, backend: str = "auto"):
        super().__init__()
        if size_average is not None or reduce is not None:
            reduction = _reduction.legacy_get_string(size_average, reduce)
        checks.check_reduction(reduction)
        checks.check_options(label_smoothing, z_loss, softcap)
        self.register_buffer("weight", weight)
        self.ignore_index = ignore_index
        self.reduction = reduction
        self.label_smoothing = label_smoothing
        self.z_loss = z_loss
        self.softcap = softcap
        self.return_lse = return_lse
        self.inplace_backward = inplace_backward
        self.fused = fused
        self.backend = backend

    def forward(self, input: torch.Tensor, target: torch.Tensor):
        return cross_entropy(input, target, weight=self.weight, ignore_index=self.ignore_index,
                             reduction=self.reduction, label_smoothing=self.label_smoothing, z_loss=self.z_loss,
                             softcap=self.softcap, return_lse=self.return_lse,
                             inplace_backward=self.inplace_backward, fused=self.fused, backend=self.backend)
