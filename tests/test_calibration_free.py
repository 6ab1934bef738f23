"""AdaCache with no calibration (codebook=None, the default): distances relative to the generation's first one, a
compute budget of steps / speedup, MoReg read scale-free. Driven on plain sequences, as production drives it
(measure -> conclude), and on the embedded model."""

import math

import pytest
import torch

from adacache import AdaCacheConfig, apply_adacache, get_stats, remove_adacache
from adacache.core.decision import (BUDGET_SHAPE, Schedule, budget_rate, max_rate, motion_factor, scale_free_motion,
                                    scale_free_motion_sums)

from toy import decide_computed_step


def run_schedule(config: AdaCacheConfig, num_steps: int, probe_at) -> Schedule:
    """A whole generation on probes `probe_at(step)`, computing the steps the schedule asks for."""
    schedule = Schedule(config, num_steps=num_steps)
    for step in range(1, num_steps + 1):
        if schedule.is_computed(step, have_cache=step > 1):
            schedule.computed_steps.append(step)
            decide_computed_step(schedule, step, probe_at(step), frames=None)
        else:
            schedule.skipped_steps.append(step)
    return schedule


def curve(num_steps: int, scale: float = 1.0):
    """A probe whose change per step is large early, small in the middle and rising at the end (the shape of the
    embedded model's distance curve), with a per-step change shrinking as 1 / num_steps."""
    def probe_at(step: int) -> torch.Tensor:
        u = step / num_steps
        position = 3 * u - 2 * u ** 2 + 0.3 * u ** 3  # its derivative: 3 - 4u + 0.9u^2, high, low, rising
        return scale * torch.tensor([1.0 + position, 2.0, 3.0])
    return probe_at


def test_budget_rate_by_hand():
    # mid-generation, on budget: nudge 1, stride = S * c / sqrt(d)
    assert budget_rate(0.25, step=10, computed=5, num_steps=None, speedup=2.0) == round(2 * BUDGET_SHAPE / 0.5)
    assert budget_rate(1.0, 2, 2, 30, 2.0) == 1  # the first distance: the change is at its largest
    assert budget_rate(float("nan"), 10, 5, 30, 2.0) == 1 and budget_rate(math.inf, 10, 5, 30, 2.0) == 1
    assert budget_rate(1e-9, 10, 5, 30, 3.0) == max_rate(30) == 6  # tiny change: the longest stride, no more
    # over budget (computed more than steps / speedup so far): longer strides than on budget, and the reverse
    assert budget_rate(0.1, 15, 12, 30, 2.0) > budget_rate(0.1, 15, 5, 30, 2.0)


def test_the_schedule_is_the_same_for_any_scale_of_the_features():
    # relative distances: a model whose probe is 1000 times larger decides the same steps
    config = AdaCacheConfig(speedup=2.5)
    small = run_schedule(config, 30, curve(30, 1.0))
    large = run_schedule(config, 30, curve(30, 1000.0))
    assert small.computed_steps == large.computed_steps
    distances = lambda schedule: [r.distance for r in schedule.records if r.distance is not None]  # noqa: E731
    assert distances(small) == pytest.approx(distances(large), rel=1e-3)  # (float32 sums)


@pytest.mark.parametrize("speedup", [1.5, 2.0, 2.5])  # (3x at 30 steps is 10 computed, 4 of them forced: 2.5x)
@pytest.mark.parametrize("num_steps", [30, 50, 100])
def test_the_compute_speedup_follows_the_setting_at_every_step_count(num_steps, speedup):
    schedule = run_schedule(AdaCacheConfig(speedup=speedup), num_steps, curve(num_steps))
    reached = num_steps / len(schedule.computed_steps)
    assert reached == pytest.approx(speedup, rel=0.15), schedule.computed_steps
    assert schedule.computed_steps[:2] == [1, 2] and schedule.computed_steps[-2:] == [num_steps - 1, num_steps]


def test_more_change_gets_more_compute():
    # two trajectories alike but for one that changes three times faster in the middle third: it computes more
    # of its steps there
    def bumpy(step: int) -> torch.Tensor:
        base = curve(30)(step)
        return base + (torch.tensor([3.0 * max(0, min(step, 20) - 10) / 30, 0, 0]) if step > 10 else 0)
    plain, bump = run_schedule(AdaCacheConfig(), 30, curve(30)), run_schedule(AdaCacheConfig(), 30, bumpy)
    middle = lambda s: sum(1 for step in s.computed_steps if 10 < step <= 20)  # noqa: E731
    assert middle(bump) > middle(plain)


def test_paper_mode_ignores_the_budget_and_takes_the_authors_codebook():
    config = AdaCacheConfig(paper_mode=True)
    assert not config.calibration_free and dict(config.codebook) == dict(AdaCacheConfig.from_preset(
        "opensora-30-fast").codebook)


