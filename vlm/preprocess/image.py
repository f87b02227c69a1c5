"""Image decoding and pixel preprocessing: pure functions with explicit parameters.

Two modes, chosen per call (`mode=`):

* ``"hf"`` (default) — pixel-exact with the Hugging Face ``*ImageProcessorPil`` processors (transformers 5.x):
  resizing goes through Pillow on uint8 RGB, rescale is ``float64(v) * (1/255)`` cast to float32, normalise is
  ``(x - mean) / std`` in float32 — the same operations in the same order, so the outputs are bit-identical.
* ``"llamacpp"`` — llama.cpp's own rules (tools/mtmd/mtmd-image.cpp, clip.cpp): its align-corners bilinear
  (truncated to u8), its custom 4-tap bicubic (no half-pixel offset, rounded), letterbox padding ("PAD_CEIL":
  scale by min(tw/w, th/h), ceil the new size, centre with floor offsets), ``v / 255.0f`` then
  ``(x - mean) / std`` in float32.  All scalar size maths is emulated in float32 as the C++ does it.  We
  evaluate strict IEEE float32 without fused multiply-add; a llama.cpp build that contracts ``a*b+c`` into FMA
  can differ by one grey level on rare pixels.

Decoding (`decode_image`) always yields an ``[H, W, 3]`` uint8 RGB array:

* EXIF orientation: applied in ``hf`` mode (HF's ``load_image`` calls ``ImageOps.exif_transpose``); not in
  ``llamacpp`` mode (stb_image ignores EXIF).
* Alpha: ``hf`` default ``"white"`` — HF processors (``convert_to_rgb``) composite RGBA/LA/PA and palette
  transparency onto white (Pillow ``alpha_composite`` for PIL input; ``round(a*rgb + (1-a)*255)`` for arrays).
  HF's ``load_image`` (path/URL inputs, chat templates) instead calls ``convert("RGB")``, which drops alpha:
  pass ``alpha="drop"`` for parity with that route.  ``llamacpp`` default ``"drop"``: ``stbi_load(..., 3)``
  keeps the colour channels and discards alpha.
* 16-bit greyscale (``I;16``/``I``): ``hf`` uses Pillow's ``convert("RGB")``, which *clips* values to 255 (what
  HF does, so most of a 16-bit image saturates); ``llamacpp`` keeps the high byte (``v >> 8``) like stb_image.
  16-bit RGB(A) PNGs are already reduced to their high byte by Pillow's decoder, like stb_image.
* Palette, ``1``, ``L``, ``CMYK``, ``YCbCr``, ``HSV``, ``F``: Pillow's conversion.  ``LAB`` and ``La`` are refused
  (Pillow has no colorimetric LAB→RGB; ``La`` cannot be converted).  Lossy formats (JPEG) may still differ from
  llama.cpp by decoder (libjpeg-turbo vs stb_image IDCT/upsampling); lossless formats decode identically.
* Decompression bombs: the pixel count is checked against ``max_pixels`` from the header, before any pixel is
  decoded, with our own `ImageTooLargeError`.  Pillow's global ``Image.MAX_IMAGE_PIXELS`` is never touched: we
  open through Pillow's plugin registry, which skips Pillow's own global check.
"""
from __future__ import annotations

import io
import os
import struct
import threading
import zlib
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Literal, Sequence, Union

import numpy as np
from PIL import Image, ImageOps

Mode = Literal["hf", "llamacpp"]
MODES = ("hf", "llamacpp")
Size = Union[int, Sequence[int]]
ImageSource = Union[str, os.PathLike, bytes, bytearray, memoryview, np.ndarray, Image.Image]

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGENET_STANDARD_MEAN = (0.5, 0.5, 0.5)
IMAGENET_STANDARD_STD = (0.5, 0.5, 0.5)
# Pillow's own hard limit (2 * its default MAX_IMAGE_PIXELS), fixed here so a caller's change to Pillow's
# global does not change our behaviour.
DEFAULT_MAX_PIXELS = 2 * 89_478_485

