"""MobileVLM projectors `ldp` / `ldpv2` (vlm.encoders.ldp) against a plain-torch reference of MobileVLM.

MobileVLM has no HF implementation. The reference below is written from MobileVLM's own module structure
(mobilevlm/model/vision_projector.py: LDPNetProjector = MLP + two torchvision MobileNetV3 InvertedResidual blocks
with LayerNorm and squeeze-excite; LDPNetV2Projector = MLP + AdaptiveAvgPool2d(12) + PEG) in nn.Conv2d /
nn.LayerNorm / nn.Hardswish terms, so its state_dict carries MobileVLM's parameter names. The tower is HF's
CLIPVisionModel (random, tiny width, real 336/14 geometry) with MobileVLM's feature choice (hidden_states[-2],
patch rows). Both are written to an mmproj GGUF the way llama.cpp's legacy converter
(tools/mtmd/legacy-models/convert_image_encoder_to_gguf.py) names and squeezes them, then load_mmproj -> encode
must match reference(tower(pixels)).
"""
from __future__ import annotations

import re

import gguf
import pytest
import torch
from gguf import MODEL_TENSOR as MT
from torch import nn

from vlm.encoders import MmprojError, MmprojMismatchError, load_mmproj
from vlm.gguf import write_gguf
from vlm.registry import MissingTensorsError

# max abs error of the image embeddings vs the fp32 reference (|ref| ~ 3); measured ~1e-6 (torch path).
# bf16 on GPU: max abs error / max |ref| (tolerance table: bf16 on GPU 2e-2).
TOL = {"embd_vs_ref": 1e-4, "bf16_rel": 2e-2}

