"""Every private part of diffusers (and of accelerate and torch) that adacache relies on, in one place.

diffusers' hook machinery (`diffusers.hooks`) is public in name but not in contract: the cache context reaches a
hook through private attributes, the registry keeps its order in a private list, and `enable_cache` decides that a
cache is on from a private field. No other module of adacache imports `diffusers.hooks` or reads an underscore
name of a diffusers object; each such use is a small function here whose docstring says what it relies on.
`tests/test_compat.py` checks each of them against the installed diffusers, so a release that renames or changes
one fails there, naming it, rather than in a user's generation. The same holds for what adacache reads of the
wrappers it meets on a model: accelerate's offload hooks (`_old_forward`), and torch.compile's `OptimizedModule`
(`_orig_mod`); checked with accelerate 1.16 and torch 2.13.

Checked with diffusers 0.41.0, 0.42.0 and 0.42.1; 0.40 lacks what `cache_context` must carry (`step_index`,
`num_inference_steps`). diffusers is imported on first use, so `import adacache` stays light.
"""

from __future__ import annotations

import contextlib
import functools
import threading
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch


# --- hook registries ----------------------------------------------------------------------------------------------
def hook_registry(module: torch.nn.Module) -> Any:
    """The module's diffusers `HookRegistry`, made if it has none (`HookRegistry.check_if_exists_or_initialize`,
    which keeps it as `module._diffusers_hook`)."""
    from diffusers.hooks import HookRegistry

    return HookRegistry.check_if_exists_or_initialize(module)


def has_hook_registry(module: torch.nn.Module) -> bool:
    """Whether diffusers has put a hook registry on this module itself (relies on: the attribute `_diffusers_hook`)."""
    return "_diffusers_hook" in module.__dict__


def drop_hook_registry(module: torch.nn.Module) -> None:
    """Take an (empty) registry off the module, as if none had been made (relies on: `_diffusers_hook`)."""
    del module._diffusers_hook


def hook_registries(model: torch.nn.Module) -> Iterator[Any]:
    """Every diffusers hook registry on `model` and its submodules, the model's first (relies on:
    `_diffusers_hook`)."""
    for module in model.modules():
        registry = module.__dict__.get("_diffusers_hook")
        if registry is not None:
            yield registry


def hooks_of(registry: Any) -> dict[str, Any]:
    """A registry's hooks by name (the public `HookRegistry.hooks` dict)."""
    return registry.hooks


def last_hook_name(registry: Any) -> str | None:
    """The name of the hook registered last, the outermost wrapper of the module's forward, or None (relies on:
    `HookRegistry._hook_order`, the names in registration order)."""
    order = registry._hook_order
    return order[-1] if order else None


# --- a hook that diffusers' cache_context reaches -----------------------------------------------------------------
@functools.cache
def context_hook_class() -> type:
    """A base class for a diffusers `ModelHook` that replaces the module's forward and receives `cache_context`.

    Relies on: `ModelHook._is_stateful` (only stateful hooks get the context); `_set_cache_context` setting the
    context on every `StateManager` among the hook's attributes (`vars(hook)`), through `set_context`, which
    stores it in `StateManager._context`; a hook with `new_forward` getting `fn_ref.original_forward`, the forward
    it wraps; `reset_state` being called by the registry's `reset_stateful_hooks` (pipelines call it after each
    generation).

    Subclasses define `new_forward(module, *args, **kwargs)` and `reset_state(module)`; inside, `self.cache_context`
    is the context this thread set (or None) and `self.call_original(*args, **kwargs)` runs the wrapped forward.
    """
    from diffusers.hooks.hooks import ModelHook, StateManager

    class ThreadContext(StateManager):
        """diffusers keeps one cache context per model; this keeps one per thread, so a thread reads only the
        context it set (another thread's `cache_context("uncond")` between this thread's `cache_context("cond")`
        and its call would otherwise send the call to the other branch's cache)."""

        def __init__(self) -> None:
            super().__init__(object)
            self._local = threading.local()

        @property
        def _context(self) -> Any:
            return getattr(self._local, "context", None)

        @_context.setter
        def _context(self, context: Any) -> None:
            if "_local" in self.__dict__:  # StateManager.__init__ sets it before ours is made
                self._local.context = context

    class ContextHook(ModelHook):
        _is_stateful = True  # so diffusers' cache_context reaches our StateManager

        def __init__(self) -> None:
            super().__init__()
            self.state_manager = ThreadContext()

        @property
        def cache_context(self) -> Any:
            """The CacheContext this thread set with `cache_context`, or None."""
            return self.state_manager._context

        def call_original(self, *args: Any, **kwargs: Any) -> Any:
            return self.fn_ref.original_forward(*args, **kwargs)

    return ContextHook


