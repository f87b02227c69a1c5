"""mmproj GGUF: our converter (vlm.convert.mmproj) -> our encoders (vlm.encoders) against HF get_image_features.

Tiny random HF LLaVA-1.5, Gemma 3 and Idefics3 checkpoints (tests/hf_tiny.py, seed 0, vision weights perturbed so
that no bias is zero and no norm weight is 1) are converted to f32 mmproj files; the image embeddings must match
HF's fp32 ``get_image_features`` for 1 and 2 images on the torch path, and for one image on the Triton path
(interpreter on CPU). Metadata keys/types and tensor names/layouts are checked against llama.cpp's conventions.
"""
from __future__ import annotations

import json
import os
import shutil

import gguf
import pytest
import torch
from gguf import GGUFValueType as VT

import hf_tiny
from vlm.convert.hf_to_gguf import ConvertError
from vlm.convert.mmproj import convert_mmproj
from vlm.encoders import MmprojError, MmprojMismatchError, load_mmproj
from vlm.gguf import GGUFFile, GGUFKeyError, write_gguf
from vlm.registry import MissingTensorsError, UnsupportedArchError

# Max abs error of the image embeddings vs HF fp32 (|ref| <= ~3 here); measured ~2e-7 (torch) / ~1e-6 (Triton).
TOL = {"embd_vs_hf": 1e-4, "uint8_vs_float": 1e-5}

MAKERS = {"llava": hf_tiny.make_tiny_llava, "gemma3": hf_tiny.make_tiny_gemma3_vlm,
          "idefics3": hf_tiny.make_tiny_idefics3}
PROJ = {"llava": "mlp", "gemma3": "gemma3", "idefics3": "idefics3"}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """name -> (hf_dir, f32 mmproj path, HF model), built once per module."""
    root = tmp_path_factory.mktemp("mmproj")
    cache = {}

    def get(name):
        if name not in cache:
            from transformers import AutoModelForImageTextToText
            d = MAKERS[name](root / name)
            path = convert_mmproj(d, root / f"mmproj-{name}.gguf", "f32")
            hf = AutoModelForImageTextToText.from_pretrained(str(d), dtype=torch.float32).eval()
            cache[name] = (d, path, hf)
        return cache[name]
    return get


def _hf_features(name, hf, pixels: torch.Tensor) -> list[torch.Tensor]:
    with torch.no_grad():
        if name == "idefics3":   # [batch, n_images, 3, H, W]; one "batch" row holding every image
            out = hf.get_image_features(pixel_values=pixels[None]).pooler_output
            n = len(pixels)
            return list(torch.cat(out).reshape(n, -1, out[0].shape[-1]))
        out = hf.get_image_features(pixel_values=pixels).pooler_output
    return [o.reshape(-1, o.shape[-1]) for o in out]


