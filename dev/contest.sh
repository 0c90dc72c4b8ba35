#!/usr/bin/env bash
# A recipe of our own against Quartet II (issue 30): this lab's candidates, tetrajet-eden, tetrajet-eden+oc and
# quartet2+oc (compare.py's CONFIGS; docs/numerics.md §13; dev/sweep.md §9), at the main table's protocol (dev/sweep.md: 2 blocks, the fixed eval
# set), paired per seed with the committed runs of quartet2, tetrajet+all, nvidia and the baseline:
#   1. l2-1400 (7.3 tokens per parameter), the six seeds of the main table: the pilot, whose paired spread of
#      candidate - quartet2 sizes the seeds needed to resolve 0.005 at 2 s.e. (n >= (2 sd / 0.005)^2)
#   2. l2-4000 (21 tokens per parameter), the same six seeds, then as many more as step 1 says, for every config
#
#   bash dev/contest.sh          # run or resume, 2 runs at a time (resumable as powered_sweep.sh is)
#
# 2 runs at a time, one thread each, eager: the fastest setting that logs the same numbers (dev/speed.md).
set -euo pipefail
case "${1:-}" in -h|--help) sed -n '2,/^set -euo/p' "$0" | grep "^#" | cut -c3-; exit 0;; esac
cd "$(dirname "$0")/.."

SEEDS="1337 1338 1339 1340 1341 1342"
COMMON="--n-layer 2 --eval-set fixed --eval-iters 64"
for steps in 1400 4000; do
    if [ ! -d "runs/l2-$steps" ]; then      # the main table's runs, then the contest's finished ones
        python tools/compare.py --unpack --out "runs/l2-$steps" --pack "dev/runs/l2-$steps.jsonl.gz"
        if [ -f "dev/runs/contest-l2-$steps.jsonl.gz" ]; then
            python tools/compare.py --unpack --out "runs/l2-$steps" --pack "dev/runs/contest-l2-$steps.jsonl.gz"
        fi
    fi
done
python tools/compare.py --out runs/l2-1400 --configs baseline nvidia quartet2 tetrajet+all tetrajet-eden \
    tetrajet-eden+oc quartet2+oc --versus quartet2 nvidia --seeds $SEEDS --parallel 2 -- $COMMON --max-iters 1400 --eval-interval 350
for seeds in "${SEEDS% * * *}" "$SEEDS"; do  # three seeds of every config first: a paired table as early as possible
    python tools/compare.py --out runs/l2-4000 --configs baseline nvidia quartet2 tetrajet-eden tetrajet-eden+oc \
        tetrajet+all quartet2+oc --versus quartet2 nvidia --seeds $seeds --parallel 2 -- $COMMON --max-iters 4000 --eval-interval 1000
done
