"""Argument checks of the public API, one small helper per rule. Each raises before any kernel runs,
with a message that says what was expected and what came."""
from __future__ import annotations

import math
from typing import Optional

import torch

REDUCTIONS = ("none", "mean", "sum")


def check_reduction(reduction: str) -> None:
    if reduction not in REDUCTIONS:
        raise ValueError(f"{reduction} is not a valid value for reduction: expected one of {REDUCTIONS}")


def check_options(label_smoothing: float, z_loss: float, softcap: Optional[float]) -> None:
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"label_smoothing must be between 0.0 and 1.0, got {label_smoothing}")
    if not 0.0 <= z_loss < math.inf:
        raise ValueError(f"z_loss must be a finite non-negative coefficient, got {z_loss}")
    if softcap is not None and not 0.0 < softcap < math.inf:
        raise ValueError(f"softcap must be a finite positive number or None, got {softcap}")


def check_logits(input: torch.Tensor) -> None:
    if not isinstance(input, torch.Tensor):
        raise TypeError(f"input must be a torch.Tensor, got {type(input).__name__}")
    if not input.is_floating_point():
        raise TypeError(f"input (logits) must be a floating-point tensor, got dtype {input.dtype}")
    if input.dtype not in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
        raise TypeError(f"input dtype {input.dtype} is not supported: expected float32, float16, bfloat16 or float64")
    if input.dim() == 0:
        raise ValueError("input must have at least one dimension (the classes), got a 0-d tensor")
    if input.shape[1 if input.dim() > 1 else 0] == 0:
        raise ValueError(f"input has no classes: shape {tuple(input.shape)}")


def check_target(input: torch.Tensor, target: torch.Tensor, ignore_index: int) -> None:
    if not isinstance(target, torch.Tensor):
        raise TypeError(f"target must be a torch.Tensor, got {type(target).__name__}")
    if target.device != input.device:
        raise ValueError(f"target is on {target.device} but input is on {input.device}")
    if target.is_floating_point():  # class probabilities
        if target.shape != input.shape:
            raise ValueError(f"class-probability target must have the shape of input {tuple(input.shape)}, "
                             f"got {tuple(target.shape)}")
        if ignore_index >= 0:
            raise ValueError("ignore_index is not supported for floating point (class-probability) target")
        return
    if target.dtype == torch.bool or target.is_complex():
        raise TypeError(f"target must hold integer class indices or floating class probabilities, got {target.dtype}")
    expected = tuple(input.shape[:1] + input.shape[2:]) if input.dim() > 1 else ()
    if tuple(target.shape) != expected:
        if input.dim() > 1 and target.dim() >= 1 and target.shape[0] != input.shape[0]:
            raise ValueError(f"Expected input batch_size ({input.shape[0]}) to match target batch_size "
                             f"({target.shape[0]})")
        raise ValueError(f"class-index target must have shape {expected} for input of shape "
                         f"{tuple(input.shape)}, got {tuple(target.shape)}")


def check_weight(weight: Optional[torch.Tensor], input: torch.Tensor) -> None:
    if weight is None:
        return
    classes = input.shape[1 if input.dim() > 1 else 0]
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"weight must be a torch.Tensor or None, got {type(weight).__name__}")
    if weight.dim() != 1 or weight.shape[0] != classes:
        raise ValueError(f"weight must be a 1-D tensor with one entry per class ({classes}), "
                         f"got shape {tuple(weight.shape)}")
    if not weight.is_floating_point():
        raise TypeError(f"weight must be a floating-point tensor, got dtype {weight.dtype}")
    if weight.device != input.device:
        raise ValueError(f"weight is on {weight.device} but input is on {input.device}")
    if weight.requires_grad and torch.is_grad_enabled():
        raise RuntimeError("cross_entropy is not differentiable with respect to weight, as in torch: "
                           "pass a weight that does not require grad")


def check_target_range(target: torch.Tensor, classes: int, ignore_index: int) -> None:
    """Out-of-range class indices raise IndexError, as in torch. Only on the CPU, where looking at the
    values costs no device sync; GPU kernels turn such rows into NaN instead of syncing."""
    if target.device.type != "cpu" or target.numel() == 0:
        return
    bad = (target != ignore_index) & ((target < 0) | (target >= classes))
    if bool(bad.any()):
        row = int(bad.nonzero()[0, 0])
        raise IndexError(f"Target {int(target[row])} is out of bounds: expected a class index in [0, {classes}) "
                         f"or ignore_index={ignore_index} (row {row})")
