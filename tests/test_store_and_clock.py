"""The residual stores (the forecast store above all) and the step clock, through a model used as a careless user
would: dtypes changed within a generation, generations back to back, CFG branches, non-finite residuals, copies,
grad mode, threads, memory, and every way a call can tell (or fail to tell) its step.

Most cases run ToyDiT on zeros at small integer timesteps, where everything is exact even in bfloat16: the stack
residual at timestep t is 26 t (15 x + 26 t for input x), so with the codebook {1e9: 3} over 6 steps, steps 1, 2,
5, 6 are computed and steps 3 and 4 get, from r(step 1) = 156 and r(step 2) = 130:
reuse 130, and a forecast reaching half an interval ahead 130 + (130 - 156) / 2 = 117.
"""

import copy
import dataclasses
import gc
import json
import pickle
import threading
import weakref

import pytest
import torch

import adacache
from adacache import AdaCacheConfig, apply_adacache, get_stats, remove_adacache, reset_state
from adacache.config import ConfigError
from adacache.core.clock import StepClock
from adacache.core.store import ForecastStore, ReuseStore, make_store
from adacache.testing import tiny_model
from adacache.hooks import runtime_of

from toy import TOY_SPEC, ToyDiT

TS = [6.0, 5.0, 4.0, 3.0, 2.0, 1.0]
FORECAST = [156.0, 130.0, 117.0, 117.0, 52.0, 26.0]  # per step, on zeros
REUSE = [156.0, 130.0, 130.0, 130.0, 52.0, 26.0]
BYTES = 1 * 6 * 3 * 4  # one (1, 6, 3) float32 tensor: a residual, or the probe


def config(store="forecast", **changes):
    return AdaCacheConfig(**{"codebook": {1e9: 3}, "num_inference_steps": 6, "store": store, "forecast_reach": 0.5,
                             **changes})


def patched(store="forecast", model=None, **changes):
    model = model if model is not None else ToyDiT()
    apply_adacache(model, config(store, **changes), spec=TOY_SPEC)
    return model


def run(model, ts=TS, x=None, **kwargs):
    """One call per timestep on the same input (zeros by default): the outputs."""
    x = torch.zeros(1, 6, 3) if x is None else x
    return [model(x, torch.full((x.shape[0],), t, dtype=x.dtype), **kwargs) for t in ts]


def values(outputs):
    """The one value each output holds (every element equal), checked to be so."""
    for out in outputs:
        assert torch.allclose(out, out.flatten()[0].expand_as(out), rtol=0, atol=0, equal_nan=True), out
    return [float(out.detach().flatten()[0]) for out in outputs]


def store_of(model, branch="default"):
    return runtime_of(model).states[branch].store


# --- forecast_reach=0 is reuse, bit for bit; paper mode refuses a forecast ---------------------------------------
def test_forecast_reach_zero_is_reuse_bit_for_bit_on_a_real_model():
    tiny = tiny_model("wan")
    model = tiny.build(seed=0)
    inputs = tiny.inputs(model, batch_size=1)

    def generation(store, **changes):
        apply_adacache(model, AdaCacheConfig(codebook={1e9: 3}, store=store, **changes))
        x, outputs = inputs["hidden_states"], []
        with torch.no_grad():
            for i in range(6):
                with adacache.cache_context(model, "cond", step_index=i, num_inference_steps=6):
                    out = model(**{**inputs, "hidden_states": x, "timestep": torch.full((1,), 1000.0 - 150 * i)})[0]
                outputs.append(out)
                x = x - 0.1 * out
        stats = get_stats(model)[-1]
        remove_adacache(model)
        return outputs, stats

    reused, reuse_stats = generation("reuse")
    zero, zero_stats = generation("forecast", forecast_reach=0)
    forecast, _ = generation("forecast", forecast_reach=0.5)
    assert reuse_stats.skipped_steps == [3, 4]
    assert all(torch.equal(a, b) for a, b in zip(reused, zero))
    assert zero_stats.cache_bytes == reuse_stats.cache_bytes  # one residual held, not two
    assert not torch.equal(forecast[2], reused[2])  # (the forecast itself does change the skipped steps)
    assert type(make_store(AdaCacheConfig(store="forecast", forecast_reach=0))) is ReuseStore


