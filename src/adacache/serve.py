"""The web page of `adacache serve`: type a prompt, pick a codebook, and see the model's uncached and cached videos
side by side, both wall times, the speed-up, PSNR, and the probe distance at every step with the computed steps
marked (the picture that explains AdaCache).

Three layers, each usable without the one above it:
- `compare` runs one prompt uncached, then with AdaCache, with the same seed (`pipelines.uncached_then_cached`,
  the road `adacache generate --compare` takes too), and writes both videos; no web code.
- `distance_plot` and `summary` draw what `compare` returned (matplotlib without pyplot; markdown).
- `WebPage` is the gradio page around them: it checks every input and turns every failure into a message on the
  page (`gradio.Error`), never a traceback. `serve` is the command: it loads the model once, writes only into one
  temporary folder (gradio's own files included) and deletes that folder on exit.

One generation at a time per model: a model with AdaCache refuses concurrent calls (see hooks.py), so the page's
generate event runs with a gradio concurrency limit of 1 (the queue holds the rest) and under a lock as well.
gradio is an optional dependency (`pip install "adacache[all]"`), imported only here and only when needed.

What reaches the page from outside, and what it does with it (gradio 6):
- The generate API takes any JSON, not only what the page's controls send: the event runs with `preprocess=False`
  (gradio's own conversion fails on a NaN seed or a string guidance with a blank error), so `check_inputs` sees
  the raw values and refuses each bad one with a message; a call with too few or too many values is refused by
  the Blocks' `validate_inputs` (overridden in `build`) with one too.
- Uploads: the page takes no file, and gradio's upload route refuses any file over MAX_UPLOAD_BYTES (HTTP 413).
- A client that disconnects stops its generation: gradio runs a plain function to its end whatever the client does,
  but stops iterating a generator whose client is gone and closes it. The event is therefore a generator
  (`generate_while_connected`) that runs `generate` in a worker thread and yields "no change" every HEARTBEAT_S;
  closed, it sets the generation's stop flag, and the transformers raise `Stopped` at their next call (between
  denoising steps), which frees the model for the next in the queue.
"""

from __future__ import annotations

import atexit
import contextlib
import contextvars
import dataclasses
import errno
import logging
import math
import os
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Sequence

from . import pipelines
from .config import PRESETS, AdaCacheConfig, ConfigError
from .pipelines import MAX_GUIDANCE, MAX_SEED, PAGE_MAX_STEPS, PAGE_MIN_STEPS

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from .hooks import GenerationStats

logger = logging.getLogger(__name__)

DEFAULT_PROMPT = "a red circle moving right fast"
DEFAULT_STEPS = 30  # in the page's step range, PAGE_MIN_STEPS .. PAGE_MAX_STEPS
DEFAULT_GUIDANCE = 4.0
AUTO = "auto"
GRADIO_MISSING = 'the web page needs gradio: pip install "adacache[all]"'
PAGE_VIDEO_SIZE = 256  # tiny clips are upscaled (nearest neighbour, whole factors) to about this many pixels high
KEEP_RUNS = 8  # a run's videos stay in the temporary folder until this many newer runs exist
QUEUE_SIZE = 16  # generations waiting for the model; more are refused with gradio's "queue is full"
MAX_UPLOAD_BYTES = 0  # the page takes no file: gradio's upload route refuses any file with a byte in it (HTTP 413)
HEARTBEAT_S = 0.5  # while generating, the event yields "no change" this often, so that gradio notices a client gone
INPUT_NAMES = ("prompt", "cache", "moreg", "steps", "seed", "guidance")  # the generate API's values, in order


# --- one comparison: the library part -------------------------------------------------------------------------------


@dataclasses.dataclass
class Comparison:
    """One prompt generated uncached and with AdaCache, same seed."""

    uncached_video: Path
    cached_video: Path
    uncached_seconds: float
    cached_seconds: float
    psnr_db: float  # the AdaCache video against the uncached one (peak 1.0 on [0, 1] frames); inf when identical
    stats: list["GenerationStats"]  # per CFG branch (and transformer) of the cached generation
    num_steps: int

    @property
    def speedup(self) -> float:
        return self.uncached_seconds / self.cached_seconds


class Stopped(Exception):
    """A generation stopped between two transformer calls because its stop flag was set (its client left)."""


