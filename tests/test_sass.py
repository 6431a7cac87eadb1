"""The static SASS issue-budget audit (benchmarks/sass) in CI, without a GPU: every Triton and CUDA kernel,
compiled for sm_90 at the launches the code picks for the acceptance shapes, within 0.8 of the H200 issue
budget per element (per-row work included) with the common options, and without spills, software logs
or full-range divisions in its hot loops with any (benchmarks/sass/rules.py). The audit runs once, in a
fresh process (this one imported Triton in interpreter mode): about a minute on 2 cores. Also the counting
itself, on small hand-written listings, so that a broken counter cannot pass the kernels."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.sass import count, disasm, model
from benchmarks.sass.cases import MODES, SHAPES, VARIANTS
from benchmarks.sass.rules import PINNED, check

ROOT = Path(__file__).resolve().parents[1]


def _skip_reason():
    try:
        import triton
    except ImportError:
        return "needs triton (it compiles the Triton kernels and ships nvdisasm)"
    if "nvidia" not in triton.backends.backends:
        return "this Triton build has no NVIDIA compiler backend"
    if triton.__version__ != PINNED["triton"]:
        return f"the counts are pinned to Triton {PINNED['triton']}, this is {triton.__version__} (see rules.py)"
    if shutil.which("nvcc") is None or not (ROOT / "csrc" / "cuda").is_dir():
        return "needs nvcc and the sources in csrc/cuda"
    version = subprocess.run(["nvcc", "--version"], capture_output=True, text=True).stdout
    if PINNED["nvcc"] not in version:
        return f"the counts are pinned to nvcc {PINNED['nvcc']} (see rules.py)"
    try:
        disasm.find_tool("nvdisasm")
        disasm.find_tool("cuobjdump")
    except disasm.ToolMissing as e:
        return str(e)
    return None


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    why = _skip_reason()
    if why:
        pytest.skip(why)
    out = tmp_path_factory.mktemp("sass") / "sass.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, "-m", "benchmarks.sass", "--json", str(out)], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=1200)
    assert out.exists(), run.stdout[-2000:] + run.stderr[-4000:]
    return {(r["family"], r["shape"], r["mode"], r["variant"]): r for r in json.loads(out.read_text())["results"]}


CASES = [(family, str(shape), mode, variant) for family in ("triton", "cuda") for shape in SHAPES for mode in MODES
         for variant in VARIANTS]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(c))
def test_kernel_keeps_to_the_issue_budget(report, case):
    result = report[case]
    problems = check(result)
    costliest = "; ".join(f"{where} {n:.2f}" for where, n in result["lines"][:6])
    assert not problems, f"{'; '.join(problems)}. Costliest source lines (instructions per element): {costliest}"


def test_budget_model():
    """The issue's numbers: 15.6 instructions per element for a bf16 forward on an H200, 31 for a bf16
    backward or an fp32 forward, 62 for an fp32 backward; MUFU an eighth of it."""
    h200 = model.H200
    assert h200.budget(model.bytes_per_element("fwd", 2)) == pytest.approx(15.56, abs=0.01)
    assert h200.budget(model.bytes_per_element("bwd", 2)) == pytest.approx(31.12, abs=0.01)
    assert h200.budget(model.bytes_per_element("fused", 4)) == pytest.approx(62.24, abs=0.01)
    assert h200.mufu_budget(model.bytes_per_element("fwd", 2)) == pytest.approx(15.56 / 8, abs=0.01)
    assert model.H100.budget(2) > h200.budget(2)  # less bandwidth: a looser budget


# a kernel in nvdisasm's format: a prologue, a hot loop laid out in two pieces (the compiler put its second
# half after the exit), a per-row division only the first warp runs, and a loop that stores without reading
_LISTING = """
.text.kernel:
        /*0000*/                   S2R R0, SR_TID.X ;
        /*0010*/                   ISETP.NE.AND P1, PT, R0, RZ, PT ;
        /*0020*/                   MOV R1, RZ ;
.L_x_0:
	//## File "/src/k.cu", line 10
        /*0030*/                   LDG.E.128 R4, desc[UR4][R2.64] ;
	//## File "/src/k.cu", line 11
        /*0040*/                   MUFU.EX2 R8, R4 ;
        /*0050*/                   FFMA R1, R8, R9, R1 ;
        /*0060*/                   BRA `(.L_x_2) ;
.L_x_1:
	//## File "/src/k.cu", line 20
        /*0070*/              @P1 BRA `(.L_x_3) ;
        /*0080*/                   FCHK P0, R1, R5 ;
        /*0090*/                   MUFU.LG2 R1, R1 ;
.L_x_3:
        /*00a0*/                   STG.E desc[UR4][R10.64], R1 ;
.L_x_4:
        /*00b0*/                   STG.E desc[UR4][R10.64], RZ ;
        /*00c0*/              @P2 BRA `(.L_x_4) ;
        /*00d0*/                   EXIT ;
.L_x_2:
	//## File "/src/k.cu", line 12
        /*00e0*/                   IADD3 R2, R2, 0x10, RZ ;
        /*00f0*/                   ISETP.LT.AND P2, PT, R2, R3, PT ;
        /*0100*/              @P2 BRA `(.L_x_0) ;
        /*0110*/                   BRA `(.L_x_1) ;
.L_x_5:
        /*0120*/                   BRA `(.L_x_5);
"""


def _analyse(threads=128, row_length=1024):
    fn = disasm.parse(_LISTING)["kernel"]
    per_iteration = lambda body: 4 * sum(map(count.is_16_byte_load, body))  # noqa: E731
    return fn, count.analyse(count.Launch(fn, threads_per_row=threads, row_length=row_length, resources={},
                                          elements_per_iteration=per_iteration))


def test_hot_loop_follows_the_branches_not_the_addresses():
    fn, result = _analyse()
    (loop,) = result["hot_loops"]  # the storing loop reads nothing: not a hot loop
    assert loop["instructions"] == 7  # 0x30-0x60 and 0xe0-0x100, not the exit code between them
    assert loop["elements_per_iteration"] == 4 and loop["loads_16_byte"] == 1 and loop["branches"] == 1
    assert not loop["full_division"] and not loop["spills"]


def test_per_element_counts_loop_and_per_row_work():
    _, result = _analyse(threads=128, row_length=1024)
    loop = 7 / 4  # a 4-element iteration
    # per row, for each of the row's 128 threads: the prologue (3), the store (1), the zero loop (2), the
    # exit and the branch out of the loop (2); the branch at 0x70 too, and for the first warp only the
    # division check and the log (2 instructions x 32 threads)
    per_row = (3 + 1 + 2 + 2 + 1) * 128 / 1024 + 2 * 32 / 1024
    assert result["per_element"] == pytest.approx(loop + per_row)
    assert result["mufu"] == pytest.approx(1 / 4 + 32 / 1024)
    assert result["by_line"]["k.cu:11"] == pytest.approx(3 / 4)  # the line holds until the next mark: the BRA too


def test_forbidden_code_in_a_hot_loop_is_named():
    listing = _LISTING.replace("MUFU.EX2 R8, R4", "FCHK P0, R8, R4").replace("FFMA R1, R8, R9, R1", "STL [R1], R8")
    fn = disasm.parse(listing)["kernel"]
    result = count.analyse(count.Launch(fn, 128, 1024, lambda body: 4.0, {}))
    (loop,) = result["hot_loops"]
    assert loop["full_division"] == ["k.cu:11"] and loop["spills"] == ["k.cu:11"]
