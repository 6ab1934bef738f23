"""The embedded procedural video domain (generator, captions) and its verifier."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from adacache.embedded import domain as D
from adacache.embedded.verifier import ClipReport, load_clip, verify

ATTRS = ("colour", "shape", "direction", "speed")


def _specs(seed: int, n: int) -> list[D.ClipSpec]:
    rng = np.random.default_rng(seed)
    return [D.sample_clip_spec(rng) for _ in range(n)]


def _agreement(specs, videos) -> dict[str, float]:
    hits = dict.fromkeys(ATTRS, 0)
    for spec, video in zip(specs, videos):
        for attr, ok in verify(video).agrees_with(spec).items():
            hits[attr] += ok
    return {attr: hits[attr] / len(specs) for attr in ATTRS}


# --- generator -------------------------------------------------------------------------------


def test_generator_is_deterministic_from_seed():
    a, b, c = D.clip_batches(7, 16), D.clip_batches(7, 16), D.clip_batches(8, 16)
    for _ in range(3):
        (va, ca), (vb, cb), (vc, _) = next(a), next(b), next(c)
        assert torch.equal(va, vb) and ca == cb
        assert not torch.equal(va, vc)
    assert va.shape == (16, D.FRAMES, 3, D.SIZE, D.SIZE) and va.dtype == torch.float32
    # The batches are the clips of successive sample_clip_spec calls.
    first, captions = next(D.clip_batches(5, 4))
    specs = _specs(5, 4)
    assert captions == [s.caption() for s in specs]
    assert torch.equal(first, torch.stack([D.render(s) for s in specs]))


def test_sample_clip_spec_fixed_attributes_and_distribution():
    rng = np.random.default_rng(0)
    spec = D.sample_clip_spec(rng, colour="blue", shape="triangle", direction="up", speed="fast")
    assert (spec.colour, spec.shape, spec.direction, spec.speed) == ("blue", "triangle", "up", "fast")
    assert D.sample_clip_spec(rng, direction="left").speed in ("slow", "fast")
    assert D.sample_clip_spec(rng, speed="still").direction is None
    with pytest.raises(ValueError):
        D.sample_clip_spec(rng, direction="left", speed="still")
    with pytest.raises(ValueError, match="purple"):
        D.sample_clip_spec(rng, colour="purple")
    specs = _specs(1, 3000)
    still = sum(s.speed == "still" for s in specs) / len(specs)
    assert 0.30 < still < 0.37
    for attr, values in (("colour", D.COLOURS), ("shape", D.SHAPES), ("direction", D.DIRECTIONS)):
        seen = {getattr(s, attr) for s in specs}
        assert seen - {None} == set(values)


def test_clip_spec_validates():
    with pytest.raises(ValueError):
        D.ClipSpec("red", "circle", None, "fast", (8.0, 8.0))
    with pytest.raises(ValueError):
        D.ClipSpec("red", "circle", "left", "still", (8.0, 8.0))
    with pytest.raises(ValueError):
        D.ClipSpec("red", "hexagon", None, "still", (8.0, 8.0))
    spec = D.ClipSpec("red", "circle", "up", "slow", (8, 12))
    assert spec.track() == [(8.0, 12.0 - 0.5 * t) for t in range(D.FRAMES)]


def test_render_in_range_and_in_frame():
    specs = _specs(2, 2000)
    video = D.render_batch(specs)
    assert video.shape == (2000, D.FRAMES, 3, D.SIZE, D.SIZE) and video.dtype == torch.float32
    assert float(video.min()) >= 0.0 and float(video.max()) <= 1.0
    cover = video.amax(dim=2)  # every colour has a channel at 1
    centres = torch.arange(D.SIZE, dtype=torch.float32) + 0.5
    for i, spec in enumerate(specs):
        xmin, xmax, ymin, ymax = D._EXTENTS[spec.shape]
        track = np.array(spec.track())
        assert track[:, 0].min() + xmin >= 0 and track[:, 0].max() + xmax <= D.SIZE
        assert track[:, 1].min() + ymin >= 0 and track[:, 1].max() + ymax <= D.SIZE
        # Nothing is cut off: the coverage centroid is the track point (to the sampling grid's precision).
        m = cover[i]
        area = m.sum(dim=(1, 2))
        cx = (m.sum(dim=1) * centres).sum(dim=1) / area
        cy = (m.sum(dim=2) * centres).sum(dim=1) / area
        assert torch.allclose(cx, torch.tensor(track[:, 0], dtype=torch.float32), atol=0.1)
        assert torch.allclose(cy, torch.tensor(track[:, 1], dtype=torch.float32), atol=0.1)
        # The colour is the palette colour where the object covers the whole pixel.
        full = m[0] == 1.0
        assert torch.equal(video[i, 0][:, full].T[0], torch.tensor(D.COLOURS[spec.colour]))
    # Fast objects moving right start in the left part of the frame.
    assert max(s.start[0] for s in specs if s.direction == "right" and s.speed == "fast") <= 6.0


def test_render_table_matches_direct_supersampling_and_off_grid_starts():
    for spec in _specs(3, 20):
        direct = np.stack([D._coverage(spec.shape, x, y) for x, y in spec.track()])
        assert np.array_equal(D.render(spec).amax(dim=1).numpy(), direct)
    off = D.ClipSpec("green", "square", "right", "slow", (5.1, 7.33))
    video = D.render(off)
    assert video.shape == (D.FRAMES, 3, D.SIZE, D.SIZE)
    assert abs(float(video[:, 1].sum(dim=(1, 2)).mean()) - 36.0) < 0.5  # area of the 6 x 6 square


def test_generator_is_fast():
    import time

    batches = D.clip_batches(0, 256)
    next(batches)  # builds the render table
    start = time.perf_counter()
    for _ in range(4):
        next(batches)
    rate = 4 * 256 / (time.perf_counter() - start)
    assert rate > 2000, f"{rate:.0f} clips/s"


# --- captions --------------------------------------------------------------------------------


def test_captions_parse_back():
    for spec in _specs(4, 500):
        parsed = D.parse_caption(spec.caption())
        assert parsed == {"colour": spec.colour, "shape": spec.shape, "direction": spec.direction, "speed": spec.speed}
        assert set(spec.caption().split()) <= set(D.VOCABULARY)
    assert D.parse_caption("  A Red CIRCLE, moving left  FAST. ") == {
        "colour": "red",
        "shape": "circle",
        "direction": "left",
        "speed": "fast",
    }
    assert D.parse_caption("yellow triangle standing still")["speed"] == "still"


@pytest.mark.parametrize(
    "text, named",
    [
        ("a purple hexagon moving left fast", ["purple", "hexagon"]),
        ("a red circle moving sideways", ["sideways"]),
        ("a red circle standing fast", []),
        ("a red circle moving left", []),
        ("red moving circle left slow", []),
        ("", []),
    ],
)
def test_parse_caption_errors_list_vocabulary(text, named):
    with pytest.raises(ValueError) as info:
        D.parse_caption(text)
    message = str(info.value)
    for word in named:
        assert repr(word) in message
    for word in D.VOCABULARY:
        assert word in message


def test_prompt_set():
    prompts = D.prompt_set()
    assert len(prompts) == 36 == len(set(prompts))
    parsed = [D.parse_caption(p) for p in prompts]
    for shape in D.SHAPES:
        assert sum(p["shape"] == shape for p in parsed) == 12
    moving = {(p["colour"], p["direction"], p["speed"]) for p in parsed if p["speed"] != "still"}
    assert moving == {(c, d, s) for c in D.COLOURS for d in D.DIRECTIONS for s in ("slow", "fast")}
    assert {p["colour"] for p in parsed if p["speed"] == "still"} == set(D.COLOURS)
    assert D.prompt_set() == prompts


# --- verifier --------------------------------------------------------------------------------


def test_verifier_agrees_with_ground_truth():
    specs = _specs(10, 1000)
    videos = D.render_batch(specs)
    agreement = _agreement(specs, videos)
    assert all(a >= 0.99 for a in agreement.values()), agreement
    report = verify(videos[0])
    assert report.consistency > 0.99
    assert all(p is not None for p in report.track)
    assert np.allclose(np.array(report.track), np.array(specs[0].track()), atol=0.1)


def test_verifier_agrees_on_noisy_clips():
    specs = _specs(11, 1000)
    gen = torch.Generator().manual_seed(0)
    clean = D.render_batch(specs)
    noisy = (clean + 0.05 * torch.randn(clean.shape, generator=gen)).clamp(0, 1)
    agreement = _agreement(specs, noisy)
    assert all(a >= 0.99 for a in agreement.values()), agreement
    assert verify(noisy[0]).consistency > 0.95


def test_verifier_inputs_and_agrees_with():
    spec = D.ClipSpec("blue", "triangle", "down", "fast", (8.0, 6.0))
    video = D.render(spec)
    frames = (video.permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8)  # as read from a file
    big = np.repeat(np.repeat(frames, 4, axis=1), 4, axis=2)  # 64 x 64, averaged back down
    for clip in (video, video.numpy(), frames, big):
        report = verify(clip)
        assert report.caption() == spec.caption()
        assert report.agrees_with(spec) == dict.fromkeys(ATTRS, True)
        assert report.agrees_with(spec.caption()) == dict.fromkeys(ATTRS, True)
    assert load_clip(big).shape == (D.FRAMES, 3, D.SIZE, D.SIZE)
    wrong = verify(video).agrees_with("a blue triangle standing still")
    assert wrong == {"colour": True, "shape": True, "direction": False, "speed": False}


def test_verifier_consistency_and_empty_clips():
    empty = verify(torch.zeros(D.FRAMES, 3, D.SIZE, D.SIZE))
    assert isinstance(empty, ClipReport)
    assert (empty.colour, empty.shape, empty.direction, empty.speed) == (None, None, None, "still")
    assert empty.consistency == 0.0 and empty.track == [None] * D.FRAMES
    video = D.render(D.ClipSpec("red", "square", None, "still", (8.0, 8.0)))
    assert verify(video).consistency > 0.999
    flicker = video.clone()
    flicker[1::2] = 0  # the object disappears in every other frame
    report = verify(flicker)
    assert report.track[1] is None and report.colour == "red" and report.speed == "still"
    assert report.consistency < 0.9
    recolour = video.clone()
    recolour[::2] = D.render(D.ClipSpec("yellow", "square", None, "still", (8.0, 8.0)))[::2]
    assert verify(recolour).consistency < 0.75
    speck = video.clone()
    speck[:, :, 0, 0] = 1.0  # an isolated bright pixel is ignored
    assert verify(speck).track == verify(video).track


def test_verifier_reads_mp4(tmp_path):
    iio = pytest.importorskip("imageio.v3")
    pytest.importorskip("imageio_ffmpeg")
    specs = _specs(12, 16)
    misses = 0
    for i, spec in enumerate(specs):
        frames = (D.render(spec).permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8)
        path = tmp_path / f"clip{i}.mp4"
        iio.imwrite(path, frames, fps=8)
        report = verify(path)
        assert len(report.track) == D.FRAMES
        misses += not all(report.agrees_with(spec).values())
    assert misses <= 1  # lossy 4:2:0 compression of 16 x 16 frames; 1000 clips measured: see the report
