"""Preallocated KV cache for several sequences, laid out for `vlm_kernels.decode_attention`.

Per layer il:  k[il], v[il]  [n_seq, n_ctx, n_head_kv, head_dim]   (row t of sequence s = its t-th cell)

Each batch row takes the next free cell of its sequence (cells are filled in the order rows arrive, so
cell index == position for plain text; under M-RoPE an image advances the position by max(rows, cols) but uses
one cell per token). `n_cells[s]` counts used cells, `pos_next[s]` is one past the largest position stored
(the `n_past` a caller continues from). Both live on the host: the decode loop never reads the device.

Sliding-window layers keep every row (no ring buffer, so truncation and prefix reuse always work) but only the
last `window` rows are handed to the attention kernels: a decode step reads O(window), not O(n_past).

What each sequence holds is recorded here, once: ``keys(seq)`` has one entry per used cell -- the token id, a
media row key (what :mod:`vlm.mtmd` records for image / audio rows), or None where the writer did not say (rows
of a user-built ``Model.forward`` batch). Prefix reuse (``common_prefix``) compares against it; ``truncate``,
``clear`` and ``rollback`` keep it in step with the cells. :meth:`checkpoint` / :meth:`rollback` undo anything a
call does to one sequence (cells, positions, keys and the K/V rows it overwrote after truncating).

A forward pass first builds an :class:`AttnPlan` for its micro-batch (where each row is written, which cache
rows each sequence attends to), writes K/V per layer with :meth:`KVCache.store`, and calls :meth:`commit`
only after every layer succeeded: an exception mid-way leaves the cache as it was (rows written past
`n_cells` are unreachable and get overwritten later).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

MAX_DECODE_Q = 16  # vlm_kernels.decode_attention takes 1..16 new tokens per sequence


def to_device(values, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Small host data (list or CPU tensor) -> tensor on `device` without a device sync: on CUDA it is staged in
    pinned memory and copied asynchronously (a plain pageable copy would wait for the GPU queue to drain)."""
    t = values if isinstance(values, torch.Tensor) else torch.tensor(values, dtype=dtype)
    t = t.to(dtype)
    if device.type == "cpu" or t.device == device:
        return t.to(device)
    if t.device.type != "cpu":  # already on an accelerator: a device-to-device copy needs no staging
        return t.to(device, non_blocking=True)
    return t.pin_memory().to(device, non_blocking=True)


class ContextFullError(ValueError):
    """A sequence would need more KV cells than the context holds."""


@dataclass
class SeqSpan:
    seq: int      # sequence id (cache slot)
    row0: int     # first row of this sequence in the (sequence-grouped) micro-batch
    n: int        # rows of this sequence in the micro-batch
    cell0: int    # first cache cell they are written to (== n_cells before the batch)


@dataclass
class AttnPlan:
    """How one micro-batch meets the cache. Built once per micro-batch, shared by all layers."""
    spans: list[SeqSpan]
    causal: bool
    perm: torch.Tensor | None      # rows reordered so each sequence is contiguous (None: already grouped)
    inv_perm: torch.Tensor | None
    decode: bool                    # every sequence has the same n (<= 16) rows: decode_attention path
    seq_index: torch.Tensor | None  # int64 [n_tokens] cache slot per row (multi-sequence writes)
    cell_index: torch.Tensor | None # int64 [n_tokens] cell per row
    max_pos: dict[int, int]         # seq -> largest position in this batch (any plane)
    device: torch.device
    _cache: dict = field(default_factory=dict)

    @property
    def single(self) -> SeqSpan | None:
        return self.spans[0] if len(self.spans) == 1 else None


@dataclass
class KVCheckpoint:
    """What KVCache.rollback needs to put one sequence back (see KVCache.checkpoint)."""
    seq: int
    start: int
    state: tuple
    cell_pos: np.ndarray
    keys: list
    rows: list | None


