#!/usr/bin/env bash
# The peers that run below AdaCache's slowest calibrated point in runs/bench-<N> (PAB, FasterCache, FirstBlockCache
# at 0.05, DBCache at 0.08, cache-dit's slow mask: 1.0-1.45x) against AdaCache codebooks calibrated for 1.15x and
# 1.3x with the forecast store, in one bench of their own per step count (BENCHMARKS.md, "Low speed-ups").
#   bash benchmarks/bench_low.sh [30 50 100]    (about 25 minutes on 2 CPU cores; nothing else may run meanwhile)
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p runs
counts="${*:-30 50 100}"
for steps in $counts; do
  case "$steps" in
    30) prompts=6; bench_prompts=12; iterations=7 ;;
    50|100) prompts=3; bench_prompts=6; iterations=6 ;;
    *) echo "step counts are 30, 50 or 100" >&2; exit 2 ;;
  esac
  mkdir -p "benchmarks/codebooks/low-$steps"
  adacache calibrate --steps "$steps" --forecast --speedup 1.15 1.3 --num-prompts "$prompts" \
    --iterations "$iterations" --check-repeats 0 -o "benchmarks/codebooks/low-$steps" 2>&1 \
    | tee "runs/calibrate-low-$steps.txt"
  low=$(ls "benchmarks/codebooks/low-$steps"/*.json | paste -sd, -)
  slowest=$(ls "benchmarks/codebooks/front-$steps"/*-forecast.json | head -1)
  adacache bench --steps "$steps" --num-prompts "$bench_prompts" --seeds 0 --no-flops --no-progress \
    -o "runs/bench-low-$steps" \
    --methods "none,pab:2,pab:3,fbc:0.05,fastercache:2,dbcache:0.08,cachedit-mask:slow,$low,$slowest" \
    | tee "runs/bench-low-$steps.txt"
done
