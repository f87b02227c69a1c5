"""Phi-4-multimodal preprocessing: the image HD transform (dynamic crops + global image + masks) and the audio
log-mel features, with their placeholder token counts.

Matches transformers' ``Phi4MultimodalImageProcessor`` and ``Phi4MultimodalFeatureExtractor``.

Image (HF, crop S = 448, patch 14, mask side m = S / patch = 32, up to ``dynamic_hd`` = 36 crops):

1. grid = (ceil(w / S), ceil(h / S)) crops (cols, rows); if that is more than ``dynamic_hd``, the closest
   aspect ratio among all (i, j) with i·j ≤ dynamic_hd (ties: the later candidate when the image area exceeds
   half the candidate's pixel area);
2. resize keeping the ratio so that it fits the S·cols × S·rows canvas on one side (the other side truncated
   to int), torchvision bilinear with antialias on uint8; pad right / bottom with white (255);
3. normalise ((v - 127.5) / 127.5 for mean = std = 0.5, in float32 as torchvision computes it);
4. global image = the normalised HD image resized to S × S (torchvision bicubic, no antialias, on floats);
5. crops row-major, after the global image: ``[1 + rows·cols, 3, S, S]``;
6. masks ``[1 + rows·cols, m, m]``: ones, with the patch columns / rows that are only padding set to 0
   (floor(pad / patch) of them, right / bottom of the HD canvas);
7. tokens = g² + 1 + Σ(sub-mask sampled at even positions) + (rows of that sampled mask) + g with
   g = ceil(m / 2): the global image's g×g tokens plus one newline per row, one separator, and the crops'
   valid tokens plus one newline per valid row (HF writes 256 and 16 for g = 16).

torchvision is not needed: its resize is torch's ``interpolate`` (we call it with the same arguments and
torchvision's uint8 rule: native uint8 for bilinear only on AVX2/AVX512/ARM CPUs, else float32 + round).

Audio (16 kHz, 80 mels): frames of 400 samples every 160 (no centring; the tail that does not fill a frame
is dropped), pre-emphasis 0.97 inside each frame (its first sample uses itself as predecessor), ×32768,
symmetric Hamming window (float64), 512-point rFFT, |·|² through a Kaldi-scale mel bank triangularised in mel
space (0..7690 Hz), clamp ≥ 1, natural log.  Tokens = ceil(frames / 8) (``audio_compression_rate``), then
ceil(/ ``audio_downsample_rate`` = 1).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from vlm.preprocess.image import ImageError, ImageSource, _as_rgb

CROP_SIZE = 448
PATCH_SIZE = 14
DYNAMIC_HD = 36
MEAN = (0.5, 0.5, 0.5)
STD = (0.5, 0.5, 0.5)
PAD_VALUE = 255             # white padding of the HD canvas

SAMPLE_RATE = 16000
N_MELS = 80
N_FFT = 512
WIN_LENGTH = 400
HOP_LENGTH = 160
PREEMPHASIS = 0.97
MEL_FMIN, MEL_FMAX = 0.0, 7690.0
AUDIO_COMPRESSION_RATE = 8   # conformer's nemo conv subsampling (time_reduction)
AUDIO_DOWNSAMPLE_RATE = 1
ENCODER_WINDOW = 500         # HF runs the conformer on windows of 500 subsampled frames (40 s)


class AudioLengthError(ValueError):
    """Audio too short to give one frame, or longer than the configured limit."""


# ---------------------------------------------------------------------------------------------------------
# image: layout (from the size alone)
# ---------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class CropLayout:
    grid: tuple[int, int]          # (cols, rows) of S×S crops: HF's target_aspect_ratio (w, h)
    resized: tuple[int, int]       # (height, width) of the ratio-preserving resize
    padding: tuple[int, int]       # (bottom, right) white padding up to the canvas
    crop_size: int = CROP_SIZE

    @property
    def hd_size(self) -> tuple[int, int]:
        """(height, width) of the padded HD canvas (HF ``image_sizes``)."""
        return self.grid[1] * self.crop_size, self.grid[0] * self.crop_size

    @property
    def n_crops(self) -> int:
        return self.grid[0] * self.grid[1]


def _target_ratios(max_num: int, min_num: int) -> list[tuple[int, int]]:
    # Same candidate set and the same stable sort by crop count as HF (the set's iteration order decides
    # between equal counts, so it is built the same way).
    ratios = {(i, j) for n in range(min_num, max_num + 1) for i in range(1, n + 1) for j in range(1, n + 1)
              if min_num <= i * j <= max_num}
    return sorted(ratios, key=lambda r: r[0] * r[1])


def _closest_aspect_ratio(aspect: float, ratios: Sequence[tuple[int, int]], width: int, height: int,
                          crop: int) -> tuple[int, int]:
    best, best_diff, area = (1, 1), float("inf"), width * height
    for r in ratios:
        diff = abs(aspect - r[0] / r[1])
        if diff < best_diff:
            best, best_diff = r, diff
        elif diff == best_diff and area > 0.5 * crop * crop * r[0] * r[1]:
            best = r
    return best


def crop_layout(height: int, width: int, *, crop_size: int = CROP_SIZE, dynamic_hd: int = DYNAMIC_HD,
                min_crops: int = 1) -> CropLayout:
    """The crop grid, the resize and the padding of an image of (height, width)."""
    if height <= 0 or width <= 0:
        raise ImageError(f"image size must be positive, got {height}x{width}")
    if dynamic_hd < 1 or min_crops < 1 or min_crops > dynamic_hd:
        raise ValueError(f"need 1 <= min_crops <= dynamic_hd, got {min_crops} and {dynamic_hd}")
    cols, rows = math.ceil(width / float(crop_size)), math.ceil(height / float(crop_size))
    if cols * rows > dynamic_hd:
        cols, rows = _closest_aspect_ratio(width / height, _target_ratios(dynamic_hd, min_crops), width, height,
                                           crop_size)
    tw, th = crop_size * cols, crop_size * rows
    rw, rh = tw / width, th / height
    if rw < rh:
        nw, nh = tw, int(height * rw)
    else:
        nw, nh = int(width * rh), th
    if min(nh, th) < 10 or min(nw, tw) < 10:
        raise ImageError(f"the aspect ratio is very extreme: {height}x{width} resizes to {nh}x{nw} "
                         f"on a {th}x{tw} canvas (a side under 10 pixels)")
    return CropLayout(grid=(cols, rows), resized=(nh, nw), padding=(th - nh, tw - nw), crop_size=crop_size)


def crop_masks(layout: CropLayout, *, patch_size: int = PATCH_SIZE) -> np.ndarray:
    """[1 + crops, m, m] float32 patch masks: the global image (all ones), then the crops row-major."""
    m = layout.crop_size // patch_size
    cols, rows = layout.grid
    full = np.ones((m * rows, m * cols), np.float32)
    pad_h, pad_w = layout.padding
    if pad_w >= patch_size:
        full[:, full.shape[1] - pad_w // patch_size:] = 0
    if pad_h >= patch_size:
        full[full.shape[0] - pad_h // patch_size:, :] = 0
    crops = full.reshape(rows, m, cols, m).transpose(0, 2, 1, 3).reshape(-1, m, m)
    return np.concatenate([np.ones((1, m, m), np.float32), crops])


def image_token_count(layout: CropLayout, *, patch_size: int = PATCH_SIZE) -> int:
    """Placeholder tokens of one image (HF ``num_img_tokens``)."""
    m = layout.crop_size // patch_size
    g = m // 2 + m % 2                      # tokens per side after the 2×2 compression
    cols, rows = layout.grid
    sub = crop_masks(layout, patch_size=patch_size)[1:, 0::2, 0::2]      # [crops, g, g]
    sub = sub.reshape(rows, cols, g, g).transpose(0, 2, 1, 3).reshape(rows * g, cols * g)
    return g * g + 1 + int(sub.sum()) + int(sub[:, 0].sum()) + g


# ---------------------------------------------------------------------------------------------------------
# image: pixels
# ---------------------------------------------------------------------------------------------------------

def _native_uint8_bilinear() -> bool:
    """torchvision resizes uint8 natively with bilinear only where torch has the vectorised kernel."""
    import platform

    return torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512") or platform.machine() in ("aarch64", "arm64")


def tv_resize(x: torch.Tensor, size: tuple[int, int], *, mode: str, antialias: bool) -> torch.Tensor:
    """torchvision.transforms.v2.functional.resize on a [..., C, H, W] CPU tensor (bilinear / bicubic)."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    shape = x.shape
    x4 = x.reshape(-1, *shape[-3:])
    native = x.dtype in (torch.float32, torch.float64) or (
        x.dtype == torch.uint8 and (mode == "bicubic" or (mode == "bilinear" and _native_uint8_bilinear())))
    y = F.interpolate(x4 if native else x4.to(torch.float32), size=list(size), mode=mode, align_corners=False,
                      antialias=antialias)
    if not native:
        if mode == "bicubic":
            y = y.clamp_(0, 255)
        y = y.round_().to(x.dtype)
    return y.reshape(*shape[:-2], *size)


