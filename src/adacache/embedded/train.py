"""Train the embedded text-to-video model on the procedural domain: rectified flow, CFG dropout, EMA.

    adacache train --out runs/embedded                 # resumes from runs/embedded/checkpoint.pt if present
    adacache train --out runs/embedded --export DIR    # write the EMA weights as a diffusers pipeline folder

Everything is reproducible from the seed (data, initialisation, noise), and a resumed run is bit for bit the run
that never stopped: a checkpoint holds the models, their EMA, the optimizer, the step, the positions of the data
and noise streams and its own config, all taken at one step boundary. It is written atomically and read with
`torch.load(weights_only=True)` (tensors, dicts, lists, strings and numbers only), so a crafted file cannot run
code. Stopping (Ctrl-C, SIGTERM) saves the last complete step and re-raises. `export` replaces only a folder that
an earlier export wrote, and never in place.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fnmatch
import json
import logging
import math
import os
import re
import shutil
import signal
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from ..interrupts import sigterm_as_interrupt

logger = logging.getLogger(__name__)

# Named sizes (DiT-style). "small" is the shipped model; "tiny" is for tests and smoke runs.
MODEL_SIZES = {
    "tiny": dict(layers=2, heads=2, head_dim=16, text_dim=16),  # two blocks: a first-block cache needs a rest
    "small": dict(layers=6, heads=4, head_dim=32, text_dim=64),
    # the second shipped model (`from_embedded("deep")`): as deep as a real video DiT's stack is long (24 blocks),
    # narrow enough to train on two CPU cores (1.6 s a step at batch 16, against 1.1 s for "small")
    "deep": dict(layers=24, heads=2, head_dim=32, text_dim=64),
}
# Transformer families the embedded model can be built from, all diffusers classes. "wan" (3D attention over all
# frames, 3D RoPE, text cross-attention in every block) is the first shipped model; "cogvideox" (text and video
# tokens in one joint attention, blocks that update both streams, 3D sin-cos positions) the deep one; "latte"
# (spatial and temporal blocks, text only in the spatial ones) learned colour, shape and speed but not direction in
# 5,200 steps (README).
ARCHITECTURES = ("wan", "latte", "cogvideox")

# The `adacache train` flag of each config field, so that an error names what to change.
_FLAGS = {"size": "--size", "architecture": "--architecture", "seed": "--seed", "steps": "--steps",
          "batch_size": "--batch-size", "lr": "--lr", "eval_every": "--eval-every", "threads": "--threads",
          "init_from": "--init-from", "sigma_mean": "--sigma-mean"}


@dataclass
class TrainConfig:
    size: str = "small"  # a key of MODEL_SIZES
    architecture: str = "wan"  # one of ARCHITECTURES
    seed: int = 0  # >= 0 (numpy's generators take no negative seed)
    steps: int = 4000  # total optimizer steps (the shipped model: 4000); more = better motion, linear in time
    batch_size: int = 16  # clips per step; larger = smoother gradients, slower steps (2x steps beat 2x batch here)
    lr: float = 1e-3  # AdamW peak learning rate (tiny models take a high one): linear warm-up, cosine to lr/10
    warmup: int = 200  # steps of linear warm-up (0 = none)
    ema: float = 0.999  # EMA decay of the weights that get evaluated and shipped, in [0, 1)
    cfg_dropout: float = 0.1  # share of captions replaced by the empty one, so CFG has an unconditional model
    checkpoint_every: int = 200  # steps between saves; a stop saves too, so this bounds only what a kill loses
    eval_every: int = 500  # verifier check of the EMA model on a few prompts (0 = never)
    eval_prompts: int = 12
    eval_steps: int = 20
    threads: int = 2
    # A fourth input channel telling each frame's place in time (pipeline.with_frame_channel): without it the Wan
    # model, nearly symmetric under time reversal, learns the axis of motion but not its sign. Checkpoints from
    # before this field have none.
    frame_channel: bool = True
    # A checkpoint whose weights (EMA and raw) start this run instead of random ones; its optimizer state is not
    # taken (a fresh AdamW, warm-up and schedule from step 0). A model without the frame channel gains it with
    # zero weights, so the run starts from exactly the old model's function.
    init_from: str | None = None
    # Location of the logit-normal noise levels trained on: 0 centres them on sigma 0.5 (SD3's choice); 1 trains
    # a third of the steps above sigma 0.8 (instead of 8%), where the trajectory of the object is decided.
    sigma_mean: float = 0.0

    def __post_init__(self) -> None:
        """Refuse a value that would fail late (a zero batch after the folder is made, a zero `checkpoint_every`
        at the first save) or train nonsense, naming the field, its flag and what it takes."""
        problems = []
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if field.type == "int" and (not isinstance(value, int) or isinstance(value, bool)):
                problems.append(f"{field.name} must be an integer, got {value!r}")
            elif field.type == "float" and (not isinstance(value, (int, float)) or isinstance(value, bool)
                                            or not math.isfinite(value)):
                problems.append(f"{field.name} must be a finite number, got {value!r}")
            elif field.type == "str" and not isinstance(value, str):
                problems.append(f"{field.name} must be a string, got {value!r}")
            elif field.type == "bool" and not isinstance(value, bool):
                problems.append(f"{field.name} must be true or false, got {value!r}")
            elif field.type == "str | None" and value is not None and not isinstance(value, str):
                problems.append(f"{field.name} must be a path or None, got {value!r}")
        if not problems:
            ranges = {
                "seed": self.seed >= 0, "steps": self.steps >= 1, "batch_size": self.batch_size >= 1,
                "lr": self.lr > 0, "warmup": self.warmup >= 0, "ema": 0 <= self.ema < 1,
                "cfg_dropout": 0 <= self.cfg_dropout <= 1, "checkpoint_every": self.checkpoint_every >= 1,
                "eval_every": self.eval_every >= 0, "eval_prompts": self.eval_prompts >= 1,
                "eval_steps": self.eval_steps >= 1, "threads": 1 <= self.threads <= 256,
            }
            wanted = {"seed": ">= 0", "threads": "from 1 to 256", "lr": "> 0", "warmup": ">= 0", "ema": "in [0, 1)", "cfg_dropout": "in [0, 1]",
                      "eval_every": ">= 0 (0 = never)"}
            problems += [f"{name} must be {wanted.get(name, '>= 1')}, got {getattr(self, name)!r}"
                         for name, ok in ranges.items() if not ok]
            if self.size not in MODEL_SIZES:
                problems.append(f"size must be one of {', '.join(MODEL_SIZES)}, got {self.size!r}")
            if self.architecture not in ARCHITECTURES:
                problems.append(f"architecture must be one of {', '.join(ARCHITECTURES)}, got {self.architecture!r}")
        if problems:
            flagged = [p + (f" ({_FLAGS[p.split()[0]]})" if p.split()[0] in _FLAGS else "") for p in problems]
            raise ValueError("bad training config: " + "; ".join(flagged))


def build_pipeline(size: str = "small", seed: int = 0, architecture: str = "wan", frame_channel: bool = True):
    """A fresh, randomly initialised embedded pipeline of a named size and architecture; `frame_channel` adds the
    input channel that tells each frame's place in time (see TrainConfig)."""
    from diffusers import (CogVideoXTransformer3DModel, FlowMatchEulerDiscreteScheduler, LatteTransformer3DModel,
                           WanTransformer3DModel)

    from .domain import FRAMES, SIZE, VOCABULARY
    from .pipeline import RGB, EmbeddedVideoPipeline
    from .text_encoder import VocabTextEncoder

    if size not in MODEL_SIZES:
        raise ValueError(f"unknown model size {size!r}; known: {', '.join(MODEL_SIZES)}")
    if architecture not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {architecture!r}; known: {', '.join(ARCHITECTURES)}")
    dims = MODEL_SIZES[size]
    inner = dims["heads"] * dims["head_dim"]
    in_channels = RGB + int(frame_channel)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if architecture == "wan":
            transformer = WanTransformer3DModel(
                patch_size=(1, 2, 2), num_attention_heads=dims["heads"], attention_head_dim=dims["head_dim"],
                in_channels=in_channels, out_channels=RGB, text_dim=dims["text_dim"], freq_dim=64, ffn_dim=4 * inner,
                num_layers=dims["layers"], cross_attn_norm=True, qk_norm="rms_norm_across_heads",
                rope_max_seq_len=max(FRAMES, SIZE) * 2,
            )
        elif architecture == "cogvideox":  # takes and returns (B, T, C, H, W): pipeline.predict_velocity permutes
            transformer = CogVideoXTransformer3DModel(
                num_attention_heads=dims["heads"], attention_head_dim=dims["head_dim"], in_channels=in_channels,
                out_channels=RGB, time_embed_dim=inner, text_embed_dim=dims["text_dim"], num_layers=dims["layers"],
                sample_width=SIZE, sample_height=SIZE, sample_frames=FRAMES, patch_size=2,
                temporal_compression_ratio=1, max_text_seq_length=8, use_rotary_positional_embeddings=False,
            )
        else:
            transformer = LatteTransformer3DModel(
                num_attention_heads=dims["heads"], attention_head_dim=dims["head_dim"], in_channels=in_channels,
                out_channels=RGB, num_layers=dims["layers"], cross_attention_dim=inner,
                caption_channels=dims["text_dim"], sample_size=SIZE, patch_size=2, video_length=FRAMES,
                norm_type="ada_norm_single", activation_fn="gelu-approximate", num_embeds_ada_norm=1000,
            )
        text_encoder = VocabTextEncoder(vocabulary=list(VOCABULARY), dim=dims["text_dim"], max_length=8)
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0)
    return EmbeddedVideoPipeline(transformer=transformer, text_encoder=text_encoder, scheduler=scheduler)


