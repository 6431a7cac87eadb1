"""vocab_parallel_linear_cross_entropy: the loss of a vocabulary-parallel LM head, input @ weight.T +
bias with this rank's [V_local, H] rows of the head, chunked over the tokens as
fusedce.linear_cross_entropy is (the same chunk loop), each chunk's statistics combined across the
group as in vocab_parallel_cross_entropy. grad_weight and grad_bias are this rank's own; grad_input,
each rank's head contributing a part, is all-reduced over the group: where the forward computes the
gradients (a reduced loss that needs them, the default) that happens in the forward; otherwise in
the backward, the only collective there."""
from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
from torch.autograd.function import once_differentiable

from .. import backends
from ..arguments import output_dtype
from ..errors import InvalidArgument, UnsupportedDType
from ..linear import _autocast, _Grads, _row_grad, checked_arguments, chunk_loop, kernel_layout
from ..options import accumulation_dtype
from . import combine
from .loss import Problem, _denominator


class _Chunks(Problem):
    """One call's chunks of tokens: each chunk's combine (the layout exchanged with the first, which also
    checks that all the targets agree across ranks) and its rows' results, kept for the backward."""

    def __init__(self, target, class_weight, options, backend, group, vocab_start):
        super().__init__(options, backend, group, vocab_start)
        self.target, self.class_weight, self.rows = target, class_weight, []

    def chunk_forward(self, logits, rows: slice, grad_one: bool):
        """The chunk's (loss, lse); with grad_one also its gradient for grad_loss 1, over the logits."""
        result = self.forward(logits, self.target[rows], self.class_weight, hashed=self.target)
        self.rows.append(result)
        dlogits = None
        if grad_one:
            one = torch.ones((), dtype=result.lse.dtype, device=logits.device).expand(logits.shape[0])
            dlogits = self.chunk_backward(one, logits, rows, result)
        return result.loss, result.lse, dlogits

    def chunk_backward(self, grad_loss, logits, rows: slice, result: combine.Rows):
        """The chunk's gradient, over its logits."""
        return self.gradient(grad_loss, logits, self.target[rows], self.class_weight, result, logits)

    def denominator(self):
        acc = self.rows[0].lse.dtype if self.rows else torch.float32
        weights = [r.weight for r in self.rows if r.weight is not None]
        return _denominator(self.target, torch.cat(weights) if weights else None, self.options.ignore_index, acc)


class VocabParallelLinearFunction(torch.autograd.Function):
    """apply(input [N, H], weight [V_local, H], bias, chunks: _Chunks, reduction, chunk) -> loss."""

    @staticmethod
    def forward(ctx, input, weight, bias, chunks, reduction, chunk):
        needs = ctx.needs_input_grad[:3]
        fused = reduction != "none" and any(needs)
        grads = _Grads(input, weight, bias, *needs) if fused else None
        loss, _ = chunk_loop(input, weight, bias, chunk, lambda logits, rows: chunks.chunk_forward(logits, rows, fused),
                             grads)
        denominator = chunks.denominator() if reduction == "mean" else None
        ctx.save_for_backward(input, weight, bias)
        ctx.args = (chunks, reduction, chunk, denominator)
        ctx.grads = None
        if fused:
            ctx.grads = grads.finish(weight, bias)
            _all_reduce_input_grad(ctx.grads[0], chunks.group)
        if reduction == "none":
            return loss
        return loss.sum() if denominator is None else loss.sum() / denominator

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output):
        input, weight, bias = ctx.saved_tensors
        chunks, reduction, chunk, denominator = ctx.args
        if ctx.grads is not None:  # computed in the forward for grad_output 1: rescale and hand out once
            grads, ctx.grads = ctx.grads, None
            scale = grad_output if denominator is None else grad_output / denominator
            for g in grads:
                if g is not None:
                    chunks.backend.scale_(g.view(-1, g.shape[-1]), scale)
            return (*grads, None, None, None)
        row_grad = _row_grad(grad_output, reduction, denominator, input.shape[0], accumulation_dtype(input.dtype))
        results = iter(chunks.rows)

        def step(logits, rows):
            return None, None, chunks.chunk_backward(row_grad[rows], logits, rows, next(results))

        grads = _Grads(input, weight, bias, *ctx.needs_input_grad[:3])
        chunk_loop(input, weight, bias, chunk, step, grads)
        grads = grads.finish(weight, bias)
        _all_reduce_input_grad(grads[0], chunks.group)
        return (*grads, None, None, None)


def _all_reduce_input_grad(grad_input, group) -> None:
    if grad_input is not None:
        dist.all_reduce(grad_input, dist.ReduceOp.SUM, group=group)


def vocab_parallel_linear_cross_entropy(input: torch.Tensor, weight: torch.Tensor, target: torch.Tensor,
                                        bias: Optional[torch.Tensor] = None, *, group=None,
                                        vocab_start: Optional[int] = None, class_weight: Optional[torch.Tensor] = None,
                                        ignore_index: int = -100, reduction: str = "mean",
                                        label_smoothing: float = 0.0, z_loss: float = 0.0,
                                        softcap: Optional[float] = None, chunk_size: Optional[int] = None,
                                        backend: str = "auto", dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """fusedce.linear_cross_entropy(input, full_weight, target, full_bias) from this rank's rows of the head.

    input: [tokens, hidden], the same on every rank (replicated); weight: this rank's [V_local, hidden]
    rows of the head, bias its [V_local] entries, class_weight its V_local class weights; the ranks of
    `group` hold consecutive slices of the classes in rank order. target: the global class indices (the
    same on every rank), or this rank's [tokens, V_local] slice of class probabilities. The other
    arguments as in fusedce.linear_cross_entropy and vocab_parallel_cross_entropy. Every rank gets the
    same loss and grad_input (all-reduced over the group), and its own grad_weight and grad_bias."""
    try:
        options = checked_arguments(input, weight, bias, target, class_weight, ignore_index, reduction,
                                    label_smoothing, z_loss, softcap, chunk_size, dtype)
        if vocab_start is not None and (not isinstance(vocab_start, int) or vocab_start < 0):
            raise InvalidArgument(f"vocab_start must be a non-negative int or None, got {vocab_start!r}")
        resolved = backends.resolve(backend, input.device, input.dtype)
    except (InvalidArgument, UnsupportedDType, TypeError, RuntimeError) as e:
        tokens = input.shape[0] if isinstance(input, torch.Tensor) and input.dim() else 0
        device = input.device if isinstance(input, torch.Tensor) else torch.device("cpu")
        combine.fail_everywhere(e, min(tokens, chunk_size or tokens), device, group)
    input, weight, bias = _autocast(input, weight, bias)
    tgt, cw, chunk = kernel_layout(input, weight, target, class_weight, chunk_size)
    chunks = _Chunks(tgt, cw, options, resolved, group, vocab_start)
    loss = VocabParallelLinearFunction.apply(input, weight, bias, chunks, reduction, chunk)
    return loss.to(dtype or output_dtype(input, target))
