"""The lab's tools, each runnable as a script (python tools/compare.py) or a module (python -m tools.compare):
bench.py (speed of every FP4 path), compare.py (recipe sweeps with error bars), snr.py (fidelity of every GEMM)."""
