"""Triton kernels of fusedce: online log-softmax cross-entropy, forward, backward and the fused
forward-with-gradient, as one kernel specialised by compile-time flags, plus their launch helpers.

Math (per row; x' = softcap(x), p = softmax(x'), lse = log sum exp x'), as in csrc/cpu/kernel_impl.h:
  per-class target coefficients c_j:
    class index t:  c_j = (1-eps) w_t [j == t] + (eps/V) w_j
    probabilities:  c_j = w_j ((1-eps) q_j + eps/V)
  loss = K log s - sum_j c_j (x'_j - m) + z lse^2,  K = sum_j c_j, lse = m + log s (m: running max)
  dloss/dx'_j = p_j (K + 2 z lse) - c_j;  dloss/dx_j = dloss/dx'_j (1 - (x'_j / cap)^2) with a softcap
Online update per block: m' = max(m, max(x_blk)); s' = s exp(m - m') + sum exp(x_blk - m').
A vocabulary-parallel shard (SHARD) holds the global classes [class_start, class_start + V) of `classes`: V in
eps/V is `classes`, its forward stops at the state (m, s - 1, cx, k) of its columns, and its backward takes the global
lse and K.

Traffic: forward reads the logits once (S); backward reads them once and writes dlogits once (2S);
the fused mode does both in one launch, the second read of each row served by L2 where it fits.
"""
from __future__ import annotations

import functools
from typing import NamedTuple, Tuple

import torch
import triton
import triton.language as tl

# exp(x) = exp2(x * LOG2E): ex2 is one MUFU instruction, without the denormal fix-up of tl.exp
LOG2E = tl.constexpr(1.4426950408889634)
LOWEST = tl.constexpr(-3.4028234663852886e38)  # float32 lowest: finite, so (-inf) - m is -inf, never NaN


@triton.jit
def _tanh(y):
    """tanh to a few ulp without a division: a Taylor polynomial where |y| < 0.3 (1 - 2 / (exp(2|y|) + 1) loses
    relative accuracy there), else 1 - 2 r^2 with r = rsqrt(exp(2|y|) + 1); exact at both ends."""
    z = y * y
    p = 0.021869488536155203 * z - 0.053968253968253971  # 62/2835 z - 17/315: the y^9, y^7 terms
    p = p * z + 0.13333333333333333  # 2/15
    p = p * z - 0.33333333333333333
    small = y + (y * z) * (p - 0.0088632355299021966 * (z * z * z))  # - 1382/155925 y^11
    r = tl.math.rsqrt(tl.exp2(tl.abs(y) * (2.0 * LOG2E)) + 1.0)
    large = 1.0 - 2.0 * (r * r)
    return tl.where(tl.abs(y) < 0.3, small, tl.where(y < 0, -large, large))


@triton.jit
def _capped(x, softcap, HAS_SOFTCAP: tl.constexpr):
    if HAS_SOFTCAP:
        x = softcap * _tanh(x * (1.0 / softcap))
    return x


@triton.jit
def _log1p(r):
    u = 1.0 + r
    return tl.where(u == 1.0, r, tl.log(u) * r / (u - 1.0))  # Goldberg: exact to a few ulp for small r


@triton.jit
def _expm1(d):
    u = tl.exp(d)
    small = tl.where(u == 1.0, d, (u - 1.0) * d / tl.log(u))  # Kahan's trick, for |d| < 1/2
    return tl.where(tl.abs(d) < 0.5, small, u - 1.0)


@triton.jit
def _rounded(d, dtype: tl.constexpr):
    """d (fp32) in the gradient's dtype, rounded to nearest even. For bf16 the rounding is done here: Triton's
    interpreter truncates fp32 -> bf16, the GPU rounds; once rounded, both convert it exactly."""
    if dtype == tl.bfloat16:
        bits = d.to(tl.uint32, bitcast=True)
        bits = (bits + (0x7FFF + ((bits >> 16) & 1))) & 0xFFFF0000
        d = tl.where(d == d, bits.to(tl.float32, bitcast=True), d)  # a NaN's sum may carry into the sign
    return d.to(dtype)


