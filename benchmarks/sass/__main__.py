"""python -m benchmarks.sass [--json PATH] [--families triton,cuda] [--variants plain,...] [--lines N]

The static issue-budget audit: compiles every GPU kernel of fusedce for sm_90 at the launches the code
picks for the acceptance shapes (Triton's launch configuration for a faked H200, the CUDA planner's
layouts), disassembles them, counts the SASS instructions per element of their hot loops and per-row
work, and prints them against the H200 and H100 budgets. No GPU needed. See benchmarks/sass/count.py
for how the counting works and rules.py for what CI (tests/test_sass.py) holds the kernels to."""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from multiprocessing import get_context

os.environ.pop("TRITON_INTERPRET", None)  # before anything imports triton: the kernels must compile

from . import count, cuda_build, disasm, model, triton_build  # noqa: E402
from .cases import MODES, SHAPES, VARIANTS, target_size  # noqa: E402
from .rules import PINNED, check  # noqa: E402

def _triton_cases(shapes, variants):
    """(shape, mode, variant, compile key), with one compile job per distinct compile-time configuration
    (the bf16 shapes share theirs)."""
    cases, jobs = [], {}
    for shape in shapes:
        for mode in MODES:
            for variant in variants:
                launch = triton_build.launch(shape, mode, variant)
                key = (shape.dtype, tuple(sorted(launch.meta.items())))
                jobs.setdefault(key, (shape, mode, variant))
                cases.append((shape, mode, variant, launch, key))
    return cases, jobs


def _result(family, shape, mode, variant, parts):
    total = count.combine(parts)
    bpe = model.bytes_per_element(mode, shape.element_size, target_size(shape, variant))
    budgets = {g.name: g.budget(bpe) for g in model.GPUS}
    return dict(
        family=family, shape=str(shape), mode=mode, variant=variant, bytes_per_element=bpe,
        per_element=total["per_element"], by_pipe=total["by_pipe"], mufu=total["mufu"], xu=total["xu"],
        budget=budgets, ratio={n: total["per_element"] / b for n, b in budgets.items()},
        mufu_budget={g.name: g.mufu_budget(bpe) for g in model.GPUS},
        lines=count.top_lines(total["by_line"], 12), kernels=parts)


def run(families, variants, shapes=SHAPES) -> dict:
    results = []
    context = get_context("spawn")  # fresh interpreters: nothing imported in interpreter mode
    with ProcessPoolExecutor(max_workers=os.cpu_count() or 2, mp_context=context) as pool, \
            ThreadPoolExecutor(2) as threads, tempfile.TemporaryDirectory() as tmp:
        cubins = None
        if "cuda" in families:
            why = cuda_build.available()
            if why:
                raise SystemExit(f"cannot compile the CUDA kernels: {why}")
            dtypes = sorted({s.dtype for s in shapes})
            cubins = {d: threads.submit(cuda_build.compile_cubin, d, tmp) for d in dtypes}
        if "triton" in families:
            cases, jobs = _triton_cases(shapes, variants)
            compiled = {key: pool.submit(triton_build.compiled, *job) for key, job in jobs.items()}
            for shape, mode, variant, launch, key in cases:
                parts = [triton_build.analyse_compiled(compiled[key].result(), shape, launch)]
                results.append(_result("triton", shape, mode, variant, parts))
        if cubins:
            built = cuda_build.Cubins({d: f.result() for d, f in cubins.items()})
            for shape in shapes:
                for mode in MODES:
                    for variant in variants:
                        parts = cuda_build.analyse(built, shape, mode, variant)
                        results.append(_result("cuda", shape, mode, variant, parts))
    tools = dict(nvdisasm=disasm.tool_version(disasm.find_tool("nvdisasm")))
    if "triton" in families:
        tools.update(triton_build.versions())
    if "cuda" in families:
        tools.update(cuda_build.versions())
    return dict(tools=tools, pinned=PINNED, limit=model.LIMIT,
                gpus=[g._asdict() for g in model.GPUS], results=results)


def table(report: dict, lines: int) -> str:
    h200, h100 = model.H200.name, model.H100.name
    out = [f"SASS instructions per element (hot loops + per-row work), sm_90; {report['tools']}",
           "| family | shape | mode | variant | instr/elem | H200 ratio | H100 ratio | MUFU/elem (H200 budget) | "
           "fma / alu / xu / lsu / branch+barrier | costliest source lines |",
           "|---|---|---|---|---|---|---|---|---|---|"]
    for r in report["results"]:
        p = r["by_pipe"]
        top = "; ".join(f"{where} {n:.1f}" for where, n in r["lines"][:lines])
        flag = " FAIL" if check(r) else ""
        out.append(f"| {r['family']} | {r['shape']} | {r['mode']} | {r['variant']} | {r['per_element']:.1f} | "
                   f"{r['ratio'][h200]:.2f}{flag} | {r['ratio'][h100]:.2f} | "
                   f"{r['mufu']:.2f} ({r['mufu_budget'][h200]:.2f}) | "
                   f"{p['fma']:.1f} / {p['alu']:.1f} / {p['xu']:.1f} / {p['lsu']:.1f} / "
                   f"{p['branch'] + p['barrier']:.1f} | {top} |")
    return "\n".join(out)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.sass", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", help="also write the full report (every kernel, loop and source line) here")
    p.add_argument("--families", default="triton,cuda", help="comma-separated: triton,cuda (default both)")
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated subset of {','.join(VARIANTS)}")
    p.add_argument("--lines", type=int, default=3, help="source lines shown per case in the table")
    args = p.parse_args(argv)
    families = args.families.split(",")
    variants = args.variants.split(",")
    unknown = set(families) - {"triton", "cuda"} | set(variants) - set(VARIANTS)
    if unknown:
        raise SystemExit(f"unknown families or variants: {sorted(unknown)}")
    report = run(families, variants)
    for r in report["results"]:
        r["problems"] = check(r)
    print(table(report, args.lines))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
    failed = [r for r in report["results"] if r["problems"]]
    for r in failed:
        print(f"FAIL {r['family']} {r['shape']} {r['mode']} {r['variant']}: {'; '.join(r['problems'])}",
              file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
