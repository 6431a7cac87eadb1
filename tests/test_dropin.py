"""A drop-in is invisible: torch's result dtypes under autocast, double backward, torch.func transforms and
forward-mode AD, reproducible repeated backward, and nn.CrossEntropyLoss's type."""
import pytest
import torch
import torch.nn.functional as F

import fusedce
from conftest import device_of
from reference import assert_close, reference_loss, to64


def _inputs(device, rows=6, vocab=40, dtype=torch.float32):
    logits = (torch.randn(rows, vocab) * 2).to(dtype).to(device)
    target = torch.randint(0, vocab, (rows,), device=device)
    target[1] = -100
    return logits, target


@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("options", [{}, dict(label_smoothing=0.1), dict(z_loss=1e-2, softcap=3.0)],
                         ids=["plain", "smoothing", "zloss_softcap"])
def test_gradient_penalty_has_the_second_order_terms(backend, fused, options):
    """A penalty on the norm of the loss's gradient (create_graph=True) differentiates the gradient."""
    logits, target = _inputs(device_of(backend))
    x = logits.clone().requires_grad_()
    loss = fusedce.cross_entropy(x, target, fused=fused, backend=backend, **options)
    (g,) = torch.autograd.grad(loss, x, create_graph=True)
    (gg,) = torch.autograd.grad(g.pow(2).sum(), x)
    x64 = to64(logits).requires_grad_()
    (g64,) = torch.autograd.grad(reference_loss(x64, target, **options), x64, create_graph=True)
    (gg64,) = torch.autograd.grad(g64.pow(2).sum(), x64)
    assert_close(g, g64, torch.float32, scale=g64.abs().max().item())
    assert_close(gg, gg64, torch.float32, scale=gg64.abs().max().item())


def test_inplace_backward_refuses_create_graph(backend):
    device = device_of(backend)
    w = torch.randn(5, 20, device=device, requires_grad=True)
    loss = fusedce.cross_entropy(torch.randn(4, 5, device=device) @ w, torch.randint(0, 20, (4,), device=device),
                                 inplace_backward=True, backend=backend)
    with pytest.raises(RuntimeError, match="inplace_backward=True cannot give a differentiable gradient"):
        torch.autograd.grad(loss, w, create_graph=True)


@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_repeated_backward_is_bitwise_reproducible(backend, fused, reduction):
    """Two backward passes through a retained graph with the same grad_output give the same bits (the
    fused mode's second backward runs the fused kernel again rather than the separate backward)."""
    if fused and reduction == "none":
        pytest.skip("the fused mode reduces")
    logits, target = _inputs(device_of(backend))
    x = logits.clone().requires_grad_()
    loss = fusedce.cross_entropy(x, target, reduction=reduction, label_smoothing=0.1, fused=fused, backend=backend)
    upstream = torch.rand_like(loss) + 0.5
    first = torch.autograd.grad(loss, x, upstream, retain_graph=True)[0].clone()
    second = torch.autograd.grad(loss, x, upstream)[0]
    assert torch.equal(first, second)


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_torch_func_transforms(backend, reduction):
    device = device_of(backend)
    logits = torch.randn(3, 6, 40, device=device)
    target = torch.randint(0, 40, (6,), device=device)
    tangent = torch.randn(6, 40, device=device)

    def ours(x):
        return fusedce.cross_entropy(x, target, reduction=reduction, label_smoothing=0.1, backend=backend).sum()

    def theirs(x):
        return F.cross_entropy(x.double(), target, reduction=reduction, label_smoothing=0.1).sum()

    transforms = {"grad": (torch.func.grad, logits[0]), "vmap": (torch.func.vmap, logits),
                  "vmap_grad": (lambda f: torch.func.vmap(torch.func.grad(f)), logits),
                  "jacrev": (torch.func.jacrev, logits[0]), "hessian": (torch.func.hessian, logits[0])}
    for name, (transform, x) in transforms.items():
        got, want = transform(ours)(x), transform(theirs)(x)
        assert_close(got, want, torch.float32, scale=max(1.0, want.abs().max().item()))
    _, got = torch.func.jvp(ours, (logits[0],), (tangent,))
    _, want = torch.func.jvp(theirs, (logits[0],), (tangent.double(),))
    assert_close(got, want, torch.float32)
    with torch.autograd.forward_ad.dual_level():
        dual = torch.autograd.forward_ad.make_dual(logits[0], tangent)
        got = torch.autograd.forward_ad.unpack_dual(ours(dual)).tangent
    assert_close(got, want, torch.float32)


