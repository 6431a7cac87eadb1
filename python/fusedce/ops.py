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
from .options import Options, accumulation_dtype


@torch.library.custom_op("fusedce::cross_entropy_forward", mutates_args=())
def cross_entropy_forward(logits: Tensor, target: Tensor, weight: Optional[Tensor], ignore_index: int,
                          label_smoothing: float, z_loss: float, softcap: float,
                          backend: str) -> Tuple[Tensor, Tensor]:
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
    dlogits = dtarget = None
    if needs_input_grad[0]:
        if inplace:
            torch.ops.fusedce.cross_entropy_backward_(grad_loss, logits, target, weight, lse, *options)
            dlogits = logits
        else:
            dlogits = torch.ops.fusedce.cross_entropy_backward(grad_loss, logits, target, weight, lse, *options)
        if grad_lse is not None:
            dlogits = dlogits + _lse_grad(grad_lse.to(acc), logits, lse, softcap).to(dlogits.dtype)
    if needs_input_grad[1]:  # class-probability targets: dloss/dq_j = -(1 - eps) w_j log p_j
        logp = _capped(logits.to(acc), softcap) - lse[:, None]
        dtarget = -(1 - label_smoothing) * grad_loss[:, None] * logp
        if weight is not None:
            dtarget = dtarget * weight.to(acc)
        dtarget = dtarget.to(target.dtype)
    return dlogits, dtarget, None


def _capped(x: Tensor, softcap: float) -> Tensor:
    return softcap * torch.tanh(x / softcap) if softcap > 0 else x


def _lse_grad(grad_lse: Tensor, logits: Tensor, lse: Tensor, softcap: float) -> Tensor:
    """d lse / d x = softmax(x') * d x'/d x."""
    x = _capped(logits.to(lse.dtype), softcap)
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
