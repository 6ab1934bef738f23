"""The core's three parts on plain sequences, with no model: the step clock, the residual stores, and the decision's
sums. Then the forecast store through a model whose residuals a test dictates."""

import math

import pytest
import torch

from adacache import AdaCacheConfig, apply_adacache, get_stats, remove_adacache
from adacache.config import ConfigError
from adacache.core.clock import MAX_AUTO_BRANCHES, Loop, StepClock, find_step
from adacache.core.decision import ProbeSums, Schedule, change_sums, motion_score, motion_sums, relative_l1
from adacache.core.store import ForecastStore, ReuseStore, make_store

from toy import TOY_SPEC, TableDiT, decide_computed_step, timesteps


# --- the clock --------------------------------------------------------------------------------------------------
def ticks(clock, calls):
    """Read and commit each call (a dict of `read`'s arguments); (branch, step, new generation) per call."""
    out = []
    for call in calls:
        tick = clock.read(**call)
        clock.commit(tick)
        out.append((tick.branch, tick.step, tick.new_generation))
    return out


def test_clock_from_the_cache_context_two_branches_and_a_restart():
    calls = [dict(name=b, step_index=i, num_steps=3) for i in range(3) for b in ("cond", "uncond")]
    calls += [dict(name="cond", step_index=0, num_steps=3)]  # the index went back: a new generation
    assert ticks(StepClock(), calls) == [
        ("cond", 1, True), ("uncond", 1, True), ("cond", 2, False), ("uncond", 2, False),
        ("cond", 3, False), ("uncond", 3, False), ("cond", 1, True)]


def test_clock_from_the_timestep_alone_falling_then_rising_then_repeating():
    clock = StepClock()
    falling = [dict(t=t) for t in (1000.0, 800.0, 600.0)]
    assert ticks(clock, falling) == [("default", 1, True), ("default", 2, False), ("default", 3, False)]
    assert ticks(clock, [dict(t=900.0)]) == [("default", 1, True)]  # turned back against the run: new generation
    rising = StepClock()
    assert [s for _, s, _ in ticks(rising, [dict(t=t) for t in (0.0, 10.0, 20.0)])] == [1, 2, 3]  # Mochi's way
    # two calls at one timestep without a context: the second is a second branch (CFG over two calls)
    split = StepClock()
    assert ticks(split, [dict(t=1000.0), dict(t=1000.0), dict(t=900.0), dict(t=900.0)]) == [
        ("default", 1, True), ("default.1", 1, True), ("default", 2, False), ("default.1", 2, False)]


def test_clock_from_the_scheduler_finds_steps_and_count_and_a_new_run():
    first, second = object(), object()
    table = [1000.0, 750.0, 500.0, 250.0]
    clock = StepClock()
    calls = [dict(t=1000.0, timesteps=(first, table)), dict(t=500.0, timesteps=(first, table))]  # step 2 not called
    assert ticks(clock, calls) == [("default", 1, True), ("default", 3, False)]
    assert clock.read(t=250.0, timesteps=(first, table)).num_steps == 4
    # the scheduler set anew: a new generation even though the timestep goes on falling
    assert clock.read(t=250.0, timesteps=(second, table)).new_generation


def test_clock_heun_repeats_timesteps_and_the_count_changes():
    table = [1000.0, 500.0, 500.0, 0.0]  # second-order schedulers repeat timesteps
    assert find_step(table, 500.0, after=0) == 1 and find_step(table, 500.0, after=2) == 2
    assert find_step(table, 123.0, after=0) is None
    clock, key = StepClock(), object()
    # a named branch with no step index (a cache_context without it): the repeated timestep is the next step
    calls = [dict(name="cond", t=t, timesteps=(key, table)) for t in table]
    assert [s for _, s, _ in ticks(clock, calls)] == [1, 2, 3, 4]
    # no name at all: a second call at one timestep reads as a second CFG branch (the clock cannot tell them apart)
    assert [b for b, _, _ in ticks(StepClock(), [dict(t=t, timesteps=(key, table)) for t in table])][2] == "default.1"
    context = StepClock()
    ticks(context, [dict(name="c", step_index=0, num_steps=10)])
    assert context.read(name="c", step_index=1, num_steps=20).new_generation  # another step count: another run


