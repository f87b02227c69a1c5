"""`mlp` projector (LLaVA-1.5, Yi-VL without mm.2): CLIP ViT features -> mm.0 -> GELU -> mm.2.

Tower (llama.cpp tools/mtmd/models/llava.cpp): runs up to the deepest ``clip.vision.feature_layer`` (HF
``vision_feature_layer``; the converter stores it non-negative), or, in files without that key, all stored layers
but the last (llama.cpp's rule for llava projectors). The CLS row is dropped (HF
``vision_feature_select_strategy="default"``); one token per patch: (image_size / patch_size)² (576 at 336/14).

GELU: HF's projector uses the exact erf GELU (``projector_hidden_act="gelu"``); llama.cpp applies ggml_gelu (the
tanh approximation, up to ~1e-3 apart). We follow HF, the model's definition.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from vlm.encoders.base import MmprojEncoder, MmprojError
from vlm.graph import linear


class MlpEncoder(MmprojEncoder):
    PROJECTOR_TYPE = "mlp"

    def __init__(self, config, weights, **kw):
        if "mm.3.weight" in weights:
            raise MmprojError(f"{kw.get('path', '<weights>')}: mm.3 present: this is llama.cpp's mlp_norm projector "
                              f"(Yi-VL style), which is not supported")
        super().__init__(config, weights, **kw)
        n_run, feats = self.tower_layers()
        if not 0 < n_run <= config.n_layer:
            raise MmprojError(f"{self.path}: feature layer {n_run} is outside the {config.n_layer} stored layers")
        d_feat = config.n_embd * max(1, len(feats))
        w0 = weights["mm.0.weight"]
        if w0.shape[1] != d_feat:
            raise MmprojError(f"{self.path}: mm.0.weight takes {w0.shape[1]} inputs but the tower gives {d_feat} "
                              f"({max(1, len(feats))} feature layer(s) x {config.n_embd})")

    @classmethod
    def projector_tensor_names(cls, cfg):
        return ["mm.0.weight", "mm.0.bias"], ["mm.2.weight", "mm.2.bias", "mm.3.weight"]   # mm.3: refused

    @property
    def n_embd_out(self) -> int:
        w = self.weights.get("mm.2.weight", self.weights["mm.0.weight"])
        return int(w.shape[0])

    def tower_layers(self):
        fl = tuple(sorted({i for i in self.config.feature_layers if i >= 0}))   # -1 marks "unset" in llama.cpp
        if fl:
            return max(fl), fl
        return self.config.n_layer - 1, ()

    def n_tokens_grid(self, n_patch_h: int, n_patch_w: int) -> int:
        return n_patch_h * n_patch_w

    def project(self, feats: torch.Tensor, n_patch_h: int, n_patch_w: int) -> torch.Tensor:
        w = self.weights
        x = F.gelu(linear(feats, w["mm.0.weight"], w["mm.0.bias"]))
        if "mm.2.weight" in w:
            x = linear(x, w["mm.2.weight"], w.get("mm.2.bias"))
        return x
