"""Timing, peak memory and correctness of one benchmark case.

GPU: CUDA events around each call, warm-up first, the median of many repeats, inputs rotated over
copies that together exceed the L2 cache so small shapes are not flattered, and L2 overwritten after
each untimed setup. CPU: perf_counter medians with the cases interleaved (a slow phase of the machine
hits every provider alike).
Peak memory: on the GPU torch.cuda.max_memory_allocated after a reset; on the CPU the peak resident
set (VmHWM, reset through /proc/self/clear_refs) of a fresh subprocess per case (probe.py), so no
provider's freed-but-cached memory hides another's. Both are the peak over what existed before the
timed call (inputs, and for "bwd" the forward's saved state)."""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

Case = Tuple[Callable, Callable]  # (setup, run)


def time_cpu(cases: Sequence[Sequence[Case]], repeats: int, warmup: int = 1) -> List[float]:
    """Median milliseconds per case; each case is a list of (setup, run) input copies, cycled."""
    samples: List[List[float]] = [[] for _ in cases]
    for r in range(warmup + repeats):
        for i, copies in enumerate(cases):
            setup, run = copies[r % len(copies)]
            setup()
            t0 = time.perf_counter()
            run()
            elapsed = time.perf_counter() - t0
            if r >= warmup:
                samples[i].append(elapsed * 1e3)
    return [statistics.median(s) for s in samples]


def time_calls(runs: Dict[str, Callable], calls: int, before: Callable = lambda: None) -> Dict[str, List[float]]:
    """Seconds of each of `calls` calls of each run, the runs alternating call by call (their order
    flipped every round), so that a slow phase of the machine hits each alike; before() runs untimed
    before every call (a device sync, say)."""
    names = list(runs)
    seconds: Dict[str, List[float]] = {name: [] for name in names}
    for i in range(calls):
        for name in names if i % 2 == 0 else names[::-1]:
            before()
            t0 = time.perf_counter()
            runs[name]()
            seconds[name].append(time.perf_counter() - t0)
    return seconds


class BusyCore:
    """Another process keeping one core busy for the duration of a `with` block: what a data loader or a
    second job does to a training process."""

    def __enter__(self):
        self.process = subprocess.Popen([sys.executable, "-c", "while True: pass"])
        time.sleep(0.5)  # until it runs
        return self

    def __exit__(self, *exc):
        self.process.kill()
        self.process.wait()


class OtherLoad:
    """Cores' worth of CPU time taken by everything but this process and `mine` (/proc, Linux only): about
    0 on a quiet machine, 1 with a BusyCore; anything else means that something else disturbed a case."""

    def __init__(self, mine=()):
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

    def cores(self) -> Optional[float]:
        """Since the last call (or the start)."""
        end = self.sample()
        if end is None or self.start is None:
            return None
        value = (end[1] - self.start[1]) / os.sysconf("SC_CLK_TCK") / max(end[0] - self.start[0], 1e-9)
        self.start = end
        return value


def time_gpu(copies: Sequence[Case], repeats: int, warmup: int = 3) -> float:
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(repeats)]
    # overwritten after each setup, so that what setup touched (the forward before a timed backward) is
    # read from memory by the timed call, not from L2
    l2_flush = torch.empty(256 << 20, dtype=torch.uint8, device="cuda")
    for r in range(warmup + repeats):
        setup, run = copies[r % len(copies)]
        setup()
        l2_flush.zero_()
        if r >= warmup:
            events[r - warmup][0].record()
        run()
        if r >= warmup:
            events[r - warmup][1].record()
    torch.cuda.synchronize()
    return statistics.median(start.elapsed_time(end) for start, end in events)


def gpu_usable() -> bool:
    """False once a CUDA error (an illegal address, say) has left this process's context unusable."""
    try:
        torch.cuda.synchronize()
        torch.zeros(1, device="cuda").add_(1).item()
        return True
    except RuntimeError:
        return False


def peak_memory_gpu(case: Case) -> int:
    setup, run = case
    setup()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    result = run()
    torch.cuda.synchronize()
    del result
    return torch.cuda.max_memory_allocated() - base


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def peak_memory_cpu_here(case: Case) -> int:
    """Run inside a fresh process (probe.py): peak RSS of the timed call over the RSS before it."""
    setup, run = case
    setup()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current RSS
    base = _status_kb("VmRSS")
    result = run()
    peak = _status_kb("VmHWM")
    del result
    return (peak - base) * 1024


# Once torch.compile has run in a CPU process, eager torch ops in that process slow down (measured:
# F.cross_entropy fwd+bwd at 4096 x 32000 fp32 took 1265 ms beside torch-compile, 452 ms without), so
# these providers are timed in a process of their own rather than interleaved with the others.
ISOLATED_PROVIDERS = ("torch-compile",)


