"""qmatmul: Triton kernels (interpreter on CPU) and the torch path against qmatmul_ref, qmatmul_ref against
gguf-py's numpy dequantization, plus configs, batch invariance and bad input."""
import json
import sys

import numpy as np
import pytest
import torch
from gguf.quants import dequantize as gguf_dequantize
from gguf.quants import quantize as gguf_quantize

from _tol import TOL, rel_err
import vlm_kernels
from vlm_kernels import qmatmul_configs as qcfg
from vlm_kernels._qblocks import GEOMETRY, SUPPORTED
from vlm_kernels.qmatmul import (dequant_cache, dequantize_triton, qmatmul_dp4a_ref, qmatmul_ref, qmatmul_torch,
                             qmatmul_triton)
from vlm_kernels.quant import GGMLType, QTensor, block_info

# max |y - ref| / max |ref|, per activation dtype (architecture.md tolerance table)

KQUANT = [GGMLType.Q2_K, GGMLType.Q3_K, GGMLType.Q4_K, GGMLType.Q5_K, GGMLType.Q6_K]
# byte offsets of the fp16 scales (d, dmin / m) in each block
_SCALE_OFFSETS = {GGMLType.Q4_0: (0,), GGMLType.Q4_1: (0, 2), GGMLType.Q5_0: (0,), GGMLType.Q5_1: (0, 2),
                  GGMLType.Q8_0: (0,), GGMLType.IQ4_NL: (0,), GGMLType.Q2_K: (80, 82), GGMLType.Q3_K: (108,),
                  GGMLType.Q4_K: (0, 2), GGMLType.Q5_K: (0, 2), GGMLType.Q6_K: (208,)}
_GGUF_CAN_QUANTIZE = (GGMLType.Q4_0, GGMLType.Q4_1, GGMLType.Q5_0, GGMLType.Q5_1, GGMLType.Q8_0)


