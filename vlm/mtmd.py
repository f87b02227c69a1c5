"""Media API (llama.cpp's libmtmd, in Python): bitmaps -> chunks -> embeddings -> the KV cache.

    from vlm import mtmd
    model = vlm.load("text.gguf", mmproj="mmproj.gguf")
    bmp = mtmd.Bitmap.from_file("cat.png")                    # or from_bytes / from_array (image or audio) /
                                                               # from_video (frames, directory, animated GIF)
    chunks = mtmd.tokenize(model, "USER: <__media__>\\nWhat is this?", [bmp])
    [(c.type, c.n_tokens) for c in chunks]                    # text / image / audio, counted without pixels
    emb = mtmd.encode(model, chunks[1])                        # [n_tokens, n_embd]
    n_past = mtmd.eval_chunks(model, chunks, n_past=0, seq_id=0)
    logits = mtmd.context(model).last_logits                  # of the last row

Chunks: the text is split on the media marker (default ``<__media__>``); #markers must equal #bitmaps. Each
bitmap becomes one or more media chunks with the projector's begin/end strings merged into the neighbouring
text chunks (reference §1-§2): gemma3 ``<start_of_image>``...``<end_of_image>`` (non-causal in the decoder);
idefics3 rows of ``<fake_token_around_image><row_R_col_C>`` + tile, ``\\n`` after each row, then
``\\n<fake_token_around_image><global-img>`` + overview + ``<fake_token_around_image>`` (HF Idefics3Processor); mlp /
ldp / ldpv2 / ultravox none; qwen2a ``<|audio_bos|>``...``<|audio_eos|>``. Long audio gives one AUDIO chunk per
window (30 s; shorter when the encoder's position table is shorter). Text pieces are tokenized without BOS;
``add_special`` prepends BOS to the first chunk as the vocabulary says. A video bitmap (Qwen2-VL / 2.5-VL only) is
one VIDEO chunk between the vision markers, its frame pairs as temporal slots (vlm.mtmd_video).

Encoding goes through the context's :class:`~vlm.mtmd_cache.EmbeddingCache` (key: mmproj identity + media hash +
preprocessing parameters); uncached images of one call are preprocessed in a thread pool and encoded together.
:func:`eval_chunks` evaluates text with ``Batch.add_text`` and media with ``Batch.add_embd`` (a non-causal chunk as
one batch); on any error the KV cache and the session are restored. Chat / ``Model.generate(images=, audio=)``
glue lives in :mod:`vlm.mtmd_chat`.
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch

from vlm.batch import Batch
from vlm.kv_cache import ContextFullError
from vlm.mtmd_cache import DEFAULT_CACHE_BYTES, EmbeddingCache, encoder_identity
from vlm.preprocess import image as pimg

MEDIA_MARKER = "<__media__>"
NON_CAUSAL_PROJECTORS = {"gemma3"}
# (begin, end) strings around one image / audio, per projector type (idefics3 has its own tile layout)
MEDIA_BEGIN_END = {"gemma3": ("<start_of_image>", "<end_of_image>"), "qwen2a": ("<|audio_bos|>", "<|audio_eos|>"),
                   "qwen2vl_merger": ("<|vision_start|>", "<|vision_end|>"),
                   "qwen2.5vl_merger": ("<|vision_start|>", "<|vision_end|>")}
IDEFICS3_FAKE, IDEFICS3_GLOBAL = "<fake_token_around_image>", "<global-img>"
_AUDIO_MAGIC = (b"RIFF", b"fLaC", b"OggS", b"ID3", b"\xff\xfb", b"\xff\xf3", b"\xff\xf2", b"FORM")


class MediaError(ValueError):
    """A media request this engine cannot serve (message names the problem)."""


class MarkerMismatchError(MediaError):
    """The number of media markers in the text differs from the number of bitmaps."""


# ---------------------------------------------------------------------------------------------------------- bitmaps
@dataclass(eq=False)
class Bitmap:
    """One image, audio clip or video. `id` = SHA-256 (hex) of the bytes it came from (file bytes, the raw array;
    for a video its frames' ids, fps and frame policy).

    image: `data` holds the encoded file (decoded lazily, at encode time) or `array` an [H, W, 3|4|1] uint8 array.
    audio: `array` holds mono float32 PCM at 16 kHz (decoded and resampled at construction).
    video: `frames` holds one image Bitmap per frame, `fps` their rate (Bitmap.from_video; vlm.mtmd_video).
    """
    kind: str                          # "image" | "audio" | "video"
    id: str
    data: bytes | None = None
    array: np.ndarray | None = None
    name: str = ""
    frames: list | None = None
    fps: float = 0.0
    frame_policy: str = "error"
    pixel_limits: tuple = (None, None)   # a video's (min_pixels, max_pixels) per frame; None: the image defaults
    _sizes: dict = field(default_factory=dict, repr=False)

    @staticmethod
    def _sniff(data: bytes) -> str:
        if data[:4] == b"RIFF" and data[8:12] != b"WAVE":
            return "image"             # RIFF but not WAVE: WebP
        return "audio" if data.startswith(_AUDIO_MAGIC) else "image"

    @classmethod
    def from_bytes(cls, data, kind: str | None = None, *, name: str = "<bytes>") -> "Bitmap":
        data = bytes(data)
        if not data:
            raise MediaError(f"{name}: empty media data (0 bytes)")
        kind = kind or cls._sniff(data)
        bid = hashlib.sha256(data).hexdigest()
        if kind == "image":
            return cls("image", bid, data=data, name=name)
        if kind == "audio":
            from vlm.preprocess.audio_decode import load_audio
            return cls("audio", bid, array=load_audio(data), name=name)
        if kind == "video":
            return cls.from_video(data, name=name)
        raise MediaError(f"kind must be 'image', 'audio' or 'video', got {kind!r}")

    @classmethod
    def from_file(cls, path, kind: str | None = None) -> "Bitmap":
        path = os.fspath(path)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"media file not found: {path}")
        with open(path, "rb") as f:
            return cls.from_bytes(f.read(), kind, name=path)

    @classmethod
    def from_array(cls, arr, kind: str | None = None, *, sample_rate: int = 16_000, name: str = "<array>") -> "Bitmap":
        """uint8 [H, W] / [H, W, C] -> image; uint8 [T, H, W, C] -> video (at 2 fps; from_video sets the rate);
        float (or 1-D) PCM -> audio at `sample_rate` (resampled to 16 kHz)."""
        if isinstance(arr, torch.Tensor):
            arr = arr.detach().cpu().numpy()
        arr = np.asarray(arr)
        if kind == "video" or (kind is None and arr.dtype == np.uint8 and arr.ndim == 4):
            return cls.from_video(arr, name=name)
        kind = kind or ("image" if arr.dtype == np.uint8 and arr.ndim in (2, 3) else "audio")
        raw = np.ascontiguousarray(arr)
        h = hashlib.sha256(f"{kind}:{raw.dtype.str}:{raw.shape}:{sample_rate}:".encode())
        h.update(raw.tobytes())
        if kind == "image":
            pimg.image_size(raw, max_pixels=None)           # shape / emptiness checks
            return cls("image", h.hexdigest(), array=raw, name=name)
        if kind == "audio":
            from vlm.preprocess.audio_decode import decode_pcm
            return cls("audio", h.hexdigest(), array=decode_pcm(raw, sample_rate), name=name)
        raise MediaError(f"kind must be 'image' or 'audio', got {kind!r}")

    @classmethod
    def from_video(cls, source, *, fps: float | None = None, sample_fps: float | None = None,
                   max_frames: int | None = None, frame_policy: str = "error", name: str | None = None,
                   min_pixels: int | None = None, max_pixels: int | None = None) -> "Bitmap":
        """A video: a list of frames (paths, bytes, arrays, PIL images), a [T, H, W, C] uint8 array, a directory of
        images or an animated GIF / WebP / PNG; see vlm.preprocess.video.load_video for fps / sample_fps.
        min_pixels / max_pixels bound each resized frame (default: the Qwen image limits)."""
        from vlm.mtmd_video import video_bitmap
        from vlm.preprocess.video import DEFAULT_MAX_FRAMES
        return video_bitmap(cls, source, fps=fps, sample_fps=sample_fps, max_frames=max_frames or DEFAULT_MAX_FRAMES,
                            frame_policy=frame_policy, name=name, min_pixels=min_pixels, max_pixels=max_pixels)

    @classmethod
    def of(cls, source, kind: str | None = None) -> "Bitmap":
        """A Bitmap from whatever a user passed: a Bitmap, a path, bytes, or an array (kind "video": anything
        from_video takes)."""
        if isinstance(source, Bitmap):
            if kind and source.kind != kind:
                raise MediaError(f"{source.name}: expected {kind} media, got {source.kind}")
            return source
        if kind == "video":
            return cls.from_video(source)
        if isinstance(source, (str, os.PathLike)):
            return cls.from_file(source, kind)
        if isinstance(source, (bytes, bytearray, memoryview)):
            return cls.from_bytes(source, kind)
        if isinstance(source, (np.ndarray, torch.Tensor)):
            return cls.from_array(source, kind)
        raise MediaError(f"unsupported media source {type(source).__name__}: give a path, bytes, an array or a "
                         f"vlm.mtmd.Bitmap")

    @property
    def source(self):
        return self.data if self.data is not None else self.array

    def image_hw(self, mode: str, max_pixels: int | None) -> tuple[int, int]:
        """(height, width) as decoding will give it, from the header only (bomb / 0x0 checks included)."""
        key = (mode, max_pixels)
        if key not in self._sizes:
            self._sizes[key] = pimg.image_size(self.source, mode=mode, max_pixels=max_pixels)
        return self._sizes[key]

    @property
    def n_samples(self) -> int:
        return int(self.array.shape[0]) if self.kind == "audio" else 0


# ---------------------------------------------------------------------------------------------------------- chunks
@dataclass
class Chunk:
    """TEXT (token ids) or one IMAGE / AUDIO / VIDEO piece: a whole image, one tile or overview, one audio window,
    or a whole video (n_frames temporal slots spaced time_interval positions apart)."""
    type: str                           # "text" | "image" | "audio" | "video"
    n_tokens: int
    n_pos: int
    tokens: list[int] | None = None
    bitmap: Bitmap | None = None
    part: int = 0                       # index into the bitmap's list of embeddings
    non_causal: bool = False
    hw: tuple[int, int] | None = None   # preprocessed (height, width) of an M-RoPE image (its position grid)
    n_frames: int = 1                   # temporal slots of an M-RoPE video
    time_interval: float = 1.0          # temporal position step between slots (vlm.mtmd_video)

    @property
    def id(self) -> str:
        return f"{self.bitmap.id}:{self.part}" if self.bitmap is not None else ""

    def row_keys(self) -> list:
        """One hashable per row: the token id, or (media id, row) — for prefix reuse across calls."""
        if self.type == "text":
            return list(self.tokens)
        return [(self.id, i) for i in range(self.n_tokens)]


def n_tokens(chunks: Sequence[Chunk]) -> int:
    return sum(c.n_tokens for c in chunks)


def n_pos(chunks: Sequence[Chunk]) -> int:
    return sum(c.n_pos for c in chunks)


# ---------------------------------------------------------------------------------------------------------- context
class MtmdContext:
    """The model's media state: encoders, marker, preprocessing mode, embedding cache and last logits."""

    def __init__(self, model, *, media_marker: str = MEDIA_MARKER, image_mode: str = "hf",
                 max_pixels: int | None = pimg.DEFAULT_MAX_PIXELS, cache_bytes: int = DEFAULT_CACHE_BYTES,
                 audio_mode: str = "hf"):
        if not isinstance(media_marker, str) or not media_marker:
            raise MediaError(f"media_marker must be a non-empty string, got {media_marker!r}")
        if image_mode not in pimg.MODES or audio_mode not in pimg.MODES:
            raise MediaError(f"image_mode / audio_mode must be one of {pimg.MODES}, got {image_mode!r} / "
                             f"{audio_mode!r}")
        self.model = model
        self.vision = getattr(model, "mmproj", None)
        self.audio = getattr(model, "audio_encoder", None)
        self.media_marker = media_marker
        self.image_mode, self.audio_mode = image_mode, audio_mode
        self.max_pixels = max_pixels
        self.cache = EmbeddingCache(cache_bytes)
        self.last_logits: torch.Tensor | None = None
        self.n_encoded = 0                               # bitmaps run through an encoder (cache misses)
        self.sessions: dict[int, tuple[list, torch.Tensor | None]] = {}   # seq -> (row keys, fingerprint)
        self._ids = {}

    # ---- per-projector facts --------------------------------------------------------------------------------
    def _enc(self, kind: str):
        enc = self.audio if kind == "audio" else self.vision
        if enc is None:
            what = "audio" if kind == "audio" else "vision"
            raise MediaError(f"this model has no {what} encoder: load it with an mmproj that has one "
                             f"(vlm.load(text, mmproj=...)) to use {kind} input")
        return enc

    def _identity(self, enc) -> str:
        if id(enc) not in self._ids:
            self._ids[id(enc)] = encoder_identity(enc)
        return self._ids[id(enc)]

    def image_params(self) -> tuple:
        """Preprocessing parameters of the vision encoder (part of the cache key)."""
        cfg = self._enc("image").config
        pre = cfg.preproc_image_size or cfg.image_size
        return (cfg.projector_type, self.image_mode, cfg.image_size, tuple(cfg.image_mean), tuple(cfg.image_std), pre)

    def audio_window_frames(self) -> int:
        from vlm.preprocess.audio import CHUNK_FRAMES
        return min(CHUNK_FRAMES, int(self._enc("audio").max_frames))

    def _image_layout(self, bmp: Bitmap) -> list:
        """[str | Chunk ...] for one image: begin/end text and media chunks, counted from the header."""
        enc = self._enc("image")
        cfg = enc.config
        proj, S = cfg.projector_type, cfg.image_size
        h, w = bmp.image_hw(self.image_mode, self.max_pixels)
        beg, end = MEDIA_BEGIN_END.get(proj, ("", ""))
        if getattr(enc, "uses_mrope", False):       # dynamic resolution (Qwen2-VL): n_pos = max(rows, cols)
            from vlm.preprocess.qwen_image import qwen2vl_resized_size
            rh, rw = qwen2vl_resized_size(h, w, patch_size=cfg.patch_size, mode=self.image_mode)
            return [beg, Chunk("image", enc.n_tokens(rh, rw), enc.n_pos(rh, rw), bitmap=bmp, hw=(rh, rw)), end]
        n = enc.n_tokens(S, S)
        nc = proj in NON_CAUSAL_PROJECTORS
        if proj == "idefics3":
            from vlm.preprocess.tiling import idefics3_grid
            rows, cols = idefics3_grid(h, w, longest_edge=cfg.preproc_image_size or S, tile_size=S,
                                       mode=self.image_mode)
            out, part = [], 0
            for r in range(rows):
                for c in range(cols):
                    out += [f"{IDEFICS3_FAKE}<row_{r + 1}_col_{c + 1}>", Chunk("image", n, n, bitmap=bmp, part=part)]
                    part += 1
                out.append("\n")
            out += [("\n" if rows else "") + IDEFICS3_FAKE + IDEFICS3_GLOBAL,
                    Chunk("image", n, n, bitmap=bmp, part=part), IDEFICS3_FAKE]
            return out
        return [beg, Chunk("image", n, n, bitmap=bmp, non_causal=nc), end]

    def _audio_windows(self, n_samples: int) -> int:
        from vlm.preprocess.audio import HOP_LENGTH, n_audio_chunks
        wf = self.audio_window_frames()
        if wf >= 3000:
            return n_audio_chunks(n_samples, self.audio_mode)
        return -(-n_samples // (wf * HOP_LENGTH))

    def _audio_layout(self, bmp: Bitmap) -> list:
        enc = self._enc("audio")
        n_win = self._audio_windows(bmp.n_samples)
        if n_win < 1:
            raise MediaError(f"{bmp.name}: audio of {bmp.n_samples} samples gives no complete window")
        n = enc.n_tokens(self.audio_window_frames())
        beg, end = MEDIA_BEGIN_END.get(enc.config.projector_type, ("", ""))
        return [beg, *[Chunk("audio", n, n, bitmap=bmp, part=i) for i in range(n_win)], end]

    # ---- tokenize --------------------------------------------------------------------------------------------
    def tokenize(self, text: str, bitmaps: Sequence = (), *, add_special: bool = True,
                 parse_special: bool = True) -> list[Chunk]:
        if not isinstance(text, str):
            raise TypeError(f"tokenize: text must be a str, got {type(text).__name__}")
        bitmaps = [Bitmap.of(b) for b in bitmaps]
        parts = text.split(self.media_marker)
        if len(parts) - 1 != len(bitmaps):
            raise MarkerMismatchError(f"the text has {len(parts) - 1} media marker(s) {self.media_marker!r} but "
                                      f"{len(bitmaps)} bitmap(s) were given: put one marker where each goes")
        tok = self.model.tokenizer
        chunks: list[Chunk] = []
        pending: list[int] = []

        def text_ids(s: str, special: bool) -> list[int]:
            return list(tok.encode(s, add_special=False, parse_special=special)) if s else []

        for i, part in enumerate(parts):
            pending += text_ids(part, parse_special)
            if i == len(bitmaps):
                break
            b = bitmaps[i]
            if b.kind == "video":
                from vlm.mtmd_video import video_layout
                layout = video_layout(self, b)
            else:
                layout = self._image_layout(b) if b.kind == "image" else self._audio_layout(b)
            for item in layout:
                if isinstance(item, str):
                    pending += text_ids(item, True)      # begin/end strings: always special
                else:
                    if pending:
                        chunks.append(Chunk("text", len(pending), len(pending), tokens=pending))
                        pending = []
                    chunks.append(item)
        if pending:
            chunks.append(Chunk("text", len(pending), len(pending), tokens=pending))
        if add_special:
            self._add_special(chunks)
        return chunks

    def _add_special(self, chunks: list[Chunk]) -> None:
        tok = self.model.tokenizer
        if getattr(tok, "add_bos", False) and tok.bos_id is not None:
            if chunks and chunks[0].type == "text":
                if not chunks[0].tokens or chunks[0].tokens[0] != tok.bos_id:
                    chunks[0] = Chunk("text", chunks[0].n_tokens + 1, chunks[0].n_pos + 1,
                                      tokens=[tok.bos_id] + chunks[0].tokens)
            else:
                chunks.insert(0, Chunk("text", 1, 1, tokens=[tok.bos_id]))
        if getattr(tok, "add_eos", False) and tok.eos_id is not None:
            if chunks and chunks[-1].type == "text":
                c = chunks[-1]
                chunks[-1] = Chunk("text", c.n_tokens + 1, c.n_pos + 1, tokens=c.tokens + [tok.eos_id])
            else:
                chunks.append(Chunk("text", 1, 1, tokens=[tok.eos_id]))

    # ---- encode ----------------------------------------------------------------------------------------------
    def _key(self, bmp: Bitmap) -> tuple:
        if bmp.kind in ("image", "video"):
            return (self._identity(self._enc("image")), bmp.id, self.image_params(), self.max_pixels)
        return (self._identity(self._enc("audio")), bmp.id, ("audio", self.audio_mode, self.audio_window_frames()))

    def _preprocess_image(self, bmp: Bitmap) -> list:
        """The encoder inputs one bitmap becomes: [3, S, S] tensors (one per tile), or Qwen patches."""
        from vlm.preprocess import tiling
        enc = self._enc("image")
        cfg = enc.config
        proj, S, mode = cfg.projector_type, cfg.image_size, self.image_mode
        src = bmp.source
        if bmp.data is not None:     # decode once here, with the configured pixel limit
            src = pimg.decode_image(src, mode=mode, max_pixels=self.max_pixels)
        kw = dict(mean=cfg.image_mean, std=cfg.image_std, mode=mode)
        if getattr(enc, "uses_mrope", False):
            from vlm.preprocess.qwen_image import preprocess_qwen2vl
            return [preprocess_qwen2vl(src, patch_size=cfg.patch_size, **kw)]
        if proj == "idefics3":
            out = list(tiling.preprocess_idefics3(src, longest_edge=cfg.preproc_image_size or S, tile_size=S,
                                                  **kw).pixel_values)
        elif proj == "gemma3":
            out = [pimg.preprocess_gemma3(src, size=S, **kw)]
        else:
            out = [pimg.preprocess_clip(src, shortest_edge=S, crop_size=S, **kw)]
        return [torch.from_numpy(np.ascontiguousarray(p)) for p in out]

    def _mel_windows(self, bmp: Bitmap) -> list[torch.Tensor]:
        from vlm.preprocess.audio import HOP_LENGTH, log_mel_spectrogram
        enc = self._enc("audio")
        wf = self.audio_window_frames()
        pcm = bmp.array
        if wf >= 3000:
            return list(log_mel_spectrogram(pcm, enc.n_mels, mode=self.audio_mode).unbind(0))
        # short position table (tiny test encoders): windows of wf frames, each its own log-mel
        step = wf * HOP_LENGTH
        return [log_mel_spectrogram(pcm[i:i + step], enc.n_mels, mode=self.audio_mode)[0, :, :wf]
                for i in range(0, len(pcm), step)]

    def embed_bitmaps(self, bitmaps: Sequence[Bitmap]) -> dict[str, list[torch.Tensor]]:
        """bitmap id -> its list of embeddings; cache misses of one kind are encoded together in one call."""
        out, todo = {}, {"image": [], "audio": [], "video": []}
        for b in bitmaps:
            if b.id in out or any(b.id == t.id for t in todo[b.kind]):
                continue
            hit = self.cache.get(self._key(b))
            if hit is not None:
                out[b.id] = hit
            else:
                todo[b.kind].append(b)
        if todo["image"]:
            pix = pimg.preprocess_batch(todo["image"], fn=self._preprocess_image)
            flat = [p for ps in pix for p in ps]
            embs = self._enc("image").encode(flat)
            self._store(todo["image"], [len(ps) for ps in pix], embs, out)
        if todo["video"]:
            from vlm.mtmd_video import preprocess_video
            vids = pimg.preprocess_batch(todo["video"], fn=lambda b: preprocess_video(self, b))
            self._store(todo["video"], [1] * len(vids), self._enc("video").encode(vids), out)
        if todo["audio"]:
            mels = [self._mel_windows(b) for b in todo["audio"]]
            embs = self._enc("audio").encode([m for ms in mels for m in ms])
            self._store(todo["audio"], [len(ms) for ms in mels], embs, out)
        return out

    def _store(self, bmps, counts, embs, out) -> None:
        i = 0
        for b, n in zip(bmps, counts):
            out[b.id] = list(embs[i:i + n])
            self.cache.put(self._key(b), out[b.id])
            self.n_encoded += 1
            i += n

    def encode(self, chunk: Chunk) -> torch.Tensor:
        """Embeddings of one media chunk, [n_tokens, n_embd]."""
        if chunk.type == "text":
            raise MediaError("encode() takes an image, audio or video chunk, got a text chunk")
        embs = self.embed_bitmaps([chunk.bitmap])[chunk.bitmap.id]
        if chunk.part >= len(embs):
            raise MediaError(f"{chunk.bitmap.name}: chunk part {chunk.part} but the media gave {len(embs)} piece(s)")
        e = embs[chunk.part]
        if e.shape[0] != chunk.n_tokens:
            raise MediaError(f"{chunk.bitmap.name}: counted {chunk.n_tokens} tokens but the encoder gave "
                             f"{e.shape[0]} (preprocessing and token counting disagree)")
        return e

    # ---- evaluation ------------------------------------------------------------------------------------------
    def eval_chunks(self, chunks: Sequence[Chunk], n_past: int | None = None, seq_id: int = 0,
                    n_batch: int | None = None, logits_last: bool = True, embeddings: dict | None = None) -> int:
        """Evaluate `chunks` into the KV cache of `seq_id` from position n_past (default: the sequence's next);
        returns the new n_past. The last row's logits land in ``self.last_logits``. Every media chunk is encoded
        before anything is written; on any error the cache and the session are as before the call."""
        model = self.model
        kv = model.kv
        n_batch = n_batch or model.n_batch
        n_past = kv.n_past(seq_id) if n_past is None else int(n_past)
        need = n_tokens(chunks)
        if not chunks or need == 0:
            raise MediaError("eval_chunks: no chunks to evaluate")
        if kv.seq_len(seq_id) + need > kv.n_ctx:
            raise ContextFullError(f"the input needs {need} positions (media included) on top of "
                                   f"{kv.seq_len(seq_id)} cached, but the context holds n_ctx={kv.n_ctx}: use fewer "
                                   f"or smaller media, or load the model with a larger n_ctx")
        embs = embeddings if embeddings is not None else self.embed_bitmaps(
            [c.bitmap for c in chunks if c.type != "text"])
        ckpt = Checkpoint(model, self, seq_id, kv.seq_len(seq_id))
        logits = None
        try:
            for i, c in enumerate(chunks):
                want = "last" if (logits_last and i == len(chunks) - 1) else False
                if c.type == "text":
                    b = Batch().add_text(c.tokens, pos=n_past, seq_id=seq_id, logits=want)
                else:
                    e = embs[c.bitmap.id][c.part]
                    pos = n_past
                    if c.hw is not None:                 # M-RoPE image / video: [4, n] (t, y, x, z) planes
                        pos = self._enc("image").decoder_positions(*c.hw, n_past, c.n_frames, c.time_interval)
                    b = Batch(causal=not c.non_causal).add_embd(e, pos=pos, seq_id=seq_id, logits=want)
                out = model.text.forward(b, kv, n_batch)
                if want:
                    logits = out[-1]
                n_past += c.n_pos
        except BaseException:
            ckpt.restore()
            raise
        model.note_cached(seq_id, None)
        self.sessions.pop(seq_id, None)
        if logits is not None:
            self.last_logits = logits
        return n_past


class Checkpoint:
    """What one call may change in sequence `seq`: cell counters, positions, the K/V rows from `start` to the
    current end (rows a call overwrites after truncating), the model's token record and the media session."""

    def __init__(self, model, ctx: MtmdContext | None, seq: int, start: int):
        kv = model.kv
        self.model, self.ctx, self.seq, self.start = model, ctx, seq, start
        self.state = kv.snapshot()
        self.cell_pos = kv._cell_pos[seq].copy()
        end = kv.seq_len(seq)
        self.rows = [(k[seq, start:end].clone(), v[seq, start:end].clone()) for k, v in zip(kv.k, kv.v)] \
            if end > start else None
        self.cached = model._cached.get(seq)
        self.had_cached = seq in model._cached
        self.session = ctx.sessions.get(seq) if ctx is not None else None

    def restore(self) -> None:
        kv, seq = self.model.kv, self.seq
        if self.rows is not None:
            n = self.rows[0][0].shape[0]
            for (k, v), (ks, vs) in zip(zip(kv.k, kv.v), self.rows):
                k[seq, self.start:self.start + n] = ks
                v[seq, self.start:self.start + n] = vs
        kv._cell_pos[seq] = self.cell_pos
        kv.restore(self.state)
        if self.had_cached:
            self.model._cached[seq] = self.cached
        else:
            self.model._cached.pop(seq, None)
        if self.ctx is not None:
            if self.session is None:
                self.ctx.sessions.pop(seq, None)
            else:
                self.ctx.sessions[seq] = self.session


# ---------------------------------------------------------------------------------------------------------- module API
def context(model, **kw) -> MtmdContext:
    """The model's MtmdContext (created on first use; keyword arguments re-create it with new settings)."""
    ctx = getattr(model, "_mtmd", None)
    stale = ctx is not None and (ctx.vision is not getattr(model, "mmproj", None)
                                 or ctx.audio is not getattr(model, "audio_encoder", None))
    if ctx is None or kw or stale:
        ctx = MtmdContext(model, **kw)
        model._mtmd = ctx
    return ctx


def tokenize(model, text: str, bitmaps: Sequence = (), *, add_special: bool = True,
             parse_special: bool = True) -> list[Chunk]:
    return context(model).tokenize(text, bitmaps, add_special=add_special, parse_special=parse_special)


def encode(model, chunk: Chunk) -> torch.Tensor:
    return context(model).encode(chunk)


def eval_chunks(model, chunks: Sequence[Chunk], n_past: int | None = None, seq_id: int = 0,
                n_batch: int | None = None, logits_last: bool = True) -> int:
    return context(model).eval_chunks(chunks, n_past, seq_id, n_batch, logits_last)


__all__ = ["Bitmap", "Chunk", "MtmdContext", "MediaError", "MarkerMismatchError", "MEDIA_MARKER", "context",
           "tokenize", "encode", "eval_chunks", "n_tokens", "n_pos", "Checkpoint"]
