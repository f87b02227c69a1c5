"""`idefics3` projector (Idefics3, SmolVLM / SmolVLM2, granite-docling): SigLIP features -> pixel shuffle by
s = clip.vision.projector.scale_factor -> mm.model.fc (no bias).

Pixel shuffle (HF Idefics3Connector.pixel_shuffle; llama.cpp build_patch_merge_permute): each s×s block of
patches becomes one token whose s²·d channels are ordered (row-in-block, col-in-block, channel)::

    [B, h, w, d] -> [B, h, w/s, d·s] -> swap (h, w/s) -> [B, w/s, h/s, d·s²] -> swap back -> [B, h/s · w/s, d·s²]

Tokens per tile: (n/s)² with n = image_size / patch_size (64 for SmolVLM's 512/16 with s = 4).

Prompt layout of one image (HF Idefics3Processor): rows of ``<fake_token_around_image><row_R_col_C>`` + tile,
``\n`` after each row, then ``\n<fake_token_around_image><global-img>`` + overview + ``<fake_token_around_image>``;
the grid comes from vlm.preprocess.tiling (longest edge clip.vision.preproc_image_size, tiles of image_size).
"""
from __future__ import annotations

import torch

from vlm.encoders.base import MediaPiece, MmprojEncoder, MmprojError, _tensor
from vlm.graph import linear
from vlm.preprocess import tiling

FAKE, GLOBAL = "<fake_token_around_image>", "<global-img>"


def pixel_shuffle(x: torch.Tensor, h: int, w: int, s: int) -> torch.Tensor:
    """[B, h·w, d] (row-major grid) -> [B, (h/s)·(w/s), d·s²] in HF's channel order."""
    B, _, d = x.shape
    x = x.reshape(B, h, w // s, d * s).permute(0, 2, 1, 3)
    x = x.reshape(B, w // s, h // s, d * s * s).permute(0, 2, 1, 3)
    return x.reshape(B, (h // s) * (w // s), d * s * s)


class Idefics3Encoder(MmprojEncoder):
    PROJECTOR_TYPE = "idefics3"

    def __init__(self, config, weights, **kw):
        super().__init__(config, weights, **kw)
        self.scale = int(config.scale_factor or 1)   # llama.cpp's default n_merge is 1 (the converter writes it)
        n = config.n_patches_side
        if self.scale <= 0 or n % self.scale:
            raise MmprojError(f"{self.path}: {n}×{n} patches per tile cannot be pixel-shuffled by {self.scale}")
        w = weights["mm.model.fc.weight"]
        if w.shape[1] != config.n_embd * self.scale ** 2:
            raise MmprojError(f"{self.path}: mm.model.fc.weight takes {w.shape[1]} inputs, expected "
                              f"{config.n_embd} x {self.scale}² = {config.n_embd * self.scale ** 2}")

    @classmethod
    def projector_tensor_names(cls, cfg):
        return ["mm.model.fc.weight"], ["mm.model.fc.bias"]

    def _tiling(self) -> dict:
        s = self.config.image_size
        return dict(longest_edge=self.config.preproc_image_size or s, tile_size=s)

    def image_layout(self, height: int, width: int, *, mode: str) -> list:
        s = self.config.image_size
        n = self.n_tokens(s, s)
        rows, cols = tiling.idefics3_grid(height, width, mode=mode, **self._tiling())
        out, part = [], 0
        for r in range(rows):
            for c in range(cols):
                out += [f"{FAKE}<row_{r + 1}_col_{c + 1}>", MediaPiece(n, n, part=part)]
                part += 1
            out.append("\n")
        return out + [("\n" if rows else "") + FAKE + GLOBAL, MediaPiece(n, n, part=part), FAKE]

    def preprocess_image(self, image, *, mode: str) -> list:
        """The tiles (row-major) then the overview, each image_size × image_size."""
        cfg = self.config
        tiles = tiling.preprocess_idefics3(image, mean=cfg.image_mean, std=cfg.image_std, mode=mode, **self._tiling())
        return [_tensor(p) for p in tiles.pixel_values]

    @property
    def n_embd_out(self) -> int:
        return int(self.weights["mm.model.fc.weight"].shape[0])

    def n_tokens_grid(self, n_patch_h: int, n_patch_w: int) -> int:
        return (n_patch_h // self.scale) * (n_patch_w // self.scale)

    def project(self, feats: torch.Tensor, n_patch_h: int, n_patch_w: int) -> torch.Tensor:
        x = pixel_shuffle(feats, n_patch_h, n_patch_w, self.scale)
        return linear(x, self.weights["mm.model.fc.weight"], self.weights.get("mm.model.fc.bias"))
