"""Bit and float helpers shared by the GGUF dequantizers (vlm_kernels/quant.py) and the K-quant quantizers
(vlm_kernels/quant_kquants.py). Everything works on a [n_blocks, type_size] uint8 view of the packed bytes; no
Python loop per block, only whole-tensor torch ops (so the same code runs on CPU and CUDA tensors)."""
from __future__ import annotations

import torch

QK_K = 256

_CONST_CACHE: dict[tuple, torch.Tensor] = {}


def _const(values, dtype: torch.dtype, device: torch.device, shape) -> torch.Tensor:
    """Small constant tensor (code book, shift table), cached per device so CUDA calls do no H2D copy."""
    key = (tuple(values), dtype, str(device), tuple(shape))
    t = _CONST_CACHE.get(key)
    if t is None:
        t = _CONST_CACHE[key] = torch.tensor(values, dtype=dtype, device=device).reshape(shape)
    return t


def _f16(blocks: torch.Tensor, off: int) -> torch.Tensor:
    """fp16 field at byte `off` of every block -> float32 [n_blocks, 1] (exact: subnormal/inf/NaN kept)."""
    return blocks[:, off:off + 2].contiguous().view(torch.float16).to(torch.float32)


def _split_bits(q: torch.Tensor, width: int, n_fields: int) -> torch.Tensor:
    """uint8 [n, k] -> uint8 [n, n_fields, k] with field f = (byte >> width*f) & (2^width - 1).

    Done on 64-bit (or 32-bit) words with a per-byte lane mask: shifting a word never leaks bits into a lane
    that the mask keeps, so this equals gguf's per-byte numpy shifts, at 8 bytes per element op."""
    word = torch.int64 if q.shape[1] % 8 == 0 else torch.int32
    q = q.contiguous()
    if q.storage_offset() % 8:
        q = q.clone()
    w = q.view(word)
    mask = (0x0101010101010101 if word == torch.int64 else 0x01010101) * ((1 << width) - 1)
    fields = [w & mask] + [(w >> (width * f)) & mask for f in range(1, n_fields)]
    return torch.stack(fields, dim=1).view(torch.uint8)


def _or_shift(lo: torch.Tensor, hi: torch.Tensor, s: int) -> torch.Tensor:
    """lo | (hi << s) on contiguous uint8 tensors of equal shape (lane-safe on int32 words: hi << s < 256)."""
    return (lo.view(torch.int32) | (hi.view(torch.int32) << s)).view(torch.uint8)


def _k4_scale_min(sc: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_K/Q5_K 12-byte packed 6-bit (scale, min) pairs -> two float32 [n, 8] (ggml get_scale_min_k4).

    bytes 0-3: scale j (low 6 bits) | top 2 bits of scale j+4; bytes 4-7: same for the mins;
    bytes 8-11: low nibble = low 4 bits of scale j+4, high nibble = low 4 bits of min j+4."""
    d, m, md = sc[:, 0:4], sc[:, 4:8], sc[:, 8:12]
    scale = torch.cat((d & 0x3F, (md & 0x0F) | ((d >> 2) & 0x30)), dim=1)
    mins = torch.cat((m & 0x3F, (md >> 4) | ((m >> 2) & 0x30)), dim=1)
    return scale.float(), mins.float()


def _to_f16_bytes(x: torch.Tensor) -> torch.Tensor:
    """float32 [n, 1] -> its fp16 bytes uint8 [n, 2] (round to nearest even, like numpy astype / ggml)."""
    return x.to(torch.float16).contiguous().view(torch.uint8).reshape(-1, 2)


def _cdiv(num, den) -> torch.Tensor:
    """float32 num / den as a true IEEE division (CUDA turns division by a Python scalar into a * (1/b))."""
    ref = num if isinstance(num, torch.Tensor) else den
    num, den = [v if isinstance(v, torch.Tensor) else _const((float(v),), torch.float32, ref.device, (1,))
                for v in (num, den)]
    return num / den


def _safe_inv(d: torch.Tensor) -> torch.Tensor:
    """ggml `id = d ? 1.0f/d : 0.0f`."""
    return torch.where(d == 0, 0.0, _cdiv(1.0, torch.where(d == 0, 1.0, d)))


def _signed_absmax(x: torch.Tensor, dim: int) -> torch.Tensor:
    """Along `dim`, the first element with the largest |x|, sign kept (C: `if (fabsf(v) > amax) {...}`)."""
    return torch.gather(x, dim, x.abs().argmax(dim=dim, keepdim=True)).squeeze(dim)


def _pack_bits32(bit: torch.Tensor) -> torch.Tensor:
    """uint8 [n, 32] of 0/1 -> [n, 4] little-endian uint32 with bit j = element j (bits disjoint: sum == or)."""
    w = _const(tuple(1 << i for i in range(8)), torch.uint8, bit.device, (1, 1, 8))
    return (bit.reshape(-1, 4, 8) * w).sum(dim=2, dtype=torch.uint8)
