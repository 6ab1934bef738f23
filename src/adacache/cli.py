"""The `adacache` command line. The CLI owns the terminal; the library only logs."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys

from typing import TYPE_CHECKING

from .config import PRESETS, AdaCacheConfig, ConfigError

if TYPE_CHECKING:
    import numpy as np


def _cache_config(args: argparse.Namespace) -> AdaCacheConfig:
    cache = args.cache
    if cache == "auto":  # the embedded model's own codebook, tuned on its distance curve; else the 30-step fast preset
        from .embedded.pipeline import WEIGHTS_DIR

        tuned = WEIGHTS_DIR / "adacache.json"
        cache = str(tuned) if getattr(args, "model", None) is None and tuned.is_file() else "opensora-30-fast"
    config = AdaCacheConfig.load(cache)
    if args.moreg:
        config = dataclasses.replace(config, moreg=True)
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


def _load_pipeline(model: str | None):
    """The embedded model by default; a folder holding it (as `adacache train --export` writes); else any
    diffusers pipeline id or folder."""
    import json
    from pathlib import Path

    import torch

    from .embedded.pipeline import EmbeddedVideoPipeline

    if model is None:
        return EmbeddedVideoPipeline.from_embedded()
    index = Path(model) / "model_index.json"
    if index.is_file() and json.loads(index.read_text()).get("_class_name") == EmbeddedVideoPipeline.__name__:
        return EmbeddedVideoPipeline.from_pretrained(model, local_files_only=True)
    from diffusers import DiffusionPipeline

    return DiffusionPipeline.from_pretrained(model, dtype=torch.float32)


def _frames_of(output) -> "np.ndarray":
    """The first video of a pipeline's output, as (T, H, W, 3)."""
    import numpy as np

    frames = output.frames if hasattr(output, "frames") else output[0]
    video = frames[0]
    video = video.detach().cpu().numpy() if hasattr(video, "detach") else np.asarray(video)
    return video


