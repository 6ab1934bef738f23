"""Prompt -> video with the embedded model: rectified flow (flow-matching Euler) with classifier-free guidance.

A diffusers `DiffusionPipeline` with three components, so it saves, loads (`from_pretrained`) and caches
(`apply_adacache(pipe)`) like any real video pipeline: a tiny diffusers video transformer working directly in
pixel space (`WanTransformer3DModel` shipped; `LatteTransformer3DModel` also works), a `VocabTextEncoder`, and a
`FlowMatchEulerDiscreteScheduler`.
"""

from __future__ import annotations

import contextlib
import logging
import math
import numbers
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import DiffusionPipeline, FlowMatchEulerDiscreteScheduler
from diffusers.utils import BaseOutput

from .text_encoder import VocabTextEncoder

logger = logging.getLogger(__name__)

WEIGHTS_DIR = Path(__file__).parent / "weights"
# The shipped embedded models by name (`from_embedded(name)`, and `--model NAME` on the command line, the page and
# the bench): "small", the first (Wan, 6 blocks; the default everywhere), and "deep" (CogVideoX, 24 blocks, blocks
# that update the text tokens too; never used to tune AdaCache's defaults, so the check that they carry over).
EMBEDDED_MODELS = {"small": WEIGHTS_DIR, "deep": Path(__file__).parent / "weights-deep"}
DEFAULT_EMBEDDED = "small"


def tuned_config(steps: int = 30, moreg: bool = False, name: str = DEFAULT_EMBEDDED) -> Path | None:
    """An embedded model's own AdaCache config (calibrated by `adacache calibrate`) for a step count:
    adacache-<steps>.json beside its weights if there is one, else adacache.json (calibrated at 30 steps); None
    when neither ships (the deep model ships none). With `moreg`, the MoReg one (its motion normalisation measured
    on this model): adacache-<steps>-moreg.json, else adacache-moreg.json, else None. What `auto` picks from them
    is `adacache.pipelines.auto_config`."""
    folder = EMBEDDED_MODELS[name]
    suffix = "-moreg" if moreg else ""
    for file in (f"adacache-{steps}{suffix}.json", f"adacache{suffix}.json"):
        if (folder / file).is_file():
            return folder / file
    return None


RGB = 3  # the model works in pixel space: its latents are the clip's RGB channels


def with_frame_channel(transformer: torch.nn.Module, clip: torch.Tensor) -> torch.Tensor:
    """The transformer's input for a noisy clip (B, 3, T, H, W): for a model that takes a fourth channel, the clip
    plus a channel holding each frame's place in time (-1 at the first frame, +1 at the last), never noised.

    Why: diffusers' Wan transformer sees time only through rotary attention, which is nearly symmetric under time
    reversal (reversing a noisy clip changed the shipped model's output by 1.4-2.2%: benchmarks/direction_sign.py).
    Left and right motion are each other's reversal, so such a model learns the axis of motion but not its sign.
    Real video latents carry the arrow of time themselves (a causal VAE, gravity); this domain's clips do not, so
    the model is told. Models without the channel (in_channels 3) get the clip unchanged."""
    extra = transformer.config.in_channels - RGB
    if extra == 0:
        return clip
    if extra != 1:
        raise ValueError(f"the embedded pipeline feeds 3 colour channels and at most a frame channel; this "
                         f"transformer takes in_channels={transformer.config.in_channels}")
    b, _, t, h, w = clip.shape
    ramp = torch.linspace(-1.0, 1.0, t, device=clip.device, dtype=clip.dtype)  # (T,)
    return torch.cat([clip, ramp.view(1, 1, t, 1, 1).expand(b, 1, t, h, w)], dim=1)  # (B, 4, T, H, W)


# Transformer classes that take and return (B, T, C, H, W) rather than diffusers' usual (B, C, T, H, W).
FRAMES_FIRST = ("CogVideoXTransformer3DModel",)


def predict_velocity(transformer: torch.nn.Module, clip: torch.Tensor, timestep: torch.Tensor,
                     text: torch.Tensor) -> torch.Tensor:
    """The transformer's velocity (B, 3, T, H, W) for a noisy clip (B, 3, T, H, W): the frame channel added
    (`with_frame_channel`), and the clip laid out as this transformer class takes it (`FRAMES_FIRST`)."""
    model_input = with_frame_channel(transformer, clip)  # (B, 3 or 4, T, H, W)
    frames_first = type(transformer).__name__ in FRAMES_FIRST
    if frames_first:
        model_input = model_input.transpose(1, 2)  # (B, T, C, H, W)
    velocity = transformer(model_input, timestep=timestep, encoder_hidden_states=text, return_dict=False)[0]
    return velocity.transpose(1, 2) if frames_first else velocity  # (B, 3, T, H, W)


@dataclass
class EmbeddedVideoOutput(BaseOutput):
    frames: torch.Tensor  # (B, T, 3, H, W) in [0, 1]


