"""Video input as frames: where they come from, at what rate, and how many.

    v = load_video("clip.gif")                       # animated GIF / WebP / PNG: every frame, fps from its timing
    v = load_video("frames_dir/", fps=4)             # a directory of image files, in natural name order
    v = load_video([img0, img1, img2], fps=2)        # paths, bytes, [H, W, 3] uint8 arrays or PIL images
    v = load_video(arr_thwc, fps=25, sample_fps=2)   # uniformly subsampled to 2 frames per second
    v.frames, v.fps                                  # encoded bytes or [H, W, 3] uint8 arrays; frames per second

Video containers (MP4, MKV, WebM, ...) are not decoded here (that needs FFmpeg bindings): extract frames first, e.g.
``ffmpeg -i in.mp4 -vf fps=2 frames/%05d.png``, and pass the directory. ``fps`` is the rate of the frames given
(default 2, the rate HF's Qwen2-VL processors and Qwen's own tools sample videos at); Qwen2.5-VL turns it into the
temporal spacing of the video's M-RoPE positions (vlm.mrope), so it matters for what the model "sees" as time.
``sample_fps`` keeps every (fps / sample_fps)-th frame, evenly spread (frame k·n/m for k < m), before decoding.
"""
from __future__ import annotations

import io
import os
import re
import struct
import zlib
from dataclasses import dataclass
from typing import Sequence

import numpy as np
from PIL import Image

from vlm.preprocess.image import DEFAULT_MAX_PIXELS, ImageError, image_size, read_image_bytes

DEFAULT_FPS = 2.0
DEFAULT_MAX_FRAMES = 768          # HF Qwen2VLVideoProcessor.max_frames
MAX_DECODED_BYTES = 2 << 30       # RGB bytes an animated file may decode to (all kept frames together)
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".ppm", ".pgm")
CONTAINER_SUFFIXES = (".mp4", ".m4v", ".mkv", ".webm", ".avi", ".mov", ".mpg", ".mpeg", ".flv", ".wmv", ".3gp",
                      ".ts", ".ogv")


class VideoError(ImageError):
    """A video this engine cannot read, or one outside the configured limits (message names the problem)."""


@dataclass
class VideoFrames:
    frames: list                  # encoded image bytes or [H, W, 3] uint8 arrays, in time order
    fps: float                    # frames per second of `frames`
    name: str = "<video>"

    @property
    def duration(self) -> float:
        return len(self.frames) / self.fps


def _check_fps(fps, what: str) -> float:
    if isinstance(fps, bool) or not isinstance(fps, (int, float, np.integer, np.floating)) \
            or not np.isfinite(fps) or fps <= 0:
        raise VideoError(f"{what} must be a positive number of frames per second, got {fps!r}")
    return float(fps)


