"""Which generation, CFG branch and step a transformer call belongs to: the step clock.

A transformer knows nothing of the loop that calls it; the clock works it out from what each call can tell, best
source first:

1. diffusers' cache context (`with model.cache_context("cond")`), with the step index and count where the
   pipeline gives them: the branch is its name, the step its index. A step index that does not advance starts a
   new generation.
2. the running pipeline's loop (`Loop`: the diffusers pipeline whose `__call__` made this call, found by the
   caller): the count is the loop's length (`num_timesteps`, what the pipeline iterates: a strength-truncated
   schedule's tail, a second-order scheduler's two evaluations per step, a diffusion-forcing window's iterations);
   the step is the scheduler's `step_index` counted from where the loop begins in its timesteps, or, where the
   scheduler does not step (diffusion forcing steps copies of it) or has no step index, one more than the
   branch's last call. A scheduler set anew, a finished loop, a step index that does not advance, or a timestep
   that turns back starts a new generation.
3. the scheduler's timesteps (of a running pipeline that does not say how long its loop is, or of the pipeline
   AdaCache was applied to, called from a loop of one's own): the step is where the call's timestep sits in
   `scheduler.timesteps`, the count its length. A scheduler set anew (`set_timesteps`) starts a new generation.
4. the timestep alone: one step per call; a timestep that repeats or turns back against the run's direction
   (timesteps fall in most schedulers, rise in some, such as Mochi's) starts a new generation.

Without a cache context, the k-th call in a row at one timestep is branch "default.k" (CFG split over calls); with a
running loop, only calls between the same two scheduler steps count as in a row, so a second-order scheduler's
second evaluation at a repeated timestep (Heun's) is the next step of branch "default", not a second branch.

A call's timestep is a pair (its largest value, its mean): equal for one timestep per sample; with per-token
timesteps (Wan 2.2 TI2V's clean first frame, LTX's conditioning tokens, diffusion forcing's staggered frames) the
largest is the noisiest token's, the one the scheduler lists, and the mean orders calls where the largest repeats
(frames not yet started in diffusion forcing). Pairs compare in that order.

`read` works out a call's `Tick` without changing anything; `commit` makes it the branch's last call. Between the
two the caller may refuse the call (a thread or shape check) and the clock stays as it was. The clock reads no
tensor: the caller reads the timestep (a device sync on GPU) only where `needs_timestep` says so.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

MAX_AUTO_BRANCHES = 8

Timestep = tuple[float, float]  # (largest value, mean) of a call's timestep


@dataclass(frozen=True)
class Loop:
    """What the running pipeline tells about the loop a call belongs to (read per call, before the call)."""

    key: Any  # the scheduler's timesteps object: set anew (`set_timesteps`) for each run
    length: int  # iterations of the loop (the pipeline's `num_timesteps`), one transformer call per branch each
    position: int | None = None  # the scheduler's `step_index` (None before its first step, or where it has none)
    scheduled: int | None = None  # len(scheduler.timesteps); the loop runs over its last `length` entries

    @property
    def start(self) -> int | None:
        """Where the loop begins in the scheduler's timesteps (a strength-truncated schedule begins past 0); None
        where the loop is not a tail of them (diffusion forcing runs more iterations than the scheduler has)."""
        if self.scheduled is None or self.scheduled < self.length:
            return None
        return self.scheduled - self.length


@dataclass(frozen=True)
class Tick:
    """One call: its branch, its step (1-based), the generation's step count (None: unknown), and whether it
    starts a new generation of its branch."""

    branch: str
    step: int
    num_steps: int | None
    new_generation: bool
    t: Timestep | None = None
    timesteps_key: Any = None
    calls_at_t: int = 0  # calls in a row at this timestep before this one (what names branches "default.k")
    mark: Any = None  # (timesteps object, scheduler step index) of the running loop: calls "in a row" share it


@dataclass
class _Track:
    """A branch's last committed call."""

    last_step: int = 0
    last_t: Timestep | None = None
    direction: int | None = None  # +1 rising or -1 falling timesteps, once two calls have been seen
    timesteps_key: Any = None  # the scheduler's timesteps object this generation started with
    num_steps: int | None = None


