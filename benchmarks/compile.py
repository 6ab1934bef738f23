"""torch.compile with AdaCache on the CPU: compiled against eager, at rate 1 and cached, side by side.

The demo's small Wan transformer (`adacache.demo`: 8 blocks, 576 video tokens, random weights), denoised with
diffusers' flow-matching scheduler, one call per step. Six variants, each its own model built from one seed, in one
process:

- plain: no AdaCache, eager and compiled;
- rate 1: AdaCache with codebook {1.0: 1} (every step computed: the hooks' cost), eager and compiled;
- cached: AdaCache with a fixed codebook that skips (`--codebook`, default {1e9: 2}: every second step), eager
  and compiled.

Compiled is the model compiled whole after apply_adacache (`model.compile(backend=...)`, the way the issue names;
`--compile regional` uses diffusers' `compile_repeated_blocks` instead, `--compile blocks` `adacache.compile_blocks`).
Each variant is warmed up (compiled) first; then the runs are interleaved (one generation of each variant per round,
`--rounds` rounds), and the medians and their ratios are printed, with the computed steps and how far each compiled
output is from its eager twin.

    python benchmarks/compile.py                      # inductor, 20 steps, 5 rounds
    python benchmarks/compile.py --steps 10 --rounds 2 --backend eager   # a quick check of the script

Timings need a quiet machine: the load average is printed beside them.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

import torch

from adacache import AdaCacheConfig, apply_adacache, compile_blocks, get_stats
from adacache.demo import DEMO_LATENT_SHAPE, DEMO_MODEL_CONFIG, build_demo_model, denoise

VARIANTS = ("plain", "rate 1", "cached")


def build(variant: str, compiled: bool, codebook: dict[float, int], args: argparse.Namespace) -> torch.nn.Module:
    model = build_demo_model(seed=0)
    if variant == "rate 1":
        apply_adacache(model, AdaCacheConfig(codebook={1.0: 1}))
    elif variant == "cached":
        apply_adacache(model, AdaCacheConfig(codebook=codebook))
    if compiled:
        if args.compile == "whole":
            model.compile(backend=args.backend)
        elif args.compile == "regional":
            model.compile_repeated_blocks(backend=args.backend)
        else:  # "blocks": adacache.compile_blocks, each block's own forward (the same call works without AdaCache)
            compile_blocks(model, backend=args.backend)
    return model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--backend", default="inductor")
    parser.add_argument("--compile", choices=("whole", "regional", "blocks"), default="whole",
                        help="model.compile(), diffusers' compile_repeated_blocks, or adacache.compile_blocks")
    parser.add_argument("--codebook", default="1e9:2", help="the cached variant's fixed codebook, distance:rate")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    threshold, rate = args.codebook.split(":")
    codebook = {float(threshold): int(rate)}

    models = {(variant, compiled): build(variant, compiled, codebook, args)
              for variant in VARIANTS for compiled in (False, True)}
    outputs, seconds, compile_seconds = {}, {key: [] for key in models}, {}
    for key, model in models.items():  # warm-up: allocations, and the compiled ones compile here
        start = time.perf_counter()
        outputs[key] = denoise(model, args.steps, seed=0, progress=False)
        compile_seconds[key] = time.perf_counter() - start
    load_before = os.getloadavg()
    for _ in range(args.rounds):
        for key, model in models.items():
            start = time.perf_counter()
            denoise(model, args.steps, seed=0, progress=False)
            seconds[key].append(time.perf_counter() - start)
    load_after = os.getloadavg()
    median = {key: statistics.median(values) for key, values in seconds.items()}

    print(f"Wan transformer (adacache.demo: {DEMO_MODEL_CONFIG['num_layers']} blocks, latents {DEMO_LATENT_SHAPE}), "
          f"{args.steps} steps, {args.rounds} interleaved rounds, {args.threads} thread(s)")
    how = {"whole": "model.compile", "regional": "model.compile_repeated_blocks",
           "blocks": "adacache.compile_blocks(model, ...)"}[args.compile]
    print(f"compile: {how}(backend={args.backend!r}) after apply_adacache; cached codebook {codebook}")
    print(f"torch {torch.__version__}, {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs; "
          f"load average {load_before[0]:.1f} before the timed rounds, {load_after[0]:.1f} after")
    print(f"{'variant':<8} {'eager s':>9} {'compiled s':>11} {'compiled/eager':>15} {'first compiled call s':>22} "
          f"{'computed steps':>16} {'max |compiled - eager|':>23}")
    for variant in VARIANTS:
        eager, compiled = median[variant, False], median[variant, True]
        stats = get_stats(models[variant, True]) if variant != "plain" else []
        computed = len(stats[-1].computed_steps) if stats else args.steps
        difference = (outputs[variant, True] - outputs[variant, False]).abs().max().item()
        print(f"{variant:<8} {eager:>9.3f} {compiled:>11.3f} {compiled / eager:>15.2f} "
              f"{compile_seconds[variant, True]:>22.1f} {computed:>10}/{args.steps:<5} {difference:>23.2e}")
    for compiled in (False, True):
        name = "compiled" if compiled else "eager"
        print(f"{name}: rate 1 / plain {median['rate 1', compiled] / median['plain', compiled]:.3f}, "
              f"cached / plain {median['cached', compiled] / median['plain', compiled]:.3f}")


if __name__ == "__main__":
    main()
