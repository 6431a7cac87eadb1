"""The grid of vocabulary-parallel cases that tests/test_distributed.py runs inside each spawned world
(one spawn per world size): every rank builds the same full problem from a seed, takes its shard,
and checks the vocab-parallel loss, lse and its shard's gradient against float64 on the gathered
logits. Each case's outcome (ok, or the traceback) is written per rank to a JSON file."""
from __future__ import annotations

import json
import os
import traceback

import torch
import torch.distributed as dist

# V = 1000 split unevenly; the world of 4 has a rank with a single class
SPLITS = {1: [1000], 2: [333, 667], 3: [333, 333, 334], 4: [1, 333, 333, 333]}
TINY_SPLITS = {1: [13], 2: [6, 7], 3: [4, 4, 5], 4: [1, 4, 4, 4]}  # Triton's interpreter: tiny shapes
ROWS, TINY_ROWS = 24, 6

OPTIONS = {
    "plain": {},
    "weight": dict(weight=True),
    "smoothing": dict(label_smoothing=0.1),
    "smoothing_weight": dict(label_smoothing=0.1, weight=True),
    "z_loss": dict(z_loss=1e-2),
    "softcap": dict(softcap=5.0),
    "all_options": dict(weight=True, label_smoothing=0.2, z_loss=1e-2, softcap=5.0),
    "probs": dict(soft=True),
    "probs_smoothing_weight": dict(soft=True, label_smoothing=0.2, weight=True),
    "all_ignored": dict(all_ignored=True),
    "all_ignored_weight": dict(all_ignored=True, weight=True),
    "confident": dict(confident=True),  # loss ~1e-12..1e-5: the combine must keep S - 1 (issue 15)
}
# Relative error (loss, gradient) per element against confident_reference: what fusedce.cross_entropy
# reaches on the gathered logits, fused (measured on the cpu and torch backends, 5 seeds of [24, 1000]: fp32
# 7.3e-7 and 2.9e-6; bf16 3.4e-3 and 7.9e-3, the output's rounding and the upstream gradient's)
CONFIDENT_RTOL = {"float32": (1e-6, 4e-6), "bfloat16": (4e-3, 8e-3)}


def backends_to_run():
    """The backends whose shard primitives exist here (the compiled ones once they implement them)."""
    from fusedce import backends
    names = []
    for name in ("torch", "cpu", "triton"):
        try:
            b = backends.resolve(name, torch.device("cpu"))
        except RuntimeError:
            continue
        if callable(getattr(b, "shard_states", None)):
            names.append(name)
    return names


def loss_cases(backend_names):
    """(id, spec) of every loss case, the same list in the parent and in each rank."""
    out = []
    for backend in backend_names:
        tiny = backend == "triton"
        for option, spec in OPTIONS.items():
            if tiny and option not in ("plain", "all_options", "probs_smoothing_weight", "confident"):
                continue
            for reduction in ("mean", "sum", "none"):
                for dtype in ("float32", "bfloat16"):
                    for fused in ((None, False) if reduction != "none" else (False,)):
                        if tiny and (dtype == "bfloat16" or fused is False and reduction != "none"):
                            continue
                        case = dict(spec, backend=backend, reduction=reduction, dtype=dtype, fused=fused, tiny=tiny)
                        out.append((f"{backend}-{option}-{reduction}-{dtype}-{'auto' if fused is None else 'unfused'}",
                                    case))
    return out


def _targets(rows, sizes, generator, spec):
    """Class indices with targets on every shard boundary (a shard's first and last class) and ignored rows."""
    classes = sum(sizes)
    target = torch.randint(0, classes, (rows,), generator=generator)
    bounds = []
    start = 0
    for size in sizes:
        bounds += [start, start + size - 1]
        start += size
    target[:len(bounds)] = torch.tensor(bounds[:rows])
    target[-1] = -100
    if spec.get("all_ignored"):
        target[:] = -100
    return target