_F32 = np.float32
_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")
_REFUSED_MODES = {"LAB": "Pillow has no colorimetric LAB->RGB conversion; convert it with PIL.ImageCms first"}
_PIL_FILTERS = {
    "nearest": Image.Resampling.NEAREST, "box": Image.Resampling.BOX, "bilinear": Image.Resampling.BILINEAR,
    "hamming": Image.Resampling.HAMMING, "bicubic": Image.Resampling.BICUBIC, "lanczos": Image.Resampling.LANCZOS,
}
_LLAMACPP_FILTERS = ("bilinear", "bicubic")


class ImageError(ValueError):
    """An image that cannot be decoded or preprocessed (corrupt, truncated, empty, unsupported mode...)."""


class ImageTooLargeError(ImageError):
    """The image has more pixels than the configured limit (decompression-bomb guard)."""


def _check_mode(mode: str) -> None:
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")


# ---------------------------------------------------------------------------------------------------------
# decoding
# ---------------------------------------------------------------------------------------------------------

def read_image_bytes(source: str | os.PathLike | bytes | bytearray | memoryview) -> bytes:
    """The encoded bytes of a path or buffer (what a media id hashes). Missing files raise FileNotFoundError."""
    if isinstance(source, (str, os.PathLike)):
        with open(source, "rb") as f:
            data = f.read()
    elif isinstance(source, (bytes, bytearray, memoryview)):
        data = bytes(source)
    else:
        raise TypeError(f"expected a path or bytes, got {type(source).__name__}")
    if not data:
        raise ImageError("empty image data (0 bytes)")
    return data


_plugins_lock = threading.Lock()


def _open_lazy(data: bytes) -> Image.Image:
    """Identify `data` and parse its header only, like ``Image.open`` minus its global bomb check."""
    registry, ids = getattr(Image, "OPEN", None), getattr(Image, "ID", None)
    try:
        if registry is None or ids is None:  # a Pillow without the plugin registry: its own limit applies
            return Image.open(io.BytesIO(data))
        prefix, tried = data[:16], set()
        for loader in (Image.preinit, Image.init):  # common plugins first, then all (as Image.open does)
            with _plugins_lock:
                loader()
                formats = [(f, *registry[f]) for f in ids if f not in tried]
            for fmt, factory, accept in formats:
                tried.add(fmt)
                try:
                    ok = accept is None or accept(prefix)
                    if ok and not isinstance(ok, str):
                        return factory(io.BytesIO(data), "")
                except (SyntaxError, IndexError, TypeError, struct.error, EOFError, ValueError):
                    continue
    except Image.DecompressionBombError as e:
        raise ImageTooLargeError(str(e)) from None
    except (OSError, SyntaxError, ValueError, EOFError, struct.error) as e:
        raise ImageError(f"corrupt image header: {e}") from None
    if data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) >= 24:
        w, h = struct.unpack(">II", data[16:24])
        if w == 0 or h == 0:
            raise ImageError(f"empty image ({w}x{h} pixels)")
    raise ImageError(f"cannot identify image data ({len(data)} bytes, starting {data[:8]!r}): "
                     "not an image format Pillow can read, or a corrupt header")


def _check_size(width: int, height: int, max_pixels: int | None) -> None:
    if width <= 0 or height <= 0:
        raise ImageError(f"empty image ({width}x{height} pixels)")
    if max_pixels is not None and width * height > max_pixels:
        raise ImageTooLargeError(
            f"image is {width}x{height} = {width * height} pixels, above the limit of {max_pixels} pixels "
            "(decompression-bomb guard; pass a larger max_pixels to allow it)")


def _open_checked(source, max_pixels: int | None) -> Image.Image:
    im = source if isinstance(source, Image.Image) else _open_lazy(read_image_bytes(source))
    _check_size(im.width, im.height, max_pixels)
    return im


