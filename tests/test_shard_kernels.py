"""The vocabulary-parallel kernels of every backend (Backend.shard_states / shard_backward, the pieces of
fusedce.distributed) against float64 references written here from their definitions (the docstring of
fusedce.backends), and the strong test: a row's columns split into shards, their states merged and their
gradients concatenated, give what the backend's own forward and backward give on the whole row."""
import pytest
import torch

from conftest import device_of
from fusedce import backends
from fusedce.options import Options, Shard
from reference import assert_close

CASES = {
    "plain": {},
    "weight": dict(weight=True),
    "smoothing": dict(label_smoothing=0.1),
    "weight_smoothing": dict(weight=True, label_smoothing=0.3),
    "z_loss": dict(z_loss=1e-2),
    "softcap": dict(softcap=5.0),
    "everything": dict(weight=True, label_smoothing=0.2, z_loss=1e-3, softcap=8.0),
    "soft": dict(soft=True),
    "soft_weight_smoothing": dict(soft=True, weight=True, label_smoothing=0.2, z_loss=1e-3),
}
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# (global classes, this shard's first class, its columns): a single column, unaligned sizes and offsets
SHARDS = [(1000, 333, 333), (1000, 999, 1), (1000, 0, 7), (37, 5, 13), (300, 100, 200)]
IGNORE = -100


def backend_for(name, dtype):
    if name == "torch" and not hasattr(backends.get("torch"), "shard_states"):
        pytest.skip("the pure-torch shard pieces come with fusedce.distributed (pytorch.py)")
    if dtype == torch.float64 and name not in ("cpu", "torch"):
        pytest.skip("float64 logits are a CPU / pure-torch feature")
    return backends.resolve(name, torch.device(device_of(name)), dtype)


def make_inputs(rows, classes, dtype, device, case):
    """Global logits, targets and class weights; class-index targets name every kind of row (see
    shard_targets)."""
    logits = (torch.randn(rows, classes) * 3).to(dtype)
    if case.get("soft"):
        target = torch.softmax(torch.randn(rows, classes) * 2, dim=1).to(dtype)
    else:
        target = torch.randint(0, classes, (rows,))
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    weight = torch.rand(classes, dtype=acc).add(0.5) if case.get("weight") else None
    return logits.to(device), target.to(device), None if weight is None else weight.to(device)


