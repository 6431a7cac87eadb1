"""The one place that declares the native CPU kernels' signatures (fusedce._C takes plain integers:
pointers, sizes, strides, dtype codes) and turns tensors into those arguments."""
from __future__ import annotations

from typing import Optional

import torch

try:
    from . import _C
    IMPORT_ERROR: Optional[str] = None
except ImportError as e:  # a source checkout that was never built
    _C = None
    IMPORT_ERROR = f"{type(e).__name__}: {e}"

# Must match enum DType in csrc/cpu/kernel_args.h.
DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2, torch.float64: 3}

# Below this size a fresh gradient buffer is not worth a madvise call.
_HUGE_PAGE_MIN_BYTES = 8 << 20


def available() -> bool:
    return _C is not None


def isa() -> Optional[str]:
    """Instruction set the CPU kernels dispatched to ("avx512", "avx2" or "baseline")."""
    return _C.isa() if _C is not None else None


def _ptr(t: Optional[torch.Tensor]) -> int:
    return t.data_ptr() if t is not None else 0


def _common_args(logits, target, weight, opts) -> dict:
    """Keyword arguments shared by forward and backward; see struct CrossEntropyArgs."""
    soft = target.is_floating_point()
    return dict(
        logits=logits.data_ptr(), logits_row_stride=logits.stride(0), rows=logits.shape[0],
        vocab=logits.shape[1], dtype=DTYPE_CODES[logits.dtype],
        target_index=0 if soft else target.data_ptr(),
        target_prob=target.data_ptr() if soft else 0,
        target_row_stride=target.stride(0) if soft else 0,
        target_dtype=DTYPE_CODES[target.dtype] if soft else 0,
        weight=_ptr(weight), ignore_index=opts.ignore_index, label_smoothing=opts.label_smoothing,
        z_loss=opts.z_loss, softcap=opts.softcap,
    )


def _grad_args(grad_loss, logits, dlogits) -> dict:
    """grad_loss: rows in the accumulation dtype, any stride; dlogits: rows x V, unit class stride
    (may be the logits themselves)."""
    nbytes = dlogits.numel() * dlogits.element_size()
    if nbytes >= _HUGE_PAGE_MIN_BYTES and dlogits.data_ptr() != logits.data_ptr():
        _C.advise_huge_pages(dlogits.data_ptr(), nbytes)
    return dict(grad_loss=grad_loss.data_ptr(), grad_stride=grad_loss.stride(0), dlogits=dlogits.data_ptr(),
                dlogits_row_stride=dlogits.stride(0))


def forward(logits, target, weight, opts, loss, lse, grad_loss=None, dlogits=None) -> None:
    """loss, lse: rows, accumulation dtype (contiguous). With dlogits, also writes the gradient of
    sum(grad_loss * loss) in the same pass."""
    grad = _grad_args(grad_loss, logits, dlogits) if dlogits is not None else dict(
        grad_loss=0, grad_stride=0, dlogits=0, dlogits_row_stride=0)
    _C.forward(**_common_args(logits, target, weight, opts), loss=loss.data_ptr(), lse=lse.data_ptr(), **grad,
               num_threads=torch.get_num_threads())


def backward(grad_loss, logits, target, weight, lse, opts, dlogits) -> None:
    _C.backward(**_common_args(logits, target, weight, opts), lse=lse.data_ptr(),
                **_grad_args(grad_loss, logits, dlogits), num_threads=torch.get_num_threads())
