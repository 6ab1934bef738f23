"""The methods a benchmark compares, by name, each as an object the bench drives through one interface.

    none                        the uncached baseline
    default[+moreg]             what apply_adacache does with no config: no calibration, 2x fewer computed steps
    speedup:<x>[+moreg]         the calibration-free default aiming at x (the presets quality, balanced, fast: 1.5, 2, 3)
    <preset>[+moreg]            an AdaCache preset (opensora-30-fast, opensora-30-slow, opensora-100-fast, quality, ...)
    <file.json>[+moreg]         an AdaCache config file (as `adacache calibrate` writes)
    auto[+moreg]                the model's own codebook: the embedded model's calibrated one, else the default
                                (pipelines.auto_choice, the rule `adacache generate --cache auto` follows too)
    static:<k>                  reuse the stack residual for k-1 steps after each computed one, whatever the content
                                (AdaCache's machinery with a constant rate: what adaptivity buys, at matched compute)
    fbc[:threshold]             diffusers FirstBlockCache (default threshold 0.05)
    pab[:range]                 diffusers PyramidAttentionBroadcast (self-attention reused for range-1 steps, default 2)
    magcache[:threshold]        diffusers MagCache (default 0.06), its magnitude ratios from a calibration run first
    taylorseer[:interval]       diffusers TaylorSeer (default interval 3)
    fastercache[:range]         diffusers FasterCache (attention reused for range-1 steps, default 2)
    dbcache[:threshold]         cache-dit's DBCache (residual difference threshold, default cache-dit's 0.08)
    dbcache-taylorseer[:threshold]  cache-dit's DBCache with its TaylorSeer calibrator (order 1), same threshold
    cachedit-mask[:policy]      cache-dit's steps mask: a fixed schedule of computed steps, policy slow, medium
                                (default), fast or ultra (at 30 steps 22, 18, 14 and 10 steps computed)

Parameters are ASCII numbers within a range per method (`PARAMETERS`): static k, pab, taylorseer and fastercache
take whole numbers from 2 to 1000, the fbc, magcache and dbcache thresholds numbers from 1e-4 to 10; cachedit-mask
takes one of `MASK_POLICIES`. Anything else (NaN, inf, negative, empty, unicode digits, `+moreg` on a peer or
twice) is a ConfigError naming the method and the range, raised before a model loads.

Every method is a `Method`: `apply(pipe, steps, run)` puts it on a pipeline's transformers, `remove(pipe)` takes
it off again (also after a generation that raised), `unsupported(pipe, guidance, steps)` says why it cannot run
there (the bench then records it as skipped, never a crash), `held_bytes(pipe)` is the memory it holds between
steps and `stats(pipe)` what it did in the last generation, as record fields. The subclasses are `Baseline`,
`AdaCacheMethod` (presets, files, auto, static), `DiffusersPeer` (diffusers' own caches) and `CacheDitPeer`
(cache-dit, an optional dependency: without it the cache-dit methods are skipped with the reason).
"""

from __future__ import annotations

import copy
import dataclasses
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar, Hashable, Mapping

import torch

from .. import compat
from ..config import PRESETS, AdaCacheConfig, ConfigError
from ..hooks import apply_adacache, get_stats, is_applied, reconfigure, remove_adacache, transformers_of
from ..pipelines import auto_choice
from . import cachedit
from .metrics import held_tensor_bytes, state_tensor_bytes

PEERS = ("fbc", "pab", "magcache", "taylorseer", "fastercache")
PEER_NAMES = {
    "fbc": "FirstBlockCache",
    "pab": "PyramidAttentionBroadcast",
    "magcache": "MagCache",
    "taylorseer": "TaylorSeer",
    "fastercache": "FasterCache",
}
PEER_DEFAULTS = {"fbc": 0.05, "pab": 2, "magcache": 0.06, "taylorseer": 3, "fastercache": 2}

CACHEDIT_PEERS = ("dbcache", "dbcache-taylorseer", "cachedit-mask")
CACHEDIT_NAMES = {
    "dbcache": "cache-dit DBCache",
    "dbcache-taylorseer": "cache-dit DBCache+TaylorSeer",
    "cachedit-mask": "cache-dit steps mask",
}
# cache-dit's own defaults: DBCacheConfig.residual_diff_threshold and steps_mask's mask_policy
CACHEDIT_DEFAULTS: dict[str, float | str] = {"dbcache": 0.08, "dbcache-taylorseer": 0.08, "cachedit-mask": "medium"}
MASK_POLICIES = ("slow", "medium", "fast", "ultra")  # cache_dit.steps_mask's predefined policies, slowest first


