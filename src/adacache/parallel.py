"""AdaCache under diffusers' context parallelism: every rank holds a slice of the video's tokens, and every rank
must take the same decision at every step (a rank that skips while another computes would leave the other waiting
in the attention's all-to-all forever).

diffusers (`model.enable_parallelism(config=ContextParallelConfig(ulysses_degree=...))`) splits the token dimension
of the hidden states into contiguous slices, rank r of the context-parallel group holding the r-th, and gathers them
again after the blocks. AdaCache's block wrappers sit inside that split (see `refuse_outside_split`), so each rank
measures its own slice of the probe. What this module adds, per generation (`ShardedProbe`):

- `reduce_all`: the probe's sums (L1 of the change, L1 of the base, MoReg's numerator and denominator per stride;
  per video, when a batch's videos have their own schedules) are added over the ranks in one all-reduce of a small
  stacked tensor per computed step, together with the sums of the residuals about to be cached (a non-finite value
  on one rank makes the total non-finite on all); every rank then divides the same sums, so every rank looks the
  same rate up and makes the same keep-or-recompute choice. Sums, never per-rank ratios: slices may be uneven.
- `motion_sums`: MoReg's frame-to-frame differences pair token i with token i - stride * S (S tokens per frame), which
  for the first stride * S tokens of a slice lie on the ranks before it. Those tokens (at most max(stride) frames)
  are sent by point-to-point from the ranks that hold them; the rest is measured locally, and the sums are then
  exact, whatever the slice boundaries (inside a frame or between frames).
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
from typing import Any, Iterator

import torch

from . import compat
from .core.decision import ProbeSums, count_of, l1

logger = logging.getLogger(__name__)


class ContextParallel:
    """The context-parallel group a model's tokens are split over, and how they are split."""

    def __init__(self, group: Any, even: bool) -> None:
        import torch.distributed as dist

        self.group, self.even = group, even
        self.world = dist.get_world_size(group)
        self.rank = dist.get_rank(group)

    @classmethod
    def of(cls, model: torch.nn.Module) -> ContextParallel | None:
        """The model's context parallelism, or None when it runs whole on this process."""
        config = compat.context_parallel_config(model)
        if config is None:
            return None
        group, even = compat.context_parallel_group(config)
        parallel = cls(group, even)
        return parallel if parallel.world > 1 else None

    def all_sum(self, values: torch.Tensor) -> torch.Tensor:
        import torch.distributed as dist

        values = values.contiguous()
        dist.all_reduce(values, op=dist.ReduceOp.SUM, group=self.group)
        return values


