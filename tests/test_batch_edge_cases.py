"""Per-video schedules in a batch, `reconfigure`, and the split calls at their edges.

First the cases that once went wrong: a named-tuple output and an output that is not batch-first, merged right (or
refused); cached residuals and probes holding only their own video's rows; stats_history counting generations, not
videos; two prompts paired as CFG halves only where the batch's halves hold the same latents; a call interrupted at a
generation's first step, which must not shift the next generation's branches; and the advice given for a paused
model. Then more edges: interrupts, odd settings, grad mode, non-finite residuals, reconfigure, threads, arguments.
The check, where there is one to make, is the one of tests/test_batch_videos.py: a batched generation against each
of its videos alone.
"""

from __future__ import annotations

import collections
import copy
import dataclasses

import pytest
import torch

import adacache
from adacache import AdaCacheConfig, apply_adacache, get_stats, reconfigure, remove_adacache
from adacache.testing import TINY_MODELS
from adacache.hooks import runtime_of
from test_batch_videos import (STEPS, TIMESTEPS, assert_each_video_as_alone, denoise, rows_of, run_cached,
                               split_codebook)
from toy import TOY_SPEC, ToyDiT, timesteps
from toy import denoise as toy_denoise


# --- helpers ------------------------------------------------------------------------------------------------------
def toy_input(batch: int = 2) -> torch.Tensor:
    """Rows of very different scale: their probe distances differ, so a threshold between them splits the batch."""
    x = torch.randn(batch, 8, 4, generator=torch.Generator().manual_seed(0))
    return x * torch.tensor([1.0, 30.0] * batch)[:batch].view(batch, 1, 1)


def toy_run(model, config, x, call=None, spec=TOY_SPEC):
    apply_adacache(model, config, spec=spec)
    try:
        return toy_denoise(model, x, call=call), get_stats(model)
    finally:
        remove_adacache(model)


def toy_split_config(model, x, call=None, spec=TOY_SPEC, **extra) -> AdaCacheConfig:
    """Rate 3 below the geometric mean of the videos' step-2 distances, rate 1 above: schedules that differ."""
    _, stats = toy_run(model, AdaCacheConfig(codebook={1e9: 1}, num_inference_steps=6, **extra), x, call, spec)
    distances = sorted(s.distances[1] for s in stats)
    assert distances[-1] > 1.001 * distances[0], distances
    return AdaCacheConfig(codebook={(distances[0] * distances[-1]) ** 0.5: 3, 1e9: 1}, num_inference_steps=6,
                          **extra)


