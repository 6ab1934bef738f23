"""Per-generation state: which generations are in progress, per CFG branch, and what finished ones did.

One `Generations` object per patched transformer holds it all: the step clock (core/clock.py), each branch's
generation in progress (`BranchState`: its videos' schedules and residual stores, `VideoState`), and the history of
finished ones (`GenerationStats`). Everything that changes it is a method here (`begin`, `reset`, `reconfigure`);
the runtime asks, nothing outside writes its fields.
"""

from __future__ import annotations

import collections
from dataclasses import dataclass
from typing import Any

import torch

from ..config import AdaCacheConfig
from ..core.clock import StepClock
from ..core.decision import Schedule
from ..core.store import ResidualStore, make_store

UNKNOWN_STEPS = (
    "the number of inference steps is unknown (no cache_context with num_inference_steps, no diffusers pipeline "
    "running the call whose loop tells it, no scheduler listing the call's timestep): the last two steps are not "
    "forced to compute. In a loop of your own, wrap each call in adacache.cache_context(model, name, step_index=i, "
    "num_inference_steps=n), or set AdaCacheConfig(num_inference_steps=N)"
)


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
    # The batch rows this schedule decided for (None: the batch was not read). Where `paired`, the batch's two halves
    # were taken as CFG halves (the pipeline guides in one call): video v is rows [v, v + batch/2], its uncond and
    # cond rows; otherwise one row per video, or every row for one schedule over the batch.
    rows: list[int] | None = None
    paired: bool = False

    @property
    def compute_fraction(self) -> float:
        return len(self.computed_steps) / max(1, self.steps_seen)

    def to_dict(self) -> dict[str, Any]:
        data = {k: getattr(self, k) for k in self.__dataclass_fields__}
        data["compute_fraction"] = self.compute_fraction
        return data

    def __str__(self) -> str:
        video = f" video {self.video}" if self.video is not None else ""
        video += f" rows {self.rows} (CFG halves)" if self.paired else ""
        return (
            f"[{self.branch}{video} #{self.generation}] computed {len(self.computed_steps)}/{self.steps_seen} steps "
            f"{self.computed_steps}, rates {self.rates}, cache {self.cache_bytes / 2**20:.2f} MiB"
        )


@dataclass
class VideoState:
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

    def note_memory(self) -> None:
        """Keep the peak of what is held between steps (after a computed step has stored what it keeps)."""
        self.peak_bytes = max(self.peak_bytes, self.cache_bytes())

    def stats(self, branch: str, generation: int, batch: int | None = None, paired: bool = False) -> GenerationStats:
        s = self.schedule
        rows = list(self.rows) if self.rows is not None else list(range(batch)) if batch is not None else None
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
            rows=rows,
            paired=paired,
        )


@dataclass
class BranchState:
    """One CFG branch's generation in progress: its videos' schedules and stores (one for the whole batch, or one
    per video), and what must stay fixed within it."""

    generation: int
    videos: list[VideoState]
    batch: int | None = None  # rows in the batch (None: not read from the arguments)
    paired: bool = False  # its two halves are its videos' CFG halves (batch.video_rows)
    thread: int | None = None  # the thread that made this generation's last call
    frames_shape: Any = None  # the shape of the model's frames argument (or its value): fixed within a generation
    sharded: Any = None  # under context parallelism: this rank's slice of the probe (parallel.ShardedProbe)
    output_shapes: list[tuple[int, ...]] | None = None  # of the last call that ran every row, with several videos

    @property
    def only(self) -> VideoState:
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
        return [video.stats(branch, self.generation, self.batch, self.paired) for video in self.videos]


class Generations:
    """The generations of one patched transformer: in progress (`states`, per branch) and finished (`history`)."""

    def __init__(self, config: AdaCacheConfig) -> None:
        self.config = config
        self.clock = StepClock(config.num_inference_steps)
        self.states: dict[str, BranchState] = {}
        # finished generations, one entry per generation and branch (the stats of each of its videos)
        self.history: collections.deque[list[GenerationStats]] = collections.deque(maxlen=config.stats_history)
        self.count = 0  # generations begun, every branch counted
        self.warned_unknown_steps = False

    def begin(self, branch: str, num_steps: int | None, video_rows: list[tuple[int, ...] | None],
              paired: bool = False, batch: int | None = None) -> BranchState:
        """A new generation of `branch` on a batch of `batch` rows, with one schedule and store per entry of
        `video_rows` (None: the whole batch), `paired` where those pair CFG halves; the branch's previous generation
        goes to the history."""
        old = self.states.get(branch)
        if old is not None:
            self.history.append(old.stats(branch))
        self.count += 1
        videos = [VideoState(Schedule(self.config, num_steps=num_steps), make_store(self.config), rows,
                             video=None if rows is None else v) for v, rows in enumerate(video_rows)]
        state = BranchState(self.count, videos, batch=batch, paired=paired)
        if num_steps is None:
            for video in videos:
                # logged once per model; every generation's stats keep it
                video.schedule.note(UNKNOWN_STEPS, log=not self.warned_unknown_steps)
            self.warned_unknown_steps = True
        self.states[branch] = state
        return state

    def reset(self) -> None:
        """End every generation in progress (kept in the history): the next call of each branch starts anew."""
        for branch, state in self.states.items():
            self.history.append(state.stats(branch))
        self.states.clear()
        self.clock.forget()

    def reconfigure(self, config: AdaCacheConfig | None) -> None:
        """End every generation and clear the history; later generations follow `config` (None: paused, so only the
        history is cleared)."""
        self.reset()
        if config is None:
            self.history.clear()
            return
        self.config = config
        self.clock.default_num_steps = config.num_inference_steps
        self.history = collections.deque(maxlen=config.stats_history)

    def stats(self) -> list[GenerationStats]:
        """Finished generations and those in progress, oldest first, per branch and video."""
        current = [entry for branch, state in self.states.items() for entry in state.stats(branch)]
        return sorted([*(entry for entries in self.history for entry in entries), *current],
                      key=lambda s: (s.generation, s.branch, -1 if s.video is None else s.video))