def _normalize(x: torch.Tensor, mean, std, rescale_factor: float) -> torch.Tensor:
    # HF's fused rescale + normalise: mean and std scaled by 1 / rescale_factor, then (x - mean) / std in float32
    m = (torch.tensor(mean) * (1.0 / rescale_factor)).view(-1, 1, 1)
    s = (torch.tensor(std) * (1.0 / rescale_factor)).view(-1, 1, 1)
    return (x.to(torch.float32) - m) / s


@dataclass(frozen=True)
class Phi4Image:
    pixel_values: np.ndarray        # [1 + crops, 3, S, S] float32: global image, then crops row-major
    attention_mask: np.ndarray      # [1 + crops, m, m] float32
    image_size: tuple[int, int]     # (height, width) of the HD canvas
    n_tokens: int
    layout: CropLayout


def preprocess_phi4mm_image(image: ImageSource, *, crop_size: int = CROP_SIZE, patch_size: int = PATCH_SIZE,
                            dynamic_hd: int = DYNAMIC_HD, mean: Sequence[float] = MEAN,
                            std: Sequence[float] = STD, rescale_factor: float = 1 / 255) -> Phi4Image:
    """One image -> global + crops, masks, HD size and token count (``Phi4MultimodalImageProcessor``)."""
    img = _as_rgb(image, "hf")
    layout = crop_layout(img.shape[0], img.shape[1], crop_size=crop_size, dynamic_hd=dynamic_hd)
    x = torch.from_numpy(np.ascontiguousarray(img)).permute(2, 0, 1).contiguous()          # [3, H, W] uint8
    x = tv_resize(x, layout.resized, mode="bilinear", antialias=True)
    pad_h, pad_w = layout.padding
    x = F.pad(x, (0, pad_w, 0, pad_h), value=PAD_VALUE)
    hd = _normalize(x, mean, std, rescale_factor)                                           # [3, Ht, Wt]
    glob = tv_resize(hd, (crop_size, crop_size), mode="bicubic", antialias=False)
    cols, rows = layout.grid
    crops = hd.reshape(3, rows, crop_size, cols, crop_size).permute(1, 3, 0, 2, 4).reshape(-1, 3, crop_size,
                                                                                          crop_size)
    pv = torch.cat([glob.unsqueeze(0), crops]).numpy()
    return Phi4Image(pixel_values=pv, attention_mask=crop_masks(layout, patch_size=patch_size),
                     image_size=layout.hd_size, n_tokens=image_token_count(layout, patch_size=patch_size),
                     layout=layout)


