"""Audio decoding: files, encoded bytes and raw PCM arrays -> mono float32 at the model's rate (16 kHz).

    from vlm.preprocess.audio_decode import load_audio
    pcm = load_audio("speech.flac")                       # np.float32 [n_samples] at 16 kHz
    pcm = load_audio(wav_bytes)                           # encoded WAV/FLAC/OGG/MP3 in memory
    pcm = load_audio(int16_array, sample_rate=44100)      # raw PCM: [n] or [n, channels] or [channels, n]

Decoding is libsndfile (through `soundfile`: WAV, FLAC, OGG/Vorbis/Opus and, from libsndfile 1.1, MP3);
resampling is libsoxr (`soxr`, "HQ" quality). Channels are averaged to mono before resampling. Integer PCM is
scaled to [-1, 1) the way libsndfile does it (int16 / 2**15, int32 / 2**31, uint8 (v - 128) / 2**7).

Everything that cannot become usable audio raises `AudioError` (a ValueError) naming the problem: data that does
not decode, empty audio, non-finite samples (NaN / inf), arrays of the wrong dtype or shape, and audio longer than
`max_seconds` (checked from the file header before the samples are decoded). A path that does not exist raises
FileNotFoundError.
"""
from __future__ import annotations

import io
import os
from typing import TYPE_CHECKING, BinaryIO, Union

import numpy as np

if TYPE_CHECKING:
    import torch

SAMPLE_RATE = 16_000              # Whisper-family encoders (ultravox, qwen2a, voxtral, ...) all take 16 kHz
DEFAULT_MAX_SECONDS = 3600.0      # one hour; pass max_seconds=None to lift the limit
MAX_CHANNELS = 64                 # a 2-D array's channel axis must be this short (and shorter than the time axis)
RESAMPLE_QUALITY = "HQ"           # soxr quality preset

AudioSource = Union[str, os.PathLike, bytes, bytearray, memoryview, BinaryIO, np.ndarray, "torch.Tensor", list]


class AudioError(ValueError):
    """Audio that cannot be decoded or used: bad data, empty, non-finite, wrong dtype/shape, too long."""


# integer PCM -> float scale and offset: x = (v - offset) / scale
_INT_SCALE = {
    np.dtype(np.int8): (0.0, 2.0 ** 7),
    np.dtype(np.uint8): (128.0, 2.0 ** 7),
    np.dtype(np.int16): (0.0, 2.0 ** 15),
    np.dtype(np.int32): (0.0, 2.0 ** 31),
    np.dtype(np.int64): (0.0, 2.0 ** 63),
}


def _check_rate(rate, what: str) -> int:
    if isinstance(rate, bool) or not isinstance(rate, (int, np.integer)) or int(rate) <= 0:
        raise AudioError(f"{what} must be a positive integer number of Hz, got {rate!r}")
    return int(rate)


def _check_duration(n_frames: int, rate: int, max_seconds: float | None, what: str) -> None:
    if n_frames <= 0:
        raise AudioError(f"{what} is empty (0 samples)")
    if max_seconds is not None and n_frames / rate > max_seconds:
        raise AudioError(f"{what} is {n_frames / rate:.2f} s long ({n_frames} samples at {rate} Hz), over the "
                         f"limit of {max_seconds:g} s (raise max_seconds= or pass max_seconds=None)")


def pcm_to_float(pcm: np.ndarray) -> np.ndarray:
    """Integer or float PCM -> float32 with the same shape (integers scaled to [-1, 1) as libsndfile does)."""
    dt = pcm.dtype
    if dt in _INT_SCALE:
        offset, scale = _INT_SCALE[dt]
        out = pcm.astype(np.float64) if dt.itemsize >= 4 else pcm.astype(np.float32)
        if offset:
            out -= offset
        return (out / scale).astype(np.float32, copy=False)
    if dt.kind == "f":
        return pcm.astype(np.float32, copy=False)
    raise AudioError(f"unsupported PCM dtype {dt} (use float16/32/64 in [-1, 1] or int8/uint8/int16/int32/int64)")


