"""The CUDA kernels (csrc/cuda) compiled for sm_90 with nvcc, and the kernels each call launches as the
CUDA launch planner plans it for an H200."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
from typing import Dict, List

from . import count, disasm
from .cases import Shape, VARIANTS, is_general

SOURCES = os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, os.pardir, "csrc", "cuda")
FILES = {"float32": "kernels_f32.cu", "bfloat16": "kernels_bf16.cu", "float16": "kernels_f16.cu"}
MANGLED = {"float32": "f", "bfloat16": "13__nv_bfloat16", "float16": "6__half"}
# setup.py's flags for the kernels, for sm_90 alone; -lineinfo names each instruction's source line
NVCC_FLAGS = ["-cubin", "-arch=sm_90", "-O3", "-std=c++17", "-lineinfo"]


def available() -> str | None:
    """None when the CUDA kernels can be compiled here, else why not."""
    if shutil.which("nvcc") is None:
        return "nvcc is not on the PATH"
    if not os.path.isfile(os.path.join(SOURCES, FILES["float32"])):
        return f"no CUDA sources at {os.path.normpath(SOURCES)}"
    return None


def compile_cubin(dtype: str, out_dir: str) -> str:
    cubin = os.path.join(out_dir, f"kernels_{dtype}.cubin")
    run = subprocess.run(["nvcc", *NVCC_FLAGS, os.path.join(SOURCES, FILES[dtype]), "-o", cubin],
                         capture_output=True, text=True)
    if run.returncode != 0:
        raise RuntimeError(f"nvcc failed on {FILES[dtype]}:\n{run.stderr[-4000:]}")
    return cubin


def planned_launch(shape: Shape, mode: str, variant: str):
    """The CUDA planner's launch for a call on an H200: the one place the audit asks the planner."""
    from fusedce.backends import cuda
    h200 = cuda._cuda.DeviceInfo(sms=132, threads_per_sm=2048, l2_bytes=60 << 20, clusters=True, regs_per_sm=65536)
    return cuda.plan(shape.rows, shape.vocab, shape.torch_dtype, h200, fused=mode == "fused", general=is_general(variant),
                     soft=bool(VARIANTS[variant].get("soft")))


# enum Layout in csrc/cuda/params.h and enum Pass in csrc/cuda/kernels.cuh
WARP_PER_ROW, BLOCK_PER_ROW, BLOCK_PER_ROW_CACHED, CLUSTER_ROW_CACHED = 0, 1, 2, 3
FORWARD, BACKWARD = 1, 4


def _segment(vocab: int, parts: int) -> int:
    return (-(-vocab // parts) + 7) // 8 * 8  # Segment::length


def kernels(plan, shape: Shape, mode: str, variant: str) -> List[tuple]:
    """(mangled-name pattern, threads per row, row length) of each kernel the call launches (launch.cu and
    launch_rows in kernels.cuh)."""
    t, vec = MANGLED[shape.dtype], 16 // shape.element_size if plan.vectorized else 1
    general = int(is_general(variant))
    if plan.layout in (BLOCK_PER_ROW_CACHED, CLUSTER_ROW_CACHED):
        cluster = int(plan.layout == CLUSTER_ROW_CACHED)
        return [(rf"17cached_row_kernelI{t}Lb0ELi\d+ELb{cluster}E", plan.threads, _segment(shape.vocab, plan.splits))]

    def rows_kernel(passes, threads, length):
        group = 32 if plan.layout == WARP_PER_ROW else 0
        return (rf"10row_kernelI{t}Li{vec}ELi{group}ELb{general}ELi{passes}E", threads if not group else 32, length)

    segment = _segment(shape.vocab, plan.splits)
    if mode == "bwd":
        return [rows_kernel(BACKWARD, plan.threads, segment)]
    if plan.splits > 1:  # segment states, their merge (a warp per row), then the gradient
        out = [rows_kernel(FORWARD, plan.threads, segment), (rf"15finalize_kernelI{t}Lb{general}E", 32, shape.vocab)]
        return out + ([rows_kernel(BACKWARD, plan.threads, segment)] if mode == "fused" else [])
    return [rows_kernel(FORWARD | (BACKWARD if mode == "fused" else 0), plan.threads, segment)]


class Cubins:
    """The cubins of each dtype, disassembled once."""

    def __init__(self, paths: Dict[str, str]):
        self.functions = {d: disasm.disassemble(p) for d, p in paths.items()}
        self.resources = {d: disasm.resource_usage(p) for d, p in paths.items()}

    def find(self, dtype: str, pattern: str):
        names = [n for n in self.functions[dtype] if re.search(pattern, n)]
        if len(names) != 1:
            raise RuntimeError(f"{len(names)} kernels match {pattern} in the {dtype} cubin: {names}")
        return self.functions[dtype][names[0]], self.resources[dtype].get(names[0], {})


def analyse(cubins: Cubins, shape: Shape, mode: str, variant: str) -> List[dict]:
    plan = planned_launch(shape, mode, variant)
    vec = 16 // shape.element_size
    out = []
    for pattern, threads, length in kernels(plan, shape, mode, variant):
        fn, resources = cubins.find(shape.dtype, pattern)
        result = count.analyse(count.Launch(
            fn, threads_per_row=threads, row_length=length, resources=resources,
            # only the logits move in 16-byte packs; a loop without them (probability targets' sum) reads one
            # element per iteration and source line
            elements_per_iteration=lambda body: (vec * sum(map(count.is_16_byte_load, body)) or max(
                count.loads_per_line(body), 1))))
        result["launch"] = {k: getattr(plan, k) for k in ("layout", "threads", "blocks", "splits", "vectorized")}
        out.append(result)
    return out


def versions() -> dict:
    run = subprocess.run(["nvcc", "--version"], capture_output=True, text=True)
    release = [line for line in run.stdout.splitlines() if "release" in line]
    return dict(nvcc=release[0].split(",", 1)[1].strip() if release else "unknown")  # "release 13.0, V13.0.88"
