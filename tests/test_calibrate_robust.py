"""Calibration that no clock can sway, targets refused before work, hostile method names, damaged bench folders.

1. A wall-clock target goes through a cost model measured once (medians of interleaved whole computed and skipped
   steps); the bisection reads no clock, and a timed check is compared with the model's prediction.
2. Targets no derived codebook reaches are refused before any generation, or before the bisection where that
   takes a measurement.
3. Method names with odd numbers are ConfigErrors naming the method and the range; a damaged bench folder is
   recovered or refused naming the file, never a traceback or silently wrong results.
"""

import dataclasses
import json
import logging
import math
import random
import re
import time
import types

import numpy as np
import pytest

from adacache.cli import main
from adacache.config import AdaCacheConfig, ConfigError
from adacache.embedded.train import build_pipeline
from adacache.evaluation import calibrate as calibrate_module
from adacache.evaluation.bench import Bench, BenchSettings, load_records, run_bench
from adacache.evaluation.calibrate import Calibrator, Run
from adacache.evaluation.methods import parse_method, parse_methods

PROMPTS = ["a red circle moving left fast", "a blue square standing still"]


@pytest.fixture
def tiny_pipe():
    return build_pipeline("tiny", architecture="wan")


def cost_model(computed, skipped):
    """A CostModel from samples (imported here so that the rest of the module also runs on code without one)."""
    from adacache.evaluation.calibrate import CostModel

    return CostModel(tuple(computed), tuple(skipped))


# --- 1. the cost model ----------------------------------------------------------------------------------------------
def test_the_prediction_formula_and_its_inverse():
    model = cost_model([1.0] * 3, [0.25] * 3)  # a skipped step costs a quarter of a computed one
    assert model.skip_cost == 0.25
    assert model.wall_speedup(30, 10) == pytest.approx(30 / (10 + 0.25 * 20))  # = 2.0
    assert model.wall_speedup(30, 30) == 1.0
    assert model.compute_goal(2.0, 30) == pytest.approx(3.0)  # 10 of 30 steps computed
    for computed in (6, 11.5, 29):
        assert model.compute_goal(model.wall_speedup(30, computed), 30) == pytest.approx(30 / computed)
    with pytest.raises(ValueError, match="at most 4.00x"):  # skipping every step: 1 / 0.25
        model.compute_goal(4.5, 30)
    with pytest.raises(ValueError, match="skipping saves no wall-clock time"):
        cost_model([1.0] * 3, [1.2] * 3).compute_goal(1.5, 30)
    with pytest.raises(ValueError, match="at least 3 samples"):
        cost_model([1.0] * 2, [0.1] * 5)
    with pytest.raises(ValueError, match="finite, non-negative"):
        cost_model([1.0, math.nan, 1.0], [0.1] * 3)


def test_the_cost_model_takes_medians_so_a_busy_moment_does_not_move_it():
    steady_computed, steady_skipped = [1.0] * 7, [0.1] * 7
    busy_skipped = cost_model([1.0] * 10, steady_skipped + [1.0] * 3)  # three skipped steps stretched tenfold
    busy_computed = cost_model(steady_computed + [10.0] * 3, [0.1] * 10)
    assert busy_skipped.skip_cost == pytest.approx(0.1) and busy_computed.skip_cost == pytest.approx(0.1)
    summary = busy_skipped.summary()
    assert summary["skip_cost"] == pytest.approx(0.1)
    assert summary["skipped"]["median_seconds"] == pytest.approx(0.1) and summary["skipped"]["samples"] == 10
    assert summary["skipped"]["max_seconds"] == pytest.approx(1.0) and summary["skipped"]["spread"] > 0
    assert summary["computed"] == {"median_seconds": 1.0, "q25_seconds": 1.0, "q75_seconds": 1.0, "spread": 0.0,
                                   "min_seconds": 1.0, "max_seconds": 1.0, "samples": 10}


