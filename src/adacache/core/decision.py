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

Two ways to turn a distance into a rate:
- With a codebook (calibrated for the model and step count, or the authors' presets): the distance, in the model's
  own units, is looked up in it. This is the paper's way, and paper mode's.
- Without one (the default, `AdaCacheConfig(codebook=None, speedup=S)`), nothing is calibrated:
  - the distance is read relative to the generation's first one (step 2 against step 1), so it means the same on
    every model and at every step count (a per-step distance shrinks as 1/N; so does the first);
  - the rate spends a compute budget of N / S computed steps: the stride is `budget_rate`'s, S * c / sqrt(relative
    distance), with c = 0.5 the mean of sqrt(relative distance) over a trajectory (0.51 to 0.56 on the embedded
    model at 30, 50 and 100 steps), nudged toward the budget as the generation goes (what the remaining steps over
    the remaining budget would need). sqrt, because reusing a residual for k steps costs about distance x k^2 / 2
    in drift, and k ~ 1 / sqrt(distance) spends a budget with the least of it (a Lagrange multiplier per step);
  - MoReg reads motion scale-free (`scale_free_motion`: the mean frame-to-frame change of the probe over its mean
    change between neighbouring tokens, about the motion in tokens per frame) and moves the budget: a video moving
    faster than 0.5 tokens per frame gets more computed steps, a stiller one fewer.

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


def count_of(values: int, like: torch.Tensor) -> torch.Tensor:
    """A count as a 0-d tensor in the dtype and on the device of `l1(like)`'s sums, so that counts add over ranks
    beside them (exact up to 2**24 in float32; beyond that within 1e-7)."""
    return torch.tensor(float(values), dtype=torch.promote_types(like.dtype, torch.float32), device=like.device)


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


