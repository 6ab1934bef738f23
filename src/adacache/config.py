"""AdaCacheConfig: every knob of Adaptive Caching, validated, with the authors' presets.

A config is a plain dataclass. It is checked when it is made, so a bad value fails at once with a message that
says how to fix it, never later inside a generation. Presets and codebook files load through the same class.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import numbers
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

# The authors' Open-Sora v1.2 codebooks (rectified flow), threshold -> cache rate, with their MoReg step windows.
# Thresholds are model- and step-count-specific: on another model, calibrate (or start from these and watch
# `get_stats`).
PRESETS: dict[str, dict[str, Any]] = {
    "opensora-100-fast": {
        "codebook": {0.03: 12, 0.05: 10, 0.07: 8, 0.09: 6, 0.11: 4, 1.00: 3},
        "moreg_window": (10, 90),
    },
    "opensora-30-fast": {
        "codebook": {0.08: 6, 0.16: 5, 0.24: 4, 0.32: 3, 0.40: 2, 1.00: 1},
        "moreg_window": (4, 26),
    },
    "opensora-30-slow": {
        "codebook": {0.08: 3, 0.16: 2, 0.24: 1, 0.32: 1, 0.40: 1, 1.00: 1},
        "moreg_window": (4, 26),
    },
    # The calibration-free default's named settings (no codebook: distances relative to the generation's own first
    # one, a compute budget of steps / speedup; see core/decision.py). "balanced" is AdaCacheConfig()'s.
    "quality": {"codebook": None, "speedup": 1.5},
    "balanced": {"codebook": None, "speedup": 2.0},
    "fast": {"codebook": None, "speedup": 3.0},
}
DEFAULT_PRESET = "opensora-30-fast"  # the authors' codebook: what paper_mode decides with when given none
DEFAULT_SPEEDUP = 2.0
MAX_SPEEDUP = 20.0

PROBE_POINTS = ("auto", "block", "attention")
STORES = ("reuse", "forecast")
BATCH_SCHEDULES = ("video", "row", "shared")


class ConfigError(ValueError):
    """A configuration value is invalid; the message says how to fix it."""


@dataclass
class AdaCacheConfig:
    """How AdaCache decides, per video and while generating, which denoising steps to compute.

    On a computed step every block runs and the stack's residual is kept; the next `rate - 1` steps reuse it.
    `rate` comes from the codebook, looked up with the probe distance (how much a mid-stack residual changed
    since the last computed step, per step of gap), optionally raised by motion regularization (MoReg).
    """

    # threshold -> rate, thresholds strictly ascending, in the model's own distance units (calibrated: `adacache
    # calibrate`, or the authors' presets for Open-Sora). The first threshold above the distance gives the rate;
    # distances beyond the last threshold take the last rate. Higher rates = faster, but more reuse error.
    # None (the default): no calibration; each video's distances are read relative to its own first one, and the
    # rates spend a compute budget of `speedup` (core/decision.py). paper_mode with None: the authors' 30-step fast
    # codebook.
    codebook: Mapping[float, int] | None = None
    # Without a codebook: the compute speed-up to aim at (steps / computed steps, on average over videos; a video
    # that changes or moves more gets more of the budget). Higher = faster, but more reuse error. Named settings:
    # the presets "quality" (1.5), "balanced" (2, the default), "fast" (3). Ignored with a codebook.
    speedup: float = DEFAULT_SPEEDUP
    # Motion regularization: multiply the distance by a motion score of the probe (frame-to-frame change) and its
    # gradient, so videos with more motion get more compute. Costs nothing measurable; slightly slower overall.
    moreg: bool = False
    # 1-based steps (first, last) inclusive where MoReg applies; None = from step 2 to N - round(N/10) (to N without
    # a codebook; paper mode: from max(2, round(N/10)), as the authors). See resolve_moreg_window.
    moreg_window: tuple[int, int] | None = None
    # Frame strides over which motion is measured; their scores are averaged. (1,) is the authors' default.
    moreg_strides: tuple[int, ...] = (1,)
    # With a codebook, MoReg score m = (raw / moreg_norm) ** moreg_power / moreg_divisor; authors' values
    # (0.385, 8, 1), fitted to Open-Sora (`adacache calibrate --moreg` measures a model's own moreg_norm). Without a
    # codebook MoReg needs none of these: it reads motion scale-free (core/decision.py, `scale_free_motion`).
    moreg_norm: float = 0.385
    moreg_power: float = 8.0
    moreg_divisor: float = 1.0
    # Weight of the motion gradient g = moreg_gradient_scale * (m - m_prev) / rate; the factor is m + |g|.
    moreg_gradient_scale: float = 10.0
    # Index (in call order over all cached blocks) of the block whose residual is the probe. None = mid-stack,
    # (num_blocks - 1) // 2, i.e. block 13 of 28 as in the authors' code. Earlier = cheaper to watch, less telling.
    probe_block: int | None = None
    # Where in the probe block to read: "block" (its output minus its input), "attention" (the output of its
    # attention module, as the authors do; diffusers blocks apply the adaLN gate after it), "auto" (attention
    # where the model spec names one, else block), or a submodule path inside the block such as "attn2".
    probe_point: str = "auto"
    # True: the authors' exact decisions (distance divided by the stored rate even where a forced step cut the
    # gap short; the step must equal last computed + rate). False: divide by the real gap; a step at or past
    # the planned one is computed (robust when the planned step's call never happens).
    paper_mode: bool = False
    # Only for pipelines that tell neither the step index nor the step count (no `cache_context`, no scheduler
    # known): the number of denoising steps, so the last two can be forced. Leave None otherwise.
    num_inference_steps: int | None = None
    # What a skipped step adds to the first cached block's input (core/store.py): "reuse" the residual of the last
    # computed step as it is (the paper's and the default), or "forecast" it, extrapolating the last two computed
    # residuals to the skipped step, first order in the step index (one more cached tensor per stream).
    store: str = "reuse"
    # With store="forecast": how far ahead the slope of the last two computed residuals is followed at most, in
    # units of their interval (0 = plain reuse; 1 = as far again). 0.5 measured best on the embedded model.
    forecast_reach: float = 0.5
    # Several videos in one call (several prompts, or several videos per prompt): "video" gives each video its own
    # schedule, so it computes the steps it would compute alone, and a step runs the blocks only on the videos that
    # compute it (the two CFG halves of a video batched in one call share its decision: a batch whose two halves
    # hold the same latents); "row" gives every batch row its own, CFG halves included; "shared" takes one
    # decision for the whole batch, as the authors' code does. None: "shared" in paper_mode, else "video".
    batch_schedule: str | None = None
    # Finished generations kept for `get_stats` (per transformer; each CFG branch counts apart, a batch's videos
    # together).
    stats_history: int = 8

    def __setattr__(self, name: str, value: Any) -> None:
        # Checked once, when made: a field changed afterwards would bypass the checks, or change the schedule of a
        # generation in progress on every model the config was applied to.
        if self.__dict__.get("_checked"):
            raise ConfigError(
                f"an AdaCacheConfig cannot be changed after it is made (setting {name!r}); make a new one with "
                f"dataclasses.replace(config, {name}=...) and apply that"
            )
        object.__setattr__(self, name, value)

    def __delattr__(self, name: str) -> None:
        raise ConfigError(f"an AdaCacheConfig cannot be changed after it is made (deleting {name!r}); make a new one "
                          "with dataclasses.replace(config, ...)")

    def __reduce__(self) -> tuple:
        # copies and pickles are made through __init__, so they are checked and read-only too
        fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        codebook = dict(self.codebook) if self.codebook is not None else None
        return _rebuild, (type(self), {**fields, "codebook": codebook})

    def __post_init__(self) -> None:
        if self.codebook is None and self.paper_mode:  # the authors decide with a codebook
            self.codebook = PRESETS[DEFAULT_PRESET]["codebook"]
        if self.codebook is not None:
            self.codebook = Codebook(validate_codebook(self.codebook))  # read-only: see __setattr__
        if not _is_number(self.speedup) or not math.isfinite(self.speedup) or not 1 <= self.speedup <= MAX_SPEEDUP:
            raise ConfigError(f"speedup must be a number from 1 to {MAX_SPEEDUP:g} (the compute speed-up aimed at "
                              f"without a codebook; 2 is the default), got {self.speedup!r}")
        self.speedup = float(self.speedup)  # (a numpy scalar would not save to JSON)
        for name in ("moreg", "paper_mode"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{name} must be true or false, got {getattr(self, name)!r}")
        for name in ("moreg_window", "moreg_strides"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, (tuple, list)):
                raise ConfigError(f"{name} must be a tuple (e.g. moreg_window=(4, 26), moreg_strides=(1,)), got {value!r}")
        if self.moreg_window is not None:
            window = tuple(self.moreg_window)
            if len(window) != 2 or not all(_is_int(v) for v in window) or not 1 <= window[0] <= window[1]:
                raise ConfigError(
                    f"moreg_window must be (first_step, last_step) with 1 <= first <= last, got {self.moreg_window!r}; "
                    "for 30 steps the authors use (4, 26)."
                )
            self.moreg_window = (int(window[0]), int(window[1]))
        strides = tuple(self.moreg_strides)
        if not strides or not all(_is_int(s) and s >= 1 for s in strides):
            raise ConfigError(f"moreg_strides must be a non-empty tuple of positive ints, got {self.moreg_strides!r}")
        self.moreg_strides = tuple(int(s) for s in strides)
        for name in ("moreg_norm", "moreg_power", "moreg_divisor"):
            value = getattr(self, name)
            if not _is_number(value) or not math.isfinite(value) or value <= 0:
                raise ConfigError(f"{name} must be a positive finite number, got {value!r}")
        if not _is_number(self.moreg_gradient_scale) or not math.isfinite(self.moreg_gradient_scale):
            raise ConfigError(f"moreg_gradient_scale must be a finite number, got {self.moreg_gradient_scale!r}")
        if self.probe_block is not None and (not _is_int(self.probe_block)):
            raise ConfigError(f"probe_block must be an int (a block index) or None for mid-stack, got {self.probe_block!r}")
        if not isinstance(self.probe_point, str) or not self.probe_point:
            raise ConfigError(f"probe_point must be one of {PROBE_POINTS} or a submodule path, got {self.probe_point!r}")
        if self.num_inference_steps is not None and (not _is_int(self.num_inference_steps) or self.num_inference_steps < 1):
            raise ConfigError(f"num_inference_steps must be a positive int or None, got {self.num_inference_steps!r}")
        if self.store not in STORES:
            raise ConfigError(f"store must be one of {STORES}, got {self.store!r}")
        if not _is_number(self.forecast_reach) or not 0 <= self.forecast_reach <= 100:
            raise ConfigError(f"forecast_reach must be a number from 0 to 100 (0.5 is the default), got {self.forecast_reach!r}")
        if self.paper_mode and self.store != "reuse":
            raise ConfigError("paper_mode reproduces the authors' plain reuse of the cached residual; use "
                              "store='reuse' with paper_mode=True, or paper_mode=False to forecast")
        if self.batch_schedule is not None and self.batch_schedule not in BATCH_SCHEDULES:
            raise ConfigError(f"batch_schedule must be one of {BATCH_SCHEDULES} or None (per video; shared in "
                              f"paper_mode), got {self.batch_schedule!r}")
        if not _is_int(self.stats_history) or not 1 <= self.stats_history <= 100_000:
            raise ConfigError(f"stats_history must be an int from 1 to 100000, got {self.stats_history!r}")
        object.__setattr__(self, "_checked", True)

    # --- construction from names and files -------------------------------------------------------------------
    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> "AdaCacheConfig":
        """A named preset (see `PRESETS`), with any field overridden, e.g. `from_preset("opensora-30-fast", moreg=True)`."""
        if name not in PRESETS:
            raise ConfigError(f"unknown preset {name!r}; known presets: {', '.join(sorted(PRESETS))}")
        return cls.from_dict({**PRESETS[name], **overrides})

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> "AdaCacheConfig":
        """Build from a mapping (as read from JSON). Unknown keys are an error, never ignored."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(f"unknown AdaCacheConfig keys {unknown}; known keys: {sorted(known)}")
        values = dict(values)
        for key in ("moreg_window", "moreg_strides"):
            if isinstance(values.get(key), list):
                values[key] = tuple(values[key])
        return cls(**values)

    @classmethod
    def load(cls, path_or_preset: str | os.PathLike) -> "AdaCacheConfig":
        """A preset name or a JSON file written by `save` (or by hand: {"codebook": {"0.08": 6, "1.0": 1}, ...}).
        Every error names the file (or suggests the preset a typo was close to)."""
        if isinstance(path_or_preset, str) and path_or_preset in PRESETS:
            return cls.from_preset(path_or_preset)
        name, path = str(path_or_preset), Path(path_or_preset)
        presets = ", ".join(sorted(PRESETS))
        if not path.exists():
            if path.suffix.lower() == ".json" or os.sep in name or "/" in name:
                raise ConfigError(f"the config file {name!r} does not exist (and it is neither a preset: {presets})")
            close = difflib.get_close_matches(name, list(PRESETS), n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ConfigError(f"{name!r} is neither a preset ({presets}) nor a JSON config file{hint}")
        if path.is_dir():
            raise ConfigError(f"{name!r} is a folder; give a preset ({presets}) or a JSON config file")
        if not path.is_file():  # a device or a pipe would be read without end
            raise ConfigError(f"{name!r} is not a regular file; give a preset ({presets}) or a JSON config file")
        try:
            data = json.loads(path.read_text(encoding="utf-8-sig"))  # a BOM is fine
        except json.JSONDecodeError as error:
            raise ConfigError(f"the config file {name!r} is not valid JSON: {error}") from None
        except (RecursionError, ValueError) as error:  # nested too deep; an integer with too many digits
            raise ConfigError(f"the config file {name!r} cannot be read as a config: {error}") from None
        except (OSError, UnicodeDecodeError) as error:
            reason = error.strerror if isinstance(error, OSError) and error.strerror else error
            raise ConfigError(f"cannot read the config file {name!r}: {reason}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"the config file {name!r} must hold a JSON object of AdaCacheConfig fields")
        # keys starting with "_" describe the file (a comment, how a codebook was calibrated), not the config
        try:
            return cls.from_dict({k: v for k, v in data.items() if not k.startswith("_")})
        except ConfigError as error:
            raise ConfigError(f"the config file {name!r}: {error}") from None
        except TypeError as error:  # a field of the wrong JSON type that the checks did not reach
            raise ConfigError(f"the config file {name!r}: {error}") from None

    def to_dict(self) -> dict[str, Any]:
        data = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        data["codebook"] = ({repr(float(k)): int(v) for k, v in self.codebook.items()} if self.codebook is not None
                            else None)
        return data

    def save(self, path: str | os.PathLike, about: Mapping[str, Any] | None = None) -> None:
        """Write as JSON, atomically (a crash leaves the old file or the new one, never half of one). `about`
        is stored under "_about" (how the config was made); `load` skips keys that start with "_"."""
        path = Path(path)
        tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
        data = {**({"_about": dict(about)} if about else {}), **self.to_dict()}
        try:
            tmp.write_text(json.dumps(data, indent=2) + "\n")
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)  # a failed write (a full disk) leaves the old file and no debris

    @property
    def calibration_free(self) -> bool:
        """No codebook: relative distances and a compute budget (the default), rather than calibrated thresholds."""
        return self.codebook is None

    @property
    def resolved_batch_schedule(self) -> str:
        """How a batch of several videos is scheduled: `batch_schedule`, or its default."""
        if self.batch_schedule is not None:
            return self.batch_schedule
        return "shared" if self.paper_mode else "video"

    def resolve_moreg_window(self, num_steps: int) -> tuple[int, int]:
        """The 1-based steps (first, last) where MoReg applies: `moreg_window`, else from step 2 (the first with
        a distance) to N - round(N/10), or to N without a codebook. Paper mode starts at max(2, round(N/10)) as
        the authors' presets do; outside the window their m is 1, so a distance read before it (step 2 at 30
        steps) met thresholds made for regularised ones."""
        if self.moreg_window is not None:
            return self.moreg_window
        margin = round(num_steps / 10)
        if self.paper_mode:
            return max(2, margin), num_steps - margin
        return 2, num_steps if self.calibration_free else num_steps - margin


class Codebook(dict):
    """A config's codebook, {threshold: rate} in ascending thresholds: a dict that refuses changes (a config is
    checked once, when made), but copies, pickles and converts (`dict(...)`, `dataclasses.asdict`) as a dict."""

    def _refuse(self, *args: Any, **kwargs: Any) -> None:
        raise TypeError("an AdaCacheConfig's codebook is read-only; make a new config with "
                        "dataclasses.replace(config, codebook={...})")

    __setitem__ = __delitem__ = clear = pop = popitem = setdefault = update = __ior__ = _refuse

    def __reduce__(self) -> tuple:
        return Codebook, (dict(self),)

    def __copy__(self) -> "Codebook":
        return self

    def __deepcopy__(self, memo: dict) -> "Codebook":
        return self


def _rebuild(cls: type, fields: dict[str, Any]) -> AdaCacheConfig:
    return cls(**fields)


def validate_codebook(codebook: Any) -> dict[float, int]:
    """Return the codebook as an ordered {threshold: rate} dict, or raise ConfigError saying what is wrong."""
    example = "for example {0.08: 6, 0.16: 4, 1.0: 1}"
    if isinstance(codebook, Mapping):
        items = list(codebook.items())
    elif isinstance(codebook, (list, tuple)) and all(isinstance(p, (list, tuple)) and len(p) == 2 for p in codebook):
        items = [tuple(p) for p in codebook]
    else:
        raise ConfigError(f"codebook must be a mapping threshold -> rate, {example}; got {codebook!r}")
    if not items:
        raise ConfigError(f"codebook is empty; give at least one threshold -> rate, {example}")
    result: dict[float, int] = {}
    previous = -math.inf
    for threshold, rate in items:
        try:
            threshold = float(threshold)
        except (TypeError, ValueError):
            raise ConfigError(f"codebook threshold {threshold!r} is not a number ({example})") from None
        if not math.isfinite(threshold) or threshold <= 0:
            raise ConfigError(f"codebook threshold {threshold!r} must be positive and finite ({example})")
        if not _is_int(rate) or rate < 1:
            raise ConfigError(
                f"codebook rate {rate!r} (threshold {threshold}) must be a positive int: rate k computes one step "
                f"in k, so 1 means no reuse ({example})"
            )
        if threshold <= previous:
            ordered = dict(sorted((float(t), r) for t, r in items))
            raise ConfigError(
                f"codebook thresholds must be strictly ascending, but {threshold} follows {previous}; "
                f"write it as {ordered}"
            )
        result[threshold] = int(rate)
        previous = threshold
    return result


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)
