"""reconfigure: another config for an applied AdaCache without unwrapping its blocks (what context parallelism needs,
whose split hooks wrap them), or None to pause it."""

from __future__ import annotations

import pytest
import torch

import adacache
from adacache import AdaCacheConfig, apply_adacache, get_stats, reconfigure, remove_adacache
from adacache.hooks import is_applied
from toy import TOY_SPEC, ToyDiT, denoise


def toy_input(batch=1, seed=0):
    return torch.randint(-4, 5, (batch, 6, 3), generator=torch.Generator().manual_seed(seed)).float()

SKIP = AdaCacheConfig(codebook={1e9: 3}, num_inference_steps=6)
COMPUTE = AdaCacheConfig(codebook={1e9: 1}, num_inference_steps=6)


def test_a_reconfigured_model_runs_as_a_freshly_applied_one():
    fresh = ToyDiT()
    apply_adacache(fresh, SKIP, spec=TOY_SPEC)
    expected = denoise(fresh, toy_input())
    expected_steps = get_stats(fresh)[-1].computed_steps

    model = ToyDiT()
    apply_adacache(model, COMPUTE, spec=TOY_SPEC)
    denoise(model, toy_input(), stop_after=3)  # a generation in progress ends with the reconfigure
    reconfigure(model, SKIP)
    assert get_stats(model) == []  # cleared, as remove + apply would
    outputs = denoise(model, toy_input())
    assert get_stats(model)[-1].computed_steps == expected_steps
    assert all(torch.equal(a, b) for a, b in zip(expected, outputs))


def test_paused_runs_the_model_as_it_is_and_measures_nothing():
    plain = ToyDiT()
    reference = denoise(plain, toy_input())
    model = ToyDiT()
    apply_adacache(model, SKIP, spec=TOY_SPEC)
    reconfigure(model, None)
    assert is_applied(model)
    outputs = denoise(model, toy_input())
    assert all(torch.equal(a, b) for a, b in zip(reference, outputs))
    assert get_stats(model) == []
    reconfigure(model, {"codebook": {1e9: 3}, "num_inference_steps": 6})  # a dict (or a preset, a file) works too
    denoise(model, toy_input())
    assert get_stats(model)[-1].skipped_steps
    remove_adacache(model)
    assert not is_applied(model)


def test_the_probe_cannot_move_and_a_refusal_changes_nothing():
    model = ToyDiT()
    apply_adacache(model, SKIP, spec=TOY_SPEC)
    denoise(model, toy_input())
    before = get_stats(model)
    with pytest.raises(ValueError, match="cannot move the probe"):
        reconfigure(model, AdaCacheConfig(codebook={1e9: 3}, probe_block=0))
    assert get_stats(model) == before  # refused before anything changed
    with pytest.raises(RuntimeError, match="not applied"):
        reconfigure(ToyDiT(), SKIP)
    with pytest.raises(adacache.ConfigError):
        reconfigure(model, "no-such-preset")
    assert get_stats(model) == before
