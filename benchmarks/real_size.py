"""What AdaCache costs on video DiTs of real size: random weights, real architectures, built here (nothing is
downloaded).

Two parts:

1. Counted at real size (`--part count`, seconds): the real configs on PyTorch's meta device (no memory, no
   compute), a forward at 480p and 720p (81 frames) under torch's FLOP counter. Prints, per model and resolution,
   the tokens, the FLOPs of one transformer call, the share of them outside the blocks (what a skipped step still
   runs, in FLOPs), and the bytes AdaCache holds between steps per stream and CFG branch (the stack residual of the
   video tokens, the text tokens where the blocks update them, and the probe), in bf16.
2. Measured on this CPU (`--part measure`): the same architectures with random weights at a token count the CPU can
   run, in a denoising loop with CFG as two calls per step (as diffusers' Wan pipeline makes them), same process,
   interleaved, medians:
   - the share c of a skipped step: the median time of a step AdaCache skips over that of a step it computes
     (embedders, output layer, both CFG calls, the scheduler), with a fixed schedule (a computed step every k);
   - the hook overhead with every step computed (codebook {1.0: 1}) against the plain model;
   - wall-clock against compute speed-up with fixed schedules (every 2nd and 3rd step computed), and what the
     cost model N / (computed + c x skipped) predicts;
   - host synchronisations per transformer call (Tensor.item, tolist, __bool__, __float__, __int__, numpy,
     cpu) inside the forward, plain and with AdaCache (on a GPU each is a wait for the device);
   - AdaCache's bytes held, from get_stats, against the formula of part 1.

    python benchmarks/real_size.py --part count
    python benchmarks/real_size.py --part measure --models wan-1.3b --tokens 64 --steps 10 --repeats 3

Timings need a quiet machine: run nothing else (no training) meanwhile.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import statistics
import time
from typing import Any, Iterator

import torch

from adacache import AdaCacheConfig, apply_adacache, get_stats, remove_adacache

# Real configs (diffusers' config.json of each checkpoint), and a reduced one where the real one does not fit in
# this machine's memory in float32: Wan 2.1 14B keeps its 40 blocks and head width, with 16 heads instead of 40.
MODELS: dict[str, dict[str, Any]] = {
    "wan-1.3b": dict(family="wan", reduced=None, config=dict(
        patch_size=(1, 2, 2), num_attention_heads=12, attention_head_dim=128, in_channels=16, out_channels=16,
        text_dim=4096, freq_dim=256, ffn_dim=8960, num_layers=30, cross_attn_norm=True,
        qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=1024)),
    "wan-14b": dict(family="wan", reduced=None, config=dict(
        patch_size=(1, 2, 2), num_attention_heads=40, attention_head_dim=128, in_channels=16, out_channels=16,
        text_dim=4096, freq_dim=256, ffn_dim=13824, num_layers=40, cross_attn_norm=True,
        qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=1024)),
    "wan-14b-narrow": dict(family="wan", reduced="16 heads of 40 (width 2048 of 5120), feed-forward 5504 of 13824; "
                                                  "all 40 blocks", config=dict(
        patch_size=(1, 2, 2), num_attention_heads=16, attention_head_dim=128, in_channels=16, out_channels=16,
        text_dim=4096, freq_dim=256, ffn_dim=5504, num_layers=40, cross_attn_norm=True,
        qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=1024)),
    # a smoke-test size, for checking this script in seconds
    "wan-tiny": dict(family="wan", reduced="a smoke-test size", config=dict(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16, in_channels=16, out_channels=16,
        text_dim=4096, freq_dim=32, ffn_dim=64, num_layers=4, cross_attn_norm=True,
        qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=1024)),
    "cogvideox-5b": dict(family="cogvideox", reduced=None, config=dict(
        num_attention_heads=48, attention_head_dim=64, in_channels=16, out_channels=16, time_embed_dim=512,
        text_embed_dim=4096, num_layers=42, sample_width=90, sample_height=60, sample_frames=49, patch_size=2,
        temporal_compression_ratio=4, max_text_seq_length=226, use_rotary_positional_embeddings=True,
        use_learned_positional_embeddings=False)),
}
TEXT_TOKENS = {"wan": 512, "cogvideox": 226}
RESOLUTIONS = {"480p": (480, 832), "720p": (720, 1280)}
FRAMES = 81  # Wan's default clip; CogVideoX-5B makes 49 frames, counted at its own length
VAE_SPATIAL, VAE_TEMPORAL = 8, 4


def build(name: str, device: str = "cpu") -> torch.nn.Module:
    from diffusers import CogVideoXTransformer3DModel, WanTransformer3DModel

    entry = MODELS[name]
    cls = WanTransformer3DModel if entry["family"] == "wan" else CogVideoXTransformer3DModel
    with torch.device(device):
        torch.manual_seed(0)
        return cls(**entry["config"]).eval()


def inputs(name: str, frames: int, height: int, width: int, device: str = "cpu", batch: int = 1) -> dict:
    """One call's arguments for a clip of `frames` video frames at height x width pixels (latents after the VAE)."""
    entry = MODELS[name]
    latent_frames = (frames - 1) // VAE_TEMPORAL + 1
    h, w = height // VAE_SPATIAL, width // VAE_SPATIAL
    text = torch.randn(batch, TEXT_TOKENS[entry["family"]], 4096, device=device)
    t = torch.full((batch,), 500.0, device=device)
    if entry["family"] == "wan":
        return dict(hidden_states=torch.randn(batch, 16, latent_frames, h, w, device=device), timestep=t,
                    encoder_hidden_states=text, return_dict=False)
    rotary = _cogvideox_rotary(MODELS[name]["config"], latent_frames, h, w, device)
    return dict(hidden_states=torch.randn(batch, latent_frames, 16, h, w, device=device), timestep=t,
                encoder_hidden_states=text, image_rotary_emb=rotary, return_dict=False)


