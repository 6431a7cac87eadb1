"""Full-size checks that only a GPU can run: an LLM-sized vocabulary in bf16, and a problem with more
than 2^31 logits, where any 32-bit offset in a kernel would wrap. Skipped without a CUDA device."""
import pytest
import torch

import fusedce
from conftest import available_backends

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

GPU_BACKENDS = [p for p in available_backends() if p.values[0] in ("triton", "cuda")]


def reference_rows(logits, target, rows):
    """float64 per-row loss and gradient (for "sum") of the given rows, computed on those rows only."""
    x = logits[rows].double()
    lse = torch.logsumexp(x, 1)
    loss = lse - x.gather(1, target[rows, None])[:, 0]
    grad = torch.softmax(x, 1)
    grad[torch.arange(len(rows), device=x.device), target[rows]] -= 1
    return loss, grad


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("shape", [(8192, 128256), (16400, 131072)], ids=["8192x128256", "over_2^31"])
def test_full_size_bf16(backend, fused, shape):
    rows, vocab = shape
    torch.manual_seed(0)
    logits = torch.randn(rows, vocab, device="cuda", dtype=torch.bfloat16).mul_(2)
    target = torch.randint(0, vocab, (rows,), device="cuda")
    x = logits.requires_grad_()
    # the op's fp32 per-row loss (the public "none" loss is rounded to bf16, as torch's is)
    per_row, _ = torch.ops.fusedce.cross_entropy_forward(x.detach(), target, None, -100, 0.0, 0.0, 0.0, backend)
    fusedce.cross_entropy(x, target, reduction="sum", fused=fused, backend=backend).backward()
    # the first rows, and the last ones, whose offsets exceed 2^31 in the larger shape
    check = torch.cat([torch.arange(0, 64), torch.arange(rows - 64, rows)]).cuda()
    ref_loss, ref_grad = reference_rows(logits.detach(), target, check)
    torch.testing.assert_close(per_row[check].double(), ref_loss, rtol=1e-5, atol=1e-5)
    scale = ref_grad.abs().max().item()
    torch.testing.assert_close(x.grad[check].double(), ref_grad, rtol=1.6e-2, atol=1.6e-2 * scale)
