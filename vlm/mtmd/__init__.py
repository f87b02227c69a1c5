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

Modules: :mod:`~vlm.mtmd.media` (Bitmap), :mod:`~vlm.mtmd.video` (video frames), :mod:`~vlm.mtmd.chunks`,
:mod:`~vlm.mtmd.context` (tokenize / encode / eval_chunks), :mod:`~vlm.mtmd.cache` (embedding cache),
:mod:`~vlm.mtmd.chat` (``Model.generate(images=, audio=, videos=)`` and chat messages with media parts). What a
media item becomes in the prompt (markers, tiles, windows, M-RoPE grids, preprocessing) is its encoder class's
business (vlm/encoders); nothing here names a projector.
"""
from vlm.errors import MarkerMismatchError, MediaError
from vlm.mtmd.chunks import Chunk, n_pos, n_tokens
from vlm.mtmd.context import MEDIA_MARKER, MtmdContext, context, encode, eval_chunks, tokenize
from vlm.mtmd.media import Bitmap

__all__ = ["Bitmap", "Chunk", "MtmdContext", "MediaError", "MarkerMismatchError", "MEDIA_MARKER", "context",
           "tokenize", "encode", "eval_chunks", "n_tokens", "n_pos"]
