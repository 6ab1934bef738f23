"""Copies, pickles, threads, dtypes, devices, grad mode, configs changed after they were made, and a layout changed
within a generation: the library used as a careless user would. Each case gets a clear error or correct behaviour,
never a silently wrong tensor."""

import contextlib
import copy
import dataclasses
import io
import pickle
import threading

import pytest
import torch

import adacache
from adacache import AdaCacheConfig, apply_adacache, get_stats, remove_adacache
from adacache.config import ConfigError
from adacache.testing import tiny_model
from adacache.hooks import is_applied, runtime_of

from toy import TOY_SPEC, ToyDiT, decide_computed_step, denoise, timesteps

STEPS = 6
SKIPPING = AdaCacheConfig(codebook={1e9: 3})  # after steps 1 and 2, every third step computed; N-1 and N forced


def wan_loop(model, tiny, num_steps=STEPS, stop_after=None, batch_size=1):
    """A loop with a cache_context per step, as diffusers' Wan pipeline runs (inputs in the model's dtype); the
    final latents."""
    kwargs = tiny.inputs(model, batch_size=batch_size)
    x = kwargs["hidden_states"]
    with torch.no_grad():
        for i in range(num_steps if stop_after is None else stop_after):
            context = (adacache.cache_context(model, "cond", step_index=i, num_inference_steps=num_steps)
                       if is_applied(model) else contextlib.nullcontext())
            with context:
                out = model(**{**kwargs, "hidden_states": x, "timestep": torch.full((x.shape[0],), 1000.0 - 150 * i)})[0]
            x = x - 0.1 * out
    return x


@pytest.fixture
def wan():
    tiny = tiny_model("wan")
    return tiny, tiny.build(seed=0)


# --- copies and pickles -------------------------------------------------------------------------------------------
def test_a_deep_copy_of_a_patched_model_is_refused_with_what_to_do(wan):
    tiny, model = wan
    apply_adacache(model, SKIPPING)
    wan_loop(model, tiny)
    for target in (model, model.blocks[1], model.blocks[0]):
        with pytest.raises(TypeError, match="remove_adacache"):
            copy.deepcopy(target)
    # the original is untouched by the refused copy, and removal still works
    remove_adacache(model)
    assert "_adacache_block" not in model.blocks[1].__dict__


def test_a_copy_made_after_removal_runs_its_own_weights(wan):
    tiny, model = wan
    apply_adacache(model, SKIPPING)
    original = wan_loop(model, tiny)
    remove_adacache(model)
    twin = copy.deepcopy(model)
    with torch.no_grad():
        for p in twin.blocks.parameters():
            p.mul_(1.5)
    apply_adacache(model, SKIPPING)
    apply_adacache(twin, SKIPPING)
    assert torch.equal(wan_loop(model, tiny), original)
    changed = wan_loop(twin, tiny)
    assert not torch.equal(changed, original)
    assert len(get_stats(model)) == 1  # the copy's calls never reached the original's state
    remove_adacache(twin)
    remove_adacache(model)
    assert not torch.equal(wan_loop(twin, tiny), wan_loop(model, tiny))  # uncached, each its own weights


def test_pickling_a_patched_model_says_to_remove_first_and_weights_still_save(wan, tmp_path):
    tiny, model = wan
    apply_adacache(model, SKIPPING)
    with pytest.raises(TypeError, match="remove_adacache"):
        pickle.dumps(model)
    with pytest.raises(TypeError, match="remove_adacache"):
        torch.save(model, io.BytesIO())
    state = model.state_dict()  # the weights save while AdaCache is applied
    model.save_pretrained(tmp_path / "saved")
    assert (tmp_path / "saved" / "config.json").is_file()
    remove_adacache(model)
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    pickle.loads(pickle.dumps(model))  # and the model pickles again once removed


