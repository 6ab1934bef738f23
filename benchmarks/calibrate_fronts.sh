#!/usr/bin/env bash
# The AdaCache operating points the bench compares against every peer (BENCHMARKS.md): codebooks calibrated on
# the embedded model for several wall-clock targets at 30, 50 and 100 steps, with plain reuse and with the
# forecast store, written to benchmarks/codebooks/front-<steps>/ (one file per target), and the MoReg codebooks
# shipped with the model (weights/adacache[-<steps>]-moreg.json), which `auto+moreg` uses.
#   bash benchmarks/calibrate_fronts.sh [30 50 100]   (about an hour on 2 CPU cores; logs under runs/)
#   MODEL=deep bash benchmarks/calibrate_fronts.sh 30 50   (the deep model: compute-speed-up targets, which read no
#                                                           clock, into benchmarks/codebooks/deep-front-<steps>/;
#                                                           no MoReg codebook ships for it)
# Fewer prompts and bisection steps at the higher step counts keep it under an hour; the bench then measures every
# codebook on prompts it was not calibrated on.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p runs
weights=src/adacache/embedded/weights
counts="${*:-30 50 100}"
model="${MODEL:-small}"
if [ "$model" = small ]; then option=""; prefix="front"; compute=""
else option="--model $model"; prefix="$model-front"; compute="--compute"; fi
for steps in $counts; do
  case "$steps" in
    30) targets="1.5 2 2.5 3 3.5"; prompts=6; iterations=7 ;;
    50) targets="1.5 2.5 3.5"; prompts=3; iterations=6 ;;
    100) targets="1.5 3 5"; prompts=3; iterations=6 ;;
    *) echo "step counts are 30, 50 or 100" >&2; exit 2 ;;
  esac
  for store in reuse forecast; do
    flag=""; [ "$store" = forecast ] && flag="--forecast"
    adacache calibrate $option --steps "$steps" $flag $compute --speedup $targets --num-prompts "$prompts" \
      --iterations "$iterations" --check-repeats 0 -o "benchmarks/codebooks/$prefix-$steps" 2>&1 \
      | tee "runs/calibrate-$prefix-$steps-$store.txt"
  done
done
[ "$model" = small ] || exit 0
# MoReg with its normalisation measured on this model, shipped for `auto+moreg` (30 and 100 steps), at 2.5x in
# compute (what the shipped plain codebook, calibrated at 2.5x wall clock, computes: 12 of 30 steps)
adacache calibrate --moreg --compute --speedup 2.5 --num-prompts 4 --iterations 6 --check-repeats 0 \
  -o "$weights/adacache-moreg.json" 2>&1 | tee runs/calibrate-30-moreg-shipped.txt
adacache calibrate --moreg --compute --steps 100 --speedup 2.5 --num-prompts 3 --iterations 6 --check-repeats 0 \
  -o "$weights/adacache-100-moreg.json" 2>&1 | tee runs/calibrate-100-moreg-shipped.txt
