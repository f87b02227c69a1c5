"""vlm.preprocess.minicpmv / minicpmv_video: llava-uhd slicing against HF MiniCPM-V 4.6 (grids, sizes, pixels
exact, placeholder text token-for-token through HF's processor, video sampling / stacking / pixels / layout) and
the llama.cpp 2.5 / 2.6 variants against transcriptions of mtmd-image.cpp / mtmd.cpp facts."""
from __future__ import annotations

import math

import numpy as np
import pytest
from PIL import Image

from oracles import need
from vlm.preprocess import minicpmv as M
from vlm.preprocess import minicpmv_video as V

TOL = {"pixels_vs_hf": 1e-6}
# (height, width): tiny, odd, square, thin both ways, exactly S, just over S, large, beyond 9 slices
SIZES = [(1, 1), (17, 403), (640, 37), (333, 333), (448, 448), (449, 449), (900, 1200), (1000, 10),
         (2000, 3000), (300, 2000), (100, 5000), (1344, 896)]


def rgb(h, w, seed=0):
    return np.random.default_rng(seed + 7919 * h + w).integers(0, 256, (h, w, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def hf_ip():
    need("transformers")
    from transformers.models.minicpmv4_6.image_processing_pil_minicpmv4_6 import MiniCPMV4_6ImageProcessorPil

    return MiniCPMV4_6ImageProcessorPil


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    need("tokenizers")
    from hf_tiny_mm import make_minicpmv_tokenizer_dir

    return make_minicpmv_tokenizer_dir(tmp_path_factory.mktemp("minicpmv_tok"))


# ---- HF 4.6: size maths --------------------------------------------------------------------------------------

@pytest.mark.parametrize("mode", ["16x", "4x"])
def test_grid_and_sizes_match_hf_methods(hf_ip, mode):
    proc = hf_ip(downsample_mode=mode)
    cfg = M.MINICPMV4_6.with_options(downsample_mode=mode)
    rng = np.random.default_rng(1)
    sizes = [tuple(int(v) for v in rng.integers(1, 3000, 2)) for _ in range(300)] + SIZES
    for max_slices in (1, 2, 4, 9, 12):
        c = cfg.with_options(max_slice_nums=max_slices)
        for h, w in sizes:
            grid = proc.get_sliced_grid((h, w), max_slices, 448)
            assert M.slice_grid(h, w, c) == (None if grid is None else tuple(grid)), (h, w, max_slices)
    for h, w in sizes:
        g = M.slice_grid(h, w, cfg)
        ov = proc.find_best_resize((h, w), 448, 14, mode, allow_upscale=g is None)
        plan = M.slice_plan(h, w, cfg)
        assert plan.overview_size == tuple(ov)
        if g is not None:
            assert plan.refined_size == tuple(proc.get_refine_size((h, w), list(g), 448, 14, mode, allow_upscale=True))


@pytest.mark.parametrize("mode", ["16x", "4x"])
def test_pixels_match_hf(hf_ip, mode):
    proc = hf_ip(downsample_mode=mode)
    cfg = M.MINICPMV4_6.with_options(downsample_mode=mode)
    for h, w in SIZES:
        a = rgb(h, w)
        ref = proc(Image.fromarray(a), return_tensors="np")
        ours = M.preprocess_minicpmv(a, cfg)
        packed = M.pack_patches(ours.pixel_values)
        assert packed.dtype == np.float32 and packed.shape == ref["pixel_values"].shape, (h, w)
        assert float(np.abs(packed - ref["pixel_values"]).max()) <= TOL["pixels_vs_hf"], (h, w)
        np.testing.assert_array_equal(ours.target_sizes, ref["target_sizes"])
        hf_grid = ref["grids"][0]
        assert ours.plan.grid == (None if list(hf_grid) == [0, 0] else tuple(hf_grid))
        assert ref["num_patches_per_image"] == [1 + ours.plan.n_slices]


def test_pixels_match_hf_without_slicing(hf_ip):
    proc = hf_ip(slice_mode=False, max_slice_nums=4)
    for h, w in [(900, 1200), (100, 5000)]:
        a = rgb(h, w, 3)
        ref = proc(Image.fromarray(a), return_tensors="np")
        ours = M.preprocess_minicpmv(a, M.MINICPMV4_6, slice_mode=False)
        assert len(ours.pixel_values) == 1
        np.testing.assert_array_equal(M.pack_patches(ours.pixel_values), ref["pixel_values"])


# ---- HF 4.6: placeholder text through the real processor -----------------------------------------------------

def _hf_processor(tok_dir, **kw):
    from hf_tiny_mm import minicpmv4_6_processor

    return minicpmv4_6_processor(tok_dir, **kw)


@pytest.mark.parametrize("use_image_id", [True, False])
def test_placeholder_text_matches_hf_processor(tok_dir, use_image_id):
    proc = _hf_processor(tok_dir)
    tok = proc.tokenizer
    markers = M.Markers(image_token=tok.image_token)
    images = [rgb(900, 1200, 1), rgb(300, 300, 2), rgb(100, 5000, 3)]
    prompt = f"a {tok.image_token} b {tok.image_token}\nc {tok.image_token} d"
    ref = proc(images=[Image.fromarray(a) for a in images], text=[prompt], use_image_id=use_image_id,
               return_tensors="np")
    parts = prompt.split(tok.image_token)
    text = parts[0]
    for i, a in enumerate(images):
        plan = M.slice_plan(*a.shape[:2], M.MINICPMV4_6)
        text += M.placeholder_text(plan, markers=markers, image_id=i if use_image_id else None) + parts[i + 1]
    ids = tok(text, return_tensors="np")["input_ids"]
    np.testing.assert_array_equal(ids, ref["input_ids"])
    n_image = sum(M.slice_plan(*a.shape[:2]).total_tokens for a in images)
    assert int((ref["input_ids"] == tok.image_token_id).sum()) == n_image


def test_placeholder_layout_literal():
    m = M.Markers(image_token="#")
    plan = M.slice_plan(900, 1200, M.MINICPMV4_6)
    # overview 392x504 = 28x36 patches / 16 = 63 tokens; slices 448x448 = 32x32 / 16 = 64
    assert plan.grid == (2, 3) and plan.overview_size == (392, 504) and plan.n_tokens == (63,) + (64,) * 6
    text = M.placeholder_text(plan, markers=m, image_id=1)
    row = "<slice>" + "#" * 64 + "</slice>"
    assert text == "<image_id>1</image_id><image>" + "#" * 63 + "</image>" + row * 3 + "\n" + row * 3


# ---- llama.cpp 2.5 / 2.6 (facts from tools/mtmd/mtmd-image.cpp llava_uhd, mtmd.cpp, clip.cpp) -------------

def test_llamacpp_versions_as_data():
    assert M.llamacpp_config(0) == M.MINICPMV2_5_LLAMACPP          # unset -> 2
    assert M.llamacpp_config(2).query_num == 96 and M.llamacpp_config(2).layout == "v2_5"
    for v in (3, 4, 5, 6, 100045):
        cfg = M.llamacpp_config(v)
        assert cfg.query_num == 64 and cfg.layout == "v2_6" and not cfg.use_image_id
    assert M.llamacpp_config(3, query_num=32).query_num == 32       # clip.minicpmv_query_num wins
    with pytest.raises(ValueError, match="unsupported minicpmv version: 7"):
        M.llamacpp_config(7)


def _llamacpp_grid_ref(w, h, S=448, max_n=9):
    """Scalar transcription: candidates per count m=1.. as {width: m, height: n/m}; strict < keeps the first."""
    f = np.float32
    log_ratio = np.log(f(w) / f(h))
    multiple = int(min(math.ceil(f(w) * f(h) / f(S * S)), max_n))
    best, err_best = (1, 1), np.inf
    for n in (multiple - 1, multiple, multiple + 1):
        if n == 1 or n > max_n:
            continue
        for m in range(1, n + 1):
            if n % m == 0:
                err = abs(log_ratio - np.log(f(m) / f(n // m)))
                if err < err_best:
                    best, err_best = (n // m, m), err            # (rows, cols)
    return best


def test_llamacpp_slicing_rules():
    cfg = M.MINICPMV2_6_LLAMACPP
    # no slices only when both sides fit: the overview is stretched to S x S
    p = M.slice_plan(448, 300, cfg)
    assert p.grid is None and p.overview_size == (448, 448) and p.n_tokens == (64,)
    # any side > S slices, even a small area (HF does not slice it)
    p = M.slice_plan(100, 449, cfg)
    assert p.grid is not None and M.slice_plan(100, 449, M.MINICPMV4_6).grid is None
    assert p.overview_size == (98, 448)                            # no upscale of a sliced image's overview
    rng = np.random.default_rng(2)
    for h, w in [tuple(int(v) for v in rng.integers(1, 4000, 2)) for _ in range(300)]:
        if max(h, w) > 448:
            assert M.slice_grid(h, w, cfg) == _llamacpp_grid_ref(w, h), (h, w)
    # ties: llama.cpp keeps the first candidate (fewest columns), HF the one with more rows
    assert M.slice_grid(449, 449, cfg) == (2, 1) == M.slice_grid(449, 449, M.MINICPMV4_6)
    # rounding: C round() sends halves away from zero, Python to even (35 / 14 = 2.5)
    assert M.ensure_divide(35, 14, cfg) == 42 and M.ensure_divide(35, 14, M.MINICPMV4_6.with_options()) == 28


def test_llamacpp_layouts():
    m = M.Markers(image_token="#")
    p = M.slice_plan(900, 1200, M.MINICPMV2_5_LLAMACPP)
    r, c = p.grid
    cell = "<image>" + "#" * 96 + "</image>"
    assert M.placeholder_text(p, M.MINICPMV2_5_LLAMACPP, markers=m, image_id=0) == (
        "<image>" + "#" * 96 + "</image><slice>" + "\n".join([cell * c] * r) + "</slice>")
    p = M.slice_plan(900, 1200, M.MINICPMV2_6_LLAMACPP)
    cell = "<slice>" + "#" * 64 + "</slice>"
    assert M.placeholder_text(p, M.MINICPMV2_6_LLAMACPP, markers=m, image_id=0) == (
        "<image>" + "#" * 64 + "</image>" + "\n".join([cell * c] * r))
    p = M.slice_plan(300, 300, M.MINICPMV2_5_LLAMACPP)
    assert M.placeholder_text(p, M.MINICPMV2_5_LLAMACPP, markers=m) == "<image>" + "#" * 96 + "</image>"


def test_llamacpp_pixels_tile_the_refined_image():
    from vlm.preprocess.image import letterbox, to_pixel_values

    cfg = M.MINICPMV2_6_LLAMACPP
    a = rgb(700, 1000, 4)
    out = M.preprocess_minicpmv(a, cfg)
    p = out.plan
    assert [pv.shape[1:] for pv in out.pixel_values] == p.sizes
    refined = to_pixel_values(letterbox(a, p.refined_size, resample="bicubic", mode="llamacpp"), cfg.mean, cfg.std,
                              mode="llamacpp")
    sh, sw = p.slice_size
    np.testing.assert_array_equal(out.pixel_values[1 + p.grid[1]], refined[:, sh:2 * sh, 0:sw])


# ---- bad input ---------------------------------------------------------------------------------------------

def test_bad_input():
    with pytest.raises(M.SliceGridError, match=r"slice grid 3x4 = 12 slices exceeds max_slice_nums 9"):
        M.slice_plan(900, 1200, M.MINICPMV4_6, grid=(3, 4))
    with pytest.raises(M.SliceGridError, match="at least 1x1"):
        M.slice_plan(900, 1200, M.MINICPMV4_6, grid=(0, 2))
    with pytest.raises(M.SliceGridError, match="max_slice_nums must be >= 1"):
        M.MINICPMV4_6.with_options(max_slice_nums=0)
    with pytest.raises(M.SliceGridError, match="fixed at 9"):
        M.MINICPMV2_6_LLAMACPP.with_options(max_slice_nums=16)
    with pytest.raises(ValueError, match="downsample_mode must be"):
        M.MINICPMV4_6.with_options(downsample_mode="8x")
    with pytest.raises(ValueError, match="not to a resampler"):
        M.MINICPMV2_6_LLAMACPP.with_options(downsample_mode="4x")
    with pytest.raises(ValueError, match="image size must be positive"):
        M.slice_plan(0, 10)
    with pytest.raises(ValueError, match="not a multiple of the patch size"):
        M.pack_patches([np.zeros((3, 15, 14), np.float32)])


# ---- video (HF 4.6) -------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def hf_video_cls():
    need("transformers")
    from transformers.models.minicpmv4_6.video_processing_minicpmv4_6 import MiniCPMV4_6VideoProcessor

    return MiniCPMV4_6VideoProcessor


def test_video_frame_indices_match_hf(hf_video_cls):
    from transformers.video_utils import VideoMetadata

    proc = hf_video_cls()
    for duration, fps, stack, max_frames in [(10.0, 30.0, 1, 128), (7.3, 24.0, 3, 128), (200.0, 25.0, 1, 64),
                                             (150.5, 10.0, 2, 128), (0.4, 30.0, 4, 128)]:
        n = int(duration * fps)
        meta = VideoMetadata(total_num_frames=n, fps=fps, duration=duration)
        ref = proc.sample_frames(meta, max_num_frames=max_frames, stack_frames=stack)
        assert V.video_frame_indices(duration, fps, n, max_num_frames=max_frames, stack_frames=stack) == list(ref)


def test_stack_canvas_matches_hf(hf_video_cls):
    import torch

    proc = hf_video_cls()
    for n, h, w in [(4, 20, 30), (3, 20, 60), (3, 60, 20), (2, 30, 30), (2, 10, 40), (5, 8, 8)]:
        frames = np.random.default_rng(n * h + w).integers(0, 256, (n, h, w, 3), dtype=np.uint8)
        ref = proc.concat_frames_as_image(torch.from_numpy(frames).permute(0, 3, 1, 2).contiguous())
        np.testing.assert_array_equal(V.stack_canvas(frames), ref[0].permute(1, 2, 0).numpy())


def test_video_pixels_and_layout_match_hf(monkeypatch, tok_dir):
    from tv_standin import hf_minicpmv4_6_video_processor

    proc = hf_minicpmv4_6_video_processor(monkeypatch)
    video = np.random.default_rng(5).integers(0, 255, (3, 500, 700, 3), dtype=np.uint8)
    ref = proc(videos=[video], do_sample_frames=False, return_tensors="np")
    pvs, plans = [], []
    for frame in video:
        pv, plan = V.preprocess_video_unit(frame)
        pvs += pv
        plans.append(plan)
    packed = M.pack_patches(pvs)
    assert packed.shape == ref["pixel_values_videos"].shape
    assert float(np.abs(packed - ref["pixel_values_videos"]).max()) <= TOL["pixels_vs_hf"]
    sizes = np.concatenate([[[s[0] // 14, s[1] // 14] for s in p.sizes] for p in plans])
    np.testing.assert_array_equal(sizes, ref["target_sizes_videos"])
    # the placeholder layout through HF's replace_video_token
    hfp = _hf_processor(tok_dir)
    text = hfp.replace_video_token(ref, video_idx=0, video_token_divisor=16)
    assert text == V.video_placeholder_text(plans, markers=M.Markers(image_token=hfp.video_token),
                                            video_token=hfp.video_token)


def test_video_units_interleave_composites():
    # 3.5 s, stack 3: main frames at 0..3 s, sub-frames at 1/3, 2/3, 4/3, 5/3, 7/3, 8/3 (10/3 < 3.5 too -> 7)
    idx = V.video_frame_indices(3.5, 10.0, 35, stack_frames=3)
    assert len(idx) == 4 + 7
    frames = np.random.default_rng(6).integers(0, 256, (len(idx), 20, 30, 3), dtype=np.uint8)
    units = V.video_units(frames, 3.5, stack_frames=3)
    # two 20x30 sub-frames: a 46x30 column is closer to square than a 20x66 row
    assert len(units) == 8 and units[0].shape == (20, 30, 3) and units[1].shape == (46, 30, 3)
    assert units[7].shape == (20, 30, 3)                           # second 3 has one sub-frame -> a 1x1 canvas
    with pytest.raises(ValueError, match="positive duration"):
        V.video_frame_indices(0, 30.0, 10)


def test_stacked_video_units_match_hf(monkeypatch):
    from transformers.video_utils import VideoMetadata

    from tv_standin import hf_minicpmv4_6_video_processor

    proc = hf_minicpmv4_6_video_processor(monkeypatch)
    duration, fps = 3.5, 10.0
    idx = V.video_frame_indices(duration, fps, 35, stack_frames=3)
    frames = np.random.default_rng(6).integers(0, 256, (len(idx), 120, 160, 3), dtype=np.uint8)
    meta = VideoMetadata(total_num_frames=len(idx), fps=fps, duration=duration)
    ref = proc(videos=[frames], video_metadata=[meta], do_sample_frames=False, stack_frames=3, return_tensors="np")
    units = V.video_units(frames, duration, stack_frames=3)
    assert ref["num_frames_per_video"] == [len(units)]
    pvs = [pv for u in units for pv in V.preprocess_video_unit(u)[0]]
    packed = M.pack_patches(pvs)
    assert packed.shape == ref["pixel_values_videos"].shape
    assert float(np.abs(packed - ref["pixel_values_videos"]).max()) <= TOL["pixels_vs_hf"]