# --- dtypes, devices, grad ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_any_floating_dtype_the_model_runs_in_works(dtype):
    tiny = tiny_model("wan")
    model = tiny.build(seed=0).to(dtype)
    reference = wan_loop(model, tiny)
    apply_adacache(model, AdaCacheConfig(codebook={1.0: 1}))
    assert torch.equal(wan_loop(model, tiny), reference)  # rate 1: bit-identical
    remove_adacache(model)
    apply_adacache(model, SKIPPING)
    cached = wan_loop(model, tiny)
    stats = get_stats(model)[-1]
    assert cached.dtype == dtype and torch.isfinite(cached).all()
    assert stats.skipped_steps and all(d is None or d == d for d in stats.distances)


def test_a_dtype_change_within_a_generation_keeps_the_tokens_dtype():
    tiny = tiny_model("wan")
    model = tiny.build(seed=0)
    apply_adacache(model, SKIPPING)
    kwargs = tiny.inputs(model, batch_size=1)
    x = kwargs["hidden_states"]
    outputs = []
    with torch.no_grad():
        for i in range(STEPS):
            if i == 2:  # after two computed float32 steps, the user casts the model and the latents
                model.to(torch.bfloat16)
                kwargs = {k: v.to(torch.bfloat16) if torch.is_tensor(v) and v.is_floating_point() else v
                          for k, v in kwargs.items()}
                x = x.to(torch.bfloat16)
            with adacache.cache_context(model, "cond", step_index=i, num_inference_steps=STEPS):
                out = model(**{**kwargs, "hidden_states": x, "timestep": torch.full((1,), 1000.0 - 150 * i)})[0]
            outputs.append(out)
            x = x - 0.1 * out
    stats = get_stats(model)[-1]
    assert 3 in stats.skipped_steps  # the bfloat16 step 3 reused the float32 residual...
    assert all(o.dtype == torch.bfloat16 for o in outputs[2:])  # ...converted, not promoting the output to float32
    assert any("dtype or device changed" in note for note in stats.notes)


def test_a_grad_enabled_call_caches_no_autograd_graph():
    model = ToyDiT()
    apply_adacache(model, AdaCacheConfig(codebook={1e9: 3}, num_inference_steps=6), spec=TOY_SPEC)
    x = torch.randn(1, 6, 3, requires_grad=True)
    outputs = [model(x, torch.full((1,), t)) for t in timesteps(6)[:3]]  # 1, 2 computed; 3 skipped
    state = runtime_of(model).states["default"]
    assert state.residuals is not None and not state.residuals[0].requires_grad
    assert state.residuals[0].grad_fn is None
    outputs[2].sum().backward()  # the skipped step's output: gradient reaches the input, not the blocks
    assert x.grad is not None
    assert all(p.grad is None for p in model.blocks.parameters())


# --- threads ------------------------------------------------------------------------------------------------------
class _GatedToy(ToyDiT):
    """A toy DiT whose forward can be held open, so another thread's call overlaps it for certain."""

    def __init__(self):
        super().__init__()
        self.entered, self.release = threading.Event(), threading.Event()
        self.hold = False

    def forward(self, x, timestep):
        if self.hold:
            self.entered.set()
            assert self.release.wait(10)
        return super().forward(x, timestep)


def test_two_threads_calling_one_patched_model_at_once_are_told_so():
    model = _GatedToy()
    apply_adacache(model, AdaCacheConfig(codebook={1e9: 3}, num_inference_steps=6), spec=TOY_SPEC)
    model.hold = True
    errors, done = [], []
    first = threading.Thread(target=lambda: done.append(model(torch.ones(1, 6, 3), torch.full((1,), 1000.0))))
    first.start()
    assert model.entered.wait(10)
    model.hold = False
    try:
        with pytest.raises(RuntimeError, match="another thread"):
            model(torch.ones(1, 6, 3), torch.full((1,), 1000.0))
    finally:
        model.release.set()
        first.join(10)
    assert len(done) == 1 and not errors  # the first call finished normally
    assert torch.equal(done[0], ToyDiT()(torch.ones(1, 6, 3), torch.full((1,), 1000.0)))
    adacache.reset_state(model)  # and the model works afterwards, in this thread
    assert torch.equal(denoise(model, torch.ones(1, 6, 3))[0], done[0])  # step 1 of a new generation: computed