class ShardedProbe:
    """One generation's probe measurement under context parallelism: `reduce_all` between its Schedules' `measure`
    and `conclude`, and `motion_sums` for their `measure`."""

    def __init__(self, parallel: ContextParallel) -> None:
        self.parallel = parallel
        self.bounds: list[tuple[int, int]] | None = None  # each rank's [start, end) of the token dimension

    def reduce_all(self, sums: list[ProbeSums], checks: list[torch.Tensor] = ()
                   ) -> tuple[list[ProbeSums], list[torch.Tensor]]:
        """Each probe's sums (one per video that computed this step) over every rank's slice, and `checks` (0-d
        sums of the residuals: non-finite on one rank, non-finite in the total) added over the ranks, in one
        all-reduce of [change, base, (numerator, denominator) per stride] per probe with a last one to compare,
        then the checks. A step with nothing to add (every probe a first one, no check) calls nothing."""
        parts = [value for s in sums if not s.first
                 for value in (s.change, s.base, *(v for pair in s.motion or [] for v in pair))]
        parts += list(checks)
        if not parts:
            return list(sums), list(checks)
        dtype = torch.float64 if any(p.dtype == torch.float64 for p in parts) else torch.float32
        total = iter(self.parallel.all_sum(torch.stack([p.to(dtype) for p in parts])))
        reduced = []
        for s in sums:
            if s.first:
                reduced.append(s)
                continue
            change, base = next(total), next(total)
            pairs = [(next(total), next(total)) for _ in s.motion or []]
            reduced.append(ProbeSums(change, base, pairs if s.motion is not None else None, moreg=s.moreg,
                                     scale_free=s.scale_free))
        return reduced, list(total)

    def motion_sums(self, probe: torch.Tensor, frames: int, strides: tuple[int, ...],
                    scale_free: bool = False) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """MoReg's per-stride (numerator, denominator) of this rank's slice of a (B, N, C) probe whose N tokens are
        `frames` frames of N / frames tokens, frame pairs across slice boundaries included (their earlier frame's
        tokens come from the ranks before). Summed over the ranks (`reduce_all`), they are `motion_sums` of the
        whole; with `scale_free`, `scale_free_motion_sums` of the whole (counts for denominators, and the change
        between neighbouring tokens of a frame last, the pair across a slice boundary included)."""
        if probe.dim() != 3:
            raise ValueError(
                f"AdaCache under context parallelism reads MoReg's frames from a (batch, tokens, channels) probe, got "
                f"shape {tuple(probe.shape)}; set moreg=False, or probe a module whose output keeps that layout"
            )
        start, end = self._bounds(probe.shape[1], probe.device)[self.parallel.rank]
        total = self.bounds[-1][1]
        if total % frames:
            raise ValueError(
                f"AdaCache: {total} probe tokens do not split into {frames} frames, so MoReg cannot pair frames; "
                "check the model spec's frames_argument and temporal_patch, or set moreg=False"
            )
        per_frame = total // frames
        strides = [s for s in strides if s < frames]  # as motion_sums: a stride as long as the clip is left out
        reach = max(strides, default=0) * per_frame  # how far back the earliest pair looks
        halo = self._halo(probe, start, reach)  # tokens [start - len(halo), start), from the ranks before
        extended = torch.cat([halo, probe], dim=1) if halo.shape[1] else probe
        offset = start - halo.shape[1]  # the global index of extended[:, 0]
        values = probe.shape[0] * probe.shape[2]  # values per token (batch x channels), for the counts
        sums = []
        for stride in strides:
            shift = stride * per_frame
            first_later = max(start, shift)  # the first token of this slice that has an earlier partner
            if first_later < end:
                later = extended[:, first_later - offset:]
                earlier = extended[:, first_later - shift - offset:end - shift - offset]
                change = l1(later - earlier)
            else:  # the whole slice lies within the first `stride` frames: no pair ends here
                change = l1(probe[:, :0])
            if scale_free:  # the values the change sums
                sums.append((change, count_of(max(0, end - first_later) * values, probe)))
                continue
            # L1(x[stride:]) + L1(x[:-stride]), each token counted where it lies in the whole sequence
            last_earlier = min(end, total - shift)
            base = l1(probe[:, first_later - start:]) + l1(probe[:, :max(0, last_earlier - start)])
            sums.append((change, base))
        if scale_free:
            if not sums or per_frame < 2:
                return []
            sums.append(self._neighbour_sums(extended, offset, start, end, per_frame, values))
        return sums

    @staticmethod
    def _neighbour_sums(extended: torch.Tensor, offset: int, start: int, end: int, per_frame: int,
                        values: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(L1 of the change between neighbouring tokens of a frame, the values it sums) for the pairs (j - 1, j)
        whose later token j lies in this slice [start, end): j - 1 may be the halo's last token; pairs across a
        frame boundary (j a frame's first token) are left out, by a mask (no host sync)."""
        first = max(start, 1)
        if first >= end:
            return l1(extended[:, :0]), count_of(0, extended)
        later = extended[:, first - offset:end - offset]
        earlier = extended[:, first - 1 - offset:end - 1 - offset]
        index = torch.arange(first, end, device=extended.device)
        inside = (index % per_frame != 0).to(later.dtype).view(1, -1, 1)
        pairs = (end - first) - ((end - 1) // per_frame - (first - 1) // per_frame)  # j in [first, end), j % P != 0
        return l1((later - earlier) * inside), count_of(pairs * values, extended)

    def _bounds(self, local: int, device: torch.device) -> list[tuple[int, int]]:
        """Every rank's slice of the token dimension: computed from the split rule (equal chunks need nothing
        from the others; uneven ones add the slice lengths in one all-reduce), once per generation."""
        if self.bounds is None:
            world = self.parallel.world
            if self.parallel.even:
                lengths = [local] * world
            else:
                mine = torch.zeros(world, dtype=torch.int64, device=device)  # (NCCL reduces on the GPU only)
                mine[self.parallel.rank] = local
                lengths = self.parallel.all_sum(mine).tolist()
            starts = [sum(lengths[:r]) for r in range(world)]
            self.bounds = [(s, s + n) for s, n in zip(starts, lengths)]
        if self.bounds[self.parallel.rank][1] - self.bounds[self.parallel.rank][0] != local:
            raise ValueError(
                f"AdaCache: this rank's probe slice changed from {self.bounds[self.parallel.rank]} to {local} tokens "
                "within one generation; call adacache.reset_state(model) to start a new one"
            )
        return self.bounds

    def _halo(self, probe: torch.Tensor, start: int, reach: int) -> torch.Tensor:
        """The `reach` tokens before this rank's slice (fewer at the sequence start), from the ranks holding them;
        this rank sends the ones it holds to the ranks after it. Point-to-point, one message per pair of ranks
        that share a range (the neighbour, unless slices are shorter than `reach`)."""
        import torch.distributed as dist

        parallel, group = self.parallel, self.parallel.group
        operations, received = [], []
        for other, (other_start, other_end) in enumerate(self.bounds):
            if other < parallel.rank:  # receive what `other` holds of [start - reach, start)
                low, high = max(other_start, start - reach), min(other_end, start)
                if low < high:
                    buffer = probe.new_empty((probe.shape[0], high - low, probe.shape[2]))
                    received.append(buffer)
                    operations.append(dist.P2POp(dist.irecv, buffer, dist.get_global_rank(group, other), group))
            elif other > parallel.rank:  # send `other` what this rank holds of [other_start - reach, other_start)
                mine_start, mine_end = self.bounds[parallel.rank]
                low, high = max(mine_start, other_start - reach), min(mine_end, other_start)
                if low < high:
                    piece = probe[:, low - mine_start:high - mine_start].contiguous()
                    operations.append(dist.P2POp(dist.isend, piece, dist.get_global_rank(group, other), group))
        if operations:
            for request in dist.batch_isend_irecv(operations):
                request.wait()
        if not received:
            return probe[:, :0]
        return torch.cat(received, dim=1)


# --- launching: torchrun and diffusers' engine, for the command line ------------------------------------------------
def launched_world() -> int:
    """How many processes a launcher (torchrun, or any that sets WORLD_SIZE) started for this run; 1 outside one."""
    try:
        return max(1, int(os.environ.get("WORLD_SIZE", "1")))
    except ValueError:
        return 1


class RankTimeout(TimeoutError):
    """A collective (or the start) waited longer than the process group's timeout for another process: one is frozen
    or stopped. A TimeoutError (an OSError): the system failed, not the input."""


# What a collective raises when gloo's timeout passes: "Timed out waiting 5000ms for recv operation to complete"
# (gloo's transport), or the store's "wait timeout after 5000ms" while the processes meet (torch 2.13).
_TIMEOUT_MESSAGE = re.compile(r"timed out|timeout", re.IGNORECASE)


def is_wait_timeout(error: BaseException) -> bool:
    """Whether `error` is what a collective raises when the process group's timeout passed (a peer frozen): after
    one, another collective with that peer would only wait as long again."""
    return isinstance(error, RuntimeError) and _TIMEOUT_MESSAGE.search(str(error)) is not None


@contextlib.contextmanager
def process_group(timeout: float) -> Iterator[int]:
    """Under a launcher, the default process group (gloo for CPU tensors, and NCCL for CUDA ones where CUDA is, with
    this process's GPU from LOCAL_RANK), destroyed on the way out unless something did already; yields this
    process's rank (0 outside a launcher, with no group).

    `timeout` (seconds; the command line's --rank-timeout, by default `pipelines.RANK_TIMEOUT_S`) bounds every wait
    for another process, the start included: past it, gloo's collective raises and the block raises `RankTimeout`,
    one line naming this process and the timeout, so a frozen process ends the others (the launcher then stops it).
    NCCL applies the same timeout through its watchdog, which ends the process with its own report."""
    import datetime

    import torch.distributed as dist

    if launched_world() == 1 or dist.is_initialized():
        yield dist.get_rank() if dist.is_initialized() else 0
        return
    if not (isinstance(timeout, (int, float)) and not isinstance(timeout, bool) and 0 < timeout < float("inf")):
        raise ValueError(f"the process group timeout must be a positive number of seconds, got {timeout!r}")
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    try:
        dist.init_process_group("cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo",
                                timeout=datetime.timedelta(seconds=timeout))
        yield dist.get_rank()
    except RuntimeError as error:
        if not is_wait_timeout(error):
            raise
        rank = dist.get_rank() if dist.is_initialized() else os.environ.get("RANK", "?")
        raise RankTimeout(
            f"process {rank} of {launched_world()} waited {timeout:g} s for the others (--rank-timeout): one of them "
            "is frozen or stopped, so this run ends here; if they are only slow (a large model loading), give a "
            f"longer timeout. ({_first_line(error)})") from None
    finally:
        if dist.is_initialized():  # (the bench leaves the group itself)
            dist.destroy_process_group()


def ring_problem(device_type: str) -> str | None:
    """Why diffusers' Ring attention cannot run on this kind of device, or None where it may. Ring merges each
    process's partial attention with its log-sum-exp, and no attention backend returns one on a CPU: the default
    `native` (torch SDPA) refuses return_lse=True, `_native_flash` has no CPU kernel, and the others (flash, sage,
    cuDNN, NPU, hub kernels) need an accelerator (checked on diffusers 0.42.1; notes/context-parallel.md)."""
    if device_type != "cpu":
        return None
    return ("Ring attention merges each process's partial attention with its log-sum-exp, which no attention backend "
            "returns on a CPU (diffusers' native backend refuses return_lse=True; the ones that return it need a GPU)")


def _first_line(error: BaseException) -> str:
    """The first line of an error from torch's C++ side, without the source location it starts with."""
    lines = str(error).strip().splitlines() or [type(error).__name__]
    return re.sub(r"^\[[^\]]*\]\s*", "", lines[0].strip())[:200]


def enable_context_parallel(pipe: Any, mode: str, transformers: list[torch.nn.Module]) -> None:
    """diffusers' own context parallelism over every launched process (`enable_parallelism` with Ulysses or Ring of
    the world's degree) on each transformer: after apply_adacache, so AdaCache's blocks sit inside the split. Ring
    on a CPU model is refused before anything changes (`ring_problem`)."""
    from diffusers import ContextParallelConfig

    import torch.distributed as dist

    if mode == "ring":
        for model in transformers:
            device = next(model.parameters()).device
            problem = ring_problem(device.type)
            if problem is not None:
                raise ValueError(f"{problem}: {type(model).__name__} is on the {device.type}; use Ulysses there "
                                 "(ulysses_degree, --context-parallel ulysses)")
    world = dist.get_world_size()
    config = ContextParallelConfig(**{f"{mode}_degree": world})
    for model in transformers:
        heads = getattr(getattr(model, "config", None), "num_attention_heads", None)
        if mode == "ulysses" and heads is not None and heads % world:
            raise ValueError(f"Ulysses splits the attention heads over the processes: {type(model).__name__} has "
                             f"{heads} heads, which {world} processes do not divide; launch a divisor of {heads} "
                             "processes, or use --context-parallel ring")
        with compat.cpu_ranks_on_one_device():
            model.enable_parallelism(config=config)


def refuse_outside_split(model: torch.nn.Module, blocks: list[tuple[str, torch.nn.Module, Any]], first: int) -> None:
    """AdaCache's block wrappers must sit inside diffusers' context-parallel split: a wrapper put on a block that
    already splits or gathers (enable_parallelism before apply_adacache, on a model whose split is at a block, as
    Wan's at blocks.0) would see the whole sequence while the blocks after it see slices. Refused, saying the order."""
    for name, block, _ in blocks[first:]:
        if compat.has_context_parallel_hook(block):
            raise RuntimeError(
                f"AdaCache: diffusers' context parallelism already splits or gathers the tokens at {name} of this "
                f"{type(model).__name__}, inside the span AdaCache caches, so AdaCache would see the whole sequence "
                "there and slices after it. Apply AdaCache first, then enable parallelism: "
                "apply_adacache(model, ...); model.enable_parallelism(config=ContextParallelConfig(...)). A model "
                "loaded with from_pretrained(..., parallel_config=...) is parallel already: load it without "
                "parallel_config, apply AdaCache, then call enable_parallelism. A model without a registered spec "
                "is wrapped at its first call: pass apply_adacache(..., spec=...) so it is wrapped at once."
            )
