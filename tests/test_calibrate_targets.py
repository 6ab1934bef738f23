"""`adacache calibrate` for several targets in one run, and for the forecast store.

1. Several targets share what does not depend on the target: the reference runs, the distance curves, the cost
   model. A codebook one target's bisection measured is not generated again for another, so each result is the one
   a calibration for that target alone gives. Higher speed-up targets get larger threshold scales.
2. Every target is checked before the first bisection; repeated targets, mixed kinds and a file for several
   targets are refused.
3. `--forecast` reaches the cached runs and the configs written (store="forecast").
"""

import collections
import json
import types

import pytest

from adacache.cli import main
from adacache.config import AdaCacheConfig
from adacache.embedded.train import build_pipeline
from adacache.evaluation import calibrate as calibrate_module
from adacache.evaluation.calibrate import Calibrator, CostModel, config_name
from test_calibrate_robust import _synthetic  # made-up measurements, a function of the threshold scale

PROMPTS = ["a red circle moving left fast", "a blue square standing still"]
RECORDER = ((1.0, 1),)  # the rate-1 codebook that records the distance curves


@pytest.fixture(scope="module")
def tiny_pipe():
    return build_pipeline("tiny", architecture="wan")


class PipelineCalls:
    """Counts a pipeline's generations: uncached ones, and cached ones by the codebook (and store) applied."""

    def __init__(self, pipe, monkeypatch) -> None:
        self.uncached, self.cached, self.stores, self.applied = 0, collections.Counter(), set(), None
        apply = calibrate_module.apply_adacache
        remove = calibrate_module.remove_adacache
        call = type(pipe).__call__

        def apply_and_note(pipeline, config):
            self.applied = config
            return apply(pipeline, config)

        def remove_and_forget(pipeline):
            self.applied = None
            return remove(pipeline)

        def counted(pipeline, *args, **kwargs):
            if self.applied is None:
                self.uncached += 1
            else:
                self.cached[tuple(self.applied.codebook.items())] += 1
                self.stores.add(self.applied.store)
            return call(pipeline, *args, **kwargs)

        monkeypatch.setattr(calibrate_module, "apply_adacache", apply_and_note)
        monkeypatch.setattr(calibrate_module, "remove_adacache", remove_and_forget)
        monkeypatch.setattr(type(pipe), "__call__", counted)


# --- 1. shared work, monotone results ---------------------------------------------------------------------------------
def test_several_targets_share_the_references_and_generate_each_codebook_once(tiny_pipe, monkeypatch):
    calls = PipelineCalls(tiny_pipe, monkeypatch)
    said = []
    calibrator = Calibrator(tiny_pipe, PROMPTS[:1], steps=16, guidance=4.0, progress=said.append)
    targets = [1.6, 1.8, 2.0]  # at 16 steps each gets the same codebook shape (rate 4), so their scales compare
    results = calibrator.calibrate_many(speedups=targets, wall_clock=False, iterations=5)

    videos = 1
    assert calls.uncached == 1 + videos  # one warm-up and the references, once for all three targets
    assert calls.cached.pop(RECORDER) == videos  # the distance curves, recorded once
    assert set(calls.cached.values()) == {videos}  # every codebook measured was generated once per video, no more
    lookups = sum(message.startswith("scale ") for message in said)
    reused = sum(message.endswith("(measured before)") for message in said)
    assert lookups == 3 * 5 and reused >= 2  # scale 1, each bisection's first step, is measured once for all three
    assert len(calls.cached) == lookups - reused

    assert [r.about["target"]["speedup"] for r in results] == targets
    assert {r.about["max_rate"] for r in results} == {4}
    scales = [r.about["scale"] for r in results]
    computed = [r.about["reached"]["computed_steps"] for r in results]
    assert scales == sorted(scales) and computed == sorted(computed, reverse=True), (scales, computed)
    assert scales[0] < scales[-1] and computed[0] > computed[-1]
    for result in results:
        assert result.about["calibrated_with"] == [t for t in targets if t != result.about["target"]["speedup"]]

    # the same codebooks as a calibration for each target alone
    for target, result in zip(targets, results):
        alone = Calibrator(tiny_pipe, PROMPTS[:1], steps=16, guidance=4.0).calibrate(speedup=target, wall_clock=False,
                                                                                      iterations=5)
        assert alone.config.codebook == result.config.codebook and alone.about["scale"] == result.about["scale"]