def test_measured_costs_come_from_interleaved_computed_and_skipped_steps_of_the_pipeline(tiny_pipe):
    calibrator = Calibrator(tiny_pipe, PROMPTS[:1], steps=12, guidance=4.0)
    model = calibrator.measure_costs(samples=8)
    # a rate-2 generation of 12 steps computes 1, 2, 4, 6, 8, 10, 11, 12 and skips 3, 5, 7, 9; the last step has no
    # next start and is not timed: 7 computed and 4 skipped samples per generation, two generations for 8 skipped
    assert len(model.skipped) == 8 and len(model.computed) == 14
    assert all(s > 0 for s in model.computed + model.skipped)
    assert 0 < model.skip_cost < 1


class NoisyClock:
    """A monotonic clock whose every reading jumps by a random amount from a microsecond to a second."""

    def __init__(self, seed: int) -> None:
        self.now, self.random = 1000.0, random.Random(seed)

    def __call__(self) -> float:
        self.now += 10 ** self.random.uniform(-6, 0)
        return self.now


class TickClock:
    """Every reading one second after the last: any two generations take equally long, as if a skipped step cost
    as much as a computed one."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        self.now += 1.0
        return self.now


class WorkClock:
    """Time = the attention calls so far (they run on computed steps only): a skipped step costs nothing."""

    def __init__(self, transformer) -> None:
        self.calls, self.readings = 0, 0
        for name, module in transformer.named_modules():
            if name.endswith("attn1"):
                module.register_forward_hook(lambda *args: setattr(self, "calls", self.calls + 1))

    def __call__(self) -> float:
        self.readings += 1
        return self.calls + 1e-6 * self.readings


def test_the_bisection_reads_no_clock_so_any_clock_gives_the_same_codebook(tiny_pipe, monkeypatch):
    """Given one measured cost, a calibration for a wall-clock target gives the same codebook whatever the clock
    reads while it runs (the real one, a noisy one, or clocks by which skipping costs everything or nothing): the
    compute goal is derived once from the cost model, and the bisection compares computed steps."""
    def measured(self, samples=16):  # one cost measured, say, on a quiet machine
        return cost_model([1.0] * 5, [0.1] * 5)

    monkeypatch.setattr(Calibrator, "measure_costs", measured, raising=False)
    results = {}
    for name, clock in [("real", None), ("noisy", NoisyClock(0)), ("ticks", TickClock()),
                        ("work", WorkClock(tiny_pipe.transformer))]:
        with monkeypatch.context() as patch:
            if clock is not None:
                patch.setattr(time, "perf_counter", clock)  # every timing in the library reads this clock
            calibrator = Calibrator(tiny_pipe, PROMPTS[:1], steps=12, guidance=4.0)
            results[name] = calibrator.calibrate(speedup=1.6, iterations=4, check_repeats=3 if clock is None else 1)
    codebooks = {name: result.config.codebook for name, result in results.items()}
    assert codebooks["ticks"] == codebooks["work"] == codebooks["noisy"] == codebooks["real"], codebooks
    fixed, about = measured(None), results["real"].about
    assert about["skip_cost"] == pytest.approx(0.1) and about["cost_model"]["skipped"]["samples"] == 5
    assert about["compute_goal"] == pytest.approx(fixed.compute_goal(1.6, 12))
    check = about["wall_check"]
    assert check["repeats"] == 3 and len(check["uncached_seconds"]) == len(check["cached_seconds"]) == 3
    assert check["predicted_wall_speedup"] == pytest.approx(fixed.wall_speedup(12, check["computed_steps"]))


def test_the_timed_check_interleaves_runs_and_warns_when_it_disagrees_with_the_model(caplog):
    pipe = types.SimpleNamespace(set_progress_bar_config=lambda **kwargs: None)
    calibrator = Calibrator(pipe, PROMPTS[:1], steps=12)
    order = []

    def generate(config, prompt, seed):  # uncached 1.0 s, cached 0.5 s computing 6 of 12 steps: 2.0x measured
        order.append("cached" if config is not None else "uncached")
        return Run(np.zeros((1, 2, 2, 3)), 0.5 if config is not None else 1.0, 6 if config is not None else 12, 12)

    calibrator.generate = generate
    config = AdaCacheConfig(codebook={1.0: 2})
    with caplog.at_level(logging.WARNING, logger="adacache.evaluation.calibrate"):
        check = calibrator.check_wall(config, cost_model([1.0] * 3, [0.0] * 3))  # predicts 12 / 6 = 2.0x
    assert order == ["uncached", "cached", "cached", "uncached", "uncached", "cached"]
    assert check["measured_wall_speedup"] == 2.0 and check["predicted_wall_speedup"] == 2.0 and check["agrees"]
    assert not caplog.records
    with caplog.at_level(logging.WARNING, logger="adacache.evaluation.calibrate"):
        check = calibrator.check_wall(config, cost_model([1.0] * 3, [0.5] * 3))  # predicts 12 / 9 = 1.33x
    assert check["relative_difference"] == pytest.approx(2.0 / (12 / 9) - 1) and not check["agrees"]
    assert "the machine was probably busy" in caplog.text


# --- 2. unreachable targets -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("steps, target, message", [
    (30, {"speedup": 6.0}, r"in \(1, 5.00\] at 30 steps"),  # at least 6 of 30 steps are computed
    (30, {"speedup": 10.0}, r"in \(1, 5.00\] at 30 steps"),  # what steps / 3 used to allow
    (12, {"speedup": 2.5}, r"in \(1, 2.00\] at 12 steps"),
    (4, {"speedup": 1.1}, "at 4 steps AdaCache computes every step"),
    (30, {"speedup": math.nan}, "a speed-up target must be a number"),
    (30, {"speedup": -2.0}, "a speed-up target must be a number"),
    (30, {"target_psnr": math.nan}, r"a PSNR target must be a number of dB in \(0, 100\)"),
    (30, {"target_psnr": math.inf}, r"a PSNR target must be a number of dB in \(0, 100\)"),
    (30, {"target_psnr": 100.0}, "only a video identical to the uncached one reaches"),
    (30, {"target_psnr": 150.0}, r"in \(0, 100\)"),
    (30, {"target_psnr": -5.0}, r"in \(0, 100\)"),
    (30, {"target_psnr": 30.0, "iterations": 0}, "iterations must be a positive integer"),
    # below one skipped step: a generation computes all 5 steps (1.00x) or skips one (1.25x), nothing between
    (5, {"speedup": 1.1, "wall_clock": False}, r"1.1x is out of reach at 5 steps.* at least 1.25, or more steps"),
    (30, {"speedup": 1.03, "wall_clock": False}, r"skips at least one \(1.034x or more\).* at least 1.04"),
])
def test_unreachable_targets_are_refused_before_any_generation(steps, target, message):
    def generate(*args, **kwargs):
        raise AssertionError("a generation ran before the target was checked")

    pipe = types.SimpleNamespace(set_progress_bar_config=lambda **kwargs: None)
    calibrator = Calibrator(pipe, PROMPTS, steps=steps)
    calibrator.generate = generate
    with pytest.raises(ValueError, match=message):
        calibrator.calibrate(**target)


def _synthetic(calibrator, monkeypatch):
    """Distance curves and measurements made up from the threshold scale: fast, and exact to reason about.
    Returns the list of scales measured."""
    pooled = [0.05 * (1 + i) for i in range(12)]
    reference = Run(np.zeros((1, 2, 2, 3)), 1.0, 12, 12)
    monkeypatch.setattr(calibrator, "curves", lambda: ([pooled], [reference]))
    unit = list(calibrate_module.derive_codebook(pooled, calibrate_module.max_rate(12)))[0]
    scales = []

    def measure(config, references):
        scale = list(config.codebook)[0] / unit
        scales.append(scale)
        computed = max(6.0, 12 - 2 * math.log(30 * scale))  # more steps computed at smaller scales
        return {"compute_speedup": 12 / computed, "wall_speedup": 12 / computed, "computed_steps": computed,
                "psnr": 40 - 10 * math.log10(scale)}  # 40 dB at scale 1, more at smaller scales

    monkeypatch.setattr(calibrator, "measure", measure)
    return scales


def test_a_psnr_target_the_most_conservative_codebook_misses_is_refused_before_the_bisection(monkeypatch):
    pipe = types.SimpleNamespace(set_progress_bar_config=lambda **kwargs: None)
    calibrator = Calibrator(pipe, PROMPTS[:1], steps=12)
    scales = _synthetic(calibrator, monkeypatch)
    # the search over scales [1/30, 30] in 4 halvings gets no lower than 1/30 * 900 ** (1 / 16) = 0.051: 52.9 dB
    with pytest.raises(ValueError, match=r"a PSNR of 60 dB is out of reach.* keeps 52.9 dB"):
        calibrator.calibrate(target_psnr=60, iterations=4)
    assert scales == [pytest.approx(900 ** (1 / 16) / 30)]  # one measurement, not the whole bisection
    scales.clear()
    result = calibrator.calibrate(target_psnr=45, iterations=4)
    assert len(scales) == 5 and result.about["reached"]["psnr"] >= 45


def test_a_psnr_calibration_on_a_real_pipeline_keeps_its_target(tiny_pipe):
    result = Calibrator(tiny_pipe, PROMPTS[:1], steps=12, guidance=4.0).calibrate(target_psnr=40.0, iterations=3)
    assert result.about["reached"]["psnr"] >= 40.0 and result.about["target"]["psnr"] == 40.0
    assert "cost_model" not in result.about and result.about["skip_cost"] is None  # no clock needed for PSNR


def test_a_wall_target_beyond_the_measured_cost_is_refused_before_the_bisection(monkeypatch):
    pipe = types.SimpleNamespace(set_progress_bar_config=lambda **kwargs: None)
    calibrator = Calibrator(pipe, PROMPTS[:1], steps=12)
    scales = _synthetic(calibrator, monkeypatch)
    # a skipped step at half a computed one: the fastest codebook (6 of 12 computed) gives 12 / 9 = 1.33x
    monkeypatch.setattr(Calibrator, "measure_costs", lambda self, samples=16: cost_model([1.0] * 3, [0.5] * 3),
                        raising=False)
    with pytest.raises(ValueError, match=r"wall-clock speed-up of 1.8x is out of reach.* at most 1.33x"):
        calibrator.calibrate(speedup=1.8, iterations=4)
    assert scales == []


def test_a_wall_target_below_one_skipped_step_is_refused_before_the_bisection(monkeypatch):
    """`--speedup 1.1 --steps 5` (wall clock): a generation computes all 5 steps or skips step 3, which gives
    5 / (4 + c) = 1.24x with c = 0.03, so 1.1x is no codebook's; refused as soon as the cost model gives c, before
    the distance curves and the reference videos."""
    pipe = types.SimpleNamespace(set_progress_bar_config=lambda **kwargs: None)
    calibrator = Calibrator(pipe, PROMPTS[:1], steps=5)
    scales = _synthetic(calibrator, monkeypatch)
    monkeypatch.setattr(Calibrator, "measure_costs", lambda self, samples=16: cost_model([1.0] * 3, [0.03] * 3),
                        raising=False)
    monkeypatch.setattr(calibrator, "curves", lambda: pytest.fail("the distance curves ran before the target's check"))
    with pytest.raises(ValueError, match=r"wall-clock speed-up of 1.1x is out of reach at 5 steps.*\(1.241x or more; "
                                         r"a skipped step costs 0.030.* at least 1.25, or more steps"):
        calibrator.calibrate(speedup=1.1, iterations=4)
    assert scales == []


def test_a_codebook_that_never_skips_is_no_result(monkeypatch):
    """Where no codebook the bisection measures skips (distances above every threshold reached), the closest to the
    goal computes every step: refused, never written as a codebook for a speed-up."""
    pipe = types.SimpleNamespace(set_progress_bar_config=lambda **kwargs: None)
    calibrator = Calibrator(pipe, PROMPTS[:1], steps=12)
    _synthetic(calibrator, monkeypatch)
    monkeypatch.setattr(calibrator, "measure", lambda config, references: {
        "compute_speedup": 1.0, "wall_speedup": 1.0, "computed_steps": 12.0, "psnr": 100.0})
    with pytest.raises(ValueError, match=r"no codebook for 1.50x compute at 12 steps.* computes every step.*the 3 "
                                         r"measured reached 1.00x to 1.00x\), so it would never skip"):
        calibrator.calibrate(speedup=1.5, wall_clock=False, iterations=3)


def test_fewest_computed_is_what_a_real_cached_run_computes(tiny_pipe):
    from adacache.evaluation.calibrate import fewest_computed

    calibrator = Calibrator(tiny_pipe, PROMPTS[:1], steps=12, guidance=4.0)
    for rate in (2, 4):
        run = calibrator.generate(AdaCacheConfig(codebook={1e9: rate}), PROMPTS[0], 0)
        assert run.computed == fewest_computed(12, rate)
    assert [fewest_computed(30, 10), fewest_computed(12, 4), fewest_computed(4, 2)] == [6, 6, 4]


# --- 3. hostile method names ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name, message", [
    ("fbc:nan", "fbc's threshold must be a number from 0.0001 to 10"),
    ("fbc:inf", "fbc's threshold must be a number from 0.0001 to 10"),
    ("fbc:-1", "must be positive; fbc's threshold must be a number from 0.0001 to 10"),
    ("fbc:1e400", "fbc's threshold must be a number from 0.0001 to 10"),
    ("magcache:1e-30", "magcache's threshold must be a number from 0.0001 to 10"),
    ("static:0", "static's reuse period k .* must be a whole number from 2 to 1000"),
    ("static:1.5", "static's reuse period k .* must be a whole number from 2 to 1000"),
    ("static:1e9", "static's reuse period k .* must be a whole number from 2 to 1000"),
    ("static:99999999999999999999", "must be a whole number from 2 to 1000"),
    ("taylorseer:0", "taylorseer's cache interval must be a whole number from 2 to 1000"),
    ("taylorseer:2.5", "taylorseer's cache interval must be a whole number from 2 to 1000"),
    ("pab:abc", "'abc' is not a valid pab parameter: pab's attention reuse range must be a whole number from 2"),
    ("pab:1", "pab's attention reuse range must be a whole number from 2 to 1000"),
    ("fastercache:-0", "must be positive"),
    ("fbc:", "has an empty parameter after ':'; write fbc \\(its default, 0.05\\) or fbc:0.05"),
    ("static:", "has an empty parameter"),
    ("static:３", "is not a valid static parameter"),  # a fullwidth digit: int() would read it as 3
    ("fbc:０.1", "is not a valid fbc parameter"),
    ("fbc:1_0", "is not a valid fbc parameter"),  # float() would read it as 10
    ("fbc:0x10", "is not a valid fbc parameter"),
    ("auto+moreg+moreg", "\\+moreg is given more than once; write auto\\+moreg"),
    ("static:3+moreg", "\\+moreg applies to AdaCache configs"),
    ("fbc+moreg", "\\+moreg applies to AdaCache configs"),
])
def test_hostile_method_names_are_config_errors_naming_the_method_and_the_range(name, message):
    with pytest.raises(ConfigError, match=message) as error:
        parse_method(name)
    assert repr(name) in str(error.value)


def test_two_names_for_one_setting_are_refused():
    for names in (["fbc:0.1", "fbc:0.10"], ["static:2", "static:02"], ["fbc", "fbc:0.05"]):
        with pytest.raises(ConfigError, match="are the same setting"):
            parse_methods(names)
    assert [m.name for m in parse_methods(["auto", "opensora-30-fast"])] == ["none", "auto", "opensora-30-fast"]


@pytest.mark.parametrize("methods, message", [
    ("none,fbc:nan", "fbc's threshold must be a number from 0.0001 to 10"),
    ("none,static:1e9", "must be a whole number from 2 to 1000"),
    ("auto+moreg+moreg", "+moreg is given more than once"),
    ("fbc:0.1,fbc:0.10", "are the same setting"),
])
def test_the_bench_command_refuses_a_hostile_method_before_loading_the_model(tmp_path, capsys, monkeypatch, methods,
                                                                               message):
    import adacache.pipelines

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS))
    model = tmp_path / "a-pipeline"
    model.mkdir()
    (model / "model_index.json").write_text('{"_class_name": "SomePipeline"}')
    monkeypatch.setattr(adacache.pipelines, "load_pipeline", lambda *a, **k: pytest.fail("the model loaded first"))
    code = main(["bench", "--model", str(model), "--prompts", str(prompts), "--methods", methods,
                 "--out", str(tmp_path / "out"), "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and repr(methods.split(",")[-1]) in err and message in err and "Traceback" not in err


# --- 3. damaged bench folders -----------------------------------------------------------------------------------------
def _settings(**overrides):
    values = dict(model="tiny", prompts=PROMPTS, methods=["none", "static:2"], seeds=[0], steps=6, guidance=4.0,
                  warmup=0, flops=False)
    return BenchSettings(**{**values, **overrides})


def _lines(folder):
    return (folder / "records.rank0.jsonl").read_bytes().splitlines()


def _methods_written(folder):
    return [json.loads(line)["method"] + "@" + json.loads(line)["video"] for line in _lines(folder)]


def test_damaged_record_lines_are_measured_again(tiny_pipe, tmp_path):
    run_bench(tiny_pipe, _settings(), tmp_path, progress=False)
    lines = _lines(tmp_path)
    assert len(lines) == 4  # none and static:2 for two videos
    first = {json.loads(line)["method"] + "@" + json.loads(line)["video"]: line for line in lines}
    damaged = [first["none@p000-s0"], b"\xff\xfe\x00 not text", first["static:2@p000-s0"], b'{"video": 3}',
               first["none@p001-s0"], b"[1, 2, 3]", json.dumps({**json.loads(first["static:2@p001-s0"]),
                                                                   "speedup": "fast"}).encode()]
    (tmp_path / "records.rank0.jsonl").write_bytes(b"\n".join(damaged) + b"\n")
    run_bench(tiny_pipe, _settings(), tmp_path, progress=False)
    records = {(r["video"], r["method"]): r for r in load_records(tmp_path)}
    assert len(records) == 4 and all(r["status"] == "ok" for r in records.values())
    assert json.loads(first["static:2@p000-s0"]) == records[("p000-s0", "static:2")]  # kept as it was
    last = json.loads(_lines(tmp_path)[-1])
    assert (last["method"], last["video"]) == ("static:2", "p001-s0")  # the damaged one, measured again
    json.loads((tmp_path / "report.json").read_text())


def test_a_lost_baseline_record_measures_every_method_of_its_video_again(tiny_pipe, tmp_path):
    run_bench(tiny_pipe, _settings(), tmp_path, progress=False)
    kept = [line for line in _lines(tmp_path) if b'"none"' not in line or b"p000-s0" not in line]
    (tmp_path / "records.rank0.jsonl").write_bytes(b"\n".join(kept) + b"\n")
    run_bench(tiny_pipe, _settings(), tmp_path, progress=False)
    # every speed-up of p000-s0 refers to one baseline time, measured in the same sitting
    assert _methods_written(tmp_path)[-2:] == ["none@p000-s0", "static:2@p000-s0"]
    records = {(r["video"], r["method"]): r for r in load_records(tmp_path)}
    assert records[("p000-s0", "static:2")]["speedup"] == pytest.approx(
        records[("p000-s0", "none")]["seconds"] / records[("p000-s0", "static:2")]["seconds"])


@pytest.mark.parametrize("damage", ["missing", "garbage", "truncated", "another video"])
def test_a_missing_or_damaged_baseline_video_is_generated_again_and_checked(tiny_pipe, tmp_path, damage):
    run_bench(tiny_pipe, _settings(), tmp_path, progress=False)
    video = tmp_path / "videos" / "p000-s0.npy"
    original = np.load(video)
    if damage == "missing":
        video.unlink()
    elif damage == "garbage":
        video.write_bytes(b"not an array")
    elif damage == "truncated":
        video.write_bytes(video.read_bytes()[:200])
    else:
        video.write_bytes((tmp_path / "videos" / "p001-s0.npy").read_bytes())
    # the static:2 record of that video lost: the resumed run needs its baseline video again
    kept = [line for line in _lines(tmp_path) if b"static:2" not in line or b"p000-s0" not in line]
    (tmp_path / "records.rank0.jsonl").write_bytes(b"\n".join(kept) + b"\n")
    before = _methods_written(tmp_path)
    run_bench(tiny_pipe, _settings(), tmp_path, progress=False)
    assert _methods_written(tmp_path) == before + ["static:2@p000-s0"]  # the baseline's record and time kept
    np.testing.assert_array_equal(np.load(video), original)
    records = {(r["video"], r["method"]): r for r in load_records(tmp_path)}
    assert records[("p000-s0", "static:2")]["status"] == "ok" and records[("p000-s0", "static:2")]["psnr"] > 10


def test_a_baseline_video_that_cannot_be_generated_again_is_refused(tiny_pipe, tmp_path, monkeypatch):
    run_bench(tiny_pipe, _settings(prompts=PROMPTS[:1]), tmp_path, progress=False)
    (tmp_path / "videos" / "p000-s0.npy").unlink()
    kept = [line for line in _lines(tmp_path) if b"static:2" not in line]
    (tmp_path / "records.rank0.jsonl").write_bytes(b"\n".join(kept) + b"\n")
    generate = Bench._generate
    monkeypatch.setattr(Bench, "_generate", lambda self, prompt, seed: generate(self, prompt, seed + 1))
    with pytest.raises(ValueError, match="p000-s0.npy is missing, and generating it again gave another video"):
        run_bench(tiny_pipe, _settings(prompts=PROMPTS[:1]), tmp_path, progress=False)


@pytest.mark.parametrize("content", [b"{not json", b"\xff\xfe\x00", b"[1, 2, 3]", b'"settings"', b"{}"])
def test_a_run_json_that_is_not_settings_is_refused_naming_it(tiny_pipe, tmp_path, content):
    (tmp_path / "run.json").write_bytes(content)
    with pytest.raises(ValueError, match=f"{re.escape(str(tmp_path / 'run.json'))} .*pass another --out folder"):
        Bench(tiny_pipe, _settings(), tmp_path).check_settings()


def test_records_without_their_run_json_are_refused(tiny_pipe, tmp_path):
    run_bench(tiny_pipe, _settings(prompts=PROMPTS[:1]), tmp_path, progress=False)
    (tmp_path / "run.json").unlink()
    with pytest.raises(ValueError, match="run.json is missing, but records.rank0.jsonl holds records"):
        run_bench(tiny_pipe, _settings(prompts=PROMPTS[:1], steps=7), tmp_path, progress=False)


@pytest.mark.parametrize("where", ["run.json", "records.rank0.jsonl", "videos/p000-s0.npy", "report.md",
                                   "videos"])
def test_a_folder_where_a_file_belongs_is_refused_before_any_work(tiny_pipe, tmp_path, where, monkeypatch):
    out = tmp_path / "out"
    if where == "videos":
        out.mkdir()
        (out / "videos").write_text("a file where the videos folder belongs")
    else:
        (out / where).mkdir(parents=True)
    monkeypatch.setattr(Bench, "_generate", lambda *args: pytest.fail("generated before the folder was checked"))
    with pytest.raises(ValueError, match=f"{re.escape(str(out / where))} is not a (file|folder).*delete it"):
        run_bench(tiny_pipe, _settings(), out, progress=False)


def test_the_bench_command_reports_a_damaged_folder_without_a_traceback(tmp_path, capsys):
    folder = tmp_path / "pipe"
    build_pipeline("tiny", architecture="wan").save_pretrained(folder)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(PROMPTS[0])
    out = tmp_path / "out"
    out.mkdir()
    (out / "run.json").write_text("[]")
    code = main(["bench", "--model", str(folder), "--prompts", str(prompts), "--methods", "none,static:2",
                 "--steps", "4", "--seeds", "0", "--no-flops", "--warmup", "0", "--out", str(out), "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and f"{out / 'run.json'} holds list JSON" in err and "Traceback" not in err


def test_a_bench_folder_from_before_context_parallelism_resumes(tiny_pipe, tmp_path):
    """run.json written before the context_parallel setting existed (the videos were shared out over processes)
    still resumes: a missing key reads as "none"."""
    import json

    settings = _settings(prompts=PROMPTS[:1])
    run_bench(tiny_pipe, settings, tmp_path, progress=False)
    path = tmp_path / "run.json"
    saved = json.loads(path.read_text())
    del saved["context_parallel"]
    path.write_text(json.dumps(saved))
    run_bench(tiny_pipe, settings, tmp_path, progress=False)  # resumes: nothing left to measure, no refusal
    with pytest.raises(ValueError, match="context_parallel differ"):
        Bench(tiny_pipe, dataclasses.replace(settings, context_parallel="ulysses"), tmp_path).check_settings()
