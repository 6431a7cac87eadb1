"""The op API, in one module: torch.library custom ops (functional forward and backward, and the
opt-in in-place backward), their fake (meta) implementations, and the autograd registration.

    fusedce::cross_entropy_forward(logits[R, V], target, weight?, ...) -> (loss[R], lse[R])
    fusedce::cross_entropy_backward(grad_loss[R], logits, target, weight?, lse, ...) -> dlogits[R, V]
    fusedce::cross_entropy_backward_(grad_loss, logits!, ...) -> ()   writes dlogits into logits
    fusedce::cross_entropy_forward_with_grad(logits, target, weight?, grad_loss, ...) -> (loss, lse, dlogits)
    fusedce::cross_entropy_forward_with_grad_(logits!, ...) -> (loss, lse)   gradient into logits

target is int64 class indices [R] or class probabilities [R, V]; loss and lse are fp32 (fp64 for
fp64 logits); softcap 0 means off; backend is a concrete backend name (see backends.resolve)."""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from . import backends
from .options import Options, accumulation_dtype, softcapped


def _check_op_inputs(logits: Tensor, target: Tensor, weight: Optional[Tensor], grad_loss: Optional[Tensor] = None,
                     lse: Optional[Tensor] = None) -> None:
    """The layout the kernels read, checked here because the ops are public (the API layer builds it)."""
    if logits.dim() != 2 or logits.dtype not in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
        raise ValueError(f"logits must be a 2-D float32/float16/bfloat16/float64 tensor, got {logits.dtype} "
                         f"{tuple(logits.shape)}")
    rows, vocab = logits.shape
    if vocab == 0:
        raise ValueError(f"logits must have at least one class, got shape {tuple(logits.shape)}")
    if logits.stride(1) != 1 and vocab > 1:
        raise ValueError(f"logits must have unit stride along the classes, got strides {logits.stride()}")
    if target.is_floating_point():
        if target.shape != logits.shape or (target.stride(1) != 1 and vocab > 1):
            raise ValueError(f"probability targets must be [{rows}, {vocab}] with unit stride along the classes, "
                             f"got {tuple(target.shape)} with strides {target.stride()}")
    elif target.dtype != torch.int64 or target.shape != (rows,) or not target.is_contiguous():
        raise ValueError(f"class-index targets must be a contiguous int64 tensor of shape ({rows},), got "
                         f"{target.dtype} {tuple(target.shape)}")
    acc = accumulation_dtype(logits.dtype)
    if weight is not None and (weight.shape != (vocab,) or weight.dtype != acc or not weight.is_contiguous()):
        raise ValueError(f"weight must be a contiguous {acc} tensor of shape ({vocab},), got {weight.dtype} "
                         f"{tuple(weight.shape)}")
    row_tensors = [t for t in (grad_loss, lse) if t is not None]
    for t in row_tensors:
        if t.shape != (rows,) or t.dtype != acc:
            raise ValueError(f"grad_loss and lse must be {acc} tensors of shape ({rows},), got {t.dtype} "
                             f"{tuple(t.shape)}")
    if lse is not None and not lse.is_contiguous():  # grad_loss may have any stride, lse is read densely
        raise ValueError(f"lse must be contiguous, got strides {lse.stride()}")
    if any(t.device != logits.device for t in (target, weight, *row_tensors) if t is not None):
        raise ValueError("all tensors must be on the logits' device")


@torch.library.custom_op("fusedce::cross_entropy_forward", mutates_args=())
def cross_entropy_forward(logits: Tensor, target: Tensor, weight: Optional[Tensor], ignore_index: int,
                          label_smoothing: float, z_loss: float, softcap: float,
                          backend: str) -> Tuple[Tensor, Tensor]:
    _check_op_inputs(logits, target, weight)
    opts = Options(ignore_index, label_smoothing, z_loss, softcap)
    return backends.get(backend).forward(logits, target, weight, opts)


def _fake_forward(logits):
    acc = accumulation_dtype(logits.dtype)
    rows = logits.shape[0]
    return logits.new_empty(rows, dtype=acc), logits.new_empty(rows, dtype=acc)


@cross_entropy_forward.register_fake
def _(logits, target, weight, ignore_index, label_smoothing, z_loss, softcap, backend):
    return _fake_forward(logits)


@torch.library.custom_op("fusedce::cross_entropy_backward", mutates_args=())
def cross_entropy_backward(grad_loss: Tensor, logits: Tensor, target: Tensor, weight: Optional[Tensor],
                           lse: Tensor, ignore_index: int, label_smoothing: float, z_loss: float,
                           softcap: float, backend: str) -> Tensor:
    _check_op_inputs(logits, target, weight, grad_loss, lse)
    dlogits = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
    opts = Options(ignore_index, label_smoothing, z_loss, softcap)
    backends.get(backend).backward(grad_loss, logits, target, weight, lse, opts, dlogits)
    return dlogits


@cross_entropy_backward.register_fake
def _(grad_loss, logits, target, weight, lse, ignore_index, label_smoothing, z_loss, softcap, backend):
    return torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)


@torch.library.custom_op("fusedce::cross_entropy_backward_", mutates_args=("logits",))
def cross_entropy_backward_(grad_loss: Tensor, logits: Tensor, target: Tensor, weight: Optional[Tensor],
                            lse: Tensor, ignore_index: int, label_smoothing: float, z_loss: float,
                            softcap: float, backend: str) -> None:
    """Like cross_entropy_backward, but the gradient overwrites `logits` (each block of a row is read
    before it is written, so the kernels may alias input and output)."""
    _check_op_inputs(logits, target, weight, grad_loss, lse)
    opts = Options(ignore_index, label_smoothing, z_loss, softcap)
    backends.get(backend).backward(grad_loss, logits, target, weight, lse, opts, logits)


