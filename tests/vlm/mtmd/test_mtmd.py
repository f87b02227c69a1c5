"""Media API (vlm.mtmd: context, cache, chat): bitmaps, chunking and counting, per-projector markers,
the embedding cache, KV evaluation with rollback, Model.generate(images=/audio=), chat parts and bad input.

Numerical parity against HF lives in tests/vlm/mtmd/test_multimodal_e2e.py; here the tiny converted models only serve as
real encoders/tokenizers for the bookkeeping.
"""
from __future__ import annotations

import hashlib
import io
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from paths import DATA
import hf_tiny
import vlm
from vlm import mtmd
from vlm.convert.hf_to_gguf import ConvertError, convert
from vlm.convert.mmproj import convert_mmproj
from vlm.kv_cache import ContextFullError
from vlm.mtmd.cache import EmbeddingCache
from vlm.preprocess.image import ImageError, ImageTooLargeError

MAKERS = {"llava": hf_tiny.make_tiny_llava, "gemma3": hf_tiny.make_tiny_gemma3_vlm,
          "idefics3": hf_tiny.make_tiny_idefics3, "qwen2a": hf_tiny.make_tiny_qwen2_audio,
          "qwen2vl": hf_tiny.make_tiny_qwen2_vl}


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """name -> (hf_dir, text gguf, mmproj gguf), converted once per module."""
    root = tmp_path_factory.mktemp("mtmd")
    cache = {}

    def get(name):
        if name not in cache:
            d = MAKERS[name](root / name)
            cache[name] = (d, convert(d, root / f"{name}.gguf", "f32", progress=False),
                           convert_mmproj(d, root / f"mmproj-{name}.gguf", "f32"))
        return cache[name]
    return get


def _load(files, name, **kw):
    _, text, mm = files(name)
    return vlm.load(text, mmproj=mm, device="cpu", dtype=torch.float32, **{"n_ctx": 256, **kw})


def _png(h: int, w: int, seed: int = 0) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def _kv_state(model, seq=0):
    n = model.kv.seq_len(seq)
    return (list(model.kv.n_cells), list(model.kv.pos_next),
            [k[seq, :n].clone() for k in model.kv.k], model.kv.keys(seq))


def _same_state(a, b) -> bool:
    return a[0] == b[0] and a[1] == b[1] and all(torch.equal(x, y) for x, y in zip(a[2], b[2])) and a[3] == b[3]


class _CountCalls:
    def __init__(self, enc):
        self.enc, self.calls = enc, 0
        self._orig = enc.encode

    def __call__(self, *a, **k):
        self.calls += 1
        return self._orig(*a, **k)


# ------------------------------------------------------------------------------------------------- bitmaps
def test_bitmap_ids_and_kinds(tmp_path):
    png = _png(20, 30)
    p = tmp_path / "a.png"
    p.write_bytes(png)
    a, b = mtmd.Bitmap.from_file(p), mtmd.Bitmap.from_bytes(png)
    assert a.kind == b.kind == "image" and a.id == b.id == hashlib.sha256(png).hexdigest()
    arr = np.zeros((5, 6, 3), np.uint8)
    c = mtmd.Bitmap.from_array(arr)
    assert c.kind == "image" and c.id != a.id and c.id == mtmd.Bitmap.from_array(arr.copy()).id
    wav = mtmd.Bitmap.from_file(DATA / "speech_hello_16k.flac")
    assert wav.kind == "audio" and wav.array.dtype == np.float32 and wav.n_samples > 8000
    assert wav.id == hashlib.sha256((DATA / "speech_hello_16k.flac").read_bytes()).hexdigest()
    pcm = mtmd.Bitmap.from_array(np.zeros(8000, np.float32), sample_rate=8000)
    assert pcm.kind == "audio" and pcm.n_samples == 16000      # resampled to 16 kHz
    with pytest.raises(FileNotFoundError, match="nope.png"):
        mtmd.Bitmap.from_file(tmp_path / "nope.png")
    with pytest.raises(mtmd.MediaError, match="empty media data"):
        mtmd.Bitmap.from_bytes(b"")
    with pytest.raises(mtmd.MediaError, match="unsupported media source dict"):
        mtmd.Bitmap.of({"a": 1})


