"""One CPU peak-memory measurement in a fresh process (see measure.peak_memory_cpu):
python -m benchmarks.memprobe SUITE PROVIDER OP SHAPE DTYPE -> prints {"peak_mem_bytes": N}."""
import json
import sys

import torch

from .cases import SUITES, parse_shape
from .measure import peak_memory_cpu_here


def main(suite: str, provider: str, op: str, shape: str, dtype: str) -> None:
    s = SUITES[suite]
    inputs = s.make_inputs(parse_shape(shape), getattr(torch, dtype), "cpu")
    setup, run = s.providers("cpu")[provider].make(op, inputs)
    setup()
    run()  # warm-up: lazy initialisation and compilation are not the op's memory
    print(json.dumps({"peak_mem_bytes": peak_memory_cpu_here((setup, run))}))


if __name__ == "__main__":
    main(*sys.argv[1:])