def wan_loop(model, kwargs, context="cond", per_token=False, mode=torch.no_grad):
    """tests/test_batch_videos.denoise, with per-token timesteps (Wan 2.2 TI2V: (B, tokens), the first frame's
    tokens clean) and a choice of grad mode."""
    kw, outs = dict(kwargs), []
    batch = kw["hidden_states"].shape[0]
    pt, ph, pw = model.config.patch_size
    _, _, f, h, w = kw["hidden_states"].shape
    tokens = (f // pt) * (h // ph) * (w // pw)
    with mode():
        for index, t in enumerate(TIMESTEPS):
            if per_token:
                ts = torch.full((batch, tokens), t)
                ts[:, : tokens // f] = 0.0
            else:
                ts = torch.full((batch,), t)
            kw["timestep"] = ts
            with adacache.cache_context(model, context, index, STEPS):
                out = model(**kw)[0]
            outs.append(out)
            kw["hidden_states"] = kw["hidden_states"] - 0.1 * out.to(kw["hidden_states"].dtype)
    return outs


# --- outputs, memory, stats, prompts, a first-step interrupt, advice -----------------------------------------------
Out = collections.namedtuple("Out", "sample")


class NamedTupleDiT(ToyDiT):
    def forward(self, hidden_states, timestep, num_frames=1):
        return Out(super().forward(hidden_states, timestep, num_frames))


def test_a_namedtuple_output_of_a_split_step_holds_every_row():
    model, x = NamedTupleDiT(), toy_input(2)
    call = lambda m, x, t: m(x, torch.full((x.shape[0],), t)).sample  # noqa: E731
    config = toy_split_config(model, x, call)
    outs, stats = toy_run(model, config, x, call)
    assert stats[0].computed_steps != stats[1].computed_steps  # a split step ran
    assert [tuple(o.shape) for o in outs] == [(2, 8, 4)] * 6


class SeqFirstDiT(ToyDiT):
    def forward(self, hidden_states, timestep, num_frames=1):
        return super().forward(hidden_states, timestep, num_frames).transpose(0, 1)  # (tokens, batch, C)


def test_an_output_that_is_not_batch_first_is_refused_or_merged_right():
    model, x = SeqFirstDiT(), toy_input(2)
    config = toy_split_config(model, x, lambda m, x, t: m(x, torch.full((x.shape[0],), t)).transpose(0, 1))
    apply_adacache(model, config, spec=TOY_SPEC)
    shapes = []
    try:
        for t in timesteps(6):
            out = model(x, torch.full((2,), t))
            shapes.append(tuple(out.shape))
            if out.shape != (8, 2, 4):
                break
            x = x - 0.1 * out.transpose(0, 1)
    except ValueError as error:  # refusing with the message that names batch_schedule='shared' is fine too
        assert "batch-first" in str(error)
        return
    finally:
        remove_adacache(model)
    assert shapes == [(8, 2, 4)] * 6  # (today: (16, 1, 4) at the first split step, two rows' tokens stacked)


def held_and_counted(runtime, branch="default") -> tuple[int, int]:
    """Bytes the videos' stores and probes keep alive (whole storages, each once) and bytes their cache_bytes count."""
    storages, counted = {}, 0
    for video in runtime.states[branch].videos:
        tensors = [r for _, residuals in video.store.kept for r in residuals if r is not None]
        tensors += [video.schedule.prev_probe] if video.schedule.prev_probe is not None else []
        for tensor in tensors:
            storages[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
            counted += tensor.numel() * tensor.element_size()
    return sum(storages.values()), counted


@pytest.mark.parametrize("store", ["reuse", "forecast"])
def test_the_videos_caches_hold_no_more_than_cache_bytes_counts(store):
    model, x = ToyDiT(), toy_input(4)
    config = toy_split_config(model, x, store=store)
    apply_adacache(model, config, spec=TOY_SPEC)
    seen = []
    try:
        def call(m, x, t):
            out = m(x, torch.full((x.shape[0],), t))
            seen.append(held_and_counted(runtime_of(m)))
            return out

        toy_denoise(model, x, call=call)
        stats = get_stats(model)
    finally:
        remove_adacache(model)
    assert len({tuple(s.computed_steps) for s in stats}) > 1  # the videos' steps diverge
    assert all(held <= counted for held, counted in seen), seen


def test_stats_history_keeps_whole_generations_of_a_batch():
    model, x = ToyDiT(), toy_input(8)
    apply_adacache(model, AdaCacheConfig(codebook={1e9: 2}, num_inference_steps=6, stats_history=2), spec=TOY_SPEC)
    try:
        for _ in range(3):
            toy_denoise(model, x)
        stats = get_stats(model)
    finally:
        remove_adacache(model)
    per_generation = collections.Counter(s.generation for s in stats)
    assert per_generation == {1: 8, 2: 8, 3: 8}, per_generation


class GuidingPipeline:
    """Like diffusers' WanVideoToVideoPipeline (0.42): guides, opens no cache_context, and runs the conditional and
    unconditional halves as two calls, each with the whole batch of prompts."""

    do_classifier_free_guidance = True

    def __init__(self, transformer):
        self.transformer = transformer


def test_a_pipeline_guiding_in_two_calls_keeps_its_prompts_apart():
    model = ToyDiT()
    pipe = GuidingPipeline(model)
    apply_adacache(pipe, AdaCacheConfig(codebook={1e9: 2}, num_inference_steps=6), spec=TOY_SPEC)
    try:
        toy_denoise(model, toy_input(2), calls_per_step=2)  # cond, then uncond: two calls at each timestep
        stats = get_stats(pipe)
    finally:
        remove_adacache(pipe)
    assert {s.branch for s in stats} == {"default", "default.1"}
    assert sorted((s.branch, s.video) for s in stats) == [("default", 0), ("default", 1), ("default.1", 0),
                                                           ("default.1", 1)]


def test_a_generation_interrupted_at_its_first_call_does_not_shift_the_next():
    model, x = ToyDiT(), toy_input(2)
    config = AdaCacheConfig(codebook={1e9: 2}, num_inference_steps=6)
    clean, clean_stats = toy_run(model, config, x)
    apply_adacache(model, config, spec=TOY_SPEC)
    armed = [True]

    def interrupt(module, args):
        if armed[0]:
            armed[0] = False
            raise KeyboardInterrupt

    handle = model.blocks[0].register_forward_pre_hook(interrupt)
    try:
        with pytest.raises(KeyboardInterrupt):
            toy_denoise(model, x)
        handle.remove()
        again = toy_denoise(model, x)
        stats = get_stats(model)
    finally:
        handle.remove()
        remove_adacache(model)
    assert {s.branch for s in stats} == {"default"}
    for a, b in zip(clean, again):
        torch.testing.assert_close(a, b)


# --- interrupts, odd settings, grad, non-finite residuals, reconfigure, threads, arguments --------------------------
@pytest.mark.parametrize("part", [0, 1], ids=["computing-part", "skipping-part"])
def test_an_interrupt_in_either_part_of_a_split_step_leaves_the_model_clean(part):
    """KeyboardInterrupt in the first (computing rows) or second (skipping rows) call of a split step: the lock is
    released, and the next generation equals a clean one."""
    model, x = ToyDiT(), toy_input(2)
    config = toy_split_config(model, x)
    clean, stats = toy_run(model, config, x)
    split = min(set(stats[0].computed_steps) ^ set(stats[1].computed_steps))
    apply_adacache(model, config, spec=TOY_SPEC)
    calls, at = [0], [None]

    def interrupt(module, args):
        if at[0] == split:
            calls[0] += 1
            if calls[0] == part + 1:
                raise KeyboardInterrupt

    def call(m, x, t):
        at[0] = timesteps(6).index(t) + 1
        return m(x, torch.full((x.shape[0],), t))

    handle = model.blocks[0].register_forward_pre_hook(interrupt)
    try:
        with pytest.raises(KeyboardInterrupt):
            toy_denoise(model, x, call=call)
        handle.remove()
        runtime = runtime_of(model)
        assert not runtime.busy and runtime.current is None
        again = toy_denoise(model, x)
        assert [s.computed_steps for s in get_stats(model)[-2:]] == [s.computed_steps for s in stats]
    finally:
        handle.remove()
        remove_adacache(model)
    for a, b in zip(clean, again):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("case", ["per-token-timesteps", "bfloat16", "float16", "inference_mode"])
def test_each_video_matches_itself_alone_in_odd_settings(case):
    """Wan: per-token timesteps (B, tokens) cut by row; 16-bit models; torch.inference_mode."""
    tiny = TINY_MODELS["wan"]
    dtype = {"bfloat16": torch.bfloat16, "float16": torch.float16}.get(case, torch.float32)
    mode = torch.inference_mode if case == "inference_mode" else torch.no_grad
    per_token = case == "per-token-timesteps"
    tol = dict(rtol=2e-2, atol=2e-2) if dtype != torch.float32 else dict(rtol=1e-4, atol=1e-5)
    model = tiny.build(seed=0, dtype=dtype)
    kwargs = tiny.inputs(model, batch_size=2)
    apply_adacache(model, AdaCacheConfig(codebook={1e9: 1}, num_inference_steps=STEPS))
    try:
        wan_loop(model, kwargs, per_token=per_token, mode=mode)
        low, high = sorted(s.distances[1] for s in get_stats(model))
    finally:
        remove_adacache(model)
    config = AdaCacheConfig(codebook={(low * high) ** 0.5: 3, 1e9: 1}, num_inference_steps=STEPS)
    apply_adacache(model, config)
    try:
        batched = wan_loop(model, kwargs, per_token=per_token, mode=mode)
        stats = get_stats(model)
    finally:
        remove_adacache(model)
    assert stats[0].computed_steps != stats[1].computed_steps
    for video in (0, 1):
        apply_adacache(model, config)
        try:
            alone = wan_loop(model, rows_of(kwargs, [video], 2, ()), per_token=per_token, mode=mode)
            assert get_stats(model)[0].computed_steps == stats[video].computed_steps
        finally:
            remove_adacache(model)
        for a, b in zip(alone, batched):
            torch.testing.assert_close(b[video:video + 1].float(), a.float(), **tol)


@pytest.mark.parametrize("probe_block", [1, 2], ids=["temporal-(bs)tc", "spatial-(bt)sc"])
def test_moreg_per_video_on_latte_probes_matches_each_video_alone(probe_block):
    tiny = TINY_MODELS["latte"]
    model = tiny.build(seed=0)
    kwargs = tiny.inputs(model, batch_size=4)
    kwargs["hidden_states"] = torch.cat([kwargs["hidden_states"][:2]] * 2)  # batched CFG: the same latents twice
    config = split_codebook(model, tiny, kwargs, "cond_uncond", moreg=True, moreg_window=(1, STEPS),
                            probe_block=probe_block)
    batched, stats = run_cached(model, tiny, kwargs, config, "cond_uncond")
    assert [s.video for s in stats] == [0, 1] and stats[0].computed_steps != stats[1].computed_steps
    alone = assert_each_video_as_alone(model, tiny, kwargs, config, "cond_uncond", batched, stats,
                                       {0: [0, 2], 1: [1, 3]})
    for video in (0, 1):
        assert [m is None for m in alone[video].motion] == [m is None for m in stats[video].motion]
        assert [m for m in alone[video].motion if m is not None] == pytest.approx(
            [m for m in stats[video].motion if m is not None], rel=1e-4)


def test_a_split_step_with_grad_enabled_backpropagates_to_every_row():
    model, x = ToyDiT(), toy_input(2)
    config = toy_split_config(model, x)
    apply_adacache(model, config, spec=TOY_SPEC)
    try:
        grads, plain = [], x.clone()
        for t in timesteps(6):
            leaf = plain.detach().requires_grad_(True)
            out = model(leaf, torch.full((2,), t))
            out.square().sum().backward()
            grads.append(leaf.grad)
            plain = plain - 0.1 * out.detach()
        stats = get_stats(model)
    finally:
        remove_adacache(model)
    assert stats[0].computed_steps != stats[1].computed_steps
    assert all(g is not None and g.shape == x.shape and torch.isfinite(g).all() for g in grads)
    no_grad, _ = toy_run(model, config, x)  # the same steps and outputs as without grad
    torch.testing.assert_close(plain, x - 0.1 * sum(no_grad))


def test_a_non_finite_residual_in_a_split_call_stays_with_its_video():
    """The rows of a split step's computing call all go non-finite: that video recomputes, the other is untouched."""
    tiny = TINY_MODELS["wan"]
    model = tiny.build(seed=0)
    kwargs = tiny.inputs(model, batch_size=2)
    config = split_codebook(model, tiny, kwargs, "cond")
    clean, clean_stats = run_cached(model, tiny, kwargs, config, "cond")
    a, b = (set(s.computed_steps) for s in clean_stats)
    split = min(a ^ b)
    lone = 0 if split in a else 1
    poisoned = [False]
    handle = model.blocks[-1].ffn.register_forward_hook(lambda m, args, out: out * float("nan") if poisoned[0] else out)
    apply_adacache(model, config)
    kw, outs = dict(kwargs), []
    try:
        with torch.no_grad():
            for index, t in enumerate(TIMESTEPS):
                kw["timestep"] = torch.full((2,), t)
                poisoned[0] = index + 1 == split
                with adacache.cache_context(model, "cond", index, STEPS):
                    out = model(**kw)[0]
                outs.append(out)
                kw["hidden_states"] = kw["hidden_states"] - 0.1 * out
        stats = get_stats(model)
    finally:
        handle.remove()
        remove_adacache(model)
    other = 1 - lone
    assert stats[other].computed_steps == clean_stats[other].computed_steps and not stats[other].notes
    for c, o in zip(clean, outs):
        torch.testing.assert_close(o[other], c[other])
    assert stats[lone].notes


def test_reconfigure_mid_generation_pause_compile_resume_and_remove():
    tiny = TINY_MODELS["wan"]
    model = tiny.build(seed=0)
    kwargs = tiny.inputs(model, batch_size=2)
    every = AdaCacheConfig(codebook={1e9: 1}, num_inference_steps=STEPS)
    apply_adacache(model, every)
    try:
        plain = denoise(model, tiny, kwargs, "cond")
        # mid-generation, to another batch_schedule: a new generation from the next call, one schedule
        reconfigure(model, AdaCacheConfig(codebook={1e9: 2}, num_inference_steps=STEPS))
        kw = dict(kwargs)
        with torch.no_grad():
            for index, t in enumerate(TIMESTEPS):
                if index == 3:
                    reconfigure(model, AdaCacheConfig(codebook={1e9: 2}, num_inference_steps=STEPS,
                                                      batch_schedule="shared"))
                kw["timestep"] = torch.full((2,), t)
                with adacache.cache_context(model, "cond", index, STEPS):
                    kw["hidden_states"] = kw["hidden_states"] - 0.1 * model(**kw)[0]
        assert [(s.video, s.computed_steps) for s in get_stats(model)] == [(None, [4, 5, 6])]
        # paused: the model as it is, no stats; compile_blocks while paused; resumed: per video again
        reconfigure(model, None)
        for a, b in zip(plain, denoise(model, tiny, kwargs, "cond")):
            torch.testing.assert_close(a, b)
        assert get_stats(model) == []
        adacache.compile_blocks(model, backend="eager")
        for a, b in zip(plain, denoise(model, tiny, kwargs, "cond")):
            torch.testing.assert_close(a, b)
        reconfigure(model, AdaCacheConfig(codebook={1e9: 2}, num_inference_steps=STEPS, store="forecast"))
        denoise(model, tiny, kwargs, "cond")
        assert [s.video for s in get_stats(model)] == [0, 1] and {s.store for s in get_stats(model)} == {"forecast"}
    finally:
        remove_adacache(model)
    copy.deepcopy(model)  # after remove: a plain model again
    for a, b in zip(plain, denoise_plain(model, tiny, kwargs)):
        torch.testing.assert_close(a, b)


def denoise_plain(model, tiny, kwargs):
    kw, outs = dict(kwargs), []
    with torch.no_grad():
        for t in TIMESTEPS:
            kw["timestep"] = torch.full((2,), t)
            out = model(**kw)[0]
            outs.append(out)
            kw["hidden_states"] = kw["hidden_states"] - 0.1 * out
    return outs


def test_reconfigure_reaches_both_transformers_of_a_pipeline():
    class TwoExperts:  # Wan 2.2's pipeline shape: .transformer and .transformer_2
        def __init__(self):
            self.transformer, self.transformer_2 = ToyDiT(), ToyDiT()

    pipe = TwoExperts()
    apply_adacache(pipe, AdaCacheConfig(codebook={1e9: 2}, num_inference_steps=6), spec=TOY_SPEC)
    try:
        reconfigure(pipe, AdaCacheConfig(codebook={1e9: 3}, num_inference_steps=6, batch_schedule="row"))
        assert {runtime_of(m).config.resolved_batch_schedule for m in (pipe.transformer, pipe.transformer_2)} == {"row"}
        toy_denoise(pipe.transformer_2, toy_input(2))
        assert [(s.model, s.video) for s in get_stats(pipe)] == [("transformer_2", 0), ("transformer_2", 1)]
        reconfigure(pipe, None)
        assert runtime_of(pipe.transformer).paused and runtime_of(pipe.transformer_2).paused and get_stats(pipe) == []
    finally:
        remove_adacache(pipe)


def test_odd_batches_changing_batches_and_a_reset_mid_generation():
    model = ToyDiT()
    apply_adacache(model, AdaCacheConfig(codebook={1e9: 2}, num_inference_steps=6, stats_history=100), spec=TOY_SPEC)
    try:
        with adacache.cache_context(model, "cond_uncond", 0, 6):  # 3 rows cannot be CFG halves: a video per row
            model(toy_input(3), torch.full((3,), 1000.0))
        assert [s.video for s in get_stats(model)] == [0, 1, 2]
        adacache.reset_state(model)
        for batch in (4, 2, 3, 1):  # a new batch size per generation
            toy_denoise(model, toy_input(batch))
        by_generation = collections.defaultdict(list)
        for s in get_stats(model)[3:]:
            by_generation[s.generation].append(s.video)
        assert list(by_generation.values()) == [[0, 1, 2, 3], [0, 1], [0, 1, 2], [None]]
        x = toy_input(2)  # reset_state mid-generation: the next call begins a new one, for every video
        toy_denoise(model, x, stop_after=3)
        adacache.reset_state(model)
        for t in timesteps(6)[3:]:
            x = x - 0.1 * model(x, torch.full((2,), t))
        before, last = get_stats(model)[-4:-2], get_stats(model)[-2:]
        assert [s.video for s in last] == [0, 1] and {s.generation for s in last} == {before[0].generation + 1}
        assert all(s.steps_seen == 3 for s in before + last)  # (no context: the clock counts calls from the reset)
    finally:
        remove_adacache(model)


class ScaledDiT(ToyDiT):
    """A per-block scale argument, the same for every row, whose length (4 blocks) equals the batch (4 videos)."""

    def forward(self, hidden_states, timestep, layer_scale, num_frames=1):
        temb = timestep.reshape(-1, 1, 1).to(hidden_states.dtype)
        for i, block in enumerate(self.blocks):
            hidden_states = block(hidden_states, temb) * layer_scale[i]
        return hidden_states


def test_an_unbatched_table_as_long_as_the_batch_is_whole_when_the_spec_names_it():
    """Not named (spec given, or inferred from a first call whose batch equals its length), it is cut and the
    model fails loudly (IndexError); named in unbatched_arguments, every video matches itself alone."""
    scale = torch.tensor([0.5, 0.25, 0.5, 0.25])
    x = toy_input(4)
    call = lambda m, x, t: m(x, torch.full((x.shape[0],), t), scale)  # noqa: E731
    model = ScaledDiT()
    spec = dataclasses.replace(TOY_SPEC, unbatched_arguments=("layer_scale",))
    config = toy_split_config(model, x, call, spec)
    outs, stats = toy_run(model, config, x, call, spec)
    assert len({tuple(s.computed_steps) for s in stats}) > 1
    for video in range(4):
        alone, _ = toy_run(model, config, x[video:video + 1], call, spec)
        for a, b in zip(alone, outs):
            torch.testing.assert_close(b[video:video + 1], a, rtol=1e-4, atol=1e-5)
    with pytest.raises(IndexError) as raised:
        toy_run(model, config, x, call, TOY_SPEC)
    assert any("unbatched_arguments" in note for note in raised.value.__notes__)  # the error says what to do


def test_positional_arguments_are_cut_like_keywords():
    """Wan called as model(hidden_states, timestep, encoder_hidden_states, None, False): the split steps cut the
    positional tensors as they cut keywords."""
    tiny = TINY_MODELS["wan"]
    model = tiny.build(seed=0)
    kwargs = tiny.inputs(model, batch_size=2)
    config = split_codebook(model, tiny, kwargs, "cond")
    apply_adacache(model, config)
    try:
        expected = denoise(model, tiny, kwargs, "cond")
        keyword_stats = get_stats(model)
        adacache.reset_state(model)
        x, outs = kwargs["hidden_states"], []
        with torch.no_grad():
            for index, t in enumerate(TIMESTEPS):
                with adacache.cache_context(model, "cond", index, STEPS):
                    out = model(x, torch.full((2,), t), kwargs["encoder_hidden_states"], None, False)[0]
                outs.append(out)
                x = x - 0.1 * out
        stats = get_stats(model)[-2:]
    finally:
        remove_adacache(model)
    assert [s.computed_steps for s in stats] == [s.computed_steps for s in keyword_stats]
    assert stats[0].computed_steps != stats[1].computed_steps
    for a, b in zip(expected, outs):
        torch.testing.assert_close(a, b)


def test_non_contiguous_rows_with_the_forecast_store_match_each_video_alone():
    """Batched CFG (video v is rows v and v + 2) with the forecast store: the rows are gathered, not sliced."""
    tiny = TINY_MODELS["ltx_video"]
    model = tiny.build(seed=0)
    kwargs = tiny.inputs(model, batch_size=4)
    kwargs["hidden_states"] = torch.cat([kwargs["hidden_states"][:2]] * 2)  # batched CFG: the same latents twice
    config = split_codebook(model, tiny, kwargs, "cond_uncond", store="forecast")
    batched, stats = run_cached(model, tiny, kwargs, config, "cond_uncond")
    assert [s.video for s in stats] == [0, 1] and stats[0].computed_steps != stats[1].computed_steps
    assert all(s.store == "forecast" and s.cache_bytes > 0 for s in stats)
    alone = assert_each_video_as_alone(model, tiny, kwargs, config, "cond_uncond", batched, stats,
                                       {0: [0, 2], 1: [1, 3]})
    assert [alone[video].cache_bytes for video in (0, 1)] == [stats[video].cache_bytes for video in (0, 1)]


def test_two_threads_with_a_model_each_match_one_thread():
    import threading

    x = toy_input(2)
    config = toy_split_config(ToyDiT(), x)
    expected, _ = toy_run(ToyDiT(), config, x)
    results, errors = {}, []

    def work(name):
        try:
            results[name] = toy_run(ToyDiT(), config, x)[0]
        except BaseException as error:  # noqa: BLE001 - reported below
            errors.append(error)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert not errors and sorted(results) == [0, 1]
    for outs in results.values():
        for a, b in zip(expected, outs):
            torch.testing.assert_close(a, b)


def test_a_cond_uncond_pipeline_without_guidance_keeps_its_prompts_apart(tmp_path):
    from tiny_pipelines import TINY_PIPELINE_CALL, load_tiny_pipeline, save_tiny_pipeline

    pipe = load_tiny_pipeline(save_tiny_pipeline("ltx_video", tmp_path))
    batches = []
    handle = pipe.transformer.register_forward_pre_hook(
        lambda m, args, kwargs: batches.append(kwargs["hidden_states"].shape[0]), with_kwargs=True)
    apply_adacache(pipe, AdaCacheConfig(codebook={1e9: 2}))
    try:
        pipe(["a red circle moving left", "a blue square standing still"], num_inference_steps=STEPS,
             generator=[torch.Generator().manual_seed(i) for i in range(2)],
             **{**TINY_PIPELINE_CALL["ltx_video"], "guidance_scale": 1.0})
        stats = get_stats(pipe)
    finally:
        handle.remove()
        remove_adacache(pipe)
    assert set(batches) == {2}  # two prompts, no CFG halves
    assert [(s.branch, s.video) for s in stats] == [("cond_uncond", 0), ("cond_uncond", 1)]


class PoppingDiT(ToyDiT):
    """Pops its LoRA-style scale out of attention_kwargs in place (older diffusers models did)."""

    def forward(self, hidden_states, timestep, num_frames=1, attention_kwargs=None):
        scale = attention_kwargs.pop("scale", 1.0) if attention_kwargs is not None else 1.0
        return super().forward(hidden_states, timestep, num_frames) * scale


def test_an_attention_kwargs_dict_reaches_both_parts_of_a_split_step():
    model, x = PoppingDiT(), toy_input(2)

    def call(m, x, t):
        return m(x, torch.full((x.shape[0],), t), attention_kwargs={"scale": 0.5, "mask": torch.ones(x.shape[0], 8)})

    config = toy_split_config(model, x, call)
    outs, stats = toy_run(model, config, x, call)
    assert stats[0].computed_steps != stats[1].computed_steps
    for video in (0, 1):
        alone, _ = toy_run(model, config, x[video:video + 1], call)
        for a, b in zip(alone, outs):
            torch.testing.assert_close(b[video:video + 1], a, rtol=1e-4, atol=1e-5)


def test_compile_blocks_on_a_paused_model_without_a_spec_says_what_helps():
    """A paused model runs its calls as they are and infers no spec: the advice to run a call first must say that
    it is paused and how to resume."""
    model = ToyDiT()
    apply_adacache(model, AdaCacheConfig(num_inference_steps=6))  # no spec given: inferred at the first call
    reconfigure(model, None)
    toy_run_plain = model(torch.randn(2, 8, 4), torch.full((2,), 500.0))
    assert toy_run_plain.shape == (2, 8, 4)
    with pytest.raises(RuntimeError, match="paused"):
        adacache.compile_blocks(model, backend="eager")
    with pytest.raises(RuntimeError, match="paused"):
        adacache.describe(model, torch.randn(2, 8, 4), print_source=False)
    remove_adacache(model)
