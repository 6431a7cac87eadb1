"""What the audit compiles: the acceptance shapes, each mode, the plain options and the general ones."""
from __future__ import annotations

from typing import NamedTuple

import torch


class Shape(NamedTuple):
    rows: int
    vocab: int
    dtype: str  # a torch dtype name

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)

    @property
    def element_size(self) -> int:
        return torch.empty((), dtype=self.torch_dtype).element_size()

    def __str__(self) -> str:
        return f"{self.rows}x{self.vocab}:{self.dtype}"

    @staticmethod
    def from_string(text: str) -> "Shape":
        size, dtype = text.split(":")
        rows, vocab = size.split("x")
        return Shape(int(rows), int(vocab), dtype)


SHAPES = (Shape(8192, 128256, "bfloat16"), Shape(16384, 32000, "float32"), Shape(1024, 262144, "bfloat16"))
MODES = ("fwd", "bwd", "fused")
# the options of each variant; "plain" is the common case (class indices, z-loss on: it is a runtime scalar)
VARIANTS = {
    "plain": dict(z_loss=1e-4),
    "weight": dict(weight=True),
    "smoothing": dict(label_smoothing=0.1),
    "weight_smoothing": dict(weight=True, label_smoothing=0.1),
    "softcap": dict(softcap=30.0),
    "soft": dict(soft=True),
}


class Options(NamedTuple):
    """The scalar options the launchers read (the fields of fusedce's Options)."""
    ignore_index: int = -100
    label_smoothing: float = 0.0
    z_loss: float = 0.0
    softcap: float = 0.0


def options(variant: str) -> Options:
    v = VARIANTS[variant]
    return Options(label_smoothing=v.get("label_smoothing", 0.0), z_loss=v.get("z_loss", 0.0),
                   softcap=v.get("softcap", 0.0))


def is_general(variant: str) -> bool:
    """Options beyond class indices and z-loss: the CUDA kernels' general instantiation."""
    v = VARIANTS[variant]
    return bool(v.get("weight") or v.get("soft") or v.get("label_smoothing") or v.get("softcap"))


def target_size(shape: Shape, variant: str) -> int:
    """Bytes per element the targets add to the traffic: probability targets come in the logits' dtype."""
    return shape.element_size if VARIANTS[variant].get("soft") else 0