def test_a_thread_continuing_another_threads_generation_is_told_so():
    tiny = tiny_model("wan")
    model = tiny.build(seed=0)
    apply_adacache(model, SKIPPING)
    kwargs = tiny.inputs(model, batch_size=1)

    def step(i):
        with adacache.cache_context(model, "cond", step_index=i, num_inference_steps=STEPS):
            return model(**{**kwargs, "timestep": torch.full((1,), 1000.0 - 150 * i)})[0]

    with torch.no_grad():
        step(0), step(1)
        raised = []

        def other():
            try:
                step(2)
            except RuntimeError as error:
                raised.append(str(error))

        thread = threading.Thread(target=other)
        thread.start()
        thread.join(30)
    assert raised and "another thread" in raised[0] and "own model" in raised[0]


def test_generations_from_different_threads_one_after_another_work():
    """A web server's worker threads take turns: each generation is whole in one thread."""
    tiny = tiny_model("wan")
    model = tiny.build(seed=0)
    apply_adacache(model, SKIPPING)
    alone = wan_loop(model, tiny)
    results = []
    for _ in range(2):
        thread = threading.Thread(target=lambda: results.append(wan_loop(model, tiny)))
        thread.start()
        thread.join(60)
    assert len(results) == 2 and all(torch.equal(r, alone) for r in results)
    assert [s.computed_steps for s in get_stats(model)[-3:]] == [[1, 2, 5, 6]] * 3


# --- configs changed after creation, layouts changed within a generation -----------------------------------------
def test_a_config_cannot_be_changed_after_it_is_made():
    config = AdaCacheConfig(moreg=True)
    with pytest.raises(ConfigError, match="dataclasses.replace"):
        config.moreg_norm = 0.0  # would divide by zero inside a generation
    with pytest.raises(ConfigError):
        config.codebook = {"x": 1}
    with pytest.raises(TypeError):
        config.codebook[0.5] = 2  # the codebook is read-only too
    changed = dataclasses.replace(config, moreg_norm=0.05)
    assert changed.moreg_norm == 0.05 and config.moreg_norm == 0.385
    assert copy.deepcopy(config) == config and pickle.loads(pickle.dumps(config)) == config
    with pytest.raises(ConfigError):
        copy.deepcopy(config).moreg = False
    with pytest.raises(ConfigError, match="positive"):
        dataclasses.replace(config, moreg_norm=0.0)


