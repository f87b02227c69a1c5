"""KVCache: layout, planning (paths, row regrouping, windows), commit / truncate / rollback, context limits.

Oracle for the attention views: plain index arithmetic on a cache filled with known values (each row holds
its own cell index), so every slice the cache hands to the kernels can be checked exactly.
"""
from __future__ import annotations

import pytest
import torch

from vlm.batch import Batch
from vlm.kv_cache import ContextFullError, KVCache

N_LAYER, N_SEQ, N_CTX, H_KV, D = 2, 3, 32, 2, 4


def _cache(windows=None):
    return KVCache(N_LAYER, N_SEQ, N_CTX, H_KV, D, windows=windows)


def _ub(*entries, causal=True, planes=1):
    """entries: (seq, pos0, n) -> the single micro-batch of a Batch holding them in this order."""
    b = Batch(causal=causal)
    for seq, p0, n in entries:
        b.add_text(list(range(n)), p0, seq_id=seq, logits=True)
    (ub,) = b.split(512, planes)
    return ub


def _fill(kv, plan, il=0):
    """Store rows whose every value is the (seq, cell) they land in: seq * 1000 + cell."""
    vals = torch.cat([torch.arange(sp.cell0, sp.cell0 + sp.n) + 1000 * sp.seq for sp in plan.spans]).float()
    k = vals[:, None, None].expand(-1, H_KV, D).contiguous()
    kv.store(il, plan, k, -k)


def test_layout_and_dtype():
    kv = KVCache(3, 2, 16, 2, 8, 6, dtype=torch.float16)
    assert len(kv.k) == 3 and kv.k[0].shape == (2, 16, 2, 8) and kv.v[0].shape == (2, 16, 2, 6)
    assert kv.k[0].dtype == torch.float16 and kv.nbytes == 3 * 2 * 16 * 2 * (8 + 6) * 2
    assert float(kv.k[1].abs().sum()) == 0.0   # zero-initialised (reference kernels multiply masked rows by 0)


def test_plan_single_sequence_prefill_then_decode():
    kv = _cache()
    plan = kv.plan(_ub((1, 0, 17)))          # > 16 rows: the prefill kernel
    assert not plan.decode and plan.perm is None and plan.single.seq == 1 and plan.single.cell0 == 0
    assert kv.plan(_ub((1, 0, 16))).decode   # up to 16 new rows per sequence go to decode_attention
    _fill(kv, plan)
    kv.commit(plan, _ub((1, 0, 17)).pos)
    assert kv.seq_len(1) == 17 and kv.n_past(1) == 17 and kv.seq_len(0) == 0
    step = _ub((1, 17, 1))
    plan = kv.plan(step)
    assert plan.decode and plan.single.cell0 == 17
    _fill(kv, plan)
    kc, vc, lens, slots = kv.decode_views(0, plan, None)
    assert slots is None and lens.tolist() == [18] and kc.shape == (1, 18, H_KV, D)
    assert kc[0, :, 0, 0].tolist() == [1000 + c for c in range(18)]
    assert torch.equal(vc, -kc)


def test_decode_view_starts_at_window():
    kv = _cache()
    ub = _ub((0, 0, 20))
    plan = kv.plan(ub)
    _fill(kv, plan)
    kv.commit(plan, ub.pos)
    plan = kv.plan(_ub((0, 20, 1)))
    _fill(kv, plan)
    kc, _, lens, _ = kv.decode_views(0, plan, 8)
    # the new token (cell 20) sees cells 13..20: the 8 most recent including itself
    assert lens.tolist() == [8] and kc[0, :, 0, 0].tolist() == list(range(13, 21))


def test_prefill_views_continue_the_cache_and_drop_rows_outside_window():
    kv = _cache()
    ub = _ub((2, 0, 10))
    plan = kv.plan(ub)
    _fill(kv, plan)
    kv.commit(plan, ub.pos)
    plan = kv.plan(_ub((2, 10, 20)))         # 20 rows: prefill path
    assert not plan.decode
    _fill(kv, plan)
    k, v, cu_q, cu_k = kv.prefill_views(0, plan, None)
    assert cu_q is None and k[:, 0, 0].tolist() == [2000 + c for c in range(30)]
    k, _, _, _ = kv.prefill_views(0, plan, 4)  # first new query (cell 10) sees cells 7..10
    assert k[:, 0, 0].tolist() == [2000 + c for c in range(7, 30)]


