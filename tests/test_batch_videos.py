"""Several videos in one call (issue 12): each video gets its own schedule, takes the steps it takes alone, and a
step runs the blocks only on the videos that compute it.

The check everywhere: a batched generation against each of its videos generated alone, on the same inputs. The
codebook threshold is put between the videos' distances, measured first, so that the videos' schedules really
differ (a test where every video took the same steps could not fail on the split calls).
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses

import numpy as np
import pytest
import torch

import adacache
from adacache import AdaCacheConfig, apply_adacache, get_stats, remove_adacache
from adacache.config import ConfigError
from adacache.models import specs
from adacache.testing import TINY_MODELS
from adacache.hooks import runtime_of

STEPS = 6
TIMESTEPS = [1000.0 - 150.0 * i for i in range(STEPS)]
FAMILIES = sorted(TINY_MODELS)


def rows_of(kwargs: dict, rows: list[int], batch: int, unbatched: tuple[str, ...]) -> dict:
    """The test's own cut of a batch's inputs to some rows (tensors whose first dimension is the batch)."""
    def cut(value):
        if isinstance(value, torch.Tensor) and value.dim() and value.shape[0] == batch:
            return value[rows]
        if isinstance(value, (tuple, list)):
            return type(value)(cut(v) for v in value)
        return value

    return {k: v if k in unbatched else cut(v) for k, v in kwargs.items()}


def denoise(model, tiny, kwargs: dict, context: str | None):
    """A fixed-step loop over a batch; returns the per-step outputs."""
    kwargs, outputs = dict(kwargs), []
    batch = kwargs["hidden_states"].shape[0]
    with torch.no_grad():
        for index, t in enumerate(TIMESTEPS):
            kwargs[tiny.timestep_key] = torch.full((batch,), t)
            with adacache.cache_context(model, context, index, STEPS) if context else contextlib.nullcontext():
                out = model(**kwargs)[0]
            outputs.append(out)
            kwargs["hidden_states"] = kwargs["hidden_states"] - 0.1 * out
    return outputs


def run_cached(model, tiny, kwargs, config, context, **applied):
    """`denoise` with AdaCache applied for the run (removed after, whatever happens): the outputs and the stats."""
    apply_adacache(model, config, **applied)
    try:
        return denoise(model, tiny, kwargs, context), get_stats(model)
    finally:
        remove_adacache(model)


def videos_of(stats):
    return {s.video: s for s in stats}


def split_codebook(model, tiny, kwargs, context, **config) -> AdaCacheConfig:
    """A codebook that gives the video with the smaller step-2 distance rate 3 and the other rate 1."""
    _, stats = run_cached(model, tiny, kwargs, AdaCacheConfig(codebook={1e9: 1}, num_inference_steps=STEPS, **config),
                          context)
    distances = [s.distances[1] for s in stats if s.video is not None]
    low, high = min(distances), max(distances)
    assert high > 1.001 * low, distances  # far enough apart for float differences not to cross the threshold
    return AdaCacheConfig(codebook={(low * high) ** 0.5: 3, 1e9: 1}, num_inference_steps=STEPS, **config)


def assert_each_video_as_alone(model, tiny, kwargs, config, context, batched, stats, videos) -> dict:
    """Each video (`videos`: index -> its rows of the batch) generated alone: the computed steps it took in the
    batch and the same outputs. Returns each video's stats alone, for more checks."""
    unbatched = specs.registered_spec(model).unbatched_arguments if specs.registered_spec(model) else ()
    batch, alone_stats = kwargs["hidden_states"].shape[0], {}
    for video, rows in videos.items():
        alone, (alone_stats[video],) = run_cached(model, tiny, rows_of(kwargs, list(rows), batch, unbatched), config,
                                                  context)
        assert alone_stats[video].video is None and alone_stats[video].computed_steps == stats[video].computed_steps
        for step, (a, b) in enumerate(zip(alone, batched)):
            torch.testing.assert_close(b[list(rows)], a, rtol=1e-4, atol=1e-5, msg=f"video {video}, step {step + 1}")
    return alone_stats


@pytest.fixture(scope="module", params=FAMILIES)
def family(request):
    tiny = TINY_MODELS[request.param]
    return tiny, tiny.build(seed=0)


