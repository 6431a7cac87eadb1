"""Public API: drop-in replacements for torch.nn.functional.cross_entropy and torch.nn.CrossEntropyLoss.

One call, top to bottom: the arguments become a Call (fusedce.arguments: checks, rows x classes,
backend, result dtype); then one of four paths runs the kernels:
  - nothing needs a gradient: the backend directly (its kernel reduces "mean"/"sum" itself on the CPU);
  - the fused mode (a reduced loss in eager autograd): FusedCrossEntropyFunction, gradient in the forward;
  - otherwise in eager mode: CrossEntropyFunction (per-row loss and lse), then the reduction;
  - under torch.compile: the custom ops of fusedce.ops, then the reduction.
No path syncs the host. DTensor logits sharded by class go to fusedce.distributed instead."""
from __future__ import annotations

import sys
from typing import Optional

import torch
import torch.autograd.forward_ad as _forward_ad
from torch.nn import _reduction

from . import ops
from .arguments import Call, check_dtype, check_reduction, describe, output_dtype
from .autograd import CrossEntropyFunction, FusedCrossEntropyFunction
from .errors import InvalidArgument
from .options import Options

_in_functorch_transform = torch._C._functorch.peek_interpreter_stack

# Below this many logits (rows x classes), backend "auto" runs torch's own cross_entropy: a fused kernel
# saves nothing on so little memory, and a Python autograd Function alone costs about what torch's whole
# call does (on the 2-core CI machine, an empty Function's forward + backward took 99 us against
# F.cross_entropy's 100 us at 32x10: no kernel could make up for it). The size comes from
# `python -m benchmarks.overhead` (see the README): at 256x1000 the kernels' forward took 1.2-1.5x
# torch's there (its threads were polling from its previous call, ours had to start), at 1024x1000 0.74-0.94x.
TORCH_BELOW_ELEMENTS = 1 << 18

# The small-input path is counted in instructions (a tensor attribute costs ~500, a tensor method ~1000,
# torch's whole 32x10 call ~31000): it calls torch's op as F.cross_entropy does, after as few looks at
# the tensors as give torch's results.
_Tensor, _int64 = torch.Tensor, torch.int64
_TORCH_EXACT = (torch.float32, torch.bfloat16, torch.float64)  # logits torch sums as fusedce would
_REDUCTION_ENUM = {"none": 0, "mean": 1, "sum": 2}  # torch.nn._reduction.get_enum


