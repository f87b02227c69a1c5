"""`vlm.Batch`: the input of one `Model.forward` call — text tokens and precomputed embeddings, for one or more
sequences, with their positions and which rows produce logits.

Like llama.cpp's ``llama_batch``: every row is a token id *or* an embedding row (image / audio, from an encoder),
with a position (1-D, or 4 planes for M-RoPE: t, y, x, z) and a sequence id. Rows of one sequence are processed
in the order they were added; each row gets one KV-cache cell of its sequence. ``Batch.causal = False`` makes
the whole batch attend bidirectionally within itself (plus the cached context), as llama.cpp does for Gemma 3
image chunks; such a batch is never split into micro-batches.

    b = vlm.Batch()
    b.add_text([2, 818, 5279], pos=0, seq_id=0, logits="last")
    b.add_embd(image_embd, pos=3, seq_id=0)          # [n, n_embd] float
    logits = model.forward(b)                          # [n_rows_marked_for_logits, n_vocab]
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

N_POS_PLANES_MROPE = 4  # llama.cpp stores M-RoPE positions as 4 planes of n_tokens: [t][y][x][z]


def _as_positions(pos, n: int, what: str) -> torch.Tensor:
    """int start | sequence | tensor [n] or [4, n] -> int64 CPU tensor [n] or [4, n]."""
    if isinstance(pos, bool):
        raise TypeError(f"{what}: pos must be an int or a sequence of positions, got {pos!r}")
    if isinstance(pos, int):
        if pos < 0:
            raise ValueError(f"{what}: start position must be >= 0, got {pos}")
        return torch.arange(pos, pos + n, dtype=torch.int64)
    p = pos if isinstance(pos, torch.Tensor) else torch.as_tensor(pos)
    if p.dtype.is_floating_point or p.dtype == torch.bool:
        raise TypeError(f"{what}: positions must be integers, got {p.dtype}")
    p = p.to("cpu", torch.int64)
    if p.dim() == 1 and p.numel() == n:
        pass
    elif p.dim() == 2 and p.shape == (N_POS_PLANES_MROPE, n):
        pass
    else:
        raise ValueError(f"{what}: positions must have shape [{n}] or [{N_POS_PLANES_MROPE}, {n}] (M-RoPE), "
                         f"got {list(p.shape)}")
    if n and int(p.min()) < 0:
        raise ValueError(f"{what}: positions must be >= 0, got min {int(p.min())}")
    return p


def _as_logits_mask(logits, n: int, what: str) -> torch.Tensor:
    if isinstance(logits, str):
        if logits != "last":
            raise ValueError(f"{what}: logits must be a bool, 'last' or a list of bools, got {logits!r}")
        m = torch.zeros(n, dtype=torch.bool)
        if n:
            m[-1] = True
        return m
    if isinstance(logits, bool):
        return torch.full((n,), logits, dtype=torch.bool)
    m = torch.as_tensor(logits, dtype=torch.bool).cpu()
    if m.shape != (n,):
        raise ValueError(f"{what}: logits mask has shape {list(m.shape)}, expected [{n}]")
    return m


@dataclass
class _Entry:
    tokens: torch.Tensor | None   # int64 [n] (any device) — or None for embedding rows
    embd: torch.Tensor | None     # float [n, n_embd] — or None for token rows
    pos: torch.Tensor             # int64 CPU [n] or [4, n]
    seq_id: int
    logits: torch.Tensor          # bool CPU [n]

    @property
    def n(self) -> int:
        return self.pos.shape[-1]


class Batch:
    """Rows to evaluate: token ids and/or embeddings, per sequence, with positions and logits flags."""

    def __init__(self, *, causal: bool = True):
        if not isinstance(causal, bool):
            raise TypeError(f"Batch: causal must be a bool, got {causal!r}")
        self.causal = causal
        self.entries: list[_Entry] = []

    # ---- building -----------------------------------------------------------------------------------------
    def add_text(self, tokens, pos, seq_id: int = 0, logits=False) -> "Batch":
        """Token ids (list / 1-D int tensor, CPU or on the model's device) at positions `pos` (start int, or
        explicit [n] / [4, n]). `logits`: False, True (every row), "last", or one bool per token."""
        if isinstance(tokens, torch.Tensor):
            t = tokens.reshape(-1)
            if t.dtype.is_floating_point or t.dtype == torch.bool:
                raise TypeError(f"Batch.add_text: token ids must be integers, got {t.dtype}")
            t = t.to(torch.int64)
        else:
            if isinstance(tokens, (str, bytes)):
                raise TypeError("Batch.add_text: expected token ids, got a string (tokenize it first: "
                                "model.tokenize(text))")
            t = torch.as_tensor(list(tokens), dtype=torch.int64)
        n = t.numel()
        if n == 0:
            raise ValueError("Batch.add_text: no tokens (empty token list)")
        if t.device.type == "cpu" and int(t.min()) < 0:
            raise ValueError(f"Batch.add_text: token ids must be >= 0, got {int(t.min())}")
        self._append(_Entry(t, None, _as_positions(pos, n, "Batch.add_text"), self._seq(seq_id),
                            _as_logits_mask(logits, n, "Batch.add_text")))
        return self

    def add_embd(self, embd: torch.Tensor, pos, seq_id: int = 0, logits=False) -> "Batch":
        """Precomputed input embeddings [n, n_embd] (image / audio encoder output) at positions `pos`."""
        if not isinstance(embd, torch.Tensor) or not embd.dtype.is_floating_point:
            raise TypeError(f"Batch.add_embd: embd must be a float tensor [n, n_embd], got "
                            f"{getattr(embd, 'dtype', type(embd).__name__)}")
        if embd.dim() != 2 or embd.shape[0] == 0:
            raise ValueError(f"Batch.add_embd: embd must be [n, n_embd] with n >= 1, got {list(embd.shape)}")
        n = embd.shape[0]
        self._append(_Entry(None, embd, _as_positions(pos, n, "Batch.add_embd"), self._seq(seq_id),
                            _as_logits_mask(logits, n, "Batch.add_embd")))
        return self

    @staticmethod
    def _seq(seq_id) -> int:
        if isinstance(seq_id, bool) or not isinstance(seq_id, int) or seq_id < 0:
            raise ValueError(f"Batch: seq_id must be an int >= 0, got {seq_id!r}")
        return seq_id

    def _append(self, e: _Entry) -> None:
        # Mixed 1-D and 4-plane entries are fine: 1-D ones become (p, p, p, 0) for M-RoPE models (UBatch.build).
        self.entries.append(e)

    # ---- queries ------------------------------------------------------------------------------------------
    @property
    def n_tokens(self) -> int:
        return sum(e.n for e in self.entries)

    def __len__(self) -> int:
        return self.n_tokens

    @property
    def n_outputs(self) -> int:
        return sum(int(e.logits.sum()) for e in self.entries)

    def seq_ids(self) -> list[int]:
        """Distinct sequence ids, in order of first appearance."""
        return list(dict.fromkeys(e.seq_id for e in self.entries))

    def split(self, n_batch: int, n_pos_planes: int = 1) -> list["UBatch"]:
        """Micro-batches of at most n_batch rows (a non-causal batch is never split)."""
        if n_batch < 1:
            raise ValueError(f"n_batch must be >= 1, got {n_batch}")
        if not self.entries:
            raise ValueError("Batch is empty: add tokens with add_text() or embeddings with add_embd()")
        limit = self.n_tokens if not self.causal else n_batch
        out, cur, cur_n = [], [], 0
        for e in self.entries:
            start = 0
            while start < e.n:
                take = min(e.n - start, limit - cur_n)
                cur.append((e, start, start + take))
                cur_n += take
                start += take
                if cur_n == limit:
                    out.append(UBatch.build(cur, n_pos_planes, self.causal))
                    cur, cur_n = [], 0
        if cur:
            out.append(UBatch.build(cur, n_pos_planes, self.causal))
        return out


@dataclass
class UBatch:
    """One micro-batch, flattened: what a forward pass over the graph consumes.

    tokens     int64 [n_tokens]                token ids; 0 in rows that take an embedding (see embd_rows)
    embd       float [n_embd_rows, n_embd]      precomputed embeddings, or None
    embd_rows  int64 [n_embd_rows] (CPU)        rows of this micro-batch that take `embd`, or None
    pos        int64 [n_tokens] or [4, n_tokens] (CPU)
    runs       [(seq_id, row_start, n_rows)]    maximal runs of consecutive rows of one sequence
    output     bool  [n_tokens] (CPU)           rows whose logits are returned
    causal     bool
    """
    tokens: torch.Tensor
    embd: torch.Tensor | None
    embd_rows: torch.Tensor | None
    pos: torch.Tensor
    runs: list[tuple[int, int, int]]
    output: torch.Tensor
    causal: bool

    @property
    def n_tokens(self) -> int:
        return self.pos.shape[-1]

    @staticmethod
    def build(parts: Sequence[tuple[_Entry, int, int]], n_pos_planes: int, causal: bool) -> "UBatch":
        toks, embds, erows, poss, outs, runs = [], [], [], [], [], []
        row = 0
        tok_device = None
        for e, a, b in parts:
            n = b - a
            p = e.pos[..., a:b]
            if n_pos_planes == 1 and p.dim() == 2:
                raise ValueError("Batch: 4-plane (M-RoPE) positions given to a model that uses 1-D positions")
            if n_pos_planes == N_POS_PLANES_MROPE and p.dim() == 1:
                # text rows under M-RoPE: (p, p, p, 0) as llama.cpp / HF get_rope_index do
                p = torch.stack([p, p, p, torch.zeros_like(p)])
            poss.append(p)
            outs.append(e.logits[a:b])
            if e.tokens is not None:
                toks.append(e.tokens[a:b])
                tok_device = e.tokens.device
            else:
                embds.append(e.embd[a:b])
                erows.append(torch.arange(row, row + n))
                toks.append(None)
            if runs and runs[-1][0] == e.seq_id and runs[-1][1] + runs[-1][2] == row:
                runs[-1] = (e.seq_id, runs[-1][1], runs[-1][2] + n)
            else:
                runs.append((e.seq_id, row, n))
            row += n
        # embedding rows get a placeholder id 0 (never looked up): tokens stay one [n_tokens] tensor
        dev = tok_device if tok_device is not None else torch.device("cpu")
        toks = [t.to(dev) if t is not None else torch.zeros(o.numel(), dtype=torch.int64, device=dev)
                for t, o in zip(toks, outs)]
        tokens = torch.cat(toks) if len(toks) > 1 else toks[0]
        embd = torch.cat(embds) if len(embds) > 1 else (embds[0] if embds else None)
        embd_rows = torch.cat(erows) if erows else None
        pos = torch.cat(poss, dim=-1) if len(poss) > 1 else poss[0]
        output = torch.cat(outs) if len(outs) > 1 else outs[0]
        return UBatch(tokens, embd, embd_rows, pos, runs, output, causal)
