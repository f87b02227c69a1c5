"""RoPE Triton kernel (interpreter on CPU) against HF transformers' rotary code and vlm_kernels.rope.rope_ref.

Oracles: HF LlamaRotaryEmbedding + apply_rotary_pos_emb (1-D, NeoX halves; GPT-J pairs through the
interleave permutation llama.cpp's converter applies), Qwen2-VL's text rotary embedding (M-RoPE; with
apply_multimodal_rotary_pos_emb on transformers versions that still have it) and the Qwen2-VL vision rotary
embedding + apply_rotary_pos_emb_vision. The oracles always run in fp32 on the (possibly fp16) input.
"""
import importlib

import pytest
import torch

from _tol import TOL, rel_err
from vlm_kernels.rope import rope_ref, rope_triton

# max |err| / max |ref| (docs: /work/shared/design/architecture.md tolerance table)


# ---------------------------------------------------------------------------------------------------- oracles

def hf_neox(x, pos, theta, n_rot=None, freq_factors=None):
    """HF Llama RoPE on x [n, H, D] (fp32), rotating the first n_rot dims."""
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb
    n, H, D = x.shape
    n_rot = n_rot or D
    cfg = LlamaConfig(hidden_size=H * n_rot, num_attention_heads=H, head_dim=n_rot,
                      rope_parameters={"rope_type": "default", "rope_theta": theta})
    emb = LlamaRotaryEmbedding(cfg)
    if freq_factors is not None:                      # llama3-style rope_freqs: frequency / factor
        emb.inv_freq = emb.inv_freq / freq_factors
    xf = x.float()
    cos, sin = emb(xf, pos.long()[None])              # [1, n, n_rot]
    q = xf[..., :n_rot].permute(1, 0, 2)[None]        # [1, H, n, n_rot]
    out, _ = apply_rotary_pos_emb(q, q, cos, sin)
    return torch.cat((out[0].permute(1, 0, 2), xf[..., n_rot:]), dim=-1)


def hf_gptj(x, pos, theta, n_rot=None):
    """GPT-J adjacent pairs == NeoX halves after de-interleaving the rotated dims (llama.cpp's Q/K permute)."""
    n_rot = n_rot or x.shape[-1]
    xr = x[..., :n_rot]
    perm = torch.cat((xr[..., 0::2], xr[..., 1::2]), dim=-1)
    out = hf_neox(perm, pos, theta)
    half = n_rot // 2
    y = torch.empty_like(out)
    y[..., 0::2], y[..., 1::2] = out[..., :half], out[..., half:]
    return torch.cat((y, x[..., n_rot:].float()), dim=-1)


def hf_mrope(x, pos3, theta, mrope_section):
    """Qwen2-VL text M-RoPE; pos3 [3, n]."""
    from transformers.models.qwen2_vl import modeling_qwen2_vl as m
    from transformers.models.qwen2_vl.configuration_qwen2_vl import Qwen2VLTextConfig
    n, H, D = x.shape
    cfg = Qwen2VLTextConfig(hidden_size=H * D, num_attention_heads=H, num_key_value_heads=H, head_dim=D,
                            rope_parameters={"rope_type": "default", "rope_theta": theta,
                                             "mrope_section": list(mrope_section)})
    emb = m.Qwen2VLRotaryEmbedding(cfg)
    xf = x.float()
    cos, sin = emb(xf, pos3.long()[:, None, :])       # [1, n, D] recomposed, or [3, 1, n, D] (older versions)
    q = xf.permute(1, 0, 2)[None]
    if cos.dim() == 4:
        out, _ = m.apply_multimodal_rotary_pos_emb(q, q, cos, sin, list(mrope_section))
    else:
        out, _ = m.apply_rotary_pos_emb(q, q, cos, sin)
    return out[0].permute(1, 0, 2)