def cross_entropy(input: torch.Tensor, target: torch.Tensor, weight: Optional[torch.Tensor] = None,
                  size_average: Optional[bool] = None, ignore_index: int = -100, reduce: Optional[bool] = None,
                  reduction: str = "mean", label_smoothing: float = 0.0, *, z_loss: float = 0.0,
                  softcap: Optional[float] = None, return_lse: bool = False, inplace_backward: bool = False,
                  fused: Optional[bool] = None, backend: str = "auto", dtype: Optional[torch.dtype] = None):
    """Same signature and results as torch.nn.functional.cross_entropy (autocast, double backward,
    torch.func and forward-mode AD included), computed by a fused single-pass kernel that accumulates in
    fp32 (fp64 for fp64 input). Keyword-only extras:

    z_loss: coefficient of the auxiliary z-loss, adds z_loss * lse**2 for every non-ignored row.
    softcap: if set, logits -> softcap * tanh(logits / softcap) before the softmax (Gemma 2 style).
    return_lse: also return the per-row log-sum-exp (fp32, fp64 for fp64 input; the shape of the
        unreduced loss).
    inplace_backward: write the logits' gradient into the logits' memory (see CrossEntropyFunction);
        in the fused mode this happens in the forward, so the logits hold their gradient from then on.
    fused: compute the logits' gradient during the forward (see FusedCrossEntropyFunction). None (the
        default) turns it on where it applies: a "mean" or "sum" loss in eager autograd whose logits
        require grad, no return_lse, no target that requires grad. The gradient's memory is then taken
        at the forward. Off under torch.compile, torch.func transforms and forward-mode AD.
    backend: "auto" | "cpu" | "cuda" | "triton" | "torch".
    dtype: the returned loss's dtype; None gives torch's (the logits' dtype, float32 under autocast).
        torch.float32 keeps a bf16 model's loss, and the scale its backward hands back, unrounded: the
        kernels accumulate in fp32 anyway.

    "mean" divides by the summed weight of the non-ignored targets (the number of rows for class
    probabilities), exactly as torch; the z-loss term is included in what is averaged.
    """
    if size_average is not None or reduce is not None:
        reduction = _reduction.legacy_get_string(size_average, reduce)
    if type(input) is _Tensor:
        if (backend == "auto" and input.numel() < TORCH_BELOW_ELEMENTS
                and not (z_loss or softcap is not None or return_lse or inplace_backward or fused)):
            enum = _REDUCTION_ENUM.get(reduction)
            if (enum is not None and weight is None and dtype is None and input.dtype in _TORCH_EXACT
                    and getattr(target, "dtype", None) is _int64):
                return torch._C._nn.cross_entropy_loss(input, target, None, enum, ignore_index, label_smoothing)
            return _torch_cross_entropy(input, target, weight, ignore_index, reduction, label_smoothing, dtype)
    elif _is_dtensor(input):  # sharded by class: the vocab-parallel loss
        from .distributed import dtensor
        return dtensor.cross_entropy(input, target, weight, inplace_backward, ignore_index=ignore_index,
                                     reduction=reduction, label_smoothing=label_smoothing, z_loss=z_loss,
                                     softcap=softcap, return_lse=return_lse, fused=fused, backend=backend, dtype=dtype)
    call = describe(input, target, weight, ignore_index, reduction, label_smoothing, z_loss, softcap, backend, dtype)
    if call.logits.shape[-1] == 0:
        return _without_classes(input, target, weight, call, return_lse)
    kernels = call.backend
    if torch.compiler.is_compiling():  # fused and inplace_backward are off: the compiler plans the buffers
        loss, lse = ops.traceable(kernels).forward(call.logits, call.target, call.weight, call.options)
        return _result(loss, lse, call, return_lse, ops.traceable(kernels))
    transformed = _forward_ad._current_level >= 0 or _in_functorch_transform() is not None
    soft_grad = call.target.requires_grad
    needs_grad = torch.is_grad_enabled() and (input.requires_grad or soft_grad)
    if not needs_grad and not transformed:
        if reduction != "none" and not return_lse:
            return kernels.reduced(call.logits, call.target, call.weight, call.options, reduction, call.out_dtype)
        loss, lse = kernels.forward(call.logits, call.target, call.weight, call.options)
        return _result(loss, lse, call, return_lse, kernels)
    if fused is None:
        fused = reduction != "none" and not return_lse and not soft_grad and not transformed
    elif fused and (reduction == "none" or return_lse or soft_grad):
        raise InvalidArgument("fused=True needs reduction 'mean' or 'sum', return_lse=False and a target that does "
                              "not require grad: only the logits' gradient of the reduced loss is computed")
    if fused and not transformed:
        return FusedCrossEntropyFunction.apply(call.logits, call.target, call.weight, call.options, kernels,
                                               reduction, call.out_dtype, inplace_backward)
    loss, lse = CrossEntropyFunction.apply(call.logits, call.target, call.weight, call.options, kernels,
                                           inplace_backward and not transformed)
    # under torch.func the targets may be wrapped too: the denominator from tensor ops
    return _result(loss, lse, call, return_lse, ops.traceable(kernels) if transformed else kernels)


def _is_dtensor(x) -> bool:
    """Without importing torch.distributed.tensor where nothing made a DTensor."""
    module = sys.modules.get("torch.distributed.tensor")
    return module is not None and isinstance(x, module.DTensor)