def test_psnr_targets_measure_the_conservative_end_and_shared_scales_once(monkeypatch):
    pipe = types.SimpleNamespace(set_progress_bar_config=lambda **kwargs: None)
    calibrator = Calibrator(pipe, PROMPTS[:1], steps=12)
    scales = _synthetic(calibrator, monkeypatch)
    results = calibrator.calibrate_many(psnrs=[42, 45, 50], iterations=4)
    # the conservative end, then four halvings per target; scale 1 and the conservative end shared by all three
    assert len(scales) == len(set(scales)) < 1 + 3 * 4
    assert scales[0] == pytest.approx(900 ** (1 / 16) / 30) and scales[1] == 1.0
    reached = [r.about["reached"]["psnr"] for r in results]
    assert all(psnr >= target for psnr, target in zip(reached, [42, 45, 50]))
    assert [r.about["scale"] for r in results] == sorted((r.about["scale"] for r in results), reverse=True)
    for target, result in zip([42, 45, 50], results):
        alone = Calibrator(pipe, PROMPTS[:1], steps=12)
        _synthetic(alone, monkeypatch)
        assert alone.calibrate(target_psnr=target, iterations=4).config.codebook == result.config.codebook


def test_held_out_references_are_generated_once_for_every_config_checked(tiny_pipe, monkeypatch):
    calibrator = Calibrator(tiny_pipe, PROMPTS[:1], steps=12, guidance=4.0)
    calls = PipelineCalls(tiny_pipe, monkeypatch)
    held_out = ["a green triangle moving up slow"]
    first = calibrator.check(AdaCacheConfig(codebook={1e9: 2}), held_out)
    second = calibrator.check(AdaCacheConfig(codebook={1e9: 4}), held_out)
    assert calls.uncached == 2  # a warm-up and the one held-out reference, for both configs
    assert first["computed_steps"] > second["computed_steps"]


# --- 2. targets checked before the work -------------------------------------------------------------------------------
@pytest.mark.parametrize("targets, message", [
    ({"speedups": [2.0, 2]}, "the target 2 is given more than once"),
    ({"speedups": [1.5, 2.5]}, r"in \(1, 2.00\] at 12 steps"),
    ({"psnrs": [30, 100]}, r"a PSNR target must be a number of dB in \(0, 100\)"),
    ({"speedups": [1.5], "psnrs": [30]}, "give targets of one kind"),
    ({}, "give targets of one kind"),
])
def test_bad_target_lists_are_refused_before_any_generation(targets, message):
    pipe = types.SimpleNamespace(set_progress_bar_config=lambda **kwargs: None)
    calibrator = Calibrator(pipe, PROMPTS, steps=12)
    calibrator.generate = lambda *args: pytest.fail("a generation ran before the targets were checked")
    with pytest.raises(ValueError, match=message):
        calibrator.calibrate_many(**targets)


def test_wall_targets_share_one_cost_model_and_all_are_checked_before_the_bisection(monkeypatch):
    pipe = types.SimpleNamespace(set_progress_bar_config=lambda **kwargs: None)
    calibrator = Calibrator(pipe, PROMPTS[:1], steps=12)
    scales = _synthetic(calibrator, monkeypatch)
    measured = []
    cost = CostModel((1.0,) * 3, (0.5,) * 3)  # a skipped step at half a computed one: at most 1.33x at 12 steps
    monkeypatch.setattr(Calibrator, "measure_costs", lambda self, samples=16: measured.append(1) or cost)
    with pytest.raises(ValueError, match=r"wall-clock speed-up of 1.8x is out of reach.* at most 1.33x"):
        calibrator.calibrate_many(speedups=[1.1, 1.8], iterations=3)
    assert scales == [] and len(measured) == 1
    results = calibrator.calibrate_many(speedups=[1.1, 1.25], iterations=3, check_repeats=0)
    assert len(measured) == 2  # once more for this run, once for both targets
    assert [r.about["compute_goal"] for r in results] == [pytest.approx(cost.compute_goal(t, 12)) for t in (1.1, 1.25)]
    assert all(r.about["skip_cost"] == 0.5 and "wall_check" not in r.about for r in results)


