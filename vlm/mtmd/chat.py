"""`Model.generate(prompt, images=[...], audio=[...], videos=[...])` and chat messages with image / audio / video
parts.

    model.generate("<__media__>\\nDescribe the picture.", images=["cat.png"], temperature=0)
    model.generate([{"role": "user", "content": [{"type": "image", "image": "cat.png"},
                                                 {"type": "text", "text": "Describe it."}]}])

Prompt text: each media marker (default ``<__media__>``) takes the next bitmap of images + audio + videos (in that
order); a
prompt without markers gets one marker per bitmap at its start (llama.cpp's mtmd-cli does the same). Chat
messages: a content part ``{"type": "image", "image": path | bytes | array | Bitmap}`` (``"path"``/``"url"`` for
local paths are accepted too), ``{"type": "audio", "audio": ...}`` or ``{"type": "video", "video": frames | directory |
animated GIF, "fps": 2[, "sample_fps", "min_pixels", "max_pixels"]}`` (Qwen2-VL / 2.5-VL, keys as in Qwen's own
message format; vlm.mtmd.video) becomes the marker in the rendered template,
and the parts of a message are joined into one string, so templates written for string content render them;
images / audio given as arguments follow the media of the messages.

Prefix reuse: the KV cache records what each row holds (token ids and media row keys), so a next turn re-evaluates
only what changed; encoders are skipped for media in the embedding cache. Any error leaves the sequence as it was
before the call.
"""
from __future__ import annotations

import time
from typing import Sequence

from vlm.errors import MediaError
from vlm.kv_cache import ContextFullError
from vlm.mtmd.chunks import Chunk
from vlm.mtmd.context import context
from vlm.mtmd.media import Bitmap

_MEDIA_TYPES = {"image": "image", "image_url": "image", "input_image": "image", "audio": "audio",
                "input_audio": "audio", "video": "video", "input_video": "video"}


def has_media_parts(prompt) -> bool:
    """True for chat messages with an image / audio content part."""
    if not isinstance(prompt, (list, tuple)) or not prompt or not all(isinstance(m, dict) for m in prompt):
        return False
    return any(isinstance(m.get("content"), (list, tuple)) and
               any(isinstance(p, dict) and p.get("type") in _MEDIA_TYPES for p in m["content"]) for m in prompt)


def _part_source(p: dict):
    kind = _MEDIA_TYPES[p["type"]]
    for key in (p["type"], kind, "path", "url", "data"):
        v = p.get(key)
        if isinstance(v, dict):          # OpenAI style {"image_url": {"url": ...}}
            v = v.get("url") or v.get("data")
        if v is not None:
            if isinstance(v, str) and v.startswith(("http://", "https://", "data:")):
                raise MediaError(f"{kind} part: URLs are not fetched; pass a local path, bytes or an array")
            return kind, v
    raise MediaError(f"{p['type']} content part without data: give {{'type': '{kind}', '{kind}': path_or_bytes}}")


def messages_with_markers(messages, marker: str) -> tuple[list[dict], list[Bitmap]]:
    """Media parts -> the marker (content lists joined into one string); the bitmaps in order."""
    out, bitmaps = [], []
    for m in messages:
        c = m.get("content")
        if isinstance(c, (list, tuple)):
            texts = []
            for p in c:
                if isinstance(p, str):
                    texts.append(p)
                elif isinstance(p, dict) and p.get("type") in _MEDIA_TYPES:
                    kind, src = _part_source(p)
                    if kind == "video" and not isinstance(src, Bitmap):
                        bitmaps.append(Bitmap.from_video(src, fps=p.get("fps"), sample_fps=p.get("sample_fps"),
                                                         min_pixels=p.get("min_pixels"),
                                                         max_pixels=p.get("max_pixels")))
                    else:
                        bitmaps.append(Bitmap.of(src, kind))
                    texts.append(marker)
                elif isinstance(p, dict) and p.get("type") == "text":
                    texts.append(str(p.get("text", "")))
                else:
                    raise MediaError(f"unsupported content part {p!r:.80}: use text, image, audio or video parts")
            m = {**m, "content": "".join(texts)}
        out.append(m)
    return out, bitmaps


