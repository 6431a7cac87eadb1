"""python -m benchmarks [--suite ce|linear] [--device cpu|cuda] [--quick] [--out DIR] [--providers ...]
[--exclude ...] [--shapes ...] [--dtypes ...] [--ops ...]: time, throughput (effective bandwidth for
cross-entropy, FLOP/s for linear + cross-entropy), peak memory and correctness of every provider on
this machine; prints a table and writes results-<suite>.json and PNG plots into --out."""
from __future__ import annotations

import argparse
import datetime
import importlib
import math
import os
import platform
import subprocess
import sys

import torch

from . import cases, measure, report
from .providers import OPS

# Modules whose suites register themselves with cases.register (a new suite's module goes here).
SUITE_MODULES = ("benchmarks.cases",)
for _module in SUITE_MODULES:
    importlib.import_module(_module)
# Left out of --quick on the CPU unless named with --providers: each would take most of its time.
SLOW_ON_CPU = {"torch-compile": "compiling takes minutes",
               "fusedce-torch": "the pure-PyTorch fallback takes a minute at the quick shape"}


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    p.add_argument("--suite", choices=sorted(cases.SUITES) + ["parallel"], default="ce",
                   help="ce: cross-entropy on logits; linear: fused linear + cross-entropy; parallel: the "
                   "vocab-parallel loss over gloo (benchmarks/parallel.py: --shapes, --repeats, --out) (default: ce)")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--quick", action="store_true", help="a small set (on a 2-core CPU: " + ", ".join(
        f"{name} under {s.quick_minutes} minutes" for name, s in sorted(cases.SUITES.items())) + ")")
    p.add_argument("--out", default=os.path.join("benchmarks", "out"),
                   help="directory for results-<suite>.json and the plots (default: benchmarks/out)")
    p.add_argument("--providers", help="comma-separated provider names (default: all that can run)")
    p.add_argument("--exclude", help="comma-separated provider names to leave out")
    p.add_argument("--shapes", help="comma-separated ROWSxVOCAB (ce) or TOKENSxHIDDENxVOCAB (linear); "
                   "SHAPE:DTYPE measures that shape in DTYPE only")
    p.add_argument("--dtypes", help="comma-separated: float32,bfloat16,float16")
    p.add_argument("--ops", help=f"comma-separated subset of {','.join(OPS)} (linear: fwd,fwd+bwd)")
    p.add_argument("--repeats", type=int, help="timed repeats per case (default 25 on GPU, 5 on CPU)")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurements")
    return p.parse_args(argv)


def device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    model = platform.processor() or "cpu"
    try:
        with open("/proc/cpuinfo") as f:
            model = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{model} ({os.cpu_count()} cores, {torch.get_num_threads()} threads)"


def git_commit() -> str:
    """HEAD, or FUSEDCE_COMMIT where there is no repository (the GPU machine gets a copy of the files)."""
    if os.environ.get("FUSEDCE_COMMIT"):
        return os.environ["FUSEDCE_COMMIT"]
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                              cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip() or "unknown"
    except OSError:
        return "unknown"


def triton_version():
    try:
        import triton
        return triton.__version__
    except ImportError:
        return None


class Progress:
    def __init__(self, total: int):
        self.total, self.done = total, 0

    def step(self, label: str) -> None:
        self.done += 1
        width = 30
        filled = width * self.done // max(self.total, 1)
        sys.stderr.write(f"\r[{'#' * filled}{'.' * (width - filled)}] {self.done}/{self.total} {label:<50}")
        sys.stderr.flush()
        if self.done == self.total:
            sys.stderr.write("\n")


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def parse_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise SystemExit(f"unknown dtype {name!r}: expected one of {sorted(DTYPES)}")
    return DTYPES[name]