def test_config_names_say_what_they_are_and_sort_by_target():
    assert config_name(None, 30, 2.5) == "embedded-30-2.50x.json"
    assert config_name(None, 30, 2.5, compute=True, moreg=True, forecast=True) == (
        "embedded-30-2.50x-compute-forecast-moreg.json")
    assert config_name("Wan-AI/Wan2.1-T2V-1.3B-Diffusers/", 50, 32, psnr=True) == (
        "Wan2.1-T2V-1.3B-Diffusers-50-32.0db.json")
    assert config_name("/models/my model", 30, 1.125) == "my-model-30-1.125x.json"  # no precision lost
    at_100 = [config_name(None, 100, t) for t in (16, 2.5, 10, 1.5)]  # up to 16.7x at 100 steps: two digits
    assert sorted(at_100) == [config_name(None, 100, t) for t in (1.5, 2.5, 10, 16)]
    assert sorted(config_name(None, 30, t, psnr=True) for t in (35, 5.5, 28)) == [
        "embedded-30-05.5db.json", "embedded-30-28.0db.json", "embedded-30-35.0db.json"]


# --- 3. the command line ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    """The tiny pipeline, saved as a diffusers folder `--model` loads."""
    folder = tmp_path_factory.mktemp("models") / "tiny-wan"
    build_pipeline("tiny", architecture="wan").save_pretrained(folder)
    return folder


def _files(folder):
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*"))


@pytest.mark.parametrize("argv, message", [
    (["-o", "{tmp}/c.json", "--speedup", "1.5", "2"], "one file, but --speedup 1.5 2 makes 2 configs; give a folder"),
    (["-o", "{tmp}/c.json", "--psnr", "30", "35"], "is one file, but --psnr 30 35 makes 2 configs"),
    (["-o", "{tmp}/out", "--speedup", "2", "2.0"], "--speedup 2 is given more than once"),
    (["-o", "{tmp}/c.txt", "--speedup", "2"], "must be a .json file (one target) or a folder"),
    (["-o", "{tmp}/a-file", "--speedup", "2"], "is a file, not a folder"),
    (["-o", "{tmp}/out/", "--speedup", "1.5", "9"], "in (1, 5.00] at 30 steps"),
    (["-o", "{tmp}/c.json", "--speedup", "1.1", "--steps", "5", "--compute"],
     "1.1x is out of reach at 5 steps: a generation either computes all 5 steps (1.00x) or skips at least one"),
    (["-o", "{tmp}/out", "--speedup", "2", "--forecast", "--base", "{tmp}/paper.json"], "--forecast: paper_mode"),
])
def test_the_command_refuses_bad_outputs_and_targets_before_loading_the_model(argv, message, tmp_path, capsys,
                                                                              monkeypatch):
    import adacache.pipelines

    (tmp_path / "a-file").write_text("not a folder")
    AdaCacheConfig(paper_mode=True).save(tmp_path / "paper.json")
    monkeypatch.setattr(adacache.pipelines, "load_pipeline", lambda *a, **k: pytest.fail("the model loaded first"))
    before = _files(tmp_path)
    assert main(["calibrate", *(a.format(tmp=tmp_path) for a in argv)]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err, err
    assert _files(tmp_path) == before  # no folder made, no file written


def test_the_command_writes_one_named_config_per_target_with_the_forecast_store(tiny_folder, tmp_path, capsys,
                                                                                  monkeypatch):
    stores = set()
    apply = calibrate_module.apply_adacache
    monkeypatch.setattr(calibrate_module, "apply_adacache",
                        lambda pipe, config: stores.add(config.store) or apply(pipe, config))
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS))
    out = tmp_path / "made" / "here"  # two folders created
    argv = ["calibrate", "--model", str(tiny_folder), "--prompts", str(prompts), "--steps", "12", "--compute",
            "--iterations", "3", "--speedup", "2", "1.6", "--forecast", "-o", str(out)]
    assert main(argv) == 0, capsys.readouterr().err
    stdout = capsys.readouterr().out
    names = ["tiny-wan-12-1.60x-compute-forecast.json", "tiny-wan-12-2.00x-compute-forecast.json"]
    assert _files(out) == names  # and no temporary file
    assert stores == {"forecast"}  # every cached run: curves and bisection
    configs = [AdaCacheConfig.load(str(out / name)) for name in names]
    abouts = [json.loads((out / name).read_text())["_about"] for name in names]
    assert all(config.store == "forecast" for config in configs)
    assert [about["target"] for about in abouts] == [{"speedup": t, "psnr": None, "clock": "compute"} for t in (1.6, 2)]
    assert all(about["model"] == str(tiny_folder) for about in abouts)
    assert abouts[0]["scale"] <= abouts[1]["scale"]
    for name in names:
        assert f"wrote {out / name}" in stdout
    table = stdout[stdout.index("target  "):].splitlines()
    assert table[0].split() == ["target", "rate", "scale", "computed", "compute", "wall", "predicted", "wall",
                                "checked", "PSNR", "dB", "file"]
    assert [line.split()[0] for line in table[2:4]] == ["1.6x", "2x"] and str(out / names[1]) in table[3]


