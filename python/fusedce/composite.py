"""The loss's derivatives as plain differentiable tensor ops, for where the kernels' gradient cannot
serve: a backward that is itself differentiated (create_graph=True: gradient penalties, Hessian-vector
products), torch.func transforms (grad, vmap, jacrev: they trace the backward with wrapped tensors),
and forward-mode AD (jvp). The same math as the kernels (csrc/cpu/kernel_impl.h), written densely:
rows x V temporaries in the accumulation dtype, which these uses can afford.

Per row, x' = softcap(x), p = softmax(x'), c_j the target coefficients (class index t:
(1-eps) w_t [j == t] + (eps/V) w_j; probabilities: w_j ((1-eps) q_j + eps/V)), K = sum_j c_j:
  loss        = sum_j c_j (lse - x'_j) + z lse^2
  dloss/dx'_j = p_j (K + 2 z lse) - c_j          dlse/dx'_j = p_j
  dx'_j/dx_j  = 1 - (x'_j / cap)^2 with a softcap
  dloss/dq_j  = -(1-eps) w_j (x'_j - lse)   (probability targets)
Ignored rows have loss 0 and zero gradients; a class index out of range makes its row NaN."""
from __future__ import annotations

import torch

from .options import Options, accumulation_dtype, softcapped


def _coefficients(target, weight, opts: Options, logits_shape, acc):
    """(c [R, V], rows that count [R] bool) in the accumulation dtype."""
    vocab = logits_shape[-1]
    eps = opts.label_smoothing
    w = None if weight is None else weight.to(acc)
    if target.is_floating_point():
        c = target.to(acc) * (1 - eps) + eps / vocab
        return (c if w is None else c * w), None
    valid = target != opts.ignore_index
    in_range = (target >= 0) & (target < vocab)
    safe = torch.where(in_range, target, 0)
    hit = torch.nn.functional.one_hot(safe, vocab).to(acc)
    w_t = 1.0 if w is None else w[safe][..., None]
    c = (1 - eps) * w_t * hit + eps / vocab * (1.0 if w is None else w)
    nan = torch.full((), float("nan"), dtype=acc, device=c.device)
    c = torch.where((valid & ~in_range)[..., None], nan, c)
    return torch.where(valid[..., None], c, 0.0), valid


def _capped_softmax(logits, opts: Options):
    """(x', p, dx'/dx or None) in the accumulation dtype."""
    x = softcapped(logits.to(accumulation_dtype(logits.dtype)), opts.softcap)
    p = torch.softmax(x, -1)
    return x, p, (1 - (x / opts.softcap) ** 2) if opts.softcap > 0 else None


def row_gradients(logits, target, weight, opts: Options):
    """(dloss/dx, dlse/dx), both [R, V] in the accumulation dtype and differentiable in the logits (and
    in probability targets)."""
    x, p, dcap = _capped_softmax(logits, opts)
    lse = torch.logsumexp(x, -1, keepdim=True)
    c, valid = _coefficients(target, weight, opts, logits.shape, x.dtype)
    z = opts.z_loss * lse if valid is None else torch.where(valid[..., None], opts.z_loss * lse, 0.0)
    dloss = p * (c.sum(-1, keepdim=True) + 2 * z) - c
    return (dloss, p) if dcap is None else (dloss * dcap, p * dcap)


def logits_grad(grad_loss, grad_lse, logits, target, weight, opts: Options):
    """d(sum(grad_loss * loss) + sum(grad_lse * lse)) / dlogits in the logits' dtype; grad_lse may be None."""
    dloss, dlse = row_gradients(logits, target, weight, opts)
    total = grad_loss.to(dloss.dtype)[..., None] * dloss
    if grad_lse is not None:
        total = total + grad_lse.to(dlse.dtype)[..., None] * dlse
    return total.to(logits.dtype)


def lse_grad(grad_lse, logits, opts: Options):
    """d(sum(grad_lse * lse)) / dlogits in the logits' dtype: softmax (times the softcap's slope)."""
    _, p, dcap = _capped_softmax(logits, opts)
    d = grad_lse.to(p.dtype)[..., None] * p
    return (d if dcap is None else d * dcap).to(logits.dtype)


def target_grad(grad_loss, logits, target, weight, opts: Options):
    """d(sum(grad_loss * loss)) / dq for probability targets q, in q's dtype."""
    acc = accumulation_dtype(logits.dtype)
    x = softcapped(logits.to(acc), opts.softcap)
    logp = x - torch.logsumexp(x, -1, keepdim=True)
    d = -(1 - opts.label_smoothing) * grad_loss.to(acc)[..., None] * logp
    if weight is not None:
        d = d * weight.to(acc)
    return d.to(target.dtype)



def loss_and_lse(logits, target, weight, opts: Options):
    """The per-row loss and lse (accumulation dtype) as differentiable tensor ops: what torch.compile
    traces for the pure-PyTorch backend (inductor fuses it into its own online-softmax kernels)."""
    acc = accumulation_dtype(logits.dtype)
    vocab = logits.shape[-1]
    eps = opts.label_smoothing
    x = softcapped(logits.to(acc), opts.softcap)
    lse = torch.logsumexp(x, -1)
    w = None if weight is None else weight.to(acc)
    z = opts.z_loss * lse * lse
    if target.is_floating_point():  # -sum q log p, like torch (NaN where q = 0 meets x = -inf, as there)
        c = target.to(acc) * (1 - eps) + eps / vocab
        return (c if w is None else c * w).mul(lse[..., None] - x).sum(-1) + z, lse
    valid = target != opts.ignore_index
    in_range = (target >= 0) & (target < vocab)
    safe = torch.where(in_range, target, 0)
    w_t = 1.0 if w is None else w[safe]
    loss = (1 - eps) * w_t * (lse - x.gather(-1, safe[..., None])[..., 0])
    if eps > 0:  # only then: 0 * inf of a -inf logit would make the row NaN
        nll = lse[..., None] - x
        loss = loss + eps / vocab * (nll if w is None else nll * w).sum(-1)
    loss = torch.where(valid & ~in_range, float("nan"), loss + z)
    return torch.where(valid, loss, 0.0), lse