def _cogvideox_rotary(config: dict, frames: int, h: int, w: int, device: str):
    from diffusers.models.embeddings import get_3d_rotary_pos_embed

    p = config["patch_size"]
    return get_3d_rotary_pos_embed(config["attention_head_dim"], ((0, 0), (h // p, w // p)), (h // p, w // p), frames,
                                   device=torch.device(device))


def tokens_of(name: str, frames: int, height: int, width: int) -> int:
    latent_frames = (frames - 1) // VAE_TEMPORAL + 1
    return latent_frames * (height // VAE_SPATIAL // 2) * (width // VAE_SPATIAL // 2)


# --- part 1: counted at real size -------------------------------------------------------------------------------
def count(names: list[str]) -> None:
    from torch.utils.flop_counter import FlopCounterMode

    print("Counted at real size (meta device, one transformer call, batch 1; bytes in bf16 per stream and branch)")
    print(f"{'model':16s} {'res':5s} {'frames':>6s} {'tokens':>7s} {'TFLOP/call':>10s} {'outside blocks':>14s} "
          f"{'video residual':>14s} {'text residual':>13s} {'probe':>9s}")
    for name in names:
        model = build(name, "meta")
        family = MODELS[name]["family"]
        frames = FRAMES if family == "wan" else 49
        width = model.config.num_attention_heads * model.config.attention_head_dim
        blocks = "blocks" if family == "wan" else "transformer_blocks"
        for res, (height, wide) in RESOLUTIONS.items():
            if family == "cogvideox" and res == "720p":
                continue  # CogVideoX-5B is a 480 x 720 model; its positional table is fixed
            if family == "cogvideox":
                height, wide = 480, 720
            kwargs = inputs(name, frames, height, wide, device="meta")
            with torch.no_grad(), FlopCounterMode(display=False) as counter:
                model(**kwargs)
            counts = counter.get_flop_counts()
            total = sum(counts["Global"].values())
            inside = sum(sum(v.values()) for key, v in counts.items()
                         if key.startswith(f"{type(model).__name__}.{blocks}.") and key.count(".") == 2)
            tokens = tokens_of(name, frames, height, wide)
            video_bytes = tokens * width * 2
            text_bytes = TEXT_TOKENS[family] * width * 2 if family == "cogvideox" else 0
            print(f"{name:16s} {res:5s} {frames:6d} {tokens:7d} {total / 1e12:10.1f} {(total - inside) / total:14.2e} "
                  f"{video_bytes / 2**20:11.0f} MiB {text_bytes / 2**20:10.2f} MiB {video_bytes / 2**20:5.0f} MiB")
        del model
    print("outside blocks: the FLOP share of a call that a skipped step still runs (embedders, output layer); the "
          "probe is one (tokens x width) tensor, as the video residual")


# --- part 2: measured on this CPU -------------------------------------------------------------------------------
SYNC_METHODS = ("item", "tolist", "__bool__", "__float__", "__int__", "numpy", "cpu")


@contextlib.contextmanager
def counting_syncs(counter: list[int]) -> Iterator[None]:
    """Count calls of the tensor methods that wait for the device on a GPU, while inside the block."""
    originals = {name: getattr(torch.Tensor, name) for name in SYNC_METHODS}

    def counted(original):
        def method(self, *args, **kwargs):
            counter[0] += 1
            return original(self, *args, **kwargs)
        return method

    for name, original in originals.items():
        setattr(torch.Tensor, name, counted(original))
    try:
        yield
    finally:
        for name, original in originals.items():
            setattr(torch.Tensor, name, original)


@dataclasses.dataclass
class Run:
    seconds: float
    step_seconds: list[float]
    syncs_per_call: float


def generate(model: torch.nn.Module, kwargs: dict, null_text: torch.Tensor, steps: int, count_syncs: bool = False
             ) -> Run:
    """A flow-matching Euler loop with CFG as two calls per step (cond, uncond), each under a cache_context."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    scheduler = FlowMatchEulerDiscreteScheduler(shift=5.0)
    scheduler.set_timesteps(steps)
    latents = kwargs["hidden_states"].clone()
    syncs, calls, step_seconds = [0], 0, []
    counter = (lambda: counting_syncs(syncs)) if count_syncs else contextlib.nullcontext
    start = time.perf_counter()
    with torch.no_grad():
        for i, t in enumerate(scheduler.timesteps):
            began = time.perf_counter()
            outputs = []
            for branch, text in (("cond", kwargs["encoder_hidden_states"]), ("uncond", null_text)):
                call = {**kwargs, "hidden_states": latents, "timestep": t.expand(1), "encoder_hidden_states": text}
                with model.cache_context(branch, step_index=i, num_inference_steps=steps), counter():
                    outputs.append(model(**call)[0])
                calls += 1
            velocity = outputs[1] + 5.0 * (outputs[0] - outputs[1])
            latents = scheduler.step(velocity, t, latents, return_dict=False)[0]
            step_seconds.append(time.perf_counter() - began)
    return Run(time.perf_counter() - start, step_seconds, syncs[0] / calls)


def measure(names: list[str], tokens: int, steps: int, repeats: int, threads: int) -> None:
    torch.set_num_threads(threads)
    side = int(round(tokens ** 0.5))
    for name in names:
        model = build(name)
        height = width = side * 2 * VAE_SPATIAL  # one latent frame of side x side tokens
        kwargs = inputs(name, 1, height, width)
        null_text = torch.zeros_like(kwargs["encoder_hidden_states"])
        real_tokens = side * side
        reduced = MODELS[name]["reduced"]
        print(f"\n{name}: {sum(p.numel() for p in model.parameters()) / 1e9:.2f} B parameters"
              f"{' (reduced: ' + reduced + ')' if reduced else ''}, {len(_blocks(model))} blocks, {real_tokens} video "
              f"tokens, {TEXT_TOKENS[MODELS[name]['family']]} text tokens, {steps} steps, CFG as two calls, "
              f"{threads} thread(s), {repeats} repeats interleaved")
        generate(model, kwargs, null_text, 2)  # warm-up
        variants = {"plain": None, "every step (codebook {1.0: 1})": {1.0: 1}, "every 2nd step": {1e9: 2},
                    "every 3rd step": {1e9: 3}}
        runs: dict[str, list[Run]] = {key: [] for key in variants}
        computed: dict[str, list[int]] = {}
        held: dict[str, int] = {}
        for repeat in range(repeats):
            order = list(variants.items())
            if repeat % 2:
                order.reverse()
            for key, codebook in order:
                if codebook is not None:
                    apply_adacache(model, AdaCacheConfig(codebook=codebook))
                try:
                    runs[key].append(generate(model, kwargs, null_text, steps, count_syncs=repeat == 0))
                    if codebook is not None:
                        stats = get_stats(model)
                        computed[key] = stats[-1].computed_steps
                        held[key] = max(s.cache_bytes for s in stats)
                finally:
                    if codebook is not None:
                        remove_adacache(model)
        plain = statistics.median(r.seconds for r in runs["plain"])
        every = runs["every step (codebook {1.0: 1})"]
        paired = [statistics.median(a / p for a, p in zip(run.step_seconds, base.step_seconds))
                  for run, base in zip(every, runs["plain"])]
        print(f"  hook overhead, every step computed: {100 * (statistics.median(r.seconds for r in every) / plain - 1):+.2f}% "
              f"of the generation (median of per-step paired ratios {100 * (statistics.median(paired) - 1):+.2f}%)")
        for key in ("every 2nd step", "every 3rd step"):
            steps_computed = computed[key]
            skipped = [i for i in range(1, steps + 1) if i not in steps_computed]
            per_step = [statistics.median(run.step_seconds[i - 1] for run in runs[key]) for i in range(1, steps + 1)]
            c = statistics.median(per_step[i - 1] for i in skipped) / statistics.median(
                per_step[i - 1] for i in steps_computed if i > 1)  # (step 1 pays first-call costs)
            wall = plain / statistics.median(r.seconds for r in runs[key])
            compute = steps / len(steps_computed)
            predicted = steps / (len(steps_computed) + c * len(skipped))
            print(f"  {key}: computed {len(steps_computed)}/{steps} {steps_computed}; skipped-step share c = {c:.4f}; "
                  f"compute speed-up {compute:.2f}x, wall {wall:.2f}x (wall/compute {wall / compute:.3f}; cost model "
                  f"{predicted:.2f}x)")
        width = model.config.num_attention_heads * model.config.attention_head_dim
        formula = real_tokens * width * 4 * 2  # float32: the video residual and the probe, per branch
        print(f"  host syncs per transformer call: plain {runs['plain'][0].syncs_per_call:.2f}, every step computed "
              f"{every[0].syncs_per_call:.2f}, every 2nd {runs['every 2nd step'][0].syncs_per_call:.2f}, every 3rd "
              f"{runs['every 3rd step'][0].syncs_per_call:.2f}")
        print(f"  bytes held per branch (every 2nd step): {held['every 2nd step'] / 2**20:.3f} MiB measured, "
              f"{formula / 2**20:.3f} MiB by the formula (video residual + probe, float32)")
        del model


def _blocks(model: torch.nn.Module) -> torch.nn.ModuleList:
    return getattr(model, "blocks", None) or model.transformer_blocks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=("count", "measure", "both"), default="both")
    parser.add_argument("--models", default=None, help=f"comma-separated, of {', '.join(MODELS)} (default: count "
                                                       "all; measure wan-1.3b and wan-14b-narrow)")
    parser.add_argument("--tokens", type=int, default=64, help="video tokens measured on the CPU (one latent frame)")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    if args.part in ("count", "both"):
        count(args.models.split(",") if args.models else ["wan-1.3b", "wan-14b", "cogvideox-5b"])
    if args.part in ("measure", "both"):
        measure(args.models.split(",") if args.models else ["wan-1.3b", "wan-14b-narrow"], args.tokens, args.steps,
                args.repeats, args.threads)


if __name__ == "__main__":
    main()