@contextlib.contextmanager
def stop_when(pipe, stop: threading.Event | None) -> Iterator[None]:
    """Within the block, the pipeline's transformers raise `Stopped` at their next call once `stop` is set: the
    generation ends between denoising steps (or between a step's CFG calls), as a failing call would end it
    (AdaCache, applied for the cached run only, is removed by `pipelines.timed_cached`'s finally). Forward
    pre-hooks, removed on the way out; any pipeline, with or without a step callback."""
    if stop is None:
        yield
        return
    from .hooks import transformers_of

    def check(module, args) -> None:
        if stop.is_set():
            raise Stopped("the generation was stopped: its client disconnected")

    handles = [model.register_forward_pre_hook(check) for model in transformers_of(pipe)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def compare(pipe, prompt: str, config: AdaCacheConfig, folder: str | os.PathLike, *, steps: int, seed: int,
            guidance: float, call: dict | None = None) -> Comparison:
    """Generate `prompt` uncached, then with AdaCache (applied for this generation only), from the same seed, and
    write both videos into `folder` as uncached.mp4 and adacache.mp4, upscaled so a tiny clip is visible.
    `call`: more pipeline arguments (height, width, num_frames, callback_on_step_end). PSNR: `metrics.psnr` on
    the uint8 frames scaled to [0, 1], peak 1.0."""
    from .evaluation.metrics import psnr
    from .video import write_video

    run = pipelines.generation(pipe, prompt, steps=steps, seed=seed, guidance=guidance, call=call)
    runs = pipelines.uncached_then_cached(pipe, config, run)
    folder = Path(folder)
    scale = max(1, PAGE_VIDEO_SIZE // runs.uncached.shape[1])
    paths = folder / "uncached.mp4", folder / "adacache.mp4"
    for video, path in zip((runs.uncached, runs.cached), paths):
        write_video(video, path, scale=scale)
    return Comparison(
        uncached_video=paths[0], cached_video=paths[1], uncached_seconds=runs.uncached_seconds,
        cached_seconds=runs.cached_seconds, psnr_db=psnr(runs.uncached / 255.0, runs.cached / 255.0),
        stats=runs.stats, num_steps=steps,
    )


def _branch_name(stats: "GenerationStats", all_stats: Sequence["GenerationStats"]) -> str:
    """The branch, and the transformer where a pipeline has several (Wan 2.2)."""
    return f"{stats.model} {stats.branch}" if len({s.model for s in all_stats}) > 1 else stats.branch


def _runs(steps: Sequence[int]) -> list[tuple[int, int]]:
    """Consecutive steps as (first, last) runs: [3, 4, 5, 8] -> [(3, 5), (8, 8)]."""
    runs: list[tuple[int, int]] = []
    for step in sorted(steps):
        if runs and step == runs[-1][1] + 1:
            runs[-1] = (runs[-1][0], step)
        else:
            runs.append((step, step))
    return runs


def distance_plot(stats: Sequence["GenerationStats"], num_steps: int,
                  codebook: dict[float, int] | None = None) -> "Figure":
    """The probe distance at each computed step (markers and line, with the rate chosen there), the skipped steps
    shaded, the codebook's thresholds as dashed lines (None: AdaCache without a codebook, whose distances are
    relative to the generation's first); below, one row per branch: which steps were computed.
    A matplotlib Figure made without pyplot (no global state; safe in a server's worker threads)."""
    from .extras import need

    Figure = need("matplotlib.figure", "The web page's plot").Figure
    from matplotlib.patches import Patch
    from matplotlib.ticker import MaxNLocator

    rows = max(1, len(stats))
    figure = Figure(figsize=(9.5, 3.8 + 0.3 * rows), dpi=100, layout="constrained")
    grid = figure.add_gridspec(2, 1, height_ratios=[5, 0.45 * rows + 0.3])
    axes = figure.add_subplot(grid[0])
    timeline = figure.add_subplot(grid[1], sharex=axes)
    if not stats:
        axes.text(0.5, 0.5, "no AdaCache statistics for this generation", ha="center", va="center",
                  transform=axes.transAxes)
    top = 0.0
    for index, branch in enumerate(stats):
        color = f"C{index}"
        points = [(step, distance, rate) for step, distance, rate in
                  zip(branch.computed_steps, branch.distances, branch.rates) if distance is not None]
        if points:
            xs, ys, rates = zip(*points)
            top = max(top, max(ys))
            name = f"{_branch_name(branch, stats)}: " if len(stats) > 1 else ""
            axes.plot(xs, ys, marker="o", markersize=5, linewidth=1.5, color=color,
                      label=f"{name}probe distance at a computed step")
            if len(points) <= 25:  # the rate chosen there: how many steps until the next computed one
                for x, y, rate in zip(xs, ys, rates):
                    axes.annotate(f"{rate}", (x, y), textcoords="offset points", xytext=(0, 6), ha="center",
                                  fontsize=7, color=color)
        for first, last in _runs(branch.skipped_steps):
            axes.axvspan(first - 0.5, last + 0.5, color="0.88", zorder=0, linewidth=0)
    top = top * 1.25 if top > 0 else 1.0
    handles, labels = axes.get_legend_handles_labels()
    handles.append(Patch(color="0.88", label="skipped step"))
    axes.set_ylim(0, top)
    # The lookup: a distance below a threshold (and not below the one under it) gives that threshold's rate
    shown = [(threshold, rate) for threshold, rate in sorted((codebook or {}).items()) if threshold <= top]
    for threshold, _ in shown:
        line = axes.axhline(threshold, linestyle="--", linewidth=0.8, color="0.5", label="codebook threshold")
    if shown:
        handles.append(line)
        rates = axes.twinx()
        rates.set_ylim(0, top)
        labelled: list[tuple[float, int]] = []
        for threshold, rate in shown:  # thresholds closer than a label's height: the lower one's label only
            if not labelled or threshold - labelled[-1][0] > 0.05 * top:
                labelled.append((threshold, rate))
        rates.set_yticks([t for t, _ in labelled], [f"< {t:.2g}: rate {rate}" for t, rate in labelled], fontsize=7)
        rates.tick_params(length=0, colors="0.35")
    axes.set_ylabel("probe distance (relative L1)" if codebook else "probe distance, relative to the first")
    computed = len(stats[0].computed_steps) if stats else 0
    axes.set_title(f"AdaCache computed {computed} of {num_steps} steps; grey: skipped (cached residual reused); "
                   "numbers: rate chosen", fontsize=9)
    axes.legend(handles=handles, fontsize=7, loc="upper center")
    axes.tick_params(labelbottom=False)

    for row, branch in enumerate(stats):
        cell = 0.8 if num_steps <= 60 else 1.0  # a gap between steps where there is room for one
        timeline.broken_barh([(step - cell / 2, cell) for step in branch.computed_steps], (row - 0.35, 0.7),
                             color=f"C{row}")
        timeline.broken_barh([(step - cell / 2, cell) for step in branch.skipped_steps], (row - 0.35, 0.7),
                             color="0.85")
    timeline.set_yticks(range(rows), [_branch_name(s, stats) for s in stats] or [""], fontsize=7)
    timeline.set_ylim(rows - 0.5, -0.5)
    timeline.set_xlim(0.5, num_steps + 0.5)
    timeline.xaxis.set_major_locator(MaxNLocator(integer=True))
    timeline.set_xlabel("denoising step (coloured: computed, grey: skipped)")
    return figure


def _seconds(value: float) -> str:
    return f"{value:.2f} s" if value < 100 else f"{value:.0f} s"


def summary(result: Comparison, cache_label: str) -> str:
    """The numbers under the videos, as markdown."""
    psnr = "identical (∞ dB)" if math.isinf(result.psnr_db) else f"{result.psnr_db:.1f} dB"
    computed = ", ".join(f"{_branch_name(s, result.stats)} {len(s.computed_steps)}/{s.steps_seen}"
                         for s in result.stats) or "no statistics"
    lines = [
        "| uncached | AdaCache | speed-up | PSNR | computed steps |",
        "| --- | --- | --- | --- | --- |",
        f"| {_seconds(result.uncached_seconds)} | {_seconds(result.cached_seconds)} | **{result.speedup:.2f}x** | "
        f"{psnr} | {computed} |",
        "",
        f"Wall clock, same process, same seed; PSNR of the AdaCache video against the uncached one (peak 1.0, "
        f"frames scaled to [0, 1]). Cache: {cache_label}.",
    ]
    notes = sorted({note for s in result.stats for note in s.notes})
    lines += [f"- note: {note}" for note in notes]
    return "\n".join(lines)


# --- the page -------------------------------------------------------------------------------------------------------


def _gradio():
    try:
        import gradio
    except ImportError as error:
        missing = getattr(error, "name", None) in ("gradio", None)
        raise ConfigError(GRADIO_MISSING if missing else f"{GRADIO_MISSING} ({error})") from None
    return gradio


class WebPage:
    """The page for one loaded pipeline. `generate` is what its button calls."""

    def __init__(self, pipe, folder: str | os.PathLike, *, model: str | None = None,
                 codebooks: dict[str, AdaCacheConfig] | None = None, call: dict | None = None):
        self.pipe = pipe
        self.folder = Path(folder)
        self.model = model  # None: the embedded model, whose own calibrated codebooks `auto` takes
        self.kind = pipelines.model_kind(model)  # "embedded" (the embedded model, or a folder of it) or "diffusers"
        self.model_label = "the embedded model" if model is None else model  # (or its name: "deep")
        self.codebooks = dict(codebooks or {})  # label -> config, from --codebook files
        self.call = dict(call or {})  # height / width / num_frames for --model pipelines
        self._lock = threading.Lock()  # one generation at a time, whatever the queue does
        self._runs = 0
        self._closed = False  # set by close(): the server is stopping, no new generation starts

    @property
    def cache_choices(self) -> list[str]:
        return [AUTO, *sorted(PRESETS), *self.codebooks]

    def resolve_cache(self, choice: str, steps: int, moreg: bool) -> tuple[AdaCacheConfig, str]:
        """The config for a dropdown choice, and how to name it on the page."""
        if choice == AUTO:  # as `adacache generate --cache auto [--moreg]`
            source, label = pipelines.auto_config(self.model, steps, moreg)
            config, label = AdaCacheConfig.load(source), f"auto: {label}"
        elif choice in PRESETS:
            config, label = AdaCacheConfig.from_preset(choice), choice
        elif choice in self.codebooks:
            config, label = self.codebooks[choice], choice
        else:
            raise ConfigError(f"unknown cache {choice!r}; pick one of: {', '.join(self.cache_choices)}")
        if moreg:
            config = dataclasses.replace(config, moreg=True)
        return config, label + (" + MoReg" if moreg else "")

    def check_inputs(self, prompt: Any, cache: Any, moreg: Any, steps: Any, seed: Any, guidance: Any
                     ) -> tuple[str, str, bool, int, int, float, list[str]]:
        """Every input checked (a page's API takes any value); ConfigError says what to change. Returns them
        normalised, with the prompt's unknown words (the embedded model reads them as <unk>)."""
        if prompt is not None and not isinstance(prompt, str):
            raise ConfigError(f"the prompt must be text, got {_shown(prompt)}")
        if prompt is None or not prompt.strip():
            raise ConfigError(f"the prompt is empty; describe a clip, e.g. '{DEFAULT_PROMPT}'")
        prompt = prompt.strip()
        if not isinstance(cache, str) or cache not in self.cache_choices:
            raise ConfigError(f"unknown cache {_shown(cache)}; pick one of: {', '.join(self.cache_choices)}")
        if not isinstance(moreg, bool):
            raise ConfigError(f"moreg must be true or false, got {_shown(moreg)}")
        steps = _whole(steps, "steps", PAGE_MIN_STEPS, PAGE_MAX_STEPS)
        seed = _whole(seed, "seed", 0, MAX_SEED)
        if isinstance(guidance, bool) or not isinstance(guidance, (int, float)) or not math.isfinite(guidance) \
                or not 0 <= guidance <= MAX_GUIDANCE:
            raise ConfigError(f"guidance must be a number from 0 to {MAX_GUIDANCE:g} (at most 1 turns guidance "
                              f"off), got {_shown(guidance)}")
        unknown = pipelines.check_prompts(self.pipe, [prompt])
        return prompt, cache, moreg, steps, seed, float(guidance), unknown

    def close(self) -> None:
        """Wait for the generation in progress, if any, to finish, and refuse any later one.

        The server runs generations in its worker threads, which are daemon threads (started from gradio's daemon
        server thread). Left running when the command returns, one is still inside torch when the interpreter
        shuts down and is killed there: the process aborts (exit -6, "terminate called without an active
        exception") instead of exiting 130, and its videos may land after the temporary folder was deleted.
        Waiting here is interruptible (a second Ctrl-C stops waiting)."""
        with self._lock:
            self._closed = True

    @property
    def busy(self) -> bool:
        """A generation is running."""
        return self._lock.locked()

    def next_folder(self) -> Path:
        """A fresh folder for this run's videos; runs older than the last KEEP_RUNS are deleted."""
        self._runs += 1
        folder = self.folder / f"run-{self._runs:05d}"
        folder.mkdir(parents=True)
        stale = self.folder / f"run-{self._runs - KEEP_RUNS:05d}"
        if self._runs > KEEP_RUNS and stale.is_dir():
            shutil.rmtree(stale, ignore_errors=True)
        return folder

    def generate(self, prompt, cache, moreg, steps, seed, guidance, progress: Any = None,
                 stop: threading.Event | None = None) -> tuple[str, str, "Figure", str]:
        """The button: (uncached video path, AdaCache video path, distance plot, summary markdown). Every failure
        is a gradio.Error with a one-line message. `stop`, once set, ends the generation at the next transformer
        call (`stop_when`)."""
        gr = _gradio()
        try:
            prompt, cache, moreg, steps, seed, guidance, unknown = self.check_inputs(
                prompt, cache, moreg, steps, seed, guidance)
            config, label = self.resolve_cache(cache, steps, moreg)
        except ValueError as error:  # ConfigError included; check_prompt raises ValueError
            raise gr.Error(str(error), print_exception=False) from None
        if unknown:
            gr.Warning(f"the model does not know the words {', '.join(map(repr, unknown))}; it reads them as "
                       "unknown")
        call = dict(self.call)
        if self.kind == "diffusers":
            call.update(pipelines.finite_step_check(self.pipe, steps))
        try:
            with self._lock:
                if self._closed:
                    raise ConfigError("the server is stopping; no new generation starts")
                if progress is not None:
                    progress(0.05, desc="generating uncached, then with AdaCache")
                with stop_when(self.pipe, stop):
                    result = compare(self.pipe, prompt, config, self.next_folder(), steps=steps, seed=seed,
                                     guidance=guidance, call=call)
                if progress is not None:
                    progress(0.95, desc="drawing")
                figure = distance_plot(result.stats, steps, dict(config.codebook) if config.codebook else None)
        except Stopped as stopped:  # nobody is left to read it; the model is free again
            logger.info("%s", stopped)
            raise gr.Error(str(stopped), print_exception=False) from None
        except (ValueError, FloatingPointError) as error:  # bad values met during generation: say what to change
            raise gr.Error(str(error), print_exception=False) from None
        except Exception as error:  # anything else: one line on the page, the traceback in the server's log
            logger.exception("generation failed")
            raise gr.Error(f"the generation failed: {type(error).__name__}: {error}", print_exception=False) \
                from None
        return str(result.uncached_video), str(result.cached_video), figure, summary(result, label)

    def generate_while_connected(self, *inputs: Any, progress: Any = None) -> Iterator[tuple]:
        """`generate(*inputs)` for the page's event, as a generator that gradio stops when the client disconnects:
        the generation runs in a worker thread (with this thread's context, where gradio's warnings and progress
        find their event), this yields gradio's "no change" every HEARTBEAT_S while it runs, then its result.
        Closed early (the client left), it sets the generation's stop flag on the way out: the generation ends at
        its next transformer call and frees the model."""
        gr = _gradio()
        stop, outcome = threading.Event(), {}

        def work() -> None:
            try:
                outcome["result"] = self.generate(*inputs, progress=progress, stop=stop)
            except BaseException as error:  # noqa: BLE001 - raised again in the event's thread
                outcome["error"] = error

        worker = threading.Thread(target=contextvars.copy_context().run, args=(work,), name="adacache-generation",
                                  daemon=True)
        worker.start()
        try:
            while worker.is_alive():
                worker.join(HEARTBEAT_S)
                if worker.is_alive():
                    yield tuple(gr.skip() for _ in range(4))
        finally:
            stop.set()  # the generation is over, or its client is gone (gradio closed this generator)
        if "error" in outcome:
            raise outcome["error"]
        yield outcome["result"]

    def build(self):
        """The gradio Blocks: controls left, the two videos right, numbers and the plot below."""
        gr = _gradio()

        def on_click(prompt, cache, moreg, steps, seed, guidance, progress=gr.Progress()):
            yield from self.generate_while_connected(prompt, cache, moreg, steps, seed, guidance, progress=progress)

        class Page(gr.Blocks):
            """Refuses an API call with too few or too many values with a message (relies on: gradio 6's
            `Blocks.validate_inputs(block_fn, inputs)`, called before any value is read, which refuses too few
            without one and lets extra values through)."""

            def validate_inputs(self, block_fn, inputs) -> None:
                if len(inputs) != len(block_fn.inputs):
                    raise gr.Error(f"the generate API takes {len(INPUT_NAMES)} values ({', '.join(INPUT_NAMES)}), "
                                   f"got {len(inputs)}", print_exception=False)
                super().validate_inputs(block_fn, inputs)

        with Page(title="AdaCache", analytics_enabled=False) as page:
            gr.Markdown(
                f"## AdaCache: adaptive caching for video diffusion transformers\n"
                f"Model: **{self.model_label}**. Each prompt is generated twice from the same seed: uncached, then "
                "with AdaCache, which skips the transformer's blocks on steps where its features change little. "
                "One generation at a time; others wait in the queue.")
            with gr.Row():
                with gr.Column(scale=1, min_width=280):
                    prompt = gr.Textbox(DEFAULT_PROMPT, label="prompt", lines=2, elem_id="prompt")
                    cache = gr.Dropdown(self.cache_choices, value=AUTO, label="codebook or preset",
                                        info="auto: the model's own calibrated codebook for the step count",
                                        elem_id="cache")
                    moreg = gr.Checkbox(False, label="MoReg (motion regularization)", elem_id="moreg")
                    steps = gr.Slider(PAGE_MIN_STEPS, PAGE_MAX_STEPS, DEFAULT_STEPS, step=1, label="steps",
                                      elem_id="steps")
                    with gr.Row():
                        seed = gr.Number(0, label="seed", precision=0, minimum=0, elem_id="seed")
                        guidance = gr.Number(DEFAULT_GUIDANCE, label="guidance", minimum=0, elem_id="guidance")
                    button = gr.Button("Generate", variant="primary", elem_id="generate")
                with gr.Column(scale=2):
                    with gr.Row():
                        uncached = gr.Video(label="uncached", autoplay=True, loop=True, height=300,
                                            elem_id="uncached-video", interactive=False)
                        cached = gr.Video(label="AdaCache", autoplay=True, loop=True, height=300,
                                          elem_id="cached-video", interactive=False)
                    numbers = gr.Markdown("Press **Generate**: both videos, the times, speed-up and PSNR appear "
                                          "here.", elem_id="summary")
            plot = gr.Plot(label="probe distance per step", format="png", elem_id="distance-plot")
            # preprocess=False: the raw values reach check_inputs, which has a message for each bad one
            button.click(on_click, [prompt, cache, moreg, steps, seed, guidance], [uncached, cached, plot, numbers],
                         concurrency_limit=1, concurrency_id="model", api_name="generate", preprocess=False)
        return page


def _whole(value: Any, name: str, low: int, high: int) -> int:
    """An integer in [low, high] from a page input (gradio's numbers arrive as int or float)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or value != int(value) or not low <= value <= high:
        raise ConfigError(f"{name} must be a whole number from {low} to {high}, got {_shown(value)}")
    return int(value)


def _shown(value: Any) -> str:
    """A raw input as a message shows it: its repr, cut short (an API call may send anything, of any length)."""
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


# --- the command ----------------------------------------------------------------------------------------------------


def load_codebooks(files: Sequence[str]) -> dict[str, AdaCacheConfig]:
    """--codebook files, loaded and checked at start-up; named on the page by the path given."""
    codebooks: dict[str, AdaCacheConfig] = {}
    for name in files:
        if name in PRESETS or name == AUTO:
            raise ConfigError(f"--codebook {name!r}: the presets and auto are on the page already; --codebook takes "
                              "a JSON config file (as `adacache calibrate` writes)")
        try:
            codebooks[name] = AdaCacheConfig.load(name)
        except ConfigError as error:
            raise ConfigError(f"--codebook: {error}") from None
    return codebooks


def check_address(host: str, port: int) -> None:
    """Refuse, before the model loads, an address this machine cannot listen on (a port in use, an unknown
    host). Bound as the server will be (SO_REUSEADDR, as uvicorn does)."""
    import socket

    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind((host, port))
    except OSError as error:
        reason = "the port is in use" if getattr(error, "errno", None) == errno.EADDRINUSE else \
            (error.strerror or str(error))
        raise ConfigError(f"cannot serve on {host}:{port}: {reason}; pick another --port (or --host)") from None


def _open_browser(url: str) -> None:
    """Open the page where a browser can show it; on a machine without a display say where it is instead (the
    webbrowser module would otherwise start a text browser in this terminal)."""
    import webbrowser

    graphical = sys.platform in ("darwin", "win32") or os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY")
    if not graphical or not webbrowser.open(url):
        print(f"adacache: open {url} in a browser")


def launch(page, host: str, port: int, folder: Path):
    """Start the gradio server for `page` (WebPage.build()) without blocking; returns the Blocks (`.close()`)."""
    import inspect

    page.queue(default_concurrency_limit=1, max_size=QUEUE_SIZE)
    # share=False: no tunnel (nothing leaves the machine); no server-side rendering (Node), no MCP server, no
    # installable app, no run history kept in the browser (the last two only where this gradio has them)
    settings = dict(server_name=host, server_port=port, share=False, inbrowser=False, prevent_thread_lock=True,
                    quiet=True, show_error=False, allowed_paths=[str(folder)], ssr_mode=False, mcp_server=False,
                    pwa=False, run_history=False, footer_links=[], max_file_size=MAX_UPLOAD_BYTES)
    known = inspect.signature(page.launch).parameters
    try:
        page.launch(**{key: value for key, value in settings.items() if key in known})
    except OSError as error:  # taken since check_address: gradio's message names the port
        raise ConfigError(f"cannot serve on {host}:{port} ({error}); pick another --port (or --host)") from None
    return page


def serve(model: str | None = None, codebook_files: Sequence[str] = (), *, host: str = "127.0.0.1",
          port: int = 7860, open_browser: bool = True, call: dict | None = None) -> int:
    """`adacache serve`: load the model, serve the page until Ctrl-C or SIGTERM (the CLI's exit 130 or 143), then
    delete the temporary folder that held everything written (videos and gradio's own files)."""
    folder = Path(tempfile.mkdtemp(prefix="adacache-serve-"))
    atexit.register(shutil.rmtree, folder, ignore_errors=True)  # a kill between here and the finally
    saved = {key: os.environ.get(key) for key in ("GRADIO_TEMP_DIR", "GRADIO_ANALYTICS_ENABLED",
                                                  "TORCHINDUCTOR_CACHE_DIR")}
    os.environ["GRADIO_TEMP_DIR"] = str(folder)  # gradio's cache and uploads: read when gradio is imported and used
    os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"  # no telemetry, no version check
    # importing diffusers makes torch inductor's cache folder (empty) in the system's temporary folder; a cache
    # the user chose is kept
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(folder / "torchinductor"))
    app = page = None
    try:
        _gradio()  # before the model loads: a missing gradio is one line
        codebooks = load_codebooks(codebook_files)
        check_address(host, port)
        kind = pipelines.model_kind(model)
        print(f"adacache: loading {'the embedded model' if model is None else model}")
        pipe = pipelines.load_pipeline(model)
        pipe.set_progress_bar_config(disable=True)
        pipelines.to_device(pipe)
        page = WebPage(pipe, folder, model=model, codebooks=codebooks, call=call)
        print("adacache: warming up (one step, so that the first timing on the page is fair)")
        pipe(DEFAULT_PROMPT if kind == "embedded" else "a video", num_inference_steps=1,
             guidance_scale=DEFAULT_GUIDANCE, output_type="np", **(call or {}))
        app = launch(page.build(), host, port, folder)
        url = f"http://{host}:{app.server_port}/"
        print(f"adacache: serving the page on {url} (Ctrl-C stops; files only under {folder}, deleted on exit)")
        if open_browser:
            _open_browser(url)
        while True:  # the server runs in its own threads; this thread waits for Ctrl-C or SIGTERM
            time.sleep(0.2)
    finally:
        try:
            if app is not None:
                app.close(verbose=False)
            if page is not None:
                if page.busy:
                    print("adacache: waiting for the generation in progress to finish (Ctrl-C again stops at once)")
                page.close()  # before the interpreter exits under it (see WebPage.close)
        finally:
            shutil.rmtree(folder, ignore_errors=True)
            for key, value in saved.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value