def problem(world, spec, seed=0):
    """The full problem: logits [rows, V] (rounded to the dtype), target, weight [V] or None, sizes."""
    sizes = (TINY_SPLITS if spec.get("tiny") else SPLITS)[world]
    rows = TINY_ROWS if spec.get("tiny") else ROWS
    g = torch.Generator().manual_seed(seed)
    classes = sum(sizes)
    dtype = getattr(torch, spec.get("dtype", "float32"))
    logits = 3 * torch.randn(rows, classes, generator=g)
    if spec.get("soft"):
        target = torch.softmax(2 * torch.randn(rows, classes, generator=g), 1)
    else:
        target = _targets(rows, sizes, g, spec)
    if spec.get("confident"):  # p(target) ~ 1 - 1e-12..1e-5
        valid = (target != -100).nonzero()[:, 0]
        logits[valid, target[valid]] += 30
    logits = logits.to(dtype)
    weight = torch.rand(classes, generator=g) + 0.5 if spec.get("weight") else None
    return logits, target, weight, sizes


def shard_of(t, sizes, rank, dim=-1):
    start = sum(sizes[:rank])
    return t.narrow(dim, start, sizes[rank])


def confident_reference(x, target, reduction):
    """The float64 loss of class indices as log1p(sum_{j != t} exp(x_j - x_t)): torch's logsumexp - x_t keeps
    only ~1e-16 absolute, 1e-4 of a 1e-12 loss."""
    valid = target != -100
    t = torch.where(valid, target, 0)[:, None]
    d = (x - x.gather(1, t)).scatter(1, t, -torch.inf)
    loss = torch.where(valid, torch.log1p(torch.exp(d).sum(1)), 0)
    return loss if reduction == "none" else loss.sum() if reduction == "sum" else loss.sum() / valid.sum()


def assert_relative(actual, expected, rtol, what):
    err = (actual.double() - expected).abs()
    worst = (err / expected.abs()).nan_to_num(0).max().item()
    assert (err <= rtol * expected.abs()).all(), f"{what}: relative error {worst:.2e} > {rtol:.1e}"


