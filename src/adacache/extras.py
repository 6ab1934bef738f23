"""What the light install leaves out, and the error that says how to get it.

`pip install adacache` brings what the library needs (torch, diffusers, numpy): `apply_adacache` and the rest of
the caching API. The command line, the embedded model, video writing, plots, the benchmark and the web page come
with the `all` extra (`pip install "adacache[all]"`); `need` imports one of their modules or raises MissingExtra
naming the extra to install.
"""

from __future__ import annotations

import importlib
from types import ModuleType

# module -> (package to pip install, extra that brings it)
_PROVIDED_BY = {
    "tqdm": ("tqdm", "all"),
    "imageio": ("imageio", "all"),
    "imageio_ffmpeg": ("imageio-ffmpeg", "all"),
    "matplotlib": ("matplotlib", "all"),
    "accelerate": ("accelerate", "all"),
    "gradio": ("gradio", "all"),
}


def missing_for_cli(command: str) -> str | None:
    """Why the command line cannot run `command` here (its extra is not installed), or None. Checked before any
    work starts, so a missing package never costs a generation."""
    import importlib.util

    modules = ["tqdm", "imageio", "imageio_ffmpeg", "matplotlib", "accelerate"] + (["gradio"] if command == "serve" else [])
    missing = [_PROVIDED_BY[m][0] for m in modules if importlib.util.find_spec(m) is None]
    if not missing:
        return None
    return (f"the command line needs {', '.join(missing)}, which the light install (pip install adacache) leaves "
            'out: pip install "adacache[all]"')


class MissingExtra(ModuleNotFoundError):
    """A feature's optional dependency is not installed; the message says which extra brings it."""


def need(module: str, purpose: str) -> ModuleType:
    """Import `module` (e.g. "imageio.v3") for `purpose` (e.g. "writing MP4"), or raise MissingExtra."""
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as error:
        top = module.split(".")[0]
        if error.name is None or error.name.split(".")[0] != top or top not in _PROVIDED_BY:
            raise
        package, extra = _PROVIDED_BY[top]
        raise MissingExtra(
            f"{purpose} needs {package}, which the light install (pip install adacache) leaves out: "
            f'pip install "adacache[{extra}]"',
            name=top,
        ) from None
