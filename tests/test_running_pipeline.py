"""The step count, the step and the CFG branch come from the pipeline that is running the call (issue 20, items 4
and 6), found on the stack whichever pipeline AdaCache was applied to.

Before issue 20 (measured on these tiny pipelines): per-token timesteps (Wan 2.2 TI2V's `expand_timesteps`, LTX's
condition pipeline) left the step count unknown, so only steps [1, 2] were computed with a permissive codebook and
the note told the user to apply to the pipeline, which they had; a video-to-video pipeline made with `from_pipe`
counted its strength-truncated loop as the last steps of the whole schedule (steps 5..10 of 10 for 6 calls), and
with a scheduler of its own had no step count at all; Latte with Heun's scheduler read each repeated timestep as a
second CFG branch ("default.1"); two prompts from the same noise without CFG were paired as one video's CFG halves
(equal latents in the two halves of the batch), each getting the other's schedule.
"""


import numpy as np
import pytest
import torch
from PIL import Image

from adacache import AdaCacheConfig, apply_adacache, get_stats, remove_adacache
from adacache.hooks.running import find_running

from tiny_pipelines import TINY_PIPELINE_CALL, ftfy_stand_in, load_tiny_pipeline, saved_once

SKIP_ALL = AdaCacheConfig(codebook={1e9: 100})  # computes steps 1, 2, N-1 and N where N is known
ALWAYS_COMPUTE = AdaCacheConfig(codebook={1e9: 1})
PROMPTS = ["a red circle moving left", "a blue square standing still"]


@pytest.fixture(autouse=True, scope="module")
def _setup():
    """One thread (tiny tensors); ftfy stood in for where a pipeline calls it without it installed."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with ftfy_stand_in():
        yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """tiny(kind): a fresh tiny pipeline of `kind`, built once per module and loaded anew each time."""
    folder = saved_once(tmp_path_factory.mktemp)
    return lambda kind: load_tiny_pipeline(folder(kind))


def call(kind, **overrides):
    """The kind's tiny call arguments, with `overrides` (None removes an argument)."""
    merged = {**TINY_PIPELINE_CALL[kind], **overrides}
    return {key: value for key, value in merged.items() if value is not None}


def summary(stats):
    """(branch, steps seen, step count, computed steps, notes) per generation, in order."""
    return [(s.branch, s.steps_seen, s.num_steps, s.computed_steps, s.notes) for s in stats]


def forced(branches, n):
    """What SKIP_ALL computes over an n-step generation of each branch, with no note."""
    return [(branch, n, n, [1, 2, n - 1, n], []) for branch in branches]


def wan_video_to_video(base, **components):
    from diffusers import WanVideoToVideoPipeline

    pipe = WanVideoToVideoPipeline.from_pipe(base, **components)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def still_video(size, frames=9):
    return [Image.fromarray(np.full((size, size, 3), 128, np.uint8))] * frames


def video_to_video(pipe, steps, strength, prompt=PROMPTS[0], seed=0, **overrides):
    generator = [torch.Generator().manual_seed(seed) for _ in prompt] if isinstance(prompt, list) else \
        torch.Generator().manual_seed(seed)
    return pipe(prompt=prompt, video=still_video(32), num_inference_steps=steps, strength=strength,
                generator=generator, **call("wan", num_frames=None, **overrides)).frames


# --- item 4: the right step count and branch --------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["wan_ti2v", "ltx_condition"])
def test_per_token_timesteps_force_the_last_two_steps(kind, tiny):
    """Wan 2.2 TI2V (`expand_timesteps`: one timestep per token, 0 on the clean first frame) and LTX's condition
    pipeline (0 on the conditioning tokens): the loop tells the count, so steps N-1 and N are computed."""
    if kind == "wan_ti2v":
        from diffusers import WanImageToVideoPipeline

        pipe = WanImageToVideoPipeline.from_pipe(tiny("wan"), expand_timesteps=True)
        run = dict(image=Image.fromarray(np.zeros((32, 32, 3), np.uint8)), **call("wan"))
        branches = ["cond", "uncond"]
    else:
        from diffusers import FlowMatchEulerDiscreteScheduler, LTXConditionPipeline
        from diffusers.pipelines.ltx.pipeline_ltx_condition import LTXVideoCondition

        # the condition pipeline passes its own timesteps, which a dynamically shifted scheduler refuses
        pipe = LTXConditionPipeline.from_pipe(tiny("ltx_video"), scheduler=FlowMatchEulerDiscreteScheduler())
        image = Image.fromarray(np.zeros((64, 64, 3), np.uint8))
        run = dict(conditions=[LTXVideoCondition(image=image, frame_index=0)], **call("ltx_video"))
        branches = ["cond_uncond"]
    pipe.set_progress_bar_config(disable=True)
    timesteps = []
    handle = pipe.transformer.register_forward_pre_hook(
        lambda module, args, kwargs: timesteps.append(kwargs["timestep"]), with_kwargs=True)
    apply_adacache(pipe, SKIP_ALL)
    try:
        pipe(prompt=PROMPTS[0], num_inference_steps=6, generator=torch.Generator().manual_seed(0), **run)
        stats = get_stats(pipe)
    finally:
        handle.remove()
        remove_adacache(pipe)
    assert timesteps[0].numel() > timesteps[0].shape[0] and float(timesteps[0].min()) == 0.0  # per token
    assert summary(stats) == forced(branches, 6)


