"""Whisper-style log-mel spectrogram (the audio front end of ultravox / qwen2a / voxtral / ... encoders).

    from vlm.preprocess.audio import load_audio, log_mel_spectrogram
    pcm = load_audio("speech.wav")                         # mono float32 at 16 kHz (see audio_decode.py)
    mel = log_mel_spectrogram(pcm, n_mels=128)             # torch.float32 [n_chunks, 128, 3000]

Parameters (Whisper's): 16 kHz, n_fft 400, hop 160, periodic Hann window of 400, power spectrum, Slaney-scale mel
filters with Slaney area normalisation from 0 to 8000 Hz (80 or 128 bins), log10 with a floor, clamp to
(max - 8), then (x + 4) / 4. One chunk is 30 s = 480,000 samples = 3000 frames.

Two modes:

`hf` (default) — equal to `transformers.WhisperFeatureExtractor` (torch path) on every 30 s chunk:
  * the clip is cut into ceil(n / 480000) chunks (at least one); each chunk is zero-padded to 480,000 samples,
    reflect-padded by 200 samples on both sides (torch.stft center=True), 3001 frames are formed and the last
    dropped, so a chunk is 3000 frames;
  * floor 1e-10 before log10; the (max - 8) clamp uses each chunk's own max.
  A clip longer than 30 s given to the extractor is truncated to its first 30 s: chunk 0 here is exactly that, and
  chunk i equals the extractor's output on audio[i*480000 : (i+1)*480000].

`llamacpp` — llama.cpp's `mtmd_audio_preprocessor_whisper` (tools/mtmd/mtmd-audio.cpp, read at commit 0024aa7):
  * a clip shorter than 31 s (496,000 samples) is first zero-padded to 496,000 samples; call that length N;
  * the signal is reflect-padded by 200 samples at the start only (samples 200..1 reversed) and followed by zeros
    (the 480,000 + 200 zeros llama.cpp appends are never reached by a frame, see next point);
  * the frame count is (N - 400) // 160 + 1, computed from N *before* the 30 s padding, so the last frame ends
    200 samples before sample N, and no frame ever reads the appended zeros or a reflected end;
  * floor 2**-24 (5.96e-8, filter_params.mel_floor) before log10, and the (max - 8) clamp uses one global max over
    all frames (the other stored revision, 40e7a15, which lacks the newer gemma4a / parakeet code, clamped at 1e-10
    as HF does);
  * the frames are cut into 3000-frame chunks and an incomplete trailing chunk is dropped. Consequences: a clip of
    up to 60.015 s gives one chunk (3000 frames) — the tail past 30 s is lost; 60.015 s .. 90.015 s gives two, etc.
    (HF mode gives ceil(seconds / 30) chunks instead.)
  Differences from HF mode therefore: the floor (matters when the loudest bin is below log10(2**-24) + 8 = 0.78),
  the global rather than per-chunk max, frames crossing 30 s chunk boundaries (one continuous STFT instead of one
  STFT per chunk), the end of the clip (zeros instead of a reflection), and the chunk count. For a clip under
  ~30 s whose loudest mel bin is above 0.78 the two modes give the same numbers (up to float rounding).
  llama.cpp's own FFT (radix-2 splits down to a 25-point DFT, sin/cos table) and double-precision mel sums are
  not reproduced bit for bit: any two float32 FFTs differ on the faintest bins of speech frames, by up to ~5e-5
  in the final features (measured between two torch float32 paths), elsewhere by ~1e-7.

Computation (both modes): frames are strided views of the clip itself (only the few frames that reach into the
padding are built explicitly), windowed, transformed by torch.fft.rfft and projected by the banded filterbank.
On CUDA every frame of every chunk goes through one rfft call (batch_frames=None); on CPU in blocks of 1500
frames, which keeps the intermediates in cache (measured faster than one call). Frames whose 400-sample window
holds only padding zeros have a power spectrum of exactly 0, so they are not transformed: they get log10(floor),
the value the full computation gives them (a 5 s clip transforms 502 frames instead of 3000).
"""
from __future__ import annotations

