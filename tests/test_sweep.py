"""Conformance sweep: every video transformer class of the installed diffusers, found by introspection, built tiny
(tests/zoo), with its spec inferred (the hand-written one removed), must pass the same checks:

- rate 1 (every step computed) is bit-identical to the model without AdaCache, and so is the model after removal;
- a skipped step reuses the stack residual exactly: with the inputs of the step before, it returns that step's
  output (per stream: the streams that leave the cached span come back as they were computed);
- MoReg reads the frames the tiny input has (frames x tokens per frame) and scores motion;
- blocks compiled with `compile_blocks` (dynamo, eager backend) give the eager result.

A class the sweep cannot support is listed, with its reason, in `adacache.models.specs.UNSUPPORTED` and in the
README's model table; a new diffusers class without a tiny entry fails `test_every_class_is_in_the_sweep`.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

import adacache
from adacache import AdaCacheConfig, apply_adacache, get_stats, remove_adacache
from adacache.models import specs
from adacache.models.infer import diffusers_video_transformers
from adacache.testing import frames_tokens
from adacache.hooks import is_applied, runtime_of
from adacache.calls import argument
from zoo import entries, excluded

CLASSES = diffusers_video_transformers()
ENTRIES = entries()
README = Path(__file__).resolve().parent.parent / "README.md"
STEPS = 4


def _first_tensor(value):
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, (tuple, list)) and value:
        return _first_tensor(value[0])
    if hasattr(value, "to_tuple"):
        return _first_tensor(value.to_tuple())
    return None


def _run(model, tiny, steps: int = STEPS, same_inputs_from: int | None = None) -> list[torch.Tensor]:
    """`steps` calls as one generation (cache_context gives the step index); from step `same_inputs_from` on,
    every call repeats that step's inputs."""
    outs = []
    for i in range(steps):
        k = i if same_inputs_from is None else min(i, same_inputs_from)
        t = float(torch.linspace(900, 100, steps)[k])
        inputs = tiny.inputs(model, batch_size=_batch(tiny, model), timestep=t, seed=k)
        context = (adacache.cache_context(model, "cond", step_index=i, num_inference_steps=steps)
                   if is_applied(model) else _nothing())
        with torch.no_grad(), context:
            outs.append(_first_tensor(model(**inputs)).clone())
    return outs


def _batch(tiny, model) -> int:
    """2 (batched CFG), or 1 for a model whose forward has no batch (Cosmos 3 packs one sequence per call)."""
    try:
        tiny.inputs(model, batch_size=2)
    except NotImplementedError:
        return 1
    return 2


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def test_the_introspection_finds_the_video_transformers():
    assert len(CLASSES) >= 25
    for name in ("WanTransformer3DModel", "CogVideoXTransformer3DModel", "HunyuanVideoTransformer3DModel",
                 "LTXVideoTransformer3DModel", "MochiTransformer3DModel", "LatteTransformer3DModel"):
        assert name in CLASSES
    assert "AutoencoderKLWan" not in CLASSES and "UNet3DConditionModel" not in CLASSES


def test_every_class_is_in_the_sweep():
    missing = [c for c in CLASSES if c not in ENTRIES and c not in excluded()]
    assert not missing, f"diffusers classes with no tiny entry in tests/zoo (add one, or exclude with a reason): {missing}"


def test_the_readme_table_and_the_unsupported_list_agree():
    """The README's model table names every class once, and says 'no' exactly for specs.UNSUPPORTED."""
    text = README.read_text()
    rows = dict(re.findall(r"^\| `(\w+)` \| (yes|no)\b", text, flags=re.M))
    assert set(rows) == set(CLASSES), f"README table vs diffusers: {sorted(set(rows) ^ set(CLASSES))}"
    assert {c for c, v in rows.items() if v == "no"} == set(specs.UNSUPPORTED)
    moreg = dict(re.findall(r"^\| `(\w+)` \| (?:yes|no) \| (yes|no)\b", text, flags=re.M))
    assert {c for c, v in moreg.items() if v == "no"} == set(specs.NO_MOREG) | set(specs.UNSUPPORTED)
    supported = len(CLASSES) - len(specs.UNSUPPORTED)
    assert supported >= 0.9 * len(CLASSES), f"{supported}/{len(CLASSES)} supported: below the 90% target"


@pytest.fixture(params=sorted(c for c in CLASSES if c in ENTRIES))
def case(request, monkeypatch):
    name = request.param
    if name in specs.UNSUPPORTED:
        pytest.skip(f"unsupported: {specs.UNSUPPORTED[name]}")
    for cls in specs.MODEL_SPECS.copy():
        monkeypatch.delitem(specs.MODEL_SPECS, cls)  # the sweep tests inference, not the hand-written specs
    tiny = ENTRIES[name]
    torch.manual_seed(0)
    return tiny, tiny.build(seed=0)


def test_rate_one_is_bit_identical_and_removal_restores(case):
    tiny, model = case
    plain = _run(model, tiny)
    apply_adacache(model, AdaCacheConfig(codebook={1.0: 1}, num_inference_steps=STEPS))
    cached = _run(model, tiny)
    stats = get_stats(model)
    assert stats[-1].computed_steps == list(range(1, STEPS + 1))
    remove_adacache(model)
    after = _run(model, tiny)
    for a, b, c in zip(plain, cached, after):
        assert torch.equal(a, b) and torch.equal(a, c)


def test_a_skipped_step_reuses_the_residual_exactly(case):
    tiny, model = case
    plain = _run(model, tiny, steps=6, same_inputs_from=1)
    apply_adacache(model, AdaCacheConfig(codebook={1e9: 2}))
    cached = _run(model, tiny, steps=6, same_inputs_from=1)
    stats = get_stats(model)[-1]
    remove_adacache(model)
    assert 3 in stats.skipped_steps, stats  # step 3 (index 2) repeats step 2's inputs and is skipped
    torch.testing.assert_close(cached[2], plain[2], rtol=1e-4, atol=1e-4)
    assert torch.equal(cached[1], plain[1])


def test_moreg_reads_the_frames(case):
    tiny, model = case
    apply_adacache(model, AdaCacheConfig(codebook={1.0: 1}, moreg=True, moreg_window=(1, STEPS),
                                         num_inference_steps=STEPS))
    if tiny.class_name in specs.NO_MOREG:  # listed as such: inference says so, loudly, on the first call
        with pytest.raises(adacache.InferenceError, match="MoReg"):
            _run(model, tiny, steps=1)
        remove_adacache(model)
        return
    _run(model, tiny, steps=3)
    spec = adacache.describe(model, print_source=False)
    stats = get_stats(model)[-1]
    runtime = runtime_of(model)
    inputs = tiny.inputs(model, batch_size=_batch(tiny, model))
    frames_value = argument(spec.frames_argument, runtime.forward_parameters, (), inputs)
    remove_adacache(model)
    assert spec.frames_argument is not None
    assert runtime.frames(frames_value) == frames_tokens(tiny, model)[0]
    assert any(m is not None for m in stats.motion), stats


def test_compiled_blocks_give_the_eager_result(case):
    tiny, model = case
    config = AdaCacheConfig(codebook={1e9: 2}, num_inference_steps=STEPS)
    apply_adacache(model, config)
    eager = _run(model, tiny)
    remove_adacache(model)
    apply_adacache(model, config)
    _run(model, tiny, steps=1)  # the spec is inferred on the first call
    adacache.reset_state(model)
    torch._dynamo.reset()
    adacache.compile_blocks(model, backend="eager")
    compiled = _run(model, tiny)
    remove_adacache(model)
    for a, b in zip(eager, compiled):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
