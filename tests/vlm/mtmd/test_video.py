"""Video input end to end: frames (lists, arrays, directories, animated GIF / WebP) -> Bitmap.from_video ->
one VIDEO chunk between the vision markers -> Qwen2-VL / Qwen2.5-VL encoder + M-RoPE positions, against HF (fp32).

The video positions of Qwen2.5-VL depend on the frame rate (HF second_per_grid_ts = 2 / fps, times the vision
config's tokens_per_second): checked against HF's own get_rope_index for several rates, and through whole-prompt
logits. HF's video processor needs torchvision (not installed), so HF gets our pixel values; those go through the
same resize / normalise / patchify as images, which tests/vlm/preprocess/test_preprocess_qwen.py checks against HF
exactly.
"""
from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from vlm import mtmd
from vlm.gguf import GGUFFile
from vlm.kv_cache import ContextFullError
from vlm.preprocess.qwen_video import VideoFrameSizeError, preprocess_qwen2vl_video
from vlm.preprocess.video import VideoError, load_video, sample_indices

TOL = {"logits_vs_hf": 1e-4}        # max abs error vs HF fp32 logits (measured ~2e-7 on the torch path)
VERSIONS = ["2", "2.5"]
PALETTE = np.array([[0, 0, 0], [255, 0, 0], [0, 255, 0], [0, 0, 255], [255, 255, 0], [255, 255, 255]], np.uint8)


def _frames(n, h=56, w=84, seed=0):
    """Frames of blocks in 6 palette colours (GIF / lossless WebP keep them exactly)."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        idx = rng.integers(0, len(PALETTE), (h // 7, w // 7))
        out.append(np.ascontiguousarray(PALETTE[idx].repeat(7, 0).repeat(7, 1)))
    return out


def _animated(frames, fmt="GIF", duration=250) -> bytes:
    ims = [Image.fromarray(f) for f in frames]
    buf = io.BytesIO()
    kw = dict(lossless=True) if fmt == "WEBP" else dict(disposal=1) if fmt == "GIF" else {}
    ims[0].save(buf, format=fmt, save_all=True, append_images=ims[1:], duration=duration, loop=0, **kw)
    return buf.getvalue()


@pytest.fixture
def tiny(tiny_qwen_vl):
    """version -> (hf_dir, HF model, our Model with mmproj): the session's shared tiny Qwen2-VL / 2.5-VL."""
    return tiny_qwen_vl


# ---------------------------------------------------------------------------------------------- frame sources
def test_load_video_sources(tmp_path):
    frames = _frames(5)
    v = load_video(frames)
    assert v.fps == 2.0 and len(v.frames) == 5 and all(a is b for a, b in zip(v.frames, frames))
    v = load_video(np.stack(frames), fps=25)
    assert v.fps == 25 and all(np.array_equal(a, b) for a, b in zip(v.frames, frames))
    for fmt in ("GIF", "WEBP"):                       # animated files: every frame, fps from the frame timing
        data = _animated(frames, fmt, duration=250)
        (tmp_path / f"a.{fmt.lower()}").write_bytes(data)
        for src in (data, str(tmp_path / f"a.{fmt.lower()}")):
            v = load_video(src)
            assert v.fps == pytest.approx(4.0) and len(v.frames) == 5, fmt
            assert all(np.array_equal(a, b) for a, b in zip(v.frames, frames)), fmt
    d = tmp_path / "dir"
    d.mkdir()
    for i in (10, 2, 1):                              # natural order: 1, 2, 10
        Image.fromarray(frames[i % 5]).save(d / f"f{i}.png")
    (d / "notes.txt").write_text("not a frame")
    v = load_video(str(d), fps=3)
    got = [np.asarray(Image.open(io.BytesIO(b))) for b in v.frames]
    assert v.fps == 3 and [np.array_equal(g, frames[i % 5]) for g, i in zip(got, (1, 2, 10))] == [True] * 3