# cache-dit's operating points in the default comparison, from about 1.4x to 3x fewer computed steps. On the shipped
# embedded model at 30 steps (guidance 4, one prompt) DBCache computed 20, 15 and 11 of 30 steps at thresholds 0.08,
# 0.16 and 0.32 (its 8 warm-up steps always run); the slow and ultra masks compute 22 and 10 of 30 at any threshold.
DEFAULT_CACHEDIT = ["dbcache:0.08", "dbcache:0.16", "dbcache:0.32", "dbcache-taylorseer:0.16",
                    "dbcache-taylorseer:0.32", "cachedit-mask:slow", "cachedit-mask:ultra"]


def default_methods(steps: int) -> list[str]:
    """The comparison `adacache bench` runs when no --methods are given, for a step count. The cache-dit methods
    are skipped, with the reason, where cache-dit is not installed."""
    presets = ["opensora-100-fast"] if steps >= 60 else ["opensora-30-fast", "opensora-30-slow"]
    return ["none", "default", "default+moreg", "speedup:3", "auto", "auto+moreg", *presets, "static:2", "static:3", "fbc:0.05", "fbc:0.1", "pab:2", "pab:3",
            "magcache:0.06", "magcache:0.12", "taylorseer:3", "taylorseer:4", "fastercache:2", *DEFAULT_CACHEDIT]


# --- the methods ---------------------------------------------------------------------------------------------------
@dataclass
class Method:
    """One entry of a comparison; `family` groups operating points of one method in reports and plots.

    The base class is a method that does nothing; subclasses override what they need. `kind` is a label for
    run.json and reports, never branched on."""

    name: str
    family: str

    kind: ClassVar[str] = "method"
    is_baseline: ClassVar[bool] = False
    # True where the method drops its state at the end of a pipeline call, so that its memory must be read during
    # the generation (the bench watches `held_bytes` after every transformer call of an untimed pass); False where
    # `held_bytes` after the generation is the peak (AdaCache's stats keep it).
    watch_memory_live: ClassVar[bool] = False
    # Whether it runs inside diffusers' context parallelism in the bench: there AdaCache stays applied (paused) around
    # every method, so only the uncached model and AdaCache itself (through `reconfigure`) can run.
    runs_under_context_parallelism: ClassVar[bool] = False

    @property
    def is_adacache(self) -> bool:
        """An AdaCache point of the comparison (static reuse is AdaCache's machinery but a peer in reports)."""
        return False

    def setting(self) -> Hashable:
        """What two names of the same setting share (fbc:0.1 and fbc:0.10), so a list can refuse them."""
        return self.name

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "family": self.family, "kind": self.kind}

    def unsupported(self, pipe: Any, guidance: float | None = None, steps: int | None = None) -> str | None:
        """Why this method cannot run on `pipe` (at this guidance scale and step count, when given), or None."""
        return None

    def apply(self, pipe: Any, steps: int, run: Callable[[], Any] | None = None, guidance: float | None = None) -> None:
        """Enable on every transformer of `pipe` for `steps` denoising steps. `run` generates once uncached (what a
        method that calibrates first, MagCache, runs); `guidance` is the scale the pipeline will be called with."""

    def remove(self, pipe: Any) -> None:
        """Leave `pipe` exactly as it was before `apply`, also after a generation (or an `apply`) that raised."""

    def held_bytes(self, pipe: Any) -> int | None:
        """The memory the method holds between steps now (None: it holds none)."""
        return None

    def stats(self, pipe: Any) -> dict[str, Any]:
        """What the method did in the last generation, as record fields (computed_steps, steps, ...)."""
        return {}


@dataclass
class Baseline(Method):
    """The uncached model: what every other method is measured against."""

    kind: ClassVar[str] = "none"
    is_baseline: ClassVar[bool] = True
    runs_under_context_parallelism: ClassVar[bool] = True

    def setting(self) -> Hashable:
        return ("none",)