def test_scale_free_motion_reads_tokens_per_frame_whatever_the_scale():
    # a 1-D "image" of 16 tokens, a ramp, shifted by v tokens per frame: motion = v (frame change / token change)
    ramp = torch.arange(40, dtype=torch.float64)
    for v in (1, 2, 3):
        frames = torch.stack([ramp[v * t: v * t + 16] for t in range(4)]).view(1, 4, 16, 1)  # (B, T, S, C)
        assert float(scale_free_motion(frames)) == pytest.approx(v)
        assert float(scale_free_motion(frames * 1000)) == pytest.approx(v)
    still = torch.stack([ramp[:16]] * 4).view(1, 4, 16, 1)
    assert float(scale_free_motion(still)) == 0
    assert scale_free_motion(still[:, :1]) is None and scale_free_motion_sums(still[:, :, :1], (1,)) == []


def test_motion_factor_is_bounded_and_one_at_the_reference():
    assert motion_factor(0.5) == 1.0 and motion_factor(0.0) == 0.25 and motion_factor(100.0) == 4.0
    assert motion_factor(float("nan")) == 4.0  # garbage: spend compute


def test_moreg_moves_the_budget_toward_the_moving_video():
    config = AdaCacheConfig(moreg=True, speedup=2.0)

    def video(shift: int):
        ramp = torch.arange(64, dtype=torch.float32)

        def probe_at(step: int) -> torch.Tensor:
            frames = torch.stack([ramp[shift * t: shift * t + 16] for t in range(4)]).view(1, 4, 16, 1)
            return frames * (1 + 0.3 * curve(30)(step)[0])  # the same change per step, another motion
        return probe_at

    def computed(shift: int) -> int:
        schedule = Schedule(config, num_steps=30)
        for step in range(1, 31):
            if schedule.is_computed(step, have_cache=step > 1):
                schedule.computed_steps.append(step)
                decide_computed_step(schedule, step, video(shift)(step), frames=4)
        return len(schedule.computed_steps)

    assert computed(2) >= 1.5 * computed(0)


def test_the_default_on_the_embedded_model_needs_no_codebook():
    from adacache.embedded.pipeline import EmbeddedVideoPipeline

    pipe = EmbeddedVideoPipeline.from_embedded()
    pipe.set_progress_bar_config(disable=True)
    apply_adacache(pipe)  # no config: the calibration-free default
    try:
        pipe("a red circle moving right fast", num_inference_steps=30, generator=torch.Generator().manual_seed(0))
        stats = get_stats(pipe)[-1]
    finally:
        remove_adacache(pipe)
    assert 30 / len(stats.computed_steps) == pytest.approx(2.0, rel=0.15)
    assert stats.distances[1] == pytest.approx(1.0)  # the first distance is the reference


# --- from the hostile review of the default ---------------------------------------------------------------------
def test_frames_without_texture_read_no_motion_rather_than_nan():
    flat = torch.ones(1, 4, 16, 1)  # uniform within each frame and the same in every frame: a still video
    assert float(scale_free_motion(flat)) == 0
    flashing = torch.stack([torch.full((16,), float(t)) for t in range(4)]).view(1, 4, 16, 1)  # no texture, changes
    assert float(scale_free_motion(flashing)) == math.inf and motion_factor(math.inf) == 4.0


def test_a_nan_motion_is_left_out_of_the_budget_and_the_stats():
    schedule = Schedule(AdaCacheConfig(moreg=True), num_steps=30)
    ramp = torch.arange(64, dtype=torch.float32)
    probe = torch.stack([ramp[t: t + 16] for t in range(4)]).view(1, 4, 16, 1)
    for step, value in ((1, probe), (2, probe * 1.1), (3, probe * float("nan"))):
        decide_computed_step(schedule, step, value, frames=4)
    assert all(not math.isnan(f) for f in schedule.motion_factors)
    assert schedule.records[-1].motion is None and any("not a number" in note for note in schedule.notes)


def test_a_speedup_beyond_the_step_count_is_said():
    from adacache.core.decision import most_reachable

    assert most_reachable(30) == pytest.approx(30 / (4 + math.ceil(26 / 6)))
    schedule = run_schedule(AdaCacheConfig(speedup=10.0), 30, curve(30))
    assert any("beyond what 30 steps allow" in note for note in schedule.notes)
    assert not run_schedule(AdaCacheConfig(speedup=3.0), 30, curve(30)).notes


def test_a_numpy_speedup_is_a_float_and_saves(tmp_path):
    np = pytest.importorskip("numpy")
    config = AdaCacheConfig(speedup=np.float32(2.5))
    assert type(config.speedup) is float
    config.save(tmp_path / "c.json")
    assert AdaCacheConfig.load(str(tmp_path / "c.json")).speedup == 2.5


def test_the_command_line_takes_the_bench_names_of_the_knob():
    import argparse

    from adacache.cli import _cache_config
    from adacache.config import ConfigError

    def config(cache, auto=True):
        return _cache_config(argparse.Namespace(cache=cache, steps=30, moreg=False), auto=auto)

    assert config("default") == AdaCacheConfig() and config("speedup:2.5") == AdaCacheConfig(speedup=2.5)
    assert config("auto", auto=False) == AdaCacheConfig.from_preset("balanced")  # the demo's random model
    for bad, message in (("speedup:x", "speedup:<number>"), ("speedup:0.5", "from 1 to")):
        with pytest.raises(ConfigError, match=message):
            config(bad)
