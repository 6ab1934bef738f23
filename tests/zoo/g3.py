"""Tiny zoo entries, group g3: LTX-2 (and the SANA-WM refiner built on it), Sana-Video, SANA-WM, Cosmos 1.0 and
Cosmos 3 Omni.

Every entry mirrors how its diffusers pipeline calls the transformer (shapes, dtypes, which optional arguments are
passed); the notes of each entry say which pipeline and mode, and what a reader of the model must know.
"""

from __future__ import annotations

import torch

from adacache.testing import TinyModel

__all__ = ["ENTRIES", "EXCLUDED"]

# Shared tiny sizes (as in adacache.testing): 2 heads x 16 dims, 4 latent channels, 8 text tokens of width 16.
_HEADS = 2
_HEAD_DIM = 16
_INNER = _HEADS * _HEAD_DIM
_CHANNELS = 4
_TEXT_LEN = 8
_TEXT_DIM = 16


def _generator(seed: int, index: int, stream: int = 0) -> torch.Generator:
    # Sample `index` depends on (seed, index) only; `stream` separates the inputs drawn for one sample.
    return torch.Generator().manual_seed(seed * 1_000_003 + index + stream * 7_919)


def _model_dtype_device(model: torch.nn.Module) -> tuple[torch.dtype, torch.device]:
    param = next(model.parameters())
    return getattr(model, "dtype", param.dtype), param.device


def _padded_text_mask(batch_size: int, text_len: int, dtype: torch.dtype) -> torch.Tensor:
    # Sample i has its last 2 + (i % 2) text tokens padded out (right padding, as the tokenizers do).
    valid = torch.tensor([text_len - 2 - (i % 2) for i in range(batch_size)])
    return (torch.arange(text_len)[None, :] < valid[:, None]).to(dtype)


# ----------------------------------------------------------------------------------------------------------------
# LTX-2 (audio + video)
# ----------------------------------------------------------------------------------------------------------------

_LTX2_AUDIO_CHANNELS = 2  # audio VAE latent channels (real: 8)
_LTX2_AUDIO_MEL_BINS = 4  # latent mel bins (real: 64 mel bins / 4 = 16); packed width = channels * mel bins
_LTX2_FPS = 24.0  # LTX2Pipeline's default frame_rate

_LTX2_CONFIG = {
    "in_channels": _CHANNELS,
    "out_channels": _CHANNELS,
    "patch_size": 1,
    "patch_size_t": 1,
    "num_attention_heads": _HEADS,
    "attention_head_dim": _HEAD_DIM,
    "cross_attention_dim": _INNER,  # must equal the inner dim (captions are projected to it)
    "audio_in_channels": _LTX2_AUDIO_CHANNELS * _LTX2_AUDIO_MEL_BINS,
    "audio_out_channels": _LTX2_AUDIO_CHANNELS * _LTX2_AUDIO_MEL_BINS,
    "audio_num_attention_heads": _HEADS,
    "audio_attention_head_dim": 8,
    "audio_cross_attention_dim": _HEADS * 8,  # must equal the audio inner dim
    "num_layers": 2,
    "caption_channels": _TEXT_DIM,
}


def _ltx2_audio_frames(latent_frames: int, fps: float = _LTX2_FPS) -> int:
    # LTX2Pipeline: pixel frames = 8 * (latent frames - 1) + 1; audio latents per second = 16000 / 160 / 4 = 25.
    return round((8 * (latent_frames - 1) + 1) / fps * 25.0)


