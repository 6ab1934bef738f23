"""cache-dit's caches as bench peers (dbcache, dbcache-taylorseer, cachedit-mask) on the shipped embedded model:
they skip real block calls, report what they skipped, give the same video on every generation, and leave the model
exactly uncached when removed (also after a generation that raised); without cache-dit they are skipped, with the
reason, never a crash."""

import sys
import types

import pytest
import torch

from adacache.embedded.pipeline import EmbeddedVideoPipeline
from adacache.embedded.train import build_pipeline
from adacache.evaluation.bench import BenchSettings, load_records, run_bench
from adacache.evaluation.methods import CacheDitPeer, default_methods, parse_method, parse_methods
from adacache.evaluation.metrics import psnr

STEPS = 12  # cache-dit's default warm-up computes the first 8 steps: DBCache can skip from the 9th on
PROMPT = "a red circle moving right fast"


def _cache_dit():
    try:
        import cache_dit
    except ImportError:
        pytest.fail("cache-dit is not installed; pip install -e '.[test]' installs it (the peers extra)")
    return cache_dit


@pytest.fixture(scope="module")
def shipped():
    """The shipped pipeline, its block calls counted, and its uncached video and block calls at STEPS steps."""
    pipe = EmbeddedVideoPipeline.from_embedded()
    pipe.set_progress_bar_config(disable=True)
    calls = {"blocks": 0}

    def count(module, args):
        calls["blocks"] += 1

    handles = [block.register_forward_pre_hook(count) for block in pipe.transformer.blocks]

    def generate(guidance=4.0):
        calls["blocks"] = 0
        return pipe(PROMPT, num_inference_steps=STEPS, guidance_scale=guidance,
                    generator=torch.Generator().manual_seed(0)).frames

    reference = generate()
    yield types.SimpleNamespace(pipe=pipe, generate=generate, calls=calls, reference=reference,
                                reference_calls=calls["blocks"])
    for handle in handles:
        handle.remove()


def _is_uncached(pipe, attributes):
    transformer = pipe.transformer
    return (set(vars(transformer)) == attributes and not transformer._forward_pre_hooks
            and "forward" not in vars(transformer) and not hasattr(transformer, "_context_manager"))


@pytest.mark.parametrize("name", ["dbcache:0.2", "dbcache-taylorseer:0.2", "cachedit-mask:ultra"])
def test_each_cachedit_method_skips_block_calls_and_removal_restores_the_uncached_model(name, shipped):
    cache_dit = _cache_dit()
    pipe = shipped.pipe
    assert shipped.reference_calls == 6 * STEPS
    method = parse_method(name)
    assert isinstance(method, CacheDitPeer) and method.unsupported(pipe, 4.0, STEPS) is None
    attributes = set(vars(pipe.transformer))
    method.apply(pipe, STEPS, guidance=4.0)
    try:
        cached = shipped.generate()
        calls, stats, held = shipped.calls["blocks"], method.stats(pipe), method.held_bytes(pipe)
        again = shipped.generate()
    finally:
        method.remove(pipe)
    skipped = STEPS - stats["computed_steps"]
    assert skipped >= 2 and stats["steps"] == STEPS
    # F1B0 on 6 blocks: a reused step still runs the first block; cache-dit's own count agrees with the real calls
    assert calls == 6 * STEPS - 5 * skipped
    assert len(stats["cachedit"]["cached_steps"]) == skipped and stats["cachedit"]["cfg_cached_steps"] == []
    assert stats["cachedit"]["config"].startswith("DBCache_F1B0_") and "_CFG0" in stats["cachedit"]["config"]
    if name.startswith("cachedit-mask"):  # one batched CFG call per step: the mask's steps are the steps skipped
        mask = cache_dit.steps_mask(total_steps=STEPS, mask_policy="ultra")
        assert stats["cachedit"]["cached_steps"] == [i for i, compute in enumerate(mask) if not compute]
    assert held > 0
    assert 25 < psnr(shipped.reference.numpy(), cached.numpy()) < float("inf")  # close, not the uncached video
    assert torch.equal(again, cached)  # the second generation starts afresh, as the first did
    assert _is_uncached(pipe, attributes)
    assert torch.equal(shipped.generate(), shipped.reference) and shipped.calls["blocks"] == 6 * STEPS