def batch_phi4mm_images(images: Sequence[Phi4Image]) -> dict:
    """Stack several images as HF does: crops padded with zero images (masks with ones) to the largest count."""
    if not images:
        raise ValueError("no images")
    n = max(im.pixel_values.shape[0] for im in images)
    pv, masks = [], []
    for im in images:
        k = im.pixel_values.shape[0]
        pv.append(np.concatenate([im.pixel_values, np.zeros((n - k, *im.pixel_values.shape[1:]), np.float32)]))
        masks.append(np.concatenate([im.attention_mask, np.ones((n - k, *im.attention_mask.shape[1:]), np.float32)]))
    return {"image_pixel_values": np.stack(pv), "image_attention_mask": np.stack(masks),
            "image_sizes": np.array([im.image_size for im in images], dtype=np.int64),
            "num_img_tokens": [im.n_tokens for im in images]}


# ---------------------------------------------------------------------------------------------------------
# audio
# ---------------------------------------------------------------------------------------------------------

def kaldi_mel_filterbank(n_mels: int = N_MELS, *, n_fft: int = N_FFT, sample_rate: int = SAMPLE_RATE,
                         fmin: float = MEL_FMIN, fmax: float = MEL_FMAX) -> np.ndarray:
    """[n_fft/2 + 1, n_mels] float64 triangles on the Kaldi mel scale (1127·ln(1 + f/700)), built in mel space
    (HF ``mel_filter_bank(..., triangularize_in_mel_space=True, mel_scale="kaldi")``, no normalisation)."""
    n_bins = n_fft // 2 + 1
    mel = lambda f: 1127.0 * np.log(1.0 + np.asarray(f, np.float64) / 700.0)  # noqa: E731
    centers = np.linspace(mel(fmin), mel(fmax), n_mels + 2)
    bins = mel(sample_rate / ((n_bins - 1) * 2) * np.arange(n_bins))
    diff = np.diff(centers)
    slopes = centers[None, :] - bins[:, None]
    return np.maximum(np.zeros(1), np.minimum(-slopes[:, :-2] / diff[:-1], slopes[:, 2:] / diff[1:]))


