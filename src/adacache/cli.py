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
    if cache == "auto":  # the embedded model's own calibrated codebook for this step count; else the 30-step preset
        tuned = _tuned(args.steps) if getattr(args, "model", None) is None else None
        cache = tuned or "opensora-30-fast"
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


def _prompts(args: argparse.Namespace) -> list[str]:
    """--prompts FILE, else (embedded model only) the domain's prompt set, thinned to --num-prompts."""
    from .evaluation.bench import read_prompts

    if args.prompts:
        prompts = read_prompts(args.prompts)
    elif args.model is None:
        from .embedded.domain import prompt_set

        prompts = prompt_set()
    else:
        raise ConfigError("--prompts FILE is needed with --model (one prompt per line)")
    if args.num_prompts is not None:
        if args.num_prompts < 1:
            raise ConfigError(f"--num-prompts must be positive, got {args.num_prompts}")
        prompts = prompts[:: max(1, len(prompts) // args.num_prompts)][: args.num_prompts]
    return prompts


def _seeds(text: str) -> list[int]:
    try:
        seeds = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise ConfigError(f"--seeds takes comma-separated non-negative integers, e.g. 0,1; got {text!r}") from None
    return seeds


def _tuned(steps: int) -> str | None:
    from .embedded.pipeline import tuned_config

    tuned = tuned_config(steps)
    return str(tuned) if tuned is not None else None


def _bench(args: argparse.Namespace) -> int:
    import shlex

    from .evaluation.bench import BenchSettings, prepare_folder, run_bench
    from .evaluation.methods import default_methods, parse_methods

    prompts = _prompts(args)
    methods = [m.strip() for m in args.methods.split(",")] if args.methods else default_methods(args.steps)
    tuned = _tuned(args.steps) if args.model is None else None
    parse_methods(methods, tuned)  # every name checked before the model loads
    sizes = {"height": args.height, "width": args.width, "num_frames": args.num_frames}
    settings = BenchSettings(
        model=args.model or "embedded", prompts=prompts, methods=methods, seeds=_seeds(args.seeds), steps=args.steps,
        guidance=args.guidance, repeats=args.repeats, warmup=args.warmup, flops=not args.no_flops,
        call={k: v for k, v in sizes.items() if v is not None},
    )
    prepare_folder(args.out)
    pipe = _load_pipeline(args.model)
    _to_device(pipe)
    command = "adacache " + " ".join(shlex.quote(a) for a in args.argv)
    report = run_bench(pipe, settings, args.out, tuned=tuned, progress=not args.no_progress, command=command)
    if report is not None:
        from .evaluation.report import markdown

        print(markdown(report))
        print(f"wrote {args.out}/report.json, report.md, pareto.png and motion.png")
    return 0


def _calibrate(args: argparse.Namespace) -> int:
    import json
    from pathlib import Path

    from .evaluation.calibrate import Calibrator

    if (args.speedup is None) == (args.psnr is None):
        raise ConfigError("give one target: --speedup X (e.g. 2.0) or --psnr DB (e.g. 30)")
    output = Path(args.output)
    if output.suffix != ".json":
        raise ConfigError(f"the output {args.output!r} must be a .json file")
    if not output.parent.is_dir():
        raise ConfigError(f"the output folder {str(output.parent)!r} does not exist; create it first")
    prompts = _prompts(args)
    held_out: list[str] = []
    if args.check:
        if args.model is None and not args.prompts:
            from .embedded.domain import prompt_set

            held_out = [p for p in prompt_set() if p not in prompts]
            held_out = held_out[:: max(1, len(held_out) // args.check)][: args.check]
        else:
            raise ConfigError("--check N draws held-out prompts from the embedded prompt set; with --model or "
                              "--prompts, calibrate on part of your prompts and bench the rest")
    base = AdaCacheConfig.load(args.base) if args.base else AdaCacheConfig()
    if args.moreg:
        base = dataclasses.replace(base, moreg=True)
    sizes = {"height": args.height, "width": args.width, "num_frames": args.num_frames}
    pipe = _load_pipeline(args.model)
    _to_device(pipe)
    calibrator = Calibrator(pipe, prompts, seeds=_seeds(args.seeds), steps=args.steps, guidance=args.guidance,
                            base=base, call={k: v for k, v in sizes.items() if v is not None}, progress=print)
    if args.iterations < 1:
        raise ConfigError(f"--iterations must be positive, got {args.iterations}")
    result = calibrator.calibrate(speedup=args.speedup, target_psnr=args.psnr, wall_clock=not args.compute,
                                  iterations=args.iterations)
    about = {"model": args.model or "embedded", **result.about}
    if held_out:
        about["held_out"] = {"prompts": held_out, "reached": calibrator.check(result.config, held_out)}
    result.config.save(output, about=about)
    reached = about["reached"]
    print(f"codebook {result.config.codebook}")
    print(f"calibration prompts: {reached['computed_steps']:.1f}/{args.steps} steps computed, speed-up "
          f"{reached['compute_speedup']:.2f}x compute, {reached['wall_speedup']:.2f}x wall clock, PSNR {reached['psnr']:.1f} dB")
    if held_out:
        held = about["held_out"]["reached"]
        print(f"{len(held_out)} held-out prompts: {held['computed_steps']:.1f}/{args.steps} steps computed, speed-up "
              f"{held['compute_speedup']:.2f}x compute, {held['wall_speedup']:.2f}x wall clock, PSNR {held['psnr']:.1f} dB")
    print(f"wrote {output}; use it with --cache {output} or AdaCacheConfig.load({json.dumps(str(output))})")
    return 0


def _to_device(pipe) -> None:
    """CUDA when there is one (under torchrun, this process's GPU); else CPU as loaded."""
    import os

    import torch

    if torch.cuda.is_available():
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        pipe.to(f"cuda:{local}")


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
                          "the embedded model's calibrated codebook for the step count, or opensora-30-fast for --model "
                          "pipelines)")
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

    be = commands.add_parser("bench", help="AdaCache and its peers side by side: speed-up, FLOPs, memory, quality")
    be.add_argument("--model", default=None, help="diffusers pipeline id or local folder (default: the embedded model)")
    be.add_argument("--prompts", default=None, help="prompt file, one per line (default on the embedded model: its "
                                                    "36-prompt set)")
    be.add_argument("--num-prompts", type=int, default=None, help="use N prompts spread over the set")
    be.add_argument("--seeds", default="0,1", help="comma-separated seeds (default 0,1)")
    be.add_argument("--methods", default=None,
                    help="comma-separated: none, auto[+moreg], presets[+moreg], config .json files, static:<k>, "
                         "fbc[:thr], pab[:range], magcache[:thr], taylorseer[:interval], fastercache[:range] "
                         "(default: all of them at a few settings)")
    be.add_argument("--steps", type=int, default=30, help="denoising steps (default 30)")
    be.add_argument("--guidance", type=float, default=4.0, help="classifier-free guidance scale (default 4.0)")
    be.add_argument("--repeats", type=int, default=1, help="timed generations per video and method (median)")
    be.add_argument("--warmup", type=int, default=1, help="untimed generations per method first (default 1)")
    be.add_argument("--no-flops", action="store_true", help="skip the FLOP-counting pass")
    be.add_argument("--height", type=int, default=None, help="frame height, for --model pipelines")
    be.add_argument("--width", type=int, default=None, help="frame width, for --model pipelines")
    be.add_argument("--num-frames", type=int, default=None, help="number of frames, for --model pipelines")
    be.add_argument("-o", "--out", default="bench", help="output folder; a run there resumes (default bench)")
    be.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    be.set_defaults(run=_bench)

    ca = commands.add_parser("calibrate", help="derive a codebook for this model and step count from a few prompts")
    ca.add_argument("-o", "--output", required=True, help="the config file to write (.json)")
    target = ca.add_mutually_exclusive_group()
    target.add_argument("--speedup", type=float, default=None, help="target mean speed-up, e.g. 2.0")
    target.add_argument("--psnr", type=float, default=None, help="or: the fastest codebook keeping this mean PSNR (dB)")
    ca.add_argument("--compute", action="store_true",
                    help="read --speedup as compute (steps / computed steps) instead of wall clock")
    ca.add_argument("--model", default=None, help="diffusers pipeline id or local folder (default: the embedded model)")
    ca.add_argument("--prompts", default=None, help="calibration prompt file (default on the embedded model: its set)")
    ca.add_argument("--num-prompts", type=int, default=6, help="use N prompts spread over the set (default 6)")
    ca.add_argument("--check", type=int, default=0, metavar="N",
                    help="embedded model: then measure the codebook on N prompts it was not calibrated on")
    ca.add_argument("--seeds", default="0", help="comma-separated seeds (default 0)")
    ca.add_argument("--steps", type=int, default=30, help="denoising steps: codebooks are step-count specific")
    ca.add_argument("--guidance", type=float, default=4.0, help="classifier-free guidance scale (default 4.0)")
    ca.add_argument("--base", default=None,
                    help="preset or config file whose other settings (probe, MoReg window) the result keeps "
                         "(default: AdaCacheConfig's defaults)")
    ca.add_argument("--moreg", action="store_true", help="calibrate with motion regularization on")
    ca.add_argument("--iterations", type=int, default=9,
                    help="bisection steps on the threshold scale, each a cached run of every prompt (default 9)")
    ca.add_argument("--height", type=int, default=None, help="frame height, for --model pipelines")
    ca.add_argument("--width", type=int, default=None, help="frame width, for --model pipelines")
    ca.add_argument("--num-frames", type=int, default=None, help="number of frames, for --model pipelines")
    ca.set_defaults(run=_calibrate)

    tr = commands.add_parser("train", help="train (or resume) the embedded model on the procedural domain")
    tr.add_argument("--out", default="runs/embedded", help="run folder: checkpoint.pt and log.jsonl (default runs/embedded)")
    tr.add_argument("--size", default="small", help="model size: small (shipped) or tiny (smoke test)")
    tr.add_argument("--architecture", default="wan", choices=["wan", "latte"],
                    help="diffusers transformer class: wan (3D attention, shipped) or latte (spatial/temporal blocks)")
    tr.add_argument("--steps", type=int, default=4000, help="total optimizer steps (default 4000, as shipped)")
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
    args.argv = list(sys.argv[1:] if argv is None else argv)  # reports quote the command that made them
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