def rectified_flow_loss(pipe, clips: torch.Tensor, captions: list[str], generator: torch.Generator,
                        sigma_mean: float = 0.0) -> torch.Tensor:
    """clips (B, T, 3, H, W) in [0, 1]. x_t = (1 - s) x0 + s noise, the model predicts noise - x0 at t = 1000 s,
    with s logit-normal as in SD3 / Open-Sora 1.2, centred at sigmoid(sigma_mean)."""
    from .pipeline import predict_velocity

    x0 = clips.permute(0, 2, 1, 3, 4) * 2 - 1  # (B, 3, T, H, W) in [-1, 1]
    noise = torch.randn(x0.shape, generator=generator)
    sigma = torch.sigmoid(torch.randn(x0.shape[0], generator=generator) + sigma_mean)
    s = sigma.view(-1, 1, 1, 1, 1)
    x_t = (1 - s) * x0 + s * noise
    text = pipe.text_encoder(pipe.text_encoder.tokenize(captions))
    velocity = predict_velocity(pipe.transformer, x_t, sigma * 1000, text)  # (B, 3, T, H, W)
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



# What a checkpoint holds, besides the optional "streams" (positions of the random streams; older checkpoints lack
# them and resume by reseeding from the step).
CHECKPOINT_KEYS = ("config", "step", "optimizer", "transformer", "text_encoder", "ema_transformer", "ema_text_encoder")
_CHECKPOINT_IS = ("a checkpoint.pt written by `adacache train`: a dict of the state dicts of the models, their EMA "
                  "and the optimizer, the step and the config, readable by torch.load(weights_only=True)")


