"""GPU-only qmatmul checks: bf16 / fp16 / fp32 through the real compiler over every type and regime, larger
shapes, every config of the candidate lists, split-K determinism and batch invariance.

Compiles dominate the cost (~1-2 s each, ~45 here): tests reuse the default launch configs where they can.
"""
import pytest
import torch
from test_qmatmul import assert_close, make_qtensor  # shared weight maker and tolerance table

from vlm_kernels import qmatmul_configs as qcfg
from vlm_kernels._qblocks import GEOMETRY, SUPPORTED
from vlm_kernels.qmatmul import dequant_cache, qmatmul_dp4a_ref, qmatmul_ref, qmatmul_torch, qmatmul_triton
from vlm_kernels.quant import GGMLType

pytestmark = pytest.mark.gpu
DEV = "cuda"


def _x(M, K, dtype, seed=0):
    g = torch.Generator(device=DEV).manual_seed(seed)
    return torch.randn(M, K, device=DEV, generator=g).to(dtype)


@pytest.mark.parametrize("qtype", SUPPORTED, ids=lambda t: t.name)
def test_every_type_bf16(qtype):
    """Whatever the table / heuristic picks for decode (M=1, 3: GEMV; M=4: one M chunk of 4) and small batches
    (M=16: the 16-row tensor-core GEMM, M=20: GEMM), bias on."""
    N, K = 1001, 4096
    w = make_qtensor(qtype, N, K, seed=1, device=DEV)
    bias = torch.randn(N, device=DEV).bfloat16()
    for M in (1, 3, 4, 16, 20):
        x = _x(M, K, torch.bfloat16, seed=M)
        assert_close(qmatmul_triton(x, w), qmatmul_ref(x, w), torch.bfloat16, f"{qtype.name} M={M}")
        assert_close(qmatmul_triton(x, w, bias), qmatmul_ref(x, w, bias), torch.bfloat16, f"{qtype.name} bias")


@pytest.mark.parametrize("qtype", [GGMLType.Q5_1, GGMLType.Q3_K], ids=lambda t: t.name)
def test_prefill_regime(qtype):
    """M=600: the table's choice (dequantize + cuBLAS by default) and the fused GEMM forced."""
    N, K = 1001, 4096
    w = make_qtensor(qtype, N, K, seed=1, device=DEV)
    x = _x(600, K, torch.bfloat16)
    ref = qmatmul_ref(x, w)
    assert_close(qmatmul_triton(x, w), ref, torch.bfloat16, "default")
    cfg = dict(regime="gemm", **qcfg.GEMM_CONFIGS[-1], SPLIT_K="auto")
    assert_close(qmatmul_triton(x, w, config=cfg), ref, torch.bfloat16, "fused")


@pytest.mark.parametrize("qtype,dtype,M", [(GGMLType.Q4_K, torch.float16, 1), (GGMLType.Q4_K, torch.float16, 16),
                                           (GGMLType.Q4_0, torch.float32, 16)], ids=str)
def test_fp16_fp32_activations(qtype, dtype, M):
    N, K = 515, 2304
    w = make_qtensor(qtype, N, K, seed=2, device=DEV)
    x = _x(M, K, dtype, seed=M)
    assert_close(qmatmul_triton(x, w), qmatmul_ref(x, w), dtype, f"{qtype.name} M={M} {dtype}")


@pytest.mark.parametrize("qtype,i", [(t, i) for t in (GGMLType.Q4_0, GGMLType.Q4_K)
                                     for i in range(len(qcfg.GEMV_CONFIGS[GEOMETRY[t].qk]))], ids=str)
