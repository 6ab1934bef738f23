"""Describe a video DiT nobody described: infer its `ModelSpec` by watching one forward call.

`apply_adacache` uses a registered spec when the model's class has one (models/specs.py, hand-written
overrides), and otherwise infers one here on the model's first call, before caching anything:

1. **Block lists.** Every `nn.ModuleList` of the model (not inside another list's blocks) is a candidate; during
   the watched call, each of its modules records what it took and returned. A list is a block list when its
   modules are each called once and return their video tokens (a tensor of the shape they took).
2. **Call order.** The lists, in the order their blocks ran: one after another, or interleaved (Latte's spatial
   and temporal blocks).
3. **Streams.** The argument carrying the video tokens (`hidden_states`, else the first), the output index
   holding them, and whether the block also takes and returns the text tokens (`encoder_hidden_states`).
4. **Cached span.** Between two cached blocks the model may only reshape the tokens; where a block receives
   something other than (a reshape of) what the previous one returned (an added embedding, a concatenation, a
   skip connection), the span starts after that block.
5. **Probe.** The block's first attention module whose output has the video tokens' shape; else the block
   residual.
6. **Frames for MoReg.** Which argument of the model holds the latent video and which of its dims is time, the
   temporal patch size from the config, and the token layout the blocks see; checked against the token count.

Whatever it cannot be sure of is an `InferenceError` saying what was found and showing the `ModelSpec` to
write. `describe(model, *example_args, **example_kwargs)` prints the spec (to save and `register_model`).
"""

from __future__ import annotations

import inspect
import re
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from ..calls import argument, map_tensors, parameter_names
from .specs import BlockList, BlockSpec, ModelSpec

__all__ = ["InferenceError", "infer_spec", "spec_source", "diffusers_video_transformers"]

_HIDDEN_NAMES = ("hidden_states", "x", "hidden_state", "tokens", "img", "image", "video", "vis", "visual", "latents",
                 "sample", "gen_seq")
_TEXT_NAMES = ("encoder_hidden_states", "context", "text_hidden_states", "txt", "text", "und_seq")
_TIMESTEP_NAMES = ("timestep", "timesteps", "t", "sigma", "sigmas", "time_step")
_FRAMES_NAMES = ("num_frames", "latent_num_frames", "video_length", "num_latent_frames")
_MAX_DEPTH = 3  # how deep under the model block lists are looked for


class InferenceError(ValueError):
    """The model's structure could not be inferred with certainty; the message says what was found."""


@dataclass
class _Event:
    """One block call seen during the watched forward."""

    list_name: str
    index: int
    hidden_argument: str
    hidden_in: torch.Tensor
    text_in: torch.Tensor | None
    text_argument: str | None
    output: Any  # the block's output with every tensor replaced by a meta tensor of its shape (no memory held)
    chained: bool = False  # its video tokens follow from what the previous block call returned (see _follows)
    pair_cost: dict | None = None  # for streams of equal shapes: (video index, text index) -> distance to inputs


@dataclass
class _Watch:
    events: list[_Event] = field(default_factory=list)
    attention: dict[str, list[tuple[str, tuple]]] = field(default_factory=dict)  # list -> [(name, out shape)]