IMAGE, PATCH = 336, 14           # MobileVLM's CLIP ViT-L/14-336 geometry: 24×24 patches -> 144 tokens
D_VIS, N_LAYER_HF, N_HEAD = 32, 3, 2
WIDTH = 64                       # projector output (text n_embd); squeeze-excite width 16
N_TOKENS = (IMAGE // PATCH // 2) ** 2
CLIP_MEAN, CLIP_STD = [0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711]


# ------------------------------------------------------------------------------------ reference (MobileVLM)
def make_divisible(v: int, divisor: int = 8) -> int:
    """torchvision's _make_divisible (the squeeze width of SqueezeExcitation)."""
    new = max(divisor, int(v + divisor / 2) // divisor * divisor)
    return new + divisor if new < 0.9 * v else new


class LayerNorm2d(nn.LayerNorm):
    """timm LayerNormAct2d with act_layer=None: LayerNorm over the channels of an NCHW map."""

    def forward(self, x):
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class SqueezeExcitation(nn.Module):
    """torchvision SqueezeExcitation(scale_activation=Hardsigmoid): fc1/fc2 are 1×1 convs with bias."""

    def __init__(self, c: int, c_sq: int):
        super().__init__()
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc1, self.fc2 = nn.Conv2d(c, c_sq, 1), nn.Conv2d(c_sq, c, 1)
        self.activation, self.scale_activation = nn.ReLU(), nn.Hardsigmoid()

    def forward(self, x):
        return x * self.scale_activation(self.fc2(self.activation(self.fc1(self.avgpool(x)))))


class InvertedResidual(nn.Module):
    """torchvision MobileNetV3 InvertedResidual(c, 3, c, c, use_se=True, "HS", stride) with LayerNorm2d: expand
    ratio 1 (no expand conv), depthwise 3×3 + LN + hardswish, SE, pointwise 1×1 + LN; residual iff stride 1."""

    def __init__(self, c: int, stride: int):
        super().__init__()
        self.block = nn.Sequential(
            nn.Sequential(nn.Conv2d(c, c, 3, stride, 1, groups=c, bias=False), LayerNorm2d(c), nn.Hardswish()),
            SqueezeExcitation(c, make_divisible(c // 4, 8)),
            nn.Sequential(nn.Conv2d(c, c, 1, bias=False), LayerNorm2d(c)))
        self.use_res_connect = stride == 1

    def forward(self, x):
        y = self.block(x)
        return x + y if self.use_res_connect else y


def _to_grid(x):
    b, n, c = x.shape
    h = int(n ** 0.5)
    return x.permute(0, 2, 1).reshape(b, c, h, h)


class LDPBlock(nn.Module):
    def __init__(self, inc: int, ouc: int):
        super().__init__()
        self.mlp = nn.Sequential(nn.Identity(), nn.Linear(inc, ouc), nn.GELU(), nn.Linear(ouc, ouc))
        self.mb_block = nn.Sequential(nn.Identity(), InvertedResidual(ouc, 1), InvertedResidual(ouc, 2))

    def forward(self, x):
        return self.mb_block(_to_grid(self.mlp(x))).flatten(2).permute(0, 2, 1)


class LDPNetProjector(nn.Module):          # MobileVLM v1: state_dict "model.mlp.1.weight", "model.mb_block.1..."
    def __init__(self, inc: int, ouc: int):
        super().__init__()
        self.model = LDPBlock(inc, ouc)

    def forward(self, x):
        return self.model(x)


class FeatureIRLayer(nn.Module):
    def __init__(self, inc: int, ouc: int):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(inc, ouc), nn.GELU(), nn.Linear(ouc, ouc))

    def forward(self, x):
        return self.mlp(x)


class PosInjectLayer(nn.Module):           # PEG (Twins): depthwise 3×3 conv with bias + residual
    def __init__(self, c: int):
        super().__init__()
        self.peg = nn.Sequential(nn.Conv2d(c, c, 3, 1, 1, bias=True, groups=c))

    def forward(self, x):
        g = _to_grid(x)
        return (self.peg(g) + g).flatten(2).transpose(1, 2)


class LDPNetV2Projector(nn.Module):        # MobileVLM V2: "mlp.mlp.0.weight", "peg.peg.0.weight"
    def __init__(self, inc: int, ouc: int):
        super().__init__()
        self.mlp = FeatureIRLayer(inc, ouc)
        self.dwn = nn.AdaptiveAvgPool2d((12, 12))   # TokenDownLayer((12, 12))
        self.peg = PosInjectLayer(ouc)

    def forward(self, x):
        x = self.mlp(x)
        x = self.dwn(_to_grid(x)).flatten(2).transpose(1, 2)
        return self.peg(x)


def make_projector(kind: str, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    m = (LDPNetProjector if kind == "ldp" else LDPNetV2Projector)(D_VIS, WIDTH).eval()
    g = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():   # default init leaves LN at (1, 0): perturb so a dropped weight/bias would show
        for mod in m.modules():
            if isinstance(mod, nn.LayerNorm):
                mod.weight.copy_(1 + 0.3 * torch.randn(mod.weight.shape, generator=g))
                mod.bias.copy_(0.3 * torch.randn(mod.bias.shape, generator=g))
            if isinstance(mod, nn.Conv2d) and mod.bias is not None:
                mod.bias.add_(0.3 * torch.randn(mod.bias.shape, generator=g))
    return m


def legacy_gguf_name(name: str) -> str:
    """MobileVLM checkpoint projector key -> GGUF name, as llama.cpp's legacy converter maps it."""
    name = name.replace("model.mm_projector", "mm")
    name = re.sub(r"mm\.mlp\.mlp", "mm.model.mlp", name, count=1)
    return re.sub(r"mm\.peg\.peg", "mm.model.peg", name, count=1)


# ------------------------------------------------------------------------------------ tower + file
@pytest.fixture(scope="module")
def tower():
    from transformers import CLIPVisionConfig, CLIPVisionModel

    cfg = CLIPVisionConfig(hidden_size=D_VIS, intermediate_size=2 * D_VIS, num_hidden_layers=N_LAYER_HF,
                           num_attention_heads=N_HEAD, image_size=IMAGE, patch_size=PATCH, hidden_act="quick_gelu",
                           layer_norm_eps=1e-5, attn_implementation="eager")
    torch.manual_seed(0)
    m = CLIPVisionModel(cfg).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return m


@pytest.fixture(scope="module")
def pixels():
    return torch.randn(2, 3, IMAGE, IMAGE, generator=torch.Generator().manual_seed(2))


@pytest.fixture(scope="module")
def feats(tower, pixels):
    """MobileVLM's CLIPVisionTower features: hidden_states[mm_vision_select_layer = -2], patch rows."""
    with torch.no_grad():
        return tower(pixel_values=pixels, output_hidden_states=True).hidden_states[-2][:, 1:]


_TOWER = {"self_attn.q_proj": MT.V_ENC_ATTN_Q, "self_attn.k_proj": MT.V_ENC_ATTN_K,
          "self_attn.v_proj": MT.V_ENC_ATTN_V, "self_attn.out_proj": MT.V_ENC_ATTN_O,
          "layer_norm1": MT.V_ENC_INPUT_NORM, "layer_norm2": MT.V_ENC_POST_ATTN_NORM,
          "mlp.fc1": MT.V_ENC_FFN_UP, "mlp.fc2": MT.V_ENC_FFN_DOWN}


def tower_tensors(tower, n_layer: int) -> dict[str, torch.Tensor]:
    """The first n_layer CLIP layers under llama.cpp's names (no post_ln: llava-style files drop it)."""
    N = gguf.TENSOR_NAMES
    sd = {k.removeprefix("vision_model."): v for k, v in tower.state_dict().items()}
    out = {N[MT.V_ENC_EMBD_CLS]: sd["embeddings.class_embedding"],
           N[MT.V_ENC_EMBD_PATCH] + ".weight": sd["embeddings.patch_embedding.weight"],
           N[MT.V_ENC_EMBD_POS] + ".weight": sd["embeddings.position_embedding.weight"],
           N[MT.V_PRE_NORM] + ".weight": sd["pre_layrnorm.weight"], N[MT.V_PRE_NORM] + ".bias": sd["pre_layrnorm.bias"]}
    for il in range(n_layer):
        for hf, t in _TOWER.items():
            for s in ("weight", "bias"):
                out[f"{N[t].format(bid=il)}.{s}"] = sd[f"encoder.layers.{il}.{hf}.{s}"]
    return out


def write_mmproj(path, tower, proj: nn.Module, kind: str, *, squeeze=True, drop=(), image_size=IMAGE,
                 replace=None, f16=False) -> str:
    """mmproj GGUF as the legacy converter writes a MobileVLM checkpoint (f32 here): block_count = the deepest
    feature layer (N_LAYER_HF - 1 for hidden_states[-2]), clip.vision.feature_layer = [that], projector tensors
    squeezed ([C,1,3,3] -> [C,3,3], [o,i,1,1] -> [o,i]) unless squeeze=False. f16: the projector's 2-D / 4-D
    tensors stored F16 (what the legacy converter always does), vectors F32."""
    K, KV = gguf.Keys.Clip, gguf.Keys.ClipVision
    n_layer = N_LAYER_HF - 1
    meta = {"general.architecture": "clip", K.HAS_VISION_ENCODER: True, K.HAS_LLAVA_PROJECTOR: True,
            K.PROJECTOR_TYPE: kind, KV.IMAGE_SIZE: image_size, KV.PATCH_SIZE: PATCH, KV.EMBEDDING_LENGTH: D_VIS,
            KV.FEED_FORWARD_LENGTH: 2 * D_VIS, KV.PROJECTION_DIM: WIDTH, KV.Attention.HEAD_COUNT: N_HEAD,
            KV.Attention.LAYERNORM_EPS: 1e-5, KV.BLOCK_COUNT: n_layer, "clip.vision.feature_layer": [n_layer],
            KV.IMAGE_MEAN: CLIP_MEAN, KV.IMAGE_STD: CLIP_STD, KV.USE_GELU: False}
    tensors = tower_tensors(tower, n_layer)
    if image_size != IMAGE:
        pos = tensors["v.position_embd.weight"]
        tensors["v.position_embd.weight"] = pos[: (image_size // PATCH) ** 2 + 1].clone()
    for k, v in proj.state_dict().items():
        if f16 and v.dim() in (2, 4):
            v = v.half()
        tensors[legacy_gguf_name("model.mm_projector." + k)] = v.squeeze() if squeeze else v
    tensors.update(replace or {})
    for name in drop:
        del tensors[name]
    return str(write_gguf(path, None, meta, tensors))


@pytest.fixture(scope="module")
def files(tmp_path_factory, tower):
    """kind -> (mmproj path, reference projector)."""
    root = tmp_path_factory.mktemp("ldp")
    out = {}
    for seed, kind in enumerate(("ldp", "ldpv2")):
        proj = make_projector(kind, 10 + seed)
        out[kind] = (write_mmproj(root / f"mmproj-{kind}.gguf", tower, proj, kind), proj)
    return out


def _max_err(ours: list[torch.Tensor], ref: torch.Tensor) -> float:
    assert len(ours) == len(ref)
    for a, b in zip(ours, ref):
        assert tuple(a.shape) == tuple(b.shape), f"shape {tuple(a.shape)} vs reference {tuple(b.shape)}"
    return max((a.float().cpu() - b).abs().max().item() for a, b in zip(ours, ref))


# ------------------------------------------------------------------------------------ parity
def test_file_names_are_llama_cpp_s(files):
    """The names our reference + legacy mapping produce are those llama.cpp's clip.cpp looks up."""
    from vlm.gguf import GGUFFile

    with GGUFFile(files["ldp"][0]) as f:
        names = set(f.tensors)
        assert {"mm.model.mlp.1.weight", "mm.model.mlp.3.bias", "mm.model.mb_block.1.block.0.0.weight",
                "mm.model.mb_block.2.block.1.fc1.weight", "mm.model.mb_block.2.block.2.1.bias"} <= names
        assert tuple(f.tensors["mm.model.mb_block.1.block.0.0.weight"].shape) == (WIDTH, 3, 3)
        assert tuple(f.tensors["mm.model.mb_block.1.block.1.fc1.weight"].shape) == (16, WIDTH)
    with GGUFFile(files["ldpv2"][0]) as f:
        prefix = gguf.TENSOR_NAMES[MT.V_MMPROJ_PEG].format(bid=0)
        assert {gguf.TENSOR_NAMES[MT.V_MMPROJ_MLP].format(bid=0) + ".weight", prefix + ".weight",
                prefix + ".bias"} <= set(f.tensors)


@pytest.mark.parametrize("kind", ["ldp", "ldpv2"])
def test_embeddings_match_reference(files, feats, pixels, kind, monkeypatch):
    monkeypatch.setenv("VLM_KERNELS", "torch")
    path, proj = files[kind]
    enc = load_mmproj(path, device="cpu", dtype=torch.float32)
    assert enc.n_embd_out == WIDTH
    with torch.no_grad():
        ref = proj(feats)
    assert ref.shape == (2, N_TOKENS, WIDTH)
    ours = enc.encode(list(pixels))               # two images in one call (one varlen tower pass)
    err = _max_err(ours, ref)
    assert err <= TOL["embd_vs_ref"], f"{kind}: max abs error {err:.3g} vs the MobileVLM reference"
    # and each image alone gives the same embeddings (no cross-image leakage through batching)
    err1 = _max_err(enc.encode([pixels[1]]), ref[1:])
    assert err1 <= TOL["embd_vs_ref"]


def test_unsqueezed_conv_layouts_load(tmp_path, tower, feats, pixels, monkeypatch):
    """[C,1,3,3] depthwise and [o,i,1,1] pointwise kernels (torch's own layouts) give the same result."""
    monkeypatch.setenv("VLM_KERNELS", "torch")
    proj = make_projector("ldp", 10)
    path = write_mmproj(tmp_path / "u.gguf", tower, proj, "ldp", squeeze=False)
    enc = load_mmproj(path, device="cpu", dtype=torch.float32)
    with torch.no_grad():
        ref = proj(feats[:1])
    assert _max_err(enc.encode([pixels[0]]), ref) <= TOL["embd_vs_ref"]


def test_f16_projector_file(tmp_path, tower, feats, pixels, monkeypatch):
    """F16 matrices / conv kernels next to F32 vectors (the legacy converter's types) load and compute in fp32:
    the reference uses the same f16-rounded weights."""
    monkeypatch.setenv("VLM_KERNELS", "torch")
    proj = make_projector("ldp", 12)
    with torch.no_grad():
        for p in proj.parameters():
            if p.dim() in (2, 4):
                p.copy_(p.half().float())
    path = write_mmproj(tmp_path / "h.gguf", tower, proj, "ldp", f16=True)
    from vlm.gguf import GGUFFile
    with GGUFFile(path) as f:
        assert f.tensors["mm.model.mb_block.1.block.0.0.weight"].qtype == gguf.GGMLQuantizationType.F16
    enc = load_mmproj(path, device="cpu", dtype=torch.float32)
    with torch.no_grad():
        ref = proj(feats[:1])
    assert _max_err(enc.encode([pixels[0]]), ref) <= TOL["embd_vs_ref"]


def test_projector_triton_path(files, feats, monkeypatch):
    """The LayerNorms of the mobile blocks through the Triton kernel (interpreter on CPU)."""
    monkeypatch.setenv("VLM_KERNELS", "triton")
    path, proj = files["ldp"]
    enc = load_mmproj(path, device="cpu", dtype=torch.float32)
    with torch.no_grad():
        ref = proj(feats[:1])
    n = IMAGE // PATCH
    assert _max_err(list(enc.project(feats[:1], n, n)), ref) <= TOL["embd_vs_ref"]


@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["ldp", "ldpv2"])
def test_bf16_gpu(files, feats, pixels, kind):
    path, proj = files[kind]
    enc = load_mmproj(path, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        ref = proj(feats)
    ours = enc.encode(list(pixels.to(torch.bfloat16)))
    assert ours[0].dtype == torch.bfloat16 and ours[0].device.type == "cuda"
    rel = _max_err(ours, ref) / ref.abs().max().item()
    assert rel <= TOL["bf16_rel"], f"{kind}: bf16 relative error {rel:.3g}"


# ------------------------------------------------------------------------------------ token counts
@pytest.mark.parametrize("kind", ["ldp", "ldpv2"])
def test_token_count_without_pixels(files, kind):
    enc = load_mmproj(files[kind][0], device="cpu", dtype=torch.float32)
    assert enc.n_tokens(IMAGE, IMAGE) == 144          # (336/14)² / 4
    assert enc.n_tokens_grid(24, 24) == 144
    if kind == "ldp":     # stride-2 conv with padding 1: ceil(n / 2) per side
        assert enc.n_tokens_grid(23, 23) == 144
    else:                 # 2×2 average pool
        assert enc.n_tokens_grid(26, 26) == 169
    with pytest.raises(MmprojError, match=r"takes preprocessed 336×336 images .* got 224×224"):
        enc.n_tokens(224, 224)


# ------------------------------------------------------------------------------------ bad input
def test_missing_tensors_are_named(tmp_path, tower):
    p = write_mmproj(tmp_path / "a.gguf", tower, make_projector("ldp", 1), "ldp",
                     drop=("mm.model.mb_block.2.block.1.fc2.bias", "mm.model.mlp.3.weight"))
    with pytest.raises(MissingTensorsError, match=r"mmproj ldp model is missing tensors: mm\.model\.mlp\.3\.weight, "
                                                  r"mm\.model\.mb_block\.2\.block\.1\.fc2\.bias"):
        load_mmproj(p, device="cpu")
    p = write_mmproj(tmp_path / "b.gguf", tower, make_projector("ldpv2", 1), "ldpv2", drop=("mm.model.peg.0.bias",))
    with pytest.raises(MissingTensorsError, match=r"missing tensors: mm\.model\.peg\.0\.bias"):
        load_mmproj(p, device="cpu")


def test_v1_file_labelled_v2_is_refused(tmp_path, tower):
    """A MobileVLM v1 projector under projector_type ldpv2 lacks mm.model.mlp.0 / peg: named, not guessed."""
    p = write_mmproj(tmp_path / "c.gguf", tower, make_projector("ldp", 1), "ldpv2")
    with pytest.raises(MissingTensorsError, match=r"mmproj ldpv2 model is missing tensors: mm\.model\.mlp\.0\.weight"):
        load_mmproj(p, device="cpu")


def test_bad_shapes(tmp_path, tower):
    bad = {"mm.model.mb_block.1.block.1.fc1.weight": torch.randn(16, WIDTH + 8)}
    p = write_mmproj(tmp_path / "d.gguf", tower, make_projector("ldp", 1), "ldp", replace=bad)
    with pytest.raises(MmprojError, match=r"mb_block\.1\.block\.1\.fc1\.weight has shape \(16, 72\), expected "
                                          r"\[n, 64\]"):
        load_mmproj(p, device="cpu")
    bad = {"mm.model.peg.0.weight": torch.randn(WIDTH, 5, 5)}
    p = write_mmproj(tmp_path / "e.gguf", tower, make_projector("ldpv2", 1), "ldpv2", replace=bad)
    with pytest.raises(MmprojError, match=r"mm\.model\.peg\.0\.weight has shape \(64, 5, 5\), expected a "
                                          r"depthwise 3×3 kernel"):
        load_mmproj(p, device="cpu")
    bad = {"mm.model.mlp.0.weight": torch.randn(WIDTH, D_VIS * 2)}
    p = write_mmproj(tmp_path / "f.gguf", tower, make_projector("ldpv2", 1), "ldpv2", replace=bad)
    with pytest.raises(MmprojError, match=r"mm\.model\.mlp\.0\.weight takes 64 inputs but the tower gives 32"):
        load_mmproj(p, device="cpu")


def test_ldpv2_odd_grid_is_refused(tmp_path, tower):
    p = write_mmproj(tmp_path / "g.gguf", tower, make_projector("ldpv2", 1), "ldpv2", image_size=322)
    with pytest.raises(MmprojError, match=r"average-pools the patch grid by 2, but 322/14 gives an odd 23×23 grid"):
        load_mmproj(p, device="cpu")


def test_width_mismatch_names_both(files):
    enc = load_mmproj(files["ldpv2"][0], device="cpu", dtype=torch.float32)
    enc.check_compatible(WIDTH)
    with pytest.raises(MmprojMismatchError, match=r"\(ldpv2\) produces image embeddings of width 64, but the text "
                                                  r"model has n_embd = 2048"):
        enc.check_compatible(2048)
