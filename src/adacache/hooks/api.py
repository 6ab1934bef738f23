"""The public API of AdaCache on a model or a pipeline: apply, remove, reconfigure, inspect, compile."""

from __future__ import annotations

import contextlib
import logging
import weakref
from typing import Any, Callable, Mapping

import torch

from .. import compat
from ..config import AdaCacheConfig
from ..models.infer import infer_spec, spec_source
from ..models.specs import ModelSpec, registered_spec, spec_for
from .generation import GenerationStats
from .install import ATTRIBUTE, BLOCK_ATTRIBUTE, install, installation_of, runtime_of, uninstall
from .runtime import Runtime

logger = logging.getLogger(__name__)


def apply_adacache(
    target: Any, config: AdaCacheConfig | Mapping[str, Any] | str | None = None, *, spec: ModelSpec | None = None
) -> None:
    """Enable AdaCache on a video transformer, or on every transformer of a diffusers pipeline.

    `config` is an AdaCacheConfig, a dict of its fields, a preset name or a JSON file path (default: the 30-step
    fast preset). With a pipeline, its scheduler's timesteps also tell the step index and count when the pipeline
    opens no `cache_context` with them (Latte, Allegro, HunyuanVideo); the scheduler is read from the pipeline at
    each call, so one swapped in later (`pipe.scheduler = X.from_config(pipe.scheduler.config)`) is followed. The
    pipeline is held weakly. `spec` describes a model the registry does not know.

    While applied, diffusers counts AdaCache as the model's cache (`is_cache_enabled` is True), so
    `model.enable_cache(...)` refuses a second one, as this refuses a model with a diffusers cache enabled. Remove
    AdaCache with `remove_adacache`; diffusers' `model.disable_cache()` refuses it, changing nothing.
    """
    config = as_config(config)
    models = transformers_of(target)
    done = []
    try:
        for model in models:
            _apply_to_model(model, config, spec)
            done.append(model)
            if not isinstance(target, torch.nn.Module):
                runtime_of(model).pipeline_ref = _pipeline_reference(target)
    except BaseException:
        for model in done:  # all or nothing
            remove_adacache(model)
        raise


def _apply_to_model(model: torch.nn.Module, config: AdaCacheConfig, spec: ModelSpec | None) -> None:
    if hasattr(model, ATTRIBUTE):
        installation_of(model)  # a shallow copy gets its own message
        raise RuntimeError(
            f"AdaCache is already applied to this {type(model).__name__}; call remove_adacache(model) first "
            "to apply it again with another config"
        )
    other_cache = compat.diffusers_cache_config(model)
    if other_cache is not None:
        raise RuntimeError(
            f"another diffusers cache ({type(other_cache).__name__}) is enabled on this model; call "
            "model.disable_cache() before apply_adacache"
        )
    known = spec if spec is not None else registered_spec(model)
    install(model, config, known, origin="given" if spec is not None else "registered" if known is not None
            else "inferred")


def as_config(config: AdaCacheConfig | Mapping[str, Any] | str | None) -> AdaCacheConfig:
    """An AdaCacheConfig from what apply_adacache takes: a config, a dict of its fields, a preset name or a JSON
    file path (None: the default config)."""
    if config is None:
        return AdaCacheConfig()
    if isinstance(config, Mapping):
        return AdaCacheConfig.from_dict(config)
    if not isinstance(config, AdaCacheConfig):
        return AdaCacheConfig.load(config)
    return config


def _pipeline_reference(pipeline: Any) -> Callable[[], Any]:
    """A weak reference to the pipeline (it holds the model, which holds the runtime); a strong one for objects
    that take no weak references (types.SimpleNamespace)."""
    try:
        return weakref.ref(pipeline)
    except TypeError:
        return lambda: pipeline


def remove_adacache(target: Any) -> None:
    """Undo apply_adacache: the model (or every transformer of the pipeline) is back to its exact uncached self.
    Blocks compiled with compile_blocks go back to their uncompiled forward."""
    models = [model for model in transformers_of(target) if ATTRIBUTE in model.__dict__]
    if not models:
        raise RuntimeError("AdaCache is not applied to this model; nothing to remove")
    uninstall(models)


def is_applied(target: Any) -> bool:
    """Whether AdaCache is applied to the model (or to every transformer of the pipeline)."""
    return all(ATTRIBUTE in model.__dict__ for model in transformers_of(target))


def reconfigure(target: Any, config: AdaCacheConfig | Mapping[str, Any] | str | None) -> None:
    """Give an applied AdaCache another config, as `remove_adacache` then `apply_adacache` would, without
    unwrapping the blocks: every generation in progress ends and the stats are cleared. With None, AdaCache is
    paused: calls run the model as it is, caching and measuring nothing, until a config is given again.

    The way to change configs where AdaCache cannot be removed and applied again: under diffusers' context
    parallelism, whose split hooks wrap AdaCache's blocks (enable_parallelism comes after apply_adacache). The probe
    (probe_block, probe_point) is where the blocks were wrapped, so it cannot change here."""
    config = as_config(config) if config is not None else None
    runtimes = [runtime_of(model) for model in transformers_of(target)]
    for runtime in runtimes:
        old = runtime.config
        if config is not None and (config.probe_block, config.probe_point) != (old.probe_block, old.probe_point):
            raise ValueError(
                f"reconfigure cannot move the probe (probe_block {old.probe_block!r} -> {config.probe_block!r}, "
                f"probe_point {old.probe_point!r} -> {config.probe_point!r}): it is where the blocks were wrapped. "
                "Call remove_adacache and apply_adacache with the new config instead"
            )
    for runtime in runtimes:
        runtime.reconfigure(config)