@pytest.mark.parametrize("store", ["reuse", "forecast"])
def test_each_video_of_a_batch_takes_its_own_steps_and_frames(family, store):
    """Two videos in one call (no CFG), on every family: each computes the steps it computes alone and gives the
    same outputs, and the rows of a video that skips a step never reach the blocks."""
    tiny, model = family
    spec = specs.registered_spec(model)
    kwargs = tiny.inputs(model, batch_size=2)
    config = split_codebook(model, tiny, kwargs, "cond", store=store)
    _, block, block_spec = spec.blocks(model)[-1]
    seen_rows = []  # the first dimension of the last block's attention output: it runs only where the block runs
    handle = block.get_submodule(block_spec.attention).register_forward_hook(
        lambda m, a, o: seen_rows.append((o[0] if isinstance(o, tuple) else o).shape[0]))
    apply_adacache(model, config)
    try:
        batched = denoise(model, tiny, kwargs, "cond")
        stats = videos_of(get_stats(model))
    finally:
        remove_adacache(model)
        handle.remove()
    assert sorted(stats) == [0, 1]
    assert stats[0].computed_steps != stats[1].computed_steps  # the schedules differ: the split calls ran
    per_video = seen_rows[0] // 2  # step 1: both videos computed, in one call
    assert sum(seen_rows) == per_video * sum(len(s.computed_steps) for s in stats.values())
    assert_each_video_as_alone(model, tiny, kwargs, config, "cond", batched, stats, {0: [0], 1: [1]})


@pytest.mark.parametrize("name", ["ltx_video", "latte"])
def test_batched_cfg_halves_of_a_video_share_its_decision(name):
    """Two videos with batched CFG (rows uncond 0, 1 then cond 0, 1: the same latents in both halves, two texts):
    video v is rows v and v + 2, one schedule, and equals the video run alone with its two halves. Latte reshapes its tokens
    between blocks by the batch size it read at the start of the call: the videos that compute run as a call of
    their own, so that holds too."""
    tiny = TINY_MODELS[name]
    model = tiny.build(seed=0)
    kwargs = tiny.inputs(model, batch_size=4)
    kwargs["hidden_states"] = torch.cat([kwargs["hidden_states"][:2]] * 2)  # each video's latents in both halves
    config = split_codebook(model, tiny, kwargs, "cond_uncond")
    batched, stats = run_cached(model, tiny, kwargs, config, "cond_uncond")
    stats = videos_of(stats)
    assert sorted(stats) == [0, 1] and stats[0].computed_steps != stats[1].computed_steps
    assert_each_video_as_alone(model, tiny, kwargs, config, "cond_uncond", batched, stats, {0: [0, 2], 1: [1, 3]})


def test_row_schedules_split_the_cfg_halves_and_shared_is_one_decision():
    tiny = TINY_MODELS["ltx_video"]
    model = tiny.build(seed=0)
    kwargs = tiny.inputs(model, batch_size=4)
    kwargs["hidden_states"] = torch.cat([kwargs["hidden_states"][:2]] * 2)  # batched CFG: two videos, two halves
    for mode, videos in (("row", [0, 1, 2, 3]), ("shared", [None]), ("video", [0, 1])):
        _, stats = run_cached(model, tiny, kwargs, AdaCacheConfig(codebook={0.1: 2, 1e9: 1},
                                                                  num_inference_steps=STEPS, batch_schedule=mode),
                              "cond_uncond")
        assert [s.video for s in stats] == videos, mode


def test_paper_mode_shares_one_decision_unless_told_otherwise():
    assert AdaCacheConfig(paper_mode=True).resolved_batch_schedule == "shared"
    assert AdaCacheConfig().resolved_batch_schedule == "video"
    assert AdaCacheConfig(paper_mode=True, batch_schedule="video").resolved_batch_schedule == "video"
    with pytest.raises(ConfigError, match="batch_schedule must be one of"):
        AdaCacheConfig(batch_schedule="per-video")
    assert AdaCacheConfig.from_dict(AdaCacheConfig(batch_schedule="row").to_dict()).batch_schedule == "row"