def test_strength_and_pipelines_sharing_the_transformer_each_count_their_own_loop(tiny):
    """A video-to-video pipeline made with from_pipe (sharing the transformer and the scheduler) runs the last 6 of
    10 steps at strength 0.6: a 6-step generation; the text-to-video pipeline AdaCache was applied to then runs 5;
    a video-to-video pipeline with a scheduler of its own (UniPC) runs 7 of 10."""
    from diffusers import UniPCMultistepScheduler

    base = tiny("wan")
    shared = wan_video_to_video(base)
    own = wan_video_to_video(base, scheduler=UniPCMultistepScheduler(
        prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0))
    apply_adacache(base, SKIP_ALL)
    try:
        video_to_video(shared, steps=10, strength=0.6)
        base(PROMPTS[0], num_inference_steps=5, generator=torch.Generator().manual_seed(0), **call("wan"))
        video_to_video(own, steps=10, strength=0.7)
        stats = get_stats(base)
    finally:
        remove_adacache(base)
    # the video-to-video pipeline opens no cache context: its cond and uncond calls are branches default, default.1
    assert summary(stats) == forced(["default", "default.1"], 6) + forced(["cond", "uncond"], 5) + forced(
        ["default", "default.1"], 7)


def second_order(name):
    import diffusers

    if name == "DPMSolverSDEScheduler":
        pytest.importorskip("torchsde", reason="DPMSolverSDEScheduler needs torchsde")
    return getattr(diffusers, name)


# (pipeline, scheduler): every scheduler diffusers ships with order 2, on pipelines that call the transformer with
# no cache context (Latte: batched CFG; Wan video-to-video: CFG as two calls), a named one (CogVideoX, SkyReels-V2)
# and one with the step index (Wan). (LTX, HunyuanVideo and Mochi pass sigmas, which FlowMatchHeun refuses.)
SECOND_ORDER = [
    ("latte", "HeunDiscreteScheduler"),
    ("latte", "KDPM2DiscreteScheduler"),
    ("latte", "KDPM2AncestralDiscreteScheduler"),
    ("latte", "DPMSolverSDEScheduler"),
    ("cogvideox", "HeunDiscreteScheduler"),
    ("skyreels_v2", "FlowMatchHeunDiscreteScheduler"),
    ("wan", "FlowMatchHeunDiscreteScheduler"),
    ("wan_v2v", "FlowMatchHeunDiscreteScheduler"),
]
BRANCHES = {"latte": ["default"], "cogvideox": ["cond_uncond"], "skyreels_v2": ["cond", "uncond"],
            "wan": ["cond", "uncond"], "wan_v2v": ["default", "default.1"]}


@pytest.mark.parametrize("kind, scheduler", SECOND_ORDER)
def test_second_order_schedulers_count_every_evaluation_in_one_branch(kind, scheduler, tiny):
    """A second-order scheduler calls the model twice per step for all but the last (2N - 1 loop iterations, the
    second at a repeated or interpolated timestep): one generation of 2N - 1 steps per CFG branch, the last two
    forced. Before: with no cache context (Latte), each repeated timestep was read as a second CFG branch."""
    pipe = tiny("wan" if kind == "wan_v2v" else kind)
    scheduler_class = second_order(scheduler)
    config = {} if scheduler.startswith("FlowMatch") else {"prediction_type": pipe.scheduler.config.prediction_type}
    pipe.scheduler = scheduler_class.from_config(pipe.scheduler.config, **config)
    apply_adacache(pipe, SKIP_ALL)
    try:
        if kind == "wan_v2v":
            running = wan_video_to_video(pipe)
            video_to_video(running, steps=4, strength=0.75)  # a truncated second-order schedule: 3 of 4 steps
        else:
            running = pipe
            pipe(PROMPTS[0], num_inference_steps=3, generator=torch.Generator().manual_seed(0), **call(kind))
        stats = get_stats(pipe)
    finally:
        remove_adacache(pipe)
    n = running.num_timesteps
    assert n == 5 and pipe.scheduler.order == 2
    assert summary(stats) == forced(BRANCHES[kind], n)


