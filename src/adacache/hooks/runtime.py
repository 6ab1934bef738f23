"""The runtime of one patched transformer: it orchestrates each call, and owns nothing but the call in progress.

Per transformer call (`run`):
1. `begin_call`: which CFG branch and step this is (the step clock, from diffusers' cache context, the loop of the
   pipeline running the call (running.py), the scheduler or the timestep); a new generation where the clock says
   so (`generation.Generations.begin`), its videos paired as CFG halves only where the pipeline guides in one
   call; whether each video computes or skips this step. The result is one `span.Call`, or two where some videos
   compute and others skip (their rows then run apart: `batch.cut_arguments`, `batch.merge_outputs`).
2. The model's own forward runs; each cached block's wrapper (install.py) calls `before_block` and `after_block`,
   which hand the block's streams to `span.skip` (a skipped step, at the last block) or note the span's input and
   the probe and call `span.conclude` (a computed step, after the last block).
3. `end_call`: a call that never reached the last cached block is noted (or refused, on a skipped step).

A call that raises ends every generation in progress (`reset`): the next call starts anew rather than being taken
for this step's next CFG branch.
"""

from __future__ import annotations

import contextlib
import threading
import weakref
from typing import Any, Callable, Iterator

import torch

from .. import parallel
from ..calls import argument, parameter_names
from ..config import AdaCacheConfig
from ..core.clock import Timestep
from ..models.specs import ModelSpec
from .batch import cut_arguments, merge_outputs, not_batch_first, tensor_shapes, video_rows
from .block_io import make_output, read_output, read_streams
from .generation import Generations, GenerationStats
from .layout import Layout
from .running import BATCHED_CFG_CONTEXT, Running, find_running, scheduler_of
from .span import Call, conclude, skip, stamp, unchanged

SMALL_TIMESTEP = 64  # timestep tensors up to this many values are read whole (one copy), larger ones reduced first

NOT_COPYABLE = (
    "a model with AdaCache applied cannot be copied or pickled (copy.deepcopy, pickle, torch.save of the module): "
    "its hooks are bound to this instance, so a copy would run the original's blocks and state. Call "
    "adacache.remove_adacache(model) first, copy or save, then apply_adacache to each copy. Saving the weights "
    "needs no removal: model.state_dict() and save_pretrained work as they are."
)


class NotCopyable:
    """What AdaCache leaves in a module's __dict__ (the runtime, the block markers, the probe recorder): refuses
    deep copies and pickling with a message that says what to do, instead of copying closures that would still
    point at the original model."""

    def __deepcopy__(self, memo: dict) -> Any:
        raise TypeError(NOT_COPYABLE)

    def __reduce_ex__(self, protocol: Any) -> Any:
        raise TypeError(NOT_COPYABLE)


