"""python check_native.py [CUDA_ARCHS]: exercises an installed wheel's compiled modules without torch
(CI has torch for one Python only; the modules link no torch library, so they need none). Loads
fusedce._C and fusedce._cuda from the installed package without importing the package itself (its
__init__ imports torch), runs the CPU kernels' forward and backward on a small problem and compares
them with float64 computed here; checks the CUDA module's architectures, and that without a GPU it
raises a clear error rather than crashing. CUDA_ARCHS: what the CUDA module must have been built for
("sm_80 sm_90"); omit it for a wheel without the CUDA module."""
import array
import importlib.machinery
import importlib.util
import math
import os
import random
import sys
import sysconfig


def load(package_dir, name):
    path = os.path.join(package_dir, name + sysconfig.get_config_var("EXT_SUFFIX"))
    if not os.path.exists(path):
        raise SystemExit(f"{path} is not in the installed wheel")
    loader = importlib.machinery.ExtensionFileLoader(f"fusedce.{name}", path)
    module = importlib.util.module_from_spec(importlib.util.spec_from_file_location(f"fusedce.{name}", path,
                                                                                   loader=loader))
    loader.exec_module(module)
    return module


def addr(buf):
    return buf.buffer_info()[0]


def check_cpu(C):
    rows, vocab, ignore = 37, 1031, -100  # uneven sizes: vector tails and partial blocks
    rng = random.Random(0)
    logits = array.array("f", (rng.gauss(0, 3) for _ in range(rows * vocab)))
    target = array.array("q", (rng.randrange(vocab) for _ in range(rows)))
    target[5] = ignore
    loss, lse = array.array("f", [math.nan] * rows), array.array("f", [math.nan] * rows)
    grad_loss = array.array("f", [0.5] * rows)
    dlogits = array.array("f", [math.nan] * (rows * vocab))
    mean = array.array("f", [math.nan])
    fp32 = C.DTYPES["float32"]
    # the positional arguments of csrc/cpu/module.cpp: logits, sizes, target, weight, options
    common = (addr(logits), vocab, rows, vocab, fp32, addr(target), False, 0, 0, 0, ignore, 0.0, 0.0, 0.0)
    none, reduced = C.REDUCTIONS.index("none"), C.REDUCTIONS.index("mean")
    C.forward(*common, none, addr(loss), fp32, addr(lse), 0, 0, 0, 0, 2)  # per-row loss and lse
    C.forward(*common, reduced, addr(mean), fp32, 0, 0, 0, 0, 0, 2)  # the mean, reduced by the kernel
    # a whole row: class_start 0, classes vocab, no given target mass
    C.backward(*common, 0, vocab, addr(grad_loss), 1, addr(lse), 0, addr(dlogits), vocab, 2)
    worst = 0.0
    ref_total, counted = 0.0, 0
    for r in range(rows):
        x = logits[r * vocab:(r + 1) * vocab]
        m = max(x)
        ref_lse = m + math.log(math.fsum(math.exp(v - m) for v in x))
        t = target[r]
        ref_loss = 0.0 if t == ignore else ref_lse - x[t]
        ref_total, counted = ref_total + ref_loss, counted + (t != ignore)
        worst = max(worst, abs(loss[r] - ref_loss), abs(lse[r] - ref_lse))
        for j in range(vocab):
            ref = 0.0 if t == ignore else 0.5 * (math.exp(x[j] - ref_lse) - (j == t))
            worst = max(worst, abs(dlogits[r * vocab + j] - ref))
    worst = max(worst, abs(mean[0] - ref_total / counted))
    if not worst < 1e-4:  # fp32 kernels against float64: a few ulp of values of order 10
        raise SystemExit(f"fusedce._C disagrees with float64 by {worst:.3g}")
    print(f"fusedce._C ok: isa {C.isa()}, forward, mean and backward within {worst:.1e} of float64")


def check_cuda(cuda, archs):
    if cuda.archs != archs:
        raise SystemExit(f"fusedce._cuda was built for {cuda.archs!r}, expected {archs!r}")
    try:
        info = cuda.device_info(0)
        print(f"fusedce._cuda ok: built for {cuda.archs}; device 0: {info}")
    except RuntimeError as e:  # no GPU or no driver here: the statically linked cudart says so
        if "fusedce CUDA kernels" not in str(e):
            raise
        print(f"fusedce._cuda ok: built for {cuda.archs}; without a GPU: {e}")


def main():
    package_dir = importlib.util.find_spec("fusedce").submodule_search_locations[0]
    check_cpu(load(package_dir, "_C"))
    if len(sys.argv) > 1:
        check_cuda(load(package_dir, "_cuda"), sys.argv[1])
    elif os.path.exists(os.path.join(package_dir, "_cuda" + sysconfig.get_config_var("EXT_SUFFIX"))):
        raise SystemExit("the wheel has a CUDA module it should not have")


if __name__ == "__main__":
    main()