# ------------------------------------------------------------------------------------------------- chunks
def test_tokenize_llava_counts_and_marker_mismatch(files):
    model = _load(files, "llava")
    png = _png(50, 70)
    ch = mtmd.tokenize(model, "A <__media__> B <__media__> C", [png, png])
    assert [c.type for c in ch] == ["text", "image", "text", "image", "text"]
    assert [c.n_tokens for c in ch if c.type == "image"] == [4, 4]              # (28/14)^2, no markers (mlp)
    assert ch[0].tokens[0] == model.tokenizer.bos_id
    assert mtmd.n_tokens(ch) == mtmd.n_pos(ch) == sum(len(c.tokens) for c in ch if c.type == "text") + 8
    assert mtmd.tokenize(model, "A <__media__>", [png], add_special=False)[0].tokens[0] != model.tokenizer.bos_id
    with pytest.raises(mtmd.MarkerMismatchError, match=r"2 media marker\(s\) '<__media__>' but 1 bitmap"):
        mtmd.tokenize(model, "<__media__><__media__>", [png])
    with pytest.raises(mtmd.MarkerMismatchError, match=r"0 media marker\(s\).*1 bitmap"):
        mtmd.tokenize(model, "no marker", [png])
    ctx = mtmd.context(model, media_marker="<img>")
    assert [c.type for c in ctx.tokenize("x <img> y", [png])] == ["text", "image", "text"]


def test_counting_needs_no_pixels(files):
    """A PNG cut after its header: tokenize counts it (header only); encoding it fails."""
    model = _load(files, "gemma3")
    cut = _png(40, 40)[:60]
    ch = mtmd.tokenize(model, "see <__media__>", [cut])
    img = [c for c in ch if c.type == "image"][0]
    assert img.n_tokens == 4 and img.non_causal
    with pytest.raises(ImageError, match="corrupt or truncated"):
        mtmd.encode(model, img)


def test_gemma3_begin_end_strings(files):
    model = _load(files, "gemma3")
    ch = mtmd.tokenize(model, "see <__media__> now", [_png(10, 10)], add_special=False)
    tok = model.tokenizer
    assert ch[0].tokens[-len(tok.encode("<start_of_image>", add_special=False)):] == \
        tok.encode("<start_of_image>", add_special=False)
    assert ch[2].tokens[:len(tok.encode("<end_of_image>", add_special=False))] == \
        tok.encode("<end_of_image>", add_special=False)


@pytest.mark.parametrize("hw", [(50, 70), (30, 20), (200, 90)])
def test_idefics3_layout_matches_hf_processor(files, hw):
    """Our tile layout (text between chunks) equals HF Idefics3Processor.replace_image_token for the grid HF's
    image processor picks."""
    from transformers import AutoImageProcessor, Idefics3Processor
    d, _, _ = files("idefics3")
    model = _load(files, "idefics3")
    png = _png(*hw, seed=1)
    hf = AutoImageProcessor.from_pretrained(str(d))(images=[Image.open(io.BytesIO(png))], return_row_col_info=True)
    rows, cols = hf["rows"][0][0], hf["cols"][0][0]
    stub = SimpleNamespace(fake_image_token="<fake_token_around_image>", global_image_tag="<global-img>",
                           image_token="<image>", image_seq_len=4)
    want = Idefics3Processor.replace_image_token(stub, {"rows": [[rows]], "cols": [[cols]]}, 0)
    layout = mtmd.context(model).layout(mtmd.Bitmap.from_bytes(png))
    got = "".join(x if isinstance(x, str) else "<image>" * x.n_tokens for x in layout)
    assert got == want
    n_img = sum(not isinstance(x, str) for x in layout)
    assert n_img == (rows * cols + 1 if rows else 1)
    assert [x.part for x in layout if not isinstance(x, str)] == list(range(n_img))
    ch = mtmd.tokenize(model, "<__media__>", [png])
    assert mtmd.encode(model, [c for c in ch if c.type == "image"][-1]).shape == (4, 64)


