"""AdaCache on real diffusers pipelines of more families, built tiny, saved and reloaded from a local folder.

How each family calls its transformer under classifier-free guidance (CFG), as checked by test_cfg_call_pattern:

- CogVideoX, LTX-Video, Mochi: one call per step on a batch of 2 (uncond, cond), inside
  ``cache_context("cond_uncond")``: a name only, no step index or count;
- HunyuanVideo with true CFG (``true_cfg_scale > 1`` and a negative prompt): two calls per step on a batch of 1,
  ``cache_context("cond")`` then ``cache_context("uncond")``, names only;
- HunyuanVideo 1.5: its guider (ClassifierFreeGuidance) makes two calls per step on a batch of 1,
  ``cache_context("pred_cond")`` then ``cache_context("pred_uncond")``, names only;
- SkyReels-V2 (text-to-video): two calls per step on a batch of 1, ``cache_context("cond")`` then
  ``cache_context("uncond")``, names only (unlike Wan's, which carry the step index and count);
- SkyReels-V2 diffusion forcing (asynchronous, ar_step=1): as SkyReels-V2, with per-frame timesteps and
  num_inference_steps + 2 loop iterations for 3 latent frames;
- Allegro, Sana-Video: one call per step on a batch of 2, no ``cache_context`` at all.

None tells the step index or count, so AdaCache reads them from the pipeline running the call (found on the stack,
whether AdaCache was applied to the pipeline or to its transformer alone): the length of its loop and its scheduler's
step. Diffusion forcing needs the loop's length: it runs more iterations than the scheduler has steps, and denoises
a long video window by window, each window a generation of its own.

AdaCache's registry knows neither SanaVideoTransformer3DModel nor HunyuanVideo15Transformer3DModel: their tests
pass the specs below. HunyuanVideo15Pipeline takes no callback_on_step_end: its generations are stopped from a
forward hook on the transformer instead. The SkyReels-V2 pipelines call ftfy.fix_text without checking that ftfy is
installed (diffusers 0.42.1); where it is not, their modules get an identity stand-in (what ftfy does to this
ASCII prompt).
"""

import inspect

import numpy as np
import pytest
import torch

import adacache

from adacache import AdaCacheConfig, get_stats, remove_adacache
from adacache import apply_adacache as _apply_adacache
from adacache.models.specs import BlockList, BlockSpec, ModelSpec

from tiny_pipelines import TINY_PIPELINE_CALL, ftfy_stand_in, load_tiny_pipeline, save_tiny_pipeline

STEPS = 6
STOP_AT = 3  # interrupted generations stop after this step
SKIP_ALL = AdaCacheConfig(codebook={1e9: 100})
ALWAYS_COMPUTE = AdaCacheConfig(codebook={1.0: 1})
MILD = AdaCacheConfig(codebook={0.05: 3, 0.5: 2, 1e9: 1})

# kind -> (CFG branch names in call order, batch size of each call)
CFG_PATTERN = {
    "cogvideox": (["cond_uncond"], 2),
    "hunyuan_video": (["cond", "uncond"], 1),
    "ltx_video": (["cond_uncond"], 2),
    "mochi": (["cond_uncond"], 2),
    "allegro": (["default"], 2),
    "sana_video": (["default"], 2),
    "hunyuan_video15": (["pred_cond", "pred_uncond"], 1),
    "skyreels_v2": (["cond", "uncond"], 1),
    "skyreels_v2_df": (["cond", "uncond"], 1),
}
KINDS = list(CFG_PATTERN)
# Denoising loop iterations per generation, where they are not the step count: asynchronous diffusion forcing
# starts each of the 3 latent frames one iteration after the previous one.
ITERATIONS = {"skyreels_v2_df": STEPS + 2}

