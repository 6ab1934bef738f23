"""Which generation, CFG branch and step a transformer call belongs to: the step clock.

A transformer knows nothing of the loop that calls it; the clock works it out from what each call can tell, best
source first:

1. diffusers' cache context (`with model.cache_context("cond")`), with the step index and count where the
   pipeline gives them: the branch is its name, the step its index. A step index that does not advance starts a
   new generation.
2. the pipeline's scheduler (when AdaCache was applied to a pipeline): the step is where the call's timestep sits in
   `scheduler.timesteps`, the count its length. A scheduler set anew (`set_timesteps`) starts a new generation.
3. the timestep alone: one step per call; a timestep that repeats or turns back against the run's direction
   (timesteps fall in most schedulers, rise in some, such as Mochi's) starts a new generation.

Without a cache context, the k-th call in a row at one timestep is branch "default.k" (CFG split over calls).

`read` works out a call's `Tick` without changing anything; `commit` makes it the branch's last call. Between the
two the caller may refuse the call (a thread or shape check) and the clock stays as it was. The clock reads no
tensor: the caller reads the timestep (a device sync on GPU) only where `needs_timestep` says so.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

MAX_AUTO_BRANCHES = 8


@dataclass(frozen=True)
class Tick:
    """One call: its branch, its step (1-based), the generation's step count (None: unknown), and whether it
    starts a new generation of its branch."""

    branch: str
    step: int
    num_steps: int | None
    new_generation: bool
    t: float | None = None
    timesteps_key: Any = None
    calls_at_t: int = 0  # calls in a row at this timestep before this one (what names branches "default.k")


@dataclass
class _Track:
    """A branch's last committed call."""

    last_step: int = 0
    last_t: float | None = None
    direction: int | None = None  # +1 rising or -1 falling timesteps, once two calls have been seen
    timesteps_key: Any = None  # the scheduler's timesteps object this generation started with
    num_steps: int | None = None


class StepClock:
    def __init__(self, default_num_steps: int | None = None) -> None:
        self.default_num_steps = default_num_steps  # AdaCacheConfig.num_inference_steps: the last resort
        self.tracks: dict[str, _Track] = {}
        self.last_call_t: float | None = None
        self.calls_at_t = 0

    @staticmethod
    def needs_timestep(name: str | None, step_index: int | None) -> bool:
        """Whether `read` needs the call's timestep: only when the cache context does not name the branch and step."""
        return name is None or step_index is None

    def read(self, *, name: str | None = None, step_index: int | None = None, num_steps: int | None = None,
             t: float | None = None, timesteps: tuple[Any, Sequence[float]] | None = None) -> Tick:
        """The call's tick. `name`, `step_index` (0-based) and `num_steps` come from the cache context; `t` is the
        call's timestep (a float); `timesteps` is (an object that changes when the scheduler is set anew, its
        timesteps as floats). Nothing changes here: a call refused between `read` and `commit` leaves no trace (a
        retry at the same timestep is the same branch, not a second one)."""
        if step_index is None and t is None:
            raise ValueError(
                "AdaCache cannot tell which denoising step this call is: its timestep is None and no cache_context "
                "gives the step index. Pass the timestep to the model (the argument its ModelSpec names as "
                "timestep_argument), or wrap each call in `with adacache.cache_context(model, name, step_index=i, "
                "num_inference_steps=n):`"
            )
        calls_at_t = self.calls_at_t
        if name is None:  # no cache context: the k-th call at the same timestep is branch k
            calls_at_t = calls_at_t + 1 if t == self.last_call_t else 0
            if calls_at_t >= MAX_AUTO_BRANCHES:
                raise RuntimeError(
                    f"AdaCache: {calls_at_t + 1} calls in a row at timestep {t} and no cache_context: name each "
                    "call's branch with `with model.cache_context(name):` (or adacache.cache_context for custom models)"
                )
            name = "default" if calls_at_t == 0 else f"default.{calls_at_t}"
        track = self.tracks.get(name)
        told_step = step_index is not None  # by the cache context: then it alone marks new generations
        key = timesteps[0] if timesteps is not None else None
        if step_index is None and timesteps is not None and t is not None:
            after = track.last_step if track is not None and track.timesteps_key is key else 0
            step_index = find_step(timesteps[1], t, after)
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
        return Tick(name, step, num_steps, new, t, key if new else track.timesteps_key, calls_at_t)

    def commit(self, tick: Tick) -> None:
        """`tick` is its branch's latest call."""
        self.last_call_t, self.calls_at_t = tick.t, tick.calls_at_t
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
        self.last_call_t, self.calls_at_t = None, 0


def find_step(timesteps: Sequence[float], t: float, after: int) -> int | None:
    """Index of t in the scheduler's timesteps: the first match at or after `after` (schedulers such as Heun repeat
    timesteps), else the first match; None when t is not there (a stale or unrelated scheduler)."""
    tolerance = 1e-4 * max(1.0, abs(t))
    matches = [i for i, value in enumerate(timesteps) if abs(value - t) <= tolerance]
    if not matches:
        return None
    return next((i for i in matches if i >= after), matches[0])


def turns_back(track: _Track, t: float | None) -> bool:
    """Timestep-only fallback: a new generation when t repeats or moves against the run's direction."""
    if t is None or track.last_t is None or t == track.last_t:
        return True
    direction = 1 if t > track.last_t else -1
    return track.direction is not None and direction != track.direction
