"""adacache: Adaptive Caching (AdaCache, arXiv 2411.02397) with Motion Regularization for video DiTs.

    from adacache import AdaCacheConfig, apply_adacache, remove_adacache, get_stats
    apply_adacache(pipe.transformer, AdaCacheConfig(codebook={0.08: 6, 0.16: 4, 1.0: 1}, moreg=True))

Importing this package is light: torch only; diffusers is imported when a cache is applied.
"""

from .algorithm import Schedule, lookup_rate, motion_score, relative_l1
from .config import PRESETS, AdaCacheConfig, ConfigError
from .hooks import (
    GenerationStats,
    apply_adacache,
    cache_context,
    compile_blocks,
    get_stats,
    remove_adacache,
    reset_state,
)
from .models.specs import MODEL_SPECS, BlockList, BlockSpec, ModelSpec, register_model

__version__ = "0.1.0"

__all__ = [
    "AdaCacheConfig",
    "BlockList",
    "BlockSpec",
    "ConfigError",
    "GenerationStats",
    "MODEL_SPECS",
    "ModelSpec",
    "PRESETS",
    "Schedule",
    "apply_adacache",
    "cache_context",
    "compile_blocks",
    "get_stats",
    "lookup_rate",
    "motion_score",
    "register_model",
    "relative_l1",
    "remove_adacache",
    "reset_state",
]
