"""The shape sets and the inputs of the benchmarks."""
from __future__ import annotations

import torch

# The acceptance shapes of the Triton and CUDA issues, then a sweep over vocabulary sizes.
GPU_SHAPES = [(8192, 128256), (16384, 32000), (1024, 262144), (4096, 32000), (4096, 128256), (4096, 256000),
              (16384, 128256), (32768, 32000)]
GPU_DTYPES = [torch.bfloat16, torch.float32]
# Sized for the 2-core CI machine: the foundation issue's shape and a large vocabulary.
CPU_SHAPES = [(4096, 32000), (1024, 128256)]
CPU_DTYPES = [torch.float32, torch.bfloat16]
QUICK_SHAPES = {"cpu": [(1024, 32000)], "cuda": [(4096, 32000), (4096, 128256)]}
QUICK_DTYPES = {"cpu": [torch.float32], "cuda": [torch.bfloat16]}


def make_inputs(rows: int, vocab: int, dtype: torch.dtype, device: str, seed: int = 0):
    g = torch.Generator(device=device).manual_seed(seed)
    logits = torch.randn(rows, vocab, generator=g, device=device, dtype=dtype).mul_(2)
    target = torch.randint(0, vocab, (rows,), generator=g, device=device)
    return logits, target
