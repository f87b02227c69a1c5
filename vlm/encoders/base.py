"""mmproj vision encoders: the driver every vision projector file shares (:class:`MmprojEncoder`) and
:func:`load_mmproj`, which builds the class a file's ``clip.projector_type`` names.

An mmproj GGUF (llama.cpp's `clip` architecture) holds a vision tower (`v.*` tensors) and a projector (`mm.*`);
`clip.projector_type` names the projector and, through :mod:`vlm.registry`, the class implementing it (one file
per projector under vlm/encoders/). Weights stay under their GGUF names (``v.blk.0.attn_q.weight``, ``mm.0.bias``).

    enc = load_mmproj("mmproj.gguf")          # or a GGUFFile (a single file holding text + mmproj works too)
    enc.check_compatible(text_n_embd)         # refuses a projector whose output width differs, naming both
    enc.n_tokens(h, w)                        # tokens one preprocessed image becomes (no pixels needed)
    embs = enc.encode([img0, img1])           # [3, H, W] tensors -> list of [n_tokens_i, enc.n_embd_out]

Pixels: float tensors are taken as already normalised (HF ``pixel_values``, what vlm.preprocess produces);
uint8 tensors are raw RGB and are normalised with the file's ``clip.vision.image_mean/std`` inside the
patch-embedding kernel. All images of one ``encode`` call run through the tower together: every linear layer
sees all their tokens at once and attention is one varlen ``vlm_kernels.attention`` call (``cu_seqlens`` over images,
non-causal), so images never attend to each other.
"""
from __future__ import annotations

import os
from typing import Sequence

import numpy as np
import torch

from vlm.encoders.clip import VisionTower, tower_tensor_names
from vlm.encoders.common import (KEY_HAS_VISION, KEY_PROJ_TYPE, KEY_VISION_PROJ_TYPE, MediaFacts,  # noqa: F401
                                 MediaPiece, MmprojError, MmprojMismatchError, VisionConfig, default_device,
                                 fuse_qkv, load_tensor, load_weights)
from vlm.encoders.whisper import load_audio_encoder
from vlm.errors import MediaError
from vlm.gguf import GGUFFile
from vlm.preprocess import image as pimg
from vlm.registry import check_tensors, encoder_class


def _tensor(a) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(a))