# --- what counts as a video transformer in the installed diffusers ----------------------------------------------
def diffusers_video_transformers() -> list[str]:
    """Names of the installed diffusers' video transformer classes, found by introspection: every model class
    exported by `diffusers` that a pipeline taking frames (`num_frames`, `video_length`, `video`, `frames`) uses
    as its transformer, and every class of `diffusers.models.transformers` named `*Transformer3D*`."""
    import diffusers
    from diffusers import DiffusionPipeline
    from diffusers.models.modeling_utils import ModelMixin

    found: set[str] = set()
    for name in dir(diffusers):
        try:
            obj = getattr(diffusers, name)
        except Exception:  # an optional backend missing: not a model we could build anyway
            continue
        if not inspect.isclass(obj):
            continue
        if issubclass(obj, ModelMixin) and obj.__module__.startswith("diffusers.models.transformers"):
            if "Transformer3D" in name:
                found.add(name)
            continue
        if not issubclass(obj, DiffusionPipeline):
            continue
        try:
            call = inspect.signature(obj.__call__).parameters
            init = inspect.signature(obj.__init__).parameters
        except (TypeError, ValueError):
            continue
        if not any(p in call for p in ("num_frames", "video_length", "video", "frames")):
            continue
        for parameter, value in init.items():
            if not parameter.startswith("transformer"):
                continue
            annotation = value.annotation
            text = annotation.__name__ if inspect.isclass(annotation) else str(annotation)
            for word in re.findall(r"[A-Za-z_][A-Za-z0-9_]*", text):
                cls = getattr(diffusers, word, None)
                if inspect.isclass(cls) and issubclass(cls, ModelMixin):
                    found.add(word)
    return sorted(found)


# --- inference ----------------------------------------------------------------------------------------------------
def _candidate_lists(model: torch.nn.Module) -> dict[str, torch.nn.ModuleList]:
    """Dotted name -> ModuleList, for every ModuleList under the model (not inside another one's modules)."""
    found: dict[str, torch.nn.ModuleList] = {}

    def walk(module: torch.nn.Module, prefix: str, depth: int) -> None:
        for name, child in module.named_children():
            path = f"{prefix}{name}"
            if isinstance(child, torch.nn.ModuleList) and len(child):  # (a Sequential is a layer: a head, an MLP)
                found[path] = child  # blocks or not: the watched call tells
                continue
            if depth < _MAX_DEPTH:
                walk(child, path + ".", depth + 1)

    walk(model, "", 0)
    return found


def _argument_names(module: torch.nn.Module) -> list[str]:
    return parameter_names(module.forward)


def _bound(names: list[str], args: tuple, kwargs: dict, name: str) -> Any:
    return argument(name, names, args, kwargs)


def _hidden_argument(names: list[str], args: tuple, kwargs: dict) -> str | None:
    for name in _HIDDEN_NAMES:
        if isinstance(_bound(names, args, kwargs, name), torch.Tensor):
            return name
    if args and isinstance(args[0], torch.Tensor) and names:
        return names[0]
    return None


def _tensors(output: Any) -> list[tuple[int | None, torch.Tensor]]:
    if isinstance(output, torch.Tensor):
        return [(None, output)]
    if isinstance(output, (tuple, list)):
        return [(i, o) for i, o in enumerate(output) if isinstance(o, torch.Tensor)]
    return []


def _meta(value: Any) -> Any:
    """`value` with its tensors replaced by meta tensors of the same shape and dtype: what inference keeps of a
    block call, so that the watched pass holds no activation beyond what the plain forward does."""
    return map_tensors(lambda tensor: torch.empty(tensor.shape, dtype=tensor.dtype, device="meta"), value)


def _follows(previous: torch.Tensor, hidden: torch.Tensor) -> bool:
    """Whether a block's input is the previous block's output carried on: the same tensor, or one pointing the same
    way (cosine similarity over 0.5: a residual stream with an adapter's output added or a scale applied). An
    embedder of a separate input, or the video tokens after a text refiner, point elsewhere (about 0)."""
    if previous is hidden:
        return True
    a, b = previous.detach().flatten().float(), hidden.detach().flatten().float()
    norms = a.norm() * b.norm()
    return bool(norms > 0) and float(a @ b / norms) > 0.5


