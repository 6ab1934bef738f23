"""Tiny, randomly initialised diffusers video pipelines for tests and examples.

There is no model hub in CI, so every component (tokenizer included) is built
here from small configs with random weights, written to a folder with
``pipe.save_pretrained`` and loaded back with ``DiffusionPipeline.from_pretrained``
from that folder only (works with ``HF_HUB_OFFLINE=1``).

Two kinds are supported:

* ``"wan"``: :class:`diffusers.WanPipeline`. The transformer is called twice per
  step (cond, then uncond), each inside ``transformer.cache_context(...)``.
* ``"latte"``: :class:`diffusers.LattePipeline`. One transformer call per step on
  a batch of 2 (uncond + cond); no ``cache_context`` is opened.

Typical use::

    folder = save_tiny_pipeline("wan", tmp_path / "wan")
    pipe = load_tiny_pipeline(folder)
    out = pipe("a red circle moving left", num_inference_steps=4,
               generator=torch.Generator().manual_seed(0), **TINY_PIPELINE_CALL["wan"])

The outputs are noise (weights are random); the pipelines exist to exercise the
caching machinery quickly and deterministically on a CPU.
"""

from __future__ import annotations

import os
import pathlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    from diffusers import DiffusionPipeline

__all__ = ["PIPELINE_KINDS", "TINY_PIPELINE_CALL", "load_tiny_pipeline", "save_tiny_pipeline"]

PIPELINE_KINDS = ("wan", "latte")

# Fast call kwargs per kind (prompt, num_inference_steps and generator come from the caller).
TINY_PIPELINE_CALL: dict[str, dict[str, Any]] = {
    "wan": {
        # height/width must be multiples of 16 (VAE x8 * patch 2): latents 16x3x4x4 -> 3*2*2 = 12 tokens.
        "height": 32,
        "width": 32,
        # (num_frames - 1) % 4 == 0 for the causal VAE: 9 frames -> 3 latent frames.
        "num_frames": 9,
        "guidance_scale": 5.0,  # > 1: CFG on, two transformer calls per step
        "max_sequence_length": 16,
        "output_type": "latent",
    },
    "latte": {
        # VAE x2 -> 8x8 latents (= transformer sample_size); patch 2 -> 16 tokens per frame.
        "height": 16,
        "width": 16,
        # Latte names it video_length; must equal the transformer's video_length (temporal pos embed).
        "video_length": 4,
        "guidance_scale": 5.0,  # > 1: CFG on, batched (uncond, cond) in a single call
        "output_type": "latent",
        "clean_caption": False,  # default True needs bs4 + ftfy
        "mask_feature": True,
        "enable_temporal_attentions": True,
        # No max_sequence_length here: LattePipeline hard-codes 120 tokens and has no such argument.
    },
}

# Text encoder sizes shared by both kinds.
_TEXT_DIM = 32

# Small word list for the offline tokenizer; unknown words fall back to characters.
_WORDS = (
    "a an the and or of in on at to with without is are moving move moves left right up down "
    "red green blue yellow black white orange purple pink gray bright dark small large big tiny "
    "circle square triangle ball box cat dog bird car tree house sky sea river mountain city road "
    "person man woman child running walking flying jumping spinning rotating slowly quickly fast slow "
    "video image frame scene camera background foreground light shadow sun moon night day "
    "low high quality blurry sharp beautiful ugly static motion zoom pan"
).split()
_CHARS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.,!?'-:;\"()"


def _build_tokenizer():
    """T5-style Unigram tokenizer (<pad>=0, </s>=1, <unk>=2) over a tiny vocabulary, built offline."""
    from transformers import T5Tokenizer

    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    vocab += [("\u2581" + w, -5.0) for w in _WORDS]
    vocab += [(c, -10.0) for c in _CHARS]
    # extra_ids=0: no sentinel tokens, so len(tokenizer) == len(vocab).
    return T5Tokenizer(vocab=vocab, extra_ids=0, model_max_length=512)


def _t5_config_kwargs(vocab_size: int) -> dict[str, Any]:
    return dict(
        vocab_size=vocab_size,
        d_model=_TEXT_DIM,
        d_kv=8,
        d_ff=64,
        num_layers=2,
        num_heads=4,
        relative_attention_num_buckets=8,
        relative_attention_max_distance=32,
        dropout_rate=0.0,
        feed_forward_proj="gated-gelu",
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
    )