def _probe(kind: str, suite: str, provider: str, op: str, shape, dtype: torch.dtype, *extra) -> dict:
    """Runs benchmarks/probe.py in a fresh process and returns what it printed."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    cmd = [sys.executable, "-m", "benchmarks.probe", kind, suite, provider, op, "x".join(map(str, shape)),
           str(dtype).replace("torch.", ""), *map(str, extra)]
    proc = subprocess.run(cmd, cwd=root, capture_output=True, text=True, timeout=1800,
                          env=dict(os.environ, OMP_NUM_THREADS=str(torch.get_num_threads())))
    if proc.returncode != 0:
        raise RuntimeError(f"{kind} probe failed: {proc.stderr.strip().splitlines()[-1:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def peak_memory_cpu(suite: str, provider: str, op: str, shape, dtype: torch.dtype) -> int:
    return _probe("memory", suite, provider, op, shape, dtype)["peak_mem_bytes"]


def time_cpu_isolated(suite: str, provider: str, op: str, shape, dtype: torch.dtype, repeats: int):
    """(median ms, correct, problem) measured and checked in a process of its own."""
    out = _probe("time", suite, provider, op, shape, dtype, repeats)
    return out["ms"], out["correct"], out["problem"]


# ---- correctness --------------------------------------------------------------------------------

TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 3e-2, torch.float16: 3e-3}


def _reference_chunk(logits64: torch.Tensor, target: torch.Tensor, rows: int, with_grad: bool):
    """Summed loss of a chunk of float64 logits, and its dlogits for the "mean" over `rows` rows."""
    loss_sum = (torch.logsumexp(logits64, 1) - logits64.gather(1, target[:, None])[:, 0]).sum()
    if not with_grad:
        return loss_sum, None
    d = torch.softmax(logits64, 1)
    d[torch.arange(len(target), device=d.device), target] -= 1
    return loss_sum, d.div_(rows)


def _relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """Largest deviation as a fraction of the reference's largest magnitude."""
    return ((actual.double() - expected).abs().max() / expected.abs().max().clamp_min(1e-30)).item()


def _verdict(loss, total, rows: int, grad_error, tol: float) -> Tuple[bool, str]:
    problems = []
    if loss is not None:
        ref = (total / rows).item()
        rel = abs(loss.double().item() - ref) / max(abs(ref), 1e-30)
        if not rel <= tol:
            problems.append(f"loss {loss.item():.6g} vs {ref:.6g} (off by {rel:.1e}, relative)")
    if grad_error is not None and not grad_error <= tol:
        problems.append(f"gradient off by {grad_error:.1e} of its largest element")
    return not problems, "; ".join(problems)


def _chunk_rows(vocab: int) -> int:
    return max(1, (256 << 20) // (8 * vocab))  # 256 MiB of float64 logits at a time


def check_against_float64(op: str, result, logits: torch.Tensor, target: torch.Tensor) -> Tuple[bool, str]:
    """Compares a provider's loss and/or gradient ("mean" reduction) with float64, a chunk of rows at a
    time so the reference never holds the whole problem in float64."""
    loss, grad = (result, None) if op == "fwd" else (None, result) if op == "bwd" else result
    rows, vocab = logits.shape
    total = torch.zeros((), dtype=torch.float64, device=logits.device)
    worst = 0.0
    for start in range(0, rows, _chunk_rows(vocab)):
        stop = start + _chunk_rows(vocab)
        loss_sum, ref = _reference_chunk(logits[start:stop].double(), target[start:stop], rows, grad is not None)
        total += loss_sum
        if ref is not None:
            worst = max(worst, _relative_error(grad[start:stop], ref))
    return _verdict(loss, total, rows, worst if grad is not None else None, TOLERANCE[logits.dtype])


def check_linear_against_float64(op: str, result, x: torch.Tensor, w: torch.Tensor,
                                 target: torch.Tensor) -> Tuple[bool, str]:
    """Loss and gradients of input and weight of cross_entropy(x @ w.T, target) ("mean") against float64,
    a chunk of tokens at a time."""
    loss, grads = (result, None) if op == "fwd" else result
    tokens, vocab = x.shape[0], w.shape[0]
    w64 = w.double()
    total = torch.zeros((), dtype=torch.float64, device=x.device)
    grad_w = torch.zeros_like(w64) if grads is not None else None
    worst_x = 0.0
    for start in range(0, tokens, _chunk_rows(vocab)):
        stop = start + _chunk_rows(vocab)
        xc = x[start:stop].double()
        loss_sum, d = _reference_chunk(xc @ w64.t(), target[start:stop], tokens, grads is not None)
        total += loss_sum
        if d is not None:
            worst_x = max(worst_x, _relative_error(grads[0][start:stop], d @ w64))
            grad_w += d.t() @ xc
    grad_error = max(worst_x, _relative_error(grads[1], grad_w)) if grads is not None else None
    return _verdict(loss, total, tokens, grad_error, TOLERANCE[x.dtype])
