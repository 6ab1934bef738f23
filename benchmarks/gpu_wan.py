"""Wan 2.1 1.3B at real size on one GPU: uncached, AdaCache with a fixed schedule, FirstBlockCache and TaylorSeer.

Random weights with the checkpoint's architecture (nothing is downloaded), bfloat16, 480 x 832, 81 frames (21 latent
frames, 32,760 tokens), 30 steps of flow-matching Euler with CFG as two calls per step, as diffusers' WanPipeline
makes them. Only the transformer loop runs: no text encoder, no VAE (random text embeddings of 512 tokens; the
latents are the output). For each method it prints the loop's wall time, the peak GPU memory, the steps whose last
block ran (computed), the compute speed-up (steps / computed), the wall speed-up against uncached, and their ratio
(wall / compute: 1 would mean a skipped step costs nothing; the wall speed-up is against the faster of two uncached
runs, the first and the last); and AdaCache's hook overhead with every step computed
(codebook {1.0: 1}) against uncached. Each method runs once after one shared warm-up generation of 3 steps; on an
H100 the whole script is meant to take 5 to 7 minutes.

    python benchmarks/gpu_wan.py                     # on a CUDA machine
    python benchmarks/gpu_wan.py --tiny --device cpu # a smoke test of the script itself, seconds on a CPU

Random weights make no picture: the figures are costs, not quality. The FirstBlockCache and TaylorSeer settings are
diffusers' defaults (threshold 0.05; interval 5, warm-up 3 steps), so their compute depends on what random weights
make of the first block's residual; their computed steps are printed beside their times.
"""

from __future__ import annotations

import argparse
import time
from typing import Callable

import torch

from adacache import AdaCacheConfig, apply_adacache, get_stats, remove_adacache

WAN_1_3B = dict(patch_size=(1, 2, 2), num_attention_heads=12, attention_head_dim=128, in_channels=16,
                out_channels=16, text_dim=4096, freq_dim=256, ffn_dim=8960, num_layers=30, cross_attn_norm=True,
                qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=1024)