class StepClock:
    def __init__(self, default_num_steps: int | None = None) -> None:
        self.default_num_steps = default_num_steps  # AdaCacheConfig.num_inference_steps: the last resort
        self.tracks: dict[str, _Track] = {}
        self.last_call_t: Timestep | None = None
        self.last_mark: Any = None
        self.calls_at_t = 0

    @staticmethod
    def needs_timestep(name: str | None, step_index: int | None) -> bool:
        """Whether `read` needs the call's timestep: only when the cache context does not name the branch and step."""
        return name is None or step_index is None

    def read(self, *, name: str | None = None, step_index: int | None = None, num_steps: int | None = None,
             t: float | Timestep | None = None, timesteps: tuple[Any, Sequence[float]] | None = None,
             loop: Loop | None = None) -> Tick:
        """The call's tick. `name`, `step_index` (0-based) and `num_steps` come from the cache context; `t` is the
        call's timestep (a float, or the pair (largest, mean)); `loop` is the running pipeline's; `timesteps` is (an
        object that changes when the scheduler is set anew, its timesteps as floats), read where there is no
        `loop`. Nothing changes here: a call refused between `read` and `commit` leaves no trace (a retry at the
        same timestep is the same branch, not a second one)."""
        if step_index is None and t is None:
            raise ValueError(
                "AdaCache cannot tell which denoising step this call is: its timestep is None and no cache_context "
                "gives the step index. Pass the timestep to the model (the argument its ModelSpec names as "
                "timestep_argument), or wrap each call in `with adacache.cache_context(model, name, step_index=i, "
                "num_inference_steps=n):`"
            )
        if t is not None and not isinstance(t, tuple):
            t = (float(t), float(t))
        mark = (loop.key, loop.position) if loop is not None else None
        calls_at_t = self.calls_at_t
        if name is None:  # no cache context: the k-th call in a row at the same timestep is branch k
            in_a_row = t == self.last_call_t and same_mark(mark, self.last_mark)
            calls_at_t = calls_at_t + 1 if in_a_row else 0
            if calls_at_t >= MAX_AUTO_BRANCHES:
                raise RuntimeError(
                    f"AdaCache: {calls_at_t + 1} calls in a row at timestep {t} and no cache_context: name each "
                    "call's branch with `with model.cache_context(name):` (or adacache.cache_context for custom models)"
                )
            name = "default" if calls_at_t == 0 else f"default.{calls_at_t}"
        track = self.tracks.get(name)
        if step_index is None and loop is not None:
            step, new = loop_step(track, loop, t)
            return Tick(name, step, loop.length, new, t, loop.key if new else track.timesteps_key, calls_at_t, mark)
        told_step = step_index is not None  # by the cache context: then it alone marks new generations
        key = timesteps[0] if timesteps is not None else None
        if step_index is None and timesteps is not None and t is not None:
            after = track.last_step if track is not None and track.timesteps_key is key else 0
            step_index = find_step(timesteps[1], t[0], after)
            if step_index is not None and num_steps is None:
                num_steps = len(timesteps[1])
        if num_steps is None:
            num_steps = self.default_num_steps

        if track is None:
            new = True
        elif step_index is not None:
            new = step_index + 1 <= track.last_step
        else:
            new = turns_back(track, t)
        if not told_step and timesteps is not None and track is not None and track.timesteps_key is not key:
            new = True  # the scheduler was set for a new run
        if track is not None and not new and num_steps not in (None, track.num_steps):
            new = True
        last_step = 0 if new else track.last_step
        step = step_index + 1 if step_index is not None else last_step + 1
        return Tick(name, step, num_steps, new, t, key if new else track.timesteps_key, calls_at_t, mark)

    def commit(self, tick: Tick) -> None:
        """`tick` is its branch's latest call."""
        self.last_call_t, self.last_mark, self.calls_at_t = tick.t, tick.mark, tick.calls_at_t
        track = self.tracks.get(tick.branch)
        if tick.new_generation or track is None:
            track = self.tracks[tick.branch] = _Track(timesteps_key=tick.timesteps_key, num_steps=tick.num_steps)
        if track.last_t is not None and tick.t is not None and tick.t != track.last_t:
            track.direction = 1 if tick.t > track.last_t else -1
        track.last_step, track.last_t = tick.step, tick.t

    def forget(self) -> None:
        """Every branch starts a new generation at its next call, and the next call without a cache context is the
        first at its timestep (branch "default", whatever the last call's timestep was)."""
        self.tracks.clear()
        self.last_call_t, self.last_mark, self.calls_at_t = None, None, 0


def find_step(timesteps: Sequence[float], t: float, after: int) -> int | None:
    """Index of t in the scheduler's timesteps: the first match at or after `after` (schedulers such as Heun repeat
    timesteps), else the first match; None when t is not there (a stale or unrelated scheduler)."""
    tolerance = 1e-4 * max(1.0, abs(t))
    matches = [i for i, value in enumerate(timesteps) if abs(value - t) <= tolerance]
    if not matches:
        return None
    return next((i for i in matches if i >= after), matches[0])


def turns_back(track: _Track, t: Timestep | None, repeat: bool = True) -> bool:
    """Timestep-only fallback: a new generation when t moves against the run's direction, or repeats (`repeat`)."""
    if t is None or track.last_t is None or t == track.last_t:
        return repeat
    direction = 1 if t > track.last_t else -1
    return track.direction is not None and direction != track.direction


def loop_step(track: _Track | None, loop: Loop, t: Timestep | None) -> tuple[int, bool]:
    """(step, new generation) of a call in a running pipeline's loop (source 2 of the module's docstring)."""
    ongoing = (track is not None and track.timesteps_key is loop.key and track.num_steps == loop.length
               and track.last_step < loop.length)
    start = loop.start
    if loop.position is not None and start is not None and start <= loop.position < start + loop.length:
        step = loop.position - start + 1  # the scheduler's own count (a second expert joins mid-loop)
        return step, not ongoing or step <= track.last_step
    # the loop's first iteration (the scheduler has not stepped yet), or a scheduler that does not step here
    new = not ongoing or turns_back(track, t, repeat=False)
    return (1 if new else track.last_step + 1), new


def same_mark(mark: Any, other: Any) -> bool:
    """Whether two calls' loop marks, (timesteps object, scheduler step index) or None, are the same."""
    if mark is None or other is None:
        return mark is other
    return mark[0] is other[0] and mark[1] == other[1]
