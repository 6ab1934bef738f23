"""adacache.pipelines: the one road from the command line, the page, the bench and the demo to a pipeline (which
model, loading, the checks before a generation, the `auto` rule, uncached then cached from one seed, the bounds)."""

import ast
import dataclasses
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import adacache
from adacache import AdaCacheConfig, ConfigError, apply_adacache, reconfigure, remove_adacache
from adacache.cli import build_parser
from adacache.embedded.pipeline import WEIGHTS_DIR
from adacache.evaluation.methods import parse_method
from adacache.hooks import is_applied
from adacache.pipelines import (AUTO_FALLBACK, AUTO_FALLBACK_LABEL, MAX_GUIDANCE, MAX_SEED, MAX_STEPS,
                                MAX_TRAIN_SEED, PAGE_MAX_STEPS,
                                PAGE_MIN_STEPS, auto_choice, auto_config, calibrated_codebooks, check_prompts,
                                finite_step_check, first_video, generation, model_kind, uncached_then_cached)
from adacache.serve import WebPage

from tiny_pipelines import TINY_PIPELINE_CALL, load_tiny_pipeline, save_tiny_pipeline  # tests/

SRC = Path(adacache.__file__).parent
NEVER_SKIPS = AdaCacheConfig(codebook={1.0: 1})  # every distance is below 1.0 -> rate 1: every step computed


# --- the auto rule ---------------------------------------------------------------------------------------------------
# The shipped codebooks: adacache.json and adacache-moreg.json (30 steps, also any step count without its own),
# adacache-100.json and adacache-100-moreg.json.
@pytest.mark.parametrize("steps, moreg, shipped", [
    (30, False, "adacache.json"), (30, True, "adacache-moreg.json"),
    (50, False, "adacache.json"), (50, True, "adacache-moreg.json"),
    (100, False, "adacache-100.json"), (100, True, "adacache-100-moreg.json"),
])
def test_auto_on_the_embedded_model_is_its_codebook_for_the_step_count(steps, moreg, shipped):
    assert (WEIGHTS_DIR / shipped).is_file()
    assert auto_config(None, steps, moreg) == (str(WEIGHTS_DIR / shipped), f"the embedded model's {shipped}")
    # the bench's auto[+moreg] and the page's auto take the same file
    expected = AdaCacheConfig.load(str(WEIGHTS_DIR / shipped))
    expected = dataclasses.replace(expected, moreg=True) if moreg else expected
    assert parse_method("auto+moreg" if moreg else "auto", calibrated_codebooks(None, steps)).adacache == expected
    config, label = WebPage(object(), "unused").resolve_cache("auto", steps, moreg)
    assert label == f"auto: the embedded model's {shipped}" + (" + MoReg" if moreg else "")
    assert config == expected


@pytest.mark.parametrize("moreg", [False, True])
def test_auto_for_a_model_pipeline_is_the_fallback_preset(tmp_path, moreg):
    assert AUTO_FALLBACK in adacache.PRESETS
    assert calibrated_codebooks("Wan-AI/Wan2.1-T2V-1.3B-Diffusers", 30) is None
    assert auto_config("Wan-AI/Wan2.1-T2V-1.3B-Diffusers", 30, moreg) == (AUTO_FALLBACK, AUTO_FALLBACK_LABEL)
    assert auto_config(str(tmp_path), 100, moreg) == (AUTO_FALLBACK, AUTO_FALLBACK_LABEL)  # even a folder of the embedded
    assert parse_method("auto+moreg" if moreg else "auto").adacache.codebook == \
        AdaCacheConfig.from_preset(AUTO_FALLBACK).codebook
    config, label = WebPage(object(), "unused", model="someone/a-model").resolve_cache("auto", 30, moreg)
    assert label == f"auto: {AUTO_FALLBACK_LABEL}" + (" + MoReg" if moreg else "")
    assert config.calibration_free and config.speedup == 2.0


def test_auto_choice_takes_moreg_where_one_ships_else_plain_else_the_fallback():
    assert auto_choice({"plain": "p.json", "moreg": "m.json"}, moreg=True) == "m.json"
    assert auto_choice({"plain": "p.json", "moreg": "m.json"}, moreg=False) == "p.json"
    assert auto_choice({"plain": "p.json", "moreg": None}, moreg=True) == "p.json"
    assert auto_choice({"plain": None, "moreg": None}, moreg=True) == AUTO_FALLBACK
    assert auto_choice(Path("one.json"), moreg=True) == "one.json"
    assert auto_choice(None) == AUTO_FALLBACK


# --- which model ----------------------------------------------------------------------------------------------------
def _folder(tmp_path, name, index):
    folder = tmp_path / name
    folder.mkdir()
    if index is not None:
        (folder / "model_index.json").write_text(index)
    return str(folder)


