"""fusedce: fused single-pass cross-entropy for PyTorch (C++ CPU and Triton kernels; the "cuda" backend
name is reserved for hand-written CUDA kernels that are not built yet and raises a clear error)."""
from . import ops  # registers the torch.library custom ops
from .api import CrossEntropyLoss, cross_entropy
from .backends import BACKENDS
from .function import CrossEntropyFunction
from .linear import LinearCrossEntropyLoss, linear_cross_entropy
from .reference import unfused_cross_entropy

__version__ = "0.1.0"
__all__ = ["cross_entropy", "CrossEntropyLoss", "CrossEntropyFunction", "linear_cross_entropy",
           "LinearCrossEntropyLoss", "unfused_cross_entropy", "BACKENDS"]