def select_configs(args, suite, device):
    """(shape, dtype) pairs: each shape in each dtype, but an entry SHAPE:DTYPE in DTYPE only, so shapes that
    come in one dtype each (the issues' acceptance shapes) are measured side by side in one run."""
    dtypes = ([parse_dtype(d) for d in args.dtypes.split(",")] if args.dtypes
              else (suite.quick_dtypes if args.quick else suite.dtypes)[device])
    if not args.shapes:
        return [(shape, d) for shape in cases.default_shapes(suite, device, args.quick) for d in dtypes]
    configs = []
    for entry in args.shapes.split(","):
        shape, _, dtype = entry.partition(":")
        configs += [(cases.parse_shape(shape), d) for d in ([parse_dtype(dtype)] if dtype else dtypes)]
    return configs


def select(args, suite, device):
    configs = select_configs(args, suite, device)
    ops = args.ops.split(",") if args.ops else list(suite.ops)
    unknown = set(ops) - set(suite.ops)
    if unknown:
        raise SystemExit(f"unknown ops {sorted(unknown)}: expected some of {suite.ops}")
    available = suite.providers(device)
    wanted = args.providers.split(",") if args.providers else list(available)
    excluded = args.exclude.split(",") if args.exclude else []
    for name in wanted + excluded:
        if name not in available:
            raise SystemExit(f"unknown provider {name!r}: expected some of {sorted(available)}")
    wanted = [n for n in wanted if n not in excluded]
    chosen = {n: available[n] for n in wanted if not isinstance(available[n], str)}
    skipped = [{"provider": n, "reason": available[n]} for n in wanted if isinstance(available[n], str)]
    return configs, ops, chosen, skipped


class ContextLost(RuntimeError):
    """A CUDA error left the process's context unusable: nothing after it can run in this process."""


