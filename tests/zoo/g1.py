"""Tiny zoo entries, group g1: the Wan-derived video transformers and their relatives.

WanVACE, WanAnimate, WanAnimate2, ChronoEdit, Helios, AnyFlow and AnyFlowFAR, each with a minimal config and the
inputs its pipeline passes (shapes, dtypes, optional arguments), shrunk: 2 heads x 16 dims, 4 latent channels,
16x16 latents (8x8 for AnyFlowFAR).  Conditions (control video, pose, face, history, CLIP image tokens, KV caches)
are random but deterministic, and sample ``i`` of a batch depends only on ``(seed, i)``.

WanAnimate2 and AnyFlowFAR need a first pass that fills a KV cache (reference extraction, cache prefill) before a
denoising call; ``inputs()`` runs it on a hook-free clone sharing the model's weights.  check_entry.py caveats, see
their notes: both exceed 1 s on the first flex_attention call of a process, and WanAnimate2's list output (one
tensor per sample) reads as 'batch 2 output shape'.
"""

from __future__ import annotations

import contextlib
import sys

import torch

from adacache.testing import TinyModel

__all__ = ["ENTRIES", "EXCLUDED"]

_HEADS = 2
_HEAD_DIM = 16
_INNER = _HEADS * _HEAD_DIM
_C = 4  # latent channels
_TEXT_DIM = 16
_TEXT_LEN = 8
# Wan-style I2V cross-attention (added_kv_proj_dim set) splits its context as "image tokens, then exactly 512
# text tokens" (hardcoded in WanAttnProcessor), and the pipelines pad prompts to 512: such models get 512 tokens.
_WAN_I2V_TEXT_LEN = 512
_CLIP_TOKENS = 4  # CLIP ViT-H penultimate hidden states: 257 tokens in the real pipelines
_CLIP_DIM = 16  # 1280 in the real pipelines

_WAN_BASE = {
    "patch_size": (1, 2, 2),
    "num_attention_heads": _HEADS,
    "attention_head_dim": _HEAD_DIM,
    "in_channels": _C,
    "out_channels": _C,
    "text_dim": _TEXT_DIM,
    "freq_dim": 32,
    "ffn_dim": 2 * _INNER,
    "num_layers": 4,
    "cross_attn_norm": True,
    "qk_norm": "rms_norm_across_heads",
    "rope_max_seq_len": 32,
}


# ----------------------------------------------------------------------------------------------------------------
# Helpers


def _generator(seed: int, index: int) -> torch.Generator:
    # Same per-sample seeding as TinyModel._sample, so sample i depends only on (seed, i).
    return torch.Generator().manual_seed(seed * 1_000_003 + index)


def _dtype_device(model) -> tuple[torch.dtype, torch.device]:
    param = next(model.parameters())
    return getattr(model, "dtype", param.dtype), param.device


def _finish(kwargs: dict, model, timestep_keys=("timestep",)) -> dict:
    """Floating tensors to the model dtype and device; timesteps stay float32 (as the pipelines pass them)."""
    dtype, device = _dtype_device(model)
    out = {}
    for key, value in kwargs.items():
        if isinstance(value, torch.Tensor):
            if value.is_floating_point() and key not in timestep_keys:
                value = value.to(dtype)
            value = value.to(device)
        out[key] = value
    return out


def _stack(per_sample: list[dict], keys) -> dict:
    return {key: torch.stack([s[key] for s in per_sample]) for key in keys}


def _timesteps(batch_size: int, timestep: float) -> torch.Tensor:
    return torch.full((batch_size,), float(timestep))


# ----------------------------------------------------------------------------------------------------------------
# WanVACE: the VACE control branch (vace_blocks) runs first on the control video and produces one hint per VACE
# layer; the hints are added after the main blocks listed in vace_layers.

_VACE_MASK_CHANNELS = 4  # vae_scale_factor_spatial**2 = 64 in the real pipeline (one channel per 8x8 pixel offset)


def _wan_vace_inputs(tiny: TinyModel, model, batch_size: int, timestep: float, seed: int) -> dict:
    per_sample = []
    for i in range(batch_size):
        g = _generator(seed, i)
        hidden = torch.randn(tiny.hidden_shape(1)[1:], generator=g)
        text = torch.randn(tiny.text_len, tiny.text_dim, generator=g)
        # Control latents: VAE latents of the inactive and reactive parts of the conditioning video (2 x C
        # channels) stacked over the pixel-unshuffled mask. Text-to-video default: the mask is all ones.
        f, h, w = tiny.latent_frames, tiny.latent_height, tiny.latent_width
        control = torch.cat(
            [torch.randn(2 * tiny.latent_channels, f, h, w, generator=g), torch.ones(_VACE_MASK_CHANNELS, f, h, w)]
        )
        per_sample.append({"hidden_states": hidden, "encoder_hidden_states": text, "control_hidden_states": control})
    kwargs = _stack(per_sample, ("hidden_states", "encoder_hidden_states", "control_hidden_states"))
    kwargs["timestep"] = _timesteps(batch_size, timestep)
    # conditioning_scale=1.0 expanded to one scale per VACE layer, as WanVACEPipeline passes it.
    kwargs["control_hidden_states_scale"] = torch.ones(len(model.config.vace_layers))
    return _finish(kwargs, model)