def test_qwen2a_audio_markers_and_windows(files):
    model = _load(files, "qwen2a")
    pcm = np.random.default_rng(0).standard_normal(56_000).astype(np.float32) * 0.1   # 3.5 s
    ch = mtmd.tokenize(model, "<|im_start|>user\n<__media__>hi<|im_end|>", [mtmd.Bitmap.from_array(pcm, "audio")])
    assert [c.type for c in ch] == ["text"] + ["audio"] * 4 + ["text"]   # tiny encoder: 1 s windows (100 frames)
    assert all(c.n_tokens == model.audio_encoder.n_tokens(100) == 25 for c in ch if c.type == "audio")
    tok = model.tokenizer
    assert ch[0].tokens[-1] == tok.encode("<|audio_bos|>", add_special=False)[0]
    assert ch[-1].tokens[0] == tok.encode("<|audio_eos|>", add_special=False)[0]
    embs = [mtmd.encode(model, c) for c in ch if c.type == "audio"]
    assert all(e.shape == (25, 64) for e in embs)
    assert mtmd.context(model).n_encoded == 1               # one encoder call for the whole clip
    # a model without a vision encoder refuses images, naming the problem
    with pytest.raises(mtmd.MediaError, match="no vision encoder"):
        mtmd.tokenize(model, "<__media__>", [_png(8, 8)])


def test_full_size_audio_windows_are_30s(files, monkeypatch):
    """With Whisper's 1500-position table a window is 3000 frames: a 75 s clip gives 3 AUDIO chunks (hf mode)."""
    from vlm.preprocess.audio import n_audio_chunks
    model = _load(files, "qwen2a")
    enc = model.audio_encoder
    monkeypatch.setattr(type(enc), "window_frames", property(lambda self: 3000))
    assert enc.n_windows(75 * 16_000, mode="hf") == n_audio_chunks(75 * 16_000) == 3
    assert enc.n_windows(30 * 16_000, mode="hf") == 1


def test_load_mmproj_dispatches_audio_files(files):
    from vlm.encoders import load_mmproj
    from vlm.encoders.whisper import AudioEncoder
    enc = load_mmproj(files("qwen2a")[2], device="cpu", dtype=torch.float32)
    assert isinstance(enc, AudioEncoder) and enc.config.projector_type == "qwen2a"


# ------------------------------------------------------------------------------------------------- cache
def test_embedding_cache_lru_budget():
    c = EmbeddingCache(max_bytes=3 * 400)
    t = [torch.zeros(10, 10)]                               # 400 bytes
    for k in "abc":
        assert c.put(k, t)
    assert c.get("a") is not None                            # a is now the most recent
    c.put("d", t)                                            # evicts b (least recently used)
    assert "b" not in c and "a" in c and c.nbytes == 1200 and c.evictions == 1
    assert c.get("b") is None and (c.hits, c.misses) == (1, 1)
    assert not c.put("big", [torch.zeros(40, 10)]) and "big" not in c
    with pytest.raises(ValueError, match="max_bytes"):
        EmbeddingCache(-1)


def test_second_turn_skips_the_encoder(files, monkeypatch):
    model = _load(files, "llava")
    spy = _CountCalls(model.mmproj)
    monkeypatch.setattr(model.mmproj, "encode", spy)
    png = _png(50, 70, 3)
    a = model.generate("USER: <__media__> what? ASSISTANT:", images=[png], max_tokens=3, temperature=0)
    ctx = mtmd.context(model)
    assert spy.calls == 1 and (ctx.cache.hits, ctx.cache.misses) == (0, 1)
    b = model.generate("USER: <__media__> what? ASSISTANT:", images=[png], max_tokens=3, temperature=0)
    assert a == b and spy.calls == 1 and ctx.cache.hits == 1
    assert model.last_result.stats.n_prompt == 1           # KV prefix reused too: only the last row re-evaluated
    # a new conversation with the same image (prefix not reusable) still skips the encoder
    model.reset()
    c = model.generate("USER: <__media__> what? ASSISTANT:", images=[png], max_tokens=3, temperature=0)
    assert c == a and spy.calls == 1 and model.last_result.stats.n_prompt > 4
    # another preprocessing mode is another entry
    ctx2 = mtmd.context(model, image_mode="llamacpp")
    ctx2.embed_bitmaps([mtmd.Bitmap.from_bytes(png)])
    assert spy.calls == 2


