"""vlm_kernels.decode_attention: Triton (interpreter on CPU, compiled on CUDA) against the SDPA reference.

Ragged seq_lens (0, 1, odd, full cache), GQA groups, several new tokens, sliding window, softcap, forced and
automatic KV splits; cross-checked against the prefill kernel on the same tokens.
"""
import importlib

import pytest
import torch

from _tol import TOL, rel_err
from vlm_kernels.attention import attention_triton
from vlm_kernels.decode_attention import (MIN_SPLIT_TOKENS, choose_splits, ctx_bucket, decode_attention_ref,
                                      decode_attention_triton)

# Max abs error / max |ref| (architecture.md tolerance table).
DTYPES = [torch.float32, torch.float16]


def make(n_seq, max_ctx, n_q, n_head, n_head_kv, head_dim, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(n_seq, n_q, n_head, head_dim, generator=g)
    kc = torch.randn(n_seq, max_ctx, n_head_kv, head_dim, generator=g)
    vc = torch.randn(n_seq, max_ctx, n_head_kv, head_dim, generator=g)
    return (t.to(dtype=dtype, device=device) for t in (q, kc, vc))


def check(q, kc, vc, seq_lens, **kw):
    out = decode_attention_triton(q, kc, vc, seq_lens, **kw)
    kw.pop("n_splits", None)
    ref = decode_attention_ref(q, kc, vc, seq_lens, **kw)
    assert out.shape == q.shape and out.dtype == q.dtype
    assert torch.isfinite(out.float()).all()
    err = rel_err(out, ref)
    assert err <= TOL[q.dtype], f"rel err {err:.3e} for {kw}"
    return out


LENS = [200, 1, 77, 0]  # full cache, one token, odd, unused slot


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n_splits", [1, 3, None])
@pytest.mark.parametrize("n_head,n_head_kv", [(2, 2), (4, 2), (8, 1)])
def test_ragged_gqa_splits(device, dtype, n_splits, n_head, n_head_kv):
    q, kc, vc = make(4, 200, 1, n_head, n_head_kv, 64, dtype, device)
    sl = torch.tensor(LENS, dtype=torch.int32, device=device)
    out = check(q, kc, vc, sl, n_splits=n_splits)
    assert out[3].abs().max() == 0  # seq_len 0 -> zeros
    # seq_len 1: the single visible value row comes back (softmax weight 1)
    assert torch.allclose(out[1, 0].float(), vc[1, 0].float().repeat_interleave(n_head // n_head_kv, 0), atol=1e-3)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("window,softcap", [(None, None), (16, None), (None, 2.0), (50, 2.0)])
@pytest.mark.parametrize("n_q", [1, 3])
def test_window_softcap_multi_token(device, dtype, window, softcap, n_q):
    q, kc, vc = make(3, 160, n_q, 4, 2, 64, dtype, device, seed=n_q)
    sl = torch.tensor([160, 3 * n_q, 101], dtype=torch.int32, device=device)
    check(q, kc, vc, sl, sliding_window=window, logit_softcap=softcap, n_splits=4)


@pytest.mark.parametrize("head_dim", [16, 64, 72, 80, 96, 128, 256])
def test_head_dims(device, head_dim):
    q, kc, vc = make(2, 96, 2, 4, 1, head_dim, torch.float32, device, seed=head_dim)
    sl = torch.tensor([96, 35], dtype=torch.int32, device=device)
    check(q, kc, vc, sl, n_splits=2)


def test_matches_prefill_kernel(device):
    # Decoding the last 3 tokens against the cache = the last 3 rows of causal prefill over the whole sequence.
    q, kc, vc = make(1, 90, 3, 4, 2, 64, torch.float32, device, seed=11)
    for window in (None, 20):
        dec = decode_attention_triton(q, kc, vc, torch.tensor([90], dtype=torch.int32, device=device),
                                      sliding_window=window, n_splits=3)
        pre = attention_triton(q[0], kc[0], vc[0], causal=True, sliding_window=window)
        assert rel_err(dec[0], pre) <= TOL[torch.float32]


def test_three_d_query_and_cache_view(device):
    # q [n_seq, n_head, head_dim] (one token); the cache is one layer of a [n_layer, n_seq, ...] buffer.
    g = torch.Generator().manual_seed(12)
    cache = torch.randn(2, 2, 3, 64, 2, 64, generator=g).to(device)  # [n_layer, k|v, n_seq, ctx, kv heads, d]
    q = torch.randn(3, 4, 64, generator=g).to(device)
    sl = torch.tensor([64, 10, 33], dtype=torch.int32, device=device)
    out = decode_attention_triton(q, cache[1, 0], cache[1, 1], sl)
    assert out.shape == (3, 4, 64)
    ref = decode_attention_ref(q, cache[1, 0], cache[1, 1], sl)
    assert rel_err(out, ref) <= TOL[torch.float32]


def test_split_count_is_shape_only():
    cpu = torch.device("cpu")
    assert choose_splits(64, 8, 131072, cpu) == 1  # 512 programs already
    assert choose_splits(1, 1, 131072, cpu) == 16  # 4 pretend SMs x 4 programs each
    assert choose_splits(1, 1, 300, cpu) == 1      # never chunks below MIN_SPLIT_TOKENS
    for ctx in (256, 257, 511, 512, 1000, 4096, 70000):
        assert ctx // choose_splits(1, 1, ctx, cpu) >= MIN_SPLIT_TOKENS


def test_autotune_key_and_splits_stable_while_decoding():
    """A one-sequence decode step views cache rows [lo, end): max_ctx grows by one per token. The autotune key
    and the split count may change only at powers of two, else the autotuner re-benchmarks at every token."""
    cpu = torch.device("cpu")
    ctxs = range(1, 20000)
    keys = {ctx_bucket(c) for c in ctxs}
    splits = {choose_splits(1, 1, c, cpu) for c in ctxs}
    assert len(keys) <= 7 and len(splits) <= 7, (sorted(keys), sorted(splits))
    changes = [c for c in ctxs[1:] if ctx_bucket(c) != ctx_bucket(c - 1)
               or choose_splits(1, 1, c, cpu) != choose_splits(1, 1, c - 1, cpu)]
    assert all(c & (c - 1) == 0 for c in changes), changes   # only where c is a power of two


def test_splits_are_deterministic(device):
    q, kc, vc = make(2, 256, 1, 4, 1, 64, torch.float32, device, seed=13)
    sl = torch.tensor([256, 129], dtype=torch.int32, device=device)
    a = decode_attention_triton(q, kc, vc, sl, n_splits=5)
    b = decode_attention_triton(q, kc, vc, sl, n_splits=5)
    assert torch.equal(a, b)


@pytest.mark.parametrize("fn", [decode_attention_triton, decode_attention_ref])
def test_bad_input(device, fn):
    q, kc, vc = make(2, 32, 1, 4, 2, 64, torch.float32, device)
    sl = torch.tensor([32, 5], dtype=torch.int32, device=device)
    with pytest.raises(ValueError, match="not a multiple of n_head_kv"):
        fn(q[:, :, :3], kc, vc, sl)
    with pytest.raises(ValueError, match="head_dim mismatch"):
        fn(q[..., :32], kc, vc, sl)
    with pytest.raises(ValueError, match="2 sequences, k_cache 1"):
        fn(q, kc[:1], vc[:1], sl)
    with pytest.raises(ValueError, match="must both be"):
        fn(q, kc, vc[:, :16], sl)
    with pytest.raises(TypeError, match="share one dtype"):
        fn(q.half(), kc, vc, sl)
    with pytest.raises(TypeError, match="seq_lens must be int32"):
        fn(q, kc, vc, sl.long())
    with pytest.raises(ValueError, match=r"seq_lens must be \[n_seq\]"):
        fn(q, kc, vc, sl[:1])
    with pytest.raises(ValueError, match="> cache length max_ctx=32"):
        fn(q, kc, vc, torch.tensor([33, 5], dtype=torch.int32, device=device))
    q3 = torch.zeros(2, 3, 4, 64, device=device)
    with pytest.raises(ValueError, match="below n_q=3"):
        fn(q3, kc, vc, torch.tensor([32, 2], dtype=torch.int32, device=device))
    with pytest.raises(ValueError, match="1..16 supported"):
        fn(torch.zeros(2, 17, 4, 64, device=device), kc, vc, sl)
    with pytest.raises(ValueError, match="sliding_window must be a positive int"):
        fn(q, kc, vc, sl, sliding_window=-3)


def test_public_op_dispatches_to_triton(device, monkeypatch):
    monkeypatch.setenv("VLM_KERNELS", "triton")
    vlm_kernels = importlib.import_module("vlm_kernels")
    q, kc, vc = make(2, 40, 1, 4, 2, 64, torch.float32, device)
    sl = torch.tensor([40, 7], dtype=torch.int32, device=device)
    out = vlm_kernels.decode_attention(q, kc, vc, sl, logit_softcap=5.0)
    assert rel_err(out, decode_attention_ref(q, kc, vc, sl, logit_softcap=5.0)) <= TOL[torch.float32]


def test_autotune_prune_respects_smem():
    from vlm_kernels.decode_attention import _DECODE_CONFIGS, _prune_decode, decode_configs
    import triton
    configs = [triton.Config({"BLOCK_N": bn}, num_warps=w, num_stages=s) for bn, w, s in _DECODE_CONFIGS]
    q = torch.zeros(1, dtype=torch.bfloat16)
    for hd_p2 in (64, 128, 256):
        kept = _prune_decode(configs, {"Q": q}, HEAD_DIM_P2=hd_p2)
        assert len(kept) == len(decode_configs(hd_p2)) >= 2
        assert all(2 * hd_p2 * 2 * c.kwargs["BLOCK_N"] * c.num_stages <= 200 * 1024 for c in kept)
    assert len(_prune_decode(configs, {"Q": q}, HEAD_DIM_P2=256)) < len(configs)  # 128-key tiles too big
