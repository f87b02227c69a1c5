"""GraphBuilder blocks and vlm.Batch, against plain-torch references written here.

Attention oracle: a per-query loop that builds the visible key set from first principles (causal by cell,
sliding window of W most recent cells, non-causal chunk = bidirectional within the chunk + window for older
context, cross = everything), then softmax(q·k·scale)·v. It shares no code with vlm_kernels/ or vlm/.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from vlm_kernels.quant import GGMLType, QTensor, quantize
from vlm.batch import Batch
from vlm.config import TextConfig
from vlm.graph import GraphBuilder
from vlm.kv_cache import KVCache

TOL = {"fp32": 1e-5}   # max abs error, fp32 math on both sides

N_EMBD, N_VOCAB = 32, 50
H, H_KV, D = 4, 2, 8


def _cfg(**kw):
    base = dict(arch="test", n_vocab=N_VOCAB, n_ctx_train=256, n_embd=N_EMBD, n_layer=2, n_head=H,
                n_head_kv=H_KV, head_dim=D, head_dim_v=D, n_ff=64, norm_eps=1e-6, rope_mode="neox")
    base.update(kw)
    return TextConfig(**base)


class FakeModel:
    def __init__(self, cfg=None, weights=None):
        self.config = cfg or _cfg()
        g = torch.Generator().manual_seed(0)
        self.weights = weights or {"token_embd.weight": torch.randn(N_VOCAB, N_EMBD, generator=g)}
        self.dtype, self.device, self.tap_hook = torch.float32, torch.device("cpu"), None


def _ub(entries, causal=True, planes=1):
    b = Batch(causal=causal)
    for seq, p0, n in entries:
        b.add_text([1] * n, p0, seq_id=seq, logits=True)
    (ub,) = b.split(4096, planes)
    return ub


def _rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


# ---- reference attention ------------------------------------------------------------------------------------
def ref_attention(q, keys, vals, q_cells, *, causal, window, chunk_start, scale, softcap=None):
    """q [n, H, D]; keys/vals [L, H_KV, D] = cells 0..L-1 of one sequence; q_cells[i] = cell of query i."""
    group = q.shape[1] // keys.shape[1]
    out = torch.zeros(q.shape[0], q.shape[1], vals.shape[2])
    for i, c in enumerate(q_cells):
        vis = []
        for j in range(keys.shape[0]):
            in_chunk = j >= chunk_start
            if causal:
                ok = j <= c and (window is None or c - j < window)
            else:
                ok = in_chunk or window is None or c - j < window
            vis.append(ok)
        idx = torch.tensor([j for j, ok in enumerate(vis) if ok], dtype=torch.long)
        for h in range(q.shape[1]):
            kk, vv = keys[idx, h // group], vals[idx, h // group]
            s = (kk @ q[i, h]) * scale
            if softcap:
                s = softcap * torch.tanh(s / softcap)
            out[i, h] = torch.softmax(s, 0) @ vv
    return out


def _attn_step(kv, entries, q, k, v, *, causal=True, window=None, softcap=None, il=0):
    ub = _ub(entries, causal=causal)
    plan = kv.plan(ub)
    gb = GraphBuilder(FakeModel(), ub, kv, plan)
    out = gb.build_attn(il, q, k, v, window=window, softcap=softcap)
    kv.commit(plan, ub.pos)
    return out


@pytest.mark.parametrize("window,softcap", [(None, None), (5, None), (3, 20.0)])
@pytest.mark.parametrize("chunks", [[12], [7, 9], [4, 1, 1, 10, 1]])
def test_self_attention_through_cache_matches_reference(window, softcap, chunks):
    """Prefill (fresh and continuing) and decode steps, causal, with/without sliding window and softcap."""
    kv = KVCache(1, 1, 64, H_KV, D)
    n = sum(chunks)
    q, k, v = _rand(n, H, D, seed=1), _rand(n, H_KV, D, seed=2), _rand(n, H_KV, D, seed=3)
    p = 0
    for c in chunks:
        got = _attn_step(kv, [(0, p, c)], q[p:p + c], k[p:p + c], v[p:p + c], window=window, softcap=softcap)
        want = ref_attention(q[p:p + c], k[:p + c], v[:p + c], range(p, p + c), causal=True, window=window,
                             chunk_start=p, scale=D ** -0.5, softcap=softcap)
        assert (got - want).abs().max().item() <= TOL["fp32"], (c, p)
        p += c


@pytest.mark.parametrize("window", [None, 4, 100])
def test_non_causal_chunk_sees_itself_and_the_past(window):
    """An image-like chunk (Batch(causal=False)) after 6 cached text rows: bidirectional inside the chunk;
    older rows only within the window (4: partly outside -> explicit-mask path; 100: all inside)."""
    kv = KVCache(1, 1, 64, H_KV, D)
    q, k, v = _rand(11, H, D, seed=4), _rand(11, H_KV, D, seed=5), _rand(11, H_KV, D, seed=6)
    _attn_step(kv, [(0, 0, 6)], q[:6], k[:6], v[:6], window=window)
    got = _attn_step(kv, [(0, 6, 5)], q[6:], k[6:], v[6:], causal=False, window=window)
    want = ref_attention(q[6:], k, v, range(6, 11), causal=False, window=window, chunk_start=6, scale=D ** -0.5)
    assert (got - want).abs().max().item() <= TOL["fp32"]


def test_decode_of_scattered_sequences():
    kv = KVCache(1, 3, 32, H_KV, D)
    data = {s: (_rand(6, H, D, seed=10 + s), _rand(6, H_KV, D, seed=20 + s), _rand(6, H_KV, D, seed=30 + s))
            for s in range(3)}
    for s, n in ((0, 5), (2, 3)):
        q, k, v = data[s]
        _attn_step(kv, [(s, 0, n)], q[:n], k[:n], v[:n])
    # one row for seq 2 (cell 3) then one for seq 0 (cell 5): slots out of order
    q = torch.cat([data[2][0][3:4], data[0][0][5:6]])
    k = torch.cat([data[2][1][3:4], data[0][1][5:6]])
    v = torch.cat([data[2][2][3:4], data[0][2][5:6]])
    got = _attn_step(kv, [(2, 3, 1), (0, 5, 1)], q, k, v)
    for row, (s, c) in enumerate(((2, 3), (0, 5))):
        qs, ks, vs = data[s]
        want = ref_attention(qs[c:c + 1], ks[:c + 1], vs[:c + 1], [c], causal=True, window=None, chunk_start=c,
                             scale=D ** -0.5)
        assert (got[row] - want[0]).abs().max().item() <= TOL["fp32"]


def test_cross_and_cacheless_attention():
    gb = GraphBuilder(FakeModel())
    q, k, v = _rand(5, H, D, seed=7), _rand(9, H_KV, D, seed=8), _rand(9, H_KV, D, seed=9)
    cu_q = torch.tensor([0, 2, 5], dtype=torch.int32)
    cu_k = torch.tensor([0, 4, 9], dtype=torch.int32)
    got = gb.build_attn(None, q, k, v, cross=True, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k)
    for (a, b), (c, d) in (((0, 2), (0, 4)), ((2, 5), (4, 9))):
        want = ref_attention(q[a:b], k[c:d], v[c:d], [0] * (b - a), causal=False, window=None, chunk_start=0,
                             scale=D ** -0.5)
        assert (got[a:b] - want).abs().max().item() <= TOL["fp32"]
    # encoder-style self-attention without a cache: causal off by default
    x = _rand(6, H_KV, D, seed=11)
    got = gb.build_attn(None, x.repeat_interleave(2, 1), x, x)
    want = ref_attention(x.repeat_interleave(2, 1), x, x, [0] * 6, causal=False, window=None, chunk_start=0,
                         scale=D ** -0.5)
    assert (got - want).abs().max().item() <= TOL["fp32"]


# ---- inputs -------------------------------------------------------------------------------------------------
def test_inp_embd_scales_tokens_only_and_places_embeddings():
    cfg = _cfg(embd_scale=math.sqrt(N_EMBD))
    m = FakeModel(cfg)
    table = m.weights["token_embd.weight"]
    img = _rand(2, N_EMBD, seed=12)
    b = Batch().add_text([3, 1], 0).add_embd(img, 2).add_text([5], 4)
    (ub,) = b.split(512)
    x = GraphBuilder(m, ub).build_inp_embd()
    want = torch.cat([table[[3, 1]] * math.sqrt(N_EMBD), img, table[[5]] * math.sqrt(N_EMBD)])
    assert torch.allclose(x, want, atol=0, rtol=1e-6)


def test_inp_embd_quantized_table_matches_dequantized_rows():
    table = _rand(N_VOCAB, N_EMBD, seed=13)
    qt = quantize(table, GGMLType.Q8_0)
    assert isinstance(qt, QTensor)
    m = FakeModel(weights={"token_embd.weight": qt})
    (ub,) = Batch().add_text([7, 0, 49, 7], 0).split(512)
    x = GraphBuilder(m, ub).build_inp_embd()
    assert torch.equal(x, qt.dequantize()[[7, 0, 49, 7]])


def test_inp_embd_errors():
    m = FakeModel()
    (ub,) = Batch().add_embd(torch.zeros(2, N_EMBD + 1), 0).split(512)
    with pytest.raises(ValueError, match=r"width 33 but the model's n_embd is 32"):
        GraphBuilder(m, ub).build_inp_embd()
    (ub,) = Batch().add_text([1, N_VOCAB], 0).split(512)
    with pytest.raises(ValueError, match=r"token id 50 is out of range.*50 tokens"):
        GraphBuilder(m, ub).build_inp_embd()


def test_interleaved_rows_are_regrouped_and_outputs_come_back_in_batch_order():
    m = FakeModel()
    table = m.weights["token_embd.weight"]
    b = Batch()
    b.add_text([10, 11], 0, seq_id=1, logits=True).add_text([20], 0, seq_id=0, logits=True)
    b.add_text([12], 2, seq_id=1, logits=False).add_text([21], 1, seq_id=0, logits=True)
    (ub,) = b.split(512)
    kv = KVCache(1, 2, 8, H_KV, D)
    plan = kv.plan(ub)
    gb = GraphBuilder(m, ub, kv, plan)
    x = gb.build_inp_embd()
    assert torch.equal(x, table[[10, 11, 12, 20, 21]])      # grouped: seq 1 rows, then seq 0 rows
    rows = gb.output_rows()
    assert torch.equal(x[rows], table[[10, 11, 20, 21]])    # batch order of the rows marked for logits


# ---- blocks -------------------------------------------------------------------------------------------------
def test_build_norm_rms_layer_and_residual():
    gb = GraphBuilder(FakeModel())
    x, r, w, b = _rand(3, N_EMBD, seed=14), _rand(3, N_EMBD, seed=15), _rand(N_EMBD, seed=16), _rand(N_EMBD, seed=17)
    want = x / torch.sqrt((x * x).mean(-1, keepdim=True) + 1e-6) * w
    assert (gb.build_norm(x, w) - want).abs().max() <= TOL["fp32"]
    assert (gb.build_norm(x, w, offset=1.0) - want / w * (w + 1)).abs().max() <= TOL["fp32"]
    y, h = gb.build_norm(x, w, residual=r)
    h_ref = x + r
    assert torch.equal(h, h_ref)
    assert (y - h_ref / torch.sqrt((h_ref * h_ref).mean(-1, keepdim=True) + 1e-6) * w).abs().max() <= TOL["fp32"]
    ln = gb.build_norm(x, w, b, kind="layer", eps=1e-5)
    assert (ln - F.layer_norm(x, (N_EMBD,), w, b, 1e-5)).abs().max() <= TOL["fp32"]
    with pytest.raises(ValueError, match="unknown norm kind 'batch'"):
        gb.build_norm(x, w, kind="batch")


def test_build_ffn_gated_and_plain():
    gb = GraphBuilder(FakeModel())
    x = _rand(4, N_EMBD, seed=18)
    up, gate, down = _rand(64, N_EMBD, seed=19), _rand(64, N_EMBD, seed=20), _rand(N_EMBD, 64, seed=21)
    got = gb.build_ffn(x, up, gate, down, act="silu")
    want = (F.silu(x @ gate.T) * (x @ up.T)) @ down.T
    assert (got - want).abs().max() <= 1e-4 * want.abs().max()
    ub = _rand(64, seed=22)
    got = gb.build_ffn(x, up, None, down, act="gelu", up_b=ub)
    want = F.gelu(x @ up.T + ub, approximate="tanh") @ down.T
    assert (got - want).abs().max() <= 1e-4 * want.abs().max()
    with pytest.raises(ValueError, match="unknown activation 'swish2'"):
        gb.build_ffn(x, up, gate, down, act="swish2")


def test_rope_linear_scaling_and_partial_rotation():
    """linear scaling == positions / factor; rope_dims < head_dim rotates only the first dims (NeoX pairs)."""
    def manual(x, pos, theta, n_rot, factor):
        half = n_rot // 2
        inv = 1.0 / theta ** (torch.arange(0, n_rot, 2).float() / n_rot)
        ang = (pos.float()[:, None] / factor) * inv
        c, s = ang.cos()[:, None], ang.sin()[:, None]
        x0, x1 = x[..., :half], x[..., half:n_rot]
        return torch.cat([x0 * c - x1 * s, x1 * c + x0 * s, x[..., n_rot:]], -1)
    x = _rand(5, H, D, seed=23)
    (ub,) = Batch().add_text([1] * 5, 3).split(512)
    gb = GraphBuilder(FakeModel(_cfg(rope_dims=4, rope_scaling="linear", rope_scaling_factor=4.0)), ub)
    got = gb.build_rope(x, 0)
    assert (got - manual(x, torch.arange(3, 8), 10000.0, 4, 4.0)).abs().max() <= TOL["fp32"]


def test_tap_is_a_noop_without_hook():
    gb = GraphBuilder(FakeModel())
    t = torch.ones(2)
    assert gb.tap("x", 0, t) is t
    seen = []
    gb.hook = lambda *a: seen.append(a[:2])
    gb.tap("x", 3, t)
    assert seen == [("x", 3)]


# ---- Batch --------------------------------------------------------------------------------------------------
def test_batch_split_and_flags():
    b = Batch().add_text(list(range(10)), 0, logits="last").add_text([1, 2], 0, seq_id=1, logits=[True, False])
    ubs = b.split(4)
    assert [u.n_tokens for u in ubs] == [4, 4, 4]
    assert ubs[2].runs == [(0, 0, 2), (1, 2, 2)]
    assert torch.cat([u.output for u in ubs]).nonzero().flatten().tolist() == [9, 10]
    assert b.n_tokens == 12 and b.n_outputs == 2 and b.seq_ids() == [0, 1]
    nc = Batch(causal=False).add_embd(torch.zeros(10, 4), 0)
    assert len(nc.split(4)) == 1                      # a non-causal chunk is never split
    (u,) = Batch().add_text([1, 2], 5).split(8, 4)
    assert u.pos.tolist() == [[5, 6], [5, 6], [5, 6], [0, 0]]


@pytest.mark.parametrize("call,match", [
    (lambda b: b.add_text([], 0), "no tokens"),
    (lambda b: b.add_text("hello", 0), "got a string"),
    (lambda b: b.add_text([1, -2], 0), "must be >= 0"),
    (lambda b: b.add_text(torch.tensor([1.0]), 0), "must be integers"),
    (lambda b: b.add_text([1, 2], [0, 1, 2]), r"shape \[2\] or \[4, 2\]"),
    (lambda b: b.add_text([1, 2], -1), "start position must be >= 0"),
    (lambda b: b.add_text([1], 0, logits="all"), "logits must be a bool, 'last'"),
    (lambda b: b.add_text([1], 0, seq_id=-1), "seq_id must be an int >= 0"),
    (lambda b: b.add_embd(torch.zeros(3), 0), r"\[n, n_embd\]"),
    (lambda b: b.add_embd(torch.zeros(2, 4, dtype=torch.long), 0), "float tensor"),
    (lambda b: b.split(512), "Batch is empty"),
    (lambda b: b.add_text([1], torch.zeros(4, 1, dtype=torch.long)).split(8, 1), "4-plane"),
])
def test_batch_bad_input(call, match):
    with pytest.raises((ValueError, TypeError), match=match):
        call(Batch())
