"""RMSNorm / LayerNorm Triton kernels (interpreter on CPU) against torch, HF modules and vlm_kernels.norm refs."""
import pytest
import torch
import torch.nn.functional as F

from _tol import TOL, rel_err
from vlm_kernels.norm import layer_norm_ref, layer_norm_triton, rms_norm_ref, rms_norm_triton
import vlm_kernels.norm as norm_mod

# max |err| / max |ref| (docs: /work/shared/design/architecture.md tolerance table)

WIDTHS = [1, 7, 640, 1152, 2304]   # odd / non-power-of-two rows (Gemma 3 270M 640, SigLIP 1152, Gemma 2B 2304)


def oracle_rms(x, w, eps, offset=0.0):
    """RMSNorm in float64 (independent of vlm_kernels.norm), cast to x's dtype."""
    xd = x.double()
    y = xd / torch.sqrt(xd.pow(2).mean(-1, keepdim=True) + eps)
    if w is not None:
        y = y * (w.double() + offset)
    return y


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("n", WIDTHS)
def test_rms_norm_matches_oracle(n, dtype):
    g = torch.Generator().manual_seed(n)
    x = (torch.randn(3, 5, n, generator=g) * 3).to(dtype)
    w = torch.randn(n, generator=g).to(dtype)
    y = rms_norm_triton(x, w, 1e-6)
    assert y.shape == x.shape and y.dtype == dtype
    assert rel_err(y, oracle_rms(x, w, 1e-6)) < TOL[dtype]
    assert rel_err(y, rms_norm_ref(x, w, 1e-6)) < TOL[dtype]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_rms_norm_gemma_offset_and_fp32_weight(dtype):
    n = 640
    g = torch.Generator().manual_seed(1)
    x = torch.randn(7, n, generator=g).to(dtype)
    w = torch.randn(n, generator=g) * 0.1          # GGUF keeps norm weights in F32 whatever x is
    y = rms_norm_triton(x, w, 1e-6, offset=1.0)
    assert rel_err(y, oracle_rms(x, w, 1e-6, offset=1.0)) < TOL[dtype]
    # offset really is added to the weight: without it the result differs by far more than the tolerance
    assert rel_err(rms_norm_triton(x, w, 1e-6), y) > 0.5


def test_rms_norm_matches_hf_modules():
    from transformers.models.gemma3.modeling_gemma3 import Gemma3RMSNorm
    from transformers.models.llama.modeling_llama import LlamaRMSNorm
    n = 1152
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 9, n, generator=g)
    llama, gemma = LlamaRMSNorm(n, eps=1e-5), Gemma3RMSNorm(n, eps=1e-6)
    with torch.no_grad():
        llama.weight.copy_(torch.randn(n, generator=g))
        gemma.weight.copy_(torch.randn(n, generator=g) * 0.1)
        ref_l, ref_g = llama(x), gemma(x)
    assert rel_err(rms_norm_triton(x, llama.weight.detach(), 1e-5), ref_l) < TOL[torch.float32]
    assert rel_err(rms_norm_triton(x, gemma.weight.detach(), 1e-6, offset=1.0), ref_g) < TOL[torch.float32]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("n", [7, 640, 2304])
def test_rms_norm_fused_residual(n, dtype):
    g = torch.Generator().manual_seed(3 + n)
    x = torch.randn(4, n, generator=g).to(dtype)
    r = (torch.randn(4, n, generator=g) * 4).to(dtype)
    w = torch.randn(n, generator=g).to(dtype)
    y, h = rms_norm_triton(x, w, 1e-6, offset=0.5, residual=r)
    # h is the new residual stream: bit-identical to the plain add in x's dtype
    assert h.dtype == dtype and torch.equal(h, x + r)
    assert rel_err(y, oracle_rms(x + r, w, 1e-6, offset=0.5)) < TOL[dtype]
    # fused == unfused
    assert rel_err(y, rms_norm_triton(x + r, w, 1e-6, offset=0.5)) < TOL[dtype]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("n", WIDTHS)
def test_layer_norm_matches_torch(n, dtype):
    g = torch.Generator().manual_seed(10 + n)
    x = (torch.randn(2, 3, n, generator=g) * 2 + 1.5).to(dtype)
    w = torch.randn(n, generator=g).to(dtype)
    b = torch.randn(n, generator=g).to(dtype)
    y = layer_norm_triton(x, w, b, 1e-5)
    ref = F.layer_norm(x.double(), (n,), w.double(), b.double(), 1e-5)
    assert y.dtype == dtype
    # n == 1: x - mean is exactly 0, y == b; still a valid check of the bias path
    assert rel_err(y, ref) < TOL[dtype]