def test_clock_from_the_running_loop():
    """The running pipeline's loop (its length, its scheduler's step index) gives the count and the step; calls in a
    row are CFG branches only between the same two scheduler steps."""
    key = object()
    heun = [1000.0, 500.0, 500.0, 0.0, 0.0]  # 3 steps, the last two evaluated twice; the scheduler steps after each
    loop = [Loop(key, 5, None if i == 0 else i, 5) for i in range(5)]  # step_index is None before the first step
    assert ticks(StepClock(), [dict(t=t, loop=lp) for t, lp in zip(heun, loop)]) == [
        ("default", i + 1, i == 0) for i in range(5)]  # the repeated timesteps are steps, not a second branch
    split = [dict(t=t, loop=lp) for t, lp in zip(heun, loop) for _ in range(2)]  # CFG as two calls per step
    assert ticks(StepClock(), split) == [(b, i + 1, i == 0) for i in range(5) for b in ("default", "default.1")]
    # strength: the loop runs the last 3 of 5 scheduled timesteps, so its first scheduler step is index 2
    truncated = Loop(object(), 3, None, 5)
    assert truncated.start == 2 and Loop(key, 8, None, 6).start is None  # diffusion forcing: more than scheduled
    clock = StepClock()
    calls = [dict(name="c", t=500.0, loop=truncated)] + [dict(name="c", t=t, loop=Loop(truncated.key, 3, p, 5))
                                                         for t, p in ((250.0, 3), (0.0, 4))]
    assert ticks(clock, calls) == [("c", 1, True), ("c", 2, False), ("c", 3, False)]
    assert clock.read(name="c", t=0.0, loop=Loop(truncated.key, 3, 4, 5)).num_steps == 3
    # a scheduler that does not step (diffusion forcing steps copies of it): one step per call, and the loop's end
    # starts the next window; per-frame timesteps as (largest, mean), the largest repeating
    windows = [dict(name="c", t=(999.0, m), loop=Loop(key, 3, None, 6)) for m in (900.0, 800.0, 700.0)]
    windows += [dict(name="c", t=(999.0, m), loop=Loop(key, 2, None, 6)) for m in (500.0, 400.0)]
    assert ticks(StepClock(), windows) == [("c", 1, True), ("c", 2, False), ("c", 3, False), ("c", 1, True),
                                           ("c", 2, False)]
    # a second expert (Wan 2.2) joins mid-loop: its first call is the scheduler's step, of the loop's count
    joined = StepClock().read(name="c", t=250.0, loop=Loop(key, 5, 3, 5))
    assert (joined.step, joined.num_steps, joined.new_generation) == (4, 5, True)


def test_clock_read_changes_nothing_until_commit_and_forget_restarts():
    clock = StepClock()
    ticks(clock, [dict(name="c", step_index=0, num_steps=5)])
    once = clock.read(name="c", step_index=1, num_steps=5)
    again = clock.read(name="c", step_index=1, num_steps=5)  # the caller refused the first: nothing moved
    assert once == again and (once.step, once.new_generation) == (2, False)
    clock.forget()
    assert clock.read(name="c", step_index=1, num_steps=5).new_generation


def test_clock_default_step_count_and_needs_timestep():
    assert StepClock(default_num_steps=7).read(t=1.0).num_steps == 7
    assert StepClock.needs_timestep(None, None) and StepClock.needs_timestep("cond", None)
    assert not StepClock.needs_timestep("cond", 3)


def test_clock_refuses_endless_calls_at_one_timestep():
    clock = StepClock()
    for _ in range(MAX_AUTO_BRANCHES):
        clock.commit(clock.read(t=5.0))
    with pytest.raises(RuntimeError, match="cache_context"):
        clock.read(t=5.0)


# --- the stores -------------------------------------------------------------------------------------------------
def residual(value):
    return (torch.full((1, 2, 3), float(value)), None)


