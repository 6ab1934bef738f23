"""Conformance suite: the same exact checks on a tiny randomly initialised model of every supported family."""

import contextlib

import pytest
import torch

import adacache
from adacache import AdaCacheConfig, apply_adacache, get_stats, remove_adacache
from adacache.hooks import is_applied, runtime_of
from adacache.hooks.block_io import read_output as _read_output, read_streams as _read_streams
from adacache.testing import TINY_MODELS, frames_tokens

FAMILIES = sorted(TINY_MODELS)
STEPS = 6
TIMESTEPS = [1000.0 - 150.0 * i for i in range(STEPS)]


@pytest.fixture(scope="module", params=FAMILIES)
def family(request):
    tiny = TINY_MODELS[request.param]
    return tiny, tiny.build(seed=0)


def denoise(model, tiny, batch_size=2):
    """A fixed-step loop as a pipeline with batched CFG would run it (a batch of 2 is one video's two CFG halves:
    the same latents, two texts, as diffusers' pipelines call it under the cache context "cond_uncond"); returns
    the per-step outputs."""
    kwargs = tiny.inputs(model, batch_size=batch_size)
    half = batch_size // 2
    kwargs["hidden_states"] = torch.cat([kwargs["hidden_states"][:half]] * 2)
    outputs = []
    with torch.no_grad():
        for t in TIMESTEPS:
            kwargs[tiny.timestep_key] = torch.full((batch_size,), t)
            applied = is_applied(model)
            with adacache.cache_context(model, "cond_uncond") if applied else contextlib.nullcontext():
                out = model(**kwargs)[0]
            outputs.append(out)
            kwargs["hidden_states"] = kwargs["hidden_states"] - 0.1 * out
    return outputs


def test_rate_one_is_bit_identical_and_remove_leaves_nothing(family):
    tiny, model = family
    reference = denoise(model, tiny)
    apply_adacache(model, AdaCacheConfig(codebook={1.0: 1}))
    try:
        assert all(torch.equal(a, b) for a, b in zip(reference, denoise(model, tiny)))
        assert get_stats(model)[-1].computed_steps == list(range(1, STEPS + 1))
    finally:
        remove_adacache(model)
    assert all(torch.equal(a, b) for a, b in zip(reference, denoise(model, tiny)))
    assert not is_applied(model) and "forward" not in model.__dict__
    for module in model.modules():
        assert "forward" not in module.__dict__ and not module._forward_hooks and not module._forward_pre_hooks


def test_skipped_steps_are_input_plus_cached_residual(family):
    tiny, model = family
    reference = denoise(model, tiny)
    apply_adacache(model, AdaCacheConfig(codebook={1e9: 100}, num_inference_steps=STEPS))
    layout = runtime_of(model).layout
    (_, first, first_spec), (_, last, last_spec) = layout.blocks[layout.first], layout.blocks[-1]
    seen_in, seen_out, block_runs = [], [], []
    parameters = layout.block_parameters[layout.first]
    handles = [
        first.register_forward_pre_hook(
            lambda m, a, k: seen_in.append(_read_streams(first_spec, a, k, parameters)), with_kwargs=True),
        last.register_forward_hook(lambda m, a, o: seen_out.append(_read_output(last_spec, o))),
    ]
    attention = last.get_submodule(last_spec.attention)  # runs only when the block's own forward runs
    handles.append(attention.register_forward_hook(lambda *_: block_runs.append(1)))
    try:
        outputs = denoise(model, tiny)
    finally:
        for handle in handles:
            handle.remove()
        stats = get_stats(model)[-1]
        remove_adacache(model)
    assert stats.computed_steps == [1, 2, STEPS - 1, STEPS] and stats.skipped_steps == [3, 4]
    assert len(block_runs) == 4  # the last block ran on computed steps only
    streams = 2 if first_spec.encoder_hidden_states_argument else 1
    for step in (3, 4):  # reuse of step 2's stack residual, per stream, exactly
        for stream in range(streams):
            residual = seen_out[1][stream] - seen_in[1][stream]
            assert torch.equal(seen_out[step - 1][stream], seen_in[step - 1][stream] + residual), (step, stream)
    assert all(torch.isfinite(o).all() for o in outputs)
    assert not torch.equal(outputs[2], reference[2])  # a skipped step is not a computed one
    # memory held between steps: one residual per stream plus the probe, nothing per block
    residual_bytes = sum(t.numel() * t.element_size() for t in seen_out[1] if t is not None)
    assert residual_bytes < stats.cache_bytes <= 2 * residual_bytes


def test_moreg_reads_the_frames_of_every_family(family):
    tiny, model = family
    apply_adacache(model, AdaCacheConfig(codebook={1.0: 1}, moreg=True, num_inference_steps=STEPS, moreg_window=(2, 5)))
    try:
        denoise(model, tiny)
        stats = get_stats(model)[-1]
    finally:
        remove_adacache(model)
    assert not stats.notes, stats.notes
    motion = [m for m in stats.motion if m is not None]
    assert len(motion) == 4 and all(m > 0 for m in motion)


def test_batched_run_matches_per_video_state_sizes(family):
    # Each family's cache holds (batch x tokens x channels) per stream: check the video stream's size.
    tiny, model = family
    frames, tokens = frames_tokens(tiny, model)
    apply_adacache(model, AdaCacheConfig(codebook={1e9: 100}, num_inference_steps=STEPS))
    try:
        denoise(model, tiny, batch_size=2)
        state = next(iter(runtime_of(model).states.values()))
        assert state.residuals is None  # freed after the last step
        stats = get_stats(model)[-1]
    finally:
        remove_adacache(model)
    inner = model.config.get("num_attention_heads", 2) * model.config.get("attention_head_dim", 16)
    assert stats.cache_bytes >= 2 * frames * tokens * inner * 4  # float32 video residual of the batch of 2


def test_compile_blocks_matches_eager(family):
    tiny, model = family
    config = AdaCacheConfig(codebook={0.02: 3, 0.2: 2, 1e9: 1}, num_inference_steps=STEPS, probe_point="block")
    apply_adacache(model, config)
    try:
        eager = denoise(model, tiny)
        eager_steps = get_stats(model)[-1].computed_steps
    finally:
        remove_adacache(model)
    torch._dynamo.reset()
    compiled_model = tiny.build(seed=0)
    apply_adacache(compiled_model, config)
    adacache.compile_blocks(compiled_model, backend="eager", fullgraph=True)
    compiled = denoise(compiled_model, tiny)
    assert get_stats(compiled_model)[-1].computed_steps == eager_steps
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(eager, compiled))