@triton.jit
def _columns(start, K: tl.constexpr, THREADS: tl.constexpr, VEC: tl.constexpr):
    """The columns of one block as [K, THREADS, VEC]: each thread holds VEC adjacent columns (16 bytes) at K
    places a warp-row apart, so the block moves in 16-byte accesses and a reduction over axes 0 and 2 stays
    inside a thread."""
    k = tl.arange(0, K)[:, None, None] * (THREADS * VEC)
    return start + k + tl.arange(0, THREADS)[None, :, None] * VEC + tl.arange(0, VEC)[None, None, :]


@triton.jit
def _coefficients(target_row, weight_ptr, cols, mask, smooth, label_smoothing,
                  SOFT: tl.constexpr, HAS_WEIGHT: tl.constexpr, MASKED: tl.constexpr):
    """c_j for a block of columns, without the (1 - eps) w_t [j == t] term (smooth = eps / V); 0 where masked."""
    if SOFT:
        if MASKED:
            q = tl.load(target_row + cols, mask=mask, other=0.0).to(tl.float32)
        else:
            q = tl.load(target_row + cols).to(tl.float32)
        c = q * (1.0 - label_smoothing) + smooth
    else:
        c = tl.zeros(cols.shape, tl.float32) + smooth
    if HAS_WEIGHT:
        if MASKED:
            c = c * tl.load(weight_ptr + cols, mask=mask, other=0.0)
        else:
            c = c * tl.load(weight_ptr + cols)
    if MASKED:
        c = tl.where(mask, c, 0.0)
    return c


@triton.jit
def _forward_block(logits_row, target_row, weight_ptr, start, V, smooth, label_smoothing, softcap, m, top, rest, cx, k,
                   SOFT: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_C: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
                   MASKED: tl.constexpr, K: tl.constexpr, THREADS: tl.constexpr, VEC: tl.constexpr):
    """Adds one block to the per-thread states (m, top, rest, cx, k: [THREADS] each): one rebase per thread and
    block, then per element a max, exp2 and the top/rest split, without crossing threads."""
    cols = _columns(start, K, THREADS, VEC)
    mask = cols < V
    if MASKED:
        raw = tl.load(logits_row + cols, mask=mask, other=float("-inf"))
    else:
        raw = tl.load(logits_row + cols)
    # softcap is increasing: the max of the capped block is the capped max
    m_new = tl.maximum(m, _capped(tl.max(tl.max(raw, axis=2), axis=0).to(tl.float32), softcap, HAS_SOFTCAP))
    x = _capped(raw.to(tl.float32), softcap, HAS_SOFTCAP)
    if MASKED and HAS_SOFTCAP:
        x = tl.where(mask, x, float("-inf"))  # cap(-inf) would be -cap
    grew = m_new > m
    scale = tl.exp2((m - m_new) * LOG2E)  # 1 where the max stayed
    rest = rest * scale + tl.where(grew, top * scale, 0.0)
    top = tl.where(grew, 0.0, top)
    if HAS_C:  # cx = sum_j c_j (x'_j - m), re-expressed relative to the new max
        c = _coefficients(target_row, weight_ptr, cols, mask, smooth, label_smoothing, SOFT, HAS_WEIGHT, MASKED)
        cx = tl.where(k != 0, cx - k * (m_new - m), cx)
    d = x - m_new[None, :, None]
    # s = top + rest: top counts the terms exp(x' - m) = 1, rest sums the others, so the tiny terms of a confident
    # prediction are not rounded away against the 1 of its top logit. NaN logits count in rest and propagate.
    other = (d != 0).to(tl.float32)
    rest += tl.sum(tl.sum(tl.exp2(d * LOG2E) * other, axis=2), axis=0)
    top += K * VEC - tl.sum(tl.sum(other, axis=2), axis=0)
    if HAS_C:
        cd = c * d
        if MASKED:
            cd = tl.where(mask, cd, 0.0)  # 0 * -inf
        cx += tl.sum(tl.sum(cd, axis=2), axis=0)
        k += tl.sum(tl.sum(c, axis=2), axis=0)
    return m_new, top, rest, cx, k