def test_a_forecast_reaching_nowhere_returns_the_last_residual_even_where_the_slope_overflows():
    store = ForecastStore(0.0)  # made directly, not through make_store
    store.put(1, (torch.full((4,), -40000.0, dtype=torch.float16), None))
    store.put(2, (torch.full((4,), 40000.0, dtype=torch.float16), None))  # r1 - r0 = 80000: inf in float16
    assert torch.equal(store.produce(3)[0], torch.full((4,), 40000.0, dtype=torch.float16))  # r1 + 0 * inf was NaN


def test_a_half_precision_forecast_takes_the_slope_in_float32_and_stays_finite():
    store = ForecastStore(0.01)
    store.put(1, (torch.full((4,), -40000.0, dtype=torch.float16), None))
    store.put(2, (torch.full((4,), 40000.0, dtype=torch.float16), None))
    assert torch.equal(store.produce(3)[0], torch.full((4,), 40800.0, dtype=torch.float16))  # was inf
    store.reach = 0.5  # 40000 + 40000 = 80000, past float16's range: the largest float16, not inf
    assert torch.equal(store.produce(3)[0], torch.full((4,), 65504.0, dtype=torch.float16))
    # bfloat16: the forecast is the exactly rounded value of r1 + (r1 - r0) / 2, not a rounding of a rounding
    torch.manual_seed(0)
    r0 = (torch.randn(1000) * 3).bfloat16()
    r1 = (r0.float() + torch.randn(1000) * 0.1).bfloat16()
    store = ForecastStore(0.5)
    store.put(1, (r0, None))
    store.put(2, (r1, None))
    exact = (r1.double() + (r1.double() - r0.double()) * 0.5).bfloat16()
    assert torch.equal(store.produce(3)[0], exact)


def test_a_forecast_never_extrapolates_backwards():
    store = ForecastStore(1.0)
    store.put(4, (torch.full((2,), 1.0), None))
    store.put(6, (torch.full((2,), 3.0), None))
    assert torch.equal(store.produce(5)[0], torch.full((2,), 3.0))  # a step before the last: r1, not 2.0


@pytest.mark.parametrize("make", [
    lambda: AdaCacheConfig(store="forecast", paper_mode=True),
    lambda: dataclasses.replace(AdaCacheConfig(paper_mode=True), store="forecast"),
    lambda: dataclasses.replace(AdaCacheConfig(store="forecast"), paper_mode=True),
    lambda: AdaCacheConfig.from_dict({"store": "forecast", "paper_mode": True}),
    lambda: AdaCacheConfig.from_preset("opensora-30-fast", store="forecast", paper_mode=True),
])
def test_paper_mode_with_a_forecast_is_refused_however_the_config_is_made(make):
    with pytest.raises(ConfigError, match="paper_mode reproduces"):
        make()


def test_paper_mode_with_a_forecast_is_refused_from_a_file(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"store": "forecast", "paper_mode": True}))
    with pytest.raises(ConfigError, match="store='reuse'"):
        AdaCacheConfig.load(path)


# --- dtypes and devices within a generation ----------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_a_model_cast_within_a_generation_forecasts_from_residuals_of_two_dtypes(dtype):
    model = patched()
    x = torch.zeros(1, 6, 3)
    outputs = run(model, TS[:1], x)
    model.to(dtype)  # after step 1: step 1's residual is float32, step 2's in the new dtype
    outputs += run(model, TS[1:3], x.to(dtype))
    assert [r.dtype for _, (r, _) in store_of(model).kept] == [torch.float32, dtype]
    outputs += run(model, TS[3:], x.to(dtype))
    assert [o.dtype for o in outputs] == [torch.float32] + [dtype] * 5  # not promoted to float32
    assert values(outputs) == FORECAST


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU to move the model between devices")
def test_a_model_moved_within_a_generation_forecasts_on_its_new_device():
    model = patched()
    outputs = run(model, TS[:1])
    model.to("cuda")
    outputs += run(model, TS[1:], torch.zeros(1, 6, 3, device="cuda"))
    assert [o.device.type for o in outputs] == ["cpu"] + ["cuda"] * 5
    assert values(outputs) == FORECAST


