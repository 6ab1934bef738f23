"""`adacache calibrate`: a codebook for this model and step count, from a few prompts.

1. Run the calibration prompts uncached, recording the probe distance at every step (AdaCache with a rate-1
   codebook: bit-identical to the uncached model, and its stats hold each step's distance). These runs are also
   the reference videos.
2. Derive the codebook's shape from the pooled distances: rates R, R-1, ..., 2 take thresholds at the 1/R, 2/R,
   ..., (R-1)/R quantiles, and larger distances rate 1, as the authors' codebooks do (low change -> long reuse).
3. Scale all thresholds by one factor, found by bisection on real cached runs of the calibration prompts, so that
   the mean compute speed-up (steps / computed steps) or the mean PSNR against step 1's videos meets the target.
   Both are deterministic: the bisection reads no clock, so it gives the same codebook on a busy machine as on a
   quiet one.

A speed-up target is refused where no generation runs at it: above the fastest derived codebook, and below one
skipped step's speed-up (`least_speedup`: 5 / 4 = 1.25x in compute at 5 steps), where a generation computes every
step or skips one, and a mean over the prompts lands there only by skipping on some and never on others. A
bisection whose closest codebook never skips is refused too, never written.

A wall-clock target becomes a compute target once, before the bisection, through a cost model (`CostModel`):

    wall speed-up = steps / (computed + c * skipped)

where c is the time of a skipped denoising step as a fraction of a computed one. c is measured from many samples
of whole denoising steps, taken from cached generations of the first calibration video with a constant rate-2
codebook (computed, skipped, computed, skipped, ...: the two kinds interleaved, so a machine that slows down
slows both), on the same inputs every time, and taken as the ratio of the two kinds' medians (a step that a
busy machine stretched tenfold moves a median by one place).

Why whole steps, timed from the start of one step's first transformer call to the start of the next, rather than
the transformer call alone: the wall-clock speed-up `adacache bench` reports is the denoising loop's, and a
skipped step still runs everything outside the cached blocks: the transformer's embedders and final layer, the
CFG combination, the scheduler and the pipeline's own glue. A whole step holds all of it, for any pipeline (CFG
split over two calls, two experts, no cache_context), with no copy of its inputs. The model leaves out one thing:
a computed step with AdaCache also computes the probe distance and keeps the residual, a little more than the
uncached step it is compared against, so the prediction is slightly optimistic (a few percent on the embedded
model). Finally one timed check (cached and uncached runs of one video, interleaved, medians) is compared with the
model's prediction; a disagreement of more than 15% is logged as a warning (the machine was probably busy).

Several targets (`Calibrator.calibrate_many`, `adacache calibrate --speedup 1.5 2 2.5`) share what does not
depend on the target: the reference videos, the distance curves, MoReg's normalisation and the cost model. Each
target keeps its own codebook shape (its longest reuse follows its goal) and its own bisection, but a codebook one
bisection measured is read back, not generated again, when another reaches it; so each target gets the codebook a
run for it alone would give, and targets sharing a shape share at least the first step (scale 1).

The config saved carries "_about": what it was calibrated on, the cost model's samples and the check.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import numbers
import re
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from ..config import AdaCacheConfig
from ..hooks import transformers_of, apply_adacache, get_stats, remove_adacache
from ..pipelines import first_video
from .metrics import TransformerMeter, as_video, psnr

logger = logging.getLogger(__name__)

PSNR_CAP = 100.0  # identical videos (infinite PSNR) count as this, as in bench reports
WALL_CHECK_TOLERANCE = 0.15  # a timed check further than this from the cost model's prediction is warned about
SCALE_RANGE = 30.0  # the bisection searches threshold scales in [1/30, 30]
_EVERY_OTHER_STEP = {1e9: 2}  # every distance is below the threshold: rate 2, computed and skipped steps alternate


@dataclass
class Run:
    video: np.ndarray
    seconds: float
    computed: int
    steps: int


@dataclass
class Calibration:
    config: AdaCacheConfig
    about: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class CostModel:
    """Wall time of denoising steps with AdaCache, from samples (seconds) of whole computed and skipped steps.

    `skip_cost` (c) = median(skipped) / median(computed); a generation computing `computed` of `steps` steps then
    runs `steps / (computed + c * (steps - computed))` times as fast as the uncached one."""

    computed: tuple[float, ...]
    skipped: tuple[float, ...]
    min_samples: int = 3  # fewer samples of either kind is no measurement

    def __post_init__(self) -> None:
        for name in ("computed", "skipped"):
            samples = getattr(self, name)
            if len(samples) < self.min_samples:
                raise ValueError(f"the cost model needs at least {self.min_samples} samples of a {name} step, "
                                 f"got {len(samples)}")
            if not all(isinstance(s, numbers.Real) and math.isfinite(s) and s >= 0 for s in samples):
                raise ValueError(f"the {name} step times must be finite, non-negative seconds, got {samples}")
        if statistics.median(self.computed) <= 0:
            raise ValueError("a computed step measured no time; the clock is too coarse for this model")

    @property
    def skip_cost(self) -> float:
        return statistics.median(self.skipped) / statistics.median(self.computed)

    def wall_speedup(self, steps: int, computed: float) -> float:
        """The predicted wall-clock speed-up of a generation that computes `computed` of `steps` steps."""
        if not 0 < computed <= steps:
            raise ValueError(f"computed steps must be in (0, {steps}], got {computed}")
        return steps / (computed + self.skip_cost * (steps - computed))

    def compute_goal(self, wall: float, steps: int) -> float:
        """The compute speed-up (steps / computed) whose predicted wall-clock speed-up is `wall`."""
        c = self.skip_cost
        if c >= 1:
            raise ValueError(f"a skipped step measured as slow as a computed one (c = {c:.3f}): skipping saves no "
                             "wall-clock time on this machine; calibrate for compute (--compute) instead")
        computed = (steps / wall - c * steps) / (1 - c)
        if computed <= 0:
            raise ValueError(f"a wall-clock speed-up of {wall:g}x is out of reach: a skipped step costs {c:.3f} of a "
                             f"computed one, so even skipping every step gives at most {1 / c if c else math.inf:.2f}x")
        return steps / computed

    def summary(self) -> dict[str, Any]:
        """What `_about` records: c, and per kind the median, the spread and the number of samples."""
        def describe(samples: tuple[float, ...]) -> dict[str, Any]:
            q25, median, q75 = (float(v) for v in np.quantile(samples, [0.25, 0.5, 0.75]))
            return {"median_seconds": median, "q25_seconds": q25, "q75_seconds": q75,
                    "spread": (q75 - q25) / median if median > 0 else None,  # interquartile range / median
                    "min_seconds": float(min(samples)), "max_seconds": float(max(samples)), "samples": len(samples)}

        return {"skip_cost": self.skip_cost, "statistic": "median(skipped) / median(computed), whole denoising steps",
                "computed": describe(self.computed), "skipped": describe(self.skipped)}


def fewest_computed(steps: int, rate: int) -> int:
    """The computed steps of a generation whose every codebook lookup gives `rate`: steps 1 and 2 (the first has
    no distance to look up), then one in `rate`, and the last two (always computed)."""
    count, previous, current = 0, 0, 1
    for step in range(1, steps + 1):
        if step == 1 or step >= steps - 1 or step >= previous + current:
            count, previous, current = count + 1, step, (1 if step == 1 else rate)
    return count


def least_speedup(steps: int, skip_cost: float = 0.0) -> float:
    """The smallest speed-up above 1 a generation can have at `steps` steps: one step skipped, a skipped step
    costing `skip_cost` of a computed one (0: the compute speed-up, steps / (steps - 1)). Between 1 and this, a
    generation computes every step or skips one; a codebook whose mean over the prompts lands there skips on some
    prompts and never on others."""
    return steps / (steps - 1 + skip_cost)


def rate_cap(steps: int) -> int:
    """The longest reuse any derived codebook allows at `steps` steps: every third step at most."""
    return max(2, steps // 3)


def _now(cuda: bool) -> float:
    """The clock every calibration timing reads (after the GPU's queued work, on CUDA)."""
    if cuda:
        torch.cuda.synchronize()
    return time.perf_counter()


def _on_cuda(models: list[torch.nn.Module]) -> bool:
    return any(p.is_cuda for m in models for p in m.parameters())


class _StepClock:
    """Forward hooks on a pipeline's transformers noting when each call starts: the time of denoising step j is
    from the start of its first call to the start of step j+1's first call (the scheduler, the CFG combination and
    the pipeline's glue included). The last step has no next start and is not timed."""

    def __init__(self, models: list[torch.nn.Module]) -> None:
        self.models, self.starts, self._handles = models, [], []
        self._cuda = _on_cuda(models)

    def __enter__(self) -> "_StepClock":
        for model in self.models:
            self._handles.append(model.register_forward_pre_hook(lambda *_: self.starts.append(_now(self._cuda))))
        return self

    def __exit__(self, *exc: Any) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def split(self, stats: list[Any], steps: int) -> tuple[list[float], list[float]]:
        """(seconds of each computed step, seconds of each skipped step), from AdaCache's stats of the generation.
        A step that one CFG branch computed and another skipped is left out."""
        calls = len(self.starts)
        if calls == 0 or calls % steps:
            raise RuntimeError(f"the pipeline made {calls} transformer calls in {steps} steps; the cost model needs "
                               "the same number of calls every step")
        starts = self.starts[:: calls // steps]
        computed = {s for entry in stats for s in entry.computed_steps}
        skipped = {s for entry in stats for s in entry.skipped_steps} - computed
        times: tuple[list[float], list[float]] = ([], [])
        for step, (start, end) in enumerate(zip(starts, starts[1:]), start=1):
            if step in computed or step in skipped:
                times[step in skipped].append(end - start)
        return times


def max_rate(steps: int) -> int:
    """The longest reuse a derived codebook allows: 6 at 30 steps, as the authors' fast codebook; 12 from 60."""
    return min(12, max(2, round(steps / 5)))


def derive_codebook(distances: list[float], rate: int, scale: float = 1.0) -> dict[float, int]:
    """Thresholds at quantiles of the distances (see the module docstring), times `scale`."""
    values = np.asarray([d for d in distances if d is not None and math.isfinite(d) and d > 0], np.float64)
    if values.size == 0:
        raise ValueError("no probe distances were recorded; is the model's probe block called every step?")
    levels = [k / rate for k in range(1, rate)]
    quantiles = np.quantile(values, levels)
    codebook: dict[float, int] = {}
    for q, r in zip(quantiles, range(rate, 1, -1)):
        threshold = float(q) * scale
        if codebook and threshold <= max(codebook):
            threshold = max(codebook) * (1 + 1e-6)  # ties in the distances: keep thresholds strictly ascending
        codebook[threshold] = r
    codebook[max(max(codebook) * 10, float(values.max()) * scale * 10, 1.0)] = 1
    return codebook


class Calibrator:
    """Generates with a pipeline at fixed steps and guidance, and calibrates a codebook for a target."""

    def __init__(self, pipe: Any, prompts: list[str], *, seeds: list[int] = (0,), steps: int = 30,
                 guidance: float = 4.0, base: AdaCacheConfig | None = None, call: dict | None = None,
                 progress: Callable[[str], None] | None = None) -> None:
        if not prompts:
            raise ValueError("calibration needs at least one prompt")
        seeds = list(seeds)
        if not seeds or any(not _is_int(s) or s < 0 for s in seeds):
            raise ValueError(f"calibration needs one or more non-negative integer seeds, got {seeds}")
        if not _is_int(steps) or steps < 1:
            raise ValueError(f"steps must be a positive integer, got {steps!r}")
        self.pipe, self.prompts, self.seeds = pipe, list(prompts), seeds
        self.steps, self.guidance, self.call = steps, guidance, dict(call or {})
        self.base = base or AdaCacheConfig()
        self.say = progress or (lambda message: None)
        self.cost_model: CostModel | None = None  # set by calibrate for a wall-clock target
        self._held_out: dict[tuple[str, ...], tuple[Calibrator, list[Run]]] = {}  # check's reference videos
        pipe.set_progress_bar_config(disable=True)

    def generate(self, config: AdaCacheConfig | None, prompt: str, seed: int) -> Run:
        if config is not None:
            apply_adacache(self.pipe, config)
        try:
            with TransformerMeter(transformers_of(self.pipe)) as meter:  # the denoising loop's time, as bench measures
                output = self.pipe(prompt, num_inference_steps=self.steps, guidance_scale=self.guidance,
                                   generator=torch.Generator().manual_seed(seed), **self.call)
            seconds = meter.seconds
            stats = get_stats(self.pipe) if config is not None else []
        finally:
            if config is not None:
                remove_adacache(self.pipe)
        computed = max((len(s.computed_steps) for s in stats), default=self.steps)
        self._last_stats = stats
        return Run(as_video(first_video(output)), seconds, computed, self.steps)

    def references(self) -> list[Run]:
        """The uncached videos and times of every calibration video, after one untimed warm-up generation (the
        first generation in a process carries one-time costs that would flatter every speed-up)."""
        self.generate(None, self.prompts[0], self.seeds[0])
        return [self.generate(None, prompt, seed) for prompt in self.prompts for seed in self.seeds]

    def moreg_norm(self) -> float | None:
        """MoReg's normalisation for this model: the median raw motion of the probe over the calibration videos
        and MoReg's steps, so that a video moving as much as the median one gets the factor 1, one moving more a
        larger factor (more computed steps) and one moving less a smaller one. The authors' 0.385 is this
        number for Open-Sora's latents; it does not carry over to other models and resolutions."""
        recorder = dataclasses.replace(self.base, codebook={1.0: 1}, moreg=True)
        scores = [m for stats in self._rate_one(recorder) for s in stats for m in s.motion if m is not None and m > 0]
        if not scores:
            return None
        # undo m = (raw / norm) ** power / divisor
        raw = [recorder.moreg_norm * (m * recorder.moreg_divisor) ** (1 / recorder.moreg_power) for m in scores]
        return float(np.median(raw))

    def _rate_one(self, recorder: AdaCacheConfig) -> list[list[Any]]:
        """AdaCache's stats of every calibration video under a rate-1 codebook (every step computed, so the videos
        are the uncached ones) that records the probe's distances and motion."""
        runs = []
        for prompt in self.prompts:
            for seed in self.seeds:
                self.generate(recorder, prompt, seed)
                runs.append(self._last_stats)
        return runs

    def curves(self) -> tuple[list[list[float]], list[Run]]:
        """Per calibration video, the probe distance at every step (from AdaCache with a rate-1 codebook, which
        computes what the uncached model does; with MoReg's factor applied when the base config has MoReg), and
        the uncached reference runs."""
        recorder = dataclasses.replace(self.base, codebook={1.0: 1})
        curves = [[d for s in stats for d in s.distances if d is not None] for stats in self._rate_one(recorder)]
        self.say(f"recorded {len(curves)} distance curves over {self.steps} steps")
        return curves, self.references()

    def measure_costs(self, samples: int = 16) -> CostModel:
        """The cost model of this pipeline at these settings: whole denoising steps timed in cached generations of
        the first calibration video with a rate-2 codebook (computed and skipped steps alternate), repeated until
        there are `samples` skipped steps (two generations at least). The base config's probe and MoReg are kept,
        so computed steps cost what they will."""
        skippable = self.steps - fewest_computed(self.steps, 2)
        if skippable < 1:
            raise ValueError(f"at {self.steps} steps AdaCache computes every step (the first two and the last two "
                             "always are): there is no skipped step to time")
        config = dataclasses.replace(self.base, codebook=dict(_EVERY_OTHER_STEP))
        prompt, seed = self.prompts[0], self.seeds[0]
        computed: list[float] = []
        skipped: list[float] = []
        for _ in range(max(2, math.ceil(samples / skippable))):
            with _StepClock(transformers_of(self.pipe)) as clock:
                self.generate(config, prompt, seed)
            more_computed, more_skipped = clock.split(self._last_stats, self.steps)
            computed += more_computed
            skipped += more_skipped
        return CostModel(tuple(computed), tuple(skipped))

    def check_wall(self, config: AdaCacheConfig, cost: CostModel, repeats: int = 3) -> dict[str, Any]:
        """Time the first calibration video uncached and with `config`, `repeats` times each, interleaved (the
        order alternating), and compare the ratio of their medians with the cost model's prediction. A
        disagreement beyond WALL_CHECK_TOLERANCE is logged as a warning."""
        prompt, seed = self.prompts[0], self.seeds[0]
        seconds: dict[bool, list[float]] = {False: [], True: []}
        computed = self.steps
        for i in range(repeats):
            for cached in ((False, True) if i % 2 == 0 else (True, False)):
                run = self.generate(config if cached else None, prompt, seed)
                seconds[cached].append(run.seconds)
                computed = run.computed if cached else computed
        uncached_median, cached_median = statistics.median(seconds[False]), statistics.median(seconds[True])
        measured = uncached_median / cached_median if cached_median > 0 else None
        predicted = cost.wall_speedup(self.steps, computed)
        difference = measured / predicted - 1 if measured is not None else None
        agrees = difference is not None and abs(difference) <= WALL_CHECK_TOLERANCE
        if not agrees:
            logger.warning(
                "the timed check (%s wall clock: median of %d uncached and %d cached runs of one video, interleaved) "
                "disagrees with the cost model's %.2fx by more than %.0f%%: the machine was probably busy while "
                "timing. The codebook rests on the measured cost of a skipped step (%.3f of a computed one); "
                "calibrate again on a quiet machine if the wall-clock target matters",
                f"{measured:.2f}x" if measured is not None else "no measurable", repeats, repeats, predicted,
                100 * WALL_CHECK_TOLERANCE, cost.skip_cost)
        return {"prompt": prompt, "seed": seed, "repeats": repeats, "computed_steps": computed,
                "uncached_seconds": seconds[False], "cached_seconds": seconds[True],
                "measured_wall_speedup": measured, "predicted_wall_speedup": predicted,
                "relative_difference": difference, "agrees": agrees, "tolerance": WALL_CHECK_TOLERANCE}

    def measure(self, config: AdaCacheConfig, references: list[Run]) -> dict[str, float]:
        """Mean compute speed-up, PSNR and computed steps of `config` on the calibration videos (deterministic),
        and their wall-clock speed-up: as timed once per video (noisy; for information only) and, when a cost
        model is known, as predicted from the computed steps."""
        runs = [self.generate(config, p, s) for p in self.prompts for s in self.seeds]
        measured = {
            "compute_speedup": statistics.fmean(r.steps / r.computed for r in runs),
            "wall_speedup": statistics.fmean(ref.seconds / run.seconds if run.seconds > 0 else math.nan
                                             for ref, run in zip(references, runs)),
            "psnr": statistics.fmean(min(psnr(ref.video, run.video), PSNR_CAP) for ref, run in zip(references, runs)),
            "computed_steps": statistics.fmean(r.computed for r in runs),
        }
        if self.cost_model is not None:
            measured["predicted_wall_speedup"] = statistics.fmean(
                self.cost_model.wall_speedup(r.steps, r.computed) for r in runs)
        return measured

    def calibrate(self, *, speedup: float | None = None, target_psnr: float | None = None,
                  wall_clock: bool = True, iterations: int = 9, cost: CostModel | None = None,
                  check_repeats: int = 3) -> Calibration:
        """A config reaching `speedup` (mean over the calibration videos; wall clock by way of the cost model, or
        compute when `wall_clock` is False) or the fastest one keeping `target_psnr`. `cost` is a cost model
        measured before (default: measured here, for a wall-clock target); `check_repeats` the timed runs of each
        kind in the final check (0: no check). Targets no derived codebook can reach are refused before any
        generation where arithmetic tells, else before the bisection."""
        check_target(self.steps, speedup, target_psnr, iterations, skip_cost=None if wall_clock else 0.0)
        return self.calibrate_many(speedups=() if speedup is None else (speedup,),
                                   psnrs=() if target_psnr is None else (target_psnr,), wall_clock=wall_clock,
                                   iterations=iterations, cost=cost, check_repeats=check_repeats)[0]

    def calibrate_many(self, *, speedups: Sequence[float] = (), psnrs: Sequence[float] = (), wall_clock: bool = True,
                       iterations: int = 9, cost: CostModel | None = None, check_repeats: int = 3,
                       done: Callable[[Calibration], None] | None = None) -> list[Calibration]:
        """One config per target, in the order given, as `calibrate` makes each; the targets are all speed-ups or
        all PSNRs. What does not depend on the target is done once: MoReg's normalisation, the distance curves, the
        reference videos and the cost model. A codebook measured for one target is not generated again for another
        (the measurements are deterministic), so each result is the one `calibrate` gives for its target alone.
        Every target is checked before the first bisection; `done` is called with each result as it is made (a
        long run can save what it finished)."""
        speedups, psnrs = list(speedups), list(psnrs)
        if bool(speedups) == bool(psnrs):
            raise ValueError("give targets of one kind: speed-ups (e.g. speedups=[1.5, 2.0]) or PSNRs in dB (e.g. "
                             "psnrs=[30, 35])")
        targets = speedups or psnrs
        for target in targets:
            check_target(self.steps, target if speedups else None, target if psnrs else None, iterations,
                         skip_cost=None if wall_clock else 0.0)
        repeated = sorted({target for target in targets if targets.count(target) > 1})
        if repeated:
            raise ValueError(f"the target {repeated[0]:g} is given more than once; give each target once")
        if not _is_int(check_repeats) or check_repeats < 0:
            raise ValueError(f"check_repeats must be a non-negative integer, got {check_repeats!r}")
        wall = bool(speedups) and wall_clock
        goals: list[float | None] = list(speedups) if speedups else [None] * len(psnrs)
        self.cost_model = None
        if wall:  # first: a target the measured cost puts out of reach is refused before the longer runs
            self.cost_model = cost or self.measure_costs()
            self._say_cost(self.cost_model)
            goals = [self._wall_goal(s, self.cost_model) for s in speedups]  # once: from here on, no clock decides
        norm = None
        if self.base.moreg:
            norm = self.moreg_norm()
            if norm is None:
                logger.warning("MoReg recorded no motion (no frame layout for this model?); moreg_norm left as is")
            else:
                self.base = dataclasses.replace(self.base, moreg_norm=norm)
                self.say(f"MoReg normalisation: median raw motion {norm:.4g} (the authors' Open-Sora value: 0.385)")
        curves, references = self.curves()
        pooled = [d for curve in curves for d in curve]
        memo = _Measurements(self, references)
        # threshold scales from 1/30 (nearly every step computed) to 30 (nearly every distance under the first)
        lo, hi = math.log(1 / SCALE_RANGE), math.log(SCALE_RANGE)
        conservative: tuple[float, dict[str, float]] | None = None
        if psnrs:  # every PSNR target's codebook has the same shape (rate): one measurement checks them all
            conservative = self._conservative_end(self._codebooks(pooled, None), lo + (hi - lo) / 2**iterations,
                                                  max(psnrs), memo)
        # what the distances were: the same for every target
        quantiles = {str(q): float(np.quantile(pooled, q)) for q in (0.1, 0.25, 0.5, 0.75, 0.9)}
        mean_curve = [statistics.fmean(c[i] for c in curves if len(c) > i) for i in range(max(len(c) for c in curves))]
        results = []
        for target, goal in zip(targets, goals):
            if len(targets) > 1:
                self.say(f"target {_target_label(target, bool(speedups), wall_clock)}"
                         + (f" ({goal:.3f}x compute)" if wall else ""))
            config_for = self._codebooks(pooled, goal)
            scale, measured = self._bisect(config_for, goal, None if speedups else target, iterations, conservative,
                                           memo)
            config = config_for(scale)
            about = {
                "calibrated_by": "adacache calibrate", "prompts": self.prompts, "seeds": self.seeds,
                "steps": self.steps, "guidance": self.guidance,
                "target": {"speedup": target if speedups else None, "psnr": None if speedups else target,
                           "clock": "wall" if wall_clock else "compute"},
                "max_rate": max(config.codebook.values()), "scale": scale, "reached": measured, "moreg_norm": norm,
                "skip_cost": self.cost_model.skip_cost if self.cost_model else None,
                "distance_quantiles": dict(quantiles), "mean_distance_curve": list(mean_curve),
            }
            if len(targets) > 1:
                about["calibrated_with"] = [t for t in targets if t != target]  # the run's other targets
            if self.cost_model is not None:
                about["compute_goal"] = goal
                about["cost_model"] = self.cost_model.summary()
                if check_repeats:
                    about["wall_check"] = check = self.check_wall(config, self.cost_model, check_repeats)
                    self.say(f"timed check: {_format(check['measured_wall_speedup'])} wall clock measured, "
                             f"{check['predicted_wall_speedup']:.2f}x predicted")
            results.append(Calibration(config, about))
            if done is not None:
                done(results[-1])
        return results

    def _codebooks(self, pooled: list[float], goal: float | None) -> Callable[[float], AdaCacheConfig]:
        """The base config with the codebook derived at a threshold scale, for a compute goal (None: a PSNR
        target). Its longest reuse: long enough to reach the goal with room to spare, every third step at most."""
        rate = min(max(max_rate(self.steps), math.ceil(2 * (goal or 1))), rate_cap(self.steps))
        return lambda scale: dataclasses.replace(self.base, codebook=derive_codebook(pooled, rate, scale))

    def _bisect(self, config_for: Callable[[float], AdaCacheConfig], goal: float | None, target_psnr: float | None,
                iterations: int, conservative: tuple[float, dict[str, float]] | None,
                memo: "_Measurements") -> tuple[float, dict[str, float]]:
        """(scale, measured) of the codebook closest to the compute `goal`, or of the fastest one keeping
        `target_psnr` (`conservative`: the most conservative end, measured and found to keep it)."""
        lo, hi = math.log(1 / SCALE_RANGE), math.log(SCALE_RANGE)
        best = conservative if target_psnr is not None else None
        reached_speedups = []
        for _ in range(iterations):
            mid = (lo + hi) / 2
            measured = memo.measure(config_for(math.exp(mid)), f"scale {math.exp(mid):.3g}")
            reached_speedups.append(measured["compute_speedup"])
            if goal is not None:
                reached = measured["compute_speedup"] >= goal
                if best is None or abs(measured["compute_speedup"] - goal) < abs(best[1]["compute_speedup"] - goal):
                    best = (mid, measured)
            else:
                reached = measured["psnr"] < target_psnr  # too fast: scale down
                if measured["psnr"] >= target_psnr and (best is None or mid > best[0]):
                    best = (mid, measured)
            if reached:
                hi = mid
            else:
                lo = mid
        if best is None:  # not reached: the conservative end was checked first
            raise ValueError(f"no codebook keeps PSNR >= {target_psnr} dB on the calibration prompts; lower the target")
        if goal is not None and best[1]["computed_steps"] >= self.steps:  # a codebook that never skips: no result
            raise ValueError(
                f"no codebook for {goal:.2f}x compute at {self.steps} steps: the closest one the search measured "
                f"computes every step on every calibration video (the {len(reached_speedups)} measured reached "
                f"{min(reached_speedups):.2f}x to {max(reached_speedups):.2f}x), so it would never skip; choose a "
                "target nearer to one of those, more --iterations, or more calibration prompts")
        if goal is not None and best[1]["compute_speedup"] < 0.95 * goal:
            logger.warning("the closest codebook found computes %.1f of %d steps (%.2fx compute), short of the %.2fx "
                           "compute the target needs; more --iterations may get closer", best[1]["computed_steps"],
                           self.steps, best[1]["compute_speedup"], goal)
        return math.exp(best[0]), best[1]

    def _say_cost(self, cost: CostModel) -> None:
        summary = cost.summary()
        self.say(f"cost model: a skipped step costs {cost.skip_cost:.3f} of a computed one (medians of "
                 f"{summary['skipped']['samples']} skipped and {summary['computed']['samples']} computed steps, "
                 "spreads "
                 f"{_format(summary['skipped']['spread'], '.0%')} and {_format(summary['computed']['spread'], '.0%')})")

    def _wall_goal(self, speedup: float, cost: CostModel) -> float:
        """The compute target a wall-clock target stands for, checked against the fastest derived codebook."""
        c = cost.skip_cost
        fewest = fewest_computed(self.steps, rate_cap(self.steps))
        fastest = cost.wall_speedup(self.steps, fewest)
        if speedup > fastest:
            raise ValueError(
                f"a wall-clock speed-up of {speedup:g}x is out of reach at {self.steps} steps: a skipped step costs "
                f"{c:.3f} of a computed one (measured here), and the fastest derived codebook computes {fewest} steps, "
                f"so at most {fastest:.2f}x; choose a target in (1, {fastest:.2f}], or calibrate for compute "
                "(--compute)")
        if c < 1:
            check_target(self.steps, speedup, None, 1, skip_cost=c, clock="wall-clock")
        goal = cost.compute_goal(speedup, self.steps)
        self.say(f"{speedup:g}x wall clock = {goal:.3f}x compute "
                 f"({self.steps / goal:.2f} of {self.steps} steps computed)")
        return goal

    def _conservative_end(self, config_for: Callable[[float], AdaCacheConfig], end: float, target_psnr: float,
                          memo: "_Measurements") -> tuple[float, dict[str, float]]:
        """Measure the most conservative codebook the bisection can reach first: a PSNR it does not keep is
        refused before the search, with the range that is reachable."""
        measured = memo.measure(config_for(math.exp(end)), f"scale {math.exp(end):.3g} (the most conservative "
                                                            "reachable)")
        if measured["psnr"] < target_psnr:
            raise ValueError(
                f"a PSNR of {target_psnr:g} dB is out of reach: the most conservative codebook the search reaches "
                f"(threshold scale {math.exp(end):.3g}, {measured['computed_steps']:.1f} of {self.steps} steps "
                f"computed) keeps {measured['psnr']:.1f} dB; choose a target up to that, more --iterations (the "
                "search then reaches closer to computing every step), or no cache")
        return end, measured

    def check(self, config: AdaCacheConfig, prompts: list[str]) -> dict[str, float]:
        """The config's speed-up and PSNR on other prompts (held out from calibration). The held-out reference
        videos are generated once per prompt list, however many configs are checked on them."""
        key = tuple(prompts)
        if key not in self._held_out:
            held = Calibrator(self.pipe, list(prompts), seeds=self.seeds, steps=self.steps, guidance=self.guidance,
                              base=self.base, call=self.call)
            self._held_out[key] = (held, held.references())
        held, references = self._held_out[key]
        held.cost_model = self.cost_model
        return held.measure(config, references)


class _Measurements:
    """`Calibrator.measure` for one set of reference videos, each codebook generated once: the measurements are
    deterministic, so a codebook that one target's bisection measured is read back when another target's reaches
    it (the first step, scale 1, is every target's of one rate)."""

    def __init__(self, calibrator: Calibrator, references: list[Run]) -> None:
        self.calibrator, self.references = calibrator, references
        self.measured: dict[tuple[tuple[float, int], ...], dict[str, float]] = {}

    def measure(self, config: AdaCacheConfig, label: str) -> dict[str, float]:
        key = tuple(config.codebook.items())  # the rest of the config is the run's base, the same for every target
        if key in self.measured:
            self.calibrator.say(f"{label}: {_describe(self.measured[key])} (measured before)")
            return dict(self.measured[key])
        measured = self.measured[key] = self.calibrator.measure(config, self.references)
        self.calibrator.say(f"{label}: {_describe(measured)}")
        return dict(measured)


def check_target(steps: int, speedup: Any, target_psnr: Any, iterations: Any, *, skip_cost: float | None = None,
                 clock: str = "compute") -> None:
    """Refuse, before any generation, a target no derived codebook can reach, saying what can be reached.
    `skip_cost`: a skipped step's cost as a fraction of a computed one where known (0 for a compute target; None for
    a wall-clock one before the cost model is measured): a speed-up below one skipped step's (`least_speedup`) is
    then refused too, since a generation either computes every step or skips at least one."""
    if (speedup is None) == (target_psnr is None):
        raise ValueError("give exactly one target: a speed-up (e.g. 2.0) or a PSNR in dB (e.g. 30)")
    if not _is_int(iterations) or iterations < 1:
        raise ValueError(f"iterations must be a positive integer, got {iterations!r}")
    if speedup is not None:
        fewest = fewest_computed(steps, rate_cap(steps))
        fastest = steps / fewest
        if fastest <= 1:
            raise ValueError(f"at {steps} steps AdaCache computes every step (the first two and the last two always "
                             "are): no speed-up is reachable; use more steps")
        if not _is_real(speedup) or not math.isfinite(speedup) or not 1 < speedup <= fastest:
            raise ValueError(
                f"a speed-up target must be a number in (1, {fastest:.2f}] at {steps} steps, got {speedup!r}: a "
                f"derived codebook computes at least one step in {rate_cap(steps)}, and always the first two and the "
                f"last two, so at least {fewest} steps: at most {fastest:.2f}x in compute (less in wall clock)")
        least = least_speedup(steps, skip_cost) if skip_cost is not None else 1.0
        if speedup < least * (1 - 1e-12):
            cost = f"; a skipped step costs {skip_cost:.3f} of a computed one, measured here" if skip_cost else ""
            shown = math.ceil(least * 100 - 1e-9) / 100  # rounded up: a target of what is shown is reachable
            raise ValueError(
                f"a {clock} speed-up of {speedup:g}x is out of reach at {steps} steps: a generation either computes "
                f"all {steps} steps (1.00x) or skips at least one ({least:.3f}x or more{cost}), so a codebook for "
                f"{speedup:g}x would skip on some prompts and never on others; choose a target of at least "
                f"{shown:.2f}, or more steps")
    elif not _is_real(target_psnr) or not math.isfinite(target_psnr) or not 0 < target_psnr < PSNR_CAP:
        raise ValueError(
            f"a PSNR target must be a number of dB in (0, {PSNR_CAP:g}), got {target_psnr!r}: PSNR is counted up to "
            f"{PSNR_CAP:g} dB, which only a video identical to the uncached one reaches (for that, use no cache)")


def config_name(model: str | None, steps: int, target: float, *, psnr: bool = False, compute: bool = False,
                moreg: bool = False, forecast: bool = False) -> str:
    """The file name of one target's config in an output folder: model, steps, target and what else is on, e.g.
    embedded-30-2.50x.json, embedded-30-2.50x-compute-moreg.json, Wan2.1-T2V-1.3B-Diffusers-50-32.0db-forecast.json.
    `model` is a pipeline id or folder (None: the embedded model). Speed-ups show two decimals, PSNRs one (more
    where the target has more), and integer parts are padded to the widest target reachable at the step count, so
    one model's files at one step count sort by target."""
    label = "embedded" if model is None else re.sub(r"[^A-Za-z0-9._-]+", "-", Path(model.rstrip("/\\")).name)
    label = label.strip("-.") or "model"
    if psnr:
        text = _decimals(target, 1, len(str(int(PSNR_CAP) - 1))) + "db"
    else:
        fastest = steps / fewest_computed(steps, rate_cap(steps))
        text = _decimals(target, 2, len(str(int(fastest)))) + "x" + ("-compute" if compute else "")
    return f"{label}-{steps}-{text}{'-forecast' if forecast else ''}{'-moreg' if moreg else ''}.json"


def _decimals(value: float, places: int, width: int) -> str:
    """`value` with at least `places` decimals (up to 6 where it needs them), its integer part zero-padded."""
    text = f"{value:.{places}f}"
    while float(text) != value and places < 6:
        places += 1
        text = f"{value:.{places}f}"
    integer, _, fraction = text.partition(".")
    return integer.zfill(width) + "." + fraction


def _target_label(target: float, speedup: bool, wall_clock: bool) -> str:
    return f"{target:g}x {'wall clock' if wall_clock else 'compute'}" if speedup else f"PSNR {target:g} dB"


def _describe(measured: dict[str, float]) -> str:
    wall = f"wall {_format(measured['wall_speedup'])} timed once"
    if "predicted_wall_speedup" in measured:
        wall += f", {measured['predicted_wall_speedup']:.2f}x by the cost model"
    return (f"{measured['computed_steps']:.1f} computed steps, compute speed-up {measured['compute_speedup']:.2f}x, "
            f"{wall}, PSNR {measured['psnr']:.1f} dB")


def _format(value: float | None, spec: str = ".2f") -> str:
    if value is None or not math.isfinite(value):
        return "n/a"
    return format(value, spec) + ("x" if spec == ".2f" else "")


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_real(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)
