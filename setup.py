"""Builds fusedce: the Python package, the Triton kernels (as fusedce.triton_kernels) and the CPU
kernels (fusedce._C). Building needs setuptools, pybind11 and a C++ compiler; not torch."""
import os
from concurrent.futures import ThreadPoolExecutor

from pybind11.setup_helpers import Pybind11Extension, build_ext
from setuptools import setup

CPU_SOURCES = sorted(os.path.join("csrc", "cpu", f) for f in os.listdir(os.path.join("csrc", "cpu")) if f.endswith(".cpp"))


class ParallelBuildExt(build_ext):
    """Compiles the sources of an extension in parallel (the CI machine has 2 cores)."""

    def build_extensions(self):
        jobs = os.cpu_count() or 1
        original_compile = self.compiler.compile

        def parallel_compile(sources, *args, **kwargs):
            with ThreadPoolExecutor(jobs) as pool:
                objects = pool.map(lambda s: original_compile([s], *args, **kwargs), sources)
            return [o for objs in objects for o in objs]

        self.compiler.compile = parallel_compile
        super().build_extensions()


cpu_extension = Pybind11Extension(
    "fusedce._C",
    CPU_SOURCES,
    cxx_std=17,
    # -O3 for the vectoriser; no -march: instruction sets are chosen at run time (kernel_<isa>.cpp).
    extra_compile_args=["-O3", "-fopenmp", "-fno-math-errno", "-Wno-psabi", "-Wvector-operation-performance"],
    extra_link_args=["-fopenmp"],
)

setup(
    package_dir={"fusedce": "python/fusedce", "fusedce.triton_kernels": "triton_kernels"},
    packages=["fusedce", "fusedce.backends", "fusedce.triton_kernels"],
    ext_modules=[cpu_extension],
    cmdclass={"build_ext": ParallelBuildExt},
)
