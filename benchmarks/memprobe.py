"""One CPU peak-memory measurement in a fresh process (see measure.peak_memory_cpu):
python -m benchmarks.memprobe PROVIDER OP ROWS VOCAB DTYPE -> prints {"peak_mem_bytes": N}."""
import json
import sys

import torch

from .cases import make_inputs
from .measure import peak_memory_cpu_here
from .providers import all_providers


def main(provider: str, op: str, rows: str, vocab: str, dtype: str) -> None:
    logits, target = make_inputs(int(rows), int(vocab), getattr(torch, dtype), "cpu")
    setup, run = all_providers("cpu")[provider].make(op, logits, target)
    setup()
    run()  # warm-up: lazy initialisation and compilation are not the op's memory
    print(json.dumps({"peak_mem_bytes": peak_memory_cpu_here((setup, run))}))


if __name__ == "__main__":
    main(*sys.argv[1:])