def _pixels(n: int, size: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def _check_close(ours, ref, what):
    assert len(ours) == len(ref)
    for i, (a, b) in enumerate(zip(ours, ref)):
        assert a.shape == b.shape, f"{what} image {i}: shape {tuple(a.shape)} vs HF {tuple(b.shape)}"
        err = (a.float().cpu() - b).abs().max().item()
        assert err <= TOL["embd_vs_hf"], f"{what} image {i}: max abs error {err:.3g} vs HF"


# ------------------------------------------------------------------------------------------------- parity
@pytest.mark.parametrize("n_images", [1, 2])
@pytest.mark.parametrize("name", ["llava", "gemma3", "idefics3"])
def test_embeddings_match_hf(tiny, name, n_images, monkeypatch):
    monkeypatch.setenv("VLM_KERNELS", "torch")
    _, path, hf = tiny(name)
    enc = load_mmproj(path, device="cpu", dtype=torch.float32)
    S = enc.config.image_size
    px = _pixels(n_images, S, seed=n_images)
    ours = enc.encode(px)
    _check_close(ours, _hf_features(name, hf, px), name)
    n_text = hf.config.text_config.hidden_size
    assert enc.n_embd_out == n_text
    assert all(o.shape == (enc.n_tokens(S, S), n_text) for o in ours)
    # a list of [3, H, W] images is the same request as a [B, 3, H, W] batch
    assert all(torch.equal(a, b) for a, b in zip(enc.encode(list(px)), ours))


@pytest.mark.parametrize("name", ["llava", "gemma3", "idefics3"])
def test_embeddings_match_hf_triton(tiny, name, device, monkeypatch):
    """Triton kernels (patch_embed, layer_norm, attention, rms_norm) for one image: interpreter on CPU."""
    _, path, hf = tiny(name)
    monkeypatch.setenv("VLM_KERNELS", "triton")
    enc = load_mmproj(path, device=device, dtype=torch.float32)
    px = _pixels(1, enc.config.image_size, seed=7)
    _check_close(enc.encode(px.to(device)), _hf_features(name, hf, px), f"{name} (triton)")


def test_one_varlen_attention_call_per_layer(tiny, monkeypatch):
    """All images of a request share each layer's attention call; cu_seqlens separate them."""
    import vlm_kernels
    _, path, _ = tiny("gemma3")
    enc = load_mmproj(path, device="cpu", dtype=torch.float32)
    calls, real = [], vlm_kernels._call     # what the public vlm_kernels.<op> functions dispatch through

    def spy(name, *args, **kw):
        if name == "attention":
            calls.append((args[0].shape[0], kw["causal"], kw["cu_seqlens_q"].tolist()))
        return real(name, *args, **kw)
    monkeypatch.setattr(vlm_kernels, "_call", spy)
    enc.encode(_pixels(3, 64))
    n = enc.config.n_patches_side ** 2
    assert calls == [(3 * n, False, [0, n, 2 * n, 3 * n])] * enc.config.n_layer


def test_uint8_pixels_are_normalised_with_the_file_mean_std(tiny, monkeypatch):
    monkeypatch.setenv("VLM_KERNELS", "torch")
    _, path, _ = tiny("llava")      # CLIP mean/std: not the identity, not 0.5
    enc = load_mmproj(path, device="cpu", dtype=torch.float32)
    raw = torch.randint(0, 256, (2, 3, 28, 28), dtype=torch.uint8, generator=torch.Generator().manual_seed(3))
    mean = torch.tensor(enc.config.image_mean)[:, None, None]
    std = torch.tensor(enc.config.image_std)[:, None, None]
    ref = enc.encode((raw.float() / 255.0 - mean) / std)
    for a, b in zip(enc.encode(raw), ref):
        assert (a - b).abs().max().item() <= TOL["uint8_vs_float"] * b.abs().max().item()


def test_llava_feature_layer_minus_two(tiny, tmp_path, monkeypatch):
    """vision_feature_layer = -2: only the first layer is written and run (block_count 1, feature_layer [1])."""
    from transformers import AutoModelForImageTextToText
    monkeypatch.setenv("VLM_KERNELS", "torch")
    src, _, _ = tiny("llava")
    d = shutil.copytree(src, tmp_path / "llava_m2")
    cfg = json.loads((d / "config.json").read_text())
    cfg["vision_feature_layer"] = -2
    (d / "config.json").write_text(json.dumps(cfg))
    path = convert_mmproj(d, tmp_path / "m2.gguf")
    with GGUFFile(path) as f:
        assert f.get("clip.vision.block_count") == 1 and f.get("clip.vision.feature_layer") == [1]
        assert not any(n.startswith("v.blk.1.") for n in f.tensors)
    hf = AutoModelForImageTextToText.from_pretrained(str(d), dtype=torch.float32).eval()
    px = _pixels(2, 28, seed=5)
    _check_close(load_mmproj(path, device="cpu", dtype=torch.float32).encode(px), _hf_features("llava", hf, px),
                 "llava feature layer -2")


# ------------------------------------------------------------------------------------------------- file format
def _common_keys(f, hf_dir, hf):
    vc = hf.config.vision_config
    pre = json.loads((hf_dir / "preprocessor_config.json").read_text())
    assert f.arch == "clip" and f.get("general.type") == "mmproj"
    assert f.get("general.file_type") == gguf.LlamaFileType.ALL_F32
    assert f.get("clip.has_vision_encoder") is True
    expect_u32 = {"clip.vision.image_size": vc.image_size, "clip.vision.patch_size": vc.patch_size,
                  "clip.vision.embedding_length": vc.hidden_size,
                  "clip.vision.feed_forward_length": vc.intermediate_size,
                  "clip.vision.attention.head_count": vc.num_attention_heads,
                  "clip.vision.projection_dim": hf.config.text_config.hidden_size,
                  "general.quantization_version": gguf.GGML_QUANT_VERSION}
    for k, v in expect_u32.items():
        assert f.get(k) == v and f.value_type(k) == (VT.UINT32, None), k
    assert f.value_type("clip.vision.attention.layer_norm_epsilon") == (VT.FLOAT32, None)
    assert f.get("clip.vision.attention.layer_norm_epsilon") == pytest.approx(vc.layer_norm_eps, rel=1e-6)
    for k in ("image_mean", "image_std"):
        assert f.value_type(f"clip.vision.{k}") == (VT.ARRAY, VT.FLOAT32)
        assert f.get(f"clip.vision.{k}") == pytest.approx(pre[k], rel=1e-6)


def _tower_names(n_layer, bias=True):
    names = {"v.patch_embd.weight", "v.position_embd.weight"}
    for il in range(n_layer):
        for t in ("attn_q", "attn_k", "attn_v", "attn_out", "ln1", "ln2", "ffn_up", "ffn_down"):
            names |= {f"v.blk.{il}.{t}.weight", f"v.blk.{il}.{t}.bias"}
    return names


def test_llava_file_format(tiny):
    hf_dir, path, hf = tiny("llava")
    with GGUFFile(path) as f:
        _common_keys(f, hf_dir, hf)
        assert f.get("clip.projector_type") == "mlp" and f.get("clip.has_llava_projector") is True
        assert f.get("clip.use_gelu") is False and "clip.use_silu" not in f.metadata   # quick-GELU
        assert f.get("clip.vision.feature_layer") == [2]                                # -1 -> 2 of 2 layers
        assert f.value_type("clip.vision.feature_layer") == (VT.ARRAY, VT.INT32)
        assert f.get("clip.vision.block_count") == 2
        expect = _tower_names(2) | {"v.class_embd", "v.pre_ln.weight", "v.pre_ln.bias",
                                    "mm.0.weight", "mm.0.bias", "mm.2.weight", "mm.2.bias"}
        assert set(f.tensors) == expect            # no v.post_ln: HF never applies it to LLaVA features
        assert all(t.qtype == gguf.GGMLQuantizationType.F32 for t in f.tensors.values())
        assert f.info("v.patch_embd.weight").ggml_shape == (14, 14, 3, 32)
        assert f.info("v.position_embd.weight").shape == (5, 32)               # 4 patches + CLS
        sd = hf.state_dict()
        w1 = next(v for k, v in sd.items() if k.endswith("multi_modal_projector.linear_1.weight"))
        fc1 = next(v for k, v in sd.items() if k.endswith("encoder.layers.1.mlp.fc1.weight"))
        assert torch.equal(f.load("mm.0.weight"), w1) and torch.equal(f.load("v.blk.1.ffn_up.weight"), fc1)


def test_gemma3_file_format(tiny):
    hf_dir, path, hf = tiny("gemma3")
    with GGUFFile(path) as f:
        _common_keys(f, hf_dir, hf)
        assert f.get("clip.projector_type") == "gemma3" and f.get("clip.use_gelu") is True
        assert f.get("clip.vision.projector.scale_factor") == 2          # 4x4 patches -> 2x2 tokens (!= 4: written)
        assert set(f.tensors) == _tower_names(2) | {"v.patch_embd.bias", "v.post_ln.weight", "v.post_ln.bias",
                                                    "mm.input_projection.weight", "mm.soft_emb_norm.weight"}
        proj = hf.model.multi_modal_projector
        assert f.info("mm.input_projection.weight").shape == (32, 64)   # HF [d_vision, d_text], ggml ne [64, 32]
        assert torch.equal(f.load("mm.input_projection.weight"), proj.mm_input_projection_weight.detach())
        assert torch.equal(f.load("mm.soft_emb_norm.weight"), proj.mm_soft_emb_norm.weight.detach() + 1)


def test_idefics3_file_format(tiny):
    hf_dir, path, hf = tiny("idefics3")
    with GGUFFile(path) as f:
        _common_keys(f, hf_dir, hf)
        assert f.get("clip.projector_type") == "idefics3" and f.get("clip.use_gelu") is True
        assert f.get("clip.vision.projector.scale_factor") == 2
        assert f.get("clip.vision.preproc_image_size") == 128            # processor size.longest_edge
        assert set(f.tensors) == _tower_names(2) | {"v.patch_embd.bias", "v.post_ln.weight", "v.post_ln.bias",
                                                    "mm.model.fc.weight"}
        assert f.info("mm.model.fc.weight").shape == (64, 32 * 4)


def test_outtype_f16_and_q8_0_types(tiny, tmp_path):
    """llama.cpp's type rules: patch embd F16 only in f16 files (F32 for SigLIP 'embeddings'), position embd and
    1-D tensors F32, Gemma 3's input projection F16 outside f32 files; other matrices follow the outtype."""
    T = gguf.GGMLQuantizationType
    hf_dir, _, _ = tiny("gemma3")
    with GGUFFile(convert_mmproj(hf_dir, tmp_path / "g.gguf", "q8_0")) as f:
        assert f.get("general.file_type") == gguf.LlamaFileType.MOSTLY_Q8_0
        types = {n: t.qtype for n, t in f.tensors.items()}
    assert types["v.patch_embd.weight"] == T.F32 and types["v.position_embd.weight"] == T.F32
    assert types["mm.input_projection.weight"] == T.F16 and types["mm.soft_emb_norm.weight"] == T.F32
    assert types["v.blk.0.attn_q.weight"] == T.Q8_0 and types["v.blk.0.attn_q.bias"] == T.F32
    llava_dir, _, _ = tiny("llava")
    with GGUFFile(convert_mmproj(llava_dir, tmp_path / "l.gguf", "f16")) as f:
        types = {n: t.qtype for n, t in f.tensors.items()}
    assert types["v.patch_embd.weight"] == T.F16 and types["v.class_embd"] == T.F32
    assert types["mm.0.weight"] == T.F16 and types["v.pre_ln.weight"] == T.F32


def test_fused_qkv_views_and_quantized_projections(tiny, tmp_path, monkeypatch):
    """Float towers run one fused q/k/v matmul whose q/k/v entries are views of it (no second copy); a
    quantized file keeps three matmuls and still matches its own dequantized weights."""
    monkeypatch.setenv("VLM_KERNELS", "torch")
    hf_dir, path, hf = tiny("llava")
    enc = load_mmproj(path, device="cpu", dtype=torch.float32)
    L = enc.layers[0]
    fused = L["qkv.weight"]
    d = fused.shape[0] // 3
    for i, n in enumerate("qkv"):
        w = enc.weights[f"v.blk.0.attn_{n}.weight"]
        assert w is L[f"attn_{n}.weight"] and w.data_ptr() == fused[i * d].data_ptr()
    with GGUFFile(path) as f:
        assert torch.equal(enc.weights["v.blk.0.attn_k.weight"], f.load("v.blk.0.attn_k.weight", torch.float32))
        assert torch.equal(L["qkv.bias"][d:2 * d], f.load("v.blk.0.attn_k.bias", torch.float32))
    q8 = load_mmproj(convert_mmproj(hf_dir, tmp_path / "q8.gguf", "q8_0"), device="cpu", dtype=torch.float32)
    assert "qkv.weight" not in q8.layers[0]
    px = _pixels(1, enc.config.image_size, seed=3)
    err = (q8.encode(px)[0] - enc.encode(px)[0]).abs().max().item()
    assert 0 < err < 0.05 * enc.encode(px)[0].abs().max().item()     # Q8_0 weights: close, not equal


def test_cli_mmproj_matches_api(tiny, tmp_path):
    from vlm.cli import main
    hf_dir, path, _ = tiny("idefics3")
    out = tmp_path / "cli.gguf"
    assert main(["convert", str(hf_dir), "--mmproj", "-o", str(out), "--outtype", "f32", "--no-progress"]) == 0
    assert out.read_bytes() == path.read_bytes()


def test_legacy_swapped_ffn_names_are_detected(tiny, tmp_path, monkeypatch):
    """llama.cpp's legacy LLaVA converter wrote fc1 as ffn_down and fc2 as ffn_up; both engines swap them back."""
    monkeypatch.setenv("VLM_KERNELS", "torch")
    _, path, _ = tiny("llava")
    legacy = tmp_path / "legacy.gguf"
    with GGUFFile(path) as f:
        swap = {"ffn_up": "ffn_down", "ffn_down": "ffn_up"}
        tensors = {}
        for n in f.tensors:
            parts = n.split(".")
            if len(parts) == 5 and parts[3] in swap:
                parts[3] = swap[parts[3]]
            tensors[".".join(parts)] = f.load(n)
        write_gguf(legacy, None, f.typed_metadata(), tensors)
    px = _pixels(1, 28, seed=9)
    a = load_mmproj(path, device="cpu", dtype=torch.float32).encode(px)[0]
    b = load_mmproj(legacy, device="cpu", dtype=torch.float32).encode(px)[0]
    assert torch.equal(a, b)


# ------------------------------------------------------------------------------------------------- bad input
def _rewrite(src, dst, *, drop_keys=(), set_keys=None, drop_tensors=()):
    with GGUFFile(src) as f:
        meta = {k: v for k, v in f.typed_metadata().items() if k not in drop_keys}
        meta.update(set_keys or {})
        tensors = {n: f.load(n) for n in f.tensors if n not in drop_tensors}
    return write_gguf(dst, None, meta, tensors)


def test_unknown_projector_type(tiny, tmp_path):
    _, path, _ = tiny("gemma3")
    bad = _rewrite(path, tmp_path / "bad.gguf", set_keys={"clip.projector_type": "resampler_v9"})
    with pytest.raises(UnsupportedArchError, match=r"unsupported projector type 'resampler_v9'; supported: "
                                                   r"gemma3, idefics3, ldp, ldpv2, mlp, qwen2.5vl_merger, qwen2a, "
                                                   r"qwen2vl_merger, ultravox"):
        load_mmproj(bad)


def test_width_mismatch_names_both(tiny):
    _, path, _ = tiny("idefics3")
    enc = load_mmproj(path, device="cpu", dtype=torch.float32)
    enc.check_compatible(64)
    with pytest.raises(MmprojMismatchError, match=r"width 64, but the text model has n_embd = 896"):
        enc.check_compatible(896)


def test_missing_tensor_and_key(tiny, tmp_path):
    _, path, _ = tiny("llava")
    bad = _rewrite(path, tmp_path / "t.gguf", drop_tensors=("v.blk.1.attn_k.weight", "mm.0.bias"))
    with pytest.raises(MissingTensorsError, match=r"missing tensors: v\.blk\.1\.attn_k\.weight, mm\.0\.bias"):
        load_mmproj(bad)
    bad = _rewrite(path, tmp_path / "k.gguf", drop_keys=("clip.vision.patch_size",))
    with pytest.raises(GGUFKeyError, match=r"missing metadata key 'clip\.vision\.patch_size'"):
        load_mmproj(bad)
    bad = _rewrite(path, tmp_path / "p.gguf", drop_keys=("clip.projector_type",))
    with pytest.raises(GGUFKeyError, match=r"'clip\.projector_type'"):
        load_mmproj(bad)


def test_text_gguf_is_not_an_mmproj(tmp_path):
    p = write_gguf(tmp_path / "text.gguf", "llama", {"llama.block_count": 1}, {"x.weight": torch.zeros(4)})
    with pytest.raises(MmprojError, match=r"'llama' text model with no vision projector"):
        load_mmproj(p)


def test_bad_pixels(tiny):
    _, path, _ = tiny("gemma3")
    enc = load_mmproj(path, device="cpu", dtype=torch.float32)
    with pytest.raises(MmprojError, match=r"takes preprocessed 64×64 images .* got 48×64"):
        enc.encode([torch.zeros(3, 48, 64)])
    with pytest.raises(MmprojError, match=r"takes preprocessed 64×64 images .* got 32×32"):
        enc.n_tokens(32, 32)
    with pytest.raises(MmprojError, match=r"image 1 has shape \(4, 64, 64\), expected \[3, H, W\]"):
        enc.encode([torch.zeros(3, 64, 64), torch.zeros(4, 64, 64)])
    with pytest.raises(MmprojError, match=r"wrap it in a list"):
        enc.encode(torch.zeros(3, 64, 64))
    with pytest.raises(MmprojError, match=r"no images"):
        enc.encode([])
    with pytest.raises(MmprojError, match=r"image 0 contains NaN"):
        enc.encode([torch.full((3, 64, 64), float("nan"))])
    with pytest.raises(MmprojError, match=r"dtype torch.int64"):
        enc.encode([torch.zeros(3, 64, 64, dtype=torch.int64)])


def test_converter_rejects(tiny, tmp_path):
    hf_dir, _, _ = tiny("llava")
    with pytest.raises(ConvertError, match=r"unknown mmproj outtype 'q4_k_m'; supported: f32, f16, bf16, q8_0"):
        convert_mmproj(hf_dir, tmp_path / "x.gguf", "q4_k_m")
    d = shutil.copytree(hf_dir, tmp_path / "full")
    cfg = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**cfg, "vision_feature_select_strategy": "full"}))
    with pytest.raises(ConvertError, match=r"vision_feature_select_strategy must be 'default'"):
        convert_mmproj(d, tmp_path / "x.gguf")
    (d / "config.json").write_text(json.dumps({**cfg, "architectures": ["LlamaForCausalLM"]}))
    with pytest.raises(ConvertError, match=r"unsupported architecture 'LlamaForCausalLM'; supported: Llava"):
        convert_mmproj(d, tmp_path / "x.gguf")
    assert not os.path.exists(tmp_path / "x.gguf")


