"""Builds fusedce: the Python package, the Triton kernels (as fusedce.triton_kernels), the CPU kernels
(fusedce._C) and, where nvcc is found, the CUDA kernels (fusedce._cuda). Building needs setuptools,
pybind11 and a C++ compiler (and nvcc for the CUDA module); not torch, and never a GPU.

Environment:
  FUSEDCE_BUILD_CUDA=1  build the CUDA module, and fail the build if it does not compile
  FUSEDCE_BUILD_CUDA=0  skip it
  (unset)               build it when nvcc is found (CUDA_HOME/bin or PATH); if that fails, warn and skip
  FUSEDCE_CUDA_ARCHS    compute capabilities to compile for, e.g. "90" or "80;90" (default below)
"""
import os
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

from pybind11.setup_helpers import Pybind11Extension, build_ext
from setuptools import setup

# SASS for each of these that the toolkit knows, plus PTX of the newest, which later GPUs JIT-compile.
DEFAULT_CUDA_ARCHS = "80;86;89;90;100;120"
JOBS = os.cpu_count() or 1
CUDA_MODE = os.environ.get("FUSEDCE_BUILD_CUDA", "auto")


def sources(folder, suffix):
    return sorted(os.path.join("csrc", folder, f) for f in os.listdir(os.path.join("csrc", folder)) if f.endswith(suffix))


def run_parallel(fn, items):
    with ThreadPoolExecutor(JOBS) as pool:
        return list(pool.map(fn, items))


class CudaToolkit:
    """Where nvcc is and what it can target."""

    def __init__(self, nvcc):
        self.nvcc = nvcc
        candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"),
                      os.path.dirname(os.path.dirname(os.path.realpath(nvcc))), "/usr/local/cuda"]
        self.lib_dir = next((os.path.join(c, "lib64") for c in candidates if c and os.path.exists(
            os.path.join(c, "lib64", "libcudart_static.a"))), None)
        if self.lib_dir is None:
            raise RuntimeError(f"libcudart_static.a not found next to {nvcc}; set CUDA_HOME")
        known = subprocess.run([nvcc, "--list-gpu-code"], check=True, capture_output=True, text=True).stdout.split()
        wanted = os.environ.get("FUSEDCE_CUDA_ARCHS", DEFAULT_CUDA_ARCHS).replace(",", ";").split(";")
        self.archs = [a.strip() for a in wanted if f"sm_{a.strip()}" in known]
        if not self.archs:
            raise RuntimeError(f"nvcc knows none of the requested architectures {wanted}")

    @staticmethod
    def find():
        home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
        nvcc = os.path.join(home, "bin", "nvcc") if home else shutil.which("nvcc")
        return CudaToolkit(nvcc) if nvcc and os.path.exists(nvcc) else None

    def gencode_flags(self):
        flags = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in self.archs]
        return flags + [f"-gencode=arch=compute_{self.archs[-1]},code=compute_{self.archs[-1]}"]

    def compile(self, source, build_temp):
        obj = os.path.join(build_temp, os.path.basename(source) + ".o")
        os.makedirs(build_temp, exist_ok=True)
        cmd = [self.nvcc, "-c", source, "-o", obj, "-std=c++17", "-O3", "-Xcompiler", "-fPIC", "--threads", "2",
               *self.gencode_flags()]
        print(" ".join(cmd), flush=True)
        subprocess.run(cmd, check=True)
        return obj


class ParallelBuildExt(build_ext):
    """Compiles the sources of an extension in parallel (the CI machine has 2 cores), and the .cu files
    of the CUDA module with nvcc."""

    def build_extensions(self):
        original_compile = self.compiler.compile

        def parallel_compile(srcs, *args, **kwargs):
            return [o for objs in run_parallel(lambda s: original_compile([s], *args, **kwargs), srcs) for o in objs]

        self.compiler.compile = parallel_compile
        super().build_extensions()

    def build_extension(self, ext):
        if ext.name != "fusedce._cuda":
            return super().build_extension(ext)
        try:
            toolkit = CudaToolkit.find()
            if toolkit is None:
                raise RuntimeError("nvcc not found (set CUDA_HOME or put nvcc on the PATH)")
            ext.extra_objects = run_parallel(lambda s: toolkit.compile(s, self.build_temp), sources("cuda", ".cu"))
            ext.library_dirs = [toolkit.lib_dir]
            ext.define_macros = [("FUSEDCE_CUDA_ARCHS", '"' + " ".join(f"sm_{a}" for a in toolkit.archs) + '"')]
            super().build_extension(ext)
        except Exception as e:  # noqa: BLE001  (re-raised when the CUDA build was asked for)
            if CUDA_MODE == "1":
                raise
            print(f"WARNING: fusedce is built without its CUDA kernels: {e}", file=sys.stderr, flush=True)


cpu_extension = Pybind11Extension(
    "fusedce._C",
    sources("cpu", ".cpp"),
    cxx_std=17,
    # -O3 for the vectoriser; no -march: instruction sets are chosen at run time (kernel_<isa>.cpp).
    extra_compile_args=["-O3", "-fopenmp", "-fno-math-errno", "-Wno-psabi", "-Wvector-operation-performance"],
    extra_link_args=["-fopenmp"],
)

# cudart linked statically: the module needs only the driver at run time and imports without a GPU.
cuda_extension = Pybind11Extension(
    "fusedce._cuda",
    sources("cuda", ".cpp"),
    cxx_std=17,
    extra_compile_args=["-O2"],
    libraries=["cudart_static", "dl", "rt", "pthread"],
)

setup(
    package_dir={"fusedce": "python/fusedce", "fusedce.triton_kernels": "triton_kernels"},
    packages=["fusedce", "fusedce.backends", "fusedce.integrations", "fusedce.triton_kernels"],
    ext_modules=[cpu_extension] + ([cuda_extension] if CUDA_MODE != "0" else []),
    cmdclass={"build_ext": ParallelBuildExt},
)
