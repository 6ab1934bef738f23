"""A patched transformer's layout, read once through its `ModelSpec`: its blocks in call order, the cached span,
and where the probe is. Frozen: the runtime never changes it (a new layout means a new `apply_adacache`)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..calls import parameter_names
from ..config import AdaCacheConfig
from ..models.specs import BlockSpec, ModelSpec


@dataclass(frozen=True)
class Layout:
    spec: ModelSpec
    blocks: tuple[tuple[str, torch.nn.Module, BlockSpec], ...]  # (name, block, its spec), in call order
    first: int  # the cached span: blocks[first] .. blocks[last]
    last: int
    probe_index: int  # the block whose residual (or attention output) is the probe
    probe_point: str  # "block", or the path of the probe block's submodule whose output is the probe
    probe_tokens: str  # how the probe's tokens are laid out ("b(ts)c", "(bt)sc", ...; models/specs.py)
    temporal_patch: int  # latent frames per token along time
    block_parameters: tuple[tuple[str, ...], ...]  # each block's forward parameters, read before wrapping

    @classmethod
    def read(cls, model: torch.nn.Module, spec: ModelSpec, config: AdaCacheConfig) -> "Layout":
        """The layout of `model` described by `spec`, with the probe `config` asks for; a ValueError says what to
        change where the two do not fit (too few blocks, a probe outside the span or not in the block)."""
        blocks = tuple(spec.blocks(model))
        if len(blocks) <= spec.cache_start:
            raise ValueError(f"{type(model).__name__} has {len(blocks)} blocks: nothing to cache after "
                             f"cache_start={spec.cache_start}")
        first, last = spec.cache_start, len(blocks) - 1
        probe_index = _probe_index(config.probe_block, len(blocks), first, last)
        probe_point = _probe_point(config.probe_point, *blocks[probe_index])
        probe_spec = blocks[probe_index][2]
        attention = probe_point != "block"
        probe_tokens = (probe_spec.attention_layout if attention else None) or probe_spec.token_layout
        return cls(spec, blocks, first, last, probe_index, probe_point, probe_tokens, spec.temporal_patch_size(model),
                   tuple(tuple(parameter_names(block.forward)) for _, block, _ in blocks))

    @property
    def span(self) -> str:
        """The cached span, named for messages: "blocks.0..blocks.29"."""
        return f"{self.blocks[self.first][0]}..{self.blocks[self.last][0]}"

    @property
    def probe_block_name(self) -> str:
        return self.blocks[self.probe_index][0]


def _probe_index(probe_block: int | None, count: int, first: int, last: int) -> int:
    index = min(max((count - 1) // 2, first), last) if probe_block is None else probe_block
    if index < 0:
        index += count
    if not first <= index <= last:
        raise ValueError(
            f"probe_block={probe_block} is out of range: the model has {count} blocks in call order and the cached "
            f"span is {first}..{last}; use an index in that range, or None for mid-stack"
        )
    return index


def _probe_point(point: str, block_name: str, block: torch.nn.Module, block_spec: BlockSpec) -> str:
    if point == "block":
        return "block"
    if point == "auto":  # the spec's attention module where the block has it, else the block residual
        return block_spec.attention if block_spec.attention is not None and _has_submodule(block, block_spec.attention) \
            else "block"
    if point == "attention":
        if block_spec.attention is None:
            raise ValueError(f"the model spec names no attention submodule for {block_name}; use probe_point='block'")
        point = block_spec.attention
    if not _has_submodule(block, point):
        children = ", ".join(n for n, _ in block.named_children())
        raise ValueError(
            f"probe_point {point!r} is not a submodule of {block_name} ({type(block).__name__}); "
            f"its children are: {children}; or use 'block'"
        )
    return point


def _has_submodule(module: torch.nn.Module, path: str) -> bool:
    try:
        module.get_submodule(path)
        return True
    except AttributeError:
        return False
