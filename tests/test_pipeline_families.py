"""AdaCache on real diffusers pipelines of more families, built tiny, saved and reloaded from a local folder.

How each family calls its transformer under classifier-free guidance (CFG), as checked by test_cfg_call_pattern:

- CogVideoX, LTX-Video, Mochi: one call per step on a batch of 2 (uncond, cond), inside
  ``cache_context("cond_uncond")``: a name only, no step index or count;
- HunyuanVideo with true CFG (``true_cfg_scale > 1`` and a negative prompt): two calls per step on a batch of 1,
  ``cache_context("cond")`` then ``cache_context("uncond")``, names only;
- Allegro, Sana-Video: one call per step on a batch of 2, no ``cache_context`` at all.

None tells the step index or count, so AdaCache, applied to the pipeline, reads them from the scheduler.

AdaCache's registry does not know SanaVideoTransformer3DModel: its tests pass the spec below.
"""

import numpy as np
import pytest
import torch

from adacache import AdaCacheConfig, get_stats, remove_adacache
from adacache import apply_adacache as _apply_adacache
from adacache.models.specs import BlockList, ModelSpec
from adacache.testing_pipelines import TINY_PIPELINE_CALL, load_tiny_pipeline, save_tiny_pipeline

STEPS = 6
SKIP_ALL = AdaCacheConfig(codebook={1e9: 100})
ALWAYS_COMPUTE = AdaCacheConfig(codebook={1.0: 1})
MILD = AdaCacheConfig(codebook={0.05: 3, 0.5: 2, 1e9: 1})

# kind -> (CFG branch names, transformer calls per step, batch size of each call)
CFG_PATTERN = {
    "cogvideox": ({"cond_uncond"}, 1, 2),
    "hunyuan_video": ({"cond", "uncond"}, 2, 1),
    "ltx_video": ({"cond_uncond"}, 1, 2),
    "mochi": ({"cond_uncond"}, 1, 2),
    "allegro": ({"default"}, 1, 2),
    "sana_video": ({"default"}, 1, 2),
}
KINDS = list(CFG_PATTERN)

# Sana-Video: one list of blocks taking hidden_states (B, F*H*W, C) frame-major and returning a bare tensor (text
# is a separate argument, not returned), self-attention at attn1; nothing runs between blocks (controlnet residuals
# are added there only when given); hidden_states enter as (B, C, F, H, W), temporal patch patch_size[0].
SPECS = {"sana_video": ModelSpec(block_lists=(BlockList("transformer_blocks"),), temporal_patch="patch_size[0]")}


def apply_adacache(target, config):
    """apply_adacache with the family's spec where the registry lacks one (the test's family is read off the
    transformer's class)."""
    transformer = getattr(target, "transformer", target)
    spec = {"SanaVideoTransformer3DModel": SPECS["sana_video"]}.get(type(transformer).__name__)
    _apply_adacache(target, config, spec=spec)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: threads cost more than they give, and keep runs reproducible
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module", params=KINDS)
def family(request, tmp_path_factory):
    """(kind, pipeline, reference frames of the never-patched pipeline at STEPS steps, seed 0)."""
    kind = request.param
    pipe = load_tiny_pipeline(save_tiny_pipeline(kind, tmp_path_factory.mktemp(kind)))
    reference = generate(kind, pipe)
    assert np.array_equal(generate(kind, pipe), reference), "the pipeline itself is not deterministic"
    assert np.isfinite(reference).all()
    return kind, pipe, reference


def generate(kind, pipe, steps=STEPS, seed=0, **kwargs):
    out = pipe("a red circle moving left", num_inference_steps=steps, generator=torch.Generator().manual_seed(seed),
               **{**TINY_PIPELINE_CALL[kind], **kwargs})
    return np.asarray(out.frames)


class Stop(Exception):
    pass


def stop_after_step_3(pipe, i, t, kwargs):
    if i == 2:
        raise Stop
    return {}


def test_cfg_call_pattern(family):
    kind, pipe, _ = family
    branches, calls_per_step, batch = CFG_PATTERN[kind]
    seen = []
    handle = pipe.transformer.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(kwargs.get("hidden_states", args[0] if args else None).shape[0]),
        with_kwargs=True)
    try:
        generate(kind, pipe)
    finally:
        handle.remove()
    assert seen == [batch] * (calls_per_step * STEPS)


