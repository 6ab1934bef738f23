"""adacache bench and calibrate: methods by name, measures, reports, resume, sharding, bad input."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from adacache.cli import main
from adacache.config import AdaCacheConfig
from adacache.embedded.train import build_pipeline
from adacache.evaluation.bench import Bench, BenchSettings, load_records, run_bench
from adacache.evaluation.calibrate import Calibrator, derive_codebook
from adacache.evaluation.methods import default_methods, parse_method, parse_methods
from adacache.evaluation.metrics import psnr, ssim
from adacache.hooks import is_applied

PROMPTS = ["a red circle moving left fast", "a blue square standing still"]


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    """A tiny, randomly initialised embedded pipeline saved as a diffusers folder."""
    folder = tmp_path_factory.mktemp("tiny") / "pipe"
    build_pipeline("tiny", architecture="wan").save_pretrained(folder)
    return folder


@pytest.fixture
def tiny_pipe():
    return build_pipeline("tiny", architecture="wan")


# --- methods ------------------------------------------------------------------------------------------------------
def test_method_names_parse_to_what_they_say(tmp_path):
    assert parse_method("none").kind == "none"
    fast = parse_method("opensora-30-fast+moreg")
    assert fast.kind == "adacache" and fast.adacache.moreg and fast.family == "AdaCache + MoReg"
    static = parse_method("static:3")
    assert static.adacache.codebook == {1.0: 3} and static.family == "static reuse" and not static.is_adacache
    assert parse_method("fbc").value == 0.05 and parse_method("fbc:0.2").value == 0.2
    assert parse_method("taylorseer:4").value == 4
    path = tmp_path / "mine.json"
    AdaCacheConfig(codebook={0.1: 4, 1.0: 1}).save(path)
    assert parse_method(str(path)).adacache.codebook == {0.1: 4, 1.0: 1}
    assert parse_method("auto", tuned=path).adacache.codebook == {0.1: 4, 1.0: 1}
    assert parse_method("auto").adacache == AdaCacheConfig.from_preset("balanced")  # no codebook: the default
    assert parse_method("default").adacache == AdaCacheConfig() and parse_method("speedup:2.5").adacache.speedup == 2.5
    for steps in (30, 100):
        assert parse_methods(default_methods(steps))[0].name == "none"


@pytest.mark.parametrize("name, message", [
    ("fastest", "unknown method 'fastest'; methods are: none"),
    ("static:1", "static needs a reuse period k >= 2"),
    ("static:x", "static needs a reuse period k >= 2"),
    ("fbc:abc", "'abc' is not a valid fbc parameter"),
    ("pab:0", "must be positive"),
    ("missing.json", "neither a preset"),
])
def test_bad_method_names_say_what_is_accepted(name, message):
    with pytest.raises(ValueError, match=message):
        parse_method(name)


def test_a_method_listed_twice_is_an_error_and_the_baseline_comes_first():
    with pytest.raises(ValueError, match="listed twice"):
        parse_methods(["static:2", "static:2"])
    assert [m.name for m in parse_methods(["static:2"])] == ["none", "static:2"]


@pytest.mark.parametrize("name", ["fbc:0.3", "pab:3", "magcache:0.3", "taylorseer:3", "fastercache:2"])
def test_every_diffusers_peer_runs_saves_compute_and_leaves_the_model_as_it_was(name, tiny_pipe):
    """Each peer through diffusers' enable_cache on the embedded pipeline: fewer FLOPs than uncached (a config that
    hooks nothing would silently be the baseline), a video close to the uncached one, and after removal the
    uncached video again, bit for bit, with no hook left behind."""
    from adacache.evaluation.metrics import TransformerMeter

    tiny_pipe.set_progress_bar_config(disable=True)

    def generate():
        return tiny_pipe(PROMPTS[0], num_inference_steps=12, generator=torch.Generator().manual_seed(0)).frames

    with TransformerMeter([tiny_pipe.transformer]) as meter:
        meter.reset(count_flops=True)
        reference = generate()
        full = meter.flops
        method = parse_method(name)
        assert method.unsupported(tiny_pipe) is None
        method.apply(tiny_pipe, 12, run=generate)
        meter.reset(count_flops=True)
        cached = generate()
        assert meter.flops < 0.95 * full, f"{name} saved no compute"
        method.remove(tiny_pipe)
    assert 0 < float((cached - reference).abs().max()) < 0.5
    assert torch.equal(generate(), reference)
    assert not tiny_pipe.transformer.is_cache_enabled and not tiny_pipe.transformer._forward_pre_hooks
    if name.startswith("magcache"):  # ratios from diffusers' own calibration mode, one per step
        (ratios,) = method.state["mag_ratios"].values()
        assert len(ratios) == 12 and ratios[0] == 1.0 and all(r > 0 for r in ratios)


def test_a_peer_a_model_cannot_run_gets_a_reason(tiny_pipe):
    from diffusers import WanTransformer3DModel

    one_block = WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=8,
                                      in_channels=3, out_channels=3, text_dim=16, freq_dim=16, ffn_dim=16,
                                      num_layers=1)
    assert "needs at least 2" in parse_method("fbc").unsupported(types_namespace(transformer=one_block))
    split_cfg = types_namespace(transformer=tiny_pipe.transformer)  # not a pipeline known to batch its CFG
    for name in ("fastercache", "pab"):  # their state is per attention layer: split-CFG branches would share it
        assert "not known to batch" in parse_method(name).unsupported(split_cfg)
        assert parse_method(name).unsupported(tiny_pipe) is None
    assert "guidance <= 1" in parse_method("fastercache").unsupported(tiny_pipe, guidance=1.0)


def types_namespace(**components):
    """A stand-in 'pipeline' holding just the components the support checks look at."""
    import types

    return types.SimpleNamespace(components=components, **components)


# --- metrics ------------------------------------------------------------------------------------------------------
def test_psnr_and_ssim_on_known_cases():
    rng = np.random.default_rng(0)
    video = rng.random((4, 16, 16, 3))
    assert psnr(video, video) == float("inf") and ssim(video, video) == pytest.approx(1.0)
    noisy = np.clip(video + rng.normal(0, 0.1, video.shape), 0, 1)
    assert 15 < psnr(video, noisy) < 25
    noisier = np.clip(video + rng.normal(0, 0.3, video.shape), 0, 1)
    assert ssim(video, noisier) < ssim(video, noisy) < 1
    with pytest.raises(ValueError, match="differ in shape"):
        ssim(video, video[:2])


# --- the bench ----------------------------------------------------------------------------------------------------
def _settings(**overrides):
    values = dict(model="tiny", prompts=PROMPTS, methods=["none", "static:2", "opensora-30-fast", "fbc:0.05"],
                  seeds=[0], steps=6, guidance=4.0, warmup=0)
    return BenchSettings(**{**values, **overrides})


def test_bench_measures_every_method_and_writes_a_report(tiny_pipe, tmp_path):
    report = run_bench(tiny_pipe, _settings(), tmp_path, progress=False)
    records = load_records(tmp_path)
    assert len(records) == 2 * 4
    base = {r["video"]: r for r in records if r["method"] == "none"}
    for r in records:
        assert r["status"] == "ok", r
        assert r["seconds"] > 0 and r["flops"] > 0 and "verifier" in r
    static = [r for r in records if r["method"] == "static:2"]
    for r in static:  # 6 steps at rate 2: 1 (no distance yet: rate 1), 2, 4, then the last two forced: 5 of 6
        assert r["computed_steps"] == 5 and r["flops"] < base[r["video"]]["flops"]
        assert r["flops_fraction"] == pytest.approx(r["flops"] / base[r["video"]]["flops"])
        assert r["psnr"] is not None and r["ssim"] <= 1 and r["cache_bytes"] > 0
    rows = {m["method"]: m for m in report["methods"]}
    assert rows["static:2"]["videos"] == 2 and rows["none"]["family"] == "baseline"
    for name in ("report.json", "report.md", "pareto.png", "motion.png", "run.json"):
        assert (tmp_path / name).is_file()
    saved = json.loads((tmp_path / "report.json").read_text())
    assert saved["environment"]["torch"] == torch.__version__ and saved["settings"]["steps"] == 6
    assert "| static:2 |" in (tmp_path / "report.md").read_text()


def test_a_method_that_fails_is_reported_and_the_run_goes_on(tiny_pipe, tmp_path, monkeypatch):
    from adacache.evaluation import methods

    def broken(*args, **kwargs):
        raise RuntimeError("this cache cannot run here")

    monkeypatch.setitem(methods._PEER_CONFIG, "fbc", broken)
    run_bench(tiny_pipe, _settings(prompts=PROMPTS[:1]), tmp_path, progress=False)
    records = {r["method"]: r for r in load_records(tmp_path)}
    assert records["fbc:0.05"]["status"] == "failed"
    assert "this cache cannot run here" in records["fbc:0.05"]["reason"]
    assert records["static:2"]["status"] == "ok"
    assert "this cache cannot run here" in (tmp_path / "report.md").read_text()


def test_pipeline_outputs_of_every_type_become_the_same_video():
    from PIL import Image

    from adacache.evaluation.metrics import as_video

    video = np.random.default_rng(0).integers(0, 256, (3, 8, 8, 3), dtype=np.uint8)
    expected = video.astype(np.float32) / 255
    as_pil = [Image.fromarray(frame) for frame in video]
    as_tensor = torch.from_numpy(expected).permute(0, 3, 1, 2)  # (T, C, H, W) floats, as the embedded pipeline
    for frames in (video, as_pil, as_tensor, expected):
        np.testing.assert_allclose(as_video(frames), expected, atol=1e-6)


def test_a_method_that_yields_nan_is_a_failure_and_the_report_is_strict_json(tiny_pipe, tmp_path):
    def poison(module, args, output):  # a cache that breaks the model: NaN out while a diffusers cache is on
        # (is_cache_enabled is True under AdaCache too, which diffusers counts as the model's cache)
        if module.is_cache_enabled and not is_applied(module) and poisoning:
            output[0][0, 0, 0, 0, 0] = float("nan")

    poisoning = True
    handle = tiny_pipe.transformer.register_forward_hook(poison)
    report = run_bench(tiny_pipe, _settings(prompts=PROMPTS[:1], methods=["none", "static:2", "fbc:0.3"]), tmp_path,
                       progress=False)
    records = {r["method"]: r for r in load_records(tmp_path)}
    assert records["fbc:0.3"]["status"] == "failed" and "non-finite" in records["fbc:0.3"]["reason"]
    assert records["static:2"]["status"] == "ok" and not records["static:2"]["identical"]
    json.loads((tmp_path / "report.json").read_text())  # strict JSON: no NaN anywhere
    assert {m["method"]: m["videos"] for m in report["methods"]}["fbc:0.3"] == 0
    # a resumed run retries what failed, and the retry replaces the failure in the report
    poisoning = False
    run_bench(tiny_pipe, _settings(prompts=PROMPTS[:1], methods=["none", "static:2", "fbc:0.3"]), tmp_path,
              progress=False)
    records = [r for r in load_records(tmp_path) if r["method"] == "fbc:0.3"]
    assert len(records) == 1 and records[0]["status"] == "ok" and records[0]["cache_bytes"] > 0
    handle.remove()


def test_a_resume_with_a_changed_config_file_is_refused(tiny_pipe, tmp_path):
    config = tmp_path / "mine.json"
    AdaCacheConfig(codebook={0.1: 3, 1.0: 1}).save(config)
    settings = _settings(prompts=PROMPTS[:1], methods=["none", str(config)], flops=False)
    run_bench(tiny_pipe, settings, tmp_path / "run", progress=False)
    AdaCacheConfig(codebook={0.2: 3, 1.0: 1}).save(config)
    with pytest.raises(ValueError, match="resolved_methods differ"):
        run_bench(tiny_pipe, settings, tmp_path / "run", progress=False)


def test_an_interrupted_bench_resumes_without_measuring_again(tiny_pipe, tmp_path):
    settings = _settings(methods=["none", "static:2", "static:3"])
    run_bench(tiny_pipe, settings, tmp_path, progress=False)
    path = tmp_path / "records.rank0.jsonl"
    lines = path.read_text().splitlines()
    assert len(lines) == 6
    path.write_text("\n".join(lines[:4]) + "\n" + lines[4][:20])  # the last record lost, the one before cut short
    run_bench(tiny_pipe, settings, tmp_path, progress=False)
    records = load_records(tmp_path)
    assert sorted((r["video"], r["method"]) for r in records) == sorted(
        (f"p{i:03d}-s0", m) for i in range(2) for m in ("none", "static:2", "static:3"))
    assert [json.loads(x) for x in lines[:4]] == records[:4]  # the finished ones kept as they were
    with pytest.raises(ValueError, match="holds a run with other settings \\(steps differ\\)"):
        Bench(tiny_pipe, dataclasses_replace(settings, steps=7), tmp_path).check_settings()


def dataclasses_replace(settings, **changes):
    import dataclasses

    return dataclasses.replace(settings, **changes)


def test_more_processes_than_videos_is_an_error_before_any_work(tiny_pipe, tmp_path):
    with pytest.raises(ValueError, match="3 processes for 2 videos"):
        Bench(tiny_pipe, _settings(), tmp_path / "out", rank=0, world=3)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("args, message", [
    (["--methods", "none,fastest"], "unknown method 'fastest'"),
    (["--prompts", "{empty}"], "holds no prompts"),
    (["--prompts", "{missing}"], "cannot read the prompt file"),
    (["--out", "{file}/sub"], "cannot write to the output folder"),
    (["--seeds", "0,x"], "--seeds takes comma-separated"),
])
def test_bench_cli_rejects_bad_input_before_any_work(args, message, tmp_path, tiny_folder, capsys):
    empty, file = tmp_path / "empty.txt", tmp_path / "file"
    empty.write_text("# only a comment\n\n")
    file.write_text("x")
    values = {"empty": empty, "missing": tmp_path / "missing.txt", "file": file}
    args = [a.format(**values) for a in args]
    base = ["bench", "--model", str(tiny_folder), "--prompts", str(empty), "--out", str(tmp_path / "b"), "--no-progress"]
    if "--prompts" not in args:
        (tmp_path / "p.txt").write_text("\n".join(PROMPTS))
        base[base.index("--prompts") + 1] = str(tmp_path / "p.txt")
    assert main(base + args) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "b" / "records.rank0.jsonl").exists()


def test_bench_shards_over_two_processes_with_torchrun_and_merges(tiny_folder, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS + ["a green triangle moving up slow"]))
    out = tmp_path / "sharded"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
               "-m", "adacache.cli", "bench", "--model", str(tiny_folder), "--prompts", str(prompts),
               "--seeds", "0", "--steps", "4", "--methods", "none,static:2", "--warmup", "0", "--no-flops",
               "--out", str(out), "--no-progress"]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (out / "records.rank0.jsonl").is_file() and (out / "records.rank1.jsonl").is_file()
    rank0 = {json.loads(x)["video"] for x in (out / "records.rank0.jsonl").read_text().splitlines()}
    rank1 = {json.loads(x)["video"] for x in (out / "records.rank1.jsonl").read_text().splitlines()}
    assert rank0 == {"p000-s0", "p002-s0"} and rank1 == {"p001-s0"}
    report = json.loads((out / "report.json").read_text())
    assert len(report["records"]) == 6 and {m["method"]: m["videos"] for m in report["methods"]} == {
        "none": 3, "static:2": 3}
    assert done.stdout.count("# adacache bench") == 1  # only rank 0 reports


# --- calibrate ----------------------------------------------------------------------------------------------------
def test_derived_codebook_follows_the_distance_quantiles():
    distances = list(np.linspace(0.01, 0.5, 50))
    codebook = derive_codebook(distances, rate=4)
    thresholds, rates = list(codebook), list(codebook.values())
    assert rates == [4, 3, 2, 1] and thresholds == sorted(thresholds)
    assert thresholds[:3] == pytest.approx(list(np.quantile(distances, [0.25, 0.5, 0.75])))
    doubled = derive_codebook(distances, rate=4, scale=2.0)
    assert list(doubled)[:3] == pytest.approx([2 * t for t in thresholds[:3]])
    AdaCacheConfig(codebook=codebook)  # a valid codebook
    with pytest.raises(ValueError, match="no probe distances"):
        derive_codebook([], rate=4)


def test_calibrate_reaches_a_compute_target_and_saves_a_loadable_config(tiny_pipe, tmp_path):
    calibrator = Calibrator(tiny_pipe, PROMPTS, steps=12, guidance=4.0)
    result = calibrator.calibrate(speedup=2.0, wall_clock=False, iterations=8)
    reached = result.about["reached"]["compute_speedup"]
    assert reached == pytest.approx(2.0, rel=0.15)
    path = tmp_path / "calibrated.json"
    result.config.save(path, about=result.about)
    assert AdaCacheConfig.load(path).codebook == result.config.codebook
    assert json.loads(path.read_text())["_about"]["target"]["speedup"] == 2.0
    with pytest.raises(ValueError, match="give exactly one target"):
        calibrator.calibrate()
    with pytest.raises(ValueError, match=r"in \(1, 2.00\] at 12 steps"):  # 6 of 12 steps computed at the fastest
        calibrator.calibrate(speedup=5.0)


def test_calibrate_with_moreg_fits_its_normalisation_to_the_model(tiny_pipe):
    """The authors' 0.385 is Open-Sora's scale; calibration sets moreg_norm to the median raw motion it measures,
    and the codebook is derived from distances with MoReg's factor applied."""
    base = AdaCacheConfig(codebook={1.0: 1}, moreg=True)
    calibrator = Calibrator(tiny_pipe, PROMPTS[:1], steps=12, guidance=4.0, base=base)
    norm = calibrator.moreg_norm()
    assert norm is not None and 0 < norm != base.moreg_norm
    result = calibrator.calibrate(speedup=2.0, wall_clock=False, iterations=3)
    assert result.config.moreg and result.config.moreg_norm == pytest.approx(norm)
    assert result.about["moreg_norm"] == pytest.approx(norm)