@dataclass
class AdaCacheMethod(Method):
    """AdaCache with a config: a preset, a config file, the model's own codebook, or a constant rate (static)."""

    adacache: AdaCacheConfig | None = None
    kind: ClassVar[str] = "adacache"
    runs_under_context_parallelism: ClassVar[bool] = True

    @property
    def is_adacache(self) -> bool:
        return self.family.startswith("AdaCache")

    def setting(self) -> Hashable:
        return ("static", self.adacache.codebook[1.0]) if self.family == "static reuse" else self.name

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "config": self.adacache.to_dict()}

    def apply(self, pipe: Any, steps: int, run: Callable[[], Any] | None = None, guidance: float | None = None) -> None:
        if _inside_context_parallelism(pipe):  # applied (paused) before diffusers' split, which wraps its blocks
            reconfigure(pipe, self.adacache)
        else:
            apply_adacache(pipe, self.adacache)

    def remove(self, pipe: Any) -> None:
        if _inside_context_parallelism(pipe):
            reconfigure(pipe, None)
        else:
            remove_adacache(pipe)

    def held_bytes(self, pipe: Any) -> int | None:
        """The cached residuals and probe of the latest generation of each branch (its peak over the generation)."""
        latest = {(s.model, s.branch, s.video): s for s in get_stats(pipe)}  # oldest first: the last of each stays
        return sum(s.cache_bytes for s in latest.values())

    def stats(self, pipe: Any) -> dict[str, Any]:
        stats = [s.to_dict() for s in get_stats(pipe)]
        if not stats:
            return {}
        return {"computed_steps": max(len(s["computed_steps"]) for s in stats),
                "steps": max(s["steps_seen"] for s in stats),
                "adacache": [{k: s[k] for k in ("branch", "model", "computed_steps", "rates", "distances", "motion")}
                             for s in stats]}


def _inside_context_parallelism(pipe: Any) -> bool:
    """Whether AdaCache stays applied to the pipeline's transformer under diffusers' context parallelism (the bench
    applies it, paused, before enabling parallelism: the split hooks then wrap its blocks, so a config changes with
    `reconfigure` instead of a removal and a new apply)."""
    model = transformers_of(pipe)[0]
    return is_applied(model) and compat.context_parallel_config(model) is not None


@dataclass
class DiffusersPeer(Method):
    """One of diffusers' own caches (`PEERS`), through `CacheMixin.enable_cache` on every transformer."""

    peer: str = "fbc"
    value: float = 0.05
    state: dict[str, Any] = field(default_factory=dict)  # MagCache's calibrated ratios per step count; hook handles
    kind: ClassVar[str] = "diffusers"
    watch_memory_live: ClassVar[bool] = True  # diffusers pipelines reset hook state at the end of a call

    def setting(self) -> Hashable:
        return (self.peer, self.value)

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "peer": PEER_NAMES[self.peer], "value": self.value}

    def unsupported(self, pipe: Any, guidance: float | None = None, steps: int | None = None) -> str | None:
        models = transformers_of(pipe)
        if not all(hasattr(m, "enable_cache") for m in models):
            return f"{type(models[0]).__name__} has no diffusers cache support (no CacheMixin.enable_cache)"
        return _PEER_SUPPORT[self.peer](pipe, models, guidance)

    def apply(self, pipe: Any, steps: int, run: Callable[[], Any] | None = None, guidance: float | None = None) -> None:
        for model in transformers_of(pipe):
            model.enable_cache(_PEER_CONFIG[self.peer](self, pipe, model, steps, run))

    def remove(self, pipe: Any) -> None:
        for model in transformers_of(pipe):
            if getattr(model, "is_cache_enabled", False):
                model.disable_cache()
        for handle in self.state.pop("handles", []):
            handle.remove()

    def held_bytes(self, pipe: Any) -> int | None:
        return sum(held_tensor_bytes(m) for m in transformers_of(pipe))