@triton.jit
def _gradient_block(logits_row, dlogits_row, target_row, weight_ptr, start, V, smooth, label_smoothing, softcap,
                    shift, gcs, g, SOFT: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_C: tl.constexpr,
                    HAS_SOFTCAP: tl.constexpr, MASKED: tl.constexpr, K: tl.constexpr, THREADS: tl.constexpr,
                    VEC: tl.constexpr):
    """Stores g (p_j (K + 2 z lse) - c_j) (times the softcap's derivative) for one block. p_j = exp(x'_j - shift) / s:
    shift and s are the unrounded max and sum of the fused launch, or lse and 1, and gcs = g (K + 2 z lse) / s, so
    p_j is the forward's own term over the sum, with no rounded log in its exponent. The target column gets its
    exact value after the row."""
    cols = _columns(start, K, THREADS, VEC)
    mask = cols < V
    if MASKED:
        x = tl.load(logits_row + cols, mask=mask, other=0.0).to(tl.float32)
    else:
        x = tl.load(logits_row + cols).to(tl.float32)
    xc = _capped(x, softcap, HAS_SOFTCAP)
    d = tl.exp2((xc - shift) * LOG2E) * gcs
    if HAS_C:
        d -= _coefficients(target_row, weight_ptr, cols, mask, smooth, label_smoothing, SOFT, HAS_WEIGHT, MASKED) * g
    if HAS_SOFTCAP:
        y = xc * (1.0 / softcap)
        d = d * (1.0 - y * y)
    out = _rounded(d, dlogits_row.dtype.element_ty)
    if MASKED:
        tl.store(dlogits_row + cols, out, mask=mask)
    else:
        tl.store(dlogits_row + cols, out)


@triton.jit
def _zero_block(dlogits_row, start, V, MASKED: tl.constexpr, K: tl.constexpr, THREADS: tl.constexpr,
                VEC: tl.constexpr):
    cols = _columns(start, K, THREADS, VEC)
    zero = tl.zeros(cols.shape, dlogits_row.dtype.element_ty)
    if MASKED:
        tl.store(dlogits_row + cols, zero, mask=cols < V)
    else:
        tl.store(dlogits_row + cols, zero)


@triton.jit
def _coefficient_sum(target_row, weight_ptr, V, smooth, label_smoothing, HAS_WEIGHT: tl.constexpr,
                     BLOCK_V: tl.constexpr, K: tl.constexpr, THREADS: tl.constexpr, VEC: tl.constexpr):
    """sum_j c_j of probability targets (the backward without the forward)."""
    k = tl.zeros([THREADS], tl.float32)
    full = V // BLOCK_V * BLOCK_V
    for start in range(0, full, BLOCK_V):
        cols = _columns(start, K, THREADS, VEC)
        c = _coefficients(target_row, weight_ptr, cols, cols < V, smooth, label_smoothing, True, HAS_WEIGHT, False)
        k += tl.sum(tl.sum(c, axis=2), axis=0)
    if full < V:
        cols = _columns(full, K, THREADS, VEC)
        c = _coefficients(target_row, weight_ptr, cols, cols < V, smooth, label_smoothing, True, HAS_WEIGHT, True)
        k += tl.sum(tl.sum(c, axis=2), axis=0)
    return tl.sum(k, axis=0)


