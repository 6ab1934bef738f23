"""The AdaCache decision, top to bottom, with no model in sight.

A generation is a sequence of denoising steps 1..N. `Schedule` holds one generation's state and answers two
questions: `is_computed(step)` (run the blocks, or reuse the cached residual?) and, after a computed step, how many
steps until the next computed one. The hooks answer the second in two calls, with what they need between them:

- `measure(step, probe, frames)`: the probe against the last one, as sums (`ProbeSums`): L1 of the change and L1
  of the base, and for MoReg the numerator and denominator of each stride's frame-to-frame change. Sums, because
  sums add: under context parallelism the hooks add them over the ranks holding the probe's tokens
  (`adacache.parallel.ShardedProbe.reduce_all`, one all-reduce per step for every video of a batch).
- `conclude(step, probe, sums)`: `decide` (the ratios, taken only here, then MoReg's factor and the codebook
  lookup), then keep the probe for the next computed step to compare with.

The distance, the motion score and the codebook lookup are pure functions, tested by hand.

Paper mode reproduces the authors' code exactly (ADACACHE.md section 2). The default differs only where their
code misbehaves: the distance is divided by the real gap since the last computed step (theirs divides by the
stored rate, which is wrong after a forced step cut the gap short), and a step at or past the planned one is
computed (theirs needs equality, so if the planned step's call never happens, nothing is computed until N-1).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Callable

import torch

from ..config import AdaCacheConfig

logger = logging.getLogger(__name__)


def l1(tensor: torch.Tensor) -> torch.Tensor:
    """Sum of absolute values, accumulated in at least float32 (half and bfloat16 widen; float64 stays float64)."""
    # abs().sum() rather than vector_norm(ord=1): the same sum, five times faster on CPU (68 -> 13 us on the demo
    # model's probe), which is most of what AdaCache costs a computed step
    return tensor.abs().sum(dtype=torch.promote_types(tensor.dtype, torch.float32))


def relative_l1(current: torch.Tensor, previous: torch.Tensor) -> torch.Tensor:
    """L1(current - previous) / L1(previous), summed over every element (all of the batch): a 0-d tensor of at
    least float32. `previous` follows `current` to its device (a model moved within a generation)."""
    change, base = change_sums(current, previous)
    return change / base


def change_sums(current: torch.Tensor, previous: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(L1(current - previous), L1(previous)): the two sums of the relative L1 distance, 0-d tensors."""
    if current.shape != previous.shape:
        raise ValueError(
            f"probe shape changed from {tuple(previous.shape)} to {tuple(current.shape)} within one generation; "
            "a generation must keep its batch size and resolution (call adacache.reset_state(model) to start a "
            "new one, or use a separate cache_context name per differently shaped call)"
        )
    if previous.device != current.device:
        previous = previous.to(current.device)
    return l1(current - previous), l1(previous)


def motion_score(frames: torch.Tensor, strides: tuple[int, ...]) -> torch.Tensor | None:
    """Raw motion of a probe laid out as frames (B, T, S, C): for each stride i,
    L1(x[:, i:] - x[:, :-i]) / (L1(x[:, i:]) + L1(x[:, :-i])), averaged over strides; None if T <= every stride."""
    return _motion_of(motion_sums(frames, strides))


