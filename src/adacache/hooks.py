"""Glue between a transformer and the AdaCache schedule: `apply_adacache`, `remove_adacache`, `get_stats`.

The algorithm is in `core/`: which generation, CFG branch and step a call is (`core.clock.StepClock`), whether
its blocks run (`core.decision.Schedule`), and what a skipped step adds (`core.store`). This module moves tensors
between them and the model. One hook wraps the transformer's forward and asks the clock and the schedule; the
blocks of the cached span get a thin wrapper:

- computed step: the block runs; the first block's input, the probe and the last block's output are noted, and
  after the last block the stack residual (output - input, per stream) goes to the store if it wants it;
- skipped step: every block passes its input through untouched and the last block returns the first block's
  input + the residual the store produces for this step (the last one, or a forecast).

The decision is plain Python between block calls; each block's own forward is called unchanged, so blocks can be
compiled (`block.compile()`, or `compile_blocks` for fullgraph). State lives in one `_Runtime` object on the
model, keyed by (CFG branch) and reset per generation; nothing is global, no class is patched.

Several videos in one call each get their own schedule and store (`_VideoState`; the two CFG halves of a video
batched in one call share one). On a step where some compute and others skip, the transformer's forward is called
twice, with its arguments cut to the computing rows and then to the rest (`cut_arguments`), and the two outputs are
put back in row order (`_merge_outputs`). The cut is at the transformer's arguments, not at each block's: whatever
the model does between its blocks then sees one consistent sub-batch (Latte reshapes its tokens by a batch size
read before its block loop).

A patched model serves one generation at a time: calls from two threads at once, or a thread continuing another
thread's generation, are refused (the per-branch state is one per model; two threads generating at once would share
it). The cache context is read per thread, so threads taking turns never read each other's branch. A patched model cannot be deep-copied or pickled (its hooks are bound to this instance);
`remove_adacache` first, then copy.

Under diffusers' context parallelism (`enable_parallelism` after `apply_adacache`) each rank holds a slice of the
tokens; `parallel.py` makes every rank decide from the sums of the whole probe.

diffusers counts AdaCache as the model's enabled cache while it is applied, so `enable_cache` cannot stack one of
its caches on it. Private diffusers names are used only through `compat`.
"""

from __future__ import annotations

import collections
import contextlib
import inspect
import logging
import threading
import weakref
from dataclasses import dataclass
from typing import Any, Callable, Mapping

import torch

from . import compat, parallel
from .config import AdaCacheConfig
from .core.clock import StepClock
from .core.decision import Schedule
from .core.store import ResidualStore, make_store
from .models.infer import infer_spec, spec_source
from .models.specs import BlockSpec, ModelSpec, registered_spec, spec_for

logger = logging.getLogger(__name__)

_HOOK_NAME = "adacache"
_RUNTIME_ATTRIBUTE = "_adacache"


# --- per-generation state ---------------------------------------------------------------------------------------
@dataclass
class GenerationStats:
    """What AdaCache did in one generation of one CFG branch."""

    branch: str
    generation: int
    num_steps: int | None
    steps_seen: int
    computed_steps: list[int]
    skipped_steps: list[int]
    distances: list[float | None]  # per computed step: the distance looked up in the codebook
    rates: list[int]  # per computed step: the rate chosen there
    motion: list[float | None]  # per computed step: the MoReg score (None outside the window or without MoReg)
    cache_bytes: int  # cached residuals + probe held between steps (peak over the generation)
    notes: list[str]
    model: str = "transformer"  # which transformer of the pipeline (Wan 2.2 has two)
    store: str = "reuse"  # what skipped steps added: the last computed residual ("reuse") or a "forecast" of it
    video: int | None = None  # which video of the batch, when each has its own schedule; None: the whole batch

    @property
    def compute_fraction(self) -> float:
        return len(self.computed_steps) / max(1, self.steps_seen)

    def to_dict(self) -> dict[str, Any]:
        data = {k: getattr(self, k) for k in self.__dataclass_fields__}
        data["compute_fraction"] = self.compute_fraction
        return data

    def __str__(self) -> str:
        video = f" video {self.video}" if self.video is not None else ""
        return (
            f"[{self.branch}{video} #{self.generation}] computed {len(self.computed_steps)}/{self.steps_seen} steps "
            f"{self.computed_steps}, rates {self.rates}, cache {self.cache_bytes / 2**20:.2f} MiB"
        )


@dataclass
class _VideoState:
    """One schedule of a branch's generation, with its residual store: the whole batch's, or one video's (its rows
    of the batch) when a batch's videos are scheduled each on its own (`AdaCacheConfig.batch_schedule`)."""

    schedule: Schedule
    store: ResidualStore
    rows: tuple[int, ...] | None = None  # its rows of the batch; None: every row
    video: int | None = None  # its index among the batch's videos; None: one schedule for the whole batch
    peak_bytes: int = 0

    def cache_bytes(self) -> int:
        probe = self.schedule.prev_probe
        return self.store.nbytes() + (probe.numel() * probe.element_size() if probe is not None else 0)

    def stats(self, branch: str, generation: int) -> GenerationStats:
        s = self.schedule
        return GenerationStats(
            branch=branch,
            generation=generation,
            num_steps=s.num_steps,
            steps_seen=len(s.computed_steps) + len(s.skipped_steps),
            computed_steps=list(s.computed_steps),
            skipped_steps=list(s.skipped_steps),
            distances=[r.distance for r in s.records],
            rates=[r.rate for r in s.records],
            motion=[r.motion for r in s.records],
            cache_bytes=self.peak_bytes,
            notes=list(s.notes),
            store=self.store.name,
            video=self.video,
        )


@dataclass
class _BranchState:
    """One CFG branch's generation in progress: its videos' schedules and stores (one for the whole batch, or one
    per video), and what must stay fixed within it."""

    generation: int
    videos: list[_VideoState]
    batch: int | None = None  # rows in the batch (None: not read from the arguments)
    thread: int | None = None  # the thread that made this generation's last call
    layout: Any = None  # the shape of the model's frames argument: fixed within a generation
    sharded: parallel.ShardedProbe | None = None  # under context parallelism: this rank's slice of the probe
    output_shapes: list[tuple[int, ...]] | None = None  # of the last call that ran every row, with several videos

    @property
    def only(self) -> _VideoState:
        if len(self.videos) != 1:
            raise AttributeError(f"this generation has {len(self.videos)} schedules, one per video: see .videos")
        return self.videos[0]

    @property
    def schedule(self) -> Schedule:
        return self.only.schedule

    @property
    def store(self) -> ResidualStore:
        return self.only.store

    @property
    def residuals(self) -> tuple[torch.Tensor | None, ...] | None:
        """The latest stored residual per stream (video, text), or None (one schedule for the batch)."""
        return self.only.store.latest

    def stats(self, branch: str) -> list[GenerationStats]:
        return [video.stats(branch, self.generation) for video in self.videos]


@dataclass
class _Call:
    """One forward call of the transformer, or the part of it that runs some of the batch's rows (when some videos
    compute a step and others skip it, the call is made twice: once with the rows that compute, once with the
    rest, and the outputs are put back in row order)."""

    branch: str
    state: _BranchState
    step: int
    compute: bool
    frames: int | None
    parts: list[tuple[_VideoState, tuple[int, ...] | None]]  # the videos in this call, with their rows in it
    rows: tuple[int, ...] | None = None  # the batch rows this call runs; None: all of them
    size: int | None = None  # how many rows this call runs
    first_inputs: tuple[torch.Tensor, torch.Tensor | None] | None = None
    first_versions: tuple[Any, ...] = ()  # per stream: what tells an in-place change (see _stamp)
    probe: torch.Tensor | None = None
    reached_last: bool = False  # whether the last cached block ran (or was skipped) in this call

    def note(self, message: str) -> None:
        for video, _ in self.parts:
            video.schedule.note(message)


