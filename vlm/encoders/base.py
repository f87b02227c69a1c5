"""mmproj loading and the encoder driver every projector file shares.

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
from dataclasses import dataclass
from typing import Sequence

import torch

from vlm_kernels.quant import FLOAT_TYPES
from vlm.gguf import GGUFFile, GGUFKeyError
from vlm.registry import check_tensors, encoder_class

# GGUF keys (llama.cpp tools/mtmd/clip-impl.h; gguf-py Keys.Clip / Keys.ClipVision). Two are missing from the
# gguf 0.19 package we pin: clip.vision.feature_layer and the "mlp" projector-type string.
KEY_PROJ_TYPE = "clip.projector_type"
KEY_VISION_PROJ_TYPE = "clip.vision.projector_type"     # files holding vision + audio
KEY_HAS_VISION = "clip.has_vision_encoder"
KEY_USE_GELU = "clip.use_gelu"
KEY_USE_SILU = "clip.use_silu"
KEY_FEATURE_LAYERS = "clip.vision.feature_layer"
V = "clip.vision."


class MmprojError(ValueError):
    """An mmproj file or an encode request this engine cannot serve (message names the problem)."""


class MmprojMismatchError(MmprojError):
    """The projector's output width differs from the text model's embedding width."""


@dataclass(frozen=True)
class VisionConfig:
    """Vision-tower hyper-parameters from ``clip.vision.*`` (names follow llama.cpp's clip_hparams)."""
    projector_type: str
    image_size: int
    patch_size: int
    n_embd: int
    n_ff: int
    n_layer: int                      # clip.vision.block_count: layers stored in the file
    n_head: int
    head_dim: int
    eps: float
    projection_dim: int               # text model width the converter saw (informational; tensors decide)
    image_mean: tuple[float, float, float]
    image_std: tuple[float, float, float]
    ffn_act: str                      # "gelu" (tanh approx., ggml_gelu) | "silu" | "gelu_quick" (neither flag)
    feature_layers: tuple[int, ...] = ()   # hidden-state indices (0 = tower input) whose outputs are stacked
    scale_factor: int | None = None   # clip.vision.projector.scale_factor (n_merge)
    preproc_image_size: int | None = None  # clip.vision.preproc_image_size (Idefics3 longest edge)

    @property
    def n_patches_side(self) -> int:
        return self.image_size // self.patch_size

    @classmethod
    def from_gguf(cls, f: GGUFFile) -> "VisionConfig":
        path = str(f.path)
        if f.arch not in (None, "clip") and KEY_PROJ_TYPE not in f.metadata and KEY_VISION_PROJ_TYPE not in f.metadata:
            raise MmprojError(f"{path} is a {f.arch!r} text model with no vision projector (no {KEY_PROJ_TYPE} key): "
                              f"pass the mmproj GGUF")
        if f.get(KEY_HAS_VISION) is False or (f.get(KEY_HAS_VISION) is None and f.get("clip.has_audio_encoder")):
            raise MmprojError(f"{path}: this mmproj has no vision encoder ({KEY_HAS_VISION} is not true); audio "
                              f"encoders are not supported")
        proj = f.get(KEY_PROJ_TYPE) or f.get(KEY_VISION_PROJ_TYPE)
        if not proj:
            raise GGUFKeyError(f"missing metadata key {KEY_PROJ_TYPE!r} in {path}")
        use_gelu, use_silu = bool(f.get(KEY_USE_GELU, False)), bool(f.get(KEY_USE_SILU, False))
        if use_gelu and use_silu:
            raise MmprojError(f"{path}: both {KEY_USE_GELU} and {KEY_USE_SILU} are set")
        n_embd, n_head = int(f.require(V + "embedding_length")), int(f.require(V + "attention.head_count"))
        mean, std = f.require(V + "image_mean"), f.require(V + "image_std")
        if len(mean) < 3 or len(std) < 3:
            raise MmprojError(f"{path}: image_mean/image_std need 3 values, got {list(mean)} / {list(std)}")
        feat = f.get(KEY_FEATURE_LAYERS)
        sf = f.get(V + "projector.scale_factor")
        pre = f.get(V + "preproc_image_size")
        cfg = cls(projector_type=str(proj), image_size=int(f.require(V + "image_size")),
                  patch_size=int(f.require(V + "patch_size")), n_embd=n_embd,
                  n_ff=int(f.require(V + "feed_forward_length")), n_layer=int(f.require(V + "block_count")),
                  n_head=n_head, head_dim=int(f.get(V + "attention.head_dim", n_embd // max(n_head, 1))),
                  eps=float(f.require(V + "attention.layer_norm_epsilon")),
                  projection_dim=int(f.get(V + "projection_dim", 0)),
                  image_mean=tuple(float(x) for x in list(mean)[:3]), image_std=tuple(float(x) for x in list(std)[:3]),
                  ffn_act="gelu" if use_gelu else "silu" if use_silu else "gelu_quick",
                  feature_layers=tuple(int(x) for x in feat) if feat is not None else (),
                  scale_factor=int(sf) if sf is not None else None,
                  preproc_image_size=int(pre) if pre is not None else None)
        if cfg.patch_size <= 0 or cfg.image_size % cfg.patch_size:
            raise MmprojError(f"{path}: image_size {cfg.image_size} is not a multiple of patch_size {cfg.patch_size}")
        if cfg.n_head <= 0 or cfg.head_dim * cfg.n_head != cfg.n_embd:
            raise MmprojError(f"{path}: {cfg.n_head} heads x head_dim {cfg.head_dim} != embedding_length {n_embd}")
        return cfg


def load_tensor(f: GGUFFile, name: str, device: torch.device, dtype: torch.dtype):
    """One GGUF tensor as the encoder keeps it: quantized matrices stay QTensors (``vlm_kernels.qmatmul``); float
    tensors become `dtype`, except LayerNorm / RMSNorm vectors, which stay fp32 (the norm kernels compute in
    fp32 and accept fp32 weights with any activation dtype)."""
    info = f.tensors[name]
    if info.qtype in FLOAT_TYPES:
        norm = len(info.shape) == 1 and any(s in name for s in ("ln", "norm"))
        return f.load(name, torch.float32 if norm else dtype).to(device)
    qt = f.tensor(name)
    return qt.to(device) if device.type != "cpu" else qt


def _default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def fuse_qkv(layer: dict, weights: dict, prefix: str) -> None:
    """Give a layer one [3·D, D] q/k/v projection ("qkv.weight", "qkv.bias"): one matmul instead of three
    (measured 3-12 % faster on the CPU for the encoders' shapes, and one GEMM launch instead of three on a GPU).
    The layer's and the GGUF-named `weights` entries of attn_q/k/v become views of the fused tensors, so no
    second copy stays alive. Left as is when a projection is quantized or the three differ in shape. A missing
    bias (Whisper's K) is zeros in the fused bias, which keeps the sum exact."""
    ws = [layer.get(f"attn_{n}.weight") for n in "qkv"]
    if any(not isinstance(w, torch.Tensor) for w in ws) or not ws[0].shape == ws[1].shape == ws[2].shape:
        return
    d = ws[0].shape[0]
    fused = torch.cat(ws).contiguous()
    bs = [layer.get(f"attn_{n}.bias") for n in "qkv"]
    fb = None
    if any(b is not None for b in bs):
        fb = torch.cat([b.reshape(d).to(fused.dtype) if b is not None else fused.new_zeros(d) for b in bs])
    layer["qkv.weight"], layer["qkv.bias"] = fused, fb
    for i, n in enumerate("qkv"):
        for name, t in ((f"attn_{n}.weight", fused), (f"attn_{n}.bias", fb if bs[i] is not None else None)):
            if t is not None:
                layer[name] = t[i * d:(i + 1) * d]
                if prefix + name in weights:
                    weights[prefix + name] = layer[name]


def load_weights(cls, f: GGUFFile, cfg, device, dtype, what: str):
    """What every encoder's from_gguf shares: device/dtype defaults (fp32 on CPU, bf16 on CUDA), the check that
    `cls.tensor_names(cfg)`'s required tensors are present, and loading them plus the optional ones present.
    Returns (weights, device, dtype)."""
    device = torch.device(device) if device is not None else _default_device()
    dtype = dtype or (torch.float32 if device.type == "cpu" else torch.bfloat16)
    required, optional = cls.tensor_names(cfg)
    check_tensors(f.tensors, required, str(f.path), f"{what} {cfg.projector_type}")
    names = required + [n for n in optional if n in f.tensors]
    return {n: load_tensor(f, n, device, dtype) for n in names}, device, dtype


class MmprojEncoder:
    """Base class: a vision tower (vlm.encoders.clip) + a projector (the subclass). Subclasses set
    PROJECTOR_TYPE and implement ``tensor_names``, ``n_embd_out``, ``n_tokens_grid`` and ``project``."""

    PROJECTOR_TYPE: str = ""

    def __init__(self, config: VisionConfig, weights: dict, *, device=None, dtype=None, path: str = "<weights>"):
        self.config = config
        self.device = torch.device(device) if device is not None else _default_device()
        self.dtype = dtype or (torch.float32 if self.device.type == "cpu" else torch.bfloat16)
        self.weights = weights
        self.path = path
        self.layers = [{k[len(f"v.blk.{il}."):]: w for k, w in weights.items() if k.startswith(f"v.blk.{il}.")}
                       for il in range(config.n_layer)]
        check_tensors(weights, self.tensor_names(config)[0], path, f"mmproj {config.projector_type}")
        for il, layer in enumerate(self.layers):
            fuse_qkv(layer, weights, f"v.blk.{il}.")
        from vlm.encoders import clip
        self.tower = clip.VisionTower(self)

    # ---- per-projector hooks ------------------------------------------------------------------------------
    @classmethod
    def tensor_names(cls, cfg: VisionConfig) -> tuple[list[str], list[str]]:
        """(required, optional) GGUF tensor names: the tower's plus the projector's."""
        from vlm.encoders.clip import tower_tensor_names
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
            from vlm.encoders.whisper import load_audio_encoder
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