def _build_wan(tokenizer):
    from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, WanPipeline, WanTransformer3DModel
    from transformers import UMT5Config, UMT5EncoderModel

    text_encoder = UMT5EncoderModel(UMT5Config(**_t5_config_kwargs(len(tokenizer)))).eval()
    # Spatial x8 (3 downsamples), temporal x4; z_dim 16 keeps the default latents_mean/std.
    vae = AutoencoderKLWan(
        base_dim=3,
        z_dim=16,
        dim_mult=[1, 1, 1, 1],
        num_res_blocks=1,
        temperal_downsample=[False, True, True],
    )
    # head_dim 12 splits into 4/4/4 for the 3D rotary embedding.
    transformer = WanTransformer3DModel(
        patch_size=(1, 2, 2),
        num_attention_heads=2,
        attention_head_dim=12,
        in_channels=16,
        out_channels=16,
        text_dim=_TEXT_DIM,
        freq_dim=256,
        ffn_dim=32,
        num_layers=2,
        cross_attn_norm=True,
        qk_norm="rms_norm_across_heads",
        rope_max_seq_len=32,
    )
    scheduler = FlowMatchEulerDiscreteScheduler(shift=7.0)
    return WanPipeline(
        tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, transformer=transformer, scheduler=scheduler
    )


def _build_latte(tokenizer):
    from diffusers import AutoencoderKL, DDIMScheduler, LattePipeline, LatteTransformer3DModel
    from transformers import T5Config, T5EncoderModel

    text_encoder = T5EncoderModel(T5Config(**_t5_config_kwargs(len(tokenizer)))).eval()
    # Two blocks -> vae_scale_factor 2.
    vae = AutoencoderKL(
        block_out_channels=(8, 16),
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        latent_channels=4,
        norm_num_groups=4,
        layers_per_block=1,
        sample_size=16,
    )
    inner_dim = 2 * 8
    transformer = LatteTransformer3DModel(
        sample_size=8,
        num_layers=2,
        patch_size=2,
        attention_head_dim=8,
        num_attention_heads=2,
        caption_channels=_TEXT_DIM,
        in_channels=4,
        cross_attention_dim=inner_dim,  # captions are projected to inner_dim first
        out_channels=8,  # 2x in_channels: the pipeline drops the learned-sigma half
        attention_bias=True,
        activation_fn="gelu-approximate",
        num_embeds_ada_norm=1000,
        norm_type="ada_norm_single",
        norm_elementwise_affine=False,
        norm_eps=1e-6,
        video_length=TINY_PIPELINE_CALL["latte"]["video_length"],
    )
    scheduler = DDIMScheduler(beta_schedule="linear", clip_sample=False)
    return LattePipeline(
        tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, transformer=transformer, scheduler=scheduler
    )


def save_tiny_pipeline(kind: str, folder: str | os.PathLike, seed: int = 0) -> pathlib.Path:
    """Build a tiny random pipeline of ``kind`` ("wan" or "latte"), save it to ``folder`` and return the path.

    Weights are deterministic given ``seed``; the global torch RNG state is left untouched.
    """
    import torch

    if kind not in PIPELINE_KINDS:
        raise ValueError(f"unknown pipeline kind {kind!r}; expected one of {PIPELINE_KINDS}")
    folder = pathlib.Path(folder)
    builder = {"wan": _build_wan, "latte": _build_latte}[kind]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        pipe = builder(_build_tokenizer())
    folder.mkdir(parents=True, exist_ok=True)
    pipe.save_pretrained(folder)
    return folder


def load_tiny_pipeline(folder: str | os.PathLike) -> DiffusionPipeline:
    """Load a pipeline saved by :func:`save_tiny_pipeline` (local files only), on CPU in float32."""
    import torch
    from diffusers import DiffusionPipeline
    from diffusers.utils import logging as diffusers_logging

    folder = pathlib.Path(folder)
    verbosity = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()
    try:
        with torch.random.fork_rng(devices=[]):  # loading must not move the caller's random stream
            pipe = DiffusionPipeline.from_pretrained(folder, dtype=torch.float32, local_files_only=True)
    finally:
        diffusers_logging.set_verbosity(verbosity)
    pipe.to("cpu")
    pipe.set_progress_bar_config(disable=True)
    return pipe
