"""vocab_parallel_cross_entropy: the loss of logits sharded by class across a process group, as
fusedce.cross_entropy computes it on the gathered logits, without gathering them (combine.py has the
math and the collectives). The backward needs no collective: each rank's gradient depends only on
its shard and the per-row lse and target mass that the forward already shares."""
from __future__ import annotations

from typing import Optional

import torch
import torch.autograd.forward_ad as _forward_ad
from torch.autograd.function import once_differentiable

from ..arguments import describe
from ..errors import InvalidArgument, UnsupportedDType
from . import combine

_SECOND_BACKWARD = ("the fused vocab-parallel loss hands out its gradient once: backward through a retained graph "
                    "needs fused=False")


def _denominator(target, target_weight, ignore_index: int, acc):
    """torch's "mean" divisor (0-d): the summed class weight of the non-ignored targets (target_weight: the
    combine's gathered w_t of each row), their count without a weight, the number of rows for
    probabilities."""
    if target.is_floating_point():
        return torch.tensor(float(target.shape[0]), dtype=acc, device=target.device)
    if target_weight is not None:
        return target_weight.sum()
    return (target != ignore_index).sum().to(acc)


class Problem:
    """One call's fixed arguments: options, backend, group and the vocab_start the caller gave."""

    def __init__(self, options, backend, group, vocab_start):
        self.options, self.backend, self.group, self.vocab_start = options, backend, group, vocab_start
        self.shard = None  # known after the forward

    def forward(self, logits, target, weight, hashed=None) -> combine.Rows:
        """The combine; after the first call (a chunk of a longer one) with the layout that one found."""
        rows, self.shard = combine.forward(logits, target, weight, self.options, self.backend, self.group,
                                           self.vocab_start, self.shard, hashed)
        return rows

    def gradient(self, grad_loss, logits, target, weight, rows: combine.Rows, out=None):
        exact = None if rows.target_shift is None else combine.target_gradient_of(
            grad_loss, logits, target, weight, rows, self.options, self.shard)
        out = self.backend.shard_backward(grad_loss, logits, target, weight, rows.lse, rows.k, self.options,
                                          self.shard, out)
        if exact is not None:  # out may be the logits: the target terms were read before
            at, d, here = exact
            out.scatter_(1, at, torch.where(here[:, None], d[:, None].to(out.dtype), out.gather(1, at)))
        return out


class VocabParallelFunction(torch.autograd.Function):
    """apply(logits [R, V_local], target, weight, problem) -> (loss [R], lse [R], "mean" denominator); only
    the loss is differentiated."""

    @staticmethod
    def forward(ctx, logits, target, weight, problem):
        rows = problem.forward(logits, target, weight)
        denominator = _denominator(target, rows.weight, problem.options.ignore_index, rows.lse.dtype)
        ctx.save_for_backward(logits, target, weight, rows.lse, rows.k, rows.target_shift)
        ctx.problem = problem
        ctx.mark_non_differentiable(rows.lse, denominator)
        return rows.loss, rows.lse, denominator

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss, _grad_lse, _grad_denominator):
        logits, target, weight, lse, k, target_shift = ctx.saved_tensors
        rows = combine.Rows(None, lse, k, None, target_shift)
        return ctx.problem.gradient(grad_loss.to(lse.dtype), logits, target, weight, rows), None, None, None


class FusedVocabParallelFunction(torch.autograd.Function):
    """apply(logits, target, weight, problem, reduction, out_dtype) -> the reduced loss, its gradient
    computed in the forward for grad_output 1 (as fusedce.FusedCrossEntropyFunction) and rescaled by the
    backward."""

    @staticmethod
    def forward(ctx, logits, target, weight, problem, reduction, out_dtype):
        rows = problem.forward(logits, target, weight)
        one = torch.ones((), dtype=rows.lse.dtype, device=logits.device)
        denominator = None
        if reduction == "mean":
            denominator = _denominator(target, rows.weight, problem.options.ignore_index, rows.lse.dtype)
        scale = one if denominator is None else one / denominator
        ctx.dlogits = problem.gradient(scale.expand(logits.shape[0]), logits, target, weight, rows)
        ctx.backend = problem.backend
        total = rows.loss.sum()
        return (total if denominator is None else total / denominator).to(out_dtype)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output):
        if ctx.dlogits is None:
            raise RuntimeError(_SECOND_BACKWARD)
        dlogits, ctx.dlogits = ctx.dlogits, None
        ctx.backend.scale_(dlogits, grad_output)
        return dlogits, None, None, None, None, None