def check_loss_case(rank, world, spec):
    import fusedce.distributed as fd
    from reference import assert_close, reference_loss, to64
    logits, target, weight, sizes = problem(world, spec)
    options = dict(label_smoothing=spec.get("label_smoothing", 0.0), z_loss=spec.get("z_loss", 0.0),
                   softcap=spec.get("softcap"))
    soft = target.is_floating_point()
    mine = shard_of(logits, sizes, rank).clone().requires_grad_()
    args = (mine, shard_of(target, sizes, rank) if soft else target,
            None if weight is None else shard_of(weight, sizes, rank))
    kwargs = dict(reduction=spec["reduction"], backend=spec["backend"], **options)
    if spec["fused"] is False:  # the per-row Function, with the lse
        loss, lse = fd.vocab_parallel_cross_entropy(*args, fused=False, return_lse=True, **kwargs)
    else:
        loss, lse = fd.vocab_parallel_cross_entropy(*args, **kwargs), None
    full = to64(logits).requires_grad_()
    if spec.get("confident"):
        ref = confident_reference(full, target, spec["reduction"])
    else:
        ref = reference_loss(full, to64(target), weight=to64(weight), reduction=spec["reduction"], **options)
    expected = torch.promote_types(logits.dtype, target.dtype) if soft else logits.dtype  # torch's dtype
    assert loss.dtype == expected and loss.shape == ref.shape, (loss.dtype, loss.shape, ref.shape)
    assert_close(loss, ref, loss.dtype, scale=max(ref.abs().nan_to_num(0).max().item(), 1.0))
    if lse is not None:
        x = options["softcap"] * torch.tanh(full / options["softcap"]) if options["softcap"] else full
        assert_close(lse, torch.logsumexp(x, 1).detach(), torch.float32, scale=20.0)
    upstream = torch.rand(ref.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    (got,) = torch.autograd.grad(loss, mine, upstream.to(loss.dtype))
    (want,) = torch.autograd.grad(ref, full, upstream)
    want = shard_of(want, sizes, rank)
    if spec.get("confident"):
        loss_rtol, grad_rtol = CONFIDENT_RTOL[spec["dtype"]]
        assert_relative(loss, ref, loss_rtol, "loss")
        assert_relative(got, want, grad_rtol, "gradient")
    assert_close(got, want, logits.dtype, scale=max(want.abs().nan_to_num(0).max().item(), 1e-30))


LINEAR_OPTIONS = {
    "plain": {},
    "smoothing_weight": dict(label_smoothing=0.1, weight=True),
    "z_loss_softcap": dict(z_loss=1e-2, softcap=5.0),
    "probs": dict(soft=True, label_smoothing=0.2),
}


def linear_cases():
    return [(f"linear-{option}-{reduction}", dict(spec, reduction=reduction))
            for option, spec in LINEAR_OPTIONS.items() for reduction in ("mean", "sum", "none")]


def check_linear_case(rank, world, spec):
    """Loss, grad_input, and this rank's grad_weight and grad_bias against float64 on the whole head."""
    import fusedce.distributed as fd
    from reference import assert_close, reference_loss, to64
    _, target, class_weight, sizes = problem(world, spec)
    g = torch.Generator().manual_seed(2)
    tokens, hidden = target.shape[0], 16
    x = torch.randn(tokens, hidden, generator=g)
    w = torch.randn(sum(sizes), hidden, generator=g) / hidden ** 0.5
    b = torch.randn(sum(sizes), generator=g)
    options = dict(label_smoothing=spec.get("label_smoothing", 0.0), z_loss=spec.get("z_loss", 0.0),
                   softcap=spec.get("softcap"))
    soft = target.is_floating_point()
    leaves = [x.clone().requires_grad_(), shard_of(w, sizes, rank, 0).clone().requires_grad_(),
              shard_of(b, sizes, rank).clone().requires_grad_()]
    loss = fd.vocab_parallel_linear_cross_entropy(
        leaves[0], leaves[1], shard_of(target, sizes, rank) if soft else target, leaves[2], chunk_size=7,
        class_weight=None if class_weight is None else shard_of(class_weight, sizes, rank),
        reduction=spec["reduction"], backend="torch", **options)
    full = [to64(t).requires_grad_() for t in (x, w, b)]
    ref = reference_loss(full[0] @ full[1].t() + full[2], to64(target), weight=to64(class_weight),
                         reduction=spec["reduction"], **options)
    assert_close(loss, ref, torch.float32, scale=max(ref.abs().max().item(), 1.0))
    upstream = torch.rand(ref.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    got = torch.autograd.grad(loss, leaves, upstream.float())
    want = torch.autograd.grad(ref, full, upstream)
    want = (want[0], shard_of(want[1], sizes, rank, 0), shard_of(want[2], sizes, rank))
    for a, e in zip(got, want):
        assert_close(a, e, torch.float32, scale=max(e.abs().max().item(), 1e-30))


DTENSOR_CASES = ["dtensor-2d-mean", "dtensor-2d-weight-sum", "dtensor-3d-none", "dtensor-replicated-raises"]


def check_dtensor_case(rank, world, name):
    """fusedce.cross_entropy on a class-sharded DTensor against torch's loss_parallel: loss and local gradient."""
    import torch.nn.functional as F
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor
    from torch.distributed.tensor.parallel import loss_parallel

    import fusedce
    from reference import assert_close
    mesh = init_device_mesh("cpu", (world,))
    logits, target, weight, _ = problem(world, {})
    weight = weight if "weight" in name else None
    reduction = name.rsplit("-", 1)[1]
    if "3d" in name:  # [N, C, d]: the classes in dim 1
        logits = logits.reshape(4, -1, logits.shape[1]).transpose(1, 2).contiguous()
        target = target.reshape(4, -1)
    if name.endswith("raises"):
        try:
            fusedce.cross_entropy(distribute_tensor(logits, mesh, [Replicate()]), target)
        except Exception as e:  # noqa: BLE001
            assert "redistribute" in str(e), str(e)
            return
        raise AssertionError("a replicated DTensor did not raise")
    ours = distribute_tensor(logits, mesh, [Shard(1)]).requires_grad_()
    theirs = distribute_tensor(logits, mesh, [Shard(1)]).requires_grad_()
    loss = fusedce.cross_entropy(ours, target, weight, reduction=reduction, backend="torch")
    with loss_parallel():
        expected = F.cross_entropy(theirs, target, weight, reduction=reduction)
        expected.backward(torch.ones_like(expected))
    loss.backward(torch.ones_like(loss))
    assert loss.placements == expected.placements, (loss.placements, expected.placements)
    assert_close(loss.full_tensor(), expected.full_tensor(), torch.float32)
    assert ours.grad.placements == theirs.grad.placements
    assert_close(ours.grad.to_local(), theirs.grad.to_local(), torch.float32)


def error_cases():
    return ["weight_size_on_one_rank", "overlapping_vocab_start", "vocab_start_on_some_ranks",
            "target_out_of_range", "targets_differ", "probs_shape_on_one_rank"]


def check_error_case(rank, world, name):
    """Every rank must raise; returns the exception's type name and message."""
    import fusedce.distributed as fd
    logits, target, weight, sizes = problem(world, {})
    mine = shard_of(logits, sizes, rank)
    kwargs = {}
    if name == "weight_size_on_one_rank":
        kwargs["weight"] = torch.ones(sizes[rank] + (rank == world - 1))
    elif name == "overlapping_vocab_start":
        kwargs["vocab_start"] = max(sum(sizes[:rank]) - 1, 0)
    elif name == "vocab_start_on_some_ranks":
        kwargs["vocab_start"] = sum(sizes[:rank]) if rank == 0 else None
    elif name == "target_out_of_range":
        target[3] = sum(sizes)
    elif name == "targets_differ":
        target[2] = (target[2] + rank) % sum(sizes)
    elif name == "probs_shape_on_one_rank":
        target = torch.softmax(torch.randn(logits.shape[0], sizes[rank] + (rank == 0)), 1)
    try:
        fd.vocab_parallel_cross_entropy(mine, target, backend="torch", **kwargs)
    except Exception as e:  # noqa: BLE001  (the test compares what each rank raised)
        return type(e).__name__, str(e)
    return None, "no error"


def check_sync_free(rank, world):
    """The GPU's mode, forced on the CPU: the layout read once, then checked on the device; a call whose
    targets differ across ranks gives NaN on every rank instead of an error. Returns the three losses
    and the float64 reference."""
    import fusedce.distributed as fd
    from fusedce.distributed import combine
    from reference import reference_loss, to64
    original, combine.reads_layout = combine.reads_layout, lambda device: False
    try:
        logits, target, _, sizes = problem(world, {})
        mine = shard_of(logits, sizes, rank)
        differ = target.clone()
        differ[2] = (differ[2] + rank) % sum(sizes)
        losses = [fd.vocab_parallel_cross_entropy(mine, t, backend="torch").item() for t in (target, target, differ)]
        return losses + [reference_loss(to64(logits), target).item()]
    finally:
        combine.reads_layout = original
        combine._LAYOUTS.clear()


def run(rank, world, port, out_dir, case_ids):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    results = {}
    try:
        wanted = set(case_ids)
        for case_id, spec in loss_cases(backends_to_run()):
            if case_id in wanted:
                try:
                    check_loss_case(rank, world, spec)
                    results[case_id] = "ok"
                except Exception:  # noqa: BLE001  (reported by the parent's test of this case)
                    results[case_id] = traceback.format_exc()
        for case_id, spec in linear_cases():
            try:
                check_linear_case(rank, world, spec)
                results[case_id] = "ok"
            except Exception:  # noqa: BLE001
                results[case_id] = traceback.format_exc()
        for name in DTENSOR_CASES:
            try:
                check_dtensor_case(rank, world, name)
                results[name] = "ok"
            except Exception:  # noqa: BLE001
                results[name] = traceback.format_exc()
        results["sync_free"] = check_sync_free(rank, world)
        for name in error_cases():
            results["error-" + name] = check_error_case(rank, world, name)
    finally:
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
            json.dump(results, f)
        dist.destroy_process_group()