# Specs for the transformers AdaCache's registry lacks, derived by hand from the diffusers source; AdaCache infers
# its own on the first call, and test_the_inferred_spec_is_the_hand_derived_one compares the two.
SPECS = {
    # One list of blocks taking hidden_states (B, F*H*W, C) frame-major and returning a bare tensor (text is a
    # separate argument, not returned), self-attention at attn1; nothing runs between blocks (controlnet residuals
    # are added there only when given); hidden_states enter as (B, C, F, H, W).
    "SanaVideoTransformer3DModel": ModelSpec(
        block_lists=(BlockList("transformer_blocks"),), temporal_patch="patch_size[0]"),
    # Dual-stream blocks: block(hidden_states, encoder_hidden_states, temb, mask, rope) -> (video, text), both
    # updated; self-attention at block.attn (returns (video, text)); nothing between blocks; hidden_states enter as
    # (B, 2C+1, F, H, W) (latents | condition | mask).
    "HunyuanVideo15Transformer3DModel": ModelSpec(
        block_lists=(BlockList("transformer_blocks", BlockSpec(
            encoder_hidden_states_argument="encoder_hidden_states", output_hidden_states_index=0,
            output_encoder_hidden_states_index=1, attention="attn")),),
        temporal_patch="patch_size_t"),
}


def apply_adacache(target, config):
    """apply_adacache; a transformer the registry lacks gets its spec inferred on its first call."""
    _apply_adacache(target, config)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: threads cost more than they give
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module", params=KINDS)
def family(request, tmp_path_factory):
    """(kind, pipeline, reference frames of the never-patched pipeline at STEPS steps, seed 0)."""
    kind = request.param
    with ftfy_stand_in():
        pipe = load_tiny_pipeline(save_tiny_pipeline(kind, tmp_path_factory.mktemp(kind)))
        reference = generate(kind, pipe)
        assert np.array_equal(generate(kind, pipe), reference), "the pipeline itself is not deterministic"
        assert np.isfinite(reference).all()
        yield kind, pipe, reference


def generate(kind, pipe, steps=STEPS, seed=0, **kwargs):
    out = pipe("a red circle moving left", num_inference_steps=steps, generator=torch.Generator().manual_seed(seed),
               **{**TINY_PIPELINE_CALL[kind], **kwargs})
    return np.asarray(out.frames)


class Stop(Exception):
    pass


def generate_stopped(kind, pipe, how, seed=1):
    """A generation stopped after step STOP_AT: "raise" raises out of the pipeline (nothing after the loop runs: no
    reset of the hooks), "interrupt" sets the pipeline's interrupt flag (the loop runs out without calling the
    transformer), "raise_mid_step" raises right after step STOP_AT's first transformer call (with split CFG, the
    other branch is a step behind). Through callback_on_step_end where the pipeline takes one, else from a forward
    hook on the transformer after the step's last call."""
    branches = len(CFG_PATTERN[kind][0])
    if how != "raise_mid_step" and "callback_on_step_end" in inspect.signature(pipe.__call__).parameters:
        def callback(p, i, t, kwargs):
            if i == STOP_AT - 1:
                if how == "raise":
                    raise Stop
                p._interrupt = True
            return {}

        run = lambda: generate(kind, pipe, seed=seed, callback_on_step_end=callback)  # noqa: E731
        handle = None
    else:
        last_call = (STOP_AT - 1) * branches + (1 if how == "raise_mid_step" else branches)
        calls = []

        def hook(module, args, output):
            calls.append(1)
            if len(calls) == last_call:
                if how == "interrupt":
                    pipe._interrupt = True
                else:
                    raise Stop

        handle = pipe.transformer.register_forward_hook(hook)
        run = lambda: generate(kind, pipe, seed=seed)  # noqa: E731
    try:
        if how == "interrupt":
            run()
        else:
            with pytest.raises(Stop):
                run()
    finally:
        if handle is not None:
            handle.remove()


