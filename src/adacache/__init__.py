"""adacache: Adaptive Caching (AdaCache, arXiv 2411.02397) with Motion Regularization for video DiTs.

    from adacache import AdaCacheConfig, apply_adacache, remove_adacache, get_stats
    apply_adacache(pipe.transformer, AdaCacheConfig(codebook={0.08: 6, 0.16: 4, 1.0: 1}, moreg=True))

Importing this package is light: names are imported on first use (torch with the first that needs it; diffusers
when a cache is applied), so `adacache --help`, and a Ctrl-C during start-up, do not wait on torch.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "Schedule": ".core.decision", "lookup_rate": ".core.decision", "motion_score": ".core.decision",
    "relative_l1": ".core.decision",
    "PRESETS": ".config", "AdaCacheConfig": ".config", "ConfigError": ".config",
    "GenerationStats": ".hooks", "apply_adacache": ".hooks", "cache_context": ".hooks", "compile_blocks": ".hooks",
    "get_stats": ".hooks", "remove_adacache": ".hooks", "reset_state": ".hooks", "describe": ".hooks",
    "reconfigure": ".hooks",
    "transformers_of": ".hooks",
    "InferenceError": ".models.infer",
    "MODEL_SPECS": ".models.specs", "BlockList": ".models.specs", "BlockSpec": ".models.specs",
    "ModelSpec": ".models.specs", "register_model": ".models.specs",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'adacache' has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value  # once imported, a plain attribute
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
