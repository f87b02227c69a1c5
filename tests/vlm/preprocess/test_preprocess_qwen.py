"""vlm.preprocess.qwen_image: smart_resize (HF's and llama.cpp's rounding), temporal patches in HF's order, and
pixel-exact parity with Qwen2VLImageProcessor."""
from __future__ import annotations

import ctypes
import ctypes.util
import itertools

import numpy as np
import pytest
from PIL import Image

from oracles import missing, need
from vlm.preprocess import qwen_image as Q
from vlm.preprocess.image import ImageError

TOL = {"pixels_vs_hf": 1e-6}  # architecture.md: image pixels vs HF processors exact
F32 = np.float32

# (height, width): odd sizes, a square, extreme aspect ratios (196:1 is under HF's 200 limit), large.
SIZES = [(1, 1), (17, 403), (640, 37), (333, 333), (10, 1000), (3, 590), (1500, 1100), (14, 42)]


def hf_processor(**kwargs):
    transformers = need("transformers")
    cls = getattr(transformers, "Qwen2VLImageProcessorPil", None) or getattr(transformers, "Qwen2VLImageProcessor")
    try:
        return cls(**kwargs)
    except ImportError as e:  # e.g. a torchvision-only class in some release
        missing(f"{cls.__name__} unavailable: {e}")


def hf_smart_resize():
    need("transformers")
    for name in ("image_processing_pil_qwen2_vl", "image_processing_qwen2_vl"):  # 5.x PIL backend, then older
        try:
            return __import__(f"transformers.models.qwen2_vl.{name}", fromlist=["smart_resize"]).smart_resize
        except ImportError:
            continue
    missing("transformers has no importable Qwen2-VL smart_resize")


