"""The shared correctness grid: every backend against torch in float64, values and gradients."""
import pytest
import torch

import fusedce
from conftest import device_of
from reference import assert_close, reference_loss, to64

# Unaligned sizes beside the real ones; small row counts keep the float64 reference cheap.
SHAPES = [(1, 1), (3, 7), (5, 1000), (2, 32003), (2, 128256)]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
CASES = {
    "plain": {},
    "ignore_some": dict(ignore=0.5),
    "all_ignored": dict(ignore=1.0),
    "weight": dict(weight=True),
    "smoothing": dict(label_smoothing=0.1),
    "weight_smoothing_ignore": dict(weight=True, label_smoothing=0.3, ignore=0.3),
    "soft": dict(soft=True),
    "soft_weight_smoothing": dict(soft=True, weight=True, label_smoothing=0.2),
}


def make_inputs(rows, vocab, dtype, device, case, ignore_index=-100):
    logits = (torch.randn(rows, vocab) * 3).to(dtype).to(device)
    if case.get("soft"):
        target = torch.softmax(torch.randn(rows, vocab), dim=1).to(dtype).to(device)
    else:
        target = torch.randint(0, vocab, (rows,))
        target[torch.rand(rows) < case.get("ignore", 0.0)] = ignore_index
        target = target.to(device)
    weight = torch.rand(vocab).add(0.5).to(dtype).to(device) if case.get("weight") else None
    return logits, target, weight


def check_against_reference(backend, logits, target, weight, dtype, **kwargs):
    """Loss ("none" and "mean"), per-row-grad and stride-0-grad gradients vs float64."""
    x = logits.clone().requires_grad_()
    x64 = to64(logits).requires_grad_()
    grad_rows = torch.rand(target.shape[0], device=logits.device)
    for reduction in ("none", "mean", "sum"):
        loss = fusedce.cross_entropy(x, target, weight, reduction=reduction, backend=backend, **kwargs)
        ref = reference_loss(x64, to64(target), to64(weight), reduction=reduction, **kwargs)
        assert loss.dtype == (torch.result_type(logits, target) if target.is_floating_point() else dtype)
        assert loss.shape == ref.shape
        assert_close(loss, ref, dtype, scale=max(1.0, ref.detach().abs().max().item() if ref.numel() else 1.0))
        # "none" gets a per-row grad_output; "mean"/"sum" hand back a stride-0 one
        upstream = grad_rows.to(loss.dtype) if reduction == "none" else None
        (g,) = torch.autograd.grad(loss, x, upstream)
        (g64,) = torch.autograd.grad(ref, x64, None if upstream is None else upstream.double())
        assert g.dtype == dtype and g.shape == logits.shape
        # rounding is relative to the terms that cancel (p_j K vs c_j), about the upstream grad per row
        floor = 1.0 / max(target.shape[0], 1)
        assert_close(g, g64, dtype, scale=max(g64.abs().max().item() if g64.numel() else 0.0, floor))


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_matches_torch(backend, shape, dtype, case):
    logits, target, weight = make_inputs(*shape, dtype, device_of(backend), CASES[case])
    kwargs = {k: v for k, v in CASES[case].items() if k == "label_smoothing"}
    check_against_reference(backend, logits, target, weight, dtype, **kwargs)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_float64_and_float32_exact(backend, dtype):
    if backend != "cpu" and backend != "torch" and dtype == torch.float64:
        pytest.skip("fp64 logits are a CPU / pure-torch feature")
    logits, target, weight = make_inputs(6, 333, dtype, device_of(backend), CASES["weight_smoothing_ignore"])
    check_against_reference(backend, logits, target, weight, dtype, label_smoothing=0.3)


@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
def test_spatial_dims(backend, reduction):
    """(N, C, d1, d2) inputs: the class dim is moved last inside; results match torch's layout."""
    device = device_of(backend)
    logits = torch.randn(2, 11, 3, 4, device=device)
    for target in (torch.randint(0, 11, (2, 3, 4), device=device),
                   torch.softmax(torch.randn(2, 11, 3, 4, device=device), 1)):
        x, x64 = logits.clone().requires_grad_(), to64(logits).requires_grad_()
        loss = fusedce.cross_entropy(x, target, reduction=reduction, backend=backend)
        ref = reference_loss(x64, to64(target), reduction=reduction)
        assert loss.shape == ref.shape
        assert_close(loss, ref, torch.float32)
        assert_close(torch.autograd.grad(loss.sum(), x)[0], torch.autograd.grad(ref.sum(), x64)[0], torch.float32)


