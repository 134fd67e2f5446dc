"""fastgen's benchmarks: kernels/ (microbenchmarks) and e2e/ (end to end, against Hugging Face
transformers). Each bench_*.py is a script, and no script imports another: what they share is
in the libraries common.py (every benchmark) and e2e/presets.py, hf_baseline.py, roofline.py
and synthetic_gsm8k.py (end to end). tests/bench/test_layout.py holds them to that."""
