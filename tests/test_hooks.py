"""AdaCache through its hooks, on toy DiTs whose outputs can be worked out by hand."""

import logging

import pytest
import torch

import adacache
from adacache import AdaCacheConfig, apply_adacache, get_stats, remove_adacache
from adacache.hooks import is_applied, runtime_of

from toy import STDIT3_SPEC, TOY_SPEC, STDiT3Like, TableDiT, ToyDiT, denoise, timesteps

ALWAYS_COMPUTE = AdaCacheConfig(codebook={1.0: 1})
SKIP_ALL = AdaCacheConfig(codebook={1e9: 100})  # every step that may be skipped is skipped


def toy_input(batch=1, seed=0):
    # small integers: every toy output below is exact in float32
    return torch.randint(-4, 5, (batch, 6, 3), generator=torch.Generator().manual_seed(seed)).float()


def test_rate_one_is_bit_identical_and_remove_restores():
    model = ToyDiT()
    reference = denoise(model, toy_input())
    apply_adacache(model, ALWAYS_COMPUTE, spec=TOY_SPEC)
    cached = denoise(model, toy_input())
    assert all(torch.equal(a, b) for a, b in zip(reference, cached))
    assert get_stats(model)[-1].computed_steps == [1, 2, 3, 4, 5, 6]
    remove_adacache(model)
    assert all(torch.equal(a, b) for a, b in zip(reference, denoise(model, toy_input())))
    # nothing left behind
    assert not is_applied(model) and not hasattr(model, "_diffusers_hook")
    assert "forward" not in model.__dict__
    for block in model.blocks:
        assert "forward" not in block.__dict__ and not hasattr(block, "_adacache_block")
        assert not block.attn1._forward_hooks
    with pytest.raises(RuntimeError, match="not applied"):
        remove_adacache(model)


def test_skipped_step_is_exactly_input_plus_cached_residual():
    model = ToyDiT()
    apply_adacache(model, SKIP_ALL, spec=TOY_SPEC)
    inputs, outputs = [], []
    x = toy_input()
    for t in timesteps(6):
        inputs.append(x)
        outputs.append(model(x, torch.full((1,), t)))
        x = x - 0.1 * outputs[-1]
    stats = get_stats(model)[-1]
    # step 1 computed, step 2 computed (first rate is 1), 3 and 4 reuse, 5 = N-1 and 6 = N forced... but N is unknown
    # to a bare transformer without cache_context, so only the planned steps: 1, 2, then reuse until rate 100.
    assert stats.computed_steps == [1, 2] and stats.skipped_steps == [3, 4, 5, 6]
    residual = outputs[1] - inputs[1]  # stack residual of step 2, the last computed one
    for s in (2, 3, 4, 5):
        assert torch.equal(outputs[s], inputs[s] + residual)
    # computed steps are the model's own: 2^4 x + t * (8*1 + 4*2 + 2*3 + 4) = 16 x + 26 t
    assert torch.equal(outputs[0], 16 * inputs[0] + 26 * 1000.0)
    assert all(b.calls == 2 for b in model.blocks)  # blocks ran on the two computed steps only


def test_last_two_steps_forced_when_steps_are_known():
    model = ToyDiT()
    apply_adacache(model, AdaCacheConfig(codebook={1e9: 100}, num_inference_steps=8), spec=TOY_SPEC)
    denoise(model, toy_input(), num_steps=8)
    assert get_stats(model)[-1].computed_steps == [1, 2, 7, 8]


def test_hand_built_schedule_through_the_hooks():
    # The same hand-worked sequence as test_algorithm.test_schedule_by_hand, now as the probe block's residual.
    from test_algorithm import CODEBOOK, hand_values

    values = hand_values()
    table = {t: torch.full((1, 4, 2), values.get(i + 1, 123.0)) for i, t in enumerate(timesteps(10))}
    for paper_mode in (True, False):
        model = TableDiT(table)
        apply_adacache(model, AdaCacheConfig(codebook=CODEBOOK, paper_mode=paper_mode, num_inference_steps=10),
                       spec=TOY_SPEC)
        denoise(model, torch.zeros(1, 4, 2), num_steps=10, call=lambda m, x, t: m(x, torch.full((1,), t)))
        stats = get_stats(model)[-1]
        assert stats.computed_steps == [1, 2, 5, 7, 8, 9, 10]
        assert stats.rates == [1, 3, 2, 1, 2, *([3, 2] if paper_mode else [2, 1])]


