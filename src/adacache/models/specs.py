"""What AdaCache must know about a video DiT, as data: one `ModelSpec` per model family.

A spec names the block lists in call order, where each block's hidden states sit in its arguments and
outputs, which submodule is its attention (for the probe), how its tokens are laid out (for MoReg), and how to
read the timestep and the number of latent frames from the transformer's own arguments. Nothing else about a
model is known anywhere in the package. A model nobody described gets an error showing how to describe it.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field, replace
from typing import Any

import torch

TOKEN_LAYOUTS = ("b(ts)c", "(bt)sc", "(bs)tc")


@dataclass(frozen=True)
class BlockSpec:
    """How one kind of block takes and returns its hidden states."""

    # Argument carrying the video tokens (by name; positional calls are matched through the forward signature).
    hidden_states_argument: str = "hidden_states"
    # Argument carrying the text tokens, for blocks that update and return them (CogVideoX, HunyuanVideo, Mochi).
    # None: the block returns only the video tokens and leaves the text stream alone.
    encoder_hidden_states_argument: str | None = None
    # Positions of the two streams in the block's output tuple; None for the video stream = a bare tensor.
    output_hidden_states_index: int | None = None
    output_encoder_hidden_states_index: int | None = None
    # Submodule whose output is the "attention" probe (its first element when it returns a tuple).
    attention: str | None = "attn1"
    # Token layout of the video stream, for MoReg: b(ts)c = (batch, frames*tokens, channels), frame-major;
    # (bt)sc = (batch*frames, tokens, channels); (bs)tc = (batch*tokens, frames, channels).
    token_layout: str = "b(ts)c"
    # Layout of the attention module's output when it differs from the stream's (a block that reshapes tokens
    # around its attention, as Open-Sora's STDiT3 does); None = token_layout.
    attention_layout: str | None = None

    def __post_init__(self) -> None:
        for layout in (self.token_layout, self.attention_layout or self.token_layout):
            if layout not in TOKEN_LAYOUTS:
                raise ValueError(f"token layouts must be one of {TOKEN_LAYOUTS}, got {layout!r}")
        two_streams = self.encoder_hidden_states_argument is not None
        if two_streams != (self.output_encoder_hidden_states_index is not None):
            raise ValueError(
                "encoder_hidden_states_argument and output_encoder_hidden_states_index go together: set both "
                "for blocks that return updated text tokens, neither for blocks that do not"
            )
        if two_streams and self.output_hidden_states_index is None:
            raise ValueError("a block returning two streams needs output_hidden_states_index")


@dataclass(frozen=True)
class BlockList:
    """An attribute of the model holding a `torch.nn.ModuleList` of blocks, and how those blocks behave."""

    attribute: str
    block: BlockSpec = field(default_factory=BlockSpec)


@dataclass(frozen=True)
class ModelSpec:
    """Where the blocks are and how to read the model's inputs. See the registry below for examples.

    The cached span is one unit, from the first cached block's input to the last one's output: on a skipped step
    the last block returns that input plus the stack residual of the last computed step, whatever the model does
    between the blocks (reshapes, adapters or control hints added to the tokens). So the first block's input and
    the last block's output must have the same shape, per stream; where they do not (Latte's spatial and temporal
    blocks see different layouts), start the span later with `cache_start`.
    """

    # Block lists in call order; with `interleave`, the model calls list0[0], list1[0], list0[1], list1[1], ...
    block_lists: tuple[BlockList, ...]
    interleave: bool = False
    # Blocks before this index (in call order) always run; the cache spans the rest.
    cache_start: int = 0
    # The transformer's argument holding the diffusion timestep (a number or a tensor; its max is used).
    timestep_argument: str = "timestep"
    # Where the number of latent frames is read: an argument, and the dimension of it holding frames
    # (None when the argument is itself the frame count, as LTX's `num_frames`).
    frames_argument: str | None = "hidden_states"  # None: frames unknown (MoReg falls back to the distance)
    frames_dim: int | None = 2
    # Temporal patch size: an int, or the name of a config attribute ("patch_size_t"; "patch_size[0]" indexes).
    temporal_patch: int | str = 1
    # Several videos in one call: each video's rows of the batch are run alone when the others skip a step. The
    # transformer's arguments are cut to those rows wherever a tensor's first dimension is the batch (read from
    # `batch_argument`), except the arguments named here, which are the same for every row (rotary tables, scales).
    batch_argument: str = "hidden_states"
    unbatched_arguments: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not self.block_lists:
            raise ValueError("a ModelSpec needs at least one BlockList")
        if self.interleave and len(self.block_lists) < 2:
            raise ValueError("interleave=True needs two or more block lists")

    # --- reading a live model ------------------------------------------------------------------------------
    def blocks(self, model: torch.nn.Module) -> list[tuple[str, torch.nn.Module, BlockSpec]]:
        """(qualified name, block, block spec) for every block, in call order."""
        lists = []
        for block_list in self.block_lists:
            modules = get_attribute(model, block_list.attribute)
            if not isinstance(modules, (torch.nn.ModuleList, torch.nn.Sequential, list, tuple)):
                raise TypeError(
                    f"{type(model).__name__}.{block_list.attribute} is a {type(modules).__name__}, not a ModuleList "
                    "of blocks; fix the ModelSpec's block_lists"
                )
            lists.append([(f"{block_list.attribute}.{i}", m, block_list.block) for i, m in enumerate(modules)])
        if not self.interleave:
            return [entry for entries in lists for entry in entries]
        if len({len(entries) for entries in lists}) != 1:
            sizes = {b.attribute: len(e) for b, e in zip(self.block_lists, lists)}
            raise ValueError(f"interleaved block lists must have equal lengths, got {sizes}")
        return [entry for group in zip(*lists) for entry in group]

    def temporal_patch_size(self, model: torch.nn.Module) -> int:
        if isinstance(self.temporal_patch, int):
            return self.temporal_patch
        name, _, index = self.temporal_patch.partition("[")
        config = getattr(model, "config", None)
        source = config if config is not None and hasattr(config, name) else model
        value = getattr(source, name, None)
        if index:
            value = value[int(index.rstrip("]"))] if value is not None else None
        return int(value) if value is not None else 1


def get_attribute(obj: Any, dotted: str) -> Any:
    """`obj.a.b.c` for the path "a.b.c"; an AttributeError naming the part that is missing."""
    for part in dotted.split("."):
        if not hasattr(obj, part):
            raise AttributeError(f"{type(obj).__name__} has no attribute {part!r} (from spec path {dotted!r})")
        obj = getattr(obj, part)
    return obj


# --- the registry: one entry per diffusers video transformer class ------------------------------------------------
_SINGLE = BlockSpec()  # returns a bare tensor of video tokens; self-attention at attn1
_DUAL = BlockSpec(  # returns (video, text), both updated
    encoder_hidden_states_argument="encoder_hidden_states",
    output_hidden_states_index=0,
    output_encoder_hidden_states_index=1,
)
_WAN = ModelSpec(block_lists=(BlockList("blocks"),), temporal_patch="patch_size[0]")

MODEL_SPECS: dict[str, ModelSpec] = {
    "WanTransformer3DModel": _WAN,  # Wan 2.1 and 2.2 (each of 2.2's two experts gets its own cache)
    "SkyReelsV2Transformer3DModel": _WAN,
    "CogVideoXTransformer3DModel": ModelSpec(
        block_lists=(BlockList("transformer_blocks", _DUAL),),
        frames_dim=1,  # hidden_states come as (B, F, C, H, W)
        temporal_patch="patch_size_t",
        unbatched_arguments=("image_rotary_emb",),  # (tokens, dim) tables, one for the whole batch
    ),
    "HunyuanVideoTransformer3DModel": ModelSpec(
        # 20 dual-stream blocks then 40 single-stream ones; both take and return (video, text) separately.
        block_lists=(
            BlockList("transformer_blocks", replace(_DUAL, attention="attn")),
            BlockList("single_transformer_blocks", replace(_DUAL, attention="attn")),
        ),
        temporal_patch="patch_size_t",
    ),
    "LTXVideoTransformer3DModel": ModelSpec(
        block_lists=(BlockList("transformer_blocks"),),
        frames_argument="num_frames",  # hidden_states come packed as tokens; the latent frame count is an argument
        frames_dim=None,
        temporal_patch="patch_size_t",
        unbatched_arguments=("rope_interpolation_scale",),  # three scales (a tuple, or a tensor of 3)
    ),
    "MochiTransformer3DModel": ModelSpec(block_lists=(BlockList("transformer_blocks", _DUAL),)),
    "AllegroTransformer3DModel": ModelSpec(block_lists=(BlockList("transformer_blocks"),), temporal_patch="patch_size_t",
                                           unbatched_arguments=("image_rotary_emb",)),
    "LatteTransformer3DModel": ModelSpec(
        block_lists=(
            BlockList("transformer_blocks", BlockSpec(token_layout="(bt)sc")),  # spatial blocks
            BlockList("temporal_transformer_blocks", BlockSpec(token_layout="(bs)tc")),
        ),
        interleave=True,
        # Latte adds its temporal position embedding between spatial block 0 and temporal block 0; the cached
        # span starts after it so that skipped steps stay exact.
        cache_start=1,
    ),
}


def register_model(class_name: str, spec: ModelSpec) -> None:
    """Describe a model class (by its class name) so `apply_adacache` knows it."""
    if not isinstance(spec, ModelSpec):
        raise TypeError(f"spec must be a ModelSpec, got {type(spec).__name__}")
    MODEL_SPECS[class_name] = spec


def registered_spec(model: torch.nn.Module) -> ModelSpec | None:
    """The spec registered for the model's class (or a base class), else None."""
    for cls in type(model).__mro__:
        if cls.__name__ in MODEL_SPECS:
            return MODEL_SPECS[cls.__name__]
    return None


