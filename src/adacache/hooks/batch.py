"""Cutting a batch into its videos and putting it back together: pure functions on tensors and call arguments.

When a batch's videos have their own schedules, a step that some compute and others skip runs the transformer
twice, once per group of rows (`cut_arguments`), and the two outputs are put back in row order (`merge_outputs`).
Rows are batch-major along a tensor's first dimension: the batch itself, or batch x frames and batch x tokens for
layouts such as Latte's (`rows_of`).
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

from ..calls import map_tensors, map_together, tensors_in

SHARED_HINT = "set AdaCacheConfig(batch_schedule='shared') for this model"


def video_rows(latents: torch.Tensor | None, batch_schedule: str,
               batched_cfg: bool = False) -> tuple[list[tuple[int, ...] | None], bool]:
    """(each video's rows of a batch, whether the batch's two halves were paired as the videos' CFG halves). One
    entry of None: one schedule for the whole batch.

    With "video", a batch that holds both CFG halves (`batched_cfg`: the pipeline guides in one call, passing
    torch.cat([latents] * 2), the unconditional half first) and whose halves hold the same latents is paired: video
    v is rows v and v + batch/2. Anything else is one video per row ("row" always is): equal halves alone are no
    proof of CFG, since two prompts may start from the same noise. "shared" is one schedule for the batch."""
    batch = latents.shape[0] if latents is not None else None
    if batch is None or batch < 2 or batch_schedule == "shared":
        return [None], False
    half = batch // 2
    paired = (batched_cfg and batch_schedule == "video" and batch % 2 == 0
              and torch.equal(latents[:half], latents[half:]))
    halves = 2 if paired else 1
    count = batch // halves
    if count == 1:
        return [None], paired
    return [tuple(v + h * count for h in range(halves)) for v in range(count)], paired


def rows_of(tensor: torch.Tensor, rows: tuple[int, ...] | None, batch: int | None) -> torch.Tensor:
    """`rows` of a tensor holding `batch` rows batch-major along its first dimension; the tensor itself for None
    (every row). A view where the rows run on (one video without CFG halves), else a copy."""
    if rows is None:
        return tensor
    per_row, left = divmod(tensor.shape[0], batch)
    if left:
        raise ValueError(f"AdaCache: a tensor of shape {tuple(tensor.shape)} does not hold {batch} batch rows along "
                         f"its first dimension, so a video's rows cannot be taken from it; {SHARED_HINT}")
    if rows == tuple(range(rows[0], rows[0] + len(rows))):
        return tensor[rows[0] * per_row:(rows[0] + len(rows)) * per_row]
    index = torch.tensor(rows, device=tensor.device)
    return tensor.unflatten(0, (batch, per_row)).index_select(0, index).flatten(0, 1)


def own_rows_of(tensor: torch.Tensor, rows: tuple[int, ...] | None, batch: int | None) -> torch.Tensor:
    """`rows_of`, as a tensor of its own: never a view that keeps the other rows' memory alive once held."""
    taken = rows_of(tensor, rows, batch)
    return taken.clone() if rows is not None and taken._base is not None else taken


def gather_rows(pieces: Sequence[tuple[tuple[int, ...] | None, torch.Tensor]], batch: int | None) -> torch.Tensor:
    """One tensor of `batch` rows from pieces holding some rows each (together every row once), in row order."""
    if len(pieces) == 1 and pieces[0][0] is None:
        return pieces[0][1]
    order = [row for rows, _ in pieces for row in rows]
    joined = torch.cat([piece.unflatten(0, (len(rows), -1)) for rows, piece in pieces])
    if order != list(range(batch)):
        inverse = sorted(range(len(order)), key=order.__getitem__)
        joined = joined.index_select(0, torch.tensor(inverse, device=joined.device))
    return joined.flatten(0, 1)


def cut_arguments(args: tuple, kwargs: dict, rows: tuple[int, ...], batch: int, parameters: Sequence[str],
                  unbatched: Sequence[str]) -> tuple[tuple, dict]:
    """A call's arguments for `rows` of its batch: every tensor whose first dimension is the batch, cut to those
    rows (inside tuples, lists and dicts too), except the arguments named in `unbatched` (the spec's
    `unbatched_arguments`: the same for every row however long)."""

    def cut(tensor: torch.Tensor) -> torch.Tensor:
        return rows_of(tensor, rows, batch) if tensor.dim() > 0 and tensor.shape[0] == batch else tensor

    skip = set(unbatched)
    cut_args = tuple(value if i < len(parameters) and parameters[i] in skip else map_tensors(cut, value)
                     for i, value in enumerate(args))
    cut_kwargs = {key: value if key in skip else map_tensors(cut, value) for key, value in kwargs.items()}
    return cut_args, cut_kwargs


def tensor_shapes(value: Any) -> list[tuple[int, ...]]:
    """The shapes of the tensors in an output, in order."""
    return [tuple(tensor.shape) for tensor in tensors_in(value)]


def not_batch_first(shapes: list, rows: list[int]) -> ValueError:
    return ValueError(
        f"AdaCache: the transformer returned tensors of shapes {shapes} for {rows} batch rows: its outputs must be "
        "batch-first for a batch's videos to run apart. Set AdaCacheConfig(batch_schedule='shared') for this model"
    )


def merge_outputs(parts: list[tuple[tuple[int, ...], Any]], batch: int) -> Any:
    """The outputs of a call made in parts (each running some rows), as the whole call's: tensors joined in row
    order (inside tuples, lists, named tuples and diffusers' output classes too), other values taken from the first
    part. A tensor whose first dimension does not hold its part's rows (an output that is not batch-first) is
    refused, as is any container the rules of `adacache.calls` do not know."""
    rows = [part_rows for part_rows, _ in parts]

    def join(leaves: list[Any]) -> Any:
        if not isinstance(leaves[0], torch.Tensor):
            return leaves[0]
        per_row = {output.shape[0] / len(r) if output.dim() else None for r, output in zip(rows, leaves)}
        trailing = {tuple(output.shape[1:]) for output in leaves}
        if len(per_row) != 1 or None in per_row or not float(next(iter(per_row))).is_integer() or len(trailing) != 1:
            raise not_batch_first([tuple(output.shape) for output in leaves], [len(r) for r in rows])
        return gather_rows(list(zip(rows, leaves)), batch)

    try:
        return map_together(join, [output for _, output in parts])
    except TypeError:
        raise TypeError(f"AdaCache: the transformer returned a {type(parts[0][1]).__name__}, which a batch's videos "
                        f"run apart cannot be put back together from; {SHARED_HINT}") from None