def _watch(model: torch.nn.Module, lists: dict[str, torch.nn.ModuleList], call) -> _Watch:
    watch = _Watch()
    handles = []
    last_output: list[torch.Tensor | None] = [None]  # the previous block call's video output, for `chained`

    def on_block(list_name: str, index: int, names: list[str]):
        def hook(module, args, kwargs, output):
            bound = {n: v for n, v in zip(names, args)} | dict(kwargs)
            tensors = {n: v for n, v in bound.items() if isinstance(v, torch.Tensor)}
            returned = {tuple(t.shape) for _, t in _tensors(output)}
            streams = [n for n, v in tensors.items() if tuple(v.shape) in returned]  # arguments a block returns
            if not streams:
                hidden_name = _hidden_argument(names, args, kwargs)
                if hidden_name is None:
                    return
                streams = [hidden_name]
            # the video tokens: the argument named so; else the largest stream not named as text
            named = [n for n in _HIDDEN_NAMES if n in streams]
            unnamed = [n for n in streams if n not in _TEXT_NAMES] or streams
            hidden_name = named[0] if named else max(unnamed, key=lambda n: tensors[n].numel())
            others = [n for n in streams if n != hidden_name and tensors[n].shape != tensors[hidden_name].shape]
            others += [n for n in streams if n != hidden_name and n not in others]
            preferred = [n for n in _TEXT_NAMES if n in others] + [n for n in others if n not in _TEXT_NAMES]
            if not preferred:  # a text argument the block reads but does not return
                preferred = [n for n in _TEXT_NAMES if n in tensors]
            text_argument = preferred[0] if preferred else None
            hidden, text = tensors[hidden_name], tensors.get(text_argument) if text_argument else None
            previous = last_output[0]
            chained = previous is not None and previous.shape == hidden.shape and _follows(previous, hidden)
            pair_cost = None
            outs = _tensors(output)
            if text is not None and text.shape == hidden.shape:  # equal shapes: which output stays closest to which input
                pair_cost = {(i, j): float((a - hidden).norm() + (b - text).norm())
                             for i, a in outs for j, b in outs if i != j and a.shape == b.shape == hidden.shape}
            video_out = [t for _, t in outs if t.shape == hidden.shape]
            if len(video_out) > 1 and pair_cost:  # streams of one shape: the output that stays closest to the video
                best = min(pair_cost, key=pair_cost.get)[0]
                video_out = [t for i, t in outs if i == best]
            last_output[0] = video_out[0] if len(video_out) == 1 else None
            watch.events.append(_Event(list_name, index, hidden_name, _meta(hidden), _meta(text), text_argument,
                                       _meta(output), chained, pair_cost))

        return hook

    def on_attention(list_name: str, name: str):
        def hook(module, args, output):
            tensors = _tensors(output)
            if tensors:
                watch.attention.setdefault(list_name, []).append((name, tuple(tensors[0][1].shape)))

        return hook

    try:
        for list_name, modules in lists.items():
            for index, block in enumerate(modules):
                handles.append(block.register_forward_hook(on_block(list_name, index, _argument_names(block)), with_kwargs=True))
            for name, sub in modules[0].named_modules():
                if name and _is_attention(sub):
                    handles.append(sub.register_forward_hook(on_attention(list_name, name)))
        with torch.no_grad():
            call()
    finally:
        last_output[0] = None
        for handle in handles:
            handle.remove()
    return watch


def _is_attention(module: torch.nn.Module) -> bool:
    try:
        from diffusers.models.attention import AttentionModuleMixin
        from diffusers.models.attention_processor import Attention

        if isinstance(module, (Attention, AttentionModuleMixin)):
            return True
    except ImportError:  # pragma: no cover
        pass
    return "attention" in type(module).__name__.lower() and hasattr(module, "forward")


