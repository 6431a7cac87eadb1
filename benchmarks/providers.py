"""What the benchmarks compare: every cross-entropy a user might pick, behind one interface.

A provider maps (op, inputs) to callables that run that op once. Ops:
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
# Minimal bytes each op must move, in units of S = rows x V x element size (the README's traffic table).
TRAFFIC = {"fwd": 1, "bwd": 2, "fwd+bwd": 3, "fused": 2}


def _liger_loss():
    from liger_kernel.transformers.functional import liger_cross_entropy
    return liger_cross_entropy


@functools.lru_cache(maxsize=None)
def _compiled_cross_entropy():
    # A static graph per shape, as a fixed-shape training loop gets; past dynamo's default of 8 graphs a
    # sweep would silently time eager F.cross_entropy under this name, so the limit is raised and made an error.
    dynamo = torch._dynamo.config
    dynamo.recompile_limit = max(dynamo.recompile_limit, 64)
    dynamo.fail_on_recompile_limit_hit = True
    return torch.compile(F.cross_entropy, dynamic=False)


class Provider:
    """A loss function loss(*leaves, target) -> scalar and the ops it has. Inputs are (*leaves, target):
    (logits, target) for cross-entropy, (input, weight, target) for linear cross-entropy; the leaves
    get gradients."""

    def __init__(self, name: str, loss: Callable, ops=("fwd", "bwd", "fwd+bwd"), fused_loss: Optional[Callable] = None,
                 overwrites_inputs: bool = False):
        self.name, self.loss, self.ops, self.fused_loss = name, loss, ops, fused_loss
        self.overwrites_inputs = overwrites_inputs  # e.g. a gradient written into the logits' memory

    def make(self, op: str, inputs: Tuple[torch.Tensor, ...]) -> Tuple[Callable, Callable]:
        """(setup, run): setup() runs untimed before each timed run(); run() returns what to check:
        the loss (fwd), the leaves' gradients (bwd), or both."""
        *originals, target = inputs
        # a provider that overwrites its inputs gets its own copies, restored before each call
        leaves = [t.detach().clone() if self.overwrites_inputs else t.detach() for t in originals]

        def restore():
            if self.overwrites_inputs:
                with torch.no_grad():
                    for t, original in zip(leaves, originals):
                        t.copy_(original)

        if op == "fwd":
            return restore, (lambda: self.loss(*leaves, target))
        leaves = [t.requires_grad_() for t in leaves]
        state = {}

        def clear():
            restore()
            for t in leaves:
                t.grad = None

        if op == "bwd":
            def forward_untimed():
                clear()
                state["loss"] = self.loss(*leaves, target)

            def backward():
                state.pop("loss").backward()
                return tuple(t.grad for t in leaves)
            return forward_untimed, backward
        loss_fn = self.fused_loss if op == "fused" else self.loss

        def forward_backward():
            loss = loss_fn(*leaves, target)
            loss.backward()
            return loss.detach(), tuple(t.grad for t in leaves)
        return clear, forward_backward


def _fusedce(backend: str) -> Provider:
    return Provider(f"fusedce-{backend}",
                    lambda x, t: fusedce.cross_entropy(x, t, backend=backend, fused=False),
                    ops=OPS,
                    fused_loss=lambda x, t: fusedce.cross_entropy(x, t, backend=backend, fused=True))


def cross_entropy_providers(device: str) -> Dict[str, object]:
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
        # it writes the gradient into the logits' memory
        out["liger"] = (Provider("liger", lambda x, t: liger(x, t), ops=("fwd", "fwd+bwd"), overwrites_inputs=True)
                        if device == "cuda" else "Liger-Kernel runs on CUDA tensors only")
    except ImportError as e:
        out["liger"] = f"liger-kernel is not importable ({e})"
    return out


# ---- fused linear + cross-entropy: (input [N, H], weight [V, H], target [N]) -----------------------

LINEAR_OPS = ("fwd", "fwd+bwd")


def _liger_linear_loss():
    from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy
    return liger_fused_linear_cross_entropy


def linear_providers(device: str) -> Dict[str, object]:
    dev = torch.device(device)
    out: Dict[str, object] = {}
    for backend in ("cpu", "cuda", "triton", "torch"):
        try:
            backends.resolve(backend, dev)
            out[f"fusedce-{backend}"] = Provider(
                f"fusedce-{backend}", lambda x, w, t, b=backend: fusedce.linear_cross_entropy(x, w, t, backend=b),
                ops=LINEAR_OPS)
        except RuntimeError as e:
            out[f"fusedce-{backend}"] = str(e)
    out["materialised"] = Provider("materialised", lambda x, w, t: F.cross_entropy(x @ w.t(), t), ops=LINEAR_OPS)
    if hasattr(F, "linear_cross_entropy"):  # its chunked path, the one that saves memory
        out["torch-linear-ce"] = Provider(
            "torch-linear-ce",
            lambda x, w, t: F.linear_cross_entropy(x, w, t, options=torch.nn.LinearCrossEntropyOptions()),
            ops=LINEAR_OPS)
    else:
        out["torch-linear-ce"] = "torch.nn.functional.linear_cross_entropy needs torch 2.13+"
    try:
        liger = _liger_linear_loss()
        out["liger"] = (Provider("liger", lambda x, w, t: liger(x, w, t), ops=LINEAR_OPS) if device == "cuda"
                        else "Liger-Kernel runs on CUDA tensors only")
    except ImportError as e:
        out["liger"] = f"liger-kernel is not importable ({e})"
    return out
