"""Chunks: what the media API's tokenize() returns -- runs of text tokens and media pieces, counted before any
pixel is decoded."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from vlm.encoders.common import MediaPiece
from vlm.mtmd.media import Bitmap


@dataclass
class Chunk:
    """TEXT (token ids) or one IMAGE / AUDIO / VIDEO piece: a whole image, one tile or overview, one audio window,
    or a whole video (n_frames temporal slots spaced time_interval positions apart)."""
    type: str                           # "text" | "image" | "audio" | "video"
    n_tokens: int
    n_pos: int
    tokens: list[int] | None = None
    bitmap: Bitmap | None = None
    part: int = 0                       # index into the bitmap's list of embeddings
    non_causal: bool = False
    hw: tuple[int, int] | None = None   # preprocessed (height, width) of an M-RoPE image (its position grid)
    n_frames: int = 1                   # temporal slots of an M-RoPE video
    time_interval: float = 1.0          # temporal position step between slots (M-RoPE video)

    @classmethod
    def of_tokens(cls, tokens: list[int]) -> "Chunk":
        return cls("text", len(tokens), len(tokens), tokens=list(tokens))

    @classmethod
    def of_piece(cls, bitmap: Bitmap, piece: MediaPiece) -> "Chunk":
        """The chunk of one piece of an encoder's layout (vlm.encoders.common.MediaPiece)."""
        return cls(bitmap.kind, piece.n_tokens, piece.n_pos, bitmap=bitmap, part=piece.part,
                   non_causal=piece.non_causal, hw=piece.hw, n_frames=piece.n_frames,
                   time_interval=piece.time_interval)

    @property
    def id(self) -> str:
        return f"{self.bitmap.id}:{self.part}" if self.bitmap is not None else ""


def n_tokens(chunks: Sequence[Chunk]) -> int:
    return sum(c.n_tokens for c in chunks)


def n_pos(chunks: Sequence[Chunk]) -> int:
    return sum(c.n_pos for c in chunks)


__all__ = ["Chunk", "n_tokens", "n_pos"]
