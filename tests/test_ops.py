"""The op layer: opcheck on each custom op, torch.compile without graph breaks, the in-place option."""
import json
import os
import subprocess
import sys

import pytest
import torch
from torch._dynamo.testing import AotEagerAndRecordGraphs

import fusedce
from conftest import device_of
from reference import assert_close, reference_loss, to64

OPTION_SETS = [(-100, 0.0, 0.0, 0.0), (3, 0.1, 1e-3, 4.0)]


def op_args(soft, options, device):
    logits = torch.randn(5, 33, device=device)
    if soft:
        target = torch.softmax(torch.randn(5, 33, device=device), 1)
        options = (-100,) + options[1:]
    else:
        target = torch.randint(0, 33, (5,), device=device)
        target[0] = 3
    weight = torch.rand(33, device=device)
    return logits, target, weight, options


@pytest.mark.parametrize("soft", [False, True], ids=["index", "probs"])
@pytest.mark.parametrize("options", OPTION_SETS, ids=["plain", "options"])
def test_opcheck(backend, soft, options):
    if backend == "torch":
        pytest.skip("the pure-PyTorch backend has no op: torch.compile traces its tensor ops")
    device = device_of(backend)
    logits, target, weight, options = op_args(soft, options, device)
    prefix = "triton_" if backend == "triton" else ""
    forward = getattr(torch.ops.fusedce, f"{prefix}cross_entropy_forward")
    backward = getattr(torch.ops.fusedce, f"{prefix}cross_entropy_backward")
    torch.library.opcheck(forward.default, (logits.clone().requires_grad_(), target, weight, *options))
    loss, lse = forward(logits, target, weight, *options)
    assert_close(loss, reference_loss(to64(logits), to64(target), to64(weight), reduction="none",
                                      label_smoothing=options[1], z_loss=options[2], softcap=options[3] or None,
                                      ignore_index=options[0]), torch.float32)
    for grad in (torch.rand(5, device=device), torch.ones((), device=device).expand(5)):  # stride 0 too
        torch.library.opcheck(backward.default, (grad, logits, target, weight, lse, *options))


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_compile_fullgraph(backend, reduction):
    device = device_of(backend)
    logits = torch.randn(6, 50, device=device)
    target = torch.randint(0, 50, (6,), device=device)

    def step(x, t):
        loss = fusedce.cross_entropy(x * 2.0, t, label_smoothing=0.1, z_loss=1e-4, reduction=reduction,
                                     backend=backend)
        return loss.sum()

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager" if device == "cpu" else "inductor")
    x, xe = logits.clone().requires_grad_(), logits.clone().requires_grad_()
    out, ref = compiled(x, target), step(xe, target)
    out.backward()
    ref.backward()
    assert_close(out, ref, torch.float32)
    assert_close(x.grad, xe.grad, torch.float32)


def _compiled_graphs(fn, *args):
    """The forward and backward graphs of fn(*args).backward() under torch.compile(fullgraph=True)."""
    recorder = AotEagerAndRecordGraphs()
    torch.compile(fn, fullgraph=True, backend=recorder)(*args).backward()
    return [g.code for g in recorder.fw_graphs], [g.code for g in recorder.bw_graphs]


@pytest.mark.filterwarnings("ignore:Your compiler for AOTAutograd")  # torch's own recording backend
@pytest.mark.parametrize("fused", [False, True])
def test_compiled_backward_is_one_kernel_call(backend, fused):
    """torch.compile gives an output the caller drops a zero gradient, not None: the API returns no lse it
    was not asked for, so the backward does not spend a softmax pass over the logits on it. fused=True
    is ignored under torch.compile (a compiled backward would copy the forward's gradient)."""
    device = device_of(backend)
    x = torch.randn(6, 50, device=device, requires_grad=True)
    target = torch.randint(0, 50, (6,), device=device)
    fwd, bwd = _compiled_graphs(lambda x, t: fusedce.cross_entropy(x, t, fused=fused, backend=backend), x, target)
    assert len(bwd) == 1, bwd
    if backend != "torch":  # the pure-PyTorch backend compiles to tensor ops, which torch differentiates
        assert "aten.exp." not in bwd[0] and "cross_entropy_backward" in bwd[0], bwd
    x64 = to64(x).requires_grad_()
    reference_loss(x64, target).backward()
    assert_close(x.grad, x64.grad, torch.float32)


