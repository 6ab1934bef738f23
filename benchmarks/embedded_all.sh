#!/usr/bin/env bash
# Every embedded-model figure in README.md and BENCHMARKS.md, in order, from a finished training run.
#   bash benchmarks/embedded_all.sh [RUN_FOLDER]      (default runs/embedded; outputs under runs/)
# Each step resumes or overwrites its own output, so the script can be re-run after an interruption.
set -euo pipefail
cd "$(dirname "$0")/.."
run="${1:-runs/embedded}"
weights=src/adacache/embedded/weights
mkdir -p runs
# 1. the EMA weights of the checkpoint become the shipped pipeline folder
adacache train --out "$run" --export "$weights"
# 2. quality of the model, uncached (README's quality table), on the seeds of every earlier figure and on a second
# set of seeds no one looked at while training; and the probe of the direction word's sign
python benchmarks/embedded_quality.py --json runs/quality-uncached.json | tee runs/quality-uncached.txt
python benchmarks/embedded_quality.py --seeds 2 3 | tee runs/quality-uncached-seeds23.txt
python benchmarks/direction_sign.py | tee runs/direction-sign.txt
# 3. the shipped codebooks: calibrated for 2.5x wall clock at 30 and at 100 steps, checked on held-out prompts
adacache calibrate --speedup 2.5 --num-prompts 6 --check 12 -o "$weights/adacache.json" | tee runs/calibrate-30.txt
adacache calibrate --steps 100 --speedup 2.5 --num-prompts 4 --check 6 -o "$weights/adacache-100.json" \
  | tee runs/calibrate-100.txt
# the same for a compute target (BENCHMARKS.md)
adacache calibrate --compute --speedup 2.5 --num-prompts 6 --check 12 \
  -o benchmarks/codebooks/embedded-30-compute-2.5x.json | tee runs/calibrate-30-compute.txt
# 4. quality with the shipped codebook
python benchmarks/embedded_quality.py --cache "$weights/adacache.json" | tee runs/quality-cached.txt
# 5. AdaCache's fronts (reuse and forecast, several targets) and the shipped MoReg codebooks, then every peer
# against them at 30, 50 and 100 steps, the slow peers against low-speed-up codebooks, and the forecast's reach
bash benchmarks/calibrate_fronts.sh
bash benchmarks/bench_fronts.sh
bash benchmarks/bench_low.sh
python benchmarks/forecast_reach.py | tee runs/forecast-reach-30.txt
python benchmarks/forecast_reach.py --steps 100 --prompts 6 --preset opensora-100-fast | tee runs/forecast-reach-100.txt
# per-video schedules against one shared schedule, 8 prompts in one call (BENCHMARKS.md; timed: nothing else running)
python benchmarks/batch_schedules.py --repeats 5 --json runs/batch-schedules.json | tee runs/batch-schedules.txt
python benchmarks/batch_schedules.py --moreg --repeats 3 --json runs/batch-schedules-moreg.json \
  | tee runs/batch-schedules-moreg.txt
# 6. how much of each frame is background (BENCHMARKS.md), and calibration under load (10 minutes; nothing else
# may run meanwhile)
python benchmarks/background_share.py | tee runs/background-share.txt
python benchmarks/calibrate_under_load.py | tee runs/calibrate-under-load.txt
