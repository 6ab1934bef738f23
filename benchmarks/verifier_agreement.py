"""The verifier against the generator's ground truth, and the generator's throughput.

Agreement per attribute (colour, shape, direction, speed) on sampled clips: clean, with Gaussian noise
(sigma 0.05, clamped), and after writing each clip to its own MP4 and reading it back. Then clips per second from
`clip_batches` on one thread.

    python benchmarks/verifier_agreement.py                 # 1000 clips (MP4: the first 200)
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from adacache.embedded.domain import clip_batches, render, sample_clip_spec
from adacache.embedded.verifier import verify
from adacache.video import write_video

ATTRIBUTES = ("colour", "shape", "direction", "speed")


def agreement(clips, specs) -> dict[str, float]:
    rows = [verify(clip).agrees_with(spec) for clip, spec in zip(clips, specs)]
    return {key: sum(r[key] for r in rows) / len(rows) for key in ATTRIBUTES}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clips", type=int, default=1000)
    parser.add_argument("--mp4-clips", type=int, default=200)
    parser.add_argument("--seed", type=int, default=12345)
    args = parser.parse_args()
    torch.set_num_threads(1)

    rng = np.random.default_rng(args.seed)
    specs = [sample_clip_spec(rng) for _ in range(args.clips)]
    clean = [render(spec) for spec in specs]
    noise = torch.Generator().manual_seed(args.seed)
    noisy = [(clip + 0.05 * torch.randn(clip.shape, generator=noise)).clamp(0, 1) for clip in clean]
    with tempfile.TemporaryDirectory() as folder:
        paths = [write_video(clip, Path(folder) / f"clip{i}.mp4") for i, clip in enumerate(clean[: args.mp4_clips])]
        from_mp4 = agreement([str(p) for p in paths], specs[: args.mp4_clips])

    def show(name: str, n: int, result: dict[str, float]) -> None:
        print(f"{name:22s} {n:5d} clips: " + " | ".join(f"{k} {result[k]:.1%}" for k in ATTRIBUTES))

    show("clean", args.clips, agreement(clean, specs))
    show("noise sigma 0.05", args.clips, agreement(noisy, specs))
    show("MP4 round trip", args.mp4_clips, from_mp4)

    batches = clip_batches(seed=args.seed, batch_size=64)
    next(batches)  # builds the pre-rendered table once
    start, count = time.perf_counter(), 0
    while time.perf_counter() - start < 2.0:
        count += next(batches)[0].shape[0]
    print(f"generator: {count / (time.perf_counter() - start):,.0f} clips/s (clip_batches, batch 64, 1 thread)")


if __name__ == "__main__":
    main()
