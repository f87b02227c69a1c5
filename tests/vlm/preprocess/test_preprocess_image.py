"""vlm.preprocess.image / tiling: decoding (every Pillow mode, EXIF, alpha, 16-bit, bad input), HF parity of the
CLIP / LLaVA / SigLIP / Gemma 3 / Idefics3 presets (pixel-exact), and llama.cpp-mode kernels against scalar
transcriptions of llama.cpp's rules (mtmd-image.cpp)."""
from __future__ import annotations

import io
import math
import struct
import warnings
import zlib

import numpy as np
import pytest
from PIL import Image

from oracles import missing, need
from vlm.preprocess import image as I
from vlm.preprocess import tiling as T
from vlm.preprocess.image import ImageError, ImageTooLargeError

# One tolerance table for this module (architecture.md: image pixels vs HF processors exact, <= 1e-6).
TOL = {"pixels_vs_hf": 1e-6}

# (height, width): odd sizes, a square, extreme aspect ratios both ways.
SIZES = [(1, 1), (17, 403), (640, 37), (333, 333), (10, 1000), (403, 2)]
F32 = np.float32


def hf_processor(name: str, **kwargs):
    """transformers 5.x PIL-backend processor (no torchvision needed), else the plain class (older releases)."""
    transformers = need("transformers")
    cls = getattr(transformers, name + "Pil", None) or getattr(transformers, name, None)
    if cls is None:
        missing(f"transformers {transformers.__version__} has no {name}")
    try:
        return cls(**kwargs)
    except ImportError as e:  # e.g. a torchvision-only class in some release
        missing(f"{cls.__name__} unavailable: {e}")


def hf_pixels(proc, image, **kwargs) -> np.ndarray:
    return np.asarray(proc(image, return_tensors="np", **kwargs)["pixel_values"])