@dataclass
class CacheDitPeer(Method):
    """One of cache-dit's caches (`CACHEDIT_PEERS`), through a `cache_dit.BlockAdapter` on the pipeline's transformer
    built from adacache's own ModelSpec (where the blocks are, what they take and return); the set-up is in
    cachedit.py (`cachedit.block_plan`)."""

    variant: str = "dbcache"
    value: float | str = 0.08
    state: dict[str, Any] = field(default_factory=dict)  # what apply did, for remove, held_bytes and stats
    kind: ClassVar[str] = "cache-dit"
    watch_memory_live: ClassVar[bool] = True  # read while generating: its buffers are renewed per generation

    def setting(self) -> Hashable:
        return (self.variant, self.value)

    def describe(self) -> dict[str, Any]:
        settings = cachedit.run_settings(self.variant, self.value)
        return {**super().describe(), "value": self.value, "settings": settings}

    def unsupported(self, pipe: Any, guidance: float | None = None, steps: int | None = None) -> str | None:
        cache_dit, problem = cachedit.import_cache_dit()
        if cache_dit is None:
            return problem
        models = transformers_of(pipe)
        if len(models) > 1:
            return ("cache-dit counts steps per transformer over the whole generation; with two experts (Wan 2.2) "
                    "each sees only part of the steps, which this bench does not set up")
        plan = cachedit.block_plan(models[0])
        if isinstance(plan, str):
            return plan
        separate = _separate_cfg(cache_dit, pipe, guidance)
        if isinstance(separate, str):
            return separate
        if self.variant == "cachedit-mask" and steps is not None:
            try:
                cache_dit.steps_mask(total_steps=steps, mask_policy=self.value)
            except (AssertionError, ValueError):
                return f"cache-dit's steps masks are defined for 4, 6, or 8 and more steps, not for {steps}"
        return None

    def apply(self, pipe: Any, steps: int, run: Callable[[], Any] | None = None, guidance: float | None = None) -> None:
        reason = self.unsupported(pipe, guidance, steps)
        if reason:
            raise ValueError(f"method {self.name!r} cannot run here: {reason}")
        cache_dit, _ = cachedit.import_cache_dit()
        model = transformers_of(pipe)[0]
        if cache_dit.BlockAdapter.is_cached(model):
            raise RuntimeError(f"cache-dit is already enabled on this {type(model).__name__} (by another method, or "
                               "by hand); remove it first (cache_dit.disable_cache), or it would silently stay")
        plan = cachedit.block_plan(model)
        separate = _separate_cfg(cache_dit, pipe, guidance)
        cache_config = cache_dit.DBCacheConfig(
            Fn_compute_blocks=plan.first_blocks, Bn_compute_blocks=plan.last_blocks, num_inference_steps=steps,
            enable_separate_cfg=separate, **cachedit.variant_settings(cache_dit, self.variant, self.value, steps))
        calibrator = (cache_dit.TaylorSeerCalibratorConfig(taylorseer_order=cachedit.TAYLORSEER_ORDER)
                      if self.variant == "dbcache-taylorseer" else None)
        patterns = [cache_dit.ForwardPattern[p] for p in plan.patterns]
        self.state.update(model=model, steps=steps, separate_cfg=separate, attributes=set(vars(model)))
        with cachedit.quiet_cache_dit():
            adapter = cache_dit.BlockAdapter(  # no pipe: cache-dit keeps its context on the transformer
                transformer=model, blocks=plan.blocks if len(plan.blocks) > 1 else plan.blocks[0],
                forward_pattern=patterns if len(patterns) > 1 else patterns[0])
            self.state["adapter"] = adapter
            cache_dit.enable_cache(adapter, cache_config=cache_config, calibrator_config=calibrator)
        self.state["config"] = cache_config.strify() + (f"_{calibrator.strify(details=True)}" if calibrator else "")
        # Without a pipeline cache-dit keeps one context across calls and renews it once `steps` steps have run, but
        # only at the second call of the next generation (its counter is checked before it advances): that
        # generation's first call would be read as one more step of the last. Renew it at each generation's first
        # call instead, counted in transformer calls (two per step with split CFG).
        calls_per_generation = steps * (2 if separate else 1)
        calls = {"done": 0}

        def renew_at_generation_start(module: torch.nn.Module, args: tuple) -> None:
            if calls["done"] and calls["done"] % calls_per_generation == 0:
                with cachedit.quiet_cache_dit():
                    cache_dit.refresh_context(model, cache_config=copy.deepcopy(cache_config),
                                              calibrator_config=copy.deepcopy(calibrator))
            calls["done"] += 1

        self.state["handles"] = [model.register_forward_pre_hook(renew_at_generation_start)]

    def remove(self, pipe: Any) -> None:
        for handle in self.state.pop("handles", []):
            handle.remove()
        adapter, model = self.state.pop("adapter", None), self.state.pop("model", None)
        attributes = self.state.pop("attributes", None)
        for key in ("steps", "separate_cfg", "config"):
            self.state.pop(key, None)
        if model is None:
            return
        cache_dit, problem = cachedit.import_cache_dit()
        if cache_dit is None:
            raise RuntimeError(f"cache-dit's hooks cannot be taken off {type(model).__name__}: {problem}")
        with cachedit.quiet_cache_dit():
            if adapter is not None and cache_dit.BlockAdapter.is_normalized(adapter):
                cache_dit.disable_cache(adapter)
            else:  # enable_cache stopped before it took the adapter in: undo what it did on the transformer
                cache_dit.disable_cache(model)
        if "forward" in vars(model) and "forward" not in attributes:
            del model.forward  # cache-dit puts the class's forward back as an instance attribute: leave none

    def held_bytes(self, pipe: Any) -> int | None:
        model = self.state.get("model")
        manager = getattr(model, "_context_manager", None)  # set by cache-dit: its contexts, buffers, calibrators
        # TaylorSeer's derivatives sit 8 levels down: manager, contexts, context, calibrator, states, state, lists
        return state_tensor_bytes([manager], model, max_depth=10) if manager is not None else 0

    def stats(self, pipe: Any) -> dict[str, Any]:
        """Computed steps from cache-dit's own summary (its cached steps per block list and CFG branch)."""
        model = self.state.get("model")
        if model is None:
            return {}
        cache_dit, _ = cachedit.import_cache_dit()
        with cachedit.quiet_cache_dit():
            summaries = cache_dit.summary(model, logging=False)
        per_list = summaries[:-1] or summaries  # one per cached block list, then the transformer's own
        steps = self.state["steps"]
        cached = [s.cached_steps for s in per_list]  # per CFG branch, as AdaCache's count: the most computed
        if self.state["separate_cfg"]:
            cached += [s.cfg_cached_steps for s in per_list]
        return {"computed_steps": steps - min(len(c) for c in cached), "steps": steps,
                "cachedit": {"config": self.state.get("config"), "cached_steps": sorted(per_list[0].cached_steps),
                             "cfg_cached_steps": sorted(per_list[0].cfg_cached_steps)}}


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
    "dbcache": _Parameter("residual difference threshold", float, 1e-4, 10, "dbcache:0.08"),
    "dbcache-taylorseer": _Parameter("residual difference threshold", float, 1e-4, 10, "dbcache-taylorseer:0.08"),
}
# AdaCache's own parameter, which +moreg may follow (the peers' may not)
ADACACHE_PARAMETERS: dict[str, _Parameter] = {
    "speedup": _Parameter("compute speed-up aimed at, without calibration", float, 1, 20, "speedup:2.5"),
}
_INTEGER = re.compile(r"[0-9]+")
_DECIMAL = re.compile(r"[0-9]+\.?[0-9]*([eE][+-]?[0-9]+)?|\.[0-9]+([eE][+-]?[0-9]+)?")
MOREG = "+moreg"
_PEER_BASES = (*PARAMETERS, *CACHEDIT_PEERS)  # names that take a parameter after ':', and never +moreg


