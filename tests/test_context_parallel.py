"""AdaCache under diffusers' context parallelism, on CPU: 2 processes on gloo, Ulysses 2 (Ring needs an attention
backend that returns the log-sum-exp, none of which runs on CPU; see notes/context-parallel.md).

One spawn runs every scenario (starting a process and importing diffusers costs most of the time); the tests then
read its results. The parent waits with a hard deadline and kills the workers past it, so a hang (ranks deciding
differently and waiting in different collectives) fails the tests instead of stalling CI.
"""

from __future__ import annotations

import math
import multiprocessing
import queue as queue_module
import time
import traceback

import pytest
import torch

from adacache.config import AdaCacheConfig
from adacache.core.decision import ProbeSums, Schedule, motion_sums, scale_free_motion_sums

from toy import decide_computed_step

WORLD = 2
DEADLINE_S = 150  # the whole spawn; it takes about 25 s on two shared cores
STEPS = 10
WAN_PLAIN = dict(codebook={0.05: 3, 0.15: 2, 1.0: 1})
WAN_MOREG = dict(codebook={0.05: 3, 0.15: 2, 1.0: 1}, moreg=True, moreg_window=(2, 10), moreg_norm=0.25)
LTX_MOREG = dict(codebook={0.05: 3, 0.15: 2, 1.0: 1}, moreg=True, moreg_window=(2, 10), moreg_norm=0.118)


# --- what each rank runs -------------------------------------------------------------------------------------------
def _cpu_shim() -> None:
    """Test-only: diffusers' `_resolve_parallel_config` places rank r on `rank % torch.accelerator.device_count()`,
    a division by zero on a host without an accelerator; with one "device" every rank is on the CPU."""
    if torch.accelerator.device_count() == 0:
        torch.accelerator.device_count = lambda: 1


def _denoise(model, tiny, steps: int = STEPS):
    """A small denoising loop (Euler-like, timesteps falling), each call in its cache_context: the outputs and the
    last generation's stats."""
    import adacache

    inputs, outputs = tiny.inputs(model), []
    if "encoder_attention_mask" in inputs:
        # diffusers' Ulysses attention fails on a text mask with the native backend ("output with shape [1, 1, 256,
        # 8] doesn't match the broadcast shape [1, 2, 256, 8]", without AdaCache too): run LTX unmasked
        inputs["encoder_attention_mask"] = None
    for index in range(steps):
        inputs[tiny.timestep_key] = torch.full((1,), 1000.0 - 90.0 * index)
        with torch.no_grad(), adacache.cache_context(model, "cond", index, steps):
            output = model(**inputs)[0]
        outputs.append(output)
        inputs["hidden_states"] = inputs["hidden_states"] - 0.05 * output
    return torch.stack(outputs), adacache.get_stats(model)[-1]


def _single_vs_ulysses(family: str, config: dict, order: str = "adacache-first") -> dict:
    """The same generation run whole on this process, then under Ulysses 2 (parallelism enabled after the first
    run: AdaCache looks it up per generation)."""
    import adacache
    from diffusers import ContextParallelConfig

    from adacache.testing import tiny_model

    tiny = tiny_model(family)
    model = tiny.build(seed=0)
    adacache.apply_adacache(model, config)
    whole, whole_stats = _denoise(model, tiny)
    adacache.reset_state(model)
    if order == "adacache-first":
        model.enable_parallelism(config=ContextParallelConfig(ulysses_degree=WORLD))
    else:  # LTX splits at the model's input, outside every block: AdaCache may come second
        adacache.remove_adacache(model)
        model.enable_parallelism(config=ContextParallelConfig(ulysses_degree=WORLD))
        adacache.apply_adacache(model, config)
    sharded, sharded_stats = _denoise(model, tiny)
    return {
        "computed": (whole_stats.computed_steps, sharded_stats.computed_steps),
        "distances": (whole_stats.distances, sharded_stats.distances),
        "motion": (whole_stats.motion, sharded_stats.motion),
        "identical": torch.equal(whole, sharded),
        "max_difference": (whole - sharded).abs().max().item(),
        "scale": whole.abs().max().item(),
    }


