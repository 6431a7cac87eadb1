"""torch's own test samples for cross_entropy, run through fusedce: the OpInfo samples of
nn.functional.cross_entropy and the ModuleInfo samples of nn.CrossEntropyLoss, with torch's gradcheck
(backward, forward-mode AD, batched gradients) and gradgradcheck (reverse over reverse, forward over
reverse) in float64 on the backends that take float64 (cpu, torch), and values and gradients against
torch in float64 on every backend in float32."""
import functools

import pytest
import torch
from torch.autograd import gradcheck, gradgradcheck

import fusedce
from conftest import device_of
from reference import assert_close

common_methods_invocations = pytest.importorskip("torch.testing._internal.common_methods_invocations",
                                                 reason="torch's test internals (pip install expecttest)")
from torch.testing._internal.common_modules import module_db  # noqa: E402

OPINFO = next(op for op in common_methods_invocations.op_db if op.name == "nn.functional.cross_entropy")
MODULEINFO = next(m for m in module_db if m.module_cls is torch.nn.CrossEntropyLoss)


def _op_samples(device, dtype):
    """(id, input, target, kwargs) of each OpInfo sample."""
    for i, s in enumerate(OPINFO.sample_inputs(device, dtype, requires_grad=True)):
        yield f"op{i}", s.input, s.args[0], dict(s.kwargs)


def _module_samples(device, dtype):
    """(id, input, target, kwargs) of each ModuleInfo sample (constructor arguments as keywords)."""
    inputs = MODULEINFO.module_inputs_func(MODULEINFO, device=device, dtype=dtype, requires_grad=True, training=True)
    for m in inputs:
        assert not m.constructor_input.args, m.desc
        yield m.desc, *m.forward_input.args, dict(m.constructor_input.kwargs)


@functools.lru_cache(maxsize=None)
def _samples(device, dtype):
    return {name: rest for name, *rest in (*_op_samples(device, dtype), *_module_samples(device, dtype))}


SAMPLE_IDS = list(_samples("cpu", torch.float64))


def _fresh(t):
    return t.detach().clone().requires_grad_(t.requires_grad)


def _sample(name, device, dtype):
    """Copies of a sample's tensors (the tests differentiate them)."""
    input, target, kwargs = _samples(device, dtype)[name]
    return _fresh(input), _fresh(target), kwargs


INTERPRETED_ROWS = 32


def _differentiable(input, target):
    return [t for t in (input, target) if t.requires_grad]


@pytest.mark.parametrize("name", SAMPLE_IDS)
def test_gradcheck_and_gradgradcheck(backend, name):
    if backend not in ("cpu", "torch"):
        pytest.skip("float64 logits are served by the cpu and torch backends")
    input, target, kwargs = _sample(name, device_of(backend), torch.float64)
    torch.testing.assert_close(fusedce.cross_entropy(input, target, backend=backend, **kwargs),
                               torch.nn.functional.cross_entropy(input, target, **kwargs), rtol=1e-12, atol=1e-12)
    inputs = _differentiable(input, target)

    def fn(*leaves):
        x, t = (leaves[0], leaves[1] if len(leaves) > 1 else target) if input.requires_grad else (input, leaves[0])
        return fusedce.cross_entropy(x, t, backend=backend, **kwargs)

    # fast_mode: torch's gradcheck along random directions, as its own tests use for the larger samples
    assert gradcheck(fn, inputs, check_forward_ad=True, check_batched_grad=True, check_batched_forward_grad=True,
                     fast_mode=True)
    assert gradgradcheck(fn, inputs, check_fwd_over_rev=True, check_rev_over_rev=True, check_batched_grad=True,
                         fast_mode=True)


@pytest.mark.parametrize("name", SAMPLE_IDS)
def test_float32_matches_torch_in_float64(backend, name):
    device = device_of(backend)
    input, target, kwargs = _sample(name, device, torch.float32)
    rows = input.numel() // input.shape[1 if input.dim() > 1 else 0]
    if backend == "triton" and device == "cpu" and rows > INTERPRETED_ROWS:
        pytest.skip(f"{rows} rows: Triton's interpreter runs each row's program in Python (seconds each); the "
                    f"spatial layouts are checked on it by test_parity.py::test_spatial_dims")
    x64, t64 = input.detach().double().requires_grad_(), target.detach()
    t64 = t64.double().requires_grad_(target.requires_grad) if target.is_floating_point() else t64
    w = kwargs.get("weight")
    got = fusedce.cross_entropy(input, target, backend=backend, **kwargs)
    want = torch.nn.functional.cross_entropy(x64, t64, **dict(kwargs, weight=None if w is None else w.double()))
    assert got.dtype == torch.float32 and got.shape == want.shape
    assert_close(got, want, torch.float32, scale=max(1.0, want.abs().max().item()))
    leaves, leaves64 = _differentiable(input, target), _differentiable(x64, t64)
    upstream = torch.rand_like(got)
    for g, g64 in zip(torch.autograd.grad(got, leaves, upstream),
                      torch.autograd.grad(want, leaves64, upstream.double())):
        assert_close(g, g64, torch.float32, scale=max(g64.abs().max().item(), 1e-3))


def test_the_samples_cover_the_options():
    """Guards the two tests above: torch's samples must still exercise what fusedce implements."""
    samples = _samples("cpu", torch.float64).values()
    kwargs = [k for _, _, k in samples]
    for option in ("weight", "ignore_index", "label_smoothing"):
        assert any(option in k for k in kwargs), option
    assert {k.get("reduction", "mean") for k in kwargs} == {"none", "mean", "sum"}
    assert any(target.is_floating_point() for _, target, _ in samples)  # probability targets