def test_reuse_store_keeps_one_only_when_asked_and_reports_bytes():
    store = ReuseStore()
    assert not store.wants(1) and store.wants(2) and not store.holds
    with pytest.raises(RuntimeError, match="before any computed step"):
        store.produce(3)
    store.put(2, residual(1.0))
    store.put(5, residual(4.0))
    assert store.steps == [5] and store.holds and store.nbytes() == 6 * 4
    assert torch.equal(store.produce(7)[0], torch.full((1, 2, 3), 4.0)) and store.produce(7)[1] is None
    store.clear()
    assert not store.holds and store.nbytes() == 0


@pytest.mark.parametrize("reach, expected", [(0.5, [4.0, 4.0, 4.0]), (1.0, [4.0, 5.0, 5.0]), (10.0, [4.0, 5.0, 6.0])])
def test_forecast_store_extrapolates_within_its_reach(reach, expected):
    store = ForecastStore(reach)
    assert store.wants(1)  # keeps every computed step's residual: the slope needs the last two
    store.put(2, residual(1.0))
    assert torch.equal(store.produce(3)[0], residual(1.0)[0])  # one residual: plain reuse
    store.put(4, residual(3.0))  # 2 more over an interval of 2 steps
    # steps 5, 6, 7 are 1/2, 2/2, 3/2 of the interval ahead, each capped at the reach
    assert [float(store.produce(s)[0][0, 0, 0]) for s in (5, 6, 7)] == expected
    assert store.nbytes() == 2 * 6 * 4 and store.steps == [2, 4]


def test_forecast_store_never_draws_a_slope_across_runs_or_layouts():
    store = ForecastStore(1.0)
    store.put(5, residual(1.0))
    store.put(3, residual(2.0))  # not after step 5: a new run
    assert store.steps == [3] and float(store.produce(4)[0].max()) == 2.0
    store.put(4, (torch.ones(1, 4, 3), None))  # another shape: no slope between the two
    assert store.steps == [4]


def test_make_store_follows_the_config_and_paper_mode_keeps_reuse():
    assert isinstance(make_store(AdaCacheConfig()), ReuseStore)
    forecast = make_store(AdaCacheConfig(store="forecast", forecast_reach=0.25))
    assert isinstance(forecast, ForecastStore) and forecast.reach == 0.25
    with pytest.raises(ConfigError, match="paper_mode"):
        AdaCacheConfig(store="forecast", paper_mode=True)
    with pytest.raises(ConfigError, match="store must be one of"):
        AdaCacheConfig(store="taylor")
    for bad in (-1, math.nan, "0.5", True):
        with pytest.raises(ConfigError, match="forecast_reach"):
            AdaCacheConfig(store="forecast", forecast_reach=bad)


# --- the decision's sums ----------------------------------------------------------------------------------------
def test_sums_are_the_ratios_parts_and_add_over_a_split():
    torch.manual_seed(0)
    previous, current = torch.randn(2, 8, 4), torch.randn(2, 8, 4)
    change, base = change_sums(current, previous)
    assert torch.equal(change / base, relative_l1(current, previous))
    # split the tokens in two (as context parallelism does): the sums add up to the whole, the ratios do not
    halves = [change_sums(c, p) for c, p in zip(current.chunk(2, dim=1), previous.chunk(2, dim=1))]
    assert torch.allclose(sum(h[0] for h in halves), change) and torch.allclose(sum(h[1] for h in halves), base)
    frames = torch.randn(1, 5, 3, 2)
    sums = motion_sums(frames, (1, 2, 9))  # stride 9 is longer than the clip: left out
    assert len(sums) == 2
    assert torch.equal(torch.stack([a / b for a, b in sums]).mean(), motion_score(frames, (1, 2)))