class Runtime(NotCopyable):
    """AdaCache on one transformer. A patched model serves one generation at a time: calls from two threads at
    once, or a thread continuing another thread's generation, are refused (the per-branch state is one per model).
    The cache context is read per thread, so threads taking turns never read each other's branch."""

    def __init__(self, model: torch.nn.Module, config: AdaCacheConfig, spec: ModelSpec | None, origin: str) -> None:
        self.config = config
        self.model_name = type(model).__name__
        self.model_ref = weakref.ref(model)  # a shallow copy (copy.copy) shares this runtime: see install.runtime_of
        self.forward_parameters = parameter_names(model.forward)
        self.layout: Layout | None = Layout.read(model, spec, config) if spec is not None else None
        self.spec_origin = origin  # "given", "registered" or "inferred"
        self.generations = Generations(config)
        self.paused = False  # reconfigure(model, None): calls run the model as it is
        # Set when applied to a pipeline: the pipeline, weakly (it owns the model). Its scheduler is read at each
        # call, so one swapped in after apply (pipe.scheduler = X.from_config(...)) is the one followed.
        self.pipeline_ref: Callable[[], Any] | None = None
        self.probe_slot: list[torch.Tensor | None] = [None]  # filled by the probe recorder (install.py)
        self.list_outputs: set[int] = set()  # blocks seen returning a list rather than a tuple
        self._local = threading.local()  # the call in progress, per thread: see `current`
        self._busy = threading.Lock()  # held for the length of a transformer call
        self._busy_thread: int | None = None
        self._timesteps_cache: tuple[Any, list[float]] | None = None
        self._not_pipelines: set = set()  # code objects the running-pipeline walk skips (running.find_running)

    @property
    def spec(self) -> ModelSpec | None:
        return self.layout.spec if self.layout is not None else None

    @property
    def states(self):
        """Each CFG branch's generation in progress (`generation.BranchState`), by branch name."""
        return self.generations.states

    def use_spec(self, model: torch.nn.Module, spec: ModelSpec) -> None:
        """Read the model through `spec` (inferred on the first call, for a model without one)."""
        self.layout = Layout.read(model, spec, self.config)

    def forget_spec(self) -> None:
        self.layout = None

    # -- one call at a time --
    @property
    def current(self) -> Call | None:
        """This thread's transformer call in progress, or None (a block called on its own is left alone)."""
        return getattr(self._local, "call", None)

    @current.setter
    def current(self, call: Call | None) -> None:
        self._local.call = call

    @property
    def busy(self) -> bool:
        """Whether a transformer call is in progress."""
        return self._busy.locked()

    @contextlib.contextmanager
    def holding(self) -> Iterator[None]:
        """For the length of a transformer call: refuse a second one while one is in progress (another thread's, or a
        nested call), since both would share this runtime's branch states."""
        if not self._busy.acquire(blocking=False):
            who = "this thread (a nested call)" if self._busy_thread == threading.get_ident() else "another thread"
            raise RuntimeError(
                f"AdaCache: this {self.model_name} is already running a call from {who}. A model with AdaCache "
                "serves one generation at a time (its per-branch state is one per model). Give each thread its own "
                "model (apply_adacache to each copy made before applying), or serialise the calls with a lock."
            )
        try:
            self._busy_thread = threading.get_ident()
            yield
        finally:
            self.current = None
            self._busy_thread = None
            self._busy.release()

    # -- a transformer call --
    # Under a model compiled whole (torch.compile after apply_adacache), `run` and the decisions it calls run eagerly
    # (torch.compiler.disable); `call_original`, the model's own forward, is a frame of its own that is compiled.
    @torch.compiler.disable(recursive=False)
    def run(self, context: Any, call_original: Callable[..., Any], args: tuple, kwargs: dict) -> Any:
        """One transformer call with AdaCache: `context` is diffusers' cache context (or None), `call_original` the
        model's own forward. Holds the model (`holding`) around it."""
        calls = self.begin_call(context, args, kwargs)
        try:
            state = calls[0].state
            if len(calls) == 1:
                self.current = calls[0]
                output = call_original(*args, **kwargs)
                self.end_call()
                if len(state.videos) > 1:  # what a call made in parts must give back
                    state.output_shapes = tensor_shapes(output)
                return output
            # some videos compute this step and others skip it: the rows of each run on their own
            outputs = []
            for call in calls:
                part_args, part_kwargs = self.cut_arguments(args, kwargs, call.rows, state.batch)
                self.current = call
                try:
                    outputs.append((call.rows, call_original(*part_args, **part_kwargs)))
                except Exception as error:
                    error.add_note(
                        f"AdaCache ran rows {list(call.rows)} of a batch of {state.batch} on their own (the batch's "
                        "videos have their own schedules), cutting every argument whose first dimension is the "
                        "batch. An argument the same for every row whose length equals the batch belongs in "
                        "ModelSpec.unbatched_arguments; or set AdaCacheConfig(batch_schedule='shared')")
                    raise
                self.end_call()
            output = torch.compiler.disable(merge_outputs)(outputs, state.batch)
            if state.output_shapes is not None and tensor_shapes(output) != state.output_shapes:
                raise not_batch_first([tensor_shapes(o) for _, o in outputs], [len(c.rows) for c in calls])
            return output
        except BaseException:
            # the generation cannot go on from a call that did not finish (an interrupt, an error): the next call
            # starts a new one, rather than being counted as this step's next CFG branch
            self.reset()
            raise

    @torch.compiler.disable
    def cut_arguments(self, args: tuple, kwargs: dict, rows: tuple[int, ...], batch: int) -> tuple[tuple, dict]:
        """The call's arguments for `rows` of its batch (`batch.cut_arguments`, with this model's parameters and the
        spec's unbatched arguments)."""
        return cut_arguments(args, kwargs, rows, batch, self.forward_parameters, self.layout.spec.unbatched_arguments)

    @torch.compiler.disable
    def begin_call(self, context: Any, args: tuple, kwargs: dict) -> list[Call]:
        """Which CFG branch and step this call is, and whether its blocks run: the call's parts, one (every row
        computes, or every row skips) or two (the rows of the videos that compute, then the rest's)."""
        layout, clock = self.layout, self.generations.clock
        name, step_index, num_steps = (context.name, context.step_index, context.num_inference_steps) \
            if context is not None else (None, None, None)
        # Only when the context does not say which step this is: the timestep is read (a device sync on GPU) and the
        # running pipeline looked for (a walk up the stack); else the pipeline only at a generation's first call.
        running = t = loop = timesteps = None
        told = not clock.needs_timestep(name, step_index)
        if not told:
            t = self._timestep(args, kwargs)
            running = self.running()
            loop = running.loop() if running is not None else None
            if loop is None:
                timesteps = self._scheduler_timesteps(running.pipeline if running is not None else None)
        tick = clock.read(name=name, step_index=step_index, num_steps=num_steps, t=t, timesteps=timesteps, loop=loop)
        branch, state = tick.branch, self.generations.states.get(tick.branch)
        frames_value = argument(layout.spec.frames_argument, self.forward_parameters, args, kwargs)
        frames_shape = tuple(frames_value.shape) if isinstance(frames_value, torch.Tensor) else frames_value
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
        if not tick.new_generation and (frames_shape, batch) != (state.frames_shape, state.batch):
            what, old, new = ((f"batch (rows of {layout.spec.batch_argument!r})", state.batch, batch)
                              if frames_shape == state.frames_shape
                              else (repr(layout.spec.frames_argument), state.frames_shape, frames_shape))
            raise ValueError(
                f"AdaCache: the model's {what} changed from {old} to {new} within generation {state.generation} "
                f"(branch {branch!r}): the batch size or resolution changed within a generation, and the cached "
                "residual belongs to the old shape. Call adacache.reset_state(model) to start a new generation, or "
                "name each differently shaped call with its own cache_context."
            )
        sharded = self._sharded_probe() if tick.new_generation else None  # (refuses before the clock moves)
        clock.commit(tick)
        if tick.new_generation:
            if told:
                running = self.running()
            batched_cfg = self._batched_cfg(name, batch, running)
            rows, paired = video_rows(latents, self.config.resolved_batch_schedule, batched_cfg=batched_cfg)
            state = self.generations.begin(branch, tick.num_steps, rows, paired=paired, batch=batch)
            state.frames_shape = frames_shape
            if sharded is not None:  # every rank decides from the sums of the whole probe
                state.sharded = sharded
                for video in state.videos:
                    video.schedule.motion_sums_of = sharded.motion_sums
        state.thread = thread
        computing, skipping = [], []
        for video in state.videos:
            compute = video.schedule.is_computed(tick.step, have_cache=video.store.holds)
            (video.schedule.computed_steps if compute else video.schedule.skipped_steps).append(tick.step)
            (computing if compute else skipping).append(video)
        frames = self.frames(frames_value)
        if not computing or not skipping:  # one call: every row computes, or every row skips
            return [Call(branch, state, tick.step, bool(computing), frames, [(v, v.rows) for v in state.videos],
                         size=batch)]
        calls = []
        for compute, videos in ((True, computing), (False, skipping)):
            rows = tuple(sorted(r for v in videos for r in v.rows))
            local = {row: i for i, row in enumerate(rows)}
            parts = [(v, tuple(local[r] for r in v.rows)) for v in videos]
            calls.append(Call(branch, state, tick.step, compute, frames, parts, rows=rows, size=len(rows)))
        return calls

    def end_call(self) -> None:
        call = self.current
        if call is not None and not call.reached_last:
            call.note(
                f"the cached blocks {self.layout.span} were not all called (a model option that bypasses them, such "
                "as Latte's enable_temporal_attentions=False): nothing is cached, every step is computed"
            )
            if not call.compute:  # the blocks were bypassed after a cache was stored: the output lacks the residual
                raise RuntimeError(
                    "AdaCache: a skipped step did not reach the last cached block, so its output is incomplete; "
                    "keep the model's block options fixed within a generation, or call adacache.reset_state(model)"
                )

    # -- around each cached block (called by the block wrappers, install.py) --
    def before_block(self, index: int, args: tuple, kwargs: dict) -> Any:
        """None when the block must run; else the output to return instead of running it."""
        call, layout = self.current, self.layout
        if call is None:
            return None  # the block was called outside a transformer forward: leave it alone
        if call.compute and index != layout.first:
            return None
        block_spec = layout.blocks[index][2]
        inputs = read_streams(block_spec, args, kwargs, layout.block_parameters[index])
        if index == layout.first:
            call.first_inputs = inputs
        if call.compute:  # the in-place check after the last block needs the stamps; a skipped step does not
            if index == layout.first:
                call.first_stamps = tuple(stamp(t) for t in inputs)
            return None
        if index == layout.last:
            call.reached_last = True
            inputs = skip(call, inputs)
        return make_output(block_spec, *inputs, as_list=index in self.list_outputs)

    def after_block(self, index: int, args: tuple, kwargs: dict, output: Any) -> Any:
        call, layout = self.current, self.layout
        if call is None or not call.compute:
            return output
        if isinstance(output, list):
            self.list_outputs.add(index)
        block_spec = layout.blocks[index][2]
        if index == layout.probe_index:
            if layout.probe_point == "block":
                hidden_in = read_streams(block_spec, args, kwargs, layout.block_parameters[index])[0]
                call.probe = read_output(block_spec, output)[0] - hidden_in
            else:
                call.probe, self.probe_slot[0] = self.probe_slot[0], None
        if index == layout.last:
            call.reached_last = True
            if not unchanged(call):
                raise RuntimeError(
                    f"AdaCache: a block of {layout.span} modified its input hidden states in place, so the stack "
                    "residual cannot be measured; make the block return a new tensor (x = x + f(x) rather than "
                    "x += f(x))"
                )
            conclude(call, read_output(block_spec, output), layout)
        return output

    # -- what a call tells --
    def _batch(self, args: tuple, kwargs: dict) -> torch.Tensor | None:
        """The spec's batch argument (its first dimension is the batch), or None where it is not a tensor."""
        name = self.layout.spec.batch_argument
        if name not in self.forward_parameters and self.forward_parameters:
            name = self.forward_parameters[0]  # a model naming it otherwise (x, latents): its first argument
        value = argument(name, self.forward_parameters, args, kwargs)
        return value if isinstance(value, torch.Tensor) and value.dim() > 0 else None

    def _timestep(self, args: tuple, kwargs: dict) -> Timestep | None:
        """The call's timestep as (its largest value, its mean), one device sync: per-token timesteps (Wan 2.2
        TI2V's clean first frame, LTX's conditioning, diffusion forcing) have the scheduler's timestep as their
        largest value, and a mean that still falls step by step (see core/clock.py)."""
        value = argument(self.layout.spec.timestep_argument, self.forward_parameters, args, kwargs)
        if value is None:
            return None
        if not isinstance(value, torch.Tensor):
            try:
                return (float(value),) * 2
            except TypeError:  # a list or array of timesteps (per sample or per frame), read as a tensor
                value = torch.as_tensor(value, dtype=torch.float64)
        value = value.detach()
        if value.numel() <= SMALL_TIMESTEP:  # one per sample or per frame: one copy to the host, summed there
            values = value.flatten().tolist()
            return (float(max(values)), sum(values) / len(values)) if values else None
        value = value.float()
        largest, mean = torch.stack([value.max(), value.mean()]).tolist()  # per token: reduced on the device
        return largest, mean

    def running(self) -> Running | None:
        """The diffusers pipeline whose loop made this call (running.find_running), or None."""
        return find_running(self.model_ref(), self._not_pipelines)

    @staticmethod
    def _batched_cfg(name: str | None, batch: int | None, running: Running | None) -> bool:
        """Whether the call holds both CFG halves of its videos (the uncond rows, then the cond rows): as the running
        pipeline tells it (its loop's latents doubled, or its do_classifier_free_guidance); with no pipeline telling,
        a cache context named "cond_uncond" (diffusers' name for it, and what a custom loop passes to
        adacache.cache_context). Equal latents in the two halves alone are no proof: two prompts may start from the
        same noise."""
        if batch is None or batch % 2:
            return False
        told = running.batched_cfg(batch) if running is not None else None
        return told if told is not None else name == BATCHED_CFG_CONTEXT

    def frames(self, value: Any) -> int | None:
        """Latent frames after patching, from the model's frames argument (a tensor, or a frame count)."""
        spec, patch = self.layout.spec, self.layout.temporal_patch
        if value is None:
            return None
        if spec.frames_dim is None:
            return max(1, int(value) // patch)
        if not isinstance(value, torch.Tensor) or not -value.dim() <= spec.frames_dim < value.dim():
            raise ValueError(
                f"AdaCache: the model spec reads frames from dimension {spec.frames_dim} of "
                f"{spec.frames_argument!r}, which has shape {tuple(getattr(value, 'shape', ()))}; fix frames_dim"
            )
        return max(1, value.shape[spec.frames_dim] // patch)

    def _scheduler_timesteps(self, pipeline: Any = None) -> tuple[Any, list[float]] | None:
        """(the scheduler's timesteps object, as floats), converted once per set_timesteps: the scheduler of
        `pipeline` (the running one), else of the pipeline AdaCache was applied to; None without a pipeline, a
        scheduler (removed or set to None) or timesteps."""
        if pipeline is None:
            pipeline = self.pipeline_ref() if self.pipeline_ref is not None else None
        timesteps = getattr(scheduler_of(pipeline), "timesteps", None) if pipeline is not None else None
        if timesteps is None:
            return None
        if self._timesteps_cache is None or self._timesteps_cache[0] is not timesteps:
            self._timesteps_cache = (timesteps, [float(v) for v in timesteps])
        return self._timesteps_cache

    def _sharded_probe(self) -> parallel.ShardedProbe | None:
        """Under diffusers' context parallelism (looked up per generation: enable_parallelism may come after
        apply_adacache), the probe measurement that adds the ranks' slices; None for a model run whole."""
        cp = parallel.ContextParallel.of(self.model_ref())
        if cp is None:
            return None
        if self.config.moreg and self.layout.probe_tokens != "b(ts)c":
            raise ValueError(
                f"AdaCache: MoReg under context parallelism reads frames from tokens laid out as b(ts)c (batch, "
                f"frames x tokens, channels), but the probe of {self.model_name} is {self.layout.probe_tokens}; set "
                "moreg=False, or run without context parallelism"
            )
        return parallel.ShardedProbe(cp)

    # -- what the public API asks --
    def stats(self) -> list[GenerationStats]:
        return self.generations.stats()

    def reset(self) -> None:
        self.generations.reset()
        self.current = None

    def reconfigure(self, config: AdaCacheConfig | None) -> None:
        """Another config (the same probe: the blocks stay wrapped where they are), or None to pause."""
        self.generations.reconfigure(config)
        self.current = None
        self.paused = config is None
        if config is not None:
            self.config = config

