"""The two collectives of a vocabulary-parallel forward, and the loss computed from what they bring.

Rank r holds the columns [start_r, start_r + V_r) of V classes; per row the backend gives its shard's
states (m_r, s_r - 1, cx_r, k_r) (backends/__init__.py). Then:
  1. all_reduce(MAX) of [m_r per row | per rank: V_r, start_r, error | a target hash, minus it]: the
     global max M, and the layout, which every rank then checks alike, so that every rank raises the
     same error (the others' slots are -inf; sizes below 2**24 are exact in fp32).
  2. all_reduce(SUM) of the columns the options need: s_r e_r (e_r = exp(m_r - M)), less 1 on the rank
     of a class-index target t, which sends (s_r - 1) e_r + expm1(m_r - M); x'_t and w_t, gathered where
     the target t is here (0 elsewhere; only with a class weight); cx_r + k_r (m_r - M) with smoothing
     or probabilities; k_r with probabilities; and one scalar, this shard's weight sum, where smoothing
     needs the global one.
With S = sum_r s_r e_r, log S = log1p(S - 1) (S - 1: the sum, or the sum - 1 where no rank holds t),
exact for a confident prediction (x'_t = M, S - 1 tiny: its rank's (s_r - 1) e_r, the others' s_r e_r;
the other ranks at the max send their whole s_r >= 1, so ties stay exact),
lse = M + log S, CX = sum_j c_j (x'_j - M) and K = sum_j c_j, every rank computes
  loss = (1 - eps) w_t ((M - x'_t) + log S) + K log S - CX + z lse^2  (probabilities: without the first
  term), and the backward's target mass k = (1 - eps) w_t + K (probabilities: K).
Bytes per row per rank: 4 (MAX) + 4 per column: 12 in the plain case, 16 with a class weight,
smoothing or probabilities, 20 with a class weight and smoothing."""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import torch.distributed as dist

from ..backends.pytorch import target_gradient, target_terms
from ..errors import InvalidArgument
from ..options import Options, Shard, accumulation_dtype

_EXACT = 1 << 24  # integers below this are exact in fp32, the statistics' dtype
_HASH_PRIME = 16777213  # < 2**24: a target hash is exact in fp32
_SLOTS = 3  # per rank: size, start (-1: not given), error


class Rows(NamedTuple):
    """What the combine gives each rank, per row (accumulation dtype)."""
    loss: torch.Tensor  # ignored rows 0
    lse: torch.Tensor
    k: torch.Tensor  # the global target mass, for the backward
    weight: Optional[torch.Tensor]  # the target's class weight (0 for ignored rows), with a class weight
    target_shift: Optional[torch.Tensor] = None  # x'_t - lse unrounded (class indices; meaningful where t is here)


def _target_hash(target: torch.Tensor) -> torch.Tensor:
    """A number below 2**24 that tells replicated class-index targets apart: sum_i (t_i mod P) h_i mod P."""
    position = torch.arange(1, target.shape[0] + 1, device=target.device) * 40503 % _HASH_PRIME
    return ((target % _HASH_PRIME) * position % _HASH_PRIME).sum() % _HASH_PRIME


def _layout_error(sizes, starts, codes, hashes) -> Optional[str]:
    """What is wrong with the exchanged layout, the same text on every rank (None when it is right)."""
    failed = [r for r, code in enumerate(codes) if code > 0]
    if failed:
        return f"rank(s) {failed} rejected their arguments (the error on each of them says why)"
    if any(s >= _EXACT for s in sizes):
        return f"each rank's shard must have fewer than {_EXACT} classes, got sizes {sizes}"
    given = [s >= 0 for s in starts]
    if any(given) and not all(given):
        return f"vocab_start must be given on every rank or on none, got {starts} (-1: not given)"
    offsets = [sum(sizes[:r]) for r in range(len(sizes))]
    if all(given) and starts != offsets:
        return (f"the shards must tile the classes in rank order without gaps or overlaps: with sizes {sizes} "
                f"the ranks' vocab_start must be {offsets}, got {starts}")
    if sum(sizes) >= _EXACT:
        return f"the classes must be fewer than {_EXACT}, got {sum(sizes)}"
    if hashes[0] > -torch.inf and hashes[0] != -hashes[1]:
        return "the class-index targets differ across ranks: every rank must pass the same (replicated) target"
    return None