_TRACE_TRITON = """
import json, re, torch, triton
from triton.backends.compiler import GPUTarget
from torch._dynamo.testing import AotEagerAndRecordGraphs


class TargetOnly:  # a driver that only names a GPU: enough for torch to read the kernels' stores from TTIR
    def get_current_target(self):
        return GPUTarget("cuda", 90, 32)


triton.runtime.driver.set_active(TargetOnly())
import fusedce
from fusedce import ops
assert ops.TRITON_TRACEABLE
for op in ("cross_entropy_forward", "cross_entropy_backward"):
    assert torch._library.triton.get_triton_kernels_for_op("fusedce::triton_" + op), op  # compile caches hash them
recorder = AotEagerAndRecordGraphs()
step = lambda x, t: fusedce.cross_entropy(x, t, label_smoothing=0.1, z_loss=1e-4, softcap=30.0, reduction="sum",
                                          backend="triton")
compiled = torch.compile(step, fullgraph=True, dynamic=True, backend=recorder)
for rows in (6, 9):  # one graph serves both (dynamo turns sizes dynamic after a recompile anyway)
    x = torch.randn(rows, 50, device="meta", requires_grad=True)  # tracing needs shapes, not a GPU
    compiled(x, torch.randint(0, 50, (rows,), device="meta")).backward()
clones = lambda graphs: [re.findall(r"tensors_to_clone = \\[([^\\]]*)\\]", g.code) for g in graphs]
print(json.dumps([clones(recorder.fw_graphs), clones(recorder.bw_graphs),
                  [g.code for g in recorder.fw_graphs + recorder.bw_graphs]]))
"""


@pytest.mark.skipif(not hasattr(torch.library, "triton_op"), reason="torch.library.triton_op needs torch >= 2.6")
def test_compile_traces_into_the_triton_kernels():
    """torch.compile sees the Triton kernels of the "triton" backend, not an opaque op: one kernel call
    per graph, one graph for any number of rows, and only the outputs written, as torch reads from the
    kernels' code (a graph that thought the logits were written would copy them every step). Traced on
    meta tensors in a process without TRITON_INTERPRET (the interpreter's kernels cannot be traced)."""
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, "-c", _TRACE_TRITON], env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    fwd, bwd, code = json.loads(run.stdout.strip().splitlines()[-1])
    assert (fwd, bwd) == ([["'loss_ptr', 'lse_ptr'"]], [["'dlogits_ptr'"]]), code
    assert not any("fusedce." in c for c in code), code  # no opaque fusedce op left


def test_backward_op_says_it_is_not_differentiable(backend):
    if backend == "torch":
        pytest.skip("the pure-PyTorch backend has no op")
    device = device_of(backend)
    prefix = "triton_" if backend == "triton" else ""
    logits = torch.randn(4, 10, device=device, requires_grad=True)
    target = torch.randint(0, 10, (4,), device=device)
    options = (-100, 0.0, 0.0, 0.0)
    _, lse = getattr(torch.ops.fusedce, f"{prefix}cross_entropy_forward")(logits, target, None, *options)
    dlogits = getattr(torch.ops.fusedce, f"{prefix}cross_entropy_backward")(
        torch.ones(4, device=device), logits, target, None, lse.detach(), *options)
    with pytest.raises(RuntimeError, match="is not differentiable itself: for second derivatives call"):
        dlogits.sum().backward()


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_linear_cross_entropy_compiles_with_dynamic_shapes(backend, bias, reduction):
    """Token counts that change between calls (automatic dynamic shapes), with and without a bias."""
    device = device_of(backend)
    w = torch.randn(50, 16, device=device, requires_grad=True)
    b = torch.randn(50, device=device, requires_grad=True) if bias else None
    compiled = torch.compile(fusedce.linear_cross_entropy, dynamic=True, backend="aot_eager")
    for tokens in (8, 11):
        x = torch.randn(tokens, 16, device=device, requires_grad=True)
        target = torch.randint(0, 50, (tokens,), device=device)
        loss = compiled(x, w, target, b, reduction=reduction, chunk_size=4, backend=backend)
        leaves = [t for t in (x, w, b) if t is not None]
        got = torch.autograd.grad(loss.sum(), leaves)
        x64 = [to64(t).requires_grad_() for t in leaves]
        logits64 = x64[0] @ x64[1].t() + (x64[2] if bias else 0)
        ref = reference_loss(logits64, target, reduction=reduction)
        assert_close(loss, ref, torch.float32, scale=ref.abs().max().item())
        for g, r in zip(got, torch.autograd.grad(ref.sum(), x64)):
            assert_close(g, r, torch.float32, scale=r.abs().max().item())


