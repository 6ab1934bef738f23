"""What a benchmark measures of one generation: quality against the uncached video of the same seed (PSNR,
SSIM, LPIPS when its weights are local), the transformer's FLOPs (torch's FLOP counter), the denoising loop's wall
time, and the memory the cache holds.

Videos are float arrays (T, H, W, 3) in [0, 1].
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from typing import Any, Iterator

import numpy as np
import torch

from .. import compat

logger = logging.getLogger(__name__)


# --- quality ------------------------------------------------------------------------------------------------------
def psnr(reference: np.ndarray, other: np.ndarray) -> float:
    """Peak signal-to-noise ratio in dB for values in [0, 1]; inf for identical videos (NaN if either has NaN)."""
    mse = float(np.mean((np.asarray(reference, np.float64) - np.asarray(other, np.float64)) ** 2))
    return math.inf if mse == 0 else 10 * math.log10(1.0 / mse)


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
            from torch.utils.flop_counter import FlopCounterMode

            self._mode = FlopCounterMode(display=False)
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


def held_tensor_bytes(model: torch.nn.Module) -> int:
    """Bytes of the tensors that diffusers hooks on `model` and its submodules hold in their state (what a cache
    keeps between steps), each storage counted once. Parameters and buffers of the model are not counted."""
    seen: set[int] = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen |= {b.untyped_storage().data_ptr() for b in model.buffers()}
    total = 0

    def visit(value: Any, depth: int) -> None:
        nonlocal total
        if depth > 6:
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

    for registry in compat.hook_registries(model):
        for hook in compat.hooks_of(registry).values():
            visit(vars(hook), 0)
    return total
