"""MiniCPM-V llava-uhd slicing: best grid, overview + slice sizes, slice pixels and the placeholder text layout.

One image becomes an *overview* (the whole image, resized) plus, when it is large enough, a grid of *slices*
cut from a *refined* resize of it.  Everything is driven by one frozen `SliceConfig`, so the versions differ
only by data (no ``if version ==`` chains):

* ``MINICPMV4_6`` / ``MINICPMV4_6_4X`` — what transformers ships natively (``MiniCPMV4_6ImageProcessorPil`` +
  ``MiniCPMV4_6Processor``): pixel-exact with HF.  Sizes are aligned to ``patch_size * merge`` (merge 4 in
  "16x" mode = ViT window merger 2×2 then MLP merger 2×2; 2 in "4x" mode), tokens per entry =
  (h/p)·(w/p) / merge², slicing when ``ceil(w·h / S²) > 1``, grid ties go to more rows, Python rounding
  (half to even), an image that is not sliced is resized keeping its aspect ratio (upscaled if small).
* ``MINICPMV2_5_LLAMACPP`` / ``MINICPMV2_6_LLAMACPP`` — llama.cpp's ``resampler`` projector
  (tools/mtmd/mtmd-image.cpp ``mtmd_image_preprocessor_llava_uhd``, mtmd.cpp slice templates) for
  ``clip.minicpmv_version`` 2 (2.5) and 3 (2.6; 4/5/6/100045 share its layout): a fixed number of resampler
  queries per entry (``clip.minicpmv_query_num``; fallback 96 for version 2, else 64), slicing when *any side*
  > S, grid ties keep the first candidate (fewest columns), C ``round`` (half away from zero), float32 size
  maths, an unsliced image stretched to S×S, overview = llama.cpp bicubic stretch, refined = bicubic letterbox
  (PAD_CEIL, black), ``max_slice_nums`` fixed at 9.

Layouts (``T`` = the image placeholder token repeated n times):

* HF 4.6 and llama.cpp 2.6: ``[<image_id>i</image_id>]<image>T</image>`` then the rows of
  ``<slice>T</slice><slice>T</slice>…`` joined by ``"\\n"`` (no newline after the last row).
* llama.cpp 2.5: ``<image>T</image><slice>`` + rows of ``<image>T</image>…`` joined by ``"\\n"`` + ``</slice>``.

Grids are (rows, cols); sizes are (height, width).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Literal, Sequence

import numpy as np

from vlm.preprocess.image import (
    IMAGENET_STANDARD_MEAN, IMAGENET_STANDARD_STD, ImageSource, Mode, _as_rgb, letterbox, resize, round_half_away,
    to_pixel_values,
)

_F32 = np.float32


class SliceGridError(ValueError):
    """A slice grid or slice count beyond what the configuration allows."""


@dataclass(frozen=True)
class SliceConfig:
    """Every rule that differs between MiniCPM-V versions / implementations, as data."""
    name: str
    scale_resolution: int = 448         # S: the slice (and overview) target side
    patch_size: int = 14                # ViT patch
    merge: int = 4                      # sizes align to patch_size * merge; tokens = patches / merge²
    max_slice_nums: int = 9
    query_num: int | None = None        # resampler: fixed tokens per entry; None -> patches / merge²
    slice_when: Literal["area", "side"] = "area"          # HF: ceil(w·h/S²) > 1; llama.cpp: any side > S
    unsliced: Literal["keep_ratio", "square"] = "keep_ratio"  # HF: best_resize(allow_upscale); llama.cpp: S×S
    grid_ties: Literal["more_rows", "first"] = "more_rows"
    rounding: Literal["half_even", "half_away"] = "half_even"
    size_dtype: Literal["float64", "float32"] = "float64"  # Python floats vs llama.cpp's float
    mode: Mode = "hf"                   # pixel kernels (vlm.preprocess.image)
    layout: Literal["v2_5", "v2_6"] = "v2_6"
    use_image_id: bool = True           # HF prepends <image_id>i</image_id>; llama.cpp does not
    max_slice_nums_fixed: bool = False  # llama.cpp hard-codes max_slice_nums = 9
    mean: tuple[float, float, float] = IMAGENET_STANDARD_MEAN
    std: tuple[float, float, float] = IMAGENET_STANDARD_STD
    resample: str = "bicubic"
    rescale_factor: float = 1 / 255

    @property
    def align(self) -> int:
        return self.patch_size * self.merge

    def n_tokens(self, height: int, width: int) -> int:
        """Placeholder tokens for one overview / slice of this pixel size."""
        if self.query_num is not None:
            return self.query_num
        return (height // self.patch_size) * (width // self.patch_size) // (self.merge * self.merge)

    def with_options(self, *, max_slice_nums: int | None = None, downsample_mode: str | None = None) -> "SliceConfig":
        """The same version with HF's per-call options (``max_slice_nums``, ``downsample_mode`` "16x"/"4x")."""
        cfg = self
        if max_slice_nums is not None:
            if cfg.max_slice_nums_fixed and max_slice_nums != cfg.max_slice_nums:
                raise SliceGridError(f"{cfg.name}: max_slice_nums is fixed at {cfg.max_slice_nums} "
                                     f"(llama.cpp hard-codes it), got {max_slice_nums}")
            cfg = replace(cfg, max_slice_nums=int(max_slice_nums))
        if downsample_mode is not None:
            if cfg.query_num is not None:
                raise ValueError(f"{cfg.name}: downsample_mode applies to the merger models (4.6), not to a resampler")
            if downsample_mode not in ("16x", "4x"):
                raise ValueError(f"downsample_mode must be '16x' or '4x', got {downsample_mode!r}")
            cfg = replace(cfg, merge=4 if downsample_mode == "16x" else 2)
        _check_config(cfg)
        return cfg