# --- cache contexts -----------------------------------------------------------------------------------------------
def make_cache_context(name: str, step_index: int | None = None, num_inference_steps: int | None = None) -> Any:
    """A diffusers `CacheContext` (relies on: `diffusers.hooks.hooks.CacheContext(name, step_index=...,
    num_inference_steps=...)`, the fields that pipelines such as Wan's fill)."""
    from diffusers.hooks.hooks import CacheContext

    return CacheContext(name, step_index=step_index, num_inference_steps=num_inference_steps)


def set_cache_context(module: torch.nn.Module, context: Any) -> None:
    """Set (or clear, with None) the cache context every stateful hook on `module` and its submodules sees, as
    `model.cache_context` does (relies on: `diffusers.hooks.hooks._set_cache_context(module, context)`)."""
    from diffusers.hooks.hooks import _set_cache_context

    _set_cache_context(module, context)


# --- a running pipeline's denoising loop ---------------------------------------------------------------------------
def loop_latents(frame: Any) -> Any:
    """The latents a running pipeline's denoising loop carries, from the frame of its `__call__` (None where the
    frame has none). Relies on: diffusers' pipelines naming them `latents` in `__call__`, one row per video (CFG
    doubles them only in the model's input, `torch.cat([latents] * 2)`, never in `latents` itself)."""
    return frame.f_locals.get("latents")


# --- CacheMixin's one-cache-at-a-time rule ------------------------------------------------------------------------
class _NamedInMessages(type):
    """diffusers names the enabled cache by its class (`type(model._cache_config)`) in its errors; this makes that
    name say what to do."""

    def __repr__(cls) -> str:
        return cls.label

    __str__ = __repr__


class AdaCacheApplied(metaclass=_NamedInMessages):
    """What `model._cache_config` holds while AdaCache is applied, so that diffusers counts a cache as enabled:
    `is_cache_enabled` is True and `enable_cache` refuses a second cache, as apply_adacache refuses a diffusers
    cache. diffusers' `disable_cache` refuses it too (it knows only its own configs); `remove_adacache` removes it."""

    label = "AdaCache (call adacache.remove_adacache(model) first; model.disable_cache() cannot remove it)"

    def __repr__(self) -> str:
        return self.label


def diffusers_cache_config(model: torch.nn.Module) -> Any:
    """The config of the diffusers cache enabled on `model` (None when none is, or the model has no
    `CacheMixin`). Relies on: `CacheMixin._cache_config`, which `enable_cache` sets and `is_cache_enabled` reads."""
    return getattr(model, "_cache_config", None) if _is_cache_mixin(model) else None


def mark_cache_enabled(model: torch.nn.Module) -> Callable[[], None] | None:
    """Record AdaCache as the model's enabled cache (`_cache_config`), so diffusers' `enable_cache` refuses
    another; returns the undo, which puts back exactly what was there (absent, or the instance's own value) while
    the marker is still in place. None for a model without diffusers' `CacheMixin`: it has no `enable_cache`.

    Relies on: `CacheMixin.enable_cache` refusing when `is_cache_enabled` (`_cache_config is not None`), naming
    `type(_cache_config)` in its message; `disable_cache` raising for a config type it does not know, before it
    changes anything."""
    if not _is_cache_mixin(model):
        return None
    missing = object()
    previous = model.__dict__.get("_cache_config", missing)
    marker = AdaCacheApplied()
    model._cache_config = marker

    def undo() -> None:
        if model.__dict__.get("_cache_config") is not marker:
            return  # someone set it since (by hand); what they set stays
        if previous is missing:
            del model._cache_config
        else:
            model._cache_config = previous

    return undo


def _is_cache_mixin(model: Any) -> bool:
    from diffusers.models.cache_utils import CacheMixin

    return isinstance(model, CacheMixin)


# --- what the benchmark reads of diffusers' own caches -------------------------------------------------------------
def transformer_block_list_names() -> tuple[str, ...]:
    """The attribute names under which diffusers' caches look for a model's block lists ("blocks",
    "transformer_blocks", ...). Relies on: `diffusers.hooks._common._ALL_TRANSFORMER_BLOCK_IDENTIFIERS`."""
    from diffusers.hooks._common import _ALL_TRANSFORMER_BLOCK_IDENTIFIERS

    return tuple(_ALL_TRANSFORMER_BLOCK_IDENTIFIERS)