def make_rgb(h: int, w: int, seed: int = 0) -> np.ndarray:
    """Gradients + noise, so that resampling filters have something to get wrong."""
    rng = np.random.default_rng(seed + 7919 * h + w)
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([xx * 255 // max(w - 1, 1), yy * 255 // max(h - 1, 1), (xx + yy) % 256], -1)
    return np.clip(base + rng.integers(-40, 41, (h, w, 3)), 0, 255).astype(np.uint8)


def assert_pixels(ours: np.ndarray, ref: np.ndarray):
    assert ours.dtype == np.float32 and ours.shape == ref.shape, (ours.shape, ref.shape)
    err = float(np.abs(ours - ref).max())
    assert err <= TOL["pixels_vs_hf"], f"max abs error {err}"


# ---- HF parity of the presets -------------------------------------------------------------------------------

@pytest.mark.parametrize("h,w", SIZES)
def test_clip_matches_hf(h, w):
    a = make_rgb(h, w)
    ref = hf_pixels(hf_processor("CLIPImageProcessor"), Image.fromarray(a))[0]
    assert_pixels(I.preprocess_clip(a), ref)


@pytest.mark.parametrize("h,w", SIZES[:5])
def test_llava_pad_square_matches_hf(h, w):
    a = make_rgb(h, w, 1)
    proc = hf_processor("LlavaImageProcessor", do_pad=True, size={"shortest_edge": 336},
                        crop_size={"height": 336, "width": 336})
    assert_pixels(I.preprocess_llava(a, size=336), hf_pixels(proc, Image.fromarray(a))[0])


@pytest.mark.parametrize("h,w", SIZES)
def test_siglip_matches_hf(h, w):
    a = make_rgb(h, w, 2)
    ref = hf_pixels(hf_processor("SiglipImageProcessor", size={"height": 224, "width": 224}), Image.fromarray(a))[0]
    assert_pixels(I.preprocess_siglip(a, size=224), ref)


@pytest.mark.parametrize("h,w,size", [(17, 403, 896), (640, 37, 896), (1, 1, 64), (333, 333, 64), (10, 1000, 64)])
def test_gemma3_matches_hf(h, w, size):
    a = make_rgb(h, w, 3)
    proc = hf_processor("Gemma3ImageProcessor", size={"height": size, "width": size})
    assert_pixels(I.preprocess_gemma3(a, size=size), hf_pixels(proc, Image.fromarray(a))[0])


@pytest.mark.parametrize("h,w", [(17, 403), (640, 37), (300, 700), (333, 333), (1, 1)])
def test_gemma3_pan_and_scan_matches_hf(h, w):
    a = make_rgb(h, w, 4)
    kw = dict(min_crop_size=8, max_num_crops=4, min_ratio_to_activate=1.2)
    proc = hf_processor("Gemma3ImageProcessor", size={"height": 32, "width": 32}, do_pan_and_scan=True,
                        **{f"pan_and_scan_{k}": v for k, v in kw.items()})
    out = proc(Image.fromarray(a), return_tensors="np")
    crops = T.gemma3_pan_and_scan(a, **kw)
    assert len(crops) == int(out["num_crops"][0])
    assert T.gemma3_pan_and_scan_grid(h, w, **kw) in ((0, 0), (1, len(crops)), (len(crops), 1))
    ours = np.stack([I.preprocess_gemma3(c, size=32) for c in [a, *crops]])
    assert_pixels(ours, np.asarray(out["pixel_values"]))


IDEFICS_SMALL = dict(longest_edge=4 * 32, tile_size=32)


@pytest.mark.parametrize("h,w", SIZES + [(90, 65), (31, 33)])
def test_idefics3_tiles_match_hf(h, w):
    a = make_rgb(h, w, 5)
    proc = hf_processor("Idefics3ImageProcessor", size={"longest_edge": IDEFICS_SMALL["longest_edge"]},
                        max_image_size={"longest_edge": IDEFICS_SMALL["tile_size"]})
    out = proc(Image.fromarray(a), return_tensors="np", return_row_col_info=True)
    ours = T.preprocess_idefics3(a, **IDEFICS_SMALL)
    assert (ours.rows, ours.cols) == (out["rows"][0][0], out["cols"][0][0])
    assert T.idefics3_grid(h, w, **IDEFICS_SMALL) == (ours.rows, ours.cols)
    assert ours.pixel_values.shape[0] == (ours.rows * ours.cols + 1 if ours.rows else 1)
    # HF pads a batch to its largest tile count; a single image has no padding rows.
    assert_pixels(ours.pixel_values, np.asarray(out["pixel_values"])[0])


def test_idefics3_real_config_and_no_split_match_hf():
    a = make_rgb(500, 1000, 6)
    proc = hf_processor("Idefics3ImageProcessor")  # longest_edge 1456, tiles 364, lanczos
    out = proc(Image.fromarray(a), return_tensors="np", return_row_col_info=True)
    ours = T.preprocess_idefics3(a)
    assert (ours.rows, ours.cols) == (out["rows"][0][0], out["cols"][0][0]) == (2, 4)
    assert_pixels(ours.pixel_values, np.asarray(out["pixel_values"])[0])
    proc = hf_processor("Idefics3ImageProcessor", do_image_splitting=False, **{
        "size": {"longest_edge": 128}, "max_image_size": {"longest_edge": 32}})
    ours = T.preprocess_idefics3(a, longest_edge=128, tile_size=32, split=False)
    assert (ours.rows, ours.cols) == (0, 0)
    assert_pixels(ours.pixel_values, np.asarray(proc(Image.fromarray(a), return_tensors="np")["pixel_values"])[0])


# ---- decoding: Pillow modes, alpha, EXIF, 16-bit ------------------------------------------------------------

def mode_images() -> dict[str, Image.Image]:
    rgb = Image.fromarray(make_rgb(23, 41, 8))
    rgba = rgb.copy()
    rgba.putalpha(Image.fromarray(make_rgb(23, 41, 9)[..., 0]))
    g16 = (make_rgb(23, 41, 10)[..., 0].astype(np.uint16) * 3) % 700   # values straddle 255: HF clips them
    out = {m: rgb.convert(m) for m in ("1", "L", "P", "RGBX", "CMYK", "YCbCr", "HSV", "F", "I")}
    out |= {m: rgba.convert(m) for m in ("LA", "PA", "RGBA", "RGBa")}
    p_trns = rgb.convert("P")
    p_trns.info["transparency"] = 0
    out |= {"P+tRNS": p_trns, "I;16": Image.fromarray(g16), "RGB": rgb}
    return out


MODE_IMAGES = mode_images()


@pytest.mark.parametrize("name", sorted(MODE_IMAGES))
def test_every_pillow_mode_matches_hf(name):
    """HF processor given the PIL image (its convert_to_rgb: alpha composited on white) == ours in hf mode."""
    pil = MODE_IMAGES[name]
    proc = hf_processor("SiglipImageProcessor", size={"height": 24, "width": 24})
    rgb = I.decode_image(pil)
    assert rgb.dtype == np.uint8 and rgb.shape == (23, 41, 3)
    assert_pixels(I.preprocess_siglip(rgb, size=24), hf_pixels(proc, pil)[0])


def test_alpha_policies():
    a = make_rgb(17, 40, 11)
    rgba = np.concatenate([a, np.linspace(0, 255, 17 * 40).reshape(17, 40, 1).astype(np.uint8)], -1)
    # numpy RGBA: HF composites with round(alpha * rgb + (1 - alpha) * 255)
    proc = hf_processor("SiglipImageProcessor", size={"height": 24, "width": 24})
    assert_pixels(I.preprocess_siglip(I.decode_image(rgba), size=24), hf_pixels(proc, rgba)[0])
    white = I.decode_image(rgba)
    assert (white[0, 0] == 255).all() and (white[-1, -1] == a[-1, -1]).all()   # alpha 0 -> white, 255 -> rgb
    assert np.array_equal(I.decode_image(rgba, alpha="drop"), a)
    assert np.array_equal(I.decode_image(rgba, mode="llamacpp"), a)             # stb_image drops alpha
    with pytest.raises(ValueError, match="alpha must be"):
        I.decode_image(rgba, alpha="black")


def encode(pil: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    pil.save(buf, fmt, **kw)
    return buf.getvalue()


@pytest.mark.parametrize("name,fmt", [("RGBA", "PNG"), ("LA", "PNG"), ("P+tRNS", "PNG"), ("I;16", "PNG"),
                                      ("CMYK", "JPEG"), ("L", "JPEG"), ("RGBA", "WEBP"), ("P", "GIF"),
                                      ("CMYK", "TIFF"), ("F", "TIFF"), ("1", "BMP")])
def test_files_match_hf_load_image_and_processor(tmp_path, name, fmt):
    load_image = need("transformers.image_utils").load_image
    path = tmp_path / f"img.{fmt.lower()}"
    path.write_bytes(encode(MODE_IMAGES[name], fmt))
    # HF load_image (paths, chat templates): exif_transpose + convert("RGB"), alpha dropped
    assert np.array_equal(I.decode_image(path, alpha="drop"), np.asarray(load_image(str(path))))
    proc = hf_processor("SiglipImageProcessor", size={"height": 24, "width": 24})
    with Image.open(path) as pil:  # HF processor given the opened file: alpha composited on white
        ref = hf_pixels(proc, pil)[0]
    assert_pixels(I.preprocess_siglip(I.decode_image(path.read_bytes()), size=24), ref)


def test_exif_orientation(tmp_path):
    load_image = need("transformers.image_utils").load_image
    a = make_rgb(20, 50, 12)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 CW on display
    path = tmp_path / "o.jpg"
    path.write_bytes(encode(Image.fromarray(a), "JPEG", exif=exif.tobytes(), quality=95))
    upright = I.decode_image(path)
    assert upright.shape == (50, 20, 3) and I.image_size(path) == (50, 20)
    assert np.array_equal(upright, np.asarray(load_image(str(path))))
    raw = I.decode_image(path, mode="llamacpp")           # stb_image ignores EXIF
    assert raw.shape == (20, 50, 3) and I.image_size(path, mode="llamacpp") == (20, 50)
    assert np.array_equal(np.rot90(raw, k=-1), upright)


def test_sixteen_bit_policies():
    g16 = np.array([[0, 255, 256, 1000, 40000, 65535]], dtype=np.uint16)
    pil = Image.fromarray(g16)
    assert pil.mode == "I;16"
    assert np.array_equal(I.decode_image(pil)[..., 0], np.minimum(g16, 255))            # Pillow/HF clip
    assert np.array_equal(I.decode_image(pil, mode="llamacpp")[..., 0], g16 >> 8)     # stb_image high byte
    png = encode(pil, "PNG")
    assert np.array_equal(I.decode_image(png, mode="llamacpp")[..., 1], g16 >> 8)


# ---- bad input ----------------------------------------------------------------------------------------------

def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def png_header_only(w: int, h: int) -> bytes:
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", zlib.compress(b"\0" * 64))


def test_bad_inputs_raise_clear_errors(tmp_path):
    good_png = encode(Image.fromarray(make_rgb(40, 40)), "PNG")
    good_jpg = encode(Image.fromarray(make_rgb(64, 64)), "JPEG")
    with pytest.raises(ImageError, match="truncated|corrupt"):
        I.decode_image(good_png[: len(good_png) // 2])
    with pytest.raises(ImageError, match="truncated|corrupt"):
        I.decode_image(good_jpg[: len(good_jpg) // 2])
    with pytest.raises(ImageError, match="cannot identify image data"):
        I.decode_image(b"this is not an image at all")
    with pytest.raises(ImageError, match=r"empty image data \(0 bytes\)"):
        I.decode_image(b"")
    with pytest.raises(ImageError, match=r"empty image \(0x0 pixels\)"):
        I.decode_image(png_header_only(0, 0))
    with pytest.raises(ImageError, match=r"empty image \(0x5 pixels\)"):
        I.decode_image(np.zeros((5, 0, 3), np.uint8))
    with pytest.raises(ImageError, match=r"empty image \(0x0 pixels\)"):
        I.decode_image(Image.new("RGB", (0, 0)))
    with pytest.raises(ImageError, match="must be uint8, got dtype float32"):
        I.decode_image(np.zeros((4, 4, 3), np.float32))
    with pytest.raises(ImageError, match=r"C in \(1, 3, 4\), got shape \(4, 4, 2\)"):
        I.decode_image(np.zeros((4, 4, 2), np.uint8))
    with pytest.raises(ImageError, match="unsupported image mode 'LAB'"):
        I.decode_image(Image.new("LAB", (3, 3)))
    with pytest.raises(ImageError, match="unsupported image mode 'La'"):
        I.decode_image(Image.new("La", (3, 3)))
    with pytest.raises(FileNotFoundError):
        I.decode_image(tmp_path / "missing.png")
    with pytest.raises(ValueError, match="mode must be one of"):
        I.decode_image(good_png, mode="opencv")
    with pytest.raises(ImageError, match=r"expected an \[H, W, 3\] uint8 RGB array"):
        I.resize(np.zeros((4, 4), np.uint8), 2)
    with pytest.raises(ValueError, match="llamacpp mode supports resample in"):
        I.resize(make_rgb(4, 4), 2, resample="lanczos", mode="llamacpp")


def test_decompression_bomb_guard_leaves_pillow_alone():
    before = Image.MAX_IMAGE_PIXELS
    bomb = png_header_only(20000, 20000)                        # 400 Mpx header, a few bytes of data
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        with pytest.raises(ImageTooLargeError, match=r"20000x20000 = 400000000 pixels, above the limit of 178956970"):
            I.decode_image(bomb)
        with pytest.raises(ImageTooLargeError, match="above the limit of 1000 pixels"):
            I.decode_image(encode(Image.fromarray(make_rgb(40, 40)), "PNG"), max_pixels=1000)
        with pytest.raises(ImageTooLargeError, match="above the limit of 1000 pixels"):
            I.image_size(make_rgb(40, 40), max_pixels=1000)
        # 100 Mpx: above Pillow's warning threshold, below ours -> no Pillow warning; the missing data is reported
        with pytest.raises(ImageError, match="truncated|corrupt"):
            I.decode_image(png_header_only(10000, 10000))
        assert I.image_size(png_header_only(10000, 10000)) == (10000, 10000)
        assert I.decode_image(encode(Image.fromarray(make_rgb(40, 40)), "PNG"), max_pixels=None).shape == (40, 40, 3)
    assert Image.MAX_IMAGE_PIXELS == before
    assert issubclass(ImageTooLargeError, ImageError) and issubclass(ImageError, ValueError)


# ---- llama.cpp mode: scalar transcriptions of mtmd-image.cpp's kernels ----------------------------------------

def c_round(x: float) -> int:
    return int(math.copysign(math.floor(abs(x) + 0.5), x))


def ref_bilinear(img, th, tw):
    ny, nx = img.shape[:2]
    xr = F32(nx - 1) / F32(tw - 1) if tw > 1 else F32(0)
    yr = F32(ny - 1) / F32(th - 1) if th > 1 else F32(0)
    out = np.zeros((th, tw, 3), np.uint8)
    for y in range(th):
        for x in range(tw):
            px, py = F32(x) * xr, F32(y) * yr
            x0, y0 = min(int(px), nx - 1), min(int(py), ny - 1)
            x1, y1 = min(x0 + 1, nx - 1), min(y0 + 1, ny - 1)
            xf, yf = px - F32(x0), py - F32(y0)
            for c in range(3):
                p = [F32(img[yy, xx, c]) for yy, xx in ((y0, x0), (y0, x1), (y1, x0), (y1, x1))]
                top, bot = p[0] + (p[1] - p[0]) * xf, p[2] + (p[3] - p[2]) * xf
                out[y, x, c] = int(top + (bot - top) * yf)
    return out


def ref_cubic(p, d):
    d0, d2, d3 = (float(F32(p[k]) - F32(p[1])) for k in (0, 2, 3))
    a1 = F32(-1.0 / 3 * d0 + d2 - 1.0 / 6 * d3)
    a2 = F32(1.0 / 2 * d0 + 1.0 / 2 * d2)
    a3 = F32(-1.0 / 6 * d0 - 1.0 / 2 * d2 + 1.0 / 6 * d3)
    return F32(p[1]) + a1 * d + a2 * d * d + a3 * d * d * d


def ref_bicubic(img, th, tw):
    ny, nx = img.shape[:2]
    tx, ty = F32(nx) / F32(tw), F32(ny) / F32(th)
    out = np.zeros((th, tw, 3), np.uint8)
    for i in range(th):
        for j in range(tw):
            x, y = int(tx * F32(j)), int(ty * F32(i))
            dx, dy = tx * F32(j) - F32(x), ty * F32(i) - F32(y)
            for c in range(3):
                cs = [ref_cubic([img[min(max(y - 1 + jj, 0), ny - 1), min(max(x + q, 0), nx - 1), c]
                                 for q in (-1, 0, 1, 2)], dx) for jj in range(4)]
                out[i, j, c] = min(max(c_round(float(ref_cubic(cs, dy))), 0), 255)
    return out


@pytest.mark.parametrize("src,dst", [((7, 5), (13, 11)), ((13, 11), (4, 6)), ((1, 9), (5, 3)), ((6, 6), (1, 1)),
                                     ((9, 4), (9, 17))])
def test_llamacpp_kernels_match_scalar_transcription(src, dst):
    a = make_rgb(*src, 13)
    assert np.array_equal(I.resize(a, dst, resample="bilinear", mode="llamacpp"), ref_bilinear(a, *dst))
    assert np.array_equal(I.resize(a, dst, resample="bicubic", mode="llamacpp"), ref_bicubic(a, *dst))


def test_llamacpp_kernel_properties():
    a = make_rgb(30, 20, 14)
    up = I.resize(a, (59, 39), resample="bilinear", mode="llamacpp")
    for (y, x), (sy, sx) in {(0, 0): (0, 0), (0, -1): (0, -1), (-1, 0): (-1, 0), (-1, -1): (-1, -1)}.items():
        assert (up[y, x] == a[sy, sx]).all()                      # align-corners keeps the corners
    const = np.full((9, 14, 3), 77, np.uint8)
    for rs in ("bilinear", "bicubic"):
        assert (I.resize(const, (31, 5), resample=rs, mode="llamacpp") == 77).all()
        assert np.array_equal(I.resize(a, (30, 20), resample=rs, mode="llamacpp"), a)


def test_letterbox_geometry_and_llamacpp_presets():
    a = make_rgb(100, 50, 15)                                     # h=100, w=50 into 336: scale 3.36
    out = I.letterbox(a, 336, resample="bicubic", color=(122, 116, 104))
    # new width = ceil(50 * 3.36) = 168, offset (336 - 168) // 2 = 84; height fills the square
    assert (out[:, :84] == (122, 116, 104)).all() and (out[:, 84 + 168:] == (122, 116, 104)).all()
    assert np.array_equal(out[:, 84:252], I.resize(a, (336, 168), resample="bicubic", mode="llamacpp"))
    near = I.letterbox(make_rgb(3, 7, 15), (10, 10), resample="bilinear", rounding="nearest")
    # scale 10/7: height round(3 * 1.4286) = 4, offset round(6 / 2) = 3
    assert (near[:3] == 0).all() and (near[7:] == 0).all() and not (near[3:7] == 0).all()

    px = I.preprocess_clip(a, crop_size=336, mode="llamacpp")
    pad = (np.array([122, 116, 104], F32) / F32(255) - np.array(I.OPENAI_CLIP_MEAN, F32)) / np.array(
        I.OPENAI_CLIP_STD, F32)
    assert px.shape == (3, 336, 336) and np.array_equal(px[:, 0, 0], pad)
    g = I.preprocess_gemma3(a, size=64, mode="llamacpp")           # black letterbox: (0 - 0.5) / 0.5 = -1
    assert g.shape == (3, 64, 64) and (g[:, :, :16] == -1).all() and (g[:, :, 48:] == -1).all()
    s = I.preprocess_siglip(a, size=32, mode="llamacpp")
    assert s.shape == (3, 32, 32) and (s[:, :, :8] == -1).all()


def test_llamacpp_normalisation_is_float32_division():
    a = make_rgb(5, 6, 16)
    x = I.to_pixel_values(a, (0.1, 0.2, 0.3), (0.4, 0.5, 0.6), mode="llamacpp")
    expect = ((a.astype(F32) / F32(255.0) - np.array([0.1, 0.2, 0.3], F32)) / np.array([0.4, 0.5, 0.6], F32))
    assert np.array_equal(x, expect.transpose(2, 0, 1))
    hf = I.to_pixel_values(a, (0.1, 0.2, 0.3), (0.4, 0.5, 0.6))
    assert np.abs(hf - x).max() <= 1e-6                           # the two rescale recipes differ by an ulp at most


def test_idefics3_llamacpp_grid():
    a = make_rgb(500, 1000, 17)
    # scale = min(1536/1000, 1536/500) = 1.536: width 1536 (4 tiles of 384), height 768 (2 tiles)
    out = T.preprocess_idefics3(a, longest_edge=1536, tile_size=384, mode="llamacpp")
    assert (out.rows, out.cols, out.resized_size) == (2, 4, (768, 1536))
    assert out.pixel_values.shape == (9, 3, 384, 384)
    assert T.idefics3_grid(500, 1000, longest_edge=1536, tile_size=384, mode="llamacpp") == (2, 4)
    small = T.preprocess_idefics3(make_rgb(20, 20), longest_edge=64, tile_size=64, mode="llamacpp")
    assert (small.rows, small.cols) == (1, 1) and small.pixel_values.shape == (2, 3, 64, 64)


# ---- batch helper -------------------------------------------------------------------------------------------

def test_batch_preserves_order_and_names_failures():
    imgs = [make_rgb(10 + i, 30 - i, i) for i in range(6)]
    seq = [I.preprocess_siglip(x, size=16) for x in imgs]
    par = I.preprocess_batch(imgs, I.preprocess_siglip, max_workers=3, size=16)
    assert all(np.array_equal(p, s) for p, s in zip(par, seq))
    with pytest.raises(ImageError) as info:
        I.preprocess_batch([imgs[0], b"garbage", imgs[1]], I.preprocess_siglip, max_workers=2, size=16)
    assert "image 1 of 3" in "".join(getattr(info.value, "__notes__", ["image 1 of 3"]))
