"""Fused linear + cross-entropy: the loss of an LM head, input @ weight.T + bias, without ever holding
the [tokens, vocab] logits. Tokens are processed a chunk at a time: the chunk's logits (matmul in
the input dtype, fp32 accumulation), the fused cross-entropy writing its gradient over those logits,
then at once the chunk's grad_input and an fp32 accumulation of grad_weight and grad_bias. Peak memory
is O(chunk x vocab) instead of O(tokens x vocab).

"mean"/"sum": all gradients are computed during the forward (three matmuls in all, as the
materialised path) and the backward only rescales them (at once when grad_output is 1).
"none", and every reduction under torch.compile (whose graphs cannot hold the in-place gradient): the
forward computes the loss and the per-row lse; the backward recomputes each chunk's logits and applies
the grad_output (one more matmul).

Under torch.autocast the head runs as F.linear would (input, weight and bias cast to the autocast
dtype) and the loss is fp32, as torch's cross_entropy gives there."""
from __future__ import annotations

import contextlib
from typing import Optional

import torch
from torch.autograd.function import once_differentiable

from . import backends, ops
from .arguments import check_dtype, check_reduction, check_target, check_weight, output_dtype
from .errors import InvalidArgument
from .options import Options, accumulation_dtype

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


def _autocast_off(device_type: str):
    """The Function runs its matmuls in the dtypes it was given (autocast would recast their operands and
    reject the fp32 accumulation buffers)."""
    if torch.is_autocast_enabled(device_type):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()


def chunk_loop(input, weight, bias, chunk: int, step, grads: Optional[_Grads] = None):
    """The loop of every chunked head: for each chunk of tokens, its logits, then step(logits, rows) ->
    (loss, lse, dlogits) on them (rows: the chunk's slice of the tokens; any may be None), each chunk's
    dlogits folded into grads. Returns the per-row losses and lses concatenated (None if none came)."""
    losses, lses = [], []
    with _autocast_off(input.device.type):
        for start in range(0, input.shape[0], chunk):
            x = input[start:start + chunk]
            loss, lse, dlogits = step(_chunk_logits(x, weight, bias), slice(start, start + x.shape[0]))
            losses.append(loss)
            lses.append(lse)
            if dlogits is not None:
                grads.add_chunk(dlogits, x, weight, start)
    acc = accumulation_dtype(input.dtype)
    return tuple(torch.cat(t) if t and t[0] is not None else torch.empty(0, dtype=acc, device=input.device)
                 for t in (losses, lses))


class LinearCrossEntropyFunction(torch.autograd.Function):
    """apply(input [N, H], weight [V, H], bias [V] or None, target, class_weight, denominator, reduction,
    options, backend, chunk) -> loss; options and backend as for fusedce.CrossEntropyFunction, the
    denominator that of "mean" (None otherwise)."""

    @staticmethod
    def forward(ctx, input, weight, bias, target, class_weight, denominator, reduction, options, backend, chunk):
        needs = ctx.needs_input_grad[:3]
        acc = accumulation_dtype(input.dtype)
        ctx.save_for_backward(input, weight, bias, target, class_weight)
        ctx.args = (denominator, reduction, options, backend, chunk)
        compiling = torch.compiler.is_compiling()
        kernels = ops.traceable(backend) if compiling else backend
        if reduction == "none" or not any(needs) or compiling:
            def step(logits, rows):
                return (*kernels.forward(logits, target[rows], class_weight, options), None)

            loss, ctx.lse = chunk_loop(input, weight, bias, chunk, step)
            ctx.grads = None
            return _reduce(loss, reduction, denominator)
        # "mean"/"sum" in eager mode: gradients now, for grad_output 1
        row_scale = torch.ones((), dtype=acc, device=input.device)
        if denominator is not None:
            row_scale = row_scale / denominator

        def fused_step(logits, rows):  # the gradient overwrites the chunk's logits (each row read, then written)
            loss, lse = backend.forward(logits, target[rows], class_weight, options, row_scale.expand(logits.shape[0]),
                                        logits)
            return loss, lse, logits

        grads = _Grads(input, weight, bias, *needs)
        loss, ctx.lse = chunk_loop(input, weight, bias, chunk, fused_step, grads)
        ctx.grads = grads.finish(weight, bias)
        return _reduce(loss, reduction, denominator)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output):
        input, weight, bias, target, class_weight = ctx.saved_tensors
        denominator, reduction, options, backend, chunk = ctx.args
        if ctx.grads is not None:  # computed in the forward: rescale in place and hand out once
            grads, ctx.grads = ctx.grads, None
            for g in grads:
                if g is not None:
                    backend.scale_(g.view(-1, g.shape[-1]), grad_output)
            return (*grads, None, None, None, None, None, None, None)
        # "none", compiled, or a second backward through a retained graph: recompute chunk by chunk
        compiling = torch.compiler.is_compiling()
        kernels = ops.traceable(backend) if compiling else backend
        row_grad = _row_grad(grad_output, reduction, denominator, input.shape[0], ctx.lse.dtype)

        def step(logits, rows):
            return None, None, kernels.backward(row_grad[rows], logits, target[rows], class_weight, ctx.lse[rows],
                                                options, None if compiling else logits)

        grads = _Grads(input, weight, bias, *ctx.needs_input_grad[:3])
        chunk_loop(input, weight, bias, chunk, step, grads)
        return (*grads.finish(weight, bias), None, None, None, None, None, None, None)


