"""The op API, in one module: torch.library custom ops, their fake (meta) implementations and their
autograd registration. They are the public op surface and what torch.compile traces; the eager path
calls the kernels directly (fusedce.autograd), with the same backward formula (autograd.input_grads).

    fusedce::cross_entropy_forward(logits[R, V], target, weight?, ignore_index, label_smoothing, z_loss,
                                   softcap) -> (loss[R], lse[R])
    fusedce::cross_entropy_backward(grad_loss[R], logits, target, weight?, lse, ignore_index,
                                    label_smoothing, z_loss, softcap) -> dlogits[R, V]

served by the C++ kernels, the CPU ones for CPU tensors and the CUDA ones for CUDA tensors, and

    fusedce::triton_cross_entropy_forward / fusedce::triton_cross_entropy_backward

by the Triton kernels: a torch.library.triton_op where torch has it and Triton compiles the kernels
(torch.compile then traces into the kernels instead of calling an opaque op), a plain custom op under
Triton's interpreter. The pure-PyTorch backend needs no op: torch.compile traces its tensor ops.

target is int64 class indices [R] or class probabilities [R, V]; weight [V] and the outputs are in the
accumulation dtype (fp32, fp64 for fp64 logits); softcap 0 means off. The forward ops are
differentiable in the logits (and probability targets); the backward ops are not (torch.compile does
not differentiate a backward twice; eager double backward goes through fusedce.autograd)."""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from . import autograd, backends, composite
from .errors import InvalidArgument
from .options import Options, accumulation_dtype

def _check_op_inputs(logits: Tensor, target: Tensor, weight: Optional[Tensor], grad_loss: Optional[Tensor] = None,
                     lse: Optional[Tensor] = None) -> None:
    """The layout the kernels read, checked here because the ops are public (the API builds it)."""
    if logits.dim() != 2 or logits.dtype not in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
        raise InvalidArgument(f"logits must be a 2-D float32/float16/bfloat16/float64 tensor, got {logits.dtype} "
                              f"{tuple(logits.shape)}")
    rows, vocab = logits.shape
    if vocab == 0:
        raise InvalidArgument(f"logits must have at least one class, got shape {tuple(logits.shape)}")
    if logits.stride(1) != 1 and vocab > 1:
        raise InvalidArgument(f"logits must have unit stride along the classes, got strides {logits.stride()}")
    if target.is_floating_point():
        if target.shape != logits.shape or (target.stride(1) != 1 and vocab > 1):
            raise InvalidArgument(f"probability targets must be [{rows}, {vocab}] with unit stride along the "
                                  f"classes, got {tuple(target.shape)} with strides {target.stride()}")
    elif target.dtype != torch.int64 or target.shape != (rows,) or not target.is_contiguous():
        raise InvalidArgument(f"class-index targets must be a contiguous int64 tensor of shape ({rows},), got "
                              f"{target.dtype} {tuple(target.shape)}")
    acc = accumulation_dtype(logits.dtype)
    if weight is not None and (weight.shape != (vocab,) or weight.dtype != acc or not weight.is_contiguous()):
        raise InvalidArgument(f"weight must be a contiguous {acc} tensor of shape ({vocab},), got {weight.dtype} "
                              f"{tuple(weight.shape)}")
    row_tensors = [t for t in (grad_loss, lse) if t is not None]
    for t in row_tensors:
        if t.shape != (rows,) or t.dtype != acc:
            raise InvalidArgument(f"grad_loss and lse must be {acc} tensors of shape ({rows},), got {t.dtype} "
                                  f"{tuple(t.shape)}")
    if lse is not None and not lse.is_contiguous():  # grad_loss may have any stride, lse is read densely
        raise InvalidArgument(f"lse must be contiguous, got strides {lse.stride()}")
    if any(t.device != logits.device for t in (target, weight, *row_tensors) if t is not None):
        raise InvalidArgument("all tensors must be on the logits' device")


def _native_backend(device: torch.device) -> backends.Backend:
    backend = backends.get("cpu" if device.type == "cpu" else "cuda")
    reason = backend.unavailable(device)
    if reason:
        raise RuntimeError(f"fusedce's native kernels cannot serve this input: {reason}")
    return backend


def _triton_backend(device: torch.device) -> backends.Backend:
    return backends.get("triton")


def _fake_forward(logits, *args):
    acc = accumulation_dtype(logits.dtype)
    return logits.new_empty(logits.shape[0], dtype=acc), logits.new_empty(logits.shape[0], dtype=acc)


def _fake_backward(grad_loss, logits, *args):
    return torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)


class OpKernels(backends.Backend):
    """The forward and backward of a backend through its custom ops: what the traced (torch.compile)
    path calls instead of the kernels."""

    def __init__(self, forward_op, backward_op):
        self.forward_op, self.backward_op = forward_op, backward_op

    def forward(self, logits, target, weight, opts, grad_loss=None, dlogits=None):
        return self.forward_op(logits, target, weight, *opts)

    def backward(self, grad_loss, logits, target, weight, lse, opts, out=None):
        return self.backward_op(grad_loss, logits, target, weight, lse, *opts)


