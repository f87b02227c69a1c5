"""Tiled image layouts: Idefics3 / SmolVLM tile grid + global image, Gemma 3 pan-and-scan crops.

Pure functions over ``[H, W, 3]`` uint8 arrays (see `vlm.preprocess.image` for decoding and the two modes).
Size helpers work from (height, width) alone, so token counts never need the pixels.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from vlm.preprocess.image import (
    IMAGENET_STANDARD_MEAN, IMAGENET_STANDARD_STD, ImageSource, Mode, _as_rgb, _check_mode, _check_rgb, _F32,
    letterbox, resize, to_pixel_values,
)

# HF idefics3: never resize beyond 4k on a side (MAX_IMAGE_SIZE in image_processing_idefics3)
IDEFICS3_MAX_IMAGE_SIZE = 4096


@dataclass(frozen=True)
class TiledImage:
    """Tiles in row-major order, then the global (overview) image, all ``[3, S, S]`` float32.

    rows/cols: the tile grid for the token layout (``<row_R_col_C>`` markers).  HF reports 0/0 when the image
    is not split (then `pixel_values` holds only the global image); llama.cpp always has a grid (≥ 1×1).
    """
    pixel_values: np.ndarray  # [rows * cols + 1, 3, S, S] float32
    rows: int
    cols: int
    resized_size: tuple[int, int]  # (height, width) of the image that was cut into tiles

    @property
    def tiles(self) -> np.ndarray:
        return self.pixel_values[:-1]

    @property
    def global_image(self) -> np.ndarray:
        return self.pixel_values[-1]


# ---------------------------------------------------------------------------------------------------------
# Idefics3 / SmolVLM — HF rules
# ---------------------------------------------------------------------------------------------------------

def idefics3_resize_size_hf(height: int, width: int, longest_edge: int) -> tuple[int, int]:
    """HF: longest side -> `longest_edge` (upscaling too), the other int(side / aspect), odd +1; then shrink
    to at most 4096 on a side."""
    aspect = width / height
    if width >= height:
        width = longest_edge
        height = int(width / aspect)
        height += height % 2
    else:
        height = longest_edge
        width = int(height * aspect)
        width += width % 2
    height, width = max(height, 1), max(width, 1)
    aspect = width / height
    if width >= height and width > IDEFICS3_MAX_IMAGE_SIZE:
        width = IDEFICS3_MAX_IMAGE_SIZE
        height = int(width / aspect)
    elif height > width and height > IDEFICS3_MAX_IMAGE_SIZE:
        height = IDEFICS3_MAX_IMAGE_SIZE
        width = int(height * aspect)
    return max(height, 1), max(width, 1)


def idefics3_tiled_size_hf(height: int, width: int, tile_size: int) -> tuple[int, int]:
    """HF ``resize_for_vision_encoder``: the longer side ceil'd to a multiple of `tile_size`, the other
    int(long / aspect) then ceil'd too."""
    aspect = width / height
    if width >= height:
        width = math.ceil(width / tile_size) * tile_size
        height = math.ceil(int(width / aspect) / tile_size) * tile_size
    else:
        height = math.ceil(height / tile_size) * tile_size
        width = math.ceil(int(height * aspect) / tile_size) * tile_size
    return height, width


# ---------------------------------------------------------------------------------------------------------
# Idefics3 / SmolVLM — llama.cpp rules
# ---------------------------------------------------------------------------------------------------------

def idefics3_refined_size_llamacpp(height: int, width: int, longest_edge: int, tile_size: int,
                                   min_pixels: int = 0, max_pixels: int = 0) -> tuple[int, int]:
    """llama.cpp ``calc_size_preserved_ratio`` with ``longest_edge`` (float32 maths): scale =
    min(L/w, L/h), each side ceil'd to a multiple of `tile_size`; then the optional min/max pixel bounds
    (0 = off, the default unless ``--image-min/max-tokens`` are given)."""
    from vlm.preprocess.qwen_image import _llamacpp_bounds  # shared float32 min/max step
    f = _F32(tile_size)
    scale = min(_F32(longest_edge) / _F32(width), _F32(longest_edge) / _F32(height))
    w_bar = int(np.ceil((_F32(width) * scale) / f)) * tile_size
    h_bar = int(np.ceil((_F32(height) * scale) / f)) * tile_size
    return _llamacpp_bounds(height, width, h_bar, w_bar, tile_size, min_pixels, max_pixels)


