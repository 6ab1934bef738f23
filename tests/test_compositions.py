"""AdaCache combined with what diffusers users combine it with, each applied before or after `apply_adacache`.

Each combination changes the pipeline's transformer: offloading (model CPU offload, accelerate's sequential
offload, diffusers' group offloading at block and leaf level), torch.compile (in place, assigned back, regional),
a peft LoRA, casting (bf16, fp8 layerwise casting with fp32 or bf16 compute) and torchao int8 weight-only
quantization. For each, on a tiny real pipeline, in either order:

- at rate 1 (codebook {1.0: 1}) the output is exactly that of the same combination without AdaCache;
- a permissive codebook ({1e9: 3}) skips steps on two generations in a row (model CPU offload re-applies its hooks
  at the end of every call: the second generation is the one that would lose AdaCache);
- `remove_adacache` gives back exactly that plain output again.

The Wan pipeline runs every row in the default suite; the other families run them under `@pytest.mark.slow`. A
combination that diffusers cannot do on a family without AdaCache (Latte and Allegro take no LoRA; a transformer
that declares no repeated blocks has no regional compile) is skipped with the error it raises.
torch.compile uses dynamo's "eager" backend here (what is checked is AdaCache around dynamo, not inductor's kernels;
`benchmarks/compile.py` times inductor). What CPUs cannot run (streams for group offloading, fp8 kernels) is left to
the GPU suite; here each offloader onloads to the CPU it offloads to, which runs the same hooks.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import pytest
import torch

from adacache import AdaCacheConfig, apply_adacache, get_stats, reconfigure, remove_adacache
from adacache.hooks import runtime_of

from tiny_pipelines import TINY_PIPELINE_CALL, ftfy_stand_in, load_tiny_pipeline, saved_once

RATE_ONE = AdaCacheConfig(codebook={1.0: 1})
PERMISSIVE = AdaCacheConfig(codebook={1e9: 3})
STEPS = 5  # the fewest where {1e9: 3} skips: computed [1, 2, 4, 5] (the last two forced)
SKIPPING = [1, 2, 4, 5]
CPU = torch.device("cpu")


@dataclasses.dataclass(frozen=True)
class Combination:
    """One thing users do to a pipeline's transformer. `apply(pipe)` does it; `compute_dtype` is the dtype the
    transformer computes in (the cached residual must keep it)."""

    apply: Callable
    compute_dtype: torch.dtype = torch.float32


def _model_offload(pipe):
    pipe.enable_model_cpu_offload(device="cpu")  # with device=None diffusers refuses a machine with no accelerator


def _sequential_offload(pipe):
    # What enable_sequential_cpu_offload does to each component. The pipeline method itself fails on this CPU inside
    # accelerate 1.16, on the tiny UMT5 text encoder (set_module_tensor_to_device), with or without AdaCache.
    import accelerate

    accelerate.cpu_offload(pipe.transformer, CPU, offload_buffers=True)


def _group_offload(offload_type):
    def apply(pipe):
        pipe.transformer.enable_group_offload(onload_device=CPU, offload_device=CPU, offload_type=offload_type,
                                              num_blocks_per_group=1 if offload_type == "block_level" else None)
    return apply


def _compile_in_place(pipe):
    pipe.transformer.compile(backend="eager")


def _compile_assigned(pipe):
    pipe.transformer = torch.compile(pipe.transformer, backend="eager")


def _compile_regional(pipe):
    pipe.transformer.compile_repeated_blocks(backend="eager")


def _lora(pipe):
    from peft import LoraConfig

    with torch.random.fork_rng():  # the same random LoRA weights every time
        torch.manual_seed(0)
        pipe.transformer.add_adapter(LoraConfig(r=4, lora_alpha=8, init_lora_weights=False,
                                                target_modules=["to_q", "to_k", "to_v", "to_out.0"]))


def _bf16(pipe):
    pipe.to(torch.bfloat16)  # the whole pipeline: most pipelines hand the transformer latents in their own dtype


def _layerwise_fp32(pipe):
    pipe.transformer.enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn, compute_dtype=torch.float32)


def _layerwise_bf16(pipe):
    # compute in bf16: the model's own dtype must be bf16 (diffusers keeps the modules it skips, such as the patch
    # embedding, in the model's dtype; an fp32 model fails there with or without AdaCache)
    pipe.to(torch.bfloat16)
    pipe.transformer.enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn, compute_dtype=torch.bfloat16)


def _int8(pipe):
    from torchao.quantization import Int8WeightOnlyConfig, quantize_

    quantize_(pipe.transformer, Int8WeightOnlyConfig())


COMBINATIONS = {
    "model_offload": Combination(_model_offload),
    "sequential_offload": Combination(_sequential_offload),
    "group_offload_block": Combination(_group_offload("block_level")),
    "group_offload_leaf": Combination(_group_offload("leaf_level")),
    "compile_in_place": Combination(_compile_in_place),
    "compile_assigned": Combination(_compile_assigned),
    "compile_regional": Combination(_compile_regional),
    "lora": Combination(_lora),
    "bf16": Combination(_bf16, torch.bfloat16),
    "layerwise_fp8_fp32": Combination(_layerwise_fp32),
    "layerwise_fp8_bf16": Combination(_layerwise_bf16, torch.bfloat16),
    "int8_weight_only": Combination(_int8),
}
SLOW_FAMILIES = ["latte", "cogvideox", "ltx_video", "hunyuan_video", "mochi", "allegro", "skyreels_v2"]
FAMILIES = ["wan", *(pytest.param(kind, marks=pytest.mark.slow) for kind in SLOW_FAMILIES)]


@pytest.fixture(autouse=True, scope="module")
def _ftfy():
    with ftfy_stand_in():
        yield


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    return saved_once(tmp_path_factory.mktemp)


@pytest.fixture(scope="module")
def plain_outputs():
    """(family, combination) -> the output of the combination without AdaCache."""
    return {}


def _generate(kind, pipe, on_step=None):
    kwargs = {} if on_step is None else {"callback_on_step_end": on_step}
    out = pipe("a red circle moving left", num_inference_steps=STEPS, generator=torch.Generator().manual_seed(0),
               **TINY_PIPELINE_CALL[kind], **kwargs)
    return out.frames if hasattr(out, "frames") else out[0]


def _residual_dtypes(pipe, seen):
    """A step-end callback noting the dtype of every residual AdaCache holds."""
    def on_step(pipeline, step, timestep, callback_kwargs):
        for state in runtime_of(pipe.transformer).states.values():
            for video in state.videos:
                seen.update(t.dtype for t in (video.store.latest or ()) if t is not None)
        return callback_kwargs
    return on_step


def _plain(kind, name, folders, plain_outputs):
    """The combination's output without AdaCache; a skip where diffusers cannot do the combination on this family
    at all (no LoRA support, no repeated blocks declared, ...): nothing of AdaCache's is then to be tested."""
    if (kind, name) not in plain_outputs:
        pipe = load_tiny_pipeline(folders(kind))
        try:
            COMBINATIONS[name].apply(pipe)
            plain_outputs[kind, name] = _generate(kind, pipe)
        except Exception as error:  # noqa: BLE001 - whatever diffusers raises, it raises without AdaCache
            plain_outputs[kind, name] = error
    if isinstance(plain_outputs[kind, name], Exception):
        error = plain_outputs[kind, name]
        pytest.skip(f"not applicable: without AdaCache, {name} on {kind} fails: {type(error).__name__}: "
                    f"{str(error).splitlines()[0][:150]}")
    return plain_outputs[kind, name]


