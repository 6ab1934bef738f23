"""`adacache calibrate`: a codebook for this model and step count, from a few prompts.

1. Run the calibration prompts uncached, recording the probe distance at every step (AdaCache with a rate-1
   codebook: bit-identical to the uncached model, and its stats hold each step's distance). These runs are also
   the reference videos.
2. Derive the codebook's shape from the pooled distances: rates R, R-1, ..., 2 take thresholds at the 1/R, 2/R,
   ..., (R-1)/R quantiles, and larger distances rate 1, as the authors' codebooks do (low change -> long reuse).
3. Scale all thresholds by one factor, found by bisection on real cached runs of the calibration prompts, so that
   the mean speed-up (or the mean PSNR against step 1's videos) meets the target.

A wall-clock target is turned into a compute target with the measured cost of a skipped step relative to a
computed one (the skipped step still embeds, decodes, runs the scheduler and the CFG combination). The config
saved carries "_about": what it was calibrated on and what it reached.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import statistics
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch

from ..config import AdaCacheConfig
from ..hooks import _models_of, apply_adacache, get_stats, remove_adacache
from .metrics import TransformerMeter, as_video, psnr

logger = logging.getLogger(__name__)


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
        self.pipe, self.prompts, self.seeds = pipe, list(prompts), list(seeds)
        self.steps, self.guidance, self.call = steps, guidance, dict(call or {})
        self.base = base or AdaCacheConfig()
        self.say = progress or (lambda message: None)
        pipe.set_progress_bar_config(disable=True)

    def generate(self, config: AdaCacheConfig | None, prompt: str, seed: int) -> Run:
        if config is not None:
            apply_adacache(self.pipe, config)
        try:
            with TransformerMeter(_models_of(self.pipe)) as meter:  # the denoising loop's time, as bench measures
                output = self.pipe(prompt, num_inference_steps=self.steps, guidance_scale=self.guidance,
                                   generator=torch.Generator().manual_seed(seed), **self.call)
            seconds = meter.seconds
            stats = get_stats(self.pipe) if config is not None else []
        finally:
            if config is not None:
                remove_adacache(self.pipe)
        frames = output.frames if hasattr(output, "frames") else output[0]
        computed = max((len(s.computed_steps) for s in stats), default=self.steps)
        self._last_stats = stats
        return Run(as_video(frames[0]), seconds, computed, self.steps)

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

    def measure(self, config: AdaCacheConfig, references: list[Run]) -> dict[str, float]:
        runs = [self.generate(config, p, s) for p in self.prompts for s in self.seeds]
        speedups = [r.steps / r.computed for r in runs]
        costs = [_skip_cost(ref, run) for ref, run in zip(references, runs)]
        costs = [c for c in costs if c is not None]
        return {
            "compute_speedup": statistics.fmean(speedups),
            "wall_speedup": statistics.fmean(ref.seconds / run.seconds for ref, run in zip(references, runs)),
            "psnr": statistics.fmean(min(psnr(ref.video, run.video), 100.0) for ref, run in zip(references, runs)),
            "skip_cost": statistics.median(costs) if costs else 0.0,
            "computed_steps": statistics.fmean(r.computed for r in runs),
        }

    def calibrate(self, *, speedup: float | None = None, target_psnr: float | None = None,
                  wall_clock: bool = True, iterations: int = 9) -> Calibration:
        """A config reaching `speedup` (mean over the calibration videos; wall clock by way of the measured cost
        of a skipped step, or compute when `wall_clock` is False) or the fastest one keeping `target_psnr`."""
        if (speedup is None) == (target_psnr is None):
            raise ValueError("give exactly one target: a speed-up (e.g. 2.0) or a PSNR in dB (e.g. 30)")
        if speedup is not None and not 1.0 < speedup <= self.steps / 3:
            raise ValueError(f"a speed-up target must be above 1 and at most {self.steps / 3:.1f} "
                             f"(the first step and the last two are always computed), got {speedup}")
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
        # long enough reuse to reach the target with room to spare, but every third step at most
        rate = max(max_rate(self.steps), math.ceil(2 * (speedup or 1)))
        rate = min(rate, max(2, self.steps // 3))
        config_for = lambda scale: dataclasses.replace(self.base, codebook=derive_codebook(pooled, rate, scale))  # noqa: E731

        cost = 0.0
        goal = speedup
        lo, hi = math.log(1 / 30), math.log(30)  # every step computed .. every distance under the first threshold
        best: tuple[float, dict[str, float]] | None = None
        tried: list[dict[str, float]] = []
        for _ in range(iterations):
            mid = (lo + hi) / 2
            measured = self.measure(config_for(math.exp(mid)), references)
            tried.append({"scale": math.exp(mid), **measured})
            if speedup is not None:
                if wall_clock and measured["skip_cost"]:
                    cost = statistics.median([t["skip_cost"] for t in tried if t["skip_cost"]])
                    goal = _compute_goal(speedup, cost, self.steps)
                reached = measured["compute_speedup"] >= goal
                if best is None or abs(measured["compute_speedup"] - goal) < abs(best[1]["compute_speedup"] - goal):
                    best = (mid, measured)
            else:
                reached = measured["psnr"] < target_psnr  # too fast: scale down
                if measured["psnr"] >= target_psnr and (best is None or mid > best[0]):
                    best = (mid, measured)
            self.say(f"scale {math.exp(mid):.3g}: {measured['computed_steps']:.1f} computed steps, compute speed-up "
                     f"{measured['compute_speedup']:.2f}x, wall {measured['wall_speedup']:.2f}x, "
                     f"PSNR {measured['psnr']:.1f} dB")
            if reached:
                hi = mid
            else:
                lo = mid
        if best is None:
            raise ValueError(f"no codebook keeps PSNR >= {target_psnr} dB on the calibration prompts; lower the target")
        scale, measured = math.exp(best[0]), best[1]
        config = config_for(scale)
        about = {
            "calibrated_by": "adacache calibrate", "prompts": self.prompts, "seeds": self.seeds, "steps": self.steps,
            "guidance": self.guidance, "target": {"speedup": speedup, "psnr": target_psnr,
                                                  "clock": "wall" if wall_clock else "compute"},
            "max_rate": rate, "scale": scale, "skip_cost": cost, "reached": measured, "moreg_norm": norm,
            "distance_quantiles": {str(q): float(np.quantile(pooled, q)) for q in (0.1, 0.25, 0.5, 0.75, 0.9)},
            "mean_distance_curve": [statistics.fmean(c[i] for c in curves if len(c) > i)
                                    for i in range(max(len(c) for c in curves))],
        }
        return Calibration(config, about)

    def check(self, config: AdaCacheConfig, prompts: list[str]) -> dict[str, float]:
        """The config's speed-up and PSNR on other prompts (held out from calibration)."""
        held = Calibrator(self.pipe, prompts, seeds=self.seeds, steps=self.steps, guidance=self.guidance,
                          base=self.base, call=self.call)
        return held.measure(config, held.references())


def _skip_cost(reference: Run, run: Run) -> float | None:
    """The time of a skipped step as a fraction of a computed one, from T = T_step * (computed + cost * skipped)."""
    skipped = run.steps - run.computed
    if skipped <= 0 or reference.seconds <= 0:
        return None
    per_step = reference.seconds / reference.steps
    return max(0.0, (run.seconds / per_step - run.computed) / skipped)


def _compute_goal(wall: float, cost: float, steps: int) -> float:
    """The compute speed-up (steps / computed) that gives `wall` when a skipped step costs `cost` of a computed."""
    cost = min(cost, 0.9)
    computed = (steps / wall - cost * steps) / (1 - cost)
    return steps / max(computed, 1.0)
