"""fusedce.linear_cross_entropy against float64: loss and the gradients of input, weight and bias."""
import pytest
import torch

import fusedce
from conftest import device_of
from reference import assert_close, reference_loss, to64


def make(tokens, hidden, vocab, device, dtype=torch.float32, bias=True):
    x = torch.randn(tokens, hidden, device=device).to(dtype)
    w = (torch.randn(vocab, hidden, device=device) / hidden ** 0.5).to(dtype)
    b = torch.randn(vocab, device=device).to(dtype) if bias else None
    return x, w, b


def grads_of(loss, tensors, upstream=None):
    wanted = [t for t in tensors if t is not None and t.requires_grad]
    return torch.autograd.grad(loss, wanted, upstream)


def reference(x, w, b, target, **kwargs):
    """float64 loss of the materialised logits, and the float64 leaves it differentiates."""
    leaves = [to64(t).requires_grad_(t.requires_grad) if t is not None else None for t in (x, w, b)]
    logits = leaves[0] @ leaves[1].t() + (leaves[2] if leaves[2] is not None else 0)
    return reference_loss(logits, to64(target), **kwargs), leaves


CASES = {
    "plain": {},
    "ignore_smoothing": dict(ignore=True, label_smoothing=0.1),
    "class_weight": dict(class_weight=True),
    "z_loss_softcap": dict(z_loss=1e-3, softcap=8.0),
    "probs": dict(soft=True, label_smoothing=0.2),
}


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("case", list(CASES))
def test_matches_materialised_logits(backend, case, reduction):
    device = device_of(backend)
    opts = dict(CASES[case])
    x, w, b = make(37, 24, 301, device)
    for t in (x, w, b):
        t.requires_grad_()
    if opts.pop("soft", False):
        target = torch.softmax(torch.randn(37, 301, device=device), 1)
    else:
        target = torch.randint(0, 301, (37,), device=device)
        if opts.pop("ignore", False):
            target[::5] = -100
    cw = torch.rand(301, device=device) + 0.5 if opts.pop("class_weight", False) else None
    loss = fusedce.linear_cross_entropy(x, w, target, b, class_weight=cw, reduction=reduction, chunk_size=8,
                                        backend=backend, **opts)
    ref, leaves = reference(x, w, b, target, weight=to64(cw), reduction=reduction, **opts)
    assert loss.shape == ref.shape
    assert_close(loss, ref, torch.float32, scale=ref.abs().max().item())
    upstream = torch.rand(37, device=device) if reduction == "none" else None  # per-token grad_output
    got = grads_of(loss, (x, w, b), upstream)
    want = grads_of(ref, leaves, None if upstream is None else upstream.double())
    for g, r in zip(got, want):
        assert g.dtype == torch.float32
        assert_close(g, r, torch.float32, scale=r.abs().max().item())


def test_bf16_large_vocab_confident_predictions(backend):
    """bf16 with a 128k vocabulary and p(target) >= 0.999: the loss (~1e-3) and the tiny off-target
    gradients survive only with fp32 accumulation. The reference uses the same bf16 logits (the chunk
    matmuls of the kernel's own chunking), so what is compared is the fused cross-entropy and the
    gradient accumulation."""
    device = device_of(backend)
    if backend == "triton" and device == "cpu":
        pytest.skip("128k vocabulary x 16 tokens is too slow for Triton's interpreter")
    tokens, hidden, vocab, chunk = 16, 64, 128256, 4
    x, w, _ = make(tokens, hidden, vocab, device, bias=False)
    target = torch.randint(0, vocab, (tokens,), device=device)
    w[target] = x * 0.5  # the target's logit ~ 0.5 |x|^2 ~ 32: p(target) >= 0.999
    x, w = x.bfloat16().requires_grad_(), w.bfloat16().requires_grad_()
    loss = fusedce.linear_cross_entropy(x, w, target, chunk_size=chunk, backend=backend)
    gx, gw = torch.autograd.grad(loss, (x, w))

    logits = torch.cat([x[i:i + chunk].detach() @ w.detach().t() for i in range(0, tokens, chunk)]).double()
    logits.requires_grad_()
    p_target = torch.softmax(logits, 1).gather(1, target[:, None])
    assert p_target.min() >= 0.999
    ref = torch.nn.functional.cross_entropy(logits, target)
    (dlogits,) = torch.autograd.grad(ref, logits)
    assert loss.dtype == torch.bfloat16
    assert abs(loss.double().item() - ref.item()) <= 2 ** -8 * ref.item()  # one bf16 rounding of the result
    assert_close(gx, dlogits @ w.detach().double(), torch.bfloat16, scale=gx.double().abs().max().item())
    ref_gw = dlogits.t() @ x.detach().double()
    assert_close(gw, ref_gw, torch.bfloat16, scale=ref_gw.abs().max().item())