def _cached_twice(kind, pipe, compute_dtype):
    """Two generations in a row with a permissive codebook: each skips, and the residual keeps the compute dtype."""
    reconfigure(pipe, PERMISSIVE)
    for generation in range(2):
        dtypes, before = set(), {(s.branch, s.generation) for s in get_stats(pipe)}
        _generate(kind, pipe, _residual_dtypes(pipe, dtypes))
        new = [s for s in get_stats(pipe) if (s.branch, s.generation) not in before]  # one per CFG branch
        assert new and all(s.steps_seen == STEPS and len(s.computed_steps) < STEPS for s in new), (generation, new)
        assert dtypes == {compute_dtype}, dtypes


@pytest.mark.parametrize("kind", FAMILIES)
@pytest.mark.parametrize("name", list(COMBINATIONS))
def test_combined_before_apply(kind, name, folders, plain_outputs):
    plain = _plain(kind, name, folders, plain_outputs)
    pipe = load_tiny_pipeline(folders(kind))
    COMBINATIONS[name].apply(pipe)
    apply_adacache(pipe, RATE_ONE)
    assert torch.equal(_generate(kind, pipe), plain)
    _cached_twice(kind, pipe, COMBINATIONS[name].compute_dtype)
    remove_adacache(pipe)
    assert torch.equal(_generate(kind, pipe), plain)


@pytest.mark.parametrize("kind", FAMILIES)
@pytest.mark.parametrize("name", list(COMBINATIONS))
def test_combined_after_apply(kind, name, folders, plain_outputs):
    plain = _plain(kind, name, folders, plain_outputs)
    pipe = load_tiny_pipeline(folders(kind))
    apply_adacache(pipe, RATE_ONE)
    COMBINATIONS[name].apply(pipe)
    assert torch.equal(_generate(kind, pipe), plain)
    _cached_twice(kind, pipe, COMBINATIONS[name].compute_dtype)
    remove_adacache(pipe)
    assert torch.equal(_generate(kind, pipe), plain)


def _lora_state_dict(model):
    """A LoRA for a copy of `model` in diffusers' format, as `load_lora_adapter` takes it."""
    import copy

    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    model = copy.deepcopy(model)
    with torch.random.fork_rng():
        torch.manual_seed(1)
        model.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights=False,
                                     target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    return {f"transformer.{key}": value for key, value in get_peft_model_state_dict(model).items()}


def test_lora_loaded_fused_unfused_and_unloaded_under_group_offloading_applied_before(folders):
    """diffusers removes and re-applies group offloading when a LoRA is loaded or unloaded: AdaCache, applied after
    group offloading, stays on through each, matching the same steps without AdaCache at rate 1."""
    plain, cached = (load_tiny_pipeline(folders("wan")) for _ in range(2))
    state_dict = _lora_state_dict(plain.transformer)
    for pipe in (plain, cached):
        _group_offload("block_level")(pipe)
    apply_adacache(cached, RATE_ONE)
    steps = [("load_lora_adapter", lambda t: t.load_lora_adapter(dict(state_dict), adapter_name="a",
                                                                  prefix="transformer")),
             ("fuse_lora", lambda t: t.fuse_lora()), ("unfuse_lora", lambda t: t.unfuse_lora()),
             ("unload_lora", lambda t: t.unload_lora())]
    for name, step in steps:
        seen = {(s.branch, s.generation) for s in get_stats(cached)}
        outputs = []
        for pipe in (plain, cached):
            step(pipe.transformer)
            outputs.append(_generate("wan", pipe))
        assert torch.equal(*outputs), name
        assert [s for s in get_stats(cached) if (s.branch, s.generation) not in seen], name  # AdaCache ran
    _cached_twice("wan", cached, torch.float32)
    remove_adacache(cached)
    assert torch.equal(_generate("wan", cached), _generate("wan", plain))