def transformers_of(target: Any) -> list[torch.nn.Module]:
    """The transformers AdaCache works on: the model itself, or a pipeline's `.transformer` (and `.transformer_2`,
    Wan 2.2's second expert). A torch.compile'd model (`torch.compile(model)`, given or assigned to the pipeline)
    stands for the model it compiles: AdaCache goes on that model, and the compiled one calls it. An object with
    neither is a TypeError saying what to pass."""
    if isinstance(target, torch.nn.Module):
        return [_uncompiled(target)]
    models = [_uncompiled(m) for m in (getattr(target, "transformer", None), getattr(target, "transformer_2", None))
              if m is not None]
    if not models:
        raise TypeError(
            f"AdaCache takes a torch.nn.Module (the transformer) or a pipeline with a .transformer, "
            f"got {type(target).__name__}"
        )
    return models


def _uncompiled(model: Any) -> Any:
    """The module a torch.compile'd one wraps (its `forward` is where AdaCache goes); any other, itself."""
    inner = compat.compiled_module_inner(model)
    return model if inner is None else inner


def describe(target: Any, *args: Any, print_source: bool = True, **kwargs: Any) -> ModelSpec:
    """The ModelSpec AdaCache uses for a transformer (or a pipeline's `.transformer`), printed as Python to save
    and `register_model`. Which one, in order: the spec of an applied AdaCache (given, registered, or inferred on
    its first call); else, with example forward inputs (`describe(model, **inputs)`), the spec inferred from one
    forward call with them; else the registered spec. A model with none of those is an error saying what to pass.
    """
    model = transformers_of(target)[0]
    applied = ATTRIBUTE in model.__dict__
    origin = None
    if applied and runtime_of(model).spec is not None:
        runtime = runtime_of(model)
        spec, origin = runtime.spec, runtime.spec_origin
    elif args or kwargs:
        if applied:
            raise RuntimeError("AdaCache is applied to this model but has not seen a call yet: call the model (its "
                               "spec is then inferred), or describe it before apply_adacache"
                               + _paused_hint(runtime_of(model)))
        spec, origin = infer_spec(model, args, kwargs, moreg=False), "inferred"
    else:
        spec = registered_spec(model)
        origin = "registered"
        if spec is None:
            raise ValueError(
                f"{type(model).__name__} has no registered spec, and its structure is inferred from a forward call: "
                "pass example inputs (adacache.describe(model, **forward_kwargs)), or apply AdaCache, run one "
                "generation and call describe again"
            )
    if print_source:
        note = "" if spec.frames_argument is not None else "  # frames unknown: MoReg cannot read motion"
        print(f"# AdaCache spec of {type(model).__name__} ({origin}){note}\n{spec_source(spec, type(model).__name__)}")
    return spec


def reset_state(target: Any) -> None:
    """Forget every generation in progress: the next call starts a new generation (its stats are kept)."""
    for model in transformers_of(target):
        runtime_of(model).reset()


def get_stats(target: Any) -> list[GenerationStats]:
    """Per generation and CFG branch (oldest first, the one in progress last): computed steps, distances, rates,
    motion scores and the cache memory held. For a pipeline with two transformers (Wan 2.2), both, each
    GenerationStats naming its `model`."""
    stats = []
    for name, model in zip(("transformer", "transformer_2"), transformers_of(target)):
        for entry in runtime_of(model).stats():
            entry.model = name
            stats.append(entry)
    return stats


def _paused_hint(runtime: Runtime) -> str:
    return ("; AdaCache is paused (reconfigure(model, None)), and a paused model runs its calls as they are, "
            "inferring nothing: give it a config with reconfigure first") if runtime.paused else ""


@contextlib.contextmanager
def cache_context(model: torch.nn.Module, name: str, step_index: int | None = None,
                  num_inference_steps: int | None = None):
    """Tell AdaCache which CFG branch and step a transformer call belongs to, for models without diffusers'
    `model.cache_context` (custom DiTs). `step_index` is 0-based, as in diffusers' pipelines."""
    previous = installation_of(model).hook.cache_context
    compat.set_cache_context(model, compat.make_cache_context(name, step_index, num_inference_steps))
    try:
        yield
    finally:
        compat.set_cache_context(model, previous)


def compile_blocks(model: torch.nn.Module, **compile_kwargs: Any) -> None:
    """torch.compile each block's own forward (fullgraph works), keeping AdaCache's decisions eager between them.

    Works with or without AdaCache applied; pass torch.compile's arguments (backend, mode, fullgraph, dynamic).
    With an attention probe, the probe block stays eager (one block of the stack), so its probe is never lost."""
    model = _uncompiled(model)
    runtime = runtime_of(model) if ATTRIBUTE in model.__dict__ else None
    if runtime is not None and runtime.layout is None:
        raise RuntimeError(
            f"AdaCache infers the structure of this {type(model).__name__} on its first call, which has not happened "
            "yet: run one call (or generation) first, or pass apply_adacache(..., spec=...)" + _paused_hint(runtime)
        )
    blocks = runtime.layout.blocks if runtime is not None else spec_for(model).blocks(model)
    for _, block, _ in blocks:
        marker = block.__dict__.get(BLOCK_ATTRIBUTE)
        if marker is None:
            block.compile(**compile_kwargs)  # outside the cached span, or no AdaCache
        elif marker.inner is not None:  # None: the probe block, kept eager (see install.wrap_block)
            marker.inner[0] = torch.compile(marker.inner[0], **compile_kwargs)