# --- generations, resets, branches, batch sizes ------------------------------------------------------------------
def test_a_second_generation_draws_no_slope_from_the_first():
    model = patched()
    assert values(run(model)) == FORECAST
    doubled = [2 * t for t in TS]  # turns back up: a new generation, whose residuals are twice the first's
    assert values(run(model, doubled)) == [2 * v for v in FORECAST]
    assert store_of(model).steps == []  # and nothing held after its last step
    reset_state(model)
    assert values(run(model, TS[:3])) == FORECAST[:3]
    reset_state(model)  # mid-generation: the next call starts afresh, its steps 3 and 4 from its own 1 and 2
    assert values(run(model, doubled)) == [2 * v for v in FORECAST]
    assert [s.computed_steps for s in get_stats(model)] == [[1, 2, 5, 6], [1, 2, 5, 6], [1, 2], [1, 2, 5, 6]]


def test_a_generation_restarted_by_the_cache_context_starts_a_new_store():
    model = patched()

    def step(i, t):
        with adacache.cache_context(model, "cond", step_index=i, num_inference_steps=6):
            return model(torch.zeros(1, 6, 3), torch.full((1,), t))

    first = [step(i, t) for i, t in enumerate(TS[:4])]  # stopped after step 4 (an interrupted run)
    assert store_of(model, "cond").steps == [1, 2]
    second = [step(i, 2 * t) for i, t in enumerate(TS)]  # step index 0 again, the same timesteps scale: new run
    assert values(first) == FORECAST[:4] and values(second) == [2 * v for v in FORECAST]


def test_a_batch_size_change_between_generations_is_a_fresh_forecast():
    model = patched()
    run(model)
    pair = torch.zeros(2, 6, 3)
    pair[1] = 1.0  # the second sample's output is 16 + 26 t, its residual 15 + 26 t
    outputs = run(model, TS, pair)
    assert values([o[:1] for o in outputs]) == FORECAST
    assert values([o[1:] for o in outputs]) == [172.0, 146.0, 133.0, 133.0, 68.0, 42.0]  # 1 + (145 - 13) at 3, 4


def test_a_batch_size_change_within_a_generation_is_an_error_not_a_broadcast_forecast():
    model = patched()
    run(model, TS[:2])
    with pytest.raises(ValueError, match="batch size or resolution changed"):
        run(model, TS[2:3], torch.zeros(2, 6, 3))  # a skipped step: the forecast has batch 1
    reset_state(model)  # the way out the message names
    assert values([o[1:] for o in run(model, TS, torch.zeros(2, 6, 3))]) == FORECAST


def test_cond_and_uncond_each_forecast_from_their_own_residuals():
    inputs = {"cond": torch.zeros(1, 6, 3), "uncond": torch.ones(1, 6, 3)}
    model = patched()
    together = {name: [] for name in inputs}
    for i, t in enumerate(TS):
        for name, x in inputs.items():
            with adacache.cache_context(model, name, step_index=i, num_inference_steps=6):
                together[name].append(model(x, torch.full((1,), t)))
    for name, x in inputs.items():
        alone = patched()
        assert all(torch.equal(a, b) for a, b in zip(together[name], run(alone, TS, x)))
    assert values(together["uncond"]) == [172.0, 146.0, 133.0, 133.0, 68.0, 42.0]


def test_split_cfg_without_a_context_gives_each_call_at_a_timestep_its_own_store():
    model = patched()
    cond, uncond = torch.zeros(1, 6, 3), torch.ones(1, 6, 3)
    outputs = [model(x, torch.full((1,), t)) for t in TS for x in (cond, uncond)]  # the k-th call at t: branch k
    assert values(outputs[0::2]) == FORECAST
    assert values(outputs[1::2]) == [172.0, 146.0, 133.0, 133.0, 68.0, 42.0]
    assert sorted(runtime_of(model).states) == ["default", "default.1"]


