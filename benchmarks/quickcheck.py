"""An independent check of the harness: each provider alone in a fresh process, timed by a plain loop
(perf_counter on the CPU, one CUDA event pair per call on a GPU), median of the calls after a warm-up.
It shares no code with the harness's timing, so the two can be compared.

python -m benchmarks.quickcheck [--device cpu|cuda] [--shape 4096x32000] [--dtype float32] [--calls 8]
"""
import argparse
import os
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

BACKENDS = {"cpu": ("cpu",), "cuda": ("triton", "cuda")}


def losses(device: str) -> list:
    """fusedce-<backend> for each fusedce backend that can serve the device, then torch and unfused."""
    from fusedce import backends
    names = []
    for backend in BACKENDS[device]:
        try:
            backends.resolve(backend, torch.device(device))
            names.append(f"fusedce-{backend}")
        except RuntimeError as e:
            print(f"fusedce-{backend}: skipped ({e})")
    return names + ["torch", "unfused"]


def one_provider(name: str, device: str, shape: str, dtype: str, calls: int) -> float:
    import fusedce
    if name.startswith("fusedce-"):
        def loss_fn(x, t):
            return fusedce.cross_entropy(x, t, backend=name[len("fusedce-"):])
    else:
        loss_fn = {"torch": F.cross_entropy, "unfused": fusedce.unfused_cross_entropy}[name]
    rows, vocab = (int(v) for v in shape.split("x"))
    x = torch.randn(rows, vocab, device=device, dtype=getattr(torch, dtype)).mul_(2).requires_grad_()
    t = torch.randint(0, vocab, (rows,), device=device)
    times = []
    for _ in range(calls + 1):  # the first call is the warm-up
        x.grad = None
        if device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            loss_fn(x, t).backward()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            loss_fn(x, t).backward()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times[1:])


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.quickcheck", description=__doc__)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--shape", default="4096x32000")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--calls", type=int, default=8)
    p.add_argument("--only", help=argparse.SUPPRESS)  # the child process
    args = p.parse_args()
    if args.only:
        print(one_provider(args.only, args.device, args.shape, args.dtype, args.calls))
        return
    for name in losses(args.device):
        out = subprocess.run([sys.executable, "-m", "benchmarks.quickcheck", "--only", name, "--device", args.device,
                              "--shape", args.shape, "--dtype", args.dtype, "--calls", str(args.calls)],
                             capture_output=True, text=True,
                             cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        if out.returncode != 0:  # one provider's failure does not hide the others' times
            print(f"{name:>14} failed: {(out.stderr.strip().splitlines() or ['no output'])[-1]}")
            continue
        print(f"{name:>14} forward+backward {args.shape} {args.dtype} on {args.device}: "
              f"{float(out.stdout.strip().splitlines()[-1]):.1f} ms (median of {args.calls})")


if __name__ == "__main__":
    main()
