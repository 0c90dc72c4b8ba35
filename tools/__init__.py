"""The tools a learner runs, each as a script (python tools/compare.py) or a module (python -m tools.compare):
bench.py (speed of every FP4 path), compare.py (recipe sweeps with error bars; a finished sweep packed into one
file). The study tools behind the README's numbers live in dev/."""