def test_rate_one_is_bit_identical(family):
    kind, pipe, reference = family
    apply_adacache(pipe, ALWAYS_COMPUTE)
    try:
        frames = generate(kind, pipe)
        stats = get_stats(pipe)
    finally:
        remove_adacache(pipe)
    assert np.array_equal(frames, reference)
    assert {s.branch for s in stats} == CFG_PATTERN[kind][0]
    assert all(s.computed_steps == list(range(1, STEPS + 1)) and not s.skipped_steps for s in stats)


def test_permissive_codebook_skips_middle_steps_and_computes_the_last_two(family):
    kind, pipe, reference = family
    apply_adacache(pipe, SKIP_ALL)
    try:
        frames = generate(kind, pipe)
        stats = get_stats(pipe)
    finally:
        remove_adacache(pipe)
    assert {s.branch for s in stats} == CFG_PATTERN[kind][0]
    for s in stats:  # step 1 is forced, step 2 has no distance yet, N-1 and N are forced
        assert s.num_steps == STEPS and s.steps_seen == STEPS and not s.notes, str(s)
        assert s.computed_steps == [1, 2, STEPS - 1, STEPS] and s.skipped_steps == list(range(3, STEPS - 1))
    assert np.isfinite(frames).all()
    assert not np.array_equal(frames, reference)  # the skipped steps really reused the cache


def test_removal_after_an_aborted_generation_is_bit_identical(family):
    kind, pipe, reference = family
    apply_adacache(pipe, SKIP_ALL)
    try:
        generate(kind, pipe)
        with pytest.raises(Stop):  # leaves a generation half done, with a residual cached
            generate(kind, pipe, callback_on_step_end=stop_after_step_3)
    finally:
        remove_adacache(pipe)
    assert np.array_equal(generate(kind, pipe), reference)


@pytest.mark.parametrize("how", ["raise", "interrupt"])
def test_generation_after_an_interrupted_one_equals_a_fresh_one(family, how, monkeypatch):
    kind, pipe, _ = family
    if how == "interrupt":
        # The pipeline's own interrupt flag: the loop runs out without calling the transformer. diffusers resets
        # stateful hooks at the end of each call; without that reset AdaCache must find the new generation itself.
        monkeypatch.setattr(pipe, "maybe_free_model_hooks", lambda: None)

        def stop(p, i, t, kwargs):
            if i == 2:
                p._interrupt = True
            return {}
    else:  # an exception out of the pipeline: nothing after the loop runs, no reset
        stop = stop_after_step_3
    branches = len(CFG_PATTERN[kind][0])
    apply_adacache(pipe, MILD)
    try:
        fresh = generate(kind, pipe)
        fresh_stats = get_stats(pipe)[-branches:]
        if how == "raise":
            with pytest.raises(Stop):
                generate(kind, pipe, seed=1, callback_on_step_end=stop)
        else:
            generate(kind, pipe, seed=1, callback_on_step_end=stop)
        interrupted_stats = get_stats(pipe)[-branches:]
        again = generate(kind, pipe)
        stats = get_stats(pipe)[-branches:]
    finally:
        remove_adacache(pipe)
    assert all(s.steps_seen == 3 for s in interrupted_stats), [str(s) for s in interrupted_stats]
    assert np.array_equal(fresh, again)
    assert [(s.branch, s.computed_steps, s.rates) for s in stats] == [
        (s.branch, s.computed_steps, s.rates) for s in fresh_stats]
    assert all(s.computed_steps[-2:] == [STEPS - 1, STEPS] for s in stats)


def test_transformer_alone_splits_branches_and_finds_generations_but_not_the_step_count(family, monkeypatch):
    """Applied to the transformer alone, nothing tells the step count (the cache contexts carry names only, no
    scheduler is known): the last two steps cannot be forced, and the stats say so. Back-to-back generations are
    still told apart by their timesteps (Mochi's rise, the others' fall), without the pipeline's reset."""
    kind, pipe, _ = family
    monkeypatch.setattr(pipe, "maybe_free_model_hooks", lambda: None)
    apply_adacache(pipe.transformer, SKIP_ALL)
    try:
        generate(kind, pipe, steps=STEPS)
        generate(kind, pipe, steps=4)
        stats = get_stats(pipe.transformer)
    finally:
        remove_adacache(pipe.transformer)
    branches = CFG_PATTERN[kind][0]
    assert [s.branch for s in stats] == sorted(branches) * 2
    assert [s.steps_seen for s in stats] == [STEPS] * len(branches) + [4] * len(branches)
    assert all(s.computed_steps == [1, 2] and s.num_steps is None for s in stats)
    assert all(any("unknown" in n for n in s.notes) for s in stats)
