"""Qwen2-VL / Qwen2.5-VL: converter -> vision tower, M-RoPE decoder and position helpers, against HF (fp32).

Tiny random HF checkpoints (tests/hf_tiny.make_tiny_qwen2_vl, vision weights perturbed) are converted with our
converters (text: arch qwen2vl with rope.dimension_sections; mmproj: qwen2vl_merger / qwen2.5vl_merger, Conv3d
split in two temporal slices). Checked: image/video embeddings vs HF's visual model for several aspect ratios
(Qwen2.5-VL's tiny windows are 2×2 merged tokens, so every image has several windows, some partial); decoder
logits vs HF for prompts with one image, and with two images and a 4-frame video, feeding our engine the
embeddings through Batch.add_embd at vlm.mrope positions; vlm.mrope vs HF get_rope_index; bad input.
HF gets ``mm_token_type_ids`` (without it Qwen2.5-VL silently falls back to 1-D positions).
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from vlm import mrope
from vlm.batch import Batch
from vlm.convert.hf_to_gguf import ConvertError
from vlm.convert.mmproj_qwen import n_wa_pattern
from vlm.encoders import MmprojError
from vlm.encoders.qwen2vl import rope_positions, window_index
from vlm.gguf import GGUFFile
from vlm.kv_cache import ContextFullError
from vlm.model import load
from vlm.preprocess.qwen_image import preprocess_qwen2vl
from vlm.preprocess.qwen_video import VideoFrameSizeError, preprocess_qwen2vl_video

# Max abs error vs HF fp32 (|ref| <= ~1 here); measured ~2e-7 for embeddings and logits on the torch path.
TOL = {"embd_vs_hf": 1e-4, "logits_vs_hf": 1e-4}
# A wrong position layout must move the logits by far more than the tolerance (measured ~1e-2..1e-1).
MIN_POSITION_EFFECT = 1e-3
SIZES = [(56, 56), (84, 140), (150, 70)]     # square, wide (3x5 merged tokens), tall (5x2 after smart_resize)
VERSIONS = ["2", "2.5"]
PROJ = {"2": "qwen2vl_merger", "2.5": "qwen2.5vl_merger"}


@pytest.fixture
def tiny(tiny_qwen_vl):
    """version -> (hf_dir, HF model, our Model with mmproj): the session's shared tiny Qwen2-VL / 2.5-VL."""
    return tiny_qwen_vl


def _images(seed=0, sizes=SIZES):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in sizes]


def _hf_pixels(d, imgs):
    import transformers
    proc = transformers.Qwen2VLImageProcessorPil.from_pretrained(str(d))
    out = proc(images=imgs, return_tensors="pt")
    return out["pixel_values"], out["image_grid_thw"]


def _close(ours, ref, tol, what):
    err = (ours.float() - ref.float()).abs().max().item()
    assert err <= tol, f"{what}: max abs error {err:.3g} > {tol} (max |ref| {ref.abs().max().item():.3g})"


# ---------------------------------------------------------------------------------------------- converter
@pytest.mark.parametrize("v", VERSIONS)
def test_converter_writes_llamacpp_layout(tiny, v):
    d, hf, _ = tiny(v)
    with GGUFFile(str(d / "mmproj.gguf")) as f:
        assert f.get("clip.projector_type") == PROJ[v]
        conv = hf.model.visual.patch_embed.proj.weight.detach()
        assert torch.equal(f.load("v.patch_embd.weight", torch.float32), conv[:, :, 0])
        assert torch.equal(f.load("v.patch_embd.weight.1", torch.float32), conv[:, :, 1])
        qkv = hf.model.visual.blocks[1].attn.qkv.weight.detach()
        assert torch.equal(f.load("v.blk.1.attn_k.weight", torch.float32), qkv[32:64])
        if v == "2.5":
            assert f.get("clip.vision.n_wa_pattern") == 2 and f.get("clip.use_silu") is True
            assert "v.blk.0.ffn_gate.weight" in f.tensors
        else:
            assert f.get("clip.vision.n_wa_pattern") is None and "v.blk.0.ffn_gate.weight" not in f.tensors
    with GGUFFile(str(d / "text.gguf")) as f:
        assert f.arch == "qwen2vl"
        assert list(f.get("qwen2vl.rope.dimension_sections")) == [2, 3, 3, 0]