def test_model_kind_names_the_embedded_model_and_diffusers_pipelines(tmp_path):
    assert model_kind(None) == "embedded"
    assert model_kind(_folder(tmp_path, "export", '{"_class_name": "EmbeddedVideoPipeline"}')) == "embedded"
    assert model_kind(_folder(tmp_path, "wan", '{"_class_name": "WanPipeline"}')) == "diffusers"
    assert model_kind("Wan-AI/Wan2.1-T2V-1.3B-Diffusers") == "diffusers"
    assert model_kind("gpt2") == "diffusers"  # a hub id without an owner


@pytest.mark.parametrize("make, message", [
    (lambda tmp: "  ", "--model is empty"),
    (lambda tmp: _folder(tmp, "bare", None), "a folder without model_index.json"),
    (lambda tmp: _folder(tmp, "broken", "{not json"), "cannot read"),
    (lambda tmp: _folder(tmp, "listed", "[1, 2]"), "must hold a JSON object"),
    (lambda tmp: (tmp / "file.bin").write_text("x") and str(tmp / "file.bin"), "is a file"),
    (lambda tmp: "not a hub id!", "no such folder, and not a hub id"),
    (lambda tmp: "a/b/c", "no such folder, and not a hub id"),
])
def test_model_kind_refuses_what_cannot_be_a_pipeline(tmp_path, make, message):
    with pytest.raises(ConfigError, match=message):
        model_kind(make(tmp_path))


# --- checks and the first video -------------------------------------------------------------------------------------
class _Encoder:
    def check_prompt(self, prompt):
        if "nothing" in prompt:
            raise ValueError(f"the prompt {prompt!r} has no word the embedded model knows")
        return [word for word in prompt.split() if word.startswith("x")]


class _EncodedPipe:
    text_encoder = _Encoder()


def test_check_prompts_refuses_an_unreadable_prompt_and_returns_unknown_words():
    assert check_prompts(_EncodedPipe(), ["a red xcircle", "a xblue square"]) == ["xcircle", "xblue"]
    with pytest.raises(ValueError, match="no word"):
        check_prompts(_EncodedPipe(), ["a red circle", "nothing known"])
    assert check_prompts(object(), ["any text at all"]) == []  # other pipelines read any text


def test_first_video_takes_the_first_of_any_output():
    frames = torch.rand(2, 3, 4, 4, 3)  # (B, T, H, W, 3)
    video = first_video(type("Output", (), {"frames": frames})())
    assert isinstance(video, np.ndarray) and video.dtype == np.float32 and np.array_equal(video, frames[0].numpy())
    assert first_video((frames.bfloat16(),)).dtype == np.float32  # numpy has no bfloat16
    uint8 = np.zeros((1, 3, 4, 4, 3), np.uint8)
    assert first_video((uint8,)).dtype == np.uint8
    from PIL import Image

    images = [[Image.fromarray(np.full((4, 4, 3), value, np.uint8)) for value in (0, 128, 255)]]
    stacked = first_video((images,))
    assert stacked.shape == (3, 4, 4, 3) and list(stacked[:, 0, 0, 0]) == [0, 128, 255]


def test_finite_step_check_stops_at_the_first_non_finite_step(tiny_wan):
    _, pipe = tiny_wan
    assert finite_step_check(lambda prompt, num_inference_steps=30: None, 5) == {}  # no callback_on_step_end
    call = finite_step_check(pipe, 5)
    check = call["callback_on_step_end"]
    assert call["callback_on_step_end_tensor_inputs"] == ["latents"]
    assert check(pipe, 0, None, {"latents": torch.zeros(2)}) == {}
    with pytest.raises(FloatingPointError, match="at step 3 of 5"):
        check(pipe, 2, None, {"latents": torch.tensor([0.0, math.nan])})


# --- uncached, then cached from one seed ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_wan(tmp_path_factory):
    folder = save_tiny_pipeline("wan", tmp_path_factory.mktemp("wan"))
    pipe = load_tiny_pipeline(folder)
    pipe.set_progress_bar_config(disable=True)
    return folder, pipe


def _tiny_run(pipe, steps=4):
    call = {key: value for key, value in TINY_PIPELINE_CALL["wan"].items()
            if key not in ("guidance_scale", "output_type")}  # generation sets these
    return generation(pipe, "a red circle moving left", steps=steps, seed=3,
                      guidance=TINY_PIPELINE_CALL["wan"]["guidance_scale"], call=call)


def test_a_codebook_that_never_skips_gives_the_uncached_video_bit_for_bit(tiny_wan):
    _, pipe = tiny_wan
    warm_ups = []
    runs = uncached_then_cached(pipe, NEVER_SKIPS, _tiny_run(pipe), warm_up=lambda: warm_ups.append(1))
    assert warm_ups == [1]
    assert runs.uncached.dtype == np.uint8 and runs.uncached.shape == (9, 32, 32, 3)
    assert np.array_equal(runs.uncached, runs.cached)
    assert [s.computed_steps for s in runs.stats] == [[1, 2, 3, 4]] * 2  # cond and uncond, every step
    assert runs.uncached_seconds > 0 and runs.cached_seconds > 0 and runs.speedup > 0
    assert not is_applied(pipe)  # applied for the cached run only