def test_cond_and_uncond_on_a_real_model_match_each_branch_run_alone():
    tiny = tiny_model("wan")
    inputs = tiny.inputs(tiny.build(seed=0), batch_size=1)
    texts = {"cond": inputs["encoder_hidden_states"], "uncond": torch.zeros_like(inputs["encoder_hidden_states"])}

    def generation(names):
        model = tiny.build(seed=0)
        apply_adacache(model, AdaCacheConfig(codebook={1e9: 3}, store="forecast"))
        outputs = {name: [] for name in names}
        with torch.no_grad():
            for i in range(6):
                for name in names:
                    with adacache.cache_context(model, name, step_index=i, num_inference_steps=6):
                        t = torch.full((1,), 1000.0 - 150 * i)
                        outputs[name].append(model(**{**inputs, "encoder_hidden_states": texts[name], "timestep": t})[0])
        assert all(s.skipped_steps == [3, 4] for s in get_stats(model))
        return outputs

    together = generation(["cond", "uncond"])
    for name in texts:
        assert all(torch.equal(a, b) for a, b in zip(together[name], generation([name])[name]))
    assert not torch.equal(together["cond"][2], together["uncond"][2])


# --- non-finite residuals, removal, copies, grad, threads ---------------------------------------------------------
def test_a_non_finite_residual_is_never_part_of_a_forecast():
    model = patched(num_inference_steps=8)
    model.blocks[1].poison_at = 7.0  # step 2's residual is NaN
    outputs = values(run(model, [8.0, 7.0, 6.0, 5.0, 4.0, 3.0, 2.0, 1.0]))
    stats = get_stats(model)[-1]
    assert outputs[1] != outputs[1]  # the computed step 2 is the model's own NaN...
    assert outputs[:1] + outputs[2:] == [208.0, 156.0, 130.0, 117.0, 117.0, 52.0, 26.0]  # ...and nothing after it
    assert stats.computed_steps == [1, 2, 3, 4, 7, 8] and any("non-finite" in n for n in stats.notes)


def test_removal_frees_the_store_and_a_reapplied_forecast_starts_clean():
    model = patched()
    run(model, TS[:3])
    runtime = weakref.ref(runtime_of(model))
    kept = weakref.ref(store_of(model).kept[-1][1][0])
    remove_adacache(model)
    gc.collect()
    assert runtime() is None and kept() is None  # the held residuals went with the runtime
    assert values(run(model)) == [156.0, 130.0, 104.0, 78.0, 52.0, 26.0]  # the plain model
    patched(model=model)
    assert values(run(model)) == FORECAST


def test_copies_and_pickles_of_a_forecasting_model_are_refused_mid_generation():
    model = patched()
    run(model, TS[:3])  # the store holds two residuals
    for target in (model, model.blocks[0]):
        with pytest.raises(TypeError, match="remove_adacache"):
            copy.deepcopy(target)
        with pytest.raises(TypeError, match="remove_adacache"):
            pickle.dumps(target)
    with pytest.raises(RuntimeError, match="shallow copy"):
        get_stats(copy.copy(model))
    assert values(run(model, TS[3:])) == FORECAST[3:]  # the refusals left the generation whole


def test_a_grad_enabled_forecast_keeps_no_graph():
    model = patched()
    x = torch.zeros(1, 6, 3, requires_grad=True)
    outputs = run(model, TS[:3], x)
    assert all(r.grad_fn is None and not r.requires_grad for _, (r, _) in store_of(model).kept)
    outputs[2].sum().backward()  # skipped step 3: x + forecast, with the forecast a constant
    assert torch.equal(x.grad, torch.ones_like(x))  # through a kept graph it would be 1 + 15 (r0 and r1 are 15 x + ...)
    with torch.inference_mode():  # then a generation in inference mode, and one with grad again
        assert values(run(model)) == FORECAST
    assert values(run(model, TS, torch.zeros(1, 6, 3, requires_grad=True))) == FORECAST


