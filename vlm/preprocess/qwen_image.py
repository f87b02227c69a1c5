"""Qwen2-VL / Qwen2.5-VL image preprocessing: smart_resize, temporal patches, HF's flattened patch order.

HF (``Qwen2VLImageProcessor``): ``smart_resize`` with Python's ``round`` (ties to even) in double precision,
Pillow bicubic, rescale/normalise (CLIP mean/std), then patches flattened to ``[n_patches, C*T*p*p]``
(1176 = 3·2·14·14) in the order (grid_t, h/m, w/m, m, m | C, T, p, p) with grid_thw = (t, h/p, w/p).

llama.cpp (``qwen2vl_merger`` / ``qwen2.5vl_merger``, ``mtmd_image_preprocessor_dyn_size``): its
``calc_size_preserved_ratio`` (float32 maths, C ``round`` = half away from zero, sides at least one factor),
token limits 8..4096 (× (p·m)² pixels), then an align-corners bilinear *letterbox* (black) into that size.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, Sequence

import numpy as np

from vlm.preprocess.image import (
    OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, ImageError, ImageSource, Mode, _as_rgb, _check_mode, _F32, letterbox,
    resize, round_half_away, to_pixel_values,
)

HF_MIN_PIXELS = 56 * 56                 # Qwen2VLImageProcessor size["shortest_edge"]
HF_MAX_PIXELS = 28 * 28 * 1280          # size["longest_edge"]
LLAMACPP_MIN_TOKENS, LLAMACPP_MAX_TOKENS = 8, 4096  # clip.cpp set_limit_image_tokens(8, 4096)
MAX_ASPECT_RATIO = 200                  # HF smart_resize refuses more


def _llamacpp_bounds(height: int, width: int, h_bar: int, w_bar: int, f: int, min_pixels: int,
                     max_pixels: int) -> tuple[int, int]:
    """The min/max-pixel step of llama.cpp's calc_size_preserved_ratio, float32 as in the C++ (0 = off)."""
    if max_pixels > 0 and h_bar * w_bar > max_pixels:
        beta = np.sqrt(_F32(height) * _F32(width) / _F32(max_pixels))
        h_bar = max(f, int(np.floor((_F32(height) / beta) / _F32(f))) * f)
        w_bar = max(f, int(np.floor((_F32(width) / beta) / _F32(f))) * f)
    elif min_pixels > 0 and h_bar * w_bar < min_pixels:
        beta = np.sqrt(_F32(min_pixels) / (_F32(height) * _F32(width)))
        h_bar = int(np.ceil((_F32(height) * beta) / _F32(f))) * f
        w_bar = int(np.ceil((_F32(width) * beta) / _F32(f))) * f
    return h_bar, w_bar