def test_each_gemv_config(qtype, i):
    """Every GEMV candidate of its block size, M=1 (M_PAD 1) and M=5 (two chunks, M_PAD 4); the lists also
    compile for the other types (checked offline with ptxas for sm_90: bench/qmatmul_aot.py)."""
    cfg = dict(regime="gemv", **qcfg.GEMV_CONFIGS[GEOMETRY[qtype].qk][i], SPLIT_K="auto")
    w = make_qtensor(qtype, 4096, 4096, seed=3, device=DEV, random_bytes=True)
    for M in (1, 5):
        x = _x(M, 4096, torch.bfloat16)
        assert_close(qmatmul_triton(x, w, config=cfg), qmatmul_ref(x, w), torch.bfloat16, f"M={M} {cfg}")


@pytest.mark.parametrize("i", range(len(qcfg.GEMM_CONFIGS)))
def test_each_gemm_config(i):
    cfg = dict(regime="gemm", **qcfg.GEMM_CONFIGS[i], SPLIT_K="auto")
    w = make_qtensor(GGMLType.Q4_K, 1024, 4096, seed=4, device=DEV)
    x = _x(100, 4096, torch.bfloat16)
    assert_close(qmatmul_triton(x, w, config=cfg), qmatmul_ref(x, w), torch.bfloat16, str(cfg))


def test_layer_shape_and_split_k_determinism():
    """A real decoder shape (down-proj 4096 x 14336; the default GEMV does not split K there, so split-K is
    forced below) and a prefill tile."""
    N, K = 4096, 14336
    w = make_qtensor(GGMLType.Q4_K, N, K, seed=5, device=DEV, random_bytes=True)
    for M in (1, 8, 256):
        x = _x(M, K, torch.bfloat16, seed=M)
        y = qmatmul_triton(x, w)
        assert_close(y, qmatmul_ref(x, w), torch.bfloat16, f"M={M}")
        assert torch.equal(y, qmatmul_triton(x, w)), f"M={M}: not deterministic"
    forced = dict(qcfg.heuristic(1, N, K, 256, 132), SPLIT_K=8)
    x = _x(1, K, torch.bfloat16)
    y = qmatmul_triton(x, w, config=forced)
    assert_close(y, qmatmul_ref(x, w), torch.bfloat16, "forced split 8")
    assert torch.equal(y, qmatmul_triton(x, w, config=forced))


@pytest.mark.parametrize("int8_x", [True, False], ids=["dp4a", "float-gemv"])
def test_batch_invariance_gpu(int8_x, monkeypatch):
    """Rows of y are bitwise independent of M: the decode config (the float GEMV, or the opt-in dp4a GEMV)
    for M = 1 … 4 and forced past GEMV_MAX_M, and one GEMM bucket."""
    monkeypatch.setenv("VLM_QMATMUL_INT8_X", "1" if int8_x else "0")
    qtype = GGMLType.Q4_0
    N, K = 777, 2048
    w = make_qtensor(qtype, N, K, seed=6, device=DEV)
    x = _x(32, K, torch.bfloat16)
    forced = {k: v for k, v in qcfg.choose(1, N, K, qtype, GEOMETRY[qtype].qk, interpret=False,
                                           device_name=torch.cuda.get_device_name(),
                                           n_sm=torch.cuda.get_device_properties(0).multi_processor_count,
                                           int8_x=int8_x).items()
              if k not in ("NB", "iters")}
    assert forced["regime"] == ("dp4a" if int8_x else "gemv")
    gemv = [qmatmul_triton(x[:m], w, config=forced) for m in (1, 2, 3, 4, 5, 16)]
    assert torch.equal(qmatmul_triton(x[:1], w), gemv[0])          # what bf16 decode gets with this setting
    for y in gemv[1:]:
        assert torch.equal(y[:1], gemv[0])
    assert torch.equal(gemv[-1][:5], gemv[-2])
    cfg = dict(regime="gemm", **qcfg.GEMM_CONFIGS[2], SPLIT_K="auto")   # bucket m32: M 17 … 32
    gemm = [qmatmul_triton(x[:m], w, config=cfg) for m in (17, 25, 32)]
    for y in gemm[1:]:
        assert torch.equal(y[:17], gemm[0])


