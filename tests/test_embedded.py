"""The embedded model's parts: text encoder, pipeline, training (smoke), export, and `adacache generate`."""

import json
import logging

import pytest
import torch

from adacache.cli import main
from adacache.embedded.domain import VOCABULARY
from adacache.embedded.pipeline import EmbeddedVideoPipeline
from adacache.embedded.text_encoder import VocabTextEncoder
from adacache.embedded.train import TrainConfig, build_pipeline, export, train


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A tiny model trained for 4 steps, then exported as a pipeline folder."""
    run = tmp_path_factory.mktemp("run")
    config = TrainConfig(size="tiny", steps=4, batch_size=2, eval_every=0, checkpoint_every=2, threads=1)
    train(run, config, progress=False)
    return export(run / "checkpoint.pt", run / "export")


def test_text_encoder_roundtrip_and_vocabulary(tmp_path):
    encoder = VocabTextEncoder(vocabulary=list(VOCABULARY), dim=8, max_length=8)
    ids = encoder.tokenize(["a red circle moving left fast", ""])
    assert ids[0, :6].tolist() == [encoder.index[w] for w in "a red circle moving left fast".split()]
    assert ids[1].tolist() == [0] * 8  # the empty caption is all padding: the unconditional input
    assert encoder.unknown_words("a purple circle dancing") == ["purple", "dancing"]
    with pytest.raises(ValueError, match="at most 8"):
        encoder.tokenize(["a red circle moving left fast and very far away"])
    encoder.save_pretrained(tmp_path)
    loaded = VocabTextEncoder.from_pretrained(tmp_path)
    assert torch.equal(loaded(ids), encoder(ids))


def test_training_resumes_and_logs(tmp_path):
    config = TrainConfig(size="tiny", steps=3, batch_size=2, eval_every=0, checkpoint_every=100, threads=1)
    train(tmp_path, config, progress=False)
    assert torch.load(tmp_path / "checkpoint.pt", weights_only=False)["step"] == 3
    train(tmp_path, TrainConfig(**{**config.__dict__, "steps": 5}), progress=False)
    state = torch.load(tmp_path / "checkpoint.pt", weights_only=False)
    assert state["step"] == 5 and state["config"]["size"] == "tiny"
    steps = [json.loads(line)["step"] for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5]
    assert not list(tmp_path.glob("*.tmp"))


def test_training_is_reproducible_from_the_seed(tmp_path):
    config = TrainConfig(size="tiny", steps=2, batch_size=2, eval_every=0, threads=1)
    for name in ("a", "b"):
        train(tmp_path / name, config, progress=False)
    a, b = (torch.load(tmp_path / n / "checkpoint.pt", weights_only=False) for n in ("a", "b"))
    assert all(torch.equal(a["transformer"][k], b["transformer"][k]) for k in a["transformer"])


def test_exported_pipeline_generates_deterministically(exported, caplog):
    pipe = EmbeddedVideoPipeline.from_pretrained(exported, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    run = lambda seed: pipe("a red circle moving left fast", num_inference_steps=3,  # noqa: E731
                            generator=torch.Generator().manual_seed(seed)).frames
    first = run(0)
    assert first.shape == (1, 8, 3, 16, 16) and 0 <= first.min() and first.max() <= 1
    assert torch.equal(first, run(0)) and not torch.equal(first, run(1))
    with caplog.at_level(logging.WARNING):
        pipe("a purple circle", num_inference_steps=1)
    assert "purple" in caplog.text and "red" in caplog.text  # shows the vocabulary
    with pytest.raises(ValueError, match="empty"):
        pipe("  ", num_inference_steps=1)
    with pytest.raises(ValueError, match="positive"):
        pipe("a red circle", num_inference_steps=0)


def test_generate_cli_writes_videos_atomically(exported, tmp_path, capsys):
    out = tmp_path / "clip.mp4"
    assert main(["generate", "a blue square moving up slow", "-o", str(out), "--model", str(exported), "--steps", "4",
                 "--compare", "--gif", "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "speed-up" in printed and "PSNR" in printed and "computed" in printed
    import imageio.v3 as iio

    frames = iio.imread(out)
    assert frames.shape[0] == 8 and frames.shape[2] > frames.shape[1]  # side by side
    assert (tmp_path / "clip.gif").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["clip.gif", "clip.mp4"]  # no temporary files left
    import os

    umask = os.umask(0)
    os.umask(umask)
    assert out.stat().st_mode & 0o777 == 0o666 & ~umask  # not mkstemp's 0600
    assert main(["generate", "a blue square standing still", "-o", str(tmp_path / "plain.mp4"), "--model",
                 str(exported), "--steps", "2", "--cache", "none", "--no-progress"]) == 0


@pytest.mark.parametrize(
    "argv, message",
    [
        (["generate", "", "-o", "{tmp}/x.mp4"], "prompt is empty"),
        (["generate", "a red circle", "-o", "{tmp}/missing/x.mp4"], "does not exist"),
        (["generate", "a red circle", "-o", "{tmp}/x.avi"], "must end in"),
        (["generate", "a red circle", "-o", "{tmp}/x.mp4", "--cache", "nonsense"], "neither a preset"),
    ],
)
def test_generate_cli_bad_input(argv, message, exported, tmp_path, capsys):
    argv = [a.format(tmp=tmp_path) for a in argv] + ["--model", str(exported), "--no-progress"]
    assert main(argv) == 2
    assert message in capsys.readouterr().err
    assert not list(tmp_path.iterdir())  # nothing written


@pytest.mark.parametrize("flag", [["--steps", "0"], ["--seed", "-1"]])
def test_generate_cli_bad_numbers(flag, tmp_path):
    with pytest.raises(SystemExit) as exit_info:
        main(["generate", "a red circle", "-o", str(tmp_path / "x.mp4"), *flag])
    assert exit_info.value.code == 2
    assert not list(tmp_path.iterdir())


def test_generate_cli_with_a_real_diffusers_pipeline(tmp_path, capsys):
    from tiny_pipelines import save_tiny_pipeline

    folder = save_tiny_pipeline("wan", tmp_path / "wan")
    out = tmp_path / "wan.mp4"
    assert main(["generate", "a red circle moving left", "-o", str(out), "--model", str(folder), "--steps", "4",
                 "--height", "32", "--width", "32", "--num-frames", "9", "--no-progress"]) == 0
    assert out.is_file() and "cond: computed" in capsys.readouterr().out


@pytest.mark.parametrize("architecture", ["wan", "latte"])
def test_fresh_pipeline_of_either_architecture_generates_domain_clips(architecture):
    pipe = build_pipeline("tiny", architecture=architecture)
    assert pipe.text_encoder.words[2:] == list(VOCABULARY)
    pipe.set_progress_bar_config(disable=True)
    frames = pipe(["a red circle moving left fast"], num_inference_steps=2).frames
    assert frames.shape == (1, 8, 3, 16, 16) and frames.min() >= 0 and frames.max() <= 1


def test_unknown_architecture_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown architecture 'dit'; known: wan, latte"):
        build_pipeline("tiny", architecture="dit")


def test_the_frame_channel_tells_time_and_is_absent_from_older_models():
    from adacache.embedded.pipeline import with_frame_channel

    clip = torch.randn(2, 3, 8, 16, 16)
    with_channel = build_pipeline("tiny", architecture="wan").transformer
    without = build_pipeline("tiny", architecture="wan", frame_channel=False).transformer
    assert with_frame_channel(without, clip) is clip
    given = with_frame_channel(with_channel, clip)
    assert given.shape == (2, 4, 8, 16, 16) and torch.equal(given[:, :3], clip)
    assert torch.equal(given[0, 3, :, 0, 0], torch.linspace(-1, 1, 8)) and torch.equal(given[1, 3], given[0, 3])
    pipe = build_pipeline("tiny", architecture="wan")
    pipe.set_progress_bar_config(disable=True)
    assert pipe("a red circle", num_inference_steps=2).frames.shape == (1, 8, 3, 16, 16)  # RGB out, not 4 channels


def test_a_run_initialised_from_an_older_checkpoint_starts_from_its_exact_function(tmp_path):
    from adacache.embedded.pipeline import with_frame_channel
    from adacache.embedded.train import _initialise_from, load_checkpoint

    old = TrainConfig(size="tiny", steps=2, batch_size=2, eval_every=0, threads=1, frame_channel=False)
    train(tmp_path / "old", old, progress=False)
    state, config = load_checkpoint(tmp_path / "old" / "checkpoint.pt")
    assert config.frame_channel is False
    before = build_pipeline("tiny", architecture="wan", frame_channel=False)
    before.transformer.load_state_dict(state["ema_transformer"])
    new_config = TrainConfig(size="tiny", steps=2, batch_size=2, eval_every=0, threads=1,
                             init_from=str(tmp_path / "old" / "checkpoint.pt"))
    pipe, ema = (build_pipeline("tiny", architecture="wan") for _ in range(2))
    _initialise_from(new_config.init_from, new_config, pipe, ema)
    x, text = torch.randn(2, 3, 8, 16, 16), torch.randn(2, 8, 16)
    t = torch.full((2,), 500.0)
    with torch.no_grad():
        expected = before.transformer(x, timestep=t, encoder_hidden_states=text, return_dict=False)[0]
        got = ema.transformer(with_frame_channel(ema.transformer, x), timestep=t, encoder_hidden_states=text,
                              return_dict=False)[0]
    assert torch.allclose(got, expected, atol=1e-6)
    train(tmp_path / "new", new_config, progress=False)  # and trains on
    state, config = load_checkpoint(tmp_path / "new" / "checkpoint.pt")
    assert config.frame_channel and config.init_from.endswith("checkpoint.pt") and state["step"] == 2
    with pytest.raises(ValueError, match="init-from"):
        _initialise_from(new_config.init_from, TrainConfig(size="small", init_from="x"), pipe, ema)
