"""Quality of the embedded model, read by the verifier over the fixed prompt set.

Every colour x direction x {slow, fast} prompt plus every colour standing still, for each seed, at the given step
count and guidance. Prints colour, shape, direction (moving prompts) and speed-class accuracy and the mean
temporal consistency, optionally with a cache applied.

    python benchmarks/embedded_quality.py                       # shipped weights, 30 steps, seeds 0 and 1
    python benchmarks/embedded_quality.py --model runs/export --cache opensora-30-fast
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from adacache import AdaCacheConfig, apply_adacache
from adacache.embedded.domain import prompt_set
from adacache.embedded.pipeline import EMBEDDED_MODELS, EmbeddedVideoPipeline
from adacache.embedded.verifier import verify


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="a shipped embedded model's name (small, deep) or a pipeline "
                                                      "folder (default: the shipped small model)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--guidance", type=float, default=4.0)
    parser.add_argument("--cache", default="none", help="none, a preset name or a config file")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", default=None, help="also write the per-video results here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    if args.model is None or args.model in EMBEDDED_MODELS:
        pipe = EmbeddedVideoPipeline.from_embedded(args.model or "small")
    else:
        pipe = EmbeddedVideoPipeline.from_pretrained(args.model, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    if args.cache != "none":
        apply_adacache(pipe, AdaCacheConfig.load(args.cache))
    prompts = prompt_set()
    results, start = [], time.time()
    for seed in args.seeds:
        frames = pipe(prompts, num_inference_steps=args.steps, guidance_scale=args.guidance,
                      generator=torch.Generator().manual_seed(seed)).frames
        for prompt, clip in zip(prompts, frames):
            report = verify(clip)
            results.append({"prompt": prompt, "seed": seed, **report.agrees_with(prompt),
                            "consistency": report.consistency})
    moving = [r for r in results if "still" not in r["prompt"]]

    def share(rows, key):
        return sum(r[key] for r in rows) / len(rows)

    for seed in args.seeds:  # each seed set on its own
        rows = [r for r in results if r["seed"] == seed]
        moving_rows = [r for r in rows if "still" not in r["prompt"]]
        print(f"seed {seed}: colour {share(rows, 'colour'):.1%} | shape {share(rows, 'shape'):.1%} | direction "
              f"(moving) {share(moving_rows, 'direction'):.1%} | speed class {share(rows, 'speed'):.1%}")
    print(f"{len(results)} videos ({len(prompts)} prompts x seeds {args.seeds}), {args.steps} steps, guidance "
          f"{args.guidance}, cache {args.cache}, {time.time() - start:.0f} s")
    print(f"colour {share(results, 'colour'):.1%} | shape {share(results, 'shape'):.1%} | "
          f"direction (moving) {share(moving, 'direction'):.1%} | speed class {share(results, 'speed'):.1%} | "
          f"consistency {statistics.mean(r['consistency'] for r in results):.3f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
