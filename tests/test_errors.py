"""Bad input raises a Python error that names the problem, before any kernel runs, and of the type torch
raises for the same input (code written to catch torch's exceptions keeps working)."""
import pytest
import torch
import torch.nn.functional as F

import fusedce
from conftest import device_of


@pytest.fixture
def data(backend):
    device = device_of(backend)
    return torch.randn(4, 10, device=device), torch.randint(0, 10, (4,), device=device), backend


def _raised(fn):
    try:
        fn()
    except Exception as e:  # noqa: BLE001  (the test compares the types)
        return e
    return None


# name: (arguments built from (logits, target), message fusedce gives)
TORCH_REJECTS = {
    "batch_size": (lambda x, t: (x, t[:3]), r"Expected input batch_size \(4\) to match target batch_size \(3\)"),
    "target_2d": (lambda x, t: (x, t[:, None].expand(4, 2)), r"target must have shape \(4,\) .*got \(4, 2\)"),
    "spatial": (lambda x, t: (x[:2, :, None].expand(2, 10, 3), torch.zeros(2, 4, dtype=torch.long, device=x.device)),
                r"target must have shape \(2, 3\) for input of shape \(2, 10, 3\), got \(2, 4\)"),
    "probs_shape": (lambda x, t: (x, torch.rand(4, 11, device=x.device)),
                    r"class-probability target must have the shape of input \(4, 10\)"),
    "label_smoothing": (lambda x, t: (x, t, dict(label_smoothing=1.5)), "label_smoothing must be between 0.0 and 1.0"),
    "reduction": (lambda x, t: (x, t, dict(reduction="avg")), "avg is not a valid value for reduction"),
    "int_logits": (lambda x, t: (x.long(), t), r"input \(logits\) must be a floating-point tensor .*got dtype torch.int64"),
    "bool_target": (lambda x, t: (x, t.bool()), "target must hold integer class indices"),
    "ignore_index_probs": (lambda x, t: (x, torch.rand_like(x), dict(ignore_index=1)),
                           "ignore_index is not supported for floating point"),
    "weight_length": (lambda x, t: (x, t, dict(weight=torch.ones(9, device=x.device))),
                      r"one entry per class \(10\), got shape \(9,\)"),
    "weight_2d": (lambda x, t: (x, t, dict(weight=torch.ones(10, 1, device=x.device))),
                  r"one entry per class \(10\), got shape \(10, 1\)"),
    "weight_int": (lambda x, t: (x, t, dict(weight=torch.ones(10, dtype=torch.long, device=x.device))),
                   "weight must be a floating-point tensor, got dtype torch.int64"),
    "weight_requires_grad": (lambda x, t: (x, t, dict(weight=torch.ones(10, device=x.device, requires_grad=True))),
                             "not differentiable with respect to weight"),
    "scalar_input": (lambda x, t: (x[0, 0], t[0]), "at least one dimension"),
    "target_list": (lambda x, t: (x, t.tolist()), "target must be a torch.Tensor, got list"),
}


@pytest.mark.parametrize("case", list(TORCH_REJECTS))
def test_rejected_like_torch(data, case):
    logits, target, backend = data
    build, message = TORCH_REJECTS[case]
    built = build(logits, target)
    args, kwargs = (built[:-1], built[-1]) if isinstance(built[-1], dict) else (built, {})
    expected = _raised(lambda: F.cross_entropy(*args, **kwargs))
    assert expected is not None, f"torch accepts {case}: the case is wrong"
    with pytest.raises(type(expected), match=message):
        fusedce.cross_entropy(*args, backend=backend, **kwargs)


@pytest.mark.parametrize("kwargs, message", [
    (dict(label_smoothing=-0.1), "label_smoothing must be between 0.0 and 1.0"),  # torch takes it, unchecked
    (dict(z_loss=-1.0), "z_loss must be a finite non-negative"),
    (dict(z_loss=float("nan")), "z_loss must be a finite non-negative"),
    (dict(softcap=0.0), "softcap must be a finite positive"),
    (dict(softcap=float("inf")), "softcap must be a finite positive"),
    (dict(backend="tpu"), "unknown backend 'tpu'"),
])
def test_bad_extras(data, kwargs, message):
    logits, target, backend = data
    kwargs.setdefault("backend", backend)
    with pytest.raises(ValueError, match=message):
        fusedce.cross_entropy(logits, target, **kwargs)


