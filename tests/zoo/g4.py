"""Tiny zoo entries, group g4: EasyAnimate, ConsisID, MiniMax-H3, JoyImage Edit and JoyImage Edit Plus.

Every entry is built from a config with random weights; the inputs mirror what the class's diffusers pipeline
passes to the transformer (see each entry's notes).  Sample ``i`` of a batch depends only on ``(seed, i)``.
"""

from __future__ import annotations

import torch

from adacache.testing import TinyModel

__all__ = ["ENTRIES", "EXCLUDED"]

_HEAD_DIM = 16
_TEXT_LEN = 8
_TEXT_DIM = 16


def _generator(seed: int, index: int) -> torch.Generator:
    # Same seeding rule as TinyModel._sample: one stream per (seed, sample index).
    return torch.Generator().manual_seed(seed * 1_000_003 + index)


def _device_dtype(model: torch.nn.Module) -> tuple[torch.device, torch.dtype]:
    param = next(model.parameters())
    return param.device, getattr(model, "dtype", param.dtype)


def _text_mask(batch_size: int, text_len: int) -> torch.Tensor:
    # As in TinyModel.inputs: sample i has its last 2 + (i % 2) text tokens padded out.
    valid = torch.tensor([text_len - 2 - (i % 2) for i in range(batch_size)])
    return (torch.arange(text_len)[None, :] < valid[:, None]).long()


# ---------------------------------------------------------------------------------------------------------------
# EasyAnimate (V5.1 layout: every block an MMDiT block, Qwen2-VL text only, no T5)
# ---------------------------------------------------------------------------------------------------------------

_EASYANIMATE = TinyModel(
    family="easyanimate",
    class_name="EasyAnimateTransformer3DModel",
    config={
        "num_attention_heads": 2,
        "attention_head_dim": _HEAD_DIM,  # its 3D RoPE splits it 4 (t) + 6 (h) + 6 (w)
        "in_channels": 4,
        "out_channels": 4,
        "patch_size": 2,
        "sample_width": 16,
        "sample_height": 16,
        "num_layers": 4,
        "mmdit_layers": 4,  # every block has its own text projections and text FFN (is_mmdit_block)
        "time_embed_dim": 16,
        "text_embed_dim": _TEXT_DIM,
    },
    latent_frames=4,
    latent_height=16,
    latent_width=16,
    latent_channels=4,
    layout="bcfhw",
    block_lists=("transformer_blocks",),
    notes=(
        "EasyAnimatePipeline (text-to-video) calls transformer(latents, t_expand, encoder_hidden_states=prompt_embeds,"
        " return_dict=False): no text mask, no T5 stream, no inpaint/control latents (those are the inpaint/control "
        "pipelines, which concatenate them to hidden_states on the channel dim before the patch embedding). "
        "hidden_states (B, C, F, H, W); patch embedding is a per-frame Conv2d (patch_size 2, no temporal patching: "
        "one token frame per latent frame). Blocks are MMDiT-style: block(hidden_states, encoder_hidden_states, temb, "
        "image_rotary_emb) -> (video tokens, text tokens); the text stream is separate and only concatenated inside "
        "attn1 ([text, video] joint attention; attn1 returns a tuple (video, text)). The 3D RoPE is computed in "
        "forward from the latent grid (rope_embedding). Nothing runs between blocks; after the list: norm_final, "
        "norm_out (AdaLayerNorm on temb), proj_out, unpatchify. No zero-initialised gates (adaLN from "
        "EasyAnimateLayerNormZero has random linear weights)."
    ),
)


# ---------------------------------------------------------------------------------------------------------------
# ConsisID (CogVideoX-5B-I2V based, identity-preserving: face embeddings + image latents + RoPE)
# ---------------------------------------------------------------------------------------------------------------

_CONSISID_CHANNELS = 4  # latent channels; the transformer sees 2x (noisy latents + image latents)


