"""A procedural text-to-video domain: one coloured shape on black, moving in a straight line.

Every clip has :data:`FRAMES` = 8 frames of :data:`SIZE` x :data:`SIZE` = 16 x 16 RGB pixels, float32 in
[0, 1], laid out ``(T, 3, H, W)``.  It shows a single object on a black background:

* colour: red, green, blue or yellow (:data:`COLOURS`);
* shape: circle (radius 3 px), square (side 6 px) or triangle (pointing up, base 8 px, height 8 px:
  area 28.3, 36 and 32 px^2);
* motion: still, or moving left/right/up/down (image coordinates, up = decreasing row) at 0.5 px/frame
  ("slow") or 1 px/frame ("fast").

Its caption is ``"a {colour} {shape} moving {direction} {speed}"`` or ``"a {colour} {shape} standing
still"``.  Continuous coordinates: pixel ``(row i, column j)`` covers ``[j, j + 1] x [i, i + 1]``, so the
centre of the frame is ``(8.0, 8.0)``.  A shape's *centre* is its centroid (for the triangle: a third of
the height above the base), so the intensity-weighted centroid of a rendered frame is the track point.
Shapes are anti-aliased by 4 x 4 supersampling: a pixel's value is the colour times the fraction of its
16 sample points inside the shape.  :func:`sample_clip_spec` draws start positions on the 1/4-px grid
of those sample points (so a slow or fast track stays on it and every frame comes from a pre-rendered
table); :func:`render` also renders any other position exactly, just more slowly.  The whole track of a
sampled clip lies inside the frame.

Example::

    import numpy as np
    from adacache.embedded.domain import clip_batches, parse_caption, render, sample_clip_spec

    spec = sample_clip_spec(np.random.default_rng(0), colour="red", speed="fast")
    video = render(spec)                      # (8, 3, 16, 16)
    videos, captions = next(clip_batches(seed=0, batch_size=64))   # (64, 8, 3, 16, 16), 64 strings
    parse_caption("A red circle, moving left fast.")  # {'colour': 'red', 'shape': 'circle', ...}
"""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

__all__ = [
    "COLOURS",
    "DIRECTIONS",
    "FRAMES",
    "SHAPES",
    "SIZE",
    "SPEEDS",
    "SUPERSAMPLE",
    "VOCABULARY",
    "ClipSpec",
    "clip_batches",
    "parse_caption",
    "prompt_set",
    "render",
    "render_batch",
    "sample_clip_spec",
]

FRAMES = 8
SIZE = 16
SUPERSAMPLE = 4  # 4 x 4 sample points per pixel; sampled start positions lie on this 1/4-px grid

COLOURS: dict[str, tuple[float, float, float]] = {
    "red": (1.0, 0.0, 0.0),
    "green": (0.0, 1.0, 0.0),
    "blue": (0.0, 0.35, 1.0),
    "yellow": (1.0, 1.0, 0.0),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
DIRECTIONS: dict[str, tuple[int, int]] = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}
SPEEDS: dict[str, float] = {"still": 0.0, "slow": 0.5, "fast": 1.0}

VOCABULARY: tuple[str, ...] = (
    "a",
    *COLOURS,
    *SHAPES,
    "moving",
    *DIRECTIONS,
    *(s for s in SPEEDS if s != "still"),
    "standing",
    "still",
)

_MOVING_SPEEDS = tuple(s for s in SPEEDS if s != "still")
_GRAMMAR = "'a {colour} {shape} moving {direction} {slow|fast}' or 'a {colour} {shape} standing still'"

# Shape geometry relative to the centre (centroid): radius / half side / triangle base and height.
_RADIUS = 3.0
_HALF_SIDE = 3.0
_TRI_BASE = 8.0
_TRI_HEIGHT = 8.0
# (xmin, xmax, ymin, ymax) of each shape around its centre.
_EXTENTS: dict[str, tuple[float, float, float, float]] = {
    "circle": (-_RADIUS, _RADIUS, -_RADIUS, _RADIUS),
    "square": (-_HALF_SIDE, _HALF_SIDE, -_HALF_SIDE, _HALF_SIDE),
    "triangle": (-_TRI_BASE / 2, _TRI_BASE / 2, -2 * _TRI_HEIGHT / 3, _TRI_HEIGHT / 3),
}