def test_projection_dim_from_tensors_when_config_lacks_hidden_size(tiny, tmp_path):
    """llava-hf/llava-1.5-7b-hf's text_config omits hidden_size: the width comes from the projector tensor."""
    hf_dir, _, _ = tiny("llava")
    d = shutil.copytree(hf_dir, tmp_path / "nohidden")
    cfg = json.loads((d / "config.json").read_text())
    cfg["text_config"].pop("hidden_size")
    (d / "config.json").write_text(json.dumps(cfg))
    with GGUFFile(convert_mmproj(d, tmp_path / "n.gguf")) as f:
        assert f.get("clip.vision.projection_dim") == 64


def test_single_file_text_plus_mmproj(tiny, tmp_path, monkeypatch):
    """A GGUF whose architecture is the text model's but which also carries the clip keys and v./mm. tensors."""
    monkeypatch.setenv("VLM_KERNELS", "torch")
    _, path, _ = tiny("idefics3")
    with GGUFFile(path) as f:
        meta = {k: v for k, v in f.typed_metadata().items() if k != "general.architecture"}
        tensors = {n: f.load(n) for n in f.tensors}
    one = write_gguf(tmp_path / "one.gguf", "llama", {**meta, "llama.block_count": 2},
                     {**tensors, "token_embd.weight": torch.zeros(8, 64)})
    px = _pixels(1, 64, seed=4)
    a = load_mmproj(one, device="cpu", dtype=torch.float32).encode(px)[0]
    assert torch.equal(a, load_mmproj(path, device="cpu", dtype=torch.float32).encode(px)[0])


