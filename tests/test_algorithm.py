"""The decision on hand-built probes, with expected results worked out by hand (see each test's comments)."""

import dataclasses
import math

import pytest
import torch

from adacache import AdaCacheConfig, Schedule, lookup_rate, motion_score, relative_l1

from toy import decide_computed_step


def probe(value, shape=(1, 4, 2)):
    return torch.full(shape, float(value))


def test_relative_l1_by_hand():
    previous = torch.tensor([[1.0, -2.0], [3.0, 4.0]])  # L1 = 10
    current = torch.tensor([[1.5, -2.0], [2.0, 4.0]])  # |diff| = 0.5 + 1 = 1.5
    assert relative_l1(current, previous).item() == pytest.approx(0.15)
    with pytest.raises(ValueError, match="probe shape changed"):
        relative_l1(current[:1], previous)


def test_motion_score_by_hand():
    frames = torch.tensor([1.0, 3.0, 3.0]).view(1, 3, 1, 1)  # (B, T, S, C)
    # stride 1: |3-1| + |3-3| = 2 over (3 + 3) + (1 + 3) = 10 -> 0.2 ; stride 2: |3-1| = 2 over 3 + 1 -> 0.5
    assert motion_score(frames, (1,)).item() == pytest.approx(0.2)
    assert motion_score(frames, (1, 2)).item() == pytest.approx(0.35)
    assert motion_score(frames, (3,)) is None  # not enough frames


def test_lookup_rate_any_length():
    assert lookup_rate({1.0: 2}, 0.5) == 2
    assert lookup_rate({1.0: 2}, 5.0) == 2  # beyond the last threshold: the last rate
    book = {0.1: 9, 0.2: 7, 0.3: 5, 0.4: 4, 0.5: 3, 0.6: 2, 0.7: 1, 0.8: 1}
    assert [lookup_rate(book, d) for d in (0.05, 0.1, 0.35, 0.79, 3.0)] == [9, 7, 4, 1, 1]
    assert lookup_rate(book, math.nan) == 1 and lookup_rate(book, math.inf) == 1


# Hand-worked 10-step run, codebook {0.1: 3, 0.3: 2, 1.0: 1}; probe values v_s, raw distance |v_s - v_prev| / v_prev:
#  s=1  v=1.0     first step: no previous probe -> rate 1 -> next computed 2
#  s=2  raw 0.05, gap 1 -> 0.05 -> rate 3 -> next 5 (3, 4 reuse)
#  s=5  raw 0.45, gap 3 -> 0.15 -> rate 2 -> next 7 (6 reuses)
#  s=7  raw 0.8,  gap 2 -> 0.4  -> rate 1 -> next 8
#  s=8  raw 0.2,  gap 1 -> 0.2  -> rate 2 -> planned 10, but 9 = N-1 is forced
#  s=9  raw 0.15: paper divides by the stored rate 2 -> 0.075 -> rate 3; ours by the real gap 1 -> 0.15 -> rate 2
#  s=10 raw 0.5:  paper / 3 -> 0.1667 -> rate 2;                       ours / 1 -> 0.5 -> rate 1
RAW = {2: 0.05, 5: 0.45, 7: 0.8, 8: 0.2, 9: 0.15, 10: 0.5}
CODEBOOK = {0.1: 3, 0.3: 2, 1.0: 1}


def hand_values():
    values, v = {1: 1.0}, 1.0
    for step, raw in RAW.items():
        v *= 1 + raw
        values[step] = v
    return values


def run_schedule(config, num_steps=10):
    schedule, values = Schedule(config, num_steps=num_steps), hand_values()
    for step in range(1, num_steps + 1):
        if schedule.is_computed(step, have_cache=step > 1):
            schedule.computed_steps.append(step)
            decide_computed_step(schedule, step, probe(values[step]), frames=None)
    return schedule


@pytest.mark.parametrize("paper_mode, last_rates", [(True, [3, 2]), (False, [2, 1])])
def test_schedule_by_hand(paper_mode, last_rates):
    schedule = run_schedule(AdaCacheConfig(codebook=CODEBOOK, paper_mode=paper_mode))
    assert schedule.computed_steps == [1, 2, 5, 7, 8, 9, 10]
    assert [r.rate for r in schedule.records] == [1, 3, 2, 1, 2, *last_rates]
    assert [r.raw_distance for r in schedule.records[1:]] == pytest.approx(list(RAW.values()), rel=1e-5)


