"""The benchmark suites: their shapes, inputs, providers, throughput measure and correctness checks.

"ce": cross-entropy on logits [rows, V]. "linear": fused linear + cross-entropy on input [N, H] and
weight [V, H] (the LM-head loss without materialised logits).

A suite is a class with the attributes of the two below (name, ops, baselines, shapes, dtypes,
quick_shapes, quick_dtypes, quick_minutes, metric, providers, make_inputs, logits_bytes, throughput,
peak, check), registered with @register; `python -m benchmarks --suite NAME` then runs it. A suite in
a module of its own is registered when benchmarks/__main__.py imports it (SUITE_MODULES there)."""
from __future__ import annotations

from typing import Dict, List, Tuple

import torch

from . import measure, providers

SUITES: Dict[str, type] = {}


def register(suite: type) -> type:
    SUITES[suite.name] = suite
    return suite


def copy_bandwidth(device: str, repeats: int) -> float:
    """GB/s of a plain device copy (bytes read + written), the yardstick of memory-bound kernels."""
    nbytes = (1 << 30) if device == "cuda" else (512 << 20)
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).fill_(1.0)
    dst = torch.empty_like(src)
    ms = time_one(device, (lambda: None, lambda: dst.copy_(src)), repeats)
    return 2 * nbytes / (ms * 1e-3) / 1e9


def matmul_peak(device: str, dtype: torch.dtype, repeats: int) -> float:
    """TFLOP/s of a plain square matmul in `dtype`, the yardstick of matmul-bound work."""
    n = 4096 if device == "cuda" else 1024
    a, b = (torch.randn(n, n, device=device).to(dtype) for _ in range(2))
    ms = time_one(device, (lambda: None, lambda: a @ b), repeats)
    return 2 * n ** 3 / (ms * 1e-3) / 1e12


def time_one(device: str, case, repeats: int) -> float:
    return measure.time_gpu([case], repeats) if device == "cuda" else measure.time_cpu([[case]], repeats)[0]


@register
class CrossEntropySuite:
    name = "ce"
    ops = providers.OPS
    # (record key, unit, yardstick): effective bandwidth against the copy bandwidth of the same run
    metric = ("gbps", "GB/s", "copy")
    baselines = ("torch", "unfused")  # the table shows every provider's speed-up over these
    # The acceptance shapes of the Triton and CUDA issues, then a sweep over vocabulary sizes.
    shapes = {"cuda": [(8192, 128256), (16384, 32000), (1024, 262144), (4096, 32000), (4096, 128256),
                       (4096, 256000), (16384, 128256), (32768, 32000)],
              # sized for the 2-core CI machine: the foundation issue's shape and a large vocabulary
              "cpu": [(4096, 32000), (1024, 128256)]}
    dtypes = {"cuda": [torch.bfloat16, torch.float32], "cpu": [torch.float32, torch.bfloat16]}
    quick_shapes = {"cpu": [(1024, 32000)], "cuda": [(4096, 32000), (4096, 128256)]}
    quick_dtypes = {"cpu": [torch.float32], "cuda": [torch.bfloat16]}
    quick_minutes = 2  # on the 2-core CI machine
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
    def throughput(cls, op, shape, dtype, ms) -> float:
        """Effective GB/s: the minimal bytes of the op (the README's traffic table) over the time."""
        return providers.TRAFFIC[op] * cls.logits_bytes(shape, dtype) / (ms * 1e-3) / 1e9

    @staticmethod
    def peak(device, dtype, repeats) -> float:
        return copy_bandwidth(device, repeats)

    @staticmethod
    def check(op, result, inputs):
        if op != "fwd":
            result = (result[0], result[1][0]) if op != "bwd" else result[0]
        return measure.check_against_float64(op, result, *inputs)


@register
class LinearCrossEntropySuite:
    name = "linear"
    ops = providers.LINEAR_OPS
    # matmul-bound: FLOP/s of its three matmuls (one in the forward) against a plain matmul's
    metric = ("tflops", "TFLOP/s", "matmul")
    baselines = ("materialised", "torch-linear-ce")
    shapes = {"cuda": [(8192, 4096, 128256), (8192, 4096, 32000), (4096, 4096, 256000)],
              "cpu": [(1024, 512, 32000)]}
    dtypes = {"cuda": [torch.bfloat16], "cpu": [torch.float32]}
    quick_shapes = {"cpu": [(256, 256, 32000)], "cuda": [(4096, 4096, 128256)]}
    quick_dtypes = dtypes
    quick_minutes = 5  # 260 s with other jobs on the machine, mostly torch's chunked path
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
    def throughput(op, shape, dtype, ms) -> float:
        """TFLOP/s of the matmuls: x @ W.T forward; its gradients for input and weight backward."""
        tokens, hidden, vocab = shape
        return 2 * tokens * hidden * vocab * (1 if op == "fwd" else 3) / (ms * 1e-3) / 1e12

    @staticmethod
    def peak(device, dtype, repeats) -> float:
        return matmul_peak(device, dtype, repeats)

    @staticmethod
    def check(op, result, inputs):
        return measure.check_linear_against_float64(op, result, *inputs)


def parse_shape(text: str) -> Tuple[int, ...]:
    return tuple(int(v) for v in text.lower().split("x"))


def shape_label(shape) -> str:
    return "x".join(str(v) for v in shape)


def default_shapes(suite, device: str, quick: bool) -> List[tuple]:
    return (suite.quick_shapes if quick else suite.shapes)[device]
