"""fusedce.CrossEntropyFunction: the autograd.Function behind the public API. It calls the custom
ops of fusedce.ops, and adds what an op registration cannot express: the opt-in in-place backward."""
from __future__ import annotations

import torch

from . import ops


def _check_inplace_allowed(logits: torch.Tensor) -> None:
    if logits.is_leaf and logits.requires_grad:
        raise RuntimeError("inplace_backward=True overwrites the logits with their gradient, which would "
                           "make a leaf tensor alias its own .grad; use it on logits computed by the model")


class CrossEntropyFunction(torch.autograd.Function):
    """apply(logits[R, V], target, weight, ignore_index, label_smoothing, z_loss, softcap, backend,
    inplace_backward) -> (loss[R], lse[R]); arguments as for fusedce.ops.cross_entropy_forward.

    With inplace_backward the backward writes the gradient into the logits' memory instead of a new
    tensor (saves rows x V elements). The forward then bumps the logits' version counter, so any other
    op that saved the logits for its backward raises instead of silently using the overwritten values.
    Ignored under torch.compile, where buffers are planned by the compiler."""

    @staticmethod
    def forward(ctx, logits, target, weight, ignore_index, label_smoothing, z_loss, softcap, backend,
                inplace_backward=False):
        options = (ignore_index, label_smoothing, z_loss, softcap, backend)
        loss, lse = torch.ops.fusedce.cross_entropy_forward(logits, target, weight, *options)
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
        return loss, lse

    @staticmethod
    def backward(ctx, grad_loss, grad_lse):
        saved = (ctx.logits, *ctx.saved_tensors) if ctx.inplace else ctx.saved_tensors
        grads = ops.input_grads(ctx.needs_input_grad, saved, grad_loss, grad_lse, ctx.options, ctx.inplace)
        if ctx.inplace:
            del ctx.logits
        return grads + (None,) * 6