def _inside(shape: str, dx: np.ndarray, dy: np.ndarray) -> np.ndarray:
    """Whether the points at offset (dx, dy) from the shape's centre lie inside it (float64 maths)."""
    if shape == "circle":
        return dx * dx + dy * dy <= _RADIUS * _RADIUS
    if shape == "square":
        return (np.abs(dx) <= _HALF_SIDE) & (np.abs(dy) <= _HALF_SIDE)
    if shape == "triangle":  # apex up at dy = -2h/3, base at dy = +h/3; half-width grows linearly to base/2
        from_apex = dy + 2 * _TRI_HEIGHT / 3
        return (dy <= _TRI_HEIGHT / 3) & (np.abs(dx) * _TRI_HEIGHT <= from_apex * (_TRI_BASE / 2))
    raise ValueError(f"unknown shape {shape!r}; shapes: {SHAPES}")


_SUB = (np.arange(SIZE * SUPERSAMPLE, dtype=np.float64) + 0.5) / SUPERSAMPLE  # sample coordinates


def _coverage(shape: str, cx: float, cy: float) -> np.ndarray:
    """(SIZE, SIZE) float32 fraction of each pixel's sample points inside the shape centred at (cx, cy)."""
    inside = _inside(shape, _SUB[None, :] - cx, _SUB[:, None] - cy)
    n = SUPERSAMPLE
    return inside.reshape(SIZE, n, SIZE, n).sum(axis=(1, 3)).astype(np.float32) / (n * n)


_Q = SIZE * SUPERSAMPLE  # centre coordinates on the 1/4-px grid: q / 4 for q in 0..64


@functools.cache
def _table() -> torch.Tensor:
    """uint8 (len(SHAPES), 65, 65, SIZE, SIZE): sample points inside, for centre (qx/4, qy/4) at [s, qy, qx]."""
    n = SUPERSAMPLE
    q = np.arange(_Q + 1, dtype=np.float64) / n
    out = np.empty((len(SHAPES), _Q + 1, _Q + 1, SIZE, SIZE), dtype=np.uint8)
    for s, shape in enumerate(SHAPES):
        dx = _SUB[None, :] - q[:, None]  # (qx, x-sample)
        dy = _SUB[None, :] - q[:, None]  # (qy, y-sample)
        inside = _inside(shape, dx[None, :, None, :], dy[:, None, :, None])  # (qy, qx, ys, xs)
        counts = inside.reshape(_Q + 1, _Q + 1, SIZE, n, SIZE, n).sum(axis=(3, 5))
        out[s] = counts.astype(np.uint8)
    return torch.from_numpy(out)


_COLOUR_TABLE = torch.tensor(list(COLOURS.values()), dtype=torch.float32)
_COLOUR_INDEX = {c: i for i, c in enumerate(COLOURS)}
_SHAPE_INDEX = {s: i for i, s in enumerate(SHAPES)}


@dataclass(frozen=True)
class ClipSpec:
    """One clip of the domain.  ``direction`` is None exactly when ``speed == 'still'``.

    ``start`` is the ``(x, y)`` of the object's centre (centroid) at frame 0, in pixels.
    """

    colour: str
    shape: str
    direction: str | None
    speed: str
    start: tuple[float, float]

    def __post_init__(self) -> None:
        if self.colour not in COLOURS:
            raise ValueError(f"unknown colour {self.colour!r}; colours: {tuple(COLOURS)}")
        if self.shape not in SHAPES:
            raise ValueError(f"unknown shape {self.shape!r}; shapes: {SHAPES}")
        if self.speed not in SPEEDS:
            raise ValueError(f"unknown speed {self.speed!r}; speeds: {tuple(SPEEDS)}")
        if self.speed == "still":
            if self.direction is not None:
                raise ValueError(f"a still clip has direction None, got {self.direction!r}")
        elif self.direction not in DIRECTIONS:
            raise ValueError(
                f"unknown direction {self.direction!r} for a moving clip; directions: {tuple(DIRECTIONS)}"
            )
        x, y = self.start
        object.__setattr__(self, "start", (float(x), float(y)))

    def caption(self) -> str:
        if self.speed == "still":
            return f"a {self.colour} {self.shape} standing still"
        return f"a {self.colour} {self.shape} moving {self.direction} {self.speed}"

    def velocity(self) -> tuple[float, float]:
        """Displacement of the centre per frame, (dx, dy) in pixels."""
        if self.direction is None:
            return (0.0, 0.0)
        dx, dy = DIRECTIONS[self.direction]
        v = SPEEDS[self.speed]
        return (dx * v, dy * v)

    def track(self) -> list[tuple[float, float]]:
        """The centre (x, y) in every frame."""
        (x, y), (vx, vy) = self.start, self.velocity()
        return [(x + vx * t, y + vy * t) for t in range(FRAMES)]