class EmbeddedVideoPipeline(DiffusionPipeline):
    model_cpu_offload_seq = "text_encoder->transformer"

    def __init__(
        self,
        transformer: torch.nn.Module,  # WanTransformer3DModel or LatteTransformer3DModel, (B, C, T, H, W) in and out
        text_encoder: VocabTextEncoder,
        scheduler: FlowMatchEulerDiscreteScheduler,
    ) -> None:
        super().__init__()
        self.register_modules(transformer=transformer, text_encoder=text_encoder, scheduler=scheduler)

    @classmethod
    def from_embedded(cls, name: str = DEFAULT_EMBEDDED, **kwargs) -> "EmbeddedVideoPipeline":
        """The trained weights shipped inside the package: "small" (the default) or "deep" (`EMBEDDED_MODELS`)."""
        if name not in EMBEDDED_MODELS:
            raise ValueError(f"no embedded model is named {name!r}; the shipped ones are {', '.join(EMBEDDED_MODELS)}")
        folder = EMBEDDED_MODELS[name]
        if not (folder / "model_index.json").is_file():
            raise FileNotFoundError(
                f"no embedded weights in {folder}; train them with `adacache train` (see README)"
            )
        return cls.from_pretrained(folder, local_files_only=True, **kwargs)

    @property
    def current_timestep(self):
        """The timestep being denoised (None outside a call), as diffusers' video pipelines expose it for the
        caches that read it (PyramidAttentionBroadcast, FasterCache)."""
        return getattr(self, "_current_timestep", None)

    def encode(self, prompts: list[str]) -> torch.Tensor:
        """(B, L, dim) caption embeddings. A prompt with no word of the vocabulary, or too many words, is refused
        (ValueError); unknown words in a prompt that has known ones are warned about and read as <unk>."""
        for prompt in prompts:
            unknown = self.text_encoder.check_prompt(prompt)
            if unknown:
                logger.warning(
                    "words outside the embedded model's vocabulary are ignored: %s; it knows: %s",
                    ", ".join(unknown), " ".join(self.text_encoder.vocabulary),
                )
        ids = self.text_encoder.tokenize(prompts).to(self.transformer.device)
        return self.text_encoder(ids)

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str],
        num_inference_steps: int = 30,
        guidance_scale: float = 4.0,
        generator: torch.Generator | None = None,
        latents: torch.Tensor | None = None,
        output_type: str = "pt",
        return_dict: bool = True,
    ) -> EmbeddedVideoOutput | tuple:
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        if not prompts or any(not p.strip() for p in prompts):
            raise ValueError("the prompt is empty; describe a clip, e.g. 'a red circle moving right fast'")
        if num_inference_steps < 1:
            raise ValueError(f"num_inference_steps must be a positive integer, got {num_inference_steps}")
        if isinstance(guidance_scale, bool) or not isinstance(guidance_scale, numbers.Real) or not math.isfinite(
                guidance_scale):
            raise ValueError(f"guidance_scale must be a finite number (> 1 turns guidance on), got {guidance_scale!r}")
        if output_type not in ("pt", "np"):
            raise ValueError(f"output_type must be 'pt' (float tensor in [0, 1]) or 'np' (uint8), got {output_type!r}")
        from .domain import FRAMES, SIZE

        batch = len(prompts)
        shape = (batch, RGB, FRAMES, SIZE, SIZE)  # pixel space, (B, C, T, H, W)
        device = self.transformer.device
        if latents is None:  # drawn in float32 on the CPU, whatever the model's dtype, so seeds agree everywhere
            latents = torch.randn(shape, generator=generator, device="cpu").to(device=device,
                                                                               dtype=self.transformer.dtype)
        elif tuple(latents.shape) != shape or not latents.is_floating_point():
            raise ValueError(f"latents must be a float tensor of shape {shape} (B, RGB, frames, height, width), got "
                             f"{latents.dtype} {tuple(latents.shape)}")
        use_cfg = guidance_scale > 1.0
        text = self.encode(prompts)
        if use_cfg:
            text = torch.cat([self._null_text(batch), text])  # unconditional half first, as in diffusers

        self.scheduler.set_timesteps(num_inference_steps, device=device)
        timesteps = self.scheduler.timesteps
        try:
            for i, t in enumerate(self.progress_bar(timesteps)):
                self._current_timestep = t
                model_input = torch.cat([latents, latents]) if use_cfg else latents  # (B or 2B, 3, T, H, W)
                # one batched call per step; the context tells cache hooks (AdaCache, diffusers' caches) where we are
                context = {"step_index": i, "num_inference_steps": len(timesteps),
                           "sigma": float(self.scheduler.sigmas[i])}
                with self._cache_context("cond_uncond" if use_cfg else "cond", context):
                    velocity = predict_velocity(self.transformer, model_input, t.expand(model_input.shape[0]), text)
                if use_cfg:
                    uncond, cond = velocity.chunk(2)
                    velocity = uncond + guidance_scale * (cond - uncond)
                latents = self.scheduler.step(velocity, t, latents, return_dict=False)[0]
                # one reduction per step: a diverged run fails here, naming the step, instead of ending as a clip
                # that clamp() would turn into flat colour
                if not torch.isfinite(latents).all():
                    raise FloatingPointError(
                        f"the latents became non-finite (inf or nan) at step {i + 1} of {len(timesteps)}, with "
                        f"guidance_scale {guidance_scale}; lower the guidance scale, or check the model's weights"
                    )
        finally:
            self._current_timestep = None
        frames = ((latents.clamp(-1, 1) + 1) / 2).permute(0, 2, 1, 3, 4)  # (B, T, 3, H, W) in [0, 1]
        if output_type == "np":
            frames = (frames.permute(0, 1, 3, 4, 2) * 255).round().to(torch.uint8).cpu().numpy()
        if not return_dict:
            return (frames,)
        return EmbeddedVideoOutput(frames=frames)

    def _cache_context(self, name: str, context: dict):
        if hasattr(self.transformer, "cache_context"):  # diffusers' CacheMixin models (Wan, Latte, ...)
            return self.transformer.cache_context(name, **context)
        return contextlib.nullcontext()

    def _null_text(self, batch: int) -> torch.Tensor:
        ids = torch.zeros(batch, self.text_encoder.config.max_length, dtype=torch.long, device=self.transformer.device)
        return self.text_encoder(ids)
