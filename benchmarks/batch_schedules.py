"""Per-video schedules against one shared schedule, on a batch of 8 mixed prompts (still, slow and fast) in one
call of the embedded pipeline (issue 12): PSNR per video against that video uncached, at the same mean computed
steps, and the wall time of the batch.

The per-video runs use the shipped codebook with its thresholds scaled (x0.7, x1, x1.4); for each, the shared
schedule's thresholds are scaled until its computed steps bracket the per-video mean (a shared schedule computes
a whole number of steps for every video, so the two nearest, one each side, are shown). The uncached reference is
the batch run uncached (each video generated alone, uncached, differs from its row by at most 2.9e-5 on a 0-1
scale, from the order of float additions in batched products; tests/test_batch_videos.py checks 1e-4). Wall times, at the
shipped thresholds only, are medians of interleaved repeats of the uncached batch, per-video and the nearer shared
point.

    python benchmarks/batch_schedules.py                 # 30 steps, repeats 3
    python benchmarks/batch_schedules.py --moreg           # the shipped MoReg codebook
    python benchmarks/batch_schedules.py --steps 50 --repeats 5 --json out.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import statistics
import time

import torch

from adacache import AdaCacheConfig, apply_adacache, get_stats, remove_adacache
from adacache.embedded.pipeline import EmbeddedVideoPipeline, tuned_config
from adacache.evaluation.metrics import as_video, psnr

PROMPTS = [
    "a red circle standing still", "a blue square standing still", "a green triangle standing still",
    "a yellow square moving left slow", "a red triangle moving up slow",
    "a blue circle moving right fast", "a green square moving down fast", "a yellow triangle moving left fast",
]
SCALES = (0.7, 1.0, 1.4)


def scaled(config: AdaCacheConfig, scale: float, mode: str) -> AdaCacheConfig:
    return dataclasses.replace(config, codebook={t * scale: r for t, r in config.codebook.items()},
                               batch_schedule=mode)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--repeats", type=int, default=3, help="timed batches per schedule (median)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--moreg", action="store_true", help="the shipped MoReg codebook (motion regularization on)")
    parser.add_argument("--json", default=None, help="also write the figures to this file")
    args = parser.parse_args()
    torch.set_num_threads(2)
    pipe = EmbeddedVideoPipeline.from_embedded()
    pipe.set_progress_bar_config(disable=True)
    base = AdaCacheConfig.load(tuned_config(args.steps, moreg=args.moreg))
    latents = torch.randn(len(PROMPTS), 3, 8, 16, 16, generator=torch.Generator().manual_seed(args.seed))

    def generate(config: AdaCacheConfig | None, which: slice = slice(None)) -> tuple[torch.Tensor, list[int], float]:
        """The frames of the batch (or of its videos `which`), each video's computed steps, and the wall time."""
        prompts = PROMPTS[which]
        if config is not None:
            apply_adacache(pipe, config)
        try:
            start = time.perf_counter()
            frames = pipe(prompts, num_inference_steps=args.steps, latents=latents[which]).frames
            seconds = time.perf_counter() - start
            stats = get_stats(pipe) if config is not None else []
        finally:
            if config is not None:
                remove_adacache(pipe)
        if config is None:
            steps = [args.steps] * len(prompts)
        elif len(stats) == 1:  # one shared schedule (or one video)
            steps = [len(stats[0].computed_steps)] * len(prompts)
        else:
            steps = [len(s.computed_steps) for s in sorted(stats, key=lambda s: s.video)]
        return frames, steps, seconds

    generate(None)  # warm-up: the first call pays one-time costs
    reference, _, _ = generate(None)
    truth = [as_video(reference[i]) for i in range(len(PROMPTS))]

    def quality(frames: torch.Tensor) -> list[float]:
        return [psnr(truth[i], as_video(frames[i])) for i in range(len(PROMPTS))]

    points = []
    for scale in SCALES:
        frames, steps, _ = generate(scaled(base, scale, "video"))
        points.append((scale, frames, steps, statistics.fmean(steps)))

    # the shared schedule's computed steps as its thresholds scale (fewer steps as they rise): scanned outwards from
    # x1 by 2^(1/4) until every per-video mean is bracketed
    shared_by_steps: dict[int, tuple[float, torch.Tensor]] = {}

    def shared_at(scale: float) -> int:
        frames, steps, _ = generate(scaled(base, scale, "shared"))
        shared_by_steps.setdefault(steps[0], (scale, frames))
        return steps[0]

    low_scale = high_scale = 1.0
    at_one = most = fewest = shared_at(1.0)
    while most < max(p[3] for p in points) and low_scale > 2 ** -4:
        low_scale /= 2 ** 0.25
        most = max(most, shared_at(low_scale))
    while fewest > min(p[3] for p in points) and high_scale < 2 ** 4:
        high_scale *= 2 ** 0.25
        fewest = min(fewest, shared_at(high_scale))

    rows = []
    for scale, frames, steps, mean in points:
        below = max((s for s in shared_by_steps if s <= mean), default=None)
        above = min((s for s in shared_by_steps if s >= mean), default=None)
        row = {"scale": scale, "per_video_steps": steps, "mean_steps": mean, "per_video_psnr": quality(frames),
               "shared": {}}
        for side, count in (("below", below), ("above", above)):
            if count is not None:
                shared_scale, shared_frames = shared_by_steps[count]
                row["shared"][side] = {"steps": count, "scale": shared_scale, "psnr": quality(shared_frames)}
        rows.append(row)

    # batch-invariance at the shipped thresholds: each video generated alone against the same video in the batch
    alone = []
    for i in range(len(PROMPTS)):
        frames, (steps,), _ = generate(scaled(base, 1.0, "video"), slice(i, i + 1))
        alone.append((as_video(frames[0]), steps))
    shared_one, shared_steps = shared_by_steps[at_one][1], [at_one] * len(PROMPTS)  # (its first scan point)
    per_video_one = points[SCALES.index(1.0)]
    invariance = {
        "alone_steps": [steps for _, steps in alone],
        "per_video": {"steps": per_video_one[2],
                      "psnr_vs_alone": [psnr(a, as_video(per_video_one[1][i])) for i, (a, _) in enumerate(alone)]},
        "shared": {"steps": shared_steps,
                   "psnr_vs_alone": [psnr(a, as_video(shared_one[i])) for i, (a, _) in enumerate(alone)]},
    }

    # wall time at the shipped thresholds: per-video, the nearer shared point and uncached, interleaved
    timed = rows[SCALES.index(1.0)]
    near = min(timed["shared"].values(), key=lambda s: abs(s["steps"] - timed["mean_steps"]))
    times = {"per_video": [], "shared": [], "uncached": []}
    for _ in range(args.repeats):
        for name, cfg in (("uncached", None), ("per_video", scaled(base, 1.0, "video")),
                          ("shared", scaled(base, near["scale"], "shared"))):
            times[name].append(generate(cfg)[2])
    timed["seconds"] = {name: statistics.median(values) for name, values in times.items()}
    timed["wall_shared_steps"] = near["steps"]

    def mean_db(values: list[float]) -> float:
        finite = [v for v in values if math.isfinite(v)]
        return statistics.fmean(finite) if finite else math.inf

    print(f"batch of {len(PROMPTS)} prompts in one call, {args.steps} steps, embedded model, CFG batched "
          f"(cond_uncond); shipped {'MoReg ' if args.moreg else ''}codebook scaled; PSNR (dB) per video against "
          "the uncached batch")
    print(f"prompts: {'; '.join(PROMPTS)}")
    for row in rows:
        print(f"\nthresholds x{row['scale']}: per-video steps {row['per_video_steps']} (mean {row['mean_steps']:.2f})")
        print(f"  per-video   mean {mean_db(row['per_video_psnr']):.2f} dB, min {min(row['per_video_psnr']):.2f}: "
              + " ".join(f"{v:.1f}" for v in row["per_video_psnr"]))
        for side, shared in row["shared"].items():
            print(f"  shared {shared['steps']:>2} ({side}) mean {mean_db(shared['psnr']):.2f} dB, "
                  f"min {min(shared['psnr']):.2f}: " + " ".join(f"{v:.1f}" for v in shared["psnr"]))
        if "seconds" in row:
            s = row["seconds"]
            print(f"  wall (median of {args.repeats}): uncached {s['uncached']:.2f} s; per-video {s['per_video']:.2f} "
                  f"s ({s['uncached'] / s['per_video']:.2f}x); shared {row['wall_shared_steps']} steps "
                  f"{s['shared']:.2f} s ({s['uncached'] / s['shared']:.2f}x)")
    print(f"\neach video alone (thresholds x1): steps {invariance['alone_steps']}")
    for name in ("per_video", "shared"):
        entry = invariance[name]
        print(f"  in the batch, {name:<9} steps {entry['steps']}, PSNR against alone: "
              + " ".join(f"{v:.1f}" for v in entry["psnr_vs_alone"]))
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"prompts": PROMPTS, "steps": args.steps, "rows": rows, "invariance": invariance}, handle,
                      indent=1, default=str)


if __name__ == "__main__":
    main()
