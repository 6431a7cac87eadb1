"""One CPU measurement in a fresh process:
python -m benchmarks.probe memory SUITE PROVIDER OP SHAPE DTYPE -> {"peak_mem_bytes": N}
python -m benchmarks.probe time SUITE PROVIDER OP SHAPE DTYPE REPEATS -> {"ms": median, "correct": .., "problem": ..}
Memory is always probed alone (see measure.peak_memory_cpu); timing is for providers that would
perturb the others if they shared their process (measure.ISOLATED_PROVIDERS)."""
import json
import sys

import torch

from .cases import SUITES, parse_shape
from .measure import peak_memory_cpu_here, time_cpu


def main(kind: str, suite: str, provider: str, op: str, shape: str, dtype: str, repeats: str = "5") -> None:
    s = SUITES[suite]
    inputs = s.make_inputs(parse_shape(shape), getattr(torch, dtype), "cpu")
    setup, run = s.providers("cpu")[provider].make(op, inputs)
    setup()
    run()  # warm-up: lazy initialisation and compilation are not the op's time or memory
    if kind == "memory":
        print(json.dumps({"peak_mem_bytes": peak_memory_cpu_here((setup, run))}))
    else:
        ms = time_cpu([[(setup, run)]], int(repeats))[0]
        setup()
        correct, problem = s.check(op, run(), inputs)
        print(json.dumps({"ms": ms, "correct": correct, "problem": problem}))


if __name__ == "__main__":
    main(*sys.argv[1:])
