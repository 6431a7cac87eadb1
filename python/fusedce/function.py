"""fusedce.CrossEntropyFunction: the autograd.Function behind the public API. It calls the custom
ops of fusedce.ops, and adds what an op registration cannot express: the opt-in in-place backward."""
from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from . import ops
from .options import accumulation_dtype


def _check_inplace_allowed(logits: torch.Tensor) -> None:
    base = logits
    while base is not None:  # a view of a leaf shares its memory
        if base.is_leaf and base.requires_grad:
            raise RuntimeError("inplace_backward=True overwrites the logits with their gradient, which would "
                               "overwrite a leaf tensor (a parameter or input); use it on logits computed by "
                               "the model")
        base = base._base
    if any(stride == 0 and size > 1 for stride, size in zip(logits.stride(), logits.shape)):
        raise RuntimeError("inplace_backward=True needs logits with their own memory per element, got an "
                           f"expanded tensor (strides {logits.stride()})")


_SECOND_INPLACE_BACKWARD = ("backward called twice with inplace_backward=True: the first backward handed out the "
                            "logits' memory as their gradient; use inplace_backward=False with retain_graph")


class CrossEntropyFunction(torch.autograd.Function):
    """apply(logits[R, V], target, weight, ignore_index, label_smoothing, z_loss, softcap, backend,
    inplace_backward=False, return_lse=True) -> (loss[R], lse[R]), or loss alone without return_lse;
    arguments as for fusedce.ops.cross_entropy_forward. Callers that drop lse should not return it:
    torch.compile hands an unused output a zero gradient rather than None, and the backward would
    spend a pass over the logits on it.

    With inplace_backward the backward writes the gradient into the logits' memory instead of a new
    tensor (saves rows x V elements). The forward then bumps the logits' version counter, so any other
    op that saved the logits for its backward raises instead of silently using the overwritten values.
    Ignored under torch.compile, where buffers are planned by the compiler."""

    @staticmethod
    def forward(ctx, logits, target, weight, ignore_index, label_smoothing, z_loss, softcap, backend,
                inplace_backward=False, return_lse=True):
        options = (ignore_index, label_smoothing, z_loss, softcap, backend)
        loss, lse = ops.call("cross_entropy_forward", logits, target, weight, *options)
        ctx.inplace = bool(inplace_backward) and not torch.compiler.is_compiling()
        if ctx.inplace:
            _check_inplace_allowed(logits)
            torch.autograd.graph.increment_version(logits)
            ctx.logits = logits  # not in save_for_backward: its version check would trip on our own bump
            ctx.save_for_backward(target, weight, lse)
        else:
            ctx.save_for_backward(logits, target, weight, lse)
        ctx.options = options
        ctx.set_materialize_grads(False)
        return (loss, lse) if return_lse else loss

    @staticmethod
    @once_differentiable  # the kernels' gradient is not itself differentiable: create_graph raises
    def backward(ctx, grad_loss, grad_lse=None):
        if ctx.inplace:
            if ctx.logits is None:
                raise RuntimeError(_SECOND_INPLACE_BACKWARD)
            saved = (ctx.logits, *ctx.saved_tensors)
            ctx.logits = None
        else:
            saved = ctx.saved_tensors
        grads = ops.input_grads(ctx.needs_input_grad, saved, grad_loss, grad_lse, ctx.options, ctx.inplace)
        return grads + (None,) * 7


class FusedCrossEntropyFunction(torch.autograd.Function):
    """The fused mode: a reduced ("mean" or "sum") loss whose logits' gradient is computed in the
    forward pass, while each row is in cache: the logits are read once and the gradient written once,
    instead of one read for the forward and a read and a write for the backward.

    apply(logits, target, weight, denominator, options, inplace) -> loss (0-d); denominator is the
    "mean" divisor (a 0-d tensor) or None for "sum". The gradient is computed for grad_output 1 and
    rescaled in place by the backward, which returns at once when grad_output is 1 (checked on the
    device for GPU tensors, so there is no host sync). A second backward through a retained graph
    recomputes the gradient from the saved logits with the separate backward kernel."""

    @staticmethod
    def forward(ctx, logits, target, weight, denominator, options, inplace):
        rows = logits.shape[0]
        one = torch.ones((), dtype=accumulation_dtype(logits.dtype), device=logits.device)
        grad_loss = (one / denominator if denominator is not None else one).expand(rows)
        if inplace:
            _check_inplace_allowed(logits)
            loss, lse = ops.call("cross_entropy_forward_with_grad_", logits, target, weight, grad_loss, *options)
            torch.autograd.graph.increment_version(logits)
            ctx.dlogits = logits
            ctx.save_for_backward(None, target, weight, lse, grad_loss)
        else:
            loss, lse, ctx.dlogits = ops.call("cross_entropy_forward_with_grad", logits, target, weight, grad_loss,
                                              *options)
            ctx.save_for_backward(logits, target, weight, lse, grad_loss)
        ctx.options = options
        total = loss.sum()
        return total / denominator if denominator is not None else total

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output):
        backend = ctx.options[-1]
        if ctx.dlogits is not None:
            dlogits, ctx.dlogits = ctx.dlogits, None
            ops.call("scale_", dlogits, grad_output, backend)
            return dlogits, None, None, None, None, None
        logits, target, weight, lse, grad_loss = ctx.saved_tensors
        if logits is None:
            raise RuntimeError(_SECOND_INPLACE_BACKWARD)
        dlogits = ops.call("cross_entropy_backward", grad_loss * grad_output, logits, target, weight, lse,
                           *ctx.options)
        return dlogits, None, None, None, None, None