import functools
import math
import threading

import numpy as np
import torch

from vlm.preprocess.audio_decode import (DEFAULT_MAX_SECONDS, SAMPLE_RATE, AudioError, decode_pcm, load_audio,
                                         pcm_to_float, resample, to_mono)

N_FFT = 400                           # FFT size = window length (25 ms)
HOP_LENGTH = 160                      # 10 ms
N_FREQ = N_FFT // 2 + 1               # 201 one-sided frequency bins
PAD = N_FFT // 2                      # 200: reflect padding at the start (and at the end in hf mode)
FMIN, FMAX = 0.0, 8000.0
CHUNK_SECONDS = 30
CHUNK_SAMPLES = CHUNK_SECONDS * SAMPLE_RATE          # 480,000
CHUNK_FRAMES = CHUNK_SAMPLES // HOP_LENGTH           # 3000
HF_FLOOR = 1e-10                      # WhisperFeatureExtractor: clamp(min=1e-10).log10()
LLAMACPP_FLOOR = 2.0 ** -24           # mtmd-audio.cpp filter_params.mel_floor = 5.960464477539063e-08
LLAMACPP_MIN_SAMPLES = (CHUNK_SECONDS + 1) * SAMPLE_RATE   # 496,000: llama.cpp zero-pads shorter clips to 31 s
MODES = ("hf", "llamacpp")

__all__ = ["AudioError", "load_audio", "decode_pcm", "resample", "to_mono", "pcm_to_float", "SAMPLE_RATE",
           "DEFAULT_MAX_SECONDS", "MODES", "N_FFT", "HOP_LENGTH", "CHUNK_SAMPLES", "CHUNK_FRAMES",
           "mel_filterbank", "hann_window", "log_mel_spectrogram", "n_audio_chunks", "audio_to_log_mel"]


# ---------------------------------------------------------------------------------------------- filterbank
def hz_to_mel(f: torch.Tensor) -> torch.Tensor:
    """Slaney mel scale (librosa default): linear 3 mel / 200 Hz below 1 kHz, logarithmic (27 mel per ln 6.4) above."""
    lin = f * (3.0 / 200.0)
    log = 15.0 + torch.log(torch.clamp(f, min=1e-30) / 1000.0) * (27.0 / math.log(6.4))
    return torch.where(f < 1000.0, lin, log)


def mel_to_hz(m: torch.Tensor) -> torch.Tensor:
    """Inverse of hz_to_mel."""
    lin = m * (200.0 / 3.0)
    log = 1000.0 * torch.exp((m - 15.0) * (math.log(6.4) / 27.0))
    return torch.where(m < 15.0, lin, log)


@functools.lru_cache(maxsize=32)
def _mel_filterbank(n_mels: int, n_fft: int, sample_rate: int, fmin: float, fmax: float, device: str) -> torch.Tensor:
    n_freq = n_fft // 2 + 1
    # n_mels + 2 edges equally spaced on the mel scale, back in Hz (float64 throughout, float32 at the end)
    edges = mel_to_hz(torch.linspace(float(hz_to_mel(torch.tensor(fmin, dtype=torch.float64))),
                                     float(hz_to_mel(torch.tensor(fmax, dtype=torch.float64))),
                                     n_mels + 2, dtype=torch.float64))
    freqs = torch.arange(n_freq, dtype=torch.float64) * (sample_rate / n_fft)        # bin k at k * sr / n_fft Hz
    left, center, right = edges[:-2, None], edges[1:-1, None], edges[2:, None]      # [n_mels, 1] each
    rising = (freqs - left) / (center - left)
    falling = (right - freqs) / (right - center)
    tri = torch.clamp(torch.minimum(rising, falling), min=0.0)                        # [n_mels, n_freq] triangles
    area_norm = 2.0 / (right - left)                                                  # Slaney: each filter's area 1
    fb = (tri * area_norm).to(torch.float32).to(device)
    fb.requires_grad_(False)
    return fb


