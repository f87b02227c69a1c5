"""vlm_kernels.attention: Triton (interpreter on CPU, compiled on CUDA) against the SDPA reference.

Shapes are small (grids <= ~256 programs) and straddle the tiles: lengths 1, 7, 65, 129 around the 32-row
interpreter blocks, head dims that are not powers of two, GQA ratios 1..8, q_len != k_len.
"""
import pytest
import torch

from _tol import TOL, rel_err
from oracles import need
import vlm_kernels
from vlm_kernels.attention import (alignment_hint, attention_ref, attention_triton, masked_attention_fp32,
                               visible_mask)

# Max abs error / max |ref| (architecture.md tolerance table).
DTYPES = [torch.float32, torch.float16]


def make_qkv(n_q, n_k, n_head, n_head_kv, head_dim, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(n_q, n_head, head_dim, generator=g)
    k = torch.randn(n_k, n_head_kv, head_dim, generator=g)
    v = torch.randn(n_k, n_head_kv, head_dim, generator=g)
    return (t.to(dtype=dtype, device=device) for t in (q, k, v))


def cu(lens, device):
    return torch.tensor([0] + list(torch.tensor(lens).cumsum(0)), dtype=torch.int32, device=device)


def check(q, k, v, tol=None, **kw):
    out = attention_triton(q, k, v, **kw)
    ref = attention_ref(q, k, v, **kw)
    assert out.dtype == q.dtype and out.shape == q.shape
    assert torch.isfinite(out.float()).all()
    err = rel_err(out, ref)
    assert err <= (tol or TOL[q.dtype]), f"rel err {err:.3e} for {kw}"
    return out, ref


# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("causal,window,softcap", [(False, None, None), (True, None, None), (True, 16, None),
                                                   (True, None, 2.0), (True, 40, 2.0), (False, None, 2.0)])
def test_self_attention_variants(device, dtype, causal, window, softcap):
    q, k, v = make_qkv(129, 129, 4, 2, 64, dtype, device)
    check(q, k, v, causal=causal, sliding_window=window, logit_softcap=softcap)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("ratio,lens", [(1, [7]), (2, [1, 129]), (4, [7, 1, 129, 3, 64]), (8, [129, 7])])
def test_varlen_gqa(device, dtype, causal, ratio, lens):
    n = sum(lens)
    n_head_kv = 2 if ratio <= 2 else 1
    q, k, v = make_qkv(n, n, ratio * n_head_kv, n_head_kv, 64, dtype, device, seed=len(lens))
    cs = cu(lens, device)
    out, ref = check(q, k, v, causal=causal, cu_seqlens_q=cs, cu_seqlens_k=cs)
    # Packing must not leak across sequences: each sequence alone gives the same rows.
    s = 0
    for ln in lens:
        alone = attention_ref(q[s:s + ln], k[s:s + ln], v[s:s + ln], causal=causal)
        assert torch.equal(ref[s:s + ln], alone)
        s += ln


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("causal", [False, True])
def test_cross_attention_lengths_differ(device, dtype, causal):
    # Per sequence q_len != k_len; with causal, lk < lq leaves the first lq - lk rows without keys (zeros).
    lens_q, lens_k = [7, 1, 40, 129, 5], [129, 50, 3, 7, 0]
    q, _, _ = make_qkv(sum(lens_q), 1, 4, 1, 80, dtype, device, seed=1)
    _, k, v = make_qkv(1, sum(lens_k), 4, 1, 80, dtype, device, seed=2)
    out, ref = check(q, k, v, causal=causal, cu_seqlens_q=cu(lens_q, device), cu_seqlens_k=cu(lens_k, device))
    if causal:  # sequence 2 (40 queries, 3 keys): rows 0..36 see nothing
        assert out[8:8 + 37].abs().max() == 0
    assert out[-5:].abs().max() == 0  # sequence 4 has no keys at all


def test_cross_attention_dense(device):
    # Whisper / mllama style: one sequence, 33 queries over 129 encoder keys, no mask.
    q, _, _ = make_qkv(33, 1, 2, 2, 64, torch.float32, device)
    _, k, v = make_qkv(1, 129, 2, 2, 64, torch.float32, device, seed=3)
    check(q, k, v, causal=False)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("head_dim", [16, 64, 72, 80, 96, 128, 256])
def test_head_dims(device, dtype, head_dim):
    q, k, v = make_qkv(65, 65, 2, 1, head_dim, dtype, device, seed=head_dim)
    check(q, k, v, causal=True)


@pytest.mark.parametrize("config", [(16, 16, 4, 1), (64, 16, 4, 1), (32, 64, 4, 1)])
@pytest.mark.parametrize("window", [None, 1, 5, 33])
def test_tile_shapes_and_window_edges(device, config, window):
    # Masked / unmasked KV-loop segments move with the tile shape and the window: check many combinations,
    # including a chunk that continues a 20-token cached prefix (queries start at position 20).
    lens_q, lens_k = [70, 1, 45], [70, 9, 65]
    q, _, _ = make_qkv(sum(lens_q), 1, 2, 1, 64, torch.float32, device, seed=5)
    _, k, v = make_qkv(1, sum(lens_k), 2, 1, 64, torch.float32, device, seed=6)
    kw = dict(causal=True, sliding_window=window, cu_seqlens_q=cu(lens_q, device), cu_seqlens_k=cu(lens_k, device))
    out = attention_triton(q, k, v, config=config, **kw)
    assert rel_err(out, attention_ref(q, k, v, **kw)) <= TOL[torch.float32]