def test_unbatched_input(backend):
    device = device_of(backend)
    logits, target = torch.randn(9, device=device), torch.tensor(4, device=device)
    for reduction in ("none", "mean"):
        x, x64 = logits.clone().requires_grad_(), to64(logits).requires_grad_()
        loss = fusedce.cross_entropy(x, target, reduction=reduction, backend=backend)
        ref = reference_loss(x64, target, reduction=reduction)
        assert loss.shape == () and ref.shape == ()
        assert_close(loss, ref, torch.float32)
        assert_close(torch.autograd.grad(loss, x)[0], torch.autograd.grad(ref, x64)[0], torch.float32)


def test_non_contiguous_inputs(backend):
    device = device_of(backend)
    base = torch.randn(8, 300, device=device)
    cases = [base[::2], base[:, 50:250], base.t().contiguous().t()]  # row stride, sliced rows, class stride
    target_base = torch.randint(0, 200, (16,), device=device)
    for logits in cases:
        target = target_base[::2][: logits.shape[0]] % logits.shape[1]
        x, x64 = logits.clone().requires_grad_(), to64(logits).requires_grad_()
        loss = fusedce.cross_entropy(logits, target, backend=backend)  # the view itself
        assert_close(loss, reference_loss(x64, target), torch.float32)
        loss = fusedce.cross_entropy(x, target, reduction="none", backend=backend)
        ref = reference_loss(x64, target, reduction="none")
        assert_close(torch.autograd.grad(loss.sum(), x)[0], torch.autograd.grad(ref.sum(), x64)[0], torch.float32)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_extreme_logits(backend, dtype):
    """Huge spreads (+-1e4) and -inf masked classes stay finite where torch's float64 result is."""
    device = device_of(backend)
    spread = 1e3 if dtype == torch.float16 else 1e4  # the fp16 loss sum must stay below 65504
    logits = torch.randn(6, 2000) * spread
    logits[:, 1500:] = float("-inf")  # masked classes
    target = torch.randint(0, 1500, (6,))
    logits = logits.to(dtype).to(device)
    target = target.to(device)
    check_against_reference(backend, logits, target, None, dtype)


def test_nan_and_inf_propagate_like_torch(backend):
    device = device_of(backend)
    logits = torch.randn(4, 50)
    logits[0, 3] = float("nan")
    logits[1, 7] = float("inf")
    logits[2, :] = float("-inf")
    logits = logits.to(device)
    target = torch.tensor([1, 2, 3, 4], device=device)
    loss = fusedce.cross_entropy(logits, target, reduction="none", backend=backend)
    ref = torch.nn.functional.cross_entropy(logits.double(), target, reduction="none")
    assert torch.equal(loss.isnan(), ref.isnan()), (loss, ref)
    assert_close(loss[3], ref[3], torch.float32)


def test_fp16_label_smoothing_is_exact(backend):
    """torch overflows to inf here on the CPU (it sums fp16 log-probabilities in fp16); fusedce
    accumulates in fp32 and returns the float64 answer rounded to fp16."""
    device = device_of(backend)
    logits = (torch.randn(4, 32000) * 8).half().to(device)
    target = torch.randint(0, 32000, (4,), device=device)
    loss = fusedce.cross_entropy(logits, target, label_smoothing=0.1, reduction="sum", backend=backend)
    ref = reference_loss(logits.double(), target, label_smoothing=0.1, reduction="sum")
    assert torch.isfinite(loss)
    assert_close(loss, ref, torch.float16, scale=ref.abs().item())


