"""Backend dispatch: which kernel family serves a tensor. Every backend module has the same functions:
  forward(logits, target, weight, opts, grad_loss=None, dlogits=None) -> (loss, lse)
      per-row loss and lse; with dlogits, also the gradient of sum(grad_loss * loss) (the fused mode)
  backward(grad_loss, logits, target, weight, lse, opts, out)   writes dlogits into out (may be logits)
  scale_(grad, scale)   grad *= scale (0-d tensor), skipped when scale is 1 without a host sync
on logits [rows, V] with unit class stride, int64 class indices or [rows, V] probabilities, and a
class weight in the accumulation dtype (fp32, fp64 for fp64 logits)."""
from __future__ import annotations

import importlib
import os
import warnings
from types import ModuleType

import torch

from .. import _native, _native_cuda

BACKENDS = ("auto", "cpu", "cuda", "triton", "torch")

_MODULES = {"cpu": "cpu_backend", "cuda": "cuda_backend", "triton": "triton_backend", "torch": "torch_backend"}
_warned: set = set()


def triton_unavailable_reason() -> str | None:
    """None when Triton kernels can run here; otherwise why not."""
    try:
        from ..triton_kernels import cross_entropy  # noqa: F401
    except ImportError as e:
        return f"the Triton kernels failed to import ({e}; pip install triton)"
    return None


def _triton_serves(device: torch.device) -> str | None:
    reason = triton_unavailable_reason()
    if reason:
        return reason
    if device.type == "cuda":
        return None
    if device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1":
        return None
    return f"Triton kernels need a CUDA tensor (or TRITON_INTERPRET=1 for CPU tensors), got a {device.type} tensor"


def _cannot_serve(name: str, device: torch.device) -> str | None:
    """None when backend `name` can run on `device`; otherwise the reason."""
    if name == "torch":
        return None
    if name == "cpu":
        if device.type != "cpu":
            return f"it runs on CPU tensors, got a {device.type} tensor"
        return None if _native.available() else f"the compiled CPU module failed to import ({_native.IMPORT_ERROR})"
    if name == "triton":
        return _triton_serves(device)
    if name == "cuda":
        if not _native_cuda.available():
            return f"fusedce was built without its CUDA kernels ({_native_cuda.IMPORT_ERROR})"
        return None if device.type == "cuda" else f"it runs on CUDA tensors, got a {device.type} tensor"
    raise AssertionError(name)


def _warn_once(key: str, message: str) -> None:
    if key not in _warned:
        _warned.add(key)
        warnings.warn(message, RuntimeWarning, stacklevel=4)


def resolve(name: str, device: torch.device, dtype: torch.dtype = torch.float32) -> str:
    """Turns a user's backend choice into a concrete backend for tensors of `device` and `dtype`, or
    raises. float64 logits are served by the "cpu" and "torch" backends only."""
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}: expected one of {BACKENDS}")
    gpu_kernels_reason = "its kernels take float32, float16 and bfloat16 logits, got float64" if (
        dtype == torch.float64) else None
    if name != "auto":
        reason = _cannot_serve(name, device) or (gpu_kernels_reason if name in ("triton", "cuda") else None)
        if reason:
            raise RuntimeError(f"backend {name!r} cannot serve this input: {reason}")
        return name
    if device.type != "cpu" and gpu_kernels_reason:
        return "torch"
    # GPU tensors: Triton first, then the CUDA C++ kernels. Provisional: neither has been measured on a
    # GPU yet (benchmarks/ compares them); Triton's kernel is the one whose logic CI runs (interpreter).
    candidates = ("cpu",) if device.type == "cpu" else ("triton", "cuda")
    reasons = [(c, _cannot_serve(c, device)) for c in candidates]
    for candidate, reason in reasons:
        if reason is None:
            return candidate
    why = "; ".join(f"the {c!r} backend is unavailable: {r}" for c, r in reasons)
    _warn_once(f"torch:{device.type}", f"fusedce: using the pure-PyTorch backend for {device.type} tensors because {why}")
    return "torch"


def device_weight_sum(target: torch.Tensor, weight: torch.Tensor | None) -> torch.Tensor | None:
    """The class weights' sum that the GPU kernels need for label smoothing with class-index targets, as
    a device tensor the kernel reads: a Python float would sync the host."""
    return weight.sum() if weight is not None and not target.is_floating_point() else None


def get(name: str) -> ModuleType:
    return importlib.import_module(f".{_MODULES[name]}", __name__)