def test_the_split_call_returns_diffusers_output_classes_and_keeps_the_arguments_whole():
    """return_dict=True (Transformer2DModelOutput) is put back together; an argument the spec marks as the same for
    every row is passed whole even where its first dimension equals the batch."""
    tiny = TINY_MODELS["wan"]
    model = tiny.build(seed=0)
    kwargs = tiny.inputs(model, batch_size=2)
    config = split_codebook(model, tiny, kwargs, "cond")
    apply_adacache(model, config)
    try:
        expected = denoise(model, tiny, kwargs, "cond")
        adacache.reset_state(model)
        kwargs2, outputs = {**kwargs, "return_dict": True}, []
        for index, t in enumerate(TIMESTEPS):
            kwargs2["timestep"] = torch.full((2,), t)
            with torch.no_grad(), adacache.cache_context(model, "cond", index, STEPS):
                out = model(**kwargs2)
            assert type(out).__name__ == "Transformer2DModelOutput"
            outputs.append(out.sample)
            kwargs2["hidden_states"] = kwargs2["hidden_states"] - 0.1 * out.sample
    finally:
        remove_adacache(model)
    for a, b in zip(expected, outputs):
        torch.testing.assert_close(a, b)

    # the spec's unbatched arguments pass whole, every other tensor with the batch first is cut (nested ones too)
    runtime_spec = dataclasses.replace(specs.registered_spec(model), unbatched_arguments=("encoder_hidden_states",))
    apply_adacache(model, config, spec=runtime_spec)
    try:
        pair = collections.namedtuple("Pair", "per_row shared")(torch.zeros(2, 4), torch.zeros(3, 4))
        table = (torch.zeros(2, 5), [torch.ones(2, 3)], pair)
        args, cut = runtime_of(model).cut_arguments((kwargs["hidden_states"],), {**kwargs, "attention_kwargs": {
            "table": table}}, rows=(1,), batch=2)
        assert type(cut["attention_kwargs"]["table"][2]) is type(pair)
        assert cut["attention_kwargs"]["table"][2].per_row.shape == (1, 4)
        assert cut["attention_kwargs"]["table"][2].shared.shape == (3, 4)
        assert torch.equal(args[0], kwargs["hidden_states"][1:])
        assert cut["encoder_hidden_states"] is kwargs["encoder_hidden_states"]
        assert torch.equal(cut["timestep"], kwargs["timestep"][1:])
        assert cut["attention_kwargs"]["table"][0].shape == (1, 5) and cut["attention_kwargs"]["table"][1][0].shape == (1, 3)
        # wrongly kept whole, the text broadcasts the one video's tokens to two rows: refused, not a wrong tensor
        with pytest.raises(ValueError, match="no residual spans them"):
            denoise(model, tiny, kwargs, "cond")
    finally:
        remove_adacache(model)


def test_a_changed_batch_within_a_generation_is_refused_and_a_new_one_is_fine():
    tiny = TINY_MODELS["wan"]
    model = tiny.build(seed=0)
    kwargs = tiny.inputs(model, batch_size=2)
    apply_adacache(model, AdaCacheConfig(codebook={1e9: 3}, num_inference_steps=STEPS))
    try:
        with torch.no_grad():
            for index in range(2):
                with adacache.cache_context(model, "cond", index, STEPS):
                    model(**kwargs)
            one = rows_of(kwargs, [0], 2, ())
            with pytest.raises(ValueError, match="batch size or resolution changed"), \
                    adacache.cache_context(model, "cond", 2, STEPS):
                model(**one)
            with adacache.cache_context(model, "cond", 0, STEPS):  # step 0: a new generation
                model(**one)
        assert [s.video for s in get_stats(model)] == [0, 1, None]
    finally:
        remove_adacache(model)


def test_a_non_finite_video_recomputes_alone():
    """A video whose residual is not finite is not cached and computes its next step; the other video keeps its
    schedule."""
    tiny = TINY_MODELS["wan"]
    model = tiny.build(seed=0)
    kwargs = tiny.inputs(model, batch_size=2)
    poisoned = {"on": False}

    def poison(module, args, kwargs_, output):
        if poisoned["on"]:
            output = output.clone()
            output[1] = float("nan")
            return output
        return output

    handle = model.blocks[-1].ffn.register_forward_hook(poison, with_kwargs=True)  # inside the block's own forward
    apply_adacache(model, AdaCacheConfig(codebook={1e9: 3}, num_inference_steps=STEPS))
    try:
        with torch.no_grad():
            for index, t in enumerate(TIMESTEPS):
                kwargs["timestep"] = torch.full((2,), t)
                poisoned["on"] = index == 1
                with adacache.cache_context(model, "cond", index, STEPS):
                    model(**kwargs)
        stats = videos_of(get_stats(model))
    finally:
        handle.remove()
        remove_adacache(model)
    assert stats[0].computed_steps == [1, 2, 5, 6] and not stats[0].notes
    assert stats[1].computed_steps[:3] == [1, 2, 3]
    assert any("non-finite values in the video residual" in n for n in stats[1].notes)


def test_stats_name_the_video():
    tiny = TINY_MODELS["wan"]
    model = tiny.build(seed=0)
    _, stats = run_cached(model, tiny, tiny.inputs(model, batch_size=3),
                          AdaCacheConfig(codebook={1e9: 1}, num_inference_steps=STEPS), "cond")
    assert [s.video for s in stats] == [0, 1, 2]
    assert stats[2].to_dict()["video"] == 2 and "video 2" in str(stats[2])


