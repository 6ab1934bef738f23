"""What a bench run is and how its folder is written, shared by the bench (`bench.py`) and its report (`report.py`)
so that the imports go one way: bench -> report -> folder.

`BenchSettings` is saved in the folder as run.json; `write_atomic` replaces a file whole or not at all; `finite`
turns NaN and inf into None so that records and reports are strict JSON; `BenchFolderError` names the file at fault
and what to do.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class BenchSettings:
    """What a run measures; saved as run.json, and a resumed run must match it."""

    model: str  # "embedded" or the diffusers pipeline id / folder
    prompts: list[str]
    methods: list[str]
    seeds: list[int] = field(default_factory=lambda: [0])
    steps: int = 30
    guidance: float = 4.0
    repeats: int = 1  # timed generations per video and method; the median counts
    warmup: int = 1  # untimed generations per method at the start of each process
    flops: bool = True  # count the transformer FLOPs in an extra pass per video and method
    call: dict[str, Any] = field(default_factory=dict)  # extra pipeline arguments (height, width, num_frames)
    # "none": under torchrun, each process takes its share of the videos; "ulysses" or "ring": every process runs
    # every video together, its tokens split over them by diffusers' context parallelism
    context_parallel: str = "none"

    def __post_init__(self) -> None:
        if not self.prompts or any(not isinstance(p, str) or not p.strip() for p in self.prompts):
            raise ValueError("the prompt set is empty or holds an empty prompt; give one prompt per line")
        if not self.seeds or any(not isinstance(s, int) or s < 0 for s in self.seeds):
            raise ValueError(f"seeds must be non-negative integers, got {self.seeds}")
        if len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"seeds are listed twice: {self.seeds}")
        if self.steps < 1 or self.repeats < 1 or self.warmup < 0:
            raise ValueError("steps and repeats must be positive, warmup zero or more")

    def videos(self) -> list[tuple[str, int, str, int]]:
        """(video id, prompt index, prompt, seed) for every prompt x seed."""
        return [(f"p{i:03d}-s{seed}", i, p, seed) for i, p in enumerate(self.prompts) for seed in self.seeds]


class BenchFolderError(ValueError):
    """The output folder holds something a run cannot resume from; the message names the file and what to do."""


def refuse(path: Path, problem: str, remedy: str | None = None) -> BenchFolderError:
    """The error for `path` and its `problem`, with what to do (by default: delete the folder or use another)."""
    remedy = remedy or f"delete the folder {path.parent} (or that file) or pass another --out folder"
    return BenchFolderError(f"{path} {problem}; {remedy}")


def write_atomic(path: Path, text: str) -> None:
    """Replace `path` with `text` whole (through a temporary file beside it), or raise BenchFolderError."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    except OSError as error:
        if tmp.is_file():
            tmp.unlink()
        raise refuse(path, f"cannot be written ({error.strerror or error})",
                     "make it a writable file (delete what is there) or pass another --out folder") from None


def finite(value: Any) -> Any:
    """The value with every non-finite float (NaN, inf) replaced by None: records and reports are strict JSON."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite(v) for v in value]
    return value