def _videos_under_ulysses() -> dict:
    """Two videos in one call (per-video schedules, MoReg on), whole and under Ulysses 2: each video's steps and the
    outputs, and AdaCache's all-reduces per call of the transformer (counted at ContextParallel.all_sum)."""
    import adacache
    from diffusers import ContextParallelConfig

    from adacache.parallel import ContextParallel
    from adacache.testing import tiny_model

    tiny = tiny_model("wan")
    model = tiny.build(seed=0)
    inputs = tiny.inputs(model, batch_size=2)

    def denoise():
        state, outputs = dict(inputs), []
        for index in range(STEPS):
            state["timestep"] = torch.full((2,), 1000.0 - 90.0 * index)
            before = calls[0]
            with torch.no_grad(), adacache.cache_context(model, "cond", index, STEPS):
                output = model(**state)[0]
            per_call.append(calls[0] - before)
            outputs.append(output)
            state["hidden_states"] = state["hidden_states"] - 0.05 * output
        stats = {s.video: s for s in adacache.get_stats(model) if s.generation == adacache.get_stats(model)[-1].generation}
        return torch.stack(outputs), stats

    calls, per_call = [0], []
    real_all_sum = ContextParallel.all_sum

    def counted(self, values):
        calls[0] += 1
        return real_all_sum(self, values)

    ContextParallel.all_sum = counted
    try:
        moreg = {k: v for k, v in WAN_MOREG.items() if k != "codebook"}
        adacache.apply_adacache(model, {"codebook": {1e9: 1}, **moreg})
        _, measured = denoise()  # each video's step-2 distance: the threshold goes between them
        low, high = sorted(measured[v].distances[1] for v in (0, 1))
        adacache.remove_adacache(model)
        adacache.apply_adacache(model, {"codebook": {(low * high) ** 0.5: 3, 1e9: 1}, **moreg})
        whole, whole_stats = denoise()
        adacache.reset_state(model)
        model.enable_parallelism(config=ContextParallelConfig(ulysses_degree=WORLD))
        per_call.clear()
        sharded, sharded_stats = denoise()
    finally:
        ContextParallel.all_sum = real_all_sum
    return {
        "computed": [(whole_stats[v].computed_steps, sharded_stats[v].computed_steps) for v in (0, 1)],
        "distances": [(whole_stats[v].distances, sharded_stats[v].distances) for v in (0, 1)],
        "identical": torch.equal(whole, sharded),
        "max_difference": (whole - sharded).abs().max().item(),
        "all_reduces_per_call": list(per_call),
    }


def _non_finite_on_one_rank(rank: int) -> list:
    """Two videos under Ulysses 2; at step 2, video 1's residual is non-finite on rank 1's slice only (the check
    rides on the step's one all-reduce). Every rank's (video, computed steps, whether a note says non-finite)."""
    import adacache
    from diffusers import ContextParallelConfig

    from adacache.testing import tiny_model

    tiny = tiny_model("wan")
    model = tiny.build(seed=0)
    inputs, poisoned = tiny.inputs(model, batch_size=2), [False]

    def poison(module, args, output):
        if poisoned[0] and rank == 1:
            output = output.clone()
            output[1] = float("nan")
        return output

    model.blocks[-1].ffn.register_forward_hook(poison)  # inside the last block's own forward
    adacache.apply_adacache(model, {"codebook": {1e9: 3}})
    model.enable_parallelism(config=ContextParallelConfig(ulysses_degree=WORLD))
    state = dict(inputs)
    for index in range(6):
        state["timestep"] = torch.full((2,), 1000.0 - 150.0 * index)
        poisoned[0] = index == 1
        with torch.no_grad(), adacache.cache_context(model, "cond", index, 6):
            output = model(**state)[0]
        state["hidden_states"] = state["hidden_states"] - 0.05 * torch.nan_to_num(output)
    return [(s.video, s.computed_steps, any("non-finite" in n for n in s.notes)) for s in adacache.get_stats(model)]


