"""How the CPU kernels' threading holds up, with the kernels called directly (fusedce._native, not the
Python layer) and F.cross_entropy interleaved with them call by call in one process:

    python -m benchmarks.cpu_threads [--busy] [--shapes 64x10,4096x32000] [--dtypes float32,bfloat16]
        [--ops fwd,fwd+bwd,fused] [--baseline PATH/_C.cpython-*.so]

Per shape, dtype and op: the median of each, torch's median over fusedce's, and the slowest call over
its median ("worst"). --busy runs another process that keeps one core busy for the whole run (what a
data loader or a second job does to a training process), so both are measured under the same load.
"others" is the CPU time that other processes (and the hypervisor, as steal time) took during the
case, in cores: where it is not about 0 (quiet) or 1 (--busy), something else disturbed that case.
--baseline times another build of the CPU module too (e.g. the commit before a change), interleaved
with the others, so that both builds see the same load: the fairest before/after on a shared machine."""
from __future__ import annotations

import argparse
import importlib.machinery
import importlib.util
import os
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

from fusedce import _native
from fusedce.options import Options, accumulation_dtype

SHAPES = "32x10,64x10,128x10,64x1000,256x1000,1024x1000,128x4096,64x32000,256x32000,4096x32000"
SECONDS_PER_CASE = 2.0  # each provider's share of a case; at least MIN_CALLS calls
MIN_CALLS = 8


def load_module(path):
    """Another build of fusedce._C, under a name of its own (its init function is PyInit__C either way)."""
    loader = importlib.machinery.ExtensionFileLoader("baseline._C", path)
    module = importlib.util.module_from_spec(importlib.util.spec_from_loader("baseline._C", loader))
    loader.exec_module(module)
    return module


def with_module(module, fn):
    """fn with fusedce._native calling `module` instead of its own build."""
    def call():
        own, _native._C = _native._C, module
        try:
            fn()
        finally:
            _native._C = own
    return call


def fusedce_call(op, logits, target):
    acc = accumulation_dtype(logits.dtype)
    rows = logits.shape[0]
    loss, lse = torch.empty(rows, dtype=acc), torch.empty(rows, dtype=acc)
    if op == "fwd":
        _native.forward(logits, target, None, Options(), loss, lse)
        return
    grad_loss = torch.full((rows,), 1 / rows, dtype=acc)
    dlogits = torch.empty_like(logits)
    if op == "fused":
        _native.forward(logits, target, None, Options(), loss, lse, grad_loss, dlogits)
    else:
        _native.forward(logits, target, None, Options(), loss, lse)
        _native.backward(grad_loss, logits, target, None, lse, Options(), dlogits)


def torch_call(op, logits, target):
    if op == "fwd":
        with torch.no_grad():
            F.cross_entropy(logits, target)
        return
    x = logits.detach().requires_grad_()
    F.cross_entropy(x, target).backward()


class OtherLoad:
    """Cores' worth of CPU time taken by everything but this process and `mine` (/proc, Linux only)."""

    def __init__(self, mine):
        self.pids = [os.getpid()] + [p.pid for p in mine]
        self.start = self.sample()

    def sample(self):
        try:
            with open("/proc/stat") as f:
                fields = [int(v) for v in f.readline().split()[1:]]
            busy = sum(fields) - fields[3] - fields[4]  # all but idle and iowait, steal included
            ours = 0
            for pid in self.pids:
                with open(f"/proc/{pid}/stat") as f:
                    stat = f.read().rsplit(")", 1)[1].split()
                ours += int(stat[11]) + int(stat[12])  # utime + stime
            return time.monotonic(), busy - ours
        except OSError:
            return None

    def cores(self) -> str:
        end = self.sample()
        if end is None or self.start is None:
            return "-"
        ticks = os.sysconf("SC_CLK_TCK")
        value = (end[1] - self.start[1]) / ticks / (end[0] - self.start[0])
        self.start = end
        return f"{value:.2f}"


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


def measure(shape, dtype, op, baseline=None):
    rows, vocab = shape
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(rows, vocab, generator=g).mul_(2).to(dtype)
    target = torch.randint(0, vocab, (rows,), generator=g)
    calls = {"fusedce": lambda: fusedce_call(op, logits, target), "torch": lambda: torch_call(op, logits, target)}
    if baseline is not None:
        calls["baseline"] = with_module(baseline, calls["fusedce"])
    first = {name: min(timed(fn) for _ in range(2)) for name, fn in calls.items()}  # warm-up and an estimate
    n = max(MIN_CALLS, int(SECONDS_PER_CASE * 1e3 / max(first.values())))
    samples = {name: [] for name in calls}
    for _ in range(n):
        for name, fn in calls.items():
            samples[name].append(timed(fn))
    return {name: (statistics.median(s), max(s)) for name, s in samples.items()}, n


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks.cpu_threads", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--busy", action="store_true", help="keep one core busy with another process meanwhile")
    p.add_argument("--shapes", default=SHAPES)
    p.add_argument("--dtypes", default="float32,bfloat16")
    p.add_argument("--ops", default="fwd,fwd+bwd,fused")
    p.add_argument("--baseline", help="another build's _C*.so to time beside this one")
    args = p.parse_args(argv)
    baseline = load_module(args.baseline) if args.baseline else None
    busy = subprocess.Popen([sys.executable, "-c", "while True: pass"]) if args.busy else None
    try:
        others = OtherLoad([busy] if busy else [])
        print(f"threads {torch.get_num_threads()}, isa {_native.isa()}, {'one core busy' if busy else 'quiet'}")
        print(f"{'shape':>11} {'dtype':>9} {'op':>8} {'calls':>6} {'fusedce ms':>11} {'worst':>6} "
              f"{'torch ms':>10} {'worst':>6} {'torch/fusedce':>14} {'others':>7}"
              + (f" {'baseline ms':>12} {'worst':>6}" if baseline else ""))
        for shape in args.shapes.split(","):
            for dtype in args.dtypes.split(","):
                for op in args.ops.split(","):
                    r, n = measure(tuple(int(v) for v in shape.split("x")), getattr(torch, dtype), op, baseline)
                    (fm, fx), (tm, tx) = r["fusedce"], r["torch"]
                    line = (f"{shape:>11} {dtype:>9} {op:>8} {n:>6} {fm:>11.3f} {fx / fm:>5.1f}x "
                            f"{tm:>10.3f} {tx / tm:>5.1f}x {tm / fm:>13.2f}x {others.cores():>7}")
                    if baseline:
                        bm, bx = r["baseline"]
                        line += f" {bm:>12.3f} {bx / bm:>5.1f}x"
                    print(line, flush=True)
    finally:
        if busy:
            busy.kill()
            busy.wait()


if __name__ == "__main__":
    main()