# --- real pipelines: several prompts in one call against each prompt alone -----------------------------------------
def test_the_embedded_pipeline_gives_each_prompt_its_own_steps():
    """The embedded model's pipeline (batched CFG under cache_context "cond_uncond"), four mixed prompts at 30 steps
    with the shipped codebook: every video takes the steps and frames it takes alone."""
    from adacache.embedded.pipeline import WEIGHTS_DIR, EmbeddedVideoPipeline, tuned_config

    pipe = EmbeddedVideoPipeline.from_pretrained(WEIGHTS_DIR, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    prompts = ["a red circle standing still", "a green triangle moving left fast", "a blue square moving up slow",
               "a yellow circle moving down fast"]
    latents = torch.randn(4, 3, 8, 16, 16, generator=torch.Generator().manual_seed(0))
    apply_adacache(pipe, str(tuned_config(30)))
    try:
        batch = pipe(prompts, num_inference_steps=30, latents=latents).frames
        stats = get_stats(pipe)
        assert [s.video for s in stats] == [0, 1, 2, 3] and {s.branch for s in stats} == {"cond_uncond"}
        assert len({tuple(s.computed_steps) for s in stats}) > 1  # not one schedule for all
        for video, prompt in enumerate(prompts):
            alone = pipe(prompt, num_inference_steps=30, latents=latents[video:video + 1]).frames
            assert get_stats(pipe)[-1].computed_steps == stats[video].computed_steps
            torch.testing.assert_close(batch[video:video + 1], alone, rtol=0, atol=1e-4)
    finally:
        remove_adacache(pipe)


@pytest.mark.parametrize("kind", ["wan", "latte"])
def test_a_diffusers_pipeline_gives_each_prompt_its_own_steps(kind, tmp_path):
    """Wan (CFG as two calls, "cond" and "uncond") and Latte (batched CFG with no cache context: the guiding
    pipeline tells it), two prompts with a generator each, against each prompt alone with its generator."""
    from tiny_pipelines import TINY_PIPELINE_CALL, load_tiny_pipeline, save_tiny_pipeline

    pipe = load_tiny_pipeline(save_tiny_pipeline(kind, tmp_path))
    prompts = ["a red circle moving left", "a blue square standing still"]
    # Latte's mask_feature cuts every prompt's text to the batch's longest: a video in a batch then differs from
    # the same video alone with no cache at all (by up to 11 here), so it is off for this comparison
    call = {**TINY_PIPELINE_CALL[kind], **({"mask_feature": False} if kind == "latte" else {})}

    def generate(config, which=(0, 1)):
        apply_adacache(pipe, config)
        try:
            out = pipe([prompts[i] for i in which], num_inference_steps=STEPS,
                       generator=[torch.Generator().manual_seed(i) for i in which],
                       **call)
            return torch.as_tensor(np.asarray(out.frames)), get_stats(pipe)
        finally:
            remove_adacache(pipe)

    _, measured = generate(AdaCacheConfig(codebook={1e9: 1}))
    branch = measured[-1].branch
    low, high = sorted(s.distances[1] for s in measured if s.branch == branch)
    config = AdaCacheConfig(codebook={(low * high) ** 0.5: 3, 1e9: 1})
    frames, stats = generate(config)
    by = {(s.branch, s.video): s.computed_steps for s in stats}
    assert by[(branch, 0)] != by[(branch, 1)]
    assert {s.branch for s in stats} == ({"cond", "uncond"} if kind == "wan" else {"default"})
    for video in (0, 1):
        alone, alone_stats = generate(config, which=(video,))
        assert {s.branch: s.computed_steps for s in alone_stats} == {b: steps for (b, v), steps in by.items()
                                                                     if v == video}
        torch.testing.assert_close(frames[video:video + 1], alone, rtol=1e-4, atol=5e-4)


def test_a_video_that_keeps_its_residual_alone_holds_a_copy_of_its_rows():
    """Where one video keeps its residual and the other keeps nothing, the kept rows are a copy: a slice would keep
    the whole batch's residual alive while the stats count one video's."""
    tiny = TINY_MODELS["wan"]
    model = tiny.build(seed=0)
    kwargs = tiny.inputs(model, batch_size=2)
    config = split_codebook(model, tiny, kwargs, "cond")
    apply_adacache(model, config)
    try:
        with torch.no_grad():
            for index, t in enumerate(TIMESTEPS[:2]):
                kwargs["timestep"] = torch.full((2,), t)
                with adacache.cache_context(model, "cond", index, STEPS):
                    out = model(**kwargs)[0]
                kwargs["hidden_states"] = kwargs["hidden_states"] - 0.1 * out  # as denoise() does
        videos = runtime_of(model).states["cond"].videos
        kept = [v for v in videos if v.store.holds]
        assert len(kept) == 1 and not any(v.store.holds for v in videos if v is not kept[0])
        residual = kept[0].store.latest[0]
        assert residual._base is None and residual.shape[0] == 1
        assert kept[0].store.nbytes() == residual.untyped_storage().nbytes()
    finally:
        remove_adacache(model)
