"""The domain's verifier (our "VBench"): recognise colour, shape, motion and temporal consistency of a clip.

:func:`verify` takes any clip of the procedural domain of :mod:`adacache.embedded.domain`: a float
tensor or array ``(T, 3, H, W)`` in [0, 1], a ``(T, H, W, 3)`` (or RGBA) uint8 array as read from a video
file, or the path of an .mp4/.gif file (read with imageio; ``pip install imageio imageio-ffmpeg``).
Frames larger than 16 x 16 are area-averaged down to 16 x 16.  It returns a :class:`ClipReport`, whose
:meth:`ClipReport.agrees_with` compares it with a caption or a :class:`~adacache.embedded.domain.ClipSpec`.

Method, frame by frame:

1. Foreground = pixels whose largest channel exceeds 0.3; the object is the largest 4-connected
   foreground component (isolated specks of noise are ignored).  Frames without foreground have no
   object.
2. Colour: the mean colour of the object's pixels, weighted by their brightness, over all frames, scaled
   so that its largest channel is 1, then the nearest palette entry (scaled the same way).
3. Coverage: each pixel of the object's component grown by one pixel (to include faint anti-aliased
   edges) is projected on the recognised colour and divided by the object's brightness (the 90th
   percentile over the object's pixels), clipped to [0, 1]; this is the fraction of the pixel the
   object covers.  The track point is the coverage-weighted centroid; for a rendered clip it is the
   shape's centroid to within 0.1 px.
4. Shape, from scale-free moments of the coverage averaged over the frames: a triangle (apex up) is
   lopsided along y (skewness of the vertical profile about -0.55; circle and square: 0); a square's
   profile along the diagonals is more peaked than along the axes (kurtosis difference about +0.58),
   a circle's is the same in every direction (0).  Triangle if the skewness is below -0.25, else
   square if the kurtosis difference is above 0.3, else circle.  These features do not depend on the
   object's size, and hold up under noise, blur and video compression.
5. Motion: least-squares velocity (px/frame) of the track over the frames where the object was found.
   Speed: below 0.25 still, below 0.75 slow, else fast (halfway between 0, 0.5 and 1 px/frame).
   Direction (when moving): the sign of the dominant velocity component (image coordinates, up =
   decreasing row).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from .domain import COLOURS, SIZE, ClipSpec, parse_caption

__all__ = ["FOREGROUND_THRESHOLD", "ClipReport", "load_clip", "verify"]

FOREGROUND_THRESHOLD = 0.3
SLOW_THRESHOLD = 0.25  # px/frame: halfway between still (0) and slow (0.5)
FAST_THRESHOLD = 0.75  # px/frame: halfway between slow (0.5) and fast (1.0)
# Shape decision thresholds on the frame-averaged moments (values measured over thousands of clips):
# vertical skewness: triangle -0.52 .. -0.61 rendered, -0.31 .. -0.64 after a 16-px mp4 round trip;
# circle and square within +-0.02 rendered, +-0.14 after mp4.
TRIANGLE_SKEW = -0.25
# diagonal minus axial kurtosis: square +0.54 .. +0.64 rendered, +0.33 .. +0.64 after mp4; circle and
# triangle -0.11 .. +0.05 rendered, -0.19 .. +0.28 after mp4 (4:2:0 chroma blocks make red and blue
# circles a little square-like).
SQUARE_KURTOSIS = 0.3

_PALETTE = np.array(list(COLOURS.values()), dtype=np.float64)
_PALETTE_NORM = _PALETTE / _PALETTE.max(axis=1, keepdims=True)


@dataclass
class ClipReport:
    """What :func:`verify` recognised in a clip.

    ``colour`` and ``shape`` are None when no object was found in any frame.  ``direction`` is None for
    a still clip.  ``track`` holds the object's centroid ``(x, y)`` per frame (None where none was found)
    and ``velocity`` the fitted displacement per frame ``(vx, vy)``.

    ``consistency`` in [0, 1] is the mean of three terms, each 1 for a perfect clip:

    * presence: the fraction of frames in which an object was found;
    * area stability: ``1 - min(1, std / mean)`` of the object's area (sum of coverage, in px) over
      the frames where it was found, so flicker in size or brightness lowers it;
    * colour stability: ``1 - min(1, 2 * mean distance)`` between each frame's object colour (scaled
      to a largest channel of 1) and their mean; two palette colours are at least 1 apart, so an
      object whose colour switches half of the time scores 0.

    The area and colour terms are 0 when no object was found.
    """

    colour: str | None
    shape: str | None
    direction: str | None
    speed: str
    track: list[tuple[float, float] | None]
    consistency: float
    velocity: tuple[float, float] = (0.0, 0.0)
    features: dict[str, float] = field(default_factory=dict)

    def caption(self) -> str | None:
        """The domain caption of what was recognised, or None if no object was found."""
        if self.colour is None or self.shape is None:
            return None
        if self.direction is None:
            return f"a {self.colour} {self.shape} standing still"
        return f"a {self.colour} {self.shape} moving {self.direction} {self.speed}"

    def agrees_with(self, caption_or_spec: str | ClipSpec | dict) -> dict[str, bool]:
        """Per attribute (colour, shape, direction, speed): whether the clip shows what was asked.

        For a still prompt, direction agrees when no direction was recognised (``direction is None``).
        """
        if isinstance(caption_or_spec, ClipSpec):
            want = {
                "colour": caption_or_spec.colour,
                "shape": caption_or_spec.shape,
                "direction": caption_or_spec.direction,
                "speed": caption_or_spec.speed,
            }
        elif isinstance(caption_or_spec, dict):
            want = caption_or_spec
        else:
            want = parse_caption(caption_or_spec)
        return {
            "colour": self.colour == want["colour"],
            "shape": self.shape == want["shape"],
            "direction": self.direction == want["direction"],
            "speed": self.speed == want["speed"],
        }


def load_clip(clip: Any) -> torch.Tensor:
    """Any accepted clip as float32 ``(T, 3, SIZE, SIZE)`` in [0, 1]."""
    if isinstance(clip, (str, os.PathLike)):
        clip = _read_video(os.fspath(clip))
    if isinstance(clip, np.ndarray):
        x = torch.from_numpy(np.ascontiguousarray(clip))
    elif isinstance(clip, torch.Tensor):
        x = clip.detach().cpu()
    else:
        raise TypeError(f"expected a tensor, an array or a video path, got {type(clip).__name__}")
    if x.ndim != 4:
        raise ValueError(f"expected a clip (T, 3, H, W) or (T, H, W, 3), got shape {tuple(x.shape)}")
    integer = not (x.is_floating_point() or x.dtype == torch.bool)
    if x.shape[1] not in (3, 4) and x.shape[-1] in (3, 4):  # (T, H, W, C) as read from a video file
        x = x.permute(0, 3, 1, 2)
    if x.shape[1] not in (3, 4):
        raise ValueError(f"expected 3 colour channels, got shape {tuple(x.shape)}")
    x = x[:, :3].to(torch.float32)
    if integer:
        x = x / 255.0
    x = x.clamp(0.0, 1.0)
    h, w = x.shape[-2:]
    if (h, w) != (SIZE, SIZE):
        x = torch.nn.functional.adaptive_avg_pool2d(x, (SIZE, SIZE))
    return x.contiguous()


def _read_video(path: str) -> np.ndarray:
    """All frames of a video or GIF file as a uint8 array (T, H, W, C)."""
    from ..extras import need

    iio = need("imageio.v3", f"Reading {path!r}")
    try:
        return np.asarray(iio.imread(path, index=None))
    except (ImportError, ValueError) as e:
        if not os.path.exists(path):
            raise
        kind = ImportError if isinstance(e, ImportError) else ValueError
        raise kind(f"could not read {path!r} ({e}); for .mp4 files: pip install imageio imageio-ffmpeg") from e


def _largest_components(fg: np.ndarray) -> np.ndarray:
    """Per frame, the largest 4-connected component of the boolean mask ``fg`` (T, H, W)."""
    t, h, w = fg.shape
    labels = np.where(fg, np.arange(1, t * h * w + 1).reshape(t, h, w), 0)
    while True:  # propagate the largest label through each component until nothing changes
        new = labels.copy()
        np.maximum(new[:, 1:], labels[:, :-1], out=new[:, 1:])
        np.maximum(new[:, :-1], labels[:, 1:], out=new[:, :-1])
        np.maximum(new[:, :, 1:], labels[:, :, :-1], out=new[:, :, 1:])
        np.maximum(new[:, :, :-1], labels[:, :, 1:], out=new[:, :, :-1])
        new *= fg
        if np.array_equal(new, labels):
            break
        labels = new
    out = np.zeros_like(fg)
    for i in range(t):
        lab = labels[i][fg[i]]
        if lab.size:
            values, counts = np.unique(lab, return_counts=True)
            out[i] = labels[i] == values[np.argmax(counts)]
    return out


def _grow(mask: np.ndarray) -> np.ndarray:
    """Dilate (T, H, W) masks by one pixel (8-neighbourhood)."""
    g = mask.copy()
    g[:, 1:] |= mask[:, :-1]
    g[:, :-1] |= mask[:, 1:]
    g2 = g.copy()
    g2[:, :, 1:] |= g[:, :, :-1]
    g2[:, :, :-1] |= g[:, :, 1:]
    return g2


_CENTRES = np.arange(SIZE, dtype=np.float64) + 0.5


def _moments(w: np.ndarray) -> dict[str, float] | None:
    """Centroid, area and the shape features of one frame's coverage ``w`` (H, W)."""
    area = float(w.sum())
    if area <= 1e-6:
        return None
    ys, xs = np.meshgrid(_CENTRES, _CENTRES, indexing="ij")
    cx, cy = float((w * xs).sum() / area), float((w * ys).sum() / area)
    dx, dy = xs - cx, ys - cy

    def profile(u: np.ndarray) -> tuple[float, float, float]:
        m2 = float((w * u**2).sum() / area)
        m3 = float((w * u**3).sum() / area)
        m4 = float((w * u**4).sum() / area)
        return m2, m3, m4

    x2, _, x4 = profile(dx)
    y2, y3, y4 = profile(dy)
    d1, d2 = (dx + dy) / np.sqrt(2), (dx - dy) / np.sqrt(2)
    a2, _, a4 = profile(d1)
    b2, _, b4 = profile(d2)
    if min(x2, y2, a2, b2) <= 1e-9:
        return None
    kurt_axes = (x4 / x2**2 + y4 / y2**2) / 2
    kurt_diag = (a4 / a2**2 + b4 / b2**2) / 2
    return {
        "x": cx,
        "y": cy,
        "area": area,
        "skew_y": y3 / y2**1.5,
        "kurt_diff": kurt_diag - kurt_axes,
    }