def _ltx2_inputs(tiny: TinyModel, model, batch_size: int, timestep: float, seed: int) -> dict:
    dtype, device = _model_dtype_device(model)
    cfg = model.config
    f, h, w = tiny.latent_frames, tiny.latent_height, tiny.latent_width
    audio_frames = _ltx2_audio_frames(f)
    samples = []
    for i in range(batch_size):
        g = _generator(seed, i)
        samples.append(
            (
                torch.randn(f * h * w, cfg.in_channels, generator=g),  # packed video latents, frame-major
                torch.randn(audio_frames, cfg.audio_in_channels, generator=g),  # packed audio latents
                torch.randn(tiny.text_len, cfg.caption_channels, generator=g),  # connector video prompt embeds
                torch.randn(tiny.text_len, cfg.caption_channels, generator=g),  # connector audio prompt embeds
            )
        )
    video, audio, text, audio_text = (torch.stack(s).to(device, dtype) for s in zip(*samples))
    t = torch.full((batch_size,), float(timestep), device=device)
    # The connectors replace padding with learned registers and return an all-ones binary mask.
    mask = torch.ones(batch_size, tiny.text_len, dtype=torch.long, device=device)
    return {
        "hidden_states": video,
        "audio_hidden_states": audio,
        "encoder_hidden_states": text,
        "audio_encoder_hidden_states": audio_text,
        "timestep": t,
        "sigma": t,  # the pipeline passes sigma=timestep (read only by LTX-2.3 prompt modulation)
        "encoder_attention_mask": mask,
        "audio_encoder_attention_mask": mask,
        "num_frames": f,
        "height": h,
        "width": w,
        "fps": _LTX2_FPS,
        "audio_num_frames": audio_frames,
        "isolate_modalities": False,
        "use_cross_timestep": False,
    }


# ----------------------------------------------------------------------------------------------------------------
# SANA-WM stage-2 refiner (LTX-2 architecture, video stream only, sliding-window KV cache)
# ----------------------------------------------------------------------------------------------------------------

_REFINER_FPS = 16.0  # SanaWMPipeline's default fps, handed to the refiner
_REFINER_SINK = 1  # SanaWMRefinerPipeline's default sink_size (latent frames)


def _refiner_inputs(tiny: TinyModel, model, batch_size: int, timestep: float, seed: int) -> dict:
    from diffusers.models.transformers.transformer_sana_wm_refiner import SanaWMRefinerKVCache

    dtype, device = _model_dtype_device(model)
    cfg = model.config
    f, h, w = tiny.latent_frames, tiny.latent_height, tiny.latent_width
    inner = cfg.num_attention_heads * cfg.attention_head_dim
    sink_tokens = _REFINER_SINK * h * w
    layers = len(model.transformer_blocks)
    samples = []
    for i in range(batch_size):
        g = _generator(seed, i)
        samples.append(
            (
                torch.randn(f * h * w, cfg.in_channels, generator=g),  # active AR block, packed frame-major
                torch.randn(tiny.text_len, cfg.caption_channels, generator=g),  # connector prompt embeds
                # Per layer: pre-RoPE (post q/k-norm, so unit RMS) sink keys and sink values.
                torch.randn(layers, 2, sink_tokens, inner, generator=g),
            )
        )
    video, text, sink = (torch.stack(s).to(device, dtype) for s in zip(*samples))
    # First AR block after the sink: frames [sink, sink + block); the sink RoPE sits at offset 0.
    frames = list(range(_REFINER_SINK, _REFINER_SINK + f))
    cache = SanaWMRefinerKVCache(layers)
    cache.sink_pe = model.build_rotary_emb_for_absolute_positions(
        batch_size=batch_size, frame_positions=list(range(_REFINER_SINK)), height=h, width=w, device=device,
        fps=_REFINER_FPS,
    )
    for layer in range(layers):
        cache.get(layer).store_sink(sink[:, layer, 0], sink[:, layer, 1])
    rope = model.build_rotary_emb_for_absolute_positions(
        batch_size=batch_size, frame_positions=frames, height=h, width=w, device=device, fps=_REFINER_FPS
    )
    return {
        "hidden_states": video,
        "encoder_hidden_states": text,
        # Per-token timestep (batch, tokens): sigma * timestep_scale_multiplier, the same for every active token.
        "timestep": torch.full((batch_size, f * h * w), float(timestep), device=device),
        "video_rotary_emb": rope,
        "encoder_attention_mask": torch.ones(batch_size, tiny.text_len, dtype=torch.long, device=device),
        "kv_cache": cache,
        "kv_cache_mode": "inject",
    }


# ----------------------------------------------------------------------------------------------------------------
# SANA-WM stage 1 (camera-controlled, bidirectional GDN + softmax attention)
# ----------------------------------------------------------------------------------------------------------------

_SANA_WM_VAE_STRIDE = (8, 32, 32)  # LTX-2 VAE: temporal 8, spatial 32


