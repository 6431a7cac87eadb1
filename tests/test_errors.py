"""Bad input raises a Python error that names the problem, before any kernel runs."""
import pytest
import torch

import fusedce
from conftest import device_of


@pytest.fixture
def data(backend):
    device = device_of(backend)
    return torch.randn(4, 10, device=device), torch.randint(0, 10, (4,), device=device), backend


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


@pytest.mark.parametrize("kwargs, error, message", [
    (dict(reduction="avg"), ValueError, "avg is not a valid value for reduction"),
    (dict(label_smoothing=1.5), ValueError, "label_smoothing must be between 0.0 and 1.0"),
    (dict(label_smoothing=-0.1), ValueError, "label_smoothing must be between 0.0 and 1.0"),
    (dict(z_loss=-1.0), ValueError, "z_loss must be a finite non-negative"),
    (dict(softcap=0.0), ValueError, "softcap must be a finite positive"),
    (dict(softcap=float("inf")), ValueError, "softcap must be a finite positive"),
    (dict(z_loss=float("nan")), ValueError, "z_loss must be a finite non-negative"),
    (dict(backend="tpu"), ValueError, "unknown backend 'tpu'"),
])
def test_bad_options(data, kwargs, error, message):
    logits, target, backend = data
    kwargs.setdefault("backend", backend)
    with pytest.raises(error, match=message):
        fusedce.cross_entropy(logits, target, **kwargs)


def test_shape_mismatches(data):
    logits, target, backend = data
    with pytest.raises(ValueError, match=r"Expected input batch_size \(4\) to match target batch_size \(3\)"):
        fusedce.cross_entropy(logits, target[:3], backend=backend)
    spatial = torch.randn(2, 10, 3, 4, device=logits.device)
    with pytest.raises(ValueError, match=r"target must have shape \(2, 3, 4\).*got \(2, 3, 5\)"):
        fusedce.cross_entropy(spatial, torch.zeros(2, 3, 5, dtype=torch.long, device=logits.device), backend=backend)
    with pytest.raises(ValueError, match=r"class-probability target must have the shape of input \(4, 10\)"):
        fusedce.cross_entropy(logits, torch.rand(4, 11, device=logits.device), backend=backend)


def test_bad_dtypes(data):
    logits, target, backend = data
    with pytest.raises(TypeError, match="input \\(logits\\) must be a floating-point tensor, got dtype torch.int64"):
        fusedce.cross_entropy(logits.long(), target, backend=backend)
    with pytest.raises(TypeError, match="target must hold integer class indices"):
        fusedce.cross_entropy(logits, target.bool(), backend=backend)
    with pytest.raises(ValueError, match="ignore_index is not supported for floating point"):
        fusedce.cross_entropy(logits, torch.rand_like(logits), ignore_index=1, backend=backend)


def test_bad_weight(data):
    logits, target, backend = data
    with pytest.raises(ValueError, match=r"one entry per class \(10\), got shape \(9,\)"):
        fusedce.cross_entropy(logits, target, weight=torch.ones(9, device=logits.device), backend=backend)
    with pytest.raises(ValueError, match=r"one entry per class \(10\), got shape \(10, 1\)"):
        fusedce.cross_entropy(logits, target, weight=torch.ones(10, 1, device=logits.device), backend=backend)
    with pytest.raises(TypeError, match="weight must be a floating-point tensor, got dtype torch.int64"):
        fusedce.cross_entropy(logits, target, weight=torch.ones(10, dtype=torch.long, device=logits.device),
                              backend=backend)


def test_tensors_on_other_devices(data):
    logits, target, backend = data
    meta_weight = torch.ones(10, device="meta")
    with pytest.raises(ValueError, match="weight is on meta but input is on"):
        fusedce.cross_entropy(logits, target, weight=meta_weight, backend=backend)
    with pytest.raises(ValueError, match="target is on meta but input is on"):
        fusedce.cross_entropy(logits, target.to("meta"), backend=backend)


def test_backend_that_cannot_serve_the_device():
    logits, target = torch.randn(2, 5), torch.tensor([0, 1])
    with pytest.raises(RuntimeError, match="backend 'cuda' cannot serve this input"):
        fusedce.cross_entropy(logits, target, backend="cuda")
    if torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="backend 'cpu' cannot serve this input: it runs on CPU tensors"):
            fusedce.cross_entropy(logits.cuda(), target.cuda(), backend="cpu")


def test_scalar_and_classless_inputs():
    with pytest.raises(ValueError, match="at least one dimension"):
        fusedce.cross_entropy(torch.tensor(1.0), torch.tensor(0))
    with pytest.raises(ValueError, match="input has no classes"):
        fusedce.cross_entropy(torch.randn(3, 0), torch.zeros(3, dtype=torch.long))


def test_ops_check_the_layout_they_read(data):
    """The custom ops are public: a layout the kernels cannot read raises instead of reading garbage."""
    logits, target, backend = data
    options = (-100, 0.0, 0.0, 0.0, backend)
    with pytest.raises(ValueError, match="class-index targets must be a contiguous int64 tensor"):
        torch.ops.fusedce.cross_entropy_forward(logits, target.int(), None, *options)
    with pytest.raises(ValueError, match="weight must be a contiguous torch.float32 tensor of shape \\(10,\\)"):
        torch.ops.fusedce.cross_entropy_forward(logits, target, torch.ones(10, dtype=torch.float16,
                                                                            device=logits.device), *options)
    with pytest.raises(ValueError, match="logits must have unit stride along the classes"):
        torch.ops.fusedce.cross_entropy_forward(logits.t().contiguous().t(), target, None, *options)
    with pytest.raises(ValueError, match="logits must have at least one class"):
        torch.ops.fusedce.cross_entropy_forward(logits[:, :0], target, None, *options)
    rows = logits.shape[0]
    strided_lse = torch.zeros(rows, 2, device=logits.device)[:, 0]
    with pytest.raises(ValueError, match="lse must be contiguous"):
        torch.ops.fusedce.cross_entropy_backward(torch.ones(rows, device=logits.device), logits, target, None,
                                                 strided_lse, *options)