def to_mono(pcm: np.ndarray) -> np.ndarray:
    """[n] or [n, channels] or [channels, n] -> [n] (channel mean). The channel axis is the short one: it must be
    at most MAX_CHANNELS long and shorter than the time axis, otherwise the layout is ambiguous (AudioError)."""
    if pcm.ndim == 1:
        return pcm
    if pcm.ndim != 2:
        raise AudioError(f"PCM must be 1-D [n_samples] or 2-D [n_samples, channels] / [channels, n_samples], "
                         f"got shape {tuple(pcm.shape)}")
    rows, cols = pcm.shape
    if cols == 1:
        return pcm[:, 0]
    if rows == 1:
        return pcm[0]
    if cols <= MAX_CHANNELS and cols < rows:
        axis = 1
    elif rows <= MAX_CHANNELS and rows < cols:
        axis = 0
    else:
        raise AudioError(f"cannot tell the channel axis of PCM with shape {tuple(pcm.shape)}: the channel axis must "
                         f"be the shorter one and at most {MAX_CHANNELS} long")
    return pcm.mean(axis=axis, dtype=np.float64).astype(np.float32)


def resample(pcm: np.ndarray, orig_rate: int, target_rate: int = SAMPLE_RATE) -> np.ndarray:
    """Mono float32 [n] from orig_rate to target_rate with libsoxr (HQ); a no-op when the rates are equal."""
    orig_rate = _check_rate(orig_rate, "orig_rate")
    target_rate = _check_rate(target_rate, "target_rate")
    pcm = np.ascontiguousarray(pcm, dtype=np.float32)
    if orig_rate == target_rate:
        return pcm
    soxr = _require("soxr", "resampling")
    return np.ascontiguousarray(soxr.resample(pcm, orig_rate, target_rate, quality=RESAMPLE_QUALITY),
                                dtype=np.float32)


def _finish(pcm: np.ndarray, rate: int, target_rate: int, what: str) -> np.ndarray:
    """float32 [n] or [n, ch] -> finite mono float32 [n'] at target_rate."""
    mono = to_mono(pcm)
    finite = np.isfinite(mono)
    if not finite.all():
        n_bad = int(mono.size - np.count_nonzero(finite))
        if n_bad == mono.size:
            kind = "NaN" if np.isnan(mono).all() else "non-finite (NaN/inf)"
            raise AudioError(f"{what} is all {kind} ({mono.size} samples)")
        raise AudioError(f"{what} has {n_bad} non-finite samples (NaN/inf) out of {mono.size}")
    out = resample(mono, rate, target_rate)
    if out.size == 0:
        raise AudioError(f"{what} is empty after resampling {mono.size} samples from {rate} Hz to {target_rate} Hz")
    return out


def _require(module: str, what: str):
    try:
        return __import__(module)
    except ImportError as e:
        raise ImportError(f"{what} needs the `{module}` package: pip install {module}") from e


def _decode_file(f, what: str, target_rate: int, max_seconds: float | None) -> np.ndarray:
    sf = _require("soundfile", "audio decoding")
    try:
        with sf.SoundFile(f) as snd:
            rate, n_frames = int(snd.samplerate), int(snd.frames)
            _check_duration(n_frames, rate, max_seconds, what)
            pcm = snd.read(dtype="float32", always_2d=True)
    except AudioError:
        raise
    except (sf.LibsndfileError, RuntimeError, TypeError, ValueError) as e:
        raise AudioError(f"cannot decode audio from {what}: {e}") from None
    if pcm.shape[0] == 0:                        # header said frames > 0 but nothing decoded (truncated file)
        raise AudioError(f"cannot decode audio from {what}: no samples could be read")
    return _finish(pcm, rate, target_rate, what)


