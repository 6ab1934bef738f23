"""AdaCache where it meets the rest of diffusers: a pipeline's scheduler swapped or removed after apply_adacache,
and diffusers' own caches stacked on AdaCache or under it."""

import warnings

import numpy as np
import pytest
import torch

from adacache import AdaCacheConfig, apply_adacache, get_stats, remove_adacache
from adacache.testing import tiny_model
from adacache.hooks import is_applied

from tiny_pipelines import TINY_PIPELINE_CALL, load_tiny_pipeline, save_tiny_pipeline

SKIP_ALL = AdaCacheConfig(codebook={1e9: 100})  # computes steps 1, 2 and, when N is known, N-1 and N
SKIPPING = AdaCacheConfig(codebook={1e9: 3})


# --- 1. a scheduler swapped after apply_adacache(pipe) ------------------------------------------------------------
@pytest.fixture(scope="module")
def latte_folder(tmp_path_factory):
    """A tiny LattePipeline: one transformer call per step, CFG batched, no cache_context, so only the scheduler
    tells AdaCache the step index and count."""
    return save_tiny_pipeline("latte", tmp_path_factory.mktemp("latte"))


def generate_latte(pipe, steps, seed=0):
    out = pipe("a red circle moving left", num_inference_steps=steps, generator=torch.Generator().manual_seed(seed),
               **TINY_PIPELINE_CALL["latte"])
    return np.asarray(out.frames)


def swap_scheduler(pipe):
    from diffusers import DDIMScheduler

    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)  # the usual idiom


def test_a_scheduler_swapped_after_apply_is_the_one_read(latte_folder):
    """Before: AdaCache kept the scheduler it saw at apply time, so a 13-step run after a 10-step one matched some
    timesteps against the old 10-step schedule: two generations, N believed to be 10, step 12 never computed."""
    pipe = load_tiny_pipeline(latte_folder)
    apply_adacache(pipe, SKIP_ALL)
    generate_latte(pipe, 10)
    first_generations = len(get_stats(pipe))
    swap_scheduler(pipe)
    frames = generate_latte(pipe, 13)
    second = get_stats(pipe)[first_generations:]
    assert len(second) == 1, [str(s) for s in second]
    (stats,) = second
    assert stats.num_steps == 13 and stats.steps_seen == 13
    assert stats.computed_steps == [1, 2, 12, 13]
    assert not any("unknown" in note for note in stats.notes)

    fresh = load_tiny_pipeline(latte_folder)
    swap_scheduler(fresh)
    apply_adacache(fresh, SKIP_ALL)
    assert np.array_equal(frames, generate_latte(fresh, 13))
    assert [s.computed_steps for s in get_stats(fresh)] == [[1, 2, 12, 13]]


def latte_inputs(pipe):
    config = pipe.transformer.config
    generator = torch.Generator().manual_seed(0)
    return {
        "hidden_states": torch.randn(2, config.in_channels, config.video_length, config.sample_size,
                                     config.sample_size, generator=generator),
        "encoder_hidden_states": torch.randn(2, 8, config.caption_channels, generator=generator),
        "return_dict": False,
    }


@pytest.mark.parametrize("how", ["set to None", "deleted"])
def test_a_scheduler_removed_after_apply_falls_back_to_the_timestep_sequence(latte_folder, how):
    """Before: the scheduler seen at apply time was still read. Now the pipeline's current scheduler is: none
    there, AdaCache follows the timestep sequence as for a bare transformer (N unknown, said in the notes), with
    no error and no warning from reading the pipeline."""
    pipe = load_tiny_pipeline(latte_folder)
    apply_adacache(pipe, SKIP_ALL)
    generate_latte(pipe, 10)  # the old scheduler now holds the 10 timesteps used below
    timesteps = [float(t) for t in pipe.scheduler.timesteps[:6]]
    if how == "deleted":
        del pipe.scheduler
    else:
        pipe.scheduler = None
    kwargs = latte_inputs(pipe)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("error")
        for t in timesteps:
            pipe.transformer(**kwargs, timestep=torch.full((2,), t))
    stats = get_stats(pipe)[-1]
    assert stats.steps_seen == 6 and stats.num_steps is None
    assert stats.computed_steps == [1, 2]
    assert any("unknown" in note for note in stats.notes)


