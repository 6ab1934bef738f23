"""How much of each embedded-domain frame is background: the share of pixels outside the object mask that
`adacache.evaluation.metrics.object_psnr` measures over (any channel above 0.05 on the [0, 1] scale, dilated by one
pixel in each frame). Whole-frame PSNR counts those black pixels too, which lifts it on this domain.

Two sources: the domain's rendered ground truth (every prompt of the fixed set, `--starts` random start positions
each, via domain.render) and the shipped model's generated clips (the 36 prompts x seed 0 at 30 steps, guidance 4,
as the bench runs them). Prints mean, min and max per clip, and per shape.

    python benchmarks/background_share.py                  # 4 minutes on 2 busy CPU cores
    python benchmarks/background_share.py --model runs/export --seeds 0 1
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch

from adacache.embedded.domain import parse_caption, prompt_set, render, sample_clip_spec
from adacache.embedded.pipeline import EmbeddedVideoPipeline
from adacache.evaluation.metrics import OBJECT_THRESHOLD, as_video, background_share


def rendered_shares(prompts: list[str], starts: int, seed: int) -> list[tuple[str, float]]:
    """(prompt, background share) of `starts` rendered clips per prompt, start positions drawn from `seed`."""
    rng = np.random.default_rng(seed)
    shares = []
    for prompt in prompts:
        words = parse_caption(prompt)
        for _ in range(starts):
            spec = sample_clip_spec(rng, **words)
            shares.append((prompt, background_share(as_video(render(spec)))))  # (T, 3, H, W) -> (T, H, W, 3)
    return shares


def generated_shares(pipe, prompts: list[str], seeds: list[int], steps: int,
                     guidance: float) -> list[tuple[str, float]]:
    """(prompt, background share) of the model's clip for every prompt and seed (one batch per seed)."""
    shares = []
    for seed in seeds:
        frames = pipe(prompts, num_inference_steps=steps, guidance_scale=guidance,
                      generator=torch.Generator().manual_seed(seed)).frames  # (B, T, 3, H, W)
        shares += [(prompt, background_share(as_video(clip))) for prompt, clip in zip(prompts, frames)]
    return shares


def summary(name: str, shares: list[tuple[str, float]]) -> None:
    values = [s for _, s in shares]
    print(f"{name}: {len(values)} clips, background share mean {statistics.fmean(values):.1%}, "
          f"min {min(values):.1%}, max {max(values):.1%}")
    for shape in ("circle", "square", "triangle"):
        mine = [s for prompt, s in shares if parse_caption(prompt)["shape"] == shape]
        print(f"  {shape:8s} mean {statistics.fmean(mine):.1%} (min {min(mine):.1%}, max {max(mine):.1%})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="pipeline folder (default: the shipped embedded weights)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--guidance", type=float, default=4.0)
    parser.add_argument("--starts", type=int, default=10, help="rendered clips per prompt (random start positions)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    prompts = prompt_set()
    print(f"object mask: any channel > {OBJECT_THRESHOLD} on the [0, 1] scale, dilated by 1 pixel (3 x 3) in each "
          "frame; background = the pixels outside it, over all 8 frames of 16 x 16")
    summary("rendered ground truth", rendered_shares(prompts, args.starts, seed=0))
    if args.model:
        pipe = EmbeddedVideoPipeline.from_pretrained(args.model, local_files_only=True)
    else:
        pipe = EmbeddedVideoPipeline.from_embedded()
    pipe.set_progress_bar_config(disable=True)
    start = time.time()
    shares = generated_shares(pipe, prompts, args.seeds, args.steps, args.guidance)
    summary(f"{args.model or 'shipped model'}, seeds {args.seeds}, {args.steps} steps, guidance {args.guidance} "
            f"({time.time() - start:.0f} s)", shares)


if __name__ == "__main__":
    main()
