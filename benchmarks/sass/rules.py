"""What CI (tests/test_sass.py) holds each audited case to, and what the counts are pinned to."""
from __future__ import annotations

from . import count, model
from .cases import Shape

# What the counts depend on. Another Triton or nvcc compiles other SASS, and so other counts: rerun
# `python -m benchmarks.sass`, read the table (and fix what broke) before moving the pin; the CI test skips
# on other versions rather than judge code it was not written for.
PINNED = {"triton": "3.9.0", "nvcc": "release 13.0"}


def check(result: dict) -> list:
    """What a case breaks (empty: it passes).
    - The plain options (the common case): instructions per element within model.LIMIT of the H200
      budget, MUFU within its own budget, and loops that stream the row without a branch but their own (a
      per-element branch, say on the target's column, is what the budget cannot afford).
    - Every case: no spills in a hot loop, and no software log or full-range division in one that streams
      part of the row (a loop whose iteration takes the thread's whole share of the row, the
      register-cached kernels' loop over rows, holds the per-row work, where they belong).
    - Triton, plain options: each hot loop moves its elements in 16-byte loads (a loop that ptxas unrolled,
      or whose loads it split, would be counted wrongly, and run slower)."""
    problems = []
    h200 = model.H200.name
    plain = result["variant"] == "plain"
    if plain and result["ratio"][h200] > model.LIMIT:
        problems.append(f"{result['per_element']:.1f} instructions per element, {result['ratio'][h200]:.2f} of the "
                        f"H200 budget {result['budget'][h200]:.1f} (limit {model.LIMIT})")
    if plain and result["mufu"] > result["mufu_budget"][h200]:
        problems.append(f"{result['mufu']:.2f} MUFU per element, over the H200 budget "
                        f"{result['mufu_budget'][h200]:.2f}")
    vec = 16 // Shape.from_string(result["shape"]).element_size
    for kernel in result["kernels"]:
        where = kernel["function"]
        for loop in kernel["hot_loops"]:
            for what in count.HOT_LOOP_FORBIDDEN:
                if loop[what] and (what == "spills" or not loop["per_row"]):
                    problems.append(f"{what.replace('_', ' ')} in a hot loop of {where} at {', '.join(loop[what])}")
            if plain and not loop["per_row"] and loop["branches"]:
                problems.append(f"{loop['branches']} branches in a hot loop of {where}")
            if plain and result["family"] == "triton" and loop["loads_16_byte"] * vec != loop["elements_per_iteration"]:
                problems.append(f"a hot loop of {where} loads {loop['loads_16_byte']} x 16 bytes for "
                                f"{loop['elements_per_iteration']:g} elements a thread")
    return problems