def test_tied_frozen_and_no_grad_inputs(backend):
    device = device_of(backend)
    target = torch.randint(0, 50, (12,), device=device)
    # weight tied to an embedding: both uses add to one gradient
    table = torch.randn(50, 16, device=device, requires_grad=True)
    ids = torch.randint(0, 50, (12,), device=device)
    fusedce.linear_cross_entropy(table[ids] * 2, table, target, chunk_size=5, backend=backend).backward()
    table64 = to64(table).requires_grad_()
    reference_loss((table64[ids] * 2) @ table64.t(), target).backward()
    assert_close(table.grad, table64.grad, torch.float32, scale=table64.grad.abs().max().item())
    # frozen weight: no weight gradient is computed, the input's is
    x, w, b = make(12, 16, 50, device)
    x.requires_grad_()
    loss = fusedce.linear_cross_entropy(x, w, target, b, chunk_size=5, backend=backend)
    (gx,) = torch.autograd.grad(loss, x)
    ref, leaves = reference(x, w, b, target)
    assert_close(gx, torch.autograd.grad(ref, leaves[0])[0], torch.float32, scale=gx.abs().max().item())
    # input without grad: only the weight's
    w.requires_grad_()
    loss = fusedce.linear_cross_entropy(x.detach(), w, target, chunk_size=5, backend=backend)
    (gw,) = torch.autograd.grad(loss, w)
    ref, leaves = reference(x.detach(), w, None, target)
    assert_close(gw, torch.autograd.grad(ref, leaves[1])[0], torch.float32, scale=gw.abs().max().item())


def test_backward_twice_through_retained_graph(backend):
    device = device_of(backend)
    x, w, b = make(10, 8, 40, device)
    for t in (x, w, b):
        t.requires_grad_()
    target = torch.randint(0, 40, (10,), device=device)
    loss = fusedce.linear_cross_entropy(x, w, target, b, chunk_size=3, backend=backend)
    loss.backward(retain_graph=True)
    (2 * loss).backward()
    ref, leaves = reference(x, w, b, target)
    (3 * ref).backward()
    for got, want in zip((x, w, b), leaves):
        assert_close(got.grad, want.grad, torch.float32, scale=want.grad.abs().max().item())


def test_automatic_chunk_size_is_bounded():
    from fusedce.linear import auto_chunk_size
    assert auto_chunk_size(100000, 128256, torch.float32, torch.device("cpu")) == (32 << 20) // (128256 * 4)
    assert auto_chunk_size(7, 100, torch.float32, torch.device("cpu")) == 7
    assert auto_chunk_size(10, 10 ** 9, torch.bfloat16, torch.device("cpu")) == 1


def test_bad_input():
    x, w, b = make(6, 8, 20, "cpu")
    t = torch.randint(0, 20, (6,))
    with pytest.raises(ValueError, match=r"weight must be \[vocab, hidden\] with hidden = 8"):
        fusedce.linear_cross_entropy(x, w[:, :7], t)
    with pytest.raises(ValueError, match=r"bias must be \[vocab\] = \(20,\)"):
        fusedce.linear_cross_entropy(x, w, t, b[:19])
    with pytest.raises(ValueError, match=r"Expected input batch_size \(6\) to match target batch_size \(5\)"):
        fusedce.linear_cross_entropy(x, w, t[:5])
    with pytest.raises(ValueError, match=r"input must be \[tokens, hidden\]"):
        fusedce.linear_cross_entropy(x[None], w, t[None])
    with pytest.raises(ValueError, match="must have the dtype and device of input"):
        fusedce.linear_cross_entropy(x, w.double(), t)
    with pytest.raises(IndexError, match=r"Target 20 is out of bounds.*\[0, 20\)"):
        fusedce.linear_cross_entropy(x, w, torch.full((6,), 20))
    with pytest.raises(ValueError, match="chunk_size must be a positive"):
        fusedce.linear_cross_entropy(x, w, t, chunk_size=0)
    with pytest.raises(ValueError, match=r"one entry per class \(20\)"):
        fusedce.linear_cross_entropy(x, w, t, class_weight=torch.ones(19))