_WAN_VACE = TinyModel(
    family="wan_vace",
    class_name="WanVACETransformer3DModel",
    config={
        **_WAN_BASE,
        "vace_layers": [0, 2],  # every 5th of 40 layers in Wan2.1-VACE-14B; must include 0
        "vace_in_channels": 2 * _C + _VACE_MASK_CHANNELS,  # 96 = 2 x 16 + 64 in the real model
    },
    block_lists=("vace_blocks", "blocks"),
    make_inputs=_wan_vace_inputs,
    notes=(
        "Two block lists, called in this order: vace_blocks (len 2 = len(vace_layers)) all run first, then blocks "
        "(len 4). A VACE block is called as block(hidden_states, encoder_hidden_states, control_hidden_states, temb, "
        "rotary_emb): its first argument is the patch-embedded video tokens (the same tensor for every VACE block; "
        "only vace_blocks[0] reads it: control = proj_in(control) + hidden_states); the stream it transforms is the "
        "third argument, control_hidden_states. It returns a tuple (hint = proj_out(control), control), hint at "
        "index 0, the updated control tokens at index 1 (the next VACE block's input). Main blocks: "
        "block(hidden_states, encoder_hidden_states, temb, rotary_emb) -> bare tensor. Between main blocks: after "
        "blocks[i] for i in config.vace_layers, hidden_states += hint_k * control_hidden_states_scale[k] (k-th VACE "
        "layer). Text is separate (cross-attention attn2), never concatenated. Control tokens are zero-padded at the "
        "end if the control video has fewer frames. Tokens (B, F*H/2*W/2, 32), frame-major; 4 token frames x 64 "
        "tokens. Latent video: hidden_states (B, C, F, H, W), frame dim 2; temporal patch config.patch_size[0]. "
        "Self-attention: attn1 (returns a tensor) in both block kinds. Timestep argument: timestep (B,)."
    ),
)


# ----------------------------------------------------------------------------------------------------------------
# WanAnimate: Wan2.1-I2V backbone plus pose latents (added to the patch embedding) and a face-motion adapter.

_ANIMATE_FACE_SIZE = 16  # motion_encoder_size: face crops are 512x512 pixels in the real model
_ANIMATE_FACE_FRAMES = 9  # pixel frames of a segment (77 in the real pipeline); two stride-2 convs -> 3 latent frames


def _wan_animate_inputs(tiny: TinyModel, model, batch_size: int, timestep: float, seed: int) -> dict:
    c, f, h, w = tiny.latent_channels, tiny.latent_frames, tiny.latent_height, tiny.latent_width
    per_sample = []
    for i in range(batch_size):
        g = _generator(seed, i)
        noisy = torch.randn(c, f, h, w, generator=g)
        # Reference latents: the i2v mask (4 channels, 1 on the reference frame) over the VAE latents of the
        # reference image (frame 0) followed by the previous segment's conditioning frames (zeros: first segment).
        mask = torch.zeros(4, f, h, w)
        mask[:, 0] = 1.0
        ref = torch.zeros(c, f, h, w)
        ref[:, 0] = torch.randn(c, h, w, generator=g)
        per_sample.append(
            {
                "hidden_states": torch.cat([noisy, mask, ref]),
                "encoder_hidden_states": torch.randn(tiny.text_len, tiny.text_dim, generator=g),
                "encoder_hidden_states_image": torch.randn(_CLIP_TOKENS, _CLIP_DIM, generator=g),
                # VAE latents of the pose video: one frame fewer than hidden_states (no reference frame).
                "pose_hidden_states": torch.randn(c, f - 1, h, w, generator=g),
                # Face video in pixel space, values in [-1, 1].
                "face_pixel_values": torch.rand(
                    3, _ANIMATE_FACE_FRAMES, _ANIMATE_FACE_SIZE, _ANIMATE_FACE_SIZE, generator=g
                )
                * 2
                - 1,
            }
        )
    kwargs = _stack(per_sample, per_sample[0].keys())
    kwargs["timestep"] = _timesteps(batch_size, timestep)
    return _finish(kwargs, model)


