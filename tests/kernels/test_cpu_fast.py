"""vlm_kernels.cpu_fast: the torch implementations the dispatcher runs off-Triton, held to the `*_ref` specs.

Every variant each reference supports (GQA, sliding window, softcap, varlen, residual, offsets, partial and
M-RoPE / vision RoPE, several new decode tokens, empty sequences) and the same input errors.
"""
import pytest
import torch

from _tol import TOL, rel_err
import vlm_kernels
from vlm_kernels import _dispatch
from vlm_kernels import cpu_fast as fast
from vlm_kernels.attention import attention_ref
from vlm_kernels.decode_attention import decode_attention_ref
from vlm_kernels.norm import layer_norm_ref, rms_norm_ref
from vlm_kernels.rope import rope_ref

# Max abs error / max |ref| (architecture.md table). Both sides compute in fp32 on the CPU; for fp16/bf16 outputs
# they may differ by one rounding of the output dtype (fp16 ulp 2^-10 ~ 1e-3, bf16 2^-7 ~ 8e-3).


def close(out, ref, dtype=torch.float32):
    assert out.shape == ref.shape and out.dtype == ref.dtype, (out.shape, ref.shape, out.dtype, ref.dtype)
    assert torch.isfinite(out.float()).all()
    err = rel_err(out, ref)
    assert err <= TOL[dtype], f"rel err {err:.3e} > {TOL[dtype]:.0e}"


def randn(*shape, dtype=torch.float32, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


# ------------------------------------------------------------------------------------------------ norms
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [(1, 640), (5, 256), (2, 3, 96)])
@pytest.mark.parametrize("offset", [0.0, 1.0])
@pytest.mark.parametrize("with_residual", [False, True])
def test_rms_norm(dtype, shape, offset, with_residual):
    x = randn(*shape, dtype=dtype) * 3
    w = randn(shape[-1], seed=1)          # GGUF norm weights are fp32
    r = randn(*shape, dtype=dtype, seed=2) if with_residual else None
    got = fast.rms_norm_torch(x, w, 1e-6, offset=offset, residual=r)
    want = rms_norm_ref(x, w, 1e-6, offset=offset, residual=r)
    if with_residual:
        close(got[0], want[0], dtype)
        assert torch.equal(got[1], want[1])          # the new residual stream is the same rounded sum
    else:
        close(got, want, dtype)


def test_rms_norm_no_weight_and_weight_in_x_dtype():
    x = randn(4, 128, dtype=torch.float16)
    close(fast.rms_norm_torch(x, None, 1e-5), rms_norm_ref(x, None, 1e-5), torch.float16)
    w = randn(128, dtype=torch.float16, seed=3)
    close(fast.rms_norm_torch(x, w, 1e-5, offset=1.0), rms_norm_ref(x, w, 1e-5, offset=1.0), torch.float16)


def test_rms_norm_offset_cache_follows_weight_updates():
    x, w = randn(2, 64), randn(64, seed=1)
    fast.rms_norm_torch(x, w, 1e-6, offset=1.0)
    w.mul_(2)                                        # in-place change: the cached w + 1 must not be reused
    close(fast.rms_norm_torch(x, w, 1e-6, offset=1.0), rms_norm_ref(x, w, 1e-6, offset=1.0))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("affine", [True, False])
def test_layer_norm(dtype, affine):
    x, r = randn(7, 320, dtype=dtype) + 2, randn(7, 320, dtype=dtype, seed=1)
    w, b = (randn(320, seed=2), randn(320, seed=3)) if affine else (None, None)
    close(fast.layer_norm_torch(x, w, b, 1e-5), layer_norm_ref(x, w, b, 1e-5), dtype)
    got, h = fast.layer_norm_torch(x, w, b, 1e-5, residual=r)
    want, h_ref = layer_norm_ref(x, w, b, 1e-5, residual=r)
    close(got, want, dtype)
    assert torch.equal(h, h_ref)


def test_norm_errors_match_reference():
    x = randn(2, 8)
    with pytest.raises(ValueError, match=r"weight has shape \(4,\)"):
        fast.rms_norm_torch(x, randn(4), 1e-6)
    with pytest.raises(ValueError, match="offset=1.0 needs a weight"):
        fast.rms_norm_torch(x, None, 1e-6, offset=1.0)
    with pytest.raises(TypeError, match="residual dtype"):
        fast.layer_norm_torch(x, None, None, 1e-5, residual=x.half())