@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
def test_empty_batch(backend, reduction):
    device = device_of(backend)
    logits = torch.randn(0, 10, device=device, requires_grad=True)
    target = torch.zeros(0, dtype=torch.long, device=device)
    loss = fusedce.cross_entropy(logits, target, reduction=reduction, backend=backend)
    ref = torch.nn.functional.cross_entropy(logits.detach(), target, reduction=reduction)
    assert loss.shape == ref.shape
    assert torch.equal(loss.isnan(), ref.isnan())
    loss.sum().backward()
    assert logits.grad.shape == (0, 10)


def test_deprecated_size_average_and_reduce(backend):
    device = device_of(backend)
    logits, target = torch.randn(5, 8, device=device), torch.randint(0, 8, (5,), device=device)
    for size_average, reduce in [(False, None), (None, False), (True, True)]:
        with pytest.warns(UserWarning):
            ref = torch.nn.functional.cross_entropy(logits, target, size_average=size_average, reduce=reduce)
        with pytest.warns(UserWarning):
            out = fusedce.cross_entropy(logits, target, size_average=size_average, reduce=reduce, backend=backend)
        assert out.shape == ref.shape
        assert_close(out, ref, torch.float32)


def test_uint8_targets(backend):
    device = device_of(backend)
    logits, target = torch.randn(5, 8, device=device), torch.randint(0, 8, (5,), device=device)
    assert_close(fusedce.cross_entropy(logits, target.to(torch.uint8), backend=backend),
                 reference_loss(logits.double(), target), torch.float32)


def test_module_matches_functional(backend):
    device = device_of(backend)
    weight = torch.rand(12, device=device)
    crit = fusedce.CrossEntropyLoss(weight=weight, ignore_index=3, label_smoothing=0.1, backend=backend)
    ref = torch.nn.CrossEntropyLoss(weight=weight.double(), ignore_index=3, label_smoothing=0.1)
    logits, target = torch.randn(7, 12, device=device), torch.randint(0, 12, (7,), device=device)
    assert_close(crit(logits, target), ref(logits.double(), target), torch.float32)
    assert "weight" in dict(crit.named_buffers())


def test_confident_predictions_keep_their_precision(backend):
    """p(target) ~ 1 - 1e-6: a naive fp32 sum rounds the off-target terms away against the target's 1,
    and p_t - 1 cancels. The kernels keep both to fp32 precision (loss, and the fused-mode gradient)."""
    device = device_of(backend)
    logits = torch.randn(4, 32003)
    target = torch.randint(0, 32003, (4,))
    logits[torch.arange(4), target] += 25.0
    logits, target = logits.to(device), target.to(device)
    x64 = to64(logits).requires_grad_()
    ref = torch.nn.functional.cross_entropy(x64, target, reduction="none")
    assert ref.max() < 1e-5
    loss = fusedce.cross_entropy(logits, target, reduction="none", backend=backend)
    torch.testing.assert_close(loss.double(), ref.detach(), rtol=1e-5, atol=0)
    x = logits.clone().requires_grad_()
    fusedce.cross_entropy(x, target, reduction="sum", fused=True, backend=backend).backward()
    ref.sum().backward()
    rows = torch.arange(4, device=device)
    torch.testing.assert_close(x.grad[rows, target].double(), x64.grad[rows, target], rtol=1e-5, atol=0)
    assert_close(x.grad, x64.grad, torch.float32, scale=x64.grad.abs().max().item())


def test_negative_class_weights(backend):
    """Negative weights (torch allows them) make the sum of the coefficients negative; the running
    smoothing sum must still follow the max from block to block (32003 columns: several blocks)."""
    device = device_of(backend)
    logits = torch.randn(3, 32003)
    logits[:, 20000] += 30  # the max arrives in a later block
    weight = -torch.rand(32003)
    target = torch.randint(0, 32003, (3,))
    logits, weight, target = logits.to(device), weight.to(device), target.to(device)
    for reduction in ("none", "sum"):
        loss = fusedce.cross_entropy(logits, target, weight, label_smoothing=0.1, reduction=reduction,
                                     backend=backend)
        ref = reference_loss(logits.double(), target, weight.double(), label_smoothing=0.1, reduction=reduction)
        assert_close(loss, ref, torch.float32, scale=ref.abs().max().item())