def _generate(args: argparse.Namespace) -> int:
    import time

    import torch

    from .demo import psnr
    from .hooks import apply_adacache, get_stats, remove_adacache
    from .video import check_writable, side_by_side, to_uint8, upscale, write_video

    if not args.prompt.strip():
        raise ConfigError("the prompt is empty; describe a clip, e.g. 'a red circle moving right fast'")
    output = check_writable(args.output)
    gif = check_writable(output.with_suffix(".gif")) if args.gif else None
    config = None if args.cache == "none" else _cache_config(args)
    pipe = _load_pipeline(args.model)
    pipe.set_progress_bar_config(disable=args.no_progress)
    call = dict(num_inference_steps=args.steps, guidance_scale=args.guidance, output_type="np")
    sizes = {"height": args.height, "width": args.width, "num_frames": args.num_frames}
    call.update({key: value for key, value in sizes.items() if value is not None})  # real pipelines only

    def run() -> tuple["np.ndarray", float]:
        start = time.perf_counter()
        video = _frames_of(pipe(args.prompt, generator=torch.Generator().manual_seed(args.seed), **call))
        return to_uint8(video), time.perf_counter() - start

    uncached = run() if args.compare or config is None else None
    if config is not None:
        apply_adacache(pipe, config)
        try:
            cached = run()
            stats = get_stats(pipe)  # applied just before: only this generation's branches
        finally:
            remove_adacache(pipe)
    prefix = "  " if args.compare and config is not None else ""
    if args.compare and config is not None:
        print(f"uncached {uncached[1]:.2f} s, AdaCache {cached[1]:.2f} s: speed-up {uncached[1] / cached[1]:.2f}x")
    for s in stats if config is not None else []:
        print(f"{prefix}{s.branch}: computed {len(s.computed_steps)}/{s.steps_seen} steps {s.computed_steps}")
    if args.compare and config is not None:
        reference, other = (torch.from_numpy(v[0]).float() for v in (uncached, cached))
        print(f"PSNR against the uncached video (same seed): {psnr(reference, other):.2f} dB")
        factor = max(1, 128 // cached[0].shape[1])
        video, scale = side_by_side(upscale(uncached[0], factor), upscale(cached[0], factor)), 1
        what = " (left: uncached, right: AdaCache)"
    else:
        video, seconds = cached if config is not None else uncached
        scale, what = max(1, 128 // video.shape[1]), f" ({seconds:.2f} s)"
    for path in (output, gif) if gif else (output,):
        write_video(video, path, scale=scale)
    print(f"wrote {output}" + (f" and {gif}" if gif else "") + what)
    return 0


def _train(args: argparse.Namespace) -> int:
    from .embedded.train import TrainConfig, export, train

    if args.export:
        folder = export(args.export_from or f"{args.out}/checkpoint.pt", args.export)
        print(f"exported the EMA weights to {folder}")
        return 0
    config = TrainConfig(size=args.size, architecture=args.architecture, seed=args.seed, steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                         eval_every=args.eval_every, threads=args.threads)
    path = train(args.out, config, progress=not args.no_progress)
    print(f"checkpoint: {path}; export it with: adacache train --out {args.out} --export DIR")
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

    gen = commands.add_parser("generate", help="prompt -> video (the embedded model by default, or any diffusers pipeline)")
    gen.add_argument("prompt", help='e.g. "a red circle moving right fast"')
    gen.add_argument("-o", "--output", default="out.mp4", help="output .mp4 or .gif (default out.mp4)")
    gen.add_argument("--model", default=None, help="diffusers pipeline id or local folder (default: the embedded model)")
    gen.add_argument("--cache", default="auto",
                     help=f"none, auto, a preset ({', '.join(sorted(PRESETS))}) or a JSON config file (default auto: "
                          "the embedded model's tuned codebook, or opensora-30-fast for --model pipelines)")
    gen.add_argument("--moreg", action="store_true", help="enable motion regularization")
    gen.add_argument("--steps", type=int, default=30, help="denoising steps (default 30)")
    gen.add_argument("--guidance", type=float, default=4.0, help="classifier-free guidance scale (default 4.0)")
    gen.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    gen.add_argument("--height", type=int, default=None, help="frame height, for --model pipelines")
    gen.add_argument("--width", type=int, default=None, help="frame width, for --model pipelines")
    gen.add_argument("--num-frames", type=int, default=None, help="number of frames, for --model pipelines")
    gen.add_argument("--compare", action="store_true",
                     help="also run uncached with the same seed: print both times, the speed-up and PSNR, write side by side")
    gen.add_argument("--gif", action="store_true", help="also write a GIF next to the output")
    gen.add_argument("--no-progress", action="store_true", help="hide progress bars")
    gen.set_defaults(run=_generate)

    tr = commands.add_parser("train", help="train (or resume) the embedded model on the procedural domain")
    tr.add_argument("--out", default="runs/embedded", help="run folder: checkpoint.pt and log.jsonl (default runs/embedded)")
    tr.add_argument("--size", default="small", help="model size: small (shipped) or tiny (smoke test)")
    tr.add_argument("--architecture", default="wan", choices=["wan", "latte"],
                    help="diffusers transformer class: wan (3D attention, shipped) or latte (spatial/temporal blocks)")
    tr.add_argument("--steps", type=int, default=6000, help="total optimizer steps (default 6000)")
    tr.add_argument("--batch-size", type=int, default=16)
    tr.add_argument("--lr", type=float, default=1e-3)
    tr.add_argument("--seed", type=int, default=0)
    tr.add_argument("--eval-every", type=int, default=500, help="verifier check every N steps (0 = never)")
    tr.add_argument("--threads", type=int, default=2)
    tr.add_argument("--export", default=None, help="write the EMA weights of the checkpoint as a pipeline folder")
    tr.add_argument("--export-from", default=None, help="checkpoint to export (default OUT/checkpoint.pt)")
    tr.add_argument("--no-progress", action="store_true")
    tr.set_defaults(run=_train)
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
    except (ConfigError, ValueError, FileNotFoundError) as error:
        print(f"adacache: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