def test_conclude_is_decide_then_keeping_the_probe():
    config = AdaCacheConfig(codebook={0.1: 3, 1.0: 1})
    whole, split = Schedule(config, num_steps=10), Schedule(config, num_steps=10)
    for step, value in ((1, 1.0), (2, 1.05), (5, 1.5)):
        probe = torch.full((1, 4, 2), value)
        decide_computed_step(whole, step, probe, frames=None)
        sums = split.measure(step, probe, frames=None)
        assert isinstance(sums, ProbeSums) and sums.first == (step == 1)
        split.decide(step, sums)
        split.prev_probe = probe
    assert [(r.rate, r.raw_distance) for r in whole.records] == [(r.rate, r.raw_distance) for r in split.records]


# --- the forecast through a model -------------------------------------------------------------------------------
def test_forecast_through_a_model_extrapolates_the_stack_residual():
    # Three blocks each adding table[t]: the stack residual at step s is 3 * table[t_s] = 3 s, growing linearly,
    # so a forecast is exact one step ahead, and reuse is 3 per step behind.
    ts = timesteps(6)
    table = {t: torch.full((1, 4, 2), float(i + 1)) for i, t in enumerate(ts)}
    config = dict(codebook={1e9: 3}, num_inference_steps=6)

    def run(store):
        model = TableDiT(table)
        apply_adacache(model, AdaCacheConfig(**config, store=store, forecast_reach=1.0), spec=TOY_SPEC)
        x = torch.zeros(1, 4, 2)
        outs = [model(x, torch.full((1,), t)) for t in ts]
        stats = get_stats(model)[-1]
        remove_adacache(model)
        return outs, stats

    exact = [torch.full((1, 4, 2), 3.0 * (i + 1)) for i in range(6)]
    reused, reuse_stats = run("reuse")
    forecast, forecast_stats = run("forecast")
    assert reuse_stats.computed_steps == forecast_stats.computed_steps == [1, 2, 5, 6]
    assert torch.equal(reused[2], exact[1]) and torch.equal(reused[3], exact[1])  # steps 3, 4 reuse step 2's
    assert torch.equal(forecast[2], exact[2])  # step 3, one step ahead of the slope of steps 1 and 2: exact
    assert torch.equal(forecast[3], exact[2])  # step 4, two intervals ahead: the reach of 1 stops it at step 3's
    assert all(torch.equal(a, b) for a, b in zip(forecast[4:], exact[4:]))  # computed steps are exact
    assert forecast_stats.cache_bytes == 2 * reuse_stats.cache_bytes - 4 * 2 * 4  # two residuals + probe vs one


def test_moreg_says_when_its_normalisation_does_not_fit_the_model(caplog):
    # probe frames moving by 8%: raw motion about 0.04, against the authors' 0.385: m = (0.04 / 0.385) ** 8 ~ 0
    def run(norm):
        schedule = Schedule(AdaCacheConfig(codebook={1.0: 2}, moreg=True, moreg_norm=norm, moreg_window=(2, 9)),
                            num_steps=10)
        frames = torch.tensor([1.0, 1.08]).view(1, 2, 1, 1)
        for step in range(1, 6):
            decide_computed_step(schedule, step, frames * (1 + 0.01 * step), frames=2)
        return schedule

    misfit = run(0.385)
    assert [n for n in misfit.notes if "does not fit" in n and "removes compute" in n and "calibrate --moreg" in n]
    assert not [n for n in run(0.04).notes if "does not fit" in n]  # calibrated: nothing to say
    assert [n for n in run(0.0005).notes if "computes nearly every step" in n]


def test_stats_say_which_store_was_used():
    ts = timesteps(4)
    table = {t: torch.full((1, 4, 2), float(i + 1)) for i, t in enumerate(ts)}
    for store, reach, expected in (("reuse", 0.5, "reuse"), ("forecast", 0.5, "forecast"), ("forecast", 0, "reuse")):
        model = TableDiT(table)
        apply_adacache(model, AdaCacheConfig(codebook={1e9: 2}, num_inference_steps=4, store=store,
                                             forecast_reach=reach), spec=TOY_SPEC)
        for t in ts:
            model(torch.zeros(1, 4, 2), torch.full((1,), t))
        assert get_stats(model)[-1].store == expected  # reach 0 is plain reuse exactly
        assert get_stats(model)[-1].to_dict()["store"] == expected
        remove_adacache(model)
