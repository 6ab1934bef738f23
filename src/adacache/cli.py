"""The `adacache` command line. The CLI owns the terminal; the library only logs."""

from __future__ import annotations

import argparse
import logging
import sys

from .config import PRESETS, AdaCacheConfig, ConfigError


def _cache_config(args: argparse.Namespace) -> AdaCacheConfig:
    config = AdaCacheConfig.load(args.cache)
    if args.moreg:
        config = AdaCacheConfig.from_dict({**config.to_dict(), "moreg": True})
    return config


def _demo(args: argparse.Namespace) -> int:
    from .demo import DEMO_LATENT_SHAPE, DEMO_MODEL_CONFIG, run_demo

    config = _cache_config(args)
    print(
        f"AdaCache demo: Wan transformer, {DEMO_MODEL_CONFIG['num_layers']} blocks, random weights (built from "
        f"config, nothing downloaded), latents {DEMO_LATENT_SHAPE}, {args.steps} steps, cache {args.cache!r}"
        f"{' + MoReg' if config.moreg else ''}, seed {args.seed}"
    )
    result = run_demo(config, num_steps=args.steps, seed=args.seed, progress=not args.no_progress)
    computed = result.computed_steps
    print(f"computed steps ({len(computed)}/{result.num_steps}): {computed}")
    print(f"uncached {result.uncached_seconds:.2f} s, AdaCache {result.cached_seconds:.2f} s: "
          f"speed-up {result.speedup:.2f}x (wall clock, same process, same seed)")
    print(f"PSNR of the final latents against the uncached run: {result.psnr_db:.1f} dB")
    print("Random weights: this shows the mechanics, not video quality. Codebook thresholds are model-specific.")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="adacache", description="Adaptive Caching (AdaCache) with Motion Regularization for video DiTs."
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log the library's decisions")
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser("demo", help="run a small model on CPU uncached and cached; print steps and speed-up")
    demo.add_argument("--steps", type=int, default=30, help="denoising steps (default 30)")
    demo.add_argument("--cache", default="opensora-30-fast",
                      help=f"preset ({', '.join(sorted(PRESETS))}) or a JSON config file (default opensora-30-fast)")
    demo.add_argument("--moreg", action="store_true", help="enable motion regularization")
    demo.add_argument("--seed", type=int, default=0, help="random seed (weights and noise)")
    demo.add_argument("--no-progress", action="store_true", help="hide progress bars")
    demo.set_defaults(run=_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(name)s: %(message)s")
    if getattr(args, "steps", 1) < 1:
        parser.error(f"--steps must be a positive integer, got {args.steps}")
    if getattr(args, "seed", 0) < 0:
        parser.error(f"--seed must be a non-negative integer, got {args.seed}")
    try:
        return args.run(args)
    except ConfigError as error:
        print(f"adacache: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