def shard_targets(target, classes, start, width):
    """Class-index targets on the shard's first and last columns, just outside them on both sides, inside,
    far away and ignored, then the random ones."""
    kinds = [start, start + width - 1, start - 1, start + width, start + width // 2, classes - 1, 0, IGNORE]
    kinds = [t for t in kinds if t == IGNORE or 0 <= t < classes]
    out = target.clone()
    out[:len(kinds)] = torch.tensor(kinds, device=target.device)
    return out


def options(case):
    return Options(IGNORE, case.get("label_smoothing", 0.0), case.get("z_loss", 0.0), case.get("softcap", 0.0))


def capped(x, opts):
    return opts.softcap * torch.tanh(x / opts.softcap) if opts.softcap else x


def coefficients(target, weight, opts, classes, columns):
    """c_j of a shard's columns in float64, without the class-index target's own (1 - eps) w_t term."""
    eps = opts.label_smoothing
    if target.is_floating_point():
        c = (1 - eps) * target.double() + eps / classes
    else:
        c = torch.full((target.shape[0], columns), eps / classes, dtype=torch.float64, device=target.device)
    return c * weight.double() if weight is not None else c


def reference_states(logits, target, weight, opts, classes):
    x = capped(logits.double(), opts)
    c = coefficients(target, weight, opts, classes, x.shape[1])
    m = x.amax(1)
    top = x == m[:, None]  # s - 1 as (the count of the max) - 1 + the other terms: no cancellation
    s_less_1 = (top.sum(1) - 1) + torch.where(top, 0, torch.exp(x - m[:, None])).sum(1)
    return torch.stack([m, s_less_1, (c * (x - m[:, None])).sum(1), c.sum(1)], 1)


def target_weight(target, weight, opts):
    """(1 - eps) w_t of class-index targets, 0 for ignored rows."""
    valid = target != IGNORE
    safe = torch.where(valid, target, 0)
    w = weight.double()[safe] if weight is not None else torch.ones(target.shape, dtype=torch.float64,
                                                                      device=target.device)
    return torch.where(valid, (1 - opts.label_smoothing) * w, 0)


def global_lse_and_mass(logits, target, weight, opts):
    """The float64 lse and K of whole rows."""
    states = reference_states(logits, target, weight, opts, logits.shape[1])
    lse = states[:, 0] + torch.log1p(states[:, 1])
    k = states[:, 3] + (0 if target.is_floating_point() else target_weight(target, weight, opts))
    return lse, k


def reference_shard_gradient(grad_loss, logits, target, weight, lse, k, opts, shard):
    """d_j = g ((k + 2 z lse) exp(x'_j - lse) - c_j - (1 - eps) w_t [start + j == t]) dx'/dx, in float64."""
    x = logits.double()
    xc = capped(x, opts)
    lse, k, g = lse.double()[:, None], k.double()[:, None], grad_loss.double()[:, None]
    c = coefficients(target, weight, opts, shard.classes, x.shape[1])
    d = (k + 2 * opts.z_loss * lse) * torch.exp(xc - lse) - c
    if not target.is_floating_point():
        local = target - shard.start
        here = (target != IGNORE) & (local >= 0) & (local < x.shape[1])
        cols = torch.where(here, local, 0)[:, None]
        w_t = weight.double()[cols] if weight is not None else torch.ones_like(cols, dtype=torch.float64)
        d.scatter_add_(1, cols, torch.where(here[:, None], -(1 - opts.label_smoothing) * w_t, 0))
    if opts.softcap:
        d = d * (1 - (xc / opts.softcap) ** 2)
    d = d * g
    return torch.where((target != IGNORE)[:, None], d, 0) if not target.is_floating_point() else d


def shard_of(logits, target, weight, start, width):
    """This shard's columns of the logits, of probability targets and of the weight."""
    stop = start + width
    soft = target.is_floating_point()
    return (logits[:, start:stop], target[:, start:stop] if soft else target,
            None if weight is None else weight[start:stop])


def gradient_scale(expected, rows):
    return max(expected.abs().max().item(), 1.0 / rows)  # rounding is relative to the row's largest terms


def shard_grid(test):
    """Every option, dtype and shard of SHARDS."""
    test = pytest.mark.parametrize("case", list(CASES))(test)
    test = pytest.mark.parametrize("dtype", DTYPES + [torch.float64], ids=str)(test)
    return pytest.mark.parametrize("classes,start,width", SHARDS, ids=lambda v: str(v))(test)


def shard_inputs(backend, classes, start, width, dtype, case, rows):
    """The backend, the options and global inputs of a grid point."""
    kernels = backend_for(backend, dtype)
    logits, target, weight = make_inputs(rows, classes, dtype, device_of(backend), CASES[case])
    if not target.is_floating_point():
        target = shard_targets(target, classes, start, width)
    return kernels, options(CASES[case]), logits, target, weight


@shard_grid
def test_shard_states(backend, classes, start, width, dtype, case):
    kernels, opts, logits, target, weight = shard_inputs(backend, classes, start, width, dtype, case, 9)
    x, t, w = shard_of(logits, target, weight, start, width)
    states = kernels.shard_states(x, t, w, opts, Shard(start, classes))
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    assert states.dtype == acc and states.shape == (9, 4)
    # fp32 accumulation of positive terms (s, k) and of terms of one sign (cx <= 0): a few ulp of fp32
    assert_close(states, reference_states(x, t, w, opts, classes), acc)


def test_shard_states_do_not_read_class_targets(backend):
    """c_j does not depend on a class-index target: any values, ignore_index and out-of-range ids alike."""
    kernels = backend_for(backend, torch.float32)
    opts = options(CASES["weight_smoothing"])
    logits, target, weight = make_inputs(6, 50, torch.float32, device_of(backend), CASES["weight_smoothing"])
    first = kernels.shard_states(logits, target, weight, opts, Shard(10, 200))
    other = torch.tensor([IGNORE, -7, 10**12, 0, 49, 199], device=target.device)
    torch.testing.assert_close(kernels.shard_states(logits, other, weight, opts, Shard(10, 200)), first,
                               rtol=0, atol=0)


@shard_grid
def test_shard_backward(backend, classes, start, width, dtype, case):
    rows = 9
    kernels, opts, logits, target, weight = shard_inputs(backend, classes, start, width, dtype, case, rows)
    lse, k = global_lse_and_mass(logits, target, weight, opts)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    grad_loss = torch.rand(rows, device=logits.device, dtype=acc) + 0.5
    x, t, w = shard_of(logits, target, weight, start, width)
    out = torch.full_like(x, float("nan"))  # poison: every element must be written
    kernels.shard_backward_into(grad_loss, x, t, w, lse.to(acc), k.to(acc), opts, Shard(start, classes), out)
    expected = reference_shard_gradient(grad_loss, x, t, w, lse.to(acc), k.to(acc), opts, Shard(start, classes))
    assert out.dtype == dtype
    assert_close(out, expected, dtype, scale=gradient_scale(expected, rows))
    # the allocating form, with a stride-0 grad_loss (what loss.sum() hands back)
    one = torch.ones((), dtype=acc, device=x.device).expand(rows)
    fresh = kernels.shard_backward(one, x, t, w, lse.to(acc), k.to(acc), opts, Shard(start, classes))
    expected = reference_shard_gradient(one, x, t, w, lse.to(acc), k.to(acc), opts, Shard(start, classes))
    assert_close(fresh, expected, dtype, scale=gradient_scale(expected, rows))


def test_shard_backward_ignored_rows_are_zero(backend):
    """Exact zeros, even where the row holds inf and NaN (as the whole-row backward)."""
    kernels = backend_for(backend, torch.float32)
    opts = options(CASES["everything"])
    logits, target, weight = make_inputs(3, 40, torch.float32, device_of(backend), CASES["everything"])
    logits[:, 3] = float("nan")
    logits[:, 5] = float("inf")
    target = torch.full_like(target, IGNORE)
    lse = torch.full((3,), 2.0, device=logits.device)
    out = torch.full_like(logits, float("nan"))
    kernels.shard_backward_into(torch.ones(3, device=logits.device), logits, target, weight, lse, lse, opts,
                                Shard(40, 80), out)
    assert torch.equal(out, torch.zeros_like(out))


# A row split into consecutive shards (their widths): uneven, a single column, three shards.
SPLITS = [(1000, (333, 333, 334)), (1000, (1, 999)), (7, (3, 1, 3)), (2053, (1024, 1029))]


def merge(states):
    """The shards' states [rows, 4] merged into the whole row's (m, s - 1, cx, k), in float64: the rule the
    online pass applies block after block."""
    st = torch.stack([s.double() for s in states])
    m = st[..., 0].amax(0)
    shift = st[..., 0] - m
    e = torch.exp(shift)
    return (m, (st[..., 1] * e).sum(0) + (e.sum(0) - 1), (st[..., 2] + st[..., 3] * shift).sum(0),
            st[..., 3].sum(0))


def loss_of_merged(logits, target, weight, opts, merged):
    """loss, lse and K of whole rows from their merged state (the formulas of fusedce.distributed)."""
    m, s_less_1, cx, k = merged
    log_s = torch.log1p(s_less_1)
    lse = m + log_s
    loss = k * log_s - cx + opts.z_loss * lse * lse
    if target.is_floating_point():
        return loss, lse, k
    valid = target != IGNORE
    keep_w = target_weight(target, weight, opts)
    x_t = capped(logits.double().gather(1, torch.where(valid, target, 0)[:, None])[:, 0], opts)
    loss = torch.where(valid, loss + keep_w * ((m - x_t) + log_s), 0)
    return loss, lse, k + keep_w


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("dtype", DTYPES + [torch.float64], ids=str)
@pytest.mark.parametrize("classes,widths", SPLITS, ids=lambda v: str(v))
def test_shards_reproduce_the_whole_row(backend, classes, widths, dtype, case):
    kernels = backend_for(backend, dtype)
    opts = options(CASES[case])
    rows = 8
    logits, target, weight = make_inputs(rows, classes, dtype, device_of(backend), CASES[case])
    starts = [sum(widths[:i]) for i in range(len(widths))]
    if not target.is_floating_point():  # every shard's boundaries, and an ignored row
        target[:4] = torch.tensor([starts[1] - 1, starts[1], starts[-1], IGNORE], device=target.device)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    states = [kernels.shard_states(*shard_of(logits, target, weight, a, n), opts, Shard(a, classes))
              for a, n in zip(starts, widths)]
    loss, lse, k = loss_of_merged(logits, target, weight, opts, merge(states))
    whole_loss, whole_lse = kernels.forward(logits, target, weight, opts)
    # both in the accumulation dtype, each a few ulp from the truth
    assert_close(lse, whole_lse, acc, scale=whole_lse.abs().max().item())
    assert_close(loss, whole_loss, acc, scale=max(1.0, whole_loss.abs().max().item()))

    grad_loss = torch.rand(rows, dtype=acc, device=logits.device)
    parts = [kernels.shard_backward(grad_loss, *shard_of(logits, target, weight, a, n), whole_lse, k.to(acc), opts,
                                    Shard(a, classes)) for a, n in zip(starts, widths)]
    whole = kernels.backward(grad_loss, logits, target, weight, whole_lse, opts)
    assert_close(torch.cat(parts, 1), whole, dtype, scale=gradient_scale(whole.double(), rows))


def test_cpu_rows_spread_over_threads():
    """The CPU kernels' row pool: enough work for several threads gives what one thread gives, bit for bit
    (each row is one thread's), and the reference's values."""
    kernels = backend_for("cpu", torch.float32)
    case = CASES["everything"]
    opts, shard = options(case), Shard(1000, 9000)
    logits, target, weight = make_inputs(512, 9000, torch.float32, "cpu", case)
    x, t, w = shard_of(logits, target, weight, 1000, 5000)
    lse, k = global_lse_and_mass(logits, target, weight, opts)
    grad_loss = torch.rand(512)
    threads = torch.get_num_threads()
    try:
        results = []
        for n in (1, 4):
            torch.set_num_threads(n)
            results.append((kernels.shard_states(x, t, w, opts, shard),
                            kernels.shard_backward(grad_loss, x, t, w, lse.float(), k.float(), opts, shard)))
    finally:
        torch.set_num_threads(threads)
    for one, many in zip(*results):
        assert torch.equal(one, many)
    assert_close(results[1][0], reference_states(x, t, w, opts, 9000), torch.float32)
    expected = reference_shard_gradient(grad_loss, x, t, w, lse.float(), k.float(), opts, shard)
    assert_close(results[1][1], expected, torch.float32, scale=gradient_scale(expected, 512))