def _check_config(cfg: SliceConfig) -> None:
    if cfg.max_slice_nums < 1:
        raise SliceGridError(f"{cfg.name}: max_slice_nums must be >= 1, got {cfg.max_slice_nums}")
    if cfg.scale_resolution <= 0 or cfg.patch_size <= 0 or cfg.merge <= 0:
        raise ValueError(f"{cfg.name}: scale_resolution, patch_size and merge must be positive")


MINICPMV4_6 = SliceConfig(name="minicpmv4_6")
MINICPMV4_6_4X = replace(MINICPMV4_6, name="minicpmv4_6_4x", merge=2)
_LLAMACPP = dict(merge=1, slice_when="side", unsliced="square", grid_ties="first", rounding="half_away",
                 size_dtype="float32", mode="llamacpp", use_image_id=False, max_slice_nums_fixed=True)
MINICPMV2_5_LLAMACPP = SliceConfig(name="minicpmv2_5_llamacpp", query_num=96, layout="v2_5", **_LLAMACPP)
MINICPMV2_6_LLAMACPP = SliceConfig(name="minicpmv2_6_llamacpp", query_num=64, layout="v2_6", **_LLAMACPP)

# llama.cpp clip.minicpmv_version -> its slicing config (2 = 2.5; 3 = 2.6, 4 = o-2.6, 5 = 4.0, 6 = 4.5,
# 100045 = o-4.5 share the 2.6 template and 64 queries).  Version 0 means "unset" and defaults to 2.
LLAMACPP_MINICPMV_VERSIONS = {2: MINICPMV2_5_LLAMACPP, 3: MINICPMV2_6_LLAMACPP, 4: MINICPMV2_6_LLAMACPP,
                              5: MINICPMV2_6_LLAMACPP, 6: MINICPMV2_6_LLAMACPP, 100045: MINICPMV2_6_LLAMACPP}


def llamacpp_config(minicpmv_version: int, *, query_num: int | None = None, image_size: int = 448,
                    patch_size: int = 14, mean: Sequence[float] | None = None,
                    std: Sequence[float] | None = None) -> SliceConfig:
    """The config llama.cpp derives from an mmproj: ``clip.minicpmv_version`` (0 -> 2), optional
    ``clip.minicpmv_query_num`` (0/None -> the version's fallback), ``clip.vision.image_size/patch_size``, mean/std."""
    v = 2 if minicpmv_version == 0 else int(minicpmv_version)
    if v not in LLAMACPP_MINICPMV_VERSIONS:
        raise ValueError(f"unsupported minicpmv version: {minicpmv_version} "
                         f"(llama.cpp knows {sorted(LLAMACPP_MINICPMV_VERSIONS)})")
    cfg = LLAMACPP_MINICPMV_VERSIONS[v]
    kw = dict(scale_resolution=int(image_size), patch_size=int(patch_size))
    if query_num:
        kw["query_num"] = int(query_num)
    if mean is not None:
        kw["mean"] = tuple(float(m) for m in mean)
    if std is not None:
        kw["std"] = tuple(float(s) for s in std)
    return replace(cfg, **kw)


