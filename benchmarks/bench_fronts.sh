#!/usr/bin/env bash
# AdaCache at every calibrated target (plain reuse and forecast) against every peer, at 30, 50 and 100 steps, on
# the embedded model (BENCHMARKS.md). Run benchmarks/calibrate_fronts.sh first. Nothing else may run meanwhile.
#   bash benchmarks/bench_fronts.sh [30 50 100]     (about 25 minutes on 2 CPU cores; reports under runs/bench-<N>)
set -euo pipefail
cd "$(dirname "$0")/.."
counts="${*:-30 50 100}"
for steps in $counts; do
  front=$(ls benchmarks/codebooks/front-$steps/*.json | paste -sd, -)
  defaults=$(python -c "from adacache.evaluation.methods import default_methods; print(','.join(default_methods($steps)))")
  case "$steps" in
    30) extra=""; prompts=12 ;;
    50) extra=""; prompts=6 ;;
    100) extra=",taylorseer:6,fbc:0.2,dbcache:0.5"; prompts=6 ;;  # peers up to AdaCache's speed-ups
  esac
  # no FLOP-counting pass (it doubles the run): the compute speed-up is read off the computed steps
  adacache bench --steps "$steps" --num-prompts "$prompts" --seeds 0 --no-flops --no-progress \
    --methods "$defaults,$front$extra" -o "runs/bench-$steps" | tee "runs/bench-$steps.txt"
done
