"""Qwen2-VL / Qwen2.5-VL vision tower + 2×2 merger (mmproj projector types `qwen2vl_merger`, `qwen2.5vl_merger`).

Input: the Qwen image processor's output (vlm.preprocess.qwen_image): patches [n_patches, 3·T·P·P] (T = 2 temporal
frames, rows in HF order: each 2×2 merge block's 4 patches are consecutive) and grid_thw (t, h, w) in patches.

    x  = patch_embd(patches)                        Conv3d [D, 3, 2, P, P] (llama.cpp stores the two temporal
                                                    slices as v.patch_embd.weight / .weight.1), no bias
    per layer (pre-norm; LayerNorm + quick-GELU FFN for Qwen2-VL, RMSNorm + SiLU-gated FFN for Qwen2.5-VL):
         x += attn_out(MHA(rope2d(q), rope2d(k), v))   2-D RoPE: first head_dim/4 pairs rotate by the patch row,
                                                       the next head_dim/4 by the column (vlm_kernels.rope "vision")
         x += ffn(ln2(x))
    y  = post_ln(x) viewed as [n/4, 4·D]            merger: the 4 patches of each 2×2 block concatenated
    y  = mm.2(GELU(mm.0(y)))                         exact (erf) GELU, as HF nn.GELU()

Qwen2.5-VL window attention: merge blocks are regrouped into windows of `window_size` pixels (112: 4×4 merged
tokens); attention runs within each window except at the full-attention layers (il + 1) % n_wa_pattern == 0
(HF fullatt_block_indexes). Tokens are permuted into window order once after the patch embedding (with their
RoPE positions) and the merged output is permuted back (HF get_vision_window_index / argsort). Attention is
always one varlen vlm_kernels.attention call (cu_seqlens = windows, or frames of each image at full layers).

In the prompt (Qwen2-VL / 2.5-VL processors and chat templates) an image or a video is ``<|vision_start|>`` + its
tokens + ``<|vision_end|>``; its rows get M-RoPE positions (vlm.mrope): a rows × cols token grid advances the next
position by max(rows, cols). A video: frames resized to the smart_resize size of the first frame (same limits as
images unless the video sets its own min_pixels / max_pixels) and paired into t = ceil(n_frames / 2) temporal
slots, an odd count repeating its last frame (vlm.preprocess.qwen_video); slot k sits at p + floor(k · step),
step 1 for Qwen2-VL and tokens_per_second · 2 / fps for Qwen2.5-VL (HF second_per_grid_ts; HF get_rope_index).
Frames of different sizes are refused unless the video's frame policy is "resize".
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

import vlm_kernels
from vlm.encoders.base import MediaPiece, MmprojEncoder, MmprojError, VisionConfig, fuse_qkv, load_weights
from vlm.graph import linear
from vlm.mrope import image_positions
from vlm.preprocess.qwen_image import preprocess_qwen2vl, qwen2vl_resized_size
from vlm.preprocess.qwen_video import VideoFrameSizeError, preprocess_qwen2vl_video
from vlm.registry import check_tensors

V = "clip.vision."
DEFAULT_WINDOW = 112        # llama.cpp hard-codes 112 px for Qwen2.5-VL; HF window_size
VISION_THETA = 10000.0      # HF VisionRotaryEmbedding theta; llama.cpp likewise
MERGE = 2                   # spatial merge (HF spatial_merge_size; llama.cpp n_merge for Qwen)
TEMPORAL_PATCH = 2          # frames per temporal patch (HF temporal_patch_size)
# Qwen2.5-VL video: M-RoPE temporal positions advance by tokens_per_second per second of video. 2 in every
# released Qwen2.5-VL (vision_config.tokens_per_second); our converter stores the checkpoint's value as
# clip.vision.tokens_per_second, llama.cpp's files do not carry it.
DEFAULT_TOKENS_PER_SECOND = 2
NORM_EPS_HF = 1e-6


def _gelu_quick(x):
    return x * torch.sigmoid(1.702 * x)


def window_index(grid_thw: Sequence[Sequence[int]], window_px: int, patch_size: int,
                 merge: int = MERGE) -> tuple[torch.Tensor, torch.Tensor]:
    """(order of merge blocks in window order [n_blocks] int64, cu_seqlens of windows in patches int32).

    Per image, merge blocks (t, r, c) are grouped by windows of `window_px // merge // patch_size` blocks per
    side, windows row-major, blocks row-major within a window (HF get_vision_window_index)."""
    ws = window_px // merge // patch_size
    if ws < 1:
        raise MmprojError(f"window size {window_px}px is smaller than one merged token ({merge * patch_size}px)")
    order, cu, base = [], [0], 0
    for t, h, w in grid_thw:
        t, gh, gw = int(t), int(h) // merge, int(w) // merge
        nwh, nww = -(-gh // ws), -(-gw // ws)
        idx = torch.arange(t * gh * gw).view(t, gh, gw)
        for ti in range(t):
            for wr in range(nwh):
                for wc in range(nww):
                    blk = idx[ti, wr * ws:(wr + 1) * ws, wc * ws:(wc + 1) * ws].reshape(-1)
                    order.append(blk + base)
                    cu.append(cu[-1] + blk.numel() * merge * merge)
        base += t * gh * gw
    return torch.cat(order), torch.tensor(cu, dtype=torch.int32)


def rope_positions(grid_thw: Sequence[Sequence[int]], merge: int = MERGE) -> torch.Tensor:
    """[2, n_patches] (row, col) of every patch in HF's merge-block order, repeated per temporal slot."""
    out = []
    for t, h, w in grid_thw:
        t, h, w = int(t), int(h), int(w)
        r = torch.arange(h).view(h // merge, merge, 1, 1).expand(h // merge, merge, w // merge, merge)
        c = torch.arange(w).view(1, 1, w // merge, merge).expand(h // merge, merge, w // merge, merge)
        r = r.permute(0, 2, 1, 3).reshape(-1)
        c = c.permute(0, 2, 1, 3).reshape(-1)
        out.append(torch.stack([r, c]).repeat(1, t))
    return torch.cat(out, dim=1)


class Qwen2VLEncoder(MmprojEncoder):
    PROJECTOR_TYPE = "qwen2vl_merger"
    WINDOWED = False
    MEDIA_BEGIN, MEDIA_END = "<|vision_start|>", "<|vision_end|>"
    USES_MROPE = True

    def __init__(self, config: VisionConfig, weights: dict, *, device=None, dtype=None, path: str = "<weights>",
                 n_wa_pattern: int = 0, window_px: int = DEFAULT_WINDOW,
                 tokens_per_second: float = DEFAULT_TOKENS_PER_SECOND):
        # The CLIP tower of the base class does not apply: set up directly.
        self.config = config
        self.device = torch.device(device) if device is not None else torch.device(
            "cuda" if torch.cuda.is_available() else "cpu")
        self.dtype = dtype or (torch.float32 if self.device.type == "cpu" else torch.bfloat16)
        self.weights = weights
        self.path = path
        self.tap_hook = None
        check_tensors(weights, self.tensor_names(config)[0], path, f"mmproj {config.projector_type}")
        self.layers = [{k[len(f"v.blk.{il}."):]: w for k, w in weights.items() if k.startswith(f"v.blk.{il}.")}
                       for il in range(config.n_layer)]
        for il, layer in enumerate(self.layers):
            fuse_qkv(layer, weights, f"v.blk.{il}.")
        self.n_wa_pattern = int(n_wa_pattern)
        self.window_px = int(window_px)
        self.tokens_per_second = tokens_per_second
        p = config.patch_size
        w0, w1 = weights["v.patch_embd.weight"], weights["v.patch_embd.weight.1"]
        D = config.n_embd
        for name, t in (("v.patch_embd.weight", w0), ("v.patch_embd.weight.1", w1)):
            if not isinstance(t, torch.Tensor):
                raise MmprojError(f"{path}: {name} is quantized; it must be F32/F16/BF16")
            if tuple(t.shape) != (D, 3, p, p):
                raise MmprojError(f"{path}: {name} has shape {tuple(t.shape)}, expected [{D}, 3, {p}, {p}]")
        # [D, C, T, P, P]: the Conv3d weight again, so the flat [n, C·T·P·P] patches go through one GEMM.
        self.patch_w = torch.stack([w0, w1], dim=2).contiguous()
        self.merge_in = 4 * D
        mm0 = weights["mm.0.weight"]
        if tuple(mm0.shape)[1] != self.merge_in:
            raise MmprojError(f"{path}: mm.0.weight takes {tuple(mm0.shape)[1]} inputs, expected 4·n_embd = "
                              f"{self.merge_in} (2×2 merge)")

    # ---- loading ------------------------------------------------------------------------------------------
    @classmethod
    def from_gguf(cls, f, *, device=None, dtype=None):
        cfg = VisionConfig.from_gguf(f)
        weights, device, dtype = load_weights(cls, f, cfg, device, dtype, "mmproj")
        n_wa = int(f.get(V + "n_wa_pattern", 0) or 0)
        if cls.WINDOWED and n_wa <= 0:
            raise MmprojError(f"{f.path}: {cfg.projector_type} needs {V}n_wa_pattern (full-attention period)")
        win = int(f.get(V + "window_size", DEFAULT_WINDOW) or DEFAULT_WINDOW)
        tps = f.get(V + "tokens_per_second", DEFAULT_TOKENS_PER_SECOND)
        if isinstance(tps, bool) or not isinstance(tps, (int, float)) or not tps > 0:
            raise MmprojError(f"{f.path}: {V}tokens_per_second must be a positive number, got {tps!r}")
        return cls(cfg, weights, device=device, dtype=dtype, path=str(f.path), n_wa_pattern=n_wa, window_px=win,
                   tokens_per_second=tps)

    @classmethod
    def tensor_names(cls, cfg: VisionConfig) -> tuple[list[str], list[str]]:
        req = ["v.patch_embd.weight", "v.patch_embd.weight.1", "v.post_ln.weight", "mm.0.weight", "mm.0.bias",
               "mm.2.weight", "mm.2.bias"]
        opt = ["v.patch_embd.bias", "v.post_ln.bias"]
        blk = ["attn_q", "attn_k", "attn_v", "attn_out", "ffn_up", "ffn_down"]
        if cls.WINDOWED:
            blk.append("ffn_gate")
        for il in range(cfg.n_layer):
            req += [f"v.blk.{il}.{t}.weight" for t in blk + ["ln1", "ln2"]]
            opt += [f"v.blk.{il}.{t}.bias" for t in blk + ["ln1", "ln2"]]
        return req, opt

    # ---- queries ------------------------------------------------------------------------------------------
    @property
    def n_embd_out(self) -> int:
        return int(self.weights["mm.2.weight"].shape[0])

    @property
    def patch_dim(self) -> int:
        return 3 * 2 * self.config.patch_size ** 2

    def n_tokens_grid(self, n_patch_h: int, n_patch_w: int) -> int:
        return (n_patch_h // MERGE) * (n_patch_w // MERGE)

    def _check_size(self, h: int, w: int) -> None:
        f = self.config.patch_size * MERGE
        if h <= 0 or w <= 0 or h % f or w % f:
            raise MmprojError(f"{self.path}: {self.config.projector_type} images must have sides that are positive "
                              f"multiples of {f} px (patch {self.config.patch_size} × merge {MERGE}), got {h}×{w}: "
                              f"resize with vlm.preprocess.qwen_image.smart_resize")

    # M-RoPE decoding (vlm.mrope): an image of height × width preprocessed pixels is a rows × cols token grid
    def token_grid(self, height: int, width: int) -> tuple[int, int]:
        """(rows, cols) of merged tokens for a preprocessed height × width image."""
        self._check_size(int(height), int(width))
        f = self.config.patch_size * MERGE
        return int(height) // f, int(width) // f

    def n_pos(self, height: int, width: int) -> int:
        """Positions the image advances n_past by: max(rows, cols) (llama.cpp mtmd_input_chunk_get_n_pos)."""
        return max(self.token_grid(height, width))

    def decoder_positions(self, height: int, width: int, pos0: int, n_frames: int = 1,
                          time_interval: float = 1.0) -> torch.Tensor:
        """[4, n_tokens] M-RoPE planes of the image's (or video's: n_frames temporal slots) tokens from pos0."""
        return image_positions(pos0, *self.token_grid(height, width), n_frames, time_interval)

    def video_time_interval(self, fps: float) -> float:
        """Temporal position step between two slots (frame pairs) of a video at `fps` frames per second.

        Qwen2-VL: 1. Qwen2.5-VL: tokens_per_second · temporal_patch_size / fps, rounded as HF computes it (the
        processor's second_per_grid_ts is a float32 tensor, so the product and the later slot · step are float32,
        then floored by .long()): the value returned is exactly that float32 step."""
        if not self.WINDOWED:
            return 1.0
        step = self.tokens_per_second * torch.tensor(TEMPORAL_PATCH / float(fps), dtype=torch.float32)
        return float(step)

    # ---- media facts (what vlm.mtmd asks) ----------------------------------------------------------------
    def _resized(self, height: int, width: int, mode: str, pixel_limits: tuple = (None, None)) -> tuple[int, int]:
        lo, hi = pixel_limits
        return qwen2vl_resized_size(height, width, patch_size=self.config.patch_size, mode=mode, min_pixels=lo,
                                    max_pixels=hi)

    def image_layout(self, height: int, width: int, *, mode: str) -> list:
        rh, rw = self._resized(height, width, mode)
        return self.wrap([MediaPiece(self.n_tokens(rh, rw), self.n_pos(rh, rw), hw=(rh, rw))])

    def preprocess_image(self, image, *, mode: str) -> list:
        """One QwenImage (patches + grid_thw) at the smart_resize size."""
        cfg = self.config
        return [preprocess_qwen2vl(image, patch_size=cfg.patch_size, mean=cfg.image_mean, std=cfg.image_std,
                                   mode=mode)]

    def chunk_positions(self, piece, n_past: int) -> torch.Tensor:
        return self.decoder_positions(*piece.hw, n_past, piece.n_frames, piece.time_interval)

    def video_layout(self, frame_sizes, *, fps: float, policy: str, pixel_limits: tuple, mode: str,
                     name: str) -> list:
        h, w = frame_sizes[0]
        if policy == "error":
            for i, sz in enumerate(frame_sizes[1:], 1):
                if tuple(sz) != (h, w):
                    raise VideoFrameSizeError(f"{name}: frame {i} is {sz[1]}x{sz[0]} but frame 0 is {w}x{h}: all "
                                              f"frames of a video must share one size (or use frame_policy='resize')")
        rh, rw = self._resized(h, w, mode, pixel_limits)
        rows, cols = self.token_grid(rh, rw)
        t = -(-len(frame_sizes) // TEMPORAL_PATCH)
        return self.wrap([MediaPiece(t * rows * cols, max(rows, cols), hw=(rh, rw), n_frames=t,
                                     time_interval=self.video_time_interval(fps))])

    def preprocess_video(self, frames, *, policy: str, pixel_limits: tuple, mode: str, name: str):
        """One QwenImage of the video: grid_thw (t, h / p, w / p)."""
        cfg = self.config
        lo, hi = pixel_limits
        return preprocess_qwen2vl_video(frames, patch_size=cfg.patch_size, mean=cfg.image_mean, std=cfg.image_std,
                                        mode=mode, policy=policy, min_pixels=lo, max_pixels=hi)

    def is_full_attn(self, il: int) -> bool:
        return not self.WINDOWED or (il + 1) % self.n_wa_pattern == 0

    # ---- encoding -----------------------------------------------------------------------------------------
    def _as_items(self, inputs) -> list[tuple[torch.Tensor, tuple[int, int, int]]]:
        if isinstance(inputs, dict):
            pv, grid = inputs.get("pixel_values"), inputs.get("image_grid_thw", inputs.get("grid_thw"))
            if pv is None or grid is None:
                raise MmprojError("encode(): a dict input needs 'pixel_values' and 'image_grid_thw' (the output of "
                                  "vlm.preprocess.qwen_image.preprocess_qwen2vl)")
            grid = torch.as_tensor(grid).reshape(-1, 3).tolist()
            sizes = [int(t) * int(h) * int(w) for t, h, w in grid]
            if sum(sizes) != pv.shape[0]:
                raise MmprojError(f"encode(): pixel_values has {pv.shape[0]} patches but image_grid_thw {grid} "
                                  f"describes {sum(sizes)}")
            pv = pv if isinstance(pv, torch.Tensor) else torch.from_numpy(np.asarray(pv))
            return list(zip(torch.split(pv, sizes), [tuple(int(v) for v in g) for g in grid]))
        if hasattr(inputs, "pixel_values") and hasattr(inputs, "grid_thw"):
            inputs = [inputs]
        if isinstance(inputs, torch.Tensor) or not isinstance(inputs, Sequence) or not inputs:
            raise MmprojError("encode() takes a list of (patches [n, 1176], grid_thw) pairs, [3, H, W] images or "
                              "QwenImage results, or the dict {'pixel_values', 'image_grid_thw'}")
        items = []
        for i, it in enumerate(inputs):
            if hasattr(it, "pixel_values") and hasattr(it, "grid_thw"):     # preprocess_qwen2vl's QwenImage
                it = (it.pixel_values, it.grid_thw)
            if isinstance(it, torch.Tensor):                                # a [3, H, W] still image
                it = self._patchify(it, i)
            if isinstance(it, (tuple, list)) and len(it) == 2 and not isinstance(it[0], torch.Tensor) \
                    and hasattr(it[0], "__array__"):
                it = (torch.from_numpy(np.asarray(it[0])), it[1])
            if not (isinstance(it, (tuple, list)) and len(it) == 2 and isinstance(it[0], torch.Tensor)):
                raise MmprojError(f"item {i}: expected (patches tensor, grid_thw), got {type(it).__name__}")
            g = tuple(int(v) for v in torch.as_tensor(it[1]).reshape(-1).tolist())
            if len(g) != 3:
                raise MmprojError(f"item {i}: grid_thw must be (t, h, w), got {list(g)}")
            items.append((it[0], g))
        return items

    def _patchify(self, img: torch.Tensor, i: int) -> tuple[torch.Tensor, tuple[int, int, int]]:
        """[3, H, W] image (float = normalised, uint8 = raw RGB, normalised with the file's mean/std) -> HF-order
        patches of a still image (both temporal slots hold the frame), as vlm.preprocess.qwen_image.patchify."""
        if img.dim() != 3 or img.shape[0] != 3:
            raise MmprojError(f"image {i} has shape {list(img.shape)}, expected [3, H, W] (planar RGB)")
        H, W = int(img.shape[1]), int(img.shape[2])
        self._check_size(H, W)
        x = img.float()
        if img.dtype == torch.uint8:
            mean = torch.tensor(self.config.image_mean, device=x.device).view(3, 1, 1)
            std = torch.tensor(self.config.image_std, device=x.device).view(3, 1, 1)
            x = (x / 255.0 - mean) / std
        p, m = self.config.patch_size, MERGE
        gh, gw = H // p, W // p
        x = x.view(3, gh // m, m, p, gw // m, m, p)[None].expand(2, -1, -1, -1, -1, -1, -1, -1)
        # (T, C, bh, mh, ph, bw, mw, pw) -> (bh, bw, mh, mw, C, T, ph, pw)
        x = x.permute(2, 5, 3, 6, 1, 0, 4, 7).reshape(gh * gw, 3 * 2 * p * p)
        return x, (1, gh, gw)

    @torch.inference_mode()
    def encode(self, inputs) -> list[torch.Tensor]:
        """Embeddings, one [t·h/2·w/2, n_embd_out] tensor per image / video chunk, in input order."""
        items = self._as_items(inputs)
        p = self.config.patch_size
        for i, (pv, (t, h, w)) in enumerate(items):
            if t < 1 or h < 1 or w < 1 or h % MERGE or w % MERGE:
                raise MmprojError(f"item {i}: grid_thw {[t, h, w]} must be positive with h, w multiples of {MERGE}")
            if pv.dim() != 2 or pv.shape != (t * h * w, self.patch_dim):
                raise MmprojError(f"item {i}: patches have shape {list(pv.shape)}, expected [{t * h * w}, "
                                  f"{self.patch_dim}] for grid_thw {[t, h, w]} (3 × 2 × {p} × {p} per patch)")
            if not pv.is_floating_point() or not bool(torch.isfinite(pv).all()):
                raise MmprojError(f"item {i}: patches must be finite float (normalised) values")
        grids = [g for _, g in items]
        x = torch.cat([pv for pv, _ in items]).to(self.device, self.dtype).contiguous()
        feats = self._tower(x, grids)
        sizes = [t * (h // MERGE) * (w // MERGE) for t, h, w in grids]
        return list(torch.split(feats, sizes))

    def _norm(self, x, w, b, residual=None):
        eps = self.config.eps
        if self.WINDOWED:
            return vlm_kernels.rms_norm(x, w, eps, residual=residual)
        return vlm_kernels.layer_norm(x, w, b, eps, residual=residual)

    def _tap(self, name, il, t):
        if self.tap_hook is not None:
            self.tap_hook(name, il, t)

    def _tower(self, x: torch.Tensor, grids) -> torch.Tensor:
        cfg, w = self.config, self.weights
        D, H, hd = cfg.n_embd, cfg.n_head, cfg.head_dim
        unit = MERGE * MERGE
        x = vlm_kernels.patch_embed(x, self.patch_w.to(self.dtype), w.get("v.patch_embd.bias"))    # [n, D]
        n = x.shape[0]
        pos = rope_positions(grids)
        frames = [h * w_ for t, h, w_ in grids for _ in range(t)]
        cu_full = torch.zeros(len(frames) + 1, dtype=torch.int32)
        cu_full[1:] = torch.cumsum(torch.tensor(frames, dtype=torch.int32), 0)
        order = None
        if self.WINDOWED:
            order, cu_win = window_index(grids, self.window_px, cfg.patch_size)
            perm = (order.view(-1, 1) * unit + torch.arange(unit)).reshape(-1)
            x = x[perm.to(x.device)]
            pos = pos[:, perm]
            cu_win = cu_win.to(x.device)
        pos = pos.to(x.device)
        cu_full = cu_full.to(x.device)
        self._tap("inp_embd", -1, x)
        h = self._norm(x, self.layers[0]["ln1.weight"], self.layers[0].get("ln1.bias")) if cfg.n_layer else x
        for il, L in enumerate(self.layers):
            if "qkv.weight" in L:               # one fused projection (vlm.encoders.base.fuse_qkv)
                qkv = linear(h, L["qkv.weight"], L["qkv.bias"]).view(n, 3 * H, hd)
                qk, v = qkv[:, :2 * H], qkv[:, 2 * H:]
            else:
                q = linear(h, L["attn_q.weight"], L.get("attn_q.bias")).view(n, H, hd)
                k = linear(h, L["attn_k.weight"], L.get("attn_k.bias")).view(n, H, hd)
                v = linear(h, L["attn_v.weight"], L.get("attn_v.bias")).view(n, H, hd)
                qk = torch.cat([q, k], dim=1)
            qk = vlm_kernels.rope(qk, pos, theta=VISION_THETA, mode="vision")
            q, k = qk[:, :H], qk[:, H:]
            cu = cu_full if self.is_full_attn(il) else cu_win
            a = vlm_kernels.attention(q.contiguous(), k.contiguous(), v, causal=False, cu_seqlens_q=cu, cu_seqlens_k=cu)
            a = linear(a.reshape(n, D), L["attn_out.weight"], L.get("attn_out.bias"))
            h, x = self._norm(a, L["ln2.weight"], L.get("ln2.bias"), residual=x)          # x += attn
            if self.WINDOWED:
                f = F.silu(linear(h, L["ffn_gate.weight"], L.get("ffn_gate.bias"))) * \
                    linear(h, L["ffn_up.weight"], L.get("ffn_up.bias"))
            else:
                f = _gelu_quick(linear(h, L["ffn_up.weight"], L.get("ffn_up.bias")))
            f = linear(f, L["ffn_down.weight"], L.get("ffn_down.bias"))
            if il + 1 < cfg.n_layer:
                nxt = self.layers[il + 1]
                h, x = self._norm(f, nxt["ln1.weight"], nxt.get("ln1.bias"), residual=x)
            else:
                h, x = self._norm(f, w["v.post_ln.weight"], w.get("v.post_ln.bias"), residual=x)
            self._tap("layer_out", il, x)
        if not cfg.n_layer:
            h = self._norm(x, w["v.post_ln.weight"], w.get("v.post_ln.bias"))
        y = h.reshape(n // unit, unit * D)
        y = linear(F.gelu(linear(y, w["mm.0.weight"], w["mm.0.bias"])), w["mm.2.weight"], w["mm.2.bias"])
        if order is not None:
            y = y[torch.argsort(order).to(y.device)]
        return y


class Qwen25VLEncoder(Qwen2VLEncoder):
    PROJECTOR_TYPE = "qwen2.5vl_merger"
    WINDOWED = True
