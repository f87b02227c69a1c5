"""Video in the media API: a Bitmap of kind "video" (frames + frame rate) -> one VIDEO chunk (Qwen2-VL / 2.5-VL).

    bmp = mtmd.Bitmap.from_video("clip.gif")                      # or frames, a directory, a [T, H, W, 3] array
    chunks = mtmd.tokenize(model, "<__media__>What happens?", [bmp])
    model.generate("<__media__>What happens?", videos=[["f0.png", "f1.png", "f2.png"]], temperature=0)

Layout, as the Qwen2-VL / Qwen2.5-VL chat templates and processors build it: ``<|vision_start|>`` + t·rows·cols
video tokens + ``<|vision_end|>``. Frames are resized to the smart_resize size of the first frame (same limits as
images) and paired: t = ceil(n_frames / 2) temporal slots, an odd count repeating its last frame
(vlm.preprocess.qwen_video); `min_pixels` / `max_pixels` per video override the image limits (HF's bare
Qwen2VLVideoProcessor defaults are 128·28·28 / 768·28·28). The templates write no time text for these models: the
time stamps are the M-RoPE
temporal positions — slot k at p + floor(k · step), step 1 for Qwen2-VL and tokens_per_second · 2 / fps for
Qwen2.5-VL (HF second_per_grid_ts), rows / columns as for an image; the next chunk starts at p + max(rows, cols)
(HF get_rope_index). Frames of different sizes are refused unless the bitmap's frame_policy is "resize".
"""
from __future__ import annotations

import hashlib

from vlm.preprocess import image as pimg
from vlm.preprocess.qwen_video import VideoFrameSizeError, preprocess_qwen2vl_video
from vlm.preprocess.video import DEFAULT_MAX_FRAMES, load_video

TEMPORAL_PATCH = 2
FRAME_POLICIES = ("error", "resize")


def video_bitmap(cls, source, *, fps: float | None = None, sample_fps: float | None = None,
                 max_frames: int = DEFAULT_MAX_FRAMES, frame_policy: str = "error", name: str | None = None,
                 min_pixels: int | None = None, max_pixels: int | None = None):
    """Bitmap of kind "video": its frames are image Bitmaps (encoded files stay encoded until encode time)."""
    from vlm.mtmd import MediaError
    if frame_policy not in FRAME_POLICIES:
        raise MediaError(f"frame_policy must be one of {FRAME_POLICIES}, got {frame_policy!r}")
    for what, v in (("min_pixels", min_pixels), ("max_pixels", max_pixels)):
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v <= 0):
            raise MediaError(f"{what} must be a positive int or None, got {v!r}")
    if min_pixels is not None and max_pixels is not None and min_pixels > max_pixels:
        raise MediaError(f"min_pixels {min_pixels} exceeds max_pixels {max_pixels}")
    v = load_video(source, fps=fps, sample_fps=sample_fps, max_frames=max_frames, name=name)
    frames = []
    for i, f in enumerate(v.frames):
        fname = f"{v.name}[frame {i}]"
        frames.append(cls.from_bytes(f, "image", name=fname) if isinstance(f, bytes)
                      else cls.from_array(f, "image", name=fname))
    h = hashlib.sha256(f"video:{v.fps!r}:{frame_policy}:{min_pixels}:{max_pixels}:{len(frames)}:".encode())
    for f in frames:
        h.update(f.id.encode())
    return cls("video", h.hexdigest(), name=v.name, frames=frames, fps=v.fps, frame_policy=frame_policy,
               pixel_limits=(min_pixels, max_pixels))


def _check_encoder(ctx, bmp):
    from vlm.mtmd import MediaError
    enc = ctx._enc("image")
    if not getattr(enc, "uses_mrope", False):
        raise MediaError(f"{bmp.name}: video input needs a Qwen2-VL / Qwen2.5-VL mmproj (M-RoPE video positions); "
                         f"this model's projector is {enc.config.projector_type}: pass the frames as images instead")
    return enc


def video_size(ctx, bmp) -> tuple[int, int]:
    """(height, width) every frame is resized to: the first frame's smart_resize size (frame sizes checked)."""
    sizes = [f.image_hw(ctx.image_mode, ctx.max_pixels) for f in bmp.frames]
    h, w = sizes[0]
    if bmp.frame_policy == "error":
        for i, s in enumerate(sizes[1:], 1):
            if s != (h, w):
                raise VideoFrameSizeError(f"{bmp.name}: frame {i} is {s[1]}x{s[0]} but frame 0 is {w}x{h}: all "
                                          f"frames of a video must share one size (or use frame_policy='resize')")
    from vlm.preprocess.qwen_image import qwen2vl_resized_size
    lo, hi = bmp.pixel_limits
    return qwen2vl_resized_size(h, w, patch_size=ctx._enc("image").config.patch_size, mode=ctx.image_mode,
                                min_pixels=lo, max_pixels=hi)


def video_layout(ctx, bmp) -> list:
    """[begin text, VIDEO chunk, end text] for one video, counted from the frame headers."""
    from vlm.mtmd import MEDIA_BEGIN_END, Chunk
    enc = _check_encoder(ctx, bmp)
    rh, rw = video_size(ctx, bmp)
    rows, cols = enc.token_grid(rh, rw)
    t = -(-len(bmp.frames) // TEMPORAL_PATCH)
    beg, end = MEDIA_BEGIN_END.get(enc.config.projector_type, ("", ""))
    return [beg, Chunk("video", t * rows * cols, max(rows, cols), bitmap=bmp, hw=(rh, rw), n_frames=t,
                       time_interval=enc.video_time_interval(bmp.fps)), end]


def preprocess_video(ctx, bmp):
    """The encoder input of one video: vlm.preprocess.qwen_video.QwenImage with grid_thw (t, h / p, w / p)."""
    enc = _check_encoder(ctx, bmp)
    cfg = enc.config
    frames = [pimg.decode_image(f.data, mode=ctx.image_mode, max_pixels=ctx.max_pixels) if f.data is not None
              else f.array for f in bmp.frames]
    lo, hi = bmp.pixel_limits
    return preprocess_qwen2vl_video(frames, patch_size=cfg.patch_size, mean=cfg.image_mean, std=cfg.image_std,
                                    mode=ctx.image_mode, policy=bmp.frame_policy, min_pixels=lo, max_pixels=hi)


__all__ = ["video_bitmap", "video_layout", "video_size", "preprocess_video"]
