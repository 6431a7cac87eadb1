"""The LLM-training extras: z_loss, softcap, return_lse (and gradients through lse)."""
import pytest
import torch

import fusedce
from conftest import device_of
from reference import assert_close, reference_loss, to64


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("options", [
    dict(z_loss=1e-3), dict(softcap=5.0), dict(z_loss=0.1, softcap=3.0, label_smoothing=0.1),
], ids=["z_loss", "softcap", "all"])
@pytest.mark.parametrize("soft", [False, True], ids=["index", "probs"])
def test_extras_match_reference(backend, dtype, options, soft):
    device = device_of(backend)
    logits = (torch.randn(6, 1003) * 4).to(dtype).to(device)
    if soft:
        target = torch.softmax(torch.randn(6, 1003), 1).to(dtype).to(device)
    else:
        target = torch.randint(0, 1003, (6,))
        target[1] = -100
        target = target.to(device)
    for reduction in ("none", "mean"):
        x, x64 = logits.clone().requires_grad_(), to64(logits).requires_grad_()
        loss = fusedce.cross_entropy(x, target, reduction=reduction, backend=backend, **options)
        ref = reference_loss(x64, to64(target), reduction=reduction, **options)
        assert_close(loss, ref, dtype, scale=ref.abs().max().item())
        (g,) = torch.autograd.grad(loss.sum(), x)
        (g64,) = torch.autograd.grad(ref.sum(), x64)
        assert_close(g, g64, dtype, scale=g64.abs().max().item())


def test_z_loss_changes_the_loss(backend):
    """Guards the reference itself: a z-loss that did nothing would pass the comparison above."""
    device = device_of(backend)
    logits, target = torch.randn(4, 50, device=device) + 3, torch.randint(0, 50, (4,), device=device)
    plain = fusedce.cross_entropy(logits, target, backend=backend)
    with_z = fusedce.cross_entropy(logits, target, z_loss=0.5, backend=backend)
    lse = torch.logsumexp(logits.double(), 1)
    assert_close(with_z - plain, 0.5 * (lse ** 2).mean(), torch.float32)


@pytest.mark.parametrize("softcap", [None, 2.0])
def test_return_lse_and_its_gradient(backend, softcap):
    device = device_of(backend)
    logits, target = torch.randn(2, 3, 40, device=device), torch.randint(0, 3, (2, 40), device=device)
    x, x64 = logits.clone().requires_grad_(), to64(logits).requires_grad_()
    loss, lse = fusedce.cross_entropy(x, target, return_lse=True, softcap=softcap, backend=backend)
    capped = softcap * torch.tanh(x64 / softcap) if softcap else x64
    ref_lse = torch.logsumexp(capped, dim=1)
    assert lse.shape == (2, 40) and lse.dtype == torch.float32
    assert_close(lse, ref_lse, torch.float32)
    # a loss that uses lse directly must get its gradient (softmax) too
    (g,) = torch.autograd.grad(loss + (lse ** 2).sum(), x)
    ref = reference_loss(x64, target, softcap=softcap)
    (g64,) = torch.autograd.grad(ref + (ref_lse ** 2).sum(), x64)
    assert_close(g, g64, torch.float32, scale=g64.abs().max().item())


def test_soft_target_gradient(backend):
    device = device_of(backend)
    logits = torch.randn(5, 30, device=device)
    target = torch.softmax(torch.randn(5, 30, device=device), 1).requires_grad_()
    weight = torch.rand(30, device=device)
    loss = fusedce.cross_entropy(logits, target, weight=weight, label_smoothing=0.2, backend=backend)
    t64 = to64(target).requires_grad_()
    ref = reference_loss(logits.double(), t64, weight.double(), label_smoothing=0.2)
    assert_close(torch.autograd.grad(loss, target)[0], torch.autograd.grad(ref, t64)[0], torch.float32)