def _wrong_order(rank: int) -> str:
    import adacache
    from diffusers import ContextParallelConfig

    from adacache.testing import tiny_model

    model = tiny_model("wan").build(seed=0)
    model.enable_parallelism(config=ContextParallelConfig(ulysses_degree=WORLD))
    try:
        adacache.apply_adacache(model, WAN_PLAIN)
    except RuntimeError as error:
        assert not adacache.hooks.is_applied(model)  # refused whole: nothing left behind
        return str(error)
    return "no error"


def _split_tokens(tokens: torch.Tensor, rank: int, even: bool) -> torch.Tensor:
    """This rank's slice of the token dimension, as diffusers' sharders cut it."""
    if even:
        return tokens.chunk(WORLD, dim=1)[rank]
    return tokens.tensor_split(WORLD, dim=1)[rank]


def _sharded_reduction(rank: int) -> dict:
    """The reduction with a plain gloo group, where each rank holds part of the probe's tokens: MoReg's sums of
    every layout (a slice boundary between frames, inside a frame, slices shorter than a stride) equal the
    single-process sums, and ranks whose local distances fall on either side of a threshold take the same rate."""
    import torch.distributed as dist

    from adacache.parallel import ContextParallel, ShardedProbe

    results = {}
    generator = torch.Generator().manual_seed(7)
    for name, (frames, per_frame, strides, even) in {
        "between frames": (4, 6, (1, 2), True),
        "inside a frame": (3, 6, (1, 2), True),  # 18 tokens: rank 0 holds frame 0, half of frame 1
        "uneven inside": (5, 3, (1, 3), False),  # 15 tokens as 8 + 7
        "slice shorter than the stride": (6, 1, (1, 4), True),
    }.items():
        whole = torch.randn(2, frames * per_frame, 8, generator=generator, dtype=torch.float64)
        expected = motion_sums(whole.view(2, frames, per_frame, 8), strides)
        sharded = ShardedProbe(ContextParallel(dist.group.WORLD, even=even))
        local = sharded.motion_sums(_split_tokens(whole, rank, even), frames, strides)
        change = torch.zeros((), dtype=torch.float64)
        reduced = sharded.reduce_all([ProbeSums(change, change, local, moreg=True)])[0][0].motion
        results[name] = [(a.item(), b.item(), c.item(), d.item()) for (a, b), (c, d) in zip(reduced, expected)]
        # the calibration-free MoReg's sums: counts, and the change between neighbouring tokens of a frame last
        expected = scale_free_motion_sums(whole.view(2, frames, per_frame, 8), strides)
        local = sharded.motion_sums(_split_tokens(whole, rank, even), frames, strides, scale_free=True)
        reduced = sharded.reduce_all([ProbeSums(change, change, local, moreg=True, scale_free=True)])[0][0]
        assert reduced.scale_free and len(reduced.motion) == len(expected)
        results[f"{name}, scale-free"] = [(a.item(), b.item(), c.item(), d.item())
                                          for (a, b), (c, d) in zip(reduced.motion, expected)]

    # Rank 0 holds one token that barely changed, rank 1 three that changed a lot: alone, rank 0 would skip two
    # steps and rank 1 compute the next; the mean of their ratios (0.255) is not the whole's ratio (0.3775).
    codebook = {0.1: 3, 1.0: 1}
    previous = torch.ones(1, 4, 1)
    current = torch.tensor([1.01, 1.5, 1.5, 1.5]).view(1, 4, 1)
    whole_schedule = Schedule(AdaCacheConfig(codebook=codebook))
    sharded = ShardedProbe(ContextParallel(dist.group.WORLD, even=False))
    schedule = Schedule(AdaCacheConfig(codebook=codebook), motion_sums_of=sharded.motion_sums)
    mine = slice(0, 1) if rank == 0 else slice(1, 4)
    local = Schedule(AdaCacheConfig(codebook=codebook))
    for step, probe in ((1, previous), (2, current)):
        decide_computed_step(whole_schedule, step, probe, None)
        decide_computed_step(schedule, step, probe[:, mine], None, sharded)
        decide_computed_step(local, step, probe[:, mine], None)
    results["threshold"] = {
        "whole": (whole_schedule.rate, whole_schedule.records[-1].distance),
        "sharded": (schedule.rate, schedule.records[-1].distance),
        "local": local.rate,
    }
    return results


