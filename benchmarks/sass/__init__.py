"""The static SASS issue-budget audit of fusedce's GPU kernels: python -m benchmarks.sass --help"""
