"""Train the embedded text-to-video model on the procedural domain: rectified flow, CFG dropout, EMA.

    adacache train --out runs/embedded                 # resumes from runs/embedded/checkpoint.pt if present
    adacache train --out runs/embedded --export DIR    # write the EMA weights as a diffusers pipeline folder

Everything is reproducible from the seed (data, initialisation, noise) for a given history of stops and
resumes; a checkpoint holds the models, their EMA, the optimizer, the step and its own config, written atomically.
"""

from __future__ import annotations

import dataclasses
import json
import math
import logging
import os
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

# Named sizes (DiT-style). "small" is the shipped model; "tiny" is for tests and smoke runs.
MODEL_SIZES = {
    "tiny": dict(layers=2, heads=2, head_dim=16, text_dim=16),  # two blocks: a first-block cache needs a rest
    "small": dict(layers=6, heads=4, head_dim=32, text_dim=64),
}
# Transformer families the embedded model can be built from, both diffusers classes. "wan" (3D attention over all
# frames, 3D RoPE, text cross-attention in every block) is shipped; "latte" (spatial and temporal blocks, text
# only in the spatial ones) learned colour, shape and speed but not direction in 5,200 steps (README).
ARCHITECTURES = ("wan", "latte")


@dataclass
class TrainConfig:
    size: str = "small"  # a key of MODEL_SIZES
    architecture: str = "wan"  # one of ARCHITECTURES
    seed: int = 0
    steps: int = 4000  # total optimizer steps (the shipped model: 4000); more = better motion, linear in time
    batch_size: int = 16  # clips per step; larger = smoother gradients, slower steps (2x steps beat 2x batch here)
    lr: float = 1e-3  # AdamW peak learning rate (tiny models take a high one): linear warm-up, cosine to lr/10
    warmup: int = 200
    ema: float = 0.999  # EMA decay of the weights that get evaluated and shipped
    cfg_dropout: float = 0.1  # share of captions replaced by the empty one, so CFG has an unconditional model
    checkpoint_every: int = 200
    eval_every: int = 500  # verifier check of the EMA model on a few prompts (0 = never)
    eval_prompts: int = 12
    eval_steps: int = 20
    threads: int = 2


def build_pipeline(size: str = "small", seed: int = 0, architecture: str = "wan"):
    """A fresh, randomly initialised embedded pipeline of a named size and architecture."""
    from diffusers import FlowMatchEulerDiscreteScheduler, LatteTransformer3DModel, WanTransformer3DModel

    from .domain import FRAMES, SIZE, VOCABULARY
    from .pipeline import EmbeddedVideoPipeline
    from .text_encoder import VocabTextEncoder

    if size not in MODEL_SIZES:
        raise ValueError(f"unknown model size {size!r}; known: {', '.join(MODEL_SIZES)}")
    if architecture not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {architecture!r}; known: {', '.join(ARCHITECTURES)}")
    dims = MODEL_SIZES[size]
    inner = dims["heads"] * dims["head_dim"]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if architecture == "wan":
            transformer = WanTransformer3DModel(
                patch_size=(1, 2, 2), num_attention_heads=dims["heads"], attention_head_dim=dims["head_dim"],
                in_channels=3, out_channels=3, text_dim=dims["text_dim"], freq_dim=64, ffn_dim=4 * inner,
                num_layers=dims["layers"], cross_attn_norm=True, qk_norm="rms_norm_across_heads",
                rope_max_seq_len=max(FRAMES, SIZE) * 2,
            )
        else:
            transformer = LatteTransformer3DModel(
                num_attention_heads=dims["heads"], attention_head_dim=dims["head_dim"], in_channels=3,
                out_channels=3, num_layers=dims["layers"], cross_attention_dim=inner,
                caption_channels=dims["text_dim"], sample_size=SIZE, patch_size=2, video_length=FRAMES,
                norm_type="ada_norm_single", activation_fn="gelu-approximate", num_embeds_ada_norm=1000,
            )
        text_encoder = VocabTextEncoder(vocabulary=list(VOCABULARY), dim=dims["text_dim"], max_length=8)
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0)
    return EmbeddedVideoPipeline(transformer=transformer, text_encoder=text_encoder, scheduler=scheduler)