def test_a_paused_cache_is_reconfigured_for_the_cached_run_and_paused_again(tiny_wan):
    """As under context parallelism: AdaCache stays on the pipeline, paused outside the cached run."""
    _, pipe = tiny_wan
    run = _tiny_run(pipe, steps=8)
    apply_adacache(pipe, NEVER_SKIPS)
    reconfigure(pipe, None)
    try:
        same = uncached_then_cached(pipe, NEVER_SKIPS, run, paused=True)
        assert np.array_equal(same.uncached, same.cached)
        runs = uncached_then_cached(pipe, AdaCacheConfig(codebook={1e9: 2}), run, paused=True)  # rate 2 throughout
        assert all(len(s.computed_steps) < 8 for s in runs.stats)
        assert is_applied(pipe) and np.array_equal(run(), runs.uncached)  # paused again: uncached
    finally:
        remove_adacache(pipe)


def test_the_demo_takes_the_same_road():
    from adacache.demo import run_demo

    result = run_demo(NEVER_SKIPS, num_steps=3, seed=0, progress=False)
    assert result.psnr_db == math.inf and result.computed_steps == [1, 2, 3]


# --- the bounds -----------------------------------------------------------------------------------------------------
def _parses(argv) -> bool:
    try:
        build_parser().parse_args(argv)
    except SystemExit:
        return False
    return True


def test_the_command_line_takes_its_bounds_from_pipelines(capsys):
    for command in (["generate", "x"], ["bench"], ["calibrate", "-o", "x.json"], ["demo"]):
        assert _parses([*command, "--steps", str(MAX_STEPS)])
        assert not _parses([*command, "--steps", str(MAX_STEPS + 1)])
    for command in (["generate", "x"], ["bench"], ["calibrate", "-o", "x.json"]):
        assert _parses([*command, "--guidance", f"{MAX_GUIDANCE:g}"])
        assert not _parses([*command, "--guidance", f"{MAX_GUIDANCE * 1.01:g}"])
    for command in (["generate", "x"], ["demo"]):
        assert _parses([*command, "--seed", str(MAX_SEED)])
        assert not _parses([*command, "--seed", str(MAX_SEED + 1)])
    assert _parses(["train", "--seed", str(MAX_TRAIN_SEED)])
    assert not _parses(["train", "--seed", str(MAX_TRAIN_SEED + 1)])
    assert f"1 to {MAX_STEPS}" in capsys.readouterr().err


def test_the_page_takes_its_bounds_from_pipelines():
    page = WebPage(object(), "unused")
    good = dict(prompt="a red circle", cache="auto", moreg=False, steps=PAGE_MAX_STEPS, seed=MAX_SEED,
                guidance=MAX_GUIDANCE)
    assert page.check_inputs(**good)[3:6] == (PAGE_MAX_STEPS, MAX_SEED, MAX_GUIDANCE)
    assert page.check_inputs(**{**good, "steps": PAGE_MIN_STEPS})[3] == PAGE_MIN_STEPS
    for bad, message in [({"steps": PAGE_MAX_STEPS + 1}, f"from {PAGE_MIN_STEPS} to {PAGE_MAX_STEPS}"),
                         ({"steps": PAGE_MIN_STEPS - 1}, f"from {PAGE_MIN_STEPS} to {PAGE_MAX_STEPS}"),
                         ({"seed": MAX_SEED + 1}, f"from 0 to {MAX_SEED}"),
                         ({"guidance": MAX_GUIDANCE * 1.01}, f"from 0 to {MAX_GUIDANCE:g}")]:
        with pytest.raises(ConfigError, match=message):
            page.check_inputs(**{**good, **bad})


BOUNDS = {"MAX_STEPS", "PAGE_MIN_STEPS", "PAGE_MAX_STEPS", "MIN_STEPS", "MAX_GUIDANCE", "MAX_SEED", "MAX_TRAIN_SEED",
          "AUTO_FALLBACK"}


def test_the_bounds_and_the_fallback_are_defined_in_pipelines_only():
    defined = {}
    for path in SRC.rglob("*.py"):
        for node in ast.parse(path.read_text()).body:
            targets = node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(
                node, ast.AnnAssign) else []
            names = [n.id for t in targets for n in ast.walk(t) if isinstance(n, ast.Name)]
            for name in set(names) & BOUNDS:
                defined.setdefault(name, []).append(path.name)
    assert defined == {name: ["pipelines.py"] for name in BOUNDS - {"MIN_STEPS"}}
    assert AUTO_FALLBACK not in (SRC / "serve.py").read_text()
    assert "_auto_source" not in (SRC / "evaluation" / "methods.py").read_text()
    assert "def auto_config" not in (SRC / "embedded" / "pipeline.py").read_text()


def test_importing_pipelines_is_light():
    code = ("import sys, adacache.pipelines; "
            "print(sorted(m for m in ('torch', 'numpy', 'diffusers') if m in sys.modules))")
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout == "[]\n"
