"""Writing videos: MP4 through imageio-ffmpeg, GIF through imageio; always atomic (a temporary file in the same
folder, renamed into place), so an interrupted write never leaves half a file."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np

VIDEO_SUFFIXES = (".mp4", ".gif")


def check_writable(path: str | os.PathLike) -> Path:
    """Fail before any work if `path` cannot be written: a folder, no or a wrong suffix, a missing or read-only
    folder. An existing file is fine: `write_video` replaces it atomically."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"output {str(path)!r} is a folder; give a file name, e.g. {str(path / 'out.mp4')!r}")
    if not path.suffix:
        raise ValueError(f"output {str(path)!r} has no suffix; name it {str(path) + '.mp4'!r} or "
                         f"{str(path) + '.gif'!r}")
    if path.suffix.lower() not in VIDEO_SUFFIXES:
        raise ValueError(f"output {str(path)!r} must end in {' or '.join(VIDEO_SUFFIXES)}, e.g. "
                         f"{str(path.with_suffix('.mp4'))!r}")
    folder = path.parent if str(path.parent) else Path(".")
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"output folder {str(folder)!r} is not a folder but a file")
    if not folder.is_dir():
        raise ValueError(f"output folder {str(folder)!r} does not exist; create it first")
    try:
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".adacache-write-test-"):
            pass
    except OSError as error:
        raise ValueError(f"cannot write to {str(folder)!r}: {error.strerror}") from None
    return path


def to_uint8(frames) -> np.ndarray:
    """(T, H, W, 3) uint8 from a uint8 array or a float array/tensor in [0, 1] laid out (T, H, W, 3) or (T, 3, H, W).
    Float frames holding inf or nan raise FloatingPointError: clipped, they would pass for a black video."""
    array = frames.detach().cpu().numpy() if hasattr(frames, "detach") else np.asarray(frames)
    if array.ndim != 4:
        raise ValueError(f"expected frames of shape (T, H, W, 3) or (T, 3, H, W), got {array.shape}")
    if array.shape[-1] != 3 and array.shape[1] == 3:
        array = array.transpose(0, 2, 3, 1)
    if array.dtype != np.uint8:
        if not np.isfinite(array).all():
            bad = int(np.count_nonzero(~np.isfinite(array)))
            raise FloatingPointError(
                f"the frames hold {bad} non-finite values (inf or nan) of {array.size}: the generation diverged "
                "(a guidance scale too high?) or the model's weights are broken; no video is written"
            )
        array = (np.clip(array, 0, 1) * 255).round().astype(np.uint8)
    return array


def upscale(frames: np.ndarray, factor: int) -> np.ndarray:
    """Nearest-neighbour upscale (T, H, W, 3) by an integer factor, so tiny clips are visible."""
    return frames.repeat(factor, axis=1).repeat(factor, axis=2) if factor > 1 else frames


def side_by_side(*videos: np.ndarray, gap: int = 2) -> np.ndarray:
    """Videos (T, H, W, 3) of equal T and H placed left to right with a white gap."""
    frames, height = videos[0].shape[0], videos[0].shape[1]
    spacer = np.full((frames, height, gap, 3), 255, dtype=np.uint8)
    parts = [part for video in videos for part in (video, spacer)][:-1]
    return np.concatenate(parts, axis=2)


def _check_written(path: str, frames: int) -> None:
    """Read back the frame count of what the encoder wrote: imageio does not report an encoder that failed (a
    full disk, a killed ffmpeg), which would leave an empty or cut file to be renamed over a good one."""
    try:
        if path.endswith(".gif"):
            from PIL import Image

            with Image.open(path) as image:  # n_frames reads to the end; a cut file raises
                count = image.n_frames
            frames = min(frames, count)  # the GIF writer merges identical neighbouring frames (a still clip)
            count = max(count, 1) if count else 0
        else:
            import imageio_ffmpeg

            count = imageio_ffmpeg.count_frames_and_secs(path)[0]
    except Exception as error:  # unreadable: whatever the reader raised (ffmpeg's is its whole log; keep the end)
        reason = ([line for line in str(error).splitlines() if line.strip()] or [type(error).__name__])[-1][:200]
        raise OSError(f"the video encoder did not write a readable file ({reason}); is the disk full?") from error
    if count != frames:
        raise OSError(f"the video encoder wrote {count} of {frames} frames; is the disk full?")


def write_video(frames, path: str | os.PathLike, fps: int = 8, scale: int = 1) -> Path:
    """Write (T, H, W, 3) frames to .mp4 (H.264 via imageio-ffmpeg) or .gif, atomically."""
    from .extras import need

    imageio = need("imageio.v2", "Writing video")
    if str(path).lower().endswith(".mp4"):
        need("imageio_ffmpeg", "Writing MP4")
    path = check_writable(path)
    array = upscale(to_uint8(frames), scale)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}-", suffix=path.suffix)
    os.close(fd)
    try:
        if path.suffix.lower() == ".gif":
            imageio.mimsave(tmp, list(array), duration=1000 / fps, loop=0)
        else:
            pad_h, pad_w = (-array.shape[1]) % 16, (-array.shape[2]) % 16  # H.264 wants multiples of 16
            array = np.pad(array, ((0, 0), (0, pad_h), (0, pad_w), (0, 0)))
            imageio.mimsave(tmp, list(array), fps=fps, codec="libx264", quality=9, macro_block_size=16,
                            ffmpeg_log_level="error")
        _check_written(tmp, len(array))
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; a written video gets the usual permissions
        with open(tmp, "rb") as written:
            os.fsync(written.fileno())  # on disk before it replaces the old file
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path