def _worker(rank: int, store: str, results: multiprocessing.Queue) -> None:
    import torch.distributed as dist

    try:
        torch.set_num_threads(1)  # two ranks share two cores
        dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=WORLD)
        _cpu_shim()
        outcome = {
            "reduction": _sharded_reduction(rank),
            "wan": _single_vs_ulysses("wan", WAN_PLAIN),
            "wan moreg": _single_vs_ulysses("wan", WAN_MOREG),
            "ltx moreg": _single_vs_ulysses("ltx_video", LTX_MOREG, order="adacache-second"),
            "wrong order": _wrong_order(rank),
            "videos": _videos_under_ulysses(),
            "non-finite on one rank": _non_finite_on_one_rank(rank),
        }
        dist.barrier()
        results.put((rank, outcome))
    except BaseException:
        results.put((rank, traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    """Every rank's results, or a failure naming the rank that raised, or the deadline passed (workers killed)."""
    context = multiprocessing.get_context("spawn")
    results = context.Queue()
    store = str(tmp_path_factory.mktemp("gloo") / "store")
    workers = [context.Process(target=_worker, args=(rank, store, results), daemon=True) for rank in range(WORLD)]
    for worker in workers:
        worker.start()
    collected: dict[int, object] = {}
    deadline = time.monotonic() + DEADLINE_S  # one deadline for the lot
    try:
        while len(collected) < WORLD:
            rank, outcome = results.get(timeout=max(0.0, deadline - time.monotonic()))
            collected[rank] = outcome
    except queue_module.Empty:
        pytest.fail(f"context-parallel workers did not finish within {DEADLINE_S} s (a hang?); got ranks "
                    f"{sorted(collected)}")
    finally:
        for worker in workers:
            worker.join(timeout=10)
            if worker.is_alive():
                worker.kill()
                worker.join()
    for rank, outcome in sorted(collected.items()):
        if isinstance(outcome, str):
            pytest.fail(f"rank {rank} raised:\n{outcome}")
    return [collected[rank] for rank in range(WORLD)]


# --- the tests -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("scenario", ["wan", "wan moreg", "ltx moreg"])
def test_ulysses_takes_the_single_process_decisions(ranks, scenario):
    for outcome in ranks:
        whole, sharded = outcome[scenario]["computed"]
        assert sharded == whole
        assert len(whole) < STEPS  # the codebook skipped steps: decisions were actually taken
        for a, b in zip(*outcome[scenario]["distances"]):  # sums added in another order: float32 rounding apart
            assert (a is None and b is None) or math.isclose(a, b, rel_tol=1e-4)
    assert ranks[0][scenario]["distances"][1] == ranks[1][scenario]["distances"][1]  # bit-equal across ranks


@pytest.mark.parametrize("scenario", ["wan", "wan moreg", "ltx moreg"])
def test_ulysses_output_equals_the_single_process_output(ranks, scenario):
    for outcome in ranks:
        result = outcome[scenario]
        # Ulysses on the native backend attends over every token on every rank: the same numbers, bit for bit
        assert result["identical"], f"max difference {result['max_difference']:.3g} of {result['scale']:.3g}"


@pytest.mark.parametrize("scenario", ["wan moreg", "ltx moreg"])
def test_moreg_pairs_frames_across_the_shard_boundary(ranks, scenario):
    for outcome in ranks:
        whole, sharded = outcome[scenario]["motion"]
        assert any(m is not None for m in whole)
        for a, b in zip(whole, sharded):
            assert (a is None and b is None) or math.isclose(a, b, rel_tol=1e-3)  # m = (raw / norm) ** 8


@pytest.mark.parametrize("layout", ["between frames", "inside a frame", "uneven inside",
                                    "slice shorter than the stride",
                                    *(f"{name}, scale-free" for name in ("between frames", "inside a frame",
                                                                         "uneven inside"))])
def test_sharded_motion_sums_equal_the_whole(ranks, layout):
    for outcome in ranks:
        for reduced_change, reduced_base, change, base in outcome["reduction"][layout]:
            assert math.isclose(reduced_change, change, rel_tol=1e-12)
            assert math.isclose(reduced_base, base, rel_tol=1e-12)


def test_ranks_on_either_side_of_a_threshold_decide_alike(ranks):
    local_rates = [outcome["reduction"]["threshold"]["local"] for outcome in ranks]
    assert local_rates == [3, 1]  # alone, the ranks would disagree (and the next step would hang)
    for outcome in ranks:
        threshold = outcome["reduction"]["threshold"]
        assert threshold["sharded"][0] == threshold["whole"][0] == 1
        assert math.isclose(threshold["sharded"][1], threshold["whole"][1], rel_tol=1e-6)


def test_each_video_of_a_batch_takes_its_single_process_steps_under_ulysses(ranks):
    """Per-video schedules under Ulysses 2 (MoReg on): each video computes the steps it computes on one process, the
    two videos' schedules differ (the split calls ran on both ranks alike), the outputs are the same, and AdaCache
    adds at most one all-reduce per call of the transformer."""
    for outcome in ranks:
        videos = outcome["videos"]
        for whole, sharded in videos["computed"]:
            assert whole == sharded
        assert videos["computed"][0][0] != videos["computed"][1][0]
        for whole, sharded in videos["distances"]:
            assert all((a is None and b is None) or math.isclose(a, b, rel_tol=1e-4) for a, b in zip(whole, sharded))
        assert videos["identical"], videos["max_difference"]
        assert max(videos["all_reduces_per_call"]) == 1 and videos["all_reduces_per_call"][0] == 0
    assert ranks[0]["videos"]["distances"] == ranks[1]["videos"]["distances"]


def test_a_residual_non_finite_on_one_ranks_slice_makes_every_rank_recompute_that_video(ranks):
    """Video 1's residual is NaN on rank 1's slice only: both ranks drop that video's cache and compute its next
    step, video 0 keeps its schedule, and nothing hangs."""
    assert ranks[0]["non-finite on one rank"] == ranks[1]["non-finite on one rank"]
    (video0, steps0, noted0), (video1, steps1, noted1) = ranks[0]["non-finite on one rank"]
    assert (video0, video1) == (0, 1) and not noted0 and noted1
    assert steps0 == [1, 2, 5, 6] and steps1[:3] == [1, 2, 3]


def test_enabling_parallelism_before_adacache_is_refused(ranks):
    for outcome in ranks:
        message = outcome["wrong order"]
        assert "blocks.0" in message and "Apply AdaCache first" in message, message


# --- the private diffusers names parallel.py relies on (no processes needed) -----------------------------------------
def test_compat_context_parallel_names_match_diffusers():
    import dataclasses

    from diffusers import ContextParallelConfig
    from diffusers.hooks import context_parallel

    from adacache import compat
    from adacache.testing import tiny_model

    model = tiny_model("wan").build(seed=0)
    assert compat.context_parallel_config(model) is None  # ModelMixin._parallel_config, None until enabled
    assert not compat.has_context_parallel_hook(model.blocks[0])
    for template in (context_parallel._CONTEXT_PARALLEL_INPUT_HOOK_TEMPLATE,
                     context_parallel._CONTEXT_PARALLEL_OUTPUT_HOOK_TEMPLATE):
        assert template.format("blocks.0").startswith(compat._CONTEXT_PARALLEL_HOOK_PREFIXES)
    fields = {f.name for f in dataclasses.fields(ContextParallelConfig)}
    assert {"_flattened_mesh", "ulysses_anything", "ring_anything"} <= fields
    with pytest.raises(RuntimeError, match="no device mesh"):
        compat.context_parallel_group(ContextParallelConfig(ulysses_degree=2))


# --- the command line under torchrun (the embedded model, CPU, gloo) --------------------------------------------------
def _torchrun(args: list[str], cwd) -> str:
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(WORLD), "-m", "adacache.cli",
               *args]
    done = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=DEADLINE_S)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout


