#!/usr/bin/env bash
# Where the FP4 loss goes (issue 29): each recipe with only its forward in FP4 and with only its backward, and
# TetraJet-v2 with one backward GEMM at a time, at the main table's protocol (dev/sweep.md: 2 blocks, 1,400 steps,
# 7.3 tokens per parameter, the fixed eval set, seeds 1337-1342). The full recipes and the baseline are the
# committed runs of dev/runs/l2-1400 (unpacked into runs/l2-1400 first): every difference is paired per seed.
#
#   bash dev/attribution.sh          # run or resume, 2 runs at a time
# Pack what has finished (dev/runs/attribution.{jsonl.gz,md}: the runs to commit) with compare.py --report-only over
# the finished configs and seeds (their --config flags as below), then --pack-only --pack dev/runs/attribution.jsonl.gz.
#
# Resumable as powered_sweep.sh is: runs with a done.json are skipped, a cut-off run restarts from its checkpoint.
# Three seeds of every config first, then three more, so that a cut-off session leaves whole paired sets behind.
set -euo pipefail
case "${1:-}" in -h|--help) sed -n '2,/^set -euo/p' "$0" | grep "^#" | cut -c3-; exit 0;; esac
cd "$(dirname "$0")/.."

COMMON="--n-layer 2 --eval-set fixed --eval-iters 64 --max-iters 1400 --eval-interval 350"
CONFIGS=(
    "nvidia-fwd=--fp4 --fp4-recipe nvidia[gemms=fprop]"          "nvidia-bwd=--fp4 --fp4-recipe nvidia[gemms=dgrad+wgrad]"
    "tetrajet-fwd=--fp4 --fp4-recipe tetrajet[gemms=fprop]"      "tetrajet-bwd=--fp4 --fp4-recipe tetrajet[gemms=dgrad+wgrad]"
    "quartet2-fwd=--fp4 --fp4-recipe quartet2[gemms=fprop]"      "quartet2-bwd=--fp4 --fp4-recipe quartet2[gemms=dgrad+wgrad]"
    "tetrajet-dgrad=--fp4 --fp4-recipe tetrajet[gemms=dgrad]"    "tetrajet-wgrad=--fp4 --fp4-recipe tetrajet[gemms=wgrad]"
)
TABLE="baseline nvidia nvidia-fwd nvidia-bwd tetrajet tetrajet-fwd tetrajet-bwd tetrajet-dgrad tetrajet-wgrad
       quartet2 quartet2-fwd quartet2-bwd"

if [ ! -d runs/l2-1400 ]; then          # the committed runs: the main table's, then this sweep's finished ones
    python tools/compare.py --unpack --out runs/l2-1400 --pack dev/runs/l2-1400.jsonl.gz
    if [ -f dev/runs/attribution.jsonl.gz ]; then
        python tools/compare.py --unpack --out runs/l2-1400 --pack dev/runs/attribution.jsonl.gz
    fi
fi
run() {     # run SEEDS CONFIG...: the named configs (their flags above) at these seeds
    local seeds=$1; shift
    local args=()
    for spec in "${CONFIGS[@]}"; do
        for name in "$@"; do if [ "${spec%%=*}" = "$name" ]; then args+=(--config "$spec"); fi; done
    done
    python tools/compare.py --out runs/l2-1400 --configs baseline --seeds $seeds --parallel 2 \
        "${args[@]}" -- $COMMON
}
FWD_BWD="nvidia-fwd nvidia-bwd tetrajet-fwd tetrajet-bwd quartet2-fwd quartet2-bwd"
run "1337 1338 1339" $FWD_BWD
run "1337 1338 1339" tetrajet-dgrad tetrajet-wgrad
run "1340 1341 1342" $FWD_BWD
run "1340 1341 1342" tetrajet-dgrad tetrajet-wgrad