def mel_filterbank(n_mels: int = 80, *, n_fft: int = N_FFT, sample_rate: int = SAMPLE_RATE, fmin: float = FMIN,
                   fmax: float = FMAX, device: str | torch.device = "cpu") -> torch.Tensor:
    """Slaney mel filters with Slaney area normalisation, float32 [n_mels, n_fft // 2 + 1], cached per arguments.
    The cached tensor is shared: do not modify it in place."""
    if isinstance(n_mels, bool) or not isinstance(n_mels, (int, np.integer)) or n_mels <= 0:
        raise ValueError(f"n_mels must be a positive integer, got {n_mels!r}")
    if not 0.0 <= fmin < fmax <= sample_rate / 2:
        raise ValueError(f"need 0 <= fmin < fmax <= sample_rate / 2, got fmin={fmin}, fmax={fmax}, "
                         f"sample_rate={sample_rate}")
    return _mel_filterbank(int(n_mels), int(n_fft), int(sample_rate), float(fmin), float(fmax),
                           str(torch.device(device)))


@functools.lru_cache(maxsize=8)
def _hann_window(n: int, device: str) -> torch.Tensor:
    return torch.hann_window(n, periodic=True, dtype=torch.float32, device=device)


def hann_window(n: int = N_FFT, device: str | torch.device = "cpu") -> torch.Tensor:
    """Periodic Hann window float32 [n] (torch.hann_window), cached; do not modify it in place."""
    return _hann_window(int(n), str(torch.device(device)))


MEL_GROUP = 16          # mel filters per block of the banded filterbank product (see _filter_groups)
CPU_BATCH_FRAMES = 1500  # frames per FFT call on CPU (divides 3000); see _default_batch_frames


@functools.lru_cache(maxsize=16)
def _filter_groups(n_mels: int, device: str) -> tuple:
    """The filterbank as blocks of MEL_GROUP filters, each restricted to the FFT bins where it is non-zero.

    Each triangle spans a few bins, so the [n_mels, 201] matrix is 2-5 % non-zero: multiplying only the non-zero
    column band of each block of 16 filters does about a quarter of the dense work. The weights are laid out for the
    squared interleaved spectrum [n_frames, 402] = (re0^2, im0^2, re1^2, im1^2, ...): columns 2k and 2k+1 both hold
    filter column k, so the product also sums re^2 + im^2 (the power) on the way.
    Returns ((m0, m1, c0, c1, w [m1 - m0, c1 - c0] or None when the block is all zero), ...), with c0, c1 in the
    interleaved column space."""
    fb = mel_filterbank(n_mels, device=device)
    groups = []
    for m0 in range(0, n_mels, MEL_GROUP):
        m1 = min(n_mels, m0 + MEL_GROUP)
        cols = torch.nonzero(fb[m0:m1].abs().sum(0)).flatten()
        if cols.numel() == 0:
            groups.append((m0, m1, 0, 0, None))
            continue
        k0, k1 = int(cols[0]), int(cols[-1]) + 1
        w = fb[m0:m1, k0:k1].repeat_interleave(2, dim=1).contiguous()       # [m1 - m0, 2 (k1 - k0)]
        groups.append((m0, m1, 2 * k0, 2 * k1, w))
    return tuple(groups)


def _default_batch_frames(device: torch.device) -> int | None:
    """CUDA: every frame of every chunk in one FFT call. CPU: blocks of 1500 frames through per-thread buffers
    (_workspace), which stay in cache; one call over 8 chunks has 40-90 MB of fresh intermediates and measured ~2x
    slower, and for one chunk 1500 measured as fast as 3000 or 1000 (single thread, with other work in between)."""
    return None if device.type == "cuda" else CPU_BATCH_FRAMES


