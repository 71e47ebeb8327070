"""Benchmarks: the exact-reference benchmark of solvers and tables (:mod:`bench.exact`, also
``python -m solvers.bench``) and the GPU latency benchmark (``bench/gpu_latency.py``)."""
