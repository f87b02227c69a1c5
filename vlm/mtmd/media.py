"""Media items of the media API: :class:`Bitmap` (one image, audio clip or video, identified by a hash of its
bytes) and how user input (paths, bytes, arrays, frame lists) becomes one."""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field

import numpy as np
import torch

from vlm.errors import MediaError
from vlm.mtmd.video import load_frames, video_id
from vlm.preprocess import image as pimg
from vlm.preprocess.audio_decode import decode_pcm, load_audio

_AUDIO_MAGIC = (b"RIFF", b"fLaC", b"OggS", b"ID3", b"\xff\xfb", b"\xff\xf3", b"\xff\xf2", b"FORM")


@dataclass(eq=False)
class Bitmap:
    """One image, audio clip or video. `id` = SHA-256 (hex) of the bytes it came from (file bytes, the raw array;
    for a video its frames' ids, fps and frame policy).

    image: `data` holds the encoded file (decoded lazily, at encode time) or `array` an [H, W, 3|4|1] uint8 array.
    audio: `array` holds mono float32 PCM at 16 kHz (decoded and resampled at construction).
    video: `frames` holds one image Bitmap per frame, `fps` their rate (Bitmap.from_video; vlm.mtmd.video).
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
            return cls("audio", h.hexdigest(), array=decode_pcm(raw, sample_rate), name=name)
        raise MediaError(f"kind must be 'image' or 'audio', got {kind!r}")

    @classmethod
    def from_video(cls, source, *, fps: float | None = None, sample_fps: float | None = None,
                   max_frames: int | None = None, frame_policy: str = "error", name: str | None = None,
                   min_pixels: int | None = None, max_pixels: int | None = None) -> "Bitmap":
        """A video: a list of frames (paths, bytes, arrays, PIL images), a [T, H, W, C] uint8 array, a directory of
        images or an animated GIF / WebP / PNG; see vlm.preprocess.video.load_video for fps / sample_fps.
        min_pixels / max_pixels bound each resized frame (default: the Qwen image limits)."""
        v = load_frames(source, fps=fps, sample_fps=sample_fps, max_frames=max_frames, frame_policy=frame_policy,
                        name=name, min_pixels=min_pixels, max_pixels=max_pixels)
        frames = []
        for i, f in enumerate(v.frames):   # encoded files stay encoded until encode time
            fname = f"{v.name}[frame {i}]"
            frames.append(cls.from_bytes(f, "image", name=fname) if isinstance(f, bytes)
                          else cls.from_array(f, "image", name=fname))
        vid = video_id(v.fps, frame_policy, (min_pixels, max_pixels), [f.id for f in frames])
        return cls("video", vid, name=v.name, frames=frames, fps=v.fps, frame_policy=frame_policy,
                   pixel_limits=(min_pixels, max_pixels))

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


__all__ = ["Bitmap"]