# --- item 6: CFG halves paired only where the pipeline guides in one call ----------------------------------------
def generate_pair(pipe, kind, config, which=(0, 1), **overrides):
    """PROMPTS[which] from the same noise (a generator of seed 0 each): (frames, stats)."""
    apply_adacache(pipe, config)
    try:
        out = pipe([PROMPTS[i] for i in which], num_inference_steps=6,
                   generator=[torch.Generator().manual_seed(0) for _ in which], **call(kind, **overrides))
        return torch.as_tensor(np.asarray(out.frames)), get_stats(pipe)
    finally:
        remove_adacache(pipe)


@pytest.mark.parametrize("kind", ["wan", "cogvideox", "ltx_video"])
def test_prompts_from_the_same_noise_without_cfg_are_not_paired(kind, tiny):
    """Two prompts from the same noise with guidance 1 (no CFG): the batch's halves hold equal latents, but they are
    two videos with a schedule each, and each equals its prompt alone. Before: taken for one video's CFG halves,
    each followed the other's schedule (0.01-0.03 away from the prompt alone)."""
    pipe = tiny(kind)
    _, measured = generate_pair(pipe, kind, ALWAYS_COMPUTE, guidance_scale=1.0)
    assert [(s.video, s.rows, s.paired) for s in measured] == [(0, [0], False), (1, [1], False)]
    low, high = sorted(s.distances[1] for s in measured)
    config = AdaCacheConfig(codebook={(low * high) ** 0.5: 3, 1e9: 1})
    frames, stats = generate_pair(pipe, kind, config, guidance_scale=1.0)
    assert stats[0].computed_steps != stats[1].computed_steps
    for video in (0, 1):
        alone, alone_stats = generate_pair(pipe, kind, config, which=(video,), guidance_scale=1.0)
        assert alone_stats[0].computed_steps == stats[video].computed_steps
        torch.testing.assert_close(frames[video:video + 1], alone, rtol=1e-4, atol=5e-4)


@pytest.mark.parametrize("kind", ["latte", "cogvideox"])
def test_batched_cfg_pairs_the_halves_and_the_stats_name_their_rows(kind, tiny):
    """Latte (no cache context) and CogVideoX ("cond_uncond") guide in one call on [uncond 0, uncond 1, cond 0,
    cond 1]: each video is its two rows, and the stats say so."""
    _, stats = generate_pair(tiny(kind), kind, SKIP_ALL)
    assert [(s.video, s.rows, s.paired) for s in stats] == [(0, [0, 2], True), (1, [1, 3], True)]
    assert "rows [0, 2] (CFG halves)" in str(stats[0])


def test_cfg_as_two_calls_without_a_context_is_not_paired(tiny):
    """Wan's video-to-video pipeline guides (do_classifier_free_guidance) in two calls with no cache context: two
    prompts from the same noise and video are two videos in each call, not CFG halves."""
    base = tiny("wan")
    apply_adacache(base, SKIP_ALL)
    try:
        video_to_video(wan_video_to_video(base), steps=4, strength=1.0, prompt=PROMPTS)
        stats = get_stats(base)
    finally:
        remove_adacache(base)
    assert [(s.branch, s.video, s.rows, s.paired) for s in stats] == [
        ("default", 0, [0], False), ("default", 1, [1], False), ("default.1", 0, [0], False),
        ("default.1", 1, [1], False)]


# --- finding the running pipeline ---------------------------------------------------------------------------------
def test_find_running_finds_the_nearest_pipeline_holding_the_model():
    """The nearest caller whose self holds the model (or torch.compile's wrapper of it) as transformer or
    transformer_2; not a caller holding another model; None from a loop of one's own, whose frames are then
    skipped unread."""
    model, other = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)

    class Pipeline:
        def __init__(self, **models):
            self.__dict__.update(models)

        def __call__(self, inner=None):
            return inner() if inner is not None else find_running(model, skip)

    skip = set()
    outer, inner = Pipeline(transformer=model), Pipeline(transformer=other)
    assert find_running(model, skip) is None and skip  # this test's own frames: no pipeline, remembered
    assert outer().pipeline is outer
    assert outer(lambda: inner()).pipeline is outer  # the inner one holds another model
    assert Pipeline(transformer_2=model)().pipeline is not None
    compiled = torch.compile(model)  # an OptimizedModule holding the model (nothing compiles until it is called)
    assert Pipeline(transformer=compiled)().pipeline is not None
