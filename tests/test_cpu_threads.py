"""The CPU kernels' threads (csrc/cpu/row_pool.cpp): rows claimed in chunks by the caller and pool
workers give the same bits as one thread, whatever the thread count; a forked child gets workers of
its own; and the threads decide nothing about the result, so a busy machine changes only the time."""
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import fusedce
from fusedce.backends import cpu

pytestmark = pytest.mark.skipif(cpu._C is None, reason=f"the CPU module is not built: {cpu.IMPORT_ERROR}")


def grad_and_loss(x, target, **kw):
    x = x.detach().clone().requires_grad_()
    loss = fusedce.cross_entropy(x, target, backend="cpu", reduction="sum", **kw)
    loss.backward()
    return loss.detach(), x.grad


# rows x vocab large enough for several threads and chunks (the kernels thread from about 1M
# elements), with row counts that do not divide evenly into chunks
@pytest.mark.parametrize("shape", [(129, 9001), (1031, 2053), (3, 400000)], ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("fused", [False, True])
def test_any_thread_count_gives_the_same_bits(shape, dtype, fused):
    x = (torch.randn(*shape) * 3).to(dtype)
    target = torch.randint(0, shape[1], (shape[0],))
    target[::7] = -100
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        expected = grad_and_loss(x, target, fused=fused, label_smoothing=0.1)
        for n in (2, 3, 8):  # more threads than cores: the pool grows, the chunks still cover every row once
            torch.set_num_threads(n)
            loss, grad = grad_and_loss(x, target, fused=fused, label_smoothing=0.1)
            assert torch.equal(loss, expected[0]), n
            assert torch.equal(grad, expected[1]), n
    finally:
        torch.set_num_threads(threads)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="no fork on this platform")
def test_a_forked_child_runs_the_kernels_on_threads_of_its_own():
    """The parent's workers do not exist in a forked child (a DataLoader worker, say): waiting on them
    would hang it."""
    code = textwrap.dedent("""
        import os, sys, torch, fusedce
        torch.set_num_threads(2)
        x, t = torch.randn(512, 8192), torch.randint(0, 8192, (512,))
        expected = fusedce.cross_entropy(x, t, backend="cpu")  # starts the parent's pool
        pid = os.fork()
        if pid == 0:
            ok = torch.equal(fusedce.cross_entropy(x, t, backend="cpu"), expected)
            os._exit(0 if ok else 1)
        _, status = os.waitpid(pid, 0)
        print("child", os.waitstatus_to_exitcode(status))
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "child 0"