def load_checkpoint(path: str | os.PathLike) -> tuple[dict, TrainConfig]:
    """Read a training checkpoint safely: `(state, its TrainConfig)`.

    `weights_only=True` rebuilds only tensors, dicts, lists, strings and numbers, which is all a checkpoint holds;
    a pickle naming any other Python object (the way a crafted file runs code) is refused before it is built.
    Anything that is not a checkpoint (another file, a damaged one, a dict without our keys) is a ValueError that
    names the file and says what was expected, not an unpickler's traceback.
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path} {'is a folder' if path.is_dir() else 'does not exist'}; expected {_CHECKPOINT_IS}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # garbage gives KeyError or UnpicklingError, a damaged zip RuntimeError, ...
        named = re.search(r"Unsupported global: GLOBAL (\S+)", str(error))
        why = (f"it names the Python object {named.group(1)}, which no checkpoint holds (refused unbuilt)" if named
               else f"{type(error).__name__}: {' '.join(str(error).split())[:200]}")
        raise ValueError(f"{path} is not a training checkpoint ({why}); expected {_CHECKPOINT_IS}") from error
    if not isinstance(state, dict):
        raise ValueError(f"{path} holds a {type(state).__name__}, not a dict; expected {_CHECKPOINT_IS}")
    missing = [key for key in CHECKPOINT_KEYS if key not in state]
    if missing:
        raise ValueError(f"{path} lacks {', '.join(missing)}; expected {_CHECKPOINT_IS}")
    wrong = [key for key in CHECKPOINT_KEYS if key != "step" and not isinstance(state[key], dict)]
    if wrong:
        raise ValueError(f"{path} holds {', '.join(wrong)} as something other than a dict; expected {_CHECKPOINT_IS}")
    if not isinstance(state["step"], int) or isinstance(state["step"], bool) or state["step"] < 0:
        raise ValueError(f"{path} holds step {state['step']!r}, not an integer >= 0; expected {_CHECKPOINT_IS}")
    try:
        # checkpoints from before these choices: the Latte architecture, no frame channel
        config = TrainConfig(**{"architecture": "latte", "frame_channel": False, **state["config"]})
    except (TypeError, ValueError) as error:
        raise ValueError(f"{path} holds a config `adacache train` cannot use ({error}); expected {_CHECKPOINT_IS}"
                         ) from error
    return state, config


def _initialise_from(path: str, config: TrainConfig, pipe, ema) -> None:
    """Start a run from another checkpoint's weights (raw into `pipe`, EMA into `ema`), not its optimizer. The
    input projection may gain the frame channel: its new input weights are zero, so the model computes exactly
    what the old one did until training moves them."""
    state, source = load_checkpoint(path)
    if (source.size, source.architecture) != (config.size, config.architecture):
        raise ValueError(f"--init-from {path} holds a {source.size} {source.architecture} model, not {config.size} "
                         f"{config.architecture}; pass matching --size/--architecture")
    if source.frame_channel and not config.frame_channel:
        raise ValueError(f"--init-from {path} has the frame channel; this run has none")
    for target, key in ((pipe.transformer, "transformer"), (pipe.text_encoder, "text_encoder"),
                        (ema.transformer, "ema_transformer"), (ema.text_encoder, "ema_text_encoder")):
        weights = dict(state[key])
        own = target.state_dict()
        for name, value in weights.items():
            wanted = own.get(name)
            if wanted is not None and value.dim() == wanted.dim() > 1 and value.shape[1] < wanted.shape[1] \
                    and value.shape[:1] + value.shape[2:] == wanted.shape[:1] + wanted.shape[2:]:
                grown = torch.zeros_like(wanted)  # the input projection gains the frame channel, weighted 0
                grown[:, : value.shape[1]] = value
                weights[name] = grown
        _load_states(Path(path), [(target, weights)])
    logger.info("initialised from the weights of %s (step %d)", path, state["step"])


def _load_states(path: Path, pairs: list[tuple[object, dict]]) -> None:
    """`load_state_dict` each (module or optimizer, state); a mismatch names the checkpoint instead of a bare
    RuntimeError listing hundreds of keys."""
    for target, state in pairs:
        try:
            target.load_state_dict(state)
        except (RuntimeError, ValueError, KeyError, TypeError) as error:
            first = " ".join(str(error).split())[:300] or type(error).__name__  # torch's message spans lines
            raise ValueError(f"{path} does not fit the {type(target).__name__} it was made for ({first}); "
                             f"expected {_CHECKPOINT_IS}") from error


class _Streams:
    """The random streams one step draws from: clip specs (numpy, as `domain.clip_batches` draws them), the noise
    and noise levels (torch), the caption dropout (torch).

    Their positions are part of the checkpoint, so a resumed run draws what the uninterrupted run would have drawn.
    `position()` is taken at each step boundary; a stop in the middle of a step saves the boundary's, not the live
    one that the step already consumed from.
    """

    def __init__(self, seed: int, step: int) -> None:
        base = seed * 1_000_003 + step  # older checkpoints (no saved positions) restart the streams from here
        self.clips = np.random.default_rng(base)
        self.noise = torch.Generator().manual_seed(base + 1)
        self.dropout = torch.Generator().manual_seed(base + 2)

    def next_batch(self, batch_size: int) -> tuple[torch.Tensor, list[str]]:
        from .domain import render_batch, sample_clip_spec

        specs = [sample_clip_spec(self.clips) for _ in range(batch_size)]
        return render_batch(specs), [spec.caption() for spec in specs]  # (B, T, 3, H, W), B captions

    def position(self) -> dict:
        return {"clips": self.clips.bit_generator.state, "noise": self.noise.get_state(),
                "dropout": self.dropout.get_state()}

    def restore(self, position: object, path: Path) -> None:
        try:
            self.clips.bit_generator.state = position["clips"]
            self.noise.set_state(position["noise"])
            self.dropout.set_state(position["dropout"])
        except (TypeError, ValueError, KeyError, RuntimeError) as error:
            raise ValueError(f"{path} holds stream positions this version cannot restore ({error}); "
                             f"expected {_CHECKPOINT_IS}") from error


@contextlib.contextmanager
def _interrupts_held() -> Iterator[None]:
    """Hold Ctrl-C and SIGTERM until the block is done, then deliver them as they would have been delivered.

    For statements that must run all or none: a step's update (an AdamW step is several kernels over weights and
    moments, then the EMA, then the step count) and a log line with its bookkeeping. An exception raised between
    them leaves a state that no step number describes. Outside the main thread (no handlers there) or under a
    handler Python did not install, the block runs unchanged.
    """
    numbers = (signal.SIGINT, signal.SIGTERM)
    if threading.current_thread() is not threading.main_thread() or None in map(signal.getsignal, numbers):
        yield
        return
    held: list[int] = []

    def hold(signum, frame):
        held.append(signum)

    previous = {number: signal.signal(number, hold) for number in numbers}
    try:
        yield
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)
        for number in dict.fromkeys(held):
            # to the handler it would have met: KeyboardInterrupt, `Terminated`, or SIGTERM's default exit
            signal.raise_signal(number)


def _trim_log(path: Path, last_step: int) -> None:
    """Cut log.jsonl back to the checkpoint's step, rewriting it atomically (only when something goes).

    A run that lost its last save (killed, or stopped inside an update) logged steps the resumed run trains again;
    kept, they would appear twice. A last line without its newline was cut by a kill mid-write and goes too. Any
    other line that is not a record is an error: the folder's log is then not ours to rewrite.
    """
    if not path.exists():
        return
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise ValueError(f"{path} is not the text log `adacache train` writes ({error}); move it away or pass "
                         f"another --out") from error
    lines = text.splitlines()
    kept, dropped = [], 0
    for number, line in enumerate(lines, 1):
        try:
            record = json.loads(line) if line.strip() else None
        except json.JSONDecodeError:
            record = None
        is_record = isinstance(record, dict) and isinstance(record.get("step"), int)
        if not is_record and not line.strip():
            continue
        if not is_record:
            if number == len(lines) and not text.endswith("\n"):
                dropped += 1
                continue
            raise ValueError(f"{path} line {number} is not a record of `adacache train` ({line[:80]!r}); mend or "
                             f"remove that line, or pass another --out")
        if record["step"] <= last_step:
            kept.append(line)
        else:
            dropped += 1
    new_text = "".join(line + "\n" for line in kept)
    if new_text == text:
        return
    if dropped:
        logger.warning("%s: dropping %d line(s) past step %d, which the checkpoint does not hold; those steps "
                       "are trained again", path, dropped, last_step)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(new_text)
    os.replace(tmp, path)


def _check_run_folder(out: Path, config: TrainConfig) -> dict | None:
    """Refuse a run folder we would damage or fail on late; return its checkpoint's state (None for a new run)."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file; pass a folder (it holds checkpoint.pt and log.jsonl)")
    for name in ("checkpoint.pt", "log.jsonl"):
        if (out / name).exists() and not (out / name).is_file():
            raise ValueError(f"{out / name} is not a file; move it away or pass another --out")
    checkpoint_path = out / "checkpoint.pt"
    if not checkpoint_path.exists():
        return None
    state, saved = load_checkpoint(checkpoint_path)
    if saved.architecture != config.architecture or saved.size != config.size:
        raise ValueError(
            f"{checkpoint_path} holds a {saved.size} {saved.architecture} model, not {config.size} "
            f"{config.architecture}; pass matching --size/--architecture or another --out folder"
        )
    if saved.seed != config.seed:
        raise ValueError(f"{checkpoint_path} was trained from seed {saved.seed}, not {config.seed}; pass --seed "
                         f"{saved.seed} to resume it, or another --out to start from seed {config.seed}")
    if state["step"] > config.steps:
        raise ValueError(f"{checkpoint_path} is already at step {state['step']}, past --steps {config.steps}; pass "
                         f"--steps {state['step']} or more to resume (the cosine schedule stretches to the new "
                         f"total), or export it with --export DIR")
    if dataclasses.replace(saved, steps=config.steps) != config:
        logger.warning("resuming with a config that differs from the checkpoint's: %s vs %s", config, saved)
    return state