def test_flops_are_counted_exactly_and_on_a_module_graph_with_a_cycle():
    """The FLOP counter counts totals only (metrics.total_flop_counter): torch's own per-module tracking walks a
    module's children and never ends where they form a cycle, as cache-dit's cached blocks and their transformer do
    while it runs. A torch whose FlopCounterMode changed fails here."""
    from adacache.evaluation.metrics import TransformerMeter

    class Looped(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = torch.nn.Linear(4, 8)
            self.inner = torch.nn.Module()
            self.inner.outer = self  # a child that holds its parent: the cycle

        def forward(self, x):
            return self.linear(x)

    model = Looped()
    with TransformerMeter([model]) as meter:
        meter.reset(count_flops=True)
        model(torch.ones(2, 4))
        assert meter.flops == 2 * 2 * 4 * 8  # one (2, 4) x (4, 8) matmul: a multiply and an add each
        meter.reset(count_flops=True)
        model(torch.ones(3, 4))
        assert meter.flops == 2 * 3 * 4 * 8


def test_a_phase_that_timed_out_waiting_for_a_frozen_process_does_not_wait_for_it_again(monkeypatch):
    """Under --context-parallel a collective that waited --rank-timeout for a frozen process raises; the phase's
    agreement (an all-reduce with that same process) is skipped, or the run would wait as long again."""
    import torch.distributed as dist

    from adacache.evaluation import bench

    monkeypatch.setattr(dist, "all_reduce", lambda *args, **kwargs: pytest.fail("waited for the frozen process again"))
    with pytest.raises(RuntimeError, match="Timed out waiting"):
        with bench._together(2):
            raise RuntimeError("[gloo/transport/tcp/pair.cc:1] Timed out waiting 5000ms for recv operation to complete")