def test_one_cachedit_method_after_another_and_removal_after_a_failed_generation(shipped):
    pipe = shipped.pipe
    attributes = set(vars(pipe.transformer))
    first, second = parse_method("dbcache:0.2"), parse_method("cachedit-mask:ultra")
    first.apply(pipe, STEPS, guidance=4.0)
    try:
        shipped.generate()
        first_stats = first.stats(pipe)
    finally:
        first.remove(pipe)
    second.apply(pipe, STEPS, guidance=4.0)
    try:
        shipped.generate()
        assert second.stats(pipe)["computed_steps"] == 6 and shipped.calls["blocks"] == 6 * STEPS - 5 * 6
    finally:
        second.remove(pipe)
    assert first_stats["computed_steps"] < STEPS

    def fail_at_the_fifth_call(module, args):
        fail_at_the_fifth_call.calls += 1
        if fail_at_the_fifth_call.calls == 5:
            raise RuntimeError("a generation that stops half-way")

    fail_at_the_fifth_call.calls = 0
    first.apply(pipe, STEPS, guidance=4.0)
    handle = pipe.transformer.blocks[3].register_forward_pre_hook(fail_at_the_fifth_call)
    try:
        with pytest.raises(RuntimeError, match="stops half-way"):
            shipped.generate()
    finally:
        handle.remove()
        first.remove(pipe)
    assert _is_uncached(pipe, attributes)
    assert torch.equal(shipped.generate(), shipped.reference)
    first.apply(pipe, STEPS, guidance=4.0)  # and a fresh application after the failure skips as before
    try:
        shipped.generate()
        assert first.stats(pipe)["computed_steps"] == first_stats["computed_steps"]
    finally:
        first.remove(pipe)


def test_without_guidance_one_call_per_step_is_counted(shipped):
    """guidance 1 runs no CFG: one unbatched call per step, still one cache-dit step per call."""
    method = parse_method("cachedit-mask:ultra")
    method.apply(shipped.pipe, STEPS, guidance=1.0)
    try:
        shipped.generate(guidance=1.0)
        assert method.stats(shipped.pipe)["computed_steps"] == 6 and shipped.calls["blocks"] == 6 * STEPS - 5 * 6
    finally:
        method.remove(shipped.pipe)


def _namespace(**components):
    """A stand-in 'pipeline' holding just the components the support checks look at."""
    return types.SimpleNamespace(components=components, **components)


def test_what_cachedit_cannot_run_gets_a_reason():
    _cache_dit()
    from diffusers import WanTransformer3DModel

    tiny = build_pipeline("tiny", architecture="wan")
    method = parse_method("dbcache")
    assert method.unsupported(tiny, 4.0, 30) is None
    assert "defined for 4, 6, or 8 and more steps, not for 5" in parse_method("cachedit-mask").unsupported(tiny, 4.0, 5)
    assert parse_method("cachedit-mask").unsupported(tiny, 4.0, 6) is None
    split = _namespace(transformer=tiny.transformer)  # not known to batch its CFG branches, nor to cache-dit
    assert "not known to batch its CFG branches" in method.unsupported(split, 4.0)
    assert method.unsupported(split, 1.0) is None  # no CFG: one call per step either way
    one_block = WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=8,
                                      in_channels=3, out_channels=3, text_dim=16, freq_dim=16, ffn_dim=16,
                                      num_layers=1)
    assert "needs at least one more to cache" in method.unsupported(_namespace(transformer=one_block), 1.0)
    experts = _namespace(transformer=tiny.transformer, transformer_2=tiny.transformer)
    assert "two experts" in method.unsupported(experts, 4.0)
    latte = build_pipeline("tiny", architecture="latte")
    assert "interleaved" in method.unsupported(latte, 4.0)
    with pytest.raises(ValueError, match="cannot run here: .*interleaved"):
        method.apply(latte, 30, guidance=4.0)


def test_cachedit_method_names_parse_and_bad_ones_say_what_is_accepted():
    assert parse_method("dbcache").value == 0.08 and parse_method("dbcache:0.2").value == 0.2
    assert parse_method("dbcache-taylorseer").family == "cache-dit DBCache+TaylorSeer"
    assert parse_method("cachedit-mask").value == "medium" and parse_method("cachedit-mask:fast").value == "fast"
    assert parse_method("dbcache").family == "cache-dit DBCache"
    assert parse_method("cachedit-mask:slow").family == "cache-dit steps mask"
    for name, message in [("dbcache:abc", "'abc' is not a valid dbcache parameter"),
                          ("dbcache:0", "must be positive"), ("dbcache:", "write dbcache \\(its default, 0.08\\)"),
                          ("cachedit-mask:warp", "one of slow, medium, fast, ultra"),
                          ("cachedit-mask:", "one of slow, medium, fast, ultra"),
                          ("dbcache+moreg", "\\+moreg applies to AdaCache configs"),
                          ("cachedit-mask:fast+moreg", "\\+moreg applies to AdaCache configs")]:
        with pytest.raises(ValueError, match=message):
            parse_method(name)
    with pytest.raises(ValueError, match="are the same setting"):
        parse_methods(["dbcache:0.1", "dbcache:0.10"])
    assert parse_methods(["dbcache:0.1", "dbcache-taylorseer:0.1"])[1:] != []  # another method, not a duplicate
    names = [m.name for m in parse_methods(default_methods(30))]
    assert {"dbcache:0.08", "dbcache-taylorseer:0.16", "cachedit-mask:slow", "cachedit-mask:ultra"} <= set(names)