@pytest.mark.parametrize("name", ["gemma3", "qwen2vl"])
def test_prefix_reuse_equals_fresh_evaluation(files, name):
    """Turn 2 extends turn 1: only the new rows are evaluated (non-causal image / M-RoPE positions included) and
    the answer equals a fresh model's."""
    model = _load(files, name)
    png = _png(60, 90, 4)
    model.generate("Look <__media__> then", images=[png], max_tokens=2, temperature=0)
    turn2 = "Look <__media__> then say more about it"
    out = model.generate(turn2, images=[png], max_tokens=4, temperature=0)
    reused = model.last_result.stats.n_prompt
    fresh = _load(files, name)
    assert out == fresh.generate(turn2, images=[png], max_tokens=4, temperature=0)
    assert reused < fresh.last_result.stats.n_prompt


# ------------------------------------------------------------------------------------------------- evaluation
def test_eval_chunks_piecewise_equals_whole(files):
    model = _load(files, "llava")
    ch = mtmd.tokenize(model, "a <__media__> b <__media__> c", [_png(20, 20, 1), _png(30, 10, 2)])
    model.reset()
    n = mtmd.eval_chunks(model, ch, n_past=0)
    whole = mtmd.context(model).last_logits.clone()
    model.reset()
    n_past = 0
    for c in ch:
        n_past = mtmd.eval_chunks(model, [c], n_past=n_past, n_batch=3)
    assert n == n_past == mtmd.n_pos(ch)
    assert torch.allclose(mtmd.context(model).last_logits, whole, atol=1e-5)


def test_bad_media_leave_cache_untouched(files):
    model = _load(files, "llava", n_ctx=40)
    good = _png(40, 40, 5)
    model.generate("USER: <__media__> hi ASSISTANT:", images=[good], max_tokens=2, temperature=0)
    ctx = mtmd.context(model)
    before = _kv_state(model)
    cases = [
        (_png(40, 40)[:80], ImageError, "corrupt or truncated"),
        (b"not an image at all", ImageError, "cannot identify image"),
        (np.zeros((0, 0, 3), np.uint8), ImageError, r"empty image \(0x0"),
    ]
    for src, err, msg in cases:
        with pytest.raises(err, match=msg):
            model.generate("USER: <__media__> hi ASSISTANT:", images=[src], max_tokens=2, temperature=0)
        assert _same_state(_kv_state(model), before)
    ctx.max_pixels = 1000                                    # decompression-bomb guard, from the header
    with pytest.raises(ImageTooLargeError, match="above the limit of 1000 pixels"):
        model.generate("<__media__>", images=[_png(40, 40)], max_tokens=1)
    ctx.max_pixels = None
    with pytest.raises(ContextFullError, match=r"needs \d+ positions .* n_ctx=40"):
        model.generate("<__media__>" * 12, images=[good] * 12, max_tokens=1)
    assert _same_state(_kv_state(model), before)


def test_error_during_decode_restores_overwritten_rows(files, monkeypatch):
    """A failure in the middle of evaluation (after earlier chunks were written over reused rows) rolls the KV
    rows, counters and the record of what the rows hold back."""
    model = _load(files, "llava")
    png = _png(40, 40, 6)
    model.generate("USER: <__media__> one two three ASSISTANT:", images=[png], max_tokens=3, temperature=0)
    before = _kv_state(model)
    real, calls = model.text.forward, []

    def flaky(batch, kv, n_batch):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("boom")
        return real(batch, kv, n_batch)
    monkeypatch.setattr(model.text, "forward", flaky)
    with pytest.raises(RuntimeError, match="boom"):
        model.generate("USER: <__media__> four <__media__> ASSISTANT:", images=[png, png], max_tokens=2)
    assert len(calls) == 2 and _same_state(_kv_state(model), before)