def test_mlp_norm_is_refused(tiny, tmp_path):
    _, path, _ = tiny("llava")
    with GGUFFile(path) as f:
        meta, tensors = f.typed_metadata(), {n: f.load(n) for n in f.tensors}
    bad = write_gguf(tmp_path / "norm.gguf", None, meta, {**tensors, "mm.3.weight": torch.zeros(64, 64)})
    with pytest.raises(MmprojError, match=r"mm\.3 present: this is llama\.cpp's mlp_norm projector"):
        load_mmproj(bad)


def test_audio_only_mmproj_goes_to_the_audio_loader(tiny, tmp_path):
    """load_mmproj hands an audio-only file to load_audio_encoder (here it lacks the a.* tensors, so the audio
    loader's own error shows it got there); a file with neither encoder is refused."""
    _, path, _ = tiny("gemma3")
    bad = _rewrite(path, tmp_path / "a.gguf", drop_keys=("clip.projector_type",),
                   set_keys={"clip.has_vision_encoder": False, "clip.has_audio_encoder": True,
                             "clip.audio.projector_type": "ultravox"})
    with pytest.raises(GGUFKeyError, match=r"missing metadata key .clip\.audio\.embedding_length"):
        load_mmproj(bad)
    neither = _rewrite(path, tmp_path / "n.gguf", set_keys={"clip.has_vision_encoder": False})
    with pytest.raises(MmprojError, match=r"neither a vision nor an audio encoder"):
        load_mmproj(neither)