def test_cfg_call_pattern(family):
    kind, pipe, _ = family
    branches, batch = CFG_PATTERN[kind]
    seen = []
    handle = pipe.transformer.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(kwargs.get("hidden_states", args[0] if args else None).shape[0]),
        with_kwargs=True)
    try:
        generate(kind, pipe)
    finally:
        handle.remove()
    assert seen == [batch] * (len(branches) * ITERATIONS.get(kind, STEPS))


def test_rate_one_is_bit_identical(family):
    kind, pipe, reference = family
    apply_adacache(pipe, ALWAYS_COMPUTE)
    try:
        frames = generate(kind, pipe)
        stats = get_stats(pipe)
    finally:
        remove_adacache(pipe)
    assert np.array_equal(frames, reference)
    assert [s.branch for s in stats] == CFG_PATTERN[kind][0]
    n = ITERATIONS.get(kind, STEPS)
    assert all(s.computed_steps == list(range(1, n + 1)) and not s.skipped_steps for s in stats)


def test_the_inferred_spec_is_the_hand_derived_one(family):
    """Where the registry has no spec, the one inferred on the first call through the real pipeline is the one
    derived by hand from the diffusers source (SPECS)."""
    kind, pipe, _ = family
    expected = SPECS.get(type(pipe.transformer).__name__)
    if expected is None:
        pytest.skip("registered spec")
    apply_adacache(pipe, ALWAYS_COMPUTE)
    try:
        generate(kind, pipe, steps=2)
        inferred = adacache.describe(pipe, print_source=False)
    finally:
        remove_adacache(pipe)
    assert inferred == expected


@pytest.fixture(scope="module")
def permissive(family):
    """(kind, frames, stats) of one generation with the permissive codebook, AdaCache removed afterwards."""
    kind, pipe, _ = family
    apply_adacache(pipe, SKIP_ALL)
    try:
        frames = generate(kind, pipe)
        stats = get_stats(pipe)
    finally:
        remove_adacache(pipe)
    return kind, frames, stats


def test_permissive_codebook_skips_steps_and_computes_the_first_and_last_two(family, permissive):
    kind, frames, stats = permissive
    n = ITERATIONS.get(kind, STEPS)
    assert [s.branch for s in stats] == CFG_PATTERN[kind][0]
    for s in stats:
        assert s.steps_seen == n and len(s.computed_steps) < n, str(s)
        assert s.computed_steps[:2] == [1, 2] and s.computed_steps[-2:] == [n - 1, n], str(s)
    assert np.isfinite(frames).all()
    assert not np.array_equal(frames, family[2])  # the skipped steps really reused the cache


def test_permissive_codebook_computes_exactly_the_first_two_and_last_two(family, permissive):
    """Step 1 is forced, step 2 has no distance yet, N-1 and N are forced; nothing else with rate 100."""
    kind, _, stats = permissive
    n = ITERATIONS.get(kind, STEPS)
    for s in stats:
        assert s.computed_steps == [1, 2, n - 1, n] and s.skipped_steps == list(range(3, n - 1)), str(s)
        assert s.num_steps == n and not s.notes, str(s)


def test_removal_after_an_aborted_generation_is_bit_identical(family):
    kind, pipe, reference = family
    apply_adacache(pipe, SKIP_ALL)
    try:
        generate(kind, pipe)
        generate_stopped(kind, pipe, "raise")  # leaves a generation half done, with a residual cached
    finally:
        remove_adacache(pipe)
    assert np.array_equal(generate(kind, pipe), reference)