def record_magcache_ratios(model: torch.nn.Module, recorded: list[float]) -> int:
    """While MagCache calibrates (`MagCacheConfig(calibrate=True)`), append each magnitude ratio it computes to
    `recorded` (diffusers prints them and forgets them at the last step). Returns how many hooks were wrapped.

    Relies on: the tail block's `MagCacheBlockHook._perform_calibration_step(state, residual)`, which appends one
    ratio per transformer call to `state.calibration_ratios`."""
    wrapped = 0
    for registry in hook_registries(model):
        for hook in hooks_of(registry).values():
            original = getattr(hook, "_perform_calibration_step", None)
            if original is None:
                continue

            def record(state: Any, residual: torch.Tensor, original: Callable = original) -> None:
                original(state, residual)
                recorded.append(float(state.calibration_ratios[-1]))

            hook._perform_calibration_step = record
            wrapped += 1
    return wrapped


# --- context parallelism (diffusers' enable_parallelism) ----------------------------------------------------------
_CONTEXT_PARALLEL_HOOK_PREFIXES = ("cp_input---", "cp_output---")


def context_parallel_config(model: torch.nn.Module) -> Any:
    """The `ContextParallelConfig` diffusers runs `model` under (`enable_parallelism`, or `from_pretrained(...,
    parallel_config=...)`), or None. Relies on: `ModelMixin._parallel_config`, the `ParallelConfig` that
    `_resolve_parallel_config` records, and its `context_parallel_config`."""
    parallel = getattr(model, "_parallel_config", None)
    return getattr(parallel, "context_parallel_config", None) if parallel is not None else None


def context_parallel_group(config: Any) -> tuple[Any, bool]:
    """(the process group the tokens are split over, whether the split is into equal chunks).

    Relies on: `ContextParallelConfig._flattened_mesh`, the ring x ulysses mesh flattened by `setup`, whose group
    `ContextParallelSplitHook` shards over; with `ulysses_anything` or `ring_anything` it shards with
    `tensor_split` (the first N % W ranks one token more), otherwise with `chunk` into equal parts (N % W == 0 is
    asserted). Both give rank r of the group the r-th contiguous slice of the token dimension."""
    mesh = config._flattened_mesh
    if mesh is None:
        raise RuntimeError("diffusers' ContextParallelConfig has no device mesh yet (setup was not called)")
    return mesh.get_group(), not (config.ulysses_anything or config.ring_anything)


def has_context_parallel_hook(module: torch.nn.Module) -> bool:
    """Whether diffusers' context parallelism split or gathers at this very module (relies on: the hook names
    `cp_input---{id}` and `cp_output---{id}` of `diffusers.hooks.context_parallel`, in the module's registry)."""
    registry = module.__dict__.get("_diffusers_hook")
    return registry is not None and any(name.startswith(_CONTEXT_PARALLEL_HOOK_PREFIXES) for name in registry.hooks)


@contextlib.contextmanager
def cpu_ranks_on_one_device() -> Iterator[None]:
    """While enabling parallelism on a host with no accelerator (CPU ranks on gloo): diffusers'
    `_resolve_parallel_config` places rank r on device `rank % torch.accelerator.device_count()`, a division by zero
    there. For this block only, the count reads 1 (every rank on the CPU); with an accelerator, nothing changes."""
    if torch.accelerator.device_count() != 0:
        yield
        return
    count = torch.accelerator.device_count
    torch.accelerator.device_count = lambda: 1
    try:
        yield
    finally:
        torch.accelerator.device_count = count


# --- where other wrappers keep the forward they call: accelerate's hooks, diffusers' registries --------------------
@dataclass(frozen=True)
class ForwardSlot:
    """A place where a wrapper of a module's forward keeps the forward it calls, read again at every call: what is
    put there is what the wrapper calls next. `where` names it for messages."""

    where: str
    get: Callable[[], Any]
    put: Callable[[Any], None]


def accelerate_wraps(module: torch.nn.Module) -> bool:
    """Whether accelerate's hook is the outermost wrapper of `module.forward`: model CPU offload
    (`cpu_offload_with_hook`, which diffusers' `enable_model_cpu_offload` uses), sequential offload (`cpu_offload`),
    `dispatch_model`. Such a wrapper comes and goes: diffusers removes and re-adds model offload's at the end of every
    pipeline call (`maybe_free_model_hooks`), `pipe.remove_all_hooks()` removes it.

    Relies on: accelerate's `add_hook_to_module` keeping the hook in `module._hf_hook` and the forward it wraps in
    `module._old_forward`, and setting `module.forward` to a `functools.partial` of its `new_forward` (a function of
    `accelerate.hooks`) that reads `module._old_forward` at each call; `remove_hook_from_module` putting
    `module._old_forward` back as `module.forward`, and `add_hook_to_module` keeping `module.forward` as the new
    `_old_forward`. So a wrapper placed in `_old_forward` survives any number of removals and re-adds."""
    forward = module.__dict__.get("forward")
    function = getattr(forward, "func", None)
    return ("_hf_hook" in module.__dict__ and "_old_forward" in module.__dict__
            and getattr(function, "__module__", None) == "accelerate.hooks")


