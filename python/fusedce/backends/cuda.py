"""The CUDA C++ kernels (csrc/cuda, module fusedce._cuda) behind the backend interface: the one place
that turns tensors into the module's arguments (device pointers, sizes, strides, dtype codes, the
device index and the stream) and plans their launch. CUDA tensors only."""
from __future__ import annotations

import functools
import importlib
from typing import NamedTuple, Optional

import torch

from . import Backend, weight_sum

try:
    _cuda = importlib.import_module("fusedce._cuda")  # not "from .. import": its error would blame a circular import
    IMPORT_ERROR: Optional[str] = None
    DTYPE_CODES = {getattr(torch, name): code for name, code in _cuda.DTYPES.items()}
except ImportError as e:  # built without nvcc, or with FUSEDCE_BUILD_CUDA=0
    _cuda = None
    IMPORT_ERROR = f"{type(e).__name__}: {e}"

# Must match enum Layout in csrc/cuda/params.h.
WARP_PER_ROW, BLOCK_PER_ROW, BLOCK_PER_ROW_CACHED, CLUSTER_ROW_CACHED = 0, 1, 2, 3
CACHE_PACKS = 16  # kCachePacks in csrc/cuda/kernels.cuh: 16-byte packs per thread of the cached layouts
CACHED_THREADS = 512  # kCachedThreads there: at most this many threads a block in the cached layouts
CACHED_REGISTERS = 128  # their __launch_bounds__(512) lets them use 128 registers a thread
MAX_CLUSTER = 8  # kMaxCluster there: blocks per cluster
WARP_ROW_MAX_BYTES = 4096  # up to here a warp per row: a block per row would leave most threads idle
BLOCK_MAX_THREADS = 512  # uncached rows: two or more blocks per SM overlap one's reduction with another's loads
SEGMENT_MIN_BYTES = 16384  # a split row's segments stay long enough to stream
# __launch_bounds__(1024) caps the row kernels at 64 registers a thread, and the 16-byte ones use 56 to 64
# (ptxas, sm_90): an SM with 64K registers holds about 1024 of their threads, not its 2048.
KERNEL_REGISTERS = 64


class Device(NamedTuple):
    sms: int
    threads_per_sm: int
    l2_bytes: int
    clusters: bool = False  # the cluster layout runs: an sm_90+ GPU and code built for it
    regs_per_sm: int = 65536


class LaunchPlan(NamedTuple):
    layout: int
    threads: int
    blocks: int  # blocks along the rows (each loops over rows with the grid's stride)
    splits: int  # segments per row
    vectorized: bool


