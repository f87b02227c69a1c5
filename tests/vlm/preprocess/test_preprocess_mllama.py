"""vlm.preprocess.mllama against transformers' MllamaImageProcessor (PIL backend) and processing_mllama: tile grid,
resize size, pixels (exact), aspect-ratio ids / masks, batch packing, the <|image|> spans and the dense
cross-attention mask, the decoder-side bias; and the errors for bad input."""
from __future__ import annotations

import io
import random

import numpy as np
import pytest
import torch
from PIL import Image

import hf_tiny_cross
from oracles import need
from vlm.preprocess import mllama as M
from vlm.preprocess.image import ImageError

TOL = {"pixels_vs_hf": 1e-6}     # architecture.md: image pixels vs HF processors exact (measured: 0.0)
# (height, width): a pixel, lines, both aspect extremes, exact tile multiples, one pixel off them, odd sizes
SIZES = [(1, 1), (1, 500), (500, 1), (3, 2000), (2000, 7), (28, 28), (29, 28), (56, 28), (28, 84), (50, 130),
         (777, 123), (112, 112), (27, 119), (56, 55), (300, 301)]
CONFIGS = [(28, 2), (56, 4), (448, 4), (32, 6)]      # (tile size, max tiles)


def _hf_mod():
    need("transformers")
    from transformers.models.mllama import image_processing_pil_mllama as hf
    return hf


def _img(h, w, seed=0, c=3):
    return np.random.RandomState(seed).randint(0, 256, (h, w, c), dtype=np.uint8)


@pytest.mark.parametrize("n", range(1, 9))
def test_supported_aspect_ratios_as_hf(n):
    assert M.supported_aspect_ratios(n) == list(_hf_mod().get_all_supported_aspect_ratios(n))


def test_canvas_and_resize_size_as_hf():
    hf = _hf_mod()
    rng = random.Random(0)
    sizes = SIZES + [(rng.randint(1, 3000), rng.randint(1, 3000)) for _ in range(300)]
    for tile, n in CONFIGS + [(560, 4), (14, 1), (100, 9)]:
        for h, w in sizes:
            canvas = M.optimal_canvas(h, w, tile_size=tile, max_num_tiles=n)
            ref = tuple(int(x) for x in hf.get_optimal_tiled_canvas(h, w, n, tile))
            assert canvas == ref, (h, w, tile, n)
            assert M.fit_to_canvas(h, w, *canvas, tile) == hf.get_image_size_fit_to_canvas(h, w, *canvas, tile)


@pytest.mark.parametrize("tile,n", CONFIGS)
def test_pixels_ids_and_masks_exact(tile, n):
    proc = hf_tiny_cross.mllama_image_processor(tile, n)
    for i, (h, w) in enumerate(SIZES):
        img = _img(h, w, seed=i)
        ref = proc([[Image.fromarray(img)]])        # PIL in: HF guesses the channel axis of tiny arrays
        ours = M.preprocess_mllama(img, tile_size=tile, max_num_tiles=n)
        b = M.pack_mllama([[ours]], n)
        assert b.pixel_values.shape == ref["pixel_values"].shape, (h, w)
        assert np.abs(b.pixel_values - ref["pixel_values"]).max() <= TOL["pixels_vs_hf"], (h, w)
        np.testing.assert_array_equal(b.aspect_ratio_ids, ref["aspect_ratio_ids"])
        np.testing.assert_array_equal(b.aspect_ratio_mask, ref["aspect_ratio_mask"])
        assert b.num_tiles == ref["num_tiles"]
        g = ours.grid
        assert ours.pixel_values.shape == (g.rows * g.cols, 3, tile, tile)
        assert g == M.mllama_grid(h, w, tile_size=tile, max_num_tiles=n)


def test_batch_of_samples_with_different_image_counts():
    proc = hf_tiny_cross.mllama_image_processor(56, 4)
    samples = [[_img(50, 130, 1)], [_img(300, 40, 2), _img(56, 56, 3), _img(9, 400, 4)], [_img(120, 120, 5)]]
    ref = proc([[Image.fromarray(a) for a in s] for s in samples])
    b = M.pack_mllama([[M.preprocess_mllama(a, tile_size=56, max_num_tiles=4) for a in s] for s in samples], 4)
    assert np.abs(b.pixel_values - ref["pixel_values"]).max() <= TOL["pixels_vs_hf"]
    np.testing.assert_array_equal(b.aspect_ratio_ids, ref["aspect_ratio_ids"])    # padding images: id 0
    np.testing.assert_array_equal(b.aspect_ratio_mask, ref["aspect_ratio_mask"])  # padding images: tile 0 set
    assert b.num_tiles == ref["num_tiles"]