def _result(loss, lse, call: Call, return_lse: bool, kernels):
    """The per-row loss reduced and shaped as torch's, and the lse shaped like the unreduced loss;
    kernels gives the "mean" denominator."""
    if call.reduction == "none":
        loss = loss.reshape(call.batch_shape)
    elif call.reduction == "sum":
        loss = loss.sum()
    else:
        loss = loss.sum() / kernels.mean_denominator(call.target, call.weight, call.options.ignore_index)
    loss = loss.to(call.out_dtype)
    return (loss, lse.reshape(call.batch_shape)) if return_lse else loss


def _torch_cross_entropy(input, target, weight, ignore_index, reduction, label_smoothing, dtype):
    """torch's own cross_entropy, with its results, errors and autograd, on small inputs. fp16 logits, and
    logits narrower than a dtype asked for, are widened to float32 first (cheap at this size): torch sums
    fp16 log-probabilities in fp16, and a wider result must not carry the narrower rounding."""
    if dtype is not None:
        check_dtype(dtype)
    original = input
    if input.is_floating_point() and (input.dtype == torch.float16 or (
            dtype is not None and dtype.itemsize > input.dtype.itemsize)):
        input = input.to(torch.float32 if dtype is None or dtype.itemsize <= 4 else dtype)
    if isinstance(weight, torch.Tensor) and weight.is_floating_point() and weight.dtype != input.dtype:
        weight = weight.to(input.dtype)  # fusedce takes any floating weight; torch wants the input's dtype
    if isinstance(target, torch.Tensor) and target.dtype in (torch.int8, torch.int16, torch.int32):
        target = target.long()  # fusedce takes any integer class index; torch wants int64 or uint8
    loss = torch.nn.functional.cross_entropy(input, target, weight, ignore_index=ignore_index, reduction=reduction,
                                             label_smoothing=label_smoothing)
    if dtype is None and input is not original:
        dtype = output_dtype(original, target)
    return loss if dtype is None else loss.to(dtype)


def _without_classes(input, target, weight, call: Call, return_lse: bool):
    """Logits with no classes: there is nothing to fuse, and torch's own function gives torch's answer
    (its loss for probabilities, IndexError for a class index)."""
    if return_lse or call.options.z_loss or call.options.softcap:
        raise InvalidArgument(f"return_lse, z_loss and softcap need at least one class, got input of shape "
                              f"{tuple(input.shape)}")
    loss = torch.nn.functional.cross_entropy(input, target, weight, ignore_index=call.options.ignore_index,
                                             reduction=call.reduction, label_smoothing=call.options.label_smoothing)
    return loss.to(call.out_dtype)


class CrossEntropyLoss(torch.nn.CrossEntropyLoss):
    """Drop-in for torch.nn.CrossEntropyLoss (same constructor, and an instance of it), plus the
    keyword-only extras of fusedce.cross_entropy."""

    def __init__(self, weight: Optional[torch.Tensor] = None, size_average=None, ignore_index: int = -100,
                 reduce=None, reduction: str = "mean", label_smoothing: float = 0.0, *, z_loss: float = 0.0,
                 softcap: Optional[float] = None, return_lse: bool = False, inplace_backward: bool = False,
                 fused: Optional[bool] = None, backend: str = "auto", dtype: Optional[torch.dtype] = None):
        super().__init__(weight, size_average, ignore_index, reduce, reduction, label_smoothing)
        check_reduction(self.reduction)  # checked now, not at the first call
        Options.checked(ignore_index, label_smoothing, z_loss, softcap)
        check_dtype(dtype)
        self.z_loss, self.softcap, self.dtype = z_loss, softcap, dtype
        self.return_lse, self.inplace_backward, self.fused, self.backend = return_lse, inplace_backward, fused, backend

    def forward(self, input: torch.Tensor, target: torch.Tensor):
        return cross_entropy(input, target, weight=self.weight, ignore_index=self.ignore_index,
                             reduction=self.reduction, label_smoothing=self.label_smoothing, z_loss=self.z_loss,
                             softcap=self.softcap, return_lse=self.return_lse,
                             inplace_backward=self.inplace_backward, fused=self.fused, backend=self.backend,
                             dtype=self.dtype)