_NOT_COPYABLE = (
    "a model with AdaCache applied cannot be copied or pickled (copy.deepcopy, pickle, torch.save of the module): "
    "its hooks are bound to this instance, so a copy would run the original's blocks and state. Call "
    "adacache.remove_adacache(model) first, copy or save, then apply_adacache to each copy. Saving the weights "
    "needs no removal: model.state_dict() and save_pretrained work as they are."
)


class _Bound:
    """What AdaCache leaves in a module's __dict__: refuses deep copies and pickling with a message that says what
    to do, instead of copying closures that would still point at the original model."""

    def __deepcopy__(self, memo: dict) -> Any:
        raise TypeError(_NOT_COPYABLE)

    def __reduce_ex__(self, protocol: Any) -> Any:
        raise TypeError(_NOT_COPYABLE)


# --- the runtime: one per patched transformer -------------------------------------------------------------------
class _Runtime(_Bound):
    def __init__(self, model: torch.nn.Module, config: AdaCacheConfig, spec: ModelSpec | None) -> None:
        self.config, self.spec = config, None
        self.model_name = type(model).__name__
        self.blocks: list[tuple[str, torch.nn.Module, BlockSpec]] = []
        self.forward_parameters = list(inspect.signature(model.forward).parameters)
        if spec is not None:
            self.configure(model, spec)
        self.states: dict[str, _BranchState] = {}
        # finished generations, one entry per generation and branch (the stats of each of its videos)
        self.history: collections.deque[list[GenerationStats]] = collections.deque(maxlen=config.stats_history)
        self.generations = 0
        self.local = threading.local()  # the call in progress, per thread: see `current`
        self.busy = threading.Lock()  # held for the length of a transformer call
        self.busy_thread: int | None = None
        self.context = None  # receives diffusers' cache_context (see _ContextHook)
        self.paused = False  # reconfigure(model, None): calls run the model as it is
        # Set when applied to a pipeline: the pipeline, weakly (it owns the model). Its scheduler is read at each
        # call, so one swapped in after apply (pipe.scheduler = X.from_config(...)) is the one followed.
        self.pipeline_ref: Callable[[], Any] | None = None
        self._timesteps_cache: tuple[Any, list[float]] | None = None
        self.warned_unknown_steps = False
        self.clock = StepClock(config.num_inference_steps)
        self.probe_slot: list[torch.Tensor | None] = [None]  # filled by the attention forward hook
        # What remove_adacache undoes, in reverse: (check, undo) pairs. Every check runs before anything is undone,
        # and returns why the undo cannot be done (something wrapped the forward afterwards) or None.
        self.restore: list[tuple[Callable[[], str | None], Callable[[], None]]] = []
        self.model_ref = weakref.ref(model)  # a shallow copy (copy.copy) shares this runtime: see _runtime_of

    def configure(self, model: torch.nn.Module, spec: ModelSpec) -> None:
        """Read the model through `spec` (registered, given, or inferred on the first call)."""
        blocks = spec.blocks(model)
        if len(blocks) <= spec.cache_start:
            raise ValueError(f"{type(model).__name__} has {len(blocks)} blocks: nothing to cache after cache_start={spec.cache_start}")
        self.spec, self.blocks = spec, blocks
        self.first = spec.cache_start
        self.last = len(self.blocks) - 1
        self.probe_index = self._resolve_probe_index(self.config.probe_block)
        self.probe_point = self._resolve_probe_point(self.config.probe_point)
        probe_spec = self.blocks[self.probe_index][2]
        attention = self.probe_point != "block"
        self.probe_layout = (probe_spec.attention_layout if attention else None) or probe_spec.token_layout
        self.temporal_patch = spec.temporal_patch_size(model)
        self.block_parameters = [list(inspect.signature(b.forward).parameters) for _, b, _ in self.blocks]
        self.list_outputs: set[int] = set()  # blocks seen returning a list rather than a tuple

    @property
    def current(self) -> _Call | None:
        """This thread's transformer call in progress, or None (a block called on its own is left alone)."""
        return getattr(self.local, "call", None)

    @current.setter
    def current(self, call: _Call | None) -> None:
        self.local.call = call

    def enter(self) -> bool:
        """A transformer call begins: refuse a second one while one is in progress (another thread's, or a nested
        call), since both would share this runtime's branch states. True once the call holds the model."""
        if not self.busy.acquire(blocking=False):
            who = "this thread (a nested call)" if self.busy_thread == threading.get_ident() else "another thread"
            raise RuntimeError(
                f"AdaCache: this {self.model_name} is already running a call from {who}. A model with AdaCache "
                "serves one generation at a time (its per-branch state is one per model). Give each thread its own model (apply_adacache to each copy made before applying), or "
                "serialise the calls with a lock."
            )
        self.busy_thread = threading.get_ident()
        return True

    def leave(self) -> None:
        self.current = None
        self.busy_thread = None
        self.busy.release()

    def _resolve_probe_index(self, probe_block: int | None) -> int:
        n = len(self.blocks)
        index = min(max((n - 1) // 2, self.first), self.last) if probe_block is None else probe_block
        if index < 0:
            index += n
        if not self.first <= index <= self.last:
            raise ValueError(
                f"probe_block={probe_block} is out of range: the model has {n} blocks in call order and the cached "
                f"span is {self.first}..{self.last}; use an index in that range, or None for mid-stack"
            )
        return index

    def _resolve_probe_point(self, point: str) -> str:
        block_name, block, block_spec = self.blocks[self.probe_index]
        if point == "block":
            return "block"
        if point == "auto":  # the spec's attention module where the block has it, else the block residual
            has_attention = block_spec.attention is not None and _has_submodule(block, block_spec.attention)
            return block_spec.attention if has_attention else "block"
        if point == "attention":
            if block_spec.attention is None:
                raise ValueError(f"the model spec names no attention submodule for {block_name}; use probe_point='block'")
            point = block_spec.attention
        try:
            block.get_submodule(point)
        except AttributeError:
            children = ", ".join(n for n, _ in block.named_children())
            raise ValueError(
                f"probe_point {point!r} is not a submodule of {block_name} ({type(block).__name__}); "
                f"its children are: {children}; or use 'block'"
            ) from None
        return point

    # -- a transformer call begins: which branch, which step, compute or skip? --
    def begin_call(self, args: tuple, kwargs: dict) -> list[_Call]:
        """Which CFG branch and step this call is (the step clock, core/clock.py, from diffusers' cache_context,
        the pipeline's scheduler or the timestep), and whether its blocks run: the call's parts, one (every row
        computes, or every row skips) or two (the rows of the videos that compute, then the rest's)."""
        context = self.context
        name, step_index, num_steps = (context.name, context.step_index, context.num_inference_steps) if context \
            is not None else (None, None, None)
        # The timestep is read (a device sync on GPU) only when the context does not say which step this is.
        t = self._timestep(args, kwargs) if self.clock.needs_timestep(name, step_index) else None
        tick = self.clock.read(name=name, step_index=step_index, num_steps=num_steps, t=t,
                               timesteps=self._scheduler_timesteps())
        branch, state = tick.branch, self.states.get(tick.branch)
        frames_value = self._argument(self.spec.frames_argument, args, kwargs)
        layout = tuple(frames_value.shape) if isinstance(frames_value, torch.Tensor) else frames_value
        latents = self._batch(args, kwargs)
        batch = latents.shape[0] if latents is not None else None
        thread = threading.get_ident()
        if not tick.new_generation and state.thread != thread:
            raise RuntimeError(
                f"AdaCache: a call from another thread continues generation {state.generation} (branch {branch!r}) "
                f"of this {self.model_name}, which an earlier call from a different thread began. Threads must not "
                "share a model with AdaCache while generating: give each thread its own model, or let one thread "
                "finish (or call adacache.reset_state(model)) before another starts."
            )
        if not tick.new_generation and (layout, batch) != (state.layout, state.batch):
            what, old, new = ((f"batch (rows of {self.spec.batch_argument!r})", state.batch, batch) if layout ==
                              state.layout else (repr(self.spec.frames_argument), state.layout, layout))
            raise ValueError(
                f"AdaCache: the model's {what} changed from {old} to {new} within generation {state.generation} "
                f"(branch {branch!r}): the batch size or resolution changed within a generation, and the cached "
                "residual belongs to the old shape. Call adacache.reset_state(model) to start a new generation, or "
                "name each differently shaped call with its own cache_context."
            )
        sharded = self._sharded_probe() if tick.new_generation else None  # (refuses before the clock moves)
        self.clock.commit(tick)
        if tick.new_generation:
            state = self._new_generation(branch, tick.num_steps, self._video_rows(latents))
            state.layout, state.batch = layout, batch
            if sharded is not None:  # every rank decides from the sums of the whole probe
                state.sharded = sharded
                for video in state.videos:
                    video.schedule.motion = sharded.motion
        state.thread = thread
        computing, skipping = [], []
        for video in state.videos:
            compute = video.schedule.is_computed(tick.step, have_cache=video.store.holds)
            (video.schedule.computed_steps if compute else video.schedule.skipped_steps).append(tick.step)
            (computing if compute else skipping).append(video)
        frames = self._frames(frames_value)
        if not computing or not skipping:  # one call: every row computes, or every row skips
            return [_Call(branch, state, tick.step, bool(computing), frames, [(v, v.rows) for v in state.videos],
                          size=batch)]
        calls = []
        for compute, videos in ((True, computing), (False, skipping)):
            rows = tuple(sorted(r for v in videos for r in v.rows))
            local = {row: i for i, row in enumerate(rows)}
            parts = [(v, tuple(local[r] for r in v.rows)) for v in videos]
            calls.append(_Call(branch, state, tick.step, compute, frames, parts, rows=rows, size=len(rows)))
        return calls

    def _batch(self, args: tuple, kwargs: dict) -> torch.Tensor | None:
        """The spec's batch argument (its first dimension is the batch), or None where it is not a tensor."""
        name = self.spec.batch_argument
        if name not in self.forward_parameters and self.forward_parameters:
            name = self.forward_parameters[0]  # a model naming it otherwise (x, latents): its first argument
        value = self._argument(name, args, kwargs)
        return value if isinstance(value, torch.Tensor) and value.dim() > 0 else None

    def _video_rows(self, latents: torch.Tensor | None) -> list[tuple[int, ...] | None]:
        """Each video's rows of a batch (one entry of None: one schedule for the whole batch). A batch whose two
        halves hold the same latents is batched CFG (every diffusers pipeline that guides in one call passes
        torch.cat([latents] * 2), the unconditional half first): video v is rows v and v + batch/2. Read once per
        generation, from its first call. Anything else is one video per row."""
        batch = latents.shape[0] if latents is not None else None
        mode = self.config.batch_mode
        if batch is None or batch < 2 or mode == "shared":
            return [None]
        half = batch // 2
        batched_cfg = mode == "video" and batch % 2 == 0 and torch.equal(latents[:half], latents[half:])
        halves = 2 if batched_cfg else 1
        count = batch // halves
        if count == 1:
            return [None]
        return [tuple(v + h * count for h in range(halves)) for v in range(count)]

    def cut_arguments(self, args: tuple, kwargs: dict, rows: tuple[int, ...], batch: int) -> tuple[tuple, dict]:
        """The call's arguments for `rows` of its batch: every tensor whose first dimension is the batch, cut to
        those rows (inside tuples, lists and dicts too), except the spec's `unbatched_arguments`."""
        unbatched = set(self.spec.unbatched_arguments)
        names = self.forward_parameters
        cut_args = tuple(value if i < len(names) and names[i] in unbatched else _cut(value, rows, batch)
                         for i, value in enumerate(args))
        cut_kwargs = {key: value if key in unbatched else _cut(value, rows, batch) for key, value in kwargs.items()}
        return cut_args, cut_kwargs

    def _sharded_probe(self) -> parallel.ShardedProbe | None:
        """Under diffusers' context parallelism (looked up per generation: enable_parallelism may come after
        apply_adacache), the probe measurement that adds the ranks' slices; None for a model run whole."""
        cp = parallel.ContextParallel.of(self.model_ref())
        if cp is None:
            return None
        if self.config.moreg and self.probe_layout != "b(ts)c":
            raise ValueError(
                f"AdaCache: MoReg under context parallelism reads frames from tokens laid out as b(ts)c (batch, "
                f"frames x tokens, channels), but the probe of {self.model_name} is {self.probe_layout}; set "
                "moreg=False, or run without context parallelism"
            )
        return parallel.ShardedProbe(cp)

    def _scheduler_timesteps(self) -> tuple[Any, list[float]] | None:
        """(the pipeline's current scheduler's timesteps object, as floats), converted once per set_timesteps; None
        without a pipeline, a scheduler (removed or set to None) or timesteps."""
        pipeline = self.pipeline_ref() if self.pipeline_ref is not None else None
        timesteps = getattr(_scheduler_of(pipeline), "timesteps", None) if pipeline is not None else None
        if timesteps is None:
            return None
        if self._timesteps_cache is None or self._timesteps_cache[0] is not timesteps:
            self._timesteps_cache = (timesteps, [float(v) for v in timesteps])
        return self._timesteps_cache

    def end_call(self) -> None:
        call = self.current
        if call is not None and not call.reached_last:
            call.note(
                f"the cached blocks {self.blocks[self.first][0]}..{self.blocks[self.last][0]} were not all called "
                "(a model option that bypasses them, such as Latte's enable_temporal_attentions=False): nothing is "
                "cached, every step is computed"
            )
            if not call.compute:  # the blocks were bypassed after a cache was stored: the output lacks the residual
                raise RuntimeError(
                    "AdaCache: a skipped step did not reach the last cached block, so its output is incomplete; "
                    "keep the model's block options fixed within a generation, or call adacache.reset_state(model)"
                )

    def _new_generation(self, branch: str, num_steps: int | None,
                        video_rows: list[tuple[int, ...] | None]) -> _BranchState:
        old = self.states.get(branch)
        if old is not None:
            self.history.append(old.stats(branch))
        self.generations += 1
        videos = [_VideoState(Schedule(self.config, num_steps=num_steps), make_store(self.config), rows,
                              video=None if rows is None else v) for v, rows in enumerate(video_rows)]
        state = _BranchState(self.generations, videos)
        if num_steps is None:
            for video in videos:
                video.schedule.note(
                    "the number of inference steps is unknown (no cache_context with num_inference_steps, no "
                    "scheduler): the last two steps are not forced to compute. Apply to the pipeline "
                    "(apply_adacache(pipe, ...)) or set AdaCacheConfig(num_inference_steps=N)",
                    log=not self.warned_unknown_steps,  # logged once per model; every generation's stats keep it
                )
                self.warned_unknown_steps = True
        self.states[branch] = state
        return state

    def _argument(self, name: str, args: tuple, kwargs: dict) -> Any:
        if name in kwargs:
            return kwargs[name]
        if name in self.forward_parameters:
            position = self.forward_parameters.index(name)
            if position < len(args):
                return args[position]
        return None

    def _timestep(self, args: tuple, kwargs: dict) -> float | None:
        value = self._argument(self.spec.timestep_argument, args, kwargs)
        if value is None:
            return None
        if isinstance(value, torch.Tensor):
            # the mean: per-frame timesteps (diffusion forcing, Wan 2.2 TI2V) still fall step by step
            return float(value.detach().float().mean())
        try:
            return float(value)
        except TypeError:  # a list or array of timesteps (per sample or per frame): their mean, as for a tensor
            return float(torch.as_tensor(value, dtype=torch.float64).mean())

    def _frames(self, value: Any) -> int | None:
        """Latent frames after patching, from the model's frames argument (a tensor, or a frame count)."""
        if value is None:
            return None
        if self.spec.frames_dim is None:
            return max(1, int(value) // self.temporal_patch)
        if not isinstance(value, torch.Tensor) or not -value.dim() <= self.spec.frames_dim < value.dim():
            raise ValueError(
                f"AdaCache: the model spec reads frames from dimension {self.spec.frames_dim} of "
                f"{self.spec.frames_argument!r}, which has shape {tuple(getattr(value, 'shape', ()))}; fix frames_dim"
            )
        return max(1, value.shape[self.spec.frames_dim] // self.temporal_patch)

    # -- around each block --
    def before_block(self, index: int, args: tuple, kwargs: dict) -> Any:
        """None when the block must run; else the output to return instead of running it."""
        call = self.current
        if call is None:
            return None  # the block was called outside a transformer forward: leave it alone
        if call.compute and index != self.first:
            return None
        _, _, block_spec = self.blocks[index]
        inputs = _read_streams(block_spec, args, kwargs, self.block_parameters[index])
        if index == self.first:
            call.first_inputs = inputs
        if call.compute:  # the in-place check after the last block needs the stamps; a skipped step does not
            if index == self.first:
                call.first_versions = tuple(_stamp(t) for t in inputs)
            return None
        if index != self.last:
            return self._as_returned(index, _make_output(block_spec, *inputs))
        call.reached_last = True
        return self._as_returned(index, _make_output(block_spec, *self._apply_cache(call, inputs)))

    def _as_returned(self, index: int, output: Any) -> Any:
        """A skipped block's output in the container its computed calls returned (a list, for some blocks)."""
        return list(output) if index in self.list_outputs and isinstance(output, tuple) else output

    def after_block(self, index: int, args: tuple, kwargs: dict, output: Any) -> Any:
        call = self.current
        if call is None or not call.compute:
            return output
        if isinstance(output, list):
            self.list_outputs.add(index)
        _, _, block_spec = self.blocks[index]
        if index == self.probe_index:
            if self.probe_point == "block":
                hidden_in = _read_streams(block_spec, args, kwargs, self.block_parameters[index])[0]
                call.probe = _read_output(block_spec, output)[0] - hidden_in
            else:
                call.probe, self.probe_slot[0] = self.probe_slot[0], None
        if index == self.last:
            call.reached_last = True
            if not all(_same_stamp(before, _stamp(t)) for before, t in zip(call.first_versions, call.first_inputs)):
                raise RuntimeError(
                    f"AdaCache: a block of {self.blocks[self.first][0]}..{self.blocks[self.last][0]} modified its input "
                    "hidden states in place, so the stack residual cannot be measured; make the block return a new "
                    "tensor (x = x + f(x) rather than x += f(x))"
                )
            self._store_cache(call, _read_output(block_spec, output))
        return output

    def _apply_cache(self, call: _Call, inputs: tuple) -> tuple:
        """Skipped step at the last block: the first cached block's input + the store's residual for this step, per
        stream (core/store.py: the last computed one, or a forecast of it), each video's rows its own store's.

        The span is one unit from the first block's input to the last block's output: whatever the model does
        between its blocks (a round-trip reshape, an adapter or control hint added to the tokens, a decoder that
        restarts from the embeddings) was part of the residual measured on the computed step, so what reaches the
        last block on a skipped step is not used. A stream the first block does not take passes as it arrives."""
        produced = [(rows, video.store.produce(call.step)) for video, rows in call.parts]
        out = []
        for stream, (name, now, start) in enumerate(zip(("video", "text"), inputs, call.first_inputs)):
            pieces = [(rows, residuals[stream]) for rows, residuals in produced]
            if all(cached is None for _, cached in pieces):
                out.append(now)
                continue
            cached = None
            if start is not None and all(piece is not None for _, piece in pieces):
                cached = _gather_rows([(rows, _like(piece, start, call)) for rows, piece in pieces], call.size)
            if cached is None or start.shape != cached.shape:
                shape = tuple(cached.shape) if cached is not None else [tuple(getattr(p, "shape", ())) for _, p in pieces]
                raise ValueError(
                    f"AdaCache: the {name} tokens have shape {tuple(getattr(start, 'shape', ()))} at step {call.step} "
                    f"(branch {call.branch!r}) but the cached residual has {shape}: the batch size or "
                    "resolution changed within a generation. Call adacache.reset_state(model) to start a new one, "
                    "or name each differently shaped call with its own cache_context."
                )
            out.append(start + cached)
        return tuple(out)

    def _store_cache(self, call: _Call, outputs: tuple) -> None:
        """Computed step, after the last block: let each video's schedule choose its next rate from its rows of the
        probe, then give its store its rows of the stack residual (output - input, per stream) if it wants it."""
        state = call.state
        if call.probe is None:
            raise RuntimeError(f"AdaCache: the probe at {self.blocks[self.probe_index][0]} produced nothing")
        for name, out, start in zip(("video", "text"), outputs, call.first_inputs):
            if out is not None and start is not None and out.shape != start.shape:
                for video, _ in call.parts:
                    video.store.clear()
                raise ValueError(
                    f"AdaCache: the {name} tokens enter the cached span at {self.blocks[self.first][0]} with shape "
                    f"{tuple(start.shape)} but leave it at {self.blocks[self.last][0]} with shape {tuple(out.shape)}, "
                    "so no residual spans them; start the span at a block whose input has the last block's output "
                    "shape (ModelSpec(cache_start=...))"
                )
        last_step = any(v.schedule.num_steps is not None and call.step >= v.schedule.num_steps for v, _ in call.parts)
        probes, sums = [], []
        for video, rows in call.parts:
            probe = _rows_of(call.probe, rows, call.size)
            if probe._base is not None and len(call.parts) > 1:
                probe = probe.clone()  # kept as the video's last probe: its own rows only (see _residuals)
            if state.sharded is not None:  # a slice of the tokens: ShardedProbe.motion pairs its frames across ranks
                frames = call.frames
            elif (framed := _probe_frames(probe, self.probe_layout, call.frames)) is None:
                frames = None  # MoReg cannot read frames from it: the distance decides
            else:
                probe, frames = framed, framed.shape[1]
            probes.append(probe)
            sums.append(video.schedule.measure(call.step, probe, frames))
        residuals, checks = None, {}  # checks: per video, the sums of its residual streams (finite or not)
        if state.sharded is not None:
            # One all-reduce for the step: every video's sums, and the sums of the residuals it may keep (so that
            # a slice that is not finite on one rank makes every rank compute that video's next step).
            # (A first step decides rate 1: a store that keeps nothing at rate 1 needs no check then.)
            first_only = all(s.first for s in sums) and not any(v.store.wants(1) for v, _ in call.parts)
            if not last_step and not first_only:
                residuals = self._residuals(call, outputs)
                checks = {i: [_total(r) for r in rs if r is not None] for i, rs in enumerate(residuals)}
            sums, reduced = state.sharded.reduce_all(sums, [c for cs in checks.values() for c in cs])
            reduced = iter(reduced)
            checks = {i: [next(reduced) for _ in cs] for i, cs in checks.items()}
        keeping = []
        for i, ((video, _), probe, measured) in enumerate(zip(call.parts, probes, sums)):
            video.schedule.conclude(call.step, probe, measured)
            if last_step:
                video.schedule.prev_probe = None  # the generation is over: hold nothing
            if last_step or not video.store.wants(video.schedule.rate):
                video.store.clear()  # no skipped step will ask: no residual needed
            else:
                keeping.append(i)
        if keeping:
            if residuals is None:
                residuals = self._residuals(call, outputs, keeping)
                checks = {i: [_total(r) for r in residuals[i] if r is not None] for i in keeping}
            kept_checks = [c for i in keeping for c in checks[i]]
            finite = iter(torch.isfinite(torch.stack(kept_checks)).tolist() if kept_checks else [])
            for i in keeping:
                video = call.parts[i][0]
                bad = [name for name, r in zip(("video", "text"), residuals[i]) if r is not None and not next(finite)]
                if bad:
                    video.schedule.note(
                        f"non-finite values in the {bad[0]} residual of blocks {self.blocks[self.first][0]}.."
                        f"{self.blocks[self.last][0]} at step {call.step} (branch {call.branch!r}); not caching it, "
                        "the next step is computed"
                    )
                    video.store.clear()
                    video.schedule.reset_after_bad_cache(call.step)
                else:
                    video.store.put(call.step, residuals[i])
        for video, _ in call.parts:
            video.peak_bytes = max(video.peak_bytes, video.cache_bytes())

    def _residuals(self, call: _Call, outputs: tuple, keeping: list[int] | None = None
                   ) -> list[tuple[torch.Tensor | None, ...] | None]:
        """Per video of the call (those in `keeping`, or all; None for the others), its rows of the stack residual,
        per stream; detached (a grad-enabled call must not keep its graph alive in the cache)."""
        wanted = range(len(call.parts)) if keeping is None else keeping

        def rows_of(out: torch.Tensor | None, first: torch.Tensor | None, rows) -> torch.Tensor | None:
            if out is None or first is None:
                return None
            # each video's own rows, subtracted apart: a tensor of its own, never a view that would hold the
            # other videos' rows alive after their steps part ways
            return (_rows_of(out, rows, call.size) - _rows_of(first, rows, call.size)).detach()

        return [tuple(rows_of(out, first, rows) for out, first in zip(outputs, call.first_inputs))
                if i in wanted else None for i, (_, rows) in enumerate(call.parts)]

    # -- stats --
    def stats(self) -> list[GenerationStats]:
        current = [entry for branch, state in self.states.items() for entry in state.stats(branch)]
        return sorted([*(entry for entries in self.history for entry in entries), *current],
                      key=lambda s: (s.generation, s.branch, -1 if s.video is None else s.video))

    def reset(self) -> None:
        for branch, state in self.states.items():
            self.history.append(state.stats(branch))
        self.states.clear()
        self.clock.forget()
        self.current = None


def _rows_of(tensor: torch.Tensor, rows: tuple[int, ...] | None, batch: int | None) -> torch.Tensor:
    """`rows` of a tensor holding `batch` rows batch-major along its first dimension (the batch itself, or batch x
    frames, batch x tokens for Latte's layouts); the tensor itself for None (every row). A view where the rows run
    on (one video without CFG halves), else a copy."""
    if rows is None:
        return tensor
    per_row, left = divmod(tensor.shape[0], batch)
    if left:
        raise ValueError(f"AdaCache: a tensor of shape {tuple(tensor.shape)} does not hold {batch} batch rows along "
                         "its first dimension, so a video's rows cannot be taken from it; set "
                         "AdaCacheConfig(batch_schedule='shared')")
    if rows == tuple(range(rows[0], rows[0] + len(rows))):
        return tensor[rows[0] * per_row:(rows[0] + len(rows)) * per_row]
    index = torch.tensor(rows, device=tensor.device)
    return tensor.unflatten(0, (batch, per_row)).index_select(0, index).flatten(0, 1)


def _gather_rows(pieces: list[tuple[tuple[int, ...] | None, torch.Tensor]], batch: int | None) -> torch.Tensor:
    """One tensor of `batch` rows from pieces holding some rows each (together every row once), in row order."""
    if len(pieces) == 1 and pieces[0][0] is None:
        return pieces[0][1]
    order = [row for rows, _ in pieces for row in rows]
    joined = torch.cat([piece.unflatten(0, (len(rows), -1)) for rows, piece in pieces])
    if order != list(range(batch)):
        inverse = sorted(range(len(order)), key=order.__getitem__)
        joined = joined.index_select(0, torch.tensor(inverse, device=joined.device))
    return joined.flatten(0, 1)


def _cut(value: Any, rows: tuple[int, ...], batch: int) -> Any:
    """An argument cut to `rows`: tensors whose first dimension is the batch, also inside (named) tuples, lists and
    dicts."""
    if isinstance(value, torch.Tensor):
        return _rows_of(value, rows, batch) if value.dim() > 0 and value.shape[0] == batch else value
    if isinstance(value, dict):
        return {key: _cut(item, rows, batch) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        items = [_cut(item, rows, batch) for item in value]
        return type(value)(*items) if hasattr(value, "_fields") else type(value)(items)
    return value


def _merge_outputs(parts: list[tuple[tuple[int, ...], Any]], batch: int) -> Any:
    """The outputs of a call made in parts (each running some rows), as the whole call's: tensors joined in row
    order (inside tuples, lists, named tuples and diffusers' output classes too). A tensor whose first dimension
    does not hold its part's rows (an output that is not batch-first) is refused, as is any other container."""
    first = parts[0][1]
    if isinstance(first, torch.Tensor):
        per_row = {output.shape[0] / len(rows) if output.dim() else None for rows, output in parts}
        trailing = {tuple(output.shape[1:]) for _, output in parts}
        if len(per_row) != 1 or None in per_row or not float(next(iter(per_row))).is_integer() or len(trailing) != 1:
            raise _not_batch_first([tuple(output.shape) for _, output in parts], [len(rows) for rows, _ in parts])
        return _gather_rows(parts, batch)
    if first is None or isinstance(first, (str, int, float, bool)):
        return first
    if isinstance(first, dict):  # diffusers' BaseOutput (Transformer2DModelOutput) is a dict too
        merged = {key: _merge_outputs([(rows, output[key]) for rows, output in parts], batch) for key in first}
        return type(first)(**merged)
    if isinstance(first, (list, tuple)):
        items = [_merge_outputs([(rows, output[i]) for rows, output in parts], batch) for i in range(len(first))]
        return type(first)(*items) if hasattr(first, "_fields") else type(first)(items)
    raise TypeError(f"AdaCache: the transformer returned a {type(first).__name__}, which a batch's videos run apart "
                    "cannot be put back together from; set AdaCacheConfig(batch_schedule='shared') for this model")


def _tensor_shapes(value: Any) -> list[tuple[int, ...]]:
    """The shapes of the tensors in an output, in order (inside tuples, lists and dicts)."""
    if isinstance(value, torch.Tensor):
        return [tuple(value.shape)]
    if isinstance(value, dict):
        return [shape for item in value.values() for shape in _tensor_shapes(item)]
    if isinstance(value, (list, tuple)):
        return [shape for item in value for shape in _tensor_shapes(item)]
    return []


def _not_batch_first(shapes: list[tuple[int, ...]], rows: list[int]) -> ValueError:
    return ValueError(
        f"AdaCache: the transformer returned tensors of shapes {shapes} for {rows} batch rows: its outputs must be "
        "batch-first for a batch's videos to run apart. Set AdaCacheConfig(batch_schedule='shared') for this model"
    )


def _total(tensor: torch.Tensor) -> torch.Tensor:
    """The sum of a tensor's values, in at least float32: finite exactly when every value is (short of overflow)."""
    return tensor.sum(dtype=torch.promote_types(tensor.dtype, torch.float32))


def _stamp(tensor: torch.Tensor | None) -> Any:
    """What tells whether `tensor` is later modified in place: its version counter, or, for an inference tensor
    (made under torch.inference_mode, which keeps no version counter), the sum of its values."""
    if tensor is None:
        return None
    if tensor.is_inference():
        return tensor.sum(dtype=torch.promote_types(tensor.dtype, torch.float32))
    return tensor._version


def _same_stamp(before: Any, after: Any) -> bool:
    if isinstance(before, torch.Tensor):  # sums: equal, or both NaN (a NaN input is not an in-place change)
        return torch.equal(before, after) or bool(before.isnan() and after.isnan())
    return before == after


def _like(cached: torch.Tensor, now: torch.Tensor, call: _Call) -> torch.Tensor:
    """The cached residual on the device and in the dtype of this step's tokens (the model was moved or cast
    within the generation: the residual is still the best estimate of what the skipped blocks would add)."""
    if cached.dtype == now.dtype and cached.device == now.device:
        return cached
    call.note(
        f"the cached residual ({cached.dtype}, {cached.device}) was converted to the tokens' {now.dtype} on "
        f"{now.device}: the model's dtype or device changed within a generation"
    )
    return cached.to(device=now.device, dtype=now.dtype)


def _scheduler_of(pipeline: Any) -> Any:
    """The pipeline's scheduler as it is now, or None. Read without `getattr`'s fallbacks: on a diffusers pipeline
    whose scheduler was deleted, ConfigMixin.__getattr__ would warn and return its config entry instead."""
    scheduler = inspect.getattr_static(pipeline, "scheduler", None)
    if hasattr(type(scheduler), "__get__"):  # a property or other descriptor: let it compute the value
        scheduler = getattr(pipeline, "scheduler", None)
    return scheduler


def _pipeline_reference(pipeline: Any) -> Callable[[], Any]:
    """A weak reference to the pipeline (it holds the model, which holds the runtime); a strong one for objects
    that take no weak references (types.SimpleNamespace)."""
    try:
        return weakref.ref(pipeline)
    except TypeError:
        return lambda: pipeline


def _has_submodule(module: torch.nn.Module, path: str) -> bool:
    try:
        module.get_submodule(path)
        return True
    except AttributeError:
        return False


def _read_streams(spec: BlockSpec, args: tuple, kwargs: dict, parameters: list[str]) -> tuple:
    def get(name: str | None) -> torch.Tensor | None:
        if name is None:
            return None
        if name in kwargs:
            return kwargs[name]
        position = parameters.index(name) if name in parameters else len(args)
        if position >= len(args):
            raise ValueError(f"AdaCache: block called without its {name!r} argument; check the ModelSpec's BlockSpec")
        return args[position]

    return get(spec.hidden_states_argument), get(spec.encoder_hidden_states_argument)


def _read_output(spec: BlockSpec, output: Any) -> tuple:
    if spec.output_hidden_states_index is None:
        if not isinstance(output, torch.Tensor):
            raise TypeError(
                f"AdaCache: the block returned {type(output).__name__}, but its BlockSpec says a bare tensor; set "
                "output_hidden_states_index (and the text stream's) in the spec"
            )
        return output, None
    if not isinstance(output, (tuple, list)):
        raise TypeError(
            f"AdaCache: the block returned a {type(output).__name__}, but its BlockSpec says a tuple (output indices "
            f"{spec.output_hidden_states_index}, {spec.output_encoder_hidden_states_index}); fix the spec"
        )
    hidden = output[spec.output_hidden_states_index]
    text = output[spec.output_encoder_hidden_states_index] if spec.output_encoder_hidden_states_index is not None else None
    return hidden, text


def _make_output(spec: BlockSpec, hidden: torch.Tensor, text: torch.Tensor | None) -> Any:
    if spec.output_hidden_states_index is None:
        return hidden
    result: list[Any] = [None] * (max(spec.output_hidden_states_index, spec.output_encoder_hidden_states_index or 0) + 1)
    result[spec.output_hidden_states_index] = hidden
    if spec.output_encoder_hidden_states_index is not None:
        result[spec.output_encoder_hidden_states_index] = text
    return tuple(result)


def _probe_frames(probe: torch.Tensor, layout: str, frames: int | None) -> torch.Tensor | None:
    """The probe as (B, T, S, C) frames for MoReg, or None when the frame count does not fit its token layout."""
    if frames is None or probe.dim() != 3:
        return None
    a, b, c = probe.shape
    if layout == "b(ts)c" and b % frames == 0:
        return probe.view(a, frames, b // frames, c)
    if layout == "(bt)sc" and a % frames == 0:
        return probe.view(a // frames, frames, b, c)
    if layout == "(bs)tc" and b == frames:
        return probe.transpose(0, 1).unsqueeze(0)  # (1, T, B*S, C): sums over batch and tokens alike
    return None


# --- installing and removing ------------------------------------------------------------------------------------
def _context_hook_class():
    """A diffusers ModelHook on the transformer: it receives `cache_context` and brackets every forward call."""

    class _ContextHook(compat.context_hook_class()):
        def __init__(self, runtime: _Runtime) -> None:
            super().__init__()
            self.runtime = runtime

        def new_forward(self, module: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
            runtime, holding = self.runtime, False
            if runtime.paused:
                return self.call_original(*args, **kwargs)
            try:  # entered inside the try: a Ctrl-C right after the lock is taken still releases it
                holding = runtime.enter()
                if runtime.spec is None:
                    _infer_and_install(runtime, module, args, kwargs, self.call_original)
                runtime.context = self.cache_context
                calls = runtime.begin_call(args, kwargs)
                try:
                    state = calls[0].state
                    if len(calls) == 1:
                        runtime.current = calls[0]
                        output = self.call_original(*args, **kwargs)
                        runtime.end_call()
                        if len(state.videos) > 1:  # what a call made in parts must give back
                            state.output_shapes = _tensor_shapes(output)
                        return output
                    # some videos compute this step and others skip it: the rows of each run on their own
                    outputs = []
                    for call in calls:
                        part_args, part_kwargs = runtime.cut_arguments(args, kwargs, call.rows, state.batch)
                        runtime.current = call
                        try:
                            outputs.append((call.rows, self.call_original(*part_args, **part_kwargs)))
                        except Exception as error:
                            error.add_note(
                                f"AdaCache ran rows {list(call.rows)} of a batch of {state.batch} on their own (the "
                                "batch's videos have their own schedules), cutting every argument whose first "
                                "dimension is the batch. An argument the same for every row whose length equals the "
                                "batch belongs in ModelSpec.unbatched_arguments; or set "
                                "AdaCacheConfig(batch_schedule='shared')")
                            raise
                        runtime.end_call()
                    output = _merge_outputs(outputs, state.batch)
                    if state.output_shapes is not None and _tensor_shapes(output) != state.output_shapes:
                        raise _not_batch_first([_tensor_shapes(o) for _, o in outputs], [len(c.rows) for c in calls])
                    return output
                except BaseException:
                    # the generation cannot go on from a call that did not finish (an interrupt, an error): the
                    # next call starts a new one, rather than being counted as this step's next CFG branch
                    runtime.reset()
                    raise
            finally:
                if holding:
                    runtime.leave()

        def reset_state(self, module: torch.nn.Module) -> torch.nn.Module:
            self.runtime.reset()
            return module

    return _ContextHook


class _CachedBlock(_Bound):
    """A cached block's link to the runtime; `inner[0]` is the block's own forward (compile_blocks may swap in a
    compiled one; None for the probe block, kept eager)."""

    def __init__(self, inner: list[Callable] | None) -> None:
        self.inner = inner


class _ProbeRecorder(_Bound):
    """Forward hook on the probe block's attention module: keeps its output for the runtime."""

    def __init__(self, slot: list[torch.Tensor | None]) -> None:
        self.slot = slot

    def __call__(self, module: torch.nn.Module, args: Any, output: Any) -> None:
        self.slot[0] = output[0] if isinstance(output, (tuple, list)) else output


def _wrap_block(runtime: _Runtime, index: int, block: torch.nn.Module, eager: bool = False) -> None:
    # A list so compile_blocks can swap in a compiled forward. `eager` keeps the block out of torch.compile: dynamo
    # does not guard on module hooks, so a compiled probe block could silently skip the attention probe's hook.
    inner = [torch.compiler.disable(block.forward) if eager else block.forward]
    before = torch.compiler.disable(runtime.before_block)
    after = torch.compiler.disable(runtime.after_block)

    def forward(*args: Any, **kwargs: Any) -> Any:
        replacement = before(index, args, kwargs)
        if replacement is not None:
            return replacement
        return after(index, args, kwargs, inner[0](*args, **kwargs))

    had_own_forward = "forward" in block.__dict__
    previous = block.__dict__.get("forward")
    # Not traced by dynamo (its callee, the block's own forward, is): `block.compile()` compiles the block alone.
    wrapped = torch.compiler.disable(forward, recursive=False)
    block._adacache_block = _CachedBlock(None if eager else inner)  # before `forward`: copies meet it first
    block.forward = wrapped

    def replaced() -> str | None:
        if block.__dict__.get("forward") is not wrapped:
            return f"the forward of {runtime.blocks[index][0]} ({type(block).__name__})"
        return None

    def restore() -> None:
        del block.forward
        del block._adacache_block
        if had_own_forward:
            block.forward = previous

    runtime.restore.append((replaced, restore))


def apply_adacache(
    target: Any, config: AdaCacheConfig | Mapping[str, Any] | str | None = None, *, spec: ModelSpec | None = None
) -> None:
    """Enable AdaCache on a video transformer, or on every transformer of a diffusers pipeline.

    `config` is an AdaCacheConfig, a dict of its fields, a preset name or a JSON file path (default: the 30-step
    fast preset). With a pipeline, its scheduler's timesteps also tell the step index and count when the pipeline
    opens no `cache_context` with them (Latte, Allegro, HunyuanVideo); the scheduler is read from the pipeline at
    each call, so one swapped in later (`pipe.scheduler = X.from_config(pipe.scheduler.config)`) is followed. The
    pipeline is held weakly. `spec` describes a model the registry does not know.

    While applied, diffusers counts AdaCache as the model's cache (`is_cache_enabled` is True), so
    `model.enable_cache(...)` refuses a second one, as this refuses a model with a diffusers cache enabled. Remove
    AdaCache with `remove_adacache`; diffusers' `model.disable_cache()` refuses it, changing nothing.
    """
    config = _as_config(config)
    models = transformers_of(target)
    done = []
    try:
        for model in models:
            _apply_to_model(model, config, spec)
            done.append(model)
            if not isinstance(target, torch.nn.Module):
                getattr(model, _RUNTIME_ATTRIBUTE).pipeline_ref = _pipeline_reference(target)
    except BaseException:
        for model in done:  # all or nothing
            remove_adacache(model)
        raise


def _as_config(config: AdaCacheConfig | Mapping[str, Any] | str | None) -> AdaCacheConfig:
    if config is None:
        return AdaCacheConfig()
    if isinstance(config, Mapping):
        return AdaCacheConfig.from_dict(config)
    if not isinstance(config, AdaCacheConfig):
        return AdaCacheConfig.load(config)
    return config


def is_applied(target: Any) -> bool:
    """Whether AdaCache is applied to the model (or to every transformer of the pipeline)."""
    return all(_RUNTIME_ATTRIBUTE in model.__dict__ for model in transformers_of(target))


def reconfigure(target: Any, config: AdaCacheConfig | Mapping[str, Any] | str | None) -> None:
    """Give an applied AdaCache another config, as `remove_adacache` then `apply_adacache` would, without
    unwrapping the blocks: every generation in progress ends and the stats are cleared. With None, AdaCache is
    paused: calls run the model as it is, caching and measuring nothing, until a config is given again.

    The way to change configs where AdaCache cannot be removed and applied again: under diffusers' context
    parallelism, whose split hooks wrap AdaCache's blocks (enable_parallelism comes after apply_adacache). The probe
    (probe_block, probe_point) is where the blocks were wrapped, so it cannot change here."""
    config = _as_config(config) if config is not None else None
    runtimes = [_runtime_of(model) for model in transformers_of(target)]
    for runtime in runtimes:
        old = runtime.config
        if config is not None and (config.probe_block, config.probe_point) != (old.probe_block, old.probe_point):
            raise ValueError(
                f"reconfigure cannot move the probe (probe_block {old.probe_block!r} -> {config.probe_block!r}, "
                f"probe_point {old.probe_point!r} -> {config.probe_point!r}): it is where the blocks were wrapped. "
                "Call remove_adacache and apply_adacache with the new config instead"
            )
    for runtime in runtimes:
        runtime.reset()
        runtime.paused = config is None
        if config is not None:
            runtime.config = config
            runtime.clock.default_num_steps = config.num_inference_steps
            runtime.history = collections.deque(maxlen=config.stats_history)
        else:
            runtime.history.clear()


def transformers_of(target: Any) -> list[torch.nn.Module]:
    """The transformers AdaCache works on: the model itself, or a pipeline's `.transformer` (and `.transformer_2`,
    Wan 2.2's second expert). A torch.compile'd model or an object with neither is a TypeError saying what to pass."""
    if isinstance(target, torch.nn.Module):
        if type(target).__name__ == "OptimizedModule":
            raise TypeError(
                "this is a torch.compile'd model: apply AdaCache before compiling, or to model._orig_mod; to compile "
                "with AdaCache, use adacache.compile_blocks(model) (or block.compile()) after apply_adacache"
            )
        return [target]
    models = [m for m in (getattr(target, "transformer", None), getattr(target, "transformer_2", None)) if m is not None]
    if not models:
        raise TypeError(
            f"AdaCache takes a torch.nn.Module (the transformer) or a pipeline with a .transformer, "
            f"got {type(target).__name__}"
        )
    return models


def _apply_to_model(model: torch.nn.Module, config: AdaCacheConfig, spec: ModelSpec | None) -> None:
    if hasattr(model, _RUNTIME_ATTRIBUTE):
        _runtime_of(model)  # a shallow copy gets its own message
        raise RuntimeError(
            f"AdaCache is already applied to this {type(model).__name__}; call remove_adacache(model) first "
            "to apply it again with another config"
        )
    other_cache = compat.diffusers_cache_config(model)
    if other_cache is not None:
        raise RuntimeError(
            f"another diffusers cache ({type(other_cache).__name__}) is enabled on this model; call "
            "model.disable_cache() before apply_adacache"
        )
    known = spec if spec is not None else registered_spec(model)
    runtime = _Runtime(model, config, known)  # no spec known: inferred on the first call (models/infer.py)
    runtime.spec_origin = "given" if spec is not None else "registered" if known is not None else "inferred"
    try:
        setattr(model, _RUNTIME_ATTRIBUTE, runtime)  # before the hooks: a copy or pickle of the model meets it first
        if runtime.spec is not None:
            _install_blocks(runtime)
        had_registry = compat.has_hook_registry(model)
        had_own_forward = "forward" in model.__dict__
        registry = compat.hook_registry(model)
        runtime.context_hook = _context_hook_class()(runtime)
        registry.register_hook(runtime.context_hook, _HOOK_NAME)
        installed = model.__dict__.get("forward")

        def replaced() -> str | None:
            # While ours is the registry's last hook, the model's forward must still be the one it installed: a
            # wrapper set on the model afterwards (accelerate's hooks, a user's) would be dropped by the removal.
            if compat.last_hook_name(registry) == _HOOK_NAME and model.__dict__.get("forward") is not installed:
                return f"the forward of the {type(model).__name__}"
            return None

        def remove_context_hook() -> None:
            registry.remove_hook(_HOOK_NAME, recurse=False)
            if not had_registry and not compat.hooks_of(registry):
                compat.drop_hook_registry(model)
                if not had_own_forward:
                    del model.forward  # diffusers leaves the bound method as an instance attribute

        runtime.restore.append((replaced, remove_context_hook))
        # Counted by diffusers as its enabled cache, so model.enable_cache(...) refuses to stack one on AdaCache
        unmark = compat.mark_cache_enabled(model)
        if unmark is not None:
            runtime.restore.append((lambda: None, unmark))
    except BaseException:
        for _, undo in reversed(runtime.restore):
            undo()
        model.__dict__.pop(_RUNTIME_ATTRIBUTE, None)
        raise
    if runtime.spec is None:
        logger.info("AdaCache on %s: no registered spec; it is inferred on the first call", type(model).__name__)


def _install_blocks(runtime: _Runtime) -> None:
    """Wrap the cached span's blocks and hook the probe (their undos join runtime.restore, undone first)."""
    parallel.refuse_outside_split(runtime.model_ref(), runtime.blocks, runtime.first)
    for index in range(runtime.first, len(runtime.blocks)):
        eager = index == runtime.probe_index and runtime.probe_point != "block"
        _wrap_block(runtime, index, runtime.blocks[index][1], eager)
    if runtime.probe_point != "block":
        submodule = runtime.blocks[runtime.probe_index][1].get_submodule(runtime.probe_point)
        handle = submodule.register_forward_hook(_ProbeRecorder(runtime.probe_slot))
        runtime.restore.append((lambda: None, handle.remove))
    logger.info(
        "AdaCache on %s (%s spec): %d blocks, cached span %s..%s, probe %s (%s)",
        runtime.model_name, runtime.spec_origin, len(runtime.blocks), runtime.blocks[runtime.first][0],
        runtime.blocks[runtime.last][0], runtime.blocks[runtime.probe_index][0], runtime.probe_point,
    )


def _infer_and_install(runtime: _Runtime, model: torch.nn.Module, args: tuple, kwargs: dict,
                       call_original: Callable[..., Any]) -> None:
    """First call of a model without a spec: watch one uncached forward, infer the spec, install the blocks.
    The watched forward runs on copies of the arguments with the random state restored afterwards, and its output
    is discarded: the real call that follows sees exactly what a plain call would (a forward that adds to its input
    in place, draws noise or pops from a kwargs dict included). Anything failing here leaves the runtime as it was
    (no spec, no wrapped block), so every later call tries again and fails the same way until fixed."""
    watched_args, watched_kwargs = _copied(args), _copied(kwargs)
    devices = sorted({p.device.index or 0 for p in model.parameters() if p.device.type == "cuda"})
    with torch.random.fork_rng(devices=devices):
        spec = infer_spec(model, args, kwargs, call=lambda: call_original(*watched_args, **watched_kwargs),
                          moreg=runtime.config.moreg)
    count = len(runtime.restore)
    try:
        runtime.configure(model, spec)
        _install_blocks(runtime)
    except BaseException:
        for _, undo in reversed(runtime.restore[count:]):
            undo()
        del runtime.restore[count:]
        runtime.spec, runtime.blocks = None, []
        raise
    logger.info("AdaCache inferred the spec of %s (adacache.describe(model) prints it):\n%s", runtime.model_name,
                spec_source(spec, runtime.model_name))


def _copied(value: Any) -> Any:
    """Tensors cloned, containers and dicts copied (one level of nesting in each): the watched pass may change
    them in place without touching the caller's."""
    if isinstance(value, torch.Tensor):
        return value.clone()
    if isinstance(value, dict):
        return {k: _copied(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_copied(v) for v in value]
    if isinstance(value, tuple) and not hasattr(value, "_fields"):
        return tuple(_copied(v) for v in value)
    return value


def remove_adacache(target: Any) -> None:
    """Undo apply_adacache: the model (or every transformer of the pipeline) is back to its exact uncached self.
    Blocks compiled with compile_blocks go back to their uncompiled forward."""
    runtimes = [(model, _runtime_of(model)) for model in transformers_of(target) if _RUNTIME_ATTRIBUTE in model.__dict__]
    if not runtimes:
        raise RuntimeError("AdaCache is not applied to this model; nothing to remove")
    # all or nothing: every check before any undo, so a refusal leaves AdaCache whole and a retry can succeed
    replaced = [problem for _, runtime in runtimes for check, _ in runtime.restore if (problem := check())]
    if replaced:
        raise RuntimeError(
            f"cannot remove AdaCache: something replaced {', '.join(replaced)} after apply_adacache (another "
            "hook or wrapper, such as accelerate's); remove that first, then call remove_adacache again. Nothing "
            "was changed."
        )
    for model, runtime in runtimes:
        for _, undo in reversed(runtime.restore):
            undo()
        delattr(model, _RUNTIME_ATTRIBUTE)


def describe(target: Any, *args: Any, print_source: bool = True, **kwargs: Any) -> ModelSpec:
    """The ModelSpec AdaCache uses for a transformer (or a pipeline's `.transformer`), printed as Python to save
    and `register_model`. Which one, in order: the spec of an applied AdaCache (given, registered, or inferred on
    its first call); else, with example forward inputs (`describe(model, **inputs)`), the spec inferred from one
    forward call with them; else the registered spec. A model with none of those is an error saying what to pass.
    """
    model = transformers_of(target)[0]
    runtime = model.__dict__.get(_RUNTIME_ATTRIBUTE)
    origin = None
    if runtime is not None and _runtime_of(model).spec is not None:
        spec, origin = runtime.spec, runtime.spec_origin
    elif args or kwargs:
        if runtime is not None:
            raise RuntimeError("AdaCache is applied to this model but has not seen a call yet: call the model (its "
                               "spec is then inferred), or describe it before apply_adacache" + _paused_hint(runtime))
        spec, origin = infer_spec(model, args, kwargs, moreg=False), "inferred"
    else:
        spec = registered_spec(model)
        origin = "registered"
        if spec is None:
            raise ValueError(
                f"{type(model).__name__} has no registered spec, and its structure is inferred from a forward call: "
                "pass example inputs (adacache.describe(model, **forward_kwargs)), or apply AdaCache, run one "
                "generation and call describe again"
            )
    if print_source:
        note = "" if spec.frames_argument is not None else "  # frames unknown: MoReg cannot read motion"
        print(f"# AdaCache spec of {type(model).__name__} ({origin}){note}\n{spec_source(spec, type(model).__name__)}")
    return spec


def reset_state(target: Any) -> None:
    """Forget every generation in progress: the next call starts a new generation (its stats are kept)."""
    for model in transformers_of(target):
        _runtime_of(model).reset()


def get_stats(target: Any) -> list[GenerationStats]:
    """Per generation and CFG branch (oldest first, the one in progress last): computed steps, distances, rates,
    motion scores and the cache memory held. For a pipeline with two transformers (Wan 2.2), both, each
    GenerationStats naming its `model`."""
    stats = []
    for name, model in zip(("transformer", "transformer_2"), transformers_of(target)):
        for entry in _runtime_of(model).stats():
            entry.model = name
            stats.append(entry)
    return stats


def _paused_hint(runtime: _Runtime) -> str:
    return ("; AdaCache is paused (reconfigure(model, None)), and a paused model runs its calls as they are, "
            "inferring nothing: give it a config with reconfigure first") if runtime.paused else ""


def _runtime_of(model: torch.nn.Module) -> _Runtime:
    runtime = model.__dict__.get(_RUNTIME_ATTRIBUTE)
    if runtime is None:
        raise RuntimeError("AdaCache is not applied to this model; call apply_adacache first")
    if runtime.model_ref() is not model:
        raise RuntimeError(
            f"this {type(model).__name__} is a shallow copy (copy.copy) of a model with AdaCache applied: it shares "
            "the original's hooks and state, so AdaCache cannot be managed through it. Use the original; to get an "
            "independent model, remove_adacache(original), copy.deepcopy it, and apply to each."
        )
    return runtime


@contextlib.contextmanager
def cache_context(model: torch.nn.Module, name: str, step_index: int | None = None,
                  num_inference_steps: int | None = None):
    """Tell AdaCache which CFG branch and step a transformer call belongs to, for models without diffusers'
    `model.cache_context` (custom DiTs). `step_index` is 0-based, as in diffusers' pipelines."""
    previous = _runtime_of(model).context_hook.cache_context
    compat.set_cache_context(model, compat.make_cache_context(name, step_index, num_inference_steps))
    try:
        yield
    finally:
        compat.set_cache_context(model, previous)


def compile_blocks(model: torch.nn.Module, **compile_kwargs: Any) -> None:
    """torch.compile each block's own forward (fullgraph works), keeping AdaCache's decisions eager between them.

    Works with or without AdaCache applied; pass torch.compile's arguments (backend, mode, fullgraph, dynamic).
    With an attention probe, the probe block stays eager (one block of the stack), so its probe is never lost."""
    runtime = getattr(model, _RUNTIME_ATTRIBUTE, None)
    if runtime is not None and runtime.spec is None:
        raise RuntimeError(
            f"AdaCache infers the structure of this {type(model).__name__} on its first call, which has not happened "
            "yet: run one call (or generation) first, or pass apply_adacache(..., spec=...)" + _paused_hint(runtime)
        )
    blocks = runtime.blocks if runtime is not None else spec_for(model).blocks(model)
    for _, block, _ in blocks:
        cached = block.__dict__.get("_adacache_block")
        if cached is None:
            block.compile(**compile_kwargs)  # outside the cached span, or no AdaCache
        elif cached.inner is not None:  # None: the probe block, kept eager (see _wrap_block)
            cached.inner[0] = torch.compile(cached.inner[0], **compile_kwargs)