def _rows_hint(input) -> int:
    """The rows a rank whose arguments were rejected takes part with: those of its logits where it can tell."""
    if isinstance(input, torch.Tensor) and input.dim() > 1:
        return input.numel() // max(input.shape[1], 1)
    return 1 if isinstance(input, torch.Tensor) else 0


def vocab_parallel_cross_entropy(logits: torch.Tensor, target: torch.Tensor, weight: Optional[torch.Tensor] = None,
                                 *, group=None, vocab_start: Optional[int] = None, ignore_index: int = -100,
                                 reduction: str = "mean", label_smoothing: float = 0.0, z_loss: float = 0.0,
                                 softcap: Optional[float] = None, return_lse: bool = False,
                                 fused: Optional[bool] = None, backend: str = "auto",
                                 dtype: Optional[torch.dtype] = None):
    """fusedce.cross_entropy of the logits gathered along the classes, from this rank's shard.

    logits: this rank's [N, V_local] (or [N, V_local, d1..]) columns of the classes; the ranks of `group`
        (default: the world) hold consecutive slices in rank order, of any sizes.
    target: the global class indices, the same on every rank; or this rank's [N, V_local, ..] slice of
        class probabilities.
    weight: this rank's V_local class weights, or None.
    vocab_start: this shard's first class id, checked against the layout when given (on every rank or
        none); found from the exchanged shard sizes otherwise.
    Options, reduction, return_lse, fused, backend and dtype as for fusedce.cross_entropy; every rank
    gets the same loss (and lse), and its logits get their own shard's gradient. The lse is not
    differentiable here. Two all_reduce calls per forward, 12 to 20 bytes per row per rank (see
    combine.py); none in the backward. Wrong sizes, a vocab_start that does not fit, targets that differ
    across ranks or a class index outside [0, V) raise the same error on every rank (the last only for
    CPU tensors; on a GPU such a row's loss is NaN, as in fusedce.cross_entropy)."""
    try:
        if vocab_start is not None and (not isinstance(vocab_start, int) or vocab_start < 0):
            raise InvalidArgument(f"vocab_start must be a non-negative int or None, got {vocab_start!r}")
        call = describe(logits, target, weight, ignore_index, reduction, label_smoothing, z_loss, softcap, backend,
                        dtype)
        if call.logits.shape[1] == 0:
            raise InvalidArgument(f"each rank needs at least one class, got logits of shape {tuple(logits.shape)}")
        if call.target.requires_grad:
            raise InvalidArgument("vocab_parallel_cross_entropy does not differentiate the target: pass one that "
                                  "does not require grad")
        if _forward_ad._current_level >= 0 or torch._C._functorch.peek_interpreter_stack() is not None:
            raise InvalidArgument("vocab_parallel_cross_entropy supports reverse-mode autograd only (no "
                                  "forward-mode AD, no torch.func transforms)")
        if fused and (reduction == "none" or return_lse):
            raise InvalidArgument("fused=True needs reduction 'mean' or 'sum' and return_lse=False")
    except (InvalidArgument, UnsupportedDType, TypeError, RuntimeError) as e:
        device = logits.device if isinstance(logits, torch.Tensor) else torch.device("cpu")
        combine.fail_everywhere(e, _rows_hint(logits), device, group)
    problem = Problem(call.options, call.backend, group, vocab_start)
    needs_grad = torch.is_grad_enabled() and logits.requires_grad
    if fused is None:  # as fusedce.cross_entropy: where the reduced loss's gradient can be had in the forward
        fused = reduction != "none" and not return_lse
    if fused and needs_grad:
        return FusedVocabParallelFunction.apply(call.logits, call.target, call.weight, problem, reduction,
                                                call.out_dtype)
    if needs_grad:
        loss, lse, denominator = VocabParallelFunction.apply(call.logits, call.target, call.weight, problem)
    else:
        rows = problem.forward(call.logits, call.target, call.weight)
        loss, lse = rows.loss, rows.lse
        denominator = _denominator(call.target, rows.weight, ignore_index, lse.dtype)
    if reduction == "none":
        loss = loss.reshape(call.batch_shape)
    else:
        loss = loss.sum() if reduction == "sum" else loss.sum() / denominator
    loss = loss.to(call.out_dtype)
    return (loss, lse.reshape(call.batch_shape)) if return_lse else loss