# ------------------------------------------------------------------------------------------------- RoPE
@pytest.mark.parametrize("mode", ["normal", "neox"])
@pytest.mark.parametrize("n_rot", [None, 32])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_rope_1d(mode, n_rot, dtype):
    x = randn(9, 5, 64, dtype=dtype)
    pos = torch.tensor([0, 1, 2, 7, 100, 511, 4096, 70000, 3])        # grows the table past its first size
    for theta in (10000.0, 1e6):
        close(fast.rope_torch(x, pos, theta=theta, mode=mode, n_rot=n_rot),
              rope_ref(x, pos, theta=theta, mode=mode, n_rot=n_rot), dtype)


def test_rope_decode_step_and_strided_input():
    qk = randn(1, 5, 256)[:, :, :]                                   # Gemma 3 270M decode: 4 q + 1 k heads
    pos = torch.tensor([37], dtype=torch.int32)
    close(fast.rope_torch(qk, pos, theta=1e4, mode="neox"), rope_ref(qk, pos, theta=1e4, mode="neox"))
    x = randn(6, 8, 32).transpose(0, 1)                              # [8, 6, 32], non-contiguous tokens
    p = torch.arange(8) + 5
    close(fast.rope_torch(x, p, theta=500.0, mode="normal"), rope_ref(x, p, theta=500.0, mode="normal"))


def test_rope_freq_factors_and_negative_positions():
    x = randn(4, 2, 32)
    ff = torch.linspace(1.0, 8.0, 16)
    pos = torch.tensor([0, 5, 9, 1000])
    close(fast.rope_torch(x, pos, theta=1e4, mode="neox", freq_factors=ff),
          rope_ref(x, pos, theta=1e4, mode="neox", freq_factors=ff))
    neg = torch.tensor([-3, -1, 0, 2])
    close(fast.rope_torch(x, neg, theta=1e4, mode="neox"), rope_ref(x, neg, theta=1e4, mode="neox"))


@pytest.mark.parametrize("n_planes", [3, 4])
def test_mrope(n_planes):
    x = randn(6, 3, 64)
    g = torch.Generator().manual_seed(1)
    pos = torch.randint(0, 300, (n_planes, 6), generator=g)
    sections = [10, 11, 11] if n_planes == 3 else [8, 8, 8, 8]
    close(fast.rope_torch(x, pos, theta=1e6, mode="neox", sections=sections),
          rope_ref(x, pos, theta=1e6, mode="neox", sections=sections))


@pytest.mark.parametrize("rows", [2, 4])
def test_vision_rope(rows):
    x = randn(10, 4, 80)
    pos = torch.randint(0, 40, (rows, 10), generator=torch.Generator().manual_seed(2))
    close(fast.rope_torch(x, pos, theta=1e4, mode="vision"), rope_ref(x, pos, theta=1e4, mode="vision"))


def test_rope_errors_match_reference():
    with pytest.raises(ValueError, match="sum to"):
        fast.rope_torch(randn(2, 1, 16), torch.zeros(3, 2, dtype=torch.int64), theta=1e4, mode="neox",
                        sections=[1, 1, 1])
    with pytest.raises(TypeError, match="not an integer type"):
        fast.rope_torch(randn(2, 1, 16), torch.zeros(2), theta=1e4)


# ------------------------------------------------------------------------------------------ decode attn
def make_cache(n_seq, max_ctx, n_q, n_head, n_head_kv, head_dim, dtype=torch.float32, seed=0):
    return (randn(n_seq, n_q, n_head, head_dim, dtype=dtype, seed=seed),
            randn(n_seq, max_ctx, n_head_kv, head_dim, dtype=dtype, seed=seed + 1),
            randn(n_seq, max_ctx, n_head_kv, head_dim, dtype=dtype, seed=seed + 2))


@pytest.mark.parametrize("n_head,n_head_kv", [(4, 1), (8, 2), (4, 4)])
@pytest.mark.parametrize("n_q", [1, 4])
@pytest.mark.parametrize("window,softcap", [(None, None), (16, None), (None, 30.0), (5, 20.0)])
def test_decode_attention(n_head, n_head_kv, n_q, window, softcap):
    q, kc, vc = make_cache(3, 40, n_q, n_head, n_head_kv, 32)
    lens = torch.tensor([40, n_q, 23], dtype=torch.int32)
    kw = dict(sliding_window=window, logit_softcap=softcap)
    close(fast.decode_attention_torch(q, kc, vc, lens, **kw), decode_attention_ref(q, kc, vc, lens, **kw))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_decode_attention_3d_q_empty_slot_and_layer_view(dtype):
    q, _, _ = make_cache(2, 1, 1, 4, 1, 64, dtype)
    cache = randn(3, 2, 50, 1, 64, dtype=dtype, seed=5)              # [n_layer, n_seq, ...]: one layer's view
    q3 = q[:, 0]                                                      # [n_seq, n_head, head_dim]
    lens = torch.tensor([0, 33], dtype=torch.int32)
    got = fast.decode_attention_torch(q3, cache[1], cache[2], lens, scale=0.3, sliding_window=8)
    want = decode_attention_ref(q3, cache[1], cache[2], lens, scale=0.3, sliding_window=8)
    close(got, want, dtype)
    assert torch.equal(got[0], torch.zeros_like(got[0]))