def _number(token: str, base: str, param: str) -> float | int:
    """The method's parameter, in ASCII digits only (Python would also read '３', '1_0' and ' 3', making names
    that differ but run the same), within its range; ConfigError naming the method and the range otherwise."""
    spec = {**PARAMETERS, **ADACACHE_PARAMETERS}[base]
    if not param:
        defaults = {**PEER_DEFAULTS, **CACHEDIT_DEFAULTS}
        default = f"{base} (its default, {defaults[base]}) or " if base in defaults else ""
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


def _mask_policy(token: str, param: str) -> str:
    if param not in MASK_POLICIES:
        raise ConfigError(f"method {token!r}: cachedit-mask's policy must be one of {', '.join(MASK_POLICIES)} "
                          f"(cache-dit's steps masks, slowest first; e.g. cachedit-mask:fast), got {param!r}")
    return param


def parse_method(name: str, tuned: str | os.PathLike | Mapping[str, Any] | None = None) -> Method:
    """A `Method` from its name (see the module docstring); ConfigError (a ValueError) with the grammar or the
    valid range for anything else. `tuned` is what `auto[+moreg]` stands for: the model's own calibrated codebook
    file, or a mapping of its plain and MoReg ones (`pipelines.calibrated_codebooks`), or None: the rule is
    `pipelines.auto_choice`."""
    if not isinstance(name, str):
        raise ConfigError(f"a method name must be a string, got {name!r}")
    token = name.strip()
    if token == "none":
        return Baseline(token, "baseline")
    base, colon, param = token.partition(":")
    if base in _PEER_BASES or base.endswith(MOREG) and base[: -len(MOREG)] in _PEER_BASES:
        if base.endswith(MOREG) or param.endswith(MOREG):
            raise ConfigError(f"method {token!r}: {MOREG} applies to AdaCache configs (auto, a preset or a .json "
                              f"file), not to {base.removesuffix(MOREG)}")
    if base == "static":
        k = _number(token, base, param)
        return AdaCacheMethod(token, "static reuse", AdaCacheConfig(codebook={1.0: int(k)}))
    if base in PEERS:
        value = _number(token, base, param) if colon else PEER_DEFAULTS[base]
        return DiffusersPeer(token, PEER_NAMES[base], peer=base, value=value)
    if base in CACHEDIT_PEERS:
        if base == "cachedit-mask":
            value = _mask_policy(token, param) if colon else CACHEDIT_DEFAULTS[base]
        else:
            value = _number(token, base, param) if colon else CACHEDIT_DEFAULTS[base]
        return CacheDitPeer(token, CACHEDIT_NAMES[base], variant=base, value=value)
    source, moreg = (token[: -len(MOREG)], True) if token.endswith(MOREG) else (token, False)
    if source.endswith(MOREG):
        raise ConfigError(f"method {token!r}: {MOREG} is given more than once; write {source.split(MOREG)[0]}{MOREG}")
    if source == "auto":
        source = auto_choice(tuned, moreg)
    config = None
    if source == "default":  # what apply_adacache does with no config: no calibration, a budget of 2x
        config = AdaCacheConfig()
    elif source.startswith("speedup:"):  # the calibration-free default at another speed-up
        config = AdaCacheConfig(speedup=_number(token, "speedup", source.partition(":")[2]))
    elif source in PRESETS or source.endswith(".json") or Path(source).is_file():
        try:
            config = AdaCacheConfig.load(source)
        except ConfigError as error:
            raise ConfigError(f"method {token!r}: {error}") from None
    if config is not None:
        config = dataclasses.replace(config, moreg=config.moreg or moreg)
        family = ("AdaCache" + (" default" if config.calibration_free else "")
                  + (" forecast" if config.store == "forecast" else "") + (" + MoReg" if config.moreg else ""))
        return AdaCacheMethod(token, family, config)
    raise ConfigError(
        f"unknown method {token!r}; methods are: none, default[+moreg], speedup:<x>[+moreg], auto[+moreg], a "
        f"preset[+moreg] ({', '.join(sorted(PRESETS))}), "
        f"a config .json[+moreg], static:<k>, {', '.join(f'{p}[:value]' for p in PEERS)}, "
        f"{', '.join(f'{p}[:threshold]' for p in CACHEDIT_PEERS[:2])}, cachedit-mask[:{'|'.join(MASK_POLICIES)}]"
    )