def smart_resize(height: int, width: int, factor: int = 28, min_pixels: int = HF_MIN_PIXELS,
                 max_pixels: int = HF_MAX_PIXELS, *,
                 rounding: Literal["hf", "llamacpp"] = "hf") -> tuple[int, int]:
    """(height, width) with both sides multiples of `factor` and area within [min_pixels, max_pixels].

    ``hf``: HF's function — round(side / factor) with Python's round (2.5 -> 2), double precision; raises
    `ImageError` for an aspect ratio above 200.  A side that rounds to 0 (e.g. 14 px) leaves the area below
    the minimum, so it is scaled up.
    ``llamacpp``: llama.cpp's — C ``round`` (2.5 -> 3), every product/quotient in float32, each side at least
    `factor` before the bounds; no aspect-ratio limit.
    Too many pixels: beta = sqrt(h·w / max), sides floor(side / beta / f)·f (at least f).  Too few: beta =
    sqrt(min / (h·w)), sides ceil(side · beta / f)·f.
    """
    if height <= 0 or width <= 0:
        raise ImageError(f"empty image ({width}x{height} pixels)")
    if factor <= 0:
        raise ValueError(f"factor must be positive, got {factor}")
    if rounding == "llamacpp":
        h_bar = max(factor, round_half_away(_F32(height) / _F32(factor)) * factor)
        w_bar = max(factor, round_half_away(_F32(width) / _F32(factor)) * factor)
        return _llamacpp_bounds(height, width, h_bar, w_bar, factor, min_pixels, max_pixels)
    if rounding != "hf":
        raise ValueError(f"rounding must be 'hf' or 'llamacpp', got {rounding!r}")
    if max(height, width) / min(height, width) > MAX_ASPECT_RATIO:
        raise ImageError(f"aspect ratio of a {width}x{height} image is {max(height, width) / min(height, width):.1f}, "
                         f"above Qwen2-VL's limit of {MAX_ASPECT_RATIO}")
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def patchify(frames: np.ndarray, *, patch_size: int = 14, merge_size: int = 2,
             temporal_patch_size: int = 2) -> tuple[np.ndarray, tuple[int, int, int]]:
    """``[T, C, H, W]`` float32 (a still image: T = 1) -> (``[n_patches, C*tps*p*p]``, (grid_t, grid_h, grid_w)).

    T is padded to a multiple of `temporal_patch_size` by repeating the last frame (a still image fills both
    temporal slots with itself, as HF and llama.cpp do).  Patch rows follow HF: merge windows row-major, and
    inside a window its m×m patches row-major; each row is (C, T, p, p) flattened.
    """
    if frames.ndim != 4:
        raise ValueError(f"frames must be [T, C, H, W], got shape {frames.shape}")
    t, c, h, w = frames.shape
    unit = patch_size * merge_size
    if h % unit or w % unit:
        raise ValueError(f"frame size {h}x{w} is not a multiple of patch_size*merge_size = {unit}")
    if t % temporal_patch_size:
        pad = np.repeat(frames[-1:], temporal_patch_size - t % temporal_patch_size, axis=0)
        frames = np.concatenate([frames, pad])
        t = frames.shape[0]
    gt, gh, gw, m, p = t // temporal_patch_size, h // patch_size, w // patch_size, merge_size, patch_size
    x = frames.astype(np.float32, copy=False).reshape(gt, temporal_patch_size, c, gh // m, m, p, gw // m, m, p)
    # (gt, tps, C, bh, mh, ph, bw, mw, pw) -> (gt, bh, bw, mh, mw, C, tps, ph, pw)
    x = x.transpose(0, 3, 6, 4, 7, 2, 1, 5, 8)
    return np.ascontiguousarray(x).reshape(gt * gh * gw, c * temporal_patch_size * p * p), (gt, gh, gw)


@dataclass(frozen=True)
class QwenImage:
    pixel_values: np.ndarray          # [n_patches, C * temporal_patch_size * p * p] float32
    grid_thw: tuple[int, int, int]    # (1, resized_h / p, resized_w / p)
    resized_size: tuple[int, int]     # (height, width) after smart_resize: report it to the user
    original_size: tuple[int, int]    # (height, width) as decoded
    n_tokens: int                     # LLM tokens after the m×m merger: grid_h * grid_w / m²


def _pixel_limits(mode: Mode, factor: int, min_pixels, max_pixels, min_tokens, max_tokens) -> tuple[int, int]:
    """Tokens win over pixels; unset limits take the mode's default (HF pixels / llama.cpp tokens)."""
    llama = mode == "llamacpp"
    if min_tokens is not None:
        min_pixels = min_tokens * factor * factor
    elif min_pixels is None:
        min_pixels = LLAMACPP_MIN_TOKENS * factor * factor if llama else HF_MIN_PIXELS
    if max_tokens is not None:
        max_pixels = max_tokens * factor * factor
    elif max_pixels is None:
        max_pixels = LLAMACPP_MAX_TOKENS * factor * factor if llama else HF_MAX_PIXELS
    if min_pixels > max_pixels:
        raise ValueError(f"min_pixels {min_pixels} exceeds max_pixels {max_pixels}")
    return int(min_pixels), int(max_pixels)


def qwen2vl_resized_size(height: int, width: int, *, min_pixels: int | None = None, max_pixels: int | None = None,
                         min_tokens: int | None = None, max_tokens: int | None = None, patch_size: int = 14,
                         merge_size: int = 2, mode: Mode = "hf") -> tuple[int, int]:
    """The (height, width) `preprocess_qwen2vl` resizes to, without pixels (for token counting)."""
    _check_mode(mode)
    factor = patch_size * merge_size
    lo, hi = _pixel_limits(mode, factor, min_pixels, max_pixels, min_tokens, max_tokens)
    return smart_resize(height, width, factor, lo, hi, rounding=mode)


def preprocess_qwen2vl(image: ImageSource, *, min_pixels: int | None = None, max_pixels: int | None = None,
                       min_tokens: int | None = None, max_tokens: int | None = None, patch_size: int = 14,
                       merge_size: int = 2, temporal_patch_size: int = 2,
                       mean: Sequence[float] = OPENAI_CLIP_MEAN, std: Sequence[float] = OPENAI_CLIP_STD,
                       resample: str | int = "bicubic", rescale_factor: float = 1 / 255,
                       mode: Mode = "hf") -> QwenImage:
    """Qwen2-VL / Qwen2.5-VL still image -> flattened temporal patches.

    Pixel limits per call: `min_pixels`/`max_pixels`, or `min_tokens`/`max_tokens` (× (p·m)² pixels; they
    win when given).  Defaults: HF 3136 / 1,003,520 pixels; llama.cpp 8 / 4096 tokens.  Images outside the
    limits are resized into them; `resized_size` reports the result.  `resample` applies to hf mode
    (llama.cpp always letterboxes with its bilinear).
    """
    _check_mode(mode)
    img = _as_rgb(image, mode)
    h, w = img.shape[:2]
    rh, rw = qwen2vl_resized_size(h, w, min_pixels=min_pixels, max_pixels=max_pixels, min_tokens=min_tokens,
                                  max_tokens=max_tokens, patch_size=patch_size, merge_size=merge_size, mode=mode)
    if mode == "llamacpp":
        img = letterbox(img, (rh, rw), resample="bilinear", color=(0, 0, 0))
    else:
        img = resize(img, (rh, rw), resample=resample)
    chw = to_pixel_values(img, mean, std, mode=mode, rescale_factor=rescale_factor)
    patches, grid = patchify(chw[None], patch_size=patch_size, merge_size=merge_size,
                             temporal_patch_size=temporal_patch_size)
    return QwenImage(pixel_values=patches, grid_thw=grid, resized_size=(rh, rw), original_size=(h, w),
                     n_tokens=grid[1] * grid[2] // (merge_size * merge_size))
