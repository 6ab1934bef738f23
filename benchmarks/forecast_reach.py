"""How far the forecast store should extrapolate: PSNR against the uncached video for plain reuse and for the
forecast at several reaches (`AdaCacheConfig.forecast_reach`), on the embedded model, with the same codebooks.
A fixed schedule (static:3) computes the same steps at every reach. An adaptive codebook may compute others, as the
forecast changes later distances; its "computed steps" column is the count at the largest reach. No clock is
read.

    python benchmarks/forecast_reach.py                      # 30 steps, 8 prompts, the shipped codebook and static:3
    python benchmarks/forecast_reach.py --steps 100 --prompts 6 --preset opensora-100-fast
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics

import numpy as np
import torch

from adacache import AdaCacheConfig, apply_adacache, get_stats, remove_adacache
from adacache.embedded.domain import prompt_set
from adacache.embedded.pipeline import EmbeddedVideoPipeline, tuned_config
from adacache.evaluation.metrics import as_video, psnr

REACHES = (0.0, 0.25, 0.5, 1.0, 100.0)  # 0: plain reuse; 100: unbounded in practice


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--prompts", type=int, default=8, help="prompts spread over the embedded set")
    parser.add_argument("--preset", default=None, help="a preset to compare as well (e.g. opensora-100-fast)")
    args = parser.parse_args()
    torch.set_num_threads(2)
    pipe = EmbeddedVideoPipeline.from_embedded()
    pipe.set_progress_bar_config(disable=True)
    every = prompt_set()
    prompts = every[:: max(1, len(every) // args.prompts)][: args.prompts]

    def generate(prompt: str, config: AdaCacheConfig | None) -> tuple[np.ndarray, int]:
        if config is not None:
            apply_adacache(pipe, config)
        try:
            out = pipe(prompt, num_inference_steps=args.steps, guidance_scale=4.0,
                       generator=torch.Generator().manual_seed(0))
            computed = max(len(s.computed_steps) for s in get_stats(pipe)) if config is not None else args.steps
        finally:
            if config is not None:
                remove_adacache(pipe)
        return as_video(out.frames[0]).astype(np.float32), computed

    codebooks = {"shipped codebook": AdaCacheConfig.load(str(tuned_config(args.steps))),
                 "static:3": AdaCacheConfig(codebook={1.0: 3})}
    if args.preset:
        codebooks[args.preset] = AdaCacheConfig.from_preset(args.preset)
    references = [generate(p, None)[0] for p in prompts]
    print(f"embedded model, {args.steps} steps, {len(prompts)} prompts, seed 0, guidance 4: mean PSNR (dB) against "
          "the uncached videos")
    print("| codebook | computed steps | reuse | " + " | ".join(f"forecast, reach {r:g}" for r in REACHES[1:]) + " |")
    print("|---" * (len(REACHES) + 2) + "|")
    for name, config in codebooks.items():
        cells, computed = [], None
        for reach in REACHES:
            variant = config if reach == 0 else dataclasses.replace(config, store="forecast", forecast_reach=reach)
            runs = [generate(p, variant) for p in prompts]
            computed = statistics.mean(c for _, c in runs)
            cells.append(f"{statistics.mean(psnr(r, v) for r, (v, _) in zip(references, runs)):.2f}")
        print(f"| {name} | {computed:.1f} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