def spec_for(model: torch.nn.Module, spec: ModelSpec | None = None) -> ModelSpec:
    """The given spec, else the registered one for the model's class, else an error showing how to write one."""
    if spec is not None:
        return spec
    known = registered_spec(model)
    if known is None:
        raise ValueError(_describe_unknown_model(model))
    return known


def _describe_unknown_model(model: torch.nn.Module) -> str:
    name = type(model).__name__
    lists = [(n, len(m), type(m[0]).__name__) for n, m in model.named_children() if isinstance(m, torch.nn.ModuleList) and len(m)]
    guess = ", ".join(f'BlockList("{n}")' for n, _, _ in lists) or 'BlockList("blocks")'
    found = "; ".join(f"{n}: {k} x {c}" for n, k, c in lists) or "no ModuleList children found"
    signature = ""
    if lists:
        block = getattr(model, lists[0][0])[0]
        signature = f"\n  its first block's forward is {type(block).__name__}{inspect.signature(block.forward)}"
    return (
        f"AdaCache does not know the model class {name!r} (block lists: {found}).{signature}\n"
        "Describe it, for example:\n"
        "  from adacache import ModelSpec, BlockList, BlockSpec, apply_adacache\n"
        f"  spec = ModelSpec(block_lists=({guess},),  # in call order\n"
        "                   frames_argument='hidden_states', frames_dim=2, temporal_patch=1)\n"
        "  apply_adacache(model, config, spec=spec)   # or adacache.register_model"
        f"('{name}', spec)\n"
        "Blocks returning (video, text) tuples need BlockSpec(encoder_hidden_states_argument=..., "
        "output_hidden_states_index=0, output_encoder_hidden_states_index=1)."
    )


