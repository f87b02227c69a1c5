"""`gemma3` projector (Gemma 3 4B/12B/27B): SigLIP features -> k×k average pool -> RMSNorm × mm.soft_emb_norm ->
× mm.input_projection.

    grid  [B, n, n, d]  (n = image_size / patch_size, row-major patches)
    pool  AvgPool2d(k, stride k) with k = clip.vision.projector.scale_factor (default 4: 896/14 = 64 -> 16×16)
    norm  x / sqrt(mean(x²) + eps) · w      w = 1 + HF weight (the converter stores Gemma3RMSNorm's 1 + w)
    proj  x @ mm.input_projection           stored [d_vision, d_text] (torch order), as HF's parameter

(HF Gemma3MultiModalProjector; llama.cpp tools/mtmd/models/siglip.cpp.) Tokens per image: (n / k)², 256 for the
released models. In the prompt an image is ``<start_of_image>`` + its tokens + ``<end_of_image>``, and the decoder
attends to its rows non-causally (HF Gemma3 token_type_ids mask; llama.cpp's non-causal image batch).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

import vlm_kernels
from vlm_kernels.quant import QTensor
from vlm.encoders.base import MmprojEncoder, MmprojError, _tensor
from vlm.preprocess import image as pimg

DEFAULT_POOL = 4   # llama.cpp's default n_merge for gemma3 (the key is written only when it differs)


class Gemma3Encoder(MmprojEncoder):
    PROJECTOR_TYPE = "gemma3"
    MEDIA_BEGIN, MEDIA_END = "<start_of_image>", "<end_of_image>"
    NON_CAUSAL = True

    def __init__(self, config, weights, **kw):
        super().__init__(config, weights, **kw)
        self.pool = int(config.scale_factor or DEFAULT_POOL)
        n = config.n_patches_side
        if self.pool <= 0 or n % self.pool:
            raise MmprojError(f"{self.path}: {n}×{n} patches cannot be average-pooled by {self.pool}")
        w = weights["mm.input_projection.weight"]
        if w.shape[0] != config.n_embd:
            raise MmprojError(f"{self.path}: mm.input_projection.weight has shape {tuple(w.shape)}, expected "
                              f"[{config.n_embd}, n_embd_text] (vision width first)")
        # x @ W == F.linear(x, W.T): keep the transposed copy once (float; a quantized file is dequantized here).
        wf = w.dequantize(self.dtype) if isinstance(w, QTensor) else w
        self.proj_t = wf.t().contiguous().to(self.dtype)

    @classmethod
    def projector_tensor_names(cls, cfg):
        return ["mm.input_projection.weight", "mm.soft_emb_norm.weight"], []

    def preprocess_image(self, image, *, mode: str) -> list:
        """Gemma3ImageProcessor: a plain resize to image_size × image_size (no crop)."""
        cfg = self.config
        return [_tensor(pimg.preprocess_gemma3(image, size=cfg.image_size, mean=cfg.image_mean, std=cfg.image_std,
                                               mode=mode))]

    @property
    def n_embd_out(self) -> int:
        return int(self.weights["mm.input_projection.weight"].shape[1])

    def n_tokens_grid(self, n_patch_h: int, n_patch_w: int) -> int:
        return (n_patch_h // self.pool) * (n_patch_w // self.pool)

    def project(self, feats: torch.Tensor, n_patch_h: int, n_patch_w: int) -> torch.Tensor:
        B, _, d = feats.shape
        grid = feats.reshape(B, n_patch_h, n_patch_w, d).permute(0, 3, 1, 2)        # [B, d, rows, cols]
        pooled = F.avg_pool2d(grid, self.pool, self.pool).flatten(2).transpose(1, 2)  # [B, tokens, d]
        x = vlm_kernels.rms_norm(pooled.contiguous(), self.weights["mm.soft_emb_norm.weight"], self.config.eps)
        return F.linear(x, self.proj_t)