@cross_entropy_backward_.register_fake
def _(grad_loss, logits, target, weight, lse, ignore_index, label_smoothing, z_loss, softcap, backend):
    return None


@torch.library.custom_op("fusedce::cross_entropy_forward_with_grad", mutates_args=())
def cross_entropy_forward_with_grad(logits: Tensor, target: Tensor, weight: Optional[Tensor], grad_loss: Tensor,
                                    ignore_index: int, label_smoothing: float, z_loss: float, softcap: float,
                                    backend: str) -> Tuple[Tensor, Tensor, Tensor]:
    """The fused mode: loss, lse and the gradient of sum(grad_loss * loss) in one pass over the logits."""
    _check_op_inputs(logits, target, weight, grad_loss)
    dlogits = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
    opts = Options(ignore_index, label_smoothing, z_loss, softcap)
    loss, lse = backends.get(backend).forward(logits, target, weight, opts, grad_loss, dlogits)
    return loss, lse, dlogits


@cross_entropy_forward_with_grad.register_fake
def _(logits, target, weight, grad_loss, ignore_index, label_smoothing, z_loss, softcap, backend):
    loss, lse = _fake_forward(logits)
    return loss, lse, torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)


@torch.library.custom_op("fusedce::cross_entropy_forward_with_grad_", mutates_args=("logits",))
def cross_entropy_forward_with_grad_(logits: Tensor, target: Tensor, weight: Optional[Tensor], grad_loss: Tensor,
                                     ignore_index: int, label_smoothing: float, z_loss: float, softcap: float,
                                     backend: str) -> Tuple[Tensor, Tensor]:
    """Fused mode whose gradient overwrites the logits (each row is fully read before it is written)."""
    _check_op_inputs(logits, target, weight, grad_loss)
    opts = Options(ignore_index, label_smoothing, z_loss, softcap)
    return backends.get(backend).forward(logits, target, weight, opts, grad_loss, logits)


@cross_entropy_forward_with_grad_.register_fake
def _(logits, target, weight, grad_loss, ignore_index, label_smoothing, z_loss, softcap, backend):
    return _fake_forward(logits)


# ---- autograd ---------------------------------------------------------------------------------


def input_grads(needs_input_grad, saved, grad_loss, grad_lse, options, inplace: bool = False):
    """Gradients of (logits, target, weight) for the forward op: the one backward formula shared by
    the op's autograd registration and fusedce.CrossEntropyFunction.

    saved = (logits, target, weight, lse); options = (ignore_index, label_smoothing, z_loss, softcap,
    backend). grad_lse (None when lse was not used) adds grad_lse * softmax to the logits' gradient."""
    logits, target, weight, lse = saved
    ignore_index, label_smoothing, z_loss, softcap, backend = options
    if needs_input_grad[2]:
        raise RuntimeError("cross_entropy is not differentiable with respect to weight, as in torch: "
                           "pass a weight that does not require grad")
    acc = lse.dtype
    if grad_loss is None:
        grad_loss = torch.zeros_like(lse)
    grad_loss = grad_loss.to(acc)
    # the terms that read the logits come first: the in-place kernel overwrites them
    dtarget = lse_term = dlogits = None
    if needs_input_grad[1]:  # class-probability targets: dloss/dq_j = -(1 - eps) w_j log p_j
        logp = softcapped(logits.to(acc), softcap) - lse[:, None]
        dtarget = -(1 - label_smoothing) * grad_loss[:, None] * logp
        if weight is not None:
            dtarget = dtarget * weight.to(acc)
        dtarget = dtarget.to(target.dtype)
    if needs_input_grad[0]:
        if grad_lse is not None:
            lse_term = _lse_grad(grad_lse.to(acc), logits, lse, softcap).to(logits.dtype)
        if inplace:
            torch.ops.fusedce.cross_entropy_backward_(grad_loss, logits, target, weight, lse, *options)
            dlogits = logits if lse_term is None else logits.add_(lse_term)
        else:
            dlogits = torch.ops.fusedce.cross_entropy_backward(grad_loss, logits, target, weight, lse, *options)
            dlogits = dlogits if lse_term is None else dlogits.add_(lse_term)
    return dlogits, dtarget, None


def _lse_grad(grad_lse: Tensor, logits: Tensor, lse: Tensor, softcap: float) -> Tensor:
    """d lse / d x = softmax(x') * d x'/d x."""
    x = softcapped(logits.to(lse.dtype), softcap)
    d = grad_lse[:, None] * torch.exp(x - lse[:, None])
    return d * (1 - (x / softcap) ** 2) if softcap > 0 else d


def _setup_context(ctx, inputs, output):
    logits, target, weight, ignore_index, label_smoothing, z_loss, softcap, backend = inputs
    ctx.save_for_backward(logits, target, weight, output[1])
    ctx.options = (ignore_index, label_smoothing, z_loss, softcap, backend)
    ctx.set_materialize_grads(False)


def _backward(ctx, grad_loss, grad_lse):
    grads = input_grads(ctx.needs_input_grad, ctx.saved_tensors, grad_loss, grad_lse, ctx.options)
    return grads + (None,) * 5


torch.library.register_autograd("fusedce::cross_entropy_forward", _backward, setup_context=_setup_context)
