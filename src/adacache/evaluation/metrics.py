"""What a benchmark measures of one generation: quality against the uncached video of the same seed (PSNR,
PSNR over the object's pixels for videos of one object on black, SSIM, LPIPS when its weights are local), the
transformer's FLOPs (torch's FLOP counter), the denoising loop's wall time, and the memory the cache holds.

Videos are float arrays (T, H, W, 3) in [0, 1].
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from typing import Any, Iterable, Iterator

import numpy as np
import torch

from .. import compat

logger = logging.getLogger(__name__)


# --- quality ------------------------------------------------------------------------------------------------------
def psnr(reference: np.ndarray, other: np.ndarray, peak: float = 1.0) -> float:
    """Peak signal-to-noise ratio in dB, 10 log10(peak^2 / MSE), the one PSNR of the package; inf for identical
    inputs (NaN if either has NaN). `peak` is the largest possible difference: 1.0 for videos in [0, 1] (uint8
    frames are divided by 255 first); for values without a fixed range (the demo's latents) the caller states one,
    e.g. the reference's max - min."""
    mse = float(np.mean((np.asarray(reference, np.float64) - np.asarray(other, np.float64)) ** 2))
    return math.inf if mse == 0 else 10 * math.log10(peak**2 / mse)


OBJECT_THRESHOLD = 0.05  # a reference pixel belongs to the object where any channel exceeds this (0..1 scale)


def object_mask(reference: np.ndarray, threshold: float = OBJECT_THRESHOLD, dilate: int = 1) -> np.ndarray:
    """Boolean (T, H, W): where the video shows the object against a black background.

    A pixel is the object's where any channel of `reference` exceeds `threshold`; the mask is then dilated by
    `dilate` pixels in each frame on its own (a 3 x 3 square per pixel for 1: the 8 neighbours, edges not wrapped),
    so the object's faint anti-aliased edge, and a cached video's error just outside it, are counted. Frames are
    not dilated into each other. `reference` is a float video (T, H, W, 3) in [0, 1], as for `psnr`."""
    video = _float_video(reference, "reference")
    if not 0 <= threshold < 1:
        raise ValueError(f"threshold is a level in [0, 1) on the [0, 1] pixel scale, got {threshold!r}")
    if not (isinstance(dilate, int) and dilate >= 0):
        raise ValueError(f"dilate is a number of pixels >= 0, got {dilate!r}")
    core = (video > threshold).any(axis=-1)  # (T, H, W)
    if not dilate:
        return core
    frames, height, width = core.shape
    padded = np.pad(core, ((0, 0), (dilate, dilate), (dilate, dilate)))
    mask = np.zeros_like(core)
    for dy in range(2 * dilate + 1):
        for dx in range(2 * dilate + 1):
            mask |= padded[:, dy:dy + height, dx:dx + width]
    return mask


def object_psnr(reference: np.ndarray, other: np.ndarray, threshold: float = OBJECT_THRESHOLD,
                dilate: int = 1) -> float | None:
    """PSNR in dB over the object's pixels only: the mean squared error over every channel of the pixels in
    `object_mask(reference, threshold, dilate)`, all frames together. The mask comes from the reference (the
    uncached video) alone, so a cached video cannot shrink it. inf where those pixels are identical (as `psnr`; a
    report counts it as its PSNR cap); None where the mask is empty (an all-black reference has no object).

    Same inputs as `psnr`: float videos (T, H, W, 3) in [0, 1] (normalise a pipeline's output with `as_video`);
    integer frames (0..255) are refused, since the threshold is on the [0, 1] scale."""
    a, b = _float_video(reference, "reference"), _float_video(other, "other")
    if a.shape != b.shape:
        raise ValueError(f"videos differ in shape: {a.shape} vs {b.shape}")
    mask = object_mask(a, threshold, dilate)
    if not mask.any():
        return None
    mse = float(np.mean((a[mask] - b[mask]) ** 2))  # (pixels, 3)
    return math.inf if mse == 0 else 10 * math.log10(1.0 / mse)


def background_share(video: np.ndarray, threshold: float = OBJECT_THRESHOLD, dilate: int = 1) -> float:
    """The share of the video's pixels (over all frames) outside `object_mask(video, threshold, dilate)`: 1.0 for
    an all-black video."""
    return 1.0 - float(object_mask(video, threshold, dilate).mean())


def _float_video(video: np.ndarray, name: str) -> np.ndarray:
    """`video` as float64 (T, H, W, 3), or an error that says what was expected."""
    video = np.asarray(video)
    if not np.issubdtype(video.dtype, np.floating):
        raise ValueError(f"{name} has dtype {video.dtype}; expected floats in [0, 1] (as_video normalises a "
                         "pipeline's output)")
    if video.ndim != 4 or video.shape[-1] != 3:
        raise ValueError(f"{name} has shape {video.shape}; expected a video (T, H, W, 3)")
    return video.astype(np.float64)


def ssim(reference: np.ndarray, other: np.ndarray, window: int = 11, sigma: float = 1.5) -> float:
    """Mean structural similarity (Wang et al. 2004: Gaussian window 11, sigma 1.5, K1 0.01, K2 0.03, data range
    1) over frames and channels, on the valid region. Frames smaller than the window use the largest odd window
    that fits."""
    a, b = (torch.as_tensor(np.asarray(v, np.float64)).permute(0, 3, 1, 2) for v in (reference, other))  # (T,3,H,W)
    if a.shape != b.shape:
        raise ValueError(f"videos differ in shape: {tuple(a.shape)} vs {tuple(b.shape)}")
    size = min(window, a.shape[-1], a.shape[-2])
    size -= 1 - size % 2
    x = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-(x**2) / (2 * sigma**2))
    g = g / g.sum()
    kernel = (g[:, None] * g[None, :]).expand(a.shape[1], 1, size, size)

    def blur(v: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.conv2d(v, kernel, groups=a.shape[1])

    c1, c2 = 0.01**2, 0.03**2
    mu_a, mu_b = blur(a), blur(b)
    var_a = blur(a * a) - mu_a**2
    var_b = blur(b * b) - mu_b**2
    cov = blur(a * b) - mu_a * mu_b
    index = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2))
    return float(index.mean())


