"""Whisper-style audio encoder of audio mmproj GGUFs (``a.*`` tensors), shared by the ``ultravox`` and ``qwen2a``
projectors (vlm/encoders/ultravox.py, qwen2a.py), and usable bare (no projector) for plain Whisper weights.

    from vlm.encoders.whisper import load_audio_encoder
    enc = load_audio_encoder("mmproj-ultravox.gguf")    # or a GGUFFile; class chosen by clip.projector_type
    enc.check_compatible(text_n_embd)
    mel = log_mel_spectrogram(pcm, enc.n_mels)           # vlm.preprocess.audio: [n_chunks, n_mels, 3000]
    enc.n_tokens(3000)                                   # tokens one 30 s chunk becomes (no samples needed)
    embs = enc.encode(mel)                               # list of [n_tokens, enc.n_embd_out], one per chunk

Graph (llama.cpp tools/mtmd/models/whisper-enc.cpp + clip_graph::build_vit; HF WhisperEncoder /
Qwen2AudioEncoder):

    x  = gelu(conv1d(mel, a.conv1d.1, k=3, s=1, p=1))          [n_frames, n_embd]     GELU = exact erf
    x  = gelu(conv1d(x,   a.conv1d.2, k=3, s=2, p=1))          [n_pos, n_embd]        n_pos = (n_frames-1)//2 + 1
    x += a.position_embd[0 : n_pos]                             learned (Whisper) or sinusoidal table (Qwen2-Audio)
    per layer:  x = x + attn_out(MHA(ln1(x)))                   non-causal; q/v biased, k without bias
                x = x + ffn_down(gelu(ffn_up(ln2(x))))
    (qwen2a only) x = AvgPool1d(2, stride 2)(x)                 per chunk, before the final norm
    x  = post_ln(x)                                             -> the projector (subclass ``project``)

Chunks: every 3000-frame (30 s) log-mel chunk is one sequence. All chunks of one ``encode`` call run through the
tower together: the convolutions run once per group of equal-length chunks (im2col + one matmul, so the weight
helpers of the vision encoders apply), then every linear layer sees the tokens of all chunks at once and attention
is ONE ``vlm_kernels.attention`` call with ``cu_seqlens`` marking the chunks (causal=False), so chunks never attend to
each other. Chunks may be shorter than 3000 frames (Ultravox's encoder accepts that; HF Whisper / Qwen2-Audio
insist on 3000): positions 0..n_pos-1 are used, so a chunk may hold at most 2 x (rows of a.position_embd) frames.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F

import vlm_kernels
from vlm_kernels.quant import QTensor
from vlm.encoders.common import (MediaFacts, MediaPiece, MmprojError, MmprojMismatchError, default_device, fuse_qkv,
                                 load_weights)
from vlm.errors import MediaError
from vlm.gguf import GGUFFile, GGUFKeyError
from vlm.graph import linear
from vlm.preprocess.audio import CHUNK_FRAMES, HOP_LENGTH, log_mel_spectrogram, n_audio_chunks
from vlm.registry import check_tensors, encoder_class

# GGUF keys (gguf-py Keys.Clip / Keys.ClipAudio; llama.cpp clip-impl.h)
KEY_PROJ_TYPE = "clip.projector_type"
KEY_AUDIO_PROJ_TYPE = "clip.audio.projector_type"     # files holding vision + audio
KEY_HAS_AUDIO = "clip.has_audio_encoder"
A = "clip.audio."
KEY_STACK_FACTOR = A + "projector.stack_factor"

SAMPLE_RATE = 16_000          # every Whisper-family projector (llama.cpp hard-codes it per projector type)
CONV_KERNEL = 3
_BLOCK = ("attn_q", "attn_k", "attn_v", "attn_out", "ln1", "ln2", "ffn_up", "ffn_down")
_BLOCK_BIAS = ("attn_q", "attn_v", "attn_out", "ln1", "ln2", "ffn_up", "ffn_down")   # + attn_k (optional)


@dataclass(frozen=True)
class AudioConfig:
    """Audio-tower hyper-parameters from ``clip.audio.*`` (names follow llama.cpp's clip_hparams)."""
    projector_type: str               # "" for a bare Whisper encoder (no projector)
    n_mels: int                       # clip.audio.num_mel_bins (80 or 128)
    n_embd: int
    n_ff: int
    n_layer: int
    n_head: int
    head_dim: int
    eps: float
    projection_dim: int = 0           # text model width the converter saw (informational; tensors decide)
    stack_factor: int = 0             # clip.audio.projector.stack_factor (ultravox)

    @classmethod
    def from_gguf(cls, f: GGUFFile) -> "AudioConfig":
        path = str(f.path)
        if not f.get(KEY_HAS_AUDIO):
            raise MmprojError(f"{path}: this mmproj has no audio encoder ({KEY_HAS_AUDIO} is not true)")
        proj = f.get(KEY_AUDIO_PROJ_TYPE) or f.get(KEY_PROJ_TYPE)
        if not proj:
            raise GGUFKeyError(f"missing metadata key {KEY_PROJ_TYPE!r} (or {KEY_AUDIO_PROJ_TYPE!r}) in {path}")
        n_embd, n_head = int(f.require(A + "embedding_length")), int(f.require(A + "attention.head_count"))
        cfg = cls(projector_type=str(proj), n_mels=int(f.require(A + "num_mel_bins")), n_embd=n_embd,
                  n_ff=int(f.require(A + "feed_forward_length")), n_layer=int(f.require(A + "block_count")),
                  n_head=n_head, head_dim=int(f.get(A + "attention.head_dim", n_embd // max(n_head, 1))),
                  eps=float(f.get(A + "attention.layer_norm_epsilon", 1e-5)),
                  projection_dim=int(f.get(A + "projection_dim", 0)),
                  stack_factor=int(f.get(KEY_STACK_FACTOR, 0)))
        cfg.validate(path)
        return cfg

    def validate(self, path: str) -> None:
        if self.n_head <= 0 or self.head_dim * self.n_head != self.n_embd:
            raise MmprojError(f"{path}: {self.n_head} heads x head_dim {self.head_dim} != audio embedding_length "
                              f"{self.n_embd}")
        if self.n_mels <= 0 or self.n_layer < 0:
            raise MmprojError(f"{path}: bad audio hyper-parameters (num_mel_bins {self.n_mels}, "
                              f"block_count {self.n_layer})")


def whisper_n_pos(n_frames: int) -> int:
    """Encoder positions of a chunk of n_frames mel frames: conv k=3, stride 2, padding 1."""
    return (int(n_frames) - 1) // 2 + 1


def _conv_im2col(x: torch.Tensor, stride: int) -> torch.Tensor:
    """x [B, T, C] (time-major) -> the rows of a k=3, padding-1 Conv1d as a matrix [B·T_out, C·3].

    Column order (c, j) matches a torch Conv1d weight [out, C, 3] flattened to [out, C·3], so the convolution is
    ``linear(cols, w.reshape(out, -1), b)``. T_out = (T - 1) // stride + 1."""
    B, T, C = x.shape
    xp = F.pad(x, (0, 0, 1, 1))                            # one zero frame on each side of the time axis
    cols = xp.unfold(1, CONV_KERNEL, stride)               # [B, T_out, C, 3] (a strided view, no copy yet)
    return cols.reshape(B * cols.shape[1], C * CONV_KERNEL)


class AudioEncoder(MediaFacts):
    """A Whisper encoder (+ a projector in subclasses). Weights keep their GGUF names (``a.blk.0.attn_q.weight``,
    ``mm.a.fc.bias``). Subclasses set PROJECTOR_TYPE and implement ``projector_tensor_names``, ``n_embd_out``,
    ``n_tokens_pos`` and ``project``; this base class alone is the bare encoder (output = post-LN hidden states)."""

    PROJECTOR_TYPE: str = ""
    AVG_POOL: int = 1                 # qwen2a: AvgPool1d(2, 2) after the last layer
    modality = "audio"

    def __init__(self, config: AudioConfig, weights: dict, *, device=None, dtype=None, path: str = "<weights>"):
        self.config = config
        self.device = torch.device(device) if device is not None else default_device()
        self.dtype = dtype or (torch.float32 if self.device.type == "cpu" else torch.bfloat16)
        self.path = path
        check_tensors(weights, self.tensor_names(config)[0], path, f"audio mmproj {config.projector_type or 'whisper'}")
        self.weights = weights
        cfg, D = config, config.n_embd
        self.conv = []
        for i, c_in in ((1, cfg.n_mels), (2, D)):
            w, b = weights[f"a.conv1d.{i}.weight"], weights.get(f"a.conv1d.{i}.bias")
            if isinstance(w, QTensor):    # never quantized by llama.cpp's converter; accept it anyway
                w = w.dequantize(self.dtype)
            if tuple(w.shape) != (D, c_in, CONV_KERNEL):
                raise MmprojError(f"{path}: a.conv1d.{i}.weight has shape {tuple(w.shape)}, expected "
                                  f"[{D}, {c_in}, {CONV_KERNEL}]")
            if b is not None and b.numel() != D:
                raise MmprojError(f"{path}: a.conv1d.{i}.bias has {b.numel()} values, expected {D}")
            # llama.cpp stores the bias as [D, 1] (ggml broadcasting); a torch row vector here
            self.conv.append((w.reshape(D, c_in * CONV_KERNEL).to(self.dtype).contiguous(),
                              None if b is None else b.reshape(D).to(self.dtype)))
        pos = weights["a.position_embd.weight"]
        if pos.dim() != 2 or pos.shape[1] != D:
            raise MmprojError(f"{path}: a.position_embd.weight has shape {tuple(pos.shape)}, expected [n_pos, {D}]")
        self.pos = pos.dequantize(self.dtype) if isinstance(pos, QTensor) else pos.to(self.dtype)
        self.layers = []
        for il in range(cfg.n_layer):
            L = {k[len(f"a.blk.{il}."):]: t for k, t in weights.items() if k.startswith(f"a.blk.{il}.")}
            fuse_qkv(L, weights, f"a.blk.{il}.")     # K has no bias in Whisper: zeros in the fused bias
            self.layers.append(L)

    # ---- per-projector hooks ------------------------------------------------------------------------------
    @classmethod
    def tensor_names(cls, cfg: AudioConfig) -> tuple[list[str], list[str]]:
        """(required, optional) GGUF tensor names: the tower's plus the projector's."""
        req = ["a.conv1d.1.weight", "a.conv1d.2.weight", "a.position_embd.weight"]
        opt = ["a.conv1d.1.bias", "a.conv1d.2.bias", "a.post_ln.weight", "a.post_ln.bias"]
        for il in range(cfg.n_layer):
            req += [f"a.blk.{il}.{t}.weight" for t in _BLOCK] + [f"a.blk.{il}.{t}.bias" for t in _BLOCK_BIAS]
            opt.append(f"a.blk.{il}.attn_k.bias")
        preq, popt = cls.projector_tensor_names(cfg)
        return req + preq, opt + popt

    @classmethod
    def projector_tensor_names(cls, cfg: AudioConfig) -> tuple[list[str], list[str]]:
        return [], []

    @property
    def n_embd_out(self) -> int:
        """Width of the audio embeddings (the text model's n_embd for a projector; n_embd for the bare tower)."""
        return self.config.n_embd

    def n_tokens_pos(self, n_pos: int) -> int:
        """Output tokens of a chunk whose encoder has n_pos positions."""
        return n_pos // self.AVG_POOL

    def project(self, x: torch.Tensor, lens: list[int]) -> tuple[torch.Tensor, list[int]]:
        """x [sum(lens), n_embd] (post-LN encoder output, chunks packed) -> ([n_out, n_embd_out], per-chunk lens)."""
        return x, lens

    # ---- queries ------------------------------------------------------------------------------------------
    @property
    def n_mels(self) -> int:
        return self.config.n_mels

    @property
    def sample_rate(self) -> int:
        return SAMPLE_RATE

    @property
    def max_frames(self) -> int:
        """Longest chunk (mel frames) the position table covers: 3000 for every released Whisper-family model."""
        return 2 * int(self.pos.shape[0])

    def n_tokens(self, n_frames: int = CHUNK_FRAMES) -> int:
        """Tokens one chunk of n_frames log-mel frames becomes (computable without samples): ultravox 188 and
        qwen2a 750 for a full 30 s chunk."""
        n = int(n_frames)
        if isinstance(n_frames, bool) or n < 1:
            raise MmprojError(f"a chunk needs at least 1 mel frame, got {n_frames!r}")
        if n > self.max_frames:
            raise MmprojError(f"{self.path}: a chunk of {n} mel frames needs {whisper_n_pos(n)} encoder positions; "
                              f"a.position_embd has {self.pos.shape[0]} (at most {self.max_frames} frames per chunk: "
                              f"split longer audio into 30 s chunks)")
        n_pos = whisper_n_pos(n)
        if n_pos < self.AVG_POOL:
            raise MmprojError(f"{self.path}: a chunk of {n} mel frame(s) is too short for the "
                              f"{self.config.projector_type} projector (needs >= {2 * self.AVG_POOL - 1} frames)")
        return self.n_tokens_pos(n_pos)

    # ---- media facts (what vlm.mtmd asks) ----------------------------------------------------------------
    @property
    def window_frames(self) -> int:
        """Mel frames per audio window: 30 s (3000), fewer when the position table is shorter (tiny encoders)."""
        return min(CHUNK_FRAMES, int(self.max_frames))

    def n_windows(self, n_samples: int, *, mode: str) -> int:
        """Windows a clip of n_samples (16 kHz) is cut into (30 s windows as HF / llama.cpp count them)."""
        wf = self.window_frames
        if wf >= CHUNK_FRAMES:
            return n_audio_chunks(n_samples, mode)
        return -(-int(n_samples) // (wf * HOP_LENGTH))

    def audio_layout(self, n_samples: int, *, mode: str, name: str) -> list:
        """Strings and pieces (one per window) of one clip in the prompt."""
        n_win = self.n_windows(n_samples, mode=mode)
        if n_win < 1:
            raise MediaError(f"{name}: audio of {n_samples} samples gives no complete window")
        n = self.n_tokens(self.window_frames)
        return self.wrap([MediaPiece(n, n, part=i) for i in range(n_win)])

    def mel_windows(self, pcm, *, mode: str) -> list[torch.Tensor]:
        """Log-mel input of each window of one clip (mono float32 PCM at 16 kHz)."""
        wf = self.window_frames
        if wf >= CHUNK_FRAMES:
            return list(log_mel_spectrogram(pcm, self.n_mels, mode=mode).unbind(0))
        # short position table (tiny test encoders): windows of wf frames, each its own log-mel
        step = wf * HOP_LENGTH
        return [log_mel_spectrogram(pcm[i:i + step], self.n_mels, mode=mode)[0, :, :wf]
                for i in range(0, len(pcm), step)]

    def preprocess_params(self, mode: str) -> tuple:
        """Everything the encoder input depends on (part of the embedding-cache key)."""
        return ("audio", mode, self.window_frames)

    def check_compatible(self, n_embd_text: int, text_name: str = "the text model") -> None:
        """Raise MmprojMismatchError unless the audio embeddings are as wide as the text model's embeddings."""
        if int(n_embd_text) != self.n_embd_out:
            raise MmprojMismatchError(
                f"{self.path}: mmproj ({self.config.projector_type or 'whisper'}) produces audio embeddings of width "
                f"{self.n_embd_out}, but {text_name} has n_embd = {int(n_embd_text)}: this mmproj does not belong "
                f"to this text model")

    # ---- loading ------------------------------------------------------------------------------------------
    @classmethod
    def from_weights(cls, config: AudioConfig, weights: dict, *, device=None, dtype=None,
                     path: str = "<weights>") -> "AudioEncoder":
        """Build from float tensors under GGUF names (e.g. vlm.convert.ctranslate2): norm vectors become fp32,
        everything else `dtype`, all on `device` (the same placement as GGUF loading)."""
        device = torch.device(device) if device is not None else default_device()
        dtype = dtype or (torch.float32 if device.type == "cpu" else torch.bfloat16)
        placed = {}
        for n, t in weights.items():
            if isinstance(t, QTensor):
                placed[n] = t.to(device) if device.type != "cpu" else t
                continue
            norm = t.dim() == 1 and any(s in n for s in ("ln", "norm"))
            placed[n] = t.to(device=device, dtype=torch.float32 if norm else dtype)
        return cls(config, placed, device=device, dtype=dtype, path=path)

    @classmethod
    def from_gguf(cls, f: GGUFFile, *, device=None, dtype=None) -> "AudioEncoder":
        cfg = AudioConfig.from_gguf(f)
        weights, device, dtype = load_weights(cls, f, cfg, device, dtype, "audio mmproj")
        return cls(cfg, weights, device=device, dtype=dtype, path=str(f.path))

    # ---- encoding -----------------------------------------------------------------------------------------
    def _as_chunks(self, mel) -> list[torch.Tensor]:
        if isinstance(mel, torch.Tensor):
            if mel.dim() == 2:
                raise MmprojError(f"encode() takes a [n_chunks, n_mels, n_frames] tensor or a list of [n_mels, "
                                  f"n_frames] chunks, got one tensor of shape {tuple(mel.shape)}: wrap it in a list")
            if mel.dim() != 3:
                raise MmprojError(f"encode() takes [n_chunks, n_mels, n_frames] log-mel features, got shape "
                                  f"{tuple(mel.shape)}")
            chunks = list(mel.unbind(0))
        elif isinstance(mel, Sequence) and not isinstance(mel, (str, bytes)):
            chunks = list(mel)
        else:
            raise MmprojError(f"encode() takes log-mel features (a tensor or a list of tensors), got "
                              f"{type(mel).__name__}")
        if not chunks:
            raise MmprojError("encode() got no audio chunks")
        if isinstance(mel, torch.Tensor) and mel.is_floating_point() and mel.shape[1] == self.n_mels:
            # one batched tensor: one finiteness check (one host sync) instead of one per chunk
            if not bool(torch.isfinite(mel).all()):
                bad = int((~torch.isfinite(mel)).flatten(1).any(1).nonzero()[0, 0])
                raise MmprojError(f"chunk {bad} contains NaN or Inf log-mel values")
            self.n_tokens(mel.shape[2])
            return chunks
        for i, c in enumerate(chunks):
            if not isinstance(c, torch.Tensor):
                raise MmprojError(f"chunk {i} is a {type(c).__name__}, expected a torch.Tensor [n_mels, n_frames]")
            if c.dim() != 2 or c.shape[0] != self.n_mels:
                raise MmprojError(f"chunk {i} has shape {tuple(c.shape)}, expected [{self.n_mels}, n_frames] "
                                  f"(clip.audio.num_mel_bins = {self.n_mels})")
            if not c.is_floating_point():
                raise MmprojError(f"chunk {i} has dtype {c.dtype}; expected float log-mel features")
            if not bool(torch.isfinite(c).all()):
                raise MmprojError(f"chunk {i} contains NaN or Inf log-mel values")
            self.n_tokens(c.shape[1])       # length checks with their messages
        return chunks

    def tap(self, name: str, layer: int, t: torch.Tensor) -> None:
        hook = getattr(self, "tap_hook", None)
        if hook is not None:
            hook(name, layer, t)

    def _stem(self, mels: torch.Tensor) -> torch.Tensor:
        """mels [B, n_mels, T] -> conv stem + positions, [B, n_pos, n_embd]."""
        B = mels.shape[0]
        (w1, b1), (w2, b2) = self.conv
        x = mels.transpose(1, 2)                                                 # [B, T, n_mels]
        x = F.gelu(linear(_conv_im2col(x, 1), w1, b1)).view(B, x.shape[1], -1)   # [B, T, D]
        n_pos = whisper_n_pos(x.shape[1])
        x = F.gelu(linear(_conv_im2col(x, 2), w2, b2)).view(B, n_pos, -1)       # [B, n_pos, D]
        return x + self.pos[:n_pos]

    def forward_tower(self, chunks: list[torch.Tensor]) -> tuple[torch.Tensor, list[int]]:
        """Encoder (+ avg-pool) + post-LN over every chunk -> (packed [sum(lens), n_embd], per-chunk lens)."""
        cfg, w, D, eps = self.config, self.weights, self.config.n_embd, self.config.eps
        groups: dict[int, list[int]] = {}
        for i, c in enumerate(chunks):
            groups.setdefault(int(c.shape[1]), []).append(i)
        per_chunk: list[torch.Tensor | None] = [None] * len(chunks)
        for _, idx in groups.items():
            mels = torch.stack([chunks[i] for i in idx]).to(device=self.device, dtype=self.dtype)
            for j, e in zip(idx, self._stem(mels).unbind(0)):
                per_chunk[j] = e
        lens = [int(e.shape[0]) for e in per_chunk]
        x = torch.cat(per_chunk) if len(per_chunk) > 1 else per_chunk[0]
        cu = torch.zeros(len(lens) + 1, dtype=torch.int32)
        cu[1:] = torch.cumsum(torch.tensor(lens, dtype=torch.int32), 0)
        cu = cu.to(x.device)
        n_tok = x.shape[0]
        self.tap("inp_embd", -1, x)

        for il, L in enumerate(self.layers):
            h = vlm_kernels.layer_norm(x, L["ln1.weight"], L["ln1.bias"], eps)
            if "qkv.weight" in L:
                q, k, v = linear(h, L["qkv.weight"], L["qkv.bias"]).split(D, dim=-1)
            else:
                q = linear(h, L["attn_q.weight"], L["attn_q.bias"])
                k = linear(h, L["attn_k.weight"], L.get("attn_k.bias"))
                v = linear(h, L["attn_v.weight"], L["attn_v.bias"])
            shape = (n_tok, cfg.n_head, cfg.head_dim)
            a = vlm_kernels.attention(q.reshape(shape), k.reshape(shape), v.reshape(shape), causal=False,
                                  cu_seqlens_q=cu, cu_seqlens_k=cu)
            a = linear(a.reshape(n_tok, D), L["attn_out.weight"], L["attn_out.bias"])
            h, x = vlm_kernels.layer_norm(a, L["ln2.weight"], L["ln2.bias"], eps, residual=x)   # x += attention
            x = x + linear(F.gelu(linear(h, L["ffn_up.weight"], L["ffn_up.bias"])),
                           L["ffn_down.weight"], L["ffn_down.bias"])
            self.tap("layer_out", il, x)

        if self.AVG_POOL > 1:
            x, lens = self._avg_pool(x, lens)
        if "a.post_ln.weight" in w:
            x = vlm_kernels.layer_norm(x.contiguous(), w["a.post_ln.weight"], w.get("a.post_ln.bias"), eps)
        self.tap("encoder_out", -1, x)
        return x, lens

    def _avg_pool(self, x: torch.Tensor, lens: list[int]) -> tuple[torch.Tensor, list[int]]:
        """AvgPool1d(k, stride k) along time within each chunk (a trailing incomplete window is dropped)."""
        k = self.AVG_POOL
        if all(n % k == 0 for n in lens):       # windows never straddle two chunks: one reshape for all
            return x.view(-1, k, x.shape[-1]).mean(1), [n // k for n in lens]
        out, row = [], 0
        for n in lens:
            m = n // k
            out.append(x[row:row + m * k].view(m, k, -1).mean(1))
            row += n
        return torch.cat(out), [n // k for n in lens]

    @torch.inference_mode()
    def encode(self, mel) -> list[torch.Tensor]:
        """Audio embeddings, one [n_tokens(n_frames_i), n_embd_out] tensor per chunk (input order, dtype
        ``self.dtype``, on ``self.device``). mel: [n_chunks, n_mels, n_frames] or a list of [n_mels, n_frames_i]
        float tensors (log-mel from vlm.preprocess.audio)."""
        chunks = self._as_chunks(mel)
        x, lens = self.forward_tower(chunks)
        y, lens_out = self.project(x, lens)
        return list(y.split(lens_out))


def load_audio_encoder(source, *, device=None, dtype=None) -> AudioEncoder:
    """Open an audio mmproj GGUF (path or :class:`GGUFFile`) and build the encoder its projector type names
    (``clip.audio.projector_type``, else ``clip.projector_type``) through :mod:`vlm.registry`.

    Raises UnsupportedArchError (unknown projector type), MissingTensorsError, GGUFKeyError or MmprojError (no
    audio encoder in the file, or a vision projector type)."""
    f = source if isinstance(source, GGUFFile) else GGUFFile(os.fspath(source))
    try:
        cfg = AudioConfig.from_gguf(f)
        cls = encoder_class(cfg.projector_type, str(f.path))
        if not (isinstance(cls, type) and issubclass(cls, AudioEncoder)):
            raise MmprojError(f"{f.path}: projector type {cfg.projector_type!r} is a vision projector, not an "
                              f"audio one")
        return cls.from_gguf(f, device=device, dtype=dtype)
    finally:
        if f is not source:
            f.close()