# On a GPU the layout is read on the host once per (group, shard size, vocab_start), then only checked on
# the device: a later call whose slots differ from the cached ones (another rank's layout changed, its
# targets differ, its arguments were rejected) gets NaN losses instead of an error, with no host sync.
_LAYOUTS: dict = {}


def reads_layout(device: torch.device) -> bool:
    """Whether each call reads the exchanged slots on the host: free on the CPU, a sync on a GPU."""
    return device.type == "cpu"


def _maximum(m, size: int, vocab_start, target, group, failed: bool, known: Optional[Shard]):
    """Collective 1: (M [rows], this rank's Shard or what is wrong with the layout). With the Shard `known`
    from an earlier chunk of the same call, the slots are left out."""
    rows = m.shape[0]
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    buf = torch.full((rows + (0 if known else _SLOTS * world + 2),), -torch.inf, dtype=m.dtype, device=m.device)
    buf[:rows] = m
    if not known:
        mine = (size, -1 if vocab_start is None else vocab_start, float(failed))
        buf[rows + _SLOTS * rank:rows + _SLOTS * (rank + 1)] = torch.tensor(mine, dtype=buf.dtype)
        if target is not None and not target.is_floating_point():
            h = _target_hash(target).to(buf.dtype)
            buf[-2:] = torch.stack((h, -h))
    dist.all_reduce(buf, dist.ReduceOp.MAX, group=group)
    if known:
        return buf, known
    key = (group, world, rank, size, vocab_start, m.device, buf.dtype)
    cached = None if reads_layout(m.device) else _LAYOUTS.get(key)
    if cached is not None:
        shard, expected = cached
        slots = buf[rows:]
        agree = (slots[:-2] == expected).all() & ((slots[-2] == -slots[-1]) | (slots[-2] == -torch.inf))
        return torch.where(agree, buf[:rows], torch.nan), shard
    slots = buf[rows:].tolist()  # the layout, on the host (a device sync on a GPU)
    sizes, starts, codes = ([int(v) if v > -torch.inf else -1 for v in slots[i:_SLOTS * world:_SLOTS]]
                            for i in range(_SLOTS))
    error = _layout_error(sizes, starts, codes, slots[-2:])
    if error:
        return buf[:rows], error
    shard = Shard(sum(sizes[:rank]), sum(sizes))
    if not reads_layout(m.device):
        _LAYOUTS[key] = shard, buf[rows:-2].clone()
    return buf[:rows], shard


def fail_everywhere(error: Exception, rows: int, device, group):
    """A rank whose arguments were rejected still takes part in collective 1, so that every rank raises
    (the others an InvalidArgument that names this rank) instead of waiting for it."""
    _maximum(torch.zeros(rows, device=device), 0, None, None, group, True, None)
    raise type(error)(f"vocab-parallel cross-entropy: rank {dist.get_rank(group)} rejected its arguments: "
                      f"{error}") from error


