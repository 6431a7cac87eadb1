"""Triton kernels of fusedce: online log-softmax cross-entropy, forward, backward and the fused
forward-with-gradient, as one kernel specialised by compile-time flags, plus their launch helpers.

Math (per row; x' = softcap(x), p = softmax(x'), lse = log sum exp x'), as in csrc/cpu/kernel_impl.h:
  per-class target coefficients c_j:
    class index t:  c_j = (1-eps) w_t [j == t] + (eps/V) w_j
    probabilities:  c_j = w_j ((1-eps) q_j + eps/V)
  loss = K log s - sum_j c_j (x'_j - m) + z lse^2,  K = sum_j c_j, lse = m + log s (m: running max)
  dloss/dx'_j = p_j (K + 2 z lse) - c_j;  dloss/dx_j = dloss/dx'_j (1 - (x'_j / cap)^2) with a softcap
Online update per block: m' = max(m, max(x_blk)); s' = s exp(m - m') + sum exp(x_blk - m').

Traffic: forward reads the logits once (S); backward reads them once and writes dlogits once (2S);
the fused mode does both in one launch, the second read of each row served by L2 where it fits.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

@triton.jit
def _capped(x, softcap, HAS_SOFTCAP: tl.constexpr):
    if HAS_SOFTCAP:
        # tanh(y) = 1 - 2 / (exp(2y) + 1), exact at both ends (exp overflows to inf -> 1, underflows -> -1)
        y = x / softcap
        x = softcap * (1.0 - 2.0 / (tl.exp(2.0 * y) + 1.0))
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
def _coefficients(target_ptr, weight_ptr, row, cols, mask, V, target_row_stride, label_smoothing,
                  SOFT: tl.constexpr, HAS_WEIGHT: tl.constexpr):
    """c_j for a block of columns, without the (1 - eps) w_t [j == t] term; 0 where masked."""
    smooth = label_smoothing / V
    if SOFT:
        q = tl.load(target_ptr + row * target_row_stride + cols, mask=mask, other=0.0).to(tl.float32)
        c = q * (1.0 - label_smoothing) + smooth
    else:
        c = tl.zeros(cols.shape, tl.float32) + smooth
    if HAS_WEIGHT:
        c = c * tl.load(weight_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    return tl.where(mask, c, 0.0)


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
    # sizes and strides (elements)
    V, logits_row_stride, target_row_stride, grad_stride, dlogits_row_stride,
    # options
    ignore_index, label_smoothing, z_loss, softcap,
    # compile-time flags
    SOFT: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_SMOOTHING: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
    FORWARD: tl.constexpr, BACKWARD: tl.constexpr, BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    logits_row = logits_ptr + row * logits_row_stride
    HAS_C: tl.constexpr = SOFT or HAS_SMOOTHING

    if SOFT:
        t = -1
        ignored = False
        bad_target = False
    else:
        t = tl.load(target_ptr + row)
        ignored = t == ignore_index
        bad_target = (t != ignore_index) & ((t < 0) | (t >= V))  # NaN instead of a host-synchronising check
        t = tl.where(ignored | bad_target, 0, t)
        # read before the first reduction: in place, another warp may store the target's gradient as
        # soon as it has passed the last one
        x_t = tl.load(logits_row + t).to(tl.float32)

    k = 0.0  # sum_j c_j
    if FORWARD:
        m = -3.4028234663852886e38  # float32 lowest: finite, so (-inf) - m is -inf, never NaN
        # s = top + rest: top counts the terms exp(x' - m) = 1, rest sums the others, so the tiny terms
        # of a confident prediction are not rounded away against the 1 of its top logit
        top = 0.0
        rest = 0.0
        cx = 0.0  # sum_j c_j (x'_j - m)
        for start in range(0, V, BLOCK_V):
            cols = start + tl.arange(0, BLOCK_V)
            mask = cols < V
            x = tl.load(logits_row + cols, mask=mask, other=0.0).to(tl.float32)
            x = tl.where(mask, _capped(x, softcap, HAS_SOFTCAP), float("-inf"))  # cap(-inf) would be -cap
            m_new = tl.maximum(m, tl.max(x, axis=0))
            is_top = x == m_new
            rest_blk = tl.sum(tl.where(is_top, 0.0, tl.exp(x - m_new)), axis=0)
            top_blk = tl.sum(tl.where(is_top, 1.0, 0.0), axis=0)
            grew = m_new > m
            rest = tl.where(grew, (top + rest) * tl.exp(m - m_new), rest) + rest_blk
            top = tl.where(grew, top_blk, top + top_blk)
            if HAS_C:
                c = _coefficients(target_ptr, weight_ptr, row, cols, mask, V, target_row_stride, label_smoothing,
                                  SOFT, HAS_WEIGHT)
                cx = tl.where(k != 0, cx - k * (m_new - m), cx) + tl.sum(tl.where(mask, c * (x - m_new), 0.0), axis=0)
                k += tl.sum(c, axis=0)
            m = m_new
        log_s = tl.where(top > 0, tl.log(top) + _log1p(rest / top), tl.log(rest))
        lse = m + log_s
        loss = k * log_s - cx
        if not SOFT:  # lse - x_t as (m - x_t) + log s: exact for confident predictions where lse ~ x_t
            x_t = _capped(x_t, softcap, HAS_SOFTCAP)
            w_t = tl.load(weight_ptr + t).to(tl.float32) if HAS_WEIGHT else 1.0
            loss += (1.0 - label_smoothing) * w_t * ((m - x_t) + log_s)
        loss += z_loss * lse * lse
        if not SOFT:
            loss = tl.where(ignored, 0.0, loss)
            loss = tl.where(bad_target, float("nan"), loss)
        tl.store(loss_ptr + row, loss)
        tl.store(lse_ptr + row, lse)
    else:
        lse = tl.load(lse_ptr + row)

    if BACKWARD:
        g = tl.load(grad_loss_ptr + row * grad_stride).to(tl.float32)
        dlogits_row = dlogits_ptr + row * dlogits_row_stride
        keep = 1.0 - label_smoothing
        if SOFT:
            if not FORWARD:  # K needs one pass over the targets
                for start in range(0, V, BLOCK_V):
                    cols = start + tl.arange(0, BLOCK_V)
                    k += tl.sum(_coefficients(target_ptr, weight_ptr, row, cols, cols < V, V, target_row_stride,
                                              label_smoothing, SOFT, HAS_WEIGHT), axis=0)
            w_t = 0.0
        else:
            w_t = tl.load(weight_ptr + t).to(tl.float32) if HAS_WEIGHT else 1.0
            w_sum = tl.load(weight_sum_ptr).to(tl.float32) if HAS_WEIGHT else V * 1.0
            k = keep * w_t + label_smoothing / V * w_sum
            g = tl.where(ignored, 0.0, g)
            g = tl.where(bad_target, float("nan"), g)
        coef = k + 2.0 * z_loss * lse
        for start in range(0, V, BLOCK_V):
            cols = start + tl.arange(0, BLOCK_V)
            mask = cols < V
            x = _capped(tl.load(logits_row + cols, mask=mask, other=0.0).to(tl.float32), softcap, HAS_SOFTCAP)
            if FORWARD:  # x' - lse from the unrounded m and log s of this launch
                delta = (x - m) - log_s
            else:
                delta = x - lse
            p = tl.exp(delta)
            d = p * coef
            if HAS_C:
                c = _coefficients(target_ptr, weight_ptr, row, cols, mask, V, target_row_stride, label_smoothing,
                                  SOFT, HAS_WEIGHT)
                d -= c
            if not SOFT:  # the target's (1-eps) w_t (p_t - 1) with expm1: p_t ~ 1 for a confident prediction
                exact = keep * w_t * _expm1(delta) + p * (coef - keep * w_t)
                if HAS_C:
                    exact -= c
                d = tl.where(cols == t, exact, d)
            if HAS_SOFTCAP:
                y = x / softcap
                d = d * (1.0 - y * y)
            d = d * g
            if not SOFT:
                d = tl.where(ignored, 0.0, d)  # exact zeros, even where the row holds inf or NaN
            tl.store(dlogits_row + cols, d.to(dlogits_ptr.dtype.element_ty), mask=mask)


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
        tl.store(ptr, (v * scale).to(grad_ptr.dtype.element_ty), mask=mask)


# ---- launch helpers ------------------------------------------------------------------------------

KERNELS = (cross_entropy_kernel, scale_kernel)
COMPILED = isinstance(cross_entropy_kernel, triton.runtime.JITFunction)  # False under TRITON_INTERPRET=1
# Launches go through wrap_triton, which lets torch.compile trace them inside fusedce's triton_op ops, where
# torch has it (>= 2.6) and Triton compiles the kernels (torch before 2.13 rejects the interpreter's).
_traceable = torch.library.wrap_triton if COMPILED and hasattr(torch.library, "wrap_triton") else (
    lambda kernel: kernel)


def launch_config(vocab: int, element_size: int, device: torch.device):
    """(BLOCK_V, num_warps) for a row length. 16 KiB of logits per block iteration keeps enough loads in
    flight per SM on Ampere and Hopper; sm_90 gets more warps for its larger register file. Not yet
    tuned on a GPU (no GPU was available when this was written): see benchmarks/ to tune it."""
    block = min(triton.next_power_of_2(vocab), 16384 // element_size)
    if device.type != "cuda":
        return block, 4  # the interpreter ignores num_warps
    major, _ = torch.cuda.get_device_capability(device)
    warps = 16 if (major >= 9 and block >= 4096) else 8 if block >= 2048 else 4
    return block, warps


def cross_entropy(logits, target, weight, weight_sum, opts, *, forward: bool, grad_loss=None, lse=None,
                  dlogits=None, loss=None):
    """Launches cross_entropy_kernel over the rows. forward: writes loss and lse (fp32, [rows]); with
    dlogits (and grad_loss) also the gradient, either in the same launch (forward=True, the fused
    mode) or from a given lse (forward=False)."""
    rows, vocab = logits.shape
    if rows == 0:
        return
    soft = target.is_floating_point()
    block, warps = launch_config(vocab, logits.element_size(), logits.device)
    backward = dlogits is not None
    dummy = lse if lse is not None else loss
    _traceable(cross_entropy_kernel)[(rows,)](
        logits, target, weight if weight is not None else dummy, weight_sum if weight_sum is not None else dummy,
        loss if loss is not None else dummy, lse, grad_loss if backward else dummy,
        dlogits if backward else logits,
        vocab, logits.stride(0), target.stride(0) if soft else 0, grad_loss.stride(0) if backward else 0,
        dlogits.stride(0) if backward else 0,
        opts.ignore_index, opts.label_smoothing, opts.z_loss, opts.softcap,
        SOFT=soft, HAS_WEIGHT=weight is not None, HAS_SMOOTHING=opts.label_smoothing > 0,
        HAS_SOFTCAP=opts.softcap > 0, FORWARD=forward, BACKWARD=backward, BLOCK_V=block, num_warps=warps,
    )


def scale_(grad: torch.Tensor, scale: torch.Tensor) -> None:
    """grad ([rows, V], unit stride along V) *= scale (a 0-d tensor), skipped on the device when 1."""
    rows, vocab = grad.shape
    if grad.numel() == 0:
        return
    block = min(triton.next_power_of_2(vocab), 4096)
    _traceable(scale_kernel)[(rows, triton.cdiv(vocab, block))](grad, scale, vocab, grad.stride(0), BLOCK_V=block)
