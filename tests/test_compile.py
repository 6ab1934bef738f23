"""torch.compile with AdaCache, in every way users write it, on the tiny Wan transformer.

- the model compiled whole after apply_adacache, in place (`model.compile()`) or assigned
  (`model = torch.compile(model)`): AdaCache's decisions run eagerly (dynamo does not trace them), the model's own
  forward and blocks are compiled; rate 1 is bit-identical to eager, a skipping config gives eager's schedule and
  outputs, and a second generation compiles nothing new (no recompiles per step or per generation);
- compiled before apply: `apply_adacache(torch.compile(model))` goes on the model it compiles, as does a model
  compiled in place;
- diffusers' regional compile (`compile_repeated_blocks`) after apply.

dynamo's "eager" backend (what is checked is AdaCache around dynamo; `benchmarks/compile.py` times inductor), and
one in-place case with "aot_eager". Every way of compiling, before and after apply, also runs on the tiny Wan
pipeline in tests/test_compositions.py.
"""

import pytest
import torch
from torch._dynamo.utils import counters

from adacache import AdaCacheConfig, apply_adacache, get_stats, remove_adacache
from adacache.hooks import is_applied
from adacache.testing import tiny_model

STEPS = 6
RATE_ONE = AdaCacheConfig(codebook={1.0: 1})
SKIPPING = AdaCacheConfig(codebook={1e9: 3})


def denoise(model, tiny):
    """A Wan-like loop: each step a "cond" call inside diffusers' cache_context with the step index and count."""
    kwargs = tiny.inputs(model, batch_size=1)
    outputs = []
    with torch.no_grad():
        for step in range(STEPS):
            kwargs["timestep"] = torch.full((1,), 900.0 - 150 * step)
            with model.cache_context("cond", step_index=step, num_inference_steps=STEPS):
                out = model(**kwargs)[0]
            outputs.append(out)
            kwargs["hidden_states"] = kwargs["hidden_states"] - 0.1 * out
    return outputs


@pytest.fixture(scope="module")
def tiny():
    return tiny_model("wan")


@pytest.fixture(scope="module")
def eager(tiny):
    """config -> (outputs, computed steps) of the eager model with AdaCache; and the plain eager outputs."""
    results = {}
    for name, config in (("rate_one", RATE_ONE), ("skipping", SKIPPING)):
        model = tiny.build(seed=0)
        apply_adacache(model, config)
        results[name] = denoise(model, tiny), get_stats(model)[-1].computed_steps
    results["plain"] = denoise(tiny.build(seed=0), tiny), None
    return results


def graphs() -> int:
    return counters["stats"]["unique_graphs"]


def compile_whole(model, how, backend="eager"):
    if how == "in place":
        model.compile(backend=backend)
        return model
    return torch.compile(model, backend=backend)


@pytest.mark.parametrize("how, backend, config", [("assigned", "eager", "skipping"),
                                                   ("in place", "aot_eager", "rate_one")])
def test_a_model_compiled_whole_after_apply_runs_as_eager_and_compiles_once(tiny, eager, how, backend, config):
    torch._dynamo.reset()
    model = tiny.build(seed=0)
    apply_adacache(model, RATE_ONE if config == "rate_one" else SKIPPING)
    compiled = compile_whole(model, how, backend)
    first = graphs()
    outputs = denoise(compiled, tiny)
    assert graphs() - first >= 2  # the model's own forward and its blocks were compiled
    expected, expected_steps = eager[config]
    assert get_stats(compiled)[-1].computed_steps == expected_steps
    assert all(torch.equal(a, b) for a, b in zip(outputs, expected))
    if config == "rate_one":
        assert all(torch.equal(a, b) for a, b in zip(outputs, eager["plain"][0]))
    else:
        assert expected_steps == [1, 2, 5, 6]  # skipped steps went through the compiled model too
    again = graphs()
    denoise(compiled, tiny)  # a second generation, computed and skipped steps alike: nothing new to compile
    assert graphs() == again
    assert get_stats(compiled)[-1].computed_steps == expected_steps
    remove_adacache(compiled)
    assert all(torch.equal(a, b) for a, b in zip(denoise(compiled, tiny), eager["plain"][0]))


def test_a_compiled_model_given_to_apply_gets_adacache_on_the_model_it_compiles(tiny, eager):
    torch._dynamo.reset()
    model = tiny.build(seed=0)
    compiled = torch.compile(model, backend="eager")
    assert all(torch.equal(a, b) for a, b in zip(denoise(compiled, tiny), eager["plain"][0]))  # compiled, plain
    apply_adacache(compiled, SKIPPING)
    assert is_applied(model) and is_applied(compiled)
    outputs = denoise(compiled, tiny)
    expected, expected_steps = eager["skipping"]
    assert get_stats(compiled)[-1].computed_steps == expected_steps
    assert all(torch.equal(a, b) for a, b in zip(outputs, expected))
    remove_adacache(compiled)
    assert not is_applied(model)
    assert all(torch.equal(a, b) for a, b in zip(denoise(compiled, tiny), eager["plain"][0]))


def test_regional_compile_after_apply_compiles_each_block_once(tiny, eager):
    torch._dynamo.reset()
    model = tiny.build(seed=0)
    apply_adacache(model, SKIPPING)
    model.compile_repeated_blocks(backend="eager")
    first = graphs()
    outputs = denoise(model, tiny)
    assert graphs() > first  # the blocks' own forwards were compiled
    expected, expected_steps = eager["skipping"]
    assert get_stats(model)[-1].computed_steps == expected_steps
    assert all(torch.equal(a, b) for a, b in zip(outputs, expected))
    again = graphs()
    denoise(model, tiny)
    assert graphs() == again
    remove_adacache(model)
