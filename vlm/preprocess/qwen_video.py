"""Qwen2-VL / Qwen2.5-VL video: a list of frames -> temporal patches (frame pairs share one temporal slot).

Every frame is resized to the size ``smart_resize`` gives the first frame (same rules and limits as
:func:`vlm.preprocess.qwen_image.preprocess_qwen2vl`), normalised, and consecutive frames are paired: slot k holds
frames 2k and 2k + 1 (an odd count repeats the last frame), so grid_thw = (ceil(n / 2), h / p, w / p) and the video
becomes t·(h/2p)·(w/2p) tokens. Frames of different sizes are refused (``policy="error"``) or resized to the first
frame's size (``policy="resize"``).

The M-RoPE layout of a video chunk (vlm.mrope.image_positions with n_frames = t) spaces the temporal slots by
``time_interval`` (Qwen2.5-VL: tokens_per_second · seconds per slot, HF ``second_per_grid_ts``).
"""
from __future__ import annotations

from typing import Literal, Sequence

import numpy as np

from vlm.preprocess.image import (
    OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, ImageError, ImageSource, Mode, _as_rgb, _check_mode, letterbox, resize,
    to_pixel_values,
)
from vlm.preprocess.qwen_image import QwenImage, patchify, qwen2vl_resized_size


class VideoFrameSizeError(ImageError):
    """Frames of one video do not share a size (and the policy is "error")."""


def preprocess_qwen2vl_video(frames: Sequence[ImageSource], *, min_pixels: int | None = None,
                             max_pixels: int | None = None, min_tokens: int | None = None,
                             max_tokens: int | None = None, patch_size: int = 14, merge_size: int = 2,
                             temporal_patch_size: int = 2, mean: Sequence[float] = OPENAI_CLIP_MEAN,
                             std: Sequence[float] = OPENAI_CLIP_STD, resample: str | int = "bicubic",
                             rescale_factor: float = 1 / 255, mode: Mode = "hf",
                             policy: Literal["error", "resize"] = "error") -> QwenImage:
    """Frames (paths, bytes, HxWx3 uint8 arrays, PIL images) -> QwenImage with grid_thw (t, h/p, w/p)."""
    _check_mode(mode)
    if policy not in ("error", "resize"):
        raise ValueError(f"policy must be 'error' or 'resize', got {policy!r}")
    if isinstance(frames, np.ndarray) and frames.ndim == 4:
        frames = list(frames)
    if isinstance(frames, (str, bytes)) or not isinstance(frames, Sequence) or len(frames) == 0:
        raise ImageError("a video needs a non-empty list of frames")
    rgb = [_as_rgb(f, mode) for f in frames]
    h0, w0 = rgb[0].shape[:2]
    for i, f in enumerate(rgb[1:], 1):
        if f.shape[:2] != (h0, w0) and policy == "error":
            raise VideoFrameSizeError(f"video frame {i} is {f.shape[1]}x{f.shape[0]} but frame 0 is {w0}x{h0}: "
                                      f"all frames of a video must share one size (or pass policy='resize')")
    rh, rw = qwen2vl_resized_size(h0, w0, min_pixels=min_pixels, max_pixels=max_pixels, min_tokens=min_tokens,
                                  max_tokens=max_tokens, patch_size=patch_size, merge_size=merge_size, mode=mode)
    chw = []
    for f in rgb:
        if mode == "llamacpp":
            f = letterbox(f, (rh, rw), resample="bilinear", color=(0, 0, 0))
        else:
            f = resize(f, (rh, rw), resample=resample)
        chw.append(to_pixel_values(f, mean, std, mode=mode, rescale_factor=rescale_factor))
    patches, grid = patchify(np.stack(chw), patch_size=patch_size, merge_size=merge_size,
                             temporal_patch_size=temporal_patch_size)
    return QwenImage(pixel_values=patches, grid_thw=grid, resized_size=(rh, rw), original_size=(h0, w0),
                     n_tokens=grid[0] * grid[1] * grid[2] // (merge_size * merge_size))


def split_temporal_slots(video: QwenImage) -> list[QwenImage]:
    """One still-image-shaped chunk per temporal slot (frame pair), as llama.cpp feeds Qwen video: chunk k holds
    frames 2k, 2k + 1 with grid_thw (1, h, w). The ViT attends within one slot either way, so the chunks'
    embeddings equal the matching rows of the whole video's."""
    t, gh, gw = video.grid_thw
    n = gh * gw
    return [QwenImage(pixel_values=video.pixel_values[k * n:(k + 1) * n], grid_thw=(1, gh, gw),
                      resized_size=video.resized_size, original_size=video.original_size,
                      n_tokens=video.n_tokens // t) for k in range(t)]