def rectified_flow_loss(pipe, clips: torch.Tensor, captions: list[str], generator: torch.Generator) -> torch.Tensor:
    """clips (B, T, 3, H, W) in [0, 1]. x_t = (1 - s) x0 + s noise, the model predicts noise - x0 at t = 1000 s,
    with s logit-normal as in SD3 / Open-Sora 1.2."""
    x0 = clips.permute(0, 2, 1, 3, 4) * 2 - 1  # (B, 3, T, H, W) in [-1, 1]
    noise = torch.randn(x0.shape, generator=generator)
    sigma = torch.sigmoid(torch.randn(x0.shape[0], generator=generator))
    s = sigma.view(-1, 1, 1, 1, 1)
    x_t = (1 - s) * x0 + s * noise
    text = pipe.text_encoder(pipe.text_encoder.tokenize(captions))
    velocity = pipe.transformer(x_t, timestep=sigma * 1000, encoder_hidden_states=text, return_dict=False)[0]
    return torch.nn.functional.mse_loss(velocity, noise - x0)


def evaluate(pipe, num_prompts: int, steps: int, seed: int = 0) -> dict[str, float]:
    """Verifier accuracy of `pipe` on the first `num_prompts` of an interleaved slice of the prompt set."""
    from .domain import prompt_set
    from .verifier import verify

    prompts = prompt_set()
    prompts = prompts[:: max(1, len(prompts) // num_prompts)][:num_prompts]
    frames = pipe(prompts, num_inference_steps=steps, generator=torch.Generator().manual_seed(seed)).frames
    agree = [verify(clip).agrees_with(prompt) for clip, prompt in zip(frames, prompts)]
    moving = [a for a, p in zip(agree, prompts) if "still" not in p]
    return {
        "colour": sum(a["colour"] for a in agree) / len(agree),
        "shape": sum(a["shape"] for a in agree) / len(agree),
        "speed": sum(a["speed"] for a in agree) / len(agree),
        "direction": sum(a["direction"] for a in moving) / max(1, len(moving)),
    }


def train(out_dir: str | os.PathLike, config: TrainConfig, progress: bool = True) -> Path:
    """Train (or resume) into out_dir; returns the checkpoint path."""
    from tqdm.auto import tqdm

    from .domain import clip_batches

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(config.threads)
    checkpoint_path = out / "checkpoint.pt"
    pipe = build_pipeline(config.size, config.seed, config.architecture)
    ema = build_pipeline(config.size, config.seed, config.architecture)
    params = [*pipe.transformer.parameters(), *pipe.text_encoder.parameters()]
    optimizer = torch.optim.AdamW(params, lr=config.lr, betas=(0.9, 0.99), weight_decay=0.0)
    step = 0
    if checkpoint_path.is_file():
        state = torch.load(checkpoint_path, map_location="cpu", weights_only=False)
        saved = TrainConfig(**{"architecture": "latte", **state["config"]})  # checkpoints from before the choice
        if saved.architecture != config.architecture or saved.size != config.size:
            raise ValueError(
                f"{checkpoint_path} holds a {saved.size} {saved.architecture} model, not {config.size} "
                f"{config.architecture}; pass matching --size/--architecture or another --out folder"
            )
        if dataclasses.replace(saved, steps=config.steps) != dataclasses.replace(config, steps=config.steps):
            logger.warning("resuming with a config that differs from the checkpoint's: %s vs %s", config, saved)
        for module, key in ((pipe.transformer, "transformer"), (pipe.text_encoder, "text_encoder"),
                            (ema.transformer, "ema_transformer"), (ema.text_encoder, "ema_text_encoder")):
            module.load_state_dict(state[key])
        optimizer.load_state_dict(state["optimizer"])
        step = state["step"]
        logger.info("resumed from %s at step %d", checkpoint_path, step)
    ema_params = [*ema.transformer.parameters(), *ema.text_encoder.parameters()]

    def save() -> None:
        state = {
            "config": dataclasses.asdict(config), "step": step, "optimizer": optimizer.state_dict(),
            "transformer": pipe.transformer.state_dict(), "text_encoder": pipe.text_encoder.state_dict(),
            "ema_transformer": ema.transformer.state_dict(), "ema_text_encoder": ema.text_encoder.state_dict(),
        }
        tmp = checkpoint_path.with_suffix(".tmp")
        torch.save(state, tmp)
        os.replace(tmp, checkpoint_path)

    # Data and noise streams restart from (seed, step), so a resumed run is reproducible too.
    batches = clip_batches(config.seed * 1_000_003 + step, config.batch_size)
    generator = torch.Generator().manual_seed(config.seed * 1_000_003 + step + 1)
    dropout = torch.Generator().manual_seed(config.seed * 1_000_003 + step + 2)
    log = (out / "log.jsonl").open("a")
    start = time.time()
    pipe.transformer.train(), pipe.text_encoder.train()
    bar = tqdm(total=config.steps, initial=step, desc="training", disable=not progress)
    previous_handler = None
    if threading.current_thread() is threading.main_thread():  # SIGTERM (a job scheduler's stop) saves, as Ctrl-C

        def stop(signum, frame):
            raise KeyboardInterrupt

        previous_handler = signal.signal(signal.SIGTERM, stop)
    try:
        while step < config.steps:
            clips, captions = next(batches)
            drop = torch.rand(len(captions), generator=dropout) < config.cfg_dropout
            captions = ["" if d else c for c, d in zip(captions, drop)]
            # linear warm-up, then cosine decay to a tenth of the peak at the last step
            progress = max(0.0, (step - config.warmup) / max(1, config.steps - config.warmup))
            lr = config.lr * min(1.0, (step + 1) / config.warmup) * (0.55 + 0.45 * math.cos(math.pi * progress))
            for group in optimizer.param_groups:
                group["lr"] = lr
            loss = rectified_flow_loss(pipe, clips, captions, generator)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            decay = min(config.ema, (1 + step) / (10 + step))
            with torch.no_grad():
                torch._foreach_lerp_(ema_params, params, 1 - decay)
            step += 1
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.4f}")
            record = {"step": step, "loss": loss.item(), "grad_norm": float(grad_norm), "lr": lr,
                      "seconds": round(time.time() - start, 1)}
            if config.eval_every and step % config.eval_every == 0:
                ema.transformer.eval(), ema.text_encoder.eval()
                ema.set_progress_bar_config(disable=True)
                record["eval"] = evaluate(ema, config.eval_prompts, config.eval_steps)
                bar.write(f"step {step}: verifier on {config.eval_prompts} prompts {record['eval']}")
            log.write(json.dumps(record) + "\n")
            log.flush()
            if step % config.checkpoint_every == 0 or step == config.steps:
                save()
    finally:
        if previous_handler is not None:
            signal.signal(signal.SIGTERM, previous_handler)
        bar.close()
        log.close()
        if step % config.checkpoint_every:
            save()  # an interrupted run keeps what it did
    return checkpoint_path


def export(checkpoint: str | os.PathLike, folder: str | os.PathLike) -> Path:
    """Write the checkpoint's EMA weights as a diffusers pipeline folder (safetensors + configs)."""
    state = torch.load(checkpoint, map_location="cpu", weights_only=False)
    config = TrainConfig(**{"architecture": "latte", **state["config"]})  # checkpoints from before the choice
    pipe = build_pipeline(config.size, config.seed, config.architecture)
    pipe.transformer.load_state_dict(state["ema_transformer"])
    pipe.text_encoder.load_state_dict(state["ema_text_encoder"])
    folder = Path(folder)
    tmp = folder.with_name(folder.name + ".tmp")
    pipe.save_pretrained(tmp, safe_serialization=True)
    (tmp / "training.json").write_text(json.dumps({"step": state["step"], **dataclasses.asdict(config)}, indent=2))
    if folder.exists():
        import shutil

        shutil.rmtree(folder)
    os.replace(tmp, folder)
    return folder