def accelerate_slot(module: torch.nn.Module) -> ForwardSlot | None:
    """The forward accelerate's hook calls (`module._old_forward`, see `accelerate_wraps`), or None without one."""
    if "_old_forward" not in module.__dict__:
        return None
    return ForwardSlot("accelerate's hook (model or sequential CPU offload)",
                       lambda: module.__dict__.get("_old_forward"),
                       lambda forward: setattr(module, "_old_forward", forward))


def registry_slots(module: torch.nn.Module) -> list[ForwardSlot]:
    """The forwards the hooks of the module's diffusers registry call (group offloading, layerwise casting, ...):
    for each hook, the one it wraps.

    Relies on: `HookRegistry._fn_refs` (one `HookFunctionReference` per hook, in `_hook_order`), whose `forward`
    (a hook without `new_forward`) or `original_forward` (a hook with one) holds the forward the hook wraps and is
    read at each call (`HookRegistry.remove_hook` relinks the chain by writing them)."""
    registry = module.__dict__.get("_diffusers_hook")
    if registry is None:
        return []
    slots = []
    for name, reference in zip(registry._hook_order, registry._fn_refs):
        for attribute in ("forward", "original_forward"):
            slots.append(ForwardSlot(
                f"diffusers' {name!r} hook", functools.partial(getattr, reference, attribute),
                functools.partial(setattr, reference, attribute)))
    return slots


def group_offloading_slot(module: torch.nn.Module) -> ForwardSlot | None:
    """Where the module's own forward sits beneath diffusers' group offloading hooks on it (`enable_group_offload`,
    `apply_group_offloading`, block or leaf level), or None where the module has none. A wrapper put there stays
    when group offloading is removed and re-applied (diffusers does that when a LoRA is loaded, unloaded or deleted,
    and its lazy prefetching removes its layer trackers after the first call): removing the last hook of a registry
    puts back the forward its first hook wraps.

    Relies on: the hook name `diffusers.hooks.group_offloading._GROUP_OFFLOADING`; `HookRegistry._fn_refs[0]`, the
    first hook's reference, holding the module's forward beneath every hook of the registry (its `forward`, or its
    `original_forward` for a hook with `new_forward`), read at each call (see `registry_slots`)."""
    from diffusers.hooks.group_offloading import _GROUP_OFFLOADING

    registry = module.__dict__.get("_diffusers_hook")
    if registry is None or registry.get_hook(_GROUP_OFFLOADING) is None:
        return None
    reference = registry._fn_refs[0]
    attribute = "forward" if reference.original_forward is None else "original_forward"
    return ForwardSlot("diffusers' group offloading", functools.partial(getattr, reference, attribute),
                       functools.partial(setattr, reference, attribute))


def keep_new_forward_when_relinked(hook: Any) -> None:
    """Keep `hook` (registered, with `new_forward`) in the chain when a hook registered before it is removed.

    diffusers 0.42.1's `HookRegistry.remove_hook` relinks the chain by writing the removed hook's forward into the
    next hook's `fn_ref.forward`; for a hook with `new_forward` that attribute holds the new_forward itself, so the
    hook is silently bypassed from then on (group offloading applied before AdaCache, then removed and re-applied by
    a LoRA load, would leave AdaCache off). Here that write goes to `fn_ref.original_forward`, the forward the hook
    wraps, as it does for a hook without new_forward; reads of `fn_ref.forward` still give the new_forward.

    Relies on: `ModelHook.fn_ref`, a `HookFunctionReference` whose `forward` the registry's wrapper calls at each call
    and whose `original_forward` `remove_hook` reads for a hook with new_forward; done on this one reference (its
    class is swapped for a subclass), never on diffusers' class."""
    reference = hook.fn_ref
    new_forward = reference.forward

    class RelinkedToOriginal(type(reference)):
        forward = property(lambda self: new_forward,
                           lambda self, value: setattr(self, "original_forward", value))

    reference.__dict__.pop("forward", None)
    reference.__class__ = RelinkedToOriginal


# --- torch.compile'd modules ----------------------------------------------------------------------------------------
def compiled_module_inner(module: Any) -> torch.nn.Module | None:
    """The module a `torch.compile(model)` wraps, or None for anything else (a module compiled in place with
    `model.compile()` is not wrapped). Relies on: torch's `OptimizedModule` keeping the compiled module in
    `_orig_mod` and calling it (its forward) at each call, so what is put on that module is what runs."""
    if type(module).__name__ != "OptimizedModule":
        return None
    inner = getattr(module, "_modules", {}).get("_orig_mod")
    return inner if isinstance(inner, torch.nn.Module) else None
