"""fusedce benchmarks: python -m benchmarks --help"""
