"""The Triton kernels compiled for sm_90 at the launches fusedce makes, without a GPU.

triton_kernels.cross_entropy_launch says which kernel, grid, arguments and compile-time options a call
makes on a given device (here a faked H200); Triton's own binder turns those arguments into the
specialisation a real launch gets (16-byte aligned pointers, i32 sizes, strides of 1 as constants), and
triton.compile builds that for sm_90. Must run where TRITON_INTERPRET is unset (the caller's worker
processes)."""
from __future__ import annotations

import os
import tempfile

import torch

from . import count, disasm
from .cases import Shape, VARIANTS, options

SM90 = 90


def h200():
    """The device the launch configuration is asked for: an H200 (sm_90, 132 SMs, 60 MB of L2)."""
    from fusedce.triton_kernels import cross_entropy as kernels
    return kernels.Device(capability=(9, 0), sms=132, l2_bytes=60 << 20)


def launch(shape: Shape, mode: str, variant: str):
    """The kernel launch of one call (the Triton backend makes one), on meta tensors (shapes, dtypes and
    strides, no data)."""
    from fusedce.triton_kernels import cross_entropy as kernels
    v = VARIANTS[variant]
    meta = dict(device="meta")
    rows, vocab, dtype = shape.rows, shape.vocab, shape.torch_dtype
    logits = torch.empty(rows, vocab, dtype=dtype, **meta)
    target = (torch.empty(rows, vocab, dtype=dtype, **meta) if v.get("soft")
              else torch.empty(rows, dtype=torch.int64, **meta))
    weight = torch.empty(vocab, **meta) if v.get("weight") else None
    weight_sum = torch.empty((), **meta) if v.get("weight") and not v.get("soft") else None
    rows_f32 = lambda: torch.empty(rows, **meta)  # noqa: E731
    # the fused mode's grad_loss is an expanded scalar (stride 0); the backward's is a fresh product
    grad_loss = torch.empty((), **meta).expand(rows) if mode == "fused" else rows_f32()
    backward = mode in ("bwd", "fused")
    return kernels.cross_entropy_launch(
        logits, target, weight, weight_sum, options(variant), forward=mode != "bwd",
        grad_loss=grad_loss if backward else None, lse=rows_f32(), loss=rows_f32() if mode != "bwd" else None,
        dlogits=torch.empty_like(logits) if backward else None, device=h200())


def compile_launch(launch) -> "triton.compiler.CompiledKernel":  # noqa: F821
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.compiler.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    kernel = launch.kernel
    if not isinstance(kernel, triton.runtime.JITFunction):
        raise RuntimeError("the Triton kernels were imported in interpreter mode (TRITON_INTERPRET is set)")
    target = GPUTarget("cuda", SM90, 32)
    backend = make_backend(target)
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    bound, specialization, opts = binder(*launch.args, **launch.meta)
    opts, signature, constexprs, attrs = kernel._pack_args(backend, launch.meta, bound, specialization, opts)
    return triton.compile(ASTSource(kernel, signature, constexprs, attrs), target=target, options=opts.__dict__)


def compiled(shape: Shape, mode: str, variant: str) -> dict:
    """The call's kernel compiled and disassembled: its SASS function, resources and launch."""
    la = launch(shape, mode, variant)
    kernel = compile_launch(la)
    with tempfile.TemporaryDirectory() as tmp:
        cubin = os.path.join(tmp, "kernel.cubin")
        with open(cubin, "wb") as f:
            f.write(kernel.asm["cubin"])
        functions = disasm.disassemble(cubin)
        resources = disasm.resource_usage(cubin)
    name = kernel.metadata.name
    return dict(function=functions[name], resources=resources.get(name, {}), threads=32 * kernel.metadata.num_warps)


def analyse_compiled(product: dict, shape: Shape, la) -> dict:
    """count.analyse of a compiled kernel at the launch `la` of a call on `shape`."""
    block, threads = la.meta["BLOCK_V"], product["threads"]
    result = count.analyse(count.Launch(
        product["function"], threads_per_row=threads, row_length=shape.vocab, resources=product["resources"],
        # the kernel's loops step over the row BLOCK_V columns at a time
        elements_per_iteration=lambda _body: block / threads))
    result["launch"] = dict(grid=list(la.grid), **la.meta)
    return result


def versions() -> dict:
    import triton
    return dict(triton=triton.__version__)
