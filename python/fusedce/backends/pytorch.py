"""Pure-PyTorch backend: the same online algorithm as the compiled kernels (see csrc/cpu/kernel_impl.h
for the math), written with tensor ops over vocabulary chunks. Runs on any device; the fallback when
no compiled kernel serves the tensor, and a readable statement of what the kernels compute."""
from __future__ import annotations

import torch

from ..options import Options, Shard, accumulation_dtype, softcapped
from . import Backend, check_target_range

_CHUNK = 8192  # vocabulary columns per step: bounds the fp32 temporaries to rows x _CHUNK


def _coefficients(target, weight, opts: Options, vocab: int, start: int, stop: int, acc):
    """c_j for columns [start, stop) without the (1 - eps) w_t [j == t] term; None when all zero."""
    smooth = opts.label_smoothing / vocab
    w = weight[start:stop].to(acc) if weight is not None else None
    if target.is_floating_point():
        c = target[:, start:stop].to(acc) * (1 - opts.label_smoothing) + smooth
        return c * w if w is not None else c
    if opts.label_smoothing == 0:
        return None
    c = torch.full((stop - start,), smooth, dtype=acc, device=target.device)
    return (c * w if w is not None else c).expand(target.shape[0], -1)


def target_terms(logits, target, weight, opts: Options, acc, shard: Shard):
    """For class-index targets on this shard's classes: (x'_t, w_t, non-ignored rows, rows whose target is
    outside [0, shard.classes), rows whose target is a column here, that column (0 elsewhere)); x'_t and
    w_t are those of the column, meaningful where the target is here. On devices where checking would
    need a host sync, a bad target's loss and gradient are NaN."""
    check_target_range(target, shard.classes, opts.ignore_index)
    valid = target != opts.ignore_index
    bad = valid & ((target < 0) | (target >= shard.classes))
    local = target - shard.start
    here = (local >= 0) & (local < logits.shape[1])
    col = torch.where(here, local, torch.zeros_like(local))
    xt = softcapped(logits.gather(1, col[:, None])[:, 0].to(acc), opts.softcap)
    wt = weight.to(acc)[col] if weight is not None else torch.ones_like(xt)
    xt = torch.where(bad, torch.full_like(xt, float("nan")), xt)
    return xt, wt, valid, bad, here, col


def target_gradient(delta, coef, keep_w):
    """d loss / dx'_t less c_t, (1 - eps) w_t (p_t - 1) + p_t (coef - (1 - eps) w_t), from delta = x'_t - lse:
    p_t - 1 with expm1, as p_t ~ 1 for a confident prediction."""
    return keep_w * torch.expm1(delta) + torch.exp(delta) * (coef - keep_w)


class TorchBackend(Backend):
    name = "torch"

    def unavailable(self, device):
        return None

    def forward(self, logits, target, weight, opts: Options, grad_loss=None, dlogits=None):
        """With dlogits, also writes the gradient of sum(grad_loss * loss) (two passes here; the compiled
        backends fuse them)."""
        loss, lse, m, log_s = _loss_and_lse(logits, target, weight, opts)
        if dlogits is not None:
            _gradient(grad_loss, logits, target, weight, opts, dlogits, lse, (m, log_s))
        return loss, lse

    def backward_into(self, grad_loss, logits, target, weight, lse, opts: Options, out: torch.Tensor) -> None:
        _gradient(grad_loss, logits, target, weight, opts, out, lse)

    def shard_states(self, logits, target, weight, opts: Options, shard: Shard):
        m, top, rest, cx, k = _states(logits, target, weight, opts, shard.classes)
        return torch.stack((m, (top - 1) + rest, cx, k), 1)  # s - 1 without cancellation

    def shard_backward_into(self, grad_loss, logits, target, weight, lse, k, opts: Options, shard: Shard,
                            out: torch.Tensor) -> None:
        _gradient(grad_loss, logits, target, weight, opts, out, lse, k=k, shard=shard)

    def scale_(self, grad: torch.Tensor, scale: torch.Tensor) -> None:
        """grad *= scale (a 0-d tensor). On the CPU skipped when scale is 1, which is free to check; on a
        GPU always, since checking would sync the host."""
        if grad.device.type != "cpu" or scale.item() != 1.0:
            grad.mul_(scale.to(grad.dtype))


BACKEND = TorchBackend()