@triton.jit
def cross_entropy_kernel(
    # pointers
    logits_ptr,        # [rows, V] fp32 / fp16 / bf16, unit stride along V
    target_ptr,        # [rows] int64 class indices, or [rows, V] probabilities (SOFT)
    weight_ptr,        # [V] fp32 class weights (HAS_WEIGHT)
    weight_sum_ptr,    # [] fp32 sum of the weights (HAS_WEIGHT and not SOFT)
    loss_ptr,          # [rows] fp32 out (FORWARD)
    lse_ptr,           # [rows] fp32 out (FORWARD) or in (backward only)
    grad_loss_ptr,     # [rows] fp32, any stride (BACKWARD)
    dlogits_ptr,       # [rows, V] out in the logits dtype (BACKWARD); may be logits_ptr
    states_ptr,        # [rows, 4] fp32 out (SHARD and FORWARD): m, s - 1, cx, k of the shard's columns
    target_mass_ptr,   # [rows] fp32 (SHARD and BACKWARD): the global K
    # sizes and strides (elements)
    rows, V, logits_row_stride, target_row_stride, grad_stride, dlogits_row_stride,
    # the global class ids of the columns, [class_start, class_start + V) of `classes` (0 and V: whole rows)
    class_start, classes,
    # options
    ignore_index, label_smoothing, z_loss, softcap,
    # compile-time flags
    SOFT: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_SMOOTHING: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
    FORWARD: tl.constexpr, BACKWARD: tl.constexpr,
    SHARD: tl.constexpr,  # a shard of the rows: FORWARD stores its states (not the loss), BACKWARD takes K
    # a block is BLOCK_V columns: K x THREADS x VEC, THREADS = 32 * num_warps, VEC columns = 16 bytes
    BLOCK_V: tl.constexpr, THREADS: tl.constexpr, VEC: tl.constexpr,
):
    K: tl.constexpr = BLOCK_V // (THREADS * VEC)
    HAS_C: tl.constexpr = SOFT or HAS_SMOOTHING
    smooth = label_smoothing / classes  # eps / V
    full = V // BLOCK_V * BLOCK_V  # columns in whole blocks: those loops need no mask
    # a grid smaller than the rows (the fused mode bounds the rows in flight) loops over them
    for row in range(tl.program_id(0).to(tl.int64), rows, tl.num_programs(0)):  # int64 offsets
        logits_row = logits_ptr + row * logits_row_stride
        target_row = target_ptr + row * target_row_stride
        if SOFT or (SHARD and FORWARD):  # a shard's states do not depend on a class-index target
            t = 0
            ignored = False
            bad_target = False
        else:
            t = tl.load(target_ptr + row)
            ignored = t == ignore_index
            if SHARD:
                t -= class_start  # its column here
            elsewhere = ~ignored & ((t < 0) | (t >= V))
            # a shard's target on another shard adds no term here; a whole row's is NaN instead of a
            # host-synchronising check
            bad_target = False if SHARD else elsewhere
            t = tl.where(ignored | elsewhere, 0, t)
            # read before any thread stores a gradient (dlogits may be the logits): before the forward's
            # reductions, or the barrier below
            x_t = _capped(tl.load(logits_row + t).to(tl.float32), softcap, HAS_SOFTCAP)
        keep = 1.0 - label_smoothing
        w_t = tl.load(weight_ptr + t).to(tl.float32) if HAS_WEIGHT and not SOFT else 1.0
        c_t = smooth * w_t if HAS_SMOOTHING else 0.0  # c_t without the target's own term

        k = 0.0  # sum_j c_j
        log_s = 0.0
        if FORWARD:
            m = tl.full([THREADS], LOWEST, tl.float32)
            top = tl.zeros([THREADS], tl.float32)
            rest = tl.zeros([THREADS], tl.float32)
            cx_t = tl.zeros([THREADS], tl.float32)
            k_t = tl.zeros([THREADS], tl.float32)
            for start in range(0, full, BLOCK_V):
                m, top, rest, cx_t, k_t = _forward_block(
                    logits_row, target_row, weight_ptr, start, V, smooth, label_smoothing, softcap, m, top, rest,
                    cx_t, k_t, SOFT, HAS_WEIGHT, HAS_C, HAS_SOFTCAP, False, K, THREADS, VEC)
            if full < V:
                m, top, rest, cx_t, k_t = _forward_block(
                    logits_row, target_row, weight_ptr, full, V, smooth, label_smoothing, softcap, m, top, rest,
                    cx_t, k_t, SOFT, HAS_WEIGHT, HAS_C, HAS_SOFTCAP, True, K, THREADS, VEC)
            # the threads' states merged, once per row
            m_row = tl.max(m, axis=0)
            scale = tl.exp2((m - m_row) * LOG2E)
            at_top = m == m_row
            top_row = tl.sum(tl.where(at_top, top, 0.0), axis=0)
            rest_row = tl.sum(rest * scale + tl.where(at_top, 0.0, top * scale), axis=0)
            cx = 0.0
            if HAS_C:
                k = tl.sum(k_t, axis=0)
                cx = tl.sum(tl.where(k_t != 0, cx_t - k_t * (m_row - m), 0.0), axis=0)
            if SHARD:
                state = states_ptr + row * 4
                tl.store(state, m_row)
                tl.store(state + 1, (top_row - 1.0) + rest_row)  # s - 1, exact for a confident row
                tl.store(state + 2, cx)
                tl.store(state + 3, k)
            else:
                log_s = tl.where(top_row > 0, tl.log(top_row) + _log1p(rest_row / top_row), tl.log(rest_row))
                lse = m_row + log_s
                loss = k * log_s - cx if HAS_C else 0.0
                if not SOFT:  # lse - x_t as (m - x_t) + log s: exact for confident predictions where lse ~ x_t
                    loss += keep * w_t * ((m_row - x_t) + log_s)
                loss += z_loss * lse * lse
                if not SOFT:
                    loss = tl.where(ignored, 0.0, loss)
                    loss = tl.where(bad_target, float("nan"), loss)
                tl.store(loss_ptr + row, loss)
                tl.store(lse_ptr + row, lse)
                shift = m_row
        else:
            lse = tl.load(lse_ptr + row)
            shift = lse
            if not SOFT:
                tl.debug_barrier()  # in place: every thread has read x_t before any stores

        if BACKWARD:
            g = tl.load(grad_loss_ptr + row * grad_stride).to(tl.float32)
            dlogits_row = dlogits_ptr + row * dlogits_row_stride
            if SHARD:
                k = tl.load(target_mass_ptr + row)
            elif SOFT:
                if not FORWARD:  # K needs one pass over the targets
                    k = _coefficient_sum(target_row, weight_ptr, V, smooth, label_smoothing, HAS_WEIGHT, BLOCK_V, K,
                                         THREADS, VEC)
            else:
                w_sum = tl.load(weight_sum_ptr).to(tl.float32) if HAS_WEIGHT else V * 1.0
                k = keep * w_t + smooth * w_sum
                g = tl.where(bad_target, float("nan"), g)
            coef = k + 2.0 * z_loss * lse
            gcs = g * coef * tl.exp(-log_s)  # 1 / s
            if ignored:  # exact zeros, even where the row holds inf or NaN
                for start in range(0, full, BLOCK_V):
                    _zero_block(dlogits_row, start, V, False, K, THREADS, VEC)
                if full < V:
                    _zero_block(dlogits_row, full, V, True, K, THREADS, VEC)
            else:
                for start in range(0, full, BLOCK_V):
                    _gradient_block(logits_row, dlogits_row, target_row, weight_ptr, start, V, smooth, label_smoothing,
                                    softcap, shift, gcs, g, SOFT, HAS_WEIGHT, HAS_C, HAS_SOFTCAP, False, K, THREADS, VEC)
                if full < V:
                    _gradient_block(logits_row, dlogits_row, target_row, weight_ptr, full, V, smooth, label_smoothing,
                                    softcap, shift, gcs, g, SOFT, HAS_WEIGHT, HAS_C, HAS_SOFTCAP, True, K, THREADS, VEC)
                if not SOFT:
                    # the target's (1-eps) w_t (p_t - 1) with expm1 (p_t ~ 1 for a confident prediction), once per row:
                    # d_t = (1-eps) w_t expm1(delta) + p_t (coef - (1-eps) w_t) - c_t, delta = x'_t - lse
                    delta = (x_t - shift) - log_s
                    d_t = keep * w_t * _expm1(delta) + tl.exp(delta) * (coef - keep * w_t) - c_t
                    if HAS_SOFTCAP:
                        y_t = x_t / softcap
                        d_t = d_t * (1.0 - y_t * y_t)
                    tl.debug_barrier()  # after every thread's store of the block that holds column t
                    tl.store(dlogits_row + t, _rounded(d_t * g, dlogits_ptr.dtype.element_ty),
                             mask=~elsewhere if SHARD else None)