@functools.lru_cache(maxsize=64)
def _edge_index(n_real: int, seg_len: int, right_reflect: bool, fa: int, fb: int) -> tuple:
    """(positions int64 [n], zero mask bool [n] or None) of the samples of frames [fa, fb) of one padded segment,
    relative to the segment start. Cached: every full 30 s chunk asks for the same few hundred positions, and
    building them costs more than gathering them (measured ~0.2 ms per chunk, 5 % of a 30 s log-mel)."""
    j = np.abs(np.arange(fa * HOP_LENGTH - PAD, (fb - 1) * HOP_LENGTH + N_FFT - PAD))
    if right_reflect:
        j = np.where(j >= seg_len, 2 * (seg_len - 1) - j, j)
    valid = j < n_real
    zero = None if valid.all() else torch.from_numpy(~valid)
    return torch.from_numpy(np.minimum(j, n_real - 1)), zero


def _edge_frames(x: torch.Tensor, s0: int, n_real: int, seg_len: int, right_reflect: bool, fa: int,
                 fb: int) -> torch.Tensor:
    """Frames [fa, fb) of one padded segment, built explicitly (the frames that reach into padding).

    The segment is x[s0 : s0 + n_real] zero-padded to seg_len samples; frame f reads segment positions
    [160 f - 200, 160 f + 200). Positions < 0 are reflected (-j); positions >= seg_len are reflected about the
    last sample (2 (seg_len - 1) - j) when right_reflect, else they are zeros (as are positions >= n_real)."""
    pos, zero = _edge_index(n_real, seg_len, right_reflect, fa, fb)
    samples = x[s0:s0 + n_real][pos.to(x.device)]
    if zero is not None:
        samples[zero.to(x.device)] = 0.0
    return samples.unfold(0, N_FFT, HOP_LENGTH)                               # [fb - fa, 400]


