"""Tiny, randomly initialised diffusers video transformers for tests, demos and benchmarks.

Every supported family (Wan, CogVideoX, HunyuanVideo, LTX-Video, Mochi, Latte, Allegro,
SkyReels-V2) has a :class:`TinyModel` entry in :data:`TINY_MODELS`: the diffusers class name, a
minimal but valid constructor config, and the shape of the example latent video.  ``build()``
creates the model with deterministic random weights (no hub access) and ``inputs()`` creates
matching forward kwargs, so that ``model(**tiny.inputs(model))`` runs in a few milliseconds on CPU.

Example::

    from adacache.testing import tiny_model

    tiny = tiny_model("wan")
    model = tiny.build(seed=0)
    out = model(**tiny.inputs(model, batch_size=2))[0]
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

__all__ = ["TinyModel", "TINY_MODELS", "tiny_model", "frames_tokens"]

# Shared tiny sizes: 2 heads x 16 dims, 4 latent channels, 8 text tokens of width 16.
_HEADS = 2
_HEAD_DIM = 16
_INNER = _HEADS * _HEAD_DIM
_CHANNELS = 4
_TEXT_LEN = 8
_TEXT_DIM = 16
_FRAMES = 4


@dataclass(frozen=True)
class TinyModel:
    """A tiny diffusers video transformer and the example inputs that fit it."""

    family: str
    class_name: str
    config: dict = field(hash=False)
    latent_frames: int = _FRAMES
    latent_height: int = 16
    latent_width: int = 16
    latent_channels: int = _CHANNELS
    text_len: int = _TEXT_LEN
    text_dim: int = _TEXT_DIM
    # How hidden_states is laid out: "bcfhw", "bfchw" (CogVideoX) or "packed" (LTX: (B, F*H*W, C)).
    layout: str = "bcfhw"
    # Names of the nn.ModuleList attributes holding the transformer blocks, in execution order.
    block_lists: tuple[str, ...] = ("transformer_blocks",)
    # Dtype of encoder_attention_mask (None: the model takes no text mask).
    mask_dtype: str | None = None
    # Width of pooled_projections (None: not used).
    pooled_dim: int | None = None
    timestep_key: str = "timestep"
    # Zero-initialised parameters to fill with random values in build().
    randomize: tuple[str, ...] = ()
    # Extra forward kwargs: f(tiny, model, batch_size, dtype, device) -> dict (RoPE tables, masks, conditions).
    extra: Callable[..., dict] | None = field(default=None, hash=False, compare=False)
    # A model whose forward does not fit the standard kwargs: f(tiny, model, batch_size, timestep, seed) -> dict,
    # replacing inputs() entirely (return_dict=False is added).
    make_inputs: Callable[..., dict] | None = field(default=None, hash=False, compare=False)
    # What a reader should know about the model's structure (free text).
    notes: str = ""

    def build(self, seed: int = 0, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
        """Instantiate the model with weights drawn from ``seed`` (global RNG left untouched), in eval mode.

        Casting to ``dtype`` follows ``from_pretrained(torch_dtype=...)``: modules listed in the
        class's ``_keep_in_fp32_modules`` stay in float32.
        """
        import diffusers

        cls = getattr(diffusers, self.class_name)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = cls(**self.config)
            # Parameters that diffusers initialises to zero and that would otherwise make a part
            # of the network a no-op (checkpoints have learned values).
            with torch.no_grad():
                for name in self.randomize:
                    model.get_parameter(name).normal_(0.0, 0.1)
        if dtype != torch.float32:
            _cast_like_from_pretrained(model, dtype)
        return model.eval()

    def hidden_shape(self, batch_size: int = 1) -> tuple[int, ...]:
        """Shape of the ``hidden_states`` input (and of the model output)."""
        b, c, f, h, w = batch_size, self.latent_channels, self.latent_frames, self.latent_height, self.latent_width
        if self.layout == "bfchw":
            return (b, f, c, h, w)
        if self.layout == "packed":
            return (b, f * h * w, c)
        return (b, c, f, h, w)

    def inputs(self, model: torch.nn.Module, batch_size: int = 1, timestep: float = 500.0, seed: int = 0) -> dict:
        """Forward kwargs for ``model``; sample ``i`` depends only on ``(seed, i)``.

        So ``inputs(model, 2)`` stacks ``inputs(model, 1)`` with a second sample, as in
        batched classifier-free guidance.
        """
        if self.make_inputs is not None:
            return {**self.make_inputs(self, model, batch_size, timestep, seed), "return_dict": False}
        param = next(model.parameters())
        dtype, device = getattr(model, "dtype", param.dtype), param.device
        per_sample = [self._sample(seed, i) for i in range(batch_size)]
        kwargs: dict[str, Any] = {
            "hidden_states": torch.stack([s["hidden_states"] for s in per_sample]),
            "encoder_hidden_states": torch.stack([s["encoder_hidden_states"] for s in per_sample]),
        }
        if self.pooled_dim is not None:
            kwargs["pooled_projections"] = torch.stack([s["pooled_projections"] for s in per_sample])
        if self.mask_dtype is not None:
            # Sample i has its last 2 + (i % 2) text tokens padded out.
            valid = torch.tensor([self.text_len - 2 - (i % 2) for i in range(batch_size)])
            mask = torch.arange(self.text_len)[None, :] < valid[:, None]
            mask_dtype = dtype if self.mask_dtype == "model" else getattr(torch, self.mask_dtype)
            kwargs["encoder_attention_mask"] = mask.to(mask_dtype)
        kwargs = {k: (v.to(dtype) if v.is_floating_point() else v).to(device) for k, v in kwargs.items()}
        # Timesteps stay float32 whatever the model dtype (the sinusoidal embeddings use float32).
        kwargs[self.timestep_key] = torch.full((batch_size,), float(timestep), device=device)
        extra = self.extra or _EXTRA_INPUTS.get(self.family, _no_extra)
        kwargs.update(extra(self, model, batch_size, dtype, device))
        kwargs["return_dict"] = False
        return kwargs

    def _sample(self, seed: int, index: int) -> dict[str, torch.Tensor]:
        g = torch.Generator().manual_seed(seed * 1_000_003 + index)
        out = {
            "hidden_states": torch.randn(self.hidden_shape(1)[1:], generator=g),
            "encoder_hidden_states": torch.randn(self.text_len, self.text_dim, generator=g),
        }
        if self.pooled_dim is not None:
            out["pooled_projections"] = torch.randn(self.pooled_dim, generator=g)
        return out


def _cast_like_from_pretrained(model: torch.nn.Module, dtype: torch.dtype) -> None:
    # Plain model.to(dtype) would also cast the float32-only modules (and log a warning).
    keep = getattr(model, "_keep_in_fp32_modules", None) or []
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        if t.is_floating_point() and not any(k in name.split(".") for k in keep):
            t.data = t.data.to(dtype)


def _no_extra(tiny: TinyModel, model, batch_size: int, dtype, device) -> dict:
    return {}


def _hunyuan_extra(tiny: TinyModel, model, batch_size: int, dtype, device) -> dict:
    # Guidance-distilled: the pipeline passes guidance_scale * 1000.
    if not model.config.guidance_embeds:
        return {}
    return {"guidance": torch.full((batch_size,), 6000.0, dtype=dtype, device=device)}


def _ltx_extra(tiny: TinyModel, model, batch_size: int, dtype, device) -> dict:
    # Latent grid for the RoPE; interpolation scale as in LTXPipeline (VAE 8x32x32, 25 fps).
    return {
        "num_frames": tiny.latent_frames,
        "height": tiny.latent_height,
        "width": tiny.latent_width,
        "rope_interpolation_scale": (8 / 25.0, 32.0, 32.0),
    }


def _allegro_extra(tiny: TinyModel, model, batch_size: int, dtype, device) -> dict:
    # RoPE computed as in AllegroPipeline._prepare_rotary_positional_embeddings.
    from diffusers.models.embeddings import get_3d_rotary_pos_embed_allegro

    cfg = model.config
    gh, gw = tiny.latent_height // cfg.patch_size, tiny.latent_width // cfg.patch_size
    freqs_t, freqs_h, freqs_w, grid_t, grid_h, grid_w = get_3d_rotary_pos_embed_allegro(
        embed_dim=cfg.attention_head_dim,
        crops_coords=((0, 0), (gh, gw)),
        grid_size=(gh, gw),
        temporal_size=tiny.latent_frames,
        interpolation_scale=(cfg.interpolation_scale_t, cfg.interpolation_scale_h, cfg.interpolation_scale_w),
        device=device,
    )
    pos = torch.cartesian_prod(grid_t.long(), grid_h.long(), grid_w.long())
    pos = pos.reshape(-1, 3).transpose(0, 1).reshape(3, 1, -1).contiguous()
    return {"image_rotary_emb": ((freqs_t, freqs_h, freqs_w), tuple(pos))}


_EXTRA_INPUTS = {
    "hunyuan_video": _hunyuan_extra,
    "ltx_video": _ltx_extra,
    "allegro": _allegro_extra,
}

_WAN_CONFIG = {
    "patch_size": (1, 2, 2),
    "num_attention_heads": _HEADS,
    "attention_head_dim": _HEAD_DIM,
    "in_channels": _CHANNELS,
    "out_channels": _CHANNELS,
    "text_dim": _TEXT_DIM,
    "freq_dim": 32,
    "ffn_dim": 2 * _INNER,
    "num_layers": 4,
    "cross_attn_norm": True,
    "qk_norm": "rms_norm_across_heads",
    "rope_max_seq_len": 32,
}

TINY_MODELS: dict[str, TinyModel] = {
    m.family: m
    for m in (
        TinyModel(
            family="wan",
            class_name="WanTransformer3DModel",
            config=dict(_WAN_CONFIG),
            block_lists=("blocks",),
        ),
        TinyModel(
            family="cogvideox",
            class_name="CogVideoXTransformer3DModel",
            # Sin-cos positions (CogVideoX-2b style); RoPE would have to come from the pipeline.
            config={
                "num_attention_heads": _HEADS,
                "attention_head_dim": _HEAD_DIM,
                "in_channels": _CHANNELS,
                "out_channels": _CHANNELS,
                "time_embed_dim": _INNER,
                "text_embed_dim": _TEXT_DIM,
                "num_layers": 4,
                "sample_width": 16,
                "sample_height": 16,
                "sample_frames": (_FRAMES - 1) * 4 + 1,  # pixel frames before 4x temporal compression
                "patch_size": 2,
                "temporal_compression_ratio": 4,
                "max_text_seq_length": _TEXT_LEN,  # must equal the text length
                "use_rotary_positional_embeddings": False,
            },
            layout="bfchw",
        ),
        TinyModel(
            family="hunyuan_video",
            class_name="HunyuanVideoTransformer3DModel",
            config={
                "in_channels": _CHANNELS,
                "out_channels": _CHANNELS,
                "num_attention_heads": _HEADS,
                "attention_head_dim": _HEAD_DIM,
                "num_layers": 2,
                "num_single_layers": 2,
                "num_refiner_layers": 1,
                "mlp_ratio": 2.0,
                "patch_size": 2,
                "patch_size_t": 1,
                "guidance_embeds": True,
                "text_embed_dim": _TEXT_DIM,
                "pooled_projection_dim": 8,
                "rope_axes_dim": (4, 6, 6),  # sums to attention_head_dim
            },
            block_lists=("transformer_blocks", "single_transformer_blocks"),
            mask_dtype="model",
            pooled_dim=8,
        ),
        TinyModel(
            family="ltx_video",
            class_name="LTXVideoTransformer3DModel",
            config={
                "in_channels": _CHANNELS,
                "out_channels": _CHANNELS,
                "patch_size": 1,
                "patch_size_t": 1,
                "num_attention_heads": _HEADS,
                "attention_head_dim": _HEAD_DIM,
                "cross_attention_dim": _INNER,
                "num_layers": 4,
                "caption_channels": _TEXT_DIM,
            },
            latent_height=8,
            latent_width=8,
            layout="packed",
            mask_dtype="bool",
        ),
        TinyModel(
            family="mochi",
            class_name="MochiTransformer3DModel",
            config={
                "patch_size": 2,
                "num_attention_heads": _HEADS,
                "attention_head_dim": _HEAD_DIM,
                "num_layers": 4,
                "pooled_projection_dim": 16,
                "in_channels": _CHANNELS,
                "text_embed_dim": _TEXT_DIM,  # divisible by the 8 heads of its attention pool
                "time_embed_dim": 16,
                "max_sequence_length": _TEXT_LEN,
            },
            mask_dtype="bool",
            randomize=("pos_frequencies",),  # zeros would make its RoPE the identity
        ),
        TinyModel(
            family="latte",
            class_name="LatteTransformer3DModel",
            config={
                "num_attention_heads": _HEADS,
                "attention_head_dim": _HEAD_DIM,
                "in_channels": _CHANNELS,
                "out_channels": _CHANNELS,  # real Latte predicts 2x channels (learned sigma)
                "num_layers": 2,  # 2 spatial + 2 temporal blocks
                "cross_attention_dim": _INNER,
                "attention_bias": True,
                "sample_size": 16,  # must match latent height/width
                "patch_size": 2,
                "activation_fn": "gelu-approximate",
                "num_embeds_ada_norm": 1000,
                "norm_type": "ada_norm_single",
                "norm_elementwise_affine": False,
                "norm_eps": 1e-6,
                "caption_channels": _TEXT_DIM,
                "video_length": _FRAMES,  # fixed temporal position table: must match latent frames
            },
            block_lists=("transformer_blocks", "temporal_transformer_blocks"),
        ),
        TinyModel(
            family="allegro",
            class_name="AllegroTransformer3DModel",
            config={
                "patch_size": 2,
                "patch_size_t": 1,
                "num_attention_heads": _HEADS,
                "attention_head_dim": 12,  # RoPE splits it in 3 even parts
                "in_channels": _CHANNELS,
                "out_channels": _CHANNELS,
                "num_layers": 4,
                "cross_attention_dim": _HEADS * 12,
                "sample_height": 16,
                "sample_width": 16,
                "sample_frames": _FRAMES,
                "caption_channels": _TEXT_DIM,
            },
            mask_dtype="long",
        ),
        TinyModel(
            family="skyreels_v2",
            class_name="SkyReelsV2Transformer3DModel",
            config=dict(_WAN_CONFIG),
            block_lists=("blocks",),
        ),
    )
}


def tiny_model(family: str) -> TinyModel:
    """The :class:`TinyModel` of ``family``; ValueError listing the known families otherwise."""
    try:
        return TINY_MODELS[family]
    except KeyError:
        raise ValueError(f"unknown model family {family!r}; known families: {', '.join(TINY_MODELS)}") from None


def frames_tokens(tiny: TinyModel, model: torch.nn.Module | None = None) -> tuple[int, int]:
    """(token frames after temporal patching, tokens per frame) for ``tiny``'s example inputs."""
    cfg = dict(tiny.config)
    if model is not None:
        cfg.update(model.config)
    patch = cfg.get("patch_size") or 1
    if isinstance(patch, (tuple, list)):  # Wan-style (t, h, w)
        pt, ph, pw = patch
    else:
        pt, ph, pw = cfg.get("patch_size_t") or 1, patch, patch
    frames = -(-tiny.latent_frames // pt)  # CogVideoX 1.5 rounds up
    return frames, (tiny.latent_height // ph) * (tiny.latent_width // pw)
