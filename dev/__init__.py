"""The lab apart from the lesson: the study tools behind the README's numbers and their notebook. Each runs as a
script from the repo root (python dev/series.py) or as a module (python -m dev.series):
series.py (gaps against tokens per parameter, from committed sweep packs), eval_noise.py (how much of a loss is
eval sampling), snr.py (fidelity of every GEMM; --grad: estimator.py, every recipe as a gradient estimator),
powered_sweep.sh (the powered sweep, resumable). runs/ holds every committed sweep as one pack per sweep
(tools/compare.py --pack-only) beside the table it rebuilds; LOG.md, sweep.md, evidence.md, estimator.md and
speed.md are the notebook."""