def test_generate_under_torchrun_reports_the_single_process_result(tmp_path):
    """`adacache generate --context-parallel ulysses` on two processes: one report (rank 0's) and one video, with the
    computed steps and the PSNR of the same command on one process."""
    from adacache.cli import main

    args = ["generate", "a green triangle moving left fast", "--steps", "12", "--compare", "--no-progress"]
    sharded = _torchrun([*args, "-o", "cp.mp4", "--context-parallel", "ulysses"], tmp_path)
    assert sharded.count("computed") == 1 and "ulysses over 2 processes" in sharded
    import contextlib
    import io

    whole = io.StringIO()
    with contextlib.redirect_stdout(whole):
        assert main([*args, "-o", str(tmp_path / "one.mp4")]) == 0

    def lines(text, start):
        return [line.strip() for line in text.splitlines() if line.strip().startswith(start)]

    assert lines(sharded, "cond_uncond") == lines(whole.getvalue(), "cond_uncond")
    assert lines(sharded, "PSNR") == lines(whole.getvalue(), "PSNR")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cp.mp4", "one.mp4"]


def test_bench_under_torchrun_runs_every_video_on_both_processes(tmp_path):
    """`adacache bench --context-parallel ulysses`: rank 0 writes the records and the report; the peers that cannot
    run inside the split are left out of the default comparison."""
    import json

    out = _torchrun(["bench", "--num-prompts", "1", "--seeds", "0", "--steps", "10", "--warmup", "0", "--no-flops",
                     "--context-parallel", "ulysses", "-o", "b", "--no-progress"], tmp_path)
    assert out.count("| auto | AdaCache") == 1
    records = [json.loads(line) for line in (tmp_path / "b" / "records.rank0.jsonl").read_text().splitlines()]
    assert {r["method"] for r in records} >= {"none", "auto", "static:2"} and all(r["status"] == "ok" for r in records)
    assert not any(r["method"].startswith(("fbc", "dbcache")) for r in records)
    assert sorted(p.name for p in (tmp_path / "b").glob("records.rank*")) == ["records.rank0.jsonl"]
    assert json.loads((tmp_path / "b" / "run.json").read_text())["context_parallel"] == "ulysses"


