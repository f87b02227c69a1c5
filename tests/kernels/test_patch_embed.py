"""Patch-embedding Triton kernel (interpreter on CPU) against F.conv2d/F.conv3d references and HF modules.

Oracle = vlm_kernels.patch_embed.patch_embed_ref run with fp32 weights (for fp16 kernels too: "fp16 inputs,
fp32 accumulation" is compared with the fp32 computation).
"""
import pytest
import torch

from _tol import TOL, rel_err
from vlm_kernels.patch_embed import patch_embed_ref, patch_embed_triton

# max |err| / max |ref| (docs: /work/shared/design/architecture.md tolerance table)

CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]


def make(D, C, kernel, dtype, seed, bias=True):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn((D, C) + tuple(kernel), generator=g) / (C * torch.tensor(kernel).prod().item()) ** 0.5
    b = torch.randn(D, generator=g) if bias else None
    return w.to(dtype), b, g


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("extras", ["bias+pos", "none"])
@pytest.mark.parametrize("P, D", [(14, 32), (14, 64), (16, 32), (16, 64)])
def test_2d_matches_conv2d(P, D, extras, dtype):
    B, C, nh, nw = 2, 3, 3, 5                                 # odd patch counts per side: 15 patches per image
    w, b, g = make(D, C, (P, P), dtype, seed=P * D)
    x = torch.randn(B, C, nh * P, nw * P, generator=g)        # already-normalised float pixels (HF processors)
    pos = torch.randn(nh * nw, D, generator=g)
    if extras == "none":
        b, pos = None, None
    y = patch_embed_triton(x, w, b, pos)
    assert y.shape == (B, nh * nw, D) and y.dtype == dtype
    ref = patch_embed_ref(x, w.float(), b, pos)
    assert rel_err(y, ref) < TOL[dtype]


def test_2d_against_explicit_unfold_in_float64():
    """Independent of patch_embed_ref: patches cut by hand, GEMM in float64, row-major patch order."""
    P, D = 14, 32
    w, b, g = make(D, 3, (P, P), torch.float32, seed=1)
    x = torch.randn(1, 3, 3 * P, 5 * P, generator=g)
    pos = torch.randn(15, D, generator=g)
    rows = [x[0, :, i * P:(i + 1) * P, j * P:(j + 1) * P].reshape(-1) for i in range(3) for j in range(5)]
    ref = torch.stack(rows).double() @ w.reshape(D, -1).double().t() + b.double() + pos.double()
    assert rel_err(patch_embed_triton(x, w, b, pos)[0], ref) < 1e-5


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("pix", ["uint8", "float32"])
def test_fused_normalisation(pix, dtype):
    P, D = 14, 32
    w, b, g = make(D, 3, (P, P), dtype, seed=2)
    raw = torch.randint(0, 256, (2, 3, 5 * P, 3 * P), generator=g, dtype=torch.uint8)
    x = raw if pix == "uint8" else raw.float() / 255.0
    rescale = None if pix == "uint8" else 1.0           # defaults: 1/255 for uint8, 1 for float
    pos = torch.randn(15, D, generator=g)
    y = patch_embed_triton(x, w, b, pos, mean=CLIP_MEAN, std=CLIP_STD, rescale=rescale)
    # the oracle normalises by hand, exactly as an HF processor does, then convolves
    xn = (raw.float() / 255.0 - torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)) / torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    ref = patch_embed_ref(xn, w.float(), b, pos)
    assert rel_err(y, ref) < TOL[dtype]
    assert rel_err(patch_embed_ref(x, w.float(), b, pos, mean=CLIP_MEAN, std=CLIP_STD, rescale=rescale), ref) < 1e-6
    # normalisation really happens: the un-normalised result is far away
    assert rel_err(patch_embed_triton(raw.float() / 255.0, w, b, pos), ref) > 0.05