def test_sampling_and_limits(tmp_path, monkeypatch):
    assert sample_indices(10, 10, 2) == [0, 5]
    assert sample_indices(7, 2, None) == list(range(7)) and sample_indices(7, 2, 30) == list(range(7))
    assert sample_indices(30, 30, 4) == [0, 7, 15, 22]
    v = load_video(_animated(_frames(8), duration=100), sample_fps=5)      # 10 fps -> every other frame
    assert len(v.frames) == 4 and v.fps == pytest.approx(5.0)
    with pytest.raises(VideoError, match="more than max_frames=3"):
        load_video(_frames(4), max_frames=3)
    assert len(load_video(_frames(4), max_frames=3, sample_fps=1).frames) == 2
    monkeypatch.setattr("vlm.preprocess.video.MAX_DECODED_BYTES", 3 * 56 * 84 * 3)   # room for 3 frames
    with pytest.raises(VideoError, match=r"4 frames of 84x56 would decode to .* pass sample_fps"):
        load_video(_animated(_frames(4)))
    assert len(load_video(_animated(_frames(4), duration=500), sample_fps=1).frames) == 2
    with pytest.raises(VideoError, match="at least one frame"):
        load_video([])
    with pytest.raises(VideoError, match="fps must be a positive"):
        load_video(_frames(2), fps=0)
    with pytest.raises(VideoError, match="still PNG image"):
        buf = io.BytesIO()
        Image.fromarray(_frames(1)[0]).save(buf, format="PNG")
        load_video(buf.getvalue())
    with pytest.raises(VideoError, match=r"containers \(\.mp4\).*ffmpeg"):
        load_video(str(tmp_path / "clip.mp4"))
    with pytest.raises(FileNotFoundError, match="nope.gif"):
        load_video(str(tmp_path / "nope.gif"))
    with pytest.raises(VideoError, match="no image files"):
        load_video(str(tmp_path))
    with pytest.raises(VideoError, match="frame 1 is a dict"):
        load_video([_frames(1)[0], {}])
    with pytest.raises(VideoError, match=r"\[T, H, W, C\] uint8"):
        load_video(np.zeros((2, 8, 8, 3), np.float32))
    data = _animated(_frames(3))
    for cut in (200, len(data) * 2 // 3):
        with pytest.raises(VideoError, match="corrupt or truncated"):
            load_video(data[:cut])


def test_bitmap_ids():
    f = _frames(4)
    a, b = mtmd.Bitmap.from_video(f), mtmd.Bitmap.from_video([x.copy() for x in f])
    assert a.kind == "video" and a.id == b.id and len(a.frames) == 4
    assert mtmd.Bitmap.from_video(f, fps=3).id != a.id                # fps moves the positions: another id
    assert mtmd.Bitmap.from_video(f[::-1]).id != a.id
    assert mtmd.Bitmap.from_video(f, max_pixels=28 * 28 * 4).id != a.id
    with pytest.raises(mtmd.MediaError, match="min_pixels 5000 exceeds max_pixels 4000"):
        mtmd.Bitmap.from_video(f, min_pixels=5000, max_pixels=4000)
    assert mtmd.Bitmap.of(np.stack(f)).kind == "video"
    with pytest.raises(mtmd.MediaError, match="frame_policy"):
        mtmd.Bitmap.from_video(f, frame_policy="crop")


# ---------------------------------------------------------------------------------------------- positions
@pytest.mark.parametrize("v", VERSIONS)
def test_video_positions_equal_hf_get_rope_index(tiny, v):
    """Our chunk's positions (Bitmap fps -> encoder time step) vs HF get_rope_index with second_per_grid_ts as
    the Qwen2.5-VL processor returns it (float32 tensor of 2 / fps), across rates whose steps are not integers."""
    d, hf, m = tiny(v)
    if v == "2.5":
        with GGUFFile(str(d / "mmproj.gguf")) as f:
            assert f.get("clip.vision.tokens_per_second") == hf.config.vision_config.tokens_per_second
        assert m.mmproj.tokens_per_second == hf.config.vision_config.tokens_per_second
    for fps, n_frames in [(2, 6), (3, 17), (0.5, 5), (7.5, 12), (29.97, 9), (1 / 3, 4)]:
        bmp = mtmd.Bitmap.from_video(_frames(n_frames, seed=1), fps=fps)
        chunks = mtmd.tokenize(m, "ab<__media__>c", [bmp], add_special=False)
        c = next(c for c in chunks if c.type == "video")
        t = -(-n_frames // 2)
        assert (c.n_frames, c.n_tokens, c.n_pos) == (t, t * 6, 3)
        n0 = chunks[0].n_tokens
        pos = m.mmproj.decoder_positions(*c.hw, n0, c.n_frames, c.time_interval)
        types = [0] * n0 + [2] * c.n_tokens + [0] * chunks[2].n_tokens
        kw = dict(second_per_grid_ts=torch.tensor([2 / fps])) if v == "2.5" else {}
        ref, _ = hf.model.get_rope_index(torch.ones(1, len(types), dtype=torch.long), torch.tensor([types]), None,
                                         torch.tensor([[t, 4, 6]]), **kw)
        assert torch.equal(pos[:3], ref[:, 0, n0:n0 + c.n_tokens]), (fps, n_frames)
        assert pos[3].abs().sum() == 0
        if v == "2.5" and fps == 3:
            assert pos[0].unique().tolist() != list(range(n0, n0 + t))   # the step is not 1: time matters


# ---------------------------------------------------------------------------------------------- logits / generate
def _hf_ids(chunks, video_token):
    ids, types = [], []
    for c in chunks:
        if c.type == "text":
            ids += c.tokens
            types += [0] * c.n_tokens
        else:
            ids += [video_token] * c.n_tokens
            types += [2] * c.n_tokens
    return ids, types


@pytest.mark.parametrize("v", VERSIONS)
def test_video_prompt_logits_match_hf(tiny, v, monkeypatch):
    monkeypatch.setenv("VLM_KERNELS", "torch")
    d, hf, m = tiny(v)
    frames, fps = _frames(5, seed=2), 3.0                            # odd: the last frame is repeated
    bmp = mtmd.Bitmap.from_video(frames, fps=fps)
    chunks = mtmd.tokenize(m, "Look:<__media__> what happens next?", [bmp])
    assert [c.type for c in chunks] == ["text", "video", "text"]
    cfg = hf.config
    assert chunks[0].tokens[-1] == cfg.vision_start_token_id and chunks[2].tokens[0] == cfg.vision_end_token_id
    m.reset()
    n_past = mtmd.eval_chunks(m, chunks)
    assert n_past == chunks[0].n_tokens + 3 + chunks[2].n_tokens   # a video advances max(rows, cols)
    vid = preprocess_qwen2vl_video(frames)
    ids, types = _hf_ids(chunks, cfg.video_token_id)
    kw = dict(second_per_grid_ts=torch.tensor([2 / fps])) if v == "2.5" else {}
    with torch.no_grad():
        ref = hf(input_ids=torch.tensor([ids]), pixel_values_videos=torch.from_numpy(vid.pixel_values),
                 video_grid_thw=torch.tensor([vid.grid_thw]), mm_token_type_ids=torch.tensor([types]),
                 **kw).logits[0, -1]
    ours = mtmd.context(m).last_logits
    err = (ours.float() - ref).abs().max().item()
    assert err <= TOL["logits_vs_hf"], f"Qwen{v}-VL video prompt: max abs error {err:.3g}"


def test_generate_with_video_is_greedy_hf_continuation(tiny):
    """generate(videos=...) and a chat video part: HF's greedy tokens (3 steps); the video is encoded once."""
    d, hf, m = tiny("2.5")
    frames = _frames(4, seed=3)
    m.reset()
    ctx = mtmd.context(m)
    text = m.generate("Clip:<__media__> Then", videos=[frames], max_tokens=3, temperature=0)
    got = m.last_result.tokens
    chunks = mtmd.tokenize(m, "Clip:<__media__> Then", [mtmd.Bitmap.from_video(frames)])
    ids, types = _hf_ids(chunks, hf.config.video_token_id)
    vid = preprocess_qwen2vl_video(frames)
    want, ids = [], torch.tensor([ids])
    with torch.no_grad():
        for _ in range(len(got)):
            types_t = torch.tensor([types + [0] * (ids.shape[1] - len(types))])
            nxt = int(hf(input_ids=ids, pixel_values_videos=torch.from_numpy(vid.pixel_values),
                         video_grid_thw=torch.tensor([vid.grid_thw]), mm_token_type_ids=types_t,
                         second_per_grid_ts=torch.tensor([1.0])).logits[0, -1].argmax())
            want.append(nxt)
            ids = torch.cat([ids, torch.tensor([[nxt]])], 1)
    assert got == want and text == m.detokenize(got)
    n_enc = ctx.n_encoded
    msgs = [{"role": "user", "content": [{"type": "video", "video": frames, "fps": 2},
                                         {"type": "text", "text": "Then"}]}]
    m.generate(msgs, max_tokens=1, temperature=0, chat_template="{% for m in messages %}{{ m['content'] }}"
                                                                  "{% endfor %}")
    assert ctx.n_encoded == n_enc                                     # same frames + fps: embedding cache hit
    total = m.last_result.stats.n_prompt_total
    msgs[0]["content"][0]["max_pixels"] = 28 * 28 * 4                # Qwen's message keys: per-video limits
    m.generate(msgs, max_tokens=1, temperature=0, chat_template="{% for m in messages %}{{ m['content'] }}"
                                                                  "{% endfor %}")
    assert ctx.n_encoded == n_enc + 1 and m.last_result.stats.n_prompt_total == total - 12 + 4   # 2 slots x 2


def test_video_bad_input(tiny):
    d, hf, m = tiny("2")
    mixed = _frames(2) + _frames(1, h=56, w=56)
    with pytest.raises(VideoFrameSizeError, match="frame 2 is 56x56 but frame 0 is 84x56"):
        mtmd.tokenize(m, "<__media__>", [mtmd.Bitmap.from_video(mixed)])
    chunks = mtmd.tokenize(m, "<__media__>", [mtmd.Bitmap.from_video(mixed, frame_policy="resize")])
    assert [c.n_tokens for c in chunks if c.type == "video"] == [12]
    # per-video pixel limits: 56x84 frames capped at 4 merged tokens (28·28·4 px) -> 2 slots x 2 tokens, counted
    # and encoded alike
    small = mtmd.Bitmap.from_video(_frames(4), max_pixels=28 * 28 * 4)
    c = next(c for c in mtmd.tokenize(m, "<__media__>", [small]) if c.type == "video")
    assert c.n_tokens == 4 and c.hw == (28, 56)
    assert mtmd.encode(m, c).shape[0] == 4
    m.reset()
    before = m.kv.seq_len(0)
    with pytest.raises(ContextFullError, match="n_ctx=256"):         # 90 frames: 45 slots x 6 tokens > 256
        m.generate("<__media__>x", videos=[_frames(90, seed=4)], max_tokens=1, temperature=0)
    assert m.kv.seq_len(0) == before

    from vlm.encoders.base import MmprojEncoder

    class _Clip(MmprojEncoder):   # a vision encoder without M-RoPE (CLIP / SigLIP towers): the base class's facts
        def __init__(self):
            self.config = type("C", (), {"projector_type": "mlp"})()
    ctx = mtmd.context(m)
    vision = ctx.vision
    try:
        ctx.vision = _Clip()
        with pytest.raises(mtmd.MediaError, match="needs a Qwen2-VL / Qwen2.5-VL mmproj.*mlp"):
            ctx.tokenize("<__media__>", [mtmd.Bitmap.from_video(_frames(2))])
    finally:
        ctx.vision = vision


def test_cli_generate_with_video(tiny, tmp_path, capsys):
    from vlm.cli import main
    d, _, m = tiny("2.5")
    gif = tmp_path / "clip.gif"
    gif.write_bytes(_animated(_frames(4, seed=5), duration=500))             # 2 fps
    args = ["generate", "-m", str(d / "text.gguf"), "--mmproj", str(d / "mmproj.gguf"), "-p", "What happens?",
            "-n", "3", "--temp", "0", "--device", "cpu"]
    rc = main(args + ["--video", str(gif)])
    out = capsys.readouterr()
    assert rc == 0, out.err
    m.reset()
    ref = m.generate("What happens?", videos=[_frames(4, seed=5)], max_tokens=3, temperature=0)
    assert out.out.rstrip("\n") == ref
    rc = main(args + ["--video", str(tmp_path / "clip.mp4")])
    assert rc == 1 and "ffmpeg" in capsys.readouterr().err


def test_truncated_or_random_animation_bytes_give_a_clear_error():
    """Every prefix cut of an animated GIF / WebP / PNG, and random bytes: a VideoError / ImageError, never
    another exception (Pillow raises IndexError, struct.error, ... on cut files) and never the first frames of a
    cut file passed off as the whole video (a GIF cut after its second frame decodes as 2 frames)."""
    from vlm.preprocess.image import ImageError
    rng = np.random.default_rng(9)
    for fmt in ("GIF", "WEBP", "PNG"):
        data = _animated(_frames(3, seed=6), fmt)
        assert len(load_video(data).frames) == 3
        cuts = sorted(set(rng.integers(1, len(data), 40).tolist()) | set(range(len(data) - 24, len(data))))
        for cut in cuts:
            with pytest.raises(ImageError):
                load_video(data[:cut])
    for n in (1, 7, 64, 1000):
        with pytest.raises(ImageError):
            load_video(rng.integers(0, 256, n, dtype=np.uint8).tobytes())


@pytest.mark.gpu
@pytest.mark.parametrize("v", VERSIONS)
def test_image_and_video_prompt_gpu_bf16_matches_cpu_fp32(tiny, v):
    """The whole Qwen path on a GPU in bf16 (vision tower, windows, merger, M-RoPE decoder): last-token logits of
    an image + video prompt vs our CPU fp32 run, which the tests above check against HF."""
    from vlm.model import load
    d, _, cpu = tiny(v)
    rng = np.random.default_rng(8)
    media = [rng.integers(0, 256, (84, 140, 3), dtype=np.uint8), mtmd.Bitmap.from_video(_frames(5, seed=7), fps=3)]
    prompt = "Picture:<__media__> and clip:<__media__> compared?"
    out = []
    for m in (cpu, load(str(d / "text.gguf"), str(d / "mmproj.gguf"), device="cuda", dtype=torch.bfloat16,
                        n_ctx=256)):
        m.reset()
        mtmd.eval_chunks(m, mtmd.tokenize(m, prompt, media))
        out.append(mtmd.context(m).last_logits.float().cpu())
    ref, got = out
    err = (got - ref).abs().max().item() / ref.abs().max().item()
    assert err <= 2e-2, f"Qwen{v}-VL bf16 GPU vs fp32 CPU: relative error {err:.3e}"   # bf16 row of the table