def image_size(source: ImageSource, *, mode: Mode = "hf", exif_transpose: bool | None = None,
               max_pixels: int | None = DEFAULT_MAX_PIXELS) -> tuple[int, int]:
    """(height, width) of the image as `decode_image` would return it, read from the header only."""
    _check_mode(mode)
    if isinstance(source, np.ndarray):
        if source.ndim not in (2, 3):
            raise ImageError(f"numpy image must be HxW or HxWxC, got shape {source.shape}")
        _check_size(source.shape[1], source.shape[0], max_pixels)
        return int(source.shape[0]), int(source.shape[1])
    im = _open_checked(source, max_pixels)
    w, h = im.size
    # A PNG whose eXIf chunk follows the pixel data would need a full decode to see it: counted as upright.
    header_exif = im.format != "PNG" or "exif" in im.info
    if ((mode == "hf") if exif_transpose is None else exif_transpose) and header_exif:
        try:
            orientation = im.getexif().get(0x0112)
        except (OSError, SyntaxError, ValueError, struct.error) as e:
            raise ImageError(f"corrupt EXIF data: {e}") from None
        if orientation in (5, 6, 7, 8):  # orientations that transpose the axes
            w, h = h, w
    return h, w


def _rgb_from_array(a: np.ndarray, alpha: str, max_pixels: int | None) -> np.ndarray:
    if a.dtype != np.uint8:
        raise ImageError(f"numpy image must be uint8, got dtype {a.dtype}")
    if a.ndim == 2:
        a = a[..., None]
    if a.ndim != 3 or a.shape[-1] not in (1, 3, 4):
        raise ImageError(f"numpy image must be HxW or HxWxC with C in (1, 3, 4), got shape {a.shape}")
    _check_size(a.shape[1], a.shape[0], max_pixels)
    if a.shape[-1] == 1:
        return np.repeat(a, 3, axis=-1)
    if a.shape[-1] == 3:
        return np.ascontiguousarray(a)
    if alpha == "drop":
        return np.ascontiguousarray(a[..., :3])
    # HF convert_to_rgb for arrays, same expression in float64: round(a * rgb + (1 - a) * 255).
    al = a[..., 3:4] / 255
    return np.round(al * a[..., :3] + (1 - al) * 255).astype(np.uint8)


def _rgb_from_pil(im: Image.Image, alpha: str, sixteen_bit: str) -> np.ndarray:
    if im.mode in _REFUSED_MODES:
        raise ImageError(f"unsupported image mode {im.mode!r}: {_REFUSED_MODES[im.mode]}")
    if im.mode in _SIXTEEN_BIT_MODES and sixteen_bit == "scale":
        hi = (np.clip(np.asarray(im).astype(np.int64), 0, 65535) >> 8).astype(np.uint8)
        return np.repeat(hi[..., None], 3, axis=-1)
    try:
        # HF convert_to_rgb's test for transparency, kept verbatim so the two agree on every mode.
        if alpha == "white" and ("A" in im.getbands() or im.info.get("transparency") is not None):
            white = Image.new("RGBA", im.size, (255, 255, 255, 255))
            out = Image.alpha_composite(white, im.convert("RGBA")).convert("RGB")
        else:
            out = im.convert("RGB")
    except ValueError as e:
        raise ImageError(f"unsupported image mode {im.mode!r}: {e}") from None
    return np.array(out, dtype=np.uint8)


