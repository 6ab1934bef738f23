"""The light install: what it leaves out is named, with the extra to install, before any work starts."""

from __future__ import annotations

import importlib.util
import sys

import pytest

from adacache import cli
from adacache.extras import MissingExtra, need


def test_a_missing_optional_module_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "imageio", None)  # import imageio now raises ModuleNotFoundError
    monkeypatch.setitem(sys.modules, "imageio.v2", None)
    with pytest.raises(MissingExtra, match=r'Writing video needs imageio.*pip install "adacache\[all\]"'):
        need("imageio.v2", "Writing video")


def test_a_missing_module_of_the_library_itself_is_not_disguised(monkeypatch):
    with pytest.raises(ModuleNotFoundError) as error:
        need("adacache_no_such_module", "Anything")
    assert not isinstance(error.value, MissingExtra)


def test_the_command_line_names_the_extra_before_any_work(monkeypatch, capsys, tmp_path):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "imageio_ffmpeg" else real(name, *a))
    out = tmp_path / "x.mp4"
    assert cli.main(["generate", "a red circle moving left", "-o", str(out)]) == 2
    err = capsys.readouterr().err
    assert "imageio-ffmpeg" in err and 'pip install "adacache[all]"' in err
    assert not out.exists()


def test_the_web_page_alone_needs_gradio(monkeypatch, capsys):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "gradio" else real(name, *a))
    assert cli.missing_for_cli("generate") is None
    assert "gradio" in cli.missing_for_cli("serve")
