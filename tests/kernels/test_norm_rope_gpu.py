"""GPU-only checks of the norm and RoPE kernels: bf16, the real compiler, model-sized shapes.

Skipped without CUDA (tests/conftest.py). Oracles run in fp32 on the same (upcast) inputs.
"""
import pytest
import torch
import torch.nn.functional as F

from _tol import TOL, rel_err
from vlm_kernels.norm import layer_norm_triton, rms_norm_ref, rms_norm_triton
from vlm_kernels.rope import rope_ref, rope_triton

pytestmark = pytest.mark.gpu

# max |err| / max |ref| (docs: /work/shared/design/architecture.md tolerance table)
DTYPES = [torch.float32, torch.bfloat16]     # fp16 is covered by the interpreter tests; keeps compiles few


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", [640, 4096])
def test_rms_norm_gpu(n, dtype):
    g = torch.Generator(device="cuda").manual_seed(n)
    x = torch.randn(333, n, device="cuda", generator=g).to(dtype)
    r = torch.randn(333, n, device="cuda", generator=g).to(dtype)
    w = torch.randn(n, device="cuda", generator=g)                  # F32 weight, as in GGUF
    y, h = rms_norm_triton(x, w, 1e-6, offset=1.0, residual=r)
    assert torch.equal(h, x + r)
    hf = (x + r).float()
    ref = hf * torch.rsqrt(hf.pow(2).mean(-1, keepdim=True) + 1e-6) * (w + 1.0)
    assert rel_err(y, ref) < TOL[dtype]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", [1152, 20000])                     # 20000 > MAX_FUSED_BLOCK: chunked path
def test_layer_norm_gpu(n, dtype):
    g = torch.Generator(device="cuda").manual_seed(n)
    x = (torch.randn(77, n, device="cuda", generator=g) + 2).to(dtype)
    w = torch.randn(n, device="cuda", generator=g).to(dtype)
    b = torch.randn(n, device="cuda", generator=g).to(dtype)
    y = layer_norm_triton(x, w, b, 1e-5)
    ref = F.layer_norm(x.float(), (n,), w.float(), b.float(), 1e-5)
    assert rel_err(y, ref) < TOL[dtype]


def test_rms_norm_many_short_rows_gpu():
    """q/k-norm shape: [n_tokens, n_head, head_dim] with several rows per program."""
    x = torch.randn(4097, 16, 128, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(128, device="cuda", dtype=torch.bfloat16)
    assert rel_err(rms_norm_triton(x, w, 1e-6), rms_norm_ref(x.float(), w.float(), 1e-6)) < TOL[torch.bfloat16]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mode, head_dim", [("neox", 128), ("normal", 128), ("neox", 80)])
def test_rope_1d_gpu(mode, head_dim, dtype):
    g = torch.Generator(device="cuda").manual_seed(head_dim)
    n = 1031
    x = torch.randn(n, 8, head_dim, device="cuda", generator=g).to(dtype)
    pos = torch.randint(0, 131072, (n,), device="cuda", generator=g)   # large angles: hardware sin/cos path
    y = rope_triton(x, pos, theta=1e6, mode=mode)
    # the fp32 torch reference on the CPU (exact range reduction) is the oracle
    ref = rope_ref(x.float().cpu(), pos.cpu(), theta=1e6, mode=mode)
    assert rel_err(y.cpu(), ref) < TOL[dtype]


def test_rope_decode_and_partial_gpu():
    x = torch.randn(1, 32, 128, device="cuda", dtype=torch.bfloat16)      # single decode token, 32 heads
    pos = torch.tensor([5000], device="cuda")
    y = rope_triton(x, pos, theta=5e5, mode="normal", n_rot=64)
    ref = rope_ref(x.float().cpu(), pos.cpu(), theta=5e5, mode="normal", n_rot=64)
    assert rel_err(y.cpu(), ref) < TOL[torch.bfloat16]
    assert torch.equal(y[..., 64:], x[..., 64:])


@pytest.mark.parametrize("dtype", DTYPES)
def test_mrope_and_vision_gpu(dtype):
    n = 777
    x = torch.randn(n, 4, 128, device="cuda").to(dtype)
    pos = torch.randint(0, 4000, (4, n), device="cuda", dtype=torch.int32)
    pos[3] = 0
    for kw in (dict(mode="neox", sections=[16, 24, 24, 0]), dict(mode="vision", sections=[32, 32, 0, 0])):
        y = rope_triton(x, pos, theta=1e4, **kw)
        ref = rope_ref(x.float().cpu(), pos.cpu(), theta=1e4, **kw)
        assert rel_err(y.cpu(), ref) < TOL[dtype]
