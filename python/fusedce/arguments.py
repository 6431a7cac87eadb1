"""The arguments of the public API, checked and normalised once into a Call: logits as rows x classes
(the class dimension last, unit stride), targets as int64 rows or probability rows, the class weight
in the accumulation dtype, the options, the backend, and what the result must look like (shape,
dtype). Each check raises, before any kernel runs, the exception torch raises for the same input (see
errors.py), with a message that says what was expected and what came."""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch

from . import backends
from .errors import InvalidArgument, UnsupportedDType
from .options import Options

REDUCTIONS = ("none", "mean", "sum")
_LOGITS_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
_LOW_PRECISION = (torch.float16, torch.bfloat16)


class Call(NamedTuple):
    logits: torch.Tensor  # [rows, V]
    target: torch.Tensor  # [rows] int64, or [rows, V] probabilities
    weight: Optional[torch.Tensor]  # [V] in the accumulation dtype
    options: Options
    reduction: str
    backend: backends.Backend
    batch_shape: tuple  # the shape of the unreduced loss
    out_dtype: torch.dtype


def check_reduction(reduction: str) -> None:
    if reduction not in REDUCTIONS:
        raise InvalidArgument(f"{reduction} is not a valid value for reduction: expected one of {REDUCTIONS}")


def check_logits(input) -> None:
    if not isinstance(input, torch.Tensor):
        raise TypeError(f"input must be a torch.Tensor, got {type(input).__name__}")
    if input.dtype not in _LOGITS_DTYPES:
        raise UnsupportedDType(f"input (logits) must be a floating-point tensor of dtype float32, float16, bfloat16 "
                               f"or float64, got dtype {input.dtype}")
    if input.dim() == 0:
        raise InvalidArgument("input must have at least one dimension (the classes), got a 0-d tensor")


def check_target(shape: torch.Size, device: torch.device, target, ignore_index: int) -> None:
    """target against logits of `shape` on `device`."""
    if not isinstance(target, torch.Tensor):
        raise TypeError(f"target must be a torch.Tensor, got {type(target).__name__}")
    if target.device != device:
        raise InvalidArgument(f"target is on {target.device} but input is on {device}")
    if target.is_floating_point():  # class probabilities
        if target.shape != shape:
            raise InvalidArgument(f"class-probability target must have the shape of input {tuple(shape)}, "
                                  f"got {tuple(target.shape)}")
        if ignore_index >= 0:
            raise InvalidArgument("ignore_index is not supported for floating point (class-probability) target")
        return
    if target.dtype == torch.bool or target.is_complex():
        raise UnsupportedDType(f"target must hold integer class indices or floating class probabilities, "
                               f"got {target.dtype}")
    tshape = target.shape
    if len(shape) == 2 and len(tshape) == 1 and tshape[0] == shape[0]:  # the common case, cheaply
        return
    expected = shape[:1] + shape[2:] if len(shape) > 1 else ()
    if tshape != expected:
        if len(shape) > 1 and target.dim() >= 1 and target.shape[0] != shape[0]:  # torch: ValueError
            raise InvalidArgument(f"Expected input batch_size ({shape[0]}) to match target batch_size "
                                  f"({target.shape[0]})")
        raise InvalidArgument(f"class-index target must have shape {tuple(expected)} for input of shape "
                              f"{tuple(shape)}, got {tuple(target.shape)}")


def check_weight(weight, classes: int, device: torch.device) -> None:
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"weight must be a torch.Tensor or None, got {type(weight).__name__}")
    if weight.dim() != 1 or weight.shape[0] != classes:
        raise InvalidArgument(f"weight must be a 1-D tensor with one entry per class ({classes}), "
                              f"got shape {tuple(weight.shape)}")
    if not weight.is_floating_point():
        raise UnsupportedDType(f"weight must be a floating-point tensor, got dtype {weight.dtype}")
    if weight.device != device:
        raise InvalidArgument(f"weight is on {weight.device} but input is on {device}")
    if weight.requires_grad and torch.is_grad_enabled():
        raise RuntimeError("cross_entropy is not differentiable with respect to weight, as in torch: "
                           "pass a weight that does not require grad")


def _rows(x: torch.Tensor) -> torch.Tensor:
    """(C,) -> (1, C); (N, C) -> itself; (N, C, d1..dk) -> (N d1..dk, C) with the class dim last; unit
    stride along the classes, which the kernels need."""
    if x.dim() == 1:
        x = x.unsqueeze(0)
    elif x.dim() > 2:
        x = x.movedim(1, -1).reshape(-1, x.shape[1])
    return x if x.is_contiguous() or x.stride(-1) == 1 or x.shape[-1] <= 1 else x.contiguous()


def check_dtype(dtype) -> None:
    if dtype is not None and (not isinstance(dtype, torch.dtype) or not dtype.is_floating_point):
        raise InvalidArgument(f"dtype must be a floating-point torch.dtype or None, got {dtype}")


def output_dtype(input: torch.Tensor, target: torch.Tensor) -> torch.dtype:
    """torch's dtype for the loss: the input's (the promoted one with probabilities); float32 for fp16 and
    bf16 under autocast, which runs cross_entropy in float32 on CPU and CUDA (the kernels read the
    low-precision logits as they are and accumulate in float32 anyway)."""
    soft = target.is_floating_point()
    if input.dtype in _LOW_PRECISION and torch.is_autocast_enabled(input.device.type):
        return torch.float64 if soft and target.dtype == torch.float64 else torch.float32
    return torch.promote_types(input.dtype, target.dtype) if soft else input.dtype


def describe(input, target, weight, ignore_index: int, reduction: str, label_smoothing: float, z_loss: float,
             softcap: Optional[float], backend: str, dtype: Optional[torch.dtype] = None) -> Call:
    """Every call runs this: the common case (2-D logits, 1-D int64 targets, no weight) stays cheap."""
    check_reduction(reduction)
    options = Options.checked(ignore_index, label_smoothing, z_loss, softcap)
    if dtype is not None:
        check_dtype(dtype)
    check_logits(input)
    device = input.device
    shape = input.shape
    check_target(shape, device, target, ignore_index)
    if weight is not None:
        check_weight(weight, shape[1] if len(shape) > 1 else shape[0], device)
        acc = torch.float64 if input.dtype == torch.float64 else torch.float32
        if weight.dtype != acc or not weight.is_contiguous():
            weight = weight.to(acc).contiguous()
    if target.is_floating_point():
        batch_shape = target.shape[:1] + target.shape[2:] if target.dim() > 1 else ()
        rows_target = _rows(target)
    else:
        batch_shape = target.shape
        rows_target = target if target.dim() == 1 else target.reshape(-1)
        if rows_target.dtype != torch.int64:
            rows_target = rows_target.to(torch.int64)
        rows_target = rows_target.contiguous()
    return Call(_rows(input), rows_target, weight, options, reduction, backends.resolve(backend, device, input.dtype),
                batch_shape, dtype or output_dtype(input, target))
