"""Benchmarks: `python -m bench [SUITE ...] [--quick]`, or `make bench`.

Each suite measures a baseline in the same run and prints ratios against it: the machines are
shared and noisy, so absolute numbers say little on their own. Timings never go into tests.
"""