def _block_spec_of(event: _Event, check: bool = True) -> BlockSpec | None:
    """How this block call takes and returns its streams; None (or InferenceError with check) when unclear."""
    tensors = _tensors(event.output)
    video_shape = event.hidden_in.shape
    video_at = [i for i, t in tensors if t.shape == video_shape]
    text_at = [i for i, t in tensors if event.text_in is not None and t.shape == event.text_in.shape]

    def fail(why: str) -> None:
        if check:
            raise InferenceError(f"block {event.list_name}.{event.index}: {why}")
        return None

    if isinstance(event.output, torch.Tensor):
        if event.output.shape != video_shape:
            return fail(f"returns shape {tuple(event.output.shape)} for video tokens of shape {tuple(video_shape)}")
        return BlockSpec(hidden_states_argument=event.hidden_argument, attention=None)
    if not video_at:
        return fail(f"returns no tensor of the video tokens' shape {tuple(video_shape)}: "
                    f"{[tuple(t.shape) for _, t in tensors]}")
    two_streams = bool(text_at) and event.text_in is not None
    if two_streams and event.text_in.shape == video_shape:
        # Same shapes: tell the streams apart by which input each output stays closest to (residual blocks).
        pairs = [(i, j) for i in video_at for j in text_at if i != j]
        if not pairs:
            two_streams = False
        else:
            costs = event.pair_cost or {}
            video_index, text_index = min(pairs, key=lambda pair: costs.get(pair, float("inf")))
    elif two_streams:
        if len(video_at) != 1 or len(text_at) != 1:
            return fail(f"returns several tensors of one stream's shape: {[tuple(t.shape) for _, t in tensors]}")
        video_index, text_index = video_at[0], text_at[0]
    if not two_streams:
        if len(video_at) != 1:
            return fail(f"returns several tensors of the video tokens' shape: {[tuple(t.shape) for _, t in tensors]}")
        video_index, text_index = video_at[0], None
    others = [i for i, _ in tensors if i not in (video_index, text_index)]
    if others:
        return fail(f"returns more than its video and text tokens (tensors at {others} too); a skipped step "
                    "could not reproduce them")
    return BlockSpec(
        hidden_states_argument=event.hidden_argument,
        encoder_hidden_states_argument=event.text_argument if text_index is not None else None,
        output_hidden_states_index=video_index,
        output_encoder_hidden_states_index=text_index,
        attention=None,
    )


def infer_spec(model: torch.nn.Module, args: tuple = (), kwargs: dict | None = None, *, call=None,
               moreg: bool = True) -> ModelSpec:
    """The ModelSpec of `model`, from watching one forward call with `args`/`kwargs` (or `call()`, a function
    that runs the model's original forward once). Raises InferenceError where it cannot be sure."""
    kwargs = dict(kwargs or {})
    lists = _candidate_lists(model)
    name = type(model).__name__
    if not lists:
        raise InferenceError(f"{name} has no nn.ModuleList of blocks within {_MAX_DEPTH} levels of submodules"
                             + _how_to(name))
    watch = _watch(model, lists, call if call is not None else (lambda: model.forward(*args, **kwargs)))
    return _build_spec(model, lists, watch, args, kwargs, moreg)