def test_paper_mode_needs_the_planned_step_exactly():
    config = AdaCacheConfig(codebook={1.0: 4}, paper_mode=True)
    schedule = Schedule(config, num_steps=20)
    schedule.prev_compute, schedule.rate = 2, 4
    assert [s for s in range(3, 9) if schedule.is_computed(s, have_cache=True)] == [6]
    ours = Schedule(AdaCacheConfig(codebook={1.0: 4}), num_steps=20)
    ours.prev_compute, ours.rate = 2, 4
    assert [s for s in range(3, 9) if ours.is_computed(s, have_cache=True)] == [6, 7, 8]
    assert ours.is_computed(4, have_cache=False)  # no cache: always compute


def test_moreg_by_hand():
    # Probe frames (B=1, T=2, S=1, C=1). Window (2, 9) of N=10. Codebook {0.1: 4, 1.0: 1}. The authors' rule
    # (paper mode): the first m's gradient is taken against 1.
    config = AdaCacheConfig(codebook={0.1: 4, 1.0: 1}, moreg=True, moreg_window=(2, 9), paper_mode=True)
    schedule = Schedule(config, num_steps=10)
    decide_computed_step(schedule, 1, torch.tensor([1.0, 1.0]).view(1, 2, 1, 1), frames=2)
    # step 2: [1.0, 1.1]: raw distance = |0| + |0.1| over 2 = 0.05; motion raw = 0.1 / 2.1
    record = decide_computed_step(schedule, 2, torch.tensor([1.0, 1.1]).view(1, 2, 1, 1), frames=2)
    m = ((0.1 / 2.1) / 0.385) ** 8
    g = 10 * (m - 1.0) / 1  # previous motion starts at 1, gap 1
    assert record.motion == pytest.approx(m, rel=1e-4)
    assert record.motion_factor == pytest.approx(m + abs(g), rel=1e-4)
    assert record.distance == pytest.approx(0.05 * (m + abs(g)), rel=1e-4)
    assert record.rate == lookup_rate(config.codebook, 0.05 * (m + abs(g)))
    # the default mode takes no gradient at the first reading (against 1 it multiplied the distance by 10 here)
    ours = Schedule(dataclasses.replace(config, paper_mode=False), num_steps=10)
    decide_computed_step(ours, 1, torch.tensor([1.0, 1.0]).view(1, 2, 1, 1), frames=2)
    first = decide_computed_step(ours, 2, torch.tensor([1.0, 1.1]).view(1, 2, 1, 1), frames=2)
    assert first.motion_factor == pytest.approx(m, rel=1e-4) and first.distance == pytest.approx(0.05 * m, rel=1e-4)
    # outside the window MoReg leaves the distance alone
    outside = Schedule(AdaCacheConfig(codebook={0.1: 4, 1.0: 1}, moreg=True, moreg_window=(5, 9)), num_steps=10)
    decide_computed_step(outside, 1, torch.tensor([1.0, 1.0]).view(1, 2, 1, 1), frames=2)
    assert decide_computed_step(outside, 2, torch.tensor([1.0, 1.1]).view(1, 2, 1, 1),
                                frames=2).distance == pytest.approx(0.05)


def test_moreg_raises_compute_for_motion():
    # Same probe change per step; one video still across frames, one moving: the moving one gets lower rates.
    # (The first MoReg step compares with the initial score 1, a large gradient for both; look at the third.)
    def rates(frame_values):
        config = AdaCacheConfig(codebook={0.02: 6, 0.05: 3, 1.0: 1}, moreg=True, moreg_window=(2, 29))
        schedule = Schedule(config, num_steps=30)
        base = torch.tensor(frame_values).view(1, -1, 1, 1)
        for step in (1, 2, 3):
            decide_computed_step(schedule, step, base * (1 + 0.01 * step), frames=base.shape[1])
        return schedule.records[-1].rate

    assert rates([1.0, 1.0, 1.0, 1.0]) == 6
    assert rates([1.0, -1.0, 1.0, -1.0]) == 1


def test_moreg_after_its_window_keeps_the_gradient_against_m_equal_1():
    # The authors: outside the window m = 1, but g = 10 (1 - m_prev) / rate and the factor 1 + |g| still apply.
    config = AdaCacheConfig(codebook={1e9: 1}, moreg=True, moreg_window=(2, 3))
    schedule = Schedule(config, num_steps=10)
    frames = lambda a, b: torch.tensor([a, b]).view(1, 2, 1, 1)  # noqa: E731
    for step, probe in ((1, frames(1.0, 1.0)), (2, frames(1.0, 1.2)), (3, frames(1.0, 1.3))):
        decide_computed_step(schedule, step, probe, frames=2)
    m3 = schedule.records[-1].motion
    record = decide_computed_step(schedule, 4, frames(1.0, 1.4), frames=2)
    assert record.motion is None and record.motion_factor == pytest.approx(1 + abs(10 * (1 - m3)))
    assert record.distance == pytest.approx(record.raw_distance * (1 + abs(10 * (1 - m3))), rel=1e-6)
