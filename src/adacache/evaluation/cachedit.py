"""How the bench sets up cache-dit's caches (`methods.CacheDitPeer`): whether cache-dit imports, which block lists
of a transformer it may cache and through which of its forward patterns (read from adacache's ModelSpec of the
transformer's class), its compute blocks, the DBCacheConfig fields of each variant, and its loggers held quiet while
the bench owns the terminal. cache-dit is optional: nothing here imports it at module level."""

from __future__ import annotations

import contextlib
import inspect
import logging
from dataclasses import dataclass
from typing import Any, Iterator

import torch

from ..models.specs import BlockSpec, get_attribute, registered_spec

CACHEDIT_MISSING = "cache-dit is not installed: pip install cache-dit (or pip install 'adacache[peers]')"


# --- compute blocks ---------------------------------------------------------------------------------------------------
# DBCache runs the first Fn blocks every step and decides from their residual whether to reuse the cached residual of
# the middle blocks; the last Bn blocks then run too. cache-dit's defaults, F8B0, need more than 8 blocks to cache
# anything at all (it refuses Fn above the block count): they are kept where a block list has at least
# FULL_DEFAULTS_FROM blocks (so that half of it or more can be cached); smaller models get F1B0, cache-dit's
# lightest setting (the embedded model's 6 blocks: 5 of 6 cached on a reused step).
CACHEDIT_FN, CACHEDIT_BN = 8, 0  # cache-dit's DBCacheConfig defaults
FULL_DEFAULTS_FROM = 2 * CACHEDIT_FN
SMALL_FN, SMALL_BN = 1, 0
TAYLORSEER_ORDER = 1  # cache-dit's default order of TaylorSeerCalibratorConfig (its docs recommend 1 or 2)


@dataclass(frozen=True)
class CacheDitPlan:
    """How cache-dit's BlockAdapter is set up on one transformer: its block lists in call order, each with the
    name of its cache_dit.ForwardPattern, and the compute blocks (Fn first, Bn last) of every list."""

    blocks: list[torch.nn.ModuleList]
    patterns: list[str]
    first_blocks: int
    last_blocks: int


def import_cache_dit() -> tuple[Any, str | None]:
    """(cache_dit, None), or (None, why it cannot be used)."""
    try:
        import cache_dit
    except ImportError:
        return None, CACHEDIT_MISSING
    except Exception as error:  # noqa: BLE001 - an install that breaks on import: say so, and skip
        return None, f"cache-dit failed to import ({type(error).__name__}: {str(error)[:160]}); reinstall it: " \
                     "pip install --force-reinstall cache-dit"
    return cache_dit, None


@contextlib.contextmanager
def quiet_cache_dit() -> Iterator[None]:
    """cache-dit logs every enable, disable and refresh (INFO and WARNING) through handlers of its own; the bench
    owns the terminal, so its loggers are held at ERROR while cache-dit is called, and put back after."""
    loggers = [logging.getLogger(name) for name in list(logging.root.manager.loggerDict)
               if name == "cache_dit" or name.startswith("cache_dit.")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


def block_plan(model: torch.nn.Module) -> CacheDitPlan | str:
    """The BlockAdapter set-up for `model`, from adacache's ModelSpec of its class; or why cache-dit cannot cache it."""
    name = type(model).__name__
    spec = registered_spec(model)
    if spec is None:
        return (f"{name} has no ModelSpec (adacache.register_model): which block lists cache-dit may cache, and what "
                "their blocks take and return, is unknown")
    if spec.interleave:
        return (f"{name} calls its block lists interleaved ({', '.join(b.attribute for b in spec.block_lists)}); "
                "cache-dit caches each block list as one unit, run one after the other")
    blocks, patterns = [], []
    for block_list in spec.block_lists:
        try:
            modules = get_attribute(model, block_list.attribute)
        except AttributeError:
            modules = None
        if not isinstance(modules, torch.nn.ModuleList) or not len(modules):
            return f"{name}.{block_list.attribute} is not a ModuleList of blocks, as its ModelSpec says"
        pattern = forward_pattern(block_list.block, modules[0])
        if pattern is None:
            return (f"{name}'s blocks in {block_list.attribute} do not take (hidden_states, encoder_hidden_states, "
                    "...) first and return the video stream alone or with the text stream, as cache-dit's forward "
                    "patterns need")
        blocks.append(modules)
        patterns.append(pattern)
    fewest = min(len(b) for b in blocks)
    first, last = (CACHEDIT_FN, CACHEDIT_BN) if fewest >= FULL_DEFAULTS_FROM else (SMALL_FN, SMALL_BN)
    if fewest <= first + last:
        return f"{name} has {fewest} block(s) in a block list; cache-dit computes the first {first} every step and " \
               "needs at least one more to cache"
    return CacheDitPlan(blocks, patterns, first, last)


def forward_pattern(block_spec: BlockSpec, block: torch.nn.Module) -> str | None:
    """The name of cache-dit's ForwardPattern for blocks described by `block_spec`, or None where none fits.

    cache-dit calls a block list's blocks as block(hidden_states, encoder_hidden_states, *rest) (Pattern_0/1/2), or
    block(hidden_states, *rest) where the blocks take no text (Pattern_3); Pattern_2 blocks return the video stream
    alone, Pattern_0 and Pattern_1 return both streams, video first or second."""
    parameters = list(inspect.signature(block.forward).parameters)
    if block_spec.hidden_states_argument != "hidden_states" or parameters[:1] != ["hidden_states"]:
        return None
    takes_text = parameters[1:2] == ["encoder_hidden_states"]
    if block_spec.encoder_hidden_states_argument is None:
        return "Pattern_2" if takes_text else "Pattern_3" if "encoder_hidden_states" not in parameters else None
    if block_spec.encoder_hidden_states_argument != "encoder_hidden_states" or not takes_text:
        return None
    order = (block_spec.output_hidden_states_index, block_spec.output_encoder_hidden_states_index)
    return {(0, 1): "Pattern_0", (1, 0): "Pattern_1"}.get(order)


def variant_settings(cache_dit: Any, variant: str, value: float | str, steps: int) -> dict[str, Any]:
    """The DBCacheConfig fields that differ between the cache-dit methods (the rest stay cache-dit's defaults)."""
    if variant == "cachedit-mask":
        # "static": the steps the mask leaves out reuse the cache whatever the residual difference, so the method
        # computes a fixed set of steps ("dynamic" would still ask the threshold on those steps)
        return {"steps_computation_mask": cache_dit.steps_mask(total_steps=steps, mask_policy=value),
                "steps_computation_policy": "static"}
    return {"residual_diff_threshold": float(value)}


def run_settings(variant: str, value: float | str) -> dict[str, Any]:
    """The settings a cache-dit method runs with, for run.json (the model decides the compute blocks)."""
    settings: dict[str, Any] = {
        "compute_blocks": f"F{CACHEDIT_FN}B{CACHEDIT_BN} on block lists of {FULL_DEFAULTS_FROM} or more blocks, else "
                          f"F{SMALL_FN}B{SMALL_BN}",
        "other_settings": "cache-dit's DBCacheConfig defaults (max_warmup_steps 8, no cap on cached steps)",
    }
    if variant == "cachedit-mask":
        settings.update(mask_policy=value, steps_computation_policy="static")
    else:
        settings["residual_diff_threshold"] = value
    if variant == "dbcache-taylorseer":
        settings["taylorseer_order"] = TAYLORSEER_ORDER
    return settings