_WAN_ANIMATE = TinyModel(
    family="wan_animate",
    class_name="WanAnimateTransformer3DModel",
    config={
        **_WAN_BASE,
        "in_channels": 2 * _C + 4,  # noisy latents + [i2v mask (4), reference latents]; 36 in the real model
        "latent_channels": _C,
        "image_dim": _CLIP_DIM,
        "added_kv_proj_dim": _INNER,  # I2V-style image K/V in every cross-attention (5120 in the real model)
        "motion_encoder_channel_sizes": {"4": 16, "8": 16, "16": 16},
        "motion_encoder_size": _ANIMATE_FACE_SIZE,
        "motion_style_dim": 32,
        "motion_dim": 8,
        "motion_encoder_dim": 32,
        "face_encoder_hidden_dim": 32,
        "face_encoder_num_heads": 4,
        "inject_face_latents_blocks": 2,  # 5 in the real model (40 layers -> 8 face adapters)
        "motion_encoder_batch_size": 8,
    },
    text_len=_WAN_I2V_TEXT_LEN,
    block_lists=("blocks",),
    make_inputs=_wan_animate_inputs,
    notes=(
        "One block list: blocks (len 4), block(hidden_states, encoder_hidden_states, temb, rotary_emb) -> bare "
        "tensor; text separate (cross-attention attn2 over [CLIP image tokens, 512 text tokens]; the image part "
        "goes through the added K/V projections). Between blocks: after blocks[i] with i % "
        "inject_face_latents_blocks == 0, hidden_states += face_adapter[i // inject_face_latents_blocks]("
        "hidden_states, motion_vec) (after blocks 0 and 2 here; 0, 5, ..., 35 in the real 40-layer model). "
        "face_adapter is a second nn.ModuleList (cross-attention from video tokens to per-frame face-motion tokens, "
        "query frame t attends to motion frame t only), not a transformer block list, so it is not in block_lists. "
        "Before the blocks, pose latents are patch-embedded and added to token frames 1.. (frame 0 is the "
        "reference image). Input hidden_states (B, 2C+4, F, H, W) = [noisy latents, i2v mask, reference latents] "
        "concatenated on channels, frame dim 2; output (B, C, F, H, W); latent_channels here describes the output. "
        "Frame 0 is the reference image, frames 1..F-1 the segment. Tokens (B, F*H/2*W/2, 32), frame-major; 4 "
        "token frames x 64 tokens. Temporal patch config.patch_size[0]. Self-attention: attn1 (tensor). Timestep "
        "argument: timestep (B,). The face video must have 4*(F-2)+1 frames so the motion tokens have F-1 frames, "
        "and the token count must be divisible by F."
    ),
)


# ----------------------------------------------------------------------------------------------------------------
# ChronoEdit: Wan2.1-I2V backbone; image editing as a 2-latent-frame video (input image, edited image).


def _chronoedit_inputs(tiny: TinyModel, model, batch_size: int, timestep: float, seed: int) -> dict:
    c, f, h, w = tiny.latent_channels, tiny.latent_frames, tiny.latent_height, tiny.latent_width
    per_sample = []
    for i in range(batch_size):
        g = _generator(seed, i)
        noisy = torch.randn(c, f, h, w, generator=g)
        # Condition: i2v mask (vae_scale_factor_temporal = 4 channels, ones on the first latent frame) over the
        # VAE latents of [input image, zero frames].
        mask = torch.zeros(4, f, h, w)
        mask[:, 0] = 1.0
        latent_condition = torch.randn(c, f, h, w, generator=g)
        per_sample.append(
            {
                "hidden_states": torch.cat([noisy, mask, latent_condition]),
                "encoder_hidden_states": torch.randn(tiny.text_len, tiny.text_dim, generator=g),
                "encoder_hidden_states_image": torch.randn(_CLIP_TOKENS, _CLIP_DIM, generator=g),
            }
        )
    kwargs = _stack(per_sample, per_sample[0].keys())
    kwargs["timestep"] = _timesteps(batch_size, timestep)
    return _finish(kwargs, model)


