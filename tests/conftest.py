"""Shared test setup: which backends this machine can run, and the float64 reference.

Triton runs through its interpreter on CPU tensors when there is no GPU; TRITON_INTERPRET must be
set before triton is first imported, hence here. FUSEDCE_TEST_BACKENDS=triton,cuda (say) limits the
backend-parametrised tests to those backends: a GPU session spends its minutes on the GPU's kernels,
which CI cannot run, rather than on the CPU's, which CI runs anyway."""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import fusedce  # noqa: E402
from fusedce import backends  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def available_backends():
    """Every backend that can serve tensors on DEVICE, each with a skip reason when it cannot."""
    wanted = os.environ.get("FUSEDCE_TEST_BACKENDS")
    params = []
    for name in ("cpu", "torch", "triton", "cuda"):
        device = "cpu" if name == "cpu" else DEVICE
        if wanted and name not in wanted.split(","):
            params.append(pytest.param(name, id=name, marks=pytest.mark.skip(reason="not in FUSEDCE_TEST_BACKENDS")))
            continue
        try:
            backends.resolve(name, torch.device(device))
            params.append(pytest.param(name, id=name))
        except RuntimeError as e:
            params.append(pytest.param(name, id=name, marks=pytest.mark.skip(reason=str(e))))
    return params


def device_of(backend: str) -> str:
    return "cpu" if backend == "cpu" else DEVICE


@pytest.fixture(params=available_backends())
def backend(request):
    return request.param


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
