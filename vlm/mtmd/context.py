"""The media context of a model: bitmaps -> chunks -> embeddings -> the KV cache (llama.cpp's mtmd_context).

Chunks: the text is split on the media marker (default ``<__media__>``); #markers must equal #bitmaps. Each bitmap
becomes the strings and pieces its encoder lays out (``image_layout`` / ``audio_layout`` / ``video_layout`` of the
encoder class: markers around the item, tiles, audio windows, M-RoPE grids); the strings are merged into the
neighbouring text chunks as special-token text, each piece becomes a media chunk. Text pieces are tokenized
without BOS; ``add_special`` prepends BOS to the first chunk as the vocabulary says.

Encoding goes through the context's :class:`~vlm.mtmd.cache.EmbeddingCache` (key: encoder identity + media hash +
the encoder's preprocessing parameters); uncached images of one call are preprocessed in a thread pool and encoded
together. :meth:`MtmdContext.eval_chunks` evaluates text with ``Batch.add_text`` and media with ``Batch.add_embd``
(a non-causal chunk as one batch) and records what each row holds in the KV cache (token ids, media row keys); on
any error the sequence is rolled back (``KVCache.checkpoint`` / ``rollback``).
"""
from __future__ import annotations

from typing import Sequence

import torch

from vlm.batch import Batch
from vlm.errors import MarkerMismatchError, MediaError
from vlm.kv_cache import ContextFullError
from vlm.mtmd.cache import DEFAULT_CACHE_BYTES, EmbeddingCache, encoder_identity
from vlm.mtmd.chunks import Chunk, n_tokens
from vlm.mtmd.media import Bitmap
from vlm.preprocess import image as pimg