def make_qtensor(qtype, N, K, seed=0, device="cpu", random_bytes=False):
    """Realistic packed weights: gguf-py quantization of N(0,1) where it exists, else (or with random_bytes,
    faster for big layers) random bytes — every code and sub-scale pattern — with the fp16 scales set to
    small sane values."""
    rng = np.random.default_rng(seed)
    qk, ts = block_info(qtype)
    if random_bytes or qtype not in _GGUF_CAN_QUANTIZE:
        blocks = rng.integers(0, 256, size=(N * K // qk, ts), dtype=np.uint8)
        for off in _SCALE_OFFSETS[qtype]:
            d = rng.uniform(0.002, 0.02, size=(blocks.shape[0], 1)).astype(np.float16)
            blocks[:, off:off + 2] = d.view(np.uint8)
        data = blocks.reshape(N, -1)
    else:
        data = gguf_quantize(rng.standard_normal((N, K)).astype(np.float32), qtype)
    return QTensor(torch.from_numpy(np.ascontiguousarray(data)).to(device), qtype, (N, K))


def gguf_dense(w):
    return torch.from_numpy(gguf_dequantize(w.data.cpu().numpy(), w.qtype).reshape(w.shape).copy())


def assert_close(y, ref, dtype, what=""):
    assert y.dtype == ref.dtype and y.shape == ref.shape, (y.dtype, ref.dtype, y.shape, ref.shape)
    assert torch.isfinite(y).all(), what
    err = rel_err(y, ref)
    assert err <= TOL[dtype], f"{what}: rel err {err:.3g} > {TOL[dtype]:g}"


# ---------------------------------------------------------------------------------------------------------
# the dequant helpers, bit-exact against gguf-py

@pytest.mark.parametrize("qtype", SUPPORTED, ids=lambda t: t.name)
def test_dequant_kernel_bit_exact(qtype, device):
    w = make_qtensor(qtype, 5, 512, seed=1, device=device)
    ref = gguf_dense(w).to(device)
    got = dequantize_triton(w, torch.float32, block_n=4, block_k=256)   # several programs on both grid axes
    if device == "cpu":
        assert torch.equal(got, ref)
        assert torch.equal(dequantize_triton(w, torch.float16), ref.half())
    else:   # the GPU compiler may contract a*b + c into one FMA (Q4_1, Q5_1, K-quant mins): <= 1 ulp apart
        torch.testing.assert_close(got, ref, rtol=2.4e-7, atol=2.4e-7 * ref.abs().max().item())
    # the spec used by every other test is the same numbers
    x = torch.randn(2, 512)
    assert torch.equal(qmatmul_ref(x, w.cpu()), (x @ ref.cpu().T))


# ---------------------------------------------------------------------------------------------------------
# the Triton launcher over every type, regime and shape class

# (M, N, K for 32-weight blocks, K for K-quants, dtype): M covers GEMV (1-3) and GEMM (16, 17, 127-129);
# K covers 256 / 640 (not a multiple of 256) / 2304 / 5632; N is odd; the large-M cases keep N*K small.
CASES = [
    (1, 33, 5632, 5632, torch.float32),
    (1, 7, 256, 256, torch.float16),
    (2, 17, 2304, 2304, torch.float16),
    (3, 9, 640, 256, torch.float32),
    (16, 31, 2304, 2304, torch.float16),
    (17, 13, 640, 256, torch.float32),
    (127, 5, 256, 256, torch.float16),
    (128, 3, 640, 256, torch.float32),
    (129, 7, 256, 256, torch.float16),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"M{c[0]}-N{c[1]}-{str(c[4])[6:]}")
@pytest.mark.parametrize("qtype", SUPPORTED, ids=lambda t: t.name)
def test_qmatmul_triton_matches_ref(qtype, case, device):
    M, N, k_legacy, k_kquant, dtype = case
    K = k_kquant if qtype in KQUANT else k_legacy
    w = make_qtensor(qtype, N, K, seed=M + N, device=device)
    x = torch.randn(M, K).to(dtype).to(device)
    ref = qmatmul_ref(x, w)
    assert_close(qmatmul_triton(x, w), ref, dtype, f"{qtype.name} M={M} N={N} K={K} {dtype}")


@pytest.mark.parametrize("qtype,dtype", [(GGMLType.Q4_0, torch.float32), (GGMLType.Q5_1, torch.float16),
                                         (GGMLType.Q3_K, torch.float16), (GGMLType.Q6_K, torch.float32)],
                         ids=lambda v: getattr(v, "name", str(v)[6:]))
@pytest.mark.parametrize("regime,M", [("gemv", 6), ("gemm", 20)])
def test_split_k_with_bias(qtype, dtype, regime, M, device):
    """Split-K (fp32 workspace + ordered reduction) with the last split running past K, two programs along N,
    and the bias added in the reduction (GEMV: two M chunks, the second partial; UNROLL 1 and 2)."""
    K = 2304
    N = 37
    if regime == "gemv" and qtype in KQUANT:
        M = 2   # one M chunk: 16 unrolled group x crumb steps per K step are slow under the interpreter
    w = make_qtensor(qtype, N, K, seed=3, device=device)
    x = torch.randn(M, K).to(dtype).to(device)
    bias = torch.randn(N).to(dtype).to(device)
    # UNROLL (K sub-steps per GEMV step) only matters for "gemv"
    unroll = 2 if (qtype == GGMLType.Q5_1 and regime == "gemv") else 1
    cfg = dict(regime=regime, BLOCK_M=16, BLOCK_N=32, BLOCK_K=512 // unroll, SPLIT_K=3, UNROLL=unroll)
    resolved = qcfg.resolve(cfg, M, N, K, GEOMETRY[qtype].qk, 1)
    k_per_step = resolved["NB"] * GEOMETRY[qtype].qk * (unroll if regime == "gemv" else 1)
    assert resolved["SPLIT_K"] == 3 and resolved["iters"] * 3 * k_per_step > K
    assert_close(qmatmul_triton(x, w, bias, config=cfg), qmatmul_ref(x, w, bias), dtype, f"{qtype.name} split-K")


@pytest.mark.parametrize("qtype", [GGMLType.Q5_0, GGMLType.Q2_K], ids=lambda t: t.name)
def test_gemm_regime_at_decode_sizes(qtype, device):
    """The tuner may pick the tensor-core kernel (rows padded to BLOCK_M=16) for M <= 4."""
    w = make_qtensor(qtype, 19, 512, seed=8, device=device)
    cfg = dict(regime="gemm", BLOCK_M=16, BLOCK_N=16, BLOCK_K=64, SPLIT_K=2)
    for M in (1, 3):
        x = torch.randn(M, 512, device=device)
        assert_close(qmatmul_triton(x, w, config=cfg), qmatmul_ref(x, w), torch.float32, f"M={M}")


@pytest.mark.parametrize("qtype", [GGMLType.Q8_0, GGMLType.IQ4_NL, GGMLType.Q5_K], ids=lambda t: t.name)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_dequant_regime(qtype, dtype, device):
    w = make_qtensor(qtype, 11, 512, seed=4, device=device)
    x = torch.randn(40, 512).to(dtype).to(device)
    bias = torch.randn(11).to(dtype).to(device)
    assert_close(qmatmul_triton(x, w, bias, config={"regime": "dequant"}), qmatmul_ref(x, w, bias), dtype)


@pytest.mark.parametrize("qtype", [GGMLType.Q4_0, GGMLType.Q4_K], ids=lambda t: t.name)
def test_batch_invariance(qtype, device):
    """Row i of y does not depend on M (bitwise) within a regime's config: all M <= GEMV_MAX_M (GEMV; the same
    config forced at M = 5 and 16 spans several M chunks) and, for the GEMM, every M of one bucket (the
    interpreter has a single GEMM config, so there any M)."""
    K = 512
    w = make_qtensor(qtype, 21, K, seed=5, device=device)
    x = torch.randn(129, K, device=device)
    gemv = [qmatmul_triton(x[:m], w) for m in range(1, qcfg.GEMV_MAX_M + 1)]
    assert gemv[0].shape[0] == 1 and qcfg.GEMV_MAX_M == 4
    forced = {k: v for k, v in qcfg.choose(1, 21, K, qtype, GEOMETRY[qtype].qk, interpret=True).items()
              if k not in ("NB", "iters")}
    gemv += [qmatmul_triton(x[:m], w, config=forced) for m in (5, qcfg.GEMV_FORCE_MAX_M)]
    for y in gemv[1:]:
        assert torch.equal(y[:1], gemv[0])
    assert torch.equal(gemv[-1][:5], gemv[-2])      # rows 1..4 too, across the chunk boundary
    ms = (17, 127, 128, 129) if device == "cpu" else (17, 25, 32)
    cfg = None if device == "cpu" else dict(regime="gemm", **qcfg.GEMM_CONFIGS[2], SPLIT_K="auto")
    gemm = [qmatmul_triton(x[:m], w, config=cfg) for m in ms]
    for y in gemm[1:]:
        assert torch.equal(y[:ms[0]], gemm[0])
    # and the regimes agree numerically
    assert_close(gemm[0][:1], gemv[0], torch.float32)


def test_leading_dims_and_empty(device):
    w = make_qtensor(GGMLType.Q4_K, 9, 256, device=device)
    x = torch.randn(2, 3, 256, device=device)
    y = qmatmul_triton(x, w)
    assert y.shape == (2, 3, 9)
    assert_close(y, qmatmul_ref(x, w), torch.float32)
    assert qmatmul_triton(torch.randn(0, 256, device=device), w).shape == (0, 9)


@pytest.mark.skipif(torch.cuda.is_available(), reason="interpreter-only behaviour")
def test_bf16_input_under_interpreter():
    """bf16 math is broken in the interpreter, so the launcher computes from fp32 there; output stays bf16."""
    w = make_qtensor(GGMLType.Q6_K, 9, 256)
    x = torch.randn(3, 256).bfloat16()
    y = qmatmul_triton(x, w)
    assert y.dtype == torch.bfloat16
    assert_close(y, qmatmul_ref(x, w), torch.bfloat16)


@pytest.mark.parametrize("qtype", [GGMLType.F32, GGMLType.F16, GGMLType.BF16], ids=lambda t: t.name)
def test_float_weights_go_to_torch(qtype, device):
    dense = torch.randn(6, 64)
    tdt = {GGMLType.F32: torch.float32, GGMLType.F16: torch.float16, GGMLType.BF16: torch.bfloat16}[qtype]
    dense = dense.to(tdt)
    w = QTensor(dense.contiguous().view(torch.uint8).reshape(6, -1), qtype, (6, 64)).to(device)
    x = torch.randn(5, 64, device=device)
    ref = x @ dense.float().to(device).T
    for fn in (qmatmul_triton, qmatmul_torch, qmatmul_ref):
        assert_close(fn(x, w), ref, torch.float32, fn.__name__)


# ---------------------------------------------------------------------------------------------------------
# torch path and the spec itself

@pytest.mark.parametrize("qtype", SUPPORTED, ids=lambda t: t.name)
def test_ref_and_torch_path_against_gguf(qtype, monkeypatch):
    K = 256 if qtype in KQUANT else 640
    w = make_qtensor(qtype, 19, K, seed=6)
    x = torch.randn(4, K)
    bias = torch.randn(19)
    exact = (x.double() @ gguf_dense(w).double().T + bias.double()).float()   # independent oracle
    ref = qmatmul_ref(x, w, bias)
    assert_close(ref, exact, torch.float32, "ref")
    monkeypatch.setenv("VLM_QMATMUL_CACHE_MB", "64")
    assert_close(qmatmul_torch(x, w, bias), ref, torch.float32, "torch cached")
    monkeypatch.setenv("VLM_QMATMUL_CACHE_MB", "0")
    dequant_cache.clear()
    monkeypatch.setattr(sys.modules["vlm_kernels.qmatmul"], "_CHUNK_ELEMS", 5 * K)        # 4 chunks, the last one short
    assert_close(qmatmul_torch(x, w, bias), ref, torch.float32, "torch chunked")
    xh = x.half()
    assert_close(qmatmul_torch(xh, w), qmatmul_ref(xh, w), torch.float16, "torch fp16")


def test_torch_cache_budget_and_invalidation(monkeypatch):
    dequant_cache.clear()
    monkeypatch.setenv("VLM_QMATMUL_CACHE_MB", str(3 * 64 * 256 * 4 / 2**20))   # room for 3 of the 4 below
    ws = [make_qtensor(GGMLType.Q8_0, 64, 256, seed=s) for s in range(4)]
    x = torch.randn(2, 256)
    for i in range(4):
        qmatmul_torch(x, ws[i])
    assert dequant_cache.nbytes == 3 * 64 * 256 * 4
    assert "_qmatmul_dense" not in ws[0].__dict__ and "_qmatmul_dense" in ws[3].__dict__   # LRU evicted
    dense = ws[3].__dict__["_qmatmul_dense"][1]
    qmatmul_torch(x, ws[3])
    assert ws[3].__dict__["_qmatmul_dense"][1] is dense                 # hit
    ws[3].data[:, 2:] = 0                                               # in-place write: stale cache dropped
    assert torch.equal(qmatmul_torch(x, ws[3]), torch.zeros(2, 64))
    del ws[3]
    import gc
    gc.collect()
    assert dequant_cache.nbytes == 2 * 64 * 256 * 4                     # freed with its QTensor
    dequant_cache.clear()
    assert dequant_cache.nbytes == 0


def test_public_op_dispatch(monkeypatch, device):
    w = make_qtensor(GGMLType.Q4_0, 10, 256, device=device)
    x = torch.randn(3, 256, device=device)
    ref = qmatmul_ref(x, w)
    monkeypatch.setenv("VLM_KERNELS", "torch")
    assert_close(vlm_kernels.qmatmul(x, w), ref, torch.float32)
    monkeypatch.setenv("VLM_KERNELS", "triton")
    assert_close(vlm_kernels.qmatmul(x, w), ref, torch.float32)


# ---------------------------------------------------------------------------------------------------------
# bad input: clear errors before any launch

def _iq2_xxs():
    return QTensor(torch.zeros(4, 66, dtype=torch.uint8), GGMLType.IQ2_XXS, (4, 256))


@pytest.mark.parametrize("fn", [qmatmul_triton, qmatmul_torch, qmatmul_ref], ids=lambda f: f.__name__)
def test_bad_input(fn):
    w = make_qtensor(GGMLType.Q4_K, 8, 512)   # all checks fire before any launch: CPU tensors on any host
    with pytest.raises(ValueError, match=r"x \(3, 256\) does not match w Q4_K \[N=8, K=512\]"):
        fn(torch.randn(3, 256), w)
    with pytest.raises(ValueError, match="must be contiguous"):
        fn(torch.randn(512, 3).T, w)
    with pytest.raises(TypeError, match="x dtype torch.int32 not supported"):
        fn(torch.zeros(3, 512, dtype=torch.int32), w)
    with pytest.raises(TypeError, match="w must be a QTensor, got Tensor"):
        fn(torch.randn(3, 512), torch.randn(8, 512))
    with pytest.raises(ValueError, match="x is on meta but w .* is on cpu"):
        fn(torch.empty(3, 512, device="meta"), w)
    with pytest.raises(ValueError, match=r"bias \(7,\) must be a contiguous \[N=8\] vector"):
        fn(torch.randn(3, 512), w, torch.randn(7))
    with pytest.raises(ValueError, match=r"w must be 2-D \[N, K\], got Q4_K shape \(2, 4, 512\)"):
        fn(torch.randn(3, 512), make_qtensor(GGMLType.Q4_K, 8, 512).__class__(w.data, w.qtype, (2, 4, 512)))


def test_unsupported_type():
    with pytest.raises(ValueError, match="weight type IQ2_XXS is not supported"):
        qmatmul_triton(torch.randn(2, 256), _iq2_xxs())


def test_bad_config(device):
    w = make_qtensor(GGMLType.Q4_0, 8, 256, device=device)
    x = torch.randn(17, 256, device=device)
    with pytest.raises(ValueError, match="GEMV regime takes M <= 16, got M=17"):
        qmatmul_triton(x, w, config=dict(regime="gemv", BLOCK_N=16, BLOCK_K=256))
    with pytest.raises(ValueError, match="UNROLL=0 must be >= 1"):
        qmatmul_triton(x[:2], w, config=dict(regime="gemv", BLOCK_N=16, BLOCK_K=256, UNROLL=0))
    with pytest.raises(ValueError, match="BLOCK_K=96 is not a power-of-two multiple of 32"):
        qmatmul_triton(x[:2], w, config=dict(regime="gemv", BLOCK_N=16, BLOCK_K=96))
    if device == "cpu" and not torch.cuda.is_available():
        return
    with pytest.raises(ValueError, match="Triton needs CUDA tensors or TRITON_INTERPRET=1"):
        qmatmul_triton(x.cpu(), w.cpu())


# ---------------------------------------------------------------------------------------------------------
# configs: buckets, tuned-table lookup, split heuristic, shipped JSON files are legal

def test_m_buckets():
    assert qcfg.GEMV_MAX_M == 4
    assert [qcfg.m_bucket(m) for m in (1, 4, 5, 8, 9, 16, 17, 33, 129, 4096, 100000)] == \
        ["gemv"] * 2 + ["m8"] * 2 + ["m16"] * 2 + ["m32", "m64", "m256", "m4096", "m4096"]
    # M 5..16 take the tensor-core GEMM with 16-row tiles (the heuristic, without a tuned table)
    for m in (5, 16):
        c = qcfg.heuristic(m, 4096, 4096, 32, 132)
        assert (c["regime"], c["BLOCK_M"]) == ("gemm", 16)


def test_tuned_table_lookup(tmp_path, monkeypatch):
    table = {"device": "Fake GPU", "configs": {"Q4_K": {
        "gemv": {"4096x4096": dict(regime="gemv", BLOCK_N=8, BLOCK_K=1024, SPLIT_K=2, num_warps=4),
                 "*": dict(regime="gemv", BLOCK_N=16, BLOCK_K=512, SPLIT_K="auto", num_warps=4)},
        "m256": {"*": {"regime": "dequant"}}}}}
    path = tmp_path / "t.json"
    path.write_text(json.dumps(table))
    monkeypatch.setenv("VLM_QMATMUL_CONFIGS", str(path))
    qcfg.clear_cache()
    try:
        pick = lambda M, N, K, t=GGMLType.Q4_K: qcfg.choose(M, N, K, t, 256, interpret=False,  # noqa: E731
                                                              device_name="Fake GPU", n_sm=132)
        exact = pick(1, 4096, 4096)
        assert (exact["BLOCK_N"], exact["NB"], exact["SPLIT_K"], exact["iters"]) == (8, 4, 2, 2)
        star = pick(3, 896, 4864)
        assert (star["BLOCK_N"], star["NB"]) == (16, 2) and star["SPLIT_K"] >= 1
        assert pick(200, 4096, 4096)["regime"] == "dequant"
        assert pick(17, 4096, 4096)["regime"] == "gemm"                       # heuristic fallback
        other = pick(1, 4096, 4096, GGMLType.Q4_0)                           # other type: heuristic
        assert other["BLOCK_N"] == qcfg.DEFAULT_GEMV[32]["BLOCK_N"] and other["regime"] == "gemv"
    finally:
        qcfg.clear_cache()


def test_split_heuristic():
    # N alone fills the GPU, or the layer is small (an extra launch costs more than it saves): no split;
    # a big narrow layer: split K until ~GEMV_TARGET_WARPS_PER_SM warps per SM
    for N, K in ((14336, 4096), (4096, 14336), (896, 4864)):
        assert qcfg.resolve(qcfg.heuristic(1, N, K, 32, 132), 1, N, K, 32, 132)["SPLIT_K"] == 1
    N, K = 512, 65536
    cfg = qcfg.resolve(qcfg.heuristic(1, N, K, 32, 132), 1, N, K, 32, 132)
    tiles = -(-N // cfg["BLOCK_N"])
    target = qcfg.GEMV_TARGET_WARPS_PER_SM * 132 // cfg["num_warps"]
    assert tiles * cfg["SPLIT_K"] <= target < tiles * cfg["SPLIT_K"] * 2 and cfg["SPLIT_K"] > 1
    assert cfg["SPLIT_K"] * cfg["iters"] * cfg["NB"] * cfg["UNROLL"] * 32 >= K
    # the split does not depend on M inside the GEMV regime (batch invariance)
    assert {qcfg.resolve(qcfg.heuristic(m, N, K, 32, 132), m, N, K, 32, 132)["SPLIT_K"]
            for m in range(1, qcfg.GEMV_MAX_M + 1)} == {cfg["SPLIT_K"]}
    assert qcfg.choose(1, 4096, 14336, GGMLType.Q4_0, 32, interpret=True)["SPLIT_K"] == 1


def test_shipped_config_files_are_legal():
    known = {"regime", "BLOCK_M", "BLOCK_N", "BLOCK_K", "SPLIT_K", "num_warps", "num_stages", "UNROLL"}
    for path in qcfg.CONFIG_DIR.glob("qmatmul_*.json"):
        table = json.loads(path.read_text())
        for tname, buckets in table["configs"].items():
            qk = GEOMETRY[GGMLType[tname]].qk
            for bucket, entries in buckets.items():
                assert bucket in ("gemv", "dp4a") or bucket in {f"m{2**i}" for i in range(3, 13)}, (path, bucket)
                for shape, cfg in entries.items():
                    assert set(cfg) <= known and cfg["regime"] in ("gemv", "gemm", "dequant", "dp4a"), (path, cfg)
                    assert (bucket == "dp4a") == (cfg["regime"] == "dp4a"), (path, bucket, cfg)
                    if cfg["regime"] != "dequant":
                        N, K = (4096, 4096) if shape == "*" else map(int, shape.split("x"))
                        M = 1 if bucket in ("gemv", "dp4a") else int(bucket[1:])
                        qcfg.resolve(cfg, M, N, K, qk, 132)


# ---------------------------------------------------------------------------------------------------------
# the dp4a GEMV (x rounded to int8 per 32-block, integer dot products): exact against its own reference,
# within the bf16 tolerance of the spec

DP4A_CASES = [(1, 37, 256), (3, 33, 640), (2, 64, 2304), (4, 5, 5632), (16, 9, 256)]


@pytest.mark.parametrize("M,N,K", DP4A_CASES, ids=lambda v: str(v))
@pytest.mark.parametrize("qtype", qcfg.DP4A_TYPES, ids=lambda t: t.name)
def test_dp4a_matches_its_reference(qtype, M, N, K, device):
    w = make_qtensor(qtype, N, K, seed=M + N, device=device)
    x = torch.randn(M, K, device=device)
    bias = torch.randn(N, device=device)
    y = qmatmul_triton(x, w, bias, config=qcfg.INTERPRET_DP4A)
    # integer products are exact: only the fp32 sum of the per-block terms differs from the float64 reference
    assert_close(y, qmatmul_dp4a_ref(x, w, bias), torch.float32, f"{qtype.name} M={M} vs dp4a_ref")
    # against the spec, x's int8 rounding (|error| <= amax / 254 per 32-block, bf16-like) must stay inside the
    # bf16 tolerance: measured 4.4e-3 .. 6.9e-3 on these cases
    assert_close(y, qmatmul_ref(x, w, bias), torch.bfloat16, f"{qtype.name} M={M} vs ref")


@pytest.mark.parametrize("qtype", qcfg.DP4A_TYPES, ids=lambda t: t.name)
def test_dp4a_split_k_bias_and_zero_blocks(qtype, device):
    """Split-K with the last split past K, two M chunks (the second partial), bias in the reduction, an all-zero
    x block (scale 0) and a block with one huge value."""
    M, N, K = 6, 37, 2304
    w = make_qtensor(qtype, N, K, seed=3, device=device)
    x = torch.randn(M, K, device=device)
    x[1, 64:96] = 0.0
    x[2, 100] = 1e4
    bias = torch.randn(N, device=device)
    cfg = dict(regime="dp4a", BLOCK_N=32, BLOCK_K=512, SPLIT_K=3)
    r = qcfg.resolve(cfg, M, N, K, 32, 1)
    assert r["SPLIT_K"] == 3 and r["iters"] * 3 * r["NB"] * 32 > K
    y = qmatmul_triton(x, w, bias, config=cfg)
    assert_close(y, qmatmul_dp4a_ref(x, w, bias), torch.float32, "split-K")


def test_dp4a_batch_invariance(device):
    w = make_qtensor(GGMLType.Q4_0, 21, 512, seed=5, device=device)
    x = torch.randn(16, 512, device=device)
    ys = [qmatmul_triton(x[:m], w, config=qcfg.INTERPRET_DP4A) for m in (1, 2, 3, 4, 5, 16)]
    for y in ys[1:]:
        assert torch.equal(y[:1], ys[0])
    assert torch.equal(ys[-1][:5], ys[-2])


def test_dp4a_selection(tmp_path, monkeypatch):
    """Chosen only for callers that accept int8 x (bf16 on a GPU with VLM_QMATMUL_INT8_X=1), Q4_0 / Q8_0,
    M <= GEMV_MAX_M; a tuned "dp4a" entry is used; a dp4a entry in another bucket is never given to exact
    callers."""
    pick = lambda M, t, **kw: qcfg.choose(M, 4096, 4096, t, GEOMETRY[t].qk, interpret=False,  # noqa: E731
                                          device_name="Fake GPU", n_sm=132, **kw)
    table = {"configs": {"Q8_0": {"dp4a": {"*": dict(regime="dp4a", BLOCK_N=4, BLOCK_K=4096, SPLIT_K="auto",
                                                    num_warps=4)},
                                  "gemv": {"*": dict(regime="dp4a", BLOCK_N=4, BLOCK_K=4096, SPLIT_K="auto")}}}}
    path = tmp_path / "t.json"
    path.write_text(json.dumps(table))
    monkeypatch.setenv("VLM_QMATMUL_CONFIGS", str(path))
    qcfg.clear_cache()
    try:
        assert pick(1, GGMLType.Q4_0, int8_x=True)["regime"] == "dp4a"
        assert pick(4, GGMLType.Q4_0, int8_x=True)["BLOCK_N"] == qcfg.DEFAULT_DP4A["BLOCK_N"]
        assert pick(1, GGMLType.Q4_0)["regime"] == "gemv"
        assert pick(5, GGMLType.Q4_0, int8_x=True)["regime"] == "gemm"
        assert pick(1, GGMLType.Q4_K, int8_x=True)["regime"] == "gemv"
        tuned = pick(1, GGMLType.Q8_0, int8_x=True)
        assert (tuned["regime"], tuned["BLOCK_N"], tuned["NB"]) == ("dp4a", 4, 128)
        assert pick(1, GGMLType.Q8_0)["regime"] == "gemv"          # the stray "gemv" bucket dp4a entry
    finally:
        qcfg.clear_cache()
    monkeypatch.delenv("VLM_QMATMUL_INT8_X", raising=False)
    assert not qcfg.dp4a_enabled()                                     # opt-in
    monkeypatch.setenv("VLM_QMATMUL_INT8_X", "1")
    assert qcfg.dp4a_enabled()


def test_dp4a_bad_config(device):
    x = torch.randn(17, 256, device=device)
    with pytest.raises(ValueError, match="dp4a needs 32-weight blocks"):
        qmatmul_triton(x[:1], make_qtensor(GGMLType.Q4_K, 8, 256, device=device),
                       config=dict(regime="dp4a", BLOCK_N=8, BLOCK_K=256))
    with pytest.raises(ValueError, match="dp4a regime takes Q4_0, Q8_0 weights, got Q4_1"):
        qmatmul_triton(x[:1], make_qtensor(GGMLType.Q4_1, 8, 256, device=device),
                       config=dict(regime="dp4a", BLOCK_N=8, BLOCK_K=256))
    with pytest.raises(ValueError, match="dp4a regime takes M <= 16, got M=17"):
        qmatmul_triton(x, make_qtensor(GGMLType.Q4_0, 8, 256, device=device),
                       config=dict(regime="dp4a", BLOCK_N=8, BLOCK_K=256))
