"""Real diffusers pipelines, built tiny, saved and reloaded with from_pretrained from a local folder.

Wan calls its transformer twice per step (cond, uncond) inside cache_context; Latte calls it once per step with
both CFG halves batched and opens no cache_context.
"""

import numpy as np
import pytest
import torch

from adacache import AdaCacheConfig, apply_adacache, get_stats, remove_adacache

from tiny_pipelines import TINY_PIPELINE_CALL, load_tiny_pipeline, save_tiny_pipeline

SKIP_ALL = AdaCacheConfig(codebook={1e9: 100})
ALWAYS_COMPUTE = AdaCacheConfig(codebook={1.0: 1})


@pytest.fixture(scope="module", params=["wan", "latte"])
def pipeline(request, tmp_path_factory):
    folder = save_tiny_pipeline(request.param, tmp_path_factory.mktemp(request.param))
    return request.param, load_tiny_pipeline(folder)


def generate(kind, pipe, steps=8, seed=0, **kwargs):
    out = pipe("a red circle moving left", num_inference_steps=steps, generator=torch.Generator().manual_seed(seed),
               **{**TINY_PIPELINE_CALL[kind], **kwargs})
    return np.asarray(out.frames if hasattr(out, "frames") else out[0])


def test_rate_one_bit_identical_and_removal(pipeline):
    kind, pipe = pipeline
    reference = generate(kind, pipe)
    apply_adacache(pipe, ALWAYS_COMPUTE)
    try:
        assert np.array_equal(generate(kind, pipe), reference)
    finally:
        remove_adacache(pipe)
    assert np.array_equal(generate(kind, pipe), reference)
    assert "set_timesteps" not in pipe.scheduler.__dict__


def test_schedules_follow_steps_and_branches(pipeline):
    kind, pipe = pipeline
    apply_adacache(pipe.transformer, SKIP_ALL)  # the transformer alone, as most users will
    try:
        uncached_like = generate(kind, pipe, steps=8)
        stats = get_stats(pipe.transformer)
    finally:
        remove_adacache(pipe.transformer)
    branches = {"wan": {"cond", "uncond"}, "latte": {"default"}}[kind]
    assert {s.branch for s in stats} == branches
    for s in stats:
        assert s.steps_seen == 8
        # Wan's cache_context tells the step index and count; Latte's loop (the pipeline running the call, found
        # though AdaCache was applied to the transformer alone) tells the count: the last two steps are forced
        assert s.computed_steps == [1, 2, 7, 8] and s.num_steps == 8 and not s.notes
    assert np.isfinite(uncached_like).all()


@pytest.fixture
def no_pipeline_reset(pipeline, monkeypatch):
    """diffusers resets stateful hooks at the end of each pipeline call; without it, AdaCache's own generation
    detection must find where each run starts."""
    monkeypatch.setattr(pipeline[1], "maybe_free_model_hooks", lambda: None)
    return pipeline


def test_pipeline_level_apply_knows_the_steps_without_cache_context(no_pipeline_reset):
    kind, pipe = no_pipeline_reset
    apply_adacache(pipe, SKIP_ALL)
    try:
        generate(kind, pipe, steps=8)
        generate(kind, pipe, steps=5)  # a new generation with another step count
        stats = get_stats(pipe)
    finally:
        remove_adacache(pipe)
    per_branch = len(stats) // 2
    assert [s.computed_steps for s in stats[:per_branch]] == [[1, 2, 7, 8]] * per_branch
    assert [s.computed_steps for s in stats[per_branch:]] == [[1, 2, 4, 5]] * per_branch
    assert all(not s.notes for s in stats)


def test_interrupted_generation_does_not_leak_into_the_next(no_pipeline_reset):
    kind, pipe = no_pipeline_reset
    config = AdaCacheConfig(codebook={0.05: 3, 0.5: 2, 1e9: 1})
    apply_adacache(pipe, config)
    try:
        fresh = generate(kind, pipe, steps=8)
        fresh_stats = get_stats(pipe)

        def interrupt(p, i, t, kwargs):
            if i == 2:
                p._interrupt = True
            return {}

        generate(kind, pipe, steps=8, seed=1, callback_on_step_end=interrupt)
        again = generate(kind, pipe, steps=8)
        stats = get_stats(pipe)
    finally:
        remove_adacache(pipe)
    assert np.array_equal(fresh, again)
    branches = len({s.branch for s in stats})
    assert [s.computed_steps for s in stats[-branches:]] == [s.computed_steps for s in fresh_stats[-branches:]]
    assert all(s.steps_seen == 3 for s in stats[branches:2 * branches])  # the interrupted one


def test_wan22_two_experts_each_get_their_own_schedule(tmp_path):
    import copy

    from diffusers import WanPipeline

    base = load_tiny_pipeline(save_tiny_pipeline("wan", tmp_path))
    pipe = WanPipeline(tokenizer=base.tokenizer, text_encoder=base.text_encoder, vae=base.vae,
                       scheduler=base.scheduler, transformer=base.transformer,
                       transformer_2=copy.deepcopy(base.transformer), boundary_ratio=0.9)
    pipe.set_progress_bar_config(disable=True)
    apply_adacache(pipe, SKIP_ALL)
    try:
        generate("wan", pipe, steps=8)
        high, low = get_stats(pipe.transformer), get_stats(pipe.transformer_2)
    finally:
        remove_adacache(pipe)
    # Timesteps (shift 7) are 1000, 977, 946, 904, 842, ...: with the boundary at 900 the high-noise expert runs
    # steps 1-4 and the low-noise one steps 5-8. Each starts with no cache and forces what it must.
    for stats in (high, low):
        assert {s.branch for s in stats} == {"cond", "uncond"}
    assert all(s.computed_steps == [1, 2] and s.skipped_steps == [3, 4] for s in high)
    assert all(s.computed_steps == [5, 6, 7, 8] and s.steps_seen == 4 for s in low)