def hf_vision(x, pos_hw, theta):
    """Qwen2-VL ViT 2-D RoPE; pos_hw [n, 2] = (h, w)."""
    from transformers.models.qwen2_vl import modeling_qwen2_vl as m
    n, H, D = x.shape
    xf = x.float()
    if hasattr(m, "Qwen2VLVisionRotaryEmbedding"):
        from transformers.models.qwen2_vl.configuration_qwen2_vl import Qwen2VLVisionConfig
        cfg = Qwen2VLVisionConfig(embed_dim=H * D, num_heads=H,
                                  rope_parameters={"rope_type": "axial", "rope_theta": theta})
        cos, sin = m.Qwen2VLVisionRotaryEmbedding(cfg)(xf, pos_hw.long())
    else:                                             # older transformers: table + rot_pos_emb indexing
        freqs = m.VisionRotaryEmbedding(D // 2, theta=theta)(int(pos_hw.max()) + 1)
        emb = freqs[pos_hw.long()].flatten(1)
        emb = torch.cat((emb, emb), dim=-1)
        cos, sin = emb.cos(), emb.sin()
    out, _ = m.apply_rotary_pos_emb_vision(xf, xf, cos, sin)
    return out


def vision_positions(h, w, merge=2):
    """(h, w) patch coordinates in Qwen2-VL's merge-block order, [n, 2]."""
    hh, ww = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    shape = (h // merge, merge, w // merge, merge)
    hh = hh.reshape(shape).transpose(1, 2).flatten()
    ww = ww.reshape(shape).transpose(1, 2).flatten()
    return torch.stack((hh, ww), dim=-1)


# ---------------------------------------------------------------------------------------------------- 1-D

@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("mode", ["neox", "normal"])
@pytest.mark.parametrize("head_dim", [64, 80, 128])
def test_rope_1d_matches_hf(mode, head_dim, dtype):
    g = torch.Generator().manual_seed(head_dim)
    n, H = 37, 3
    x = torch.randn(n, H, head_dim, generator=g).to(dtype)
    pos = torch.randint(0, 8192, (n,), generator=g)
    ref = (hf_neox if mode == "neox" else hf_gptj)(x, pos, 10000.0)
    y = rope_triton(x, pos, theta=10000.0, mode=mode)
    assert y.shape == x.shape and y.dtype == dtype
    assert rel_err(y, ref) < TOL[dtype]
    assert rel_err(rope_ref(x, pos, theta=10000.0, mode=mode), ref) < TOL[dtype]


def test_rope_modes_differ():
    """The two pairings are different rotations (guards against a mode flag that does nothing)."""
    x = torch.randn(5, 2, 64)
    pos = torch.arange(1, 6)
    assert rel_err(rope_triton(x, pos, theta=1e4, mode="neox"), rope_triton(x, pos, theta=1e4, mode="normal")) > 0.1


def test_rope_large_positions_and_theta():
    """Positions up to 2^17 with theta 1e6 (Gemma 3 / long context): angles of 1e5 rad still to 1e-5."""
    g = torch.Generator().manual_seed(1)
    n = 33
    x = torch.randn(n, 2, 256, generator=g)
    pos = torch.randint(0, 131072, (n,), generator=g, dtype=torch.int32)
    for theta in (1e4, 1e6):
        assert rel_err(rope_triton(x, pos, theta=theta, mode="neox"), hf_neox(x, pos, theta)) < 1e-5


@pytest.mark.parametrize("mode", ["neox", "normal"])
def test_rope_partial_rotation(mode):
    g = torch.Generator().manual_seed(2)
    x = torch.randn(19, 4, 64, generator=g)
    pos = torch.randint(0, 4096, (19,), generator=g)
    ref = (hf_neox if mode == "neox" else hf_gptj)(x, pos, 10000.0, n_rot=24)
    y = rope_triton(x, pos, theta=10000.0, mode=mode, n_rot=24)
    assert rel_err(y, ref) < 1e-5
    assert torch.equal(y[..., 24:], x[..., 24:])          # untouched tail copied exactly


def test_rope_freq_factors():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(21, 2, 128, generator=g)
    pos = torch.randint(0, 60000, (21,), generator=g)
    ff = 1.0 + 7.0 * torch.rand(64, generator=g)
    ref = hf_neox(x, pos, 500000.0, freq_factors=ff)
    assert rel_err(rope_triton(x, pos, theta=500000.0, mode="neox", freq_factors=ff), ref) < 1e-5
    assert rel_err(hf_neox(x, pos, 500000.0), ref) > 1e-2   # the factors matter at these positions


def test_rope_strided_view_of_fused_qkv():
    """q as a view of a fused [n, 3*H, D] qkv projection (row stride 3*H*D); the input is not modified."""
    g = torch.Generator().manual_seed(4)
    qkv = torch.randn(11, 3 * 4, 64, generator=g)
    before = qkv.clone()
    q = qkv[:, :4]
    pos = torch.arange(100, 111)
    y = rope_triton(q, pos, theta=10000.0, mode="neox")
    assert rel_err(y, hf_neox(q, pos, 10000.0)) < 1e-5
    assert torch.equal(qkv, before)


def test_rope_head_groups(monkeypatch):
    """Several heads per program with a ragged last group (5 heads, groups of 4): every head rotated once."""
    rope_mod = importlib.import_module("vlm_kernels.rope")   # `vlm_kernels.rope` itself is the public op function
    monkeypatch.setattr(rope_mod, "TARGET_PROGRAMS", 1)
    g = torch.Generator().manual_seed(5)
    x = torch.randn(70, 5, 32, generator=g)              # 70 tokens: 2 token blocks of 64
    pos = torch.randint(0, 1000, (70,), generator=g)
    assert rel_err(rope_triton(x, pos, theta=1e4, mode="neox"), hf_neox(x, pos, 1e4)) < 1e-5


# ---------------------------------------------------------------------------------------------------- M-RoPE

@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("head_dim, sections", [(16, [2, 3, 3]), (128, [16, 24, 24])])
def test_mrope_matches_hf_qwen2vl(head_dim, sections, dtype):
    g = torch.Generator().manual_seed(head_dim)
    n, H = 29, 2
    x = torch.randn(n, H, head_dim, generator=g).to(dtype)
    # text tokens (p, p, p) then an image block with distinct t/h/w planes
    pos3 = torch.arange(n).repeat(3, 1)
    pos3[1, 10:22] = 10 + torch.arange(12) // 4
    pos3[2, 10:22] = 10 + torch.arange(12) % 4
    pos3[0, 10:22] = 10
    ref = hf_mrope(x, pos3, 1e6, sections)
    y = rope_triton(x, pos3, theta=1e6, mode="neox", sections=sections)
    assert rel_err(y, ref) < TOL[dtype]
    # llama.cpp layout: 4 planes (t, h, w, e) with sections padded by a 0 for e
    pos4 = torch.cat((pos3, torch.zeros(1, n, dtype=pos3.dtype)), dim=0).to(torch.int32)
    y4 = rope_triton(x, pos4, theta=1e6, mode="neox", sections=sections + [0])
    assert torch.equal(y4, y)
    assert rel_err(rope_ref(x, pos4, theta=1e6, mode="neox", sections=sections + [0]), ref) < TOL[dtype]


def test_mrope_with_equal_planes_is_1d_neox():
    x = torch.randn(13, 2, 64)
    pos = torch.arange(13) * 7
    y = rope_triton(x, pos.repeat(3, 1), theta=1e4, mode="neox", sections=[8, 12, 12])
    assert rel_err(y, rope_triton(x, pos, theta=1e4, mode="neox")) < 1e-6


# ---------------------------------------------------------------------------------------------------- vision

@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("head_dim", [16, 80])
def test_vision_rope_matches_hf_qwen2vl(head_dim, dtype):
    g = torch.Generator().manual_seed(head_dim)
    pos_hw = vision_positions(6, 8)                       # 48 patches, merge-block order
    x = torch.randn(pos_hw.shape[0], 3, head_dim, generator=g).to(dtype)
    ref = hf_vision(x, pos_hw, 10000.0)
    y = rope_triton(x, pos_hw.t().contiguous(), theta=10000.0, mode="vision")
    assert rel_err(y, ref) < TOL[dtype]
    assert rel_err(rope_ref(x, pos_hw.t().contiguous(), theta=10000.0, mode="vision"), ref) < TOL[dtype]
    # llama.cpp's Qwen2-VL clip graph: 4 planes (y, x, y, x), sections {d/4, d/4, 0, 0}
    q = head_dim // 4
    pos4 = torch.cat((pos_hw.t(), pos_hw.t()), dim=0).to(torch.int32)
    assert torch.equal(rope_triton(x, pos4, theta=10000.0, mode="vision", sections=[q, q, 0, 0]), y)


def test_vision_rope_is_not_mrope():
    """Vision restarts the frequency index per section; M-RoPE does not. Same inputs, different results."""
    pos_hw = vision_positions(4, 4).t().contiguous()
    x = torch.randn(16, 1, 32)
    v = rope_triton(x, pos_hw, theta=1e4, mode="vision")
    pos3 = torch.cat((pos_hw, pos_hw[1:]), dim=0)        # t=h, h=w, w=w
    m = rope_triton(x, pos3, theta=1e4, mode="neox", sections=[8, 8, 0])
    assert rel_err(v, m) > 1e-2


# ---------------------------------------------------------------------------------------------------- errors

def test_bad_input_errors():
    x = torch.randn(5, 2, 64)
    pos = torch.arange(5)
    with pytest.raises(ValueError, match=r"head_dim must be even, got 63"):
        rope_triton(torch.randn(5, 2, 63), pos, theta=1e4)
    with pytest.raises(ValueError, match=r"positions cover 4 tokens but x has n_tokens=5"):
        rope_triton(x, torch.arange(4), theta=1e4)
    with pytest.raises(ValueError, match=r"sections \[8, 12, 10\] sum to 30 but must sum to n_rot/2 = 32"):
        rope_triton(x, pos.repeat(3, 1), theta=1e4, mode="neox", sections=[8, 12, 10])
    with pytest.raises(TypeError, match=r"positions dtype torch.float32 is not an integer type"):
        rope_triton(x, pos.float(), theta=1e4)
    with pytest.raises(TypeError, match=r"x dtype torch.int64 is not supported"):
        rope_triton(x.long(), pos, theta=1e4)
    with pytest.raises(ValueError, match=r"x must be \[n_tokens, n_head, head_dim\], got shape \(5, 64\)"):
        rope_triton(x[:, 0], pos, theta=1e4)
    with pytest.raises(ValueError, match=r"freq_factors has shape \(64,\), expected \[n_rot/2\] = \[32\]"):
        rope_triton(x, pos, theta=1e4, freq_factors=torch.ones(64))
    with pytest.raises(ValueError, match=r"sections \(M-RoPE\) need mode='neox' or 'vision'"):
        rope_triton(x, pos.repeat(3, 1), theta=1e4, mode="normal", sections=[8, 12, 12])
    with pytest.raises(ValueError, match=r"without sections needs positions \[n_tokens\]"):
        rope_triton(x, pos.repeat(3, 1), theta=1e4, mode="neox")
    with pytest.raises(ValueError, match=r"M-RoPE needs positions with 3 or 4 rows"):
        rope_triton(x, pos.repeat(2, 1), theta=1e4, mode="neox", sections=[16, 16])
    with pytest.raises(ValueError, match=r"vision RoPE rotates the whole head: n_rot=32 != head_dim=64"):
        rope_triton(x, pos.repeat(2, 1), theta=1e4, mode="vision", n_rot=32)
    with pytest.raises(ValueError, match=r"n_rot must be even and in \(0, head_dim=64\], got 66"):
        rope_triton(x, pos, theta=1e4, n_rot=66)
    with pytest.raises(ValueError, match=r"mode 'yarn' is not one of"):
        rope_triton(x, pos, theta=1e4, mode="yarn")
    with pytest.raises(ValueError, match=r"sections \[8, 8, 16, 0\] use 3 position rows but positions has 2"):
        rope_triton(x, pos.repeat(2, 1), theta=1e4, mode="vision", sections=[8, 8, 16, 0])
    # the reference validates identically
    with pytest.raises(ValueError, match=r"positions cover 4 tokens"):
        rope_ref(x, torch.arange(4), theta=1e4)


@pytest.mark.parametrize("impl", ["triton", "torch"])
def test_public_op_dispatch(monkeypatch, impl):
    import vlm_kernels
    monkeypatch.setenv("VLM_KERNELS", impl)
    pos_hw = vision_positions(4, 4)
    x = torch.randn(16, 2, 32)
    y = vlm_kernels.rope(x, pos_hw.t().contiguous(), theta=1e4, mode="vision")
    assert rel_err(y, hf_vision(x, pos_hw, 1e4)) < 1e-5
