"""MobileVLM projectors: `ldp` (v1, "lightweight downsample projector") and `ldpv2` (MobileVLM V2).

Both sit on a LLaVA-style CLIP ViT (vlm.encoders.clip; the llava feature-layer rule of mlp.py: the penultimate
layer's patch rows, CLS dropped) and turn its n×n patch grid (24×24 at 336/14) into (n/2)² tokens (144).
MobileVLM has no HF implementation; the semantics follow its public modules
(Meituan-AutoML/MobileVLM mobilevlm/model/vision_projector.py, built from torchvision's MobileNetV3 blocks) and
the tensor names / layouts those of llama.cpp's legacy converter and graph (tools/mtmd/models/llava.cpp).

ldp (v1)::

    x = mm.model.mlp.3(GELU(mm.model.mlp.1(feats)))          [B, n·n, C]  -> grid [B, n, n, C]
    x = mobile_block(x, mb_block.1, stride 1) + x             residual only when stride 1
    x = mobile_block(x, mb_block.2, stride 2)                 [B, ceil(n/2), ceil(n/2), C]

    mobile_block (torchvision InvertedResidual, expand ratio 1, squeeze-excite, hardswish, LayerNorm as norm):
        h = LN_0.1(dwconv3×3_0.0(x, stride, pad 1, no bias))  -> hardswish
        s = hardsigmoid(fc2(relu(fc1(mean_hw(h)))))           squeeze-excite: fc1 C->C/4, fc2 C/4->C (biases)
        h = LN_2.1(pointwise_2.0(h · s))                       1×1 conv = linear over C, no bias

ldpv2::

    x = mm.model.mlp.2(GELU(mm.model.mlp.0(feats)))           grid [B, n, n, C]
    x = avg_pool 2×2 stride 2                                  (MobileVLM: AdaptiveAvgPool2d(12): the same at 24×24)
    x = x + dwconv3×3(x, mm.model.peg.0, pad 1) + peg bias    PEG: positional encoding generator

Layouts (legacy converter squeezes the conv kernels): depthwise ``[C, 3, 3]`` (``[C, 1, 3, 3]`` accepted),
pointwise / fc ``[out, in]`` (``[out, in, 1, 1]`` accepted). Activations stay channel-last [B, h, w, C] so every
1×1 conv and LayerNorm is a row op; only the depthwise convs see an NCHW view (channels_last strides, no copy).

Differences from llama.cpp, on purpose: GELU is the exact erf GELU of the model (nn.GELU; llama.cpp uses the tanh
approximation, ~1e-3 apart); the mobile-block LayerNorm eps is timm's LayerNormAct2d default 1e-5 (llama.cpp
reuses the tower's eps, 1e-5 in every MobileVLM release). llama.cpp hard-codes a 24×24 grid; here any grid works
(ldpv2 needs an even one).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

import vlm_kernels
from vlm_kernels.quant import QTensor
from vlm.encoders.base import MmprojEncoder, MmprojError
from vlm.graph import linear

LN_EPS = 1e-5          # timm LayerNormAct2d default (the norm_layer of MobileVLM's blocks)
MB = "mm.model.mb_block.{}.block."
MB_PARTS = ("0.0.weight", "0.1.weight", "0.1.bias", "1.fc1.weight", "1.fc1.bias", "1.fc2.weight", "1.fc2.bias",
            "2.0.weight", "2.1.weight", "2.1.bias")


def _float(w, dtype: torch.dtype) -> torch.Tensor:
    return w.dequantize(dtype) if isinstance(w, QTensor) else w.to(dtype)


def depthwise3x3(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None, stride: int) -> torch.Tensor:
    """x [B, h, w, C] channel-last, w [C, 1, 3, 3]: 3×3 depthwise conv, padding 1 -> [B, h', w', C]."""
    y = F.conv2d(x.permute(0, 3, 1, 2), w, bias, stride=stride, padding=1, groups=x.shape[-1])
    return y.permute(0, 2, 3, 1)


class _MobileVLMEncoder(MmprojEncoder):
    """Shared: the llava tower rule, the 2-layer GELU MLP, weight layout checks."""

    MLP: tuple[str, str] = ("", "")      # GGUF prefixes of the two linear layers

    def __init__(self, config, weights, **kw):
        super().__init__(config, weights, **kw)
        n_run, feats = self.tower_layers()
        if not 0 < n_run <= config.n_layer:
            raise MmprojError(f"{self.path}: feature layer {n_run} is outside the {config.n_layer} stored layers")
        d_feat = config.n_embd * max(1, len(feats))
        w_in, w_out = weights[self.MLP[0] + ".weight"], weights[self.MLP[1] + ".weight"]
        if w_in.shape[1] != d_feat:
            raise MmprojError(f"{self.path}: {self.MLP[0]}.weight takes {w_in.shape[1]} inputs but the tower gives "
                              f"{d_feat} ({max(1, len(feats))} feature layer(s) x {config.n_embd})")
        self.width = int(w_out.shape[0])
        if tuple(w_out.shape) != (self.width, w_in.shape[0]):
            raise MmprojError(f"{self.path}: {self.MLP[1]}.weight has shape {tuple(w_out.shape)}, expected "
                              f"[n_embd_out, {w_in.shape[0]}]")

    def tower_layers(self):
        # The llava rule (as mlp.py): up to the deepest clip.vision.feature_layer, else all stored layers but the
        # last. MobileVLM selects hidden_states[-2] (mm_vision_select_layer = -2), patch rows only.
        fl = tuple(sorted({i for i in self.config.feature_layers if i >= 0}))
        if fl:
            return max(fl), fl
        return self.config.n_layer - 1, ()

    @property
    def n_embd_out(self) -> int:
        return self.width

    def _mlp(self, feats: torch.Tensor) -> torch.Tensor:
        w, (a, b) = self.weights, self.MLP
        return linear(F.gelu(linear(feats, w[a + ".weight"], w[a + ".bias"])), w[b + ".weight"], w[b + ".bias"])

    def _dw(self, name: str) -> torch.Tensor:
        """Depthwise 3×3 kernel as F.conv2d wants it: [C, 1, 3, 3] in the activation dtype."""
        w = self.weights[name]
        if tuple(w.shape) not in ((self.width, 3, 3), (self.width, 1, 3, 3)):
            raise MmprojError(f"{self.path}: {name} has shape {tuple(w.shape)}, expected a depthwise 3×3 kernel "
                              f"[{self.width}, 3, 3] (or [{self.width}, 1, 3, 3])")
        return _float(w, self.dtype).reshape(self.width, 1, 3, 3).contiguous()

    def _vec(self, name: str) -> torch.Tensor:
        """A [C] vector in fp32 (what the norm kernels take with any activation dtype)."""
        v = self.weights[name]
        if tuple(v.shape) != (self.width,):
            raise MmprojError(f"{self.path}: {name} has shape {tuple(v.shape)}, expected [{self.width}]")
        return _float(v, torch.float32)

    def _mat(self, name: str, n_out: int | None, n_in: int | None):
        """A 1×1 conv / fc weight as [out, in] (QTensors stay quantized for vlm_kernels.qmatmul)."""
        w = self.weights[name]
        shape = tuple(w.shape)
        if len(shape) == 4 and shape[2:] == (1, 1) and not isinstance(w, QTensor):
            w = w.reshape(shape[:2])
            shape = shape[:2]
        if len(shape) != 2 or (n_out is not None and shape[0] != n_out) or (n_in is not None and shape[1] != n_in):
            raise MmprojError(f"{self.path}: {name} has shape {tuple(self.weights[name].shape)}, expected "
                              f"[{'n' if n_out is None else n_out}, {'n' if n_in is None else n_in}] (or with "
                              f"trailing 1×1 dims)")
        return w


class LdpEncoder(_MobileVLMEncoder):
    PROJECTOR_TYPE = "ldp"
    MLP = ("mm.model.mlp.1", "mm.model.mlp.3")
    STRIDES = (1, 2)      # mb_block.1, mb_block.2

    def __init__(self, config, weights, **kw):
        super().__init__(config, weights, **kw)
        C = self.width
        self.blocks = []
        for i, stride in zip((1, 2), self.STRIDES):
            p = MB.format(i)
            fc1 = self._mat(p + "1.fc1.weight", None, C)
            n_sq = int(fc1.shape[0])
            b1 = self.weights[p + "1.fc1.bias"]
            if tuple(b1.shape) != (n_sq,):
                raise MmprojError(f"{self.path}: {p}1.fc1.bias has shape {tuple(b1.shape)}, expected [{n_sq}]")
            self.blocks.append(dict(
                stride=stride, dw=self._dw(p + "0.0.weight"), ln0=(self._vec(p + "0.1.weight"),
                                                                   self._vec(p + "0.1.bias")),
                fc1=(fc1, _float(b1, self.dtype)),
                fc2=(self._mat(p + "1.fc2.weight", C, n_sq), _float(self._vec(p + "1.fc2.bias"), self.dtype)),
                pw=self._mat(p + "2.0.weight", C, C), ln2=(self._vec(p + "2.1.weight"), self._vec(p + "2.1.bias"))))

    @classmethod
    def projector_tensor_names(cls, cfg):
        req = [f"{m}.{s}" for m in cls.MLP for s in ("weight", "bias")]
        req += [MB.format(i) + part for i in (1, 2) for part in MB_PARTS]
        return req, []

    def n_tokens_grid(self, n_patch_h: int, n_patch_w: int) -> int:
        # 3×3 conv, padding 1, stride 2: out = (n + 2 - 3) // 2 + 1 = ceil(n / 2)
        return ((n_patch_h + 1) // 2) * ((n_patch_w + 1) // 2)

    def _block(self, x: torch.Tensor, blk: dict) -> torch.Tensor:
        h = depthwise3x3(x, blk["dw"], None, blk["stride"])                     # [B, h', w', C]
        h = F.hardswish(vlm_kernels.layer_norm(h.contiguous(), *blk["ln0"], LN_EPS))
        s = h.float().mean(dim=(1, 2)).to(h.dtype)                              # squeeze: [B, C]
        s = F.relu(linear(s, *blk["fc1"]))
        s = F.hardsigmoid(linear(s, *blk["fc2"]))                               # excite: [B, C] in [0, 1]
        h = linear(h * s[:, None, None, :], blk["pw"])                          # pointwise 1×1, no bias
        h = vlm_kernels.layer_norm(h, *blk["ln2"], LN_EPS)
        return h + x if blk["stride"] == 1 else h

    def project(self, feats: torch.Tensor, n_patch_h: int, n_patch_w: int) -> torch.Tensor:
        B = feats.shape[0]
        x = self._mlp(feats).reshape(B, n_patch_h, n_patch_w, self.width)
        for blk in self.blocks:
            x = self._block(x, blk)
        return x.reshape(B, -1, self.width)


class LdpV2Encoder(_MobileVLMEncoder):
    PROJECTOR_TYPE = "ldpv2"
    MLP = ("mm.model.mlp.0", "mm.model.mlp.2")
    POOL = 2

    def __init__(self, config, weights, **kw):
        super().__init__(config, weights, **kw)
        n = config.n_patches_side
        if n % self.POOL:
            raise MmprojError(f"{self.path}: ldpv2 average-pools the patch grid by {self.POOL}, but "
                              f"{config.image_size}/{config.patch_size} gives an odd {n}×{n} grid")
        self.peg_w = self._dw("mm.model.peg.0.weight")
        self.peg_b = _float(self._vec("mm.model.peg.0.bias"), self.dtype)

    @classmethod
    def projector_tensor_names(cls, cfg):
        req = [f"{m}.{s}" for m in cls.MLP for s in ("weight", "bias")]
        return req + ["mm.model.peg.0.weight", "mm.model.peg.0.bias"], []

    def n_tokens_grid(self, n_patch_h: int, n_patch_w: int) -> int:
        return (n_patch_h // self.POOL) * (n_patch_w // self.POOL)

    def project(self, feats: torch.Tensor, n_patch_h: int, n_patch_w: int) -> torch.Tensor:
        B, C, k = feats.shape[0], self.width, self.POOL
        x = self._mlp(feats).reshape(B, n_patch_h, n_patch_w, C)
        x = F.avg_pool2d(x.permute(0, 3, 1, 2), k, k).permute(0, 2, 3, 1)      # [B, h/2, w/2, C]
        x = x + depthwise3x3(x, self.peg_w, self.peg_b, 1)                      # PEG + residual
        return x.reshape(B, -1, C)