@pytest.mark.parametrize("autocast_dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64], ids=str)
@pytest.mark.parametrize("soft", [False, True], ids=["index", "probs"])
def test_autocast_gives_torchs_dtypes(backend, dtype, autocast_dtype, soft):
    """Under autocast cross_entropy runs in float32 (fp16 and bf16 logits give a float32 loss); the
    logits' gradient keeps their dtype. The kernels read the low-precision logits as they are."""
    device = device_of(backend)
    if dtype == torch.float64 and backend in ("triton", "cuda"):
        pytest.skip("float64 logits are served by the cpu and torch backends")
    logits, target = _inputs(device, dtype=dtype)
    if soft:
        target = torch.softmax(torch.randn(logits.shape, device=device), 1).to(dtype)
    x, xt = logits.clone().requires_grad_(), logits.clone().requires_grad_()
    with torch.autocast(torch.device(device).type, dtype=autocast_dtype):
        got = fusedce.cross_entropy(x, target, label_smoothing=0.1, backend=backend)
        want = F.cross_entropy(xt, target, label_smoothing=0.1)
    assert got.dtype == want.dtype
    got.backward()
    want.backward()
    assert x.grad.dtype == xt.grad.dtype == dtype
    ref = reference_loss(to64(logits), to64(target), label_smoothing=0.1)
    assert_close(got, ref, got.dtype)


def test_linear_cross_entropy_under_autocast(backend):
    """As F.linear then cross_entropy under autocast: the head in the autocast dtype, the loss in float32,
    the fp32 parameters' gradients in fp32."""
    device = device_of(backend)
    x = torch.randn(12, 16, device=device, requires_grad=True)
    w = (torch.randn(50, 16, device=device) / 4).requires_grad_()
    b = torch.randn(50, device=device, requires_grad=True)
    target = torch.randint(0, 50, (12,), device=device)
    with torch.autocast(torch.device(device).type, dtype=torch.bfloat16):
        loss = fusedce.linear_cross_entropy(x, w, target, b, chunk_size=5, backend=backend)
        ref = F.cross_entropy(F.linear(x, w, b), target)
    assert loss.dtype == ref.dtype == torch.float32
    got = torch.autograd.grad(loss, (x, w, b))
    want = torch.autograd.grad(ref, (x, w, b))
    for g, r in zip(got, want):
        assert g.dtype == torch.float32
        assert_close(g, r, torch.bfloat16, scale=r.abs().max().item())
    assert_close(loss, ref, torch.bfloat16)


def test_module_is_an_nn_cross_entropy_loss():
    crit = fusedce.CrossEntropyLoss(label_smoothing=0.1, z_loss=1e-4)
    assert isinstance(crit, torch.nn.CrossEntropyLoss)
    assert (crit.reduction, crit.ignore_index, crit.label_smoothing) == ("mean", -100, 0.1)
    with pytest.raises(ValueError, match="z_loss must be a finite non-negative"):
        fusedce.CrossEntropyLoss(z_loss=-1.0)


@pytest.mark.parametrize("seed", range(8))
def test_bfloat16_loss_is_the_float64_answer_rounded(seed):
    """The kernels round the float64 loss to bf16 once (torch's bf16 path rounds its log-probabilities
    first and can land an ulp away): the README's example is seed 8 of this."""
    torch.manual_seed(seed)
    logits = (torch.randn(8, 1000) * 4).bfloat16()
    target = torch.randint(0, 1000, (8,))
    ref = F.cross_entropy(logits.double(), target, reduction="sum").item()
    got = fusedce.cross_entropy(logits, target, reduction="sum", backend="cpu").item()
    assert got == torch.tensor(ref).bfloat16().item()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("grad", [False, True], ids=["no_grad", "grad"])
def test_small_inputs_get_torchs_own_results(dtype, grad):
    """Below TORCH_BELOW_ELEMENTS logits "auto" is torch's cross_entropy, bit for bit (fp16 computed in fp32,
    where torch's own fp16 sum could overflow), loss and gradient."""
    logits = (torch.randn(32, 10) * 3).to(dtype)
    target = torch.randint(0, 10, (32,))
    weight = torch.rand(10).to(dtype)
    x, xt = logits.clone().requires_grad_(grad), logits.clone().requires_grad_(grad)
    got = fusedce.cross_entropy(x, target, weight, label_smoothing=0.1)
    wide = torch.float32 if dtype == torch.float16 else dtype
    want = F.cross_entropy(xt.to(wide), target, weight.to(wide), label_smoothing=0.1).to(dtype)
    assert got.dtype == want.dtype and torch.equal(got, want)
    if grad:
        got.backward()
        want.backward()
        assert torch.equal(x.grad, xt.grad)
    assert fusedce.api.TORCH_BELOW_ELEMENTS > logits.numel()


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("grad", [False, True], ids=["no_grad", "grad"])
def test_dtype_gives_an_unrounded_loss(backend, reduction, grad):
    """dtype=torch.float32: a bf16 model's loss as the kernels accumulated it, in every path."""
    logits, target = _inputs(device_of(backend), dtype=torch.bfloat16)
    x = logits.clone().requires_grad_(grad)
    loss = fusedce.cross_entropy(x, target, reduction=reduction, dtype=torch.float32, backend=backend)
    assert loss.dtype == torch.float32
    ref = reference_loss(to64(logits), target, reduction=reduction)
    torch.testing.assert_close(loss.double(), ref, rtol=1e-5, atol=1e-5)  # fp32, not bf16, rounding
    with pytest.raises(ValueError, match="dtype must be a floating-point torch.dtype"):
        fusedce.cross_entropy(x, target, dtype=torch.int64, backend=backend)