MEDIA_MARKER = "<__media__>"


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
        self._ids = {}

    # ---- encoders ---------------------------------------------------------------------------------------------
    def encoder(self, kind: str):
        """The encoder serving `kind` media ("image" and "video": the vision encoder; "audio")."""
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

    def _mode(self, kind: str) -> str:
        return self.audio_mode if kind == "audio" else self.image_mode

    def media_key(self, bmp: Bitmap) -> tuple:
        """What one bitmap's embeddings depend on: encoder identity, media hash, preprocessing parameters."""
        enc = self.encoder(bmp.kind)
        limit = () if bmp.kind == "audio" else (self.max_pixels,)
        return (self._identity(enc), bmp.id, enc.preprocess_params(self._mode(bmp.kind)), *limit)

    def row_keys(self, chunk: Chunk) -> list:
        """What each row of `chunk` holds, as the KV cache records it: token ids, or (media key, part, row)."""
        if chunk.type == "text":
            return list(chunk.tokens)
        key = self.media_key(chunk.bitmap)
        return [(key, chunk.part, i) for i in range(chunk.n_tokens)]

    # ---- layout -------------------------------------------------------------------------------------------
    def layout(self, bmp: Bitmap) -> list:
        """[str | Chunk ...] for one bitmap, as its encoder lays it out (counted from headers, no pixels)."""
        enc = self.encoder(bmp.kind)
        if bmp.kind == "image":
            items = enc.image_layout(*bmp.image_hw(self.image_mode, self.max_pixels), mode=self.image_mode)
        elif bmp.kind == "video":
            sizes = [f.image_hw(self.image_mode, self.max_pixels) for f in bmp.frames]
            items = enc.video_layout(sizes, fps=bmp.fps, policy=bmp.frame_policy, pixel_limits=bmp.pixel_limits,
                                     mode=self.image_mode, name=bmp.name)
        else:
            items = enc.audio_layout(bmp.n_samples, mode=self.audio_mode, name=bmp.name)
        return [it if isinstance(it, str) else Chunk.of_piece(bmp, it) for it in items]

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
            for item in self.layout(bitmaps[i]):
                if isinstance(item, str):
                    pending += text_ids(item, True)      # the encoder's marker strings: always special
                else:
                    if pending:
                        chunks.append(Chunk.of_tokens(pending))
                        pending = []
                    chunks.append(item)
        if pending:
            chunks.append(Chunk.of_tokens(pending))
        if add_special:
            self.add_special(chunks)
        return chunks

    def add_special(self, chunks: list[Chunk]) -> None:
        """BOS / EOS around the chunks, as the vocabulary's add_bos / add_eos say (in place)."""
        tok = self.model.tokenizer
        if getattr(tok, "add_bos", False) and tok.bos_id is not None:
            if chunks and chunks[0].type == "text":
                if not chunks[0].tokens or chunks[0].tokens[0] != tok.bos_id:
                    chunks[0] = Chunk.of_tokens([tok.bos_id] + chunks[0].tokens)
            else:
                chunks.insert(0, Chunk.of_tokens([tok.bos_id]))
        if getattr(tok, "add_eos", False) and tok.eos_id is not None:
            if chunks and chunks[-1].type == "text":
                chunks[-1] = Chunk.of_tokens(chunks[-1].tokens + [tok.eos_id])
            else:
                chunks.append(Chunk.of_tokens([tok.eos_id]))

    # ---- encode ----------------------------------------------------------------------------------------------
    def _decoded(self, bmp: Bitmap):
        """An image bitmap's pixels, decoded once with the configured pixel limit."""
        if bmp.data is None:
            return bmp.array
        return pimg.decode_image(bmp.data, mode=self.image_mode, max_pixels=self.max_pixels)

    def mel_windows(self, bmp: Bitmap) -> list[torch.Tensor]:
        """Log-mel input of each audio window of one clip."""
        return self.encoder("audio").mel_windows(bmp.array, mode=self.audio_mode)

    def embed_bitmaps(self, bitmaps: Sequence[Bitmap]) -> dict[str, list[torch.Tensor]]:
        """bitmap id -> its list of embeddings; cache misses of one kind are encoded together in one call."""
        out, todo = {}, {"image": [], "audio": [], "video": []}
        for b in bitmaps:
            if b.id in out or any(b.id == t.id for t in todo[b.kind]):
                continue
            hit = self.cache.get(self.media_key(b))
            if hit is not None:
                out[b.id] = hit
            else:
                todo[b.kind].append(b)
        if todo["image"]:
            enc = self.encoder("image")
            pix = pimg.preprocess_batch(todo["image"], fn=lambda b: enc.preprocess_image(self._decoded(b),
                                                                                          mode=self.image_mode))
            self._store(todo["image"], [len(ps) for ps in pix], enc.encode([p for ps in pix for p in ps]), out)
        if todo["video"]:
            enc = self.encoder("video")

            def prep(b):
                return enc.preprocess_video([self._decoded(f) for f in b.frames], policy=b.frame_policy,
                                            pixel_limits=b.pixel_limits, mode=self.image_mode, name=b.name)
            vids = pimg.preprocess_batch(todo["video"], fn=prep)
            self._store(todo["video"], [1] * len(vids), enc.encode(vids), out)
        if todo["audio"]:
            mels = [self.mel_windows(b) for b in todo["audio"]]
            embs = self.encoder("audio").encode([m for ms in mels for m in ms])
            self._store(todo["audio"], [len(ms) for ms in mels], embs, out)
        return out

    def _store(self, bmps, counts, embs, out) -> None:
        i = 0
        for b, n in zip(bmps, counts):
            out[b.id] = list(embs[i:i + n])
            self.cache.put(self.media_key(b), out[b.id])
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
        before anything is written; on any error the sequence is as before the call. Rows evaluated at the
        sequence's own next positions are recorded for prefix reuse; rows placed elsewhere count as unknown."""
        model = self.model
        kv = model.kv
        n_batch = n_batch or model.n_batch
        natural = n_past is None or int(n_past) == kv.n_past(seq_id)
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
        ckpt = kv.checkpoint(seq_id)
        logits = None
        try:
            for i, c in enumerate(chunks):
                want = "last" if (logits_last and i == len(chunks) - 1) else False
                if c.type == "text":
                    b = Batch().add_text(c.tokens, pos=n_past, seq_id=seq_id, logits=want)
                else:
                    pos = self.encoder(c.type).chunk_positions(c, n_past)
                    b = Batch(causal=not c.non_causal).add_embd(embs[c.bitmap.id][c.part], pos=pos, seq_id=seq_id,
                                                                logits=want)
                out = model.text.forward(b, kv, n_batch)
                if natural:
                    kv.record(seq_id, self.row_keys(c))
                if want:
                    logits = out[-1]
                n_past += c.n_pos
        except BaseException:
            kv.rollback(ckpt)
            raise
        if logits is not None:
            self.last_logits = logits
        return n_past


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


__all__ = ["MtmdContext", "MEDIA_MARKER", "context", "tokenize", "encode", "eval_chunks"]