def train(out_dir: str | os.PathLike, config: TrainConfig, progress: bool = True) -> Path:
    """Train (or resume) into out_dir; returns the checkpoint path.

    Stopping: Ctrl-C (KeyboardInterrupt) and SIGTERM (`interrupts.Terminated`) save the last complete step, then
    propagate, so the CLI can exit 130 or 143. One that arrives during a step's update is held until the update is
    done (`_interrupts_held`): saved half-way, weights and Adam state would be one update ahead of the recorded
    step, and resuming would apply that update twice. If the update itself raises, the state in memory lies
    between two steps and is not saved; the checkpoint on disk stands, and the next resume trains from it, with
    log lines past it dropped (`_trim_log`).
    """
    from ..extras import need

    tqdm = need("tqdm.auto", "Training the embedded model").tqdm
    out = Path(out_dir)
    state = _check_run_folder(out, config)  # before anything is written
    try:
        out.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError) as error:
        raise ValueError(f"cannot make the run folder --out {out}: a part of its path is a file ({error})") from error
    checkpoint_path, log_path = out / "checkpoint.pt", out / "log.jsonl"
    torch.set_num_threads(config.threads)
    pipe = build_pipeline(config.size, config.seed, config.architecture, config.frame_channel)
    ema = build_pipeline(config.size, config.seed, config.architecture, config.frame_channel)
    params = [*pipe.transformer.parameters(), *pipe.text_encoder.parameters()]
    optimizer = torch.optim.AdamW(params, lr=config.lr, betas=(0.9, 0.99), weight_decay=0.0)
    step = 0
    streams = _Streams(config.seed, 0)
    if state is not None:
        _load_states(checkpoint_path, [
            (pipe.transformer, state["transformer"]), (pipe.text_encoder, state["text_encoder"]),
            (ema.transformer, state["ema_transformer"]), (ema.text_encoder, state["ema_text_encoder"]),
            (optimizer, state["optimizer"]),
        ])
        step = state["step"]
        streams = _Streams(config.seed, step)
        if "streams" in state:
            streams.restore(state["streams"], checkpoint_path)
        logger.info("resumed from %s at step %d", checkpoint_path, step)
        del state
    elif config.init_from is not None:
        _initialise_from(config.init_from, config, pipe, ema)
    _trim_log(log_path, step)
    ema_params = [*ema.transformer.parameters(), *ema.text_encoder.parameters()]
    boundary = streams.position()  # the streams at the start of step `step`: what a save records
    saved_step = step  # the step of the checkpoint on disk (0: none)
    logged_step = step  # the last step in log.jsonl
    mid_update = False  # True while an update is part-applied: nothing may be saved then
    record: dict = {}

    def save() -> None:
        nonlocal saved_step
        state = {
            "config": dataclasses.asdict(config), "step": step, "optimizer": optimizer.state_dict(),
            "transformer": pipe.transformer.state_dict(), "text_encoder": pipe.text_encoder.state_dict(),
            "ema_transformer": ema.transformer.state_dict(), "ema_text_encoder": ema.text_encoder.state_dict(),
            "streams": boundary,
        }
        tmp = checkpoint_path.with_suffix(".tmp")
        try:
            torch.save(state, tmp)
            os.replace(tmp, checkpoint_path)
        finally:
            tmp.unlink(missing_ok=True)  # a save cut short leaves the previous checkpoint and no debris
        saved_step = step

    log = log_path.open("a")
    start = time.time()
    pipe.transformer.train(), pipe.text_encoder.train()
    bar = tqdm(total=config.steps, initial=step, desc="training", disable=not progress)
    try:
        with sigterm_as_interrupt():
            try:
                while step < config.steps:
                    clips, captions = streams.next_batch(config.batch_size)
                    drop = torch.rand(len(captions), generator=streams.dropout) < config.cfg_dropout
                    captions = ["" if d else c for c, d in zip(captions, drop)]
                    # linear warm-up, then cosine decay to a tenth of the peak at the last step
                    decayed = max(0.0, (step - config.warmup) / max(1, config.steps - config.warmup))
                    lr = (config.lr * min(1.0, (step + 1) / max(1, config.warmup))
                          * (0.55 + 0.45 * math.cos(math.pi * decayed)))
                    for group in optimizer.param_groups:
                        group["lr"] = lr
                    loss = rectified_flow_loss(pipe, clips, captions, streams.noise, config.sigma_mean)
                    if not torch.isfinite(loss):  # an update from it would make every weight NaN, silently
                        raise FloatingPointError(
                            f"the loss of step {step + 1} is {loss.item()}; training stops before updating, so "
                            f"{checkpoint_path} keeps the last finite state (if it is itself damaged, train "
                            f"from an earlier copy or a new --out)"
                        )
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    grad_norm = torch.nn.utils.clip_grad_norm_(params, 1.0)
                    record = {"step": step + 1, "loss": loss.item(), "grad_norm": float(grad_norm), "lr": lr,
                              "seconds": round(time.time() - start, 1)}
                    with _interrupts_held():  # the update: weights, Adam state, EMA, step and streams, all or none
                        mid_update = True
                        optimizer.step()
                        decay = min(config.ema, (1 + step) / (10 + step))
                        with torch.no_grad():
                            torch._foreach_lerp_(ema_params, params, 1 - decay)
                        step += 1
                        boundary = streams.position()
                        mid_update = False
                    bar.update(1)
                    bar.set_postfix(loss=f"{record['loss']:.4f}")
                    if config.eval_every and step % config.eval_every == 0:
                        ema.transformer.eval(), ema.text_encoder.eval()
                        ema.set_progress_bar_config(disable=True)
                        record["eval"] = evaluate(ema, config.eval_prompts, config.eval_steps)
                        bar.write(f"step {step}: verifier on {config.eval_prompts} prompts {record['eval']}")
                    with _interrupts_held():
                        log.write(json.dumps(record) + "\n")
                        log.flush()
                        logged_step = step
                    if step % config.checkpoint_every == 0 or step == config.steps:
                        save()
            finally:
                if mid_update:
                    logger.warning("stopped inside the update of step %d: the state in memory lies between two "
                                   "steps and is not saved; %s", step + 1,
                                   f"{checkpoint_path} (step {saved_step}) stands" if saved_step
                                   else "no checkpoint was written yet")
                else:
                    if logged_step < step:  # stopped in the step's evaluation: log the step without it
                        log.write(json.dumps(record) + "\n")
                        logged_step = step
                    if step != saved_step:
                        save()  # an interrupted run keeps what it did
    finally:
        bar.close()
        log.close()
    return checkpoint_path