def as_video(frames: Any) -> np.ndarray:
    """One video from a pipeline's output, whatever its output_type: a float tensor (T, C, H, W) or (T, H, W, C) in
    [0, 1], a float or uint8 array, or a list of PIL images (0..255). Returns float32 (T, H, W, 3) in [0, 1]."""
    if isinstance(frames, torch.Tensor):
        frames = frames.detach().float().cpu().numpy()
    elif isinstance(frames, (list, tuple)):
        frames = np.stack([np.asarray(frame) for frame in frames])
    frames = np.asarray(frames)
    integer = np.issubdtype(frames.dtype, np.integer)  # before any cast: uint8 and PIL frames are 0..255
    video = frames.astype(np.float32) / 255.0 if integer else frames.astype(np.float32)
    if video.ndim == 4 and video.shape[-1] not in (1, 3) and video.shape[1] in (1, 3):
        video = video.transpose(0, 2, 3, 1)  # (T, C, H, W) -> (T, H, W, C)
    return video


def frame_motion(video: np.ndarray) -> float:
    """Mean absolute change between consecutive frames (a model-agnostic measure of how much a video moves)."""
    video = np.asarray(video, np.float64)
    return float(np.abs(np.diff(video, axis=0)).mean()) if len(video) > 1 else 0.0


class LPIPS:
    """LPIPS (AlexNet) from the `lpips` package, used only when it and its weights load without a download.
    `available` tells whether it loaded; `reason` says why not and how to enable it."""

    def __init__(self) -> None:
        self.model, self.reason = None, None
        try:
            import lpips  # noqa: F401
        except ImportError:
            self.reason = "the lpips package is not installed (pip install lpips; AlexNet weights must be cached locally)"
            return
        try:
            import lpips

            with _no_downloads():
                self.model = lpips.LPIPS(net="alex", verbose=False).eval()
        except Exception as error:  # noqa: BLE001 - any failure to load means: not available, and say why
            self.reason = (
                f"LPIPS weights could not be loaded offline ({type(error).__name__}: {str(error)[:160]}); put "
                "torchvision's AlexNet weights in the torch hub cache (TORCH_HOME) to enable it"
            )

    @property
    def available(self) -> bool:
        return self.model is not None

    @torch.no_grad()
    def __call__(self, reference: np.ndarray, other: np.ndarray) -> float | None:
        if self.model is None:
            return None
        a, b = (torch.as_tensor(np.asarray(v, np.float32)).permute(0, 3, 1, 2) * 2 - 1 for v in (reference, other))
        return float(self.model(a, b).mean())


@contextlib.contextmanager
def _no_downloads() -> Iterator[None]:
    """Make torch.hub downloads fail at once instead of waiting on a network that is not there."""
    import torch.hub

    original = torch.hub.download_url_to_file

    def refuse(url, *args, **kwargs):
        raise RuntimeError(f"download refused (offline): {url}")

    torch.hub.download_url_to_file = refuse
    try:
        yield
    finally:
        torch.hub.download_url_to_file = original


