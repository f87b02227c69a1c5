"""MiniCPM-V 4.6 video: frame sampling, sub-second frame stacking, per-frame slicing and the placeholder layout.

Matches transformers' ``MiniCPMV4_6VideoProcessor`` + ``MiniCPMV4_6Processor.replace_video_token``:

* sampling (`video_frame_indices`): one main frame per second (``int(i * fps)``, i < ceil(duration)); videos
  longer than ``max_num_frames`` seconds take frames every 0.1 s thinned by ``np.linspace`` to
  ``max_num_frames``; with ``stack_frames`` = k > 1, k - 1 sub-frames per second (at sec + j/k) are appended
  after the main frames (thinned to ``max_num_frames * (k - 1)``);
* stacking (`stack_canvas`): the sub-frames of one second are laid on one canvas (4 -> 2×2, 3 -> 1×3 or 3×1,
  2 -> 1×2 or 2×1, whichever canvas is closer to square, else one row), 6-pixel black lines between;
* units (`video_units`): main frame i, then the composite of second i (when it has sub-frames);
* each unit is then sliced like an image (`vlm.preprocess.minicpmv.slice_plan` with the video options), and
  `video_placeholder_text` lays out ``<image>V…</image>`` + rows of ``<slice>V…</slice>`` joined by "\\n" per
  unit, units back to back; every slice of a unit gets the token count of its first slice (HF's rule).

HF resizes video frames with torchvision (bicubic, antialias, on uint8 tensors), unlike images (Pillow).
`preprocess_video_unit` does that resize with torch's ``interpolate`` the way torchvision 0.28 calls it.
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch

from vlm.preprocess.minicpmv import MINICPMV4_6, Markers, SliceConfig, SlicePlan, slice_plan
from vlm.preprocess.phi4mm import tv_resize

LINE_WIDTH = 6


def _sub_timestamps(duration: float, stack_frames: int, max_num_frames: int) -> list[float]:
    ts = [sec + j / stack_frames for sec in range(math.ceil(duration)) for j in range(1, stack_frames)
          if sec + j / stack_frames < duration]
    cap = max_num_frames * (stack_frames - 1)
    if len(ts) > cap:
        ts = [ts[int(i)] for i in np.linspace(0, len(ts) - 1, cap, dtype=int)]
    return ts


def video_frame_indices(duration: float, fps: float, total_frames: int, *, max_num_frames: int = 128,
                        stack_frames: int = 1) -> list[int]:
    """Indices of the frames HF samples: main frames first, then the stacked sub-frames."""
    if duration is None or fps is None or duration <= 0 or fps <= 0 or total_frames <= 0:
        raise ValueError(f"video needs a positive duration, fps and frame count, got {duration}, {fps}, {total_frames}")
    if duration > max_num_frames:
        ts = [round(i * 0.1, 1) for i in range(int(duration / 0.1))]
        idx = [min(int(t * fps), total_frames - 1) for t in ts]
        if len(idx) > max_num_frames:
            idx = [idx[i] for i in np.linspace(0, len(idx) - 1, max_num_frames, dtype=int)]
    else:
        idx = [int(i * fps) for i in range(math.ceil(duration))]
    if stack_frames and stack_frames > 1:
        subs = []
        for sec in range(math.ceil(duration)):
            for j in range(1, stack_frames):
                t = sec + j / stack_frames
                if t < duration:
                    subs.append(t)
        sub_idx = [min(int(t * fps), total_frames - 1) for t in subs]
        cap = max_num_frames * (stack_frames - 1)
        if len(sub_idx) > cap:
            sub_idx = [sub_idx[i] for i in np.linspace(0, len(sub_idx) - 1, cap, dtype=int)]
        idx += sub_idx
    return idx


def canvas_grid(n: int, height: int, width: int) -> tuple[int, int]:
    """(rows, cols) of the stacking canvas for n frames of (height, width)."""
    def squareness(r, c):
        cw, ch = c * width + (c - 1) * LINE_WIDTH, r * height + (r - 1) * LINE_WIDTH
        return abs(cw / max(1, ch) - 1.0)

    if n == 4:
        return 2, 2
    if n == 3:
        cands = [(1, 3), (3, 1)]
        return cands[int(np.argmin([squareness(*c) for c in cands]))]
    if n == 2:
        d = [squareness(1, 2), squareness(2, 1)]
        if d[0] == d[1]:
            return (1, 2) if width / height >= 1.0 else (2, 1)
        return [(1, 2), (2, 1)][int(np.argmin(d))]
    return 1, n


def stack_canvas(frames: np.ndarray) -> np.ndarray:
    """[n, H, W, 3] uint8 sub-frames -> one [H', W', 3] uint8 canvas (black 6-px lines between cells)."""
    n, h, w, c = frames.shape
    rows, cols = canvas_grid(n, h, w)
    out = np.zeros((rows * h + (rows - 1) * LINE_WIDTH, cols * w + (cols - 1) * LINE_WIDTH, c), np.uint8)
    for k in range(rows * cols):
        r, q = divmod(k, cols)
        out[r * (h + LINE_WIDTH):r * (h + LINE_WIDTH) + h, q * (w + LINE_WIDTH):q * (w + LINE_WIDTH) + w] = frames[k]
    return out


def video_units(frames: np.ndarray, duration: float, *, max_num_frames: int = 128, stack_frames: int = 1) -> list:
    """Sampled frames ([n, H, W, 3] uint8, in `video_frame_indices` order) -> the visual units HF encodes."""
    if stack_frames <= 1:
        return [f for f in frames]
    n_sub = len(_sub_timestamps(duration, stack_frames, max_num_frames))
    main, sub = (frames[:-n_sub], frames[-n_sub:]) if n_sub else (frames, frames[:0])
    ts = _sub_timestamps(duration, stack_frames, max_num_frames)
    composites, cur = [], 0
    for sec in range(math.ceil(duration)):
        start = cur
        while cur < len(ts) and ts[cur] < sec + 1:
            cur += 1
        composites.append(stack_canvas(sub[start:cur]) if cur > start else None)
    units = []
    for i, f in enumerate(main):
        units.append(f)
        if i < len(composites) and composites[i] is not None:
            units.append(composites[i])
    return units


def video_placeholder_text(plans: Sequence[SlicePlan], *, markers: Markers = Markers(),
                           video_token: str = "<|video_pad|>") -> str:
    """Units back to back; each: <image>V*n0</image> + rows of (<slice>V*n1</slice> * cols) joined by "\\n"."""
    m = markers
    text = ""
    for p in plans:
        text += m.image_start + video_token * p.n_tokens[0] + m.image_end
        if p.grid is not None:
            cell = m.slice_start + video_token * p.n_tokens[1] + m.slice_end
            text += m.row_sep.join([cell * p.grid[1]] * p.grid[0])
    return text


def preprocess_video_unit(unit: np.ndarray, cfg: SliceConfig = MINICPMV4_6) -> tuple[list[np.ndarray], SlicePlan]:
    """One unit ([H, W, 3] uint8) -> [overview, *slices] float32 [3, h, w] (torchvision-style bicubic resize)."""
    plan = slice_plan(unit.shape[0], unit.shape[1], cfg)
    x = torch.from_numpy(np.ascontiguousarray(unit)).permute(2, 0, 1).contiguous()
    mean = (torch.tensor(cfg.mean) * (1.0 / cfg.rescale_factor)).view(-1, 1, 1)
    std = (torch.tensor(cfg.std) * (1.0 / cfg.rescale_factor)).view(-1, 1, 1)
    norm = lambda t: ((t.to(torch.float32) - mean) / std).numpy()  # noqa: E731
    out = [norm(tv_resize(x, plan.overview_size, mode="bicubic", antialias=True))]
    if plan.grid is not None:
        ref = tv_resize(x, plan.refined_size, mode="bicubic", antialias=True)
        sh, sw = plan.slice_size
        out += [norm(ref[:, r * sh:(r + 1) * sh, c * sw:(c + 1) * sw])
                for r in range(plan.grid[0]) for c in range(plan.grid[1])]
    return out, plan