def test_n_wa_pattern_from_fullatt_indexes():
    assert n_wa_pattern([7, 15, 23, 31]) == 8
    with pytest.raises(ConvertError, match="not periodic"):
        n_wa_pattern([7, 15, 20])


# ---------------------------------------------------------------------------------------------- vision tower
@pytest.mark.parametrize("v", VERSIONS)
def test_vision_embeddings_match_hf(tiny, v, monkeypatch):
    monkeypatch.setenv("VLM_KERNELS", "torch")
    d, hf, m = tiny(v)
    pv, grid = _hf_pixels(d, _images())
    with torch.no_grad():
        ref = hf.model.visual(pv, grid_thw=grid).pooler_output
    ours = m.mmproj.encode({"pixel_values": pv, "image_grid_thw": grid})
    assert [o.shape[0] for o in ours] == [m.mmproj.n_tokens(int(h) * 14, int(w) * 14) for _, h, w in grid]
    _close(torch.cat(ours), ref, TOL["embd_vs_hf"], f"Qwen{v}-VL vision, 3 images")
    # one image alone (its own windows / cu_seqlens) gives the same rows as inside the batch
    one = m.mmproj.encode([(pv[16:16 + 60], grid[1])])[0]
    _close(one, ours[1], TOL["embd_vs_hf"], "image 1 alone vs in a batch")


def test_vision_triton_path_matches_hf(tiny, monkeypatch):
    monkeypatch.setenv("VLM_KERNELS", "triton")
    d, hf, m = tiny("2.5")
    pv, grid = _hf_pixels(d, _images(sizes=[(84, 140)]))
    with torch.no_grad():
        ref = hf.model.visual(pv, grid_thw=grid).pooler_output
    _close(m.mmproj.encode([(pv, grid[0])])[0], ref, TOL["embd_vs_hf"], "Qwen2.5-VL vision (triton)")


def test_our_preprocessing_feeds_the_tower(tiny, monkeypatch):
    monkeypatch.setenv("VLM_KERNELS", "torch")
    d, hf, m = tiny("2")
    img = _images(3, [(100, 60)])[0]
    q = preprocess_qwen2vl(img)
    pv, grid = _hf_pixels(d, [img])
    assert tuple(grid[0].tolist()) == q.grid_thw
    with torch.no_grad():
        ref = hf.model.visual(pv, grid_thw=grid).pooler_output
    out = m.mmproj.encode(q)[0]
    assert out.shape[0] == q.n_tokens
    _close(out, ref, TOL["embd_vs_hf"], "QwenImage input")


def test_window_index_matches_hf():
    from transformers.vision_utils import get_vision_window_index
    grids = [(1, 6, 10), (2, 10, 4), (1, 4, 4)]
    order, cu = window_index(grids, 56, 14)
    ref_order, ref_cu = get_vision_window_index(torch.tensor(grids), 2, 56, 14)
    assert torch.equal(order, ref_order) and torch.equal(cu, ref_cu)
    assert torch.equal(torch.sort(order).values, torch.arange(order.numel()))   # a permutation
    from transformers.vision_utils import get_vision_position_ids
    assert torch.equal(rope_positions(grids), get_vision_position_ids(torch.tensor(grids), 2).t())


# ---------------------------------------------------------------------------------------------- decoder
def _batch(chunks, embs, pos):
    """chunks: ("text", ids) / ("embd", index into embs); pos [4, n] for the whole prompt; logits everywhere."""
    b, row = Batch(), 0
    for kind, x in chunks:
        n = len(x) if kind == "text" else embs[x].shape[0]
        if kind == "text":
            b.add_text(x, pos=pos[:, row:row + n], logits=True)
        else:
            b.add_embd(embs[x], pos=pos[:, row:row + n], logits=True)
        row += n
    return b


