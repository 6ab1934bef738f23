"""Group g2 of the tiny zoo: HunyuanVideo 1.5, HunyuanVideo FramePack, Kandinsky 5, Kandinsky 6 (+ SR), Motif-Video.

Every entry builds from a config with random weights and takes its inputs from `make_inputs`, which mirrors what
the class's diffusers pipeline passes in its default mode (shapes, dtypes, optional arguments).  Sample i of a batch
depends only on (seed, i): every per-sample tensor is drawn from its own generator and stacked.
"""

from __future__ import annotations

import torch

from adacache.testing import TinyModel

_HEADS = 2
_HEAD_DIM = 16
_INNER = _HEADS * _HEAD_DIM
_CHANNELS = 4  # latent channels of the denoised video
_TEXT_LEN = 8
_TEXT_DIM = 16
_ROPE_AXES = (4, 6, 6)  # (t, h, w) rotary dims, summing to the head dim


def _generator(seed: int, index: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 1_000_003 + index)


def _batch(sample, batch_size: int, seed: int) -> dict[str, torch.Tensor]:
    """Stack `sample(generator, index) -> {name: tensor}` over the batch, one generator per sample."""
    samples = [sample(_generator(seed, i), i) for i in range(batch_size)]
    return {name: torch.stack([s[name] for s in samples]) for name in samples[0]}


def _valid_tokens(index: int, length: int = _TEXT_LEN) -> torch.Tensor:
    """Text padding as in testing.TinyModel: sample i has its last 2 + (i % 2) tokens padded out."""
    return torch.arange(length) < length - 2 - (index % 2)


def _place(kwargs: dict, model: torch.nn.Module) -> dict:
    """Move to the model's device; floating tensors take the model's dtype (timesteps are added afterwards)."""
    param = next(model.parameters())
    dtype = getattr(model, "dtype", param.dtype)
    return {
        k: (v.to(device=param.device, dtype=dtype) if v.is_floating_point() else v.to(param.device))
        if isinstance(v, torch.Tensor)
        else v
        for k, v in kwargs.items()
    }


def _timestep(model: torch.nn.Module, batch_size: int, timestep: float, model_dtype: bool = False) -> torch.Tensor:
    """float32 (the scheduler's dtype), or the model dtype where the pipeline casts it (HunyuanVideo 1.5 and
    Kandinsky 5 do: HunyuanVideo 1.5 feeds the sinusoid to its MLP in the timestep's dtype)."""
    dtype = model.dtype if model_dtype else torch.float32
    return torch.full((batch_size,), float(timestep), dtype=dtype, device=next(model.parameters()).device)


# ---------------------------------------------------------------------------------------------------------------
# HunyuanVideo 1.5


def _hunyuan_video15_inputs(tiny: TinyModel, model, batch_size: int, timestep: float, seed: int) -> dict:
    # HunyuanVideo15Pipeline (t2v): hidden = [latents | zero condition latents | zero mask] on channels; Qwen tokens
    # with a padding mask (cast to the model dtype); ByT5 glyph tokens (all padded, zeros, when the prompt has no
    # quoted text: here odd samples carry 3 glyph tokens); image_embeds all zeros (which switches the model to t2v).
    cfg = model.config
    f, h, w, c = tiny.latent_frames, tiny.latent_height, tiny.latent_width, tiny.latent_channels
    glyph_len = 6

    def sample(g, i):
        latents = torch.randn(c, f, h, w, generator=g)
        glyph = torch.arange(glyph_len) < (3 if i % 2 else 0)
        return {
            "hidden_states": torch.cat([latents, torch.zeros(c, f, h, w), torch.zeros(1, f, h, w)]),
            "encoder_hidden_states": torch.randn(tiny.text_len, tiny.text_dim, generator=g),
            "encoder_attention_mask": _valid_tokens(i, tiny.text_len).float(),
            "encoder_hidden_states_2": torch.randn(glyph_len, cfg.text_embed_2_dim, generator=g) * glyph[:, None],
            "encoder_attention_mask_2": glyph.float(),
            "image_embeds": torch.zeros(4, cfg.image_embed_dim),
        }

    kwargs = _place(_batch(sample, batch_size, seed), model)
    kwargs["timestep"] = _timestep(model, batch_size, timestep, model_dtype=True)
    return kwargs