def parse_methods(names: list[str], tuned: str | os.PathLike | Mapping[str, Any] | None = None) -> list[Method]:
    """Parse all names first (a typo fails before any work); the baseline is always first, each method once
    (two names for one setting, such as fbc:0.1 and fbc:0.10, are refused too)."""
    methods = [parse_method(n, tuned) for n in names if not isinstance(n, str) or n.strip()]
    seen: dict[Any, str] = {}
    for method in methods:
        if method.name in seen.values():
            raise ConfigError(f"method {method.name!r} is listed twice")
        same = method.setting()
        if same in seen:
            raise ConfigError(f"methods {seen[same]!r} and {method.name!r} are the same setting; list it once")
        seen[same] = method.name
    baseline = [m for m in methods if m.is_baseline] or [parse_method("none")]
    return baseline + [m for m in methods if not m.is_baseline]


# --- diffusers' own caches ----------------------------------------------------------------------------------------
# Pipelines known to run the unconditional and conditional branches in one batched call. PAB and FasterCache keep
# their state per attention module, not per cache_context, so on split-CFG pipelines (Wan, HunyuanVideo) the
# unconditional call would reuse the conditional call's attention; FasterCache's branch skipping also needs the batch.
BATCHED_CFG_PIPELINES = ("EmbeddedVideoPipeline", "LattePipeline", "CogVideoXPipeline", "AllegroPipeline",
                         "MochiPipeline", "LTXPipeline")


