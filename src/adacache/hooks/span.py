"""The cached span of blocks, on one transformer call: what a skipped step returns, and what a computed step
measures and keeps.

- Skipped step (`skip`): at the last cached block, the first cached block's input plus the residual each video's
  store produces for this step, per stream. Every block before passes its input through.
- Computed step (`conclude`): after the last cached block, each video's schedule measures its rows of the probe,
  (under context parallelism the sums of every rank are added in one all-reduce), decides its next rate, and its
  store keeps its rows of the stack residual (output - input, per stream) if a skipped step will ask for it.

The span is one unit from the first block's input to the last block's output: whatever the model does between its
blocks (a round-trip reshape, an adapter or control hint added to the tokens, a decoder that restarts from the
embeddings) was part of the residual measured on the computed step.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from .batch import gather_rows, own_rows_of, rows_of
from .block_io import STREAMS, probe_frames
from .generation import BranchState, VideoState
from .layout import Layout

RESHAPED = ("the batch size or resolution changed within a generation. Call adacache.reset_state(model) to start a "
            "new one, or name each differently shaped call with its own cache_context.")


@dataclass
class Call:
    """One forward call of the transformer, or the part of it that runs some of the batch's rows (when some videos
    compute a step and others skip it, the call is made twice: once with the rows that compute, once with the
    rest, and the outputs are put back in row order)."""

    branch: str
    state: BranchState
    step: int
    compute: bool
    frames: int | None  # latent frames after patching (MoReg's frame count), None where unknown
    parts: list[tuple[VideoState, tuple[int, ...] | None]]  # the videos in this call, with their rows in it
    rows: tuple[int, ...] | None = None  # the batch rows this call runs; None: all of them
    size: int | None = None  # how many rows this call runs
    first_inputs: tuple[torch.Tensor | None, torch.Tensor | None] | None = None  # (video, text) into the span
    first_stamps: tuple[Any, ...] = ()  # per stream: what tells an in-place change (see `stamp`)
    probe: torch.Tensor | None = None
    reached_last: bool = False  # whether the last cached block ran (or was skipped) in this call

    def note(self, message: str) -> None:
        for video, _ in self.parts:
            video.schedule.note(message)


# --- a skipped step -------------------------------------------------------------------------------------------
def skip(call: Call, inputs: tuple) -> tuple:
    """The streams the last cached block returns on a skipped step: the span's input plus each video's residual for
    this step, its rows its own store's. A stream the first block does not take passes as it arrives."""
    produced = [(rows, video.store.produce(call.step)) for video, rows in call.parts]
    out = []
    for stream, (name, now, start) in enumerate(zip(STREAMS, inputs, call.first_inputs)):
        pieces = [(rows, residuals[stream]) for rows, residuals in produced]
        if all(cached is None for _, cached in pieces):
            out.append(now)
            continue
        cached = None
        if start is not None and all(piece is not None for _, piece in pieces):
            cached = gather_rows([(rows, _like(piece, start, call)) for rows, piece in pieces], call.size)
        if cached is None or start.shape != cached.shape:
            shape = tuple(cached.shape) if cached is not None else [tuple(getattr(p, "shape", ())) for _, p in pieces]
            raise ValueError(
                f"AdaCache: the {name} tokens have shape {tuple(getattr(start, 'shape', ()))} at step {call.step} "
                f"(branch {call.branch!r}) but the cached residual has {shape}: {RESHAPED}"
            )
        out.append(start + cached)
    return tuple(out)


def _like(cached: torch.Tensor, now: torch.Tensor, call: Call) -> torch.Tensor:
    """The cached residual on the device and in the dtype of this step's tokens (the model was moved or cast
    within the generation: the residual is still the best estimate of what the skipped blocks would add)."""
    if cached.dtype == now.dtype and cached.device == now.device:
        return cached
    call.note(
        f"the cached residual ({cached.dtype}, {cached.device}) was converted to the tokens' {now.dtype} on "
        f"{now.device}: the model's dtype or device changed within a generation"
    )
    return cached.to(device=now.device, dtype=now.dtype)


# --- a computed step ------------------------------------------------------------------------------------------
def stamp(tensor: torch.Tensor | None) -> Any:
    """What tells whether `tensor` is later modified in place: its version counter, or, for an inference tensor
    (made under torch.inference_mode, which keeps no version counter), the sum of its values."""
    if tensor is None:
        return None
    if tensor.is_inference():
        return tensor.sum(dtype=torch.promote_types(tensor.dtype, torch.float32))
    return tensor._version


def unchanged(call: Call) -> bool:
    """Whether the span's inputs are as they were when the first cached block received them."""
    for before, tensor in zip(call.first_stamps, call.first_inputs):
        after = stamp(tensor)
        if isinstance(before, torch.Tensor):  # sums: equal, or both NaN (a NaN input is not an in-place change)
            if not (torch.equal(before, after) or bool(before.isnan() and after.isnan())):
                return False
        elif before != after:
            return False
    return True


