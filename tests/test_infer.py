"""Automatic model description (models/infer.py): a model nobody described is watched on its first call."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
from torch import nn

import adacache
from adacache import AdaCacheConfig, ModelSpec, apply_adacache, get_stats, remove_adacache
from adacache.models import specs
from adacache.models.infer import InferenceError, infer_spec, spec_source
from adacache.testing import TINY_MODELS
from adacache.hooks import is_applied, runtime_of
from toy import STDIT3_SPEC, TOY_SPEC, STDiT3Like, ToyDiT

CONFIG = AdaCacheConfig(codebook={0.5: 3, 1e9: 2}, num_inference_steps=8, moreg=True)


def run(model, tiny, steps: int = 8) -> list[torch.Tensor]:
    return [model(**tiny.inputs(model, batch_size=2, timestep=float(t), seed=i))[0]
            for i, t in enumerate(torch.linspace(999, 50, steps))]


@pytest.mark.parametrize("family", list(TINY_MODELS))
def test_the_inferred_spec_is_the_hand_written_one(family):
    tiny = TINY_MODELS[family]
    model = tiny.build()
    inputs = tiny.inputs(model, batch_size=2)
    hand_written = specs.MODEL_SPECS[tiny.class_name]
    # the arguments the same for every row are inferred where the call passes them (CogVideoX's tiny model takes
    # no rotary table)
    seen = tuple(name for name in hand_written.unbatched_arguments if name in inputs)
    assert infer_spec(model, (), inputs) == dataclasses.replace(hand_written, unbatched_arguments=seen)


def test_toys_with_their_own_argument_names_and_layouts_are_inferred():
    stdit = STDiT3Like()
    assert infer_spec(stdit, (torch.randn(2, 4, 3, 2, 2), torch.tensor([500.0, 500.0]))) == STDIT3_SPEC
    toy = ToyDiT()  # parameterless blocks, frames as an int argument, nn.Identity as "attention": the block residual
    spec = infer_spec(toy, (torch.ones(1, 6, 2), torch.tensor([1.0])), {"num_frames": 3})
    assert spec.block_lists == (specs.BlockList("blocks", specs.BlockSpec(attention=None)),)
    assert (spec.frames_argument, spec.frames_dim) == (TOY_SPEC.frames_argument, TOY_SPEC.frames_dim)


@pytest.mark.parametrize("family", ["wan", "hunyuan_video", "latte", "ltx_video"])
def test_an_unregistered_model_caches_exactly_as_with_its_hand_written_spec(family, monkeypatch):
    tiny = TINY_MODELS[family]
    model = tiny.build()
    apply_adacache(model, CONFIG)
    expected, expected_stats = run(model, tiny), get_stats(model)
    remove_adacache(model)
    monkeypatch.delitem(specs.MODEL_SPECS, tiny.class_name)
    with pytest.raises(ValueError, match="structure is inferred from a forward call"):
        adacache.describe(model)
    apply_adacache(model, CONFIG)
    got = run(model, tiny)
    assert all(torch.equal(a, b) for a, b in zip(expected, got))
    assert [s.computed_steps for s in get_stats(model)] == [s.computed_steps for s in expected_stats]
    assert len(expected_stats[-1].computed_steps) < 8  # it did skip
    assert adacache.describe(model, print_source=False) == specs.MODEL_SPECS.get(tiny.class_name, adacache.describe(model, print_source=False))
    remove_adacache(model)
    plain = tiny.build()
    assert all(torch.equal(a, b) for a, b in zip(run(model, tiny, 2), run(plain, tiny, 2)))


def test_describe_prints_code_that_rebuilds_the_spec(capsys):
    tiny = TINY_MODELS["hunyuan_video"]
    model = tiny.build()
    spec = adacache.describe(model, **tiny.inputs(model))
    printed = capsys.readouterr().out
    assert "(inferred)" in printed and "register_model('HunyuanVideoTransformer3DModel', spec)" in printed
    namespace: dict = {}
    exec(spec_source(spec), namespace)  # the printed code is the spec
    assert namespace["spec"] == spec


# --- what inference refuses, loudly, before anything is cached --------------------------------------------------
class Block(nn.Module):
    def __init__(self, dim: int = 8) -> None:
        super().__init__()
        self.linear = nn.Linear(dim, dim)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return hidden_states + self.linear(hidden_states)


class Shrinking(nn.Module):
    """Every block halves the channels: no block returns its video tokens."""

    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([nn.Linear(8, 4), nn.Linear(4, 2)])

    def forward(self, hidden_states: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            hidden_states = block(hidden_states)
        return hidden_states


class Twice(nn.Module):
    """Calls its one block list twice per forward (weight sharing)."""

    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([Block(), Block()])

    def forward(self, hidden_states: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        for _ in range(2):
            for block in self.blocks:
                hidden_states = block(hidden_states)
        return hidden_states


class Regrouping(nn.Module):
    """Regroups the tokens (not a round trip) before its last block: no span ends where one could start."""

    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([Block(), Block()])
        self.late = nn.ModuleList([Block(16)])

    def forward(self, hidden_states: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            hidden_states = block(hidden_states)
        return self.late[0](hidden_states.reshape(hidden_states.shape[0], -1, 16))


class Adapters(nn.Module):
    """Adds an adapter's output to the tokens after every other block (as ConsisID and Wan Animate do)."""

    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([Block() for _ in range(4)])
        self.adapters = nn.ModuleList([nn.Linear(8, 8) for _ in range(2)])

    def forward(self, hidden_states: torch.Tensor, timestep: torch.Tensor, num_frames: int = 2) -> torch.Tensor:
        hidden_states = hidden_states * (timestep.view(-1, 1, 1) / 1000)
        for i, block in enumerate(self.blocks):
            hidden_states = block(hidden_states)
            if i % 2 == 0:
                hidden_states = hidden_states + self.adapters[i // 2](hidden_states)
        return hidden_states


class NoBlocks(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(8, 8)

    def forward(self, hidden_states: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        return self.linear(hidden_states)


@pytest.mark.parametrize("model_class, message", [
    (Shrinking, "returns shape"),
    (Twice, "called 4 times for 2 blocks"),
    (NoBlocks, "no nn.ModuleList of blocks within"),
])
def test_a_structure_it_cannot_be_sure_of_fails_on_the_first_call_and_changes_nothing(model_class, message):
    model = model_class()
    x, t = torch.randn(1, 6, 8), torch.tensor([500.0])
    with torch.no_grad():
        expected = model(x, t)
    apply_adacache(model, AdaCacheConfig(moreg=False))
    with pytest.raises(InferenceError, match=message) as error:
        model(x, t)
    assert "Describe" in str(error.value) or "describe" in str(error.value)
    with pytest.raises(InferenceError, match=message):  # still refused, never half-installed
        model(x, t)
    remove_adacache(model)
    with torch.no_grad():
        assert torch.equal(model(x, t), expected)
    assert not any(hasattr(b, "_adacache_block") for b in model.modules())


def test_a_stack_whose_tokens_are_regrouped_caches_the_blocks_after_the_regrouping():
    model = Regrouping()  # blocks on (1, 6, 8), then one block on the tokens regrouped to (1, 3, 16)
    spec = infer_spec(model, (torch.randn(1, 6, 8), torch.tensor([500.0])), moreg=False)
    assert [b.attribute for b in spec.block_lists] == ["late"]  # the last run of blocks handing tokens on


def test_adapters_between_blocks_are_inside_the_span_and_a_repeated_step_is_exact():
    model = Adapters()
    spec = infer_spec(model, (torch.randn(1, 6, 8), torch.tensor([500.0])), {"num_frames": 2})
    assert [b.attribute for b in spec.block_lists] == ["blocks"] and spec.cache_start == 0  # adapters left out
    x = torch.randn(1, 6, 8)
    inputs = [(x, torch.tensor([900.0])), (x * 0.5, torch.tensor([500.0])), (x * 0.5, torch.tensor([500.0]))]
    with torch.no_grad():
        plain = [model(*i, num_frames=2) for i in inputs]
    apply_adacache(model, AdaCacheConfig(codebook={1e9: 2}))
    with torch.no_grad():
        cached = []
        for step, i in enumerate(inputs):
            with adacache.cache_context(model, "cond", step_index=step, num_inference_steps=6):
                cached.append(model(*i, num_frames=2))
    assert get_stats(model)[-1].skipped_steps == [3]
    remove_adacache(model)
    torch.testing.assert_close(cached[2], plain[2])  # step 3 repeats step 2: the residual reproduces it
    assert torch.equal(cached[1], plain[1])


def test_moreg_on_a_model_whose_frames_cannot_be_read_is_refused_and_moreg_off_works():
    class Flat(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.blocks = nn.ModuleList([Block(), Block(), Block()])

        def forward(self, hidden_states: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
            for block in self.blocks:
                hidden_states = block(hidden_states)
            return hidden_states

    flat = Flat()  # tokens (B, N, C) and no frames argument
    x, t = torch.randn(1, 6, 8), torch.tensor([500.0])
    apply_adacache(flat, AdaCacheConfig(moreg=True))
    with pytest.raises(InferenceError, match="MoReg needs"):
        flat(x, t)
    remove_adacache(flat)
    apply_adacache(flat, AdaCacheConfig(moreg=False, num_inference_steps=4))
    flat(x, t)
    assert adacache.describe(flat, print_source=False).frames_argument is None
    remove_adacache(flat)


def test_before_its_first_call_a_patched_unregistered_model_is_still_guarded(monkeypatch):
    tiny = TINY_MODELS["wan"]
    monkeypatch.delitem(specs.MODEL_SPECS, tiny.class_name)
    model = tiny.build()
    apply_adacache(model, CONFIG)
    with pytest.raises(TypeError, match="remove_adacache"):
        copy.deepcopy(model)
    with pytest.raises(RuntimeError, match="first call"):
        adacache.compile_blocks(model)
    with pytest.raises(RuntimeError, match="already applied"):
        apply_adacache(model, CONFIG)
    assert get_stats(model) == []
    remove_adacache(model)  # removal before any call leaves the plain model
    assert not is_applied(model)
    plain = tiny.build()
    assert torch.equal(model(**tiny.inputs(model))[0], plain(**tiny.inputs(plain))[0])


def test_a_given_spec_wins_over_inference(monkeypatch):
    tiny = TINY_MODELS["wan"]
    monkeypatch.delitem(specs.MODEL_SPECS, tiny.class_name)
    model = tiny.build()
    spec = ModelSpec(block_lists=(specs.BlockList("blocks"),), cache_start=1, temporal_patch="patch_size[0]")
    apply_adacache(model, CONFIG, spec=spec)
    assert adacache.describe(model, print_source=False) is spec
    remove_adacache(model)


# --- the watched pass keeps nothing, configs that do not fit, the first call, embedders, refiners, lists ---------
def test_the_watched_pass_keeps_no_activation():
    from adacache.models.infer import _candidate_lists, _watch

    model = Adapters()
    x = torch.randn(1, 6, 8)
    watch = _watch(model, _candidate_lists(model), lambda: model(x, torch.tensor([500.0])))
    kept = [t for e in watch.events for t in (e.hidden_in, e.text_in, *[o for o in (e.output if isinstance(e.output, tuple) else (e.output,))])
            if isinstance(t, torch.Tensor)]
    assert kept and all(t.device.type == "meta" for t in kept)


def test_a_config_that_does_not_fit_the_inferred_model_is_refused_on_every_call():
    model = Adapters()
    x, t = torch.randn(1, 6, 8), torch.tensor([500.0])
    apply_adacache(model, AdaCacheConfig(probe_block=7))
    for _ in range(2):  # never half-installed: the second call is refused the same way
        with pytest.raises(ValueError, match="probe_block=7 is out of range"):
            model(x, t)
        assert runtime_of(model).spec is None and not any(hasattr(b, "_adacache_block") for b in model.modules())
    remove_adacache(model)


class InPlace(nn.Module):
    """Adds to its input in place, draws noise from the global generator and pops from its kwargs dict."""

    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([Block(), Block()])

    def forward(self, hidden_states, timestep, attention_kwargs=None):
        hidden_states += 1.0
        hidden_states = hidden_states + 0.1 * torch.randn(hidden_states.shape)
        scale = (attention_kwargs or {}).pop("scale", 1.0)
        for block in self.blocks:
            hidden_states = block(hidden_states) * scale
        return hidden_states


def test_the_first_call_returns_what_a_plain_call_would():
    model = InPlace()
    torch.manual_seed(3)
    with torch.no_grad():
        expected = model(torch.ones(1, 6, 8), torch.tensor([500.0]), {"scale": 2.0})
    apply_adacache(model, AdaCacheConfig(moreg=False))
    torch.manual_seed(3)
    with torch.no_grad():
        got = model(torch.ones(1, 6, 8), torch.tensor([500.0]), {"scale": 2.0})
    remove_adacache(model)
    assert torch.equal(got, expected)


class HeadAndEmbedders(nn.Module):
    """Condition embedders (a ModuleList applied to separate inputs) before the blocks, a Sequential head after."""

    def __init__(self) -> None:
        super().__init__()
        self.cond = nn.ModuleList([nn.Linear(8, 8), nn.Linear(8, 8)])
        self.blocks = nn.ModuleList([Block(), Block(), Block()])
        self.head = nn.Sequential(nn.LayerNorm(8), nn.Linear(8, 8))

    def forward(self, hidden_states, timestep, ref, mask):
        hidden_states = hidden_states + self.cond[0](ref) + self.cond[1](mask)
        for block in self.blocks:
            hidden_states = block(hidden_states)
        return self.head(hidden_states)


class ImgTxt(nn.Module):
    """Flux-style names, text longer than the image tokens."""

    class Pair(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Linear(8, 8), nn.Linear(8, 8)

        def forward(self, img, txt):
            return img + self.a(img), txt + self.b(txt)

    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([self.Pair(), self.Pair()])

    def forward(self, hidden_states, timestep, txt):
        img = hidden_states
        for block in self.blocks:
            img, txt = block(img, txt)
        return img


def test_embedders_heads_names_and_single_blocks():
    x, t = torch.randn(1, 6, 8), torch.tensor([500.0])
    spec = infer_spec(HeadAndEmbedders(), (x, t, torch.randn(1, 6, 8), torch.randn(1, 6, 8)), moreg=False)
    assert [b.attribute for b in spec.block_lists] == ["blocks"] and spec.cache_start == 0
    spec = infer_spec(ImgTxt(), (x, t, torch.randn(1, 20, 8)), moreg=False)
    block = spec.block_lists[0].block
    assert (block.hidden_states_argument, block.encoder_hidden_states_argument) == ("img", "txt")
    single = Flat1()
    spec = infer_spec(single, (x, t), moreg=False)
    assert spec.block_lists == (specs.BlockList("blocks", specs.BlockSpec(attention=None)),)


class Flat1(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([Block()])

    def forward(self, hidden_states, timestep):
        return self.blocks[0](hidden_states)


def test_a_text_refiner_as_long_as_the_video_is_not_part_of_the_stack(monkeypatch):
    tiny = TINY_MODELS["hunyuan_video"]
    model = tiny.build()
    inputs = tiny.inputs(model, batch_size=1)
    n = inputs["hidden_states"].shape[2] * (inputs["hidden_states"].shape[3] // 2) * (inputs["hidden_states"].shape[4] // 2)
    inputs["encoder_hidden_states"] = torch.randn(1, n, inputs["encoder_hidden_states"].shape[-1])  # text == video tokens
    inputs["encoder_attention_mask"] = torch.ones(1, n, dtype=inputs["encoder_attention_mask"].dtype)
    assert infer_spec(model, (), inputs) == specs.MODEL_SPECS[tiny.class_name]


class ListBlocks(nn.Module):
    """Blocks returning [video, text] lists, and a forward that appends to what they return."""

    class Pair(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Linear(8, 8), nn.Linear(8, 8)

        def forward(self, hidden_states, encoder_hidden_states):
            return [hidden_states + self.a(hidden_states), encoder_hidden_states + self.b(encoder_hidden_states)]

    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([self.Pair(), self.Pair(), self.Pair()])

    def forward(self, hidden_states, timestep, encoder_hidden_states):
        for block in self.blocks:
            out = block(hidden_states, encoder_hidden_states)
            out.append(None)  # a list method: a tuple would break here
            hidden_states, encoder_hidden_states = out[0], out[1]
        return hidden_states


def test_blocks_returning_lists_get_lists_back_on_skipped_steps():
    model = ListBlocks()
    apply_adacache(model, AdaCacheConfig(codebook={1e9: 2}, moreg=False))
    x, text = torch.randn(1, 6, 8), torch.randn(1, 3, 8)
    with torch.no_grad():
        for step in range(4):
            with adacache.cache_context(model, "cond", step_index=step, num_inference_steps=6):
                model(x, torch.tensor([900.0 - 100 * step]), text)
    assert get_stats(model)[-1].skipped_steps == [3]
    remove_adacache(model)