def _segment_sources(x: torch.Tensor, s0: int, n_real: int, seg_len: int, right_reflect: bool, n_frames: int,
                     f_offset: int) -> list:
    """Where the first n_frames frames of a segment come from: [(f_start, f_end, frames [f_end - f_start, 400])]
    in global frame numbers (f_offset + local). Frames 2 .. (n_real - 200) // 160 lie wholly inside the real
    samples and are strided views of x itself (no copy); the few frames at either end are built by _edge_frames."""
    d0 = 2                                                                    # frames 0, 1 read the reflection
    d1 = min(n_frames, (n_real - PAD) // HOP_LENGTH + 1)                     # 160 f + 200 <= n_real
    if d1 <= d0:
        return [(f_offset, f_offset + n_frames, _edge_frames(x, s0, n_real, seg_len, right_reflect, 0, n_frames))]
    start = s0 + d0 * HOP_LENGTH - PAD
    direct = x[start:start + (d1 - d0 - 1) * HOP_LENGTH + N_FFT].unfold(0, N_FFT, HOP_LENGTH)
    out = [(f_offset, f_offset + d0, _edge_frames(x, s0, n_real, seg_len, right_reflect, 0, d0)),
           (f_offset + d0, f_offset + d1, direct)]
    if d1 < n_frames:
        out.append((f_offset + d1, f_offset + n_frames,
                    _edge_frames(x, s0, n_real, seg_len, right_reflect, d1, n_frames)))
    return out


def _fill_frames(sources: list, f0: int, f1: int, win: torch.Tensor, frames: torch.Tensor) -> None:
    """frames[:f1 - f0] = window * frames f0 .. f1 - 1, gathered from the sources that overlap [f0, f1)."""
    for a, b, view in sources:
        lo, hi = max(a, f0), min(b, f1)
        if lo < hi:
            torch.mul(view[lo - a:hi - a], win, out=frames[lo - f0:hi - f0])


_tls = threading.local()


def _workspace(n_frames: int, device: torch.device) -> tuple:
    """Per-thread reusable (frames float32 [n, 400], spectrum complex64 [n, 201]) buffers for the blocked path.
    Fresh multi-MB buffers on every call cost page faults (first touch) that measured as much as the FFT itself
    when other work runs between calls; reusing them keeps ~5 MB per thread and device alive."""
    cache = _tls.__dict__.setdefault("buffers", {})
    key = str(device)
    bufs = cache.get(key)
    if bufs is None or bufs[0].shape[0] < n_frames:
        bufs = (torch.empty(n_frames, N_FFT, device=device),
                torch.empty(n_frames, N_FREQ, dtype=torch.complex64, device=device))
        cache[key] = bufs
    return bufs[0][:n_frames], bufs[1][:n_frames]


def _mel_power_into(sources: list, n_active: int, out: torch.Tensor, batch_frames: int | None) -> None:
    """Mel power of frames 0 .. n_active - 1 into out float32 [C, n_mels, 3000] (frame f -> out[f // 3000, :,
    f % 3000]); the remaining frames see only padding zeros and get 0, their exact mel power.

    batch_frames None: one window-multiply, one rfft and one batched product per filter block for all frames.
    Otherwise blocks of batch_frames frames (a divisor of 3000, so a block never crosses a chunk)."""
    n_chunks, n_mels, _ = out.shape
    win = hann_window(N_FFT, out.device)
    groups = _filter_groups(n_mels, str(out.device))
    if batch_frames is None:
        n_all = -(-n_active // CHUNK_FRAMES) * CHUNK_FRAMES
        frames = out.new_zeros(n_all, N_FFT)
        _fill_frames(sources, 0, n_active, win, frames)
        spec = torch.view_as_real(torch.fft.rfft(frames)).view(n_all // CHUNK_FRAMES, CHUNK_FRAMES, 2 * N_FREQ)
        spec.square_()                                                        # (re^2, im^2) pairs
        for m0, m1, c0, c1, w in groups:
            res = 0.0 if w is None else torch.matmul(w, spec[..., c0:c1].transpose(1, 2))
            out[:n_all // CHUNK_FRAMES, m0:m1] = res
    else:
        frames, spec_c = _workspace(batch_frames, out.device)
        for f0 in range(0, n_active, batch_frames):
            c, r0 = divmod(f0, CHUNK_FRAMES)
            r1 = min(r0 + batch_frames, n_active - c * CHUNK_FRAMES)
            n_b = r1 - r0
            _fill_frames(sources, f0, f0 + n_b, win, frames)
            torch.fft.rfft(frames[:n_b], out=spec_c[:n_b])
            spec = torch.view_as_real(spec_c[:n_b]).view(n_b, 2 * N_FREQ)
            spec.square_()
            for m0, m1, c0, c1, w in groups:
                if w is None:
                    out[c, m0:m1, r0:r1] = 0.0
                else:
                    torch.mm(w, spec[:, c0:c1].T, out=out[c, m0:m1, r0:r1])
    c, r = divmod(n_active, CHUNK_FRAMES)
    if c < n_chunks:
        out[c, :, r:] = 0.0
        out[c + 1:] = 0.0


def _log_clamp_scale(mel: torch.Tensor, floor: float, per_chunk: bool, n_keep: int) -> torch.Tensor:
    """mel power [C, n_mels, 3000] (in place) -> (max(log10(max(mel, floor)), peak - 8) + 4) / 4 for its first
    n_keep chunks; peak = the max of log10(max(mel, floor)) per chunk or over all C chunks.

    The floor clamp comes first also for speed: log10(0) takes a slow path (25x slower per element, measured).
    (y + 4) / 4 == 1 + y * 0.25 exactly in binary floating point (scaling by 4 is exact and commutes with rounding),
    so the last step is one pass."""
    mel.clamp_(min=floor).log10_()
    peak = mel.amax(dim=(1, 2), keepdim=True) if per_chunk else mel.max()
    _check_finite(peak)                                                    # NaN / inf samples propagate to here
    mel = mel[:n_keep]
    mel.clamp_(min=(peak[:n_keep] if per_chunk else peak) - 8.0)
    one = torch.ones((), dtype=mel.dtype, device=mel.device)
    return torch.add(one, mel, alpha=0.25, out=mel)                          # 1 + x / 4 in one pass


# ---------------------------------------------------------------------------------------------- helpers
def _as_audio_tensor(audio, device) -> torch.Tensor:
    if isinstance(audio, np.ndarray):
        if audio.dtype.kind != "f":
            raise AudioError(f"log_mel_spectrogram expects float PCM in [-1, 1], got dtype {audio.dtype} "
                             f"(convert integer PCM with load_audio / pcm_to_float)")
        x = torch.from_numpy(np.ascontiguousarray(audio) if audio.flags.writeable else np.array(audio))
    elif isinstance(audio, torch.Tensor):
        if not audio.dtype.is_floating_point:
            raise AudioError(f"log_mel_spectrogram expects float PCM in [-1, 1], got dtype {audio.dtype} "
                             f"(convert integer PCM with load_audio / pcm_to_float)")
        x = audio.detach()
    else:
        raise AudioError(f"log_mel_spectrogram expects a numpy array or torch tensor, got {type(audio).__name__}")
    if x.dim() != 1:
        raise AudioError(f"log_mel_spectrogram expects mono 1-D audio [n_samples], got shape {tuple(x.shape)} "
                         f"(mix down with load_audio / to_mono)")
    if x.numel() == 0:
        raise AudioError("audio is empty (0 samples)")
    return x.to(device=device if device is not None else x.device, dtype=torch.float32).contiguous()


def _check_mode(mode: str) -> None:
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")


def _check_finite(peak: torch.Tensor) -> None:
    if not bool(torch.isfinite(peak).all()):
        raise AudioError("audio has non-finite samples (NaN/inf); load_audio rejects such input with details")


def n_audio_chunks(n_samples: int, mode: str = "hf") -> int:
    """Number of 3000-frame chunks log_mel_spectrogram returns for a 16 kHz clip of n_samples (n_samples >= 1)."""
    _check_mode(mode)
    if n_samples <= 0:
        raise AudioError(f"audio is empty ({n_samples} samples)")
    if mode == "hf":
        return -(-n_samples // CHUNK_SAMPLES)
    n_frames = (max(n_samples, LLAMACPP_MIN_SAMPLES) - N_FFT) // HOP_LENGTH + 1
    return n_frames // CHUNK_FRAMES


# ---------------------------------------------------------------------------------------------- log-mel
def _log_mel_hf(x: torch.Tensor, n_mels: int, batch_frames: int | None) -> torch.Tensor:
    n = x.numel()
    n_chunks = -(-n // CHUNK_SAMPLES)
    sources = []
    for c in range(n_chunks):
        # chunk c: samples [480000 c, 480000 (c + 1)) zero-padded to 480,000, reflect-padded by 200 both sides
        # (torch.stft center=True builds 3001 frames of it; the extractor drops the last, so 3000 remain)
        n_real = min(CHUNK_SAMPLES, n - c * CHUNK_SAMPLES)
        # frame i covers chunk samples [160 i - 200, 160 i + 200): non-zero only if 160 i - 200 < n_real
        n_frames = min(CHUNK_FRAMES, -(-(n_real + PAD) // HOP_LENGTH))
        sources += _segment_sources(x, c * CHUNK_SAMPLES, n_real, CHUNK_SAMPLES, True, n_frames, c * CHUNK_FRAMES)
    n_active = sources[-1][1]                                      # a prefix: only the last chunk can be partial
    mel = x.new_empty(n_chunks, n_mels, CHUNK_FRAMES)
    _mel_power_into(sources, n_active, mel, batch_frames)
    return _log_clamp_scale(mel, HF_FLOOR, True, n_chunks)         # per-chunk max, as the extractor on each chunk


def _log_mel_llamacpp(x: torch.Tensor, n_mels: int, batch_frames: int | None) -> torch.Tensor:
    n = x.numel()
    n_eff = max(n, LLAMACPP_MIN_SAMPLES)                           # short clips zero-padded to 31 s
    n_frames = (n_eff - N_FFT) // HOP_LENGTH + 1                   # from the length before the 30 s zero tail
    n_chunks = n_frames // CHUNK_FRAMES                            # incomplete trailing chunk dropped
    # one continuous STFT over [200 reflected | clip | zeros]; frame f covers clip samples [160 f - 200, 160 f + 200)
    # so frames past n_act are all zeros
    n_act = min(n_frames, -(-(n + PAD) // HOP_LENGTH))
    sources = _segment_sources(x, 0, n, n, False, n_act, 0)
    n_slots = -(-n_frames // CHUNK_FRAMES)                         # + the dropped partial chunk (it counts for the max)
    mel = x.new_empty(n_slots, n_mels, CHUNK_FRAMES)
    _mel_power_into(sources, n_act, mel, batch_frames)
    c, r = divmod(n_frames, CHUNK_FRAMES)                          # slots past n_frames do not exist in llama.cpp:
    if c < n_slots:                                                # power 0 -> the floor, which cannot raise the max
        mel[c, :, r:] = 0.0
    return _log_clamp_scale(mel, LLAMACPP_FLOOR, False, n_chunks)  # one max over every frame, dropped ones too


def log_mel_spectrogram(audio, n_mels: int = 80, *, mode: str = "hf", device: str | torch.device | None = None,
                        batch_frames: int | None = -1) -> torch.Tensor:
    """Whisper log-mel features of a mono 16 kHz clip -> float32 [n_chunks, n_mels, 3000] (30 s per chunk).

    audio: float PCM in [-1, 1], 1-D numpy array or torch tensor at 16 kHz (decode files with load_audio).
    n_mels: 80 (Whisper <= v2, ultravox, qwen2a) or 128 (Whisper large-v3, voxtral).
    mode: "hf" = transformers.WhisperFeatureExtractor per 30 s chunk; "llamacpp" = llama.cpp's mtmd rules
      (see the module docstring for every difference).
    device: where to compute (default: the tensor's device, CPU for numpy); the result lives there.
    batch_frames: frames per FFT call, a divisor of 3000; None = every chunk in one call; -1 (default) = None
      on CUDA, 1500 on CPU (faster there, see _default_batch_frames).
    """
    _check_mode(mode)
    mel_filterbank(n_mels)                                         # validates n_mels (cached, cheap)
    if batch_frames is not None and batch_frames != -1 and (
            isinstance(batch_frames, bool) or not isinstance(batch_frames, int) or batch_frames <= 0
            or CHUNK_FRAMES % batch_frames):
        raise ValueError(f"batch_frames must be a divisor of {CHUNK_FRAMES}, None or -1, got {batch_frames!r}")
    x = _as_audio_tensor(audio, device)
    if batch_frames == -1:
        batch_frames = _default_batch_frames(x.device)
    with torch.no_grad():
        if mode == "hf":
            return _log_mel_hf(x, int(n_mels), batch_frames)
        return _log_mel_llamacpp(x, int(n_mels), batch_frames)


def audio_to_log_mel(source, n_mels: int = 80, *, mode: str = "hf", sample_rate: int | None = None,
                     max_seconds: float | None = DEFAULT_MAX_SECONDS,
                     device: str | torch.device | None = None) -> torch.Tensor:
    """load_audio(source, ...) then log_mel_spectrogram(...): a path / bytes / PCM array -> [n_chunks, n_mels, 3000]."""
    pcm = load_audio(source, sample_rate=sample_rate, max_seconds=max_seconds)
    return log_mel_spectrogram(pcm, n_mels, mode=mode, device=device)