# ------------------------------------------------------------------------------------------------- user surface
def test_chat_messages_with_image_parts(files):
    model = _load(files, "llava")
    png = _png(30, 50, 7)
    msgs = [{"role": "user", "content": [{"type": "image", "image": png}, {"type": "text", "text": "What is it?"}]}]
    a = model.generate(msgs, max_tokens=3, temperature=0)
    text = model.apply_chat_template([{"role": "user", "content": "<__media__>What is it?"}])
    ch = mtmd.tokenize(model, text, [png])
    assert sum(c.type == "image" for c in ch) == 1
    assert ch[0].tokens[0] == model.tokenizer.bos_id      # BOS added once (this template does not write it)
    model.reset()
    b = model.generate(text, images=[png], max_tokens=3, temperature=0)   # same rendering, BOS as encode_chat
    assert a == b
    with pytest.raises(mtmd.MediaError, match="without data"):
        model.generate([{"role": "user", "content": [{"type": "image"}]}], max_tokens=1)
    with pytest.raises(mtmd.MediaError, match="URLs are not fetched"):
        model.generate([{"role": "user", "content": [{"type": "image", "image": "https://x/y.png"}]}], max_tokens=1)


def test_audio_generate_and_chat_part(files):
    model = _load(files, "qwen2a")
    flac = (DATA / "speech_hello_16k.flac").read_bytes()
    a = model.generate("<|im_start|>user\n<__media__>What was said?<|im_end|>\n<|im_start|>assistant\n",
                       audio=[flac], max_tokens=3, temperature=0)
    msgs = [{"role": "user", "content": [{"type": "audio", "audio": flac}, {"type": "text", "text": "Say?"}]}]
    b = model.generate(msgs, max_tokens=3, temperature=0)
    assert isinstance(a, str) and isinstance(b, str) and mtmd.context(model).cache.hits >= 1


def test_text_only_model_refuses_media(files):
    _, text, _ = files("llava")
    model = vlm.load(text, device="cpu", dtype=torch.float32, n_ctx=64)
    with pytest.raises(mtmd.MediaError, match="no vision encoder: load it with an mmproj"):
        model.generate("hi", images=[_png(8, 8)], max_tokens=1)


def test_text_half_converters(files, tmp_path):
    """The text halves of the multimodal wrappers convert to plain llama / qwen2 GGUFs; an Ultravox folder without
    a text model is refused with a pointer to its text model."""
    from vlm.gguf import GGUFFile
    for name, arch in (("llava", "llama"), ("idefics3", "llama"), ("qwen2a", "qwen2")):
        with GGUFFile(files(name)[1]) as f:
            assert f.arch == arch
            assert not any(n.startswith(("v.", "a.", "mm.")) for n in f.tensors)
            assert "blk.1.attn_q.weight" in f.tensors and "output.weight" in f.tensors
    d = hf_tiny.make_tiny_ultravox(tmp_path / "uv")
    with pytest.raises(ConvertError, match="holds no text model"):
        convert(d, tmp_path / "uv.gguf", "f32", progress=False)


def test_single_file_text_plus_projector(files, tmp_path):
    """One GGUF holding the text model and the clip keys / v.* mm.* tensors loads both (no mmproj= needed)."""
    from vlm.gguf import GGUFFile, write_gguf
    _, text, mm = files("llava")
    with GGUFFile(text) as ft, GGUFFile(mm) as fm:
        meta = {**{k: v for k, v in fm.typed_metadata().items() if k.startswith("clip.")}, **ft.typed_metadata()}
        tensors = {n: ft.load(n) for n in ft.tensors} | {n: fm.load(n) for n in fm.tensors}
    one = write_gguf(tmp_path / "one.gguf", None, meta, tensors)
    model = vlm.load(one, device="cpu", dtype=torch.float32, n_ctx=64)
    assert model.mmproj is not None and model.mmproj.config.projector_type == "mlp"
    png = _png(30, 30, 9)
    ref = _load(files, "llava", n_ctx=64)
    prompt = "USER: <__media__> what? ASSISTANT:"
    assert model.generate(prompt, images=[png], max_tokens=3, temperature=0) == \
        ref.generate(prompt, images=[png], max_tokens=3, temperature=0)