def _crop_region(grid: tuple[int, int], base_height: int, base_width: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """The grid fitted (aspect kept) into the base grid and centred: ((top, left), (bottom, right)).

    What the pipeline's get_resize_crop_region_for_grid computes; importing the pipeline module would pull in
    transformers (about 10 s), so the formula is restated here.
    """
    h, w = grid
    if h / w > base_height / base_width:
        size_h, size_w = base_height, int(round(base_height / h * w))
    else:
        size_h, size_w = int(round(base_width / w * h)), base_width
    top, left = int(round((base_height - size_h) / 2.0)), int(round((base_width - size_w) / 2.0))
    return (top, left), (top + size_h, left + size_w)


def _consisid_inputs(tiny: TinyModel, model, batch_size: int, timestep: float, seed: int) -> dict:
    from diffusers.models.embeddings import get_3d_rotary_pos_embed

    device, dtype = _device_dtype(model)
    cfg = model.config
    c, f, h, w = tiny.latent_channels, tiny.latent_frames, tiny.latent_height, tiny.latent_width
    hidden, text, id_cond, vit = [], [], [], [[] for _ in range(cfg.LFE_num_scale)]
    for i in range(batch_size):
        g = _generator(seed, i)
        latents = torch.randn(f, c, h, w, generator=g)
        # ConsisIDPipeline.prepare_latents: the VAE latent of the reference face image as frame 0, zeros after.
        image_latents = torch.cat([torch.randn(1, c, h, w, generator=g), torch.zeros(f - 1, c, h, w)])
        hidden.append(torch.cat([latents, image_latents], dim=1))  # channel concat, as in the denoising loop
        text.append(torch.randn(tiny.text_len, tiny.text_dim, generator=g))
        # Face embeddings (insightface + CLIP id vector, EVA-CLIP hidden states at LFE_num_scale depths).
        id_cond.append(torch.randn(cfg.LFE_id_dim, generator=g))
        for s in range(cfg.LFE_num_scale):
            vit[s].append(torch.randn(5, cfg.LFE_vit_dim, generator=g))
    # RoPE as ConsisIDPipeline._prepare_rotary_positional_embeddings (grid in latent patches).
    p = cfg.patch_size
    crops = _crop_region((h // p, w // p), cfg.sample_height // p, cfg.sample_width // p)
    freqs_cos, freqs_sin = get_3d_rotary_pos_embed(
        embed_dim=cfg.attention_head_dim,
        crops_coords=crops,
        grid_size=(h // p, w // p),
        temporal_size=f,
        device=device,
    )
    return {
        "hidden_states": torch.stack(hidden).to(device, dtype),
        "encoder_hidden_states": torch.stack(text).to(device, dtype),
        "timestep": torch.full((batch_size,), float(timestep), device=device),
        "image_rotary_emb": (freqs_cos, freqs_sin),
        "id_cond": torch.stack(id_cond).to(device, dtype),
        "id_vit_hidden": [torch.stack(v).to(device, dtype) for v in vit],
    }


_CONSISID = TinyModel(
    family="consisid",
    class_name="ConsisIDTransformer3DModel",
    config={
        "num_attention_heads": 3,  # inner 48, so the face cross-attention kv width int(48 / 3 * 2) = 32 is whole
        "attention_head_dim": _HEAD_DIM,
        "in_channels": 2 * _CONSISID_CHANNELS,
        "out_channels": _CONSISID_CHANNELS,
        "time_embed_dim": 16,
        "text_embed_dim": _TEXT_DIM,
        "num_layers": 4,
        "sample_width": 16,
        "sample_height": 16,
        "sample_frames": (4 - 1) * 4 + 1,  # pixel frames before 4x temporal compression
        "patch_size": 2,
        "temporal_compression_ratio": 4,
        "max_text_seq_length": _TEXT_LEN,  # must equal the text length (learned positional table)
        "use_rotary_positional_embeddings": True,
        "use_learned_positional_embeddings": True,
        "is_train_face": True,
        "is_kps": False,
        "cross_attn_interval": 2,
        "cross_attn_dim_head": _HEAD_DIM,
        "cross_attn_num_heads": 2,
        "LFE_id_dim": 16,
        "LFE_vit_dim": 16,
        "LFE_depth": 2,
        "LFE_dim_head": 8,
        "LFE_num_heads": 2,
        "LFE_num_id_token": 2,
        "LFE_num_querie": 4,
        "LFE_output_dim": 32,  # must equal int(inner_dim / 3 * 2)
        "LFE_ff_mult": 2,
        "LFE_num_scale": 2,
    },
    latent_frames=4,
    latent_height=16,
    latent_width=16,
    latent_channels=_CONSISID_CHANNELS,
    layout="bfchw",
    block_lists=("transformer_blocks",),
    make_inputs=_consisid_inputs,
    notes=(
        "ConsisIDPipeline is identity-preserving image-to-video (no text-only mode): it passes hidden_states = "
        "cat([noisy latents, image latents], dim=2) of shape (B, F, 2C, H, W) (image latents: the face image's VAE "
        "latent as frame 0, zeros after; in_channels = 2 * out_channels, so the output is (B, F, C, H, W), half the "
        "input channels), encoder_hidden_states (B, 226 real / 8 here, text_dim), timestep, image_rotary_emb (3D "
        "RoPE from the pipeline, as CogVideoX-5B), id_cond (B, LFE_id_dim) and id_vit_hidden (list of LFE_num_scale "
        "tensors (B, tokens, LFE_vit_dim)). The real pipeline passes id_cond/id_vit_hidden with batch 1 and lets them "
        "broadcast over the CFG batch; here they are per sample. Config: RoPE + learned positional table as the "
        "CogVideoX-5B-I2V base (text length must equal max_text_seq_length, latent H/W must equal sample_height/"
        "width). Like CogVideoX: patch embedding concatenates [text, video] and the forward splits them; blocks "
        "take hidden_states (video) and encoder_hidden_states (text) separately and return (video, text); attn1 "
        "(CogVideoXAttnProcessor2_0) concatenates them internally and returns a tuple (video, text). No temporal "
        "patching (CogVideoX 1.0 style, patch_size_t None). BETWEEN blocks: after every block i with i % "
        "cross_attn_interval == 0 (blocks 0 and 2 here) the forward adds local_face_scale * "
        "perceiver_cross_attention[i // 2](valid_face_emb, hidden_states) to the video tokens (a residual face "
        "cross-attention outside the block list; valid_face_emb comes from the local_facial_extractor run once "
        "before the blocks). After the list: concat [text, video], norm_final, drop text, norm_out, proj_out."
    ),
)


# ---------------------------------------------------------------------------------------------------------------
# MiniMax-H3 (joint video + audio, one packed sequence, no cross-attention)
# ---------------------------------------------------------------------------------------------------------------

_MINIMAX_AUDIO_LATENTS = 4  # audio latents per channel (stereo: 2 channels, packed channel-major)


def _minimax_inputs(tiny: TinyModel, model, batch_size: int, timestep: float, seed: int) -> dict:
    from diffusers.modular_pipelines.minimax_h3.before_denoise import (
        MiniMaxH3PrepareLayoutStep,
        MiniMaxH3SetTimestepsStep,
        patchify_video_latents,
    )
    from diffusers.modular_pipelines.minimax_h3.modular_pipeline import (
        MINIMAX_H3_AUDIO_CHANNELS,
        MINIMAX_H3_AUDIO_TAG,
        MINIMAX_H3_TEXT_TAG,
        MINIMAX_H3_VIDEO_TAG,
    )

    device, dtype = _device_dtype(model)
    cfg = model.config
    patch = tuple(cfg.patch_size)
    f, h, w, c = tiny.latent_frames, tiny.latent_height, tiny.latent_width, tiny.latent_channels
    # The t2va layout [text | target audio | target video], built by the pipeline's own layout step.
    position_ids, token_tags, video_indices, audio_indices, text_indices, n_cond_video, n_cond_audio = (
        MiniMaxH3PrepareLayoutStep.build_packed_sequence(
            text_token_tags=torch.full((tiny.text_len,), MINIMAX_H3_TEXT_TAG, dtype=torch.long),
            num_latent_frames=f,
            latent_height=h,
            latent_width=w,
            num_audio_latents=_MINIMAX_AUDIO_LATENTS,
            patch_size=patch,
            audio_channels=MINIMAX_H3_AUDIO_CHANNELS,
            audio_tag=MINIMAX_H3_AUDIO_TAG,
            video_tag=MINIMAX_H3_VIDEO_TAG,
        )
    )
    # Timesteps are 1 - sigma in [0, 1]; the video schedule uses shift 12, the audio one shift 3 on the same
    # base grid point, so a diffusers-style timestep T (sigma = T / 1000) maps to two distinct row timesteps.
    sigma_video = min(max(float(timestep) / 1000.0, 0.0), 1.0)
    base = sigma_video / (12.0 - 11.0 * sigma_video)
    sigma_audio = 3.0 * base / (1.0 + 2.0 * base)
    unique_timesteps, timestep_indices = MiniMaxH3SetTimestepsStep.build_row_timesteps(
        video_indices,
        audio_indices,
        n_cond_video,
        n_cond_audio,
        text_indices.numel(),
        1.0 - sigma_video,
        1.0 - sigma_audio,
        1.0,
        1.0,
    )
    video, audio, text = [], [], []
    for i in range(batch_size):
        g = _generator(seed, i)
        latents = torch.randn(1, c, f, h, w, generator=g)
        video.append(patchify_video_latents(latents, patch))  # (F * H/2 * W/2, C * 4), frame-major
        audio_rows = _MINIMAX_AUDIO_LATENTS * MINIMAX_H3_AUDIO_CHANNELS
        audio.append(torch.randn(audio_rows, cfg.audio_in_channels, generator=g))
        text.append(torch.randn(tiny.text_len, tiny.text_dim, generator=g))
    return {
        "hidden_states": torch.stack(video).to(device, dtype),
        "audio_hidden_states": torch.stack(audio).to(device, dtype),
        "encoder_hidden_states": torch.stack(text).to(device, dtype),
        "timestep": unique_timesteps.to(device),
        "timestep_indices": timestep_indices.to(device),
        "token_tags": token_tags.to(device),
        "position_ids": position_ids.to(device),
        "video_indices": video_indices.to(device),
        "audio_indices": audio_indices.to(device),
        "text_indices": text_indices.to(device),
    }


_MINIMAX = TinyModel(
    family="minimax_h3",
    class_name="MiniMaxH3Transformer3DModel",
    config={
        "num_attention_heads": 2,
        "attention_head_dim": _HEAD_DIM,
        "hidden_size": 32,
        "num_layers": 4,
        "num_refiner_layers": 1,
        "ffn_dim": 64,
        "in_channels": 4,
        "audio_in_channels": 4,
        "patch_size": (1, 2, 2),
        "text_dim": _TEXT_DIM,
        "freq_dim": 32,
        "time_embed_hidden_dim": 32,
        "time_embed_dim": 16,
        "rope_freq_dim": 2,  # 2 * 3 * 2 = 12 of the 16 head channels rotated
    },
    latent_frames=4,
    latent_height=8,
    latent_width=8,
    latent_channels=4,
    layout="packed",
    block_lists=("transformer_blocks",),
    make_inputs=_minimax_inputs,
    notes=(
        "Inputs follow the modular MiniMax-H3 t2va pipeline (layout from MiniMaxH3PrepareLayoutStep."
        "build_packed_sequence, row timesteps from MiniMaxH3SetTimestepsStep.build_row_timesteps; the pipeline runs "
        "batch 1 and is guidance-distilled, no CFG batch). hidden_states is NOT a latent grid: it is the patchified "
        "video rows (B, F * H/2 * W/2, C * 4) (patch (1, 2, 2), frame-major), plus audio_hidden_states (B, 8, "
        "audio_in_channels) (stereo, channel-major) and encoder_hidden_states (B, L, text_dim). timestep is NOT per "
        "sample: it holds the distinct timesteps of the packed sequence, in [0, 1] with 1 = clean (t = 1 - sigma), "
        "here 2 values (video rows and text rows at the video timestep (shift 12), audio rows at the audio one "
        "(shift 3)), and timestep_indices maps every row to one; batch items share the layout (timestep, "
        "timestep_indices, token_tags, position_ids and the three index tensors). Output: (video rows, audio rows) "
        "tuple, video rows in the input's shape. The forward refines text with token_refiner.refiner_blocks (a "
        "separate ModuleList run BEFORE the main blocks, text only; not listed), then scatters text, audio and video "
        "into ONE packed sequence [text (8) | audio (8) | video (F x 16)] by index_copy. transformer_blocks take that "
        "whole sequence as hidden_states (positional arg 0) with (temb, adaln_indices, rotary_emb) and return a bare "
        "tensor; AdaLN parameters are selected per row from a (timestep, modality) table. Video tokens are the LAST "
        "F * tokens_per_frame rows (after 8 text + 8 audio rows here), frame-major. Nothing between blocks. "
        "Self-attention submodule: attn (MiniMaxH3Attention), returns a tensor. No zero-initialised gates."
    ),
)


# ---------------------------------------------------------------------------------------------------------------
# JoyImage Edit (image editing, Wan-VAE latents; items concatenated on the time axis)
# ---------------------------------------------------------------------------------------------------------------

_JOY_CONFIG = {
    "patch_size": [1, 2, 2],
    "in_channels": 4,
    "out_channels": 4,
    "hidden_size": 32,
    "num_attention_heads": 2,
    "text_dim": _TEXT_DIM,
    "mlp_width_ratio": 2.0,
    "num_layers": 4,
    "rope_dim_list": [4, 6, 6],  # sums to the head dim 16
}


def _joy_randomize(num_layers: int) -> tuple[str, ...]:
    # The Wan-style modulation tables start at zero (checkpoints have learned values); temb alone keeps the gates
    # non-zero, but filled tables are closer to a trained model.
    return tuple(f"double_blocks.{i}.{m}.modulate_table" for i in range(num_layers) for m in ("img_mod", "txt_mod"))


def _joy_edit_inputs(tiny: TinyModel, model, batch_size: int, timestep: float, seed: int) -> dict:
    device, dtype = _device_dtype(model)
    c, h, w = tiny.latent_channels, tiny.latent_height, tiny.latent_width
    hidden, text = [], []
    for i in range(batch_size):
        g = _generator(seed, i)
        # JoyImageEditPipeline edit mode: latents = cat([reference image latents, target noise], dim=1),
        # (num_items = 2, C, T = 1, H, W) per sample.
        reference = torch.randn(1, c, 1, h, w, generator=g)
        noise = torch.randn(1, c, 1, h, w, generator=g)
        hidden.append(torch.cat([reference, noise], dim=0))
        text.append(torch.randn(tiny.text_len, tiny.text_dim, generator=g))
    return {
        "hidden_states": torch.stack(hidden).to(device, dtype),
        "timestep": torch.full((batch_size,), float(timestep), device=device),
        "encoder_hidden_states": torch.stack(text).to(device, dtype),
    }


_JOY_EDIT = TinyModel(
    family="joyimage_edit",
    class_name="JoyImageEditTransformer3DModel",
    config=dict(_JOY_CONFIG),
    latent_frames=2,  # items (reference + target), each one latent frame, stacked on the time axis
    latent_height=16,
    latent_width=16,
    latent_channels=4,
    layout="bcfhw",
    block_lists=("double_blocks",),
    randomize=_joy_randomize(_JOY_CONFIG["num_layers"]),
    make_inputs=_joy_edit_inputs,
    notes=(
        "An IMAGE editing model (Wan-style DiT on Wan-VAE latents); JoyImageEditPipeline always uses one latent frame "
        "(video_length = 1). Inputs are its edit mode (an image given): hidden_states is 6-D (B, num_items = 2, C, "
        "T = 1, H, W) = [reference image latents, target noise]; text-to-image mode would be num_items = 1, a single "
        "token frame. The forward moves the target item first and flattens items onto the time axis: (B, C, "
        "n * T, H, W), so the 2 'token frames' are [target, reference], not time; output is 6-D in the input's item "
        "order. (The forward also accepts a plain 5-D (B, C, F, H, W) video, which no pipeline passes.) CFG is two "
        "separate forwards (cond, uncond), not a batch. Patch embedding Conv3d (1, 2, 2); tokens (B, n*T*(H/2)*(W/2), "
        "hidden) item-major. double_blocks: block(hidden_states=img, encoder_hidden_states=txt, temb=vec, "
        "image_rotary_emb=(vis_freqs, txt_freqs)) -> (img, txt); text is a separate stream, concatenated [img, txt] "
        "only inside attn (JoyImageAttention, returns a tuple (img, txt)). Nothing between blocks; after: norm_out "
        "(plain LayerNorm, no timestep), proj_out, unpatchify. modulate_table params are zero-initialised: filled "
        "via randomize (blocks are not the identity without it, temb drives the gates)."
    ),
)


# ---------------------------------------------------------------------------------------------------------------
# JoyImage Edit Plus (multi-reference editing; pre-patchified, padded token list)
# ---------------------------------------------------------------------------------------------------------------

_JOY_PLUS_REFERENCES = 3  # reference images per sample: with the target, 4 items on the RoPE time axis


def _joy_plus_inputs(tiny: TinyModel, model, batch_size: int, timestep: float, seed: int) -> dict:
    device, dtype = _device_dtype(model)
    pt, ph, pw = model.config.patch_size
    c, h, w = tiny.latent_channels, tiny.latent_height, tiny.latent_width
    patches, text, shape_list = [], [], []
    for i in range(batch_size):
        g = _generator(seed, i)
        # JoyImageEditPlusPipeline.prepare_latents: [target noise, reference 1, ...], each (C, T = 1, H, W),
        # patchified item by item into (tokens, C, pt, ph, pw) rows and concatenated.
        items = [torch.randn(c, 1, h, w, generator=g) for _ in range(1 + _JOY_PLUS_REFERENCES)]
        sample, shapes = [], []
        for item in items:
            _, t, hh, ww = item.shape
            lt, lh, lw = t // pt, hh // ph, ww // pw
            shapes.append((lt, lh, lw))
            rows = item.reshape(c, lt, pt, lh, ph, lw, pw).permute(1, 3, 5, 0, 2, 4, 6).reshape(-1, c, pt, ph, pw)
            sample.append(rows)
        patches.append(torch.cat(sample))
        shape_list.append(shapes)
        text.append(torch.randn(tiny.text_len, tiny.text_dim, generator=g))
    return {
        "hidden_states": torch.stack(patches).to(device, dtype),
        "timestep": torch.full((batch_size,), float(timestep), device=device),
        "encoder_hidden_states": torch.stack(text).to(device, dtype),
        "encoder_hidden_states_mask": _text_mask(batch_size, tiny.text_len).to(device),
        "shape_list": shape_list,
    }


_JOY_PLUS = TinyModel(
    family="joyimage_edit_plus",
    class_name="JoyImageEditPlusTransformer3DModel",
    config=dict(_JOY_CONFIG),
    latent_frames=1 + _JOY_PLUS_REFERENCES,  # items (target + 3 references), one latent frame each
    latent_height=8,
    latent_width=8,
    latent_channels=4,
    layout="packed",
    block_lists=("double_blocks",),
    mask_dtype="long",
    randomize=_joy_randomize(_JOY_CONFIG["num_layers"]),
    make_inputs=_joy_plus_inputs,
    notes=(
        "Multi-reference IMAGE editing (JoyImageEditPlusPipeline, one latent frame per image). hidden_states is "
        "already patchified: (B, max_patches, C, pt, ph, pw) = (B, 4 * 16, 4, 1, 2, 2) here: the target's patches "
        "first, then each reference image's, each item row-major; shorter samples are zero-padded to max_patches "
        "(equal sizes here, no padding). shape_list (per sample, a list of per-item (t, h, w) in patches) drives a "
        "per-sample RoPE whose time coordinate advances by one per item, so the 4 'token frames' are [target, ref1, "
        "ref2, ref3], not time (items may differ in size in general, then tokens per frame vary). "
        "encoder_hidden_states_mask (B, L) (the Qwen-VL tokenizer mask; the pipeline left-pads with its "
        "_pad_sequence) becomes a joint [image, text] key mask. CFG is one batch [uncond, cond] with shape_list * 2. "
        "double_blocks: block(hidden_states=img, encoder_hidden_states=txt, temb=vec, image_rotary_emb=(cos, sin) "
        "batched (B, S, D), attention_mask) -> (img, txt); text separate, joined only inside attn "
        "(JoyImageEditPlusAttention, returns a tuple (img, txt)). Nothing between blocks; after: norm_out (no "
        "timestep), proj_out, reshape to (B, N, C, pt, ph, pw). modulate_table params filled via randomize."
    ),
)


ENTRIES: list[TinyModel] = [_EASYANIMATE, _CONSISID, _MINIMAX, _JOY_EDIT, _JOY_PLUS]

EXCLUDED: dict[str, str] = {}
