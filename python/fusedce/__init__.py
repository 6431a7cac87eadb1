"""fusedce: fused single-pass cross-entropy for PyTorch, with C++ CPU, CUDA C++ and Triton kernels."""
from . import ops  # registers the torch.library custom ops
from .api import CrossEntropyLoss, cross_entropy
from .autograd import CrossEntropyFunction, FusedCrossEntropyFunction
from .backends import BACKENDS
from .linear import LinearCrossEntropyLoss, linear_cross_entropy
from .options import Options
from .reference import unfused_cross_entropy

__version__ = "0.1.0"
__all__ = ["cross_entropy", "CrossEntropyLoss", "CrossEntropyFunction", "FusedCrossEntropyFunction", "Options",
           "linear_cross_entropy", "LinearCrossEntropyLoss", "unfused_cross_entropy", "BACKENDS"]