TINY = {**WAN_1_3B, "num_attention_heads": 2, "attention_head_dim": 16, "ffn_dim": 64, "num_layers": 4,
        "freq_dim": 32}


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def generate(model: torch.nn.Module, latents: torch.Tensor, text: torch.Tensor, null: torch.Tensor, steps: int,
             guidance: float = 5.0) -> torch.Tensor:
    from diffusers import FlowMatchEulerDiscreteScheduler

    scheduler = FlowMatchEulerDiscreteScheduler(shift=5.0)
    scheduler.set_timesteps(steps, device=latents.device)
    with torch.no_grad():
        for i, t in enumerate(scheduler.timesteps):
            outputs = []
            for branch, embeddings in (("cond", text), ("uncond", null)):
                with model.cache_context(branch, step_index=i, num_inference_steps=steps):
                    outputs.append(model(latents, t.expand(1), embeddings, return_dict=False)[0])
            velocity = outputs[1] + guidance * (outputs[0] - outputs[1])
            latents = scheduler.step(velocity.float(), t, latents.float(), return_dict=False)[0].to(latents.dtype)
    return latents


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--rate", type=int, default=3, help="AdaCache's fixed schedule: a computed step every k")
    parser.add_argument("--tiny", action="store_true", help="a 4-block model at 64 x 64 pixels: a smoke test")
    args = parser.parse_args()
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    config, (frames, height, width) = (TINY, (5, 64, 64)) if args.tiny else (WAN_1_3B, (81, 480, 832))
    from diffusers import FirstBlockCacheConfig, TaylorSeerCacheConfig, WanTransformer3DModel

    began = time.perf_counter()
    torch.manual_seed(0)
    model = WanTransformer3DModel(**config).to(device=device, dtype=dtype).eval()
    latent_shape = (1, 16, (frames - 1) // 4 + 1, height // 8, width // 8)
    latents = torch.randn(latent_shape, device=device, dtype=dtype)
    text = torch.randn(1, 512, 4096, device=device, dtype=dtype)
    null = torch.zeros_like(text)
    tokens = latent_shape[2] * latent_shape[3] * latent_shape[4] // 4
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"Wan 2.1 1.3B architecture{' (tiny)' if args.tiny else ''}, random weights, {dtype}, {height}x{width}, "
          f"{frames} frames ({tokens} tokens), {args.steps} steps, CFG as two calls; device: {name}")

    # which calls ran the last block's self-attention: a hook on a layer inside it fires only when it computes (a
    # skipped block, or an attention output TaylorSeer predicts, never reaches it)
    ran: list[int] = []
    model.blocks[-1].attn1.to_q.register_forward_pre_hook(lambda module, inputs: ran.append(1))

    def timed(label: str, apply: Callable[[], None] | None, remove: Callable[[], None] | None) -> float:
        ran.clear()
        if apply is not None:
            apply()
        try:
            synchronize(device)
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            start = time.perf_counter()
            generate(model, latents, text, null, args.steps)
            synchronize(device)
            seconds = time.perf_counter() - start
            peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")
            stats = get_stats(model) if label.startswith("AdaCache") else None
        finally:
            if remove is not None:
                remove()
        calls = 2 * args.steps
        computed = len(ran) / 2  # both CFG calls of a computed step run the last block
        results[label] = (seconds, peak, computed)
        extra = f", AdaCache computed {stats[-1].computed_steps}" if stats else ""
        print(f"  {label}: {seconds:.1f} s, peak {peak:.2f} GiB, the last block's attention ran in {len(ran)}/{calls} "
              f"calls{extra}",
              flush=True)
        return seconds

    results: dict[str, tuple[float, float, float]] = {}
    generate(model, latents, text, null, 3)  # warm-up: kernels chosen, memory pools filled
    synchronize(device)
    timed("uncached", None, None)
    timed("AdaCache, every step computed", lambda: apply_adacache(model, AdaCacheConfig(codebook={1.0: 1})),
          lambda: remove_adacache(model))
    timed(f"AdaCache, fixed schedule (every {args.rate})",
          lambda: apply_adacache(model, AdaCacheConfig(codebook={1e9: args.rate})), lambda: remove_adacache(model))
    timed("FirstBlockCache (threshold 0.05)", lambda: model.enable_cache(FirstBlockCacheConfig(threshold=0.05)),
          model.disable_cache)
    timed("TaylorSeer (interval 5)", lambda: model.enable_cache(TaylorSeerCacheConfig(cache_interval=5)),
          model.disable_cache)
    timed("uncached, again", None, None)  # the drift of the machine over the script

    base = min(results["uncached"][0], results["uncached, again"][0])
    print(f"\n| method | wall s | peak GiB | computed steps | compute speed-up | wall speed-up | wall / compute |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for label, (seconds, peak, computed) in results.items():
        compute = args.steps / computed if computed else float("inf")
        wall = base / seconds
        print(f"| {label} | {seconds:.1f} | {peak:.2f} | {computed:g}/{args.steps} | {compute:.2f}x | {wall:.2f}x | "
              f"{wall / compute:.3f} |")
    overhead = results["AdaCache, every step computed"][0] / base - 1  # against the faster uncached run
    print(f"\nhook overhead, every step computed: {100 * overhead:+.2f}% of the uncached loop "
          f"(one run each: repeat the script for a spread; the two uncached runs differ by "
          f"{100 * abs(results['uncached'][0] / results['uncached, again'][0] - 1):.1f}%); whole script "
          f"{time.perf_counter() - began:.0f} s")
    print("computed steps: calls whose last block's self-attention ran, over 2 (CFG). TaylorSeer predicts attention "
          "outputs only and still runs every feed-forward layer, so its compute speed-up here is an upper bound.")


if __name__ == "__main__":
    main()
