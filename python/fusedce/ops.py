"""The op API, in one module: torch.library custom ops (functional forward and backward, and the
opt-in in-place backward), their fake (meta) implementations, and the autograd registration.

    fusedce::cross_entropy_forward(logits[R, V], target, weight?, ...) -> (loss[R], lse[R])
    fusedce::cross_entropy_backward(grad_loss[R], logits, target, weight?, lse, ...) -> dlogits[R, V]
    fusedce::cross_entropy_backward_(grad_loss, logits!, ...) -> ()   writes dlogits into logits
    fusedce::cross_entropy_forward_with_grad(logits, target, weight?, grad_loss, ...) -> (loss, lse, dlogits)
    fusedce::cross_entropy_forward_with_grad_(logits!, ...) -> (loss, lse)   gradient into logits
    fusedce::scale_(grad!, scale, backend) -> ()   the fused mode's backward, grad *= scale

target is int64 class indices [R] or class probabilities [R, V]; loss and lse are fp32 (fp64 for
fp64 logits); softcap 0 means off; backend is a concrete backend name (see backends.resolve).

Each op also exists as fusedce::triton_<name>, registered with torch.library.triton_op where the
installed torch has it and Triton compiles the kernels (not its interpreter): torch.compile traces
into it and sees the Triton kernels instead of an opaque call. The API calls
op(name, backend), which picks it for the "triton" backend; fusedce::<name> with backend="triton"
forwards to it."""
from __future__ import annotations

import functools
from typing import Optional, Tuple

import torch
from torch import Tensor

from . import backends
from .options import Options, accumulation_dtype, softcapped


def _traceable_triton_kernels():
    """The Triton kernels' module when torch.compile can trace into them, else None: torch has triton_op,
    and Triton compiles the kernels (the interpreter's cannot run on the fake tensors of tracing)."""
    if not hasattr(torch.library, "triton_op") or backends.triton_unavailable_reason():
        return None
    from .triton_kernels import cross_entropy as kernels
    return kernels if kernels.COMPILED else None


_TRITON_KERNELS = _traceable_triton_kernels()
TRITON_TRACEABLE = _TRITON_KERNELS is not None


def _define(fn, mutates_args, fake):
    """Registers fn as the custom op fusedce::<fn name> with its fake implementation and, when
    TRITON_TRACEABLE, as the triton_op fusedce::triton_<fn name>, which the first forwards "triton" calls to
    (it runs its kernels without the dispatch overhead that wrap_triton adds outside an op)."""
    name = fn.__name__
    traceable = None
    if TRITON_TRACEABLE:
        traceable = torch.library.triton_op(f"fusedce::triton_{name}", fn, mutates_args=mutates_args)
        # torch finds a triton_op's kernels by reading its source for wrap_triton calls, which the backend
        # dispatch hides; its compile cache hashes their source, so name them (in torch's private table)
        kernels_of_op = getattr(torch._library.triton, "triton_ops_to_kernels", {})
        kernels_of_op[f"fusedce::triton_{name}"] = list(_TRITON_KERNELS.KERNELS)

    @functools.wraps(fn)  # the schema comes from fn's signature; the dispatcher passes arguments by position
    def impl(*args):
        return traceable(*args) if traceable is not None and args[-1] == "triton" else fn(*args)

    custom = torch.library.custom_op(f"fusedce::{name}", impl, mutates_args=mutates_args)
    custom.register_fake(fake)
    return custom


def op(name: str, backend: str):
    """The op `name` that serves `backend`: fusedce::triton_<name> for Triton where it exists."""
    return getattr(torch.ops.fusedce, f"triton_{name}" if backend == "triton" and TRITON_TRACEABLE else name)


def call(name: str, *args):
    """Runs the op `name` that serves args[-1], the backend every op takes last."""
    return op(name, args[-1])(*args)


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


cross_entropy_forward = _define(cross_entropy_forward, (), lambda logits, *args: _fake_forward(logits))


