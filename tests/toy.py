"""Toy DiTs with hand-computable outputs, a minimal denoising loop to drive them, and the decision after a computed
step taken as the hooks take it."""

from __future__ import annotations

import torch
from torch import nn

from adacache import BlockList, BlockSpec, ModelSpec


class DoublingBlock(nn.Module):
    """out = hidden_states + attn1(hidden_states) + t * offset = 2 x + t c: exact in floating point for small ints."""

    def __init__(self, offset: float) -> None:
        super().__init__()
        self.attn1 = nn.Identity()
        self.register_buffer("offset", torch.tensor(offset))
        self.calls = 0
        self.poison_at: float | None = None  # timestep at which to return NaN

    def forward(self, hidden_states: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        out = hidden_states + self.attn1(hidden_states) + temb * self.offset
        if self.poison_at is not None and float(temb.max()) == self.poison_at:
            out = out * float("nan")
        return out


class ToyDiT(nn.Module):
    """hidden_states (B, T*S, C) -> blocks -> out. Stack: 2^L x + t * sum_i 2^(L-1-i) c_i."""

    def __init__(self, num_blocks: int = 4) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(DoublingBlock(float(i + 1)) for i in range(num_blocks))

    def forward(self, hidden_states: torch.Tensor, timestep: torch.Tensor, num_frames: int = 1) -> torch.Tensor:
        temb = timestep.reshape(-1, 1, 1).to(hidden_states.dtype)
        for block in self.blocks:
            hidden_states = block(hidden_states, temb)
        return hidden_states


TOY_SPEC = ModelSpec(block_lists=(BlockList("blocks"),), frames_argument="num_frames", frames_dim=None)


class TableBlock(nn.Module):
    """Adds a residual looked up by timestep: lets a test dictate the probe residual at every step."""

    def __init__(self, table: dict[float, torch.Tensor]) -> None:
        super().__init__()
        self.table = table

    def forward(self, hidden_states: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        return hidden_states + self.table[float(temb.max())]


class TableDiT(ToyDiT):
    def __init__(self, table: dict[float, torch.Tensor], num_blocks: int = 3) -> None:
        nn.Module.__init__(self)
        self.blocks = nn.ModuleList(TableBlock(table) for _ in range(num_blocks))


# --- Open-Sora v1.2 STDiT3-shaped: spatial and temporal blocks interleaved, tokens (B, T*S, C) -------------------
class STDiT3Block(nn.Module):
    """Attention over space (within a frame) or time (across frames), adaLN-style gate from t, then an MLP."""

    def __init__(self, dim: int, temporal: bool) -> None:
        super().__init__()
        self.temporal = temporal
        self.attn = nn.MultiheadAttention(dim, 2, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))
        self.gate = nn.Linear(dim, 2 * dim)

    def forward(self, x: torch.Tensor, t: torch.Tensor, T: int, S: int) -> torch.Tensor:
        B, _, C = x.shape  # (B, T*S, C)
        gate_attn, gate_mlp = self.gate(t).unsqueeze(1).chunk(2, dim=-1)
        if self.temporal:
            h = x.view(B, T, S, C).transpose(1, 2).reshape(B * S, T, C)  # (B*S, T, C)
        else:
            h = x.view(B * T, S, C)  # (B*T, S, C)
        h = self.attn(h, h, h, need_weights=False)[0]
        if self.temporal:
            h = h.view(B, S, T, C).transpose(1, 2)
        x = x + gate_attn * h.reshape(B, T * S, C)
        return x + gate_mlp * self.mlp(x)


class STDiT3Like(nn.Module):
    def __init__(self, depth: int = 3, dim: int = 16, channels: int = 4) -> None:
        super().__init__()
        self.x_embedder = nn.Linear(channels, dim)
        self.t_embedder = nn.Sequential(nn.Linear(1, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.spatial_blocks = nn.ModuleList(STDiT3Block(dim, temporal=False) for _ in range(depth))
        self.temporal_blocks = nn.ModuleList(STDiT3Block(dim, temporal=True) for _ in range(depth))
        self.final_layer = nn.Linear(dim, channels)

    def forward(self, x: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        B, C, T, H, W = x.shape
        S = H * W
        tokens = self.x_embedder(x.permute(0, 2, 3, 4, 1).reshape(B, T * S, C))  # (B, T*S, D)
        t = self.t_embedder(timestep.reshape(-1, 1).float() / 1000)
        for spatial, temporal in zip(self.spatial_blocks, self.temporal_blocks):
            tokens = spatial(tokens, t, T, S)
            tokens = temporal(tokens, t, T, S)
        out = self.final_layer(tokens)
        return out.view(B, T, H, W, C).permute(0, 4, 1, 2, 3)


STDIT3_SPEC = ModelSpec(
    block_lists=(
        BlockList("spatial_blocks", BlockSpec(hidden_states_argument="x", attention="attn", attention_layout="(bt)sc")),
        BlockList("temporal_blocks", BlockSpec(hidden_states_argument="x", attention="attn", attention_layout="(bs)tc")),
    ),
    interleave=True,
    frames_argument="x",
    frames_dim=2,
)


def timesteps(num_steps: int) -> list[float]:
    return [float(1000 - i * (1000 // num_steps)) for i in range(num_steps)]


def denoise(model, x, num_steps: int = 6, calls_per_step: int = 1, call=None, stop_after: int | None = None):
    """A rectified-flow-like loop: x <- x - 0.1 * model(x, t). Returns the list of per-step model outputs
    (for split CFG, the list of per-call outputs)."""
    call = call or (lambda m, x, t: m(x, torch.full((x.shape[0],), t)))
    outputs = []
    for i, t in enumerate(timesteps(num_steps)):
        if stop_after is not None and i >= stop_after:
            break
        step_outputs = [call(model, x, t) for _ in range(calls_per_step)]
        outputs.extend(step_outputs)
        x = x - 0.1 * step_outputs[0]
    return outputs


def decide_computed_step(schedule, step: int, probe: torch.Tensor, frames: int | None, sharded=None):
    """What the hooks do with a computed step's probe (`_Runtime._store_cache`): `measure` it against the last one,
    add the sums over the ranks under context parallelism (`sharded`, a `parallel.ShardedProbe`), `conclude`.
    Returns the step's record."""
    sums = schedule.measure(step, probe, frames)
    if sharded is not None:
        (sums,), _ = sharded.reduce_all([sums])
    return schedule.conclude(step, probe, sums)