def scale_free_motion_sums(frames: torch.Tensor, strides: tuple[int, ...]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The sums of `scale_free_motion` for a probe laid out as frames (B, T, S, C): per stride shorter than the clip
    (L1 of the frame-to-frame change, the number of values it sums), then (L1 of the change between neighbouring
    tokens of a frame, the number of values it sums). Empty where no stride fits or a frame has one token."""
    b, t, s, c = frames.shape
    sums = []
    for stride in strides:
        if stride >= t:
            continue
        sums.append((l1(frames[:, stride:] - frames[:, :-stride]), count_of(b * (t - stride) * s * c, frames)))
    if not sums or s < 2:
        return []
    sums.append((l1(frames[:, :, 1:] - frames[:, :, :-1]), count_of(b * t * (s - 1) * c, frames)))
    return sums


def _scale_free_motion_of(sums: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor | None:
    """Mean absolute frame-to-frame change (averaged over strides) over mean absolute change between neighbouring
    tokens: scale-free (a model whose features are ten times larger reads the same), and about the motion in
    tokens per frame, since moving content changes from frame to frame as much as the image changes over the
    distance it moves."""
    if not sums:
        return None
    *temporal, (spatial, count) = sums
    change = torch.stack([change / number for change, number in temporal]).mean()
    # frames without texture (no change between neighbouring tokens): no motion where they do not change either
    # (0/0 reads 0, not NaN), and as much as can be read where they do (x/0 reads inf, the factor's upper bound)
    return torch.where(spatial == 0, torch.where(change == 0, 0.0, torch.inf), change / (spatial / count))  # NaN stays NaN


def scale_free_motion(frames: torch.Tensor, strides: tuple[int, ...] = (1,)) -> torch.Tensor | None:
    """MoReg's motion without calibration, for a probe laid out as frames (B, T, S, C); None when it has one frame
    (or one token per frame). See `_scale_free_motion_of`."""
    return _scale_free_motion_of(scale_free_motion_sums(frames, strides))


# The calibration-free rate rule's constants (see the module docstring), measured on the shipped embedded model;
# the deep embedded model, never used to set them, is where they are checked (BENCHMARKS.md).
MOREG_MISFIT = 2.5  # a codebook's moreg_norm "does not fit" a model whose median motion is this many times away

BUDGET_SHAPE = 0.5  # c: the mean of sqrt(relative distance) over a trajectory
BUDGET_FEEDBACK = 0.5  # how strongly the stride is nudged toward what the remaining budget needs
SCALE_FREE_MOTION_REFERENCE = 0.5  # tokens per frame: motion above it gets more compute, below it less
# 0.75: on the shipped model (36 prompts, 30 steps, speedup 2), power 0.5 gave fast prompts 1.34x the computed steps
# of still ones at -0.06 dB against the plain default at the same compute, 0.75 gave 1.51x at +0.01 dB
SCALE_FREE_MOTION_POWER = 0.75
MOTION_FACTOR_BOUNDS = (0.25, 4.0)


def max_rate(num_steps: int | None) -> int:
    """The longest stride the calibration-free rule takes: a fifth of the steps (the authors' 30-step codebook
    reaches 6), at least 2; 8 where the step count is unknown."""
    return max(2, num_steps // 5) if num_steps else 8


def budget_rate(relative_distance: float, step: int, computed: int, num_steps: int | None, speedup: float) -> int:
    """The calibration-free rule: after computed `step` (the `computed`-th so far), with the probe's distance
    `relative_distance` times the generation's first one, how many steps until the next computed one, so that about
    num_steps / speedup are computed in all, more where the distance is larger (the module docstring says why
    speedup * c / sqrt(distance)). A non-finite distance gives 1 (compute the next step)."""
    if not math.isfinite(relative_distance) or relative_distance < 0:
        return 1
    nudge = 1.0
    if num_steps is not None:
        remaining, budget = num_steps - step, num_steps / speedup - computed
        needed = remaining / budget if budget > 0 else float(max_rate(num_steps))
        nudge = (needed / speedup) ** BUDGET_FEEDBACK
    stride = speedup * BUDGET_SHAPE * nudge / math.sqrt(max(relative_distance, 1e-12))
    return int(min(max(round(stride), 1), max_rate(num_steps)))


def most_reachable(num_steps: int) -> float:
    """The largest compute speed-up the calibration-free rule can reach over `num_steps`: steps 1, 2, N-1 and N
    computed, the rest at most `max_rate` apart."""
    free = max(0, num_steps - 4)
    return num_steps / (min(num_steps, 4) + math.ceil(free / max_rate(num_steps)))


def motion_factor(motion: float) -> float:
    """The calibration-free MoReg's factor on the compute budget for a scale-free motion reading: (motion / 0.5
    tokens per frame) ** 0.75, within [1/4, 4]. The budget of computed steps is multiplied by it."""
    low, high = MOTION_FACTOR_BOUNDS
    if not math.isfinite(motion):
        return high
    return min(max((motion / SCALE_FREE_MOTION_REFERENCE) ** SCALE_FREE_MOTION_POWER, low), high)


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
    scale_free: bool = False  # `motion` holds scale_free_motion_sums (calibration-free MoReg), else motion_sums


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
    distance: float | None = None  # normalized (and MoReg-scaled) distance used for the lookup; without a codebook,
    #                                the per-step distance relative to the generation's first one
    raw_distance: float | None = None  # relative L1 before dividing by the gap and before MoReg
    motion: float | None = None  # MoReg score m (after the (norm, power, divisor) mapping); without a codebook, the
    #                              scale-free motion (about tokens per frame)
    motion_factor: float | None = None  # m + |g|, the factor the distance was multiplied by; without a codebook, the
    #                                     factor on the compute budget (`motion_factor`)
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
    prev_motion: float | None = None  # MoReg's last m (paper mode starts from 1, as the authors; else from the first)
    reference: float | None = None  # without a codebook: the generation's first per-step distance
    motion_factors: list[float] = field(default_factory=list)  # without a codebook: MoReg's factors on the budget
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
        scale_free = config.calibration_free
        if config.moreg and frames is not None and self._in_moreg_window(step):
            strides = config.moreg_strides
            if self.motion_sums_of is not None:
                motion = self.motion_sums_of(probe, frames, strides, scale_free=scale_free)
            else:
                motion = (scale_free_motion_sums if scale_free else motion_sums)(probe, strides)
            if not motion:
                self.note(f"MoReg: the probe has too few frames for strides {config.moreg_strides}; m = 1")
        return ProbeSums(change, base, motion, moreg=config.moreg and frames is not None, scale_free=scale_free)

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
        """The ratios of `sums`, MoReg's factor and the rate after computed `step`: looked up in the codebook, or,
        without one, from the compute budget (`_decide_without_codebook`)."""
        config = self.config
        record = StepRecord(step=step)
        if not sums.first:
            gap = self.rate if config.paper_mode else step - self.prev_compute
            raw = sums.change / sums.base
            motion = None
            if sums.motion:
                motion = (_scale_free_motion_of if sums.scale_free else _motion_of)(sums.motion)
            # One device sync for everything this step needs on the host.
            values = torch.stack([raw, motion if motion is not None else raw]).tolist()
            record.raw_distance = values[0]
            distance = values[0] / gap
            if config.calibration_free:
                self._decide_without_codebook(step, record, distance, values[1] if motion is not None else None)
            else:
                if sums.moreg:
                    # As the authors: m = 1 outside the window, but the gradient against the last m still applies.
                    m = 1.0 if motion is None else _moreg_map(values[1], config)
                    if motion is not None:
                        self._check_moreg_scale(values[1])
                    # the first m has no gradient, except in paper mode, where the last m starts at 1 (a first
                    # reading far from 1 then weighs ten times its gap: the authors' factor at their window's start)
                    previous = self.prev_motion if self.prev_motion is not None else (1.0 if config.paper_mode else m)
                    gradient = config.moreg_gradient_scale * (m - previous) / gap
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

    def _decide_without_codebook(self, step: int, record: StepRecord, distance: float, motion: float | None) -> None:
        """The calibration-free rate (module docstring): the distance relative to the generation's first, the
        budget of num_steps / speedup computed steps, moved by MoReg's factor on the video's motion so far."""
        if self.reference is None and math.isfinite(distance) and distance > 0:
            self.reference = distance  # (a first distance of 0 or garbage waits for a usable one)
        relative = distance / self.reference if self.reference is not None else 1.0
        if motion is not None and math.isnan(motion):  # a probe with NaN in it: nothing to read, nothing recorded
            self.note(f"MoReg: the motion at step {step} is not a number (a non-finite probe); left out")
        elif motion is not None:
            record.motion, record.motion_factor = motion, motion_factor(motion)
            self.motion_factors.append(record.motion_factor)
        speedup = self.config.speedup
        if self.num_steps is not None:  # (said once: note() keeps one copy)
            reachable = most_reachable(self.num_steps)
            if speedup > reachable * 1.05:
                self.note(f"speedup={speedup:g} is beyond what {self.num_steps} steps allow (about {reachable:.2f}x: "
                          f"the first two and last two steps are always computed, and at most {max_rate(self.num_steps)} "
                          "steps apart); aiming at that instead", log=True)
        if self.motion_factors:  # the video's budget: more computed steps the more it moves
            speedup = max(1.0, speedup / (sum(self.motion_factors) / len(self.motion_factors)))
        record.distance = relative
        computed = len(self.records) + 1  # this step included
        self.rate = budget_rate(relative, step, computed, self.num_steps, speedup)

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
        motion more than 2.5 times away from moreg_norm is said in the stats and logged, unless the codebook never
        skips a step. Content moves the reading less than that (on the embedded model, still and fast prompts
        differ by 1.6 times at step 3), so a still clip under a calibrated norm is not taken for a misfit.
        Decisions are not changed."""
        self.raw_motion.append(raw)
        if len(self.raw_motion) != 3 or max(self.config.codebook.values()) == 1:
            return  # (a codebook that never skips: MoReg can change nothing)
        median = sorted(self.raw_motion)[1]
        if not 1 / MOREG_MISFIT <= median / self.config.moreg_norm <= MOREG_MISFIT:
            factor = _moreg_map(median, self.config)
            effect = "removes compute instead of spending it on motion" if factor < 1 else "computes nearly every step"
            self.note(
                f"MoReg's normalisation does not fit this model: its probe motion is about {median:.3g}, against "
                f"moreg_norm={self.config.moreg_norm:g}, so the motion factor is about {factor:.2g} and MoReg "
                f"{effect}. Calibrate it for this model on prompts with motion (adacache calibrate --moreg sets "
                "moreg_norm to the median over its prompts), or use AdaCache without a codebook, whose MoReg needs "
                "no normalisation"
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
