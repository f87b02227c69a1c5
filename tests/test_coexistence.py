"""Our top-level `kernels` package has the import name of Hugging Face's PyPI `kernels` package, which transformers
probes (`is_kernels_available()`) before doing `from kernels import get_kernel, ...`. With both in one environment,
transformers must not mistake ours for theirs, and plain transformers models must keep working."""
from __future__ import annotations

import importlib.metadata
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

ROOT = Path(__file__).resolve().parents[1]
TOL_ABS = 1e-5      # eager vs sdpa attention, fp32, tiny model: measured ~1e-7


def test_kernels_import_is_ours():
    import kernels
    assert Path(kernels.__file__).resolve().parent == ROOT / "kernels"
    assert callable(kernels.qmatmul) and hasattr(kernels, "QTensor")


def test_transformers_does_not_see_hf_kernels():
    import kernels  # noqa: F401  (ours, imported first on purpose)
    from transformers.utils import import_utils
    import_utils.is_kernels_available.cache_clear()
    assert import_utils.is_kernels_available() is False
    # Why it is False today: the import name maps to our distribution, whose version is outside transformers'
    # accepted range for HF kernels. If this fails after a version bump, transformers will try
    # `from kernels import get_kernel` on our package.
    probe = getattr(import_utils, "_is_package_available", None)      # private; absent in some versions
    found, version = probe("kernels", return_version=True) if probe else (False, "N/A")
    if found and version != "N/A":
        ours = importlib.metadata.version("vlm-triton")
        assert version == ours, f"'kernels' resolves to version {version}, not our vlm-triton {ours}"
    # the hub-kernels integration imports and reports kernels as unavailable
    hub_kernels = pytest.importorskip("transformers.integrations.hub_kernels")
    assert not hub_kernels.is_kernels_available()


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_tiny_llama_forward_next_to_our_kernels(attn):
    import kernels  # noqa: F401
    from transformers import LlamaConfig, LlamaForCausalLM
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(0)
    ref = LlamaForCausalLM(cfg).eval()                 # default attention implementation
    torch.manual_seed(0)
    model = LlamaForCausalLM._from_config(cfg, attn_implementation=attn).eval()
    ids = torch.randint(0, 64, (2, 10), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        out = model(input_ids=ids).logits
        expected = ref(input_ids=ids).logits
    assert out.shape == (2, 10, 64) and torch.isfinite(out).all()
    assert (out - expected).abs().max().item() < TOL_ABS
    # generation runs end to end
    with torch.no_grad():
        gen = model.generate(ids[:1, :4], max_new_tokens=3, do_sample=False)
    assert gen.shape == (1, 7) and torch.equal(gen[:, :4], ids[:1, :4])
