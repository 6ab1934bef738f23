"""Codebooks on the embedded model: the probe-distance curve of uncached runs, and candidate codebooks side by side.

First prints the distance at every step (uncached, codebook {1.0: 1}) for a few prompts: the curve the authors
tuned their codebooks on by eye. Then, for each candidate codebook, runs the same prompts with the same seed and
prints the computed steps, the wall-clock speed-up over the uncached run in the same process, and PSNR against it.

    python benchmarks/embedded_codebooks.py
"""

from __future__ import annotations

import argparse
import math
import time

import torch

from adacache import AdaCacheConfig, apply_adacache, get_stats, remove_adacache
from adacache.embedded.domain import prompt_set
from adacache.embedded.pipeline import WEIGHTS_DIR, EmbeddedVideoPipeline

CANDIDATES = {
    "shipped (weights/adacache.json)": AdaCacheConfig.load(WEIGHTS_DIR / "adacache.json").codebook,
    "opensora-30-fast": AdaCacheConfig.from_preset("opensora-30-fast").codebook,
    "opensora-30-slow": AdaCacheConfig.from_preset("opensora-30-slow").codebook,
    "slower": {0.04: 4, 0.06: 3, 0.09: 2, 1.0: 1},
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--every", type=int, default=3, help="take every n-th prompt of the prompt set")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    pipe = EmbeddedVideoPipeline.from_embedded()
    pipe.set_progress_bar_config(disable=True)
    prompts = prompt_set()[:: args.every]

    def run():
        start = time.perf_counter()
        frames = pipe(prompts, num_inference_steps=args.steps, generator=torch.Generator().manual_seed(0)).frames
        return frames, time.perf_counter() - start

    apply_adacache(pipe, AdaCacheConfig(codebook={1.0: 1}))
    curves = []
    for prompt in prompts[::2]:
        pipe(prompt, num_inference_steps=args.steps, generator=torch.Generator().manual_seed(0))
        curves.append(get_stats(pipe)[-1].distances)
    remove_adacache(pipe)
    print(f"probe distance per step (uncached, {len(curves)} prompts):")
    for step in range(1, args.steps):
        print(f"  step {step + 1:2d}: " + " ".join(f"{curve[step]:.3f}" for curve in curves))

    reference, reference_seconds = run()
    print(f"\n{len(prompts)} prompts, {args.steps} steps, uncached {reference_seconds:.2f} s")
    for name, codebook in CANDIDATES.items():
        apply_adacache(pipe, AdaCacheConfig(codebook=codebook))
        try:
            frames, seconds = run()
            stats = get_stats(pipe)[-1]
        finally:
            remove_adacache(pipe)
        mse = torch.mean((reference - frames) ** 2).item()
        psnr = math.inf if mse == 0 else 10 * math.log10(1 / mse)
        print(f"{name:32s} {dict(codebook)}: computed {len(stats.computed_steps)}/{args.steps} "
              f"{stats.computed_steps}, speed-up {reference_seconds / seconds:.2f}x, PSNR {psnr:.1f} dB")


if __name__ == "__main__":
    main()