def n_audio_frames(n_samples: int) -> int:
    return max(0, (int(n_samples) - WIN_LENGTH) // HOP_LENGTH + 1)


def audio_token_count(n_frames: int, *, compression_rate: int = AUDIO_COMPRESSION_RATE,
                      downsample_rate: int = AUDIO_DOWNSAMPLE_RATE) -> int:
    """Placeholder tokens for `n_frames` feature frames (HF ``_compute_audio_embed_size``)."""
    return -(-(-(-int(n_frames) // compression_rate)) // downsample_rate)


_MEL_CACHE: dict = {}


def phi4mm_audio_features(audio, *, sample_rate: int = SAMPLE_RATE, max_seconds: float | None = None) -> np.ndarray:
    """Mono PCM (float, 16 kHz) -> [frames, 80] float32 log-mel (``Phi4MultimodalFeatureExtractor`` of one clip).

    Raises `AudioLengthError` for audio shorter than one 400-sample frame or longer than `max_seconds`."""
    if sample_rate != SAMPLE_RATE:
        raise ValueError(f"Phi-4-multimodal audio must be sampled at {SAMPLE_RATE} Hz, got {sample_rate} "
                         "(resample first)")
    x = torch.as_tensor(np.asarray(audio)).to(torch.float32)
    if x.ndim != 1:
        raise ValueError(f"expected mono audio [n_samples], got shape {tuple(x.shape)}")
    n = x.shape[0]
    if max_seconds is not None and n > max_seconds * SAMPLE_RATE:
        raise AudioLengthError(f"audio is {n / SAMPLE_RATE:.2f} s long, more than the {max_seconds} s allowed")
    if n_audio_frames(n) < 1:
        raise AudioLengthError(f"audio has {n} samples: fewer than one {WIN_LENGTH}-sample frame "
                               f"({WIN_LENGTH / SAMPLE_RATE * 1000:.0f} ms)")
    if not bool(torch.isfinite(x).all()):
        raise ValueError("audio contains NaN or infinite samples")
    frames = x.unfold(-1, WIN_LENGTH, HOP_LENGTH)                          # [T, 400]
    prev = torch.roll(frames, 1, dims=-1)
    prev[:, 0] = prev[:, 1]
    frames = (frames - PREEMPHASIS * prev) * 32768
    window = torch.hamming_window(WIN_LENGTH, periodic=False, dtype=torch.float64)
    spec = torch.fft.rfft(window * frames, n=N_FFT, dim=1).to(torch.complex64)
    power = torch.abs(spec) ** 2
    if "mel" not in _MEL_CACHE:
        _MEL_CACHE["mel"] = torch.from_numpy(kaldi_mel_filterbank()).to(torch.float32)
    return torch.log(torch.clamp(power @ _MEL_CACHE["mel"], min=1.0)).numpy()


def encoder_windows(n_frames: int, *, compression_rate: int = AUDIO_COMPRESSION_RATE,
                    window: int = ENCODER_WINDOW) -> int:
    """How many 500-frame conformer windows HF runs for `n_frames` features (long audio is cut, not refused)."""
    return max(1, -(-(-(-int(n_frames) // compression_rate)) // window))
