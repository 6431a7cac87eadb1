"""The C++ CPU kernels (csrc/cpu, module fusedce._C) behind the backend interface: the one place that
turns tensors into the module's arguments (pointers, sizes, strides, dtype codes). The kernels check
the targets (IndexError, before any row is computed) and reduce "sum" and "mean" themselves."""
from __future__ import annotations

import importlib
from typing import Optional

import torch

from ..options import Shard, accumulation_dtype
from . import Backend

try:
    _C = importlib.import_module("fusedce._C")  # not "from .. import": its error would blame a circular import
    IMPORT_ERROR: Optional[str] = None
    DTYPE_CODES = {getattr(torch, name): code for name, code in _C.DTYPES.items()}
    REDUCTION_CODES = {name: code for code, name in enumerate(_C.REDUCTIONS)}
except ImportError as e:  # a source checkout that was never built
    _C = None
    IMPORT_ERROR = f"{type(e).__name__}: {e}"


def _ptr(t: Optional[torch.Tensor]) -> int:
    return 0 if t is None else t.data_ptr()


def _args(logits, target, weight, opts) -> tuple:
    """The arguments every entry point starts with (FUSEDCE_ARGS in csrc/cpu/module.cpp)."""
    soft = target.is_floating_point()
    return (logits.data_ptr(), logits.stride(0), logits.shape[0], logits.shape[1], DTYPE_CODES[logits.dtype],
            target.data_ptr(), soft, target.stride(0) if soft else 0, DTYPE_CODES[target.dtype] if soft else 0,
            _ptr(weight), *opts)


class CpuBackend(Backend):
    name = "cpu"

    def unavailable(self, device):
        if device.type != "cpu":
            return f"it runs on CPU tensors, got a {device.type} tensor"
        return None if _C is not None else f"the compiled CPU module failed to import ({IMPORT_ERROR})"

    def forward(self, logits, target, weight, opts, grad_loss=None, dlogits=None):
        acc = accumulation_dtype(logits.dtype)
        loss = torch.empty(logits.shape[0], dtype=acc)
        lse = torch.empty(logits.shape[0], dtype=acc)
        grad = (0, 0, 0, 0) if dlogits is None else (
            grad_loss.to(acc).data_ptr(), grad_loss.stride(0), dlogits.data_ptr(), dlogits.stride(0))
        _C.forward(*_args(logits, target, weight, opts), 0, loss.data_ptr(), DTYPE_CODES[acc], lse.data_ptr(),
                   *grad, torch.get_num_threads())
        return loss, lse

    def reduced(self, logits, target, weight, opts, reduction, out_dtype, dlogits=None):
        loss = torch.empty((), dtype=out_dtype)
        grad = (0, 0, 0, 0) if dlogits is None else (0, 0, dlogits.data_ptr(), dlogits.stride(0))
        _C.forward(*_args(logits, target, weight, opts), REDUCTION_CODES[reduction], loss.data_ptr(),
                   DTYPE_CODES[out_dtype], 0, *grad, torch.get_num_threads())
        return loss

    def backward_into(self, grad_loss, logits, target, weight, lse, opts, out):
        self._backward(grad_loss, logits, target, weight, lse, None, opts, Shard(0, logits.shape[1]), out)

    def shard_states(self, logits, target, weight, opts, shard):
        states = torch.empty(logits.shape[0], 4, dtype=accumulation_dtype(logits.dtype))
        _C.shard_states(*_args(logits, target, weight, opts), shard.classes, states.data_ptr(),
                        torch.get_num_threads())
        return states

    def shard_backward_into(self, grad_loss, logits, target, weight, lse, k, opts, shard, out):
        acc = accumulation_dtype(logits.dtype)
        self._backward(grad_loss, logits, target, weight, lse.to(acc).contiguous(), k.to(acc).contiguous(), opts,
                       shard, out)

    def _backward(self, grad_loss, logits, target, weight, lse, k, opts, shard, out):
        """k: the global target mass of a shard's rows, None for a whole row (shard (0, V))."""
        grad_loss = grad_loss.to(lse.dtype)  # held here: a temporary's memory could be reused before the call
        _C.backward(*_args(logits, target, weight, opts), shard.start, shard.classes, grad_loss.data_ptr(),
                    grad_loss.stride(0), lse.data_ptr(), _ptr(k), out.data_ptr(), out.stride(0),
                    torch.get_num_threads())

    def mean_denominator(self, target, weight, ignore_index):
        # the class count only bounds the weight's reads (the forward has raised for other bad targets)
        vocab, dtype = (2**63 - 1, 0) if weight is None else (weight.shape[0], DTYPE_CODES[weight.dtype])
        return _C.mean_denominator(target.data_ptr(), target.is_floating_point(), target.shape[0], vocab,
                                   _ptr(weight), dtype, ignore_index)

    def scale_(self, grad, scale):
        """On the CPU reading the scale costs no device sync."""
        value = scale.item()
        if value != 1.0:
            grad.mul_(value)


BACKEND = CpuBackend()
