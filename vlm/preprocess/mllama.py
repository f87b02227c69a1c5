"""Llama 3.2 Vision (mllama) preprocessing: tiles + aspect-ratio ids, and the text-side cross-attention mask.

Pure functions with explicit parameters, pixel-exact with transformers' ``MllamaImageProcessorPil`` and
``processing_mllama`` (transformers 5.x). The image side, per image:

1. tile grid: every arrangement (rows, cols) with rows * cols <= `max_num_tiles`, in the order
   ``for rows in 1..N: for cols in 1..N`` (`supported_aspect_ratios`); each is a canvas of
   (rows * tile, cols * tile). The scale that fits the image into a canvas is min(canvas_h / h, canvas_w / w).
   Take the smallest scale >= 1 (the least upscaling) if any canvas allows upscaling, else the largest
   scale < 1 (the least downscaling); ties go to the smallest canvas area, then to the first in the order
   (`optimal_canvas`).
2. resize size: each side is first clamped to [tile, canvas side]; the side with the smaller scale keeps its
   clamped length and the other is floor(side * that scale) (at least 1, at most its clamped length)
   (`fit_to_canvas`). Resize with Pillow (bilinear by default) on uint8 RGB.
3. pad with zeros (black, before rescaling) at the bottom / right to the canvas; rescale, normalise
   (mean = std = 0.5 by default); cut row-major tiles of tile x tile.
4. aspect_ratio_id = 1 + index of (rows, cols) in `supported_aspect_ratios` (0 is batch padding);
   aspect_ratio_mask = 1 for the first rows * cols tiles out of `max_num_tiles`.

The real Llama 3.2 Vision checkpoints use tile 560 with 4 tiles (their preprocessor_config.json); HF's
``MllamaVisionConfig`` defaults to 448. The tile size always comes from the caller (GGUF / config).

Text side: every ``<|image|>`` token opens a span of text positions that attend to that image
(`cross_attention_spans`, HF ``get_cross_attention_token_mask``): until the next ``<|image|>``, the last one to
the end, and a run of adjacent markers all extend to where the run's last span ends. `cross_attention_mask`
makes HF's dense ``[length, n_images, max_num_tiles]`` 0/1 array; rows before the first marker are all zero
(no image visible). `cross_attention_bias` turns it into the additive bias and the "row sees some image" mask
that HF's decoder builds from it (``modeling_mllama._prepare_cross_attention_mask``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from typing import Sequence

import numpy as np

from vlm.preprocess.image import (
    IMAGENET_STANDARD_MEAN, IMAGENET_STANDARD_STD, ImageSource, _as_rgb, resize, to_pixel_values,
)

IMAGE_TOKEN = "<|image|>"
BOS_TOKEN = "<|begin_of_text|>"


class MllamaInputError(ValueError):
    """Prompt / image input that cannot be turned into mllama inputs (the message names the problem)."""


def _positive(name: str, v) -> int:
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or int(v) <= 0:
        raise ValueError(f"{name} must be a positive integer, got {v!r}")
    return int(v)


# ---------------------------------------------------------------------------------------------------------
# tile grid
# ---------------------------------------------------------------------------------------------------------

@lru_cache(maxsize=16)
def _supported(max_num_tiles: int) -> tuple[tuple[int, int], ...]:
    return tuple((a, b) for a in range(1, max_num_tiles + 1) for b in range(1, max_num_tiles + 1)
                 if a * b <= max_num_tiles)


def supported_aspect_ratios(max_num_tiles: int) -> list[tuple[int, int]]:
    """Tile arrangements (rows, cols) with rows * cols <= max_num_tiles, in HF's order; 4 ->
    [(1,1), (1,2), (1,3), (1,4), (2,1), (2,2), (3,1), (4,1)] (the vision config's ``supported_aspect_ratios``)."""
    return list(_supported(_positive("max_num_tiles", max_num_tiles)))


def aspect_ratio_id(rows: int, cols: int, max_num_tiles: int) -> int:
    """1-based index of the (rows, cols) arrangement (0 is reserved for batch padding)."""
    ratios = _supported(_positive("max_num_tiles", max_num_tiles))
    if (rows, cols) not in ratios:
        raise ValueError(f"tile grid {rows}x{cols} is not a supported aspect ratio for max_num_tiles="
                         f"{max_num_tiles} (supported: {list(ratios)})")
    return ratios.index((rows, cols)) + 1


def optimal_canvas(height: int, width: int, *, tile_size: int, max_num_tiles: int) -> tuple[int, int]:
    """(canvas_height, canvas_width), multiples of `tile_size`, for an image of `height` x `width` (rule 1 above).
    Scales are float64 quotients compared exactly, as HF's numpy code does."""
    height, width = _positive("image height", height), _positive("image width", width)
    tile_size = _positive("tile_size", tile_size)
    canvases = [(r * tile_size, c * tile_size) for r, c in _supported(_positive("max_num_tiles", max_num_tiles))]
    scales = [min(ch / height, cw / width) for ch, cw in canvases]
    up = [s for s in scales if s >= 1]
    selected = min(up) if up else max(scales)
    best = None
    for (ch, cw), s in zip(canvases, scales):
        if s == selected and (best is None or ch * cw < best[0] * best[1]):
            best = (ch, cw)
    return best


def fit_to_canvas(height: int, width: int, canvas_height: int, canvas_width: int, tile_size: int) -> tuple[int, int]:
    """(new_height, new_width) of the resized image (rule 2 above; HF ``get_image_size_fit_to_canvas``)."""
    target_w = min(max(width, tile_size), canvas_width)
    target_h = min(max(height, tile_size), canvas_height)
    scale_h, scale_w = target_h / height, target_w / width
    if scale_w < scale_h:
        return min(math.floor(height * scale_w) or 1, target_h), target_w
    return target_h, min(math.floor(width * scale_h) or 1, target_w)


@dataclass(frozen=True)
class MllamaGrid:
    rows: int                       # tiles along the height
    cols: int                       # tiles along the width
    resized_size: tuple[int, int]   # (height, width) the image is resized to, before padding to the canvas
    aspect_ratio_id: int            # 1-based id of (rows, cols)
    tile_size: int

    @property
    def num_tiles(self) -> int:
        return self.rows * self.cols

    @property
    def canvas_size(self) -> tuple[int, int]:
        return self.rows * self.tile_size, self.cols * self.tile_size


def mllama_grid(height: int, width: int, *, tile_size: int = 448, max_num_tiles: int = 4) -> MllamaGrid:
    """Tile grid, resize size and aspect-ratio id from the image size alone (no pixels needed)."""
    ch, cw = optimal_canvas(height, width, tile_size=tile_size, max_num_tiles=max_num_tiles)
    rows, cols = ch // tile_size, cw // tile_size
    return MllamaGrid(rows=rows, cols=cols, resized_size=fit_to_canvas(height, width, ch, cw, tile_size),
                      aspect_ratio_id=aspect_ratio_id(rows, cols, max_num_tiles), tile_size=tile_size)


# ---------------------------------------------------------------------------------------------------------
# pixels
# ---------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class MllamaImage:
    pixel_values: np.ndarray        # [rows * cols, 3, tile, tile] float32, row-major tiles
    grid: MllamaGrid
    aspect_ratio_mask: np.ndarray   # [max_num_tiles] int64: 1 for the real tiles

    @property
    def num_tiles(self) -> int:
        return self.grid.num_tiles

    @property
    def aspect_ratio_id(self) -> int:
        return self.grid.aspect_ratio_id


def split_into_tiles(pixels: np.ndarray, rows: int, cols: int) -> np.ndarray:
    """[C, rows * T, cols * T] -> [rows * cols, C, T, T], row-major (HF ``split_to_tiles``)."""
    c, h, w = pixels.shape
    if h % rows or w % cols:
        raise ValueError(f"a {h}x{w} canvas does not split into {rows}x{cols} equal tiles")
    th, tw = h // rows, w // cols
    t = pixels.reshape(c, rows, th, cols, tw).transpose(1, 3, 0, 2, 4)
    return np.ascontiguousarray(t.reshape(rows * cols, c, th, tw))


def preprocess_mllama(image: ImageSource, *, tile_size: int = 448, max_num_tiles: int = 4,
                      mean: Sequence[float] = IMAGENET_STANDARD_MEAN, std: Sequence[float] = IMAGENET_STANDARD_STD,
                      resample: str | int = "bilinear", rescale_factor: float = 1 / 255) -> MllamaImage:
    """One image -> its tiles (= ``MllamaImageProcessorPil`` with size {tile_size, tile_size} and
    max_image_tiles=`max_num_tiles`; anything `vlm.preprocess.image.decode_image` reads is accepted)."""
    tile_size = _positive("tile_size", tile_size)
    max_num_tiles = _positive("max_num_tiles", max_num_tiles)
    img = _as_rgb(image, "hf")
    h, w = img.shape[:2]
    grid = mllama_grid(h, w, tile_size=tile_size, max_num_tiles=max_num_tiles)
    img = resize(img, grid.resized_size, resample=resample, mode="hf")
    ch, cw = grid.canvas_size
    canvas = np.zeros((ch, cw, 3), np.uint8)          # HF pads uint8 with 0 before rescale / normalise
    canvas[:img.shape[0], :img.shape[1]] = img
    pv = to_pixel_values(canvas, mean, std, mode="hf", rescale_factor=rescale_factor)
    mask = np.zeros(max_num_tiles, np.int64)
    mask[:grid.num_tiles] = 1
    return MllamaImage(pixel_values=split_into_tiles(pv, grid.rows, grid.cols), grid=grid, aspect_ratio_mask=mask)


@dataclass(frozen=True)
class MllamaBatch:
    """HF's batched arrays: images padded to the longest sample, tiles to `max_num_tiles`."""
    pixel_values: np.ndarray        # [batch, max_images, max_num_tiles, 3, T, T] float32, zero padding
    aspect_ratio_ids: np.ndarray    # [batch, max_images] int64, 0 = padding
    aspect_ratio_mask: np.ndarray   # [batch, max_images, max_num_tiles] int64 (tile 0 is 1 even for padding)
    num_tiles: list[list[int]]


def pack_mllama(samples: Sequence[Sequence[MllamaImage]], max_num_tiles: int) -> MllamaBatch:
    """Stack per-sample image lists the way ``MllamaImageProcessor`` returns them."""
    max_num_tiles = _positive("max_num_tiles", max_num_tiles)
    if not samples or not any(len(s) for s in samples):
        raise MllamaInputError("no images to pack: every sample needs a list of images (at least one in the batch)")
    first = next(im for s in samples for im in s)
    _, c, th, tw = first.pixel_values.shape
    n_img = max(len(s) for s in samples)
    pv = np.zeros((len(samples), n_img, max_num_tiles, c, th, tw), np.float32)
    ids = np.zeros((len(samples), n_img), np.int64)
    mask = np.zeros((len(samples), n_img, max_num_tiles), np.int64)
    mask[:, :, 0] = 1
    for i, s in enumerate(samples):
        for j, im in enumerate(s):
            if im.pixel_values.shape[1:] != (c, th, tw):
                raise MllamaInputError(f"sample {i} image {j} has tiles of shape {im.pixel_values.shape[1:]}, "
                                       f"the first image {(c, th, tw)}: one tile size per batch")
            if im.num_tiles > max_num_tiles:
                raise MllamaInputError(f"sample {i} image {j} has {im.num_tiles} tiles > max_num_tiles "
                                       f"{max_num_tiles}")
            pv[i, j, :im.num_tiles] = im.pixel_values
            ids[i, j] = im.aspect_ratio_id
            mask[i, j, :im.num_tiles] = 1
    return MllamaBatch(pixel_values=pv, aspect_ratio_ids=ids, aspect_ratio_mask=mask,
                       num_tiles=[[im.num_tiles for im in s] for s in samples])


# ---------------------------------------------------------------------------------------------------------
# text side
# ---------------------------------------------------------------------------------------------------------

def add_bos(prompt: str, bos_token: str = BOS_TOKEN, image_token: str = IMAGE_TOKEN) -> str:
    """HF ``build_string_from_input``: prompts without `bos_token` get it after any leading image markers."""
    if bos_token in prompt:
        return prompt
    n = 0
    while prompt.startswith(image_token):
        prompt = prompt[len(image_token):]
        n += 1
    return f"{image_token * n}{bos_token}{prompt}"


def check_image_count(prompt: str, n_images: int, image_token: str = IMAGE_TOKEN) -> int:
    """Number of `image_token` markers in `prompt`; raises unless it equals `n_images`."""
    n = prompt.count(image_token)
    if n != n_images:
        raise MllamaInputError(f"the prompt has {n} {image_token} marker(s) but {n_images} image(s) were given; "
                               f"each image needs exactly one {image_token} where it belongs")
    return n


def image_marker_positions(token_ids: Sequence[int], image_token_id: int) -> list[int]:
    """Indices of the `image_token_id` tokens."""
    return [i for i, t in enumerate(token_ids) if t == image_token_id]


def cross_attention_spans(token_ids: Sequence[int], image_token_id: int) -> list[tuple[int, int]]:
    """Per image (in marker order), the half-open range [start, end) of text positions that attend to it.
    HF writes end = -1 for a lone image; here that is len(token_ids) (the dense mask is the same)."""
    locs = image_marker_positions(token_ids, image_token_id)
    if not locs:
        return []
    spans = [[a, b] for a, b in zip(locs[:-1], locs[1:])] + [[locs[-1], len(token_ids)]]
    # a run of adjacent markers (a span of length 1) attends wherever the run's last span ends
    end = spans[-1][1]
    for s in reversed(spans):
        if s[0] == s[1] - 1:
            s[1] = end
        end = s[1]
    return [(a, b) for a, b in spans]


def cross_attention_mask(token_ids: Sequence[int], num_tiles: Sequence[int], *, image_token_id: int,
                         max_num_tiles: int, length: int | None = None) -> np.ndarray:
    """Dense ``[length, n_images, max_num_tiles]`` int64 mask of one sequence (HF
    ``convert_sparse_cross_attention_mask_to_dense`` for one sample): 1 where text position t may attend to the
    tiles of image i. `num_tiles[i]` is image i's real tile count; `length` (default len(token_ids)) is the
    padded batch length (spans are cut there). Raises when markers and images do not pair up."""
    max_num_tiles = _positive("max_num_tiles", max_num_tiles)
    length = len(token_ids) if length is None else int(length)
    if length < len(token_ids):
        raise ValueError(f"length {length} is shorter than the sequence ({len(token_ids)} tokens)")
    spans = cross_attention_spans(token_ids, image_token_id)
    if len(spans) != len(num_tiles):
        raise MllamaInputError(f"the token ids hold {len(spans)} image marker(s) (id {image_token_id}) but "
                               f"{len(num_tiles)} image(s) were given")
    for i, n in enumerate(num_tiles):
        if not 1 <= int(n) <= max_num_tiles:
            raise ValueError(f"image {i} has {n} tiles; expected 1..max_num_tiles={max_num_tiles}")
    if len(spans) == 1:
        # HF keeps a lone image's end as -1 = "to the end of the padded batch length"; several images end at the
        # sequence's own length. Only padding rows differ, but the mask is HF's, bit for bit.
        spans = [(spans[0][0], length)]
    out = np.zeros((length, len(spans), max_num_tiles), np.int64)
    for i, ((a, b), n) in enumerate(zip(spans, num_tiles)):
        out[a:min(b, length), i, :int(n)] = 1
    return out


def cross_attention_mask_batch(batch_ids: Sequence[Sequence[int]], num_tiles: Sequence[Sequence[int]], *,
                               image_token_id: int, max_num_tiles: int) -> np.ndarray:
    """``[batch, max_len, max_images, max_num_tiles]``: what ``MllamaProcessor`` returns as cross_attention_mask
    (sequences padded to the longest, images to the most per sample)."""
    if len(batch_ids) != len(num_tiles):
        raise MllamaInputError(f"{len(batch_ids)} sequences but {len(num_tiles)} per-sample image lists")
    length = max(len(ids) for ids in batch_ids)
    per = [cross_attention_mask(ids, nt, image_token_id=image_token_id, max_num_tiles=max_num_tiles, length=length)
           for ids, nt in zip(batch_ids, num_tiles)]
    n_img = max(m.shape[1] for m in per)
    out = np.zeros((len(per), length, n_img, max_num_tiles), np.int64)
    for i, m in enumerate(per):
        out[i, :, :m.shape[1]] = m
    return out


def cross_attention_bias(mask, num_vision_tokens: int, dtype=None):
    """HF's decoder-side form of the dense mask: (bias ``[B, 1, L, n_images * max_num_tiles * num_vision_tokens]``,
    row_mask ``[B, 1, L, 1]``). bias is 0 where attention is allowed and finfo(dtype).min elsewhere; rows that
    see no image at all get bias 0 everywhere and row_mask 0 (the cross-attention output of those rows, and of
    the MLP after it, is multiplied by row_mask). `mask`: ``[B, L, n_images, max_num_tiles]`` (torch or numpy)."""
    import torch

    dtype = dtype or torch.float32
    m = torch.as_tensor(mask)
    if m.ndim != 4:
        raise ValueError(f"cross-attention mask must be [batch, length, n_images, max_num_tiles], got {tuple(m.shape)}")
    b, length = m.shape[:2]
    m = m.repeat_interleave(_positive("num_vision_tokens", num_vision_tokens), dim=3).reshape(b, length, -1)[:, None]
    inv = (1.0 - m).to(dtype)
    neg = torch.finfo(dtype).min
    bias = inv.masked_fill(inv.to(torch.bool), neg)
    row = (bias != neg).any(dim=-1).to(dtype)[..., None]
    return bias * row, row