def test_generations_are_independent_even_after_an_interrupted_one():
    config = AdaCacheConfig(codebook={0.5: 3, 1.0: 2, 1e9: 1})
    fresh_model = ToyDiT()
    apply_adacache(fresh_model, config, spec=TOY_SPEC)
    fresh = denoise(fresh_model, toy_input())
    model = ToyDiT()
    apply_adacache(model, config, spec=TOY_SPEC)
    denoise(model, toy_input(seed=1), stop_after=3)  # interrupted after 3 of 6 steps
    again = denoise(model, toy_input())
    third = denoise(model, toy_input())
    assert all(torch.equal(a, b) for a, b in zip(fresh, again))
    assert all(torch.equal(a, b) for a, b in zip(fresh, third))
    stats = get_stats(model)
    assert [s.steps_seen for s in stats] == [3, 6, 6]
    assert stats[1].computed_steps == stats[2].computed_steps == get_stats(fresh_model)[-1].computed_steps


def test_split_cfg_without_context_gets_one_schedule_per_branch():
    config = AdaCacheConfig(codebook={0.5: 3, 1.0: 2, 1e9: 1}, num_inference_steps=8)
    single = ToyDiT()
    apply_adacache(single, config, spec=TOY_SPEC)
    denoise(single, toy_input(), num_steps=8)
    split = ToyDiT()
    apply_adacache(split, config, spec=TOY_SPEC)
    denoise(split, toy_input(), num_steps=8, calls_per_step=2)  # cond then uncond, same timestep
    stats = {s.branch: s for s in get_stats(split)}
    assert set(stats) == {"default", "default.1"}
    expected = get_stats(single)[-1].computed_steps
    assert stats["default"].computed_steps == stats["default.1"].computed_steps == expected
    assert stats["default"].steps_seen == 8


def test_batched_cfg_is_one_decision_per_batch():
    # (issue 12: a batch is one decision only where it is one video's two CFG halves, whose latents are the same;
    # a batch of two different rows is two videos)
    config = AdaCacheConfig(codebook={0.5: 3, 1.0: 2, 1e9: 1}, num_inference_steps=8)
    model = ToyDiT()
    apply_adacache(model, config, spec=TOY_SPEC)

    def cfg_call(m, x, t):
        with adacache.cache_context(m, "cond_uncond"):
            return m(x, torch.full((x.shape[0],), t))

    denoise(model, toy_input().repeat(2, 1, 1), num_steps=8, call=cfg_call)  # one video's latents, twice
    (stats,) = get_stats(model)
    assert stats.branch == "cond_uncond" and stats.steps_seen == 8 and stats.computed_steps[:2] == [1, 2]
    assert stats.video is None


def test_nan_residual_is_reported_and_not_cached(caplog):
    model = ToyDiT()
    t_bad = timesteps(6)[1]
    model.blocks[2].poison_at = t_bad
    apply_adacache(model, SKIP_ALL, spec=TOY_SPEC)
    with caplog.at_level(logging.WARNING, logger="adacache"):
        outputs = denoise(model, toy_input(), call=lambda m, x, t: m(torch.nan_to_num(x), torch.full((1,), t)))
    stats = get_stats(model)[-1]
    assert any("non-finite values in the video residual" in n and "step 2" in n for n in stats.notes)
    assert "non-finite" in caplog.text
    assert torch.isnan(outputs[1]).all()  # the model's own output on that step, untouched
    assert stats.computed_steps[:3] == [1, 2, 3]  # step 3 is computed instead of reusing garbage
    assert torch.isfinite(outputs[2]).all()


def test_bad_input_errors():
    model = ToyDiT()
    with pytest.raises(ValueError, match="probe_block=7 is out of range"):
        apply_adacache(model, AdaCacheConfig(probe_block=7), spec=TOY_SPEC)
    with pytest.raises(ValueError, match="not a submodule"):
        apply_adacache(model, AdaCacheConfig(probe_point="attn9"), spec=TOY_SPEC)
    assert "forward" not in model.blocks[0].__dict__  # a failed apply leaves nothing behind
    apply_adacache(model, spec=TOY_SPEC)
    with pytest.raises(RuntimeError, match="already applied"):
        apply_adacache(model, spec=TOY_SPEC)
    unknown = ToyDiT()  # no registered spec: accepted, its spec inferred on the first call (tests/test_infer.py)
    apply_adacache(unknown)
    assert runtime_of(unknown).spec is None
    with pytest.raises(TypeError, match="pipeline with a .transformer"):
        apply_adacache(object())


def test_shape_change_within_a_generation_is_an_error():
    model = ToyDiT()
    apply_adacache(model, SKIP_ALL, spec=TOY_SPEC)
    ts = timesteps(6)
    for t in ts[:2]:
        model(toy_input(), torch.full((1,), t))
    with pytest.raises(ValueError, match="batch size or resolution changed"):
        model(toy_input(batch=2), torch.full((2,), ts[2]))