_CHRONOEDIT = TinyModel(
    family="chronoedit",
    class_name="ChronoEditTransformer3DModel",
    config={
        **_WAN_BASE,
        "in_channels": 2 * _C + 4,  # noisy latents + i2v mask (4) + condition latents; 36 in the real model
        "image_dim": _CLIP_DIM,
        "added_kv_proj_dim": _INNER,
        "rope_temporal_skip_len": 8,
    },
    latent_frames=2,  # the default (no temporal reasoning) pipeline mode: num_frames=5 -> 2 latent frames
    text_len=_WAN_I2V_TEXT_LEN,
    block_lists=("blocks",),
    make_inputs=_chronoedit_inputs,
    notes=(
        "Wan2.1-I2V blocks: blocks (len 4), block(hidden_states, encoder_hidden_states, temb, rotary_emb) -> bare "
        "tensor; text separate (cross-attention attn2 over [CLIP image tokens, 512 text tokens], image part "
        "through the added K/V). Nothing between blocks. Default pipeline mode edits an image as a 2-latent-frame "
        "video (input, output): with exactly 2 frames the RoPE uses temporal positions 0 and "
        "rope_temporal_skip_len-1. With enable_temporal_reasoning the first num_temporal_reasoning_steps run on "
        "(num_frames-1)//4+1 latent frames, then the pipeline drops to frames [0, -1] (the token count changes "
        "mid-generation). Input hidden_states (B, 2C+4, F, H, W) = [noisy latents, i2v mask, condition latents] on "
        "channels, frame dim 2; output (B, C, F, H, W); latent_channels describes the output. Tokens (B, "
        "F*H/2*W/2, 32), frame-major; 2 token frames x 64 tokens. Temporal patch config.patch_size[0]. "
        "Self-attention: attn1 (tensor). Timestep argument: timestep (B,)."
    ),
)


# ----------------------------------------------------------------------------------------------------------------
# Helios: Wan-like blocks over [long, mid, short history, current chunk] tokens (autoregressive chunks).

_HELIOS_HISTORY = (4, 2, 1)  # history_sizes, long -> short ([16, 2, 1] in the pipeline)


def _helios_inputs(tiny: TinyModel, model, batch_size: int, timestep: float, seed: int) -> dict:
    c, f, h, w = tiny.latent_channels, tiny.latent_frames, tiny.latent_height, tiny.latent_width
    n_long, n_mid, n_1x = _HELIOS_HISTORY
    per_sample = []
    for i in range(batch_size):
        g = _generator(seed, i)
        per_sample.append(
            {
                "hidden_states": torch.randn(c, f, h, w, generator=g),
                "encoder_hidden_states": torch.randn(tiny.text_len, tiny.text_dim, generator=g),
                # A later chunk: the history holds earlier generated latents; short history = [first frame
                # (keep_first_frame), last generated frame]. (For the very first chunk the pipeline passes zeros.)
                "latents_history_long": torch.randn(c, n_long, h, w, generator=g),
                "latents_history_mid": torch.randn(c, n_mid, h, w, generator=g),
                "latents_history_short": torch.randn(c, 1 + n_1x, h, w, generator=g),
            }
        )
    kwargs = _stack(per_sample, per_sample[0].keys())
    # Frame indices as HeliosPipeline builds them (keep_first_frame=True), batch dim 1 whatever the batch size.
    prefix, long_, mid, one_x, current = torch.arange(1 + n_long + n_mid + n_1x + f).split([1, n_long, n_mid, n_1x, f])
    kwargs.update(
        indices_hidden_states=current[None],
        indices_latents_history_short=torch.cat([prefix, one_x])[None],
        indices_latents_history_mid=mid[None],
        indices_latents_history_long=long_[None],
        timestep=_timesteps(batch_size, timestep),
    )
    return _finish(kwargs, model)


_HELIOS = TinyModel(
    family="helios",
    class_name="HeliosTransformer3DModel",
    config={
        "patch_size": (1, 2, 2),
        "num_attention_heads": _HEADS,
        "attention_head_dim": _HEAD_DIM,
        "in_channels": _C,
        "out_channels": _C,
        "text_dim": _TEXT_DIM,
        "freq_dim": 32,
        "ffn_dim": 2 * _INNER,
        "num_layers": 4,
        "cross_attn_norm": True,
        "qk_norm": "rms_norm_across_heads",
        "rope_dim": (4, 6, 6),  # (t, y, x), sums to attention_head_dim
        "guidance_cross_attn": True,
        "zero_history_timestep": True,
        "has_multi_term_memory_patch": True,
    },
    latent_frames=3,  # num_latent_frames_per_chunk (9 in the pipeline)
    block_lists=("blocks",),
    make_inputs=_helios_inputs,
    notes=(
        "blocks (len 4), block(hidden_states, encoder_hidden_states, temb, rotary_emb, original_context_length) -> "
        "bare tensor. The token sequence the blocks see is NOT only the video being denoised: it is [long history "
        "(patch_long, 4x8x8 patches: 4 tokens here), mid history (patch_mid, 2x4x4: 16 tokens), short history "
        "(patch_short, 1x2x2: 2 frames x 64 tokens), current chunk (3 frames x 64 tokens)] = 340 tokens, "
        "concatenated on the token dim before the first block; only the last original_context_length = 192 tokens "
        "are the noisy chunk (frame-major, 3 token frames x 64), and only they reach the output (norm_out slices "
        "them). History tokens get a timestep-0 modulation (zero_history_timestep), the chunk the real timestep, "
        "so temb is per token (B, S, 6, D). Cross-attention (attn2, guidance_cross_attn) only updates the chunk "
        "tokens; history tokens pass it unchanged but are updated by attn1/ffn. Text separate (attn2). Nothing "
        "between blocks. Latent video: hidden_states (B, C, F, H, W) (the current chunk), frame dim 2; temporal "
        "patch config.patch_size[0]. Self-attention: attn1 (tensor). Timestep argument: timestep (B,). Frame "
        "indices have batch dim 1 (as the pipeline passes them)."
    ),
)