# ---------------------------------------------------------------------------------------------------------------
# HunyuanVideo FramePack

_FRAMEPACK_HISTORY = (1, 2, 16)  # 1x / 2x / 4x history frames (inverted anti-drifting sampling)


def _framepack_inputs(tiny: TinyModel, model, batch_size: int, timestep: float, seed: int) -> dict:
    # HunyuanVideoFramepackPipeline (image-to-video only; default inverted anti-drifting sampling), first section
    # (latent_padding 0): the start image latent + the 1x history form latents_clean, the 2x/4x history latents are
    # zeros (nothing generated yet); frame indices are 1-D and shared by the batch.
    cfg = model.config
    f, h, w, c = tiny.latent_frames, tiny.latent_height, tiny.latent_width, tiny.latent_channels
    n1, n2, n4 = _FRAMEPACK_HISTORY
    indices = torch.arange(0, 1 + f + n1 + n2 + n4)
    prefix, latent_idx, idx_1x, idx_2x, idx_4x = indices.split([1, f, n1, n2, n4])

    def sample(g, i):
        return {
            "hidden_states": torch.randn(c, f, h, w, generator=g),
            "encoder_hidden_states": torch.randn(tiny.text_len, tiny.text_dim, generator=g),
            "encoder_attention_mask": _valid_tokens(i, tiny.text_len).float(),
            "pooled_projections": torch.randn(cfg.pooled_projection_dim, generator=g),
            "image_embeds": torch.randn(4, cfg.image_proj_dim, generator=g),  # SigLIP tokens of the start image
            "latents_clean": torch.cat([torch.randn(c, 1, h, w, generator=g), torch.zeros(c, n1, h, w)], dim=1),
            "latents_history_2x": torch.zeros(c, n2, h, w),
            "latents_history_4x": torch.zeros(c, n4, h, w),
        }

    kwargs = _place(_batch(sample, batch_size, seed), model)
    kwargs.update(
        timestep=_timestep(model, batch_size, timestep),
        indices_latents=latent_idx,
        indices_latents_clean=torch.cat([prefix, idx_1x]),
        indices_latents_history_2x=idx_2x,
        indices_latents_history_4x=idx_4x,
        # guidance-distilled: the pipeline passes guidance_scale (default 6.0) * 1000 in the model dtype
        guidance=torch.full((batch_size,), 6000.0, dtype=model.dtype),
    )
    return kwargs


# ---------------------------------------------------------------------------------------------------------------
# Kandinsky 5