@triton.jit
def scale_kernel(grad_ptr, scale_ptr, V, row_stride, BLOCK_V: tl.constexpr):
    """grad[row, :] *= scale, returning at once when scale is 1: the check happens on the device, so the
    fused mode's backward costs nothing in the common case and never syncs the host."""
    scale = tl.load(scale_ptr).to(tl.float32)
    if scale != 1.0:
        row = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)
        mask = cols < V
        ptr = grad_ptr + row * row_stride + cols
        v = tl.load(ptr, mask=mask).to(tl.float32)
        tl.store(ptr, _rounded(v * scale, grad_ptr.dtype.element_ty), mask=mask)


# ---- launch helpers ------------------------------------------------------------------------------

KERNELS = (cross_entropy_kernel, scale_kernel)
COMPILED = isinstance(cross_entropy_kernel, triton.runtime.JITFunction)  # False under TRITON_INTERPRET=1
# Launches go through wrap_triton, which lets torch.compile trace them inside fusedce's triton_op ops, where
# torch has it (>= 2.6) and Triton compiles the kernels (torch before 2.13 rejects the interpreter's).
_traceable = torch.library.wrap_triton if COMPILED and hasattr(torch.library, "wrap_triton") else (
    lambda kernel: kernel)


class Device(NamedTuple):
    """What the launch configuration depends on: the GPU's compute capability, SMs and L2 size."""
    capability: Tuple[int, int]
    sms: int
    l2_bytes: int