def test_rescale_only_float_pixels():
    w, b, g = make(32, 3, (16, 16), torch.float32, seed=3)
    x = torch.rand(1, 3, 48, 16, generator=g) * 255.0
    y = patch_embed_triton(x, w, b, rescale=1 / 255.0)
    assert rel_err(y, patch_embed_ref(x / 255.0, w, b)) < 1e-5


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("D, T_in", [(32, 2), (64, 4)])
def test_3d_temporal_matches_conv3d(D, T_in, dtype):
    P, KT = 14, 2
    w, b, g = make(D, 3, (KT, P, P), dtype, seed=D + T_in)
    x = torch.randn(1, 3, T_in, 3 * P, 1 * P, generator=g)          # 3 x 1 patches per frame pair
    n_img = (T_in // KT) * 3
    pos = torch.randn(1, n_img, D, generator=g)
    y = patch_embed_triton(x, w, b, pos)
    assert y.shape == (1, n_img, D)
    assert rel_err(y, patch_embed_ref(x, w.float(), b, pos)) < TOL[dtype]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("wdim", [5, 4, 2])
def test_flattened_patches(wdim, dtype):
    """Qwen's processor output [n_patches, C·T·P·P]; weight 5-D (Qwen2-VL), 4-D or already [D, K]."""
    kernel = {5: (2, 14, 14), 4: (16, 16), 2: (2, 14, 14)}[wdim]
    w, b, g = make(64, 3, kernel, dtype, seed=wdim)
    if wdim == 2:
        w = w.reshape(64, -1)
    x = torch.randn(13, w[0].numel(), generator=g)
    y = patch_embed_triton(x, w, b, mean=[0.5, 0.4, 0.3], std=[0.2, 0.3, 0.25])
    assert y.shape == (13, 64)
    assert rel_err(y, patch_embed_ref(x, w.float(), b, mean=[0.5, 0.4, 0.3], std=[0.2, 0.3, 0.25])) < TOL[dtype]


def test_several_tiles_strided_pixels_and_pos_broadcast():
    """189 patches (3 M tiles of 64, last partial), D = 96 (2 N tiles, second half masked), channels-last
    pixels, per-image pos_embed [B, n, D]."""
    P, D = 14, 96
    w, b, g = make(D, 3, (P, P), torch.float32, seed=4)
    x = torch.randn(3, 7 * P, 9 * P, 3, generator=g).permute(0, 3, 1, 2)    # [B, C, H, W] view, NHWC memory
    pos = torch.randn(3, 63, D, generator=g)
    y = patch_embed_triton(x, w, b, pos)
    assert rel_err(y, patch_embed_ref(x.contiguous(), w, b, pos)) < 1e-5


def test_matches_hf_siglip_embeddings():
    from transformers import SiglipVisionConfig
    from transformers.models.siglip.modeling_siglip import SiglipVisionEmbeddings
    torch.manual_seed(0)
    emb = SiglipVisionEmbeddings(SiglipVisionConfig(hidden_size=32, image_size=64, patch_size=16)).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        ref = emb(x)
    conv = emb.patch_embedding
    y = patch_embed_triton(x, conv.weight.detach(), conv.bias.detach(), emb.position_embedding.weight.detach())
    assert rel_err(y, ref) < 1e-5


def test_matches_hf_qwen2vl_patch_embed():
    from transformers.models.qwen2_vl.modeling_qwen2_vl import PatchEmbed
    torch.manual_seed(0)
    mod = PatchEmbed(patch_size=14, temporal_patch_size=2, in_channels=3, embed_dim=32).eval()
    x = torch.randn(16, 3 * 2 * 14 * 14)                  # a 56x56 image: grid [1, 4, 4]
    with torch.no_grad():
        ref = mod(x)
    assert rel_err(patch_embed_triton(x, mod.proj.weight.detach()), ref) < 1e-5


def test_bad_input_errors():
    w = torch.randn(32, 3, 14, 14)
    with pytest.raises(ValueError, match=r"image size H=30, W=28 is not a multiple of the patch size 14x14"):
        patch_embed_triton(torch.randn(1, 3, 30, 28), w)
    with pytest.raises(ValueError, match=r"pixels have 4 channels but the weight \(32, 3, 14, 14\) expects 3"):
        patch_embed_triton(torch.randn(1, 4, 28, 28), w)
    with pytest.raises(ValueError, match=r"pos_embed \(5, 32\) does not broadcast to \(1, 4, 32\): it has 5 rows "
                                         r"but there are 4 patches per image"):
        patch_embed_triton(torch.randn(1, 3, 28, 28), w, pos_embed=torch.randn(5, 32))
    with pytest.raises(ValueError, match=r"pos_embed \(1, 4, 31\) does not broadcast to \(1, 4, 32\): its width 31"):
        patch_embed_triton(torch.randn(1, 3, 28, 28), w, pos_embed=torch.randn(1, 4, 31))
    with pytest.raises(ValueError, match=r"pos_embed \(3, 4, 32\) does not broadcast to \(2, 4, 32\)"):
        patch_embed_triton(torch.randn(2, 3, 28, 28), w, pos_embed=torch.randn(3, 4, 32))
    with pytest.raises(ValueError, match=r"pos_embed \(7, 32\) does not broadcast to \(5, 32\): it has 7 rows "
                                         r"but there are 5 patches$"):
        patch_embed_triton(torch.randn(5, 588), w, pos_embed=torch.randn(7, 32))
    with pytest.raises(ValueError, match=r"bias must be \[D\] = \[32\], got \(31,\)"):
        patch_embed_triton(torch.randn(1, 3, 28, 28), w, torch.randn(31))
    with pytest.raises(ValueError, match=r"T=3 frames is not a multiple of the temporal patch size 2"):
        patch_embed_triton(torch.randn(1, 3, 3, 28, 28), torch.randn(32, 3, 2, 14, 14))
    with pytest.raises(ValueError, match=r"flattened pixels have rows of 588 values but the weight "
                                         r"\(32, 3, 2, 14, 14\) needs K = C·T·P·P = 1176"):
        patch_embed_triton(torch.randn(4, 588), torch.randn(32, 3, 2, 14, 14))
    with pytest.raises(ValueError, match=r"2-D pixels \(1, 3, 28, 28\) need a weight \[D, C, P, P\]"):
        patch_embed_triton(torch.randn(1, 3, 28, 28), torch.randn(32, 588))
    with pytest.raises(ValueError, match=r"mean has 4 values but pixels have 3 channels"):
        patch_embed_triton(torch.randn(1, 3, 28, 28), w, mean=[0.5] * 4)
    with pytest.raises(TypeError, match=r"pixels dtype torch.int32 is not supported"):
        patch_embed_triton(torch.zeros(1, 3, 28, 28, dtype=torch.int32), w)
    with pytest.raises(TypeError, match=r"weight dtype torch.float64 is not supported"):
        patch_embed_triton(torch.randn(1, 3, 28, 28), w.double())
    # the reference validates identically
    with pytest.raises(ValueError, match=r"is not a multiple of the patch size"):
        patch_embed_ref(torch.randn(1, 3, 30, 28), w)


@pytest.mark.parametrize("impl", ["triton", "torch"])
def test_public_op_dispatch(monkeypatch, impl):
    import vlm_kernels
    monkeypatch.setenv("VLM_KERNELS", impl)
    w, b, g = make(32, 3, (14, 14), torch.float32, seed=9)
    raw = torch.randint(0, 256, (1, 3, 28, 42), generator=g, dtype=torch.uint8)
    y = vlm_kernels.patch_embed(raw, w, b, None, mean=CLIP_MEAN, std=CLIP_STD)
    assert rel_err(y, patch_embed_ref(raw, w, b, mean=CLIP_MEAN, std=CLIP_STD)) < 1e-5