@pytest.mark.parametrize("how", ["raise", "interrupt", "raise_mid_step"])
def test_generation_after_an_interrupted_one_equals_a_fresh_one(family, how, monkeypatch):
    kind, pipe, _ = family
    if how == "interrupt":
        # diffusers resets stateful hooks at the end of each call; without that reset AdaCache must find the new
        # generation itself (an exception skips the reset anyway).
        monkeypatch.setattr(pipe, "maybe_free_model_hooks", lambda: None)
    names = CFG_PATTERN[kind][0]
    apply_adacache(pipe, MILD)
    try:
        fresh = generate(kind, pipe)
        fresh_stats = get_stats(pipe)[-len(names):]
        generate_stopped(kind, pipe, how)
        stopped_stats = get_stats(pipe)[-len(names):]
        again = generate(kind, pipe)
        stats = get_stats(pipe)[-len(names):]
    finally:
        remove_adacache(pipe)
    seen = [STOP_AT - (how == "raise_mid_step" and i > 0) for i in range(len(names))]
    assert [(s.branch, s.steps_seen) for s in stopped_stats] == list(zip(names, seen))
    assert np.array_equal(fresh, again)
    assert [(s.branch, s.computed_steps, s.rates) for s in stats] == [
        (s.branch, s.computed_steps, s.rates) for s in fresh_stats]
    n = ITERATIONS.get(kind, STEPS)
    assert all(s.computed_steps[-2:] == [n - 1, n] and s.skipped_steps for s in stats)


def test_transformer_alone_reads_the_running_pipeline(family, monkeypatch):
    """Applied to the transformer alone, AdaCache still finds the pipeline running each call (on the stack): its
    loop tells the step count, so the last two steps are forced, with no note. Back-to-back generations of other
    step counts are told apart, without the pipeline's reset. (Before issue 20, a transformer alone knew no step
    count from a pipeline that opens no cache context with one, and computed only [1, 2].)"""
    kind, pipe, _ = family
    monkeypatch.setattr(pipe, "maybe_free_model_hooks", lambda: None)
    apply_adacache(pipe.transformer, SKIP_ALL)
    try:
        generate(kind, pipe, steps=STEPS)
        generate(kind, pipe, steps=4)
        stats = get_stats(pipe.transformer)
    finally:
        remove_adacache(pipe.transformer)
    names = CFG_PATTERN[kind][0]
    assert [s.branch for s in stats] == names * 2
    assert all(s.video is None for s in stats)  # batched CFG (the pipeline guides in one call): one video
    extra = ITERATIONS.get(kind, STEPS) - STEPS  # loop iterations beyond the step count
    for s, n in zip(stats, [STEPS + extra] * len(names) + [4 + extra] * len(names)):
        assert (s.steps_seen, s.num_steps, s.computed_steps, s.notes) == (n, n, [1, 2, n - 1, n], []), str(s)


@pytest.mark.parametrize("ar_step, window_iterations", [
    # synchronous: every window runs the scheduler's 6 steps; the second window's first call (per-frame timesteps
    # [0, 0, 999]) follows the first window's last, so only the loop's length tells that a new window began
    (0, [STEPS] * 3),
    # asynchronous: the first window staggers its 3 frames (6 + 2 iterations), later windows start with 2 frames
    # ready; none of their per-frame timesteps is in the scheduler's
    (1, [STEPS + 2, STEPS, STEPS]),
])
@pytest.mark.parametrize("family", ["skyreels_v2_df"], indirect=True)
def test_diffusion_forcing_long_video_windows_are_generations(family, ar_step, window_iterations):
    """A long video is denoised window by window (17 frames: 3 windows of 3 latent frames, each overlapping the
    last by 2 prefix frames): each window is a generation of its own and computes its last two iterations."""
    kind, pipe, _ = family
    apply_adacache(pipe, SKIP_ALL)
    try:
        frames = generate(kind, pipe, num_frames=17, overlap_history=5, ar_step=ar_step)
        stats = get_stats(pipe)
    finally:
        remove_adacache(pipe)
    assert np.isfinite(frames).all()
    for name in CFG_PATTERN[kind][0]:
        windows = [s for s in stats if s.branch == name]
        assert [s.steps_seen for s in windows] == window_iterations, [str(s) for s in windows]
        for s, n in zip(windows, window_iterations):
            assert s.computed_steps[-2:] == [n - 1, n] and not s.notes, str(s)