def test_inference_mode_generations_run_and_still_catch_a_block_editing_its_input_in_place():
    tiny = tiny_model("wan")
    model = tiny.build(seed=0)
    inputs = tiny.inputs(model, batch_size=1)
    apply_adacache(model, AdaCacheConfig(codebook={1e9: 3}, store="forecast"))

    def generation(mode):
        with mode():
            outputs = []
            for i in range(6):
                with adacache.cache_context(model, "cond", step_index=i, num_inference_steps=6):
                    outputs.append(model(**{**inputs, "timestep": torch.full((1,), 1000.0 - 150 * i)})[0])
        return outputs

    # inference tensors keep no version counter: reading one for the in-place check was a RuntimeError
    assert all(torch.equal(a.clone(), b) for a, b in zip(generation(torch.inference_mode), generation(torch.no_grad)))
    assert [s.skipped_steps for s in get_stats(model)] == [[3, 4], [3, 4]]

    class InPlace(torch.nn.Module):
        def forward(self, hidden_states, temb):
            hidden_states += temb
            return hidden_states

    toy = ToyDiT()
    toy.blocks[0] = InPlace()
    patched(model=toy)
    with torch.inference_mode(), pytest.raises(RuntimeError, match="in place"):
        run(toy, TS[:1])
    with torch.inference_mode():  # a NaN input is no in-place change: its sum is NaN before and after
        plain = patched()
        assert run(plain, TS[:1], torch.full((1, 6, 3), float("nan")))[0].isnan().all()


def test_threads_taking_turns_each_get_a_whole_forecast():
    model = patched()
    results = []
    for _ in range(2):
        thread = threading.Thread(target=lambda: results.append(values(run(model))))
        thread.start()
        thread.join(30)
    assert results == [FORECAST, FORECAST]
    run(model, TS[:3])
    raised = []

    def continue_elsewhere():
        try:
            run(model, TS[3:])
        except RuntimeError as error:
            raised.append(str(error))

    thread = threading.Thread(target=continue_elsewhere)
    thread.start()
    thread.join(30)
    assert raised and "another thread" in raised[0]


# --- statistics and memory ----------------------------------------------------------------------------------------
def test_cache_bytes_count_both_forecast_residuals_and_everything_is_freed_after_the_last_step():
    forecast, reuse = patched(), patched("reuse")
    run(forecast, TS[:3])
    assert store_of(forecast).nbytes() == 2 * BYTES and store_of(forecast).steps == [1, 2]
    run(forecast, TS[3:])
    assert values(run(reuse)) == REUSE
    state = runtime_of(forecast).states["default"]
    assert state.store.nbytes() == 0 and not state.store.holds and state.schedule.prev_probe is None
    assert get_stats(forecast)[-1].cache_bytes == 3 * BYTES  # peak: two residuals and the probe
    assert get_stats(reuse)[-1].cache_bytes == 2 * BYTES


def test_without_a_step_count_the_store_is_held_until_reset():
    model = ToyDiT()
    apply_adacache(model, AdaCacheConfig(codebook={1e9: 3}, store="forecast"), spec=TOY_SPEC)
    run(model)
    assert store_of(model).nbytes() == 2 * BYTES  # the last step is not known to be the last
    reset_state(model)  # what diffusers pipelines do after each generation (maybe_free_model_hooks)
    assert runtime_of(model).states == {} and get_stats(model)[-1].cache_bytes == 3 * BYTES


# --- the clock --------------------------------------------------------------------------------------------------
def test_a_refused_call_leaves_the_clock_as_it_was():
    model = patched()
    run(model, TS[:2])
    with pytest.raises(ValueError, match="'num_frames' changed"):
        run(model, TS[2:3], num_frames=2)  # refused before it runs
    outputs = run(model, TS[2:])  # the same call again: the same branch and step, not a second CFG branch
    assert values(outputs) == FORECAST[2:]
    assert [s.branch for s in get_stats(model)] == ["default"]


def test_after_reset_state_a_call_at_the_last_timestep_is_the_first_branch():
    model = patched()
    run(model, TS[:1])  # an interrupted generation's one call at t = 6
    reset_state(model)
    assert values(run(model)) == FORECAST  # also begins at t = 6
    assert [(s.branch, s.computed_steps) for s in get_stats(model)] == [("default", [1]), ("default", [1, 2, 5, 6])]
    clock = StepClock()
    clock.commit(clock.read(t=6.0))
    clock.forget()
    assert clock.read(t=6.0).branch == "default"


def test_a_call_with_no_timestep_and_no_step_index_is_told_how_to_say_its_step():
    clock = StepClock()
    for call in (dict(), dict(name="cond"), dict(name="cond", timesteps=(object(), [1.0, 0.5]))):
        with pytest.raises(ValueError, match="step_index"):
            clock.read(**call)
    assert clock.read(name="cond", step_index=2, num_steps=5).step == 3  # the context alone is enough


