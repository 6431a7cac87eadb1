"""fusedce.CrossEntropyFunction: the autograd.Function behind the public API. It calls the custom
ops of fusedce.ops, and adds what an op registration cannot express: the opt-in in-place backward."""
from __future__ import annotations

import torch

from . import backends, ops


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


class FusedCrossEntropyFunction(torch.autograd.Function):
    """The fused mode: a reduced ("mean" or "sum") loss whose logits' gradient is computed in the
    forward pass, while each row is in cache (2S bytes moved instead of 3S; see DESIGN.md).

    apply(logits, target, weight, denominator, options, inplace) -> loss (0-d); denominator is the
    "mean" divisor (a 0-d tensor) or None for "sum". The gradient is computed for grad_output 1 and
    rescaled in place by the backward, which returns at once when grad_output is 1 (checked on the
    device for GPU tensors, so there is no host sync). A second backward through a retained graph
    recomputes the gradient from the saved logits with the separate backward kernel."""

    @staticmethod
    def forward(ctx, logits, target, weight, denominator, options, inplace):
        rows = logits.shape[0]
        acc = torch.float64 if logits.dtype == torch.float64 else torch.float32
        one = torch.ones((), dtype=acc, device=logits.device)
        grad_loss = (one / denominator if denominator is not None else one).expand(rows)
        if inplace:
            _check_inplace_allowed(logits)
            loss, lse = torch.ops.fusedce.cross_entropy_forward_with_grad_(logits, target, weight, grad_loss, *options)
            torch.autograd.graph.increment_version(logits)
            ctx.dlogits = logits
            ctx.save_for_backward(None, target, weight, lse, grad_loss)
        else:
            loss, lse, ctx.dlogits = torch.ops.fusedce.cross_entropy_forward_with_grad(
                logits, target, weight, grad_loss, *options)
            ctx.save_for_backward(logits, target, weight, lse, grad_loss)
        ctx.options = options
        total = loss.sum()
        return total / denominator if denominator is not None else total

    @staticmethod
    def backward(ctx, grad_output):
        backend = ctx.options[-1]
        if ctx.dlogits is not None:
            dlogits, ctx.dlogits = ctx.dlogits, None
            backends.get(backend).scale_(dlogits, grad_output)
            return dlogits, None, None, None, None, None
        logits, target, weight, lse, grad_loss = ctx.saved_tensors
        if logits is None:
            raise RuntimeError("backward called twice with inplace_backward=True: the first backward handed out "
                               "the logits' memory as their gradient; use inplace_backward=False with retain_graph")
        dlogits = torch.ops.fusedce.cross_entropy_backward(grad_loss * grad_output, logits, target, weight, lse,
                                                           *ctx.options)
        return dlogits, None, None, None, None, None
