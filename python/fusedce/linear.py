"""Fused linear + cross-entropy: the loss of an LM head, input @ weight.T + bias, without ever holding
the [tokens, vocab] logits. Tokens are processed a chunk at a time: the chunk's logits (matmul in
the input dtype, fp32 accumulation), the fused cross-entropy writing its gradient over those logits,
then at once the chunk's grad_input and an fp32 accumulation of grad_weight and grad_bias. Peak memory
is O(chunk x vocab) instead of O(tokens x vocab).

"mean"/"sum": all gradients are computed during the forward (three matmuls in all, as the
materialised path) and the backward only rescales them (at once when grad_output is 1).
"none": the forward computes the loss and the per-row lse; the backward recomputes each chunk's
logits and applies the per-row grad_output (one more matmul, needed for arbitrary grad_output)."""
from __future__ import annotations

from typing import Optional

import torch
from torch.autograd.function import once_differentiable

from . import backends, checks, ops
from .api import _mean_denominator
from .options import accumulation_dtype

# Bytes of one chunk's logits when the caller gives no chunk_size: large enough that the matmuls
# run at full speed, small beside the [tokens, vocab] logits this replaces.
_CPU_CHUNK_BYTES = 32 << 20
_GPU_CHUNK_BYTES = 1 << 30