@pytest.mark.parametrize("qtype,i", [(t, i) for t in qcfg.DP4A_TYPES for i in range(len(qcfg.DP4A_CONFIGS))],
                         ids=str)
def test_each_dp4a_config(qtype, i):
    """Every dp4a candidate (inline PTX dp4a, real compiler) at M = 1, 2 and 5 (two M chunks): within the bf16
    tolerance of the spec and of its own int8-x reference."""
    cfg = dict(regime="dp4a", **qcfg.DP4A_CONFIGS[i], SPLIT_K="auto")
    w = make_qtensor(qtype, 4096, 4096, seed=3, device=DEV, random_bytes=True)
    for M in (1, 2, 5):
        x = _x(M, 4096, torch.bfloat16, seed=M)
        y = qmatmul_triton(x, w, config=cfg)
        assert_close(y, qmatmul_ref(x, w), torch.bfloat16, f"M={M} {cfg}")
        assert_close(y, qmatmul_dp4a_ref(x, w), torch.bfloat16, f"M={M} {cfg} vs dp4a_ref")


@pytest.mark.parametrize("qtype", qcfg.DP4A_TYPES, ids=lambda t: t.name)
def test_dp4a_split_k_bias_layer_shape(qtype):
    """A down-projection shape with split-K forced, bias, and fp16 x forced through the dp4a regime (x's int8
    rounding dominates, so the bf16 tolerance applies whatever x's dtype)."""
    N, K = 4096, 14336
    w = make_qtensor(qtype, N, K, seed=5, device=DEV, random_bytes=True)
    cfg = dict(qcfg.DEFAULT_DP4A, SPLIT_K=4)
    for dtype in (torch.bfloat16, torch.float16):
        x = _x(3, K, dtype)
        bias = torch.randn(N, device=DEV).to(dtype)
        y = qmatmul_triton(x, w, bias, config=cfg)
        assert_close(y.float(), qmatmul_ref(x.float(), w, bias.float()), torch.bfloat16, f"{dtype}")
        assert torch.equal(y, qmatmul_triton(x, w, bias, config=cfg)), "split-K not deterministic"


@pytest.mark.parametrize("qtype", [GGMLType.Q5_0, GGMLType.Q6_K], ids=lambda t: t.name)
def test_torch_path_on_cuda(qtype, monkeypatch):
    w = make_qtensor(qtype, 300, 2304, seed=7, device=DEV)
    x = _x(5, 2304, torch.bfloat16)
    ref = qmatmul_ref(x, w)
    monkeypatch.setenv("VLM_QMATMUL_CACHE_MB", "0")      # chunked dequantization
    assert_close(qmatmul_torch(x, w), ref, torch.bfloat16, "chunked")
    monkeypatch.setenv("VLM_QMATMUL_CACHE_MB", "64")     # cached dense bf16 weights
    assert_close(qmatmul_torch(x, w), ref, torch.bfloat16, "cached")
    dequant_cache.clear()


def test_tuned_table_for_this_gpu_is_legal():
    """If a tuned table exists for this GPU, its decode / small-batch winners for 4096x4096 run correctly
    (tests/kernels/test_qmatmul.py checks every entry of every shipped table resolves)."""
    import json
    name = torch.cuda.get_device_name()
    path = qcfg.config_path(name)
    if not path.is_file():
        pytest.skip(f"no tuned table {path.name} for {name}")
    table = json.loads(path.read_text())["configs"]
    for tname, buckets in table.items():
        for bucket in ("gemv", "m32"):
            cfg = buckets.get(bucket, {}).get("4096x4096")
            if cfg is None:
                continue
            M = 1 if bucket == "gemv" else 32
            w = make_qtensor(GGMLType[tname], 4096, 4096, device=DEV, random_bytes=True)
            x = _x(M, 4096, torch.bfloat16)
            assert_close(qmatmul_triton(x, w, config=cfg), qmatmul_ref(x, w), torch.bfloat16,
                         f"{tname} {bucket} {cfg}")