def forward(logits, target, weight, opts: Options, backend, group, vocab_start: Optional[int],
            known: Optional[Shard] = None, hashed: Optional[torch.Tensor] = None):
    """(Rows, this rank's Shard) for this rank's logits [rows, V_local], class indices [rows] or probabilities
    [rows, V_local] and class weight [V_local] (accumulation dtype), after the two collectives. A chunk
    of a longer call passes the Shard of the first (`known`), and to the first all the targets, which
    are checked to agree across ranks (`hashed`, default: target)."""
    rows, size = logits.shape
    soft = target.is_floating_point()
    eps = opts.label_smoothing
    local = Shard(0, size)  # c_j for size classes here: rescaled below once V is known
    if soft and eps:  # c_j = (1 - eps) p_j w_j + eps / V w_j: two passes, as V is not known yet
        states = backend.shard_states(logits, target, weight, opts._replace(label_smoothing=0.0), local)
        uniform = backend.shard_states(logits, torch.zeros(rows, dtype=torch.int64, device=logits.device),
                                       weight, opts._replace(label_smoothing=1.0), local)
    else:
        states = backend.shard_states(logits, target, weight, opts, local)
    m, s_less_1, cx, k = states.unbind(1)
    big_m, shard = _maximum(m, size, vocab_start, target if hashed is None else hashed, group, False, known)
    if isinstance(shard, str):
        raise InvalidArgument(f"vocab-parallel cross-entropy: {shard}")
    classes = shard.classes
    if soft and eps:
        cx = (1 - eps) * cx + eps * size / classes * uniform[:, 2]
        k = (1 - eps) * k + eps * size / classes * uniform[:, 3]
    elif not soft and eps:
        cx, k = cx * (size / classes), k * (size / classes)
    shift = m - big_m
    e = torch.exp(shift)
    columns = [(s_less_1 + 1) * e]
    if not soft:
        acc = accumulation_dtype(logits.dtype)
        xt, wt, valid, bad, here, _ = target_terms(logits, target, weight, opts, acc, shard)
        owner = here & valid  # the one rank of the row's target: s_r e_r - 1 without cancellation
        columns[0] = torch.where(owner, s_less_1 * e + torch.expm1(shift), columns[0])
        columns.append(torch.where(here | bad, xt, torch.zeros_like(xt)))  # NaN for a bad target
        if weight is not None:
            columns.append(torch.where(owner, wt, torch.zeros_like(wt)))
    if eps or soft:
        columns.append(cx + k * shift)
    if soft:
        columns.append(k)
    extra = [weight.sum()[None]] if not soft and eps and weight is not None else []
    buf = torch.cat([torch.stack(columns, 1).reshape(-1), *extra])
    dist.all_reduce(buf, dist.ReduceOp.SUM, group=group)
    summed = buf[:rows * len(columns)].view(rows, len(columns)).unbind(1)
    if soft:  # no rank knows where the mass sits: log S from S, which rounds a confident row's S - 1
        log_s = torch.log(summed[0])
    else:  # S - 1: the sum where a rank holds the target; ignored and out-of-range targets: the sum - 1
        log_s = torch.log1p(torch.where(valid & ~bad, summed[0], summed[0] - 1))
    lse = big_m + log_s
    if soft:
        big_k, big_cx = summed[-1], summed[-2]
        loss = big_k * log_s - big_cx + opts.z_loss * lse * lse
        return Rows(loss, lse, big_k, None), shard
    w_t = summed[2] if weight is not None else None
    keep = 1 - eps if w_t is None else (1 - eps) * w_t
    loss = keep * ((big_m - summed[1]) + log_s) + opts.z_loss * lse * lse
    target_mass = keep
    if eps:
        big_k = eps * buf[-1] / classes if weight is not None else eps
        loss = loss + big_k * log_s - summed[-1]
        target_mass = keep + big_k
    loss = torch.where(valid, loss, torch.zeros_like(loss))
    target_mass = torch.as_tensor(target_mass, dtype=lse.dtype, device=lse.device).expand(rows)
    return Rows(loss, lse, target_mass, w_t, (summed[1] - big_m) - log_s), shard


def target_gradient_of(grad_loss, logits, target, weight, rows: Rows, opts: Options, shard: Shard):
    """The backends' shard backward sees the rounded lse, and x'_t - lse ~ 0 of a confident prediction loses
    its bits with it (p_t - 1 with them): the target's rank rewrites that element of each row from the
    unrounded rows.target_shift, as the whole-row kernels do from (m, log s). Returns (the target's column
    [rows, 1], its gradient, the rows whose target is here), taken before the backward may overwrite the
    logits with the gradient. O(rows), no host sync."""
    acc = rows.lse.dtype
    xt, wt, valid, _, here, col = target_terms(logits, target, weight, opts, acc, shard)
    eps = opts.label_smoothing
    keep_w = (1 - eps) * wt
    d = target_gradient(rows.target_shift, rows.k + 2 * opts.z_loss * rows.lse, keep_w) - eps / shard.classes * wt
    if opts.softcap > 0:
        d = d * (1 - (xt / opts.softcap) ** 2)
    return col[:, None], d * grad_loss.to(acc), here & valid
