"""How the CPU kernels' threading holds up, with the kernels called directly (fusedce.backends.cpu, not
the public API) and F.cross_entropy interleaved with them call by call in one process:

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
import contextlib
import importlib.machinery
import importlib.util
import statistics
import time

import torch
import torch.nn.functional as F

from fusedce.backends import cpu
from fusedce.options import Options

from . import measure

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
    """fn with fusedce's CPU backend calling `module` instead of its own build."""
    def call():
        own, cpu._C = cpu._C, module
        try:
            fn()
        finally:
            cpu._C = own
    return call


def fusedce_call(op, logits, target):
    """The mean loss (fwd), with its gradient in the same pass (fused), or then in a backward pass."""
    kernels = cpu.BACKEND
    if op == "fwd":
        kernels.reduced(logits, target, None, Options(), "mean", logits.dtype)
    elif op == "fused":
        kernels.reduced(logits, target, None, Options(), "mean", logits.dtype, torch.empty_like(logits))
    else:
        _, lse = kernels.forward(logits, target, None, Options())
        grad_loss = torch.full((logits.shape[0],), 1 / logits.shape[0], dtype=lse.dtype)
        kernels.backward(grad_loss, logits, target, None, lse, Options())


def torch_call(op, logits, target):
    if op == "fwd":
        with torch.no_grad():
            F.cross_entropy(logits, target)
        return
    x = logits.detach().requires_grad_()
    F.cross_entropy(x, target).backward()


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


def measure_case(shape, dtype, op, baseline=None):
    rows, vocab = shape
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(rows, vocab, generator=g).mul_(2).to(dtype)
    target = torch.randint(0, vocab, (rows,), generator=g)
    calls = {"fusedce": lambda: fusedce_call(op, logits, target), "torch": lambda: torch_call(op, logits, target)}
    if baseline is not None:
        calls["baseline"] = with_module(baseline, calls["fusedce"])
    first = {name: min(timed(fn) for _ in range(2)) for name, fn in calls.items()}  # warm-up and an estimate
    n = max(MIN_CALLS, int(SECONDS_PER_CASE * 1e3 / max(first.values())))
    samples = measure.time_calls(calls, n)
    return {name: (statistics.median(s) * 1e3, max(s) * 1e3) for name, s in samples.items()}, n


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
    with measure.BusyCore() if args.busy else contextlib.nullcontext() as busy:
        others = measure.OtherLoad([busy.process] if busy else [])
        print(f"threads {torch.get_num_threads()}, isa {cpu._C.isa()}, {'one core busy' if busy else 'quiet'}")
        print(f"{'shape':>11} {'dtype':>9} {'op':>8} {'calls':>6} {'fusedce ms':>11} {'worst':>6} "
              f"{'torch ms':>10} {'worst':>6} {'torch/fusedce':>14} {'others':>7}"
              + (f" {'baseline ms':>12} {'worst':>6}" if baseline else ""))
        for shape in args.shapes.split(","):
            for dtype in args.dtypes.split(","):
                for op in args.ops.split(","):
                    r, n = measure_case(tuple(int(v) for v in shape.split("x")), getattr(torch, dtype), op, baseline)
                    (fm, fx), (tm, tx) = r["fusedce"], r["torch"]
                    load = others.cores()
                    line = (f"{shape:>11} {dtype:>9} {op:>8} {n:>6} {fm:>11.3f} {fx / fm:>5.1f}x "
                            f"{tm:>10.3f} {tx / tm:>5.1f}x {tm / fm:>13.2f}x {'-' if load is None else f'{load:.2f}':>7}")
                    if baseline:
                        bm, bx = r["baseline"]
                        line += f" {bm:>12.3f} {bx / bm:>5.1f}x"
                    print(line, flush=True)


if __name__ == "__main__":
    main()