# --- compute, time and memory ------------------------------------------------------------------------------------
class TransformerMeter:
    """Hooks on a pipeline's transformers that measure, per generation, the denoising loop's wall time (from the
    start of the first transformer call to the end of the last: text encoding and decoding are excluded) and, when
    `count_flops`, the FLOPs the transformers execute (torch.utils.flop_counter, exact for what runs)."""

    def __init__(self, transformers: list[torch.nn.Module]) -> None:
        self.transformers = transformers
        self.count_flops = False
        self.first: float | None = None
        self.last: float | None = None
        self.flops = 0
        self.calls = 0
        self._mode = None
        self._handles: list[Any] = []
        self._cuda = any(p.is_cuda for t in transformers for p in t.parameters())

    def __enter__(self) -> "TransformerMeter":
        for model in self.transformers:
            self._handles.append(model.register_forward_pre_hook(self._before, prepend=True))
            self._handles.append(model.register_forward_hook(self._after, always_call=True))
        return self

    def __exit__(self, *exc: Any) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        if self._mode is not None:  # a call that raised inside the counter
            self._mode.__exit__(None, None, None)
            self._mode = None

    def reset(self, count_flops: bool = False) -> None:
        self.first = self.last = None
        self.flops, self.calls, self.count_flops = 0, 0, count_flops

    @property
    def seconds(self) -> float:
        return 0.0 if self.first is None else self.last - self.first

    def _before(self, module: torch.nn.Module, args: Any) -> None:
        if self.first is None:
            if self._cuda:
                torch.cuda.synchronize()
            self.first = time.perf_counter()
        if self.count_flops and self._mode is None:
            self._mode = total_flop_counter()
            self._mode.__enter__()

    def _after(self, module: torch.nn.Module, args: Any, output: Any) -> None:
        if self._mode is not None:
            self._mode.__exit__(None, None, None)
            self.flops += self._mode.get_total_flops()
            self._mode = None
        if self._cuda:
            torch.cuda.synchronize()
        self.last = time.perf_counter()
        self.calls += 1


class _TotalOnly:
    """Stands in for FlopCounterMode's module tracker, so that FLOPs are counted in total only ("Global", where the
    tracker always counts too). The tracker names every module it sees by walking its children, which never ends
    on a module graph with a cycle: cache-dit's cached blocks hold their transformer as a child module, and the
    transformer holds them while it runs. The total needs no names."""

    parents = frozenset({"Global"})

    def __enter__(self) -> "_TotalOnly":
        return self

    def __exit__(self, *exc: Any) -> None:
        return None


def total_flop_counter() -> Any:
    """torch's FlopCounterMode (not displaying), counting the total only (see `_TotalOnly`); enter it around the
    work and read `get_total_flops()`. It replaces the mode's `mod_tracker`, a private attribute: a torch that
    renamed it is an error here, and tests/test_bench.py checks the count on a module graph with a cycle."""
    from torch.utils.flop_counter import FlopCounterMode

    mode = FlopCounterMode(display=False)
    if not hasattr(mode, "mod_tracker"):
        raise RuntimeError(f"torch {torch.__version__}'s FlopCounterMode has no mod_tracker to replace; update "
                           "adacache.evaluation.metrics.total_flop_counter for this torch")
    mode.mod_tracker = _TotalOnly()
    return mode


def held_tensor_bytes(model: torch.nn.Module) -> int:
    """Bytes of the tensors that diffusers hooks on `model` and its submodules hold in their state (what a cache
    keeps between steps), each storage counted once. Parameters and buffers of the model are not counted."""
    return state_tensor_bytes([vars(hook) for registry in compat.hook_registries(model)
                               for hook in compat.hooks_of(registry).values()], model)


def state_tensor_bytes(states: Iterable[Any], model: torch.nn.Module, max_depth: int = 6) -> int:
    """Bytes of the tensors reachable from each of `states` (through dicts, lists, tuples, sets and plain objects'
    attributes, `max_depth` levels deep; modules are not entered), each storage counted once, leaving out `model`'s
    own parameters and buffers: the memory a cache's state holds besides the model."""
    seen: set[int] = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen |= {b.untyped_storage().data_ptr() for b in model.buffers()}
    total = 0

    def visit(value: Any, depth: int) -> None:
        nonlocal total
        if depth > max_depth:
            return
        if isinstance(value, torch.Tensor):
            pointer = value.untyped_storage().data_ptr()
            if pointer not in seen:
                seen.add(pointer)
                total += value.untyped_storage().nbytes()
        elif isinstance(value, dict):
            for item in value.values():
                visit(item, depth + 1)
        elif isinstance(value, (list, tuple, set)):
            for item in value:
                visit(item, depth + 1)
        elif hasattr(value, "__dict__") and not isinstance(value, (torch.nn.Module, type)):
            for item in vars(value).values():
                visit(item, depth + 1)

    for state in states:
        visit(state, 0)
    return total
