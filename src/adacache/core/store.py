"""What a skipped step adds to the cached span's input: the residual store.

A computed step measures the stack residual of the cached span (its output minus its input, per stream: video
tokens, and text tokens for models that carry them through the blocks) and `put`s it; a skipped step asks the
store to `produce` the residual for its own step. Residuals are tuples with one entry per stream (None for a
stream the span does not carry). Two stores:

- `ReuseStore` (the paper's, and the default): the last computed residual, as it is. It keeps one only when a
  skipped step will ask for it (`wants` is False when the schedule computes the next step anyway).
- `ForecastStore`: the last two computed residuals r0, r1 (at steps s0 < s1), extrapolated to the skipped step s,
  first order in the step index with the real gaps, reaching at most `reach` of their interval ahead:
  r(s) = r1 + (r1 - r0) * min((s - s1) / (s1 - s0), reach). With one residual it reuses it. It keeps residuals
  after every computed step (the slope needs the last two), one more tensor per stream than reuse.

  Why the reach: a long skip after two computed steps one step apart would extrapolate a one-step slope five or
  ten steps ahead, and the residual's path is not that straight. On the embedded model (8 prompts, 30 steps, its
  calibrated codebook; `python benchmarks/forecast_reach.py`) plain reuse gave 34.5 dB, an
  unbounded forecast 33.8 dB, and a reach of 0.5 38.1 dB; at 100 steps with the authors' codebook (6.6x), 35.9 dB
  for reuse and 41.0 dB with a reach of 0.5.

`config.store` names the store (`make_store`). A store says what it holds (`holds`, `steps`) and its `nbytes`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Optional

import torch

if TYPE_CHECKING:
    from ..config import AdaCacheConfig

Residuals = tuple[Optional[torch.Tensor], ...]


class ResidualStore:
    """The interface (and the reuse store's behaviour for what a subclass does not change)."""

    name = "reuse"

    def __init__(self) -> None:
        self.kept: list[tuple[int, Residuals]] = []  # (step, residuals), oldest first

    def wants(self, rate: int) -> bool:
        """Whether the residual of a computed step followed by `rate - 1` skipped ones must be measured and kept."""
        return rate > 1

    def put(self, step: int, residuals: Residuals) -> None:
        self.kept = [(step, residuals)]

    def produce(self, step: int) -> Residuals:
        """The residual to add at skipped `step` (after at least one `put`)."""
        if not self.kept:
            raise RuntimeError("AdaCache: a skipped step asked for a residual before any computed step stored one")
        return self.kept[-1][1]

    @property
    def holds(self) -> bool:
        """Whether a skipped step can be produced."""
        return bool(self.kept)

    @property
    def steps(self) -> list[int]:
        """The computed steps whose residuals are held, oldest first."""
        return [step for step, _ in self.kept]

    @property
    def latest(self) -> Residuals | None:
        return self.kept[-1][1] if self.kept else None

    def clear(self) -> None:
        self.kept = []

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for _, residuals in self.kept for t in residuals if t is not None)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(steps={self.steps}, {self.nbytes() / 2**20:.2f} MiB)"


class ReuseStore(ResidualStore):
    """The last computed residual, reused as it is (AdaCache as published)."""


class ForecastStore(ResidualStore):
    """The last two computed residuals, extrapolated linearly in the step index to the skipped step."""

    name = "forecast"

    def __init__(self, reach: float = 0.5) -> None:
        super().__init__()
        self.reach = reach

    def wants(self, rate: int) -> bool:
        return True  # a computed step right after another gives the best slope

    def put(self, step: int, residuals: Residuals) -> None:
        if self.kept and self.kept[-1][0] >= step:  # not after the last: a new run of steps, no slope across it
            self.kept = []
        if self.kept and any((a is None) != (b is None) or (a is not None and a.shape != b.shape)
                             for a, b in zip(self.kept[-1][1], residuals)):
            self.kept = []  # another layout: no slope between the two
        self.kept = [*self.kept[-1:], (step, residuals)]

    def produce(self, step: int) -> Residuals:
        if len(self.kept) < 2:
            return super().produce(step)
        (s0, r0), (s1, r1) = self.kept
        weight = max(0.0, min((step - s1) / (s1 - s0), self.reach))
        if weight == 0:
            return r1  # nothing to extrapolate: r1 exactly (r1 + 0 * (r1 - r0) is NaN where r1 - r0 overflows)
        return tuple(None if b is None else _extrapolate(a.to(b.device, b.dtype), b, weight) for a, b in zip(r0, r1))


def _extrapolate(r0: torch.Tensor, r1: torch.Tensor, weight: float) -> torch.Tensor:
    """r1 + (r1 - r0) * weight, with r1 - r0 taken in float32 for 16-bit residuals (lerp's arithmetic: in float16,
    r1 - r0 of two large residuals of opposite sign overflows to inf), and a float16 result kept within float16's
    range (a forecast past it would be inf, which the blocks would turn into NaN)."""
    forecast = torch.lerp(r0, r1, 1.0 + weight)  # r0 + (1 + w)(r1 - r0) = r1 + w (r1 - r0)
    if forecast.dtype == torch.float16:
        limit = torch.finfo(torch.float16).max
        forecast = forecast.clamp_(-limit, limit)
    return forecast


def make_store(config: "AdaCacheConfig") -> ResidualStore:
    """A new, empty store of the kind `config.store` names. A forecast that reaches nowhere (`forecast_reach=0`)
    is plain reuse, and gets the reuse store: the same outputs bit for bit, and one residual held, not two."""
    if config.store == "forecast" and config.forecast_reach > 0:
        return ForecastStore(config.forecast_reach)
    return ReuseStore()