def _row_grad(grad_output, reduction: str, denominator, tokens: int, acc):
    """Each row's grad_loss for the backward of the reduced (or unreduced) loss."""
    if reduction == "none":
        return grad_output.reshape(-1).to(acc)
    scale = grad_output.to(acc)
    return (scale if denominator is None else scale / denominator).expand(tokens)


def _reduce(loss, reduction, denominator):
    if reduction == "none":
        return loss
    return loss.sum() / denominator if denominator is not None else loss.sum()


def _check_linear(input, weight, bias, target, ignore_index: int) -> None:
    if not isinstance(input, torch.Tensor) or not input.is_floating_point():
        raise TypeError(f"input must be a floating-point tensor, got {getattr(input, 'dtype', type(input).__name__)}")
    if input.dim() != 2:
        raise InvalidArgument(f"input must be [tokens, hidden], got shape {tuple(input.shape)}: flatten the leading "
                              f"dimensions first (input.flatten(0, -2), target.flatten())")
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2 or weight.shape[1] != input.shape[1]:
        raise InvalidArgument(f"weight must be [vocab, hidden] with hidden = {input.shape[1]} (the input's last "
                              f"dim), got shape {tuple(getattr(weight, 'shape', ()))}")
    if weight.dtype != input.dtype or weight.device != input.device:
        raise InvalidArgument(f"weight ({weight.dtype}, {weight.device}) must have the dtype and device of input "
                              f"({input.dtype}, {input.device})")
    if bias is not None and (bias.shape != weight.shape[:1] or bias.dtype != input.dtype
                             or bias.device != input.device):
        raise InvalidArgument(f"bias must be [vocab] = ({weight.shape[0]},) in {input.dtype} on {input.device}, got "
                              f"{tuple(bias.shape)} {bias.dtype} on {bias.device}")
    check_target(torch.Size((input.shape[0], weight.shape[0])), input.device, target, ignore_index)


def checked_arguments(input, weight, bias, target, class_weight, ignore_index: int, reduction: str,
                      label_smoothing: float, z_loss: float, softcap: Optional[float], chunk_size: Optional[int],
                      dtype: Optional[torch.dtype]) -> Options:
    """The checks of a chunked head's arguments (here and in fusedce.distributed); returns the options."""
    check_reduction(reduction)
    options = Options.checked(ignore_index, label_smoothing, z_loss, softcap)
    check_dtype(dtype)
    _check_linear(input, weight, bias, target, ignore_index)
    if class_weight is not None:
        check_weight(class_weight, weight.shape[0], input.device)
    if chunk_size is not None and chunk_size < 1:
        raise InvalidArgument(f"chunk_size must be a positive number of tokens, got {chunk_size}")
    if target.requires_grad:
        raise InvalidArgument("linear_cross_entropy does not differentiate with respect to the target: pass a "
                              "target that does not require grad")
    return options