def test_image_sources_and_alpha_as_hf():
    proc = hf_tiny_cross.mllama_image_processor(28, 2)
    rgba = Image.fromarray(_img(40, 23, 7, c=4), "RGBA")
    buf = io.BytesIO()
    rgba.save(buf, format="PNG")
    grey = Image.fromarray(_img(33, 70, 8)[..., 0], "L")
    for ours_in, hf_in in [(rgba, rgba), (buf.getvalue(), rgba), (grey, grey)]:
        ref = proc([[hf_in]])["pixel_values"][0, 0]
        out = M.preprocess_mllama(ours_in, tile_size=28, max_num_tiles=2)
        assert np.abs(out.pixel_values - ref[:out.num_tiles]).max() <= TOL["pixels_vs_hf"]


# ------------------------------------------------------------------------------------------------ text side
def _random_ids(rng, image_id):
    n = rng.randint(0, 40)
    return [image_id if rng.random() < 0.2 else rng.randint(0, 50) for _ in range(n)]


def test_spans_and_dense_mask_as_hf():
    need("transformers")
    from transformers.models.mllama import processing_mllama as hf

    rng = random.Random(0)
    image_id = 99
    for _ in range(500):
        batch = [_random_ids(rng, image_id) for _ in range(rng.randint(1, 3))]
        spans = [M.cross_attention_spans(ids, image_id) for ids in batch]
        ref = [hf.get_cross_attention_token_mask(ids, image_id) for ids in batch]
        assert spans == [[(a, len(ids) if b == -1 else b) for a, b in r] for r, ids in zip(ref, batch)]
        if not any(spans):
            continue
        n_tiles = [[rng.randint(1, 4) for _ in s] for s in spans]
        ours = M.cross_attention_mask_batch(batch, n_tiles, image_token_id=image_id, max_num_tiles=4)
        want = hf.convert_sparse_cross_attention_mask_to_dense(ref, n_tiles, 4, max(len(i) for i in batch))
        np.testing.assert_array_equal(ours, want)


def test_rows_before_the_first_image_see_nothing():
    ids = [5, 6, 99, 7, 99, 99, 8, 9]
    m = M.cross_attention_mask(ids, [2, 1, 3], image_token_id=99, max_num_tiles=4)
    assert m.shape == (8, 3, 4)
    assert not m[:2].any()                              # text before the first <|image|>
    assert m[2:4, 0, :2].all() and not m[4:, 0].any()   # image 0 until the next marker
    assert m[4:, 1, :1].all() and m[5:, 2, :3].all()    # adjacent markers both reach the end
    assert not m[..., 3].any()                          # no image has a 4th tile


def test_processor_mask_from_our_functions(tmp_path):
    proc = hf_tiny_cross.tiny_mllama_processor(hf_tiny_cross.make_tiny_mllama(tmp_path / "mllama"))
    image_id = proc.image_token_id
    prompts = ["<|image|>Describe this.", "Look <|image|> and <|image|><|image|> then text", "A<|image|>"]
    images = [[_img(20, 40, 1)], [_img(70, 30, 2), _img(28, 28, 3), _img(10, 90, 4)], [_img(50, 50, 5)]]
    ref = proc(images=[[Image.fromarray(a) for a in s] for s in images], text=prompts, padding=True)
    ours_imgs = [[M.preprocess_mllama(a, tile_size=28, max_num_tiles=2) for a in s] for s in images]
    ids = [[t for t, keep in zip(row, mask) if keep] for row, mask in zip(ref["input_ids"], ref["attention_mask"])]
    mask = M.cross_attention_mask_batch(ids, [[i.num_tiles for i in s] for s in ours_imgs], image_token_id=image_id,
                                        max_num_tiles=2)
    want = np.asarray(ref["cross_attention_mask"])
    np.testing.assert_array_equal(mask, want[:, :mask.shape[1]])     # right padding adds all-zero rows only
    assert not want[:, mask.shape[1]:].any()
    b = M.pack_mllama(ours_imgs, 2)
    np.testing.assert_array_equal(b.pixel_values, ref["pixel_values"])
    np.testing.assert_array_equal(b.aspect_ratio_ids, ref["aspect_ratio_ids"])
    for p in prompts + ["no bos here", "<|begin_of_text|>has one"]:
        from transformers.models.mllama.processing_mllama import build_string_from_input
        assert M.add_bos(p) == build_string_from_input(p, "<|begin_of_text|>", "<|image|>")


