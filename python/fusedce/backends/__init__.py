"""Backend dispatch: which kernel family serves a tensor. Each backend is one module with one Backend
object (bindings, planning and launching of its kernels, nothing else), on logits [rows, V] with unit
class stride, int64 class indices or [rows, V] probabilities, and a class weight in the accumulation
dtype (fp32, fp64 for fp64 logits):

  forward(logits, target, weight, opts, grad_loss=None, dlogits=None) -> (loss, lse)
      per-row loss and lse (accumulation dtype); with dlogits, also the gradient of sum(grad_loss * loss)
      in the same pass (the fused mode; dlogits may be the logits)
  backward(grad_loss, logits, target, weight, lse, opts, out=None) -> dlogits
      the gradient of sum(grad_loss * loss) from the forward's lse, into out (a new tensor when None;
      may be the logits); grad_loss [rows] may have any stride
  reduced(logits, target, weight, opts, reduction, out_dtype, dlogits=None) -> 0-d loss
      the "sum" or "mean" loss; with dlogits also its gradient (the fused mode)
  mean_denominator(target, weight, ignore_index)   torch's "mean" divisor (a number or a 0-d tensor)
  scale_(grad, scale)   grad *= scale (0-d tensor), skipped when scale is 1, without a host sync

Vocabulary-parallel pieces (fusedce.distributed), on one rank's shard [rows, V_local] of the logits, the
global classes [shard.start, shard.start + V_local) of shard.classes = V (options.Shard). With x' the
softcapped logit and c_j the target mass of column j without the (1 - eps) w_t [j == t] term of a class
index t (c_j = eps / V * w_j for class indices; ((1 - eps) p_j + eps / V) * w_j for this shard's
probabilities p; w = 1 without a class weight, the weight being this shard's V_local entries):
  shard_states(logits, target, weight, opts, shard) -> [rows, 4] (accumulation dtype) of
      m = max_j x'_j,  s - 1 = sum_j exp(x'_j - m) - 1,  cx = sum_j c_j (x'_j - m),  k = sum_j c_j
      s - 1 is the sum of the terms other than one exp(0) = 1 of the max, computed without cancellation
      ((count of x'_j = m) - 1 + the others): for a confident row it is the tiny mass off its top logit,
      which the combine keeps (an s near 1 would round it away)
      class-index targets are not read (c_j does not depend on them); probabilities are [rows, V_local]
  shard_backward(grad_loss, logits, target, weight, lse, k, opts, shard, out=None) -> dlogits
      this shard's gradient of sum(grad_loss * loss) from the global lse [rows] and the global target
      mass k [rows] (sum over all classes of c_j, plus (1 - eps) w_t for a class index):
      d_j = g ((k + 2 z lse) exp(x'_j - lse) - c_j - (1 - eps) w_t [shard.start + j == t]) * dx'/dx
      with global class ids t; a t on another rank adds no term here and is no error; ignored rows 0
"""
from __future__ import annotations

import importlib
import os
import warnings
from typing import Optional

import torch

from ..errors import InvalidArgument

BACKENDS = ("auto", "cpu", "cuda", "triton", "torch")


class Backend:
    """What every backend shares: the reduction of the per-row losses with tensor ops (the CPU backend
    reduces inside its kernel instead). Subclasses set `name` and implement unavailable(), forward,
    backward_into, scale_, shard_states and shard_backward_into."""

    name = ""

    def backward(self, grad_loss, logits, target, weight, lse, opts, out=None):
        out = _gradient_buffer(logits) if out is None else out
        self.backward_into(grad_loss, logits, target, weight, lse, opts, out)
        return out

    def shard_backward(self, grad_loss, logits, target, weight, lse, k, opts, shard, out=None):
        out = _gradient_buffer(logits) if out is None else out
        self.shard_backward_into(grad_loss, logits, target, weight, lse, k, opts, shard, out)
        return out

    def unavailable(self, device: torch.device) -> Optional[str]:
        """None when this backend can run on `device`; otherwise why not."""
        raise NotImplementedError

    def mean_denominator(self, target, weight, ignore_index: int):
        """Summed weight of the non-ignored targets (their count without a weight; the number of rows
        for probabilities): torch's "mean"."""
        if target.is_floating_point():
            return target.shape[0]
        valid = target != ignore_index
        if weight is None:
            return valid.sum()
        safe = torch.where(valid, target, 0).clamp_(0, weight.shape[0] - 1)
        return torch.where(valid, weight[safe], 0).sum()

    def reduced(self, logits, target, weight, opts, reduction: str, out_dtype, dlogits=None):
        denominator = self.mean_denominator(target, weight, opts.ignore_index) if reduction == "mean" else None
        if dlogits is None:
            loss, _ = self.forward(logits, target, weight, opts)
        else:  # the gradient of the reduced loss: grad_loss 1 / denominator (or 1) on every row
            acc = torch.float64 if logits.dtype == torch.float64 else torch.float32
            one = torch.ones((), dtype=acc, device=logits.device)
            grad_loss = (one if denominator is None else one / denominator).expand(logits.shape[0])
            loss, _ = self.forward(logits, target, weight, opts, grad_loss, dlogits)
        total = loss.sum()
        return (total if denominator is None else total / denominator).to(out_dtype)