@pytest.mark.parametrize("with_w, with_b", [(False, False), (True, False), (False, True)])
def test_layer_norm_optional_affine(with_w, with_b):
    n = 1152
    g = torch.Generator().manual_seed(4)
    x = torch.randn(6, n, generator=g) + 3.0
    w = torch.randn(n, generator=g) if with_w else None
    b = torch.randn(n, generator=g) if with_b else None
    ref = F.layer_norm(x.double(), (n,), None if w is None else w.double(), None if b is None else b.double(), 1e-6)
    assert rel_err(layer_norm_triton(x, w, b, 1e-6), ref) < TOL[torch.float32]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_layer_norm_fused_residual(dtype):
    n = 1152
    g = torch.Generator().manual_seed(5)
    x = torch.randn(5, n, generator=g).to(dtype)
    r = (torch.randn(5, n, generator=g) + 2).to(dtype)
    w, b = torch.randn(n, generator=g).to(dtype), torch.randn(n, generator=g).to(dtype)
    y, h = layer_norm_triton(x, w, b, 1e-5, residual=r)
    assert torch.equal(h, x + r)
    ref = F.layer_norm((x + r).double(), (n,), w.double(), b.double(), 1e-5)
    assert rel_err(y, ref) < TOL[dtype]
    y_ref, h_ref = layer_norm_ref(x, w, b, 1e-5, residual=r)
    assert torch.equal(h_ref, h) and rel_err(y, y_ref) < TOL[dtype]


def test_long_rows_take_the_chunked_path(monkeypatch):
    """Rows longer than MAX_FUSED_BLOCK loop over chunks (3 passes for LayerNorm); force it on a small row."""
    monkeypatch.setattr(norm_mod, "MAX_FUSED_BLOCK", 256)
    n = 1000                                              # 1024 > 256: chunked, 4 chunks of 256, last masked
    g = torch.Generator().manual_seed(6)
    x = torch.randn(3, n, generator=g) + 5.0              # large mean: E[x²]−mean² would lose digits
    r = torch.randn(3, n, generator=g)
    w, b = torch.randn(n, generator=g), torch.randn(n, generator=g)
    y, h = layer_norm_triton(x, w, b, 1e-5, residual=r)
    assert torch.equal(h, x + r)
    assert rel_err(y, F.layer_norm((x + r).double(), (n,), w.double(), b.double(), 1e-5)) < TOL[torch.float32]
    y2, h2 = rms_norm_triton(x, w, 1e-6, offset=1.0, residual=r)
    assert torch.equal(h2, x + r)
    assert rel_err(y2, oracle_rms(x + r, w, 1e-6, offset=1.0)) < TOL[torch.float32]


def test_strided_and_1d_inputs():
    n = 640
    g = torch.Generator().manual_seed(7)
    big = torch.randn(6, 2 * n, generator=g)
    x = big[:, :n]                                        # row stride 2n, last dim contiguous: no copy needed
    w = torch.randn(n, generator=g)
    assert rel_err(rms_norm_triton(x, w, 1e-6), oracle_rms(x, w, 1e-6)) < TOL[torch.float32]
    xt = torch.randn(n, 4, generator=g).t()               # last dim strided: copied to contiguous first
    assert rel_err(rms_norm_triton(xt, w, 1e-6), oracle_rms(xt, w, 1e-6)) < TOL[torch.float32]
    v = torch.randn(n, generator=g)                       # 1-D x
    assert rel_err(layer_norm_triton(v, w, None, 1e-5), F.layer_norm(v.double(), (n,), w.double())) < 1e-5


def test_bad_input_errors():
    x = torch.randn(4, 640)
    w = torch.randn(640)
    with pytest.raises(ValueError, match=r"weight has shape \(639,\) but x's last dim is n=640"):
        rms_norm_triton(x, torch.randn(639), 1e-6)
    with pytest.raises(ValueError, match=r"bias has shape \(641,\)"):
        layer_norm_triton(x, w, torch.randn(641), 1e-5)
    with pytest.raises(TypeError, match=r"weight dtype torch.float16 does not match x dtype torch.float32"):
        rms_norm_triton(x, w.half(), 1e-6)
    with pytest.raises(TypeError, match=r"residual dtype torch.float16 != x dtype torch.float32"):
        rms_norm_triton(x, w, 1e-6, residual=x.half())
    with pytest.raises(ValueError, match=r"residual shape \(4, 320\) != x shape \(4, 640\)"):
        layer_norm_triton(x, w, None, 1e-5, residual=torch.randn(4, 320))
    with pytest.raises(TypeError, match=r"x dtype torch.int32 is not supported"):
        rms_norm_triton(x.int(), w, 1e-6)
    with pytest.raises(ValueError, match=r"offset=1.0 needs a weight"):
        rms_norm_triton(x, None, 1e-6, offset=1.0)
    with pytest.raises(ValueError, match=r"eps must be >= 0"):
        rms_norm_ref(x, w, -1.0)
    # the references validate the same way (dispatch may pick either)
    with pytest.raises(ValueError, match=r"weight has shape \(639,\)"):
        rms_norm_ref(x, torch.randn(639), 1e-6)


@pytest.mark.parametrize("impl", ["triton", "torch"])
def test_public_ops_dispatch(monkeypatch, impl):
    """vlm_kernels.rms_norm / vlm_kernels.layer_norm reach these implementations with the same results."""
    import vlm_kernels
    monkeypatch.setenv("VLM_KERNELS", impl)
    x, r, w = torch.randn(3, 640), torch.randn(3, 640), torch.randn(640)
    y, h = vlm_kernels.rms_norm(x, w, 1e-6, offset=1.0, residual=r)
    assert torch.equal(h, x + r) and rel_err(y, oracle_rms(x + r, w, 1e-6, 1.0)) < 1e-5
    assert rel_err(vlm_kernels.layer_norm(x, w, None, 1e-5), F.layer_norm(x.double(), (640,), w.double())) < 1e-5
