"""Video in the media API: frames + frame rate -> the parts of a Bitmap of kind "video".

    bmp = mtmd.Bitmap.from_video("clip.gif")                      # or frames, a directory, a [T, H, W, 3] array
    chunks = mtmd.tokenize(model, "<__media__>What happens?", [bmp])
    model.generate("<__media__>What happens?", videos=[["f0.png", "f1.png", "f2.png"]], temperature=0)

A video is one VIDEO chunk whose layout, positions and preprocessing belong to the encoder (Qwen2-VL / 2.5-VL:
vlm.encoders.qwen2vl; other encoders refuse video). Here: loading and checking the frames, and the video's id
(its frames' ids, fps, frame policy and pixel limits), so the same video is encoded once.
"""
from __future__ import annotations

import hashlib
from typing import Sequence

from vlm.errors import MediaError
from vlm.preprocess.video import DEFAULT_MAX_FRAMES, load_video

FRAME_POLICIES = ("error", "resize")


def load_frames(source, *, fps: float | None = None, sample_fps: float | None = None, max_frames: int | None = None,
                frame_policy: str = "error", name: str | None = None, min_pixels: int | None = None,
                max_pixels: int | None = None):
    """Checked arguments + vlm.preprocess.video.load_video (frames as encoded bytes or arrays, fps, name)."""
    if frame_policy not in FRAME_POLICIES:
        raise MediaError(f"frame_policy must be one of {FRAME_POLICIES}, got {frame_policy!r}")
    for what, v in (("min_pixels", min_pixels), ("max_pixels", max_pixels)):
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v <= 0):
            raise MediaError(f"{what} must be a positive int or None, got {v!r}")
    if min_pixels is not None and max_pixels is not None and min_pixels > max_pixels:
        raise MediaError(f"min_pixels {min_pixels} exceeds max_pixels {max_pixels}")
    return load_video(source, fps=fps, sample_fps=sample_fps, max_frames=max_frames or DEFAULT_MAX_FRAMES, name=name)


def video_id(fps: float, frame_policy: str, pixel_limits: tuple, frame_ids: Sequence[str]) -> str:
    lo, hi = pixel_limits
    h = hashlib.sha256(f"video:{fps!r}:{frame_policy}:{lo}:{hi}:{len(frame_ids)}:".encode())
    for fid in frame_ids:
        h.update(fid.encode())
    return h.hexdigest()


__all__ = ["load_frames", "video_id", "FRAME_POLICIES"]
