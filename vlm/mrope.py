"""M-RoPE positions of Qwen2-VL / Qwen2.5-VL prompts (text + images + videos).

The decoder rotates each head with 4 position planes per token, stored as llama.cpp does: [4, n_tokens] =
(t, y, x, z) rows (vlm.Batch / vlm_kernels.rope with `sections`):

* text token at position p:         (p, p, p, 0)
* image token i of an nx × ny grid (merged tokens, row-major) starting at p:
                                    (p, p + i // nx, p + i % nx, 0)
  and the next chunk starts at p + max(nx, ny) (llama.cpp's ``n_pos`` of an M-RoPE image chunk).
* video (Qwen video: frame pairs share one temporal slot) of nt slots: slot k has t = p + floor(k · interval)
  (HF: ``interval = tokens_per_second · second_per_grid_t`` for Qwen2.5-VL, 1 for Qwen2-VL), y / x as an
  image; the next chunk again starts at p + max(nx, ny) (HF ``get_rope_index`` of transformers 5.x).

``hf_rope_index`` recomputes HF's ``get_rope_index`` from token types (0 text, 1 image, 2 video) and grids, so
tests compare our per-chunk layout with the reference without a model.
"""
from __future__ import annotations

from typing import Iterable, Sequence

import torch

N_PLANES = 4


def text_positions(n_tokens: int, pos0: int) -> torch.Tensor:
    """[4, n_tokens] int64: text rows (p, p, p, 0) for p = pos0 .. pos0 + n_tokens - 1."""
    _check_counts(n_tokens=n_tokens, pos0=pos0)
    p = torch.arange(pos0, pos0 + n_tokens, dtype=torch.int64)
    return torch.stack([p, p, p, torch.zeros_like(p)])


def image_positions(pos0: int, n_rows: int, n_cols: int, n_frames: int = 1,
                    time_interval: float = 1.0) -> torch.Tensor:
    """[4, n_frames·n_rows·n_cols] int64 for a merged-token grid (rows × cols per temporal slot, slot-major,
    row-major) starting at pos0. One temporal slot = a still image (llama.cpp ``get_decoder_pos``)."""
    _check_counts(n_rows=n_rows, n_cols=n_cols, n_frames=n_frames, pos0=pos0)
    t = (torch.arange(n_frames, dtype=torch.int64) * time_interval).long() + pos0
    y = torch.arange(n_rows, dtype=torch.int64) + pos0
    x = torch.arange(n_cols, dtype=torch.int64) + pos0
    tt, yy, xx = torch.meshgrid(t, y, x, indexing="ij")
    flat = torch.stack([tt.reshape(-1), yy.reshape(-1), xx.reshape(-1)])
    return torch.cat([flat, torch.zeros(1, flat.shape[1], dtype=torch.int64)])


def image_n_pos(n_rows: int, n_cols: int) -> int:
    """Positions an image (or video) chunk advances n_past by under M-RoPE: max(rows, cols)."""
    _check_counts(n_rows=n_rows, n_cols=n_cols)
    return max(n_rows, n_cols)


def merged_grid(grid_thw: Sequence[int], merge: int = 2) -> tuple[int, int, int]:
    """Patch grid (t, h, w) -> merged-token grid (t, rows, cols); h and w must be multiples of `merge`."""
    t, h, w = (int(v) for v in grid_thw)
    if h % merge or w % merge:
        raise ValueError(f"grid_thw {list(grid_thw)}: h and w must be multiples of the merge size {merge}")
    return t, h // merge, w // merge


def layout_positions(chunks: Iterable, pos0: int = 0, merge: int = 2) -> tuple[torch.Tensor, int]:
    """Positions of a sequence of chunks -> ([4, n_tokens], next n_past).

    chunks: ``("text", n_tokens)``, ``("image", grid_thw)`` or ``("video", grid_thw[, time_interval])`` with
    grid_thw in patches (as the Qwen image processor returns it)."""
    parts, p = [], int(pos0)
    for c in chunks:
        kind = c[0]
        if kind == "text":
            parts.append(text_positions(int(c[1]), p))
            p += int(c[1])
        elif kind in ("image", "video"):
            t, rows, cols = merged_grid(c[1], merge)
            if kind == "image" and t != 1:
                raise ValueError(f"an image has one temporal slot, got grid_thw {list(c[1])} (use 'video')")
            interval = float(c[2]) if kind == "video" and len(c) > 2 else 1.0
            parts.append(image_positions(p, rows, cols, t, interval))
            p += image_n_pos(rows, cols)
        else:
            raise ValueError(f"unknown chunk kind {kind!r} (text, image, video)")
    if not parts:
        return torch.zeros(N_PLANES, 0, dtype=torch.int64), p
    return torch.cat(parts, dim=1), p


def hf_rope_index(token_types: Sequence[int], image_grid_thw=None, video_grid_thw=None, *, merge: int = 2,
                  video_intervals: Sequence[float] | None = None) -> tuple[torch.Tensor, int]:
    """HF ``get_rope_index`` for one unpadded sequence: token_types per token (0 text, 1 image, 2 video),
    grids in order of appearance -> (positions [3, n_tokens] (t, h, w), rope delta = max + 1 - n_tokens).
    video_intervals: per video ``tokens_per_second · second_per_grid_t`` (Qwen2.5-VL), default 1."""
    types = [int(v) for v in token_types]
    grids = {1: iter([list(map(int, g)) for g in (image_grid_thw if image_grid_thw is not None else [])]),
             2: iter([list(map(int, g)) for g in (video_grid_thw if video_grid_thw is not None else [])])}
    intervals = iter(video_intervals if video_intervals is not None else [1.0] * len(types))
    chunks, i = [], 0
    while i < len(types):
        j = i
        while j < len(types) and types[j] == types[i]:
            j += 1
        kind = types[i]
        if kind == 0:
            chunks.append(("text", j - i))
        elif kind in (1, 2):
            try:
                g = next(grids[kind])
            except StopIteration:
                raise ValueError(f"token types name more {'image' if kind == 1 else 'video'} runs than grids "
                                 f"given") from None
            t, rows, cols = merged_grid(g, merge)
            if t * rows * cols != j - i:
                raise ValueError(f"a run of {j - i} {'image' if kind == 1 else 'video'} tokens does not match "
                                 f"grid_thw {g} ({t * rows * cols} tokens after the {merge}×{merge} merge)")
            chunks.append(("video", g, next(intervals)) if kind == 2 else ("video", g, 1.0))
        else:
            raise ValueError(f"token type {kind} is not 0 (text), 1 (image) or 2 (video)")
        i = j
    pos, _ = layout_positions(chunks, 0, merge)
    pos3 = pos[:3]
    delta = int(pos3.max()) + 1 - len(types) if len(types) else 0
    return pos3, delta


def _check_counts(**kw) -> None:
    for k, v in kw.items():
        if isinstance(v, bool) or int(v) != v or v < 0 or (k != "pos0" and k != "n_tokens" and v == 0):
            raise ValueError(f"{k} must be a {'non-negative' if k in ('pos0', 'n_tokens') else 'positive'} "
                             f"int, got {v!r}")
