"""What adacache.compat relies on in the installed diffusers, one test per private name.

A diffusers release that renames or changes one of them fails here, with a message that names it and the version,
instead of breaking a user's generation. Each test drives the name the way adacache uses it.
"""

import contextlib
import inspect
import io
import re
import threading
from pathlib import Path

import pytest
import torch

import adacache
import diffusers
from adacache import AdaCacheConfig, apply_adacache, compat, get_stats, remove_adacache
from adacache.testing import tiny_model
from adacache.hooks import runtime_of


@contextlib.contextmanager
def relying_on(name):
    try:
        yield
    except Exception as error:  # AssertionError included
        pytest.fail(f"diffusers {diffusers.__version__} changed {name}, which adacache.compat relies on: "
                    f"{type(error).__name__}: {error}")


class Doubler(torch.nn.Module):
    def forward(self, x):
        return 2 * x


class Parent(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.child = Doubler()

    def forward(self, x):
        return self.child(x) + 1


def context_hook(log=None):
    """The smallest subclass of compat's base hook: notes each call's context and calls the wrapped forward."""

    class Hook(compat.context_hook_class()):
        resets = 0

        def new_forward(self, module, *args, **kwargs):
            if log is not None:
                log.append(self.cache_context)
            return self.call_original(*args, **kwargs) + 100

        def reset_state(self, module):
            self.resets += 1
            return module

    return Hook()


def test_the_hook_registry_lives_in_the_private_attribute_diffusers_hook():
    module = Doubler()
    with relying_on("HookRegistry.check_if_exists_or_initialize / module._diffusers_hook"):
        assert not compat.has_hook_registry(module)
        registry = compat.hook_registry(module)
        assert compat.has_hook_registry(module) and module.__dict__["_diffusers_hook"] is registry
        assert compat.hook_registry(module) is registry  # made once
        assert list(compat.hook_registries(Parent())) == []
        compat.drop_hook_registry(module)
        assert not compat.has_hook_registry(module)


def test_the_registry_keeps_its_hooks_by_name_and_in_registration_order():
    module = Doubler()
    registry = compat.hook_registry(module)
    with relying_on("HookRegistry.hooks / HookRegistry._hook_order"):
        assert compat.last_hook_name(registry) is None
        first, second = context_hook(), context_hook()
        registry.register_hook(first, "first")
        registry.register_hook(second, "second")
        assert list(registry._hook_order) == ["first", "second"]
        assert compat.last_hook_name(registry) == "second"
        assert compat.hooks_of(registry) == {"first": first, "second": second}
        assert module(torch.ones(1)).item() == 202  # second wraps first wraps the forward: (2 + 100) + 100
        registry.remove_hook("second", recurse=False)
        assert compat.last_hook_name(registry) == "first" and list(compat.hooks_of(registry)) == ["first"]
        assert module(torch.ones(1)).item() == 102


def test_a_model_hook_with_new_forward_is_called_and_gets_the_original_forward():
    module = Doubler()
    log = []
    with relying_on("ModelHook.new_forward / ModelHook.fn_ref.original_forward"):
        compat.hook_registry(module).register_hook(context_hook(log), "probe")
        assert module(torch.full((1,), 3.0)).item() == 106
        assert log == [None]  # called once, no context set
        assert list(inspect.signature(module.forward).parameters) == ["x"]  # diffusers keeps the signature


def test_set_cache_context_reaches_a_stateful_hook_on_a_submodule_per_thread():
    model = Parent()
    log = []
    hook = context_hook(log)
    compat.hook_registry(model.child).register_hook(hook, "probe")
    context = compat.make_cache_context("cond", 3, 10)
    with relying_on("CacheContext(name, step_index, num_inference_steps)"):
        assert (context.name, context.step_index, context.num_inference_steps) == ("cond", 3, 10)
    with relying_on("_set_cache_context / ModelHook._is_stateful / StateManager._context"):
        compat.set_cache_context(model, context)
        assert hook.cache_context is context
        model(torch.ones(1))
        assert log == [context]
        seen_elsewhere = []
        thread = threading.Thread(target=lambda: seen_elsewhere.append(hook.cache_context))
        thread.start()
        thread.join()
        assert seen_elsewhere == [None]  # compat's StateManager keeps the context per thread
        compat.set_cache_context(model, None)
        assert hook.cache_context is None


def test_reset_stateful_hooks_resets_the_hook():
    module = Doubler()
    hook = context_hook()
    registry = compat.hook_registry(module)
    registry.register_hook(hook, "probe")
    with relying_on("HookRegistry.reset_stateful_hooks (pipelines' maybe_free_model_hooks calls it)"):
        registry.reset_stateful_hooks()
        assert hook.resets == 1


def test_cache_context_of_a_diffusers_model_reaches_adacache():
    tiny = tiny_model("wan")
    model = tiny.build(seed=0)
    apply_adacache(model, AdaCacheConfig(codebook={1e9: 3}))
    kwargs = tiny.inputs(model, batch_size=1)
    with relying_on("CacheMixin.cache_context(name, step_index=, num_inference_steps=) -> _set_cache_context"):
        with torch.no_grad():
            for i in range(4):
                with model.cache_context("cond", step_index=i, num_inference_steps=4):
                    model(**{**kwargs, "timestep": torch.full((1,), 900.0 - 100 * i)})
        (stats,) = get_stats(model)
        assert stats.branch == "cond" and stats.num_steps == 4 and stats.computed_steps == [1, 2, 3, 4]
    with relying_on("CacheMixin._reset_stateful_cache -> ModelHook.reset_state"):
        model._reset_stateful_cache()
        assert runtime_of(model).states == {}
    remove_adacache(model)


def test_cache_mixin_refuses_a_second_cache_while_adacache_is_marked():
    from diffusers import FirstBlockCacheConfig

    model = tiny_model("wan").build(seed=0)
    with relying_on("CacheMixin._cache_config / is_cache_enabled / enable_cache / disable_cache"):
        assert compat.diffusers_cache_config(model) is None and "_cache_config" not in model.__dict__
        undo = compat.mark_cache_enabled(model)
        assert model.is_cache_enabled
        assert isinstance(compat.diffusers_cache_config(model), compat.AdaCacheApplied)
        with pytest.raises(ValueError) as enabled:
            model.enable_cache(FirstBlockCacheConfig(threshold=0.1))
        assert "AdaCache" in str(enabled.value) and "adacache.remove_adacache(model) first" in str(enabled.value)
        assert not any(compat.hooks_of(r) for r in compat.hook_registries(model))  # refused before any hook
        with pytest.raises(ValueError) as disabled:
            model.disable_cache()
        assert "adacache.remove_adacache(model)" in str(disabled.value)
        assert isinstance(model.__dict__["_cache_config"], compat.AdaCacheApplied)  # disable_cache changed nothing
        undo()
        assert "_cache_config" not in model.__dict__ and not model.is_cache_enabled
        model.enable_cache(FirstBlockCacheConfig(threshold=0.1))
        assert isinstance(compat.diffusers_cache_config(model), FirstBlockCacheConfig)
        model.disable_cache()
    assert compat.mark_cache_enabled(Doubler()) is None  # no CacheMixin: nothing to mark


def test_transformer_block_list_names():
    with relying_on("diffusers.hooks._common._ALL_TRANSFORMER_BLOCK_IDENTIFIERS"):
        names = compat.transformer_block_list_names()
        assert isinstance(names, tuple) and all(isinstance(n, str) for n in names)
        assert {"blocks", "transformer_blocks", "temporal_transformer_blocks"} <= set(names)


def test_magcache_calibration_ratios_are_recorded_once_per_call():
    from diffusers import MagCacheConfig
    from diffusers.hooks.mag_cache import MagCacheBlockHook

    with relying_on("MagCacheBlockHook._perform_calibration_step(state, current_residual)"):
        assert list(inspect.signature(MagCacheBlockHook._perform_calibration_step).parameters)[1:] == [
            "state", "current_residual"]
    tiny = tiny_model("wan")
    model = tiny.build(seed=0)
    steps = 4
    model.enable_cache(MagCacheConfig(calibrate=True, num_inference_steps=steps))
    recorded = []
    kwargs = tiny.inputs(model, batch_size=1)
    with relying_on("MagCacheBlockHook._perform_calibration_step / MagCacheState.calibration_ratios"):
        assert compat.record_magcache_ratios(model, recorded) >= 1
        with torch.no_grad(), contextlib.redirect_stdout(io.StringIO()):
            for i in range(steps):
                with model.cache_context("cond"):
                    model(**{**kwargs, "timestep": torch.full((1,), 900.0 - 100 * i)})
        assert len(recorded) == steps and all(isinstance(r, float) for r in recorded)
    model.disable_cache()


def test_a_running_pipelines_loop_latents_are_its_latents_local():
    """compat.loop_latents reads `latents` from the frame of a pipeline's __call__: every diffusers video pipeline
    that calls its transformer in a loop names its latents so, and those that guide in one call double them only in
    the model's input."""
    from diffusers import (AllegroPipeline, CogVideoXPipeline, LattePipeline, LTXPipeline, MochiPipeline,
                           SanaVideoPipeline, SkyReelsV2DiffusionForcingPipeline, WanPipeline, WanVideoToVideoPipeline)

    batched = (AllegroPipeline, CogVideoXPipeline, LattePipeline, LTXPipeline, MochiPipeline, SanaVideoPipeline)
    for pipeline in (*batched, SkyReelsV2DiffusionForcingPipeline, WanPipeline, WanVideoToVideoPipeline):
        with relying_on(f"{pipeline.__name__}.__call__'s local `latents`"):
            call = inspect.unwrap(pipeline.__call__)
            assert "latents" in call.__code__.co_varnames
            if pipeline in batched:
                assert re.search(r"torch\.cat\(\[latents\] \* 2\)", inspect.getsource(call))

    def loop(latents):
        return compat.loop_latents(inspect.currentframe())

    marker = torch.zeros(3)
    assert loop(marker) is marker


# --- private diffusers names only in adacache.compat -------------------------------------------------------------
PRIVATE_DIFFUSERS = re.compile(
    r"diffusers\.hooks|_diffusers_hook|_hook_order|\._cache_config\b|\._context\b|_set_cache_context|"
    r"_ALL_TRANSFORMER_BLOCK_IDENTIFIERS|_perform_calibration_step|_is_stateful|\.fn_ref\b|_get_child_registries|"
    r"_reset_stateful_cache|_old_forward|_hf_hook|_fn_refs|_orig_mod|_GROUP_OFFLOADING|original_forward"
)


def test_private_diffusers_names_appear_only_in_the_compat_module():
    """A private diffusers (or accelerate, or torch.compile) name read outside adacache.compat has no test above: a
    release that changed it would break at a user's call, far from any test."""
    package = Path(adacache.__file__).parent
    assert (package / "compat.py").is_file()
    offenders = []
    for path in sorted(package.rglob("*.py")):
        if path.name == "compat.py":
            continue
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if PRIVATE_DIFFUSERS.search(line.split("#")[0]):
                offenders.append(f"{path.relative_to(package)}:{number}: {line.strip()}")
    assert not offenders, "private diffusers names outside adacache/compat.py:\n" + "\n".join(offenders)


# --- the wrappers adacache meets on a model: accelerate's hooks, diffusers' group offloading, torch.compile --------
class Blocks(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = torch.nn.ModuleList([torch.nn.Linear(2, 2) for _ in range(2)])

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return x


def test_accelerate_keeps_the_forward_it_wraps_in_old_forward_and_calls_it_at_each_call():
    from accelerate.hooks import ModelHook, add_hook_to_module, remove_hook_from_module

    module = Doubler()
    assert not compat.accelerate_wraps(module) and compat.accelerate_slot(module) is None
    with relying_on("accelerate add_hook_to_module / _hf_hook / _old_forward / remove_hook_from_module"):
        add_hook_to_module(module, ModelHook())
        assert compat.accelerate_wraps(module)
        slot = compat.accelerate_slot(module)
        wrapped = slot.get()
        slot.put(lambda x: wrapped(x) + 1)  # what sits there is what accelerate's wrapper calls
        assert module(torch.ones(1)).item() == 3
        inner = slot.get()
        remove_hook_from_module(module)  # leaves behind what it wrapped...
        assert module.forward is inner and not compat.accelerate_wraps(module)
        add_hook_to_module(module, ModelHook())  # ...which the next hook wraps
        assert compat.accelerate_slot(module).get() is inner and module(torch.ones(1)).item() == 3


def test_a_diffusers_registry_keeps_each_hooks_inner_forward_where_it_reads_it_at_each_call():
    from diffusers.hooks import ModelHook

    module = Doubler()
    bound = module.forward
    compat.hook_registry(module).register_hook(ModelHook(), "plain")  # no new_forward: `forward` is what it wraps
    with relying_on("HookRegistry._fn_refs / HookFunctionReference.forward, original_forward"):
        slots = compat.registry_slots(module)
        assert [s.where for s in slots] == ["diffusers' 'plain' hook"] * 2
        assert slots[0].get() == bound and slots[1].get() is None
        slots[0].put(lambda x: bound(x) + 1)
        assert module(torch.ones(1)).item() == 3


def test_group_offloading_keeps_the_module_forward_beneath_its_hooks_through_removal_and_reapplying():
    from diffusers.hooks import apply_group_offloading

    model = Blocks()
    cpu = torch.device("cpu")
    apply_group_offloading(model, onload_device=cpu, offload_type="block_level", num_blocks_per_group=1)
    block = model.blocks[0]
    with relying_on("_GROUP_OFFLOADING / HookRegistry._fn_refs[0] / _maybe_remove_and_reapply_group_offloading"):
        from diffusers.hooks.group_offloading import _maybe_remove_and_reapply_group_offloading

        assert compat.group_offloading_slot(Doubler()) is None
        slot = compat.group_offloading_slot(block)
        wrapped = slot.get()
        marker = lambda x: wrapped(x) * 0  # noqa: E731
        slot.put(marker)
        assert torch.equal(model(torch.ones(1, 2)), model.blocks[1](torch.zeros(1, 2)))
        _maybe_remove_and_reapply_group_offloading(model)  # what a LoRA load does
        assert compat.group_offloading_slot(block).get() is marker  # still beneath the new hooks


def test_a_hook_with_new_forward_stays_in_the_chain_when_a_hook_registered_before_it_is_removed():
    from diffusers.hooks import ModelHook

    module = Doubler()
    registry = compat.hook_registry(module)
    registry.register_hook(ModelHook(), "below")
    ours = context_hook()
    registry.register_hook(ours, "ours")
    assert module(torch.ones(1)).item() == 102
    with relying_on("HookRegistry.remove_hook's relinking into the next fn_ref.forward / ModelHook.fn_ref"):
        compat.keep_new_forward_when_relinked(ours)
        registry.remove_hook("below", recurse=False)
        assert module(torch.ones(1)).item() == 102  # without it, diffusers 0.42.1 gives 2: ours bypassed
        registry.register_hook(ModelHook(), "above")
        assert module(torch.ones(1)).item() == 102
        registry.remove_hook("above", recurse=False)
        registry.remove_hook("ours", recurse=False)
        assert module(torch.ones(1)).item() == 2


def test_an_optimized_module_keeps_the_module_it_compiles_in_orig_mod():
    module = Doubler()
    with relying_on("torch.compile's OptimizedModule._orig_mod"):
        compiled = torch.compile(module, backend="eager")
        assert compat.compiled_module_inner(compiled) is module
    assert compat.compiled_module_inner(module) is None and compat.compiled_module_inner(object()) is None