def conclude(call: Call, outputs: tuple, layout: Layout) -> None:
    """After the last cached block of a computed step: each video's schedule decides its next rate from its rows of
    the probe, then its store keeps its rows of the stack residual (output - input, per stream) if it wants it."""
    state = call.state
    if call.probe is None:
        raise RuntimeError(f"AdaCache: the probe at {layout.probe_block_name} produced nothing")
    for name, out, start in zip(STREAMS, outputs, call.first_inputs):
        if out is not None and start is not None and out.shape != start.shape:
            for video, _ in call.parts:
                video.store.clear()
            raise ValueError(
                f"AdaCache: the {name} tokens enter the cached span at {layout.blocks[layout.first][0]} with shape "
                f"{tuple(start.shape)} but leave it at {layout.blocks[layout.last][0]} with shape {tuple(out.shape)}, "
                "so no residual spans them; start the span at a block whose input has the last block's output "
                "shape (ModelSpec(cache_start=...))"
            )
    last_step = any(v.schedule.num_steps is not None and call.step >= v.schedule.num_steps for v, _ in call.parts)
    probes, sums = [], []
    for video, rows in call.parts:
        # kept as the video's last probe: its own rows only
        probe = own_rows_of(call.probe, rows, call.size) if len(call.parts) > 1 else rows_of(call.probe, rows, call.size)
        if state.sharded is not None:  # a slice of the tokens: ShardedProbe.motion_sums pairs its frames across ranks
            frames = call.frames
        elif (framed := probe_frames(probe, layout.probe_tokens, call.frames)) is None:
            frames = None  # MoReg cannot read frames from it: the distance decides
        else:
            probe, frames = framed, framed.shape[1]
        probes.append(probe)
        sums.append(video.schedule.measure(call.step, probe, frames))
    residuals, checks = None, {}  # checks: per video, the sums of its residual streams (finite or not)
    if state.sharded is not None:
        # One all-reduce for the step: every video's sums, and the sums of the residuals it may keep (so that a
        # slice that is not finite on one rank makes every rank compute that video's next step).
        # (A first step decides rate 1: a store that keeps nothing at rate 1 needs no check then.)
        first_only = all(s.first for s in sums) and not any(v.store.wants(1) for v, _ in call.parts)
        if not last_step and not first_only:
            residuals = _residuals(call, outputs)
            checks = {i: [_total(r) for r in rs if r is not None] for i, rs in enumerate(residuals)}
        sums, reduced = state.sharded.reduce_all(sums, [c for cs in checks.values() for c in cs])
        reduced = iter(reduced)
        checks = {i: [next(reduced) for _ in cs] for i, cs in checks.items()}
    keeping = []
    for i, ((video, _), probe, measured) in enumerate(zip(call.parts, probes, sums)):
        video.schedule.conclude(call.step, probe, measured)
        if last_step:
            video.schedule.prev_probe = None  # the generation is over: hold nothing
        if last_step or not video.store.wants(video.schedule.rate):
            video.store.clear()  # no skipped step will ask: no residual needed
        else:
            keeping.append(i)
    if keeping:
        if residuals is None:
            residuals = _residuals(call, outputs, keeping)
            checks = {i: [_total(r) for r in residuals[i] if r is not None] for i in keeping}
        _keep(call, layout, keeping, residuals, checks)
    for video, _ in call.parts:
        video.note_memory()


def _keep(call: Call, layout: Layout, keeping: list[int], residuals: list, checks: dict[int, list]) -> None:
    """Each keeping video's store takes its residual, unless a stream of it is not finite: then nothing is kept
    and the next step is computed."""
    kept_checks = [c for i in keeping for c in checks[i]]
    finite = iter(torch.isfinite(torch.stack(kept_checks)).tolist() if kept_checks else [])
    for i in keeping:
        video = call.parts[i][0]
        bad = [name for name, r in zip(STREAMS, residuals[i]) if r is not None and not next(finite)]
        if bad:
            video.schedule.note(
                f"non-finite values in the {bad[0]} residual of blocks {layout.span} at step {call.step} (branch "
                f"{call.branch!r}); not caching it, the next step is computed"
            )
            video.store.clear()
            video.schedule.reset_after_bad_cache(call.step)
        else:
            video.store.put(call.step, residuals[i])


def _residuals(call: Call, outputs: tuple, keeping: list[int] | None = None
               ) -> list[tuple[torch.Tensor | None, ...] | None]:
    """Per video of the call (those in `keeping`, or all; None for the others), its rows of the stack residual,
    per stream; detached (a grad-enabled call must not keep its graph alive in the cache)."""
    wanted = range(len(call.parts)) if keeping is None else keeping

    def rows_of_residual(out: torch.Tensor | None, first: torch.Tensor | None, rows) -> torch.Tensor | None:
        if out is None or first is None:
            return None
        # each video's own rows, subtracted apart: a tensor of its own, never a view that would hold the other
        # videos' rows alive after their steps part ways
        return (rows_of(out, rows, call.size) - rows_of(first, rows, call.size)).detach()

    return [tuple(rows_of_residual(out, first, rows) for out, first in zip(outputs, call.first_inputs))
            if i in wanted else None for i, (_, rows) in enumerate(call.parts)]


def _total(tensor: torch.Tensor) -> torch.Tensor:
    """The sum of a tensor's values, in at least float32: finite exactly when every value is (short of overflow)."""
    return tensor.sum(dtype=torch.promote_types(tensor.dtype, torch.float32))
