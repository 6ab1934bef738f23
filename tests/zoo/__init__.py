"""Tiny configs and inputs for every video transformer class in the installed diffusers (the conformance sweep).

The eight original families live in `adacache.testing.TINY_MODELS`; the rest are in this folder, one module per
group (g1..g4), each exporting ENTRIES (TinyModel list) and EXCLUDED ({class name: reason it cannot be built or
run tiny here}).
"""

from __future__ import annotations

import importlib

from adacache.testing import TINY_MODELS, TinyModel

GROUPS = ("g1", "g2", "g3", "g4")


def _groups():
    """The group modules present (a group not written yet is skipped; an error inside one is not)."""
    for group in GROUPS:
        try:
            yield importlib.import_module(f"zoo.{group}")
        except ModuleNotFoundError as error:
            if error.name != f"zoo.{group}":
                raise


def entries() -> dict[str, TinyModel]:
    """{class name: TinyModel} over the original families and every group."""
    out = {m.class_name: m for m in TINY_MODELS.values()}
    for module in _groups():
        out.update({m.class_name: m for m in module.ENTRIES})
    return out


def excluded() -> dict[str, str]:
    """{class name: why it cannot be built tiny here} over every group."""
    return {name: why for module in _groups() for name, why in getattr(module, "EXCLUDED", {}).items()}