@pytest.mark.parametrize("bad", [10, 11, -1, -5])
def test_target_out_of_range_names_value_and_class_count(data, bad):
    logits, target, backend = data
    if logits.device.type != "cpu":
        pytest.skip("on the GPU an out-of-range target gives a NaN loss (checking would sync the host)")
    target[2] = bad
    with pytest.raises(IndexError, match=rf"Target {bad} is out of bounds.*\[0, 10\)"):
        fusedce.cross_entropy(logits, target, backend=backend)


def test_out_of_range_target_is_nan_not_a_number_on_the_gpu(data):
    logits, target, backend = data
    if logits.device.type == "cpu":
        pytest.skip("CPU tensors raise IndexError instead (see above)")
    target[2] = 99
    loss = fusedce.cross_entropy(logits, target, reduction="none", backend=backend)
    assert torch.isnan(loss[2]) and torch.isfinite(loss[[0, 1, 3]]).all()


def test_tensors_on_other_devices(data):
    logits, target, backend = data
    meta_weight = torch.ones(10, device="meta")
    with pytest.raises(RuntimeError, match="weight is on meta but input is on"):
        fusedce.cross_entropy(logits, target, weight=meta_weight, backend=backend)
    with pytest.raises(RuntimeError, match="target is on meta but input is on"):
        fusedce.cross_entropy(logits, target.to("meta"), backend=backend)


def test_backend_that_cannot_serve_the_device():
    logits, target = torch.randn(2, 5), torch.tensor([0, 1])
    with pytest.raises(RuntimeError, match="backend 'cuda' cannot serve this input"):
        fusedce.cross_entropy(logits, target, backend="cuda")
    if torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="backend 'cpu' cannot serve this input: it runs on CPU tensors"):
            fusedce.cross_entropy(logits.cuda(), target.cuda(), backend="cpu")


@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
def test_no_classes_like_torch(reduction):
    """(5, 0) logits: torch's answer for probabilities (its test_cross_entropy_loss_zero_div), IndexError
    for class indices, which cannot be in range."""
    logits, probs = torch.rand(5, 0), torch.rand(5, 0)
    got, want = fusedce.cross_entropy(logits, probs, reduction=reduction), F.cross_entropy(logits, probs,
                                                                                         reduction=reduction)
    assert got.shape == want.shape and torch.equal(got.isnan(), want.isnan()) and torch.equal(got.nan_to_num(),
                                                                                              want.nan_to_num())
    with pytest.raises(IndexError):
        fusedce.cross_entropy(logits, torch.zeros(5, dtype=torch.long), reduction=reduction)
    with pytest.raises(ValueError, match="need at least one class"):
        fusedce.cross_entropy(logits, probs, z_loss=1e-4)


def test_ops_check_the_layout_they_read(data):
    """The custom ops are public: a layout the kernels cannot read raises instead of reading garbage."""
    logits, target, backend = data
    if backend == "torch":
        pytest.skip("the pure-PyTorch backend has no op")
    prefix = "triton_" if backend == "triton" else ""
    forward = getattr(torch.ops.fusedce, f"{prefix}cross_entropy_forward")
    backward = getattr(torch.ops.fusedce, f"{prefix}cross_entropy_backward")
    options = (-100, 0.0, 0.0, 0.0)
    with pytest.raises(ValueError, match="class-index targets must be a contiguous int64 tensor"):
        forward(logits, target.int(), None, *options)
    with pytest.raises(ValueError, match="weight must be a contiguous torch.float32 tensor of shape \\(10,\\)"):
        forward(logits, target, torch.ones(10, dtype=torch.float16, device=logits.device), *options)
    with pytest.raises(ValueError, match="logits must have unit stride along the classes"):
        forward(logits.t().contiguous().t(), target, None, *options)
    with pytest.raises(ValueError, match="logits must have at least one class"):
        forward(logits[:, :0], target, None, *options)
    rows = logits.shape[0]
    strided_lse = torch.zeros(rows, 2, device=logits.device)[:, 0]
    with pytest.raises(ValueError, match="lse must be contiguous"):
        backward(torch.ones(rows, device=logits.device), logits, target, None, strided_lse, *options)