def test_interleaved_sequences_are_regrouped():
    kv = _cache()
    ub = _ub((2, 0, 3), (0, 0, 2), (2, 3, 1), (0, 2, 2))
    plan = kv.plan(ub)
    assert [(s.seq, s.row0, s.n) for s in plan.spans] == [(2, 0, 4), (0, 4, 4)]
    assert plan.perm.tolist() == [0, 1, 2, 5, 3, 4, 6, 7]
    assert torch.equal(plan.perm[plan.inv_perm], torch.arange(8))
    _fill(kv, plan)
    k, _, cu_q, cu_k = kv.prefill_views(0, plan, None)
    assert cu_q.tolist() == [0, 4, 8] and cu_k.tolist() == [0, 4, 8]
    assert k[:, 0, 0].tolist() == [2000, 2001, 2002, 2003, 0, 1, 2, 3]
    kv.commit(plan, ub.pos)
    assert kv.seq_len(2) == 4 and kv.seq_len(0) == 4 and kv.n_past(2) == 4


def test_multi_sequence_decode_contiguous_and_scattered_slots():
    kv = _cache()
    for seq, n in ((0, 3), (1, 5), (2, 2)):
        ub = _ub((seq, 0, n))
        p = kv.plan(ub)
        _fill(kv, p)
        kv.commit(p, ub.pos)
    plan = kv.plan(_ub((0, 3, 1), (1, 5, 1)))      # slots 0..1 in order: a view of those slots
    assert plan.decode
    _fill(kv, plan)
    kc, _, lens, slots = kv.decode_views(0, plan, None)
    assert slots is None and kc.shape[0] == 2 and lens.tolist() == [4, 6]
    plan = kv.plan(_ub((2, 2, 1), (0, 3, 1)))      # slots 2 then 0: whole cache, absent slot gets length 0
    _fill(kv, plan)
    kc, _, lens, slots = kv.decode_views(0, plan, None)
    assert slots.tolist() == [2, 0] and kc.shape[0] == N_SEQ and lens.tolist() == [4, 0, 3]


def test_mrope_positions_drive_n_past_not_cells():
    kv = _cache()
    b = Batch()
    b.add_text([1, 2], 0, seq_id=0)
    # a 2x3 image at p=2: planes (t, y, x, z); n_past must advance by max(rows, cols) = 3
    t = torch.full((6,), 2)
    y = 2 + torch.arange(6) // 3
    x = 2 + torch.arange(6) % 3
    b.add_embd(torch.zeros(6, 8), torch.stack([t, y, x, torch.zeros(6, dtype=torch.int64)]), seq_id=0)
    (ub,) = b.split(512, 4)
    assert ub.pos.shape == (4, 8) and ub.pos[:, 1].tolist() == [1, 1, 1, 0]   # text row -> (p, p, p, 0)
    plan = kv.plan(ub)
    kv.commit(plan, ub.pos)
    assert kv.seq_len(0) == 8 and kv.n_past(0) == 5


def test_context_full_error_names_sequence_and_sizes():
    kv = _cache()
    with pytest.raises(ContextFullError, match=r"sequence 1: 0 cells used \+ 33 new tokens exceed .*n_ctx=32"):
        kv.plan(_ub((1, 0, 33)))
    with pytest.raises(ValueError, match=r"sequence id 5 out of range.*3 sequence"):
        kv.plan(_ub((5, 0, 1)))


def test_truncate_snapshot_restore_clear():
    kv = _cache()
    ub = _ub((0, 0, 10))
    plan = kv.plan(ub)
    kv.commit(plan, ub.pos)
    state = kv.snapshot()
    ub2 = _ub((0, 10, 4))
    kv.commit(kv.plan(ub2), ub2.pos)
    assert kv.seq_len(0) == 14
    kv.restore(state)
    assert kv.seq_len(0) == 10 and kv.n_past(0) == 10
    kv.truncate(0, 6)
    assert kv.seq_len(0) == 6 and kv.n_past(0) == 6
    with pytest.raises(ValueError, match="has 6 cells, cannot keep 7"):
        kv.truncate(0, 7)
    kv.clear()
    assert kv.seq_len(0) == 0 and kv.n_past(0) == 0


def test_for_config_windows_follow_layers():
    from vlm.config import TextConfig
    cfg = TextConfig(arch="x", n_vocab=10, n_ctx_train=64, n_embd=8, n_layer=3, n_head=2, n_head_kv=1,
                     head_dim=4, head_dim_v=4, n_ff=16, norm_eps=1e-6, sliding_window=5,
                     swa_layers=(True, False, True))
    kv = KVCache.for_config(cfg, 1, 16, torch.float32, "cpu")
    assert kv.windows == [5, None, 5] and kv.k[0].shape == (1, 16, 1, 4)