class MmprojEncoder(MediaFacts):
    """Base class: a vision tower (vlm.encoders.clip) + a projector (the subclass). Subclasses set
    PROJECTOR_TYPE and implement ``tensor_names``, ``n_embd_out``, ``n_tokens_grid`` and ``project``; the media
    facts (markers, layout, preprocessing) default to one CLIP-preprocessed image between no markers."""

    PROJECTOR_TYPE: str = ""

    def __init__(self, config: VisionConfig, weights: dict, *, device=None, dtype=None, path: str = "<weights>"):
        self.config = config
        self.device = torch.device(device) if device is not None else default_device()
        self.dtype = dtype or (torch.float32 if self.device.type == "cpu" else torch.bfloat16)
        self.weights = weights
        self.path = path
        self.layers = [{k[len(f"v.blk.{il}."):]: w for k, w in weights.items() if k.startswith(f"v.blk.{il}.")}
                       for il in range(config.n_layer)]
        check_tensors(weights, self.tensor_names(config)[0], path, f"mmproj {config.projector_type}")
        for il, layer in enumerate(self.layers):
            fuse_qkv(layer, weights, f"v.blk.{il}.")
        self.tower = VisionTower(self)

    # ---- per-projector hooks ------------------------------------------------------------------------------
    @classmethod
    def tensor_names(cls, cfg: VisionConfig) -> tuple[list[str], list[str]]:
        """(required, optional) GGUF tensor names: the tower's plus the projector's."""
        req, opt = tower_tensor_names(cfg)
        preq, popt = cls.projector_tensor_names(cfg)
        return req + preq, opt + popt

    @classmethod
    def projector_tensor_names(cls, cfg: VisionConfig) -> tuple[list[str], list[str]]:
        raise NotImplementedError

    @property
    def n_embd_out(self) -> int:
        """Width of the image embeddings (must equal the text model's n_embd)."""
        raise NotImplementedError

    def n_tokens_grid(self, n_patch_h: int, n_patch_w: int) -> int:
        """Output tokens for an image of n_patch_h × n_patch_w patches."""
        raise NotImplementedError

    def tower_layers(self) -> tuple[int, tuple[int, ...]]:
        """(layers to run, feature layers to stack): SigLIP-style towers run every stored layer."""
        return self.config.n_layer, ()

    def project(self, feats: torch.Tensor, n_patch_h: int, n_patch_w: int) -> torch.Tensor:
        """feats [B, n_patch_h·n_patch_w, d_feat] (row-major patch grid) -> [B, n_tokens, n_embd_out]."""
        raise NotImplementedError

    # ---- media facts (what vlm.mtmd asks) ----------------------------------------------------------------
    def image_layout(self, height: int, width: int, *, mode: str) -> list:
        """Strings and :class:`MediaPiece` s one image of height × width (decoded) pixels becomes in the prompt."""
        s = self.config.image_size
        n = self.n_tokens(s, s)
        return self.wrap([MediaPiece(n, n, non_causal=self.NON_CAUSAL)])

    def preprocess_image(self, image, *, mode: str) -> list:
        """Encoder inputs of one decoded image (uint8 [H, W, C]), one per piece of image_layout: here the
        CLIP resize + center crop to image_size."""
        cfg = self.config
        s = cfg.image_size
        px = pimg.preprocess_clip(image, shortest_edge=s, crop_size=s, mean=cfg.image_mean, std=cfg.image_std,
                                  mode=mode)
        return [_tensor(px)]

    def preprocess_params(self, mode: str) -> tuple:
        """Everything preprocessing depends on (part of the embedding-cache key)."""
        cfg = self.config
        return (cfg.projector_type, mode, cfg.image_size, tuple(cfg.image_mean), tuple(cfg.image_std),
                cfg.preproc_image_size or cfg.image_size)

    def _no_video(self, name: str):
        return MediaError(f"{name}: video input needs a Qwen2-VL / Qwen2.5-VL mmproj (M-RoPE video positions); "
                          f"this model's projector is {self.config.projector_type}: pass the frames as images "
                          f"instead")

    def video_layout(self, frame_sizes, *, fps: float, policy: str, pixel_limits: tuple, mode: str,
                     name: str) -> list:
        """Strings and pieces of one video whose frames decode to `frame_sizes` [(h, w), ...]."""
        raise self._no_video(name)

    def preprocess_video(self, frames, *, policy: str, pixel_limits: tuple, mode: str, name: str):
        """Encoder input of one video (decoded frames)."""
        raise self._no_video(name)

    # ---- loading ------------------------------------------------------------------------------------------
    @classmethod
    def from_gguf(cls, f: GGUFFile, *, device=None, dtype=None) -> "MmprojEncoder":
        cfg = VisionConfig.from_gguf(f)
        weights, device, dtype = load_weights(cls, f, cfg, device, dtype, "mmproj")
        return cls(cfg, weights, device=device, dtype=dtype, path=str(f.path))

    # ---- queries ------------------------------------------------------------------------------------------
    def check_compatible(self, n_embd_text: int, text_name: str = "the text model") -> None:
        """Raise MmprojMismatchError unless the image embeddings are as wide as the text model's embeddings."""
        if int(n_embd_text) != self.n_embd_out:
            raise MmprojMismatchError(
                f"{self.path}: mmproj ({self.config.projector_type}) produces image embeddings of width "
                f"{self.n_embd_out}, but {text_name} has n_embd = {int(n_embd_text)}: this mmproj does not belong "
                f"to this text model")

    def n_tokens(self, height: int, width: int) -> int:
        """Tokens one preprocessed image of height × width pixels becomes (computable without pixels)."""
        self._check_size(int(height), int(width))
        p = self.config.patch_size
        return self.n_tokens_grid(int(height) // p, int(width) // p)

    def _check_size(self, h: int, w: int) -> None:
        s = self.config.image_size
        if (h, w) != (s, s):
            raise MmprojError(f"{self.path}: the {self.config.projector_type} encoder takes preprocessed {s}×{s} "
                              f"images (clip.vision.image_size), got {h}×{w}")

    # ---- encoding -----------------------------------------------------------------------------------------
    def _as_images(self, pixels) -> list[torch.Tensor]:
        if isinstance(pixels, torch.Tensor):
            if pixels.dim() == 3:
                raise MmprojError(f"encode() takes a list of [3, H, W] images or a [B, 3, H, W] batch, got one "
                                  f"tensor of shape {tuple(pixels.shape)}: wrap it in a list")
            if pixels.dim() != 4:
                raise MmprojError(f"encode() takes [B, 3, H, W] pixels, got shape {tuple(pixels.shape)}")
            imgs = list(pixels.unbind(0))
        elif isinstance(pixels, Sequence) and not isinstance(pixels, (str, bytes)):
            imgs = list(pixels)
        else:
            raise MmprojError(f"encode() takes a list of [3, H, W] tensors or a [B, 3, H, W] tensor, "
                              f"got {type(pixels).__name__}")
        if not imgs:
            raise MmprojError("encode() got no images")
        for i, im in enumerate(imgs):
            if not isinstance(im, torch.Tensor):
                raise MmprojError(f"image {i} is a {type(im).__name__}, expected a torch.Tensor [3, H, W]")
            if im.dim() != 3 or im.shape[0] != 3:
                raise MmprojError(f"image {i} has shape {tuple(im.shape)}, expected [3, H, W] (planar RGB)")
            if im.dtype not in (torch.uint8, torch.float16, torch.bfloat16, torch.float32):
                raise MmprojError(f"image {i} has dtype {im.dtype}; expected uint8 (raw RGB) or a float dtype "
                                  f"(normalised pixel values)")
            if im.dtype.is_floating_point and not bool(torch.isfinite(im).all()):
                raise MmprojError(f"image {i} contains NaN or Inf pixel values")
            self._check_size(im.shape[1], im.shape[2])
        kinds = {im.dtype == torch.uint8 for im in imgs}
        if len(kinds) > 1:
            raise MmprojError("encode() got a mix of uint8 (raw) and float (normalised) images: use one kind")
        return imgs

    @torch.inference_mode()
    def encode(self, pixels) -> list[torch.Tensor]:
        """Image embeddings, one [n_tokens_i, n_embd_out] tensor per image (in the input order, dtype
        ``self.dtype``, on ``self.device``)."""
        imgs = self._as_images(pixels)
        # Same-size images are stacked for one patch-embedding launch; every group's tokens then share one
        # tower pass (varlen attention). All three supported projectors take one fixed size, so there is one
        # group, but the driver does not rely on that.
        groups: dict[tuple[int, int], list[int]] = {}
        for i, im in enumerate(imgs):
            groups.setdefault((im.shape[1], im.shape[2]), []).append(i)
        out: list[torch.Tensor | None] = [None] * len(imgs)
        p = self.config.patch_size
        batches = []
        for (h, w), idx in groups.items():
            batch = torch.stack([imgs[i] for i in idx]).to(self.device)
            if batch.is_floating_point():
                batch = batch.to(self.dtype) if self.dtype != torch.float32 else batch.float()
            batches.append((batch, h // p, w // p, idx))
        feats = self.tower([(b, gh, gw) for b, gh, gw, _ in batches], self.tower_layers())
        for (_, gh, gw, idx), fe in zip(batches, feats):
            proj = self.project(fe, gh, gw)
            for j, i in enumerate(idx):
                out[i] = proj[j]
        return out  # type: ignore[return-value]


def load_mmproj(source, *, device=None, dtype=None):
    """Open an mmproj GGUF (path or :class:`GGUFFile`) and build the encoder its ``clip.projector_type`` names.

    A file with only an audio encoder (``clip.has_audio_encoder`` true, no vision encoder) is handed to
    :func:`vlm.encoders.whisper.load_audio_encoder` and an AudioEncoder is returned; a file holding both gives the
    vision encoder here (``vlm.load(mmproj=...)`` loads both). A file with neither encoder is refused.

    Raises UnsupportedArchError (unknown projector type, listing the supported ones), MissingTensorsError,
    GGUFKeyError (a required ``clip.*`` key is missing) or MmprojError."""
    f = source if isinstance(source, GGUFFile) else GGUFFile(os.fspath(source))
    try:
        has_vision = f.get(KEY_HAS_VISION)
        if f.get("clip.has_audio_encoder") and not has_vision:
            return load_audio_encoder(f, device=device, dtype=dtype)
        if has_vision is False:
            raise MmprojError(f"{f.path}: this mmproj has neither a vision nor an audio encoder "
                              f"({KEY_HAS_VISION} and clip.has_audio_encoder are not true)")
        proj = f.get(KEY_PROJ_TYPE) or f.get(KEY_VISION_PROJ_TYPE)
        if proj is None or f.get(KEY_HAS_VISION) is False:
            VisionConfig.from_gguf(f)     # raises the precise error (text model / audio only / missing key)
        cls = encoder_class(proj, str(f.path))
        return cls.from_gguf(f, device=device, dtype=dtype)
    finally:
        if f is not source:
            f.close()   # float weights are copies; QTensor views keep the mapping alive until they are freed