def _gradient_buffer(logits: torch.Tensor) -> torch.Tensor:
    return torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)


def check_target_range(target: torch.Tensor, classes: int, ignore_index: int) -> None:
    """Out-of-range class indices raise IndexError, as in torch. Only on the CPU and in eager mode, where
    looking at the values costs no device sync (nor a graph break); elsewhere such rows are NaN."""
    if target.device.type != "cpu" or target.numel() == 0 or torch.compiler.is_compiling():
        return
    bad = (target != ignore_index) & ((target < 0) | (target >= classes))
    if bool(bad.any()):
        row = int(bad.nonzero()[0, 0])
        raise IndexError(f"Target {int(target[row])} is out of bounds: expected a class index in [0, {classes}) "
                         f"or ignore_index={ignore_index} (row {row})")


def weight_sum(target: torch.Tensor, weight: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """The class weights' sum that the GPU kernels need for label smoothing with class-index targets, as
    a device tensor they read: a Python float would sync the host."""
    return weight.sum() if weight is not None and not target.is_floating_point() else None


_resolved: dict = {}
_warned: set = set()


def get(name: str) -> Backend:
    """The Backend object of a concrete backend name (ImportError if its module failed to import)."""
    backend = _LOADED[name]
    if isinstance(backend, ImportError):
        raise backend
    return backend


def _unavailable(name: str, device: torch.device) -> Optional[str]:
    backend = _LOADED[name]
    if isinstance(backend, ImportError):  # e.g. Triton not installed
        return f"it failed to import ({backend})"
    return backend.unavailable(device)


def resolve(name: str, device: torch.device, dtype: torch.dtype = torch.float32) -> Backend:
    """The Backend that serves the user's choice `name` for tensors of `device` and `dtype`, or raises.
    float64 logits are served by the "cpu" and "torch" backends only. Cached: the answer depends only on
    (name, device, dtype) and on what is installed. Not stored while torch.compile traces: a
    graph that mutates the cache would be traced again on its next call."""
    key = (name, device, dtype)  # the device itself: its .type costs as much as the lookup
    backend = _resolved.get(key)
    if backend is None:
        backend = _resolve(name, device, dtype)
        if not torch.compiler.is_compiling():
            _resolved[key] = backend
    return backend


def _resolve(name: str, device: torch.device, dtype: torch.dtype) -> Backend:
    if name not in BACKENDS:
        raise InvalidArgument(f"unknown backend {name!r}: expected one of {BACKENDS}")
    fp64_reason = "its kernels take float32, float16 and bfloat16 logits, got float64" if (
        dtype == torch.float64) else None
    if name != "auto":
        reason = _unavailable(name, device) or (fp64_reason if name in ("triton", "cuda") else None)
        if reason:
            raise RuntimeError(f"backend {name!r} cannot serve this input: {reason}")
        return get(name)
    if device.type != "cpu" and fp64_reason:
        return get("torch")
    # GPU tensors: Triton first, then the CUDA C++ kernels. Provisional: neither has been measured on a
    # GPU yet (benchmarks/ compares them); Triton's kernel is the one whose logic CI runs (interpreter).
    candidates = ("cpu",) if device.type == "cpu" else ("triton", "cuda")
    reasons = [(c, _unavailable(c, device)) for c in candidates]
    for candidate, reason in reasons:
        if reason is None:
            return get(candidate)
    why = "; ".join(f"the {c!r} backend is unavailable: {r}" for c, r in reasons)
    if device.type not in _warned:
        _warned.add(device.type)
        warnings.warn(f"fusedce: using the pure-PyTorch backend for {device.type} tensors because {why}",
                      RuntimeWarning, stacklevel=4)
    return get("torch")


def interpreting_triton() -> bool:
    """Whether Triton kernels run through Triton's interpreter (TRITON_INTERPRET=1), on CPU tensors."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def _load(module: str):
    try:
        return importlib.import_module(f".{module}", __name__).BACKEND
    except ImportError as e:
        return e


# Loaded at import, not on first use: torch.compile cannot trace an import.
_LOADED = {name: _load(module) for name, module in
           (("cpu", "cpu"), ("cuda", "cuda"), ("triton", "triton"), ("torch", "pytorch"))}