def decode_image(source: ImageSource, *, mode: Mode = "hf", alpha: Literal["white", "drop"] | None = None,
                 exif_transpose: bool | None = None, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Decode a path / bytes / PIL image / uint8 array into an ``[H, W, 3]`` uint8 RGB array.

    `alpha` and `exif_transpose` default per `mode` (see the module doc).  Arrays are read as HxW or HxWxC
    (C = 1, 3 or 4), never channels-first.  Raises `ImageError` (a ValueError) for corrupt, truncated, empty or
    unsupported images and `ImageTooLargeError` above `max_pixels` (None disables the limit).
    """
    _check_mode(mode)
    alpha = alpha or ("white" if mode == "hf" else "drop")
    if alpha not in ("white", "drop"):
        raise ValueError(f"alpha must be 'white' or 'drop', got {alpha!r}")
    if isinstance(source, np.ndarray):
        return _rgb_from_array(source, alpha, max_pixels)
    im = _open_checked(source, max_pixels)
    try:
        im.load()
        if ((mode == "hf") if exif_transpose is None else exif_transpose) and im.getexif().get(0x0112, 1) != 1:
            im = ImageOps.exif_transpose(im)  # (HF calls it unconditionally; upright images only get copied)
    except Image.DecompressionBombError as e:
        raise ImageTooLargeError(str(e)) from None
    except (OSError, SyntaxError, ValueError, EOFError, struct.error, zlib.error) as e:
        raise ImageError(f"corrupt or truncated image data ({im.format or 'unknown'} "
                         f"{im.width}x{im.height}): {e}") from None
    return _rgb_from_pil(im, alpha, "clip" if mode == "hf" else "scale")


def _as_rgb(image: ImageSource, mode: Mode) -> np.ndarray:
    """Presets accept anything `decode_image` does; an ``[H, W, 3]`` uint8 array passes through untouched."""
    if isinstance(image, np.ndarray) and image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3:
        _check_size(image.shape[1], image.shape[0], None)
        return image
    return decode_image(image, mode=mode)


def _check_rgb(image: np.ndarray) -> None:
    if not (isinstance(image, np.ndarray) and image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3):
        got = f"{type(image).__name__} {getattr(image, 'dtype', '')} {getattr(image, 'shape', '')}"
        raise ImageError(f"expected an [H, W, 3] uint8 RGB array, got {got}")
    _check_size(image.shape[1], image.shape[0], None)


def _hw(size: Size, what: str = "size") -> tuple[int, int]:
    h, w = (size, size) if isinstance(size, (int, np.integer)) else tuple(size)
    if int(h) <= 0 or int(w) <= 0:
        raise ValueError(f"{what} must be positive (height, width), got {size!r}")
    return int(h), int(w)


# ---------------------------------------------------------------------------------------------------------
# resizing
# ---------------------------------------------------------------------------------------------------------

def _pil_filter(resample) -> Image.Resampling:
    if isinstance(resample, str):
        if resample not in _PIL_FILTERS:
            raise ValueError(f"resample must be one of {sorted(_PIL_FILTERS)}, got {resample!r}")
        return _PIL_FILTERS[resample]
    return Image.Resampling(int(resample))  # HF configs store Pillow's integer codes (3 = bicubic...)


def _resize_bilinear_llamacpp(img: np.ndarray, th: int, tw: int) -> np.ndarray:
    """llama.cpp resize_bilinear: align-corners sample positions, float32 lerps, truncation to u8.

    Its per-pixel `top`/`bottom` lerps depend only on (source row, output column), so they are computed once
    per sampled source row (same float32 values), then lerped vertically.
    """
    ny, nx = img.shape[:2]

    def axis(n_src: int, n_dst: int):
        ratio = _F32(n_src - 1) / _F32(n_dst - 1) if n_dst > 1 else _F32(0)
        p = np.arange(n_dst, dtype=_F32) * ratio           # float32 product, as `x * x_ratio`
        i0 = np.minimum(p.astype(np.int64), n_src - 1)      # static_cast<int> truncates
        return i0, np.minimum(i0 + 1, n_src - 1), (p - i0.astype(_F32))

    x0, x1, xf = axis(nx, tw)
    y0, y1, yf = axis(ny, th)
    used, inv = np.unique(np.concatenate([y0, y1]), return_inverse=True)
    src = img[used]
    s, horiz = (np.take(src, x, axis=1).astype(_F32) for x in (x0, x1))
    horiz -= s                                              # lerp(s, e, t) = s + (e - s) * t, same op order
    horiz *= xf[None, :, None]
    horiz += s
    top, bottom = horiz[inv[:th]], horiz[inv[th:]]
    bottom -= top
    bottom *= yf[:, None, None]
    bottom += top
    return bottom.astype(np.uint8)                          # values in [0, 255]: the cast truncates


def _cubic_llamacpp(p0, p1, p2, p3, d: np.ndarray) -> np.ndarray:
    """llama.cpp's 4-tap cubic through p0..p3 at offset d from p1.

    d_k = p_k - p1 is float - float; the coefficient lines are double expressions in the C++
    (``-1.0 / 3 * d0 + ...``) assigned to float; the polynomial is float arithmetic, left to right.
    """
    a0 = p1.astype(_F32, copy=False)
    d0, d2, d3 = ((p.astype(_F32, copy=False) - a0).astype(np.float64) for p in (p0, p2, p3))
    # in-place forms of the same operations in the same order (IEEE + and * are commutative)
    a1 = d0 * (-1.0 / 3)
    a1 += d2
    a1 -= (1.0 / 6) * d3
    a2 = d0 * (1.0 / 2)
    a2 += (1.0 / 2) * d2
    a3 = d0 * (-1.0 / 6)
    a3 -= (1.0 / 2) * d2
    a3 += (1.0 / 6) * d3
    a1, a2, a3 = (a.astype(_F32) for a in (a1, a2, a3))
    out = a1 * d                   # a0 + a1*d + a2*d*d + a3*d*d*d, left to right
    out += a0
    a2 *= d
    a2 *= d
    out += a2
    a3 *= d
    a3 *= d
    a3 *= d
    out += a3
    return out


def _resize_bicubic_llamacpp(img: np.ndarray, th: int, tw: int) -> np.ndarray:
    """llama.cpp resize_bicubic: sample at floor(j * nx / tw) (no half-pixel offset), clamp-to-edge taps,
    horizontal cubic per source row then vertical cubic, round half away from zero, clamp to [0, 255]."""
    ny, nx = img.shape[:2]

    def axis(n_src: int, n_dst: int):
        pos = np.arange(n_dst, dtype=_F32) * (_F32(n_src) / _F32(n_dst))
        i = pos.astype(np.int64)
        taps = np.clip(i[:, None] + np.arange(-1, 3), 0, n_src - 1)   # [n_dst, 4]
        return taps, pos - i.astype(_F32)

    xt, dx = axis(nx, tw)
    yt, dy = axis(ny, th)
    used, yt = np.unique(yt, return_inverse=True)    # horizontal pass only on source rows that are sampled
    yt = yt.reshape(th, 4)
    src = img[used]
    rows = _cubic_llamacpp(*(np.take(src, xt[:, k], axis=1) for k in range(4)), dx[None, :, None])  # [n_used, tw, 3]
    col = _cubic_llamacpp(*(rows[yt[:, k]] for k in range(4)), dy[:, None, None])      # [th, tw, 3] float32
    c = col.astype(np.float64)
    rounded = np.sign(c) * np.floor(np.abs(c) + 0.5)  # exact std::round for float32 inputs (done in double)
    return np.clip(rounded, 0, 255).astype(np.uint8)


def resize(image: np.ndarray, size: Size, *, resample: str | int = "bicubic", mode: Mode = "hf") -> np.ndarray:
    """Stretch an ``[H, W, 3]`` uint8 image to `size` = (height, width) (or an int for a square).

    ``hf``: Pillow ``Image.resize`` with `resample` (name or Pillow code), as HF's PIL backend does.
    ``llamacpp``: llama.cpp's ``bilinear`` or ``bicubic`` (its own kernels, not Pillow's).
    """
    _check_mode(mode)
    _check_rgb(image)
    th, tw = _hw(size)
    if mode == "hf":
        return np.array(Image.fromarray(image).resize((tw, th), resample=_pil_filter(resample), reducing_gap=None))
    if resample not in _LLAMACPP_FILTERS:
        raise ValueError(f"llamacpp mode supports resample in {_LLAMACPP_FILTERS}, got {resample!r}")
    if (th, tw) == image.shape[:2]:
        return image.copy()
    fn = _resize_bilinear_llamacpp if resample == "bilinear" else _resize_bicubic_llamacpp
    return fn(image, th, tw)


def letterbox(image: np.ndarray, size: Size, *, resample: str = "bicubic", color: Sequence[int] = (0, 0, 0),
              rounding: Literal["ceil", "nearest"] = "ceil", mode: Mode = "llamacpp") -> np.ndarray:
    """llama.cpp ``img_tool::resize`` with padding: keep the aspect ratio, fill the rest with `color`.

    scale = min(tw/w, th/h) in float32; new side = ceil(side * scale) ("ceil", PAD_CEIL) or round ("nearest",
    PAD_NEAREST), capped at the target; offset = floor((t - new)/2) (ceil) or round(... / 2.0f) (nearest).
    A same-size image is returned unchanged (copied), as llama.cpp does.
    """
    _check_rgb(image)
    th, tw = _hw(size)
    h, w = image.shape[:2]
    if (h, w) == (th, tw):
        return image.copy()
    scale = min(_F32(tw) / _F32(w), _F32(th) / _F32(h))
    if rounding == "ceil":
        nw, nh = (min(int(np.ceil(_F32(n) * scale)), t) for n, t in ((w, tw), (h, th)))
        ox, oy = (tw - nw) // 2, (th - nh) // 2
    elif rounding == "nearest":
        nw, nh = (min(round_half_away(_F32(n) * scale), t) for n, t in ((w, tw), (h, th)))
        ox, oy = round_half_away(_F32(tw - nw) / _F32(2)), round_half_away(_F32(th - nh) / _F32(2))
    else:
        raise ValueError(f"rounding must be 'ceil' or 'nearest', got {rounding!r}")
    out = np.empty((th, tw, 3), np.uint8)
    out[...] = np.asarray(color, dtype=np.uint8)
    out[oy:oy + nh, ox:ox + nw] = resize(image, (nh, nw), resample=resample, mode=mode)
    return out


def round_half_away(x: float) -> int:
    """C/C++ ``round``: halves go away from zero (Python's `round` sends them to the even neighbour)."""
    x = float(x)
    return int(np.floor(x + 0.5)) if x >= 0 else -int(np.floor(-x + 0.5))


# ---------------------------------------------------------------------------------------------------------
# padding, cropping, rescale, normalise
# ---------------------------------------------------------------------------------------------------------

def pad_to_square(image: np.ndarray, color: Sequence[int]) -> np.ndarray:
    """LLaVA's expand2square (HF ``LlavaImageProcessor.pad_to_square``): centre on a square of the longer side,
    offset floor((long - short) / 2), the rest filled with `color`."""
    _check_rgb(image)
    h, w = image.shape[:2]
    if h == w:
        return image
    side = max(h, w)
    out = np.empty((side, side, 3), np.uint8)
    out[...] = np.asarray(color, dtype=np.uint8)
    top, left = (side - h) // 2, (side - w) // 2
    out[top:top + h, left:left + w] = image
    return out


def center_crop(image: np.ndarray, size: Size) -> np.ndarray:
    """HF ``center_crop``: top = (H - h) // 2, left = (W - w) // 2; an image smaller than the crop is first
    zero-padded, centred with ceil offsets (HF's rule)."""
    _check_rgb(image)
    ch, cw = _hw(size, "crop size")
    h, w = image.shape[:2]
    top, left = (h - ch) // 2, (w - cw) // 2
    if top >= 0 and left >= 0:
        return image[top:top + ch, left:left + cw]
    nh, nw = max(h, ch), max(w, cw)
    pt, pl = -(-(nh - h) // 2), -(-(nw - w) // 2)
    canvas = np.zeros((nh, nw, 3), np.uint8)
    canvas[pt:pt + h, pl:pl + w] = image
    top, left = top + pt, left + pl
    return canvas[max(0, top):min(nh, top + ch), max(0, left):min(nw, left + cw)]


def rescale(image: np.ndarray, factor: float = 1 / 255, *, mode: Mode = "hf") -> np.ndarray:
    """uint8 -> float32.  ``hf``: float64(v) * factor, cast to float32.  ``llamacpp``: float32(v) / 255.0f
    (generally float32(v) / float32(1 / factor))."""
    _check_mode(mode)
    if mode == "hf":
        return (image.astype(np.float64) * factor).astype(_F32)
    return image.astype(_F32) / _F32(1.0 / factor)


def normalize(image: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """(x - mean) / std per channel (last axis), in float32 with float32 mean/std, as both HF and llama.cpp."""
    mean32, std32 = np.asarray(mean, _F32), np.asarray(std, _F32)
    if mean32.shape != (image.shape[-1],) or std32.shape != (image.shape[-1],):
        raise ValueError(f"mean/std need {image.shape[-1]} values, got {list(mean)} / {list(std)}")
    return (image.astype(_F32, copy=False) - mean32) / std32


def to_pixel_values(image: np.ndarray, mean: Sequence[float], std: Sequence[float], *, mode: Mode = "hf",
                    rescale_factor: float = 1 / 255) -> np.ndarray:
    """``[H, W, 3]`` uint8 -> rescaled, normalised, planar float32 ``[3, H, W]`` (the encoder input)."""
    x = normalize(rescale(image, rescale_factor, mode=mode), mean, std)
    return np.ascontiguousarray(x.transpose(2, 0, 1))


# ---------------------------------------------------------------------------------------------------------
# per-processor presets: float32 [3, H, W]
# ---------------------------------------------------------------------------------------------------------

def _default_pad_color(mean: Sequence[float]) -> tuple[int, ...]:
    return tuple(int(m * 255) for m in mean)  # HF LLaVA's background; (122, 116, 104) for the CLIP mean


def preprocess_clip(image: ImageSource, *, shortest_edge: int = 224, crop_size: Size = 224,
                    mean: Sequence[float] = OPENAI_CLIP_MEAN, std: Sequence[float] = OPENAI_CLIP_STD,
                    resample: str | int = "bicubic", pad_square: bool = False,
                    pad_color: Sequence[int] | None = None, rescale_factor: float = 1 / 255,
                    mode: Mode = "hf") -> np.ndarray:
    """CLIP ViT input.

    ``hf`` = ``CLIPImageProcessor`` (``LlavaImageProcessor`` with `pad_square`): optional pad to square with
    `pad_color` (default int(mean * 255)), resize the shortest edge to `shortest_edge` (long side
    int(s * long / short)), centre crop to `crop_size`.
    ``llamacpp`` = llama.cpp's fixed-size rule for the ``mlp``/``ldp``/``ldpv2`` projectors: letterbox to
    `crop_size` with its custom bicubic and colour (122, 116, 104) (= int(CLIP mean * 255)), no crop.
    """
    _check_mode(mode)
    img = _as_rgb(image, mode)
    color = _default_pad_color(mean) if pad_color is None else tuple(pad_color)
    if mode == "llamacpp":  # the projector's rule fixes the kernel: `resample` applies to hf mode only
        img = letterbox(img, crop_size, resample="bicubic", color=color)
    else:
        if pad_square:
            img = pad_to_square(img, color)
        h, w = img.shape[:2]
        short, long = (w, h) if w <= h else (h, w)
        new_long = int(shortest_edge * long / short)  # HF get_resize_output_image_size
        img = resize(img, (new_long, shortest_edge) if w <= h else (shortest_edge, new_long), resample=resample)
        img = center_crop(img, crop_size)
    return to_pixel_values(img, mean, std, mode=mode, rescale_factor=rescale_factor)


def preprocess_llava(image: ImageSource, *, size: int = 336, mode: Mode = "hf", **kwargs: Any) -> np.ndarray:
    """LLaVA-1.5 as trained: expand2square with the mean colour, then CLIP at `size` (HF
    ``LlavaImageProcessor`` with ``do_pad=True``; llama.cpp ``mlp`` letterbox in ``llamacpp`` mode).  A
    checkpoint whose preprocessor_config is a plain ``CLIPImageProcessor`` (no pad) matches
    ``preprocess_clip(image, shortest_edge=336, crop_size=336)`` instead."""
    return preprocess_clip(image, shortest_edge=size, crop_size=size, pad_square=True, mode=mode, **kwargs)


def _fixed_size(image, size, mean, std, resample, rescale_factor, mode, llamacpp_resample) -> np.ndarray:
    _check_mode(mode)
    img = _as_rgb(image, mode)
    if mode == "llamacpp":
        img = letterbox(img, size, resample=llamacpp_resample, color=(0, 0, 0))
    else:
        img = resize(img, _hw(size), resample=resample)
    return to_pixel_values(img, mean, std, mode=mode, rescale_factor=rescale_factor)


def preprocess_siglip(image: ImageSource, *, size: Size = 224, mean: Sequence[float] = IMAGENET_STANDARD_MEAN,
                      std: Sequence[float] = IMAGENET_STANDARD_STD, resample: str | int = "bicubic",
                      rescale_factor: float = 1 / 255, mode: Mode = "hf") -> np.ndarray:
    """SigLIP: ``hf`` = ``SiglipImageProcessor`` (stretch to `size`, bicubic, 0.5/0.5); ``llamacpp`` =
    llama.cpp's default fixed-size rule (custom bicubic letterbox, black)."""
    return _fixed_size(image, size, mean, std, resample, rescale_factor, mode, "bicubic")


def preprocess_gemma3(image: ImageSource, *, size: Size = 896, mean: Sequence[float] = IMAGENET_STANDARD_MEAN,
                      std: Sequence[float] = IMAGENET_STANDARD_STD, resample: str | int = "bilinear",
                      rescale_factor: float = 1 / 255, mode: Mode = "hf") -> np.ndarray:
    """Gemma 3: ``hf`` = ``Gemma3ImageProcessor`` without pan-and-scan (stretch to 896 bilinear);
    ``llamacpp`` = ``gemma3`` projector rule (align-corners bilinear letterbox, black).  Pan-and-scan crops:
    `vlm.preprocess.tiling.gemma3_pan_and_scan`, each crop then through this function."""
    return _fixed_size(image, size, mean, std, resample, rescale_factor, mode, "bilinear")


def preprocess_batch(images: Sequence[ImageSource], fn: Callable[..., Any] = preprocess_clip, *,
                     max_workers: int | None = None, **kwargs: Any) -> list:
    """``[fn(img, **kwargs) for img in images]`` on a thread pool (Pillow and numpy release the GIL), in
    input order.  A failure is re-raised with a note naming the image index."""
    def run(item):
        i, img = item
        try:
            return fn(img, **kwargs)
        except Exception as e:
            if hasattr(e, "add_note"):  # Python >= 3.11
                e.add_note(f"while preprocessing image {i} of {len(images)}")
            raise

    if len(images) <= 1 or max_workers == 1:
        return [run(x) for x in enumerate(images)]
    workers = max_workers or min(len(images), os.cpu_count() or 1)
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="vlm-preprocess") as pool:
        return list(pool.map(run, enumerate(images)))
