"""The `adacache` command line. The CLI owns the terminal; the library only logs.

Exit status: 0 done; 2 a usage or input error (one `adacache: error: ...` line on stderr; argparse's usage error
for a malformed option); 1 the system failed (an I/O error, or under --context-parallel a process frozen past
--rank-timeout); 130 after Ctrl-C and 143 after SIGTERM, each with one line and no traceback, after the `finally`
blocks ran (atomic writers remove their temporary files).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import logging
import math
import re
import sys
import tempfile
from pathlib import Path
from typing import Callable

from . import pipelines
from .config import PRESETS, AdaCacheConfig, ConfigError
from .extras import MissingExtra, missing_for_cli
from .interrupts import Terminated, sigterm_as_interrupt
from .pipelines import MAX_GUIDANCE, MAX_SEED, MAX_STEPS, MAX_TRAIN_SEED, RANK_TIMEOUT_S


def _integer(low: int, high: int | None = None) -> Callable[[str], int]:
    """An argparse type: an integer in [low, high]."""
    span = f"from {low} to {high}" if high is not None else f">= {low}"

    def parse(text: str) -> int:
        if not re.fullmatch(r"\s*[+-]?[0-9]+\s*", text):  # int() would also take "3_0" and other scripts' digits
            raise argparse.ArgumentTypeError(f"takes an integer {span}, got {text!r}")
        value = int(text)
        if value < low or (high is not None and value > high):
            raise argparse.ArgumentTypeError(f"must be an integer {span}, got {value}")
        return value

    return parse


def _number(low: float, high: float | None = None, *, above: bool = False) -> Callable[[str], float]:
    """An argparse type: a finite number in [low, high] (or above `low`, when `above`). float() alone would take
    inf and nan."""
    span = (f"above {low:g}" if above else f"from {low:g}") + (f" to {high:g}" if high is not None else "")

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"takes a number {span}, got {text!r}") from None
        if not math.isfinite(value) or value < low or (above and value == low) or (high is not None and value > high):
            raise argparse.ArgumentTypeError(f"must be a finite number {span}, got {text}")
        return value

    return parse


# The numeric options, in the bounds pipelines.py holds for every entry point: checked while the command line is
# parsed, so a typo fails before a model loads.
_STEPS, _GUIDANCE, _SEED = _integer(1, MAX_STEPS), _number(0.0, MAX_GUIDANCE), _integer(0, MAX_SEED)
GUIDANCE_HELP = f"classifier-free guidance scale, 0 to {MAX_GUIDANCE:g}; at most 1 turns guidance off (default 4.0)"
_POSITIVE, _NON_NEGATIVE = _integer(1), _integer(0)


def _load_config(spec: str | Path, option: str) -> AdaCacheConfig:
    """`AdaCacheConfig.load` (its errors name the file), with the option that gave it."""
    try:
        return AdaCacheConfig.load(str(spec))
    except ConfigError as error:
        raise ConfigError(f"{option}: {error}") from None


def _cache_config(args: argparse.Namespace, auto: bool = True) -> AdaCacheConfig:
    """--cache as a config: auto (the embedded model's own codebook for the step count, else the calibration-free
    default; with `auto` False, the default alone), default, speedup:<x>, a preset or a JSON file."""
    cache = args.cache
    if cache == "auto":
        cache = pipelines.auto_config(getattr(args, "model", None), args.steps, args.moreg)[0] if auto \
            else pipelines.AUTO_FALLBACK
    if cache == "default" or cache.startswith("speedup:"):  # the names the bench takes for the calibration-free knob
        try:
            speedup = float(cache.partition(":")[2]) if cache != "default" else None
        except ValueError:
            raise ConfigError(f"--cache {cache}: write speedup:<number>, e.g. speedup:2.5") from None
        try:
            config = AdaCacheConfig() if speedup is None else AdaCacheConfig(speedup=speedup)
        except ConfigError as error:
            raise ConfigError(f"--cache {cache}: {error}") from None
    else:
        config = _load_config(cache, "--cache")
    if args.moreg:
        config = dataclasses.replace(config, moreg=True)
    return config


def _demo(args: argparse.Namespace) -> int:
    from .demo import DEMO_LATENT_SHAPE, DEMO_MODEL_CONFIG, run_demo

    config = _cache_config(args, auto=False)  # the demo's random model has no calibrated codebook
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
    print(f"PSNR of the final latents against the uncached run: {result.psnr_db:.1f} dB (peak: the uncached "
          "latents' range)")
    print("Random weights: this shows the mechanics, not video quality. Codebook thresholds are model-specific.")
    return 0


def _check_sizes(args: argparse.Namespace, kind: str) -> dict:
    """The --height/--width/--num-frames given, as pipeline call arguments; refused for the embedded model."""
    from .embedded.domain import FRAMES, SIZE

    sizes = {"height": args.height, "width": args.width, "num_frames": args.num_frames}
    given = {key: value for key, value in sizes.items() if value is not None}
    if given and kind == "embedded":
        flags = ", ".join("--" + key.replace("_", "-") for key in given)
        raise ConfigError(f"{flags}: the embedded model makes {SIZE}x{SIZE} clips of {FRAMES} frames only; these "
                          "options are for --model pipelines, leave them out")
    return given


def _generate(args: argparse.Namespace) -> int:
    from . import parallel
    from .video import check_writable

    if not args.prompt.strip():
        raise ConfigError("the prompt is empty; describe a clip, e.g. 'a red circle moving right fast'")
    kind = pipelines.model_kind(args.model)
    sizes = _check_sizes(args, kind)
    output = check_writable(args.output)
    gif = None
    if args.gif and output.suffix.lower() == ".gif":
        print(f"adacache: note: the output {str(output)!r} is already a GIF; --gif writes nothing more",
              file=sys.stderr)
    elif args.gif:
        gif = check_writable(output.with_suffix(".gif"))
    if args.compare and args.cache == "none":
        raise ConfigError("--compare runs the model uncached and cached; with --cache none there is nothing to "
                          "compare (leave out one of them)")
    if args.moreg and args.cache == "none":
        raise ConfigError("--moreg is part of AdaCache; with --cache none it would do nothing (leave out one of them)")
    config = None if args.cache == "none" else _cache_config(args)
    mode = _context_parallel(args, "generate")
    with parallel.process_group(args.rank_timeout) if mode != "none" else contextlib.nullcontext(0) as rank:
        return _generate_on(args, kind, sizes, output, gif, config, mode, rank)


def _generate_on(args: argparse.Namespace, kind: str, sizes: dict, output: Path, gif: Path | None,
                 config: AdaCacheConfig | None, mode: str, rank: int) -> int:
    from . import parallel
    from .evaluation.metrics import psnr
    from .hooks import apply_adacache, reconfigure, transformers_of
    from .video import side_by_side, upscale, write_video

    quiet = args.no_progress or rank != 0
    pipe = pipelines.load_pipeline(args.model, progress=not quiet)
    pipe.set_progress_bar_config(disable=quiet)
    paused = mode != "none"
    if paused:  # AdaCache first (paused until its run), then diffusers' split around its blocks
        if config is not None:
            apply_adacache(pipe, config)
            reconfigure(pipe, None)
        parallel.enable_context_parallel(pipe, mode, transformers_of(pipe))
    # the embedded model's loop checks every step for inf/nan; diffusers pipelines get a step callback for it
    call = dict(sizes, **(pipelines.finite_step_check(pipe, args.steps) if kind == "diffusers" else {}))
    sampling = dict(seed=args.seed, guidance=args.guidance, call=call)
    run = pipelines.generation(pipe, args.prompt, steps=args.steps, **sampling)
    if args.compare and config is not None:  # after one untimed step (see pipelines.uncached_then_cached)
        runs = pipelines.uncached_then_cached(
            pipe, config, run, warm_up=pipelines.generation(pipe, args.prompt, steps=1, **sampling), paused=paused)
        uncached, cached, stats = (runs.uncached, runs.uncached_seconds), (runs.cached, runs.cached_seconds), runs.stats
    elif config is not None:
        video, seconds, stats = pipelines.timed_cached(pipe, config, run, paused=paused)
        cached = (video, seconds)
    else:
        uncached = pipelines.timed(run)
    if rank != 0:
        return 0  # (the same video: rank 0 reports it)
    prefix = "  " if args.compare and config is not None else ""
    if args.compare and config is not None:
        print(f"uncached {uncached[1]:.2f} s, AdaCache {cached[1]:.2f} s: speed-up {uncached[1] / cached[1]:.2f}x")
    for s in stats if config is not None else []:
        video = f" video {s.video}" if s.video is not None else ""
        print(f"{prefix}{s.branch}{video}: computed {len(s.computed_steps)}/{s.steps_seen} steps {s.computed_steps}")
    if mode != "none":
        print(f"context parallelism: {mode} over {parallel.launched_world()} processes")
    if args.compare and config is not None:
        value = psnr(uncached[0] / 255.0, cached[0] / 255.0)  # uint8 frames scaled to [0, 1], peak 1.0
        print(f"PSNR against the uncached video (same seed): {value:.2f} dB")
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
    config = TrainConfig(size=args.size, architecture=args.architecture, seed=args.seed, steps=args.steps,
                         batch_size=args.batch_size, lr=args.lr, eval_every=args.eval_every, threads=args.threads,
                         init_from=args.init_from, sigma_mean=args.sigma_mean)
    path = train(args.out, config, progress=not args.no_progress)
    print(f"checkpoint: {path}; export it with: adacache train --out {args.out} --export DIR")
    return 0


def _prompts(args: argparse.Namespace) -> list[str]:
    """--prompts FILE, else (embedded model only) the domain's prompt set, thinned to --num-prompts."""
    from .evaluation.bench import read_prompts

    from .pipelines import embedded_name

    if args.prompts:
        prompts = read_prompts(args.prompts)
    elif embedded_name(args.model) is not None:
        from .embedded.domain import prompt_set

        prompts = prompt_set()
    else:
        raise ConfigError("--prompts FILE is needed with --model (one prompt per line)")
    if args.num_prompts is not None:  # positive: checked by the parser
        prompts = prompts[:: max(1, len(prompts) // args.num_prompts)][: args.num_prompts]
    return prompts


def _seeds(text: str) -> list[int]:
    problem = ConfigError(f"--seeds takes comma-separated integers from 0 to {MAX_SEED}, e.g. 0,1; got {text!r}")
    try:
        seeds = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise problem from None
    if not seeds or any(not 0 <= seed <= MAX_SEED for seed in seeds):
        raise problem
    return seeds


def _bench(args: argparse.Namespace) -> int:
    import shlex

    from .evaluation.bench import BenchSettings, prepare_folder, run_bench
    from .evaluation.methods import default_methods, parse_methods

    sizes = _check_sizes(args, pipelines.model_kind(args.model))
    seeds = _seeds(args.seeds)
    prompts = _prompts(args)
    if args.methods is None:
        methods = default_methods(args.steps)
    else:
        methods = [m.strip() for m in args.methods.split(",")]
        if not all(methods):
            raise ConfigError(f"--methods {args.methods!r} has an empty name; give comma-separated methods such as "
                              "none,auto,fbc:0.1 (or leave --methods out for the default comparison)")
    # auto[+moreg]: the embedded model's calibrated codebooks for this step count (MoReg's where one ships)
    tuned = pipelines.calibrated_codebooks(args.model, args.steps)
    parsed = parse_methods(methods, tuned)  # every name checked before the model loads
    mode = _context_parallel(args, "bench")
    if mode != "none":
        others = [m.name for m in parsed if not m.runs_under_context_parallelism]
        if others and args.methods is not None:
            raise ConfigError(f"under --context-parallel the bench runs the uncached model and AdaCache only (AdaCache "
                              f"stays inside diffusers' split); leave out {', '.join(others)}")
        methods = [m.name for m in parsed if m.name not in others]
    settings = BenchSettings(
        model=args.model or "embedded", prompts=prompts, methods=methods, seeds=seeds, steps=args.steps,
        guidance=args.guidance, repeats=args.repeats, warmup=args.warmup, flops=not args.no_flops, call=sizes,
        context_parallel=mode,
    )
    out = Path(args.out)
    made = not out.exists()
    prepare_folder(out)
    try:
        pipe = pipelines.load_pipeline(args.model, progress=not args.no_progress)
        pipelines.check_prompts(pipe, prompts)
    except BaseException:
        if made:  # a model that does not load leaves no empty output folder behind
            with contextlib.suppress(OSError):
                out.rmdir()
        raise
    pipelines.to_device(pipe)
    command = "adacache " + " ".join(shlex.quote(a) for a in args.argv)
    if mode == "none":
        report = run_bench(pipe, settings, args.out, tuned=tuned, progress=not args.no_progress, command=command)
    else:
        from . import parallel
        from .hooks import apply_adacache, reconfigure, transformers_of

        with parallel.process_group(args.rank_timeout) as rank:
            # AdaCache first, paused (each AdaCache method reconfigures it), then diffusers' split around its blocks
            apply_adacache(pipe)
            reconfigure(pipe, None)
            parallel.enable_context_parallel(pipe, mode, transformers_of(pipe))
            report = run_bench(pipe, settings, args.out, tuned=tuned, progress=not args.no_progress and rank == 0,
                               command=command)
    if report is not None:
        from .evaluation.report import markdown

        print(markdown(report))
        print(f"wrote {args.out}/report.json, report.md, pareto.png and motion.png")
    return 0


def _calibrate(args: argparse.Namespace) -> int:
    import os

    from .evaluation.calibrate import Calibrator, check_target, config_name

    if (args.speedup is None) == (args.psnr is None):
        raise ConfigError("give a target: --speedup X (e.g. 2.0) or --psnr DB (e.g. 30); several values (--speedup "
                          "1.5 2 2.5) calibrate one codebook each")
    if args.steps < 4:
        raise ConfigError(f"--steps {args.steps} leaves nothing to calibrate: the first step and the last two are "
                          "always computed; calibrate at the step count you generate with (e.g. 30)")
    by_psnr = args.psnr is not None
    flag = "--psnr" if by_psnr else "--speedup"
    targets = sorted(args.psnr if by_psnr else args.speedup)
    try:  # the rules Calibrator.calibrate_many applies, before the model loads
        for target in targets:
            check_target(args.steps, None if by_psnr else target, target if by_psnr else None, args.iterations,
                         skip_cost=0.0 if args.compute else None)  # a wall-clock target's floor needs the cost model
    except ValueError as error:
        raise ConfigError(f"{error}; change --speedup/--psnr or --steps") from None
    repeated = sorted({target for target in targets if targets.count(target) > 1})
    if repeated:
        raise ConfigError(f"{flag} {repeated[0]:g} is given more than once; give each target once")
    base = _load_config(args.base, "--base") if args.base else AdaCacheConfig()
    if args.moreg:
        base = dataclasses.replace(base, moreg=True)
    if args.forecast:
        try:
            base = dataclasses.replace(base, store="forecast")
        except ConfigError as error:
            raise ConfigError(f"--forecast: {error}") from None

    # where each target's config goes: -o FILE.json (one target) or -o FOLDER (one named file per target)
    output = Path(args.output)
    listed = " ".join(f"{target:g}" for target in targets)
    if output.is_dir() and output.suffix == ".json":
        raise ConfigError(f"the output {args.output!r} is a folder; give a .json file name (one target), or a folder "
                          "not named .json")
    if output.is_dir() or args.output.endswith(("/", os.sep)) or output.suffix == "":
        if output.exists() and not output.is_dir():
            raise ConfigError(f"the output {args.output!r} is a file, not a folder; give a folder for the config "
                              "files (it is created if missing), or a .json file name for one target")
        folder: Path | None = output
        names = [config_name(args.model, args.steps, target, psnr=by_psnr, compute=args.compute, moreg=base.moreg,
                             forecast=base.store == "forecast") for target in targets]
        if len(set(names)) < len(names):
            raise ConfigError(f"{flag} {listed}: two targets get the same file name; give targets that differ in "
                              "the first 6 decimals")
        paths = [output / name for name in names]
    elif output.suffix != ".json":
        raise ConfigError(f"the output {args.output!r} must be a .json file (one target) or a folder (one file per "
                          "target; end the name with / to create one)")
    elif len(targets) > 1:
        raise ConfigError(f"the output {args.output!r} is one file, but {flag} {listed} makes {len(targets)} "
                          f"configs; give a folder instead, e.g. -o {output.with_suffix('')}{os.sep}, and each "
                          "target gets its own file there")
    else:
        folder, paths = None, [output]
        if not output.parent.is_dir():
            raise ConfigError(f"the output folder {str(output.parent)!r} does not exist; create it first")
    for path in paths:
        if path.is_dir():
            raise ConfigError(f"{str(path)!r} is a folder where a config file belongs; delete or rename it")
    sizes = _check_sizes(args, pipelines.model_kind(args.model))
    seeds = _seeds(args.seeds)
    prompts = _prompts(args)
    held_out: list[str] = []
    if args.check:
        from .pipelines import embedded_name

        if embedded_name(args.model) is not None and not args.prompts:
            from .embedded.domain import prompt_set

            held_out = [p for p in prompt_set() if p not in prompts]
            held_out = held_out[:: max(1, len(held_out) // args.check)][: args.check]
        else:
            raise ConfigError("--check N draws held-out prompts from the embedded prompt set; with --model or "
                              "--prompts, calibrate on part of your prompts and bench the rest")
    made: list[Path] = []  # folders made here: removed again when the run stops before writing into them
    if folder is not None:
        for missing in (folder, *folder.parents):
            if missing.exists():
                break
            made.append(missing)
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise ConfigError(f"cannot create the output folder {str(folder)!r}: {error.strerror}") from None
    written: list[tuple[Path, dict]] = []
    try:
        try:  # before the work, not after it: a calibration can take hours
            with tempfile.NamedTemporaryFile(dir=paths[0].parent, prefix=".adacache-write-test-"):
                pass
        except OSError as error:
            raise ConfigError(f"cannot write to the output folder {str(paths[0].parent)!r}: {error.strerror}") from None
        pipe = pipelines.load_pipeline(args.model)
        pipelines.check_prompts(pipe, prompts + held_out)
        pipelines.to_device(pipe)
        calibrator = Calibrator(pipe, prompts, seeds=seeds, steps=args.steps, guidance=args.guidance, base=base,
                                call=sizes, progress=print)
        path_of = dict(zip(targets, paths))

        def save(result) -> None:  # as each target is done: a long run keeps what it finished
            target = result.about["target"]["psnr" if by_psnr else "speedup"]
            about = {"model": args.model or "embedded", **result.about}
            if held_out:  # the held-out references are generated once, for the first target
                about["held_out"] = {"prompts": held_out, "reached": calibrator.check(result.config, held_out)}
            result.config.save(path_of[target], about=about)
            written.append((path_of[target], about))
            print(f"wrote {path_of[target]}: codebook {dict(result.config.codebook)}")

        calibrator.calibrate_many(speedups=() if by_psnr else targets, psnrs=targets if by_psnr else (),
                                  wall_clock=not args.compute, iterations=args.iterations,
                                  check_repeats=args.check_repeats, done=save)
    except BaseException:
        if not written:
            for empty in made:  # deepest first
                with contextlib.suppress(OSError):
                    empty.rmdir()
        raise

    def ratio(value: float | None) -> str:
        return f"{value:.2f}x" if value is not None and math.isfinite(value) else "n/a"

    # one row per target, in the order of the targets (and of the file names)
    columns = ["target", "rate", "scale", "computed", "compute", "wall predicted", "wall checked", "PSNR dB"]
    held = bool(args.check)
    columns += ["held-out computed", "held-out PSNR dB"] if held else []
    rows = []
    for target, (path, about) in zip(targets, written):
        reached, check = about["reached"], about.get("wall_check") or {}
        row = [f"{target:g} dB" if by_psnr else f"{target:g}x" + (" compute" if args.compute else ""),
               str(about["max_rate"]), f"{about['scale']:.4g}", f"{reached['computed_steps']:.1f}/{args.steps}",
               f"{reached['compute_speedup']:.2f}x", ratio(reached.get("predicted_wall_speedup")),
               ratio(check.get("measured_wall_speedup")), f"{reached['psnr']:.1f}"]
        if held:
            out = about["held_out"]["reached"]
            row += [f"{out['computed_steps']:.1f}/{args.steps}", f"{out['psnr']:.1f}"]
        rows.append(row + [str(path)])
    columns.append("file")
    widths = [max(len(text) for text in column) for column in zip(columns, *rows)]
    for line in (columns, ["-" * width for width in widths], *rows):
        print("  ".join(text.ljust(width) for text, width in zip(line, widths)).rstrip())
    if any("predicted_wall_speedup" in about["reached"] for _, about in written):
        print(f"wall predicted: by the cost model (a skipped step costs {written[0][1]['skip_cost']:.3f} of a computed "
              "one); wall checked: the timed check of one video (--check-repeats)")
    print("use one with --cache FILE, or AdaCacheConfig.load(FILE)")
    return 0


def _serve(args: argparse.Namespace) -> int:
    from .serve import serve

    sizes = _check_sizes(args, pipelines.model_kind(args.model))
    return serve(args.model, args.codebook, host=args.host, port=args.port, open_browser=not args.no_browser,
                 call=sizes)


CONTEXT_PARALLEL = ("none", "ulysses", "ring")


def _context_parallel(args: argparse.Namespace, command: str) -> str:
    """The --context-parallel mode, checked against the launch: it needs torchrun (or another launcher) with two
    processes or more; generate under a launcher without it would write one video per process to one file. Ring is
    refused where the model will run on the CPU (no CUDA), before anything starts."""
    import torch

    from .parallel import launched_world, ring_problem

    if args.context_parallel == "ring":
        problem = ring_problem("cuda" if torch.cuda.is_available() else "cpu")
        if problem is not None:
            raise ConfigError(f"--context-parallel ring needs a GPU, and this machine has none that torch can use: "
                              f"{problem}; use --context-parallel ulysses")
    world = launched_world()
    if args.context_parallel != "none" and world == 1:
        raise ConfigError(f"--context-parallel {args.context_parallel} splits the work over processes, but this is "
                          f"one process; launch it with torchrun, e.g. torchrun --nproc-per-node 2 -m adacache.cli "
                          f"{command} ... --context-parallel {args.context_parallel}")
    if args.rank_timeout is not None and args.context_parallel == "none":
        raise ConfigError("--rank-timeout is how long a process of --context-parallel waits for the others; without "
                          "--context-parallel it would do nothing (leave it out)")
    if args.rank_timeout is None:
        args.rank_timeout = RANK_TIMEOUT_S
    if command == "generate" and args.context_parallel == "none" and world > 1:
        raise ConfigError(f"adacache generate under a launcher ({world} processes) would make the same video "
                          f"{world} times; add --context-parallel ulysses to split it over them")
    return args.context_parallel


def _parents() -> dict[str, argparse.ArgumentParser]:
    """The options several commands share, each declared once (argparse parents; a command lists its parents'
    options first in its --help). Options that differ by command in default or help stay with the command:
    --seed, --seeds, --prompts, --num-prompts, --moreg, --context-parallel, calibrate's --steps, bench's and
    train's --no-progress."""
    model = argparse.ArgumentParser(add_help=False)  # generate, bench, calibrate, serve
    model.add_argument("--model", default=None,
                       help="diffusers pipeline id or local folder (default: the embedded model)")
    model.add_argument("--height", type=_POSITIVE, default=None, help="frame height, for --model pipelines")
    model.add_argument("--width", type=_POSITIVE, default=None, help="frame width, for --model pipelines")
    model.add_argument("--num-frames", type=_POSITIVE, default=None, help="number of frames, for --model pipelines")
    guidance = argparse.ArgumentParser(add_help=False)  # generate, bench, calibrate
    guidance.add_argument("--guidance", type=_GUIDANCE, default=4.0, help=GUIDANCE_HELP)
    steps = argparse.ArgumentParser(add_help=False)  # demo, generate, bench
    steps.add_argument("--steps", type=_STEPS, default=30, help=f"denoising steps, 1 to {MAX_STEPS} (default 30)")
    sampling = argparse.ArgumentParser(add_help=False, parents=[steps, guidance])  # generate, bench
    progress = argparse.ArgumentParser(add_help=False)  # demo, generate
    progress.add_argument("--no-progress", action="store_true", help="hide progress bars")
    ranks = argparse.ArgumentParser(add_help=False)  # generate, bench
    ranks.add_argument("--rank-timeout", type=_number(0.0, above=True), default=None, metavar="SECONDS",
                       help="with --context-parallel: how long a process waits for the others before it stops with "
                            "an error (a frozen or stopped process); raise it where loading the model takes longer "
                            f"(default {RANK_TIMEOUT_S:g})")
    return dict(model=model, guidance=guidance, steps=steps, sampling=sampling, progress=progress, ranks=ranks)


def build_parser() -> argparse.ArgumentParser:
    shared = _parents()
    parser = argparse.ArgumentParser(
        prog="adacache", description="Adaptive Caching (AdaCache) with Motion Regularization for video DiTs."
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log the library's decisions")
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser("demo", help="run a small model on CPU uncached and cached; print steps and speed-up",
                               parents=[shared["steps"], shared["progress"]])
    demo.add_argument("--cache", default="balanced",
                      help=f"default, speedup:<x>, a preset ({', '.join(sorted(PRESETS))}) or a JSON config file "
                           "(default balanced: no calibration, aiming at 2x fewer computed steps; this random model "
                           "reads more change than a trained one and computes more)")
    demo.add_argument("--moreg", action="store_true", help="enable motion regularization")
    demo.add_argument("--seed", type=_SEED, default=0, help="random seed (weights and noise), 0 to 2**64-1")
    demo.set_defaults(run=_demo)

    gen = commands.add_parser("generate",
                              help="prompt -> video (the embedded model by default, or any diffusers pipeline)",
                              parents=[shared["model"], shared["sampling"], shared["progress"], shared["ranks"]])
    gen.add_argument("prompt", help='e.g. "a red circle moving right fast"')
    gen.add_argument("-o", "--output", default="out.mp4",
                     help="output .mp4 or .gif, replaced atomically if it exists; its folder must exist "
                          "(default out.mp4)")
    gen.add_argument("--cache", default="auto",
                     help=f"none, auto, default, speedup:<x>, a preset ({', '.join(sorted(PRESETS))}) or a JSON config "
                          "file (default auto: "
                          "the embedded model's calibrated codebook for the step count, or the calibration-free "
                          "default, balanced, for --model pipelines)")
    gen.add_argument("--moreg", action="store_true", help="enable motion regularization")
    gen.add_argument("--seed", type=_SEED, default=0, help="random seed, 0 to 2**64-1 (default 0)")
    gen.add_argument("--compare", action="store_true",
                     help="also run uncached with the same seed: print both times, the speed-up and PSNR, write side by side")
    gen.add_argument("--gif", action="store_true",
                     help="also write a GIF next to an .mp4 output (same name, .gif); with a .gif output it adds "
                          "nothing")
    gen.add_argument("--context-parallel", choices=CONTEXT_PARALLEL, default="none",
                     help="under torchrun: split each video's tokens over the processes with diffusers' context "
                          "parallelism (ulysses or ring; ring needs an attention backend with log-sum-exp, a GPU "
                          "one); rank 0 prints and writes (default none)")
    gen.set_defaults(run=_generate)

    be = commands.add_parser("bench", help="AdaCache and its peers side by side: speed-up, FLOPs, memory, quality",
                             parents=[shared["model"], shared["sampling"], shared["ranks"]])
    be.add_argument("--prompts", default=None, help="prompt file, one per line (default on the embedded model: its "
                                                    "36-prompt set)")
    be.add_argument("--num-prompts", type=_POSITIVE, default=None, help="use N prompts spread over the set")
    be.add_argument("--seeds", default="0,1", help="comma-separated seeds (default 0,1)")
    be.add_argument("--methods", default=None,
                    help="comma-separated: none, auto[+moreg], presets[+moreg], config .json files, static:<k>, "
                         "fbc[:thr], pab[:range], magcache[:thr], taylorseer[:interval], fastercache[:range], and "
                         "with cache-dit installed (pip install 'adacache[peers]') dbcache[:thr], "
                         "dbcache-taylorseer[:thr], cachedit-mask[:slow|medium|fast|ultra] "
                         "(default: all of them at a few settings)")
    be.add_argument("--repeats", type=_POSITIVE, default=1, help="timed generations per video and method (median)")
    be.add_argument("--warmup", type=_NON_NEGATIVE, default=1, help="untimed generations per method first (default 1)")
    be.add_argument("--no-flops", action="store_true", help="skip the FLOP-counting pass")
    be.add_argument("-o", "--out", default="bench", help="output folder; a run there resumes (default bench)")
    be.add_argument("--context-parallel", choices=CONTEXT_PARALLEL, default="none",
                    help="under torchrun: run every video on all processes, its tokens split by diffusers' context "
                         "parallelism (ulysses or ring), AdaCache and the uncached model only; default none: each "
                         "process takes its share of the videos")
    be.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    be.set_defaults(run=_bench)

    ca = commands.add_parser("calibrate", help="derive a codebook for this model and step count from a few prompts",
                             parents=[shared["model"], shared["guidance"]])
    ca.add_argument("-o", "--output", required=True, metavar="FILE.json|FOLDER",
                    help="a .json file (one target), or a folder, created if missing, that gets one file per target "
                         "named by model, steps and target, e.g. embedded-30-2.50x.json")
    target = ca.add_mutually_exclusive_group()
    target.add_argument("--speedup", type=_number(1.0, above=True), nargs="+", default=None, metavar="X",
                        help="target mean speed-up above 1, e.g. 2.0; several (1.5 2 2.5) calibrate one codebook "
                             "each, sharing the reference runs and the cost model")
    target.add_argument("--psnr", type=_number(0.0, above=True), nargs="+", default=None, metavar="DB",
                        help="or: the fastest codebook keeping this mean PSNR (dB); several give one codebook each")
    ca.add_argument("--compute", action="store_true",
                    help="read --speedup as compute (steps / computed steps) instead of wall clock")
    ca.add_argument("--prompts", default=None, help="calibration prompt file (default on the embedded model: its set)")
    ca.add_argument("--num-prompts", type=_POSITIVE, default=6, help="use N prompts spread over the set (default 6)")
    ca.add_argument("--check", type=_NON_NEGATIVE, default=0, metavar="N",
                    help="embedded model: then measure the codebook on N prompts it was not calibrated on")
    ca.add_argument("--seeds", default="0", help="comma-separated seeds (default 0)")
    ca.add_argument("--steps", type=_STEPS, default=30,
                    help=f"denoising steps, 1 to {MAX_STEPS}: codebooks are step-count specific (default 30)")
    ca.add_argument("--base", default=None,
                    help="preset or config file whose other settings (probe, MoReg window) the result keeps "
                         "(default: AdaCacheConfig's defaults)")
    ca.add_argument("--moreg", action="store_true", help="calibrate with motion regularization on")
    ca.add_argument("--forecast", action="store_true",
                    help="calibrate the forecast store: a skipped step extrapolates the last two computed residuals "
                         "instead of reusing the last one (store='forecast' in the configs written)")
    ca.add_argument("--check-repeats", type=_NON_NEGATIVE, default=3, metavar="N",
                    help="wall-clock target: time one video N times uncached and N times cached, interleaved, and "
                         "compare with the cost model's prediction (0 skips the check; default 3)")
    ca.add_argument("--iterations", type=_POSITIVE, default=9,
                    help="bisection steps on the threshold scale, each a cached run of every prompt (default 9)")
    ca.set_defaults(run=_calibrate)

    se = commands.add_parser("serve", help="a web page: prompt -> uncached and AdaCache videos side by side, times, "
                                           "speed-up, PSNR and the probe distance per step (part of adacache[all])",
                             parents=[shared["model"]])
    se.add_argument("--codebook", action="append", default=[], metavar="FILE",
                    help="a JSON config file to offer besides auto and the presets; repeatable; checked at start-up")
    se.add_argument("--host", default="127.0.0.1",
                    help="address to listen on (default 127.0.0.1: this machine only; 0.0.0.0 opens it to the network)")
    se.add_argument("--port", type=_integer(1, 65535), default=7860, help="port, 1 to 65535 (default 7860)")
    se.add_argument("--no-browser", action="store_true", help="do not open the page in a browser")
    se.set_defaults(run=_serve)

    tr = commands.add_parser("train", help="train (or resume) the embedded model on the procedural domain")
    tr.add_argument("--out", default="runs/embedded", help="run folder: checkpoint.pt and log.jsonl (default runs/embedded)")
    tr.add_argument("--size", default="small",
                    help="model size: small (the first shipped model), deep (24 blocks, the second) or tiny (smoke test)")
    tr.add_argument("--architecture", default="wan", choices=["wan", "cogvideox", "latte"],
                    help="diffusers transformer class: wan (3D attention, the first shipped model), cogvideox (joint "
                         "text-video attention, the deep one) or latte (spatial/temporal blocks)")
    tr.add_argument("--steps", type=_POSITIVE, default=4000, help="total optimizer steps (default 4000, as shipped)")
    tr.add_argument("--batch-size", type=_POSITIVE, default=16)
    tr.add_argument("--lr", type=_number(0.0, above=True), default=1e-3)
    tr.add_argument("--seed", type=_integer(0, MAX_TRAIN_SEED), default=0, help="0 to 2**32-1")
    tr.add_argument("--eval-every", type=_NON_NEGATIVE, default=500, help="verifier check every N steps (0 = never)")
    tr.add_argument("--threads", type=_integer(1, 256), default=2, help="torch threads (default 2)")
    tr.add_argument("--export", default=None, help="write the EMA weights of the checkpoint as a pipeline folder")
    tr.add_argument("--export-from", default=None, help="checkpoint to export (default OUT/checkpoint.pt)")
    tr.add_argument("--sigma-mean", type=float, default=0.0,
                    help="location of the logit-normal noise levels trained on (0: centred on 0.5; 1: more high noise)")
    tr.add_argument("--init-from", default=None,
                    help="start a new run from this checkpoint's weights (not its optimizer); a model without the "
                         "frame channel gains it, zero-weighted")
    tr.add_argument("--no-progress", action="store_true")
    tr.set_defaults(run=_train)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one command; returns the exit status (see the module docstring)."""
    parser = build_parser()
    args = parser.parse_args(argv)  # malformed or out-of-range numbers end here: usage error, exit 2
    args.argv = list(sys.argv[1:] if argv is None else argv)  # reports quote the command that made them
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(name)s: %(message)s")
    missing = missing_for_cli(getattr(args, "command", ""))
    if missing:
        print(f"adacache: error: {missing}", file=sys.stderr)
        return 2
    try:
        with sigterm_as_interrupt():  # SIGTERM unwinds like Ctrl-C, so `finally` blocks clean up
            return args.run(args)
    except MissingExtra as error:
        print(f"adacache: error: {error}", file=sys.stderr)
        return 2
    except (ConfigError, ValueError, FloatingPointError, FileNotFoundError) as error:
        print(f"adacache: error: {error}", file=sys.stderr)
        return 2
    except OSError as error:  # the system, not the input: a full disk, a lost mount
        print(f"adacache: error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as stop:
        terminated = isinstance(stop, Terminated)
    # Outside the handler the interrupted frames are released, so what they held (an open progress bar) is closed
    # and drawn now, and this line comes last.
    gc.collect()
    print("adacache: terminated" if terminated else "adacache: interrupted", file=sys.stderr)
    return Terminated.exit_code if terminated else 130


if __name__ == "__main__":
    sys.exit(main())