# What `export` writes, so what an earlier export may hold: these top-level files, and in each component folder
# only files matching its patterns (fnmatch). An earlier export is a folder with a model_index.json naming
# EmbeddedVideoPipeline, a training.json with a "step", and nothing else but these and the companions.
_EXPORT_FILES = ("model_index.json", "training.json")
_EXPORT_COMPONENTS = {
    "transformer": ("config.json", "diffusion_pytorch_model*.safetensors", "diffusion_pytorch_model*.index.json"),
    "text_encoder": ("config.json", "diffusion_pytorch_model*.safetensors", "diffusion_pytorch_model*.index.json"),
    "scheduler": ("scheduler_config.json",),
}
# Files people add next to exported weights that the pipeline reads: cache configs from `adacache calibrate`
# (pipeline.tuned_config). They survive a re-export, copied into the new folder.
_EXPORT_COMPANIONS = ("adacache*.json",)


def _read_json(path: Path) -> object:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _check_export_destination(folder: Path) -> list[str]:
    """Refuse a destination `export` would destroy; return the companion files to carry over.

    Allowed: a path that does not exist, an empty folder, or an earlier export (see `_EXPORT_FILES`). Anything
    else, a file or someone's folder, is a ValueError that lists what is in the way; nothing is deleted.
    """
    if folder.is_symlink():
        raise ValueError(f"export folder {folder} is a symbolic link; pass the folder it points to")
    if not folder.exists():
        return []
    if not folder.is_dir():
        raise ValueError(f"export folder {folder} is a file; pass a new folder, an empty one or an earlier export")
    entries = sorted(folder.iterdir())
    if not entries:
        return []
    index, training = _read_json(folder / "model_index.json"), _read_json(folder / "training.json")
    is_export = (isinstance(index, dict) and index.get("_class_name") == "EmbeddedVideoPipeline"
                 and isinstance(training, dict) and isinstance(training.get("step"), int))
    if not is_export:
        raise ValueError(
            f"export folder {folder} is neither empty nor an earlier export (a model_index.json of an "
            f"EmbeddedVideoPipeline and a training.json), and export replaces the whole folder; pass a new or empty "
            f"folder, or move its contents away"
        )
    unexpected, companions = [], []
    for entry in entries:
        if entry.is_symlink():
            unexpected.append(entry.name)
        elif entry.name in _EXPORT_FILES and entry.is_file():
            pass
        elif entry.name in _EXPORT_COMPONENTS and entry.is_dir():
            patterns = _EXPORT_COMPONENTS[entry.name]
            unexpected += [f"{entry.name}/{child.name}" for child in sorted(entry.iterdir())
                           if child.is_symlink() or not child.is_file()
                           or not any(fnmatch.fnmatchcase(child.name, p) for p in patterns)]
        elif entry.is_file() and any(fnmatch.fnmatchcase(entry.name, p) for p in _EXPORT_COMPANIONS):
            companions.append(entry.name)
        else:
            unexpected.append(entry.name)
    if unexpected:
        shown = ", ".join(unexpected[:8]) + (f" and {len(unexpected) - 8} more" if len(unexpected) > 8 else "")
        raise ValueError(f"export folder {folder} is an earlier export but also holds {shown}, which a re-export "
                         f"would lose; move them away or pass another folder")
    return companions


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _swap_in(new: Path, folder: Path) -> None:
    """Put the complete export `new` at `folder` by renames only, so `folder` never holds a half-written export.

    An existing `folder` is first renamed into a fresh backup folder beside it, then `new` is renamed into place
    and the backup deleted; if that second rename fails the backup is renamed back. Between the two renames
    (signals held) `folder` is briefly absent; a kill exactly then leaves the earlier export in `.NAME.previous-*`.
    """
    with _interrupts_held():
        if not folder.exists():
            os.replace(new, folder)
            return
        backup_root = Path(tempfile.mkdtemp(prefix=f".{folder.name}.previous-", dir=folder.parent))
        backup = backup_root / folder.name
        os.replace(folder, backup)
        try:
            os.replace(new, folder)
        except BaseException:
            os.replace(backup, folder)
            backup_root.rmdir()
            raise
    shutil.rmtree(backup_root)  # the earlier export: checked to hold nothing the new one lacks