def _states(logits, target, weight, opts: Options, classes: int):
    """The online pass over the columns: m = max x', s = top + rest, cx = sum c_j (x'_j - m), k = sum c_j,
    c_j the coefficients of a row's columns here out of `classes` in all."""
    rows, vocab = logits.shape
    acc = accumulation_dtype(logits.dtype)
    m = torch.full((rows,), torch.finfo(acc).min, dtype=acc, device=logits.device)
    # s = top + rest: top counts the terms exp(x' - m) = 1, rest sums the others (see the kernels)
    top, rest, k, cx = (torch.zeros(rows, dtype=acc, device=logits.device) for _ in range(4))
    for start in range(0, vocab, _CHUNK):
        stop = min(start + _CHUNK, vocab)
        x = softcapped(logits[:, start:stop].to(acc), opts.softcap)
        m_new = torch.maximum(m, x.amax(1))
        is_top = x == m_new[:, None]
        e = torch.exp(x - m_new[:, None])
        rest_blk = torch.where(is_top, torch.zeros_like(e), e).sum(1)
        top_blk = is_top.sum(1).to(acc)
        grew = m_new > m
        rest = torch.where(grew, (top + rest) * torch.exp(m - m_new), rest) + rest_blk
        top = torch.where(grew, top_blk, top + top_blk)
        c = _coefficients(target, weight, opts, classes, start, stop, acc)
        if c is not None:  # sum c (x' - m), shifted with m as in the kernels
            cx = torch.where(k != 0, cx - k * (m_new - m), cx) + (c * (x - m_new[:, None])).sum(1)
            k = k + c.sum(1)
        m = m_new
    return m, top, rest, cx, k


def _loss_and_lse(logits, target, weight, opts: Options):
    acc = accumulation_dtype(logits.dtype)
    m, top, rest, cx, k = _states(logits, target, weight, opts, logits.shape[1])
    log_s = torch.where(top > 0, torch.log(top) + torch.log1p(rest / top), torch.log(rest))
    lse = m + log_s
    loss = k * log_s - cx
    if not target.is_floating_point():  # lse - x_t as (m - x_t) + log s: exact where lse ~ x_t
        xt, wt, valid, *_ = target_terms(logits, target, weight, opts, acc, Shard(0, logits.shape[1]))
        loss = loss + (1 - opts.label_smoothing) * wt * ((m - xt) + log_s)
    loss = loss + opts.z_loss * lse * lse
    if not target.is_floating_point():
        loss = torch.where(valid, loss, torch.zeros_like(loss))
    return loss, lse, m, log_s


def _gradient(grad_loss, logits, target, weight, opts: Options, out, lse, stats=None, k=None, shard=None) -> None:
    """stats = (m, log s) from a forward just run: x' - lse is then (x' - m) - log s, unrounded. A shard's
    gradient (fusedce.distributed) comes with the global target mass k; without one, the shard is all the
    classes and k is computed here."""
    rows, vocab = logits.shape
    shard = shard or Shard(0, vocab)
    acc = accumulation_dtype(logits.dtype)
    g = grad_loss.to(acc)
    index = not target.is_floating_point()
    if index:
        _, wt, valid, bad, here, col = target_terms(logits, target, weight, opts, acc, shard)
        g = torch.where(bad, torch.full_like(g, float("nan")), g)  # a bad target's row: NaN, as its loss
        if k is None:
            w_sum = weight.to(acc).sum() if weight is not None else vocab
            k = (1 - opts.label_smoothing) * wt + opts.label_smoothing / vocab * w_sum
    elif k is None:
        k = sum(_coefficients(target, weight, opts, vocab, a, min(a + _CHUNK, vocab), acc).sum(1)
                for a in range(0, vocab, _CHUNK))
    coef = (k + 2 * opts.z_loss * lse)[:, None]
    for start in range(0, vocab, _CHUNK):
        stop = min(start + _CHUNK, vocab)
        x = softcapped(logits[:, start:stop].to(acc), opts.softcap)
        delta = (x - stats[0][:, None]) - stats[1][:, None] if stats else x - lse[:, None]  # x' - lse
        p = torch.exp(delta)
        d = p * coef
        c = _coefficients(target, weight, opts, shard.classes, start, stop, acc)
        if c is not None:
            d = d - c
        if index:  # the target's (1-eps) w_t (p_t - 1) with expm1: p_t ~ 1 for a confident prediction
            keep_w = ((1 - opts.label_smoothing) * wt)[:, None]
            hit = here & (col >= start) & (col < stop)
            at = torch.where(hit, col - start, torch.zeros_like(col))[:, None]
            exact = target_gradient(delta.gather(1, at), coef, keep_w)
            if c is not None:
                exact = exact - c.gather(1, at)
            d.scatter_(1, at, torch.where(hit[:, None], exact, d.gather(1, at)))
        if opts.softcap > 0:
            d = d * (1 - (x / opts.softcap) ** 2)
        d = d * g[:, None]
        out[:, start:stop] = torch.where(valid[:, None], d, torch.zeros_like(d)) if index else d
