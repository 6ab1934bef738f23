"""Reading and making a block's inputs and outputs through its `BlockSpec`, and the probe's frames for MoReg.

A block takes the video tokens (and, in models whose blocks update them, the text tokens) as named arguments, and
returns them as a bare tensor or at given places of a tuple. The spec says which; these functions read the two
streams of a call or an output, and make an output a skipped block can return in their place.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

from ..calls import argument
from ..models.specs import BlockSpec

STREAMS = ("video", "text")  # the streams' names in messages, in the order of every (hidden, text) pair here

_MISSING = object()


def read_streams(spec: BlockSpec, args: tuple, kwargs: dict, parameters: Sequence[str]) -> tuple:
    """(video tokens, text tokens or None) of a block call."""

    def get(name: str | None) -> torch.Tensor | None:
        if name is None:
            return None
        value = argument(name, parameters, args, kwargs, default=_MISSING)
        if value is _MISSING:
            raise ValueError(f"AdaCache: block called without its {name!r} argument; check the ModelSpec's BlockSpec")
        return value

    return get(spec.hidden_states_argument), get(spec.encoder_hidden_states_argument)


def read_output(spec: BlockSpec, output: Any) -> tuple:
    """(video tokens, text tokens or None) of a block's output."""
    if spec.output_hidden_states_index is None:
        if not isinstance(output, torch.Tensor):
            raise TypeError(
                f"AdaCache: the block returned {type(output).__name__}, but its BlockSpec says a bare tensor; set "
                "output_hidden_states_index (and the text stream's) in the spec"
            )
        return output, None
    if not isinstance(output, (tuple, list)):
        raise TypeError(
            f"AdaCache: the block returned a {type(output).__name__}, but its BlockSpec says a tuple (output indices "
            f"{spec.output_hidden_states_index}, {spec.output_encoder_hidden_states_index}); fix the spec"
        )
    hidden = output[spec.output_hidden_states_index]
    text = output[spec.output_encoder_hidden_states_index] if spec.output_encoder_hidden_states_index is not None else None
    return hidden, text


def make_output(spec: BlockSpec, hidden: torch.Tensor, text: torch.Tensor | None, as_list: bool = False) -> Any:
    """What the block returns for these streams: a bare tensor, or a tuple with each at its place (a list where the
    block's computed calls were seen returning one)."""
    if spec.output_hidden_states_index is None:
        return hidden
    result: list[Any] = [None] * (max(spec.output_hidden_states_index, spec.output_encoder_hidden_states_index or 0) + 1)
    result[spec.output_hidden_states_index] = hidden
    if spec.output_encoder_hidden_states_index is not None:
        result[spec.output_encoder_hidden_states_index] = text
    return result if as_list else tuple(result)


def probe_frames(probe: torch.Tensor, layout: str, frames: int | None) -> torch.Tensor | None:
    """The probe as (B, T, S, C) frames for MoReg, or None when the frame count does not fit its token layout."""
    if frames is None or probe.dim() != 3:
        return None
    a, b, c = probe.shape
    if layout == "b(ts)c" and b % frames == 0:
        return probe.view(a, frames, b // frames, c)
    if layout == "(bt)sc" and a % frames == 0:
        return probe.view(a // frames, frames, b, c)
    if layout == "(bs)tc" and b == frames:
        return probe.transpose(0, 1).unsqueeze(0)  # (1, T, B*S, C): sums over batch and tokens alike
    return None