def auto_chunk_size(tokens: int, vocab: int, dtype: torch.dtype, device: torch.device) -> int:
    """Rows per chunk: the chunk's logits take at most a fixed budget, and on a GPU at most an eighth
    of the free memory. On a GPU the result is rounded down to a power of two, so that it (and with it
    the order of the grad_weight accumulation) changes only when free memory halves; pass chunk_size
    for bitwise reproducible gradients whatever the memory."""
    budget = _CPU_CHUNK_BYTES
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        budget = min(_GPU_CHUNK_BYTES, free // 8)
    row_bytes = vocab * max(torch.empty((), dtype=dtype).element_size(), 4)  # fp32 temporaries too
    rows = max(1, min(tokens, budget // row_bytes))
    return 1 << (rows.bit_length() - 1) if device.type == "cuda" and rows < tokens else rows


class _Grads:
    """The gradients being built chunk by chunk; None where no gradient is needed."""

    def __init__(self, input, weight, bias, needs_input, needs_weight, needs_bias):
        acc = accumulation_dtype(input.dtype)
        # contiguous whatever the input's layout: the rescale kernels need unit stride along hidden
        self.input = torch.empty(input.shape, dtype=input.dtype, device=input.device) if needs_input else None
        self.weight = torch.zeros(weight.shape, dtype=acc, device=weight.device) if needs_weight else None
        self.bias = torch.zeros(bias.shape, dtype=acc, device=bias.device) if needs_bias else None

    def add_chunk(self, dlogits, x, weight, start: int) -> None:
        """Folds one chunk's dlogits [c, V] (input dtype) into the gradients."""
        if self.input is not None:
            torch.mm(dlogits, weight, out=self.input[start:start + dlogits.shape[0]])
        if self.weight is not None:
            if dlogits.dtype == self.weight.dtype:
                self.weight.addmm_(dlogits.t(), x)  # in place: no [V, H] temporary
            else:
                self.weight += _mm_fp32(dlogits.t(), x, self.weight.dtype)
        if self.bias is not None:
            self.bias += dlogits.sum(0, dtype=self.bias.dtype)

    def finish(self, weight, bias):
        """Casts the fp32 accumulations to the parameters' dtypes."""
        w = self.weight.to(weight.dtype) if self.weight is not None else None
        b = self.bias.to(bias.dtype) if self.bias is not None else None
        return self.input, w, b


def _mm_fp32(a, b, acc):
    """a @ b (bf16 / fp16 operands) with fp32 (acc) output and accumulation."""
    if a.is_cuda:
        return torch.mm(a, b, out_dtype=acc)
    return a.to(acc) @ b.to(acc)  # the CPU has no mixed-precision mm: upcast the chunk


def _chunk_logits(x, weight, bias):
    return torch.addmm(bias, x, weight.t()) if bias is not None else x @ weight.t()


class LinearCrossEntropyFunction(torch.autograd.Function):
    """apply(input [N, H], weight [V, H], bias [V] or None, target, class_weight, denominator,
    reduction, options, chunk) -> loss; options as for fusedce.ops.cross_entropy_forward."""

    @staticmethod
    def forward(ctx, input, weight, bias, target, class_weight, denominator, reduction, options, chunk):
        tokens = input.shape[0]
        needs = ctx.needs_input_grad[:3]
        acc = accumulation_dtype(input.dtype)
        ctx.save_for_backward(input, weight, bias, target, class_weight)
        ctx.options, ctx.chunk, ctx.reduction = options, chunk, reduction
        if reduction == "none" or not any(needs):
            losses, lses = [], []
            for start in range(0, tokens, chunk):
                logits = _chunk_logits(input[start:start + chunk], weight, bias)
                loss, lse = ops.call("cross_entropy_forward", logits, target[start:start + chunk], class_weight,
                                      *options)
                losses.append(loss)
                lses.append(lse)
            ctx.lse = torch.cat(lses) if lses else torch.empty(0, dtype=acc, device=input.device)
            ctx.grads = None
            loss = torch.cat(losses) if losses else torch.empty(0, dtype=acc, device=input.device)
            return _reduce(loss, reduction, denominator)
        # "mean"/"sum": gradients now, for grad_output 1
        row_scale = torch.ones((), dtype=acc, device=input.device)
        if denominator is not None:
            row_scale = row_scale / denominator
        grads = _Grads(input, weight, bias, *needs)
        total = torch.zeros((), dtype=acc, device=input.device)
        lses = []
        for start in range(0, tokens, chunk):
            x = input[start:start + chunk]
            logits = _chunk_logits(x, weight, bias)
            loss, lse = ops.call("cross_entropy_forward_with_grad_", logits, target[start:start + chunk],
                                 class_weight, row_scale.expand(x.shape[0]), *options)
            total += loss.sum()
            lses.append(lse)
            grads.add_chunk(logits, x, weight, start)  # the logits now hold their gradient
        ctx.lse = torch.cat(lses) if lses else torch.empty(0, dtype=acc, device=input.device)
        ctx.grads = grads.finish(weight, bias)
        ctx.row_scale = row_scale
        return total / denominator if denominator is not None else total

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output):
        input, weight, bias, target, class_weight = ctx.saved_tensors
        if ctx.grads is not None:  # computed in the forward: rescale in place and hand out once
            grads, ctx.grads = ctx.grads, None
            for g in grads:
                if g is not None:
                    ops.call("scale_", g.view(-1, g.shape[-1]), grad_output, ctx.options[-1])
            return (*grads, None, None, None, None, None, None)
        # "none", or a second backward through a retained graph: recompute chunk by chunk
        if ctx.reduction == "none":
            row_grad = grad_output.reshape(-1)
        else:
            row_grad = (ctx.row_scale * grad_output).expand(input.shape[0])
        grads = _Grads(input, weight, bias, *ctx.needs_input_grad[:3])
        for start in range(0, input.shape[0], ctx.chunk):
            stop = start + ctx.chunk
            x = input[start:stop]
            logits = _chunk_logits(x, weight, bias)
            ops.call("cross_entropy_backward_", row_grad[start:stop], logits, target[start:stop], class_weight,
                     ctx.lse[start:stop], *ctx.options)
            grads.add_chunk(logits, x, weight, start)
        return (*grads.finish(weight, bias), None, None, None, None, None, None)


def _reduce(loss, reduction, denominator):
    if reduction == "none":
        return loss
    return loss.sum() / denominator if denominator is not None else loss.sum()


def _check_linear(input, weight, bias, target) -> None:
    if not isinstance(input, torch.Tensor) or not input.is_floating_point():
        raise TypeError(f"input must be a floating-point tensor, got {getattr(input, 'dtype', type(input).__name__)}")
    if input.dim() != 2:
        raise ValueError(f"input must be [tokens, hidden], got shape {tuple(input.shape)}: flatten the leading "
                         f"dimensions first (input.flatten(0, -2), target.flatten())")
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2 or weight.shape[1] != input.shape[1]:
        raise ValueError(f"weight must be [vocab, hidden] with hidden = {input.shape[1]} (the input's last "
                         f"dim), got shape {tuple(getattr(weight, 'shape', ()))}")
    if weight.dtype != input.dtype or weight.device != input.device:
        raise ValueError(f"weight ({weight.dtype}, {weight.device}) must have the dtype and device of input "
                         f"({input.dtype}, {input.device})")
    if bias is not None and (bias.shape != weight.shape[:1] or bias.dtype != input.dtype
                             or bias.device != input.device):
        raise ValueError(f"bias must be [vocab] = ({weight.shape[0]},) in {input.dtype} on {input.device}, got "
                         f"{tuple(bias.shape)} {bias.dtype} on {bias.device}")
    if not isinstance(target, torch.Tensor) or target.device != input.device:
        raise ValueError(f"target must be a tensor on {input.device}, got {getattr(target, 'device', type(target))}")


def linear_cross_entropy(input: torch.Tensor, weight: torch.Tensor, target: torch.Tensor,
                         bias: Optional[torch.Tensor] = None, *, class_weight: Optional[torch.Tensor] = None,
                         ignore_index: int = -100, reduction: str = "mean", label_smoothing: float = 0.0,
                         z_loss: float = 0.0, softcap: Optional[float] = None, chunk_size: Optional[int] = None,
                         backend: str = "auto") -> torch.Tensor:
    """cross_entropy(input @ weight.T + bias, target) without materialising the logits.

    input [tokens, hidden]; weight [vocab, hidden] (e.g. an LM head, possibly tied to an embedding);
    bias [vocab] or None; target [tokens] class indices or [tokens, vocab] probabilities.
    class_weight, ignore_index, reduction, label_smoothing, z_loss, softcap and backend as in
    fusedce.cross_entropy (torch.nn.functional.linear_cross_entropy calls the class weight `weight`
    and the matrix `linear_weight`; positionally the two functions agree). chunk_size: tokens per
    chunk (default: chosen from the vocabulary size and, on a GPU, the free memory)."""
    checks.check_reduction(reduction)
    checks.check_options(label_smoothing, z_loss, softcap)
    _check_linear(input, weight, bias, target)
    # the target and class weight against the logits' shape [tokens, vocab], without building them
    logits_like = torch.empty(input.shape[0], weight.shape[0], device="meta", dtype=input.dtype)
    checks.check_target(logits_like, target.to("meta"), ignore_index)
    if class_weight is not None:
        if class_weight.device != input.device:
            raise ValueError(f"class_weight is on {class_weight.device} but input is on {input.device}")
        checks.check_weight(class_weight.to("meta"), logits_like)
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive number of tokens, got {chunk_size}")
    if target.requires_grad:
        raise ValueError("linear_cross_entropy does not differentiate with respect to the target: pass a "
                         "target that does not require grad")
    name = backends.resolve(backend, input.device, input.dtype)

    soft = target.is_floating_point()
    acc = accumulation_dtype(input.dtype)
    tgt = target.contiguous() if soft else target.to(torch.int64).contiguous()
    cw = class_weight.to(acc).contiguous() if class_weight is not None else None
    denominator = None
    if reduction == "mean":
        denominator = (torch.full((), input.shape[0], dtype=acc, device=input.device) if soft
                       else _mean_denominator(tgt, cw, ignore_index, acc))
    chunk = chunk_size or auto_chunk_size(input.shape[0], weight.shape[0], input.dtype, input.device)
    options = (ignore_index, float(label_smoothing), float(z_loss), float(softcap or 0.0), name)
    loss = LinearCrossEntropyFunction.apply(input, weight, bias, tgt, cw, denominator, reduction, options, chunk)
    return loss.to(torch.result_type(input, target) if soft else input.dtype)


class LinearCrossEntropyLoss(torch.nn.Module):
    """Module form of linear_cross_entropy: forward(input, weight, target, bias=None); the head's
    parameters stay with the model (often tied to the embedding)."""

    def __init__(self, class_weight: Optional[torch.Tensor] = None, ignore_index: int = -100, reduction: str = "mean",
                 label_smoothing: float = 0.0, *, z_loss: float = 0.0, softcap: Optional[float] = None,
                 chunk_size: Optional[int] = None, backend: str = "auto"):
        super().__init__()
        checks.check_reduction(reduction)
        checks.check_options(label_smoothing, z_loss, softcap)
        self.register_buffer("class_weight", class_weight)
        self.ignore_index, self.reduction, self.label_smoothing = ignore_index, reduction, label_smoothing
        self.z_loss, self.softcap, self.chunk_size, self.backend = z_loss, softcap, chunk_size, backend

    def forward(self, input, weight, target, bias=None):
        return linear_cross_entropy(input, weight, target, bias, class_weight=self.class_weight,
                                    ignore_index=self.ignore_index, reduction=self.reduction,
                                    label_smoothing=self.label_smoothing, z_loss=self.z_loss, softcap=self.softcap,
                                    chunk_size=self.chunk_size, backend=self.backend)