# --- 2. a diffusers cache on top of AdaCache, and the other way round ---------------------------------------------
@pytest.fixture
def wan():
    tiny = tiny_model("wan")
    return tiny, tiny.build(seed=0)


def run_with_context(model, tiny, steps=6):
    """A CFG-free denoising loop inside cache_context, as diffusers' pipelines run (FirstBlockCache needs one)."""
    kwargs = tiny.inputs(model, batch_size=1)
    x = kwargs["hidden_states"]
    with torch.no_grad():
        for i in range(steps):
            with model.cache_context("cond"):
                out = model(**{**kwargs, "hidden_states": x, "timestep": torch.full((1,), 1000.0 - 150 * i)})[0]
            x = x - 0.1 * out
    return x


def fbc():
    from diffusers import FirstBlockCacheConfig

    return FirstBlockCacheConfig(threshold=0.1)


def test_a_diffusers_cache_on_top_of_adacache_is_refused_naming_remove_adacache(wan):
    """Before: enable_cache was accepted on a model with AdaCache (is_cache_enabled stayed False) and both caches
    ran stacked."""
    tiny, model = wan
    apply_adacache(model, SKIPPING)
    assert model.is_cache_enabled
    with pytest.raises(ValueError, match=r"AdaCache.*adacache\.remove_adacache\(model\) first"):
        model.enable_cache(fbc())
    registries = [m._diffusers_hook for m in model.modules() if hasattr(m, "_diffusers_hook")]
    assert [name for r in registries for name in r.hooks] == ["adacache"]  # nothing of FirstBlockCache left
    run_with_context(model, tiny)
    assert get_stats(model)[-1].skipped_steps  # AdaCache still works


def test_adacache_on_top_of_a_diffusers_cache_is_refused_naming_disable_cache(wan):
    _, model = wan
    model.enable_cache(fbc())
    with pytest.raises(RuntimeError, match=r"FirstBlockCacheConfig.*disable_cache\(\)"):
        apply_adacache(model, SKIPPING)
    assert not is_applied(model)
    model.disable_cache()
    assert not model.is_cache_enabled


def test_disable_cache_on_adacache_is_a_clear_error_that_changes_nothing(wan):
    """diffusers' disable_cache does not know AdaCache's hooks: it refuses, naming remove_adacache, and AdaCache
    stays whole."""
    tiny, model = wan
    apply_adacache(model, SKIPPING)
    with pytest.raises(ValueError, match=r"AdaCache.*adacache\.remove_adacache\(model\)"):
        model.disable_cache()
    assert model.is_cache_enabled and is_applied(model)
    run_with_context(model, tiny)
    remove_adacache(model)
    assert not model.is_cache_enabled


def test_after_remove_adacache_a_diffusers_cache_works_as_on_a_model_that_never_had_adacache(wan):
    tiny, model = wan
    assert "_cache_config" not in model.__dict__
    apply_adacache(model, SKIPPING)
    run_with_context(model, tiny)
    remove_adacache(model)
    assert "_cache_config" not in model.__dict__ and not model.is_cache_enabled  # exactly as before apply

    model.enable_cache(fbc())
    cached = run_with_context(model, tiny)
    never = tiny.build(seed=0)
    never.enable_cache(fbc())
    assert torch.equal(cached, run_with_context(never, tiny))
    assert not torch.equal(cached, run_with_context(tiny.build(seed=0), tiny))  # the cache did skip something

    model.disable_cache()  # diffusers leaves _cache_config = None on the instance; apply and remove keep that
    assert model.__dict__["_cache_config"] is None
    apply_adacache(model, SKIPPING)
    remove_adacache(model)
    assert model.__dict__["_cache_config"] is None and not model.is_cache_enabled


def test_a_model_without_cache_mixin_is_left_without_a_cache_config():
    from toy import TOY_SPEC, ToyDiT

    model = ToyDiT()
    apply_adacache(model, SKIPPING, spec=TOY_SPEC)
    assert "_cache_config" not in model.__dict__
    remove_adacache(model)
