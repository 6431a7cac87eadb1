"""python -m benchmarks.overhead [--device cpu|cuda] [--quick] [--load] [--out DIR]: the time of one call of
fusedce.cross_entropy against torch.nn.functional.cross_entropy where the logits are small (most
classifiers: the Python and dispatch cost of a call is what is measured) and at one large shape, forward
alone (no_grad) and forward + backward, fp32 and bf16, the mean loss.

The two are timed call by call, interleaved in one process, after a warm-up; medians are reported, with
the slowest call and the 99th percentile over the median (a call that waits for a descheduled thread
shows there). --load runs every case again with a busy process on one core, both providers under the
same load. On the GPU the time is the host's (the call returns before its kernels finish; the device
is synchronised between samples), which is what small logits cost there. Writes results-overhead.json."""
from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import statistics
import sys

import torch
import torch.nn.functional as F

import fusedce

from . import callpath, measure
from .__main__ import device_name, git_commit

SMALL = [(32, 10), (64, 1000), (256, 1000), (1024, 1000), (64, 32000)]
LARGE = [(4096, 32000)]
DTYPES = (torch.float32, torch.bfloat16)
PROVIDERS = {"fusedce": fusedce.cross_entropy, "torch": F.cross_entropy}


def calls(loss, logits, target, op):
    """One call of `op` (fwd: no_grad; fwd+bwd: forward then backward) of the loss function."""
    if op == "fwd":
        def run():
            with torch.no_grad():
                loss(logits, target)
    else:
        def run():
            x = logits.detach().requires_grad_()
            loss(x, target).backward()
    return run


def summary(seconds: list) -> dict:
    ordered = sorted(seconds)
    median = statistics.median(ordered)
    return {"median_us": median * 1e6, "p99_over_median": ordered[int(0.99 * (len(ordered) - 1))] / median,
            "max_over_median": ordered[-1] / median, "calls": len(ordered)}


def measure_case(shape, dtype, op, device, quick: bool) -> dict:
    g = torch.Generator(device=device).manual_seed(0)
    logits = torch.randn(shape, generator=g, device=device).to(dtype)
    target = torch.randint(0, shape[1], (shape[0],), generator=g, device=device)
    runs = {name: calls(fn, logits, target, op) for name, fn in PROVIDERS.items()}
    for run in runs.values():  # warm-up: first-call costs (imports, caches, page faults)
        for _ in range(3):
            run()
    budget = 1.0 if quick else 4.0  # seconds per case; samples from a first timing of both
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    first = measure.time_calls(runs, 2, sync)
    per_round = sum(min(t) for t in first.values())
    samples = int(max(10, min(20000, budget / max(per_round, 1e-6))))
    times = measure.time_calls(runs, samples, sync)
    stats = {name: summary(t) for name, t in times.items()}
    return {"shape": list(shape), "dtype": str(dtype)[6:], "op": op, **{n: s for n, s in stats.items()},
            "fusedce_over_torch": stats["fusedce"]["median_us"] / stats["torch"]["median_us"]}


def table(records) -> str:
    lines = ["| shape | dtype | op | load | fusedce us | torch us | fusedce / torch | fusedce max / median | "
             "torch max / median |", "|---|---|---|---|---|---|---|---|---|"]
    for r in records:
        f, t = r["fusedce"], r["torch"]
        lines.append(f"| {r['shape'][0]}x{r['shape'][1]} | {r['dtype']} | {r['op']} | {r['load']} | "
                     f"{f['median_us']:.1f} | {t['median_us']:.1f} | {r['fusedce_over_torch']:.2f}x | "
                     f"{f['max_over_median']:.1f} | {t['max_over_median']:.1f} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.overhead", description=__doc__)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--quick", action="store_true", help="a second per case instead of four (about a minute)")
    p.add_argument("--load", action="store_true", help="also measure with a busy process on one core")
    p.add_argument("--out", default=os.path.join("benchmarks", "out"))
    args = p.parse_args(argv)
    shapes = SMALL + ([] if args.quick else LARGE)
    cases = [(s, d, op) for s in shapes for d in DTYPES for op in ("fwd", "fwd+bwd")
             if s in SMALL or (d == torch.float32 and op == "fwd+bwd")]
    loads = ["quiet"] + (["one core busy"] if args.load else [])
    records = []
    for load in loads:
        with measure.BusyCore() if load != "quiet" else contextlib.nullcontext():
            for shape, dtype, op in cases:
                record = measure_case(shape, dtype, op, args.device, args.quick)
                record["load"] = load
                records.append(record)
                print(table([record]).splitlines()[-1], flush=True)
    counts = {op: callpath.count(run) for op, run in callpath.cases(32, 10, torch.float32, "auto").items()}
    result = {"suite": "overhead", "device": device_name(args.device), "torch": torch.__version__,
              "threads": torch.get_num_threads(), "commit": git_commit(),
              "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "command": "python -m benchmarks.overhead " + " ".join(sys.argv[1:] if argv is None else argv),
              "call_path_32x10": counts, "records": records}
    print(table(records))
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "results-overhead.json")
    with open(path, "w") as f:
        json.dump(result, f, indent=1)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