def _start_range(shape: str, direction: str | None, speed: str) -> tuple[int, int, int, int]:
    """Inclusive 1/4-px grid bounds (qx_lo, qx_hi, qy_lo, qy_hi) of starts whose whole track is in frame."""
    xmin, xmax, ymin, ymax = _EXTENTS[shape]
    dx, dy = DIRECTIONS[direction] if direction is not None else (0, 0)
    travel = SPEEDS[speed] * (FRAMES - 1)
    tx, ty = dx * travel, dy * travel
    n, eps = SUPERSAMPLE, 1e-9
    bounds = []
    x_range = (-xmin - min(0.0, tx), SIZE - xmax - max(0.0, tx))
    y_range = (-ymin - min(0.0, ty), SIZE - ymax - max(0.0, ty))
    for lo, hi in (x_range, y_range):
        q_lo, q_hi = math.ceil(lo * n - eps), math.floor(hi * n + eps)
        if q_lo > q_hi:  # cannot happen with the sizes above; guards edits of the constants
            raise ValueError(f"a {shape} moving {direction} {speed} does not fit in a {SIZE}-px frame")
        bounds += [q_lo, q_hi]
    return tuple(bounds)  # type: ignore[return-value]


def _pick(rng: np.random.Generator, options, fixed, kind: str):
    if fixed is None:
        return options[int(rng.integers(len(options)))]
    if fixed not in options:
        raise ValueError(f"unknown {kind} {fixed!r}; {kind}s: {tuple(options)}")
    return fixed


def sample_clip_spec(
    rng: np.random.Generator,
    colour: str | None = None,
    shape: str | None = None,
    direction: str | None = None,
    speed: str | None = None,
) -> ClipSpec:
    """A random clip; any attribute may be fixed, the others are uniform.

    The speed is uniform over still/slow/fast (still with probability 1/3), or over slow/fast when a
    direction is fixed.  The start is uniform over the 1/4-px grid positions that keep the whole track
    inside the frame.  Deterministic given the generator's state.
    """
    colour = _pick(rng, tuple(COLOURS), colour, "colour")
    shape = _pick(rng, SHAPES, shape, "shape")
    if direction is not None and speed == "still":
        raise ValueError(f"speed 'still' has no direction, got direction {direction!r}")
    speed = _pick(rng, _MOVING_SPEEDS if direction is not None else tuple(SPEEDS), speed, "speed")
    direction = None if speed == "still" else _pick(rng, tuple(DIRECTIONS), direction, "direction")
    qx_lo, qx_hi, qy_lo, qy_hi = _start_range(shape, direction, speed)
    qx = int(rng.integers(qx_lo, qx_hi + 1))
    qy = int(rng.integers(qy_lo, qy_hi + 1))
    return ClipSpec(colour, shape, direction, speed, (qx / SUPERSAMPLE, qy / SUPERSAMPLE))


