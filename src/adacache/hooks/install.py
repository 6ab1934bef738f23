"""Installing AdaCache on a transformer and undoing it.

What goes on the model:
- the runtime (runtime.py), kept with the list of undos in `model._adacache` (an `Installation`);
- a diffusers `ModelHook` on the transformer (`TransformerHook`), a short adapter: it receives `cache_context` and
  hands every forward call to the runtime;
- a wrapper on each block of the cached span (`wrap_block`), which asks the runtime before and after the block;
- a forward hook on the probe block's attention module, where the probe is an attention output (`ProbeRecorder`).

Removal (`uninstall`) checks everything before undoing anything: every undo comes with a check that says why it
cannot be done (something wrapped a forward after us), so a refusal leaves AdaCache whole.

A model without a registered spec has its structure inferred from its first call (`infer_and_install`).
Private diffusers names are used only through `compat`.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from .. import compat, parallel
from ..calls import map_tensors
from ..config import AdaCacheConfig
from ..models.infer import infer_spec, spec_source
from ..models.specs import ModelSpec
from .runtime import NotCopyable, Runtime

logger = logging.getLogger(__name__)

HOOK_NAME = "adacache"  # in the transformer's diffusers hook registry
ATTRIBUTE = "_adacache"  # on the transformer: its Installation
BLOCK_ATTRIBUTE = "_adacache_block"  # on each wrapped block: its BlockMarker

Check = Callable[[], "str | None"]  # why an undo cannot be done now, or None


@dataclass
class Installation(NotCopyable):
    """What AdaCache put on one transformer: its runtime, the transformer hook, and the undos in the order they
    were set up (each with its check)."""

    runtime: Runtime
    undos: list[tuple[Check, Callable[[], None]]] = field(default_factory=list)
    hook: Any = None  # the TransformerHook: its cache_context is what adacache.cache_context sets


def installation_of(model: torch.nn.Module) -> Installation:
    """The model's Installation; a RuntimeError where AdaCache is not applied, or where `model` is a shallow copy
    (copy.copy) of a model it is applied to."""
    installation = model.__dict__.get(ATTRIBUTE)
    if installation is None:
        raise RuntimeError("AdaCache is not applied to this model; call apply_adacache first")
    if installation.runtime.model_ref() is not model:
        raise RuntimeError(
            f"this {type(model).__name__} is a shallow copy (copy.copy) of a model with AdaCache applied: it shares "
            "the original's hooks and state, so AdaCache cannot be managed through it. Use the original; to get an "
            "independent model, remove_adacache(original), copy.deepcopy it, and apply to each."
        )
    return installation


def runtime_of(model: torch.nn.Module) -> Runtime:
    """The runtime of AdaCache on `model` (see `installation_of` for the errors): its config, spec, generations in
    progress (`states`) and whether it is paused, for inspection."""
    return installation_of(model).runtime


@functools.cache
def transformer_hook_class() -> type:
    """The diffusers ModelHook AdaCache puts on a transformer (made on first use: diffusers loads lazily)."""

    class TransformerHook(compat.context_hook_class()):
        """Receives diffusers' cache_context, and hands each forward call to the runtime."""

        def __init__(self, installation: Installation) -> None:
            super().__init__()
            self.installation = installation
            self.runtime = installation.runtime

        def new_forward(self, module: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
            runtime = self.runtime
            if runtime.paused:
                return self.call_original(*args, **kwargs)
            with runtime.holding():
                if runtime.layout is None:
                    infer_and_install(self.installation, module, args, kwargs, self.call_original)
                return runtime.run(self.cache_context, self.call_original, args, kwargs)

        def reset_state(self, module: torch.nn.Module) -> torch.nn.Module:
            self.runtime.reset()
            return module

    return TransformerHook


# --- installing -------------------------------------------------------------------------------------------------
def install(model: torch.nn.Module, config: AdaCacheConfig, spec: ModelSpec | None, origin: str) -> Installation:
    """Put AdaCache on `model`: all or nothing (a failure undoes what was done)."""
    runtime = Runtime(model, config, spec, origin)  # no spec: inferred on the first call (models/infer.py)
    installation = Installation(runtime)
    try:
        setattr(model, ATTRIBUTE, installation)  # before the hooks: a copy or pickle of the model meets it first
        if runtime.layout is not None:
            install_blocks(installation)
        had_registry = compat.has_hook_registry(model)
        had_own_forward = "forward" in model.__dict__
        registry = compat.hook_registry(model)
        installation.hook = transformer_hook_class()(installation)
        registry.register_hook(installation.hook, HOOK_NAME)
        installed = model.__dict__.get("forward")

        def replaced() -> str | None:
            # While ours is the registry's last hook, the model's forward must still be the one it installed: a
            # wrapper set on the model afterwards (accelerate's hooks, a user's) would be dropped by the removal.
            if compat.last_hook_name(registry) == HOOK_NAME and model.__dict__.get("forward") is not installed:
                return f"the forward of the {type(model).__name__}"
            return None

        def remove_transformer_hook() -> None:
            registry.remove_hook(HOOK_NAME, recurse=False)
            if not compat.hooks_of(registry):
                if not had_registry:
                    compat.drop_hook_registry(model)
                # diffusers rebinds the model's own forward as an instance attribute when its last hook goes, in a
                # registry made before ours too (a pipeline's cache_context makes one at its first generation)
                if not had_own_forward:
                    model.__dict__.pop("forward", None)

        installation.undos.append((replaced, remove_transformer_hook))
        # Counted by diffusers as its enabled cache, so model.enable_cache(...) refuses to stack one on AdaCache
        unmark = compat.mark_cache_enabled(model)
        if unmark is not None:
            installation.undos.append((lambda: None, unmark))
    except BaseException:
        for _, undo in reversed(installation.undos):
            undo()
        model.__dict__.pop(ATTRIBUTE, None)
        raise
    if runtime.layout is None:
        logger.info("AdaCache on %s: no registered spec; it is inferred on the first call", type(model).__name__)
    return installation


def install_blocks(installation: Installation) -> None:
    """Wrap the cached span's blocks and hook the probe (their undos join the installation's, undone first)."""
    runtime = installation.runtime
    layout = runtime.layout
    parallel.refuse_outside_split(runtime.model_ref(), list(layout.blocks), layout.first)
    for index in range(layout.first, len(layout.blocks)):
        eager = index == layout.probe_index and layout.probe_point != "block"
        installation.undos.append(wrap_block(runtime, index, eager))
    if layout.probe_point != "block":
        submodule = layout.blocks[layout.probe_index][1].get_submodule(layout.probe_point)
        handle = submodule.register_forward_hook(ProbeRecorder(runtime.probe_slot))
        installation.undos.append((lambda: None, handle.remove))
    logger.info("AdaCache on %s (%s spec): %d blocks, cached span %s, probe %s (%s)", runtime.model_name,
                runtime.spec_origin, len(layout.blocks), layout.span, layout.probe_block_name, layout.probe_point)


class BlockMarker(NotCopyable):
    """A cached block's link to its runtime; `inner[0]` is the block's own forward (compile_blocks may swap in a
    compiled one; None for the probe block, kept eager)."""

    def __init__(self, inner: list[Callable] | None) -> None:
        self.inner = inner


class ProbeRecorder(NotCopyable):
    """Forward hook on the probe block's attention module: keeps its output for the runtime."""

    def __init__(self, slot: list[torch.Tensor | None]) -> None:
        self.slot = slot

    def __call__(self, module: torch.nn.Module, args: Any, output: Any) -> None:
        self.slot[0] = output[0] if isinstance(output, (tuple, list)) else output


def wrap_block(runtime: Runtime, index: int, eager: bool = False) -> tuple[Check, Callable[[], None]]:
    """Replace block `index`'s forward by one that asks the runtime before and after it; returns (check, undo).

    Why a wrapper of our own rather than a hook in diffusers' HookRegistry (as the transformer's): in diffusers
    0.42 `HookRegistry.remove_hook` relinks the chain by writing the removed hook's forward into the next hook's
    `fn_ref.forward`, which for a hook with its own `new_forward` (ours: a skipped block must not run) replaces that
    new_forward. A hook registered on a block before ours and removed after (group offloading at block level, then
    `pipe.remove_all_hooks()`) would leave every block running with AdaCache silently off; checked on diffusers
    0.42.1 with a two-hook toy. Our wrapper instead refuses its removal while something wrapped the block after it,
    and is never bypassed. `functools.wraps` keeps the block's own signature visible (`inspect.signature`).

    `eager` keeps the block out of torch.compile: dynamo does not guard on module hooks, so a compiled probe block
    could silently skip the attention probe's hook."""
    block = runtime.layout.blocks[index][1]
    # A list so compile_blocks can swap in a compiled forward.
    inner = [torch.compiler.disable(block.forward) if eager else block.forward]
    before = torch.compiler.disable(runtime.before_block)
    after = torch.compiler.disable(runtime.after_block)

    @functools.wraps(block.forward)
    def forward(*args: Any, **kwargs: Any) -> Any:
        replacement = before(index, args, kwargs)
        if replacement is not None:
            return replacement
        return after(index, args, kwargs, inner[0](*args, **kwargs))

    had_own_forward = "forward" in block.__dict__
    previous = block.__dict__.get("forward")
    # Not traced by dynamo (its callee, the block's own forward, is): `block.compile()` compiles the block alone.
    wrapped = torch.compiler.disable(forward, recursive=False)
    setattr(block, BLOCK_ATTRIBUTE, BlockMarker(None if eager else inner))  # before `forward`: copies meet it first
    block.forward = wrapped

    def replaced() -> str | None:
        if block.__dict__.get("forward") is not wrapped:
            return f"the forward of {runtime.layout.blocks[index][0]} ({type(block).__name__})"
        return None

    def restore() -> None:
        del block.forward
        delattr(block, BLOCK_ATTRIBUTE)
        if had_own_forward:
            block.forward = previous

    return replaced, restore


def infer_and_install(installation: Installation, model: torch.nn.Module, args: tuple, kwargs: dict,
                      call_original: Callable[..., Any]) -> None:
    """First call of a model without a spec: watch one uncached forward, infer the spec, install the blocks.
    The watched forward runs on copies of the arguments with the random state restored afterwards, and its output
    is discarded: the real call that follows sees exactly what a plain call would (a forward that adds to its input
    in place, draws noise or pops from a kwargs dict included). Anything failing here leaves the runtime as it was
    (no spec, no wrapped block), so every later call tries again and fails the same way until fixed."""
    runtime = installation.runtime
    watched_args, watched_kwargs = map_tensors(torch.clone, args), map_tensors(torch.clone, kwargs)
    devices = sorted({p.device.index or 0 for p in model.parameters() if p.device.type == "cuda"})
    with torch.random.fork_rng(devices=devices):
        spec = infer_spec(model, args, kwargs, call=lambda: call_original(*watched_args, **watched_kwargs),
                          moreg=runtime.config.moreg)
    count = len(installation.undos)
    try:
        runtime.use_spec(model, spec)
        install_blocks(installation)
    except BaseException:
        for _, undo in reversed(installation.undos[count:]):
            undo()
        del installation.undos[count:]
        runtime.forget_spec()
        raise
    logger.info("AdaCache inferred the spec of %s (adacache.describe(model) prints it):\n%s", runtime.model_name,
                spec_source(spec, runtime.model_name))


# --- undoing ----------------------------------------------------------------------------------------------------
def uninstall(models: list[torch.nn.Module]) -> None:
    """Take AdaCache off every model of `models` (each must have it), all or nothing: every check runs before any
    undo, so a refusal leaves AdaCache whole and a retry can succeed."""
    installations = [(model, installation_of(model)) for model in models]
    replaced = [problem for _, installation in installations for check, _ in installation.undos if (problem := check())]
    if replaced:
        raise RuntimeError(
            f"cannot remove AdaCache: something replaced {', '.join(replaced)} after apply_adacache (another "
            "hook or wrapper, such as accelerate's); remove that first, then call remove_adacache again. Nothing "
            "was changed."
        )
    for model, installation in installations:
        for _, undo in reversed(installation.undos):
            undo()
        delattr(model, ATTRIBUTE)