def export(checkpoint: str | os.PathLike, folder: str | os.PathLike) -> Path:
    """Write the checkpoint's EMA weights as a diffusers pipeline folder (safetensors + configs).

    `folder` may be new, empty, or an earlier export (`_check_export_destination`); anything else is refused,
    nothing of the user's is deleted. The export is written to a fresh temporary folder beside `folder` and
    swapped in whole (`_swap_in`), so an existing export stays complete until the new one is, and a failed or
    interrupted export leaves it as it was. Cache configs next to earlier weights (adacache*.json) are kept.
    """
    folder = Path(os.path.abspath(folder))
    _check_export_destination(folder)  # first, so a refusal costs nothing
    state, config = load_checkpoint(checkpoint)
    pipe = build_pipeline(config.size, config.seed, config.architecture)
    _load_states(Path(checkpoint), [(pipe.transformer, state["ema_transformer"]),
                                    (pipe.text_encoder, state["ema_text_encoder"])])
    parent = folder.parent
    if parent.exists() and not parent.is_dir():
        raise ValueError(f"cannot export into {folder}: {parent} is a file")
    parent.mkdir(parents=True, exist_ok=True)
    with sigterm_as_interrupt():
        new = Path(tempfile.mkdtemp(prefix=f".{folder.name}.export-", dir=parent))
        try:
            os.chmod(new, 0o777 & ~_umask())  # mkdtemp makes 0700; an export is shared like any folder
            pipe.save_pretrained(new, safe_serialization=True)
            (new / "training.json").write_text(json.dumps({"step": state["step"], **dataclasses.asdict(config)},
                                                          indent=2))
            companions = _check_export_destination(folder)  # again: it may have changed while we wrote
            for name in companions:
                shutil.copy2(folder / name, new / name)
            _swap_in(new, folder)
        except BaseException:
            shutil.rmtree(new, ignore_errors=True)  # ours, made above; gone already when the swap succeeded
            raise
    if companions:
        logger.warning("kept %s in %s: cache configs calibrated on the earlier weights; re-run `adacache "
                       "calibrate` for these", ", ".join(companions), folder)
    return folder
