"""Builds fusedce: the Python package, the Triton kernels (as fusedce.triton_kernels), the CPU kernels
(fusedce._C) and, where nvcc is found, the CUDA kernels (fusedce._cuda). Building needs setuptools,
pybind11 and a C++17 compiler (and nvcc for the CUDA module); not torch, and never a GPU.

Environment (each module: 1 = build it and fail the build if it does not compile, 0 = skip it,
unset = build it where possible, else warn and skip; the package then serves those tensors with its
pure-PyTorch backend):
  FUSEDCE_BUILD_CPU     the CPU module
  FUSEDCE_BUILD_CUDA    the CUDA module (unset: built when nvcc is found in CUDA_HOME/bin or on the PATH)
  FUSEDCE_CUDA_ARCHS    compute capabilities to compile for, e.g. "90" or "80;90" (default below)
  FUSEDCE_CPU_PORTABLE  1: the CPU module without its x86-64 code (the one generic kernel other
                        platforms get), so that path can be tested on x86-64
  FUSEDCE_BUILD_JOBS    parallel compiler processes (default: one per core)

Objects are kept in build/ and recompiled only when their source, a header beside it, or the
flags change. The CUDA objects do not depend on Python, so they are compiled once into
build/cuda-<flags hash>/ of the source tree (an editable install too) and linked into the module of
every Python built from this tree.
"""
import hashlib
import os
import shutil
import subprocess
import sys
import time
from glob import glob

import pybind11
from pybind11.setup_helpers import ParallelCompile, Pybind11Extension, build_ext, has_flag
from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))
# SASS for each of these that the toolkit knows, plus PTX of the newest, which later GPUs JIT-compile.
DEFAULT_CUDA_ARCHS = "80;86;89;90;100;120"


def mode(module):
    value = os.environ.get(f"FUSEDCE_BUILD_{module}", "auto")
    if value not in ("0", "1", "auto"):
        raise SystemExit(f"FUSEDCE_BUILD_{module}={value}: expected 1, 0 or unset")
    return value


def sources(folder, suffix):
    return sorted(glob(os.path.join("csrc", folder, "*" + suffix)))


def needs_recompile(obj, src):
    """Older than its source or a header of its folder or of csrc/ (the sources include only those, and
    pybind11's, whose version is part of the build folder's name)."""
    folders = (os.path.dirname(src), "csrc")
    deps = [src] + [h for f in folders for pattern in ("*.h", "*.cuh") for h in glob(os.path.join(f, pattern))]
    return os.path.getmtime(obj) < max(os.path.getmtime(d) for d in deps)


def flags_key(*parts):
    return hashlib.sha256(repr(parts).encode()).hexdigest()[:12]


def log(message):
    print(f"fusedce build: {message}", file=sys.stderr, flush=True)


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
        self.version = subprocess.run([nvcc, "--version"], check=True, capture_output=True, text=True).stdout
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

    def flags(self):
        gencode = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in self.archs]
        ptx = f"-gencode=arch=compute_{self.archs[-1]},code=compute_{self.archs[-1]}"
        # --threads 2: the architectures of one file in parallel, so the last file does not run on one core
        return ["-std=c++17", "-O3", "-Xcompiler", "-fPIC", "--threads", "2", *gencode, ptx]