def test_decode_attention_errors_match_reference():
    q, kc, vc = make_cache(1, 8, 2, 4, 1, 16)
    with pytest.raises(ValueError, match="below n_q=2"):
        fast.decode_attention_torch(q, kc, vc, torch.tensor([1], dtype=torch.int32))
    with pytest.raises(TypeError, match="seq_lens must be int32"):
        fast.decode_attention_torch(q, kc, vc, torch.tensor([4]))


# --------------------------------------------------------------------------------------------- attention
@pytest.mark.parametrize("n_head,n_head_kv", [(4, 1), (6, 2), (3, 3)])
@pytest.mark.parametrize("causal,window,softcap", [(True, None, None), (False, None, None), (True, 7, None),
                                                   (True, None, 25.0), (False, None, 25.0), (True, 100, None)])
def test_attention_single_sequence(n_head, n_head_kv, causal, window, softcap):
    q, k, v = randn(21, n_head, 32), randn(21, n_head_kv, 32, seed=1), randn(21, n_head_kv, 32, seed=2)
    kw = dict(causal=causal, sliding_window=window, logit_softcap=softcap)
    close(fast.attention_torch(q, k, v, **kw), attention_ref(q, k, v, **kw))


@pytest.mark.parametrize("lq,lk", [(5, 30), (3, 3), (12, 4)])   # prefix continuation, tiny, queries before keys
@pytest.mark.parametrize("window", [None, 6])
def test_attention_end_aligned(lq, lk, window):
    q, k, v = randn(lq, 4, 16), randn(lk, 2, 16, seed=1), randn(lk, 2, 16, seed=2)
    got = fast.attention_torch(q, k, v, causal=True, sliding_window=window)
    close(got, attention_ref(q, k, v, causal=True, sliding_window=window))


@pytest.mark.parametrize("causal", [True, False])
def test_attention_varlen(causal):
    cu_q = torch.tensor([0, 7, 7, 20, 24], dtype=torch.int32)   # an empty sequence in the middle
    cu_k = torch.tensor([0, 7, 9, 30, 34], dtype=torch.int32)   # seq 2 continues an 8-row prefix
    q, k, v = randn(24, 4, 32), randn(34, 2, 32, seed=1), randn(34, 2, 32, seed=2)
    for window, softcap in ((None, None), (5, None), (None, 15.0)):
        kw = dict(causal=causal, sliding_window=window if causal else None, logit_softcap=softcap,
                  cu_seqlens_q=cu_q, cu_seqlens_k=cu_k)
        close(fast.attention_torch(q, k, v, **kw), attention_ref(q, k, v, **kw))


def test_attention_fp16_and_errors():
    q, k, v = (randn(9, 2, 64, dtype=torch.float16, seed=s) for s in range(3))
    close(fast.attention_torch(q, k, v, causal=True), attention_ref(q, k, v, causal=True), torch.float16)
    with pytest.raises(ValueError, match="sliding_window needs causal=True"):
        fast.attention_torch(q, k, v, causal=False, sliding_window=4)
    with pytest.raises(ValueError, match="give both cu_seqlens_q and cu_seqlens_k"):
        fast.attention_torch(q, k, v, causal=True, cu_seqlens_q=torch.tensor([0, 9], dtype=torch.int32))


# --------------------------------------------------------------------------------------------- dispatch
def test_dispatch_runs_the_fast_path_and_explain_names_the_spec(monkeypatch):
    monkeypatch.setenv("VLM_KERNELS", "torch")
    for name, spec in _dispatch.OPS.items():
        assert callable(_dispatch._load(spec.torch_impl)), name
    called = {}
    real = fast.rms_norm_torch

    def spy(*a, **k):
        called["fast"] = True
        return real(*a, **k)

    monkeypatch.setattr(fast, "rms_norm_torch", spy)
    x, w = randn(3, 64), randn(64, seed=1)
    close(vlm_kernels.rms_norm(x, w, 1e-6), rms_norm_ref(x, w, 1e-6))
    assert called.get("fast")
    text = vlm_kernels.explain()
    assert "vlm_kernels.cpu_fast:rms_norm_torch" in text and "spec: vlm_kernels.norm:rms_norm_ref" in text