def cross_entropy_backward(grad_loss: Tensor, logits: Tensor, target: Tensor, weight: Optional[Tensor],
                           lse: Tensor, ignore_index: int, label_smoothing: float, z_loss: float,
                           softcap: float, backend: str) -> Tensor:
    _check_op_inputs(logits, target, weight, grad_loss, lse)
    dlogits = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
    opts = Options(ignore_index, label_smoothing, z_loss, softcap)
    backends.get(backend).backward(grad_loss, logits, target, weight, lse, opts, dlogits)
    return dlogits


cross_entropy_backward = _define(cross_entropy_backward, (), lambda grad_loss, logits, *args: torch.empty(
    logits.shape, dtype=logits.dtype, device=logits.device))


def cross_entropy_backward_(grad_loss: Tensor, logits: Tensor, target: Tensor, weight: Optional[Tensor],
                            lse: Tensor, ignore_index: int, label_smoothing: float, z_loss: float,
                            softcap: float, backend: str) -> None:
    """Like cross_entropy_backward, but the gradient overwrites `logits` (each block of a row is read
    before it is written, so the kernels may alias input and output)."""
    _check_op_inputs(logits, target, weight, grad_loss, lse)
    opts = Options(ignore_index, label_smoothing, z_loss, softcap)
    backends.get(backend).backward(grad_loss, logits, target, weight, lse, opts, logits)


cross_entropy_backward_ = _define(cross_entropy_backward_, ("logits",), lambda *args: None)


def cross_entropy_forward_with_grad(logits: Tensor, target: Tensor, weight: Optional[Tensor], grad_loss: Tensor,
                                    ignore_index: int, label_smoothing: float, z_loss: float, softcap: float,
                                    backend: str) -> Tuple[Tensor, Tensor, Tensor]:
    """The fused mode: loss, lse and the gradient of sum(grad_loss * loss) in one pass over the logits."""
    _check_op_inputs(logits, target, weight, grad_loss)
    dlogits = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
    opts = Options(ignore_index, label_smoothing, z_loss, softcap)
    loss, lse = backends.get(backend).forward(logits, target, weight, opts, grad_loss, dlogits)
    return loss, lse, dlogits


cross_entropy_forward_with_grad = _define(cross_entropy_forward_with_grad, (), lambda logits, *args: (
    *_fake_forward(logits), torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)))


def cross_entropy_forward_with_grad_(logits: Tensor, target: Tensor, weight: Optional[Tensor], grad_loss: Tensor,
                                     ignore_index: int, label_smoothing: float, z_loss: float, softcap: float,
                                     backend: str) -> Tuple[Tensor, Tensor]:
    """Fused mode whose gradient overwrites the logits (each row is fully read before it is written)."""
    _check_op_inputs(logits, target, weight, grad_loss)
    opts = Options(ignore_index, label_smoothing, z_loss, softcap)
    return backends.get(backend).forward(logits, target, weight, opts, grad_loss, logits)


cross_entropy_forward_with_grad_ = _define(cross_entropy_forward_with_grad_, ("logits",),
                                           lambda logits, *args: _fake_forward(logits))


def scale_(grad: Tensor, scale: Tensor, backend: str) -> None:
    """grad ([R, V], unit class stride) *= scale (0-d), skipped on the device when scale is 1: the fused
    mode's backward."""
    if grad.dim() != 2 or (grad.stride(1) != 1 and grad.shape[1] > 1) or scale.dim() != 0:
        raise ValueError(f"scale_ takes a [rows, V] gradient with unit class stride and a 0-d scale, got "
                         f"{tuple(grad.shape)} with strides {grad.stride()} and a scale of shape {tuple(scale.shape)}")
    backends.get(backend).scale_(grad, scale)


scale_ = _define(scale_, ("grad",), lambda *args: None)


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
            call("cross_entropy_backward_", grad_loss, logits, target, weight, lse, *options)
            dlogits = logits if lse_term is None else logits.add_(lse_term)
        else:
            dlogits = call("cross_entropy_backward", grad_loss, logits, target, weight, lse, *options)
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


for _op in ("cross_entropy_forward",) + (("triton_cross_entropy_forward",) if TRITON_TRACEABLE else ()):
    torch.library.register_autograd(f"fusedce::{_op}", _backward, setup_context=_setup_context)