def idefics3_grid(height: int, width: int, *, longest_edge: int = 4 * 364, tile_size: int = 364,
                  split: bool = True, mode: Mode = "hf") -> tuple[int, int]:
    """(rows, cols) of the tile grid for an image of this size, without pixels (HF's
    ``get_number_of_image_patches`` rule, or llama.cpp's)."""
    _check_mode(mode)
    if mode == "llamacpp":
        h, w = idefics3_refined_size_llamacpp(height, width, longest_edge, tile_size)
        return -(-h // tile_size), -(-w // tile_size)
    if not split:
        return 0, 0
    h, w = idefics3_tiled_size_hf(*idefics3_resize_size_hf(height, width, longest_edge), tile_size)
    if h > tile_size or w > tile_size:
        return h // tile_size, w // tile_size
    return 0, 0


def split_tiles(image: np.ndarray, tile_size: int) -> list[np.ndarray]:
    """Cut row-major tiles of at most `tile_size` (edge tiles may be smaller when the size is not a multiple)."""
    h, w = image.shape[:2]
    return [image[y:y + tile_size, x:x + tile_size] for y in range(0, h, tile_size) for x in range(0, w, tile_size)]


def preprocess_idefics3(image: ImageSource, *, longest_edge: int = 4 * 364, tile_size: int = 364,
                        split: bool = True, mean: Sequence[float] = IMAGENET_STANDARD_MEAN,
                        std: Sequence[float] = IMAGENET_STANDARD_STD, resample: str | int = "lanczos",
                        rescale_factor: float = 1 / 255, mode: Mode = "hf") -> TiledImage:
    """Idefics3 / SmolVLM tiles + global image.

    ``hf`` = ``Idefics3ImageProcessor`` / ``SmolVLMImageProcessor`` (identical): resize the longest edge to
    `longest_edge` (lanczos), resize again so both sides are multiples of `tile_size`; if larger than one
    tile, cut row-major tiles and add the whole resized image shrunk to a tile as the global image; else the
    image is the only (global) entry with rows = cols = 0.  `split=False`: one tile-sized image.  SmolVLM:
    ``longest_edge=1536, tile_size=384`` (v1) or ``2048, 512`` (v2) from its preprocessor_config.
    ``llamacpp`` = ``idefics3`` projector: refined size by `idefics3_refined_size_llamacpp`, letterboxed
    there with its bicubic (black), tiles cut from it; the overview is the original stretched to a tile with
    its bilinear.  `longest_edge` is ``clip.vision.preproc_image_size``, `tile_size` the encoder image size.
    """
    _check_mode(mode)
    img = _as_rgb(image, mode)
    h, w = img.shape[:2]
    if mode == "llamacpp":
        rh, rw = idefics3_refined_size_llamacpp(h, w, longest_edge, tile_size)
        refined = letterbox(img, (rh, rw), resample="bicubic", color=(0, 0, 0))
        tiles = split_tiles(refined, tile_size)
        overview = resize(img, (tile_size, tile_size), resample="bilinear", mode="llamacpp")
        rows, cols = -(-rh // tile_size), -(-rw // tile_size)
        resized = (rh, rw)
    elif not split:
        tiles, rows, cols = [], 0, 0
        overview = resize(resize(img, idefics3_resize_size_hf(h, w, longest_edge), resample=resample),
                          (tile_size, tile_size), resample=resample)
        resized = (tile_size, tile_size)
    else:
        img = resize(img, idefics3_resize_size_hf(h, w, longest_edge), resample=resample)
        img = resize(img, idefics3_tiled_size_hf(*img.shape[:2], tile_size), resample=resample)
        resized = img.shape[:2]
        if resized[0] > tile_size or resized[1] > tile_size:
            tiles = split_tiles(img, tile_size)
            rows, cols = resized[0] // tile_size, resized[1] // tile_size
            overview = resize(img, (tile_size, tile_size), resample=resample)
        else:
            tiles, rows, cols, overview = [], 0, 0, img
    pv = np.stack([to_pixel_values(t, mean, std, mode=mode, rescale_factor=rescale_factor)
                   for t in [*tiles, overview]])
    return TiledImage(pixel_values=pv, rows=rows, cols=cols, resized_size=(int(resized[0]), int(resized[1])))


# ---------------------------------------------------------------------------------------------------------
# Gemma 3 pan-and-scan (HF only; llama.cpp has none)
# ---------------------------------------------------------------------------------------------------------

def gemma3_pan_and_scan_grid(height: int, width: int, *, min_crop_size: int = 256, max_num_crops: int = 4,
                             min_ratio_to_activate: float = 1.2) -> tuple[int, int]:
    """(rows, cols) of HF Gemma 3 pan-and-scan crops; (0, 0) when it does not apply."""
    if width >= height:
        if width / height < min_ratio_to_activate:
            return 0, 0
        cols = min(int(math.floor(width / height + 0.5)), int(math.floor(width / min_crop_size)))
        rows, cols = 1, min(max_num_crops, max(2, cols))
    else:
        if height / width < min_ratio_to_activate:
            return 0, 0
        rows = min(int(math.floor(height / width + 0.5)), int(math.floor(height / min_crop_size)))
        rows, cols = min(max_num_crops, max(2, rows)), 1
    if min(math.ceil(width / cols), math.ceil(height / rows)) < min_crop_size:
        return 0, 0
    return rows, cols


def gemma3_pan_and_scan(image: np.ndarray, *, min_crop_size: int = 256, max_num_crops: int = 4,
                        min_ratio_to_activate: float = 1.2) -> list[np.ndarray]:
    """HF ``Gemma3ImageProcessor.pan_and_scan``: crops of ceil(W/cols) × ceil(H/rows) from the original
    image, row-major (the last may be smaller).  The model input is [image, *crops], each through
    `preprocess_gemma3`; [] when the aspect ratio is below the threshold or crops would be too small."""
    _check_rgb(image)
    h, w = image.shape[:2]
    rows, cols = gemma3_pan_and_scan_grid(h, w, min_crop_size=min_crop_size, max_num_crops=max_num_crops,
                                          min_ratio_to_activate=min_ratio_to_activate)
    if rows == 0:
        return []
    ch, cw = math.ceil(h / rows), math.ceil(w / cols)
    return [image[r * ch:(r + 1) * ch, c * cw:(c + 1) * cw] for r in range(rows) for c in range(cols)]
