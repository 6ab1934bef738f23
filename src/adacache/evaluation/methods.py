"""The methods a benchmark compares, by name.

    none                        the uncached baseline
    <preset>[+moreg]            an AdaCache preset (opensora-30-fast, opensora-30-slow, opensora-100-fast)
    <file.json>[+moreg]         an AdaCache config file (as `adacache calibrate` writes)
    auto[+moreg]                the model's own codebook: the embedded model's calibrated one, else opensora-30-fast
    static:<k>                  reuse the stack residual for k-1 steps after each computed one, whatever the content
                                (AdaCache's machinery with a constant rate: what adaptivity buys, at matched compute)
    fbc[:threshold]             diffusers FirstBlockCache (default threshold 0.05)
    pab[:range]                 diffusers PyramidAttentionBroadcast (self-attention reused for range-1 steps, default 2)
    magcache[:threshold]        diffusers MagCache (default 0.06), its magnitude ratios from a calibration run first
    taylorseer[:interval]       diffusers TaylorSeer (default interval 3)
    fastercache[:range]         diffusers FasterCache (attention reused for range-1 steps, default 2)

Parameters are ASCII numbers within a range per method (`PARAMETERS`): static k, pab, taylorseer and fastercache
take whole numbers from 2 to 1000, fbc and magcache thresholds numbers from 1e-4 to 10. Anything else (NaN, inf,
negative, empty, unicode digits, `+moreg` on a peer or twice) is a ConfigError naming the method and the range,
raised before a model loads. A method a model cannot run gets a reason from `Method.unsupported(pipe)` and is
skipped, never a crash.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from .. import compat
from ..config import PRESETS, AdaCacheConfig, ConfigError
from ..hooks import transformers_of, apply_adacache, remove_adacache

PEERS = ("fbc", "pab", "magcache", "taylorseer", "fastercache")
PEER_NAMES = {
    "fbc": "FirstBlockCache",
    "pab": "PyramidAttentionBroadcast",
    "magcache": "MagCache",
    "taylorseer": "TaylorSeer",
    "fastercache": "FasterCache",
}
PEER_DEFAULTS = {"fbc": 0.05, "pab": 2, "magcache": 0.06, "taylorseer": 3, "fastercache": 2}


def default_methods(steps: int) -> list[str]:
    """The comparison `adacache bench` runs when no --methods are given, for a step count."""
    presets = ["opensora-100-fast"] if steps >= 60 else ["opensora-30-fast", "opensora-30-slow"]
    return ["none", "auto", "auto+moreg", *presets, "static:2", "static:3", "fbc:0.05", "fbc:0.1", "pab:2", "pab:3",
            "magcache:0.06", "magcache:0.12", "taylorseer:3", "taylorseer:4", "fastercache:2"]


@dataclass
class Method:
    """One entry of a comparison; `family` groups operating points of one method in reports and plots."""

    name: str
    family: str
    kind: str  # "none", "adacache" or "diffusers"
    adacache: AdaCacheConfig | None = None
    peer: str | None = None
    value: float | None = None
    state: dict[str, Any] = field(default_factory=dict)  # e.g. MagCache's calibrated ratios, per step count

    @property
    def is_adacache(self) -> bool:
        return self.kind == "adacache" and self.family.startswith("AdaCache")

    def describe(self) -> dict[str, Any]:
        data: dict[str, Any] = {"name": self.name, "family": self.family, "kind": self.kind}
        if self.adacache is not None:
            data["config"] = self.adacache.to_dict()
        if self.peer is not None:
            data["peer"], data["value"] = PEER_NAMES[self.peer], self.value
        return data

    def unsupported(self, pipe: Any, guidance: float | None = None) -> str | None:
        """Why this method cannot run on `pipe` (at this guidance scale, when given), or None."""
        if self.kind != "diffusers":
            return None
        models = transformers_of(pipe)
        if not all(hasattr(m, "enable_cache") for m in models):
            return f"{type(models[0]).__name__} has no diffusers cache support (no CacheMixin.enable_cache)"
        return _PEER_SUPPORT[self.peer](pipe, models, guidance)

    def apply(self, pipe: Any, steps: int, run: Callable[[], Any] | None = None) -> None:
        """Enable on every transformer of `pipe`. `run` generates once uncached (MagCache's calibration)."""
        if self.kind == "adacache":
            apply_adacache(pipe, self.adacache)
        elif self.kind == "diffusers":
            for model in transformers_of(pipe):
                model.enable_cache(_PEER_CONFIG[self.peer](self, pipe, model, steps, run))

    def remove(self, pipe: Any) -> None:
        if self.kind == "adacache":
            remove_adacache(pipe)
        elif self.kind == "diffusers":
            for model in transformers_of(pipe):
                if getattr(model, "is_cache_enabled", False):
                    model.disable_cache()
            for handle in self.state.pop("handles", []):
                handle.remove()


# The numeric parameter of each method with one, and its valid range. Thresholds below 1e-4 are under the rounding
# noise of half-precision features: such a cache would never reuse anything and measure as the baseline. Periods
# and ranges are whole steps: 1 would reuse nothing, and 1000 is more than any step count.
@dataclass(frozen=True)
class _Parameter:
    what: str  # what the number means, for messages
    kind: type  # int or float
    low: float
    high: float
    example: str

    def describe(self, base: str) -> str:
        number = "a whole number" if self.kind is int else "a number"
        return f"{base}'s {self.what} must be {number} from {self.low:g} to {self.high:g} (e.g. {self.example})"


PARAMETERS: dict[str, _Parameter] = {
    "static": _Parameter("reuse period k (one step computed in k)", int, 2, 1000, "static:3"),
    "fbc": _Parameter("threshold", float, 1e-4, 10, "fbc:0.05"),
    "pab": _Parameter("attention reuse range", int, 2, 1000, "pab:2"),
    "magcache": _Parameter("threshold", float, 1e-4, 10, "magcache:0.06"),
    "taylorseer": _Parameter("cache interval", int, 2, 1000, "taylorseer:3"),
    "fastercache": _Parameter("attention reuse range", int, 2, 1000, "fastercache:2"),
}
_INTEGER = re.compile(r"[0-9]+")
_DECIMAL = re.compile(r"[0-9]+\.?[0-9]*([eE][+-]?[0-9]+)?|\.[0-9]+([eE][+-]?[0-9]+)?")
MOREG = "+moreg"


def _number(token: str, base: str, param: str) -> float | int:
    """The method's parameter, in ASCII digits only (Python would also read '３', '1_0' and ' 3', making names
    that differ but run the same), within its range; ConfigError naming the method and the range otherwise."""
    spec = PARAMETERS[base]
    if not param:
        default = f"{base} (its default, {PEER_DEFAULTS[base]}) or " if base in PEER_DEFAULTS else ""
        raise ConfigError(f"method {token!r} has an empty parameter after ':'; write {default}{spec.example}; "
                          f"{spec.describe(base)}")
    if not (_INTEGER if spec.kind is int else _DECIMAL).fullmatch(param):
        if param.startswith("-") and _DECIMAL.fullmatch(param[1:]):
            raise ConfigError(f"method {token!r}: the parameter must be positive; {spec.describe(base)}, got {param!r}")
        hint = "static needs a reuse period k >= 2, an integer; " if base == "static" else ""
        raise ConfigError(f"method {token!r}: {hint}{param!r} is not a valid {base} parameter: "
                          f"{spec.describe(base)}")
    value = spec.kind(param)
    if not math.isfinite(value) or not spec.low <= value <= spec.high:
        hint = "static needs a reuse period k >= 2; " if base == "static" and value < 2 else ""
        positive = "the parameter must be positive; " if value <= 0 and not hint else ""
        raise ConfigError(f"method {token!r}: {hint}{positive}{spec.describe(base)}, got {param}")
    return value


def parse_method(name: str, tuned: str | os.PathLike | None = None) -> Method:
    """A `Method` from its name (see the module docstring); ConfigError (a ValueError) with the grammar or the
    valid range for anything else. `tuned` is the model's own calibrated codebook file, which `auto` stands for
    (None: opensora-30-fast)."""
    if not isinstance(name, str):
        raise ConfigError(f"a method name must be a string, got {name!r}")
    token = name.strip()
    if token == "none":
        return Method(token, "baseline", "none")
    base, colon, param = token.partition(":")
    if base in PARAMETERS or base.endswith(MOREG) and base[: -len(MOREG)] in PARAMETERS:
        if base.endswith(MOREG) or param.endswith(MOREG):
            raise ConfigError(f"method {token!r}: {MOREG} applies to AdaCache configs (auto, a preset or a .json "
                              f"file), not to {base.removesuffix(MOREG)}")
    if base == "static":
        k = _number(token, base, param)
        return Method(token, "static reuse", "adacache", AdaCacheConfig(codebook={1.0: int(k)}))
    if base in PEERS:
        value = _number(token, base, param) if colon else PEER_DEFAULTS[base]
        return Method(token, PEER_NAMES[base], "diffusers", peer=base, value=value)
    source, moreg = (token[: -len(MOREG)], True) if token.endswith(MOREG) else (token, False)
    if source.endswith(MOREG):
        raise ConfigError(f"method {token!r}: {MOREG} is given more than once; write {source.split(MOREG)[0]}{MOREG}")
    if source == "auto":
        source = str(tuned) if tuned is not None else "opensora-30-fast"
    if source in PRESETS or source.endswith(".json") or Path(source).is_file():
        try:
            config = AdaCacheConfig.load(source)
        except ConfigError as error:
            raise ConfigError(f"method {token!r}: {error}") from None
        config = dataclasses.replace(config, moreg=config.moreg or moreg)
        return Method(token, "AdaCache + MoReg" if config.moreg else "AdaCache", "adacache", config)
    raise ConfigError(
        f"unknown method {token!r}; methods are: none, auto[+moreg], a preset[+moreg] ({', '.join(sorted(PRESETS))}), "
        f"a config .json[+moreg], static:<k>, {', '.join(f'{p}[:value]' for p in PEERS)}"
    )


def parse_methods(names: list[str], tuned: str | os.PathLike | None = None) -> list[Method]:
    """Parse all names first (a typo fails before any work); the baseline is always first, each method once
    (two names for one setting, such as fbc:0.1 and fbc:0.10, are refused too)."""
    methods = [parse_method(n, tuned) for n in names if not isinstance(n, str) or n.strip()]
    seen: dict[Any, str] = {}
    for method in methods:
        if method.name in seen.values():
            raise ConfigError(f"method {method.name!r} is listed twice")
        same = (method.peer, method.value) if method.kind == "diffusers" else (
            ("static", method.adacache.codebook[1.0]) if method.family == "static reuse" else method.name)
        if same in seen:
            raise ConfigError(f"methods {seen[same]!r} and {method.name!r} are the same setting; list it once")
        seen[same] = method.name
    baseline = [m for m in methods if m.kind == "none"] or [parse_method("none")]
    return baseline + [m for m in methods if m.kind != "none"]


# --- diffusers' own caches ----------------------------------------------------------------------------------------
# Pipelines known to run the unconditional and conditional branches in one batched call. PAB and FasterCache keep
# their state per attention module, not per cache_context, so on split-CFG pipelines (Wan, HunyuanVideo) the
# unconditional call would reuse the conditional call's attention; FasterCache's branch skipping also needs the batch.
BATCHED_CFG_PIPELINES = ("EmbeddedVideoPipeline", "LattePipeline", "CogVideoXPipeline", "AllegroPipeline",
                         "MochiPipeline", "LTXPipeline")


TAYLORSEER_MODULES = r"(blocks|transformer_blocks|single_transformer_blocks|temporal_transformer_blocks)\.\d+\.(attn\d*|ff|ffn)"


def _timestep_callback(method: Method, pipe: Any) -> Callable[[], int]:
    """The current timestep for PAB and FasterCache: the pipeline's own `current_timestep` (diffusers' convention),
    else read off the transformer's last call by a pre-hook that `Method.remove` takes away again."""
    if hasattr(type(pipe), "current_timestep"):
        return lambda: int(torch.as_tensor(pipe.current_timestep if pipe.current_timestep is not None else 1000)
                           .float().flatten()[0])
    seen = {"t": 1000}

    def remember(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        t = kwargs.get("timestep", args[1] if len(args) > 1 else None)
        if t is not None:
            seen["t"] = int(torch.as_tensor(t).float().flatten()[0])

    handles = method.state.setdefault("handles", [])
    for model in transformers_of(pipe):
        handles.append(model.register_forward_pre_hook(remember, with_kwargs=True))
    return lambda: seen["t"]


def _fbc(method: Method, pipe: Any, model: torch.nn.Module, steps: int, run: Callable | None) -> Any:
    from diffusers import FirstBlockCacheConfig

    return FirstBlockCacheConfig(threshold=float(method.value))


def _pab(method: Method, pipe: Any, model: torch.nn.Module, steps: int, run: Callable | None) -> Any:
    from diffusers import PyramidAttentionBroadcastConfig

    # self-attention broadcast in the timestep range of the PAB paper's defaults; cross-attention left computed
    return PyramidAttentionBroadcastConfig(
        spatial_attention_block_skip_range=int(method.value), spatial_attention_timestep_skip_range=(100, 800),
        temporal_attention_block_skip_range=int(method.value) if _has_temporal_blocks(model) else None,
        temporal_attention_timestep_skip_range=(100, 800),
        current_timestep_callback=_timestep_callback(method, pipe),
    )


def _magcache(method: Method, pipe: Any, model: torch.nn.Module, steps: int, run: Callable | None) -> Any:
    """MagCache with magnitude ratios from diffusers' own calibration mode, run once per model and step count
    (the ratios are kept in `method.state`, so a bench calibrates once)."""
    from diffusers import MagCacheConfig

    key = (id(model), steps)
    ratios = method.state.setdefault("mag_ratios", {})
    if key not in ratios:
        if run is None:
            raise ValueError("MagCache needs a calibration run (its magnitude ratios are model-dependent)")
        ratios[key] = _magcache_calibration(pipe, model, steps, run)
    return MagCacheConfig(threshold=float(method.value), num_inference_steps=steps, mag_ratios=list(ratios[key]))


def _magcache_calibration(pipe: Any, model: torch.nn.Module, steps: int, run: Callable) -> list[float]:
    """Run once with MagCacheConfig(calibrate=True) and keep the ratios diffusers' tail hook computes (it prints
    them and forgets them at the last step; we record each as it is appended)."""
    import contextlib
    import io

    from diffusers import MagCacheConfig

    model.enable_cache(MagCacheConfig(calibrate=True, num_inference_steps=steps))
    recorded: list[float] = []
    try:
        compat.record_magcache_ratios(model, recorded)
        with contextlib.redirect_stdout(io.StringIO()):  # diffusers prints the ratios for copy-and-paste
            run()
    finally:
        model.disable_cache()
    per_call = len(recorded) // steps if recorded else 0
    if per_call < 1:
        raise RuntimeError(f"MagCache calibration recorded {len(recorded)} ratios for {steps} steps")
    # one ratio per transformer call; split CFG calls it per branch each step: average the branches of a step
    return [sum(recorded[i * per_call:(i + 1) * per_call]) / per_call for i in range(steps)]


def _taylorseer(method: Method, pipe: Any, model: torch.nn.Module, steps: int, run: Callable | None) -> Any:
    from diffusers import TaylorSeerCacheConfig

    # The attention and feed-forward outputs of every block are forecast, as in the TaylorSeer paper. diffusers'
    # default patterns ("^blocks.*attn", matched in full) hook no module of a model whose attentions are named
    # attn1/attn2 (Wan, Latte, CogVideoX...), which would silently make it the uncached model; full-precision
    # factors (the bfloat16 default costs accuracy for nothing on CPU); the other settings are diffusers' defaults.
    return TaylorSeerCacheConfig(cache_interval=int(method.value), taylor_factors_dtype=torch.float32,
                                 cache_identifiers=[TAYLORSEER_MODULES])


def _fastercache(method: Method, pipe: Any, model: torch.nn.Module, steps: int, run: Callable | None) -> Any:
    from diffusers import FasterCacheConfig

    # the FasterCache paper's defaults as diffusers documents them for CogVideoX, with attention weight 0.3
    return FasterCacheConfig(
        spatial_attention_block_skip_range=int(method.value), spatial_attention_timestep_skip_range=(-1, 681),
        temporal_attention_block_skip_range=int(method.value) if _has_temporal_blocks(model) else None,
        temporal_attention_timestep_skip_range=(-1, 681),
        current_timestep_callback=_timestep_callback(method, pipe), attention_weight_callback=lambda _: 0.3,
        low_frequency_weight_update_timestep_range=(99, 901), high_frequency_weight_update_timestep_range=(-1, 301),
        unconditional_batch_skip_range=5, unconditional_batch_timestep_skip_range=(-1, 781),
        tensor_format="BCFHW", is_guidance_distilled=False,
    )


def _has_temporal_blocks(model: torch.nn.Module) -> bool:
    return hasattr(model, "temporal_transformer_blocks")


def _one_transformer(pipe: Any, models: list[torch.nn.Module], guidance: float | None = None) -> str | None:
    if len(models) > 1:
        return ("MagCache's ratios are calibrated per transformer over every step; with two experts (Wan 2.2) each "
                "sees only part of the steps, which this bench does not calibrate")
    return None


def _two_blocks(pipe: Any, models: list[torch.nn.Module], guidance: float | None = None) -> str | None:
    """FirstBlockCache runs the first block and caches the rest: it needs a block list of two or more."""
    for model in models:
        blocks = sum(len(getattr(model, name)) for name in compat.transformer_block_list_names()
                     if isinstance(getattr(model, name, None), torch.nn.ModuleList))
        if blocks < 2:
            return f"{type(model).__name__} has {blocks} transformer block(s); FirstBlockCache needs at least 2"
    return None


def _taylorseer_modules(pipe: Any, models: list[torch.nn.Module], guidance: float | None = None) -> str | None:
    import re

    for model in models:
        if not any(re.fullmatch(TAYLORSEER_MODULES, name) for name, _ in model.named_modules()):
            return f"{type(model).__name__} has no block attention or feed-forward named as TaylorSeer expects"
    return None


def _batched_cfg(pipe: Any, models: list[torch.nn.Module], guidance: float | None = None) -> str | None:
    name = type(pipe).__name__
    if name in BATCHED_CFG_PIPELINES:
        return None
    return (f"{name} is not known to batch its CFG branches in one call (known: {', '.join(BATCHED_CFG_PIPELINES)}); "
            "this cache keeps one state per attention layer, not per branch, so split CFG calls would share it")


def _batched_cfg_with_guidance(pipe: Any, models: list[torch.nn.Module], guidance: float | None = None) -> str | None:
    if guidance is not None and guidance <= 1.0:
        return "FasterCache splits a batched CFG call into its two branches; guidance <= 1 runs no CFG"
    return _batched_cfg(pipe, models)


_PEER_SUPPORT: dict[str, Callable[[Any, list[torch.nn.Module], float | None], str | None]] = {
    "fbc": _two_blocks,
    "pab": _batched_cfg,  # PAB's state is per attention module: split-CFG branches would reuse each other's
    "magcache": _one_transformer,
    "taylorseer": _taylorseer_modules,
    "fastercache": _batched_cfg_with_guidance,
}
_PEER_CONFIG: dict[str, Callable[..., Any]] = {
    "fbc": _fbc,
    "pab": _pab,
    "magcache": _magcache,
    "taylorseer": _taylorseer,
    "fastercache": _fastercache,
}