def verify(clip: Any) -> ClipReport:
    """Recognise the object, its motion and the clip's temporal consistency (see the module docstring)."""
    x = load_clip(clip).numpy().astype(np.float64)  # (T, 3, H, W)
    n_frames = x.shape[0]
    bright = x.max(axis=1)  # (T, H, W)
    obj = _largest_components(bright > FOREGROUND_THRESHOLD)
    found = obj.any(axis=(1, 2))
    if not found.any():
        return ClipReport(None, None, None, "still", [None] * n_frames, 0.0)

    rgb = x.transpose(0, 2, 3, 1)  # (T, H, W, 3)
    weights = bright * obj
    frame_colours = (rgb * weights[..., None]).sum(axis=(1, 2))  # (T, 3), zero where not found
    mean_colour = frame_colours[found].sum(axis=0)
    mean_colour /= max(mean_colour.max(), 1e-12)
    c = int(np.argmin(((_PALETTE_NORM - mean_colour) ** 2).sum(axis=1)))
    colour = list(COLOURS)[c]

    # Coverage: projection on the recognised colour, divided by the object's brightness.
    p = _PALETTE[c]
    proj = (rgb @ p) / float(p @ p)  # (T, H, W)
    brightness = max(float(np.percentile(proj[obj], 90)), FOREGROUND_THRESHOLD)
    region = _grow(obj)
    cover = np.clip(proj / brightness, 0.0, 1.0) * region

    per_frame: list[dict[str, float] | None] = [_moments(cover[t]) if found[t] else None for t in range(n_frames)]
    present = [t for t, m in enumerate(per_frame) if m is not None]
    track: list[tuple[float, float] | None] = [None if m is None else (m["x"], m["y"]) for m in per_frame]

    skew = float(np.mean([per_frame[t]["skew_y"] for t in present]))
    kurt = float(np.mean([per_frame[t]["kurt_diff"] for t in present]))
    if skew < TRIANGLE_SKEW:
        shape = "triangle"
    elif kurt > SQUARE_KURTOSIS:
        shape = "square"
    else:
        shape = "circle"

    vx = vy = 0.0
    if len(present) >= 2:
        ts = np.array(present, dtype=np.float64)
        xs = np.array([track[t][0] for t in present])
        ys = np.array([track[t][1] for t in present])
        vx = float(np.polyfit(ts, xs, 1)[0])
        vy = float(np.polyfit(ts, ys, 1)[0])
    v = float(np.hypot(vx, vy))
    if v < SLOW_THRESHOLD:
        speed, direction = "still", None
    else:
        speed = "slow" if v < FAST_THRESHOLD else "fast"
        if abs(vx) >= abs(vy):
            direction = "right" if vx > 0 else "left"
        else:
            direction = "down" if vy > 0 else "up"

    presence = len(present) / n_frames
    areas = np.array([per_frame[t]["area"] for t in present])
    area_term = 1.0 - min(1.0, float(areas.std() / max(areas.mean(), 1e-12)))
    cols = frame_colours[present]
    cols = cols / np.maximum(cols.max(axis=1, keepdims=True), 1e-12)
    colour_spread = float(np.linalg.norm(cols - cols.mean(axis=0), axis=1).mean())
    colour_term = 1.0 - min(1.0, 2.0 * colour_spread)
    consistency = float((presence + area_term + colour_term) / 3)

    features = {"skew_y": skew, "kurt_diff": kurt, "brightness": brightness, "mean_area": float(areas.mean())}
    return ClipReport(colour, shape, direction, speed, track, consistency, (vx, vy), features)