def test_prefix_continuation_equals_full_prefill(device):
    # A chunk of 30 queries after a 50-token prefix gives the last 30 rows of causal attention over 80 tokens.
    q, k, v = make_qkv(80, 80, 4, 2, 64, torch.float32, device, seed=7)
    for window in (None, 24):
        full = attention_triton(q, k, v, causal=True, sliding_window=window)
        chunk = attention_triton(q[50:], k, v, causal=True, sliding_window=window)
        assert rel_err(chunk, full[50:]) <= TOL[torch.float32]


def test_strided_views(device):
    # q/k/v sliced out of one fused QKV projection output: non-contiguous token strides.
    g = torch.Generator().manual_seed(8)
    qkv = torch.randn(129, 4 + 2 + 2, 64, generator=g).to(device)
    q, k, v = qkv[:, :4], qkv[:, 4:6], qkv[:, 6:]
    assert not q.is_contiguous()
    out, _ = check(q, k, v, causal=True)
    assert out.is_contiguous()


def test_alignment_hint_and_misaligned_views(device):
    """The kernel is told strides are multiples of 16 bytes (ALIGN) only when they are: SigLIP's head_dim 72 from
    a fused QKV buffer gets the hint; a view starting one element in, or head_dim 36 in fp16, does not. Both
    paths give the reference result."""
    g = torch.Generator().manual_seed(11)
    qkv = torch.randn(40, 3 * 4, 72, generator=g).to(device)
    q, k, v = qkv[:, :4], qkv[:, 4:8], qkv[:, 8:]
    assert alignment_hint(q, k, v) == 4                                   # fp32: 4 elements per 16 bytes
    assert alignment_hint(q.half(), k.half(), v.half()) == 8
    assert alignment_hint(torch.zeros(8, 2, 36, dtype=torch.float16)) == 1
    flat = torch.randn(40 * 4 * 72 + 1, generator=g).to(device)
    q_off = flat[1:].view(40, 4, 72)                                      # base pointer 4 bytes past alignment
    assert alignment_hint(q_off, k, v) == 1
    check(q, k, v, causal=False)
    check(q_off, k, v, causal=True)


def test_scale_and_softcap_change_the_result(device):
    q, k, v = make_qkv(33, 33, 2, 2, 64, torch.float32, device, seed=9)
    base = attention_triton(q, k, v, causal=False)
    assert rel_err(attention_triton(q, k, v, causal=False, scale=0.3), base) > 1e-2
    assert rel_err(attention_triton(q, k, v, causal=False, logit_softcap=1.0), base) > 1e-2
    check(q, k, v, causal=False, scale=0.3, logit_softcap=1.0)


def test_empty_and_single_token(device):
    q, k, v = make_qkv(0, 5, 2, 1, 64, torch.float32, device)
    assert attention_triton(q, k, v, causal=True).shape == (0, 2, 64)
    q, k, v = make_qkv(1, 1, 2, 1, 64, torch.float32, device)
    out, _ = check(q, k, v, causal=True)
    assert torch.allclose(out, v.repeat_interleave(2, 1), atol=1e-6)  # one visible key: softmax weight 1


# ---------------------------------------------------------------------------------------------------------
# The reference is the spec: pin its conventions to HF transformers.
def test_sliding_window_matches_hf_convention():
    masking_utils = need("transformers.masking_utils")
    window, n = 5, 12
    overlay = masking_utils.sliding_window_overlay(window)
    causal = masking_utils.causal_mask_function
    hf = torch.tensor([[bool(causal(0, 0, i, j)) and bool(overlay(0, 0, i, j)) for j in range(n)] for i in range(n)])
    assert torch.equal(visible_mask(n, n, True, window), hf)
    assert visible_mask(n, n, True, window).sum(1).max() == window  # the query itself + window - 1 before


def test_softcap_formula_matches_gemma2_eager():
    g = torch.Generator().manual_seed(10)
    q, k, v = (torch.randn(9, 2, 16, generator=g) for _ in range(3))
    vis = visible_mask(9, 9, True, None)
    ours = masked_attention_fp32(q, k, v, vis, 0.25, 3.0)
    # Gemma 2 eager attention, written out: scores * scaling, / softcap, tanh, * softcap, + causal mask.
    s = torch.einsum("qhd,khd->hqk", q, k) * 0.25
    s = torch.tanh(s / 3.0) * 3.0 + torch.where(vis, 0.0, float("-inf"))
    expect = torch.einsum("hqk,khd->qhd", torch.softmax(s, -1), v)
    assert torch.allclose(ours, expect, atol=1e-6)


# ---------------------------------------------------------------------------------------------------------
def _bad(device):
    q, k, v = make_qkv(10, 10, 4, 2, 64, torch.float32, device)
    return q, k, v