# Video transformer classes of diffusers that AdaCache cannot cache, and why (the README's model table says the
# same; tests/test_sweep.py checks that both agree with what the sweep finds).
UNSUPPORTED: dict[str, str] = {}

# Classes AdaCache caches but whose frames MoReg cannot read from the inputs (MoReg needs AdaCacheConfig(moreg=False)
# or a hand-written spec there); the README's model table says the same, checked by tests/test_sweep.py.
NO_MOREG: dict[str, str] = {
    "Cosmos3OmniTransformer": "takes its video as a list of per-item tensors inside one packed text+video sequence: "
                              "no batched latent or frame count to read",
    "HeliosTransformer3DModel": "its blocks see the history frames' tokens before the noisy chunk's, so the token "
                                "count does not split into the chunk's frames",
    "HunyuanVideoFramepackTransformer3DModel": "its blocks see the packed history (clean, 2x and 4x) tokens before "
                                               "the noisy window's, so the token count does not split into frames",
    "JoyImageEditTransformer3DModel": "an image-editing model: its 'frames' are the target and reference images, "
                                      "not time, so there is no motion to read",
    "JoyImageEditPlusTransformer3DModel": "an image-editing model: its 'frames' are the target and reference "
                                          "images, not time, so there is no motion to read",
    "MiniMaxH3Transformer3DModel": "one packed sequence of text, audio and video tokens, with no frame count among "
                                   "its arguments",
    "SanaWMLTX2RefinerTransformer3DModel": "takes the chunk's video tokens packed, with no frame count among its "
                                           "arguments",
    "WanAnimate2Transformer3DModel": "takes its video as a list of per-sample tensors without a batch dimension",
}
