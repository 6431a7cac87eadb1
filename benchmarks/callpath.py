"""python -m benchmarks.callpath: what one call of fusedce.cross_entropy costs the host, counted rather
than timed (so the count is the same on a busy machine): Python frames entered, torch dispatcher
crossings of fusedce's own ops, and aten ops run, for the forward alone and for forward + backward.

The counts are of one call after a warm-up call (lazy imports and caches are not counted)."""
from __future__ import annotations

import argparse
import sys
from collections import Counter

import torch
from torch.utils._python_dispatch import TorchDispatchMode

import fusedce


class _OpCounter(TorchDispatchMode):
    """Counts the ops that reach the dispatcher below autograd: aten ops and fusedce's custom ops (not the
    ops those run inside)."""

    def __init__(self):
        super().__init__()
        self.ops = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[func.namespace] += 1
        return func(*args, **(kwargs or {}))


def count(fn) -> dict:
    """Frames, fusedce op crossings and aten ops of one fn() call."""
    fn()  # warm-up: imports, caches
    frames = 0

    def profiler(frame, event, arg):
        nonlocal frames
        if event == "call":
            frames += 1

    sys.setprofile(profiler)
    try:
        fn()
    finally:
        sys.setprofile(None)
    with _OpCounter() as ops:  # a run of its own: the mode's frames are not the call's
        fn()
    return {"python frames": frames, "fusedce ops": ops.ops["fusedce"], "aten ops": ops.ops["aten"]}


def cases(rows: int, vocab: int, dtype: torch.dtype, backend: str):
    logits = torch.randn(rows, vocab, dtype=dtype)
    target = torch.randint(0, vocab, (rows,))

    def forward():
        with torch.no_grad():
            fusedce.cross_entropy(logits, target, backend=backend)

    def forward_backward():
        x = logits.detach().requires_grad_()
        fusedce.cross_entropy(x, target, backend=backend).backward()

    return {"fwd": forward, "fwd+bwd": forward_backward}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.callpath", description=__doc__)
    p.add_argument("--shape", default="32x10", help="ROWSxVOCAB (default 32x10)")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--backend", default="cpu")
    args = p.parse_args(argv)
    rows, vocab = (int(n) for n in args.shape.split("x"))
    print(f"fusedce.cross_entropy({args.shape} {args.dtype}, backend={args.backend!r}), mean loss, one call:")
    for op, fn in cases(rows, vocab, getattr(torch, args.dtype), args.backend).items():
        counts = count(fn)
        print(f"  {op:8s} " + ", ".join(f"{v} {k}" for k, v in counts.items()))


if __name__ == "__main__":
    main()
