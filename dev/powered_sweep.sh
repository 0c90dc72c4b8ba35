#!/usr/bin/env bash
# The powered recipe sweep of dev/sweep.md: why these sizes, budgets and seeds is the power calculation there.
#
#   bash dev/powered_sweep.sh            # run (or resume) every stage in order, 2 runs at a time
#
# Every stage is one tools/compare.py sweep in runs/l2-STEPS/, so rerunning this script on any machine resumes:
# a budget's folder starts as the runs of its committed pack (dev/runs/l2-STEPS.jsonl.gz, unpacked), runs with a
# done.json are skipped (their logs are the results), an interrupted run restarts from its checkpoint if this
# machine has it, else from scratch. A budget's finished sweep is packed back into dev/runs/ (the pack and its
# table, dev/runs/l2-STEPS.md): the files to commit. The model is the tiny preset cut to 2 blocks (0.39M
# parameters) so that a 2-core CPU reaches ~21 tokens per parameter; every run evaluates the same 1,024 fixed val
# windows. Stages, cheapest and most needed first (a cut-off session still leaves whole stages behind):
#   1. l2-500   baseline, nvidia, tetrajet, quartet2 at 500 steps (1.0M tokens, 2.6 per parameter): the low end
#               of the tokens-per-parameter series, and the pilot whose paired spread sizes the rest
#   2. l2-1400  every config at 1,400 steps (2.9M tokens, 7.3 per parameter): the main table; the series'
#               four configs first, then the rest in the order the README's claims need them
#   3. l2-4000  baseline, nvidia, tetrajet, quartet2 at 4,000 steps (8.2M tokens, 21 per parameter)
# Then the series table and plot (dev/series.py over the three packs: dev/runs/l2-series.md and .png), and last:
#   4. l2-1400  tetrajet+oc-random, OutControl's control (as many MXFP8 channels, drawn at random): 6 runs, then the
#               main table with every config in the README's order
set -euo pipefail
case "${1:-}" in -h|--help) sed -n '2,/^set -euo/p' "$0" | grep "^#" | cut -c3-; exit 0;; esac
cd "$(dirname "$0")/.."

SEEDS="1337 1338 1339 1340 1341 1342"
COMMON="--n-layer 2 --eval-set fixed --eval-iters 64"
CORE="baseline nvidia tetrajet quartet2"
REST="nvidia-4over6 mxfp4 tetrajet+osci tetrajet+oc tetrajet+all tetrajet-rtn2 nvidia-w1x16-4over6 nvidia-paper"
TABLE="baseline nvidia nvidia-paper nvidia-4over6 nvidia-w1x16-4over6 mxfp4 tetrajet tetrajet+osci tetrajet+oc
       tetrajet+oc-random tetrajet+all tetrajet-rtn2 quartet2"     # the main table's rows, in the README's order

sweep() {   # sweep STEPS CONFIGS...: one compare.py sweep at STEPS steps (4 evals, plus the one at step 0)
    local steps=$1; shift
    if [ ! -d "runs/l2-$steps" ] && [ -f "dev/runs/l2-$steps.jsonl.gz" ]; then
        python tools/compare.py --unpack --out "runs/l2-$steps" --pack "dev/runs/l2-$steps.jsonl.gz"
    fi
    python tools/compare.py --out "runs/l2-$steps" --configs "$@" --seeds $SEEDS --parallel 2 \
        -- $COMMON --max-iters "$steps" --eval-interval $((steps / 4))
}
pack() {    # pack STEPS: the table of the budget's last sweep, and its runs, into dev/runs/l2-STEPS.{jsonl.gz,md}
    python tools/compare.py --out "runs/l2-$1" --pack-only --pack "dev/runs/l2-$1.jsonl.gz"
}

sweep 500 $CORE && pack 500
sweep 1400 $CORE
sweep 1400 baseline $REST
sweep 1400 $CORE $REST && pack 1400     # nothing left to run: stage 2's table, packed for the series
sweep 4000 $CORE && pack 4000
python dev/series.py dev/runs/l2-500 dev/runs/l2-1400 dev/runs/l2-4000 --out dev/runs/l2-series --seeds $SEEDS \
    --configs $CORE
sweep 1400 $TABLE && pack 1400  # stage 4 (only the control is left to run), then the whole main table