# ----------------------------------------------------------------------------------------------------------------
# AnyFlow: Wan2.1 backbone with a dual (source t, target r) timestep embedding, per-frame timesteps.


def _anyflow_timesteps(batch_size: int, frames: int, timestep: float) -> tuple[torch.Tensor, torch.Tensor]:
    # The pipeline passes per-frame (B, F) timesteps: t, and the flow-map target r = the next sigma * 1000
    # (use_mean_velocity=True). A 2-step hop: r = t / 2.
    t = torch.full((batch_size, frames), float(timestep))
    return t, t * 0.5


def _anyflow_inputs(tiny: TinyModel, model, batch_size: int, timestep: float, seed: int) -> dict:
    per_sample = [tiny._sample(seed, i) for i in range(batch_size)]
    kwargs = _stack(per_sample, ("hidden_states", "encoder_hidden_states"))
    kwargs["timestep"], kwargs["r_timestep"] = _anyflow_timesteps(batch_size, tiny.latent_frames, timestep)
    return _finish(kwargs, model, timestep_keys=("timestep", "r_timestep"))


_ANYFLOW_BASE = {
    "patch_size": (1, 2, 2),
    "num_attention_heads": _HEADS,
    "attention_head_dim": _HEAD_DIM,
    "in_channels": _C,
    "out_channels": _C,
    "text_dim": _TEXT_DIM,
    "freq_dim": 32,
    "ffn_dim": 2 * _INNER,
    "num_layers": 4,
    "cross_attn_norm": True,
    "rope_max_seq_len": 32,
    "gate_value": 0.25,
    "deltatime_type": "r",
}

_ANYFLOW = TinyModel(
    family="anyflow",
    class_name="AnyFlowTransformer3DModel",
    config=dict(_ANYFLOW_BASE),
    layout="bfchw",
    block_lists=("blocks",),
    make_inputs=_anyflow_inputs,
    notes=(
        "Wan2.1 backbone: blocks (len 4), block(hidden_states, encoder_hidden_states, temb, rotary_emb, "
        "attention_mask=None) -> bare tensor; text separate (cross-attention attn2). Nothing between blocks. "
        "Latent video hidden_states is (B, F, C, H, W) (frame dim 1), permuted to (B, C, F, H, W) before the "
        "patch embedding; output (B, F, C, H, W). Tokens (B, F*H/2*W/2, 32), frame-major; 4 token frames x 64 "
        "tokens. Temporal patch config.patch_size[0]. Two timestep arguments, both per frame (B, F): timestep "
        "(source t) and r_timestep (target r; the pipeline passes the next sigma * 1000, or t itself when "
        "use_mean_velocity=False); temb is per token (B, S, 6, D). Self-attention: attn1 (tensor). The pipeline "
        "batches CFG as [uncond, cond]."
    ),
)


# ----------------------------------------------------------------------------------------------------------------
# Two-pass models (WanAnimate2, AnyFlowFAR): the pipeline first runs a pass that only fills a KV cache, then the
# denoising calls read it. inputs() runs that first pass on a clone of the model that shares its weights but has none
# of its hooks or patches, so the observed forward is the denoising call alone.


def _hook_free_clone(model):
    clone = type(model).from_config(model.config)
    clone.load_state_dict(model.state_dict(), strict=True, assign=True)  # shares the tensors: no copy, same dtype
    return clone.eval()


@contextlib.contextmanager
def _eager_block_masks(model):
    """Make the model's module build flex BlockMasks eagerly (its _compile=True costs about a minute on CPU)."""
    module = sys.modules[type(model).__module__]
    compiled = module.create_block_mask
    module.create_block_mask = lambda *args, **kwargs: compiled(*args, **{**kwargs, "_compile": False})
    try:
        yield
    finally:
        module.create_block_mask = compiled