def motion_sums(frames: torch.Tensor, strides: tuple[int, ...]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per stride shorter than the clip: (L1 of the frame-to-frame change, L1 of both frame sets), 0-d tensors."""
    sums = []
    for stride in strides:
        if stride >= frames.shape[1]:
            continue
        later, earlier = frames[:, stride:], frames[:, :-stride]
        sums.append((l1(later - earlier), l1(later) + l1(earlier)))
    return sums


def _motion_of(sums: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor | None:
    if not sums:
        return None
    return torch.stack([change / base for change, base in sums]).mean()


@dataclass
class ProbeSums:
    """What a computed step's probe measured against the last one, as sums (0-d tensors) to be divided only at the
    decision: `change` = L1(probe - last probe), `base` = L1(last probe); `motion` per MoReg stride (L1 of the
    frame-to-frame change, L1 of the frames), None outside MoReg's window or without frames; `first` when there
    was no last probe to compare with."""

    change: torch.Tensor | None = None
    base: torch.Tensor | None = None
    motion: list[tuple[torch.Tensor, torch.Tensor]] | None = None
    moreg: bool = False  # MoReg applies to this step's distance (on, and the probe's frames known)
    first: bool = False


def _moreg_map(raw: float, config: AdaCacheConfig) -> float:
    """MoReg's m = (raw / norm) ** power / divisor; inf where that overflows a float (extreme settings), which
    makes the distance non-finite and so computes the next step."""
    try:
        return (raw / config.moreg_norm) ** config.moreg_power / config.moreg_divisor
    except OverflowError:
        return math.inf


def lookup_rate(codebook: dict[float, int], distance: float) -> int:
    """The rate of the first threshold (ascending) above `distance`; past the last threshold, the last rate.
    A non-finite distance gives rate 1 (compute the next step) rather than trusting garbage."""
    if not math.isfinite(distance):
        return 1
    for threshold, rate in codebook.items():
        if distance < threshold:
            return rate
    return rate  # the last entry's rate


@dataclass
class StepRecord:
    """What happened at one computed step, for `get_stats`."""

    step: int
    distance: float | None = None  # normalized (and MoReg-scaled) distance used for the lookup
    raw_distance: float | None = None  # relative L1 before dividing by the gap and before MoReg
    motion: float | None = None  # MoReg score m (after the (norm, power, divisor) mapping)
    motion_factor: float | None = None  # m + |g|, the factor the distance was multiplied by
    rate: int = 1  # rate chosen at this step: the next computed step is `rate` steps later


@dataclass
class Schedule:
    """One generation's caching state (per transformer and per CFG branch).

    Steps are 1-based. `num_steps` may be None when the pipeline does not say; then the last two steps cannot be
    forced (a warning says so once per generation).
    """

    config: AdaCacheConfig
    num_steps: int | None = None
    rate: int = 1
    prev_compute: int = 0
    prev_probe: torch.Tensor | None = None
    prev_motion: float = 1.0
    raw_motion: list[float] = field(default_factory=list)  # MoReg's raw readings (see _check_moreg_scale)
    computed_steps: list[int] = field(default_factory=list)
    skipped_steps: list[int] = field(default_factory=list)
    records: list[StepRecord] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    # MoReg's sums of a probe (framed (B, T, S, C), or as the caller laid it out) with `frames` frames; a sharded
    # probe replaces it with one that pairs frames across the shard boundaries (adacache.parallel).
    motion_sums_of: Callable[[torch.Tensor, int, tuple[int, ...]], list[tuple[torch.Tensor, torch.Tensor]]] | None = None

    def is_computed(self, step: int, have_cache: bool) -> bool:
        """Whether `step` runs the blocks. Without a usable cache every step is computed."""
        forced = step == 1 or (self.num_steps is not None and step >= self.num_steps - 1)
        if self.config.paper_mode:
            planned = step == self.prev_compute + self.rate
        else:
            planned = step >= self.prev_compute + self.rate
        return forced or planned or not have_cache

    def measure(self, step: int, probe: torch.Tensor, frames: int | None) -> ProbeSums:
        """The probe of computed `step` against the last one, as sums (tensor work only, no device sync). `probe`
        is laid out as (B, T, S, C) frames when `frames` is known (MoReg needs it), else as it came."""
        config = self.config
        if self.prev_probe is None:
            return ProbeSums(first=True)
        change, base = change_sums(probe, self.prev_probe)
        motion = None
        if config.moreg and frames is None:
            self.note("MoReg skipped: the probe's frame layout is unknown (see the model spec's token_layout)")
        if config.moreg and frames is not None and self._in_moreg_window(step):
            strides = config.moreg_strides
            motion = motion_sums(probe, strides) if self.motion_sums_of is None else self.motion_sums_of(probe, frames, strides)
            if not motion:
                self.note(f"MoReg: the probe has too few frames for strides {config.moreg_strides}; m = 1")
        return ProbeSums(change, base, motion, moreg=config.moreg and frames is not None)

    def conclude(self, step: int, probe: torch.Tensor, sums: ProbeSums) -> StepRecord:
        """`decide` from `sums` (this probe's, reduced over whatever holds the rest of it), then keep `probe` as
        the one the next computed step compares with."""
        record = self.decide(step, sums)
        if record.distance is not None and not math.isfinite(record.distance):
            self.note(f"non-finite probe distance at step {step}: computing the next step, forgetting this probe")
            self.prev_probe = None  # the next computed step compares with nothing rather than with garbage
        else:
            self.prev_probe = probe.detach()
        return record

    def decide(self, step: int, sums: ProbeSums) -> StepRecord:
        """The ratios of `sums`, MoReg's factor and the codebook lookup: the rate after computed `step`."""
        config = self.config
        record = StepRecord(step=step)
        if not sums.first:
            gap = self.rate if config.paper_mode else step - self.prev_compute
            raw = sums.change / sums.base
            motion = _motion_of(sums.motion) if sums.motion else None
            # One device sync for everything this step needs on the host.
            values = torch.stack([raw, motion if motion is not None else raw]).tolist()
            record.raw_distance = values[0]
            distance = values[0] / gap
            if sums.moreg:
                # As the authors: m = 1 outside the window, but the gradient against the last m still applies.
                m = 1.0 if motion is None else _moreg_map(values[1], config)
                if motion is not None:
                    self._check_moreg_scale(values[1])
                gradient = config.moreg_gradient_scale * (m - self.prev_motion) / gap
                self.prev_motion = m
                record.motion = m if motion is not None else None
                record.motion_factor = m + abs(gradient)
                distance *= record.motion_factor
            record.distance = distance
            self.rate = lookup_rate(config.codebook, distance)  # 1 for a non-finite distance
        else:
            self.rate = 1  # the first computed step has nothing to compare with: the next step is computed too
        record.rate = self.rate
        self.prev_compute = step
        self.records.append(record)
        return record

    def reset_after_bad_cache(self, step: int) -> None:
        """Forget the cache and the probe history, so the next step is computed and compares with nothing."""
        if not self.records or self.records[-1].step != step:
            self.records.append(StepRecord(step=step, rate=1))
        self.records[-1].rate = 1
        self.rate, self.prev_probe, self.prev_compute = 1, None, step

    def _check_moreg_scale(self, raw: float) -> None:
        """MoReg's normalisation must fit the model: the authors' 0.385 was fitted to Open-Sora's latents, and a
        model whose probe moves five times less gets m = (raw / 0.385) ** 8 of about 0, which only shrinks
        distances: MoReg would remove compute instead of spending it on motion. After three readings, a median
        factor under 1/20 (or over 20) is said in the stats and logged, unless the codebook never skips a step.
        Decisions are not changed."""
        self.raw_motion.append(raw)
        if len(self.raw_motion) != 3 or max(self.config.codebook.values()) == 1:
            return  # (a codebook that never skips: MoReg can change nothing)
        median = sorted(self.raw_motion)[1]
        factor = _moreg_map(median, self.config)
        if not 1 / 20 <= factor <= 20:
            effect = "removes compute instead of spending it on motion" if factor < 1 else "computes nearly every step"
            self.note(
                f"MoReg's normalisation does not fit this model: its probe motion is about {median:.3g}, against "
                f"moreg_norm={self.config.moreg_norm:g}, so the motion factor is about {factor:.2g} and MoReg "
                f"{effect}. Calibrate it for this model (adacache calibrate --moreg, which sets moreg_norm to the "
                f"median motion), or set moreg_norm near {median:.3g}"
            )

    def _in_moreg_window(self, step: int) -> bool:
        if self.num_steps is None and self.config.moreg_window is None:
            return step >= 2
        first, last = self.config.resolve_moreg_window(self.num_steps or 0)
        return first <= step <= last

    def note(self, message: str, log: bool = True) -> None:
        """Record a message in this generation's stats once, and log it unless `log` is False."""
        if message not in self.notes:
            self.notes.append(message)
            if log:
                logger.warning("AdaCache: %s", message)