@pytest.mark.parametrize("v", VERSIONS)
def test_logits_one_image_match_hf(tiny, v, monkeypatch):
    monkeypatch.setenv("VLM_KERNELS", "torch")
    d, hf, m = tiny(v)
    cfg = hf.config
    pv, grid = _hf_pixels(d, _images(1, [(84, 140)]))
    emb = m.mmproj.encode({"pixel_values": pv, "image_grid_thw": grid})
    n_img = emb[0].shape[0]
    pre, post = [5, 17, cfg.vision_start_token_id], [cfg.vision_end_token_id, 40, 41, 42]
    ids = pre + [cfg.image_token_id] * n_img + post
    types = [0] * len(pre) + [1] * n_img + [0] * len(post)
    with torch.no_grad():
        ref = hf(input_ids=torch.tensor([ids]), pixel_values=pv, image_grid_thw=grid,
                 mm_token_type_ids=torch.tensor([types])).logits[0]
    pos, n_past = mrope.layout_positions([("text", len(pre)), ("image", grid[0].tolist()), ("text", len(post))])
    assert n_past == len(pre) + 5 + len(post)                      # image advances max(3, 5)
    m.reset()
    ours = m.forward(_batch([("text", pre), ("embd", 0), ("text", post)], emb, pos))
    _close(ours, ref, TOL["logits_vs_hf"], f"Qwen{v}-VL logits, one image")
    # the M-RoPE planes matter: plain 1-D positions give visibly different logits
    m.reset()
    flat = torch.arange(len(ids)).expand(4, -1).clone()
    flat[3] = 0
    other = m.forward(_batch([("text", pre), ("embd", 0), ("text", post)], emb, flat))
    assert (other - ref).abs().max().item() > MIN_POSITION_EFFECT


@pytest.mark.parametrize("v", VERSIONS)
def test_logits_two_images_and_video_match_hf(tiny, v, monkeypatch):
    monkeypatch.setenv("VLM_KERNELS", "torch")
    d, hf, m = tiny(v)
    cfg = hf.config
    pv, grid = _hf_pixels(d, _images(2, [(56, 84), (112, 56)]))
    rng = np.random.default_rng(5)
    vid = preprocess_qwen2vl_video([rng.integers(0, 256, (56, 84, 3), dtype=np.uint8) for _ in range(4)])
    assert vid.grid_thw == (2, 4, 6) and vid.n_tokens == 12
    vpv, vgrid = torch.from_numpy(vid.pixel_values), torch.tensor([vid.grid_thw])
    embs = m.mmproj.encode({"pixel_values": pv, "image_grid_thw": grid}) + m.mmproj.encode(vid)
    vs, ve = cfg.vision_start_token_id, cfg.vision_end_token_id
    texts = [[7, vs], [ve, 8, 9, vs], [ve, 10, vs], [ve, 11, 12]]
    ids, types = [], []
    for i, t in enumerate(texts):
        ids += t
        types += [0] * len(t)
        if i < 3:
            tok, ty = (cfg.image_token_id, 1) if i < 2 else (cfg.video_token_id, 2)
            ids += [tok] * embs[i].shape[0]
            types += [ty] * embs[i].shape[0]
    sec = 1.5
    kw = dict(second_per_grid_ts=torch.tensor([sec])) if v == "2.5" else {}
    interval = cfg.vision_config.tokens_per_second * sec if v == "2.5" else 1.0
    with torch.no_grad():
        ref = hf(input_ids=torch.tensor([ids]), pixel_values=pv, image_grid_thw=grid, pixel_values_videos=vpv,
                 video_grid_thw=vgrid, mm_token_type_ids=torch.tensor([types]), **kw).logits[0]
    chunks = [("text", len(texts[0])), ("image", grid[0].tolist()), ("text", len(texts[1])),
              ("image", grid[1].tolist()), ("text", len(texts[2])), ("video", vid.grid_thw, interval),
              ("text", len(texts[3]))]
    pos, _ = mrope.layout_positions(chunks)
    hp, _ = mrope.hf_rope_index(types, grid, vgrid, video_intervals=[interval])
    assert torch.equal(pos[:3], hp)
    m.reset()
    ours = m.forward(_batch([("text", texts[0]), ("embd", 0), ("text", texts[1]), ("embd", 1),
                             ("text", texts[2]), ("embd", 2), ("text", texts[3])], embs, pos))
    _close(ours, ref, TOL["logits_vs_hf"], f"Qwen{v}-VL logits, 2 images + 4-frame video")