def test_one_target_still_writes_the_file_named_and_a_folder_takes_one_target(tiny_folder, tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(PROMPTS[0])
    common = ["calibrate", "--model", str(tiny_folder), "--prompts", str(prompts), "--steps", "12", "--iterations",
              "2", "--psnr", "30"]
    assert main([*common, "-o", str(tmp_path / "mine.json")]) == 0, capsys.readouterr().err
    assert AdaCacheConfig.load(str(tmp_path / "mine.json")).store == "reuse"
    (tmp_path / "existing").mkdir()
    assert main([*common, "--moreg", "-o", str(tmp_path / "existing")]) == 0, capsys.readouterr().err
    assert _files(tmp_path / "existing") == ["tiny-wan-12-30.0db-moreg.json"]
    assert json.loads((tmp_path / "existing" / "tiny-wan-12-30.0db-moreg.json").read_text())["moreg"] is True


def test_check_measures_every_codebook_on_held_out_prompts_generated_once(tiny_pipe, tmp_path, capsys, monkeypatch):
    """--check on the embedded model's prompt set; the tiny model of the same family stands in for the shipped one
    (it loads and runs in a fraction of the time)."""
    import adacache.pipelines

    monkeypatch.setattr(adacache.pipelines, "load_pipeline", lambda *args, **kwargs: tiny_pipe)
    calls = PipelineCalls(tiny_pipe, monkeypatch)
    argv = ["calibrate", "--num-prompts", "1", "--check", "1", "--steps", "12", "--compute", "--iterations", "2",
            "--speedup", "1.6", "2", "-o", str(tmp_path)]
    assert main(argv) == 0, capsys.readouterr().err
    stdout = capsys.readouterr().out
    # a warm-up and one reference for the calibration prompt; the same again for the held-out prompt, once
    assert calls.uncached == 4
    names = ["embedded-12-1.60x-compute.json", "embedded-12-2.00x-compute.json"]
    assert _files(tmp_path) == names
    for name in names:
        held = json.loads((tmp_path / name).read_text())["_about"]["held_out"]
        assert len(held["prompts"]) == 1 and 1 <= held["reached"]["compute_speedup"] <= 2
    assert "held-out computed" in stdout and "held-out PSNR dB" in stdout