def _build_spec(model, lists, watch: _Watch, args, kwargs, moreg: bool) -> ModelSpec:
    name = type(model).__name__
    found = ", ".join(f"{n} ({len(m)} x {type(m[0]).__name__})" for n, m in lists.items())
    # 1. block lists: every module called once, returning its video tokens
    calls: dict[str, list[_Event]] = {}
    for event in watch.events:
        calls.setdefault(event.list_name, []).append(event)
    block_lists: dict[str, BlockSpec] = {}
    why_not: list[str] = []
    for list_name, events in calls.items():
        indices = [e.index for e in events]
        if sorted(indices) != list(range(len(lists[list_name]))):
            why_not.append(f"{list_name}: blocks called {len(indices)} times for {len(lists[list_name])} blocks")
            continue
        specs = [_block_spec_of(e, check=False) for e in events]
        if any(s is None for s in specs):
            bad = next(e for e, s in zip(events, specs) if s is None)
            try:
                _block_spec_of(bad, check=True)
            except InferenceError as error:
                why_not.append(str(error))
            continue
        positions = [i for i, e in enumerate(watch.events) if e.list_name == list_name]
        adjacent = [b for a, b in zip(positions, positions[1:]) if b == a + 1]
        if adjacent and not any(watch.events[b].chained for b in adjacent):
            why_not.append(f"{list_name}: its modules do not pass the tokens on to one another (embedders of "
                           "separate inputs, not a stack of blocks)")
            continue
        merged = _merge(specs, events)
        if merged is None:
            why_not.append(f"{list_name}: its blocks take or return their streams in different ways")
            continue
        block_lists[list_name] = merged
    if not block_lists:
        raise InferenceError(
            f"{name}: no list of transformer blocks found among its ModuleLists ({found or 'none'})"
            + (f"; {'; '.join(why_not)}" if why_not else "") + _how_to(name)
        )
    # 2. call order: list after list, or interleaved. Lists whose calls fall irregularly between the blocks of
    # the others (adapters: a face cross-attention after every k-th block) are left out: they run between the
    # cached blocks, inside the span, like any other code there.
    order = interleave = None
    names = list(dict.fromkeys(e.list_name for e in watch.events if e.list_name in block_lists))
    for subset in _subsets_largest_first(names, lambda n: len(lists[n])):
        events = [e for e in watch.events if e.list_name in subset]
        interleave = _statable_order(events, subset, lists)
        if interleave is not None:
            order = subset
            break
    if order is None:
        sequence = [(e.list_name, e.index) for e in watch.events if e.list_name in block_lists]
        raise InferenceError(
            f"{name}: its blocks ran in an order a ModelSpec cannot state (neither list after list nor interleaved): "
            f"{', '.join(f'{n}.{i}' for n, i in sequence[:12])}{', ...' if len(sequence) > 12 else ''}" + _how_to(name)
        )
    if not interleave and len(order) > 1:
        # Lists run one after another: keep the run of lists that hand the video tokens on to each other (the next
        # list's first block takes what the previous list's last one returned), and of those runs the last (the one
        # the output comes from); a text refiner's blocks before the main stack form a run of their own.
        runs, shapes = [[order[0]]], {n: tuple(next(e for e in watch.events if e.list_name == n).hidden_in.shape) for n in order}
        first_event = {n: next(e for e in watch.events if e.list_name == n) for n in order}
        for previous, current in zip(order, order[1:]):
            if shapes[previous] == shapes[current] and first_event[current].chained:
                runs[-1].append(current)
            else:
                runs.append([current])
        order = runs[-1]
    block_lists = {n: block_lists[n] for n in order}
    events = [e for e in watch.events if e.list_name in order]
    # 3. the cached span: from the first block whose input has the last block's output shape, per stream (a
    # block on another layout, Latte's spatial blocks, cannot open a span that a temporal block closes)
    last_spec = block_lists[events[-1].list_name]
    last_out = dict(_tensors(events[-1].output))
    video_out = last_out.get(last_spec.output_hidden_states_index)
    text_out = last_out.get(last_spec.output_encoder_hidden_states_index) if last_spec.output_encoder_hidden_states_index is not None else None
    cache_start = next(
        (i for i, e in enumerate(events)
         if video_out is not None and e.hidden_in.shape == video_out.shape
         and (text_out is None or block_lists[e.list_name].encoder_hidden_states_argument is None
              or (e.text_in is not None and e.text_in.shape == text_out.shape))),
        None,
    )
    if cache_start is None:
        raise InferenceError(
            f"{name}: no block takes tokens of the shape the last block returns "
            f"({tuple(video_out.shape) if video_out is not None else None}), so no span of blocks can be cached"
            + _how_to(name)
        )
    # 4. frames and token layout for MoReg
    timestep_argument = _timestep_argument(model, args, kwargs)
    readings, temporal_patch, batch = _frames(model, args, kwargs)
    probe_list = events[min(max((len(events) - 1) // 2, cache_start), len(events) - 1)].list_name
    probe_tokens = next(e for e in events if e.list_name == probe_list).hidden_in
    # the first reading of the latent's shape under which the probe's tokens fit its frames (and, where the
    # patch size tells it, the tokens per frame)
    fitting = [r for r in readings if _token_layout(probe_tokens, batch, r[2], r[3]) is not None]
    frames_argument, frames_dim, frames, per_frame = (fitting or readings or [(None, None, None, None)])[0]
    layouts = {}
    for list_name in order:
        first = next(e for e in events if e.list_name == list_name)
        layouts[list_name] = _token_layout(first.hidden_in, batch, frames, per_frame)
    # 5. probe: the list's first attention module returning the video tokens (in the stream's shape, or
    # reshaped to a layout of their own, as a block attending within frames or across time does)
    specs: dict[str, BlockSpec] = {}
    for list_name, spec in block_lists.items():
        first = next(e for e in events if e.list_name == list_name)
        attention, attention_layout = None, None
        for sub, shape in watch.attention.get(list_name, []):
            if shape == tuple(first.hidden_in.shape):
                attention = sub
                break
            if len(shape) == 3 and shape[0] * shape[1] * shape[2] == first.hidden_in.numel():
                own = _token_layout(torch.empty(shape, device="meta"), batch, frames, None)
                if own is not None and own != layouts.get(list_name):
                    attention, attention_layout = sub, own
                    break
        specs[list_name] = replace(spec, attention=attention, attention_layout=attention_layout)
    if layouts[probe_list] is None:
        if moreg:
            raise InferenceError(
                f"{name}: cannot tell how the video tokens {tuple(next(e for e in events if e.list_name == probe_list).hidden_in.shape)} "
                f"of {probe_list} are laid out in frames (latent frames after patching: {frames}, batch {batch}), "
                "which MoReg needs. Turn MoReg off (AdaCacheConfig(moreg=False)) or describe the model"
                + _how_to(name)
            )
        frames_argument, frames_dim = None, None
    final = tuple(
        BlockList(n, replace(specs[n], token_layout=layouts[n] or "b(ts)c")) for n in order
    )
    return ModelSpec(
        block_lists=final,
        interleave=interleave,
        cache_start=cache_start,
        timestep_argument=timestep_argument,
        frames_argument=frames_argument,
        frames_dim=frames_dim,
        temporal_patch=temporal_patch,
        unbatched_arguments=_unbatched_arguments(model, args, kwargs, batch),
    )


def _unbatched_arguments(model: torch.nn.Module, args: tuple, kwargs: dict, batch: int | None) -> tuple[str, ...]:
    """The arguments the same for every row of the batch, as far as the watched call shows: tables and scales (a
    tensor, or a tuple or list of tensors and numbers) none of whose tensors has the batch as its first dimension,
    and which hold a number or a tensor whose first dimension is over 1 (a (1, ...) tensor is broadcast, and is
    never cut anyway). A per-video run of a batch cuts every other tensor whose first dimension is the batch."""
    if batch is None:
        return ()

    def leaves(value: Any) -> list[Any] | None:
        if isinstance(value, torch.Tensor) or (isinstance(value, (int, float)) and not isinstance(value, bool)):
            return [value]
        if isinstance(value, (tuple, list)) and value:
            found = [leaves(item) for item in value]
            return None if any(f is None for f in found) else [leaf for f in found for leaf in f]
        return None

    unbatched, names = [], _argument_names(model)
    for name in names:
        found = leaves(_bound(names, args, kwargs, name))
        if not found or (len(found) == 1 and not isinstance(found[0], torch.Tensor)):
            continue  # nothing, or a single number (a frame count, a flag): never cut
        tensors = [t for t in found if isinstance(t, torch.Tensor) and t.dim() > 0]
        if any(t.shape[0] == batch for t in tensors):
            continue
        if len(tensors) < len(found) or any(t.shape[0] > 1 for t in tensors):
            unbatched.append(name)
    return tuple(unbatched)


def _subsets_largest_first(names: list[str], size) -> list[list[str]]:
    """Every non-empty subset of `names` (in their order), most blocks first."""
    from itertools import combinations

    subsets = [list(c) for k in range(len(names), 0, -1) for c in combinations(names, k)]
    return sorted(subsets, key=lambda c: -sum(size(n) for n in c))


def _statable_order(events: list[_Event], order: list[str], lists) -> bool | None:
    """False: the lists ran one after another (in `order`); True: interleaved; None: neither."""
    sequence = [(e.list_name, e.index) for e in events]
    if sequence == [(n, i) for n in order for i in range(len(lists[n]))]:
        return False
    lengths = {len(lists[n]) for n in order}
    if len(order) > 1 and len(lengths) == 1 and sequence == [(n, i) for i in range(lengths.pop()) for n in order]:
        return True
    return None


def _merge(specs: list[BlockSpec], events: list[_Event]) -> BlockSpec | None:
    """One BlockSpec for a list whose blocks agree; blocks returning None where the others return text tokens
    (a last block that only updates the video tokens) take the two-stream spec, their text slot being None."""
    distinct = set(specs)
    if len(distinct) == 1:
        return specs[0]
    dual = {s for s in distinct if s.encoder_hidden_states_argument is not None}
    if len(dual) != 1:
        return None
    (spec,) = dual
    for other, event in zip(specs, events):
        if other == spec:
            continue
        output = event.output
        ok = (
            isinstance(output, (tuple, list))
            and other.output_hidden_states_index == spec.output_hidden_states_index
            and len(output) > spec.output_encoder_hidden_states_index
            and output[spec.output_encoder_hidden_states_index] is None
        )
        if not ok:
            return None
    return spec


def _timestep_argument(model, args, kwargs) -> str:
    names = _argument_names(model)
    for name in _TIMESTEP_NAMES:
        if name in names:
            return name
    for name in names:  # a per-modality name: Cosmos 3's vision_timesteps
        if name.endswith(("timestep", "timesteps")) and isinstance(_bound(names, args, kwargs, name), torch.Tensor):
            return name
    raise InferenceError(
        f"{type(model).__name__}.forward has no timestep argument among {_TIMESTEP_NAMES} (its arguments: "
        f"{', '.join(names)}); describe it with ModelSpec(timestep_argument=...)" + _how_to(type(model).__name__)
    )


def _config_value(model, name: str) -> Any:
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, name):
        return getattr(config, name)
    return getattr(model, name, None)


def _frames(model, args, kwargs) -> tuple[list[tuple[str | None, int | None, int | None, int | None]], int | str, int | None]:
    """([(frames_argument, frames_dim, token frames of this call, tokens per frame where the spatial patch tells
    it)] candidate readings, most likely first; temporal_patch; batch size)."""
    names = _argument_names(model)
    hidden_name = _hidden_argument(names, args, kwargs)
    hidden = _bound(names, args, kwargs, hidden_name) if hidden_name else None
    patch = _config_value(model, "patch_size")
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "patch_size_t"):  # None in some configs (CogVideoX 1.0): 1
        temporal_patch: int | str = "patch_size_t"
        pt = int(config.patch_size_t or 1)
    elif isinstance(patch, (tuple, list)) and len(patch) == 3:
        temporal_patch, pt = "patch_size[0]", int(patch[0])
    else:
        temporal_patch, pt = 1, 1
    if not isinstance(hidden, torch.Tensor):
        return [], temporal_patch, None
    batch = hidden.shape[0]
    spatial = patch[-1] if isinstance(patch, (tuple, list)) and patch else patch

    def reading(dim: int, h: int, w: int) -> tuple:
        per_frame = (h // spatial) * (w // spatial) if isinstance(spatial, int) and spatial > 0 else None
        return hidden_name, dim, max(1, -(-hidden.shape[dim] // pt)), per_frame

    if hidden.dim() == 5:
        s = hidden.shape
        channels = _config_value(model, "in_channels")
        first = reading(2, s[3], s[4])  # (B, C, F, H, W), the common layout
        if s[2] == channels and s[1] != channels:
            first = reading(1, s[3], s[4])  # (B, F, C, H, W): CogVideoX
        elif s[1] == channels == s[2]:  # as many frames as channels: the forward's unpacking of the shape tells
            dim = _frames_dim_from_source(model, hidden_name)
            first = reading(dim or 2, s[3], s[4])
        # then every other reading, channels last (B, F, H, W, C: Kandinsky 5) included; the token count decides
        others = [reading(2, s[3], s[4]), reading(1, s[3], s[4]), reading(1, s[2], s[3])]
        return [first, *[r for r in others if r != first]], temporal_patch, batch
    for name in _FRAMES_NAMES:
        value = _bound(names, args, kwargs, name)
        if isinstance(value, int) or (isinstance(value, torch.Tensor) and value.numel() == 1):
            return [(name, None, max(1, int(value) // pt), None)], temporal_patch, batch
    return [], temporal_patch, batch


def _frames_dim_from_source(model, hidden_name: str) -> int | None:
    """1 or 2 where the forward unpacks `b, f, c, h, w = hidden_states.shape` with a frames-like name."""
    try:
        source = inspect.getsource(type(model).forward)
    except (OSError, TypeError):
        return None
    match = re.search(r"(\w+(?:\s*,\s*\w+){4})\s*=\s*" + re.escape(hidden_name) + r"\.shape\b", source)
    if match is None:
        return None
    names = [n.strip() for n in match.group(1).split(",")]
    for dim in (1, 2):
        if "frame" in names[dim] or names[dim] in ("t", "f", "T", "F"):
            return dim
    return None


def _token_layout(tokens: torch.Tensor, batch: int | None, frames: int | None, per_frame: int | None) -> str | None:
    """The layout of (a, b, c) video tokens, or None when it is not certain (the token count does not fit the
    frames and, where known, the tokens per frame: text or register tokens mixed in, say)."""
    if frames is None or batch is None or tokens.dim() != 3:
        return None
    a, b, _ = tokens.shape
    fits = lambda s: per_frame is None or s == per_frame  # noqa: E731
    if a == batch and b % frames == 0 and fits(b // frames):
        return "b(ts)c"
    if frames > 1 and a == batch * frames and fits(b):
        return "(bt)sc"
    if frames > 1 and b == frames and a % batch == 0 and fits(a // batch):
        return "(bs)tc"
    return None


def spec_source(spec: ModelSpec, class_name: str | None = None) -> str:
    """Python source for `spec`, to paste into a project (and register under `class_name`)."""
    lines = ["from adacache import BlockList, BlockSpec, ModelSpec, register_model", "", "spec = ModelSpec("]
    lines.append("    block_lists=(")
    default = BlockSpec()
    for block_list in spec.block_lists:
        fields = [f"{k}={v!r}" for k, v in block_list.block.__dict__.items() if getattr(default, k) != v]
        lines.append(f"        BlockList({block_list.attribute!r}, BlockSpec({', '.join(fields)})),")
    lines.append("    ),")
    base = ModelSpec(block_lists=spec.block_lists)
    for key in ("interleave", "cache_start", "timestep_argument", "frames_argument", "frames_dim", "temporal_patch",
                "batch_argument", "unbatched_arguments"):
        if getattr(spec, key) != getattr(base, key):
            lines.append(f"    {key}={getattr(spec, key)!r},")
    lines.append(")")
    if class_name:
        lines.append(f"register_model({class_name!r}, spec)")
    return "\n".join(lines)


def _how_to(name: str) -> str:
    return (f". Describe {name} by hand: adacache.apply_adacache(model, config, spec=ModelSpec(...)) or "
            f"adacache.register_model({name!r}, spec); see adacache.ModelSpec and BlockSpec")