class CompositeKernels(backends.Backend):
    """The pure-PyTorch backend's traced path: the loss as differentiable tensor ops, which torch.compile
    differentiates and fuses itself (an out-of-range class index gives a NaN row, as on the GPU)."""

    def forward(self, logits, target, weight, opts, grad_loss=None, dlogits=None):
        return composite.loss_and_lse(logits, target, weight, opts)

    def backward(self, grad_loss, logits, target, weight, lse, opts, out=None):
        return composite.logits_grad(grad_loss, None, logits, target, weight, opts)


def _define(prefix: str, backend_for, triton: bool) -> OpKernels:
    """Registers the forward and backward ops fusedce::<prefix>cross_entropy_{forward,backward}, run by
    backend_for(device), and the forward's autograd; returns their OpKernels."""

    # the schemas come from the annotations
    def forward(logits: Tensor, target: Tensor, weight: Optional[Tensor], ignore_index: int, label_smoothing: float,
                z_loss: float, softcap: float) -> Tuple[Tensor, Tensor]:
        _check_op_inputs(logits, target, weight)
        opts = Options(ignore_index, label_smoothing, z_loss, softcap)
        return backend_for(logits.device).forward(logits, target, weight, opts)

    def backward(grad_loss: Tensor, logits: Tensor, target: Tensor, weight: Optional[Tensor], lse: Tensor,
                 ignore_index: int, label_smoothing: float, z_loss: float, softcap: float) -> Tensor:
        _check_op_inputs(logits, target, weight, grad_loss, lse)
        opts = Options(ignore_index, label_smoothing, z_loss, softcap)
        return backend_for(logits.device).backward(grad_loss, logits, target, weight, lse, opts)

    ops = []
    for direction, fn, fake in (("forward", forward, _fake_forward), ("backward", backward, _fake_backward)):
        name = f"fusedce::{prefix}cross_entropy_{direction}"
        if triton:  # torch finds a triton_op's kernels by reading its source for wrap_triton calls, which
            # the backend hides, and its compile cache hashes their source: name them (torch's private table)
            op = torch.library.triton_op(name, fn, mutates_args=())
            getattr(torch._library.triton, "triton_ops_to_kernels", {})[name] = list(_triton_kernels().KERNELS)
        else:
            op = torch.library.custom_op(name, fn, mutates_args=())
            op.register_fake(fake)
        ops.append(op)
    kernels = OpKernels(*ops)

    def setup_context(ctx, inputs, output):
        logits, target, weight, *options = inputs
        ctx.save_for_backward(logits, target, weight, output[1])
        ctx.options = Options(*options)
        ctx.set_materialize_grads(False)

    def backward_formula(ctx, grad_loss, grad_lse):
        logits, target, weight, lse = ctx.saved_tensors
        return autograd.input_grads(kernels, ctx.needs_input_grad, logits, target, weight, lse, grad_loss,
                                    grad_lse, ctx.options) + (None,) * 4

    def not_differentiable(ctx, grad):
        raise RuntimeError(f"fusedce::{prefix}cross_entropy_backward is the gradient of "
                           f"fusedce::{prefix}cross_entropy_forward and is not differentiable itself: for second "
                           f"derivatives call fusedce.cross_entropy in eager mode (its backward is differentiable "
                           f"with create_graph=True)")

    torch.library.register_autograd(f"fusedce::{prefix}cross_entropy_forward", backward_formula,
                                    setup_context=setup_context)
    torch.library.register_autograd(f"fusedce::{prefix}cross_entropy_backward", not_differentiable)
    return kernels


def _triton_kernels():
    from .triton_kernels import cross_entropy
    return cross_entropy


def _triton_traceable() -> Optional[bool]:
    """None without Triton; True when torch.compile can trace into the Triton kernels: torch has
    triton_op, and Triton compiles them (the interpreter's cannot run on the fake tensors of tracing)."""
    try:
        kernels = _triton_kernels()
    except ImportError:
        return None
    return hasattr(torch.library, "triton_op") and kernels.COMPILED


_NATIVE = _define("", _native_backend, triton=False)
TRITON_TRACEABLE = _triton_traceable()
_TRITON = None if TRITON_TRACEABLE is None else _define("triton_", _triton_backend, triton=TRITON_TRACEABLE)
_TRACED = {"cpu": _NATIVE, "cuda": _NATIVE, "triton": _TRITON, "torch": CompositeKernels()}


def traceable(backend: backends.Backend) -> backends.Backend:
    """What the traced path calls for `backend`: its ops, or the composite loss."""
    return _TRACED[backend.name]