def _kandinsky5_inputs(tiny: TinyModel, model, batch_size: int, timestep: float, seed: int) -> dict:
    # Kandinsky5T2VPipeline: latents (B, F, H, W, C), with visual_cond [latents | zeros | zero mask] on the last dim;
    # Qwen tokens without a mask (the pipeline pads a batch to its longest prompt and the model attends to the
    # padding, so every sample here has the full text length), CLIP pooled embedding, RoPE positions, and the
    # resolution-dependent RoPE scale factor (below 480p: (1, 3.16, 3.16)); regular attention (sparse_params None).
    cfg = model.config
    f, h, w, c = tiny.latent_frames, tiny.latent_height, tiny.latent_width, tiny.latent_channels
    _, ph, pw = cfg.patch_size

    def sample(g, i):
        latents = torch.randn(f, h, w, c, generator=g)
        if cfg.visual_cond:
            latents = torch.cat([latents, torch.zeros(f, h, w, c), torch.zeros(f, h, w, 1)], dim=-1)
        return {
            "hidden_states": latents,
            "encoder_hidden_states": torch.randn(tiny.text_len, tiny.text_dim, generator=g),
            "pooled_projections": torch.randn(cfg.in_text_dim2, generator=g),
        }

    kwargs = _place(_batch(sample, batch_size, seed), model)
    device = kwargs["hidden_states"].device
    kwargs.update(
        timestep=_timestep(model, batch_size, timestep, model_dtype=True),
        visual_rope_pos=[
            torch.arange(f, device=device),
            torch.arange(h // ph, device=device),
            torch.arange(w // pw, device=device),
        ],
        text_rope_pos=torch.arange(tiny.text_len, device=device),
        scale_factor=(1, 3.16, 3.16),
        sparse_params=None,
    )
    return kwargs


def _kandinsky5_randomize(config: dict) -> tuple[str, ...]:
    # Kandinsky5Modulation zero-initialises its projection: every block would be the identity.
    names = ["out_layer.modulation.out_layer"]
    names += [f"text_transformer_blocks.{i}.text_modulation.out_layer" for i in range(config["num_text_blocks"])]
    names += [
        f"visual_transformer_blocks.{i}.visual_modulation.out_layer" for i in range(config["num_visual_blocks"])
    ]
    return tuple(f"{n}.{p}" for n in names for p in ("weight", "bias"))


# ---------------------------------------------------------------------------------------------------------------
# Kandinsky 6

_AUDIO_LEN = 12


def _kandinsky6_inputs(tiny: TinyModel, model, batch_size: int, timestep: float, seed: int) -> dict:
    # Kandinsky6TI2VAPipeline, text-to-video-and-audio (its default: sample_audio=True, no image): video latents
    # (B, F, H, W, C) with [latents | zero condition | zero mask], audio latents (B, A, C_audio), Qwen tokens with a
    # boolean padding mask, CLIP pooled embedding; visual_rope_pos / visual_token_type_ids None (image mode only).
    cfg = model.config
    f, h, w, c = tiny.latent_frames, tiny.latent_height, tiny.latent_width, tiny.latent_channels

    def sample(g, i):
        latents = torch.randn(f, h, w, c, generator=g)
        if cfg.visual_cond:
            latents = torch.cat([latents, torch.zeros(f, h, w, c), torch.zeros(f, h, w, 1)], dim=-1)
        return {
            "hidden_states": latents,
            "audio_hidden_states": torch.randn(_AUDIO_LEN, cfg.in_audio_dim, generator=g),
            "encoder_hidden_states": torch.randn(tiny.text_len, tiny.text_dim, generator=g),
            "pooled_projections": torch.randn(cfg.in_text_dim2, generator=g),
            "encoder_attention_mask": _valid_tokens(i, tiny.text_len),
        }

    kwargs = _place(_batch(sample, batch_size, seed), model)
    kwargs["timestep"] = _timestep(model, batch_size, timestep)
    return kwargs


def _kandinsky6_sr_inputs(tiny: TinyModel, model, batch_size: int, timestep: float, seed: int) -> dict:
    # Kandinsky6SRPipeline: a latent tile (B, F, H, W, C) = [noisy latent | zero anchor | zero anchor mask]; no text.
    f, h, w, c = tiny.latent_frames, tiny.latent_height, tiny.latent_width, tiny.latent_channels

    def sample(g, i):
        latents = torch.randn(f, h, w, c, generator=g)
        return {"hidden_states": torch.cat([latents, torch.zeros(f, h, w, c), torch.zeros(f, h, w, 1)], dim=-1)}

    kwargs = _place(_batch(sample, batch_size, seed), model)
    kwargs["timestep"] = _timestep(model, batch_size, timestep)
    return kwargs


# ---------------------------------------------------------------------------------------------------------------
# Motif-Video


def _motif_inputs(tiny: TinyModel, model, batch_size: int, timestep: float, seed: int) -> dict:
    # MotifVideoPipeline (t2v): hidden = [latents | zero condition latents | zero mask] on channels, T5Gemma tokens
    # with a boolean padding mask; no image_embeds.
    f, h, w, c = tiny.latent_frames, tiny.latent_height, tiny.latent_width, tiny.latent_channels

    def sample(g, i):
        latents = torch.randn(c, f, h, w, generator=g)
        return {
            "hidden_states": torch.cat([latents, torch.zeros(c, f, h, w), torch.zeros(1, f, h, w)]),
            "encoder_hidden_states": torch.randn(tiny.text_len, tiny.text_dim, generator=g),
            "encoder_attention_mask": _valid_tokens(i, tiny.text_len),
        }

    kwargs = _place(_batch(sample, batch_size, seed), model)
    kwargs["timestep"] = _timestep(model, batch_size, timestep)
    return kwargs


# ---------------------------------------------------------------------------------------------------------------

_KANDINSKY5_CONFIG = {
    "in_visual_dim": _CHANNELS,
    "in_text_dim": _TEXT_DIM,
    "in_text_dim2": _TEXT_DIM,
    "time_dim": _INNER,
    "out_visual_dim": _CHANNELS,
    "patch_size": (1, 2, 2),
    "model_dim": _INNER,
    "ff_dim": 2 * _INNER,
    "num_text_blocks": 2,
    "num_visual_blocks": 4,
    "axes_dims": _ROPE_AXES,  # head dim = sum(axes_dims) = 16, so 2 heads
    "visual_cond": True,
    "attention_type": "regular",
}

ENTRIES: list[TinyModel] = [
    TinyModel(
        family="hunyuan_video15",
        class_name="HunyuanVideo15Transformer3DModel",
        config={
            "in_channels": 2 * _CHANNELS + 1,  # latents | condition latents | condition mask
            "out_channels": _CHANNELS,
            "num_attention_heads": _HEADS,
            "attention_head_dim": _HEAD_DIM,
            "num_layers": 4,
            "num_refiner_layers": 1,
            "mlp_ratio": 2.0,
            "patch_size": 1,
            "patch_size_t": 1,
            "qk_norm": "rms_norm",
            "text_embed_dim": _TEXT_DIM,
            "text_embed_2_dim": 16,  # ByT5 projection has a fixed 2048-wide hidden layer (~4.3M of the params)
            "image_embed_dim": 16,
            "rope_axes_dim": _ROPE_AXES,
            "task_type": "t2v",
            "use_meanflow": False,
        },
        latent_height=8,
        latent_width=8,
        block_lists=("transformer_blocks",),
        make_inputs=_hunyuan_video15_inputs,
        notes=(
            "hidden_states (B, 2C+1, F, H, W) = [latents | condition latents | condition mask] (zeros in t2v); "
            "output (B, C, F, H, W). Dual-stream blocks block(hidden_states, encoder_hidden_states, temb, "
            "attention_mask, freqs_cis) -> (video, text); video tokens (B, F*H*W, D) frame-major (patch_size 1). "
            "The text stream is [image tokens, ByT5 tokens, Qwen tokens] with valid tokens first per sample, "
            "built once before the blocks; the mask gates both queries and keys. Self-attention: block.attn "
            "(returns a (video, text) tuple). Nothing happens between blocks."
        ),
    ),
    TinyModel(
        family="hunyuan_video_framepack",
        class_name="HunyuanVideoFramepackTransformer3DModel",
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
            "qk_norm": "rms_norm",
            "guidance_embeds": True,
            "text_embed_dim": _TEXT_DIM,
            "pooled_projection_dim": 8,
            "rope_axes_dim": _ROPE_AXES,
            "image_condition_type": None,
            "has_image_proj": True,  # forward always projects image_embeds
            "image_proj_dim": 16,
            "has_clean_x_embedder": True,  # forward always embeds the history latents
        },
        latent_frames=3,  # latent_window_size (pipeline default 9)
        block_lists=("transformer_blocks", "single_transformer_blocks"),
        make_inputs=_framepack_inputs,
        notes=(
            "The video stream the blocks see is [4x history | 2x history | clean latents | noisy latents] "
            "(16 + 16 + 128 + 192 tokens here), concatenated once before the blocks; only the last F*H*W/4 tokens "
            "(the noisy window, frame-major) reach the output. Both lists: block(hidden_states, "
            "encoder_hidden_states, temb, attention_mask, image_rotary_emb) -> (video, text); single blocks "
            "concatenate text internally and split it back. Text = [SigLIP image tokens, LLaMA tokens]; at batch 1 "
            "the text is cut to its valid length and no mask is used, at batch > 1 a key mask is used. "
            "Self-attention: block.attn (tuple (video, text)). No pipeline mode without an image."
        ),
    ),
    TinyModel(
        family="kandinsky5",
        class_name="Kandinsky5Transformer3DModel",
        config=dict(_KANDINSKY5_CONFIG),
        layout="bfhwc",
        block_lists=("visual_transformer_blocks",),
        randomize=_kandinsky5_randomize(_KANDINSKY5_CONFIG),
        make_inputs=_kandinsky5_inputs,
        notes=(
            "hidden_states (B, F, H, W, 2C+1) channels-last = [latents | condition | mask]; output (B, F, H, W, C) "
            "returned bare (not a tuple) when return_dict=False. text_transformer_blocks (2) run first on the "
            "text tokens only (block(x, time_embed, rope) -> tensor) and are not listed: they never see video. "
            "Visual blocks: block(visual_embed, text_embed, time_embed, rope, sparse_params) -> tensor, video "
            "tokens (B, F*H'*W', D) frame-major (with nabla attention, sparse_params['to_fractal'], tokens are in "
            "8x8 local blocks instead). Self-attention: block.self_attention (tensor); text via cross_attention. "
            "No text mask: padding tokens are attended. Modulations are zero-initialised (randomized here). "
            "Its RoPE rounds q/k to bfloat16 even in a float32 model."
        ),
    ),
    TinyModel(
        family="kandinsky6",
        class_name="Kandinsky6Transformer3DModel",
        config={
            "in_visual_dim": _CHANNELS,
            "out_visual_dim": _CHANNELS,
            "in_text_dim": _TEXT_DIM,
            "in_text_dim2": _TEXT_DIM,
            "time_dim": _INNER,
            "patch_size": (1, 2, 2),
            "model_dim": _INNER,
            "ff_dim": 2 * _INNER,
            "num_text_blocks": 1,
            "num_visual_blocks": 4,
            "axes_dims": _ROPE_AXES,
            "visual_cond": True,
            "in_audio_dim": 4,
            "out_audio_dim": 4,
            "scale_factor": (1.0, 2.0, 2.0),
            # as in the released checkpoints
            "text_token_padding": True,
            "ca_rope": True,
            "cross_gates": True,
            "fix_modulation": True,
            "visual_token_type_num_embeddings": 2,
        },
        layout="bfhwc",
        block_lists=("visual_transformer_blocks",),
        make_inputs=_kandinsky6_inputs,
        notes=(
            "Video + audio: hidden_states (B, F, H, W, 2C+1) channels-last, audio_hidden_states (B, A, C_a); "
            "output tuple (video (B, F, H, W, C), audio (B, A, C_a)). video_text_transformer_blocks and "
            "audio_text_transformer_blocks (text only) run first and are not listed. Fused blocks: "
            "block(vis, aud, text_v, text_a, (temb_v, temb_a), vis_rope, aud_rope, mask) -> (vis, aud): the video "
            "tokens are the first positional argument (named vis, not hidden_states), (B, F*H'*W', D) frame-major; "
            "audio tokens are a separate stream exchanged by cross-attention (va/av_cross_attention). "
            "Self-attention over video: block.video_dec_block.self_attention (tensor). Without audio the block "
            "runs its video path only."
        ),
    ),
    TinyModel(
        family="kandinsky6_sr",
        class_name="Kandinsky6SRTransformer3DModel",
        config={
            "in_visual_dim": _CHANNELS,
            "out_visual_dim": _CHANNELS,  # plain velocity head (PiFlow checkpoints widen it)
            "time_dim": _INNER,
            "patch_size": (1, 1, 1),
            "model_dim": _INNER,
            "ff_dim": 2 * _INNER,
            "num_visual_blocks": 4,
            "axes_dims": _ROPE_AXES,
            "scale_factor": (1.0, 2.0, 2.0),
            "nabla_threshold": 0.8,
            "nabla_window": (11, 7, 7),
        },
        latent_height=8,  # the token grid must be a multiple of 8 (NABLA blocks of 8x8 tokens)
        latent_width=8,
        layout="bfhwc",
        block_lists=("visual_transformer_blocks",),
        randomize=("pooled_bias",),  # the folded empty-caption embedding (zeros at init)
        make_inputs=_kandinsky6_sr_inputs,
        notes=(
            "Super-resolution, no text. hidden_states (B, F, H, W, 2C+1) channels-last = [latent | anchor | "
            "anchor mask]; output (B, F, H, W, C). Blocks: block(hidden_states, temb, rotary_emb, sparse_params) "
            "-> tensor. Tokens are reordered into 8x8 local blocks per frame before the blocks (frame-major, "
            "but within a frame block-major, not row-major; with an 8x8 grid that is row-major). Self-attention: "
            "block.self_attention (tensor), NABLA sparse attention hard-wired to the flex backend. Uncompiled, "
            "torch runs flex attention through an internal torch.compile(backend='eager'): the first forward of a "
            "process pays ~1.5-3 s of imports and Dynamo tracing, each new input shape ~1 s of retracing; steady "
            "state is ~0.1 s here (check_entry times the first call, so it reports > 1 s)."
        ),
    ),
    TinyModel(
        family="motif_video",
        class_name="MotifVideoTransformer3DModel",
        config={
            "in_channels": 2 * _CHANNELS + 1,
            "out_channels": _CHANNELS,
            "num_attention_heads": _HEADS,
            "attention_head_dim": _HEAD_DIM,
            "num_layers": 2,
            "num_single_layers": 4,
            "num_decoder_layers": 2,  # the last 2 single blocks are the DDT decoder
            "mlp_ratio": 2.0,
            "patch_size": 2,
            "patch_size_t": 1,
            "qk_norm": "rms_norm",
            "norm_type": "layer_norm",
            "text_embed_dim": _TEXT_DIM,
            "rope_axes_dim": _ROPE_AXES,
            "enable_text_cross_attention_dual": True,
            "enable_text_cross_attention_single": True,
        },
        block_lists=("transformer_blocks", "single_transformer_blocks"),
        make_inputs=_motif_inputs,
        notes=(
            "hidden_states (B, 2C+1, F, H, W) = [latents | condition | mask]; output (B, C, F, H, W). "
            "Blocks: block(hidden_states, encoder_hidden_states, temb, attention_mask, rope, image_embed_seq_len) "
            "-> (video, text). The last num_decoder_layers single blocks are a decoder: their hidden_states is a "
            "copy of the patch embeddings taken before any block, and their encoder_hidden_states is the video "
            "output of the encoder blocks (no text, no mask); the decoder output is what reaches norm_out. "
            "Self-attention: block.attn (tuple (video, text) when given text); shared text cross-attention "
            "block.cross_attn."
        ),
    ),
]

EXCLUDED: dict[str, str] = {}
