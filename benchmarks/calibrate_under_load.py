"""Two wall-clock calibrations of the embedded model, one beside CPU-heavy processes and one without: same codebook?

`adacache calibrate --speedup X` turns the wall-clock target into a compute target once, through a cost model
measured from interleaved samples of whole computed and skipped steps (medians), and then bisects on computed
steps, which no clock sways. So two calibrations of one model under different load should give codebooks whose
compute speed-ups are within 5% of each other. This script runs the calibration machinery twice in one process
(the same pipeline, prompts, seeds and settings): once with `--load` processes spinning on integer arithmetic
beside it (started just before, killed just after, whatever happens), once without. It prints both codebooks,
their compute speed-ups, the measured cost of a skipped step, the timed checks, and the relative difference in
compute. The run without added load is only quiet if nothing else is using the machine.

    python benchmarks/calibrate_under_load.py      # 30 steps, 2.5x, 3 prompts, 7 bisection steps
    python benchmarks/calibrate_under_load.py --steps 20 --num-prompts 2 --iterations 4 --check-repeats 1  # quicker

About 34 generations per calibration at the defaults: on two otherwise idle cores (2 s per 30-step generation) a
minute for the quiet one and a few for the loaded one (the load slowed generations about threefold in the one run
made so far, on a machine others were using)."""

from __future__ import annotations

import argparse
import contextlib
import json
import subprocess
import sys
import time
from typing import Any, Iterator

SPIN = "x = 1\nwhile True:\n    x = (x * 1103515245 + 12345) % 2147483648\n"


@contextlib.contextmanager
def cpu_load(processes: int) -> Iterator[list[subprocess.Popen]]:
    """`processes` Python processes spinning on arithmetic for the duration of the block; each is killed (by its
    own handle) and waited for on the way out, also after an error or Ctrl-C."""
    spinners: list[subprocess.Popen] = []
    try:
        for _ in range(processes):
            spinners.append(subprocess.Popen([sys.executable, "-c", SPIN], stdout=subprocess.DEVNULL,
                                             stderr=subprocess.DEVNULL))
        time.sleep(0.5)  # let them get going
        yield spinners
    finally:
        for process in spinners:
            process.kill()
        for process in spinners:
            process.wait()


def calibrate_once(pipe: Any, prompts: list[str], args: argparse.Namespace, load: int) -> dict[str, Any]:
    from adacache.evaluation.calibrate import Calibrator

    label = f"beside {load} CPU-heavy processes" if load else "without added load"
    print(f"\n== calibration {label} ==", flush=True)
    calibrator = Calibrator(pipe, prompts, seeds=[0], steps=args.steps, guidance=4.0,
                            progress=lambda message: print("  " + message, flush=True))
    start = time.perf_counter()
    with cpu_load(load):
        result = calibrator.calibrate(speedup=args.speedup, iterations=args.iterations,
                                      check_repeats=args.check_repeats)
    return {"label": label, "load": load, "seconds": time.perf_counter() - start,
            "codebook": {float(k): int(v) for k, v in result.config.codebook.items()}, "about": result.about}


def describe(run: dict[str, Any], steps: int) -> list[str]:
    about = run["about"]
    reached, cost = about["reached"], about["cost_model"]
    check = about.get("wall_check")
    lines = [
        f"{run['label']} ({run['seconds']:.0f} s)",
        "  codebook: {" + ", ".join(f"{k:.4g}: {v}" for k, v in run["codebook"].items()) + "}",
        f"  computed steps {reached['computed_steps']:.2f}/{steps}, compute speed-up {reached['compute_speedup']:.3f}x "
        f"(goal {about['compute_goal']:.3f}x), predicted wall {reached.get('predicted_wall_speedup', 0):.2f}x",
    ]
    for kind in ("computed", "skipped"):
        c = cost[kind]
        lines.append(f"  {kind} step: median {1000 * c['median_seconds']:.2f} ms, interquartile spread "
                     f"{c['spread']:.0%}, min {1000 * c['min_seconds']:.2f} ms, max {1000 * c['max_seconds']:.2f} ms, "
                     f"{c['samples']} samples")
    lines.append(f"  skip cost c = {cost['skip_cost']:.4f}")
    if check:
        measured = check["measured_wall_speedup"]
        lines.append(f"  timed check ({check['repeats']} + {check['repeats']} runs): measured "
                     f"{measured:.2f}x wall, predicted {check['predicted_wall_speedup']:.2f}x "
                     f"({check['relative_difference']:+.0%}, {'agrees' if check['agrees'] else 'DISAGREES'})")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--speedup", type=float, default=2.5, help="wall-clock target (default 2.5)")
    parser.add_argument("--num-prompts", type=int, default=3, help="calibration prompts from the embedded set")
    parser.add_argument("--iterations", type=int, default=7, help="bisection steps (default 7)")
    parser.add_argument("--check-repeats", type=int, default=3, help="timed runs of each kind in the final check")
    parser.add_argument("--load", type=int, default=2, help="CPU-heavy processes beside the loaded run (default 2)")
    parser.add_argument("--loaded-first", action="store_true", help="run the loaded calibration first")
    parser.add_argument("--json", default=None, help="also write both runs here")
    args = parser.parse_args(argv)
    if args.load < 1:
        parser.error("--load must be at least 1")

    from adacache.embedded.domain import prompt_set
    from adacache.embedded.pipeline import EmbeddedVideoPipeline

    prompts = prompt_set()
    prompts = prompts[:: max(1, len(prompts) // args.num_prompts)][: args.num_prompts]
    pipe = EmbeddedVideoPipeline.from_embedded()
    loads = [args.load, 0] if args.loaded_first else [0, args.load]
    runs = [calibrate_once(pipe, prompts, args, load) for load in loads]

    print(f"\n== embedded model, {args.steps} steps, {args.speedup:g}x wall-clock target, {len(prompts)} prompts, "
          f"{args.iterations} bisection steps ==")
    for run in runs:
        print("\n".join(describe(run, args.steps)))
    quiet, loaded = sorted(runs, key=lambda run: run["load"])
    a, b = (run["about"]["reached"]["compute_speedup"] for run in (quiet, loaded))
    difference = abs(a - b) / ((a + b) / 2)
    goals = [run["about"]["compute_goal"] for run in (quiet, loaded)]
    costs = [run["about"]["skip_cost"] for run in (quiet, loaded)]
    print(f"\nskip cost c: {costs[0]:.4f} without load, {costs[1]:.4f} with load; compute goals {goals[0]:.3f}x and "
          f"{goals[1]:.3f}x ({abs(goals[0] - goals[1]) / ((goals[0] + goals[1]) / 2):.1%} apart)")
    print(f"compute speed-up reached: {a:.3f}x without load, {b:.3f}x with load: {difference:.1%} apart "
          f"({'within' if difference <= 0.05 else 'NOT within'} the 5% target); codebooks "
          f"{'identical' if quiet['codebook'] == loaded['codebook'] else 'differ'}")
    if args.json:
        with open(args.json, "w") as sink:
            json.dump({"settings": vars(args), "prompts": prompts, "runs": runs}, sink, indent=1, default=str)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