def test_inplace_backward_matches_and_reuses_memory(backend):
    device = device_of(backend)
    w = torch.randn(16, 40, device=device, requires_grad=True)
    h = torch.randn(8, 16, device=device)
    target = torch.randint(0, 40, (8,), device=device)

    logits = h @ w  # matmul saves h and w, not its output: overwriting the logits is safe here
    ptr = logits.data_ptr()
    captured = {}
    logits.register_hook(lambda g: captured.update(ptr=g.data_ptr()))
    fusedce.cross_entropy(logits, target, label_smoothing=0.1, inplace_backward=True, backend=backend).backward()
    assert captured["ptr"] == ptr  # the gradient lives in the logits' memory

    w64 = to64(w).requires_grad_()
    reference_loss(h.double() @ w64, target, label_smoothing=0.1).backward()
    assert_close(w.grad, w64.grad, torch.float32, scale=w64.grad.abs().max().item())


def test_inplace_backward_refuses_to_corrupt_saved_logits(backend):
    device = device_of(backend)
    y = torch.randn(4, 30, device=device, requires_grad=True)
    logits = torch.exp(y)  # exp saves its output for its backward
    target = torch.randint(0, 30, (4,), device=device)
    loss = fusedce.cross_entropy(logits, target, inplace_backward=True, backend=backend)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


def test_inplace_backward_rejects_leaf(backend):
    x = torch.randn(4, 30, device=device_of(backend), requires_grad=True)
    target = torch.randint(0, 30, (4,), device=x.device)
    with pytest.raises(RuntimeError, match="leaf"):
        fusedce.cross_entropy(x, target, inplace_backward=True, backend=backend)


def test_autograd_function_is_public(backend):
    device = device_of(backend)
    x = torch.randn(3, 20, device=device, requires_grad=True)
    target = torch.randint(0, 20, (3,), device=device)
    loss, lse = fusedce.CrossEntropyFunction.apply(x, target, None, fusedce.Options(), backend)
    loss.sum().backward()
    x64 = to64(x).requires_grad_()
    reference_loss(x64, target, reduction="sum").backward()
    assert_close(x.grad, x64.grad, torch.float32)


def test_weight_requiring_grad_raises_like_torch(backend):
    device = device_of(backend)
    x = torch.randn(3, 20, device=device, requires_grad=True)
    weight = torch.rand(20, device=device, requires_grad=True)
    with pytest.raises(RuntimeError, match="not differentiable with respect to weight"):
        fusedce.cross_entropy(x, torch.randint(0, 20, (3,), device=device), weight=weight, backend=backend)