TAYLORSEER_MODULES = r"(blocks|transformer_blocks|single_transformer_blocks|temporal_transformer_blocks)\.\d+\.(attn\d*|ff|ffn)"


def _timestep_callback(method: DiffusersPeer, pipe: Any) -> Callable[[], int]:
    """The current timestep for PAB and FasterCache: the pipeline's own `current_timestep` (diffusers' convention),
    else read off the transformer's last call by a pre-hook that `DiffusersPeer.remove` takes away again."""
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


def _fbc(method: DiffusersPeer, pipe: Any, model: torch.nn.Module, steps: int, run: Callable | None) -> Any:
    from diffusers import FirstBlockCacheConfig

    return FirstBlockCacheConfig(threshold=float(method.value))


def _pab(method: DiffusersPeer, pipe: Any, model: torch.nn.Module, steps: int, run: Callable | None) -> Any:
    from diffusers import PyramidAttentionBroadcastConfig

    # self-attention broadcast in the timestep range of the PAB paper's defaults; cross-attention left computed
    return PyramidAttentionBroadcastConfig(
        spatial_attention_block_skip_range=int(method.value), spatial_attention_timestep_skip_range=(100, 800),
        temporal_attention_block_skip_range=int(method.value) if _has_temporal_blocks(model) else None,
        temporal_attention_timestep_skip_range=(100, 800),
        current_timestep_callback=_timestep_callback(method, pipe),
    )


def _magcache(method: DiffusersPeer, pipe: Any, model: torch.nn.Module, steps: int, run: Callable | None) -> Any:
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


def _taylorseer(method: DiffusersPeer, pipe: Any, model: torch.nn.Module, steps: int, run: Callable | None) -> Any:
    from diffusers import TaylorSeerCacheConfig

    # The attention and feed-forward outputs of every block are forecast, as in the TaylorSeer paper. diffusers'
    # default patterns ("^blocks.*attn", matched in full) hook no module of a model whose attentions are named
    # attn1/attn2 (Wan, Latte, CogVideoX...), which would silently make it the uncached model; full-precision
    # factors (the bfloat16 default costs accuracy for nothing on CPU); the other settings are diffusers' defaults.
    return TaylorSeerCacheConfig(cache_interval=int(method.value), taylor_factors_dtype=torch.float32,
                                 cache_identifiers=[TAYLORSEER_MODULES])


def _fastercache(method: DiffusersPeer, pipe: Any, model: torch.nn.Module, steps: int, run: Callable | None) -> Any:
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


# --- cache-dit: one call per step or two (here, beside BATCHED_CFG_PIPELINES; the rest of its set-up: cachedit.py) -
def _separate_cfg(cache_dit: Any, pipe: Any, guidance: float | None) -> bool | str:
    """Whether each step makes two transformer calls (split CFG), which cache-dit must be told since it counts
    steps in calls; or why that is unknown. Pipelines batching their CFG branches make one call, as do all without
    guidance (scale <= 1); for others cache-dit's own registry of pipelines answers."""
    if guidance is not None and guidance <= 1.0:
        return False
    name = type(pipe).__name__
    if name in BATCHED_CFG_PIPELINES:
        return False
    if cache_dit.BlockAdapterRegister.is_supported(pipe):
        return bool(cache_dit.BlockAdapterRegister.has_separate_cfg(pipe))
    return (f"{name} is not known to batch its CFG branches in one call (known: {', '.join(BATCHED_CFG_PIPELINES)}) "
            "nor known to cache-dit; cache-dit counts steps in transformer calls, so it must know whether a step "
            "makes one call or two")
