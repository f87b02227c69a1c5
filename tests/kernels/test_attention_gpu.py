"""GPU-only attention checks: bf16 through the real compiler, long sequences, every autotune config.

Compiles are the cost here (~1-2 s each), so correctness runs use one fixed launch config per variant and
the config sweep covers the padded head dims 64 / 128 / 256 once each.
"""
import pytest
import torch

from _tol import TOL, rel_err
from vlm_kernels.attention import attention_ref, attention_triton, head_dim_p2, prefill_configs
from vlm_kernels.decode_attention import decode_attention_ref, decode_attention_triton, decode_configs

pytestmark = pytest.mark.gpu

# Max abs error / max |ref| (architecture.md tolerance table).
HEAD_DIMS = [64, 72, 80, 96, 128, 256]
LENS = [1, 1000, 777, 4096]  # varlen batch: single token, odd lengths, 4k


def qkv(lens_q, lens_k, n_head, n_head_kv, head_dim, dtype=torch.bfloat16, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    q = torch.randn(sum(lens_q), n_head, head_dim, device="cuda", generator=g).to(dtype)
    k = torch.randn(sum(lens_k), n_head_kv, head_dim, device="cuda", generator=g).to(dtype)
    v = torch.randn(sum(lens_k), n_head_kv, head_dim, device="cuda", generator=g).to(dtype)
    return q, k, v, cu(lens_q), cu(lens_k)


def cu(lens):
    return torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32, device="cuda")


def cfg(head_dim):
    return prefill_configs(head_dim_p2(head_dim))[0]


def as_tuple(c):
    return (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages)


@pytest.mark.parametrize("head_dim", HEAD_DIMS)
@pytest.mark.parametrize("causal", [False, True])
def test_prefill_bf16_varlen_gqa(head_dim, causal):
    q, k, v, cq, ck = qkv(LENS, LENS, 8, 2, head_dim)
    kw = dict(causal=causal, cu_seqlens_q=cq, cu_seqlens_k=ck)
    out = attention_triton(q, k, v, config=as_tuple(cfg(head_dim)), **kw)
    assert rel_err(out, attention_ref(q, k, v, **kw)) <= TOL[torch.bfloat16]


@pytest.mark.parametrize("head_dim", [128, 256])
@pytest.mark.parametrize("window,softcap", [(512, None), (None, 50.0), (256, 30.0)])
def test_prefill_bf16_window_softcap(head_dim, window, softcap):
    # Gemma 2/3-like: sliding window and/or logit softcap; a prefix-continuation chunk in sequence 2.
    lens_q, lens_k = [1000, 300, 2048], [1000, 1300, 2048]
    q, k, v, cq, ck = qkv(lens_q, lens_k, 4, 1, head_dim, seed=1)
    kw = dict(causal=True, sliding_window=window, logit_softcap=softcap, cu_seqlens_q=cq, cu_seqlens_k=ck)
    out = attention_triton(q, k, v, config=as_tuple(cfg(head_dim)), **kw)
    assert rel_err(out, attention_ref(q, k, v, **kw)) <= TOL[torch.bfloat16]


def test_prefill_fp32_ieee():
    # fp32 inputs must not silently run in TF32 (tolerance 1e-5 would fail with TF32's 10-bit mantissa).
    q, k, v, cq, ck = qkv([300, 129], [300, 129], 4, 2, 64, dtype=torch.float32, seed=2)
    kw = dict(causal=True, cu_seqlens_q=cq, cu_seqlens_k=ck)
    out = attention_triton(q, k, v, config=as_tuple(cfg(64)), **kw)
    assert rel_err(out, attention_ref(q, k, v, **kw)) <= TOL[torch.float32]


@pytest.mark.parametrize("hd_p2", [64, 128, 256])
def test_every_prefill_config_compiles_and_matches(hd_p2):
    q, k, v, cq, ck = qkv([777, 2048], [777, 2048], 4, 2, hd_p2, seed=3)
    kw = dict(causal=False, cu_seqlens_q=cq, cu_seqlens_k=ck)
    ref = attention_ref(q, k, v, **kw)
    configs = prefill_configs(hd_p2)
    assert configs
    for c in configs:
        out = attention_triton(q, k, v, config=as_tuple(c), **kw)
        assert rel_err(out, ref) <= TOL[torch.bfloat16], c
    out = attention_triton(q, k, v, **kw)  # the autotuned path picks one of them
    assert rel_err(out, ref) <= TOL[torch.bfloat16]


# ---------------------------------------------------------------------------------------------------------
def cache(n_seq, max_ctx, n_q, n_head, n_head_kv, head_dim, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    q = torch.randn(n_seq, n_q, n_head, head_dim, device="cuda", generator=g).bfloat16()
    kc = torch.randn(n_seq, max_ctx, n_head_kv, head_dim, device="cuda", generator=g).bfloat16()
    vc = torch.randn(n_seq, max_ctx, n_head_kv, head_dim, device="cuda", generator=g).bfloat16()
    return q, kc, vc


@pytest.mark.parametrize("head_dim", HEAD_DIMS)
def test_decode_bf16_ragged_gqa(head_dim):
    q, kc, vc = cache(4, 4096, 1, 8, 2, head_dim)
    sl = torch.tensor([4096, 1, 1537, 300], dtype=torch.int32, device="cuda")
    out = decode_attention_triton(q, kc, vc, sl, config=(64, 4, 3))
    assert rel_err(out, decode_attention_ref(q, kc, vc, sl)) <= TOL[torch.bfloat16]


@pytest.mark.parametrize("n_splits", [1, None])
def test_decode_bf16_window_softcap_multi_token(n_splits):
    q, kc, vc = cache(3, 2048, 3, 8, 1, 256, seed=1)
    sl = torch.tensor([2048, 3, 1000], dtype=torch.int32, device="cuda")
    kw = dict(sliding_window=512, logit_softcap=50.0)
    out = decode_attention_triton(q, kc, vc, sl, n_splits=n_splits, config=(32, 4, 4), **kw)
    assert rel_err(out, decode_attention_ref(q, kc, vc, sl, **kw)) <= TOL[torch.bfloat16]


@pytest.mark.parametrize("hd_p2", [64, 128, 256])
def test_every_decode_config_compiles_and_matches(hd_p2):
    q, kc, vc = cache(2, 3000, 1, 8, 2, hd_p2, seed=2)
    sl = torch.tensor([3000, 999], dtype=torch.int32, device="cuda")
    ref = decode_attention_ref(q, kc, vc, sl)
    configs = decode_configs(hd_p2)
    assert configs
    for c in configs:
        out = decode_attention_triton(q, kc, vc, sl, config=(c.kwargs["BLOCK_N"], c.num_warps, c.num_stages))
        assert rel_err(out, ref) <= TOL[torch.bfloat16], c
    out = decode_attention_triton(q, kc, vc, sl)  # autotuned
    assert rel_err(out, ref) <= TOL[torch.bfloat16]


def test_decode_cuda_graph_capture():
    # No host sync in decode: the launch can be captured and replayed with new seq_lens values.
    q, kc, vc = cache(2, 1024, 1, 4, 1, 128, seed=3)
    sl = torch.tensor([1024, 200], dtype=torch.int32, device="cuda")
    decode_attention_triton(q, kc, vc, sl)  # autotune + compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = decode_attention_triton(q, kc, vc, sl)
    sl.copy_(torch.tensor([500, 37], dtype=torch.int32))
    graph.replay()
    torch.cuda.synchronize()
    assert rel_err(out, decode_attention_ref(q, kc, vc, sl)) <= TOL[torch.bfloat16]