# ---------------------------------------------------------------------------------------------------------
# size maths (from (height, width) alone: token counts never need the pixels)
# ---------------------------------------------------------------------------------------------------------

def _round(x, cfg: SliceConfig) -> int:
    return round_half_away(x) if cfg.rounding == "half_away" else round(float(x))


def ensure_divide(length, divisor: int, cfg: SliceConfig = MINICPMV4_6) -> int:
    """max(round(length / divisor) * divisor, divisor) with the config's rounding and float width."""
    q = _F32(length) / _F32(divisor) if cfg.size_dtype == "float32" else length / divisor
    return max(_round(q, cfg) * divisor, divisor)


def best_resize(height, width, cfg: SliceConfig = MINICPMV4_6, *, allow_upscale: bool = False) -> tuple[int, int]:
    """HF ``find_best_resize`` / llama.cpp ``get_best_resize``: if the area exceeds S² (or upscaling is
    allowed) rescale to area ≈ S² keeping the ratio (h = int(S / sqrt(w/h)), w = int(h · w/h)); then align
    both sides to ``patch_size * merge``."""
    S = cfg.scale_resolution
    if height * width > S * S or allow_upscale:
        if cfg.size_dtype == "float32":
            r = _F32(width) / _F32(height)
            height = int(_F32(S) / np.sqrt(r))
            width = int(_F32(height) * r)
        else:
            r = width / height
            height = int(S / math.sqrt(r))
            width = int(height * r)
    return ensure_divide(height, cfg.align, cfg), ensure_divide(width, cfg.align, cfg)


