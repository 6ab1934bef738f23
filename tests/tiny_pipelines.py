"""Tiny, randomly initialised diffusers video pipelines for the tests.

There is no model hub in CI, so every component (tokenizer included) is built
here from small configs with random weights, written to a folder with
``pipe.save_pretrained`` and loaded back with ``DiffusionPipeline.from_pretrained``
from that folder only (works with ``HF_HUB_OFFLINE=1``).

The kinds, and how each calls its transformer under classifier-free guidance (CFG):

* ``"wan"``: :class:`diffusers.WanPipeline`. Two calls per step (cond, then uncond),
  each inside ``transformer.cache_context(name, step_index=..., num_inference_steps=...)``.
* ``"latte"``: :class:`diffusers.LattePipeline`. One call per step on a batch of 2
  (uncond + cond); no ``cache_context`` is opened.
* ``"cogvideox"``: :class:`diffusers.CogVideoXPipeline`. One batched call per step inside
  ``cache_context("cond_uncond")`` (a name only: no step index or count).
* ``"hunyuan_video"``: :class:`diffusers.HunyuanVideoPipeline` (Llama + CLIP text encoders).
  Guidance-distilled; with ``true_cfg_scale > 1`` and a negative prompt (as in
  ``TINY_PIPELINE_CALL``) two calls per step, ``cache_context("cond")`` then
  ``cache_context("uncond")``, names only.
* ``"ltx_video"``: :class:`diffusers.LTXPipeline`. One batched call per step inside
  ``cache_context("cond_uncond")``, name only; packed (B, tokens, C) latents.
* ``"mochi"``: :class:`diffusers.MochiPipeline`. One batched call per step inside
  ``cache_context("cond_uncond")``, name only; its timesteps *rise* (inverted sigmas).
* ``"allegro"``: :class:`diffusers.AllegroPipeline`. One batched call per step; no
  ``cache_context``. It sets the scheduler's timesteps twice per call.
* ``"sana_video"``: :class:`diffusers.SanaVideoPipeline` (Gemma 2 text encoder, Wan VAE).
  One batched call per step; no ``cache_context``.
* ``"hunyuan_video15"``: :class:`diffusers.HunyuanVideo15Pipeline` (Qwen2.5-VL text model with
  a chat template, ByT5). Its guider makes two calls per step, ``cache_context("pred_cond")``
  then ``cache_context("pred_uncond")``, names only. It takes no ``callback_on_step_end``.
  :func:`load_tiny_pipeline` shrinks its fixed text lengths.
* ``"skyreels_v2"``: :class:`diffusers.SkyReelsV2Pipeline` (text-to-video; Wan 2.1's text encoder
  and VAE, UniPC). Two calls per step, ``cache_context("cond")`` then ``cache_context("uncond")``,
  names only (unlike Wan, no step index).
* ``"skyreels_v2_df"``: :class:`diffusers.SkyReelsV2DiffusionForcingPipeline`, the same components,
  asynchronous diffusion forcing (``ar_step=1``): per-frame timesteps, and
  ``num_inference_steps + ar_step * (latent frames - 1)`` loop iterations of two calls each
  (``cache_context("cond")``, ``cache_context("uncond")``, names only). A long video (``num_frames=17,
  overlap_history=5``) is denoised in three windows of 3 latent frames, the first two kept as prefix.

Only Wan tells the step index and count through ``cache_context``; for the others AdaCache
finds them in the scheduler's timesteps when applied to the pipeline. AdaCache's registry
has no spec for the Sana-Video and HunyuanVideo 1.5 transformers (tests pass one).

The kinds made of one T5-family text encoder, a VAE, a transformer and a scheduler are rows of `TEXT_TO_VIDEO`;
HunyuanVideo, Sana-Video and HunyuanVideo 1.5, whose text encoders differ, have builders of their own.

Typical use::

    folder = save_tiny_pipeline("wan", tmp_path / "wan")
    pipe = load_tiny_pipeline(folder)
    out = pipe("a red circle moving left", num_inference_steps=4,
               generator=torch.Generator().manual_seed(0), **TINY_PIPELINE_CALL["wan"])

The outputs are noise (weights are random); the pipelines exist to exercise the
caching machinery quickly and deterministically on a CPU.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import pathlib
import types
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Iterator

if TYPE_CHECKING:  # pragma: no cover
    from diffusers import DiffusionPipeline

__all__ = ["PIPELINE_KINDS", "TINY_PIPELINE_CALL", "load_tiny_pipeline", "save_tiny_pipeline"]

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
    "cogvideox": {
        # VAE x4 spatial -> 8x8 latents, patch 2 -> 16 tokens per frame.
        "height": 32,
        "width": 32,
        # VAE x4 temporal: (9 - 1) // 4 + 1 = 3 latent frames (= the transformer's sample_frames).
        "num_frames": 9,
        "guidance_scale": 5.0,  # > 1: CFG on, batched (uncond, cond) in a single call
        "max_sequence_length": 16,  # must equal the transformer's max_text_seq_length
        "output_type": "latent",
    },
    "hunyuan_video": {
        # height/width multiples of 16; VAE x8 -> 4x4 latents, patch 2 -> 4 tokens per frame.
        "height": 32,
        "width": 32,
        "num_frames": 9,  # VAE x4 temporal -> 3 latent frames
        "guidance_scale": 6.0,  # embedded guidance (guidance-distilled model): no extra call
        # True CFG: a negative prompt and true_cfg_scale > 1 make a second (uncond) call per step.
        "true_cfg_scale": 4.0,
        "negative_prompt": "blurry low quality",
        # The default template is Llama-3's chat prompt with crop_start=95 for its real tokenizer; the tiny
        # tokenizer has the header tokens as single special tokens: <s> <|start_header_id|> <|end_header_id|> = 3.
        "prompt_template": {"template": "<|start_header_id|><|end_header_id|>{}<|eot_id|>", "crop_start": 3},
        "max_sequence_length": 16,
        "output_type": "latent",
    },
    "ltx_video": {
        # VAE x32 spatial -> 2x2 latents (patch 1: 4 tokens per frame), x8 temporal: 17 frames -> 3.
        "height": 64,
        "width": 64,
        "num_frames": 17,
        "guidance_scale": 3.0,  # > 1: CFG on, batched (uncond, cond) in a single call
        "max_sequence_length": 16,
        "output_type": "latent",
    },
    "mochi": {
        # MochiPipeline hard-codes VAE x8 spatial, x6 temporal: 4x4 latents (patch 2: 4 tokens), 13 frames -> 3.
        "height": 32,
        "width": 32,
        "num_frames": 13,
        "guidance_scale": 4.5,  # > 1: CFG on, batched (uncond, cond) in a single call
        "max_sequence_length": 16,
        "output_type": "latent",
    },
    "allegro": {
        # VAE x8 spatial -> 4x4 latents (patch 2: 4 tokens per frame); x4 temporal, odd count: 9 -> 3 frames.
        "height": 32,
        "width": 32,
        "num_frames": 9,
        "guidance_scale": 7.5,  # > 1: CFG on, batched (uncond, cond) in a single call
        "max_sequence_length": 16,
        "clean_caption": False,  # default True needs bs4 + ftfy
        "output_type": "latent",
    },
    "sana_video": {
        # height/width multiples of 32; Wan VAE x8 -> 4x4 latents, patch 2 -> 4 tokens per frame.
        "height": 32,
        "width": 32,
        "frames": 9,  # SanaVideoPipeline names it frames; VAE x4 temporal -> 3 latent frames
        "guidance_scale": 4.5,  # > 1: CFG on, batched (uncond, cond) in a single call
        "max_sequence_length": 16,
        "use_resolution_binning": False,  # would snap 32x32 to a trained aspect-ratio bin (480p)
        "complex_human_instruction": [],  # the default prepends a long instruction to the prompt
        "output_type": "latent",
    },
    "hunyuan_video15": {
        # VAE x16 spatial -> 2x2 latents (patch 1: 4 tokens per frame); x4 temporal: 9 frames -> 3.
        "height": 32,
        "width": 32,
        "num_frames": 9,
        # CFG comes from the pipeline's guider component (ClassifierFreeGuidance, scale 6): two calls per step.
        # Text lengths are pipeline attributes, not call arguments: load_tiny_pipeline makes them small.
        "output_type": "latent",
    },
    "skyreels_v2": {
        # Wan 2.1's VAE and patching: 32x32 -> 4x4 latents -> 2x2 tokens per frame; 9 frames -> 3 latent frames.
        "height": 32,
        "width": 32,
        "num_frames": 9,
        "guidance_scale": 5.0,  # > 1: CFG on, two calls per step
        "max_sequence_length": 16,
        "output_type": "latent",
    },
    "skyreels_v2_df": {
        # As skyreels_v2, generated by diffusion forcing: every latent frame has its own timestep.
        "height": 32,
        "width": 32,
        "num_frames": 9,
        "guidance_scale": 5.0,  # > 1: CFG on, two calls per step
        "max_sequence_length": 16,
        "base_num_frames": 9,  # the whole video in one window (no long-video continuation)
        # Asynchronous: frame k starts k iterations after frame k-1, so the loop runs num_inference_steps + 2
        # iterations for the 3 latent frames, with per-frame timesteps (B, F).
        "ar_step": 1,
        "causal_block_size": 1,
        "output_type": "latent",
    },
}

PIPELINE_KINDS = tuple(TINY_PIPELINE_CALL)

# Text encoder width shared by the kinds (T5, Llama, Gemma, Qwen).
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


# The tiny Wan 2.1 transformer (SkyReels-V2's has the same config). Head dim 12 splits into 4/4/4 for the 3D RoPE.
_WAN_TRANSFORMER: dict[str, Any] = dict(
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
# The tiny Wan 2.1 VAE: spatial x8 (3 downsamples), temporal x4; z_dim 16 keeps the default latents_mean/std.
_WAN_VAE: dict[str, Any] = dict(
    base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1, temperal_downsample=[False, True, True]
)


@dataclass(frozen=True)
class TextToVideo:
    """A pipeline of the five usual components, each a class built from a config: the shared T5 tokenizer, a
    T5-family text encoder (`_t5_config_kwargs`), a VAE, a transformer and a scheduler."""

    pipeline: str  # the diffusers pipeline class
    vae: str  # a diffusers VAE class, built from vae_config
    vae_config: dict[str, Any]
    # A family of adacache.testing.TINY_MODELS (its tiny config with transformer_config's overrides, and its
    # randomized parameters), or else a diffusers class built from transformer_config alone.
    transformer: str
    transformer_config: dict[str, Any]
    scheduler: str  # a diffusers scheduler class, built from scheduler_config
    scheduler_config: dict[str, Any] = field(default_factory=dict)
    text_encoder: str = "T5EncoderModel"  # a transformers class whose config_class takes the T5 settings


_CALL = TINY_PIPELINE_CALL
# SkyReels-V2 text-to-video: Wan 2.1's text encoder, VAE and transformer config; UniPC on flow sigmas, shift 8.
_SKYREELS_V2 = dict(
    text_encoder="UMT5EncoderModel", vae="AutoencoderKLWan", vae_config=_WAN_VAE,
    transformer="SkyReelsV2Transformer3DModel", transformer_config=_WAN_TRANSFORMER,
    scheduler="UniPCMultistepScheduler",
    scheduler_config=dict(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=8.0),
)

TEXT_TO_VIDEO: dict[str, TextToVideo] = {
    "wan": TextToVideo(
        "WanPipeline", text_encoder="UMT5EncoderModel", vae="AutoencoderKLWan", vae_config=_WAN_VAE,
        transformer="WanTransformer3DModel", transformer_config=_WAN_TRANSFORMER,
        scheduler="FlowMatchEulerDiscreteScheduler", scheduler_config=dict(shift=7.0),
    ),
    "latte": TextToVideo(
        "LattePipeline",
        vae="AutoencoderKL",
        vae_config=dict(  # two blocks -> vae_scale_factor 2
            block_out_channels=(8, 16),
            down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
            up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
            latent_channels=4,
            norm_num_groups=4,
            layers_per_block=1,
            sample_size=16,
        ),
        transformer="LatteTransformer3DModel",
        transformer_config=dict(
            sample_size=8,
            num_layers=2,
            patch_size=2,
            attention_head_dim=8,
            num_attention_heads=2,
            caption_channels=_TEXT_DIM,
            in_channels=4,
            cross_attention_dim=2 * 8,  # captions are projected to inner_dim (heads x head dim) first
            out_channels=8,  # 2x in_channels: the pipeline drops the learned-sigma half
            attention_bias=True,
            activation_fn="gelu-approximate",
            num_embeds_ada_norm=1000,
            norm_type="ada_norm_single",
            norm_elementwise_affine=False,
            norm_eps=1e-6,
            video_length=_CALL["latte"]["video_length"],
        ),
        scheduler="DDIMScheduler",
        scheduler_config=dict(beta_schedule="linear", clip_sample=False),
    ),
    "cogvideox": TextToVideo(
        "CogVideoXPipeline",
        vae="AutoencoderKLCogVideoX",
        vae_config=dict(  # three blocks: spatial x4 (2 ** (blocks - 1)); both downsamples also halve time: x4
            down_block_types=("CogVideoXDownBlock3D",) * 3,
            up_block_types=("CogVideoXUpBlock3D",) * 3,
            block_out_channels=(8, 8, 8),
            latent_channels=4,
            layers_per_block=1,
            norm_num_groups=4,
            temporal_compression_ratio=4,
            sample_height=_CALL["cogvideox"]["height"],
            sample_width=_CALL["cogvideox"]["width"],
        ),
        transformer="cogvideox",
        transformer_config=dict(
            text_embed_dim=_TEXT_DIM,
            max_text_seq_length=_CALL["cogvideox"]["max_sequence_length"],
            sample_height=_CALL["cogvideox"]["height"] // 4,
            sample_width=_CALL["cogvideox"]["width"] // 4,
            sample_frames=_CALL["cogvideox"]["num_frames"],
        ),
        scheduler="CogVideoXDDIMScheduler",
        scheduler_config=dict(  # CogVideoX-2b's settings (v-prediction, zero-SNR, trailing spacing)
            beta_schedule="scaled_linear",
            beta_start=0.00085,
            beta_end=0.012,
            clip_sample=False,
            prediction_type="v_prediction",
            rescale_betas_zero_snr=True,
            set_alpha_to_one=True,
            snr_shift_scale=3.0,
            timestep_spacing="trailing",
        ),
    ),
    "ltx_video": TextToVideo(
        "LTXPipeline",
        vae="AutoencoderKLLTXVideo",
        vae_config=dict(  # patch 4 then three space-time downsamples: x32 spatial, x8 temporal, as released
            latent_channels=4,
            block_out_channels=(8, 8, 8, 8),
            decoder_block_out_channels=(8, 8, 8, 8),
            layers_per_block=(1, 1, 1, 1, 1),
            decoder_layers_per_block=(1, 1, 1, 1, 1),
            spatio_temporal_scaling=(True, True, True, False),
            decoder_spatio_temporal_scaling=(True, True, True, False),
            decoder_inject_noise=(False, False, False, False, False),
            upsample_residual=(False, False, False, False),
            upsample_factor=(1, 1, 1, 1),
            patch_size=4,
            patch_size_t=1,
        ),
        transformer="ltx_video",
        transformer_config=dict(caption_channels=_TEXT_DIM),
        scheduler="FlowMatchEulerDiscreteScheduler",
        scheduler_config=dict(  # LTX-Video 0.9's: resolution-dependent shift, terminal sigma 0.1
            use_dynamic_shifting=True,
            base_shift=0.95,
            max_shift=2.05,
            base_image_seq_len=1024,
            max_image_seq_len=4096,
            shift_terminal=0.1,
        ),
    ),
    "mochi": TextToVideo(
        "MochiPipeline",
        vae="AutoencoderKLMochi",
        vae_config=dict(  # decoder x8 spatial, x6 temporal (MochiPipeline hard-codes both); 32-group norms
            latent_channels=4,
            encoder_block_out_channels=(32, 32, 32, 32),
            decoder_block_out_channels=(32, 32, 32, 32),
            layers_per_block=(1, 1, 1, 1, 1),
            add_attention_block=(False, False, False, False, False),
            latents_mean=(0.0,) * 4,
            latents_std=(1.0,) * 4,
        ),
        transformer="mochi",
        transformer_config=dict(text_embed_dim=_TEXT_DIM, max_sequence_length=_CALL["mochi"]["max_sequence_length"]),
        scheduler="FlowMatchEulerDiscreteScheduler",
        scheduler_config=dict(invert_sigmas=True),  # Mochi runs its timesteps upwards
    ),
    "allegro": TextToVideo(
        "AllegroPipeline",
        vae="AutoencoderKLAllegro",
        vae_config=dict(  # four blocks: x8 spatial (2 ** (blocks - 1)); two temporal downsamples: x4
            block_out_channels=(8, 8, 8, 8),
            latent_channels=4,
            layers_per_block=1,
            norm_num_groups=4,
            temporal_compression_ratio=4,
            sample_size=_CALL["allegro"]["height"],
        ),
        transformer="allegro",
        transformer_config=dict(
            caption_channels=_TEXT_DIM,
            sample_height=_CALL["allegro"]["height"] // 8,
            sample_width=_CALL["allegro"]["width"] // 8,
            sample_frames=(_CALL["allegro"]["num_frames"] - 1) // 4 + 1,
        ),
        scheduler="EulerAncestralDiscreteScheduler",
        scheduler_config=dict(beta_schedule="linear", beta_start=0.0001, beta_end=0.02),
    ),
    "skyreels_v2": TextToVideo("SkyReelsV2Pipeline", **_SKYREELS_V2),
    # The same components; the pipeline runs per-frame timesteps (diffusion forcing).
    "skyreels_v2_df": TextToVideo("SkyReelsV2DiffusionForcingPipeline", **_SKYREELS_V2),
}


def _build_text_to_video(entry: TextToVideo, tokenizer):
    """The pipeline `entry` describes, its components made in the order text encoder, VAE, transformer, scheduler
    (the order their random weights are drawn in)."""
    import diffusers
    import transformers

    encoder_class = getattr(transformers, entry.text_encoder)
    text_encoder = encoder_class(encoder_class.config_class(**_t5_config_kwargs(len(tokenizer)))).eval()
    vae = getattr(diffusers, entry.vae)(**entry.vae_config)
    transformer = _tiny_transformer(entry.transformer, **entry.transformer_config)
    scheduler = getattr(diffusers, entry.scheduler)(**entry.scheduler_config)
    return getattr(diffusers, entry.pipeline)(
        tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, transformer=transformer, scheduler=scheduler
    )


def _tiny_transformer(name: str, **config: Any):
    """The transformer of family `name` from :data:`adacache.testing.TINY_MODELS`, with `config` overriding its
    tiny config (text widths and sample sizes that must agree with the pipeline's other components); or, where
    `name` is no family there, the diffusers class `name` built from `config` alone."""
    import diffusers
    import torch

    from adacache.testing import TINY_MODELS

    tiny = TINY_MODELS.get(name)
    if tiny is None:
        return getattr(diffusers, name)(**config)
    model = getattr(diffusers, tiny.class_name)(**{**tiny.config, **config})
    with torch.no_grad():
        for parameter in tiny.randomize:  # zero-initialised parameters that would make a part of the network a no-op
            model.get_parameter(parameter).normal_(0.0, 0.1)
    return model


# Llama-3 chat headers, single special tokens in the tiny Llama tokenizer (HunyuanVideo's prompt template).
_LLAMA_SPECIAL = ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")


def _build_llama_tokenizer():
    """Llama-style BPE tokenizer (Metaspace, byte fallback) over single characters and "\u2581word" tokens."""
    from transformers import LlamaTokenizerFast

    return _build_metaspace_bpe(
        LlamaTokenizerFast, {"unk_token": "<unk>", "bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>"},
        _LLAMA_SPECIAL,
    )


def _build_metaspace_bpe(tokenizer_class, special: dict[str, str], extra_special: tuple[str, ...] = ()):
    """A sentencepiece-style BPE tokenizer of ``tokenizer_class`` (Llama, Gemma): special tokens, then single
    characters, then every prefix of "\u2581word" for the word list, with the merges that build them. It adds the
    BOS token, as the released ones do."""
    vocab = {token: i for i, token in enumerate(special.values())}
    vocab["\u2581"] = len(vocab)
    for token in extra_special:
        vocab[token] = len(vocab)
    for c in _CHARS:
        vocab.setdefault(c, len(vocab))
    merges = []
    for word in _WORDS:  # "\u2581" + w, built letter by letter: every prefix is a token
        previous = "\u2581"
        for c in word:
            vocab.setdefault(previous + c, len(vocab))
            if (previous, c) not in merges:
                merges.append((previous, c))
            previous += c
    tokenizer = tokenizer_class(
        vocab=vocab, merges=merges, add_bos_token=True, padding_side="right", model_max_length=512, **special
    )
    if extra_special:
        tokenizer.add_special_tokens({"additional_special_tokens": list(extra_special)})
    return tokenizer


def _build_clip_tokenizer():
    """CLIP-style BPE tokenizer over single characters ("c" inside a word, "c</w>" at its end), built offline."""
    from transformers import CLIPTokenizer

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in _CHARS.lower():
        vocab.setdefault(c, len(vocab))
        vocab.setdefault(c + "</w>", len(vocab))
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77)


def _build_hunyuan_video(tokenizer):
    from diffusers import (
        AutoencoderKLHunyuanVideo,
        FlowMatchEulerDiscreteScheduler,
        HunyuanVideoPipeline,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, LlamaConfig, LlamaModel

    del tokenizer  # HunyuanVideo tokenizes with Llama and CLIP, not T5
    llama_tokenizer = _build_llama_tokenizer()
    clip_tokenizer = _build_clip_tokenizer()
    # The pipeline reads the third-to-last hidden state: two layers at least.
    text_encoder = LlamaModel(
        LlamaConfig(
            vocab_size=len(llama_tokenizer),
            hidden_size=_TEXT_DIM,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=128,
            pad_token_id=llama_tokenizer.pad_token_id,
            bos_token_id=1,
            eos_token_id=2,
        )
    ).eval()
    # Its pooler output (the end-of-text token's state) is the pooled projection: width = hidden_size.
    text_encoder_2 = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(clip_tokenizer),
            hidden_size=16,
            intermediate_size=32,
            projection_dim=16,
            num_hidden_layers=2,
            num_attention_heads=2,
            max_position_embeddings=77,  # the pipeline pads CLIP prompts to 77 tokens
            bos_token_id=clip_tokenizer.bos_token_id,
            eos_token_id=clip_tokenizer.eos_token_id,
            pad_token_id=clip_tokenizer.pad_token_id,
        )
    ).eval()
    vae = AutoencoderKLHunyuanVideo(
        latent_channels=4,
        block_out_channels=(8, 8, 8, 8),
        layers_per_block=1,
        norm_num_groups=4,
        spatial_compression_ratio=8,
        temporal_compression_ratio=4,
        mid_block_add_attention=False,
    )
    transformer = _tiny_transformer("hunyuan_video", text_embed_dim=_TEXT_DIM, pooled_projection_dim=16)
    scheduler = FlowMatchEulerDiscreteScheduler(shift=7.0)
    return HunyuanVideoPipeline(
        text_encoder=text_encoder,
        tokenizer=llama_tokenizer,
        transformer=transformer,
        vae=vae,
        scheduler=scheduler,
        text_encoder_2=text_encoder_2,
        tokenizer_2=clip_tokenizer,
    )


def _build_sana_video(tokenizer):
    from diffusers import AutoencoderKLWan, DPMSolverMultistepScheduler, SanaVideoPipeline, SanaVideoTransformer3DModel
    from transformers import Gemma2Config, Gemma2Model, GemmaTokenizerFast

    del tokenizer  # Sana-Video tokenizes with Gemma 2's tokenizer
    gemma_tokenizer = _build_metaspace_bpe(
        GemmaTokenizerFast,
        {"pad_token": "<pad>", "eos_token": "<eos>", "bos_token": "<bos>", "unk_token": "<unk>", "mask_token": "<mask>"},
    )
    text_encoder = Gemma2Model(
        Gemma2Config(
            vocab_size=len(gemma_tokenizer),
            hidden_size=_TEXT_DIM,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=8,
            max_position_embeddings=128,
            pad_token_id=gemma_tokenizer.pad_token_id,
            bos_token_id=gemma_tokenizer.bos_token_id,
            eos_token_id=gemma_tokenizer.eos_token_id,
        )
    ).eval()
    # Wan 2.1's VAE layout (x8 spatial, x4 temporal), 4 latent channels.
    vae = AutoencoderKLWan(**{**_WAN_VAE, "z_dim": 4, "latents_mean": [0.0] * 4, "latents_std": [1.0] * 4})
    transformer = SanaVideoTransformer3DModel(
        in_channels=4,
        out_channels=4,
        num_attention_heads=2,
        attention_head_dim=16,
        num_layers=4,
        num_cross_attention_heads=2,
        cross_attention_head_dim=16,
        cross_attention_dim=32,  # = heads x head dim: captions are projected to it
        caption_channels=_TEXT_DIM,
        mlp_ratio=2.5,
        patch_size=(1, 2, 2),
        qk_norm="rms_norm_across_heads",
        rope_max_seq_len=64,
    )
    # Sana-Video's scheduler: DPM-Solver++ on flow sigmas (shift 8).
    scheduler = DPMSolverMultistepScheduler(
        prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=8.0, solver_order=2
    )
    return SanaVideoPipeline(
        tokenizer=gemma_tokenizer, text_encoder=text_encoder, vae=vae, transformer=transformer, scheduler=scheduler
    )


# Qwen2.5's chat format, the part HunyuanVideo 1.5 uses (a system and a user message, then the assistant's turn).
_QWEN_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def _build_qwen_tokenizer():
    """Qwen2-style byte-level BPE tokenizer: the 256 byte symbols, then every prefix of " word" ("\u0120word")
    for the word list with the merges that build them; with the chat template."""
    from transformers import Qwen2Tokenizer
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    vocab = {token: i for i, token in enumerate(specials)}
    for symbol in bytes_to_unicode().values():
        vocab.setdefault(symbol, len(vocab))
    merges = []
    for word in _WORDS:
        previous = "\u0120"  # the byte-level symbol of a space
        for c in word:
            vocab.setdefault(previous + c, len(vocab))
            if (previous, c) not in merges:
                merges.append((previous, c))
            previous += c
    tokenizer = Qwen2Tokenizer(vocab=vocab, merges=merges, padding_side="right", model_max_length=2048)
    tokenizer.add_special_tokens({"additional_special_tokens": specials[1:]})
    tokenizer.chat_template = _QWEN_CHAT_TEMPLATE
    return tokenizer


def _build_hunyuan_video15(tokenizer):
    from diffusers import (
        AutoencoderKLHunyuanVideo15,
        ClassifierFreeGuidance,
        FlowMatchEulerDiscreteScheduler,
        HunyuanVideo15Pipeline,
        HunyuanVideo15Transformer3DModel,
    )
    from transformers import ByT5Tokenizer, Qwen2_5_VLTextConfig, Qwen2_5_VLTextModel, T5Config, T5EncoderModel

    del tokenizer  # HunyuanVideo 1.5 tokenizes with Qwen2.5 (chat template) and ByT5
    qwen_tokenizer = _build_qwen_tokenizer()
    # The pipeline reads the third-to-last hidden state: two layers at least. Head dim 8: M-RoPE sections 1+1+2.
    text_encoder = Qwen2_5_VLTextModel(
        Qwen2_5_VLTextConfig(
            vocab_size=len(qwen_tokenizer),
            hidden_size=_TEXT_DIM,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=2048,
            rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [1, 1, 2]},
            pad_token_id=qwen_tokenizer.pad_token_id,
            bos_token_id=None,
            eos_token_id=qwen_tokenizer.eos_token_id,
        )
    ).eval()
    byt5_tokenizer = ByT5Tokenizer()  # bytes: no vocabulary to download
    byt5_config = _t5_config_kwargs(len(byt5_tokenizer))
    byt5_config.update(d_model=16, num_heads=2)
    text_encoder_2 = T5EncoderModel(T5Config(**byt5_config)).eval()
    vae = AutoencoderKLHunyuanVideo15(
        latent_channels=4,
        block_out_channels=(8, 8, 8, 8, 8),
        layers_per_block=1,
        spatial_compression_ratio=16,
        temporal_compression_ratio=4,
    )
    # Input channels: latents | condition latents | condition mask (zeros in text-to-video).
    transformer = HunyuanVideo15Transformer3DModel(
        in_channels=2 * 4 + 1,
        out_channels=4,
        num_attention_heads=2,
        attention_head_dim=16,
        num_layers=4,
        num_refiner_layers=1,
        mlp_ratio=2.0,
        patch_size=1,
        patch_size_t=1,
        qk_norm="rms_norm",
        text_embed_dim=_TEXT_DIM,
        text_embed_2_dim=16,
        image_embed_dim=16,
        rope_axes_dim=(4, 6, 6),  # sums to the head dim
        task_type="t2v",
        use_meanflow=False,
    )
    return HunyuanVideo15Pipeline(
        text_encoder=text_encoder,
        tokenizer=qwen_tokenizer,
        transformer=transformer,
        vae=vae,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=7.0),
        text_encoder_2=text_encoder_2,
        tokenizer_2=byt5_tokenizer,
        guider=ClassifierFreeGuidance(guidance_scale=6.0),
    )


# The kinds whose text encoders are not one T5 (TEXT_TO_VIDEO has the rest).
_BUILDERS = {
    "hunyuan_video": _build_hunyuan_video,
    "sana_video": _build_sana_video,
    "hunyuan_video15": _build_hunyuan_video15,
}


def save_tiny_pipeline(kind: str, folder: str | os.PathLike, seed: int = 0) -> pathlib.Path:
    """Build a tiny random pipeline of ``kind`` (one of :data:`PIPELINE_KINDS`), save it to ``folder`` and return
    the path.

    Weights are deterministic given ``seed``; the global torch RNG state is left untouched.
    """
    import torch

    if kind not in PIPELINE_KINDS:
        raise ValueError(f"unknown pipeline kind {kind!r}; expected one of {PIPELINE_KINDS}")
    folder = pathlib.Path(folder)
    build = _BUILDERS.get(kind) or (lambda tokenizer: _build_text_to_video(TEXT_TO_VIDEO[kind], tokenizer))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        pipe = build(_build_tokenizer())
    folder.mkdir(parents=True, exist_ok=True)
    pipe.save_pretrained(folder)
    return folder


def load_tiny_pipeline(folder: str | os.PathLike) -> DiffusionPipeline:
    """Load a pipeline saved by :func:`save_tiny_pipeline` (local files only), on CPU in float32.

    HunyuanVideo 1.5 fixes its text lengths in the pipeline's ``__init__``, not in a config (1000 Qwen tokens after
    a 108-token system prompt, 256 ByT5 tokens, 729 image tokens: ~0.5 s a step here); the loaded tiny one gets
    small ones, and a short system prompt with its own crop length (see :func:`_shrink_hunyuan_video15`).
    """
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
    if type(pipe).__name__ == "HunyuanVideo15Pipeline":
        _shrink_hunyuan_video15(pipe)
    return pipe


def _shrink_hunyuan_video15(pipe) -> None:
    """Small fixed lengths for a tiny HunyuanVideo15Pipeline (instance attributes its __init__ sets): 16 Qwen and
    16 ByT5 tokens, 8 image tokens, and a one-line system prompt whose chat-template prefix is cropped exactly, as
    the 108 tokens of the released one are."""
    pipe.system_message = "Describe the video."
    prefix = f"<|im_start|>system\n{pipe.system_message}<|im_end|>\n<|im_start|>user\n"
    pipe.prompt_template_encode_start_idx = len(pipe.tokenizer(prefix)["input_ids"])
    pipe.tokenizer_max_length = 16
    pipe.tokenizer_2_max_length = 16
    pipe.vision_num_semantic_tokens = 8


# --- ftfy -------------------------------------------------------------------------------------------------------------
FTFY_PIPELINE_MODULES = ("diffusers.pipelines.wan.pipeline_wan_i2v", "diffusers.pipelines.wan.pipeline_wan_video2video",
                         "diffusers.pipelines.skyreels_v2.pipeline_skyreels_v2",
                         "diffusers.pipelines.skyreels_v2.pipeline_skyreels_v2_diffusion_forcing")


@contextlib.contextmanager
def ftfy_stand_in() -> Iterator[None]:
    """Some diffusers pipelines (Wan's image- and video-to-video, SkyReels-V2) call `ftfy.fix_text` on the prompt
    without checking that ftfy is installed (diffusers 0.42.1); where it is not, their modules get an identity
    stand-in while inside (what ftfy does to these ASCII prompts), and lose it on the way out."""
    added = []
    for name in FTFY_PIPELINE_MODULES:
        module = importlib.import_module(name)
        if not hasattr(module, "ftfy"):
            module.ftfy = types.SimpleNamespace(fix_text=lambda text: text)
            added.append(module)
    try:
        yield
    finally:
        for module in added:
            del module.ftfy


def saved_once(make_folder: Callable[[str], pathlib.Path]) -> Callable[[str], pathlib.Path]:
    """kind -> the folder of a tiny pipeline of that kind, saved at its first request into `make_folder(kind)`
    (a pytest fixture passes `tmp_path_factory.mktemp`) and reused after."""
    folders: dict[str, pathlib.Path] = {}

    def folder(kind: str) -> pathlib.Path:
        if kind not in folders:
            folders[kind] = save_tiny_pipeline(kind, make_folder(kind))
        return folders[kind]

    return folder