class BuildExt(build_ext):
    """Builds each module into a build folder named after its flags, compiles the .cu files with nvcc,
    and removes the output of a module that is not built, so that no stale module from an earlier
    build reaches a wheel."""

    def finalize_options(self):
        super().finalize_options()
        # Link every time (seconds): setuptools would skip a module whose .so is newer than its .cpp
        # files, though a header or the flags changed. Compiling is skipped per object (needs_recompile).
        self.force = True

    def build_extensions(self):
        self.not_built = []
        super().build_extensions()
        # what is not built is no output: an editable install would try to copy it
        self.extensions = [e for e in self.extensions if e not in self.not_built]

    def build_extension(self, ext):
        module = "CUDA" if ext.name == "fusedce._cuda" else "CPU"
        if mode(module) == "0":
            return self.remove_output(ext, f"FUSEDCE_BUILD_{module}=0")
        base_temp = self.build_temp
        started = time.monotonic()
        try:
            if module == "CUDA":
                self.prepare_cuda(ext)
            else:
                ext.extra_compile_args += [f for f in ("-Wno-psabi", "-Wvector-operation-performance")
                                           if has_flag(self.compiler, f)]
            self.build_temp = os.path.join(base_temp, flags_key(
                ext.extra_compile_args, ext.define_macros, self.compiler.compiler_so, pybind11.__version__))
            super().build_extension(ext)
            log(f"{ext.name} built in {time.monotonic() - started:.0f} s (objects in {self.build_temp})")
        except Exception as e:  # noqa: BLE001  (re-raised when the module was asked for)
            if mode(module) == "1":
                raise
            self.remove_output(ext, f"{type(e).__name__}: {str(e).splitlines()[0][:300]}")
        finally:
            self.build_temp = base_temp

    def prepare_cuda(self, ext):
        """Compiles the .cu files once for every Python (they include no Python header) and adds their
        objects to the extension, whose binding (module.cpp) is then built as usual."""
        toolkit = CudaToolkit.find()
        if toolkit is None:
            raise RuntimeError("nvcc not found (set CUDA_HOME or put nvcc on the PATH)")
        shared = os.path.join(ROOT, "build", "cuda-" + flags_key(toolkit.version, toolkit.flags()))
        if ".cu" not in self.compiler.src_extensions:
            self.compiler.src_extensions.append(".cu")
        cu_files = sources("cuda", ".cu")
        stale = [src for src, obj in zip(cu_files, self.compiler.object_filenames(cu_files, output_dir=shared))
                 if not os.path.exists(obj) or needs_recompile(obj, src)]
        log(f"CUDA kernels for sm_{', sm_'.join(toolkit.archs)} in {shared}: {len(stale)} of {len(cu_files)} files "
            "to compile (minutes for the six default architectures; FUSEDCE_CUDA_ARCHS narrows them)")
        host_compile = self.compiler._compile

        def compile_cu(obj, src, ext_, cc_args, extra_postargs, pp_opts):
            if ext_ != ".cu":
                return host_compile(obj, src, ext_, cc_args, extra_postargs, pp_opts)
            log(f"nvcc {src} ...")
            started = time.monotonic()
            self.compiler.spawn([toolkit.nvcc, "-c", src, "-o", obj, *extra_postargs])
            log(f"nvcc {src} done in {time.monotonic() - started:.0f} s")

        self.compiler._compile = compile_cu
        try:
            ext.extra_objects = self.compiler.compile(cu_files, output_dir=shared, extra_postargs=toolkit.flags())
        finally:
            self.compiler._compile = host_compile
        ext.library_dirs = [toolkit.lib_dir]
        ext.define_macros = [("FUSEDCE_CUDA_ARCHS", '"' + " ".join(f"sm_{a}" for a in toolkit.archs) + '"')]

    def remove_output(self, ext, reason):
        self.not_built.append(ext)
        path = self.get_ext_fullpath(ext.name)  # where this build puts it: build/lib..., or in place
        if os.path.exists(path):
            os.remove(path)
        log(f"WARNING: {ext.name} is not built ({reason}); fusedce serves those tensors with its "
            "pure-PyTorch backend")


cpu_extension = Pybind11Extension(
    "fusedce._C",
    sources("cpu", ".cpp"),
    cxx_std=17,
    # -O3 for the vectoriser; no -march: instruction sets are chosen at run time (kernel_<isa>.cpp).
    extra_compile_args=["-O3", "-pthread", "-fno-math-errno"],
    extra_link_args=["-pthread"],
    define_macros=[("FUSEDCE_PORTABLE", "1")] if os.environ.get("FUSEDCE_CPU_PORTABLE") == "1" else [],
)

# cudart linked statically: the module needs only the driver at run time and imports without a GPU.
cuda_extension = Pybind11Extension(
    "fusedce._cuda",
    sources("cuda", ".cpp"),
    cxx_std=17,
    extra_compile_args=["-O2"],
    libraries=["cudart_static", "dl", "rt", "pthread"],
)

ParallelCompile("FUSEDCE_BUILD_JOBS", needs_recompile=needs_recompile).install()
setup(
    package_dir={"fusedce": "python/fusedce", "fusedce.triton_kernels": "triton_kernels"},
    packages=["fusedce", "fusedce.backends", "fusedce.distributed", "fusedce.integrations", "fusedce.triton_kernels"],
    ext_modules=[cpu_extension, cuda_extension],
    cmdclass={"build_ext": BuildExt},
)
