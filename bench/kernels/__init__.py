"""Kernel microbenchmarks: bench_kernels.cpp (the launchers, raw pointers) and the torch-level
bench_ops.py and bench_attention.py (scripts)."""
