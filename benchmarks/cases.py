"""The benchmark suites: their shapes, inputs, providers, byte counts and correctness checks.

"ce": cross-entropy on logits [rows, V]. "linear": fused linear + cross-entropy on input [N, H] and
weight [V, H] (the LM-head loss without materialised logits)."""
from __future__ import annotations

from typing import Dict, List, Tuple

import torch

from . import measure, providers


class CrossEntropySuite:
    name = "ce"
    ops = providers.OPS
    baselines = ("torch", "unfused")  # the table shows every provider's speed-up over these
    # The acceptance shapes of the Triton and CUDA issues, then a sweep over vocabulary sizes.
    shapes = {"cuda": [(8192, 128256), (16384, 32000), (1024, 262144), (4096, 32000), (4096, 128256),
                       (4096, 256000), (16384, 128256), (32768, 32000)],
              # sized for the 2-core CI machine: the foundation issue's shape and a large vocabulary
              "cpu": [(4096, 32000), (1024, 128256)]}
    dtypes = {"cuda": [torch.bfloat16, torch.float32], "cpu": [torch.float32, torch.bfloat16]}
    quick_shapes = {"cpu": [(1024, 32000)], "cuda": [(4096, 32000), (4096, 128256)]}
    quick_dtypes = {"cpu": [torch.float32], "cuda": [torch.bfloat16]}

    @staticmethod
    def providers(device: str) -> Dict[str, object]:
        return providers.cross_entropy_providers(device)

    @staticmethod
    def make_inputs(shape, dtype, device, seed=0):
        rows, vocab = shape
        g = torch.Generator(device=device).manual_seed(seed)
        logits = torch.randn(rows, vocab, generator=g, device=device, dtype=dtype).mul_(2)
        target = torch.randint(0, vocab, (rows,), generator=g, device=device)
        return logits, target

    @staticmethod
    def logits_bytes(shape, dtype) -> int:
        return shape[0] * shape[1] * torch.empty((), dtype=dtype).element_size()

    @classmethod
    def traffic_bytes(cls, op, shape, dtype) -> int:
        return providers.TRAFFIC[op] * cls.logits_bytes(shape, dtype)

    @staticmethod
    def flops(op, shape) -> int:
        return 0

    @staticmethod
    def check(op, result, inputs):
        if op != "fwd":
            result = (result[0], result[1][0]) if op != "bwd" else result[0]
        return measure.check_against_float64(op, result, *inputs)


class LinearCrossEntropySuite:
    name = "linear"
    ops = providers.LINEAR_OPS
    baselines = ("materialised", "torch-linear-ce")
    shapes = {"cuda": [(8192, 4096, 128256), (8192, 4096, 32000), (4096, 4096, 256000)],
              "cpu": [(1024, 512, 32000)]}
    dtypes = {"cuda": [torch.bfloat16], "cpu": [torch.float32]}
    quick_shapes = {"cpu": [(512, 256, 32000)], "cuda": [(4096, 4096, 128256)]}
    quick_dtypes = dtypes

    @staticmethod
    def providers(device: str) -> Dict[str, object]:
        return providers.linear_providers(device)

    @staticmethod
    def make_inputs(shape, dtype, device, seed=0):
        tokens, hidden, vocab = shape
        g = torch.Generator(device=device).manual_seed(seed)
        x = torch.randn(tokens, hidden, generator=g, device=device, dtype=dtype)
        w = torch.randn(vocab, hidden, generator=g, device=device, dtype=dtype).div_(hidden ** 0.5)
        target = torch.randint(0, vocab, (tokens,), generator=g, device=device)
        return x, w, target

    @staticmethod
    def logits_bytes(shape, dtype) -> int:
        return shape[0] * shape[2] * torch.empty((), dtype=dtype).element_size()

    @staticmethod
    def traffic_bytes(op, shape, dtype) -> int:
        """Reading input and weight, and writing their gradients: compute-bound, shown for reference."""
        tokens, hidden, vocab = shape
        io = (tokens + vocab) * hidden * torch.empty((), dtype=dtype).element_size()
        return io if op == "fwd" else 2 * io

    @staticmethod
    def flops(op, shape) -> int:
        tokens, hidden, vocab = shape
        return 2 * tokens * hidden * vocab * (1 if op == "fwd" else 3)

    @staticmethod
    def check(op, result, inputs):
        return measure.check_linear_against_float64(op, result, *inputs)


SUITES = {s.name: s for s in (CrossEntropySuite, LinearCrossEntropySuite)}


def parse_shape(text: str) -> Tuple[int, ...]:
    return tuple(int(v) for v in text.lower().split("x"))


def shape_label(shape) -> str:
    return "x".join(str(v) for v in shape)


def default_shapes(suite, device: str, quick: bool) -> List[tuple]:
    return (suite.quick_shapes if quick else suite.shapes)[device]
