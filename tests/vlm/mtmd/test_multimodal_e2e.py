"""End to end: tiny random HF vision/audio-language models -> our converters (text GGUF + f32 mmproj) -> our engine
(vlm.mtmd chunks -> encoders -> KV cache) against HF's full fp32 forward.

The prompt is tokenized by vlm.mtmd; HF gets the same ids with its image / audio placeholder token in every media
row (and, for Gemma 3, the matching token_type_ids, so its bidirectional image mask is used). Pixels come from
HF's own image processor on the HF side and from vlm.preprocess on ours, so preprocessing, encoder, projector,
embedding placement, positions and (Gemma 3) the non-causal image chunk are all covered. Audio: both sides get
the same log-mel windows (log-mel parity is tests/vlm/preprocess/test_preprocess_audio.py's job); Ultravox has no
transformers class, so its reference is the plain-torch projector of tests/vlm/encoders/test_audio_encoder.py
feeding HF's Llama.
Qwen2-VL / Qwen2.5-VL: dynamic-resolution images with M-RoPE positions (HF gets mm_token_type_ids).
"""
from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from paths import DATA
import hf_tiny
import vlm
from vlm import mtmd
from vlm.convert.hf_to_gguf import convert
from vlm.convert.mmproj import convert_mmproj

# Max abs error of the last-row logits vs HF fp32 (|logits| <= ~1 here); measured <= ~1e-6.
TOL = {"logits_vs_hf": 1e-4}

VISION = {"llava": hf_tiny.make_tiny_llava, "gemma3": hf_tiny.make_tiny_gemma3_vlm,
          "idefics3": hf_tiny.make_tiny_idefics3,
          "qwen2vl": lambda d: hf_tiny.make_tiny_qwen2_vl(d, version="2"),
          "qwen2.5vl": lambda d: hf_tiny.make_tiny_qwen2_vl(d, version="2.5")}


