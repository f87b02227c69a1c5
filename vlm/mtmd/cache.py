"""Embedding cache of the media API (vlm.mtmd): encoder outputs kept across calls, so a second turn that shows
the same image (or audio) again does not run the encoder again (llama.cpp re-encodes every turn, #18686).

Key = (mmproj identity, media hash, preprocessing parameters): the same bytes under another projector file, another
compute dtype/device, or another preprocessing mode / size are different entries. Value = the list of embedding
tensors one bitmap becomes (one per tile, or per 30 s audio window). Least recently used entries are evicted once
the stored tensors exceed a byte budget; an entry larger than the whole budget is not stored.

    cache = EmbeddingCache(max_bytes=256 << 20)
    hit = cache.get(key)            # list[Tensor] | None; counts a hit or a miss
    cache.put(key, embeddings)
    cache.hits, cache.misses, cache.nbytes, len(cache)
"""
from __future__ import annotations

import hashlib
import os
import threading
from collections import OrderedDict
from typing import Hashable, Sequence

import torch

DEFAULT_CACHE_BYTES = 512 << 20        # 512 MiB: ~500 Gemma 3 images (256 x 2560 bf16) or ~130 LLaVA-1.5 (576 x 4096)


def tensors_nbytes(ts: Sequence[torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in ts)


def encoder_identity(enc) -> str:
    """A string naming one loaded encoder: its file (path, size, mtime), projector type, device and dtype.
    Encoders built from in-memory weights (path '<weights>') are told apart by object id."""
    path = str(getattr(enc, "path", "<weights>"))
    try:
        st = os.stat(path)
        where = f"{os.path.abspath(path)}:{st.st_size}:{st.st_mtime_ns}"
    except OSError:
        where = f"{path}@{id(enc):x}"
    cfg = getattr(enc, "config", None)
    proj = getattr(cfg, "projector_type", "")
    raw = f"{where}|{proj}|{getattr(enc, 'device', '')}|{getattr(enc, 'dtype', '')}"
    return hashlib.sha256(raw.encode()).hexdigest()[:24]


class EmbeddingCache:
    """LRU map key -> list of embedding tensors, bounded by `max_bytes` (0 disables caching)."""

    def __init__(self, max_bytes: int = DEFAULT_CACHE_BYTES):
        if isinstance(max_bytes, bool) or not isinstance(max_bytes, int) or max_bytes < 0:
            raise ValueError(f"EmbeddingCache: max_bytes must be an int >= 0, got {max_bytes!r}")
        self.max_bytes = max_bytes
        self._d: OrderedDict[Hashable, tuple[list[torch.Tensor], int]] = OrderedDict()
        self._lock = threading.Lock()
        self.nbytes = 0
        self.hits = 0
        self.misses = 0
        self.evictions = 0

    def __len__(self) -> int:
        return len(self._d)

    def __contains__(self, key) -> bool:
        return key in self._d

    def get(self, key) -> list[torch.Tensor] | None:
        with self._lock:
            item = self._d.get(key)
            if item is None:
                self.misses += 1
                return None
            self._d.move_to_end(key)
            self.hits += 1
            return item[0]

    def put(self, key, embeddings: Sequence[torch.Tensor]) -> bool:
        """Store (replacing an older entry of the same key); returns False when the entry exceeds the budget."""
        embs = list(embeddings)
        size = tensors_nbytes(embs)
        with self._lock:
            old = self._d.pop(key, None)
            if old is not None:
                self.nbytes -= old[1]
            if size > self.max_bytes:
                return False
            while self._d and self.nbytes + size > self.max_bytes:
                _, (_, n) = self._d.popitem(last=False)
                self.nbytes -= n
                self.evictions += 1
            self._d[key] = (embs, size)
            self.nbytes += size
            return True

    def clear(self) -> None:
        with self._lock:
            self._d.clear()
            self.nbytes = 0

    def stats(self) -> dict:
        return {"entries": len(self._d), "bytes": self.nbytes, "max_bytes": self.max_bytes, "hits": self.hits,
                "misses": self.misses, "evictions": self.evictions}

    def __repr__(self) -> str:
        s = self.stats()
        return (f"EmbeddingCache({s['entries']} entries, {s['bytes']}/{s['max_bytes']} bytes, "
                f"hits={s['hits']}, misses={s['misses']})")
