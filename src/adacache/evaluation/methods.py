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

A method a model cannot run gets a reason from `Method.unsupported(pipe)` and is skipped, never a crash.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from ..config import PRESETS, AdaCacheConfig, ConfigError
from ..hooks import _models_of, apply_adacache, remove_adacache

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

    def unsupported(self, pipe: Any) -> str | None:
        """Why this method cannot run on `pipe`, or None."""
        if self.kind != "diffusers":
            return None
        models = _models_of(pipe)
        if not all(hasattr(m, "enable_cache") for m in models):
            return f"{type(models[0]).__name__} has no diffusers cache support (no CacheMixin.enable_cache)"
        return _PEER_SUPPORT[self.peer](pipe, models)

    def apply(self, pipe: Any, steps: int, run: Callable[[], Any] | None = None) -> None:
        """Enable on every transformer of `pipe`. `run` generates once uncached (MagCache's calibration)."""
        if self.kind == "adacache":
            apply_adacache(pipe, self.adacache)
        elif self.kind == "diffusers":
            for model in _models_of(pipe):
                model.enable_cache(_PEER_CONFIG[self.peer](self, pipe, model, steps, run))

    def remove(self, pipe: Any) -> None:
        if self.kind == "adacache":
            remove_adacache(pipe)
        elif self.kind == "diffusers":
            for model in _models_of(pipe):
                if getattr(model, "is_cache_enabled", False):
                    model.disable_cache()


def parse_method(name: str, tuned: str | os.PathLike | None = None) -> Method:
    """A `Method` from its name (see the module docstring); ValueError with the grammar for anything else.
    `tuned` is the model's own calibrated codebook file, which `auto` stands for (None: opensora-30-fast)."""
    token = name.strip()
    if token == "none":
        return Method(token, "baseline", "none")
    base, _, param = token.partition(":")
    if base == "static":
        try:
            k = int(param)
        except ValueError:
            k = 0
        if k < 2:
            raise ValueError(f"method {token!r}: static needs a reuse period k >= 2, e.g. static:3")
        return Method(token, "static reuse", "adacache", AdaCacheConfig(codebook={1.0: k}))
    if base in PEERS:
        value = PEER_DEFAULTS[base]
        if param:
            try:
                value = type(PEER_DEFAULTS[base])(param)
            except ValueError:
                raise ValueError(f"method {token!r}: {param!r} is not a valid {base} parameter") from None
            if value <= 0:
                raise ValueError(f"method {token!r}: the parameter must be positive")
        return Method(token, PEER_NAMES[base], "diffusers", peer=base, value=value)
    source, moreg = (token[: -len("+moreg")], True) if token.endswith("+moreg") else (token, False)
    if source == "auto":
        source = str(tuned) if tuned is not None else "opensora-30-fast"
    if source in PRESETS or source.endswith(".json") or Path(source).is_file():
        try:
            config = AdaCacheConfig.load(source)
        except ConfigError as error:
            raise ValueError(f"method {token!r}: {error}") from None
        config = dataclasses.replace(config, moreg=config.moreg or moreg)
        return Method(token, "AdaCache + MoReg" if config.moreg else "AdaCache", "adacache", config)
    raise ValueError(
        f"unknown method {token!r}; methods are: none, auto[+moreg], a preset[+moreg] ({', '.join(sorted(PRESETS))}), "
        f"a config .json[+moreg], static:<k>, {', '.join(f'{p}[:value]' for p in PEERS)}"
    )


def parse_methods(names: list[str], tuned: str | os.PathLike | None = None) -> list[Method]:
    """Parse all names first (a typo fails before any work); the baseline is always first, each name once."""
    methods = [parse_method(n, tuned) for n in names if n.strip()]
    seen: set[str] = set()
    for method in methods:
        if method.name in seen:
            raise ValueError(f"method {method.name!r} is listed twice")
        seen.add(method.name)
    baseline = [m for m in methods if m.kind == "none"] or [parse_method("none")]
    return baseline + [m for m in methods if m.kind != "none"]


# --- diffusers' own caches ----------------------------------------------------------------------------------------
def _timestep_reader(pipe: Any) -> Callable[[], int]:
    """The current timestep for PAB and FasterCache: read from the transformer's last call."""
    seen = {"t": 1000}

    def remember(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        t = kwargs.get("timestep", args[1] if len(args) > 1 else None)
        if t is not None:
            seen["t"] = int(torch.as_tensor(t).float().flatten()[0])

    for model in _models_of(pipe):
        if not getattr(model, "_adacache_bench_timestep_hook", False):
            model.register_forward_pre_hook(remember, with_kwargs=True)
            model._adacache_bench_timestep_hook = True
    return lambda: seen["t"]


def _no_check(pipe: Any, models: list[torch.nn.Module]) -> str | None:
    return None


_PEER_SUPPORT: dict[str, Callable[[Any, list[torch.nn.Module]], str | None]] = {
    "fbc": _no_check,
    "pab": _no_check,
    "magcache": _no_check,
    "taylorseer": _no_check,
    "fastercache": _no_check,
}
_PEER_CONFIG: dict[str, Callable[..., Any]] = {}
