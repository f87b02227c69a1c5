"""GGUF quant formats: block layouts, QTensor, vectorised torch dequantize/quantize.

SKELETON: the QTensor interface below is fixed (other modules build on it); dequantize/quantize are filled in
by the quant work.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from gguf import GGMLQuantizationType as GGMLType
from gguf.constants import GGML_QUANT_SIZES

FLOAT_TYPES = (GGMLType.F32, GGMLType.F16, GGMLType.BF16)


def block_info(qtype: GGMLType) -> tuple[int, int]:
    """(weights per block, bytes per block)."""
    return GGML_QUANT_SIZES[GGMLType(qtype)]


def row_bytes(qtype: GGMLType, n: int) -> int:
    bs, ts = block_info(qtype)
    if n % bs:
        raise ValueError(f"{GGMLType(qtype).name}: row length {n} is not a multiple of the block size {bs}")
    return n // bs * ts


@dataclass
class QTensor:
    """Packed GGUF weights.

    data:  uint8 [n_rows, row_bytes] where n_rows = prod(shape[:-1]); the exact GGUF bytes (a view of the
           memory-mapped file when loaded from one).
    qtype: GGMLType.
    shape: logical torch-ordered shape (last dim = the contiguous, blocked one).
    """
    data: torch.Tensor
    qtype: GGMLType
    shape: tuple[int, ...]

    def __post_init__(self):
        self.qtype = GGMLType(self.qtype)
        self.shape = tuple(int(s) for s in self.shape)
        if self.data.dtype != torch.uint8:
            raise TypeError(f"QTensor data must be uint8, got {self.data.dtype}")
        n_rows = 1
        for s in self.shape[:-1]:
            n_rows *= s
        rb = row_bytes(self.qtype, self.shape[-1])
        if self.data.numel() != n_rows * rb:
            raise ValueError(f"QTensor {self.qtype.name} {self.shape}: expected {n_rows * rb} bytes, "
                             f"got {self.data.numel()}")
        if self.data.dim() != 2 or tuple(self.data.shape) != (n_rows, rb):
            self.data = self.data.reshape(n_rows, rb)

    @property
    def device(self) -> torch.device:
        return self.data.device

    @property
    def nbytes(self) -> int:
        return self.data.numel()

    def to(self, device) -> "QTensor":
        return QTensor(self.data.to(device), self.qtype, self.shape)

    def cuda(self) -> "QTensor":
        return self.to("cuda")

    def cpu(self) -> "QTensor":
        return self.to("cpu")

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return dequantize(self.data, self.qtype, self.shape).to(dtype)

    def __repr__(self) -> str:
        return f"QTensor({self.qtype.name}, shape={self.shape}, device={self.device})"


def dequantize(data: torch.Tensor, qtype: GGMLType, shape) -> torch.Tensor:
    """uint8 GGUF bytes -> float32 tensor of `shape` (bit-exact with gguf.quants.dequantize)."""
    raise NotImplementedError


def quantize(tensor: torch.Tensor, qtype: GGMLType) -> QTensor:
    raise NotImplementedError