def _png(h: int, w: int, seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """name -> (hf_dir, our Model with its mmproj, HF model), built once per module."""
    root = tmp_path_factory.mktemp("mm_e2e")
    cache = {}

    def get(name):
        if name in cache:
            return cache[name]
        from transformers import AutoModelForImageTextToText
        if name in VISION:
            d = VISION[name](root / name)
            mm = convert_mmproj(d, root / f"mmproj-{name}.gguf", "f32")
            text = convert(d, root / f"{name}.gguf", "f32", progress=False)
            hf = AutoModelForImageTextToText.from_pretrained(str(d), dtype=torch.float32).eval()
        elif name == "qwen2a":
            from transformers import Qwen2AudioForConditionalGeneration
            d = hf_tiny.make_tiny_qwen2_audio(root / name)
            mm = convert_mmproj(d, root / "mmproj-qwen2a.gguf", "f32")
            text = convert(d, root / "qwen2a.gguf", "f32", progress=False)
            hf = Qwen2AudioForConditionalGeneration.from_pretrained(str(d), dtype=torch.float32).eval()
        else:  # ultravox: the text model is a separate Llama
            d = hf_tiny.make_tiny_ultravox(root / name, with_text=True)
            mm = convert_mmproj(d, root / "mmproj-ultravox.gguf", "f32")
            text = convert(d / "text", root / "ultravox-text.gguf", "f32", progress=False)
            hf = hf_tiny.load_hf(d / "text")
        model = vlm.load(text, mmproj=mm, device="cpu", dtype=torch.float32, n_ctx=512)
        cache[name] = (d, model, hf)
        return cache[name]
    return get


def _rows(chunks, media_id: int):
    ids, types = [], []
    for c in chunks:
        ids += c.tokens if c.type == "text" else [media_id] * c.n_tokens
        types += [0 if c.type == "text" else 1] * c.n_tokens
    return torch.tensor([ids]), torch.tensor([types])


def _ours(model, chunks) -> torch.Tensor:
    model.reset()
    n = mtmd.eval_chunks(model, chunks, n_past=0, seq_id=0)
    assert n == mtmd.n_pos(chunks) == model.kv.n_past(0) and model.kv.seq_len(0) == mtmd.n_tokens(chunks)
    return mtmd.context(model).last_logits


def _check(ours, ref, what):
    err = (ours.float() - ref.float()).abs().max().item()
    assert err <= TOL["logits_vs_hf"], f"{what}: max abs error {err:.3g} (|ref| max {ref.abs().max().item():.3g})"


def _hf_pixels(hf_dir, pngs):
    from transformers import AutoImageProcessor
    proc = AutoImageProcessor.from_pretrained(str(hf_dir))
    return proc(images=[Image.open(io.BytesIO(p)).convert("RGB") for p in pngs], return_tensors="pt")


@pytest.mark.parametrize("name", ["llava", "gemma3", "idefics3"])
@pytest.mark.parametrize("n_images", [1, 2])
def test_vision_logits_match_hf(tiny, name, n_images):
    d, model, hf = tiny(name)
    pngs = [_png(50, 70, 1), _png(81, 40, 2)][:n_images]
    prompt = "USER: " + " and ".join(["<__media__>"] * n_images) + "\nWhat do you see? ASSISTANT:"
    chunks = mtmd.tokenize(model, prompt, [mtmd.Bitmap.from_bytes(p) for p in pngs])
    n_img_chunks = sum(c.type == "image" for c in chunks)
    cfg = hf.config
    media_id = getattr(cfg, "image_token_index", None) or cfg.image_token_id
    ids, types = _rows(chunks, media_id)
    pix = _hf_pixels(d, pngs)
    kw = {"pixel_values": pix["pixel_values"], "attention_mask": torch.ones_like(ids)}
    if name == "gemma3":
        assert all(c.non_causal for c in chunks if c.type == "image")
        kw["token_type_ids"] = types
    if name == "idefics3":
        pv = pix["pixel_values"]                      # [1, tiles + globals of every image, 3, S, S]
        assert pv.shape[1] == n_img_chunks, "HF and vlm disagree on the tile count"
        if "pixel_attention_mask" in pix:
            kw["pixel_attention_mask"] = pix["pixel_attention_mask"]
    else:
        assert n_img_chunks == n_images
    with torch.no_grad():
        ref = hf(input_ids=ids, **kw).logits[0, -1]
    _check(_ours(model, chunks), ref, f"{name}, {n_images} image(s)")


@pytest.mark.parametrize("name", ["qwen2vl", "qwen2.5vl"])
def test_qwen_vl_mrope_logits_match_hf(tiny, name):
    """Dynamic-resolution images under M-RoPE: each image chunk advances n_past by max(rows, cols), its rows get
    (t, y, x) planes; HF recomputes the same from mm_token_type_ids and image_grid_thw."""
    d, model, hf = tiny(name)
    pngs = [_png(60, 90, 1), _png(100, 50, 2)]
    chunks = mtmd.tokenize(model, "<|im_start|>user\nA <__media__> and <__media__> ok<|im_end|>\n", pngs)
    imgs = [c for c in chunks if c.type == "image"]
    pix = _hf_pixels(d, pngs)
    grids = pix["image_grid_thw"].tolist()
    assert [c.n_tokens for c in imgs] == [t * h * w // 4 for t, h, w in grids]
    assert [c.n_pos for c in imgs] == [max(h, w) // 2 for _, h, w in grids]
    ids, types = _rows(chunks, hf.config.image_token_id)
    with torch.no_grad():
        ref = hf(input_ids=ids, pixel_values=pix["pixel_values"], image_grid_thw=pix["image_grid_thw"],
                 mm_token_type_ids=types).logits[0, -1]
    _check(_ours(model, chunks), ref, name)


def test_gemma3_prompt_ending_in_an_image(tiny):
    """The last row is an image row of a non-causal chunk: its logits come from the embedding row."""
    d, model, hf = tiny("gemma3")
    png = _png(30, 30, 3)
    chunks = mtmd.tokenize(model, "Look <__media__>", [mtmd.Bitmap.from_bytes(png)], add_special=True)
    chunks = [c for c in chunks][:-1] if chunks[-1].type == "text" else chunks   # drop <end_of_image>
    ids, types = _rows(chunks, hf.config.image_token_index)
    with torch.no_grad():
        ref = hf(input_ids=ids, pixel_values=_hf_pixels(d, [png])["pixel_values"], token_type_ids=types).logits[0, -1]
    _check(_ours(model, chunks), ref, "gemma3 ending in an image")


def test_qwen2_audio_logits_match_hf(tiny):
    d, model, hf = tiny("qwen2a")
    rng = np.random.default_rng(5)
    pcm = (0.3 * np.sin(np.arange(24_000) / 16_000 * 2 * np.pi * 440) + 0.05 * rng.standard_normal(24_000))
    bmp = mtmd.Bitmap.from_array(pcm.astype(np.float32), "audio")
    chunks = mtmd.tokenize(model, "<|im_start|>user\nAudio: <__media__> what is it?<|im_end|>\n", [bmp])
    audio = [c for c in chunks if c.type == "audio"]
    assert len(audio) == 2 and all(c.n_tokens == 25 for c in audio)   # 1.5 s -> two 1 s windows of the tiny encoder
    mel = torch.stack(mtmd.context(model).mel_windows(bmp))             # [2, 128, 100]
    ids, _ = _rows(chunks, hf.config.audio_token_index)
    with torch.no_grad():
        ref = hf(input_ids=ids, input_features=mel, attention_mask=torch.ones_like(ids),
                 feature_attention_mask=torch.ones(mel.shape[0], mel.shape[2], dtype=torch.long)).logits[0, -1]
    _check(_ours(model, chunks), ref, "qwen2-audio")


def test_ultravox_logits_match_reference(tiny):
    from test_audio_encoder import _ultravox_reference
    d, model, hf = tiny("ultravox")
    rng = np.random.default_rng(6)
    bmp = mtmd.Bitmap.from_array((0.2 * rng.standard_normal(16_000)).astype(np.float32), "audio")
    chunks = mtmd.tokenize(model, "Listen: <__media__> Transcribe.", [bmp])
    mel = torch.stack(mtmd.context(model).mel_windows(bmp))
    emb = _ultravox_reference(d, mel).reshape(-1, 64)
    assert [c.n_tokens for c in chunks if c.type == "audio"] == [emb.shape[0]]
    with torch.no_grad():
        rows = []
        for c in chunks:
            rows.append(hf.get_input_embeddings()(torch.tensor(c.tokens)) if c.type == "text" else emb)
        ref = hf(inputs_embeds=torch.cat(rows)[None]).logits[0, -1]
    _check(_ours(model, chunks), ref, "ultravox")


def test_generate_with_images_is_greedy_hf_continuation(tiny):
    """Model.generate(images=...) at temperature 0 gives HF's greedy tokens (3 steps, full forward each)."""
    d, model, hf = tiny("llava")
    png = _png(40, 60, 7)
    model.reset()
    text = model.generate("USER: <__media__>\nDescribe. ASSISTANT:", images=[png], max_tokens=3, temperature=0)
    got = model.last_result.tokens
    chunks = mtmd.tokenize(model, "USER: <__media__>\nDescribe. ASSISTANT:", [png])
    ids, _ = _rows(chunks, hf.config.image_token_index)
    pv = _hf_pixels(d, [png])["pixel_values"]
    want = []
    with torch.no_grad():
        for _ in range(len(got)):
            nxt = int(hf(input_ids=ids, pixel_values=pv).logits[0, -1].argmax())
            want.append(nxt)
            ids = torch.cat([ids, torch.tensor([[nxt]])], 1)
    assert got == want and text == model.detokenize(got)


def test_cli_generate_with_image_and_audio(tiny, tmp_path, capsys):
    """`vlm generate -m text.gguf --mmproj mmproj.gguf --image a.png -p ...` through main(argv)."""
    from vlm.cli import main
    _, model, _ = tiny("idefics3")
    img = tmp_path / "a.png"
    img.write_bytes(_png(64, 100, 8))
    rc = main(["generate", "-m", model.path, "--mmproj", model.mmproj.path, "--image", str(img), "-p",
               "What is in the picture?", "-n", "4", "--temp", "0", "--device", "cpu"])
    out = capsys.readouterr()
    assert rc == 0, out.err
    assert "prompt" in out.err and out.out.strip() != ""
    ref = model.generate("What is in the picture?", images=[str(img)], max_tokens=4, temperature=0)
    assert out.out.rstrip("\n") == ref
    rc = main(["generate", "-m", model.path, "--mmproj", model.mmproj.path, "--image", str(tmp_path / "nope.png"),
               "-p", "x", "-n", "1", "--device", "cpu"])
    assert rc == 1 and "nope.png" in capsys.readouterr().err
    _, amodel, _ = tiny("qwen2a")
    rc = main(["generate", "-m", amodel.path, "--mmproj", amodel.audio_encoder.path, "--audio",
               str(DATA / "speech_hello_16k.flac"), "-p", "What was said?", "--chat",
               "-n", "3", "--temp", "0", "--device", "cpu"])
    out = capsys.readouterr()
    assert rc == 0, out.err
    ref = amodel.generate([{"role": "user", "content": "<__media__>What was said?"}],
                          audio=[str(DATA / "speech_hello_16k.flac")], max_tokens=3,
                          temperature=0)
    assert out.out.rstrip("\n") == ref
    rc = main(["generate", "-m", model.path, "--image", str(img), "-p", "x", "-n", "1", "--device", "cpu"])
    assert rc == 1 and "no vision encoder" in capsys.readouterr().err