# Triton's interpreter (CPU tensors) gets the blocks of an sm_90 GPU, so that CI runs the kernels as a GPU
# would, and no L2: the fused mode's grid is then one program that loops over every row.
INTERPRETER = Device((9, 0), sms=1, l2_bytes=0)


@functools.lru_cache(maxsize=None)
def device_of(device: torch.device) -> Device:
    """The GPU a launch runs on; INTERPRETER for CPU tensors."""
    if device.type != "cuda":
        return INTERPRETER
    props = torch.cuda.get_device_properties(device)
    return Device((props.major, props.minor), props.multi_processor_count, props.L2_cache_size)


def launch_config(vocab: int, element_size: int, device: Device):
    """(BLOCK_V, num_warps) for a row length. A block iteration moves 16 KiB of logits, 64 bytes a thread (four
    16-byte loads in flight each) with 8 warps; more warps per row would repeat the per-row work (the
    reductions, the loss) in more threads. Not yet tuned on a GPU (no GPU was available when this was
    written): see benchmarks/ to tune it."""
    vec = 16 // element_size
    block = max(min(triton.next_power_of_2(vocab), 16384 // element_size), 32 * vec)
    warps = 8 if block >= 2048 else 4
    return block, max(1, min(warps, block // (32 * vec)))


def fused_programs(rows: int, row_bytes: int, device: Device) -> int:
    """Programs of the fused mode, each looping over rows. Its gradient pass re-reads the row the forward
    pass just read, from L2 where the rows in flight fit in it: at most 5/8 of L2 holds them (the rest
    takes the gradient being written). A multiple of the SMs where more than one row per SM fits, so no SM
    has more rows than the others."""
    fit = max(1, device.l2_bytes * 5 // 8 // row_bytes)
    if fit >= device.sms:
        fit = fit // device.sms * device.sms
    return min(rows, fit)


class Launch(NamedTuple):
    kernel: object
    grid: Tuple[int, ...]
    args: tuple
    meta: dict  # compile-time arguments and launch options


def cross_entropy_launch(logits, target, weight, weight_sum, opts, *, forward: bool, grad_loss=None, lse=None,
                         dlogits=None, loss=None, shard=None, states=None, target_mass=None,
                         device: Device = INTERPRETER) -> Launch:
    """The launch cross_entropy makes for these arguments on `device` (benchmarks/sass compiles it)."""
    rows, vocab = logits.shape
    soft = target.is_floating_point()
    block, warps = launch_config(vocab, logits.element_size(), device)
    backward = dlogits is not None
    dummy = next(t for t in (lse, loss, states) if t is not None)  # for the pointers a launch does not read
    args = (logits, target, weight if weight is not None else dummy, weight_sum if weight_sum is not None else dummy,
            loss if loss is not None else dummy, lse if lse is not None else dummy, grad_loss if backward else dummy,
            dlogits if backward else logits, states if states is not None else dummy,
            target_mass if target_mass is not None else dummy,
            rows, vocab, logits.stride(0), target.stride(0) if soft else 0, grad_loss.stride(0) if backward else 0,
            dlogits.stride(0) if backward else 0, shard.start if shard else 0, shard.classes if shard else vocab,
            opts.ignore_index, opts.label_smoothing, opts.z_loss, opts.softcap)
    meta = dict(SOFT=soft, HAS_WEIGHT=weight is not None, HAS_SMOOTHING=opts.label_smoothing > 0,
                HAS_SOFTCAP=opts.softcap > 0, FORWARD=forward, BACKWARD=backward, SHARD=shard is not None,
                BLOCK_V=block, THREADS=32 * warps,
                VEC=16 // logits.element_size(), num_warps=warps,
                enable_fp_fusion=True)  # pinned: Triton 3.10 turns FMA contraction off by default
    programs = fused_programs(rows, vocab * logits.element_size(), device) if forward and backward else rows
    return Launch(cross_entropy_kernel, (programs,), args, meta)


def cross_entropy(logits, target, weight, weight_sum, opts, *, forward: bool, grad_loss=None, lse=None,
                  dlogits=None, loss=None, shard=None, states=None, target_mass=None):
    """Launches cross_entropy_kernel over the rows. forward: writes loss and lse (fp32, [rows]); with
    dlogits (and grad_loss) also the gradient, either in the same launch (forward=True, the fused
    mode) or from a given lse (forward=False). With a shard (options.Shard): forward writes the shard's
    states ([rows, 4] fp32) instead, and the backward (forward=False) takes the global K, target_mass."""
    if logits.shape[0] == 0:
        return
    launch = cross_entropy_launch(logits, target, weight, weight_sum, opts, forward=forward, grad_loss=grad_loss,
                                  lse=lse, dlogits=dlogits, loss=loss, shard=shard, states=states,
                                  target_mass=target_mass, device=device_of(logits.device))
    _traceable(launch.kernel)[launch.grid](*launch.args, **launch.meta)


def scale_(grad: torch.Tensor, scale: torch.Tensor) -> None:
    """grad ([rows, V], unit stride along V) *= scale (a 0-d tensor), skipped on the device when 1."""
    rows, vocab = grad.shape
    if grad.numel() == 0:
        return
    block = min(triton.next_power_of_2(vocab), 4096)
    _traceable(scale_kernel)[(rows, triton.cdiv(vocab, block))](grad, scale, vocab, grad.stride(0), BLOCK_V=block)