def load_audio(source: AudioSource, *, sample_rate: int | None = None, target_rate: int = SAMPLE_RATE,
               max_seconds: float | None = DEFAULT_MAX_SECONDS) -> np.ndarray:
    """Decode `source` to mono float32 [n_samples] at `target_rate` Hz.

    source: a path (str / os.PathLike), encoded file bytes (bytes / bytearray / memoryview), a binary file object,
      or raw PCM (np.ndarray / torch.Tensor / list of numbers) — the latter needs `sample_rate=`; PCM is 1-D or 2-D
      with channels on the short axis, integer (scaled as libsndfile does) or float in [-1, 1].
    max_seconds: duration limit before resampling (None = no limit).
    """
    target_rate = _check_rate(target_rate, "target_rate")
    if max_seconds is not None and not max_seconds > 0:
        raise AudioError(f"max_seconds must be > 0 or None, got {max_seconds!r}")
    if isinstance(source, (str, os.PathLike)):
        if sample_rate is not None:
            raise AudioError("sample_rate= is for raw PCM arrays; a file carries its own rate")
        path = os.fspath(source)
        if not os.path.exists(path):
            raise FileNotFoundError(f"audio file not found: {path}")
        if os.path.isdir(path):
            raise AudioError(f"audio path is a directory: {path}")
        if os.path.getsize(path) == 0:
            raise AudioError(f"audio file {path} is empty (0 bytes)")
        return _decode_file(path, f"file {path}", target_rate, max_seconds)
    if isinstance(source, (bytes, bytearray, memoryview)):
        if sample_rate is not None:
            raise AudioError("sample_rate= is for raw PCM arrays; encoded bytes carry their own rate")
        data = bytes(source)
        if not data:
            raise AudioError("audio data is empty (0 bytes)")
        return _decode_file(io.BytesIO(data), f"{len(data)} bytes of data", target_rate, max_seconds)
    if hasattr(source, "read"):
        if sample_rate is not None:
            raise AudioError("sample_rate= is for raw PCM arrays; a file object carries its own rate")
        return _decode_file(source, "file object", target_rate, max_seconds)
    return decode_pcm(source, sample_rate, target_rate=target_rate, max_seconds=max_seconds)


def decode_pcm(pcm, sample_rate: int | None, *, target_rate: int = SAMPLE_RATE,
                    max_seconds: float | None = DEFAULT_MAX_SECONDS) -> np.ndarray:
    """Raw PCM array (numpy, torch or list) at `sample_rate` -> mono float32 [n] at target_rate (16 kHz default)."""
    if sample_rate is None:
        raise AudioError("raw PCM needs its rate: pass sample_rate= (e.g. load_audio(pcm, sample_rate=44100))")
    rate = _check_rate(sample_rate, "sample_rate")
    if type(pcm).__module__.startswith("torch"):
        pcm = pcm.detach().cpu().numpy()
    elif isinstance(pcm, (list, tuple)):
        try:
            pcm = np.asarray(pcm, dtype=np.float32)
        except (TypeError, ValueError) as e:
            raise AudioError(f"cannot turn a {type(pcm).__name__} into PCM samples: {e}") from None
    elif not isinstance(pcm, np.ndarray):
        raise AudioError(f"unsupported audio source of type {type(pcm).__name__} (give a path, bytes, a file "
                         f"object or a PCM array)")
    if pcm.ndim not in (1, 2):
        raise AudioError(f"PCM must be 1-D [n_samples] or 2-D [n_samples, channels] / [channels, n_samples], "
                         f"got shape {tuple(pcm.shape)}")
    pcm = pcm_to_float(pcm)
    n_frames = pcm.shape[0] if pcm.ndim == 1 else max(pcm.shape)
    if pcm.size == 0:
        raise AudioError(f"PCM is empty (shape {tuple(pcm.shape)})")
    _check_duration(n_frames, rate, max_seconds, "PCM")
    return _finish(pcm, rate, target_rate, "PCM")