def _sana_wm_camera(index: int, latent_frames: int, height: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(raymap (T, 20), chunk_plucker (48, T, H, W)) for a WASD trajectory, via the pipeline's own camera packing."""
    import numpy as np
    from diffusers.pipelines.sana_wm.cam_utils import action_string_to_c2w, prepare_camera

    pixel_frames = _SANA_WM_VAE_STRIDE[0] * (latent_frames - 1) + 1
    # Sample i walks forward (even i) or walks while turning left (odd i).
    action = f"w-{pixel_frames - 1}" if index % 2 == 0 else f"jw-{pixel_frames - 1}"
    c2w = action_string_to_c2w(action)
    ph, pw = height * _SANA_WM_VAE_STRIDE[1], width * _SANA_WM_VAE_STRIDE[2]
    intrinsics = np.broadcast_to(np.array([0.8 * pw, 0.8 * ph, pw / 2, ph / 2], dtype=np.float32), (pixel_frames, 4))
    cam = prepare_camera(c2w, intrinsics.copy(), target_size=(ph, pw), vae_stride=_SANA_WM_VAE_STRIDE)
    return cam["raymap"], cam["chunk_plucker"]


def _sana_wm_inputs(tiny: TinyModel, model, batch_size: int, timestep: float, seed: int) -> dict:
    dtype, device = _model_dtype_device(model)
    cfg = model.config
    f, h, w = tiny.latent_frames, tiny.latent_height, tiny.latent_width
    samples = []
    for i in range(batch_size):
        g = _generator(seed, i)
        raymap, plucker = _sana_wm_camera(i, f, h, w)
        samples.append(
            (
                torch.randn(cfg.in_channels, f, h, w, generator=g),
                torch.randn(1, tiny.text_len, cfg.caption_channels, generator=g),  # (1, L, D) per sample
                raymap,
                plucker,
            )
        )
    video, text, raymap, plucker = (torch.stack(s).to(device, dtype) for s in zip(*samples))
    # Per-frame timesteps (B, 1, T); the first latent frame is the clean image anchor, pinned to t = 0.
    t = torch.full((batch_size, 1, f), float(timestep), device=device)
    t[:, :, 0] = 0.0
    return {
        "hidden_states": video,
        "timestep": t,
        "encoder_hidden_states": text,
        "mask": _padded_text_mask(batch_size, tiny.text_len, torch.long).to(device),
        "camera_conditions": raymap,
        "chunk_plucker": plucker,
    }


# ----------------------------------------------------------------------------------------------------------------
# Cosmos 1.0 (Text2World)
# ----------------------------------------------------------------------------------------------------------------


def _cosmos_extra(tiny: TinyModel, model, batch_size: int, dtype, device) -> dict:
    return {"fps": 30}  # CosmosTextToWorldPipeline's default fps (drives the temporal RoPE scaling)


# ----------------------------------------------------------------------------------------------------------------
# Cosmos 3 Omni (packed, unbatched, text + video in one sequence)
# ----------------------------------------------------------------------------------------------------------------

_COSMOS3_FPS = 24.0  # Cosmos3OmniPipeline's default fps
_COSMOS3_VAE_T = 4  # temporal compression of the Wan 2.2 VAE the pipeline uses


def _cosmos3_mrope_ids(
    cfg, text_len: int, frames: int, grid_h: int, grid_w: int, fps: float
) -> torch.Tensor:
    """(3, text_len + frames * grid_h * grid_w) mRoPE position ids, laid out as Cosmos3OmniPipeline does.

    Text tokens: the same increasing position on all three axes. Vision tokens: (t, h, w) grid positions, t offset
    past the text by unified_3d_mrope_temporal_modality_margin and (with fps modulation) rescaled to base_fps.
    """
    text = torch.arange(text_len, dtype=torch.float32)
    offset = text_len + cfg.unified_3d_mrope_temporal_modality_margin
    t = torch.arange(frames, dtype=torch.float32)
    if cfg.enable_fps_modulation and frames > 1:
        # tokens per second = fps / temporal compression, rescaled to the base frame rate's.
        t = t / (fps / _COSMOS3_VAE_T) * (cfg.base_fps / _COSMOS3_VAE_T)
    t = t + offset
    h = torch.arange(grid_h, dtype=torch.float32)
    w = torch.arange(grid_w, dtype=torch.float32)
    if not cfg.unified_3d_mrope_reset_spatial_ids:
        h, w = h + int(offset), w + int(offset)
    grid = torch.stack(torch.meshgrid(t, h, w, indexing="ij")).flatten(1)
    ids = torch.cat([text.expand(3, -1), grid], dim=1)
    # Without fps modulation the pipeline builds integer ids (same values).
    return ids if cfg.enable_fps_modulation else ids.long()


def _cosmos3_inputs(tiny: TinyModel, model, batch_size: int, timestep: float, seed: int) -> dict:
    if batch_size != 1:
        raise NotImplementedError(
            "Cosmos3OmniTransformer has no batch dimension: one forward runs one packed sequence (the pipeline runs "
            "the conditional and unconditional passes as two calls); packing two samples into one sequence would "
            "make them attend to each other."
        )
    _, device = _model_dtype_device(model)
    dtype = model.proj_in.weight.dtype
    cfg = model.config
    f, h, w = tiny.latent_frames, tiny.latent_height, tiny.latent_width
    p = cfg.latent_patch_size
    g = _generator(seed, 0)
    input_ids = torch.randint(0, cfg.vocab_size, (tiny.text_len,), generator=g)
    latents = torch.randn(1, cfg.latent_channel, f, h, w, generator=g)
    # Text segment: a causal prefix of und_len tokens. Vision segment, text-to-video: no conditioning frame,
    # every latent frame noisy (Cosmos3OmniPipeline._prepare_text_segment / _prepare_vision_segment).
    und_len = tiny.text_len
    ph, pw = -(-h // p), -(-w // p)
    num_vision = f * ph * pw
    position_ids = _cosmos3_mrope_ids(cfg, und_len, f, ph, pw, _COSMOS3_FPS)
    vision_indexes = torch.arange(und_len, und_len + num_vision, dtype=torch.long)
    return {
        "input_ids": input_ids.to(device),
        "text_indexes": torch.arange(und_len, dtype=torch.long, device=device),
        "position_ids": position_ids.to(device),
        "und_len": und_len,
        "sequence_length": und_len + num_vision,
        "vision_tokens": [latents.to(device, dtype)],
        "vision_token_shapes": [(f, ph, pw)],
        "vision_sequence_indexes": vision_indexes.to(device),
        "vision_mse_loss_indexes": vision_indexes.to(device),
        # The pipeline passes the scheduler timestep (0..1000); the model scales it by timestep_scale = 0.001.
        "vision_timesteps": torch.full((num_vision,), float(timestep), device=device),
        "vision_noisy_frame_indexes": [torch.arange(f, dtype=torch.long, device=device)],
    }


# ----------------------------------------------------------------------------------------------------------------
# Entries
# ----------------------------------------------------------------------------------------------------------------

ENTRIES: list[TinyModel] = [
    TinyModel(
        family="ltx2",
        class_name="LTX2VideoTransformer3DModel",
        config=dict(_LTX2_CONFIG),
        latent_frames=4,
        latent_height=8,
        latent_width=8,
        layout="packed",
        block_lists=("transformer_blocks",),
        mask_dtype="long",
        make_inputs=_ltx2_inputs,
        notes=(
            "LTX2Pipeline (text-to-audio+video). Audio-video model: every block runs video and audio streams side "
            "by side. Block call: block(hidden_states=video (B, F*H*W, C) frame-major, audio_hidden_states=(B, A, "
            "Ca), encoder_hidden_states=video text (B, L, C), audio_encoder_hidden_states, temb, temb_audio, "
            "cross-attn modulation, RoPE tuples, masks, ...) -> tuple (video, audio): index 0 = video tokens, "
            "index 1 = audio tokens; text is NOT returned (kept fixed across blocks). Inside a block: attn1 video "
            "self-attn (RoPE), audio_attn1, attn2 video-text cross-attn, audio_attn2, audio_to_video_attn "
            "(Q video, KV audio) and video_to_audio_attn (Q audio, KV video), ff, audio_ff: the video output of a "
            "block depends on the audio tokens and vice versa, so caching the video stream of a block while the "
            "audio stream runs on (or the other way round) changes the other modality's input. Nothing happens "
            "between blocks. Output: (video (B, F*H*W, C), audio (B, A, Ca)). hidden_states is already packed: "
            "tokens are frame-major (f, h, w), patch_size/patch_size_t are 1 in all checkpoints. timestep is (B,) "
            "(scheduler timestep, sigma*1000) and sigma=timestep is passed as the pipeline does; audio_timestep "
            "defaults to timestep. The connectors (not part of the transformer) turn the text padding into learned "
            "registers and pass an all-ones mask; here the connector outputs are random. The pipeline passes "
            "video_coords/audio_coords precomputed with model.rope.prepare_video_coords / "
            "audio_rope.prepare_audio_coords; passing num_frames/height/width/fps/audio_num_frames instead makes "
            "the forward compute the same coordinates. CFG is batched ([uncond, cond]). Attention modules return "
            "a bare tensor."
        ),
    ),
    TinyModel(
        family="sana_wm_ltx2_refiner",
        class_name="SanaWMLTX2RefinerTransformer3DModel",
        config=dict(_LTX2_CONFIG),
        latent_frames=3,  # SanaWMRefinerPipeline's block_size: 3 latent frames per AR block
        latent_height=8,
        latent_width=8,
        layout="packed",
        block_lists=("transformer_blocks",),
        mask_dtype="long",
        make_inputs=_refiner_inputs,
        notes=(
            "SANA-WM stage-2 refiner (SanaWMRefinerPipeline, denoising steps of the first AR block). Same "
            "parameters as LTX2VideoTransformer3DModel (audio modules exist but are never run); forward runs the "
            "video stream only. Block call: block(hidden_states=(B, N, C), encoder_hidden_states, temb, "
            "video_rotary_emb, encoder_attention_mask, sink_rotary_emb, kv_cache=<per-layer cache>, "
            "kv_cache_mode) -> bare tensor. Text is a separate encoder_hidden_states, not returned. Nothing "
            "between blocks. The forward takes only the active AR block (3 latent frames, packed frame-major) and "
            "its RoPE (video_rotary_emb, built by model.build_rotary_emb_for_absolute_positions for the absolute "
            "frame indices); attn1's processor (SanaWMLTX2RefinerAttnProcessor) attends to [sink K/V + history K/V "
            "+ current K/V] held in a SanaWMRefinerKVCache passed as kv_cache with kv_cache_mode='inject'. Here "
            "the cache holds a 1-frame sink of random pre-RoPE K/V (the pipeline captures it from the stage-1 "
            "latents at sigma 0 with kv_cache_mode='capture_pre_rope') and no history; kv_cache_mode None would "
            "be plain self-attention over the block. In the capture modes the blocks WRITE to the cache (state "
            "across calls). timestep is per token, (B, N). The whole refinement runs 3 Euler steps per AR block "
            "(distilled sigmas), so step-to-step caching has little room. attn1 returns a bare tensor."
        ),
    ),
    TinyModel(
        family="sana_video",
        class_name="SanaVideoTransformer3DModel",
        config={
            "in_channels": _CHANNELS,
            "out_channels": _CHANNELS,
            "num_attention_heads": _HEADS,
            "attention_head_dim": _HEAD_DIM,
            "num_layers": 4,
            "num_cross_attention_heads": _HEADS,
            "cross_attention_head_dim": _HEAD_DIM,
            "cross_attention_dim": _INNER,
            "caption_channels": _TEXT_DIM,
            "mlp_ratio": 2.5,
            "patch_size": (1, 2, 2),
            "qk_norm": "rms_norm_across_heads",
            "rope_max_seq_len": 64,
        },
        latent_frames=4,
        latent_height=16,
        latent_width=16,
        block_lists=("transformer_blocks",),
        mask_dtype="long",
        notes=(
            "SanaVideoPipeline (text-to-video). Blocks are called positionally: block(hidden_states (B, F*H*W, "
            "C) frame-major, attention_mask, encoder_hidden_states (B, L, C), encoder_attention_mask, timestep "
            "(adaLN input, B x 1 x 6C), frames, height, width, rotary_emb) -> bare tensor; text is a separate "
            "argument, not returned. Between blocks: controlnet_block_samples are added after blocks 1..n when "
            "given (not by the plain pipeline). attn1 is LINEAR attention (ReLU kernel, RoPE on the numerator "
            "only) and returns a tensor; attn2 (cross-attention) reads the un-normalised hidden states; the FFN "
            "(GLUMBTempConv) reshapes tokens to (B, F, H, W, C) and mixes 3 neighbouring frames with a temporal "
            "conv, so tokens must stay frame-major. Temporal patch size: patch_size[0] (1)."
        ),
    ),
    TinyModel(
        family="sana_wm",
        class_name="SanaWMTransformer3DModel",
        config={
            "in_channels": _CHANNELS,
            "num_layers": 4,  # blocks 0-2 GDN linear attention, block 3 softmax (softmax_every_n = 4)
            "hidden_size": _INNER,
            "num_attention_heads": _HEADS,  # cross-attention heads
            "patch_size": (1, 1, 1),
            "softmax_every_n": 4,
            "linear_head_dim": _HEAD_DIM,  # self-attention heads = hidden_size // linear_head_dim
            "caption_channels": _TEXT_DIM,
            "chunk_plucker_channels": 6 * _SANA_WM_VAE_STRIDE[0],
            "mlp_ratio": 3.0,
        },
        latent_frames=4,
        latent_height=8,
        latent_width=8,
        block_lists=("blocks",),
        mask_dtype="long",
        randomize=(
            "plucker_embedder.proj.weight",  # zero-initialised: the post-attention Plucker input would vanish
            "plucker_embedder.proj.bias",
            # Zero-initialised temporal short convolutions: with zeros every key of the GDN blocks is 0.
            *(f"blocks.{i}.attn.{name}.weight" for i in range(3) for name in ("conv_k", "conv_k_cam")),
        ),
        make_inputs=_sana_wm_inputs,
        notes=(
            "SanaWMPipeline stage 1 (image+camera to video; there is no text-only mode). The only forward "
            "argument names: hidden_states (B, C, T, H, W), timestep (B, 1, T) per latent frame (the pipeline pins "
            "frame 0, the clean image latent, to t=0; the forward truncates timesteps to integers), "
            "encoder_hidden_states (B, 1, L, D), mask (B, L) (required), camera_conditions (B, T, 20) raymap and "
            "chunk_plucker (B, 48, T, H, W), built here with the pipeline's cam_utils.prepare_camera from a WASD "
            "trajectory. Blocks are called positionally: block(x (B, T*H*W, C) frame-major, y (B, 1, L, C), "
            "t0 (B, 1, T, 6C) per-frame adaLN, mask, (T, H, W), rotary_emb, block_mask, camera_conditions, "
            "ucpe_ray_transforms, plucker_emb, frame_valid_mask, chunk_size) -> bare tensor; text not returned. "
            "Nothing between blocks. Self-attention submodule: `attn` (not attn1); in blocks with "
            "(i + 1) % softmax_every_n != 0 it is a bidirectional Gated-DeltaNet linear attention whose state runs "
            "along the frame axis (per pixel), in the others softmax attention (bf16 SDPA even in fp32); both add "
            "a camera (UCPE) branch and return a tensor. Cross-attention: `cross_attn`. The FFN (GLUMBConvTemp) "
            "convolves 3 neighbouring frames. The adaLN modulation is per frame, so different frames of one "
            "sample have different timesteps. The pipeline batches CFG as [negative, positive] with the same "
            "camera inputs; `mask` is an alias of encoder_attention_mask. Runs in float32 on CPU only: diffusers' "
            "camera geometry (create_grid) refuses bfloat16 on CPU, and fp32 camera inputs then clash with bf16 "
            "features in the UCPE einsum (bf16 is for GPU)."
        ),
    ),
    TinyModel(
        family="cosmos",
        class_name="CosmosTransformer3DModel",
        config={
            "in_channels": _CHANNELS,
            "out_channels": _CHANNELS,
            "num_attention_heads": _HEADS,
            "attention_head_dim": _HEAD_DIM,
            "num_layers": 4,
            "mlp_ratio": 4.0,
            "text_embed_dim": _TEXT_DIM,
            "adaln_lora_dim": 16,
            "max_size": (128, 240, 240),
            "patch_size": (1, 2, 2),
            "rope_scale": (2.0, 1.0, 1.0),
            # Checkpoints concatenate an all-zero padding-mask channel, resized with torchvision (not installed
            # here); a zero channel adds nothing, so leaving it out is the same computation.
            "concat_padding_mask": False,
            "extra_pos_embed_type": "learnable",
        },
        latent_frames=4,
        latent_height=16,
        latent_width=16,
        block_lists=("transformer_blocks",),
        randomize=(  # zero-initialised learnable absolute position embeddings
            "learnable_pos_embed.pos_emb_t",
            "learnable_pos_embed.pos_emb_h",
            "learnable_pos_embed.pos_emb_w",
        ),
        extra=_cosmos_extra,
        notes=(
            "CosmosTextToWorldPipeline (Cosmos 1.0 Diffusion Text2World). Blocks are called positionally: "
            "block(hidden_states (B, T*H*W, C) frame-major, encoder_hidden_states (B, L, D) (or a (text, image) "
            "tuple for Cosmos 2.5 image context), embedded_timestep, temb (AdaLN-LoRA), image_rotary_emb, "
            "extra_pos_emb, attention_mask, controlnet_residual) -> bare tensor (a tuple only for ControlNet "
            "blocks built with after_proj). Each block ADDS the learnable absolute position embedding "
            "(extra_pos_emb) to its input first, so the embedding is re-added at every block rather than once. "
            "Between blocks: nothing (controlnet residuals are added inside the block). attn1 self-attention "
            "returns a tensor. Real Text2World checkpoints set concat_padding_mask=True (needs torchvision; the "
            "pipeline's padding mask is all zeros) — here False. The pipeline's timesteps are EDM noise levels "
            "(EDMEulerScheduler.precondition_noise(sigma), not 0..1000) and the latents are pre-scaled by c_in; "
            "Cosmos 2/2.5 pipelines pass (B, 1, T, 1, 1) per-frame timesteps and a condition_mask "
            "channel. Temporal patch size: patch_size[0]. The pipeline runs cond and uncond as two calls."
        ),
    ),
    TinyModel(
        family="cosmos3_omni",
        class_name="Cosmos3OmniTransformer",
        config={
            "head_dim": _HEAD_DIM,
            "hidden_size": _INNER,
            "intermediate_size": 2 * _INNER,
            "latent_channel": _CHANNELS,
            "latent_patch_size": 2,
            "patch_latent_dim": 2 * 2 * _CHANNELS,
            "num_attention_heads": _HEADS,
            "num_hidden_layers": 4,
            "num_key_value_heads": 1,  # grouped-query attention as in the checkpoints (32 q / 8 kv heads)
            "rope_axes_dim": (4, 2, 2),  # sums to head_dim / 2
            "vocab_size": 64,
        },
        latent_frames=4,
        latent_height=16,
        latent_width=16,
        block_lists=("layers",),
        timestep_key="vision_timesteps",
        make_inputs=_cosmos3_inputs,
        notes=(
            "Cosmos3OmniPipeline, text-to-video (no image condition, no sound, no action). A Qwen3-style "
            "mixture-of-transformers LLM, UNBATCHED: the forward takes one packed 2-D sequence (tokens, hidden) "
            "for one sample: input_ids (text token ids) at text_indexes, vision_tokens = [latent (1, C, T, H, W)] "
            "patchified 2x2 into vision_sequence_indexes, position_ids (3, seq) mRoPE, und_len (text prefix "
            "length), sequence_length, vision_token_shapes [(T, H/2, W/2)], vision_mse_loss_indexes, "
            "vision_timesteps (one per noisy vision token, 0..1000, scaled by timestep_scale 0.001), "
            "vision_noisy_frame_indexes [tensor]. It returns (preds_vision, preds_sound, preds_action) = "
            "([velocity (1, C, T, H, W)], None, None) with return_dict=False (lists per item, zeros at conditioned "
            "frames). The pipeline runs cond and uncond as two separate calls, so there is no batch: inputs() "
            "raises for batch_size > 1 and check_entry's batch test cannot apply. Blocks (layers.i) take "
            "(und_seq = text tokens (L, D), gen_seq = video tokens (T*H/2*W/2, D) frame-major, rotary_emb) "
            "positionally and return a tuple (und_seq, gen_seq): index 0 = TEXT tokens, index 1 = VIDEO tokens; "
            "the video tokens are NOT the first argument. Text and video have separate weights (MoT) but share "
            "one attention: text attends causally to text, video attends to text + video. The timestep is added "
            "to the noisy video tokens once before the stack (no adaLN). After the stack: final norms (norm, "
            "norm_moe_gen), concat, proj_out. Attention submodule: self_attn (Cosmos3PackedMoTAttention), "
            "called self_attn(und, gen, rotary_emb) and returning a tuple (und_out, gen_out)."
        ),
    ),
]

EXCLUDED: dict[str, str] = {}