def make_rgb(h: int, w: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed + 7919 * h + w)
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([xx * 255 // max(w - 1, 1), yy * 255 // max(h - 1, 1), (xx * 3 + yy) % 256], -1)
    return np.clip(base + rng.integers(-40, 41, (h, w, 3)), 0, 255).astype(np.uint8)


# ---- smart_resize -------------------------------------------------------------------------------------------

# Multiples of 14 are exact ties for factor 28 (k + 0.5); the rest straddle them.
GRID = sorted({1, 2, 13, 14, 15, 27, 28, 29, 41, 42, 43, 55, 56, 70, 98, 126, 154, 333, 350, 378, 406, 1000,
               1022, 1050, 1078, 2002, 4000, 4018})


def test_smart_resize_hf_equals_transformers_on_grid_with_ties():
    ref = hf_smart_resize()
    limits = [(56 * 56, 28 * 28 * 1280), (4 * 28 * 28, 16384 * 28 * 28), (1, 10**12), (256 * 28 * 28, 256 * 28 * 28)]
    n = 0
    for (h, w), (lo, hi) in itertools.product(itertools.product(GRID, GRID), limits):
        try:
            expect = ref(h, w, 28, lo, hi)
        except ValueError as e:
            with pytest.raises(ImageError, match="aspect ratio"):
                Q.smart_resize(h, w, 28, lo, hi)
            assert "200" in str(e)
            continue
        assert Q.smart_resize(h, w, 28, lo, hi) == expect, (h, w, lo, hi)
        n += 1
    assert n > 2000
    for factor in (14, 32):  # Qwen3-VL uses 32
        for h, w in itertools.product(GRID[:20], repeat=2):
            if max(h, w) / min(h, w) > 200:
                continue
            assert Q.smart_resize(h, w, factor, 1000, 200000) == ref(h, w, factor, 1000, 200000)


def test_smart_resize_rounding_differs_exactly_on_ties():
    # 70 / 28 = 2.5: Python rounds to 2 (56), C rounds away to 3 (84)
    assert Q.smart_resize(70, 70, 28, 1, 10**9) == (56, 56)
    assert Q.smart_resize(70, 70, 28, 1, 10**9, rounding="llamacpp") == (84, 84)
    # 42 / 28 = 1.5: both give 2 (56)
    assert Q.smart_resize(42, 42, 28, 1, 10**9) == Q.smart_resize(42, 42, 28, 1, 10**9, rounding="llamacpp")
    # 14 / 28 = 0.5: HF rounds the height to 0, so the area is 0 < min and the image is scaled up:
    # beta = sqrt(3136 / 14000); h = ceil(14 beta / 28) * 28 = 28, w = ceil(1000 beta / 28) * 28 = 476.
    assert Q.smart_resize(14, 1000) == (28, 476)
    # llama.cpp: max(28, round(0.5) * 28) = 28, round(1000 / 28 = 35.7) = 36 -> 1008; 28 * 1008 >= 3136.
    assert Q.smart_resize(14, 1000, rounding="llamacpp") == (28, 1008)


def c_float_fn(name):
    libm = ctypes.CDLL(ctypes.util.find_library("m") or "libm.so.6")
    fn = getattr(libm, name)
    fn.restype, fn.argtypes = ctypes.c_float, [ctypes.c_float]
    return lambda x: F32(fn(float(x)))


def test_smart_resize_llamacpp_equals_c_float_arithmetic():
    """Scalar transcription of llama.cpp's calc_size_preserved_ratio with C's roundf/floorf/ceilf/sqrtf."""
    roundf, floorf, ceilf, sqrtf = (c_float_fn(n) for n in ("roundf", "floorf", "ceilf", "sqrtf"))

    def ref(h, w, f, lo, hi):
        ff = F32(f)
        hb, wb = max(f, int(roundf(F32(h) / ff)) * f), max(f, int(roundf(F32(w) / ff)) * f)
        if hb * wb > hi:
            beta = sqrtf(F32(h) * F32(w) / F32(hi))
            hb, wb = max(f, int(floorf(F32(h) / beta / ff)) * f), max(f, int(floorf(F32(w) / beta / ff)) * f)
        elif hb * wb < lo:
            beta = sqrtf(F32(lo) / (F32(h) * F32(w)))
            hb, wb = int(ceilf(F32(h) * beta / ff)) * f, int(ceilf(F32(w) * beta / ff)) * f
        return hb, wb

    for (h, w), (lo, hi) in itertools.product(itertools.product(GRID, GRID),
                                              [(8 * 784, 4096 * 784), (1024 * 784, 4096 * 784), (3136, 1003520)]):
        assert Q.smart_resize(h, w, 28, lo, hi, rounding="llamacpp") == ref(h, w, 28, lo, hi), (h, w, lo, hi)


def test_smart_resize_bad_arguments():
    with pytest.raises(ImageError, match="empty image"):
        Q.smart_resize(0, 10)
    with pytest.raises(ValueError, match="rounding must be"):
        Q.smart_resize(10, 10, rounding="banker")
    with pytest.raises(ImageError, match=r"aspect ratio of a 1000x2 image is 500.0, above Qwen2-VL's limit of 200"):
        Q.preprocess_qwen2vl(make_rgb(2, 1000))
    with pytest.raises(ValueError, match="min_pixels 5000 exceeds max_pixels 4000"):
        Q.qwen2vl_resized_size(100, 100, min_pixels=5000, max_pixels=4000)


# ---- pixel parity -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("h,w", SIZES)
def test_preprocess_matches_hf(h, w):
    a = make_rgb(h, w)
    out = hf_processor()(Image.fromarray(a), return_tensors="np")
    ours = Q.preprocess_qwen2vl(a)
    ref = np.asarray(out["pixel_values"])
    assert ours.pixel_values.shape == ref.shape and ref.shape[1] == 1176
    assert float(np.abs(ours.pixel_values - ref).max()) <= TOL["pixels_vs_hf"]
    assert ours.grid_thw == tuple(int(v) for v in out["image_grid_thw"][0])
    assert ours.resized_size == (ours.grid_thw[1] * 14, ours.grid_thw[2] * 14) == Q.qwen2vl_resized_size(h, w)
    assert ours.original_size == (h, w) and ours.n_tokens == ours.grid_thw[1] * ours.grid_thw[2] // 4


@pytest.mark.parametrize("limits", [dict(min_pixels=128 * 28 * 28, max_pixels=256 * 28 * 28),
                                    dict(min_pixels=4 * 28 * 28, max_pixels=16 * 28 * 28)])
def test_per_call_pixel_and_token_limits_match_hf(limits):
    a = make_rgb(300, 500, 1)
    proc = hf_processor(size={"shortest_edge": limits["min_pixels"], "longest_edge": limits["max_pixels"]})
    out = proc(Image.fromarray(a), return_tensors="np")
    ours = Q.preprocess_qwen2vl(a, **limits)
    assert float(np.abs(ours.pixel_values - np.asarray(out["pixel_values"])).max()) <= TOL["pixels_vs_hf"]
    assert limits["min_pixels"] <= ours.resized_size[0] * ours.resized_size[1] <= limits["max_pixels"]
    by_tokens = Q.preprocess_qwen2vl(a, min_tokens=limits["min_pixels"] // 784, max_tokens=limits["max_pixels"] // 784)
    assert np.array_equal(by_tokens.pixel_values, ours.pixel_values)


def test_patch_size_14_merge_1_matches_hf():
    a = make_rgb(100, 61, 2)
    out = hf_processor(merge_size=1)(Image.fromarray(a), return_tensors="np")
    ours = Q.preprocess_qwen2vl(a, merge_size=1)
    assert ours.grid_thw == tuple(int(v) for v in out["image_grid_thw"][0])
    assert float(np.abs(ours.pixel_values - np.asarray(out["pixel_values"])).max()) <= TOL["pixels_vs_hf"]


# ---- temporal patches ---------------------------------------------------------------------------------------

def test_patchify_video_frames_against_loop_reference():
    p, m, tps = 2, 2, 2
    rng = np.random.default_rng(3)
    frames = rng.standard_normal((3, 3, 8, 12)).astype(F32)     # 3 frames: padded to 4 by repeating the last
    patches, grid = Q.patchify(frames, patch_size=p, merge_size=m, temporal_patch_size=tps)
    assert grid == (2, 4, 6) and patches.shape == (2 * 4 * 6, 3 * tps * p * p)
    padded = np.concatenate([frames, frames[-1:]])
    rows = []
    for t in range(grid[0]):
        for by in range(grid[1] // m):
            for bx in range(grid[2] // m):
                for my in range(m):
                    for mx in range(m):
                        y, x = (by * m + my) * p, (bx * m + mx) * p
                        block = padded[t * tps:(t + 1) * tps, :, y:y + p, x:x + p]   # [T, C, p, p]
                        rows.append(block.transpose(1, 0, 2, 3).reshape(-1))          # (C, T, p, p)
    assert np.array_equal(patches, np.stack(rows))
    still, g = Q.patchify(frames[:1], patch_size=p, merge_size=m, temporal_patch_size=tps)
    half = 3 * p * p
    r = still.reshape(-1, 3, tps, p * p)
    assert g == (1, 4, 6) and np.array_equal(r[:, :, 0], r[:, :, 1])                      # frame repeated
    assert half == r.shape[1] * r.shape[3]
    with pytest.raises(ValueError, match="not a multiple of patch_size\\*merge_size = 4"):
        Q.patchify(frames[:, :, :6], patch_size=p, merge_size=m)


# ---- llama.cpp mode -----------------------------------------------------------------------------------------

def test_llamacpp_mode_limits_and_letterbox():
    # 1x1: max(28, 0) = 28 each; 784 < 8 tokens * 784 = 6272 -> beta = sqrt(6272) = 79.2, ceil(79.2/28) = 3 -> 84
    tiny = Q.preprocess_qwen2vl(make_rgb(1, 1), mode="llamacpp")
    assert tiny.resized_size == (84, 84) and tiny.grid_thw == (1, 6, 6) and tiny.n_tokens == 9
    # 100x50 -> (112, 56) (round(3.57) = 4, round(1.79) = 2 factors, 6272 >= 6272) then a letterbox:
    # scale = min(56/50, 112/100) = 1.12, new 56x112 exactly, no padding.
    a = make_rgb(100, 50, 4)
    out = Q.preprocess_qwen2vl(a, mode="llamacpp")
    assert out.resized_size == (112, 56) and out.pixel_values.shape == (8 * 4, 1176)
    # 4096-token cap: 4000x3000 -> 12 Mpx > 3,211,264: scaled down to fit
    h, w = Q.qwen2vl_resized_size(4000, 3000, mode="llamacpp")
    assert h * w <= 4096 * 784 and h % 28 == 0 and w % 28 == 0
    assert Q.qwen2vl_resized_size(4000, 3000, mode="llamacpp", max_tokens=1024) != (h, w)