# ---------------------------------------------------------------------------------------------- positions
@pytest.mark.parametrize("v", VERSIONS)
def test_rope_index_equals_hf_get_rope_index(tiny, v):
    _, hf, _ = tiny(v)
    rng = np.random.default_rng(7)
    for trial in range(6):
        igrids = [[1, 2 * int(rng.integers(1, 5)), 2 * int(rng.integers(1, 5))] for _ in range(rng.integers(0, 3))]
        vgrids = [[int(rng.integers(1, 4)), 2 * int(rng.integers(1, 4)), 2 * int(rng.integers(1, 4))]
                  for _ in range(rng.integers(0 if igrids else 1, 3))]
        media = [(1, g, 1.0) for g in igrids] + [(2, g, float(rng.choice([0.5, 1.0, 2.0]))) for g in vgrids]
        rng.shuffle(media)       # grids and seconds per grid are listed in order of appearance
        igrids = [g for k, g, _ in media if k == 1]
        vgrids = [g for k, g, _ in media if k == 2]
        secs = [s for k, _, s in media if k == 2]
        types = [0] * int(rng.integers(1, 4))
        for kind, g, _ in media:
            types += [kind] * (g[0] * g[1] * g[2] // 4) + [0] * int(rng.integers(1, 4))
        ids = torch.tensor([[1] * len(types)])
        kw, intervals = {}, None
        if v == "2.5":
            kw = dict(second_per_grid_ts=torch.tensor(secs) if secs else None)
            intervals = [hf.config.vision_config.tokens_per_second * s for s in secs]
        ref, ref_delta = hf.model.get_rope_index(ids, torch.tensor([types]), torch.tensor(igrids) if igrids else None,
                                                 torch.tensor(vgrids) if vgrids else None, **kw)
        ours, delta = mrope.hf_rope_index(types, igrids, vgrids, video_intervals=intervals)
        assert torch.equal(ours, ref[:, 0]), f"trial {trial}: {types}"
        assert delta == int(ref_delta)


def test_image_positions_follow_llamacpp():
    p0, ny, nx = 9, 3, 5
    pos = mrope.image_positions(p0, ny, nx)
    for i in range(ny * nx):     # llama.cpp mtmd_image_tokens_get_decoder_pos
        assert pos[:, i].tolist() == [p0, p0 + i // nx, p0 + i % nx, 0]
    assert mrope.image_n_pos(ny, nx) == 5
    assert mrope.text_positions(2, 4).tolist() == [[4, 5], [4, 5], [4, 5], [0, 0]]


# ---------------------------------------------------------------------------------------------- bad input
def test_bad_input_errors(tiny, tmp_path):
    d, _, m = tiny("2.5")
    enc = m.mmproj
    with pytest.raises(MmprojError, match="multiples of 28"):
        enc.n_tokens(84, 100)
    with pytest.raises(MmprojError, match=r"expected \[16, 1176\]"):
        enc.encode([(torch.zeros(16, 588), (1, 4, 4))])
    with pytest.raises(MmprojError, match="describes 32"):
        enc.encode({"pixel_values": torch.zeros(16, 1176), "image_grid_thw": torch.tensor([[2, 4, 4]])})
    with pytest.raises(MmprojError, match="finite"):
        enc.encode([(torch.full((16, 1176), float("nan")), (1, 4, 4))])
    frames = [np.zeros((56, 84, 3), np.uint8), np.zeros((56, 56, 3), np.uint8)]
    with pytest.raises(VideoFrameSizeError, match="frame 1 is 56x56 but frame 0 is 84x56"):
        preprocess_qwen2vl_video(frames)
    assert preprocess_qwen2vl_video(frames, policy="resize").grid_thw == (1, 4, 6)
    with pytest.raises(ValueError, match="one temporal slot"):
        mrope.layout_positions([("image", (2, 4, 4))])
    with pytest.raises(ValueError, match="does not match grid_thw"):
        mrope.hf_rope_index([0, 1, 1, 0], [[1, 4, 4]])
    # an image chunk that does not fit the context: a clear error, nothing cached
    small = load(str(d / "text.gguf"), device="cpu", n_ctx=16)
    emb = torch.zeros(15, 64)
    pos, _ = mrope.layout_positions([("text", 3), ("image", (1, 6, 10))])
    b = Batch().add_text([1, 2, 3], pos=pos[:, :3]).add_embd(emb, pos=pos[:, 3:], logits="last")
    with pytest.raises(ContextFullError, match="exceed the context size"):
        small.forward(b)
    assert small.kv.n_past(0) == 0


def test_chw_images_are_patchified_like_the_processor(tiny, monkeypatch):
    """[3, H, W] inputs: float = normalised pixels (same rows as preprocess's patchify), uint8 = raw RGB."""
    from vlm.preprocess.qwen_image import patchify
    monkeypatch.setenv("VLM_KERNELS", "torch")
    d, hf, m = tiny("2")
    chw = torch.randn(3, 56, 84)
    patches, grid = patchify(chw[None].numpy())
    a = m.mmproj.encode([chw])[0]
    b = m.mmproj.encode([(torch.from_numpy(patches), grid)])[0]
    assert torch.equal(a, b)
    img = _images(4, [(56, 84)])[0]
    pv, g = _hf_pixels(d, [img])
    with torch.no_grad():
        ref = hf.model.visual(pv, grid_thw=g).pooler_output
    _close(m.mmproj.encode([torch.from_numpy(img).permute(2, 0, 1).contiguous()])[0], ref, TOL["embd_vs_hf"],
           "uint8 [3, H, W] input")


@pytest.mark.gpu
@pytest.mark.parametrize("v", VERSIONS)
def test_gpu_bf16_vision_and_logits(tiny, v):
    """CUDA, bf16 weights and activations (Triton kernels): embeddings and logits close to HF fp32."""
    d, hf, _ = tiny(v)
    m = load(str(d / "text.gguf"), str(d / "mmproj.gguf"), device="cuda", n_ctx=128)
    cfg = hf.config
    pv, grid = _hf_pixels(d, _images(1, [(84, 140)]))
    with torch.no_grad():
        ref_e = hf.model.visual(pv, grid_thw=grid).pooler_output
    emb = m.mmproj.encode({"pixel_values": pv.cuda(), "image_grid_thw": grid})
    tol = 2e-2 * max(1.0, ref_e.abs().max().item())       # bf16 tolerance (architecture.md), relative to |ref|
    _close(emb[0].float().cpu(), ref_e, tol, f"Qwen{v}-VL vision bf16")
    pre, post = [5, cfg.vision_start_token_id], [cfg.vision_end_token_id, 40]
    n = emb[0].shape[0]
    ids = pre + [cfg.image_token_id] * n + post
    types = [0] * len(pre) + [1] * n + [0] * len(post)
    with torch.no_grad():
        ref = hf(input_ids=torch.tensor([ids]), pixel_values=pv, image_grid_thw=grid,
                 mm_token_type_ids=torch.tensor([types])).logits[0]
    pos, _ = mrope.layout_positions([("text", len(pre)), ("image", grid[0].tolist()), ("text", len(post))])
    ours = m.forward(_batch([("text", pre), ("embd", 0), ("text", post)], emb, pos)).float().cpu()
    _close(ours, ref, 2e-2 * max(1.0, ref.abs().max().item()), f"Qwen{v}-VL logits bf16")


def test_encoder_reports_mrope_layout(tiny):
    _, _, m = tiny("2")
    enc = m.mmproj
    assert enc.USES_MROPE and enc.token_grid(84, 140) == (3, 5) and enc.n_pos(84, 140) == 5
    assert enc.n_tokens(84, 140) == 15
    assert torch.equal(enc.decoder_positions(84, 140, 7), mrope.image_positions(7, 3, 5))


def test_video_slots_as_separate_chunks_match_the_whole_video(tiny, monkeypatch):
    from vlm.preprocess.qwen_video import split_temporal_slots
    monkeypatch.setenv("VLM_KERNELS", "torch")
    _, _, m = tiny("2.5")
    rng = np.random.default_rng(6)
    vid = preprocess_qwen2vl_video([rng.integers(0, 256, (56, 112, 3), dtype=np.uint8) for _ in range(5)])
    assert vid.grid_thw == (3, 4, 8)            # 5 frames: the last one is repeated to fill the third pair
    whole = m.mmproj.encode(vid)[0]
    slots = split_temporal_slots(vid)
    assert [s.n_tokens for s in slots] == [8, 8, 8]
    parts = torch.cat(m.mmproj.encode(slots))
    _close(parts, whole, 1e-6, "per-slot chunks vs whole video")
