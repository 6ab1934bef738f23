"""The CLI's errors: every user mistake is one `adacache: error: ...` line and exit 2 (argparse's own
usage error for malformed numbers), nothing is written after a failure, and stopping signals unwind without a
traceback. Most tests run the shipped embedded model at 2 steps, or tiny models built here."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from adacache.cli import main
from adacache.embedded.pipeline import EmbeddedVideoPipeline
from adacache.embedded.train import build_pipeline

PROMPT = "a red circle moving right fast"


def _error_line(capsys) -> str:
    """stderr, asserted to be exactly one `adacache: error:` line (library warnings are not errors)."""
    err = capsys.readouterr().err.strip()
    assert err.startswith("adacache: error: ") and "\n" not in err and "Traceback" not in err, err
    return err


def _files(folder) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


@pytest.fixture(scope="module")
def poisoned_folders(tmp_path_factory):
    """Pipelines whose last projection holds NaN: the embedded kind, and a real diffusers WanPipeline."""
    from tiny_pipelines import load_tiny_pipeline, save_tiny_pipeline

    root = tmp_path_factory.mktemp("poisoned")
    embedded = build_pipeline("tiny", architecture="wan")
    wan = load_tiny_pipeline(save_tiny_pipeline("wan", root / "wan-clean"))
    for pipe in (embedded, wan):
        with torch.no_grad():
            pipe.transformer.proj_out.weight.fill_(float("nan"))
    embedded.save_pretrained(root / "embedded")
    wan.save_pretrained(root / "wan")
    return {"embedded": (root / "embedded", []),
            "wan": (root / "wan", ["--height", "32", "--width", "32", "--num-frames", "9"])}


# --- 1. options the embedded model cannot honour, models that cannot load ------------------------------------------
@pytest.mark.parametrize("flag", [["--height", "32"], ["--width", "32"], ["--num-frames", "4"]])
def test_size_options_on_the_embedded_model_are_an_error(flag, tmp_path, capsys):
    assert main(["generate", PROMPT, "-o", str(tmp_path / "x.mp4"), "--steps", "2", "--no-progress", *flag]) == 2
    err = _error_line(capsys)
    assert "16x16" in err and "8 frames" in err and "--model" in err
    assert _files(tmp_path) == []


def _model_command(command: str, tmp_path) -> list[str]:
    """The arguments of `command` (generate, bench or calibrate) before --model, with a prompt file p.txt."""
    prompts = tmp_path / "p.txt"
    prompts.write_text(PROMPT + "\n")
    return {
        "generate": ["generate", PROMPT, "-o", str(tmp_path / "x.mp4"), "--no-progress"],
        "bench": ["bench", "--prompts", str(prompts), "-o", str(tmp_path / "bench"), "--no-progress"],
        "calibrate": ["calibrate", "--prompts", str(prompts), "-o", str(tmp_path / "c.json"), "--speedup", "1.1"],
    }[command]


@pytest.mark.parametrize("command", ["generate", "bench", "calibrate"])
def test_model_folder_without_model_index_is_an_error(command, tmp_path, capsys):
    folder = tmp_path / "not-a-pipeline"
    folder.mkdir()
    argv = _model_command(command, tmp_path)
    assert main([*argv, "--model", str(folder), "--steps", "6"]) == 2
    err = _error_line(capsys)
    assert "model_index.json" in err and str(folder) in err
    assert _files(tmp_path) == ["not-a-pipeline", "p.txt"]  # bench made no output folder


@pytest.mark.parametrize("command", ["generate", "bench", "calibrate"])
def test_uncached_hub_id_is_an_error(command, tmp_path, capsys, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True, raising=False)
    argv = _model_command(command, tmp_path)
    assert main([*argv, "--model", "someone/not-a-model", "--steps", "6"]) == 2
    err = _error_line(capsys)
    assert "'someone/not-a-model'" in err and "hub" in err and "model_index.json" in err
    assert _files(tmp_path) == ["p.txt"]


def test_model_folder_with_broken_model_index_names_the_file(tmp_path, capsys):
    folder = tmp_path / "broken"
    folder.mkdir()
    (folder / "model_index.json").write_text("{not json")
    assert main(["generate", PROMPT, "-o", str(tmp_path / "x.mp4"), "--model", str(folder), "--no-progress"]) == 2
    assert str(folder / "model_index.json") in _error_line(capsys)


# --- 1, 2. numbers checked before any work ----------------------------------------------------------------------
BAD_NUMBERS = [
    (["generate", PROMPT, "--guidance", "inf"], "--guidance"),
    (["generate", PROMPT, "--guidance", "nan"], "--guidance"),
    (["generate", PROMPT, "--guidance", "1e30"], "--guidance"),
    (["generate", PROMPT, "--guidance", "-1"], "--guidance"),
    (["generate", PROMPT, "--steps", "1001"], "--steps"),
    (["generate", PROMPT, "--seed", str(2**64)], "--seed"),
    (["generate", PROMPT, "--model", "x", "--height", "0"], "--height"),
    (["generate", PROMPT, "--model", "x", "--num-frames", "-9"], "--num-frames"),
    (["demo", "--steps", "5000"], "--steps"),
    (["bench", "--repeats", "0"], "--repeats"),
    (["bench", "--warmup", "-1"], "--warmup"),
    (["bench", "--guidance", "nan"], "--guidance"),
    (["bench", "--seeds", f"0,{2**64}"], "--seeds"),
    (["calibrate", "-o", "c.json", "--speedup", "nan"], "--speedup"),
    (["calibrate", "-o", "c.json", "--speedup", "0.5"], "--speedup"),
    (["calibrate", "-o", "c.json", "--psnr", "inf"], "--psnr"),
    (["calibrate", "-o", "c.json", "--speedup", "2", "--iterations", "0"], "--iterations"),
    (["calibrate", "-o", "c.json", "--speedup", "2", "--check", "-1"], "--check"),
    (["calibrate", "-o", "c.json", "--speedup", "2", "--steps", "5"], "--speedup"),
    (["calibrate", "-o", "c.json", "--psnr", "30", "--steps", "2"], "--steps 2"),
    (["train", "--batch-size", "0"], "--batch-size"),
    (["train", "--lr", "nan"], "--lr"),
]


@pytest.mark.parametrize("argv, flag", BAD_NUMBERS, ids=[" ".join(x for x in a if x != PROMPT) for a, _ in BAD_NUMBERS])
def test_numbers_are_checked_before_any_work(argv, flag, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    try:
        code = main(argv)
    except SystemExit as exit_info:  # argparse's usage error
        code = exit_info.code
    assert code == 2
    assert flag in capsys.readouterr().err
    assert _files(tmp_path) == []


# --- 2. non-finite values never become a video ------------------------------------------------------------------
def test_embedded_pipeline_names_the_step_where_latents_went_non_finite():
    pipe = EmbeddedVideoPipeline.from_embedded()
    pipe.set_progress_bar_config(disable=True)
    with pytest.raises(FloatingPointError, match=r"non-finite .* at step \d+ of 3"):
        pipe(PROMPT, num_inference_steps=3, guidance_scale=1e30)
    with pytest.raises(ValueError, match="guidance_scale must be a finite number"):
        pipe(PROMPT, num_inference_steps=1, guidance_scale=float("nan"))


@pytest.mark.parametrize("kind", ["embedded", "wan"])
@pytest.mark.parametrize("cache", ["none", "auto"])
def test_non_finite_generation_writes_no_video(kind, cache, poisoned_folders, tmp_path, capsys):
    folder, sizes = poisoned_folders[kind]
    out = tmp_path / "out"
    out.mkdir()
    assert main(["generate", PROMPT, "-o", str(out / "x.mp4"), "--model", str(folder), "--steps", "3", "--cache",
                 cache, "--gif", "--no-progress", *sizes]) == 2
    assert "non-finite" in _error_line(capsys)
    assert _files(out) == []


def test_to_uint8_refuses_non_finite_frames():
    import numpy as np

    from adacache.video import to_uint8

    frames = np.zeros((2, 4, 4, 3), dtype=np.float32)
    frames[1, 2, 3, 0] = np.nan
    with pytest.raises(FloatingPointError, match="non-finite"):
        to_uint8(frames)


# --- 3. prompts the embedded model cannot read ------------------------------------------------------------------
@pytest.mark.parametrize("prompt", ["!!!", "un cercle rouge", "????? ... ---"])
def test_prompt_without_a_known_word_is_refused(prompt, tmp_path, capsys):
    pipe = EmbeddedVideoPipeline.from_embedded()
    pipe.set_progress_bar_config(disable=True)
    with pytest.raises(ValueError, match="no word the embedded model knows.*red green blue yellow"):
        pipe(prompt, num_inference_steps=1)
    capsys.readouterr()  # the test's own loading bar
    assert main(["generate", prompt, "-o", str(tmp_path / "x.mp4"), "--steps", "2", "--no-progress"]) == 2
    assert "vocabulary" in _error_line(capsys)
    assert _files(tmp_path) == []


def test_too_long_prompt_is_one_clear_error(tmp_path, capsys):
    prompt = "a red circle moving left fast and very far away today"
    assert main(["generate", prompt, "-o", str(tmp_path / "x.mp4"), "--steps", "2", "--no-progress"]) == 2
    err = _error_line(capsys)  # one line: no warning about unknown words before it
    assert "at most 8 words" in err and "11" in err
    assert _files(tmp_path) == []


def test_very_long_prompt_is_cut_short_in_the_error(tmp_path, capsys):
    assert main(["generate", "x" * 10_000, "-o", str(tmp_path / "x.mp4"), "--steps", "2", "--no-progress"]) == 2
    assert len(_error_line(capsys)) < 400


# --- 4. stopping signals ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("signum, code, message", [(signal.SIGINT, 130, "interrupted"),
                                                    (signal.SIGTERM, 143, "terminated")])
def test_a_stopped_generation_exits_quietly_and_leaves_no_file(signum, code, message, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    stderr_path = tmp_path / "stderr.txt"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    command = [sys.executable, "-m", "adacache.cli", "generate", PROMPT, "-o", str(out / "x.mp4"), "--steps", "1000",
               "--gif"]
    with stderr_path.open("w") as stderr:
        # SIGINT at its default, so that Python raises KeyboardInterrupt even when pytest runs in the background
        process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=stderr, text=True,
                                   preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        try:
            deadline = time.monotonic() + 180
            while "/1000" not in stderr_path.read_text():  # the denoising progress bar has started
                assert process.poll() is None, stderr_path.read_text()
                assert time.monotonic() < deadline, "generation did not start"
                time.sleep(0.2)
            process.send_signal(signum)
            stdout, _ = process.communicate(timeout=60)
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()
    err = stderr_path.read_text()
    assert process.returncode == code, err[-2000:]
    assert "Traceback" not in err and err.rstrip().endswith(f"adacache: {message}")
    assert "wrote" not in stdout
    assert _files(out) == []  # no video, no temporary file


# --- 5. unreadable files are named ------------------------------------------------------------------------------
@pytest.mark.parametrize("content", [b"\xff\xfe\x00garbage", b'{"codebook": {}}', b'{"codebook": {"0.1": 2},'
                                     b' "nonsense": 1}', b"[1, 2]", None],
                         ids=["invalid-utf8", "empty-codebook", "unknown-key", "not-an-object", "a-folder"])
@pytest.mark.parametrize("option", ["--cache", "--base"])
def test_a_bad_config_file_is_named_in_the_error(content, option, tmp_path, capsys):
    path = tmp_path / "my-config.json"
    path.mkdir() if content is None else path.write_bytes(content)
    argv = (["generate", PROMPT, "-o", str(tmp_path / "x.mp4"), "--steps", "2", "--no-progress"] if option == "--cache"
            else ["calibrate", "-o", str(tmp_path / "c.json"), "--speedup", "2", "--num-prompts", "1"])
    assert main([*argv, option, str(path)]) == 2
    assert str(path) in _error_line(capsys)
    assert _files(tmp_path) == ["my-config.json"]


def test_a_prompt_file_with_invalid_bytes_is_named(tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_bytes(b"a red circle\n\xff\xfe\n")
    assert main(["bench", "--prompts", str(prompts), "-o", str(tmp_path / "b"), "--no-progress"]) == 2
    assert str(prompts) in _error_line(capsys)


# --- 6. --gif with a .gif output ---------------------------------------------------------------------------------
def test_gif_flag_with_a_gif_output_writes_once(tmp_path, capsys, monkeypatch):
    import adacache.video

    written = []
    write = adacache.video.write_video
    monkeypatch.setattr(adacache.video, "write_video", lambda frames, path, **kw: written.append(path) or write(
        frames, path, **kw))
    assert main(["generate", PROMPT, "-o", str(tmp_path / "x.gif"), "--gif", "--steps", "2", "--no-progress"]) == 0
    printed = capsys.readouterr()
    assert written == [tmp_path / "x.gif"] and "already a GIF" in printed.err and "wrote" in printed.out
    assert _files(tmp_path) == ["x.gif"]


# --- 7. more user mistakes --------------------------------------------------------------------------------------
def test_output_that_is_a_folder_says_so(tmp_path, capsys):
    (tmp_path / "videos").mkdir()
    assert main(["generate", PROMPT, "-o", str(tmp_path / "videos"), "--steps", "2", "--no-progress"]) == 2
    err = _error_line(capsys)
    assert "is a folder" in err and "videos/out.mp4" in err


def test_output_without_suffix_suggests_one(tmp_path, capsys):
    assert main(["generate", PROMPT, "-o", str(tmp_path / "clip"), "--steps", "2", "--no-progress"]) == 2
    assert "clip.mp4" in _error_line(capsys)
    assert _files(tmp_path) == []


def test_output_under_a_file_says_so(tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    assert main(["generate", PROMPT, "-o", str(tmp_path / "file" / "x.mp4"), "--steps", "2", "--no-progress"]) == 2
    assert "not a folder" in _error_line(capsys)


def test_preset_typo_suggests_the_preset(tmp_path, capsys):
    assert main(["generate", PROMPT, "-o", str(tmp_path / "x.mp4"), "--cache", "opensora-30-fats", "--steps", "2",
                 "--no-progress"]) == 2
    err = _error_line(capsys)
    assert "did you mean 'opensora-30-fast'" in err and "opensora-30-slow" in err
    assert _files(tmp_path) == []


def test_missing_config_file_says_it_does_not_exist(tmp_path, capsys):
    assert main(["generate", PROMPT, "-o", str(tmp_path / "x.mp4"), "--cache", str(tmp_path / "mine.json"),
                 "--no-progress"]) == 2
    assert "does not exist" in _error_line(capsys)


@pytest.mark.parametrize("steps", ["1", "2"])
def test_one_and_two_steps_generate_and_overwrite_atomically(steps, tmp_path, capsys):
    out = tmp_path / "x.mp4"
    out.write_bytes(b"an older file")
    assert main(["generate", PROMPT, "-o", str(out), "--steps", steps, "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert f"computed {steps}/{steps} steps" in printed
    assert out.stat().st_size > 100 and _files(tmp_path) == ["x.mp4"]
    import imageio.v3 as iio

    assert iio.imread(out).max() > 0  # a picture, not a black clip


def test_largest_seed_is_accepted(tmp_path):
    assert main(["generate", PROMPT, "-o", str(tmp_path / "x.mp4"), "--steps", "1", "--seed", str(2**64 - 1),
                 "--no-progress"]) == 0


def test_compare_without_a_cache_is_an_error(tmp_path, capsys):
    assert main(["generate", PROMPT, "-o", str(tmp_path / "x.mp4"), "--compare", "--cache", "none", "--steps", "2",
                 "--no-progress"]) == 2
    assert "nothing to compare" in _error_line(capsys)
    assert _files(tmp_path) == []


def test_bench_refuses_a_prompt_the_embedded_model_cannot_read_before_generating(tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(f"{PROMPT}\nun cercle rouge\n")
    assert main(["bench", "--prompts", str(prompts), "--methods", "none", "--seeds", "0", "--steps", "2", "--warmup",
                 "0", "--no-flops", "-o", str(tmp_path / "b"), "--no-progress"]) == 2
    assert "'un cercle rouge' has no word" in _error_line(capsys)
    assert not list((tmp_path / "b").glob("records*"))


# --- 8. a failed video write, empty method names, options that would do nothing ----------------------------------
def test_a_failed_video_write_keeps_the_old_file_and_says_so(tmp_path, monkeypatch):
    """imageio does not report an encoder that failed (a full disk, a killed ffmpeg): the written file is read back
    before it replaces anything."""
    import numpy as np
    import imageio.v2 as imageio

    from adacache.video import write_video

    frames = np.zeros((8, 16, 16, 3), np.uint8)
    for suffix in (".mp4", ".gif"):
        good = write_video(frames, tmp_path / f"x{suffix}", scale=4)
        before = good.read_bytes()
        with monkeypatch.context() as patch:
            patch.setattr(imageio, "mimsave", lambda path, *a, **k: open(path, "wb").close())  # an empty file
            with pytest.raises(OSError, match="readable"):
                write_video(frames, good, scale=4)
        assert good.read_bytes() == before
        assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary file left


@pytest.mark.parametrize("methods", ["", ",,", "none,,auto"])
def test_bench_refuses_empty_method_names(methods, tmp_path, capsys):
    assert main(["bench", "--methods", methods, "-o", str(tmp_path / "b"), "--no-progress"]) == 2
    assert "empty name" in _error_line(capsys)
    assert _files(tmp_path) == []


@pytest.mark.parametrize("argv", [
    ["generate", PROMPT, "--cache", "none", "--moreg"],
    ["generate", PROMPT, "--steps", "3_0"],
    ["generate", PROMPT, "--steps", "\u0663"],  # an Arabic-Indic three
    ["train", "--threads", "100000"],
])
def test_more_options_that_would_do_nothing_or_something_odd_are_refused(argv, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    try:
        code = main([*argv, "--no-progress"])
    except SystemExit as exit:  # argparse's usage error
        code = exit.code
    assert code == 2 and "Traceback" not in capsys.readouterr().err
    assert _files(tmp_path) == []
