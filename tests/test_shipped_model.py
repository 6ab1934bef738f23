"""The trained embedded model that ships inside the package."""

import time

import torch

from adacache import AdaCacheConfig, apply_adacache, get_stats, remove_adacache
from adacache.embedded.pipeline import WEIGHTS_DIR, EmbeddedVideoPipeline
from adacache.embedded.verifier import verify


def test_weights_ship_within_budget():
    files = [p for p in WEIGHTS_DIR.rglob("*") if p.is_file()]
    assert {p.name for p in files} >= {"model_index.json", "config.json", "diffusion_pytorch_model.safetensors"}
    assert sum(p.stat().st_size for p in files) <= 20 * 2**20


def test_shipped_model_generates_the_requested_colours_within_a_minute():
    start = time.time()
    pipe = EmbeddedVideoPipeline.from_embedded()
    pipe.set_progress_bar_config(disable=True)
    prompts = ["a red circle moving right fast", "a green square standing still", "a blue triangle moving up slow",
               "a yellow circle moving left fast"]
    frames = pipe(prompts, num_inference_steps=20, generator=torch.Generator().manual_seed(0)).frames
    assert time.time() - start < 60
    assert [verify(clip).colour for clip in frames] == ["red", "green", "blue", "yellow"]


def test_adacache_on_the_shipped_model_skips_steps_and_stays_close():
    pipe = EmbeddedVideoPipeline.from_embedded()
    pipe.set_progress_bar_config(disable=True)
    call = dict(prompt="a red circle moving right fast", num_inference_steps=30)
    reference = pipe(**call, generator=torch.Generator().manual_seed(0)).frames
    apply_adacache(pipe, AdaCacheConfig.load(WEIGHTS_DIR / "adacache.json"))
    try:
        cached = pipe(**call, generator=torch.Generator().manual_seed(0)).frames
        (stats,) = get_stats(pipe)
    finally:
        remove_adacache(pipe)
    assert len(stats.computed_steps) < 30 and stats.computed_steps[-2:] == [29, 30]
    assert verify(cached[0]).colour == "red"
    mse = torch.mean((reference - cached) ** 2).item()
    assert mse < 0.01  # PSNR > 20 dB on [0, 1]


def test_generate_defaults_to_the_embedded_model_and_its_codebook(tmp_path, capsys):
    from adacache.cli import main

    out = tmp_path / "clip.mp4"
    assert main(["generate", "a green square moving down fast", "-o", str(out), "--steps", "30", "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert out.is_file() and "cond_uncond: computed" in printed and "/30 steps" in printed
    assert verify(str(out)).colour == "green"


# --- the deep model: CogVideoX, 24 blocks, text tokens updated by the blocks ------------------------------------------
def test_the_deep_model_ships_within_budget_and_follows_its_prompts():
    from adacache.embedded.pipeline import EMBEDDED_MODELS

    files = [p for p in EMBEDDED_MODELS["deep"].rglob("*") if p.is_file()]
    assert sum(p.stat().st_size for p in files) <= 20 * 2**20
    pipe = EmbeddedVideoPipeline.from_embedded("deep")
    pipe.set_progress_bar_config(disable=True)
    assert type(pipe.transformer).__name__ == "CogVideoXTransformer3DModel"
    assert len(pipe.transformer.transformer_blocks) == 24
    prompts = ["a red circle moving right fast", "a blue square moving up slow", "a yellow triangle standing still"]
    frames = pipe(prompts, num_inference_steps=20, generator=torch.Generator().manual_seed(1)).frames
    for clip, prompt in zip(frames, prompts):
        assert all(verify(clip).agrees_with(prompt).values()), (prompt, verify(clip))


def test_adacache_without_calibration_caches_both_streams_of_the_deep_model():
    pipe = EmbeddedVideoPipeline.from_embedded("deep")
    pipe.set_progress_bar_config(disable=True)
    call = dict(prompt="a green circle moving left fast", num_inference_steps=30)
    reference = pipe(**call, generator=torch.Generator().manual_seed(1)).frames
    apply_adacache(pipe)  # no codebook ships for it: the calibration-free default
    try:
        cached = pipe(**call, generator=torch.Generator().manual_seed(1)).frames
        (stats,) = get_stats(pipe)
    finally:
        remove_adacache(pipe)
    assert 30 / len(stats.computed_steps) > 1.5 and stats.computed_steps[-2:] == [29, 30]
    # a residual per stream: the video tokens and the 8 text tokens, (2 rows, tokens, 64) each, plus the probe
    assert stats.cache_bytes == 2 * (512 + 8 + 512) * 64 * 4
    assert all(verify(reference[0]).agrees_with(call["prompt"]).values())
    assert verify(cached[0]).agrees_with(call["prompt"]) == verify(reference[0]).agrees_with(call["prompt"])
    assert torch.mean((reference - cached) ** 2).item() < 0.01  # PSNR > 20 dB on [0, 1]