@pytest.mark.parametrize("fn", [attention_triton, attention_ref])
def test_bad_input(device, fn):
    q, k, v = _bad(device)
    with pytest.raises(ValueError, match="not a multiple of n_head_kv"):
        fn(q, k[:, :1].expand(10, 3, 64), v[:, :1].expand(10, 3, 64), causal=True)
    with pytest.raises(ValueError, match="head_dim mismatch"):
        fn(q, k[..., :32], v[..., :32], causal=True)
    with pytest.raises(ValueError, match="same shape"):
        fn(q, k, v[:5], causal=True)
    with pytest.raises(ValueError, match="3-D"):
        fn(q[None], k, v, causal=True)
    with pytest.raises(TypeError, match="share one dtype"):
        fn(q, k.half(), v, causal=True)
    with pytest.raises(TypeError, match="not supported"):
        fn(q.double(), k.double(), v.double(), causal=True)
    with pytest.raises(ValueError, match="head_dim 320 is not supported"):
        big = torch.zeros(4, 2, 320, device=device)
        fn(big, big, big, causal=True)
    with pytest.raises(ValueError, match="sliding_window needs causal"):
        fn(q, k, v, causal=False, sliding_window=4)
    with pytest.raises(ValueError, match="sliding_window must be a positive int"):
        fn(q, k, v, causal=True, sliding_window=0)
    with pytest.raises(ValueError, match="logit_softcap must be a positive"):
        fn(q, k, v, causal=True, logit_softcap=-1.0)
    with pytest.raises(TypeError, match="causal must be a bool"):
        fn(q, k, v, causal=None)


@pytest.mark.parametrize("fn", [attention_triton, attention_ref])
def test_bad_cu_seqlens(device, fn):
    q, k, v = _bad(device)
    good = cu([4, 6], device)
    with pytest.raises(ValueError, match="give both"):
        fn(q, k, v, causal=True, cu_seqlens_q=good)
    with pytest.raises(TypeError, match="must be int32"):
        fn(q, k, v, causal=True, cu_seqlens_q=good.long(), cu_seqlens_k=good)
    with pytest.raises(ValueError, match="not monotonic"):
        bad = torch.tensor([0, 6, 4, 10], dtype=torch.int32, device=device)
        fn(q, k, v, causal=True, cu_seqlens_q=bad, cu_seqlens_k=bad)
    with pytest.raises(ValueError, match="must end at n_tokens=10"):
        bad = torch.tensor([0, 4, 9], dtype=torch.int32, device=device)
        fn(q, k, v, causal=True, cu_seqlens_q=bad, cu_seqlens_k=bad)
    with pytest.raises(ValueError, match="must start at 0"):
        bad = torch.tensor([1, 4, 10], dtype=torch.int32, device=device)
        fn(q, k, v, causal=True, cu_seqlens_q=bad, cu_seqlens_k=bad)
    with pytest.raises(ValueError, match="2 sequences, cu_seqlens_k 1"):
        fn(q, k, v, causal=True, cu_seqlens_q=good, cu_seqlens_k=cu([10], device))


def test_public_op_dispatches_to_triton(device, monkeypatch):
    monkeypatch.setenv("VLM_KERNELS", "triton")
    q, k, v = make_qkv(20, 20, 2, 1, 64, torch.float32, device)
    out = vlm_kernels.attention(q, k, v, causal=True, sliding_window=7)
    assert rel_err(out, attention_ref(q, k, v, causal=True, sliding_window=7)) <= TOL[torch.float32]
    monkeypatch.setenv("VLM_KERNELS", "torch")
    # the torch side of the dispatch table is the fast CPU path (vlm_kernels/cpu_fast.py), checked against the spec
    from vlm_kernels._dispatch import OPS, _load
    torch_fast = _load(OPS["attention"].torch)
    out = vlm_kernels.attention(q, k, v, causal=True)
    assert torch.equal(out, torch_fast(q, k, v, causal=True))
    assert rel_err(out, attention_ref(q, k, v, causal=True)) <= TOL[torch.float32]


def test_autotune_prune_keeps_the_head_dim_list():
    # The CUDA autotuner cannot run here; its pruning (which configs a head dim may use) can.
    from vlm_kernels.attention import _ALL_PREFILL, _prune_prefill, prefill_configs
    q = torch.zeros(1, 1, 128, dtype=torch.float16)
    key = lambda c: (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages)  # noqa: E731
    for hd_p2 in (16, 64, 128, 256):
        kept = _prune_prefill(_ALL_PREFILL, {"Q": q}, HEAD_DIM_P2=hd_p2, bucket_q=4096)
        assert sorted(map(key, kept)) == sorted(map(key, prefill_configs(hd_p2)))
        for bm, bn, _, stages in map(key, kept):
            assert 2 * hd_p2 * (bm + 2 * bn * stages) <= 200 * 1024
    short = _prune_prefill(_ALL_PREFILL, {"Q": q}, HEAD_DIM_P2=64, bucket_q=16)
    assert short and all(c.kwargs["BLOCK_M"] == 64 for c in short)