def build_chunks(model, prompt, images: Sequence = (), audio: Sequence = (), *, chat_template: str | None = None,
                 add_special: bool = True, videos: Sequence = ()) -> list[Chunk]:
    """Prompt (text or chat messages) + media -> chunks (counted; nothing decoded or encoded yet)."""
    ctx = context(model)
    marker = ctx.media_marker
    extra = [Bitmap.of(x, "image") for x in (images or ())] + [Bitmap.of(x, "audio") for x in (audio or ())] + \
        [Bitmap.of(x, "video") for x in (videos or ())]
    if isinstance(prompt, str):
        if not prompt and not extra:
            raise ValueError("empty prompt: give some text (or token ids)")
        text = prompt if marker in prompt or not extra else marker * len(extra) + prompt
        return ctx.tokenize(text, extra, add_special=add_special)
    if isinstance(prompt, (list, tuple)) and prompt and all(isinstance(m, dict) for m in prompt):
        msgs, bitmaps = messages_with_markers(prompt, marker)
        bitmaps += extra
        n_marks = sum(m.get("content", "").count(marker) for m in msgs if isinstance(m.get("content"), str))
        if extra and n_marks < len(bitmaps):     # media given as arguments: markers at the start of the last user turn
            last = max((i for i, m in enumerate(msgs) if m.get("role") == "user"), default=len(msgs) - 1)
            body = str(msgs[last].get("content", ""))
            msgs[last] = {**msgs[last], "content": marker * (len(bitmaps) - n_marks) + body}
        text = model.apply_chat_template(msgs, template=chat_template)
        chunks = ctx.tokenize(text, bitmaps, add_special=False, parse_special=True)
        tok = model.tokenizer
        if tok.add_bos and tok.bos_id is not None and not (chunks and chunks[0].type == "text"
                                                           and chunks[0].tokens[0] == tok.bos_id):
            ctx.add_special(chunks)             # BOS only when the template did not write it (as encode_chat)
        return chunks
    raise TypeError("with images / audio / videos, prompt must be a string or a list of chat messages, got "
                    f"{type(prompt).__name__}")


def _reusable(ctx, seq: int, chunks: list[Chunk]) -> tuple[int, int]:
    """(chunks fully reused, extra tokens reused of the next text chunk), keeping >= 1 row to evaluate."""
    keys, row = ctx.model.kv.keys(seq), 0
    for i, c in enumerate(chunks):
        ck = ctx.row_keys(c)
        last = i == len(chunks) - 1
        if not last and keys[row:row + len(ck)] == ck:
            row += len(ck)
            continue
        if c.type != "text":
            return i, 0
        lim = min(len(ck) - (1 if last else 0), len(keys) - row)
        j = 0
        while j < lim and keys[row + j] is not None and keys[row + j] == ck[j]:
            j += 1
        return i, j
    return len(chunks), 0


def generate(model, prompt, *, images: Sequence = (), audio: Sequence = (), max_tokens: int, params, stops,
             seq_id: int = 0, stream: bool = False, chat_template: str | None = None, add_special: bool = True,
             videos: Sequence = ()):
    """The multimodal branch of Model.generate (sampling parameters already validated there)."""
    ctx = context(model)
    kv = model.kv
    chunks = build_chunks(model, prompt, images, audio, chat_template=chat_template, add_special=add_special,
                          videos=videos)
    need = sum(c.n_tokens for c in chunks)
    if need > kv.n_ctx:
        raise ContextFullError(f"the prompt needs {need} positions (text + media) but the context holds "
                               f"n_ctx={kv.n_ctx}: use fewer or smaller media, or load with a larger n_ctx")
    t0 = time.perf_counter()
    embs = ctx.embed_bitmaps([c.bitmap for c in chunks if c.type != "text"])  # decode/encode errors: nothing touched
    n_full, n_tok = _reusable(ctx, seq_id, chunks)
    reuse = sum(c.n_tokens for c in chunks[:n_full]) + n_tok
    todo = list(chunks[n_full:])
    if n_tok:
        c = todo[0]
        todo[0] = Chunk.of_tokens(c.tokens[n_tok:])
    ckpt = kv.checkpoint(seq_id, reuse)
    try:
        if reuse:
            kv.truncate(seq_id, reuse)
        else:
            kv.clear(seq_id)
        ctx.eval_chunks(todo, seq_id=seq_id, embeddings=embs)
    except BaseException:
        kv.rollback(ckpt)
        raise
    logits = ctx.last_logits
    t_prefill = time.perf_counter() - t0          # media encoding + prompt evaluation: part of the time to first token
    history = [t for c in chunks if c.type == "text" for t in c.tokens]

    def run():
        it = model._generate_text(history, max_tokens, params, stops, seq_id, prefilled_logits=logits)
        try:
            yield from it
        finally:
            it.close()
            res = model.last_result
            res.stats.n_prompt = sum(c.n_tokens for c in todo)
            res.stats.n_prompt_total = need
            res.stats.t_prompt += t_prefill

    it = run()
    return it if stream else "".join(it)


__all__ = ["generate", "build_chunks", "messages_with_markers", "has_media_parts"]
