"""End-to-end benchmarks (bench_*.py, scripts) and the libraries they share."""