def _frozen_peer_worker(rank: int, port: int, timeout: float, results) -> None:
    """One of two processes in `parallel.process_group(timeout)`: rank 1 is frozen (sleeps past the timeout without
    joining the collective), rank 0 all-reduces and reports what it raised."""
    import os

    os.environ.update(WORLD_SIZE=str(WORLD), RANK=str(rank), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    import torch.distributed as dist

    from adacache.parallel import process_group

    started = time.monotonic()
    try:
        with process_group(timeout) as joined:
            assert joined == rank
            if rank == 1:
                time.sleep(timeout + 4)
            else:
                dist.all_reduce(torch.ones(1))
        results.put((rank, "finished", time.monotonic() - started))
    except BaseException as error:  # noqa: BLE001 - reported to the parent
        results.put((rank, f"{type(error).__name__}: {error}", time.monotonic() - started))


def test_a_frozen_peer_ends_the_process_group_with_one_line_after_its_timeout(tmp_path):
    """`process_group(timeout)`, as `--rank-timeout` gives it: the process waiting for a frozen one raises
    RankTimeout (a TimeoutError, one line naming the process and the timeout) once the timeout passes."""
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    context = multiprocessing.get_context("spawn")
    results = context.Queue()
    timeout = 2.0
    workers = [context.Process(target=_frozen_peer_worker, args=(rank, port, timeout, results), daemon=True)
               for rank in range(WORLD)]
    for worker in workers:
        worker.start()
    try:
        outcome = {}
        while 0 not in outcome:
            rank, message, seconds = results.get(timeout=DEADLINE_S)
            outcome[rank] = (message, seconds)
    finally:
        for worker in workers:  # rank 1 is still "frozen": no need to wait for it (or for rank 0's exit)
            worker.kill()
            worker.join()
    message, _ = outcome[0]
    assert message.startswith("RankTimeout: process 0 of 2 waited 2 s for the others (--rank-timeout): one of them "
                              "is frozen or stopped"), message
    assert "\n" not in message and "Timed out waiting 2000ms" in message


@pytest.mark.slow
def test_a_frozen_process_ends_the_others_with_one_line_after_the_rank_timeout(tmp_path):
    """`adacache generate --context-parallel ulysses --rank-timeout 5` on two processes, rank 1 frozen at its third
    transformer call (tests/frozen_rank.py): rank 0 waits 5 s in the attention's all-to-all, then stops with one
    `adacache: error:` line naming the timeout (exit 1, no traceback); the launcher then ends rank 1. The default
    users get is pipelines.RANK_TIMEOUT_S (600 s)."""
    import os
    import pathlib
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
    env["FROZEN_RANK"] = "1"
    script = pathlib.Path(__file__).with_name("frozen_rank.py")
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(WORLD), str(script), "generate",
               "a red circle moving left fast", "--steps", "4", "--cache", "none", "--no-progress", "-o", "f.mp4",
               "--context-parallel", "ulysses", "--rank-timeout", "5"]
    started = time.monotonic()
    done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=DEADLINE_S)
    output = done.stdout + done.stderr
    errors = [line for line in output.splitlines() if line.startswith("adacache: error:")]
    assert done.returncode != 0 and len(errors) == 1, output[-3000:]
    assert "process 0 of 2 waited 5 s for the others (--rank-timeout): one of them is frozen" in errors[0]
    assert "[rank0]: Traceback" not in output, output[-3000:]  # how torchrun shows a worker's uncaught error
    assert "exitcode  : 1 " in output and not (tmp_path / "f.mp4").exists()
    assert time.monotonic() - started < DEADLINE_S