# AnyFlowFAR: chunk-wise autoregressive. The observed call is a denoising step of the last chunk of
# chunk_partition = (1, 3, 3, 3): the three earlier chunks (1 FAR-compressed, 2 full-resolution) are in the KV cache.

_FAR_PARTITION = (1, 3, 3, 3)  # (1, 3, 3, 3, 3, 3, 3, 2) = 21 latent frames for the released 81-frame checkpoints


def _anyflow_far_inputs(tiny: TinyModel, model, batch_size: int, timestep: float, seed: int) -> dict:
    dtype, device = _dtype_device(model)
    cfg = model.config
    c, h, w = tiny.latent_channels, tiny.latent_height, tiny.latent_width
    partition = list(_FAR_PARTITION)
    past = sum(partition[:-1])
    chunk, context, text = [], [], []
    for i in range(batch_size):
        g = _generator(seed, i)
        chunk.append(torch.randn(partition[-1], c, h, w, generator=g))  # (F, C, H, W) per sample
        text.append(torch.randn(tiny.text_len, tiny.text_dim, generator=g))
        context.append(torch.randn(past, c, h, w, generator=g))  # the already generated (clean) latents
    chunk, context, text = (torch.stack(x).to(device, dtype) for x in (chunk, context, text))

    # KV cache allocated as AnyFlowFARPipeline does (batch = batch_size; 2 x with batched CFG).
    full_tpf = (h // cfg.patch_size[1]) * (w // cfg.patch_size[2])
    compressed_tpf = (h // cfg.compressed_patch_size[1]) * (w // cfg.compressed_patch_size[2])
    shape = (2, batch_size, cfg.num_attention_heads)
    kv_cache = {
        layer: {
            "full_cache": torch.zeros(
                *shape, cfg.full_chunk_limit * max(partition) * full_tpf, cfg.attention_head_dim, device=device,
                dtype=dtype,
            ),
            "compressed_cache": torch.zeros(
                *shape, (len(partition) - cfg.full_chunk_limit + 1) * max(partition) * compressed_tpf,
                cfg.attention_head_dim, device=device, dtype=dtype,
            ),
        }
        for layer in range(cfg.num_layers)
    }
    # Cache prefill (AnyFlowFARPipeline.encode_kv_cache after chunk 2): all earlier frames at timestep 0.
    clone = _hook_free_clone(model)
    zeros = torch.zeros(batch_size, past, device=device)
    with torch.no_grad():
        clone(
            hidden_states=context,
            timestep=zeros,
            r_timestep=zeros,
            encoder_hidden_states=text,
            chunk_partition=partition[:-1],
            attention_mask=clone.build_attention_mask(
                chunk_partition=partition[:-1], height=h, width=w, device=device, mode="cache"
            ),
            kv_cache=kv_cache,
            kv_cache_flag={"num_cached_chunks": 0, "is_cache_step": True},
            return_dict=False,
        )
    t, r = _anyflow_timesteps(batch_size, partition[-1], timestep)
    return {
        "hidden_states": chunk,
        "timestep": t.to(device),
        "r_timestep": r.to(device),
        "encoder_hidden_states": text,
        "chunk_partition": partition,
        "kv_cache": kv_cache,
        "kv_cache_flag": {"num_cached_chunks": len(partition) - 1, "is_cache_step": False},
    }


_ANYFLOW_FAR = TinyModel(
    family="anyflow_far",
    class_name="AnyFlowFARTransformer3DModel",
    config={
        **_ANYFLOW_BASE,
        "compressed_patch_size": (1, 4, 4),
        "full_chunk_limit": 3,
        "chunk_partition": _FAR_PARTITION,
    },
    latent_frames=_FAR_PARTITION[-1],
    latent_height=8,  # keeps the eager flex attention of the cache prefill small (100 tokens, padded to 128)
    latent_width=8,
    layout="bfchw",
    block_lists=("blocks",),
    make_inputs=_anyflow_far_inputs,
    notes=(
        "Chunk-wise autoregressive (FAR) AnyFlow. The pipeline's default path (use_kv_cache=True) makes two kinds "
        "of forward call: denoising steps on the current chunk only (the observed call here: hidden_states (B, 3, "
        "C, 8, 8) = chunk 4 of chunk_partition (1, 3, 3, 3), kv_cache holding chunks 1-3, kv_cache_flag "
        "{num_cached_chunks: 3, is_cache_step: False}), and after each chunk a cache-prefill call (kv_cache_flag "
        "is_cache_step=True, timestep 0, all frames generated so far, a flex BlockMask) that runs every block once "
        "more, writes the K/V of all those frames into kv_cache, and returns (None, kv_cache): a caching wrapper "
        "must let prefill calls through uncached and not count them as a step. Returns (sample, kv_cache) even with "
        "return_dict=False. blocks (len 4), block(hidden_states, encoder_hidden_states, temb, rotary_emb, "
        "attention_mask, kv_cache[layer], kv_cache_flag) -> bare tensor; text separate (cross-attention attn2). "
        "Nothing between blocks. In a denoising step the blocks see only the current chunk's tokens (B, 3*16, 32), "
        "frame-major, 3 token frames x 16 (8x8 latents); self-attention (attn1, tensor, flex backend only) also "
        "attends to the cached K/V of earlier chunks (chunks beyond the last full_chunk_limit are 4x4-patch "
        "compressed: 4 tokens/frame here). "
        "Latent video (B, F, C, H, W), frame dim 1; temporal patch config.patch_size[0]. Timesteps per frame (B, F): "
        "timestep and r_timestep as in AnyFlow. The first call in a process exceeds check_entry's 1 s: "
        "flex_attention imports and traces torch's compile stack once (seconds); later calls, cache prefill "
        "included, take about 0.2 s."
    ),
)


# WanAnimate2: in-context reference video. Per segment, one "extract" call runs the driving-video latents through
# every block (dense attention, fixed timestep 1) and stores each layer's pre-RoPE K/V in a WanAnimate2KVCache; every
# denoising call ("cached") attends over the generation tokens plus, per frame, the cached reference tokens.

_ANIMATE2_SEGMENT_FRAMES = 9  # pixel frames per segment (77 or 81 in the pipeline) -> (9 - 1) // 4 + 1 = 3 latent
_ANIMATE2_CLIP_TOKENS = 4  # 257 in the pipeline; the width is fixed at 1280 by the model (MLPProj(1280, dim))


def _wan_animate2_inputs(tiny: TinyModel, model, batch_size: int, timestep: float, seed: int) -> dict:
    from diffusers.models.transformers.transformer_wan_animate_2 import WanAnimate2KVCache

    dtype, device = _dtype_device(model)
    cfg = model.config
    c, h, w = tiny.latent_channels, tiny.latent_height, tiny.latent_width
    ref_frames = (_ANIMATE2_SEGMENT_FRAMES - 1) // 4 + 1  # latent frames of a driving-video segment
    gen_frames = ref_frames + 1  # plus the reference image's slot
    ph, pw = cfg.patch_size[1], cfg.patch_size[2]
    samples = []
    for i in range(batch_size):
        g = _generator(seed, i)
        driving = torch.randn(c, ref_frames, h, w, generator=g)
        ref_image = torch.randn(c, 1, h, w, generator=g)
        prev_segment = torch.randn(c, ref_frames, h, w, generator=g)  # VAE latents of zero frames: first segment
        mask_image = torch.ones(4, 1, h, w)  # i2v mask: reference image slot known
        mask_segment = torch.zeros(4, ref_frames, h, w)  # no previous-segment frames (first segment)
        samples.append(
            {
                "noise": torch.randn(c, gen_frames, h, w, generator=g),
                "prompt": torch.randn(tiny.text_len, tiny.text_dim, generator=g),
                "prompt_ref": torch.randn(tiny.text_len, tiny.text_dim, generator=g),
                "clip": torch.randn(_ANIMATE2_CLIP_TOKENS, 1280, generator=g),
                "driving": driving,
                # The extract pass's condition: an all-ones i2v mask over the driving latents themselves.
                "driving_condition": torch.cat([torch.ones(4, ref_frames, h, w), driving]),
                "reference_latents": torch.cat(
                    [torch.cat([mask_image, ref_image]), torch.cat([mask_segment, prev_segment])], dim=1
                ),
            }
        )
    s = {key: [x[key].to(device, dtype) for x in samples] for key in samples[0]}
    clip = torch.stack(s["clip"])
    # One row per sample: rope_apply loops over the rows (the pipeline runs batch 1 and passes one row).
    grid_ref = torch.tensor([[ref_frames, h // ph, w // pw]] * batch_size, dtype=torch.long)

    kv_cache = WanAnimate2KVCache(cfg.num_layers)
    clone = _hook_free_clone(model)
    with torch.no_grad():
        clone(
            s["driving"],
            timestep=torch.full((batch_size,), float(timestep), device=device),  # ignored: extract uses t = 1
            encoder_hidden_states=s["prompt_ref"],
            encoder_hidden_states_image=clip,
            condition_latents=s["driving_condition"],
            kv_cache=kv_cache,
            kv_cache_mode="extract",
            seq_len=ref_frames * (h // ph) * (w // pw),
            offset_grid_sizes=grid_ref,
            return_dict=False,
        )
    # The in-context BlockMask is cached on the model per (latent frames, tokens per frame); build it eagerly.
    origin_area = [h * 8, w * 8]  # pixels (VAE stride 8)
    key = (_ANIMATE2_SEGMENT_FRAMES // 4 + 1, origin_area[0] * origin_area[1] // 256)
    if key not in model.block_masks:
        with _eager_block_masks(model):
            model.block_masks[key] = model.create_mask(*key, device)
    return {
        "hidden_states": s["noise"],
        "timestep": torch.full((batch_size,), float(timestep), device=device),
        "encoder_hidden_states": s["prompt"],
        "condition_latents": s["reference_latents"],
        "kv_cache": kv_cache,
        "kv_cache_mode": "cached",
        "seq_len": gen_frames * (h // ph) * (w // pw),
        "encoder_hidden_states_image": clip,
        "reference_grid_sizes": grid_ref,
        "origin_len": _ANIMATE2_SEGMENT_FRAMES,
        "origin_area": origin_area,
        "is_uncondtion": False,
    }


_WAN_ANIMATE2 = TinyModel(
    family="wan_animate2",
    class_name="WanAnimate2Transformer3DModel",
    config={
        "patch_size": (1, 2, 2),
        "text_len": 2 * _TEXT_LEN,  # prompts are zero-padded to this many tokens inside the model (512 real)
        "in_dim": 2 * _C + 4,  # noise + [i2v mask (4), condition latents]; 36 in the real model
        "dim": _INNER,
        "ffn_dim": 2 * _INNER,
        "freq_dim": 32,
        "text_dim": _TEXT_DIM,
        "out_dim": _C,
        "num_heads": _HEADS,
        "num_layers": 4,
        "cross_attn_norm": True,
        "use_img_emb": True,  # CLIP projection MLPProj(1280, dim): 1.7M of the parameters
    },
    latent_frames=(_ANIMATE2_SEGMENT_FRAMES - 1) // 4 + 2,
    block_lists=("blocks",),
    make_inputs=_wan_animate2_inputs,
    notes=(
        "Per-sample lists, not batched tensors: hidden_states, encoder_hidden_states and condition_latents are "
        "lists of (C, F, H, W) / (L, text_dim) tensors (the pipeline passes lists of one), and the output is "
        "(list of (C_out, F, H, W) tensors,) - no batch dim. Two kinds of forward call per segment: one "
        "kv_cache_mode='extract' call on the driving-video latents (fixed timestep 1, dense attention) that runs "
        "every block once and fills the WanAnimate2KVCache with each layer's pre-RoPE reference K/V (its output is "
        "discarded), then the denoising calls with kv_cache_mode='cached' (the observed call here): a caching "
        "wrapper must let extract calls through uncached. In cached mode the self-attention runs on the flex "
        "backend with a BlockMask cached in model.block_masks (built with torch.compile by create_mask; inputs() "
        "builds it eagerly instead): generation frame f attends to every generation token plus the reference "
        "tokens of frame f. blocks (len 4), block(hidden_states, kv_cache=layer cache, temb=..., "
        "encoder_hidden_states=..., rotary_emb=..., ...) -> bare tensor; the video tokens are the first positional "
        "argument; text separate (cross-attention cross_attn, plus an added K/V branch over the CLIP tokens). "
        "Between blocks nothing, except that with is_uncondtion=True (the CFG uncond branch) block 9 is skipped "
        "(not called at all; irrelevant with 4 layers). Tokens (B, F*H/2*W/2, 32) frame-major, 4 token frames x 64 "
        "(frame 0 = the reference image slot, frames 1-3 = the segment). Latent video: hidden_states[i] (C, F, H, "
        "W), frame dim 1 of each sample; temporal patch config.patch_size[0]. Self-attention submodule: self_attn "
        "(returns a tensor). Timestep argument: timestep (B,). check_entry.py reports 'batch 2 output shape' for this "
        "model only because its output is a list of per-sample tensors (first_tensor takes sample 0, which has no "
        "batch dim); by hand, per sample, it passes every check (batch-2 sample 0 matches batch 1 to 1e-6). Its "
        "first call in a process also exceeds 1 s: the first flex_attention call imports and traces torch's "
        "compile stack (seconds); later calls, extract pass included, take about 0.1 s."
    ),
)


# ----------------------------------------------------------------------------------------------------------------

ENTRIES: list[TinyModel] = [_WAN_VACE, _WAN_ANIMATE, _WAN_ANIMATE2, _CHRONOEDIT, _HELIOS, _ANYFLOW, _ANYFLOW_FAR]

EXCLUDED: dict[str, str] = {}