def _settings(methods, **overrides):
    values = dict(model="tiny", prompts=["a blue square standing still"], methods=methods, seeds=[0], steps=8,
                  guidance=4.0, warmup=0)
    return BenchSettings(**{**values, **overrides})


def test_the_bench_measures_cachedit_peers(tmp_path):
    _cache_dit()
    tiny = build_pipeline("tiny", architecture="wan")
    report = run_bench(tiny, _settings(["none", "cachedit-mask:fast", "dbcache:0.2"]), tmp_path, progress=False)
    records = {r["method"]: r for r in load_records(tmp_path)}
    mask = records["cachedit-mask:fast"]
    assert mask["status"] == "ok" and mask["computed_steps"] == 5 and mask["steps"] == 8  # fast at 8 steps: 5 of 8
    assert mask["flops"] < records["none"]["flops"] and mask["cache_bytes"] > 0 and mask["psnr"] is not None
    assert mask["cachedit"]["config"].startswith("DBCache_F1B0")
    assert records["dbcache:0.2"]["status"] == "ok"
    rows = {m["method"]: m for m in report["methods"]}
    assert rows["cachedit-mask:fast"]["family"] == "cache-dit steps mask" and "verdict" in rows["cachedit-mask:fast"]
    assert "| cachedit-mask:fast | cache-dit steps mask |" in (tmp_path / "report.md").read_text()


def test_without_cachedit_its_methods_are_skipped_with_the_reason(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "cache_dit", None)  # as if not installed: `import cache_dit` fails
    tiny = build_pipeline("tiny", architecture="wan")
    for name in ("dbcache", "dbcache-taylorseer:0.1", "cachedit-mask:fast"):
        assert "pip install cache-dit" in parse_method(name).unsupported(tiny, 4.0, 8)
    run_bench(tiny, _settings(["none", "static:2", "dbcache", "cachedit-mask:fast"], flops=False), tmp_path,
              progress=False)
    records = {r["method"]: r for r in load_records(tmp_path)}
    for name in ("dbcache", "cachedit-mask:fast"):
        assert records[name]["status"] == "skipped" and "pip install cache-dit" in records[name]["reason"]
    assert records["static:2"]["status"] == "ok"
    assert "not run: cache-dit is not installed: pip install cache-dit" in (tmp_path / "report.md").read_text()


def test_an_apply_that_fails_half_way_is_undone_by_remove(shipped, monkeypatch):
    cache_dit = _cache_dit()
    from cache_dit.caching.cache_adapters.cache_adapter import CachedAdapter

    def broken(*args, **kwargs):
        raise RuntimeError("cache-dit failed after creating its context")

    pipe = shipped.pipe
    attributes = set(vars(pipe.transformer))
    method = parse_method("dbcache:0.2")
    monkeypatch.setattr(CachedAdapter, "mock_blocks", classmethod(broken))
    with pytest.raises(RuntimeError, match="after creating its context"):
        method.apply(pipe, STEPS, guidance=4.0)
    method.remove(pipe)
    monkeypatch.undo()
    assert _is_uncached(pipe, attributes) and not hasattr(pipe.transformer.blocks, "_context_kwargs")
    assert not getattr(cache_dit.caching.FakeDiffusionPipeline, "_is_cached", False)
    method.apply(pipe, STEPS, guidance=4.0)  # cache-dit's marks are gone: a new application caches again
    try:
        with pytest.raises(RuntimeError, match="already enabled"):
            parse_method("cachedit-mask").apply(pipe, STEPS, guidance=4.0)
        shipped.generate()
        assert method.stats(pipe)["computed_steps"] < STEPS
    finally:
        method.remove(pipe)
    assert torch.equal(shipped.generate(), shipped.reference)
