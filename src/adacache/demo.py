"""A short, honest demo: one small Wan transformer built from config (random weights) on CPU, denoised with a
real diffusers scheduler, uncached and then with AdaCache, same seed, side by side.

Random weights make no picture: the demo shows the mechanics (which steps AdaCache computes, the measured
wall-clock speed-up, and how far the cached result drifts, as PSNR of the final latents), not quality.

The demo runs a bare transformer with its own denoising loop, not a pipeline; it still takes the road every
command takes for "uncached, then cached from the same seed" (`pipelines.uncached_then_cached`, with `denoise` as
the run), and its PSNR is `metrics.psnr` with the peak stated: latents are not pixels in [0, 1], so the peak is the
uncached latents' range (max - min).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from .config import AdaCacheConfig
from .pipelines import uncached_then_cached

logger = logging.getLogger(__name__)

# A Wan 2.1 transformer, scaled down to run a 30-step loop in seconds on 2 CPU cores.
DEMO_MODEL_CONFIG = dict(
    patch_size=(1, 2, 2), num_attention_heads=4, attention_head_dim=32, in_channels=16, out_channels=16,
    text_dim=64, freq_dim=64, ffn_dim=512, num_layers=8, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
    rope_max_seq_len=64,
)
DEMO_LATENT_SHAPE = (1, 16, 4, 24, 24)  # (B, C, F, H, W): 4 latent frames of 12 x 12 tokens
DEMO_TEXT_TOKENS = 16


@dataclass
class DemoResult:
    uncached_seconds: float
    cached_seconds: float
    psnr_db: float  # the final latents against the uncached run's, peak: the uncached latents' range
    computed_steps: list[int]
    num_steps: int

    @property
    def speedup(self) -> float:
        return self.uncached_seconds / self.cached_seconds


def build_demo_model(seed: int = 0) -> torch.nn.Module:
    from diffusers import WanTransformer3DModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return WanTransformer3DModel(**DEMO_MODEL_CONFIG).eval()


def denoise(model: torch.nn.Module, num_steps: int, seed: int, progress: bool = True) -> torch.Tensor:
    """Flow-matching Euler loop with the real diffusers scheduler; returns the final latents."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    from .extras import need

    tqdm = need("tqdm.auto", "adacache demo").tqdm

    generator = torch.Generator().manual_seed(seed)
    latents = torch.randn(DEMO_LATENT_SHAPE, generator=generator)
    text = torch.randn(1, DEMO_TEXT_TOKENS, DEMO_MODEL_CONFIG["text_dim"], generator=generator)
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    scheduler.set_timesteps(num_steps)
    with torch.no_grad():
        for i, t in enumerate(tqdm(scheduler.timesteps, desc="denoising", disable=not progress, leave=False)):
            with model.cache_context("cond", step_index=i, num_inference_steps=num_steps):
                velocity = model(latents, t.expand(1), text, return_dict=False)[0]
            latents = scheduler.step(velocity, t, latents, return_dict=False)[0]
    return latents


def run_demo(config: AdaCacheConfig, num_steps: int = 30, seed: int = 0, progress: bool = True) -> DemoResult:
    from .evaluation.metrics import psnr

    model = build_demo_model(seed)
    runs = uncached_then_cached(model, config, lambda: denoise(model, num_steps, seed, progress),
                                warm_up=lambda: denoise(model, 2, seed, progress=False))  # one-off allocation costs
    reference, cached = runs.uncached, runs.cached
    peak = (reference.max() - reference.min()).item()  # latents: the reference's range, not 1.0
    return DemoResult(runs.uncached_seconds, runs.cached_seconds, psnr(reference.numpy(), cached.numpy(), peak=peak),
                      runs.stats[-1].computed_steps, num_steps)
