"""The CUDA C++ kernels (csrc/cuda, module fusedce._cuda) behind the backend interface: the one place
that turns tensors into the module's arguments (device pointers, sizes, strides, dtype codes, the
device index and the stream). The module plans each launch itself (csrc/cuda/plan.cpp); this only
allocates the workspace the plan asks for. CUDA tensors only."""
from __future__ import annotations

import importlib
from typing import Optional

import torch

from . import Backend, weight_sum

try:
    _cuda = importlib.import_module("fusedce._cuda")  # not "from .. import": its error would blame a circular import
    IMPORT_ERROR: Optional[str] = None
    DTYPE_CODES = {getattr(torch, name): code for name, code in _cuda.DTYPES.items()}
except ImportError as e:  # built without nvcc, or with FUSEDCE_BUILD_CUDA=0
    _cuda = None
    IMPORT_ERROR = f"{type(e).__name__}: {e}"



def _ptr(t: Optional[torch.Tensor]) -> int:
    return t.data_ptr() if t is not None else 0


def _args(logits, target, weight, weight_sum, opts, lse, grad_loss, dlogits, shard=None, k=None,
          states=None) -> tuple:
    """The arguments every entry point starts with (FUSEDCE_ARGS in csrc/cuda/module.cpp). The caller
    keeps the tensors alive until the launch is queued: a freed one could be reallocated before it. A
    shard (options.Shard): its states' output, or the global K of its backward."""
    soft = target.is_floating_point()
    return (logits.data_ptr(), logits.stride(0), logits.shape[0], logits.shape[1], DTYPE_CODES[logits.dtype],
            target.data_ptr(), soft, target.stride(0) if soft else 0, DTYPE_CODES[target.dtype] if soft else 0,
            _ptr(weight), _ptr(weight_sum), *opts, _ptr(lse), _ptr(grad_loss),
            0 if grad_loss is None else grad_loss.stride(0), _ptr(dlogits), 0 if dlogits is None else dlogits.stride(0),
            shard.start if shard else 0, shard.classes if shard else logits.shape[1], _ptr(k), _ptr(states))


def _device(t: torch.Tensor) -> tuple:
    index = t.device.index if t.device.index is not None else torch.cuda.current_device()
    return index, torch.cuda.current_stream(t.device).cuda_stream


def plan(rows: int, vocab: int, dtype: torch.dtype, device, *, fused: bool = False, general: bool = False,
         soft: bool = False, vectorized: bool = True, shard: Optional[str] = None):
    """The launch the module plans for rows x vocab logits of `dtype` on `device` (an index, or a
    _cuda.DeviceInfo: a GPU described, not present), asked by shape: tools and tests use it. The
    addresses are made up (nothing is launched): general puts a class weight in, not vectorized puts the
    gradient 8 bytes off the logits' 16-byte phase, shard ("states" or "backward") makes it a shard's."""
    base = 1 << 20
    a = (base, vocab, rows, vocab, DTYPE_CODES[dtype], 2 * base, soft, vocab if soft else 0,
         DTYPE_CODES[dtype] if soft else 0, 3 * base if general and not soft else 0, 0, -100, 0.0, 0.0, 0.0, 4 * base,
         5 * base if fused else 0, 0, 6 * base + (0 if vectorized else 8) if fused or not vectorized else 0, vocab,
         0, vocab, 7 * base if shard == "backward" else 0, 8 * base if shard == "states" else 0)
    return _cuda.plan(*a, fused, device)


def _soft_target(target):
    # the kernels read float32 / float16 / bfloat16 probabilities (class indices pass unchanged)
    return target.float() if target.dtype == torch.float64 else target


class CudaBackend(Backend):
    name = "cuda"

    def unavailable(self, device):
        if _cuda is None:
            return f"fusedce was built without its CUDA kernels ({IMPORT_ERROR})"
        return None if device.type == "cuda" else f"it runs on CUDA tensors, got a {device.type} tensor"

    def forward(self, logits, target, weight, opts, grad_loss=None, dlogits=None):
        """loss, lse: [rows] fp32. With dlogits (and grad_loss, [rows], any stride) also the gradient of
        sum(grad_loss * loss) in the same launch."""
        rows = logits.shape[0]
        loss = torch.empty(rows, dtype=torch.float32, device=logits.device)
        lse = torch.empty(rows, dtype=torch.float32, device=logits.device)
        if rows == 0:
            return loss, lse
        target, grad_loss = _soft_target(target), None if grad_loss is None else grad_loss.float()
        total = weight_sum(target, weight)
        args = _args(logits, target, weight, total, opts, lse, grad_loss, dlogits)
        device, stream = _device(logits)
        launch = _cuda.plan(*args, dlogits is not None, device)  # csrc/cuda/plan.cpp says why it picks what
        floats = _cuda.workspace_floats(rows, False, launch)  # split rows: their segments' softmax states
        workspace = torch.empty(floats, dtype=torch.float32, device=logits.device) if floats else None
        _cuda.forward(*args, launch, device, stream, loss.data_ptr(), _ptr(workspace))
        return loss, lse

    def backward_into(self, grad_loss, logits, target, weight, lse, opts, out):
        self._backward(grad_loss, logits, target, weight, weight_sum(target, weight), lse, opts, out)

    def shard_states(self, logits, target, weight, opts, shard):
        """[rows, 4] fp32: the shard's rows' states, through the split rows' workspace and merge."""
        rows = logits.shape[0]
        states = torch.empty(rows, 4, dtype=torch.float32, device=logits.device)
        if rows == 0:
            return states
        target = _soft_target(target)  # held: only its address goes on
        args = _args(logits, target, weight, None, opts, None, None, None, shard, None, states)
        device, stream = _device(logits)
        launch = _cuda.plan(*args, False, device)
        workspace = torch.empty(_cuda.workspace_floats(rows, True, launch), dtype=torch.float32, device=logits.device)
        _cuda.forward(*args, launch, device, stream, 0, workspace.data_ptr())
        return states

    def shard_backward_into(self, grad_loss, logits, target, weight, lse, k, opts, shard, out):
        self._backward(grad_loss, logits, target, weight, None, lse.float().contiguous(), opts, out, shard,
                       k.float().contiguous())

    def _backward(self, grad_loss, logits, target, weight, total, lse, opts, out, shard=None, k=None):
        """total: the class weights' sum (whole rows); shard, k: a shard's, and its rows' global K."""
        if logits.shape[0] == 0:
            return
        target, grad_loss = _soft_target(target), grad_loss.float()
        args = _args(logits, target, weight, total, opts, lse, grad_loss, out, shard, k)
        device, stream = _device(logits)
        _cuda.backward(*args, _cuda.plan(*args, False, device), device, stream)

    def scale_(self, grad, scale):
        """grad [rows, V] (unit stride along V) *= scale (0-d), skipped on the device when it is 1."""
        _cuda.scale(grad.data_ptr(), DTYPE_CODES[grad.dtype], grad.shape[0], grad.shape[1], grad.stride(0),
                    scale.float().data_ptr(), *_device(grad))


BACKEND = CudaBackend()
