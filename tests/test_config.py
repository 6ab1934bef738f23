import json

import pytest

from adacache import PRESETS, AdaCacheConfig, ConfigError


@pytest.mark.parametrize(
    "codebook, message",
    [
        ({}, "empty"),
        ({0.16: 4, 0.08: 6, 1.0: 1}, "strictly ascending"),
        ({0.08: 0, 1.0: 1}, "positive int"),
        ({0.08: -2, 1.0: 1}, "positive int"),
        ({0.08: 1.5, 1.0: 1}, "positive int"),
        ({-0.1: 2, 1.0: 1}, "positive and finite"),
        ({float("nan"): 2}, "positive and finite"),
        ({"abc": 2}, "not a number"),
        ("0.08:6", "mapping"),
    ],
)
def test_bad_codebooks_raise_with_a_fix(codebook, message):
    with pytest.raises(ConfigError, match=message):
        AdaCacheConfig(codebook=codebook)


def test_unsorted_codebook_error_shows_the_sorted_one():
    with pytest.raises(ConfigError, match=r"\{0.08: 6, 0.16: 4, 1.0: 1\}"):
        AdaCacheConfig(codebook={0.16: 4, 0.08: 6, 1.0: 1})


def test_codebook_of_any_length_and_string_keys():
    assert AdaCacheConfig(codebook={1.0: 2}).codebook == {1.0: 2}
    long = {round(0.01 * i, 2): max(1, 20 - i) for i in range(1, 21)}
    assert AdaCacheConfig(codebook=long).codebook == long
    assert AdaCacheConfig(codebook={"0.08": 6, "1.0": 1}).codebook == {0.08: 6, 1.0: 1}


def test_presets_are_the_authors_codebooks():
    fast = AdaCacheConfig.from_preset("opensora-30-fast")
    assert fast.codebook == {0.08: 6, 0.16: 5, 0.24: 4, 0.32: 3, 0.40: 2, 1.00: 1}
    assert fast.moreg_window == (4, 26)
    assert AdaCacheConfig.from_preset("opensora-100-fast").codebook == {
        0.03: 12, 0.05: 10, 0.07: 8, 0.09: 6, 0.11: 4, 1.00: 3
    }
    assert AdaCacheConfig.from_preset("opensora-30-slow", moreg=True).moreg
    assert set(PRESETS) >= {"opensora-30-fast", "opensora-30-slow", "opensora-100-fast"}
    with pytest.raises(ConfigError, match="known presets"):
        AdaCacheConfig.from_preset("opensora-30-fastest")


def test_unknown_keys_are_an_error():
    with pytest.raises(ConfigError, match="unknown AdaCacheConfig keys"):
        AdaCacheConfig.from_dict({"codebook": {1.0: 1}, "treshold": 0.1})


def test_save_load_roundtrip(tmp_path):
    config = AdaCacheConfig(codebook={0.05: 4, 1.0: 1}, moreg=True, moreg_window=(3, 20), probe_block=2)
    path = tmp_path / "cache.json"
    config.save(path)
    assert json.loads(path.read_text())["codebook"] == {"0.05": 4, "1.0": 1}
    assert AdaCacheConfig.load(path) == config
    assert AdaCacheConfig.load("opensora-30-slow") == AdaCacheConfig.from_preset("opensora-30-slow")
    assert [p.name for p in tmp_path.iterdir()] == ["cache.json"]  # no temporary file left behind


def test_load_errors(tmp_path):
    with pytest.raises(ConfigError, match="neither a preset"):
        AdaCacheConfig.load(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        AdaCacheConfig.load(bad)


@pytest.mark.parametrize(
    "field, value",
    [("moreg_window", (5, 2)), ("moreg_window", (0, 3)), ("moreg_strides", ()), ("moreg_norm", 0),
     ("probe_block", 1.5), ("num_inference_steps", 0), ("probe_point", "")],
)
def test_bad_fields(field, value):
    with pytest.raises(ConfigError):
        AdaCacheConfig(**{field: value})


def test_default_moreg_window_scales_with_steps():
    # paper mode: the authors' window, from max(2, N/10); with a codebook, from step 2 (the first with a distance:
    # read outside the window, it met thresholds scaled for regularised distances); without one, to the last step
    assert AdaCacheConfig(paper_mode=True).resolve_moreg_window(30) == (3, 27)
    assert AdaCacheConfig(paper_mode=True).resolve_moreg_window(100) == (10, 90)
    assert AdaCacheConfig.from_preset("opensora-30-fast", moreg_window=None).resolve_moreg_window(30) == (2, 27)
    assert AdaCacheConfig().resolve_moreg_window(30) == (2, 30)
    assert AdaCacheConfig(moreg_window=(4, 26)).resolve_moreg_window(100) == (4, 26)


def test_no_codebook_is_the_calibration_free_default_and_paper_mode_takes_the_authors():
    assert AdaCacheConfig().calibration_free and AdaCacheConfig().speedup == 2.0
    assert AdaCacheConfig.from_preset("fast").speedup == 3.0 and AdaCacheConfig.from_preset("fast").calibration_free
    assert AdaCacheConfig(paper_mode=True).codebook == AdaCacheConfig.from_preset("opensora-30-fast").codebook
    for bad in (0.5, float("nan"), 25, "2", True):
        with pytest.raises(ConfigError, match="speedup"):
            AdaCacheConfig(speedup=bad)
    config = AdaCacheConfig(speedup=2.5)
    assert AdaCacheConfig.from_dict(config.to_dict()) == config
