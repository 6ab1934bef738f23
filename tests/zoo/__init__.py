"""Tiny configs and inputs for every video transformer class in the installed diffusers (the conformance sweep).

The eight original families live in `adacache.testing.TINY_MODELS`; the rest are in this folder, one module per
group (g1..g4), each exporting ENTRIES (TinyModel list) and EXCLUDED ({class name: reason it cannot be built or
run tiny here}).
"""

from __future__ import annotations

import importlib

from adacache.testing import TINY_MODELS, TinyModel

GROUPS = ("g1", "g2", "g3", "g4")


def entries() -> dict[str, TinyModel]:
    """{class name: TinyModel} over the original families and every group."""
    out = {m.class_name: m for m in TINY_MODELS.values()}
    for group in GROUPS:
        try:
            module = importlib.import_module(f"zoo.{group}")
        except ModuleNotFoundError as error:
            if error.name != f"zoo.{group}":
                raise
            continue
        out.update({m.class_name: m for m in module.ENTRIES})
    return out


def excluded() -> dict[str, str]:
    out: dict[str, str] = {}
    for group in GROUPS:
        try:
            module = importlib.import_module(f"zoo.{group}")
        except ModuleNotFoundError as error:
            if error.name != f"zoo.{group}":
                raise
            continue
        out.update(getattr(module, "EXCLUDED", {}))
    return out