class AnyTimestepToy(ToyDiT):
    """ToyDiT taking its timestep as a python number, a list, a 0-d tensor or per-frame timesteps (B, F): their mean."""

    def forward(self, hidden_states, timestep, num_frames=1):
        t = torch.as_tensor(timestep, dtype=hidden_states.dtype).reshape(hidden_states.shape[0], -1).mean(1)
        return super().forward(hidden_states, t, num_frames)


@pytest.mark.parametrize("form", [float, torch.tensor, lambda t: torch.full((1, 4), t), lambda t: torch.full((1,), t),
                                  lambda t: [t], lambda t: [[t, t]]])  # lists were a TypeError from float()
def test_timesteps_as_floats_0d_or_per_frame_tensors_clock_alike(form):
    model = patched(model=AnyTimestepToy())
    x = torch.zeros(1, 6, 3)
    assert values([model(x, form(t)) for t in TS]) == FORECAST
    assert get_stats(model)[-1].computed_steps == [1, 2, 5, 6]


def test_per_frame_timesteps_with_a_clean_first_frame_still_fall_step_by_step():
    model = patched(model=AnyTimestepToy())
    x = torch.zeros(1, 6, 3)
    per_frame = [torch.tensor([[0.0, t, t, t]]) for t in TS]  # an image-to-video clip: frame 0 at t = 0
    outputs = values([model(x, t) for t in per_frame])
    assert get_stats(model)[-1].computed_steps == [1, 2, 5, 6]
    assert outputs == [0.75 * v for v in FORECAST]


class Pipeline:
    """What apply_adacache reads of a pipeline: a transformer and a scheduler."""

    def __init__(self, model, steps):
        from diffusers import FlowMatchEulerDiscreteScheduler

        self.transformer = model
        self.scheduler = FlowMatchEulerDiscreteScheduler()
        self.scheduler.set_timesteps(steps)


def test_the_scheduler_tells_the_step_count_from_a_python_float_timestep():
    pipe = Pipeline(AnyTimestepToy(), 6)
    apply_adacache(pipe, AdaCacheConfig(codebook={1e9: 3}, store="forecast"), spec=TOY_SPEC)  # no step count given
    for t in pipe.scheduler.timesteps.tolist():
        pipe.transformer(torch.zeros(1, 6, 3), t)
    stats = get_stats(pipe)[-1]
    assert stats.num_steps == 6 and stats.computed_steps == [1, 2, 5, 6] and not stats.notes


def test_a_scheduler_swapped_mid_generation_starts_a_new_one_and_no_slope_crosses_it():
    from diffusers import FlowMatchEulerDiscreteScheduler

    pipe = Pipeline(ToyDiT(), 6)
    apply_adacache(pipe, AdaCacheConfig(codebook={1e9: 3}, store="forecast"), spec=TOY_SPEC)
    table = pipe.scheduler.timesteps.clone()
    with adacache.cache_context(pipe.transformer, "cond"):  # a context without the step index: the scheduler's
        for i, t in enumerate(table):
            if i == 3:
                pipe.scheduler = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config)
                pipe.scheduler.set_timesteps(6)
                assert store_of(pipe.transformer, "cond").steps == [1, 2]
            pipe.transformer(torch.zeros(1, 6, 3), t.expand(1))
            if i == 3:
                assert store_of(pipe.transformer, "cond").steps == [4]  # not [2, 4]
    assert [(s.computed_steps, s.skipped_steps) for s in get_stats(pipe)] == [([1, 2], [3]), ([4, 5, 6], [])]


def test_named_branches_without_a_step_index_or_scheduler_count_steps_by_their_timesteps():
    model = patched()
    outputs = {"cond": [], "uncond": []}
    for t in TS:
        for name, x in (("cond", torch.zeros(1, 6, 3)), ("uncond", torch.ones(1, 6, 3))):
            with adacache.cache_context(model, name):
                outputs[name].append(model(x, torch.full((1,), t)))
    assert values(outputs["cond"]) == FORECAST
    assert [s.computed_steps for s in get_stats(model)] == [[1, 2, 5, 6]] * 2