def render_batch(specs: list[ClipSpec]) -> torch.Tensor:
    """Render clips into one float32 tensor (B, FRAMES, 3, SIZE, SIZE) in [0, 1]."""
    if not specs:
        return torch.zeros(0, FRAMES, 3, SIZE, SIZE)
    t = np.arange(FRAMES, dtype=np.float64)
    start = np.array([s.start for s in specs], dtype=np.float64)  # (B, 2)
    vel = np.array([s.velocity() for s in specs], dtype=np.float64)  # (B, 2)
    pos = start[:, None, :] + vel[:, None, :] * t[None, :, None]  # (B, T, 2)
    q = pos * SUPERSAMPLE
    qi = np.rint(q)
    on_grid = (np.abs(q - qi) < 1e-9) & (qi >= 0) & (qi <= _Q)
    shape_idx = torch.tensor([_SHAPE_INDEX[s.shape] for s in specs])
    colours = _COLOUR_TABLE[torch.tensor([_COLOUR_INDEX[s.colour] for s in specs])]  # (B, 3)
    if on_grid.all():
        qi_t = torch.from_numpy(qi.astype(np.int64))
        counts = _table()[shape_idx[:, None], qi_t[..., 1], qi_t[..., 0]]  # (B, T, H, W) uint8
        cover = counts.to(torch.float32) * (1.0 / SUPERSAMPLE**2)
    else:  # off the 1/4-px grid (hand-made specs): exact supersampling, frame by frame
        cover = torch.from_numpy(
            np.stack([np.stack([_coverage(s.shape, x, y) for x, y in p]) for s, p in zip(specs, pos)])
        )
    return cover[:, :, None] * colours[:, None, :, None, None]


def render(spec: ClipSpec) -> torch.Tensor:
    """The clip as a float32 tensor (FRAMES, 3, SIZE, SIZE) in [0, 1]."""
    return render_batch([spec])[0]


def clip_batches(seed: int, batch_size: int) -> Iterator[tuple[torch.Tensor, list[str]]]:
    """Endless batches ``(videos (B, FRAMES, 3, SIZE, SIZE) in [0, 1], captions)``, deterministic from ``seed``.

    The clips are those of successive ``sample_clip_spec(numpy.random.default_rng(seed))`` calls.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    rng = np.random.default_rng(seed)
    while True:
        specs = [sample_clip_spec(rng) for _ in range(batch_size)]
        yield render_batch(specs), [s.caption() for s in specs]


def _caption_error(text: str, why: str) -> ValueError:
    return ValueError(f"{why} in caption {text!r}. Grammar: {_GRAMMAR}. Vocabulary: {', '.join(VOCABULARY)}")


def parse_caption(text: str) -> dict:
    """Parse a caption into ``{'colour', 'shape', 'direction', 'speed'}`` (direction None when still).

    Case, whitespace and punctuation are ignored and the leading article "a" is optional.  Raises
    ValueError naming the unknown words and listing :data:`VOCABULARY` when a word is outside the domain
    or the words do not follow the grammar.
    """
    words = re.sub(r"[^a-z]+", " ", str(text).lower()).split()
    unknown = [w for w in words if w not in VOCABULARY]
    if unknown:
        return_words = ", ".join(repr(w) for w in dict.fromkeys(unknown))
        raise _caption_error(text, f"unknown word(s) {return_words}")
    body = words[1:] if words[:1] == ["a"] else words
    if len(body) >= 2 and body[0] in COLOURS and body[1] in SHAPES:
        rest = body[2:]
        if rest == ["standing", "still"]:
            return {"colour": body[0], "shape": body[1], "direction": None, "speed": "still"}
        if len(rest) == 3 and rest[0] == "moving" and rest[1] in DIRECTIONS and rest[2] in _MOVING_SPEEDS:
            return {"colour": body[0], "shape": body[1], "direction": rest[1], "speed": rest[2]}
    raise _caption_error(text, "the words do not follow the grammar")


def prompt_set() -> list[str]:
    """The fixed evaluation prompts (36).

    Every colour x direction x {slow, fast} (32), then every colour standing still (4); shapes are
    assigned in rotation over the whole list, so each shape appears 12 times.
    """
    combos: list[tuple[str, str | None, str]] = [
        (c, d, s) for c in COLOURS for d in DIRECTIONS for s in _MOVING_SPEEDS
    ] + [(c, None, "still") for c in COLOURS]
    prompts = []
    for i, (colour, direction, speed) in enumerate(combos):
        shape = SHAPES[i % len(SHAPES)]
        if direction is None:
            prompts.append(f"a {colour} {shape} standing still")
        else:
            prompts.append(f"a {colour} {shape} moving {direction} {speed}")
    return prompts
