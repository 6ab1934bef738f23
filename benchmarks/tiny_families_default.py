"""What AdaCache's calibration-free default (`apply_adacache(pipe)`, no config) does on models nobody calibrated:
every tiny pipeline family of the test suite (random weights, real diffusers pipelines built offline), at 30 and
50 steps. Prints per family and branch the computed steps and the compute speed-up; the setting promises 2x.

    python benchmarks/tiny_families_default.py                  # every family, 30 and 50 steps (minutes on 2 cores)
    python benchmarks/tiny_families_default.py --kinds wan latte --steps 30

Random weights make no picture, and their probe distances follow no trained model's curve: this shows that the
default neither skips everything nor nothing on a model it has never seen, not what quality it keeps.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the tiny pipelines live with the tests

from tiny_pipelines import (PIPELINE_KINDS, TINY_PIPELINE_CALL, ftfy_stand_in, load_tiny_pipeline,  # noqa: E402
                            save_tiny_pipeline)

from adacache import apply_adacache, get_stats, remove_adacache  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kinds", nargs="+", default=list(PIPELINE_KINDS))
    parser.add_argument("--steps", type=int, nargs="+", default=[30, 50])
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print("| family | steps | branch | computed | compute speed-up |")
    print("|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as folder, ftfy_stand_in():  # SkyReels-V2 calls ftfy unchecked
        for kind in args.kinds:
            pipe = load_tiny_pipeline(save_tiny_pipeline(kind, Path(folder) / kind))
            pipe.set_progress_bar_config(disable=True)
            for steps in args.steps:
                apply_adacache(pipe)  # no config: the calibration-free default, 2x
                try:
                    pipe(prompt="a red ball moving left", num_inference_steps=steps,
                         generator=torch.Generator().manual_seed(0), **TINY_PIPELINE_CALL[kind])
                    stats = get_stats(pipe)
                finally:
                    remove_adacache(pipe)
                for s in stats:
                    name = s.branch + (f" video {s.video}" if s.video is not None else "") + (
                        f" ({s.model})" if s.model != "transformer" else "")
                    print(f"| {kind} | {steps} | {name} | {len(s.computed_steps)}/{s.steps_seen} | "
                          f"{s.steps_seen / max(1, len(s.computed_steps)):.2f}x |", flush=True)


if __name__ == "__main__":
    main()