def test_cross_attention_bias_as_hf():
    need("transformers")
    from transformers.models.mllama.modeling_mllama import _prepare_cross_attention_mask

    mask = M.cross_attention_mask_batch([[5, 99, 6, 7, 99, 8], [99, 1, 2, 3]], [[2, 1], [1]], image_token_id=99,
                                        max_num_tiles=2)
    for dtype in (torch.float32, torch.bfloat16):
        bias, row = M.cross_attention_bias(mask, 4, dtype)
        ref_bias, ref_row = _prepare_cross_attention_mask(torch.as_tensor(mask), num_vision_tokens=4, dtype=dtype)
        assert torch.equal(bias, ref_bias) and torch.equal(row, ref_row)
        assert bias.shape == (2, 1, 6, 2 * 2 * 4) and row[0, 0, 0, 0] == 0 and row[0, 0, 1, 0] == 1


# ------------------------------------------------------------------------------------------------ bad input
def test_bad_input_errors():
    with pytest.raises(M.MllamaInputError, match=r"the prompt has 2 <\|image\|> marker\(s\) but 1 image\(s\)"):
        M.check_image_count("<|image|>a<|image|>", 1)
    assert M.check_image_count("x <|image|>", 1) == 1
    with pytest.raises(M.MllamaInputError, match=r"hold 1 image marker\(s\) \(id 99\) but 2 image\(s\)"):
        M.cross_attention_mask([1, 99, 2], [1, 1], image_token_id=99, max_num_tiles=2)
    with pytest.raises(ValueError, match="image 0 has 3 tiles; expected 1..max_num_tiles=2"):
        M.cross_attention_mask([99, 2], [3], image_token_id=99, max_num_tiles=2)
    with pytest.raises(ValueError, match="length 1 is shorter than the sequence"):
        M.cross_attention_mask([99, 2], [1], image_token_id=99, max_num_tiles=2, length=1)
    with pytest.raises(ValueError, match="max_num_tiles must be a positive integer, got 0"):
        M.preprocess_mllama(_img(10, 10), tile_size=28, max_num_tiles=0)
    with pytest.raises(ValueError, match="tile_size must be a positive integer, got -4"):
        M.preprocess_mllama(_img(10, 10), tile_size=-4)
    with pytest.raises(ImageError, match=r"empty image \(5x0 pixels\)"):
        M.preprocess_mllama(np.zeros((0, 5, 3), np.uint8))
    with pytest.raises(ImageError, match="numpy image must be uint8"):
        M.preprocess_mllama(np.zeros((4, 5, 3), np.float32))
    with pytest.raises(ValueError, match=r"tile grid 3x1 is not a supported aspect ratio for max_num_tiles=2"):
        M.aspect_ratio_id(3, 1, 2)
    with pytest.raises(M.MllamaInputError, match="no images to pack"):
        M.pack_mllama([[], []], 2)
    a, b = M.preprocess_mllama(_img(9, 9), tile_size=28), M.preprocess_mllama(_img(9, 9), tile_size=56)
    with pytest.raises(M.MllamaInputError, match="one tile size per batch"):
        M.pack_mllama([[a, b]], 4)
    with pytest.raises(M.MllamaInputError, match=r"has 4 tiles > max_num_tiles 2"):
        M.pack_mllama([[M.preprocess_mllama(_img(56, 56), tile_size=28, max_num_tiles=4)]], 2)
    with pytest.raises(M.MllamaInputError, match="2 sequences but 1 per-sample image lists"):
        M.cross_attention_mask_batch([[99], [99]], [[1]], image_token_id=99, max_num_tiles=2)
    with pytest.raises(ValueError, match=r"must be \[batch, length, n_images, max_num_tiles\]"):
        M.cross_attention_bias(np.zeros((3, 2, 1)), 4)