def run_config(suite, shape, dtype, ops, providers, device, repeats, memory, progress, records, skipped):
    """Measures every (provider, op) on one shape and dtype, appending a record per case as it is done."""
    size = suite.logits_bytes(shape, dtype)
    # rotate over input copies that together exceed the L2 cache (50 MB on H100) on the GPU
    n_copies = 1 if device == "cpu" else max(1, min(4, math.ceil(150e6 / size)))
    inputs = [suite.make_inputs(shape, dtype, device, seed=i) for i in range(n_copies)]
    jobs = [(name, op) for name, p in providers.items() for op in ops if op in p.ops]
    labels = [f"{name} {op} {cases.shape_label(shape)} {str(dtype)[6:]}" for name, op in jobs]
    built = [[providers[name].make(op, x) for x in inputs] for name, op in jobs]
    checked_apart = {}  # job index -> (correct, problem), for jobs measured in a process of their own

    def finish(i, ms):
        """Checks job i against float64, measures its peak memory and records it."""
        name, op = jobs[i]
        setup, run = built[i][0]
        loss = None
        if i in checked_apart:  # running it here would slow the providers measured after it
            ok, problem = checked_apart[i]
        else:
            setup()
            out = run()
            ok, problem = suite.check(op, out, inputs[0])
            loss = None if op == "bwd" else float(out if op == "fwd" else out[0])
            del out
        peak = None
        if memory:
            peak = (measure.peak_memory_gpu(built[i][0]) if device == "cuda"
                    else measure.peak_memory_cpu(suite.name, name, op, shape, dtype))
        records.append({"provider": name, "op": op, "shape": list(shape), "dtype": str(dtype)[6:], "ms": ms,
                        suite.metric[0]: suite.throughput(op, shape, dtype, ms), "peak_mem_bytes": peak,
                        "logits_bytes": size, "loss": loss, "correct": ok, "problem": problem})

    if device == "cpu":
        shared = [i for i, (name, _) in enumerate(jobs) if name not in measure.ISOLATED_PROVIDERS]
        times = [None] * len(jobs)
        for i, ms in zip(shared, measure.time_cpu([built[i] for i in shared], repeats)):
            times[i] = ms
        for i, (name, op) in enumerate(jobs):
            if name in measure.ISOLATED_PROVIDERS:
                times[i], ok, problem = measure.time_cpu_isolated(suite.name, name, op, shape, dtype, repeats)
                checked_apart[i] = (ok, problem)
        for i, ms in enumerate(times):
            progress.step(labels[i])
            finish(i, ms)
    else:  # one job at a time, so that only one holds GPU memory; one's failure costs only its own record
        for i, (name, _) in enumerate(jobs):
            progress.step(labels[i])
            problem = None
            try:
                finish(i, measure.time_gpu(built[i], repeats))
            except torch.cuda.OutOfMemoryError:
                problem = f"out of memory at {labels[i]}"
            except Exception as e:  # noqa: BLE001  (a provider's own error, reported as its skip reason)
                problem = f"{type(e).__name__} at {labels[i]}: {str(e).strip().splitlines()[0][:300]}"
            built[i] = None  # its closures hold the leaves and their last gradient, as large as the logits
            if problem:
                skipped.append({"provider": name, "reason": problem})
                torch.cuda.empty_cache()
                if not measure.gpu_usable():
                    raise ContextLost(f"CUDA context lost in provider {name}: {problem}")
    built.clear()
    inputs.clear()
    if device == "cuda":
        torch.cuda.empty_cache()


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.suite == "parallel":  # processes of its own over gloo: not the per-provider harness below
        from . import parallel
        return parallel.main([*(["--shape", args.shapes] if args.shapes else []), "--out", args.out,
                              *(["--repeats", str(args.repeats)] if args.repeats else [])])
    device = args.device
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available")
    repeats = args.repeats or (25 if device == "cuda" else 5)
    suite = cases.SUITES[args.suite]
    configs, ops, providers, skipped = select(args, suite, device)
    if device == "cpu" and args.quick and not args.providers:
        for name in SLOW_ON_CPU.keys() & providers.keys():
            skipped.append({"provider": name, "reason": f"--quick on the CPU: {SLOW_ON_CPU[name]}"})
            del providers[name]
    total = sum(len([op for op in ops if op in p.ops]) for p in providers.values()) * len(configs)
    progress = Progress(total)
    # the yardstick of the suite's metric, measured in this run: copy bandwidth, or a plain matmul's FLOP/s
    peaks = {str(d)[6:]: suite.peak(device, d, repeats) for d in dict.fromkeys(d for _, d in configs)}
    records = []
    interrupted = lost = None
    try:
        for shape, dtype in configs:
            run_config(suite, shape, dtype, ops, providers, device, repeats, not args.no_memory, progress, records,
                       skipped)
    except KeyboardInterrupt:  # a time limit (benchmarks/gpu_session.sh sends SIGINT): keep what was measured
        interrupted = f"interrupted with {len(records)} of {total} measurements done"
    except ContextLost as e:  # keep what was measured; a new process can measure the rest
        interrupted = lost = f"{e}; stopped with {len(records)} of {total} measurements done"
    if interrupted:
        print(f"\n{interrupted}", file=sys.stderr)
    result = {"suite": suite.name, "baselines": list(suite.baselines),
              "device": device_name(device), "metric": list(suite.metric), "peaks": peaks, "torch": torch.__version__,
              "triton": triton_version(), "commit": git_commit(),
              "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "command": "python -m benchmarks " + " ".join(sys.argv[1:] if argv is None else argv),
              "records": records, "skipped": skipped}
    if interrupted:
        result["interrupted"] = interrupted
    os.makedirs(args.out, exist_ok=True)
    print(report.table(result))
    path = os.path.join(args.out, f"results-{suite.name}.json")
    report.write_json(result, path)
    print(f"wrote {path}")
    for png in report.plots(result, args.out):
        print(f"wrote {png}")
    if not all(r["correct"] for r in records if r["provider"].startswith("fusedce")):
        raise SystemExit("a fusedce provider gave a wrong result (see the table)")
    if interrupted:
        raise SystemExit(3 if lost else 130)  # 3: benchmarks/gpu_session.sh runs the rest without that provider


if __name__ == "__main__":
    main()