def refine_size(height: int, width: int, grid: tuple[int, int], cfg: SliceConfig = MINICPMV4_6) -> tuple[int, int]:
    """Size of the image the slices are cut from: each side rounded to a multiple of the grid, one cell
    best-resized (upscaling allowed), times the grid."""
    rows, cols = grid
    rh, rw = ensure_divide(height, rows, cfg), ensure_divide(width, cols, cfg)
    ch, cw = best_resize(rh // rows, rw // cols, cfg, allow_upscale=True)
    return ch * rows, cw * cols


def _candidate_grids(multiple: int, cfg: SliceConfig) -> list[tuple[int, int]]:
    """(rows, cols) for the slice counts multiple-1, multiple, multiple+1 (not 1, not > max), in each
    implementation's iteration order: HF by rows ascending, llama.cpp by columns ascending."""
    out = []
    for n in (multiple - 1, multiple, multiple + 1):
        if n == 1 or n > cfg.max_slice_nums or n < 1:
            continue
        divisors = [d for d in range(1, n + 1) if n % d == 0]
        if cfg.grid_ties == "more_rows":
            out += [(d, n // d) for d in divisors]
        else:
            out += [(n // d, d) for d in divisors]
    return out


def slice_grid(height: int, width: int, cfg: SliceConfig = MINICPMV4_6) -> tuple[int, int] | None:
    """Best (rows, cols) for the image's aspect ratio, or None when the image is not sliced.

    multiple = min(ceil(w·h / S²), max_slice_nums); candidates as `_candidate_grids`; pick the grid whose
    log(cols/rows) is closest to log(w/h).  Ties: HF takes the one with more rows, llama.cpp the first."""
    _check_config(cfg)
    if height <= 0 or width <= 0:
        raise ValueError(f"image size must be positive, got {height}x{width}")
    S = cfg.scale_resolution
    f32 = cfg.size_dtype == "float32"
    if cfg.slice_when == "side" and not (width > S or height > S):
        return None
    ratio = _F32(width) * _F32(height) / _F32(S * S) if f32 else width * height / (S * S)
    multiple = int(min(math.ceil(ratio), cfg.max_slice_nums))
    if cfg.slice_when == "area" and multiple <= 1:
        return None
    log_ratio = np.log(_F32(width) / _F32(height)) if f32 else math.log(width / height)
    best, best_err = (1, 1), float("inf")
    for rows, cols in _candidate_grids(multiple, cfg):
        err = abs(log_ratio - (np.log(_F32(cols) / _F32(rows)) if f32 else math.log(cols / rows)))
        if err < best_err:
            best, best_err = (rows, cols), err
        elif err == best_err and cfg.grid_ties == "more_rows" and rows > best[0]:
            best = (rows, cols)
    return best


def check_grid(grid: tuple[int, int], cfg: SliceConfig = MINICPMV4_6) -> tuple[int, int]:
    """Validate an explicit (rows, cols) grid against the configuration (bad input -> SliceGridError)."""
    rows, cols = (int(g) for g in grid)
    if rows < 1 or cols < 1:
        raise SliceGridError(f"slice grid must be at least 1x1, got {rows}x{cols}")
    if rows * cols > cfg.max_slice_nums:
        raise SliceGridError(f"slice grid {rows}x{cols} = {rows * cols} slices exceeds "
                             f"max_slice_nums {cfg.max_slice_nums} ({cfg.name})")
    return rows, cols


@dataclass(frozen=True)
class SlicePlan:
    """What one image becomes, from its size alone."""
    image_size: tuple[int, int]             # (height, width) of the input
    overview_size: tuple[int, int]          # (height, width) of the overview
    grid: tuple[int, int] | None            # (rows, cols), None when not sliced
    refined_size: tuple[int, int] | None    # (height, width) the slices are cut from
    slice_size: tuple[int, int] | None      # (height, width) of every slice
    n_tokens: tuple[int, ...]               # placeholder tokens: overview, then slices row-major

    @property
    def n_slices(self) -> int:
        return 0 if self.grid is None else self.grid[0] * self.grid[1]

    @property
    def sizes(self) -> list[tuple[int, int]]:
        """(height, width) of every entry: overview, then slices."""
        return [self.overview_size] + [self.slice_size] * self.n_slices

    @property
    def total_tokens(self) -> int:
        return sum(self.n_tokens)


def slice_plan(height: int, width: int, cfg: SliceConfig = MINICPMV4_6, *, grid: tuple[int, int] | None = None,
               slice_mode: bool = True) -> SlicePlan:
    """Overview size, grid, refined and slice sizes and token counts of an image of (height, width).

    `grid` overrides the chosen grid (checked against ``max_slice_nums``); ``slice_mode=False`` (HF) disables
    slicing: the overview alone, resized keeping its ratio."""
    if height <= 0 or width <= 0:
        raise ValueError(f"image size must be positive, got {height}x{width}")
    if grid is not None:
        grid = check_grid(grid, cfg)
    elif slice_mode:
        grid = slice_grid(height, width, cfg)
    if grid is None and cfg.unsliced == "square" and slice_mode:
        ov = (cfg.scale_resolution, cfg.scale_resolution)
    else:
        # HF: upscaling allowed exactly when the image is not sliced; llama.cpp: never for a sliced image
        ov = best_resize(height, width, cfg, allow_upscale=grid is None)
    if grid is None:
        return SlicePlan((height, width), ov, None, None, None, (cfg.n_tokens(*ov),))
    rf = refine_size(height, width, grid, cfg)
    sl = (rf[0] // grid[0], rf[1] // grid[1])
    n = (cfg.n_tokens(*ov),) + (cfg.n_tokens(*sl),) * (grid[0] * grid[1])
    return SlicePlan((height, width), ov, grid, rf, sl, n)


# ---------------------------------------------------------------------------------------------------------
# placeholder text
# ---------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Markers:
    """Marker strings (HF reads them from the tokenizer: ``tokenizer.image_start_token`` …)."""
    image_token: str = "<unk>"
    image_start: str = "<image>"
    image_end: str = "</image>"
    slice_start: str = "<slice>"
    slice_end: str = "</slice>"
    image_id_start: str = "<image_id>"
    image_id_end: str = "</image_id>"
    row_sep: str = "\n"


def placeholder_text(plan: SlicePlan, cfg: SliceConfig = MINICPMV4_6, *, markers: Markers = Markers(),
                     image_id: int | None = None) -> str:
    """The text that stands for one image in the prompt (see the module docstring for the two layouts).

    `image_id`: the image's index within its prompt (HF ``use_image_id``); ignored when the config has no
    image ids (llama.cpp)."""
    m = markers
    text = ""
    if image_id is not None and cfg.use_image_id:
        text += f"{m.image_id_start}{int(image_id)}{m.image_id_end}"
    text += m.image_start + m.image_token * plan.n_tokens[0] + m.image_end
    if plan.grid is None:
        return text
    rows, cols = plan.grid
    if cfg.layout == "v2_5":
        cell = [m.image_start + m.image_token * n + m.image_end for n in plan.n_tokens[1:]]
    else:
        cell = [m.slice_start + m.image_token * n + m.slice_end for n in plan.n_tokens[1:]]
    body = m.row_sep.join("".join(cell[r * cols:(r + 1) * cols]) for r in range(rows))
    return text + (m.slice_start + body + m.slice_end if cfg.layout == "v2_5" else body)


# ---------------------------------------------------------------------------------------------------------
# pixels
# ---------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class MiniCPMVImage:
    """One preprocessed image: the overview first, then the slices row-major, each ``[3, h, w]`` float32."""
    pixel_values: list[np.ndarray]
    plan: SlicePlan
    patch_size: int = 14

    @property
    def target_sizes(self) -> np.ndarray:
        """[n_entries, 2] int32 patch grid (h/p, w/p) per entry (HF ``target_sizes``)."""
        p = self.patch_size
        return np.array([[pv.shape[1] // p, pv.shape[2] // p] for pv in self.pixel_values], dtype=np.int32)


def slice_images(image: np.ndarray, plan: SlicePlan, cfg: SliceConfig = MINICPMV4_6) -> list[np.ndarray]:
    """uint8 ``[H, W, 3]`` -> [overview, *slices] uint8, resized with the config's kernels."""
    llama = cfg.mode == "llamacpp"
    overview = resize(image, plan.overview_size, resample=cfg.resample, mode=cfg.mode)
    if plan.grid is None:
        return [overview]
    if llama:   # refined: PAD_CEIL letterbox with llama.cpp's bicubic, black fill
        refined = letterbox(image, plan.refined_size, resample=cfg.resample, color=(0, 0, 0), mode="llamacpp")
    else:
        refined = resize(image, plan.refined_size, resample=cfg.resample, mode="hf")
    sh, sw = plan.slice_size
    rows, cols = plan.grid
    return [overview] + [refined[r * sh:(r + 1) * sh, c * sw:(c + 1) * sw] for r in range(rows) for c in range(cols)]


def preprocess_minicpmv(image: ImageSource, cfg: SliceConfig = MINICPMV4_6, *, grid: tuple[int, int] | None = None,
                        slice_mode: bool = True) -> MiniCPMVImage:
    """Decode (like `vlm.preprocess.image.decode_image` in the config's mode), plan, resize, cut and
    normalise: ``MiniCPMV4_6ImageProcessorPil`` exactly for the HF configs."""
    img = _as_rgb(image, cfg.mode)
    plan = slice_plan(img.shape[0], img.shape[1], cfg, grid=grid, slice_mode=slice_mode)
    pv = [to_pixel_values(e, cfg.mean, cfg.std, mode=cfg.mode, rescale_factor=cfg.rescale_factor)
          for e in slice_images(img, plan, cfg)]
    return MiniCPMVImage(pixel_values=pv, plan=plan, patch_size=cfg.patch_size)


def pack_patches(pixel_values: Sequence[np.ndarray], patch_size: int = 14) -> np.ndarray:
    """NaViT packing (HF ``reshape_by_patch`` + concat): ``[3, h, w]`` entries -> ``[1, 3, p, Σ h·w/p]``.

    Within an entry, patches are row-major and each p×p patch contributes its p rows side by side:
    out[0, c, i, k·p + j] = entry[c, (k // nw)·p + i, (k % nw)·p + j] for patch k of an entry nw patches wide."""
    parts = []
    for pv in pixel_values:
        c, h, w = pv.shape
        if h % patch_size or w % patch_size:
            raise ValueError(f"entry {h}x{w} is not a multiple of the patch size {patch_size}")
        x = pv.reshape(c, h // patch_size, patch_size, w // patch_size, patch_size).transpose(0, 2, 1, 3, 4)
        parts.append(x.reshape(c, patch_size, -1))
    return np.concatenate(parts, axis=-1)[np.newaxis]
