#!/usr/bin/env bash
# Issue 21's runs: AdaCache without calibration (its settings, with and without MoReg) beside the model's
# calibrated front (where it has one) and, at 30 steps, every peer at its own default setting; then the targets
# table (benchmarks/calibration_free.py). All 36 prompts (4 still, 16 slow, 16 fast), seed 0.
#   bash benchmarks/calibration_free.sh embedded 30 50 100     (the shipped model; reports under runs/cf-<model>-<N>)
#   bash benchmarks/calibration_free.sh deep 30 50 100         (the deep model: its fronts from
#                                                               MODEL=deep bash benchmarks/calibrate_fronts.sh)
#   PROMPTS=12 bash benchmarks/calibration_free.sh deep 100    (12 of the 36 prompts, every third: 1 still, 6 slow, 5 fast)
# Nothing else may run meanwhile if the wall-clock columns matter; the targets use compute speed-ups only.
set -euo pipefail
cd "$(dirname "$0")/.."
model="${1:-embedded}"; shift || true
counts="${*:-30 50 100}"
free="speedup:1.5,default,speedup:2.5,speedup:3,default+moreg,speedup:3+moreg"
peers="fbc,pab,taylorseer,fastercache,magcache,dbcache,cachedit-mask"
for steps in $counts; do
  option=""; [ "$model" = embedded ] || option="--model $model"  # the embedded models by name
  front=""; fronts="benchmarks/codebooks/front-$steps"; [ "$model" = embedded ] || fronts="benchmarks/codebooks/$model-front-$steps"
  if [ -d "$fronts" ]; then  # the calibrated front: plain reuse (and, on the deep model, the forecast store too)
    pattern="*x.json"; [ "$model" = embedded ] || pattern="*.json"
    front=",$(ls "$fronts"/$pattern | paste -sd, -)"
  fi
  shipped=""  # the shipped model's codebook and its MoReg codebook (30 and 100 steps), as auto picks them
  if [ "$model" = embedded ] && [ "$steps" != 50 ]; then shipped=",auto,auto+moreg"; fi
  subset=""; [ -z "${PROMPTS:-}" ] || subset="--num-prompts $PROMPTS"
  if [ "$steps" = 30 ]; then
    # peers need the FLOP-counting pass for their compute speed-up
    adacache bench $option --steps "$steps" --seeds 0 --no-progress --methods "none,$free$front$shipped,$peers" $subset \
      -o "runs/cf-$model-$steps" > "runs/cf-$model-$steps.txt"
  else
    adacache bench $option --steps "$steps" --seeds 0 --no-flops --no-progress --methods "none,$free$front$shipped" $subset \
      -o "runs/cf-$model-$steps" > "runs/cf-$model-$steps.txt"
  fi
done
python benchmarks/calibration_free.py $(for steps in $counts; do echo "runs/cf-$model-$steps"; done)