def kernel_layout(input, weight, target, class_weight, chunk_size: Optional[int]):
    """(target, class weight) as the kernels read them, and the tokens per chunk."""
    acc = accumulation_dtype(input.dtype)
    tgt = target.contiguous() if target.is_floating_point() else target.to(torch.int64).contiguous()
    cw = class_weight.to(acc).contiguous() if class_weight is not None else None
    return tgt, cw, chunk_size or auto_chunk_size(input.shape[0], weight.shape[0], input.dtype, input.device)


def _autocast(input, weight, bias):
    """What F.linear does under torch.autocast: fp32 operands cast to the autocast dtype (differentiably,
    so the parameters' gradients stay fp32)."""
    device_type = input.device.type
    if not torch.is_autocast_enabled(device_type) or input.dtype != torch.float32:
        return input, weight, bias
    dtype = torch.get_autocast_dtype(device_type)
    return input.to(dtype), weight.to(dtype), None if bias is None else bias.to(dtype)


def linear_cross_entropy(input: torch.Tensor, weight: torch.Tensor, target: torch.Tensor,
                         bias: Optional[torch.Tensor] = None, *, class_weight: Optional[torch.Tensor] = None,
                         ignore_index: int = -100, reduction: str = "mean", label_smoothing: float = 0.0,
                         z_loss: float = 0.0, softcap: Optional[float] = None, chunk_size: Optional[int] = None,
                         backend: str = "auto", dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """cross_entropy(input @ weight.T + bias, target) without materialising the logits.

    input [tokens, hidden]; weight [vocab, hidden] (e.g. an LM head, possibly tied to an embedding);
    bias [vocab] or None; target [tokens] class indices or [tokens, vocab] probabilities.
    class_weight, ignore_index, reduction, label_smoothing, z_loss, softcap, backend and dtype as in
    fusedce.cross_entropy (torch.nn.functional.linear_cross_entropy calls the class weight `weight`
    and the matrix `linear_weight`; positionally the two functions agree). chunk_size: tokens per
    chunk (default: chosen from the vocabulary size and, on a GPU, the free memory)."""
    options = checked_arguments(input, weight, bias, target, class_weight, ignore_index, reduction, label_smoothing,
                                z_loss, softcap, chunk_size, dtype)
    input, weight, bias = _autocast(input, weight, bias)
    resolved = backends.resolve(backend, input.device, input.dtype)
    tgt, cw, chunk = kernel_layout(input, weight, target, class_weight, chunk_size)
    denominator = None
    if reduction == "mean":
        kernels = ops.traceable(resolved) if torch.compiler.is_compiling() else resolved
        denominator = kernels.mean_denominator(tgt, cw, ignore_index)
    loss = LinearCrossEntropyFunction.apply(input, weight, bias, tgt, cw, denominator, reduction, options, resolved,
                                            chunk)
    return loss.to(dtype or output_dtype(input, target))


class LinearCrossEntropyLoss(torch.nn.Module):
    """Module form of linear_cross_entropy: forward(input, weight, target, bias=None); the head's
    parameters stay with the model (often tied to the embedding)."""

    def __init__(self, class_weight: Optional[torch.Tensor] = None, ignore_index: int = -100, reduction: str = "mean",
                 label_smoothing: float = 0.0, *, z_loss: float = 0.0, softcap: Optional[float] = None,
                 chunk_size: Optional[int] = None, backend: str = "auto", dtype: Optional[torch.dtype] = None):
        super().__init__()
        check_reduction(reduction)
        Options.checked(ignore_index, label_smoothing, z_loss, softcap)
        check_dtype(dtype)
        self.dtype = dtype
        self.register_buffer("class_weight", class_weight)
        self.ignore_index, self.reduction, self.label_smoothing = ignore_index, reduction, label_smoothing
        self.z_loss, self.softcap, self.chunk_size, self.backend = z_loss, softcap, chunk_size, backend

    def forward(self, input, weight, target, bias=None):
        return linear_cross_entropy(input, weight, target, bias, class_weight=self.class_weight,
                                    ignore_index=self.ignore_index, reduction=self.reduction,
                                    label_smoothing=self.label_smoothing, z_loss=self.z_loss, softcap=self.softcap,
                                    chunk_size=self.chunk_size, backend=self.backend, dtype=self.dtype)