def test_stdit3_interleaved_custom_model():
    torch.manual_seed(0)
    model = STDiT3Like().eval()
    x = torch.randn(1, 4, 5, 3, 3)

    def run():
        outputs, latent = [], x
        with torch.no_grad():
            for t in timesteps(10):
                outputs.append(model(latent, torch.full((1,), t)))
                latent = latent - 0.1 * outputs[-1]
        return outputs

    reference = run()
    apply_adacache(model, AdaCacheConfig(codebook={1.0: 1}, num_inference_steps=10, moreg=True), spec=STDIT3_SPEC)
    assert all(torch.equal(a, b) for a, b in zip(reference, run()))
    stats = get_stats(model)[-1]
    layout = runtime_of(model).layout
    assert [name for name, _, _ in layout.blocks][:3] == ["spatial_blocks.0", "temporal_blocks.0", "spatial_blocks.1"]
    assert layout.blocks[layout.probe_index][0] == "spatial_blocks.1"  # (6 - 1) // 2 = 2: mid-stack
    assert any(m is not None and m > 0 for m in stats.motion)  # MoReg read 5 frames of 9 tokens
    remove_adacache(model)
    apply_adacache(model, AdaCacheConfig(codebook={1e9: 4}, num_inference_steps=10), spec=STDIT3_SPEC)
    cached = run()
    assert get_stats(model)[-1].computed_steps == [1, 2, 6, 9, 10]
    assert not torch.equal(cached[2], reference[2])


@pytest.mark.parametrize("probe_point", ["auto", "block"])
def test_compiled_blocks_give_the_same_schedule_and_outputs(probe_point):
    torch._dynamo.reset()
    config = AdaCacheConfig(codebook={0.5: 3, 1.0: 2, 1e9: 1}, num_inference_steps=8, probe_point=probe_point)
    eager = ToyDiT()
    apply_adacache(eager, config, spec=TOY_SPEC)
    expected = denoise(eager, toy_input(), num_steps=8)
    for how in ("block.compile", "compile_blocks fullgraph"):
        torch._dynamo.reset()
        model = ToyDiT()
        apply_adacache(model, config, spec=TOY_SPEC)
        if how == "block.compile":
            for block in model.blocks:
                block.compile(backend="eager")
        else:
            adacache.compile_blocks(model, backend="eager", fullgraph=True)
        from torch._dynamo.utils import counters

        counters.clear()
        outputs = denoise(model, toy_input(), num_steps=8)
        assert all(torch.equal(a, b) for a, b in zip(expected, outputs)), how
        assert get_stats(model)[-1].computed_steps == get_stats(eager)[-1].computed_steps
        assert counters["stats"]["unique_graphs"] >= 1, how  # the blocks' own forwards were compiled
        assert not counters["graph_break"], how


@pytest.mark.parametrize("paper_mode, expected", [(True, [1, 2, 9, 10]), (False, [1, 2, 6, 9, 10])])
def test_missed_planned_step(paper_mode, expected):
    # Rate 3 after step 2 plans step 5; the loop never calls step 5. The authors' equality rule then reuses the
    # cache until the forced step 9; ours computes the next step it sees (6), then 6 + 3 = 9 and 10.
    model = ToyDiT()
    apply_adacache(model, AdaCacheConfig(codebook={1e9: 3}, paper_mode=paper_mode), spec=TOY_SPEC)
    x = toy_input()
    for index, t in enumerate(timesteps(10)):
        if index == 4:
            continue
        with adacache.cache_context(model, "cond", step_index=index, num_inference_steps=10):
            x = x - 0.1 * model(x, torch.full((1,), t))
    (stats,) = get_stats(model)
    assert stats.branch == "cond" and stats.computed_steps == expected


@pytest.mark.parametrize("layout", ["b(ts)c", "(bt)sc", "(bs)tc"])
def test_probe_frames_follow_the_token_layout(layout):
    from adacache.hooks.block_io import probe_frames as _probe_frames

    B, T, S, C = 2, 3, 4, 5
    frames = torch.arange(T, dtype=torch.float32).view(1, T, 1, 1).expand(B, T, S, C)  # value = frame index
    probe = {
        "b(ts)c": frames.reshape(B, T * S, C),
        "(bt)sc": frames.reshape(B * T, S, C),
        "(bs)tc": frames.permute(0, 2, 1, 3).reshape(B * S, T, C),
    }[layout]
    framed = _probe_frames(probe, layout, T)
    assert framed.shape[1] == T
    for t in range(T):
        assert (framed[:, t] == t).all()
    assert _probe_frames(probe, layout, 7) is None  # a frame count that does not fit: no MoReg, not a wrong one


