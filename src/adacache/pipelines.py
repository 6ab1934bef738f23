"""One road from the command line and the web page to a pipeline: what a --model names, loading and placing it,
the checks before a generation (prompts, finite steps), the first video of an output, what `auto` means, and one
prompt generated uncached, then with AdaCache, from the same seed. Also the numeric bounds every entry point
checks its inputs against, in one place.

It prints nothing (logging only): the CLI owns the terminal and the page its page. `import adacache.pipelines`
is light: torch, diffusers and the hooks are imported by the functions that use them.

    pipe = load_pipeline(None)                     # the embedded model
    to_device(pipe)
    source, label = auto_config(None, steps=30)    # its calibrated codebook for 30 steps
    runs = uncached_then_cached(pipe, AdaCacheConfig.load(source),
                                generation(pipe, "a red circle moving right fast", steps=30, seed=0, guidance=4.0))
    runs.speedup, runs.stats
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import re
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping, Sequence, TypeVar

from .config import AdaCacheConfig, ConfigError

if TYPE_CHECKING:
    import numpy as np

    from .hooks import GenerationStats

logger = logging.getLogger(__name__)

T = TypeVar("T")

# --- bounds -----------------------------------------------------------------------------------------------------------
# The command line checks these while it parses (a typo fails before a model loads); the page checks them on
# every input.
MAX_STEPS = 1000  # the command line's denoising steps: schedules in use are 20-100 (the paper: 30 and 100); more is
#                   most likely a typo
# The page's step range: below 4 every step is computed (steps 1 and 2, and the last two, always are); above 100 a
# page waits too long (the paper's schedules are 30 and 100 steps).
PAGE_MIN_STEPS, PAGE_MAX_STEPS = 4, 100
MAX_GUIDANCE = 100.0  # CFG scale: real models use 1-15; far above, the guided velocity overflows into inf/nan.
#                       At most 1 turns guidance off (diffusers' convention), so 0-1 all mean "no CFG".
MAX_SEED = 2**64 - 1  # torch.Generator.manual_seed takes 0 .. 2**64 - 1
MAX_TRAIN_SEED = 2**32 - 1  # training derives its stream seeds as seed * 1,000,003 + step, which must stay in 64 bits
RANK_TIMEOUT_S = 600.0  # --context-parallel: how long a process waits for the others in one collective (or at the
# start) before it stops with an error. 10 minutes, NCCL's own default: far above the gap between two collectives of
# one generation (a layer's compute) and the longest legitimate wait (rank 0 writing a video or a bench report), so a
# frozen peer ends the run in minutes instead of gloo's default 30. Raise it where loading the model takes longer.

# What `auto` means where the model ships no calibrated codebook (any --model pipeline): the paper's 30-step preset
AUTO_FALLBACK = "balanced"  # the calibration-free default (a preset of AdaCacheConfig)
AUTO_FALLBACK_LABEL = f"{AUTO_FALLBACK}, the calibration-free default"

# A hub id as huggingface_hub spells one: "name" or "owner/name"
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")


# --- which model, loading, placing ------------------------------------------------------------------------------------
def embedded_name(model: str | None) -> str | None:
    """The shipped embedded model a --model names: None (the default, "small"), "small" or "deep"; None for any
    other --model (a folder, a hub id)."""
    from .embedded.pipeline import DEFAULT_EMBEDDED, EMBEDDED_MODELS

    if model is None:
        return DEFAULT_EMBEDDED
    return model if model in EMBEDDED_MODELS and not Path(model).exists() else None


def model_kind(model: str | None) -> str:
    """"embedded" (None, a shipped embedded model's name, or a folder `adacache train --export` wrote) or
    "diffusers"; a --model that cannot be a pipeline is refused (ConfigError), before any work."""
    if embedded_name(model) is not None:
        return "embedded"
    if not model.strip():
        raise ConfigError("--model is empty; give a pipeline folder or hub id, or leave it out for the embedded model")
    path = Path(model).expanduser()
    if path.is_dir():
        index = path / "model_index.json"
        if not index.is_file():
            raise ConfigError(f"--model {model!r} is a folder without model_index.json, so not a diffusers pipeline; "
                              "give the folder that save_pretrained (or `adacache train --export DIR`) wrote")
        try:
            data = json.loads(index.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
            reason = error.strerror if isinstance(error, OSError) and error.strerror else error
            raise ConfigError(f"cannot read {str(index)!r}: {reason}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{str(index)!r} must hold a JSON object naming the pipeline's class and components")
        return "embedded" if data.get("_class_name") == "EmbeddedVideoPipeline" else "diffusers"
    if path.exists():
        raise ConfigError(f"--model {model!r} is a file; give a pipeline folder (holding model_index.json) or a hub "
                          "id such as Wan-AI/Wan2.1-T2V-1.3B-Diffusers")
    if not _HUB_ID.fullmatch(model):
        raise ConfigError(f"--model {model!r}: no such folder, and not a hub id (owner/name)")
    return "diffusers"


def load_pipeline(model: str | None, progress: bool = True):
    """The embedded model for None; a folder holding it (as `adacache train --export` writes); else any diffusers
    pipeline id or folder, in float32. Load failures become a ConfigError naming the model. `progress`: show the
    loading bars of diffusers and transformers."""
    import torch

    from .embedded.pipeline import EmbeddedVideoPipeline

    kind = model_kind(model)
    logger.info("loading %s (%s)", repr(model or "small"), kind)
    with _loading_bars(progress):
        if embedded_name(model) is not None:
            return EmbeddedVideoPipeline.from_embedded(embedded_name(model))
        folder = Path(model).expanduser()
        source = str(folder) if folder.is_dir() else model  # a quoted "~/..." too
        try:
            if kind == "embedded":
                return EmbeddedVideoPipeline.from_pretrained(source, local_files_only=True)
            from diffusers import DiffusionPipeline

            return DiffusionPipeline.from_pretrained(source, dtype=torch.float32)
        except (OSError, ValueError) as error:
            reason = " ".join(str(error).split())  # diffusers' messages run long: the start says what failed
            reason = reason if len(reason) <= 160 else reason[:160] + "..."
            if folder.is_dir():
                raise ConfigError(f"cannot load the pipeline folder {model!r}: {reason}") from None
            raise ConfigError(
                f"cannot load --model {model!r}: no local folder has that name, and the hub id is neither cached "
                f"nor downloadable; give a folder holding model_index.json, or check the id and the network "
                f"(diffusers: {reason})") from None


@contextlib.contextmanager
def _loading_bars(show: bool):
    """The loading bars of diffusers ("Loading pipeline components") and transformers ("Loading weights", a text
    encoder's), hidden unless `show`, and restored after."""
    import importlib

    switches = []
    for name in ("diffusers.utils.logging", "transformers.utils.logging"):
        try:
            switches.append(importlib.import_module(name))
        except ImportError:  # transformers is optional
            continue
    shown = [module for module in switches if module.is_progress_bar_enabled()]
    if not show:
        for module in shown:
            module.disable_progress_bar()
    try:
        yield
    finally:
        for module in shown:
            module.enable_progress_bar()


def to_device(pipe) -> None:
    """CUDA when there is one (under torchrun, this process's GPU); else CPU as loaded."""
    import os

    import torch

    if torch.cuda.is_available():
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        pipe.to(f"cuda:{local}")


# --- checks before a generation ---------------------------------------------------------------------------------------
def check_prompts(pipe, prompts: Sequence[str]) -> list[str]:
    """Refuse (ValueError), before any generation, a prompt the embedded model cannot read (no word of its
    vocabulary, too many words); other pipelines read any text. Returns the unknown words of the prompts that
    pass (the embedded model reads them as <unk>; the caller decides whether to warn)."""
    encoder = getattr(pipe, "text_encoder", None)
    if not hasattr(encoder, "check_prompt"):
        return []
    return [word for prompt in prompts for word in encoder.check_prompt(prompt)]


def finite_step_check(pipe, steps: int) -> dict:
    """Call arguments for a diffusers pipeline that takes `callback_on_step_end`: stop at the first step whose
    latents hold inf or nan, naming it (the decoded frames are checked again in any case); {} for a pipeline
    without the callback (the embedded one checks every step itself)."""
    import inspect

    import torch

    if ("callback_on_step_end" not in inspect.signature(pipe.__call__).parameters
            or "latents" not in getattr(pipe, "_callback_tensor_inputs", ())):
        return {}

    def check(pipe, step: int, timestep, tensors: dict) -> dict:
        if not torch.isfinite(tensors["latents"]).all():
            raise FloatingPointError(f"the latents became non-finite (inf or nan) at step {step + 1} of {steps}; "
                                     "lower --guidance, or check the model's weights")
        return {}

    return {"callback_on_step_end": check, "callback_on_step_end_tensor_inputs": ["latents"]}


def first_video(output) -> "np.ndarray":
    """The first video of a pipeline's output (`.frames`, or the first item of a tuple), as a numpy array laid out
    as the pipeline returned it ((T, H, W, 3) for output_type "np"), its dtype kept: a tensor is moved to the CPU
    (bfloat16, which numpy lacks, as float32), a list of PIL images stacked."""
    import numpy as np

    frames = output.frames if hasattr(output, "frames") else output[0]
    video = frames[0]
    if hasattr(video, "detach"):
        import torch

        video = video.detach().cpu()
        return (video.float() if video.dtype == torch.bfloat16 else video).numpy()
    if isinstance(video, (list, tuple)):
        return np.stack([np.asarray(frame) for frame in video])
    return np.asarray(video)


# --- what `auto` means ------------------------------------------------------------------------------------------------
def calibrated_codebooks(model: str | None, steps: int) -> dict[str, Path | None] | None:
    """The codebooks a model ships, calibrated for `steps`: {"plain": file or None, "moreg": file or None} for the
    embedded model (None: the shipped one, see `embedded.pipeline.tuned_config`), None for a --model pipeline."""
    name = embedded_name(model)
    if name is None:
        return None
    from .embedded.pipeline import tuned_config

    return {"plain": tuned_config(steps, name=name), "moreg": tuned_config(steps, moreg=True, name=name)}


def auto_choice(tuned: str | Path | Mapping[str, Any] | None, moreg: bool = False) -> str:
    """The `auto` rule, the only copy: with `moreg`, the model's MoReg codebook where it ships one (its motion
    normalisation was measured on it), else its plain one, else `AUTO_FALLBACK`. `tuned` is the model's own
    codebook file, or a mapping {"plain": file, "moreg": file} (`calibrated_codebooks`), or None."""
    if isinstance(tuned, Mapping):
        chosen = (tuned.get("moreg") if moreg else None) or tuned.get("plain")
    else:
        chosen = tuned
    return str(chosen) if chosen is not None else AUTO_FALLBACK


def auto_config(model: str | None, steps: int, moreg: bool = False) -> tuple[str, str]:
    """What `--cache auto` (the page's `auto`, the bench's `auto[+moreg]`) uses for a model and step count: a
    config file or preset name for `AdaCacheConfig.load`, and a label naming it ("the embedded model's
    adacache-30.json", or the fallback preset's name for a --model pipeline). MoReg itself is switched on by the
    caller; `moreg` only picks the codebook."""
    source = auto_choice(calibrated_codebooks(model, steps), moreg)
    label = AUTO_FALLBACK_LABEL if source == AUTO_FALLBACK else f"the embedded model's {Path(source).name}"
    logger.info("auto at %d steps%s: %s", steps, " with MoReg" if moreg else "", label)
    return source, label


# --- one prompt, uncached then cached ---------------------------------------------------------------------------------
@dataclasses.dataclass
class SameSeedRuns:
    """One generation uncached, then with AdaCache, from the same seed."""

    uncached: Any  # what the run returned: a uint8 video (T, H, W, 3) from `generation`
    cached: Any
    uncached_seconds: float  # wall clock of the whole run (the pipeline call and taking its first video)
    cached_seconds: float
    stats: list["GenerationStats"]  # per CFG branch (and transformer) of the cached run

    @property
    def speedup(self) -> float:
        return self.uncached_seconds / self.cached_seconds


def generation(pipe, prompt: str, *, steps: int, seed: int, guidance: float,
               call: dict | None = None) -> Callable[[], "np.ndarray"]:
    """One generation of `prompt` from `seed`, as a function to call (and time): it returns the output's first
    video as uint8 (T, H, W, 3), refusing frames that hold inf or nan (`video.to_uint8`). output_type "np": uint8
    from the embedded model, floats in [0, 1] from diffusers pipelines. `call`: more pipeline arguments (height,
    width, num_frames, `finite_step_check`'s callback)."""
    arguments = dict(num_inference_steps=steps, guidance_scale=guidance, output_type="np", **(call or {}))

    def run() -> "np.ndarray":
        import torch

        from .video import to_uint8

        return to_uint8(first_video(pipe(prompt, generator=torch.Generator().manual_seed(seed), **arguments)))

    return run


def timed(run: Callable[[], T]) -> tuple[T, float]:
    """run()'s result and its wall time in seconds."""
    start = time.perf_counter()
    result = run()
    return result, time.perf_counter() - start


def timed_cached(target, config: AdaCacheConfig, run: Callable[[], T], *, paused: bool = False
                 ) -> tuple[T, float, list["GenerationStats"]]:
    """run() with AdaCache on `target` (a pipeline or a transformer) for this run only: its result, wall time and
    stats. AdaCache is applied before and removed after (also when the run raises); where `paused`, it is on
    `target` already, paused (`reconfigure(target, None)`, as under context parallelism, where diffusers' split
    wraps its blocks), and is reconfigured to `config` for the run and paused again after."""
    from .hooks import apply_adacache, get_stats, reconfigure, remove_adacache

    if paused:
        reconfigure(target, config)
    else:
        apply_adacache(target, config)
    try:
        result, seconds = timed(run)
        stats = get_stats(target)  # applied (or reconfigured) just before: this run's branches only
    finally:
        if paused:
            reconfigure(target, None)
        else:
            remove_adacache(target)
    return result, seconds, stats


def uncached_then_cached(target, config: AdaCacheConfig, run: Callable[[], Any], *,
                         warm_up: Callable[[], Any] | None = None, paused: bool = False) -> SameSeedRuns:
    """run() uncached, then with AdaCache (`timed_cached`), each timed; `run` generates from a fixed seed
    (`generation`), so the two differ only by the cache. `warm_up`, if given, is called first, untimed: the first
    call in a process pays one-time costs (allocation, kernel selection) that would be charged to the uncached
    run and flatter the speed-up."""
    if warm_up is not None:
        warm_up()
    uncached, uncached_seconds = timed(run)
    cached, cached_seconds, stats = timed_cached(target, config, run, paused=paused)
    return SameSeedRuns(uncached, cached, uncached_seconds, cached_seconds, stats)