def _pow2_at_least(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def segment_length(vocab: int, parts: int) -> int:
    """Elements per segment of a row cut into parts (Segment::length in csrc/cuda/kernels.cuh)."""
    return (-(-vocab // parts) + 7) // 8 * 8


def _cluster_shape(vocab: int, per_pack: int):
    """(blocks per cluster, threads per block) whose registers hold a row, or None past MAX_CLUSTER blocks.
    Clusters of 2, 4 or 8 blocks: even sizes pack the SM pairs of a GPC."""
    for parts in (2, 4, 8):
        if segment_length(vocab, parts) <= CACHE_PACKS * CACHED_THREADS * per_pack:
            return parts, CACHED_THREADS
    return None


def _resident_blocks(device: Device, threads: int, registers: int = KERNEL_REGISTERS) -> int:
    """Blocks of `threads` threads that one SM runs at once: as many as its threads and its registers allow
    (an underestimate for the scalar kernels of unaligned rows, which use fewer registers)."""
    return max(1, min(device.threads_per_sm, device.regs_per_sm // registers) // threads)


def _block_threads(nbytes: int) -> int:
    """Threads for a block reading nbytes of a row: at least 4 packs of 16 bytes each."""
    return min(BLOCK_MAX_THREADS, max(128, _pow2_at_least(-(-nbytes // 64))))


def plan(rows: int, vocab: int, element_size: int, device: Device, *, fused: bool, general: bool, soft: bool,
         vectorized: bool) -> LaunchPlan:
    """Launch shape for rows x vocab logits (rows >= 1). Untuned (written without a GPU): the rules
    follow from the traffic model, and benchmarks/ is the place to tune them.
    - Rows up to 4 KiB: a warp per row, 8 rows per block.
    - The fused mode, common options, rows up to 128 KiB and enough of them to fill the GPU: a block per
      row, the row held in registers (CACHE_PACKS x 16 bytes per thread), so the gradient pass reads
      no memory.
    - The same for rows up to 1 MiB on sm_90+: the row held by a cluster of up to MAX_CLUSTER blocks, a
      segment each, their softmax states merged through distributed shared memory. A block per
      (row, segment): the hardware schedules whole clusters as SMs free up, so no persistent grid has
      to guess how many clusters fit at once.
    - Otherwise a block per row. Too few rows to fill the GPU: each row is split into segments
      (separate blocks) whose softmax states merge in a second kernel. The fused mode re-reads each
      row for its gradient, so the rows in flight are bounded to stay in L2 where that is possible."""
    row_bytes = vocab * element_size
    per_pack = 16 // element_size
    if row_bytes <= WARP_ROW_MAX_BYTES:
        return LaunchPlan(WARP_PER_ROW, 256, min(-(-rows // 8), device.sms * _resident_blocks(device, 256)), 1,
                          vectorized)
    held = vocab <= CACHE_PACKS * CACHED_THREADS * per_pack
    if fused and not general and vectorized and held and rows >= device.sms:
        threads = min(CACHED_THREADS, max(64, _pow2_at_least(-(-vocab // (per_pack * CACHE_PACKS)))))
        return LaunchPlan(BLOCK_PER_ROW_CACHED, threads,
                          min(rows, device.sms * _resident_blocks(device, threads, CACHED_REGISTERS)), 1, True)
    cluster = _cluster_shape(vocab, per_pack) if fused and not general and vectorized and device.clusters else None
    if cluster and rows * cluster[0] >= device.sms:
        parts, threads = cluster
        return LaunchPlan(CLUSTER_ROW_CACHED, threads, min(rows, 2**31 - 1), parts, True)
    threads = _block_threads(row_bytes)
    resident = device.sms * _resident_blocks(device, threads)
    if not soft and rows < resident:
        splits = max(1, min(-(-resident // rows), row_bytes // SEGMENT_MIN_BYTES, 65535))
        if splits > 1:
            return LaunchPlan(BLOCK_PER_ROW, _block_threads(-(-row_bytes // splits)), rows, splits, vectorized)
    blocks = min(rows, resident)
    if fused:
        blocks = min(blocks, max(device.sms, (device.l2_bytes // 2) // row_bytes))
    return LaunchPlan(BLOCK_PER_ROW, threads, blocks, 1, vectorized)


@functools.lru_cache(maxsize=None)
def device_info(index: int) -> Device:
    return Device(*_cuda.device_info(index))


def _same_phase(logits: torch.Tensor, dlogits: Optional[torch.Tensor]) -> bool:
    """16-byte packs need every row of logits and dlogits at the same offset from a 16-byte boundary."""
    if dlogits is None:
        return True
    es = logits.element_size()
    return (logits.data_ptr() - dlogits.data_ptr()) % 16 == 0 and (
        logits.shape[0] <= 1 or (logits.stride(0) - dlogits.stride(0)) * es % 16 == 0)


def _ptr(t: Optional[torch.Tensor]) -> int:
    return t.data_ptr() if t is not None else 0


def _call(kernel, logits, target, weight, weight_sum, opts, lse, grad_loss, dlogits, **extra) -> None:
    if logits.shape[0] == 0:
        return
    soft = target.is_floating_point()
    index = logits.device.index if logits.device.index is not None else torch.cuda.current_device()
    general = soft or weight is not None or opts.label_smoothing > 0 or opts.softcap > 0
    launch = plan(logits.shape[0], logits.shape[1], logits.element_size(), device_info(index),
                  fused=kernel is _cuda.forward and grad_loss is not None, general=general, soft=soft,
                  vectorized=_same_phase(logits, dlogits))
    if kernel is _cuda.forward:  # split rows: 5 floats of softmax state per segment (State in kernels.cuh)
        split = launch.layout == BLOCK_PER_ROW and launch.splits > 1
        workspace = torch.empty(logits.shape[0] * launch.splits * 5, dtype=torch.float32,
                                device=logits.device) if split else None
        extra["workspace"] = _ptr(workspace)
    kernel(logits=logits.data_ptr(), logits_row_stride=logits.stride(0), rows=logits.shape[0],
           vocab=logits.shape[1], dtype=DTYPE_CODES[logits.dtype],
           target_index=0 if soft else target.data_ptr(), target_prob=target.data_ptr() if soft else 0,
           target_row_stride=target.stride(0) if soft else 0,
           target_dtype=DTYPE_CODES[target.dtype] if soft else 0,
           weight=_ptr(weight), weight_sum=_ptr(weight_sum), ignore_index=opts.ignore_index,
           label_smoothing=opts.label_smoothing, z_loss=opts.z_loss, softcap=opts.softcap, lse=lse.data_ptr(),
           grad_loss=_ptr(grad_loss), grad_stride=grad_loss.stride(0) if grad_loss is not None else 0,
           dlogits=_ptr(dlogits), dlogits_row_stride=dlogits.stride(0) if dlogits is not None else 0,
           layout=launch.layout, threads=launch.threads, blocks=launch.blocks, splits=launch.splits,
           vectorized=launch.vectorized, device=index, stream=torch.cuda.current_stream(logits.device).cuda_stream,
           **extra)


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
        target = _soft_target(target)
        _call(_cuda.forward, logits, target, weight, weight_sum(target, weight), opts, lse,
              None if grad_loss is None else grad_loss.float(), dlogits, loss=loss.data_ptr())
        return loss, lse

    def backward_into(self, grad_loss, logits, target, weight, lse, opts, out):
        target = _soft_target(target)
        _call(_cuda.backward, logits, target, weight, weight_sum(target, weight), opts, lse, grad_loss.float(), out)

    def scale_(self, grad, scale):
        """grad [rows, V] (unit stride along V) *= scale (0-d), skipped on the device when it is 1."""
        _cuda.scale(grad=grad.data_ptr(), dtype=DTYPE_CODES[grad.dtype], rows=grad.shape[0], vocab=grad.shape[1],
                    row_stride=grad.stride(0), scale=scale.float().data_ptr(), device=grad.device.index,
                    stream=torch.cuda.current_stream(grad.device).cuda_stream)


BACKEND = CudaBackend()
