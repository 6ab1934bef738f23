"""Per-step cost of AdaCache's hooks with caching on but every step computed, against the unpatched model.

Two copies of the same Wan transformer (same weights) run one denoising step each in turn, alternating which goes
first, in one process: machine drift hits both alike. The patched copy uses the codebook {1.0: 1}, so every step
runs all blocks and pays for what AdaCache does on a computed step whose successor is computed too: step
bookkeeping, the per-block glue, the probe capture and its distance, with the host sync for the decision. (The
stack residual and its NaN check are formed only when a later step will reuse them, which happens only on runs
that skip steps.) With --no-context the step is found from the timestep (one more host sync per call), as for
pipelines that open no cache_context. Prints the medians and the overhead in percent.

    python benchmarks/overhead.py                 # the demo-sized Wan (8 blocks, 576 tokens)
    python benchmarks/overhead.py --layers 4 --size 16   # smaller model: a harder target (fixed costs weigh more)
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from adacache import AdaCacheConfig, apply_adacache, remove_adacache
from adacache.demo import DEMO_LATENT_SHAPE, DEMO_MODEL_CONFIG, DEMO_TEXT_TOKENS


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=DEMO_MODEL_CONFIG["num_layers"])
    parser.add_argument("--size", type=int, default=DEMO_LATENT_SHAPE[-1], help="latent height and width")
    parser.add_argument("--steps", type=int, default=30, help="steps per generation")
    parser.add_argument("--generations", type=int, default=6)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--no-context", action="store_true", help="no cache_context: steps found from the timestep")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from diffusers import WanTransformer3DModel

    config = {**DEMO_MODEL_CONFIG, "num_layers": args.layers}
    torch.manual_seed(0)
    plain = WanTransformer3DModel(**config).eval()
    patched = WanTransformer3DModel(**config).eval()
    # The same weight tensors in both (not copies): two copies of the weights alone differ by up to +-0.5% in step
    # time here (where each lands in memory), which is as much as what is measured
    for mine, theirs in zip(patched.parameters(), plain.parameters()):
        mine.data = theirs.data
    apply_adacache(patched, AdaCacheConfig(codebook={1.0: 1}))

    b, c, f, _, _ = DEMO_LATENT_SHAPE
    latents = torch.randn(b, c, f, args.size, args.size)
    text = torch.randn(1, DEMO_TEXT_TOKENS, config["text_dim"])
    times = {"plain": [], "adacache": []}

    def step(name: str, model: torch.nn.Module, i: int) -> None:
        t = torch.tensor([1000.0 * (1 - i / args.steps)])
        start = time.perf_counter()
        if args.no_context:
            model(latents, t, text, return_dict=False)
        else:
            with model.cache_context("cond", step_index=i, num_inference_steps=args.steps):
                model(latents, t, text, return_dict=False)
        times[name].append(time.perf_counter() - start)

    with torch.no_grad():
        for i in range(3):  # warm-up
            step("plain", plain, i), step("adacache", patched, i)
        times = {"plain": [], "adacache": []}
        for generation in range(args.generations):
            for i in range(args.steps):
                order = [("plain", plain), ("adacache", patched)]
                if (generation * args.steps + i) % 2:
                    order.reverse()
                for name, model in order:
                    step(name, model, i)
    remove_adacache(patched)

    plain_ms = statistics.median(times["plain"]) * 1e3
    cached_ms = statistics.median(times["adacache"]) * 1e3
    ratios = [a / p for a, p in zip(times["adacache"], times["plain"])]
    tokens = f * (args.size // 2) ** 2
    print(f"Wan transformer, {args.layers} blocks, {tokens} tokens, {args.threads} thread(s), "
          f"{args.generations} x {args.steps} steps per variant, interleaved, "
          f"{'no cache_context' if args.no_context else 'cache_context with step_index'}")
    print(f"median step: plain {plain_ms:.2f} ms, AdaCache (every step computed) {cached_ms:.2f} ms")
    print(f"overhead: {100 * (cached_ms / plain_ms - 1):+.2f}% of the step time (median of paired ratios "
          f"{100 * (statistics.median(ratios) - 1):+.2f}%), {cached_ms - plain_ms:+.3f} ms per step")


if __name__ == "__main__":
    main()
