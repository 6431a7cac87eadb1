"""What the benchmarks compare: every cross-entropy a user might pick, behind one interface.

A provider maps (op, logits, target) to a callable that runs that op once. Ops:
  fwd      forward only (logits do not require grad)
  bwd      backward only; the forward runs outside the timed call (fusedce: separate backward kernel)
  fwd+bwd  forward then backward (fusedce: separate kernels, fused=False)
  fused    forward + backward with the gradient computed in the forward (fusedce: fused=True)
"""
from __future__ import annotations

import functools
from typing import Callable, Dict, Optional, Tuple

import torch
import torch.nn.functional as F

import fusedce
from fusedce import backends

OPS = ("fwd", "bwd", "fwd+bwd", "fused")
# Minimal bytes each op must move, in units of S = rows x V x element size (DESIGN.md).
TRAFFIC = {"fwd": 1, "bwd": 2, "fwd+bwd": 3, "fused": 2}


def _liger_loss():
    from liger_kernel.transformers.functional import liger_cross_entropy
    return liger_cross_entropy


@functools.lru_cache(maxsize=None)
def _compiled_cross_entropy():
    return torch.compile(F.cross_entropy)


class Provider:
    """name, loss function (logits, target) -> scalar loss, the ops it has, and why it may be skipped."""

    def __init__(self, name: str, loss: Callable, ops=("fwd", "bwd", "fwd+bwd"), fused_loss: Optional[Callable] = None):
        self.name, self.loss, self.ops, self.fused_loss = name, loss, ops, fused_loss

    def make(self, op: str, logits: torch.Tensor, target: torch.Tensor) -> Tuple[Callable, Callable]:
        """(setup, run): setup() runs untimed before each timed run(); run() returns what to check."""
        if op == "fwd":
            x = logits.detach()
            return (lambda: None), (lambda: self.loss(x, target))
        x = logits.detach().requires_grad_()
        state = {}

        def clear():
            x.grad = None

        if op == "bwd":
            def forward_untimed():
                clear()
                state["loss"] = self.loss(x, target)

            def backward():
                state.pop("loss").backward()
                return x.grad
            return forward_untimed, backward
        loss_fn = self.fused_loss if op == "fused" else self.loss

        def forward_backward():
            loss = loss_fn(x, target)
            loss.backward()
            return loss.detach(), x.grad
        return clear, forward_backward


def _fusedce(backend: str) -> Provider:
    return Provider(f"fusedce-{backend}",
                    lambda x, t: fusedce.cross_entropy(x, t, backend=backend, fused=False),
                    ops=OPS,
                    fused_loss=lambda x, t: fusedce.cross_entropy(x, t, backend=backend, fused=True))


def all_providers(device: str) -> Dict[str, object]:
    """name -> Provider, or name -> reason string when it cannot run on `device`."""
    dev = torch.device(device)
    out: Dict[str, object] = {}
    for backend in ("cpu", "cuda", "triton", "torch"):
        try:
            backends.resolve(backend, dev)
            out[f"fusedce-{backend}"] = _fusedce(backend)
        except RuntimeError as e:
            out[f"fusedce-{backend}"] = str(e)
    out["unfused"] = Provider("unfused", fusedce.unfused_cross_entropy)
    out["torch"] = Provider("torch", F.cross_entropy)
    out["torch-compile"] = Provider("torch-compile", lambda x, t: _compiled_cross_entropy()(x, t))
    try:
        liger = _liger_loss()
        # Liger always computes the gradient inside its forward: its fwd+bwd is its fused mode
        out["liger"] = (Provider("liger", lambda x, t: liger(x, t), ops=("fwd", "fwd+bwd")) if device == "cuda"
                        else "Liger-Kernel runs on CUDA tensors only")
    except ImportError as e:
        out["liger"] = f"liger-kernel is not importable ({e})"
    return out
