"""The decision's former home: `adacache.core.decision` (kept so `from adacache.algorithm import Schedule` works)."""

from .core.decision import (  # noqa: F401
    ProbeSums,
    Schedule,
    StepRecord,
    l1,
    lookup_rate,
    motion_score,
    relative_l1,
)