@pytest.mark.parametrize("argv, world, message", [
    (["generate", "a red circle", "--context-parallel", "ulysses"], "1", "launch it with torchrun"),
    (["generate", "a red circle"], "2", "add --context-parallel ulysses"),
    (["bench", "--context-parallel", "ulysses", "--methods", "none,fbc:0.1"], "2", "leave out fbc:0.1"),
    # ring on a CPU: refused before the model loads or the processes meet, under torchrun or not
    (["generate", "a red circle", "--context-parallel", "ring"], "2", "ring needs a GPU"),
    (["generate", "a red circle", "--context-parallel", "ring"], "1", "ring needs a GPU"),
    (["bench", "--context-parallel", "ring"], "2", "log-sum-exp"),
    (["generate", "a red circle", "--rank-timeout", "5"], "1", "without --context-parallel it would do nothing"),
])
def test_context_parallel_options_that_cannot_work_are_refused(argv, world, message, monkeypatch, capsys, tmp_path):
    import adacache.pipelines
    from adacache.cli import main

    monkeypatch.setenv("WORLD_SIZE", world)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # as on a CPU-only host
    monkeypatch.setattr(adacache.pipelines, "load_pipeline", lambda *a, **k: pytest.fail("the model loaded first"))
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    assert message in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_ring_on_a_cpu_model_is_refused_before_parallelism_is_enabled():
    """The library road: enable_context_parallel refuses Ring on a CPU model with the reason, before it asks for
    the process group (none here) or changes the model."""
    from adacache.parallel import enable_context_parallel
    from adacache.testing import tiny_model

    model = tiny_model("wan").build(seed=0)
    with pytest.raises(ValueError, match="log-sum-exp.*WanTransformer3DModel is on the cpu; use Ulysses"):
        enable_context_parallel(None, "ring", [model])
    from adacache import compat

    assert compat.context_parallel_config(model) is None
