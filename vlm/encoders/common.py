"""What every encoder shares: mmproj keys and errors, the vision config, weight loading, and the media facts
the media API (:mod:`vlm.mtmd`) asks an encoder for.

Media facts: each encoder / projector class says how one media item enters the prompt -- the text around it
(``MEDIA_BEGIN`` / ``MEDIA_END``), whether the decoder attends to its rows non-causally (``NON_CAUSAL``), whether it
uses M-RoPE positions (``USES_MROPE``), its chunk layout (a list of strings and :class:`MediaPiece`), and its
preprocessing. :mod:`vlm.mtmd` turns the pieces into chunks and never names a projector.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from vlm_kernels.quant import FLOAT_TYPES
from vlm.gguf import GGUFFile, GGUFKeyError
from vlm.registry import check_tensors

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


def default_device() -> torch.device:
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
    device = torch.device(device) if device is not None else default_device()
    dtype = dtype or (torch.float32 if device.type == "cpu" else torch.bfloat16)
    required, optional = cls.tensor_names(cfg)
    check_tensors(f.tensors, required, str(f.path), f"{what} {cfg.projector_type}")
    names = required + [n for n in optional if n in f.tensors]
    return {n: load_tensor(f, n, device, dtype) for n in names}, device, dtype


@dataclass(frozen=True)
class MediaPiece:
    """One media chunk as an encoder lays it out: the rows it becomes in the decoder and where they sit.

    hw / n_frames / time_interval describe an M-RoPE image or video (its position grid); part indexes the list of
    embeddings the media item encodes to (one per tile, overview or audio window)."""
    n_tokens: int
    n_pos: int
    part: int = 0
    non_causal: bool = False
    hw: tuple[int, int] | None = None
    n_frames: int = 1
    time_interval: float = 1.0


class MediaFacts:
    """Media-API facts of an encoder class; subclasses override what differs from the plain case."""

    MEDIA_BEGIN: str = ""             # text before one media item (special tokens, parsed as such)
    MEDIA_END: str = ""               # text after it
    NON_CAUSAL: bool = False          # decoder attends to the item's rows bidirectionally (one batch)
    USES_MROPE: bool = False          # rows get M-RoPE [4, n] positions (decoder_positions)

    def wrap(self, pieces: list) -> list:
        """[MEDIA_BEGIN, *pieces, MEDIA_END] (empty strings are dropped by the tokenizer step)."""
        return [self.MEDIA_BEGIN, *pieces, self.MEDIA_END]

    def chunk_positions(self, piece, n_past: int):
        """Decoder positions of one media chunk starting at n_past: the start (1-D, consecutive) here;
        M-RoPE encoders return [4, n_tokens] planes."""
        return n_past