def sample_indices(n_frames: int, fps: float, sample_fps: float | None) -> list[int]:
    """Indices of the frames kept when n_frames at `fps` are resampled to `sample_fps` (None: all): m =
    clamp(round(n · sample_fps / fps), 1, n) frames k·n // m, evenly spread over the clip."""
    if sample_fps is None or sample_fps >= fps:
        return list(range(n_frames))
    m = min(n_frames, max(1, int(round(n_frames * sample_fps / fps))))
    return [k * n_frames // m for k in range(m)]


def _natural_key(name: str):
    return [int(t) if t.isdigit() else t.lower() for t in re.split(r"(\d+)", name)]


def _frames_of_dir(path: str) -> list[str]:
    names = sorted((n for n in os.listdir(path) if n.lower().endswith(IMAGE_SUFFIXES)
                    and os.path.isfile(os.path.join(path, n))), key=_natural_key)
    if not names:
        raise VideoError(f"{path}: the directory holds no image files ({', '.join(IMAGE_SUFFIXES)}) to use as "
                         f"video frames")
    return [os.path.join(path, n) for n in names]


def _check_complete(data: bytes, name: str) -> None:
    """A cut-off animation still decodes its first frames: refuse it instead of silently dropping the rest
    (GIF ends with its 0x3B trailer, PNG with an IEND chunk, WebP is as long as its RIFF header says)."""
    end = data.rstrip(b"\0")
    if data[:6] in (b"GIF87a", b"GIF89a"):
        complete, what = end.endswith(b";"), "the GIF trailer"
    elif data[:8] == b"\x89PNG\r\n\x1a\n":
        complete, what = data.endswith(b"\0\0\0\0IEND\xaeB`\x82"), "the PNG IEND chunk"   # fixed 12 bytes
    elif data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        complete, what = len(data) >= struct.unpack("<I", data[4:8])[0] + 8, "the length its RIFF header gives"
    else:
        return
    if not complete:
        raise VideoError(f"{name}: corrupt or truncated animated image: the data ends before {what} "
                         f"({len(data)} bytes)")


def _animated(data: bytes, name: str, fps: float | None, sample_fps: float | None, max_frames: int,
              max_pixels: int | None) -> VideoFrames:
    """Every (sampled) frame of an animated GIF / WebP / PNG, as RGB arrays; fps from the frame durations."""
    image_size(data, max_pixels=max_pixels)                   # header, size and decompression-bomb checks
    _check_complete(data, name)
    try:
        im = Image.open(io.BytesIO(data))
        n = int(getattr(im, "n_frames", 1))
        if n < 2:
            im.load()                              # a truncated animation can look like one frame: decode it
            raise VideoError(f"{name}: a still {im.format} image (1 frame), not a video: pass it as an image, or "
                             f"give several frames")
        durations = []
        for i in range(n):
            im.seek(i)
            if "duration" not in im.info:          # WebP sets it when the frame is loaded, GIF / APNG on seek
                im.load()
            durations.append(float(im.info.get("duration") or 0.0))
        if fps is None:
            ms = float(np.mean(durations))
            fps = 1000.0 / ms if ms > 0 else DEFAULT_FPS
        keep = sample_indices(n, fps, sample_fps)
        _check_count(len(keep), max_frames, name, n, fps)
        if len(keep) * im.width * im.height * 3 > MAX_DECODED_BYTES:
            raise VideoError(f"{name}: {len(keep)} frames of {im.width}x{im.height} would decode to "
                             f"{len(keep) * im.width * im.height * 3 / 2**30:.1f} GiB of RGB, above "
                             f"{MAX_DECODED_BYTES / 2**30:.0f} GiB: pass sample_fps= or max_frames= to keep fewer")
        frames = []
        for i in keep:
            im.seek(i)
            frames.append(np.asarray(im.convert("RGB")))
    except VideoError:
        raise
    except (OSError, SyntaxError, ValueError, EOFError, IndexError, struct.error, zlib.error) as e:
        # (Pillow's GIF reader raises IndexError on a cut-off frame)
        raise VideoError(f"{name}: corrupt or truncated animated image: {e or type(e).__name__}") from None
    out_fps = fps * len(keep) / n if sample_fps is not None and len(keep) < n else fps
    return VideoFrames(frames, out_fps, name)


def _check_count(n_keep: int, max_frames: int, name: str, n_total: int, fps: float) -> None:
    if n_keep > max_frames:
        raise VideoError(f"{name}: {n_keep} frames ({n_total} at {fps:g} fps) is more than max_frames={max_frames}: "
                         f"pass sample_fps= to subsample, or a larger max_frames")


def load_video(source, *, fps: float | None = None, sample_fps: float | None = None,
               max_frames: int = DEFAULT_MAX_FRAMES, max_pixels: int | None = DEFAULT_MAX_PIXELS,
               name: str | None = None) -> VideoFrames:
    """Frames + frame rate of a video given as a list of frames, a [T, H, W, C] uint8 array, a directory of
    images, or an animated GIF / WebP / PNG (path or bytes). Raises VideoError (a ValueError) for empty or
    unreadable input, containers it cannot decode, and more than `max_frames` frames after sampling."""
    if fps is not None:
        fps = _check_fps(fps, "fps")
    if sample_fps is not None:
        sample_fps = _check_fps(sample_fps, "sample_fps")
    if isinstance(max_frames, bool) or not isinstance(max_frames, int) or max_frames < 1:
        raise VideoError(f"max_frames must be a positive int, got {max_frames!r}")
    if isinstance(source, VideoFrames):
        fps = fps or source.fps
        name = name or source.name
        source = source.frames
    if isinstance(source, (str, os.PathLike)):
        path = os.fspath(source)
        name = name or path
        if os.path.isdir(path):
            source = _frames_of_dir(path)
        elif path.lower().endswith(CONTAINER_SUFFIXES):
            raise VideoError(f"{path}: video containers ({os.path.splitext(path)[1]}) are not decoded here: extract "
                             f"frames first (e.g. ffmpeg -i in.mp4 -vf fps=2 frames/%05d.png) and pass the "
                             f"directory, or pass an animated GIF / WebP / PNG")
        elif not os.path.isfile(path):
            raise FileNotFoundError(f"video not found: {path}")
        else:
            return _animated(read_image_bytes(path), name, fps, sample_fps, max_frames, max_pixels)
    if isinstance(source, (bytes, bytearray, memoryview)):
        data = bytes(source)
        if not data:
            raise VideoError(f"{name or '<bytes>'}: empty video data (0 bytes)")
        return _animated(data, name or "<bytes>", fps, sample_fps, max_frames, max_pixels)
    if isinstance(source, np.ndarray):
        if source.ndim != 4 or source.dtype != np.uint8 or source.shape[-1] not in (1, 3, 4):
            raise VideoError(f"a video array must be [T, H, W, C] uint8 with C in (1, 3, 4), got "
                             f"{source.dtype} {list(source.shape)}")
        source = list(source)
    if not isinstance(source, Sequence) or isinstance(source, str):
        raise VideoError(f"unsupported video source {type(source).__name__}: give a list of frames, a [T, H, W, C] "
                         f"uint8 array, a directory of images or an animated GIF / WebP / PNG")
    name = name or "<frames>"
    if len(source) == 0:
        raise VideoError(f"{name}: a video needs at least one frame, got none")
    fps = fps or DEFAULT_FPS
    keep = sample_indices(len(source), fps, sample_fps)
    _check_count(len(keep), max_frames, name, len(source), fps)
    frames = []
    for i in keep:
        f = source[i]
        if isinstance(f, (str, os.PathLike)):
            f = read_image_bytes(f)
        elif isinstance(f, Image.Image):
            f = np.asarray(f.convert("RGB"))
        elif isinstance(f, (bytearray, memoryview)):
            f = bytes(f)
        elif not isinstance(f, (bytes, np.ndarray)):
            raise VideoError(f"{name}: frame {i} is a {type(f).__name__}: frames must be paths, bytes, uint8 "
                             f"arrays or PIL images")
        frames.append(f)
    out_fps = fps * len(keep) / len(source) if len(keep) < len(source) else fps
    return VideoFrames(frames, out_fps, name)


__all__ = ["VideoFrames", "VideoError", "load_video", "sample_indices", "DEFAULT_FPS", "DEFAULT_MAX_FRAMES"]
