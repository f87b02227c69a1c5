"""GPU-only checks of the patch-embedding kernel: bf16 tensor cores, every CUDA config, model-sized shapes.

Skipped without CUDA (tests/conftest.py). Oracle: patch_embed_ref with fp32 weights on the same inputs
(TF32 disabled so the fp32 oracle is exact). To keep compile time low, each test pins ONE autotune config
(the first unless parametrised); the main 2-D test runs once per config so every config is checked.
"""
import importlib

import pytest
import torch

from _tol import TOL, rel_err
from vlm_kernels.patch_embed import patch_embed_ref, patch_embed_triton

pe_mod = importlib.import_module("vlm_kernels.patch_embed")   # `vlm_kernels.patch_embed` itself is the public op
pytestmark = pytest.mark.gpu

# max |err| / max |ref| (docs: /work/shared/design/architecture.md tolerance table)
SIGLIP_MEAN, SIGLIP_STD = [0.5, 0.5, 0.5], [0.5, 0.5, 0.5]


@pytest.fixture(autouse=True)
def _no_tf32():
    old = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


@pytest.fixture(autouse=True)
def config(request, monkeypatch):
    """Pin the autotuner to one config (index from indirect parametrisation, default 0)."""
    i = getattr(request, "param", 0)
    monkeypatch.setattr(pe_mod, "_CUDA_CONFIGS", [pe_mod._CUDA_CONFIGS[i]])
    pe_mod._tuned_kernel.cache_clear()
    yield pe_mod._CUDA_CONFIGS[0]
    pe_mod._tuned_kernel.cache_clear()


def weights(D, kernel, dtype, seed):
    g = torch.Generator(device="cuda").manual_seed(seed)
    k = 3
    for s in kernel:
        k *= s
    w = torch.randn((D, 3) + tuple(kernel), device="cuda", generator=g) / k ** 0.5
    b = torch.randn(D, device="cuda", generator=g)
    return w.to(dtype), b, g


@pytest.mark.parametrize("config", range(len(pe_mod._CUDA_CONFIGS)), indirect=True)
def test_2d_every_config_gpu(config):
    """CLIP-L 336/14 (576 patches, D=1024), SigLIP-384/14 through a [..., :378, :378] view of the 384 image
    (the conv ignores the last 6 pixels; no copy), and 8 patches with D=80 (one partial M and N tile)."""
    w, b, g = weights(1024, (14, 14), torch.bfloat16, seed=0)
    x = torch.randn(3, 3, 336, 336, device="cuda", generator=g)
    pos = torch.randn(576, 1024, device="cuda", generator=g)
    y = patch_embed_triton(x, w, b, pos)
    assert y.shape == (3, 576, 1024) and y.dtype == torch.bfloat16
    assert rel_err(y, patch_embed_ref(x, w.float(), b, pos)) < TOL[torch.bfloat16]

    w, b, g = weights(1152, (14, 14), torch.bfloat16, seed=1)
    full = torch.randn(2, 3, 384, 384, device="cuda", generator=g)
    pos = torch.randn(729, 1152, device="cuda", generator=g)
    y = patch_embed_triton(full[..., :378, :378], w, b, pos)
    ref = torch.nn.functional.conv2d(full, w.float(), b, stride=14).flatten(2).transpose(1, 2) + pos
    assert rel_err(y, ref) < TOL[torch.bfloat16]

    w, b, g = weights(80, (14, 14), torch.bfloat16, seed=2)
    x = torch.randn(1, 3, 14, 112, device="cuda", generator=g)
    pos = torch.randn(8, 80, device="cuda", generator=g)
    assert rel_err(patch_embed_triton(x, w, b, pos), patch_embed_ref(x, w.float(), b, pos)) < TOL[torch.bfloat16]


def test_fp32_ieee_gpu():
    w, b, g = weights(1024, (14, 14), torch.float32, seed=3)
    x = torch.randn(2, 3, 336, 336, device="cuda", generator=g)
    pos = torch.randn(576, 1024, device="cuda", generator=g)
    assert rel_err(patch_embed_triton(x, w, b, pos), patch_embed_ref(x, w, b, pos)) < TOL[torch.float32]


def test_uint8_with_fused_normalisation_gpu():
    w, b, g = weights(1152, (14, 14), torch.bfloat16, seed=4)
    raw = torch.randint(0, 256, (2, 3, 14 * 27, 14 * 27), device="cuda", generator=g, dtype=torch.uint8)
    pos = torch.randn(1, 729, 1152, device="cuda", generator=g)
    y = patch_embed_triton(raw, w, b, pos, mean=SIGLIP_MEAN, std=SIGLIP_STD)
    ref = patch_embed_ref(raw, w.float(), b, pos, mean=SIGLIP_MEAN, std=SIGLIP_STD)
    assert rel_err(y, ref) < TOL[torch.bfloat16]


def test_qwen2vl_flat_and_temporal_gpu():
    w, b, g = weights(1280, (2, 14, 14), torch.bfloat16, seed=5)
    flat = torch.randn(2 * 36 * 40, 1176, device="cuda", generator=g)      # processor output, fp32
    y = patch_embed_triton(flat, w)
    assert y.shape == (2880, 1280)
    assert rel_err(y, patch_embed_ref(flat, w.float())) < TOL[torch.bfloat16]
    video = torch.randn(1, 3, 4, 14 * 6, 14 * 10, device="cuda", generator=g)
    y3 = patch_embed_triton(video, w, b)
    assert y3.shape == (1, 2 * 6 * 10, 1280)
    assert rel_err(y3, patch_embed_ref(video, w.float(), b)) < TOL[torch.bfloat16]
