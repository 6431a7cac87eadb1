"""The Triton kernels compiled by Triton's real compiler, down to a cubin for sm_80 and sm_90, without a GPU.

Everywhere else on a CPU they run in Triton's interpreter, which executes them with numpy and accepts
code the compiler rejects (a loop-carried value whose type changes, an unsupported cast).
The cases cover forward, backward and fused; each option flag; each logits dtype; block sizes and
warp counts from launch_config's range. Integer arguments are typed i32, as Triton types the small
values real launches pass. Runs in a fresh process, since this one imported the kernels in
interpreter mode."""
import json
import os
import subprocess
import sys

import pytest

triton = pytest.importorskip("triton")
if "nvidia" not in triton.backends.backends:
    pytest.skip("this Triton build has no NVIDIA compiler backend", allow_module_level=True)

_FLAGS = ("SOFT", "HAS_WEIGHT", "HAS_SMOOTHING", "HAS_SOFTCAP")  # all but SHARD

# (mode, set flags, logits dtype, soft-target dtype, BLOCK_V, num_warps, arch)
CASES = [
    ("fwd", (), "fp32", None, 4096, 8, 90),
    ("bwd", (), "bf16", None, 8192, 8, 90),
    ("fused", (), "fp16", None, 8192, 8, 80),
    ("fwd", ("HAS_WEIGHT", "HAS_SMOOTHING", "HAS_SOFTCAP"), "bf16", None, 1024, 4, 90),
    ("bwd", ("HAS_WEIGHT", "HAS_SMOOTHING", "HAS_SOFTCAP"), "fp32", None, 128, 1, 80),  # short rows: one warp
    ("fused", ("HAS_WEIGHT", "HAS_SMOOTHING", "HAS_SOFTCAP"), "bf16", None, 8192, 8, 90),
    ("fwd", _FLAGS, "fp32", "bf16", 2048, 8, 90),
    ("bwd", _FLAGS, "bf16", "fp32", 256, 1, 90),  # vocabulary 1
    ("fused", ("SOFT",), "fp16", "fp16", 4096, 8, 80),
    ("fwd", ("SHARD", "HAS_WEIGHT", "HAS_SMOOTHING"), "bf16", None, 8192, 8, 90),  # vocab-parallel states
    ("bwd", ("SHARD", "HAS_SMOOTHING", "HAS_SOFTCAP"), "bf16", None, 8192, 8, 90),
    ("bwd", ("SHARD", "SOFT"), "fp32", "fp32", 2048, 8, 90),
]

_COMPILE = """
import json, sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from fusedce.triton_kernels import cross_entropy as kernels

assert isinstance(kernels.cross_entropy_kernel, triton.runtime.JITFunction), "TRITON_INTERPRET is set"
mode, flags, dtype, soft_dtype, block, warps, arch = json.loads(sys.argv[1])
aligned = json.loads(sys.argv[2])  # as Triton specialises a launch whose pointers, V and row strides are 16-aligned
forward, backward = mode in ("fwd", "fused"), mode in ("bwd", "fused")
pointers = {"logits_ptr": dtype, "target_ptr": soft_dtype or "i64", "weight_ptr": "fp32", "weight_sum_ptr": "fp32",
            "loss_ptr": "fp32", "lse_ptr": "fp32", "grad_loss_ptr": "fp32", "dlogits_ptr": dtype, "states_ptr": "fp32",
            "target_mass_ptr": "fp32"}
floats = ("label_smoothing", "z_loss", "softcap")
vec = 4 if dtype == "fp32" else 8
constexprs = {"SOFT": "SOFT" in flags, "HAS_WEIGHT": "HAS_WEIGHT" in flags, "HAS_SMOOTHING": "HAS_SMOOTHING" in flags,
              "HAS_SOFTCAP": "HAS_SOFTCAP" in flags, "SHARD": "SHARD" in flags, "FORWARD": forward, "BACKWARD": backward, "BLOCK_V": block,
              "THREADS": 32 * warps, "VEC": vec}
signature, attrs = {}, {}
for i, name in enumerate(kernels.cross_entropy_kernel.arg_names):
    if name in constexprs:
        signature[name] = "constexpr"
    elif name in pointers:
        signature[name] = "*" + pointers[name]
    else:
        signature[name] = "fp32" if name in floats else "i32"  # rows, V, strides, ignore_index
    if aligned and (name in pointers or name in ("V", "logits_row_stride", "dlogits_row_stride")):
        attrs[(i,)] = [["tt.divisibility", 16]]
target = GPUTarget("cuda", arch, 32)
compiled = triton.compile(ASTSource(kernels.cross_entropy_kernel, signature, constexprs, attrs), target=target,
                          options={"num_warps": warps})
ptx = compiled.asm["ptx"]
scale = triton.compile(ASTSource(kernels.scale_kernel, {"grad_ptr": "*" + dtype, "scale_ptr": "*fp32", "V": "i32",
                                                        "row_stride": "i32", "BLOCK_V": "constexpr"},
                                 {"BLOCK_V": min(block, 4096)}), target=target)
print(json.dumps({"cubin_bytes": len(compiled.asm["cubin"]), "scale_cubin_bytes": len(scale.asm["cubin"]),
                  "loads_16b": ptx.count("ld.global.v4.b32"), "stores_16b": ptx.count("st.global.v4.b32")}))
"""


def _compile(case, aligned=False) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, "-c", _COMPILE, json.dumps(case), json.dumps(aligned)], env=env,
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-4000:]
    return json.loads(run.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}-{'+'.join(c[1]) or 'plain'}-{c[2]}-B{c[4]}-sm{c[6]}")
def test_kernel_compiles_for_the_gpu(case):
    sizes = _compile(case)
    assert sizes["cubin_bytes"] > 0 and sizes["scale_cubin_bytes"] > 0


# the acceptance shapes' launches: 8192 x 128256 bf16 and 16384 x 32000 fp32 on sm_90 (launch_config's blocks)
@pytest.mark.parametrize("mode", ["fwd", "bwd", "fused"])
@pytest.mark.parametrize("dtype,block", [("bf16", 8192), ("fp32", 4096)])
def test_aligned_rows_move_in_16_byte_loads_and_stores(mode, dtype, block):
    """Bandwidth needs 16-byte accesses: a change that hides the rows' alignment from Triton (an int64
    cast of an offset, say) would quietly split them into narrower ones."""
    ptx = _compile((mode, (), dtype, None, block, 8, 90), aligned=True)
    assert ptx["loads_16b"] > 0
    assert (ptx["stores_16b"] > 0) == (mode != "fwd")  # the forward writes no gradient
