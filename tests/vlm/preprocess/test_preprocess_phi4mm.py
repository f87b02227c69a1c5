"""vlm.preprocess.phi4mm against transformers' Phi4MultimodalImageProcessor (HD crops, global image, masks,
image sizes, token counts; pixels exact) and Phi4MultimodalFeatureExtractor (log-mel within 1e-5, token counts).

HF's image processor is a torchvision-backend class; where torchvision is missing (our CPU environment) it runs
on `tv_standin` (torchvision's resize / pad / normalize restated in torch; checked once against the real
torchvision 0.28 code: identical pixels)."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from oracles import need
from vlm.preprocess import phi4mm as P

TOL = {"pixels_vs_hf": 1e-6, "log_mel_vs_hf": 1e-5}
# (height, width): below one crop, odd, thin both ways, exactly one crop, one pixel over, multi-crop, beyond the
# 36-crop budget (closest aspect ratio), very wide
SIZES = [(100, 100), (17, 403), (640, 37), (448, 448), (449, 449), (900, 1200), (1000, 300), (2000, 3000),
         (300, 5000), (5000, 5000), (896, 1344), (10, 4000)]


def rgb(h, w, seed=0):
    return np.random.default_rng(seed + 31 * h + w).integers(0, 256, (h, w, 3), dtype=np.uint8)


@pytest.fixture
def hf_image_processor(monkeypatch):
    need("transformers")
    from tv_standin import hf_phi4mm_image_processor

    return hf_phi4mm_image_processor(monkeypatch)


@pytest.fixture(scope="module")
def hf_fe():
    need("transformers")
    from hf_tiny_mm import phi4mm_feature_extractor

    return phi4mm_feature_extractor()


def test_image_matches_hf(hf_image_processor):
    for h, w in SIZES:
        a = rgb(h, w)
        ref = hf_image_processor(Image.fromarray(a), return_tensors="np")
        ours = P.preprocess_phi4mm_image(a)
        pv = ref["image_pixel_values"][0]
        assert ours.pixel_values.dtype == np.float32 and ours.pixel_values.shape == pv.shape, (h, w)
        assert float(np.abs(ours.pixel_values - pv).max()) <= TOL["pixels_vs_hf"], (h, w)
        np.testing.assert_array_equal(ours.attention_mask, ref["image_attention_mask"][0])
        assert list(ours.image_size) == list(ref["image_sizes"][0])
        assert ours.n_tokens == int(ref["num_img_tokens"][0])


def test_token_counts_match_hf(hf_image_processor):
    rng = np.random.default_rng(3)
    for h, w in [tuple(int(v) for v in rng.integers(10, 6000, 2)) for _ in range(200)] + SIZES:
        try:
            ref = hf_image_processor.get_number_of_image_tokens(h, w)
        except ValueError:
            with pytest.raises(P.ImageError, match="aspect ratio is very extreme"):
                P.crop_layout(h, w)
            continue
        assert P.image_token_count(P.crop_layout(h, w)) == ref, (h, w)
    for budget in (1, 4, 12):
        for h, w in [(900, 1200), (3000, 200), (2000, 2000)]:
            ref = hf_image_processor.get_number_of_image_tokens(h, w, {"dynamic_hd": budget})
            assert P.image_token_count(P.crop_layout(h, w, dynamic_hd=budget)) == ref
            assert P.crop_layout(h, w, dynamic_hd=budget).n_crops <= budget


def test_batch_matches_hf(hf_image_processor):
    images = [rgb(500, 700, 1), rgb(100, 2000, 2), rgb(300, 300, 3)]
    ref = hf_image_processor([Image.fromarray(a) for a in images], return_tensors="np")
    ours = P.batch_phi4mm_images([P.preprocess_phi4mm_image(a) for a in images])
    for key in ("image_pixel_values", "image_attention_mask", "image_sizes"):
        np.testing.assert_array_equal(ours[key], ref[key])
    assert ours["num_img_tokens"] == [int(n) for n in ref["num_img_tokens"]]


def test_image_bad_input():
    with pytest.raises(P.ImageError, match="aspect ratio is very extreme: 2x403"):
        P.preprocess_phi4mm_image(rgb(2, 403))
    with pytest.raises(P.ImageError, match="image size must be positive"):
        P.crop_layout(0, 5)
    with pytest.raises(ValueError, match="min_crops <= dynamic_hd"):
        P.crop_layout(500, 500, dynamic_hd=0)


def test_mel_filterbank_matches_hf(hf_fe):
    np.testing.assert_allclose(P.kaldi_mel_filterbank(), hf_fe.mel_filters, rtol=0, atol=1e-12)


@pytest.mark.parametrize("n_samples", [400, 559, 560, 16000, 16000 * 7 + 123, 16000 * 45])
def test_audio_features_match_hf(hf_fe, n_samples):
    x = (np.random.default_rng(n_samples).standard_normal(n_samples) * 0.1).astype(np.float32)
    ref = hf_fe(x, sampling_rate=16000, return_tensors="np")
    ours = P.phi4mm_audio_features(x)
    assert ours.shape == ref["audio_input_features"][0].shape == (P.n_audio_frames(n_samples), 80)
    assert float(np.abs(ours - ref["audio_input_features"][0]).max()) <= TOL["log_mel_vs_hf"]
    assert P.audio_token_count(ours.shape[0]) == int(ref["audio_embed_sizes"][0])


def test_audio_batch_rows_equal_single_clips(hf_fe):
    rng = np.random.default_rng(7)
    clips = [(rng.standard_normal(n) * 0.1).astype(np.float32) for n in (16000, 9000, 4321)]
    ref = hf_fe(clips, sampling_rate=16000, return_tensors="np")
    for i, x in enumerate(clips):
        ours = P.phi4mm_audio_features(x)
        assert float(np.abs(ref["audio_input_features"][i][:ours.shape[0]] - ours).max()) <= TOL["log_mel_vs_hf"]
        assert P.audio_token_count(ours.shape[0]) == int(ref["audio_embed_sizes"][i])
        assert int(ref["audio_attention_mask"][i].sum()) == ours.shape[0]


def test_audio_bad_input():
    with pytest.raises(P.AudioLengthError, match="fewer than one 400-sample frame"):
        P.phi4mm_audio_features(np.zeros(399, np.float32))
    with pytest.raises(P.AudioLengthError, match=r"audio is 31.00 s long, more than the 30 s allowed"):
        P.phi4mm_audio_features(np.zeros(31 * 16000, np.float32), max_seconds=30)
    with pytest.raises(ValueError, match="sampled at 16000 Hz, got 8000"):
        P.phi4mm_audio_features(np.zeros(16000, np.float32), sample_rate=8000)
    with pytest.raises(ValueError, match="expected mono audio"):
        P.phi4mm_audio_features(np.zeros((2, 16000), np.float32))
    with pytest.raises(ValueError, match="NaN or infinite"):
        P.phi4mm_audio_features(np.full(1000, np.nan, np.float32))
    # long audio is not refused by default: HF's conformer runs it in 500-frame (40 s) windows
    assert P.encoder_windows(P.n_audio_frames(90 * 16000)) == 3