def test_a_layout_change_with_the_same_token_count_within_a_generation_is_an_error():
    tiny = tiny_model("wan")
    model = tiny.build(seed=0)
    apply_adacache(model, SKIPPING)
    kwargs = tiny.inputs(model, batch_size=1)
    b, c, t, h, w = kwargs["hidden_states"].shape
    reshaped = torch.randn(b, c, t * 4, h // 2, w // 2)  # as many tokens, other frames: the residual does not fit
    with torch.no_grad():
        for i, hidden in enumerate([kwargs["hidden_states"]] * 2 + [reshaped]):
            with adacache.cache_context(model, "cond", step_index=i, num_inference_steps=STEPS):
                if i < 2:
                    model(**{**kwargs, "hidden_states": hidden, "timestep": torch.full((1,), 1000.0 - 150 * i)})
                else:
                    with pytest.raises(ValueError, match="changed from"):
                        model(**{**kwargs, "hidden_states": hidden, "timestep": torch.full((1,), 1000.0 - 150 * i)})
        adacache.reset_state(model)  # the documented way out: a new generation at the new shape
        with adacache.cache_context(model, "cond", step_index=0, num_inference_steps=STEPS):
            out = model(**{**kwargs, "hidden_states": reshaped, "timestep": torch.full((1,), 1000.0)})[0]
    assert out.shape == reshaped.shape


# --- each thread's cache context, a rescheduled scheduler, removal, Ctrl-C, extreme and deleted config fields ----
def test_each_thread_reads_only_the_cache_context_it_set():
    """Thread B entering cache_context("uncond") between thread A's cache_context("cond") and A's call must not send
    A's call to the uncond branch (and its cached residual)."""
    tiny = tiny_model("wan")
    model = tiny.build(seed=0)
    apply_adacache(model, SKIPPING)
    kwargs = tiny.inputs(model, batch_size=1)
    a_inside, b_inside, b_may_leave = threading.Event(), threading.Event(), threading.Event()

    def other_thread():
        a_inside.wait(10)
        with adacache.cache_context(model, "uncond", step_index=0, num_inference_steps=STEPS):
            b_inside.set()
            b_may_leave.wait(10)

    thread = threading.Thread(target=other_thread)
    thread.start()
    try:
        with torch.no_grad(), adacache.cache_context(model, "cond", step_index=0, num_inference_steps=STEPS):
            a_inside.set()
            assert b_inside.wait(10)
            model(**{**kwargs, "timestep": torch.full((1,), 1000.0)})
    finally:
        b_may_leave.set()
        thread.join(10)
    assert [s.branch for s in get_stats(model)] == ["cond"]


def test_a_rescheduled_scheduler_does_not_split_a_generation_whose_context_gives_the_step():
    """Two pipelines sharing one transformer (or a scheduler reset by a callback): set_timesteps in the middle of a
    generation told its steps by the cache context must not start a new generation."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    tiny = tiny_model("wan")
    model = tiny.build(seed=0)

    class Pipeline:  # what apply_adacache reads of a pipeline
        transformer = model
        scheduler = FlowMatchEulerDiscreteScheduler()

    Pipeline.scheduler.set_timesteps(STEPS)
    apply_adacache(Pipeline(), SKIPPING)
    kwargs = tiny.inputs(model, batch_size=1)
    with torch.no_grad():
        for i in range(STEPS):
            if i == 3:
                Pipeline.scheduler.set_timesteps(STEPS)  # another run began on the shared scheduler
            with adacache.cache_context(model, "cond", step_index=i, num_inference_steps=STEPS):
                model(**{**kwargs, "timestep": Pipeline.scheduler.timesteps[i].expand(1)})
    stats = get_stats(model)
    assert len(stats) == 1 and stats[0].computed_steps == [1, 2, 5, 6] and stats[0].skipped_steps == [3, 4]


def test_removal_refuses_when_a_wrapper_was_set_on_the_model_afterwards_and_changes_nothing():
    model = ToyDiT()
    reference = denoise(model, torch.ones(1, 6, 3))
    apply_adacache(model, SKIPPING, spec=TOY_SPEC)
    patched_forward = model.forward
    calls = []

    def wrapper(*args, **kwargs):  # a user's own (accelerate's and diffusers' hooks: tests/test_compositions.py)
        calls.append(1)
        return patched_forward(*args, **kwargs)

    model.forward = wrapper
    with pytest.raises(RuntimeError, match="Nothing was changed"):
        remove_adacache(model)
    denoise(model, torch.ones(1, 6, 3))
    assert calls  # the wrapper still runs, AdaCache still applied
    assert hasattr(model, "_adacache") and "_adacache_block" in model.blocks[0].__dict__
    model.forward = patched_forward  # the user removes their wrapper; the retry succeeds
    remove_adacache(model)
    assert all(torch.equal(a, b) for a, b in zip(reference, denoise(model, torch.ones(1, 6, 3))))


def test_a_shallow_copy_cannot_remove_the_originals_cache():
    model = ToyDiT()
    reference = denoise(model, torch.ones(1, 6, 3))
    apply_adacache(model, SKIPPING, spec=TOY_SPEC)
    alias = copy.copy(model)
    for action in (remove_adacache, get_stats, adacache.reset_state,
                   lambda m: apply_adacache(m, SKIPPING, spec=TOY_SPEC)):
        with pytest.raises(RuntimeError, match="shallow copy"):
            action(alias)
    remove_adacache(model)  # the original is whole
    assert all(torch.equal(a, b) for a, b in zip(reference, denoise(model, torch.ones(1, 6, 3))))


def test_a_ctrl_c_right_after_the_lock_is_taken_releases_it(monkeypatch):
    model = ToyDiT()
    apply_adacache(model, SKIPPING, spec=TOY_SPEC)
    runtime = runtime_of(model)
    real_begin = type(runtime).begin_call

    def interrupted(self, *args):
        raise KeyboardInterrupt

    monkeypatch.setattr(type(runtime), "begin_call", interrupted)
    with pytest.raises(KeyboardInterrupt):
        model(torch.ones(1, 6, 3), torch.full((1,), 1000.0))
    monkeypatch.setattr(type(runtime), "begin_call", real_begin)
    model(torch.ones(1, 6, 3), torch.full((1,), 900.0))  # not refused as "already running"


def test_extreme_moreg_settings_compute_instead_of_overflowing():
    from adacache.core.decision import Schedule

    config = AdaCacheConfig(codebook={1e9: 4}, moreg=True, moreg_norm=1e-6, moreg_power=400.0, moreg_window=(1, 6))
    schedule = Schedule(config, num_steps=6)
    frames = torch.randn(1, 4, 3, 2)
    decide_computed_step(schedule, 1, frames, 4)
    record = decide_computed_step(schedule, 2, frames + 0.1, 4)  # (raw / 1e-6) ** 400 overflows a float
    assert record.rate == 1 and not schedule.records[-1].distance < float("inf")


def test_a_config_field_cannot_be_deleted_and_asdict_works():
    config = AdaCacheConfig.from_preset("opensora-30-fast", moreg=True)
    with pytest.raises(ConfigError, match="deleting"):
        del config.moreg
    assert config.moreg is True
    assert dataclasses.asdict(config)["codebook"] == dict(config.codebook)
    assert dataclasses.asdict(AdaCacheConfig())["codebook"] is None  # the default: no codebook, calibration-free
    assert dataclasses.astuple(config)[[f.name for f in dataclasses.fields(config)].index("moreg")] is True
    with pytest.raises(ConfigError, match="stats_history"):
        AdaCacheConfig(stats_history=10**30)


# --- removal leaves nothing bound ------------------------------------------------------------------------------------
def _attribute_names(model):
    """Every submodule's own attribute names (its __dict__ keys), the model's under ''."""
    return {name: set(module.__dict__) for name, module in model.named_modules()}


def _uncached_pipeline_first(tmp_path):
    """A diffusers pipeline that generated once before apply: its cache_context made the transformer's hook
    registry, so AdaCache finds one (diffusers then rebinds `forward` on the model when the last hook goes)."""
    from tiny_pipelines import TINY_PIPELINE_CALL, load_tiny_pipeline, save_tiny_pipeline

    pipe = load_tiny_pipeline(save_tiny_pipeline("wan", tmp_path))
    call = {**TINY_PIPELINE_CALL["wan"], "num_inference_steps": 4}

    def generate():
        pipe("a cat", generator=torch.Generator().manual_seed(0), **call)

    generate()
    return pipe, pipe.transformer, generate


def _cache_enabled_and_disabled_first(tmp_path):
    from diffusers import FirstBlockCacheConfig

    tiny = tiny_model("wan")
    model = tiny.build(seed=0)
    model.enable_cache(FirstBlockCacheConfig(threshold=0.1))
    model.disable_cache()
    return model, model, lambda: wan_loop(model, tiny)


def _fresh_model(tmp_path):
    tiny = tiny_model("wan")
    model = tiny.build(seed=0)
    return model, model, lambda: wan_loop(model, tiny)


def _spec_inferred(tmp_path):
    model = ToyDiT()
    return model, model, lambda: denoise(model, torch.ones(1, 6, 3))


@pytest.mark.parametrize("setup", [_fresh_model, _uncached_pipeline_first, _cache_enabled_and_disabled_first,
                                   _spec_inferred], ids=lambda setup: setup.__name__.strip("_"))
def test_removal_leaves_every_modules_attributes_as_they_were_before_apply(setup, tmp_path):
    target, model, generate = setup(tmp_path)
    before = _attribute_names(model)
    apply_adacache(target, SKIPPING)
    generate()
    remove_adacache(target)
    after = _attribute_names(model)
    assert after == before, {name: (sorted(after[name] - before[name]), sorted(before[name] - after[name]))
                             for name in before if after[name] != before[name]}
    assert "forward" not in model.__dict__
