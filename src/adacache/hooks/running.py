"""The pipeline that is running a transformer call, and what its loop tells: the step count, the scheduler's step,
and whether it guides in one call (batched CFG).

A transformer can be run by pipelines AdaCache was never given: `WanVideoToVideoPipeline.from_pipe(pipe)`, a
pipeline built around the same transformer with a scheduler of its own, or any pipeline when AdaCache was applied
to the transformer alone. The one that counts is the one whose `__call__` is on the stack: `find_running` walks up
the caller's frames to the nearest method whose `self` holds this model as `transformer` or `transformer_2`.

What it then reads is public: the pipeline's `num_timesteps` (the length of the loop it runs, set before it) and
`do_classifier_free_guidance`, its `scheduler`'s `timesteps` and `step_index` (which advances once per
`scheduler.step`); and, through `compat.loop_latents`, the batch of the latents its loop carries.

Why a walk up the stack: nothing tells a model which pipeline is calling it (the cache context carries a name and,
in Wan's pipelines only, the step), a pipeline made after apply_adacache is unknown to it, and patching pipeline
classes is what this project does not do. The frame is never kept between calls (it holds every local of the
pipeline's call, latents included), so each call walks again.

Cost per transformer call where it is read (a call whose cache context gives no step index, and each generation's
first call): a walk of about ten frames, the locals of those with a `self` read once (code objects that turned out
not to be a pipeline's are remembered and skipped), a few attribute reads: a few microseconds on a CPU.
"""

from __future__ import annotations

import inspect
import sys
from dataclasses import dataclass
from types import CodeType, FrameType
from typing import Any

import torch

from .. import compat
from ..core.clock import Loop

MAX_DEPTH = 64  # frames walked up from the call (hooks, offload and compile wrappers sit in between)
TRANSFORMER_NAMES = ("transformer", "transformer_2")  # where a diffusers pipeline holds the model (Wan 2.2: two)
BATCHED_CFG_CONTEXT = "cond_uncond"  # the cache context diffusers' pipelines open around one call holding both halves


@dataclass
class Running:
    """The pipeline running the call in progress, and its frame (held only while the call is read, never kept:
    a frame holds every local of the pipeline's call)."""

    pipeline: Any
    frame: FrameType

    def loop(self) -> Loop | None:
        """The loop the call belongs to; None where the pipeline does not say how long its loop is."""
        length = getattr(self.pipeline, "num_timesteps", None)
        if not isinstance(length, int) or length < 1:
            return None
        scheduler = scheduler_of(self.pipeline)
        timesteps = getattr(scheduler, "timesteps", None) if scheduler is not None else None
        position = getattr(scheduler, "step_index", None) if scheduler is not None else None
        scheduled = len(timesteps) if timesteps is not None else None
        return Loop(timesteps, length, position if isinstance(position, int) else None, scheduled)

    def batched_cfg(self, batch: int) -> bool | None:
        """Whether a call on `batch` rows holds both CFG halves of the loop's latents: its batch is twice theirs
        (`torch.cat([latents] * 2)`); else the pipeline's `do_classifier_free_guidance`; None where neither is
        known."""
        latents = compat.loop_latents(self.frame)
        if isinstance(latents, torch.Tensor) and latents.dim() > 0:
            return batch == 2 * latents.shape[0]
        guidance = getattr(self.pipeline, "do_classifier_free_guidance", None)
        return guidance if isinstance(guidance, bool) else None


def find_running(model: torch.nn.Module, skip: set[CodeType]) -> Running | None:
    """The nearest caller whose `self` holds `model` (or a torch.compile wrapper of it) as a pipeline's transformer;
    None for a call from a loop of the user's own. `skip` collects the code objects whose `self` held no
    transformer, so later walks pass them without reading their locals."""
    frame = sys._getframe(1)
    depth = 0
    while frame is not None and depth < MAX_DEPTH:
        code = frame.f_code
        if code not in skip and code.co_argcount and code.co_varnames[0] == "self":
            held = getattr(frame.f_locals.get("self"), "__dict__", None)
            if held is not None and any(name in held for name in TRANSFORMER_NAMES):
                if any(_is_model(held.get(name), model) for name in TRANSFORMER_NAMES):
                    return Running(frame.f_locals["self"], frame)
            else:
                skip.add(code)
        frame = frame.f_back
        depth += 1
    return None


def _is_model(candidate: Any, model: torch.nn.Module) -> bool:
    return candidate is model or compat.compiled_module_inner(candidate) is model  # or torch.compile's wrapper


def scheduler_of(pipeline: Any) -> Any:
    """The pipeline's scheduler as it is now, or None. Read without `getattr`'s fallbacks: on a diffusers pipeline
    whose scheduler was deleted, ConfigMixin.__getattr__ would warn and return its config entry instead."""
    held = getattr(pipeline, "__dict__", None)
    if held is not None and "scheduler" in held:  # where diffusers keeps it (register_modules): the quick way
        return held["scheduler"]
    scheduler = inspect.getattr_static(pipeline, "scheduler", None)
    if hasattr(type(scheduler), "__get__"):  # a property or other descriptor: let it compute the value
        scheduler = getattr(pipeline, "scheduler", None)
    return scheduler