def test_rising_timesteps_are_one_generation():
    # Mochi's scheduler inverts sigmas: its transformer sees t rise. Without a context, that is still one run.
    model = ToyDiT()
    apply_adacache(model, SKIP_ALL, spec=TOY_SPEC)
    x = toy_input()
    for t in reversed(timesteps(6)):
        model(x, torch.full((1,), t))
    (stats,) = get_stats(model)
    assert stats.computed_steps == [1, 2] and stats.skipped_steps == [3, 4, 5, 6]
    model(x, torch.full((1,), 10.0))  # back to the start: a new generation
    assert [s.steps_seen for s in get_stats(model)] == [6, 1]


def test_pipeline_apply_uses_the_scheduler_and_ignores_a_stale_one():
    from types import SimpleNamespace

    from diffusers import FlowMatchEulerDiscreteScheduler

    scheduler = FlowMatchEulerDiscreteScheduler()
    pipe = SimpleNamespace(transformer=ToyDiT(), scheduler=scheduler)
    apply_adacache(pipe, SKIP_ALL, spec=TOY_SPEC)
    x = toy_input()
    scheduler.set_timesteps(8)
    for t in scheduler.timesteps:
        pipe.transformer(x, t.expand(1))
    scheduler.set_timesteps(8)  # a new run with the same timesteps
    for t in scheduler.timesteps[:3]:
        pipe.transformer(x, t.expand(1))
    first, second = get_stats(pipe)
    assert first.computed_steps == [1, 2, 7, 8] and first.num_steps == 8  # the scheduler told N
    assert second.computed_steps == [1, 2] and second.steps_seen == 3
    for t in timesteps(6):  # timesteps this scheduler never produced: fall back to the timestep sequence
        pipe.transformer(x, torch.full((1,), t - 0.5))
    assert get_stats(pipe)[-1].computed_steps == [1, 2] and get_stats(pipe)[-1].steps_seen == 6


def test_too_many_calls_at_one_timestep_without_context():
    model = ToyDiT()
    apply_adacache(model, SKIP_ALL, spec=TOY_SPEC)
    with pytest.raises(RuntimeError, match="cache_context"):
        for _ in range(9):
            model(toy_input(), torch.full((1,), 500.0))


def test_in_place_block_is_an_error_not_a_wrong_cache():
    class InPlace(torch.nn.Module):
        def forward(self, hidden_states, temb):
            hidden_states += temb
            return hidden_states

    model = ToyDiT()
    model.blocks[0] = InPlace()  # the first cached block changes the stack input itself
    apply_adacache(model, SKIP_ALL, spec=TOY_SPEC)
    with pytest.raises(RuntimeError, match="in place"):
        model(toy_input(), torch.full((1,), 500.0))


def test_bypassed_blocks_are_noted():
    class Bypass(ToyDiT):
        def forward(self, hidden_states, timestep, num_frames=1):
            return self.blocks[0](hidden_states, timestep.reshape(-1, 1, 1))  # the rest never runs

    model = Bypass()
    apply_adacache(model, SKIP_ALL, spec=TOY_SPEC)
    outputs = denoise(model, toy_input())
    stats = get_stats(model)[-1]
    assert stats.computed_steps == [1, 2, 3, 4, 5, 6]
    assert any("were not all called" in note for note in stats.notes)
    assert all(torch.isfinite(o).all() for o in outputs)


def test_config_as_dict_compiled_model_and_nested_context():
    model = ToyDiT()
    apply_adacache(model, {"codebook": {1.0: 1}}, spec=TOY_SPEC)
    assert runtime_of(model).config.codebook == {1.0: 1}
    with adacache.cache_context(model, "outer", step_index=0, num_inference_steps=4):
        with adacache.cache_context(model, "inner", step_index=0, num_inference_steps=4):
            model(toy_input(), torch.full((1,), 1000.0))
        model(toy_input(), torch.full((1,), 1000.0))  # back in "outer" after the inner context ends
    assert {s.branch for s in get_stats(model)} == {"outer", "inner"}
    compiled = torch.compile(ToyDiT(), backend="eager")  # goes on the model it compiles (tests/test_compile.py)
    apply_adacache(compiled, spec=TOY_SPEC)
    assert is_applied(compiled) and is_applied(compiled._orig_mod)
    remove_adacache(compiled)
    assert not is_applied(compiled._orig_mod)


def test_reset_state_starts_a_new_generation():
    model = ToyDiT()
    apply_adacache(model, SKIP_ALL, spec=TOY_SPEC)
    ts = timesteps(6)
    for t in ts[:3]:
        model(toy_input(), torch.full((1,), t))
    adacache.reset_state(model)
    model(toy_input(batch=2), torch.full((2,), ts[3]))  # a new batch size is fine in a new generation
    assert [s.steps_seen for s in get_stats(model)] == [3, 1, 1]  # (two rows: two videos, issue 12)
    assert [s.video for s in get_stats(model)] == [None, 0, 1]