class KVCache:
    def __init__(self, n_layer: int, n_seq: int, n_ctx: int, n_head_kv: int, head_dim: int,
                 head_dim_v: int | None = None, *, windows: list[int | None] | None = None,
                 dtype: torch.dtype = torch.float32, device="cpu"):
        if n_seq < 1 or n_ctx < 1:
            raise ValueError(f"KVCache: n_seq and n_ctx must be >= 1, got n_seq={n_seq}, n_ctx={n_ctx}")
        head_dim_v = head_dim if head_dim_v is None else head_dim_v
        self.n_layer, self.n_seq, self.n_ctx = n_layer, n_seq, n_ctx
        self.dtype, self.device = dtype, torch.device(device)
        self.windows = list(windows) if windows is not None else [None] * n_layer
        # zeros, not empty: the reference kernels multiply masked rows by 0, and 0 * NaN garbage would be NaN.
        self.k = [torch.zeros(n_seq, n_ctx, n_head_kv, head_dim, dtype=dtype, device=self.device)
                  for _ in range(n_layer)]
        self.v = [torch.zeros(n_seq, n_ctx, n_head_kv, head_dim_v, dtype=dtype, device=self.device)
                  for _ in range(n_layer)]
        self.n_cells = [0] * n_seq
        self.pos_next = [0] * n_seq
        self._cell_pos = np.zeros((n_seq, n_ctx), dtype=np.int64)  # largest position (over planes) per cell
        self._keys: list[list] = [[] for _ in range(n_seq)]       # per used cell: what it holds (or None)

    @classmethod
    def for_config(cls, cfg, n_seq: int, n_ctx: int, dtype, device) -> "KVCache":
        return cls(cfg.n_layer, n_seq, n_ctx, cfg.n_head_kv, cfg.head_dim, cfg.head_dim_v,
                   windows=[cfg.layer_window(il) for il in range(cfg.n_layer)], dtype=dtype, device=device)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v)

    # ---- bookkeeping --------------------------------------------------------------------------------------
    def _check_seq(self, seq: int) -> None:
        if not 0 <= seq < self.n_seq:
            raise ValueError(f"sequence id {seq} out of range: the cache holds {self.n_seq} sequence(s) "
                             f"(load(..., n_seq=N) for more)")

    def n_past(self, seq: int = 0) -> int:
        """Next position of sequence `seq` (one past the largest stored position)."""
        self._check_seq(seq)
        return self.pos_next[seq]

    def seq_len(self, seq: int = 0) -> int:
        """Cells used by sequence `seq`."""
        self._check_seq(seq)
        return self.n_cells[seq]

    def clear(self, seq: int | None = None) -> None:
        for s in (range(self.n_seq) if seq is None else [seq]):
            self._check_seq(s)
            self.n_cells[s] = 0
            self.pos_next[s] = 0
            self._keys[s] = []

    def truncate(self, seq: int, n: int) -> None:
        """Keep the first n cells of `seq` (drop a rejected continuation, reuse a shared prompt prefix)."""
        self._check_seq(seq)
        if not 0 <= n <= self.n_cells[seq]:
            raise ValueError(f"truncate: sequence {seq} has {self.n_cells[seq]} cells, cannot keep {n}")
        self.n_cells[seq] = n
        self.pos_next[seq] = int(self._cell_pos[seq, :n].max()) + 1 if n else 0
        del self._keys[seq][n:]

    def snapshot(self) -> tuple:
        """Cheap state for undoing appends (what a forward pass does); see checkpoint() for anything else."""
        return list(self.n_cells), list(self.pos_next)

    def restore(self, state: tuple) -> None:
        """Roll back to a snapshot: cells appended since are forgotten (with their keys)."""
        self.n_cells, self.pos_next = list(state[0]), list(state[1])
        for s, n in enumerate(self.n_cells):
            del self._keys[s][n:]

    # ---- what each sequence holds -------------------------------------------------------------------------
    def keys(self, seq: int = 0) -> list:
        """One entry per used cell of `seq`: token id, media row key, or None (unknown)."""
        self._check_seq(seq)
        return list(self._keys[seq])

    def record(self, seq: int, keys, start: int | None = None) -> None:
        """Say what cells [start, start + len(keys)) of `seq` hold (default: the last len(keys) cells)."""
        self._check_seq(seq)
        keys = list(keys)
        n = self.n_cells[seq]
        start = n - len(keys) if start is None else int(start)
        if start < 0 or start + len(keys) > n:
            raise ValueError(f"record: cells [{start}, {start + len(keys)}) are outside the {n} used cells of "
                             f"sequence {seq}")
        self._keys[seq][start:start + len(keys)] = keys

    def common_prefix(self, seq: int, keys, limit: int | None = None) -> int:
        """Length of the longest prefix of `keys` that the cache of `seq` holds (None entries never match)."""
        held = self._keys[seq]
        lim = min(len(held), len(keys), len(keys) if limit is None else max(0, int(limit)))
        n = 0
        while n < lim and held[n] is not None and held[n] == keys[n]:
            n += 1
        return n

    def checkpoint(self, seq: int, start: int | None = None) -> "KVCheckpoint":
        """Everything a call may change in `seq` from cell `start` (default: its current end) on."""
        self._check_seq(seq)
        end = self.n_cells[seq]
        start = end if start is None else int(start)
        rows = [(k[seq, start:end].clone(), v[seq, start:end].clone()) for k, v in zip(self.k, self.v)] \
            if end > start else None
        return KVCheckpoint(seq, start, self.snapshot(), self._cell_pos[seq].copy(), list(self._keys[seq]), rows)

    def rollback(self, ck: "KVCheckpoint") -> None:
        """Undo everything done to sequence ck.seq since checkpoint() (other sequences keep their appends)."""
        seq = ck.seq
        if ck.rows is not None:
            n = ck.rows[0][0].shape[0]
            for (k, v), (ks, vs) in zip(zip(self.k, self.v), ck.rows):
                k[seq, ck.start:ck.start + n] = ks
                v[seq, ck.start:ck.start + n] = vs
        self._cell_pos[seq] = ck.cell_pos
        self.n_cells[seq], self.pos_next[seq] = ck.state[0][seq], ck.state[1][seq]
        self._keys[seq] = list(ck.keys)

    # ---- planning -----------------------------------------------------------------------------------------
    def plan(self, ub) -> AttnPlan:
        """Plan micro-batch `ub` (a vlm.batch.UBatch): group rows per sequence, check room, pick the path."""
        runs = ub.runs
        order: dict[int, list[tuple[int, int]]] = {}
        for seq, r0, n in runs:
            self._check_seq(seq)
            order.setdefault(seq, []).append((r0, n))
        perm = inv = None
        if len(order) != len(runs):  # a sequence appears in several runs: regroup rows by sequence (stable)
            idx = [r for s in order for r0, n in order[s] for r in range(r0, r0 + n)]
            perm = torch.tensor(idx, dtype=torch.int64)
            inv = torch.empty_like(perm)
            inv[perm] = torch.arange(perm.numel())
        spans, row = [], 0
        for s, parts in order.items():
            n = sum(p[1] for p in parts)
            if self.n_cells[s] + n > self.n_ctx:
                raise ContextFullError(
                    f"sequence {s}: {self.n_cells[s]} cells used + {n} new tokens exceed the context size "
                    f"n_ctx={self.n_ctx} (load the model with a larger n_ctx, or shorten the input)")
            spans.append(SeqSpan(s, row, n, self.n_cells[s]))
            row += n
        pos = ub.pos if perm is None else ub.pos[..., perm]
        pos_max = pos.max(0).values if pos.dim() == 2 else pos
        max_pos = {sp.seq: int(pos_max[sp.row0:sp.row0 + sp.n].max()) for sp in spans}
        ns = {sp.n for sp in spans}
        decode = ub.causal and len(ns) == 1 and next(iter(ns)) <= MAX_DECODE_Q
        seq_index = cell_index = None
        if len(spans) > 1:
            seq_index = torch.cat([torch.full((sp.n,), sp.seq, dtype=torch.int64) for sp in spans])
            cell_index = torch.cat([torch.arange(sp.cell0, sp.cell0 + sp.n) for sp in spans])
            seq_index = to_device(seq_index, torch.int64, self.device)
            cell_index = to_device(cell_index, torch.int64, self.device)
        return AttnPlan(spans, ub.causal, perm, inv, decode, seq_index, cell_index, max_pos, self.device)

    def commit(self, plan: AttnPlan, pos: torch.Tensor | None = None) -> None:
        """Mark the planned rows as stored (call after every layer ran)."""
        pmax = None
        if pos is not None:
            p = pos if plan.perm is None else pos[..., plan.perm]
            pmax = (p.max(0).values if p.dim() == 2 else p).numpy()
        for sp in plan.spans:
            if pmax is not None:
                self._cell_pos[sp.seq, sp.cell0:sp.cell0 + sp.n] = pmax[sp.row0:sp.row0 + sp.n]
            self.n_cells[sp.seq] = sp.cell0 + sp.n
            held = self._keys[sp.seq]
            del held[sp.cell0:]
            held.extend([None] * sp.n)           # unknown until the writer records them
            self.pos_next[sp.seq] = max(self.pos_next[sp.seq] if sp.cell0 else 0, plan.max_pos[sp.seq] + 1)

    # ---- per layer ----------------------------------------------------------------------------------------
    def store(self, il: int, plan: AttnPlan, k: torch.Tensor, v: torch.Tensor) -> None:
        """Write this micro-batch's k, v [n_tokens, n_head_kv, head_dim] (sequence-grouped order)."""
        kc, vc = self.k[il], self.v[il]
        sp = plan.single
        if sp is not None:
            kc[sp.seq, sp.cell0:sp.cell0 + sp.n] = k
            vc[sp.seq, sp.cell0:sp.cell0 + sp.n] = v
        else:
            kc.index_put_((plan.seq_index, plan.cell_index), k)
            vc.index_put_((plan.seq_index, plan.cell_index), v)

    def decode_views(self, il: int, plan: AttnPlan, window: int | None):
        """(k_cache, v_cache, seq_lens int32, q_slots) for vlm_kernels.decode_attention after store().

        One sequence: a [1, L, ...] view of its rows, starting at the first row the window can see.
        Several: the whole cache (q is scattered into all n_seq slots, absent ones get seq_len 0) unless the
        batch holds exactly the slots a..b in order, then a view of those.
        """
        key = ("dec", window)
        hit = plan._cache.get(key)
        kc, vc = self.k[il], self.v[il]
        if hit is None:
            sp = plan.single
            if sp is not None:
                end = sp.cell0 + sp.n
                lo = max(0, sp.cell0 + 1 - window) if window else 0
                lens = to_device([end - lo], torch.int32, self.device)
                hit = (slice(sp.seq, sp.seq + 1), slice(lo, end), lens, None)
            else:
                seqs = [s.seq for s in plan.spans]
                ends = [s.cell0 + s.n for s in plan.spans]
                if seqs == list(range(seqs[0], seqs[0] + len(seqs))):
                    lens = to_device(ends, torch.int32, self.device)
                    hit = (slice(seqs[0], seqs[-1] + 1), slice(0, max(ends)), lens, None)
                else:
                    full = [0] * self.n_seq
                    for s, e in zip(seqs, ends):
                        full[s] = e
                    lens = to_device(full, torch.int32, self.device)
                    hit = (slice(None), slice(0, max(ends)), lens,
                           to_device(seqs, torch.int64, self.device))
            plan._cache[key] = hit
        s_sl, c_sl, lens, slots = hit
        return kc[s_sl, c_sl], vc[s_sl, c_sl], lens, slots

    def prefill_views(self, il: int, plan: AttnPlan, window: int | None):
        """(k, v, cu_seqlens_q, cu_seqlens_k) packed over the batch's sequences for vlm_kernels.attention, after
        store(): per sequence the cache rows [lo, cell0 + n) where lo drops rows no query can see."""
        key = ("pre", window)
        hit = plan._cache.get(key)
        if hit is None:
            ranges = []
            for sp in plan.spans:
                lo = max(0, sp.cell0 + 1 - window) if (window and plan.causal) else 0
                ranges.append((sp.seq, lo, sp.cell0 + sp.n))
            cu_q = cu_k = None
            if len(plan.spans) > 1:
                cu_q = torch.tensor([0] + list(np.cumsum([sp.n for sp in plan.spans])), dtype=torch.int32)
                cu_k = torch.tensor([0] + list(np.cumsum([b - a for _, a, b in ranges])), dtype=torch.int32)
                cu_q, cu_k = to_device(cu_q, torch.int32, self.device), to_device(cu_k, torch.int32, self.device)
            hit = (ranges, cu_q, cu_k)
            plan._cache[key] = hit
        ranges, cu_q, cu_k = hit
        kc, vc = self.k[il], self.v[il]
        if len(ranges) == 1:
            s, a, b = ranges[0]
            return kc[s, a:b], vc[s, a:b], None, None
        k = torch.cat([kc[s, a:b] for s, a, b in ranges])
        v = torch.cat([vc[s, a:b] for s, a, b in ranges])
        return k, v, cu_q, cu_k