@pytest.mark.parametrize("fused", [False, True])
def test_large_inplace_gradient_on_cpu(fused):
    """Past 64 MiB the CPU kernel writes an in-place gradient with streaming stores."""
    w = torch.randn(8, 65536, requires_grad=True)
    h = torch.randn(256, 8)
    target = torch.randint(0, 65536, (256,))
    logits = h @ w
    fusedce.cross_entropy(logits, target, inplace_backward=True, fused=fused, backend="cpu").backward()
    w64 = to64(w).requires_grad_()
    reference_loss(h.double() @ w64, target).backward()
    assert_close(w.grad, w64.grad, torch.float32, scale=w64.grad.abs().max().item())


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_fused_mode_backward_twice_and_scaled(backend, reduction):
    """The fused mode hands out the gradient computed in the forward once; a second backward through a
    retained graph recomputes it, and a grad_output other than 1 rescales it."""
    device = device_of(backend)
    logits = torch.randn(6, 70, device=device)
    target = torch.randint(0, 70, (6,), device=device)
    x = logits.clone().requires_grad_()
    loss = fusedce.cross_entropy(x, target, reduction=reduction, label_smoothing=0.1, fused=True, backend=backend)
    (3.0 * loss).backward(retain_graph=True)
    loss.backward()
    x64 = to64(logits).requires_grad_()
    (4.0 * reference_loss(x64, target, reduction=reduction, label_smoothing=0.1)).backward()
    assert_close(x.grad, x64.grad, torch.float32, scale=x64.grad.abs().max().item())


def test_fused_mode_needs_a_reduced_loss(backend):
    x = torch.randn(3, 10, device=device_of(backend), requires_grad=True)
    target = torch.randint(0, 10, (3,), device=x.device)
    with pytest.raises(ValueError, match="fused=True needs reduction 'mean' or 'sum'"):
        fusedce.cross_entropy(x, target, reduction="none", fused=True, backend=backend)


def test_fused_inplace_second_backward_raises(backend):
    device = device_of(backend)
    w = torch.randn(5, 20, device=device, requires_grad=True)
    logits = torch.randn(4, 5, device=device) @ w
    loss = fusedce.cross_entropy(logits, torch.randint(0, 20, (4,), device=device), inplace_backward=True,
                                 fused=True, backend=backend)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="backward called twice with inplace_backward=True"):
        loss.backward()



def test_inplace_backward_with_lse_and_target_gradients(backend):
    """Gradients that read the logits (through lse, and of probability targets) are taken before the
    in-place kernel overwrites them."""
    device = device_of(backend)
    w = torch.randn(6, 30, device=device, requires_grad=True)
    h = torch.randn(5, 6, device=device)
    target = torch.softmax(torch.randn(5, 30, device=device), 1).requires_grad_()
    loss, lse = fusedce.cross_entropy(h @ w, target, reduction="sum", return_lse=True, inplace_backward=True,
                                      backend=backend)
    gw, gt = torch.autograd.grad(loss + (lse ** 2).sum(), (w, target))
    w64, t64 = to64(w).requires_grad_(), to64(target).requires_grad_()
    logits64 = h.double() @ w64
    ref = reference_loss(logits64, t64, reduction="sum") + (torch.logsumexp(logits64, 1) ** 2).sum()
    rw, rt = torch.autograd.grad(ref, (w64, t64))
    assert_close(gw, rw, torch.float32, scale=rw.abs().max().item())
    assert_close(gt, rt, torch.float32, scale=rt.abs().max().item())


def test_inplace_backward_rejects_views_of_leaves(backend):
    x = torch.randn(30, device=device_of(backend), requires_grad=True)  # 1-D: the kernels see a view of it
    with pytest.raises(RuntimeError, match="overwrite a leaf tensor"):
        fusedce.cross_entropy(x, torch.tensor(3, device=x.device), inplace_backward=True, backend=backend)


def test_inplace_second_backward_raises(backend):
    device = device_of(backend)
    w = torch.randn(5, 20, device=device, requires_grad=True)
    loss = fusedce.cross_entropy(torch.randn(4, 5, device=device) @ w, torch.randint(0, 20, (4,), device=device),
                                 reduction="none", inplace_backward=True, backend=backend).sum()
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="backward called twice with inplace_backward=True"):
        loss.backward()


def test_fused_mode_refuses_target_gradients(backend):
    device = device_of(backend)
    x = torch.randn(3, 10, device=device, requires_grad=True)
    target = torch.softmax(torch.randn(3, 10, device=device), 1).requires_grad_()
    with pytest.raises(ValueError, match="a target that does not require grad"):
        fusedce.cross_entropy(x, target, fused=True, backend=backend)
