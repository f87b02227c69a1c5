"""Test set-up: without CUDA the Triton kernels run through the interpreter on CPU tensors."""
import os

import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    # Must be set before triton is imported anywhere.
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords and not HAS_CUDA:
            item.add_marker(skip_gpu)


@pytest.fixture
def device():
    """Device kernel tests run on: CUDA when present, else CPU (interpreter)."""
    return "cuda" if HAS_CUDA else "cpu"


@pytest.fixture(scope="session")
def tiny_qwen_vl(tmp_path_factory):
    """version ("2" | "2.5") -> (hf_dir, HF model fp32, our Model with its mmproj, n_ctx 256), built once per
    session: a tiny random HF Qwen2-VL / Qwen2.5-VL (tests/hf_tiny.py) converted by our converters."""
    import transformers

    import hf_tiny
    from vlm.convert.hf_to_gguf import convert
    from vlm.convert.mmproj import convert_mmproj
    from vlm.model import load

    root = tmp_path_factory.mktemp("qwen2vl")
    cache = {}

    def get(v):
        if v not in cache:
            d = hf_tiny.make_tiny_qwen2_vl(root / v, version=v)
            convert(d, d / "text.gguf", "f32", progress=False)
            convert_mmproj(d, d / "mmproj.gguf", "f32")
            cls = (transformers.Qwen2VLForConditionalGeneration if v == "2"
                   else transformers.Qwen2_5_VLForConditionalGeneration)
            hf = cls.from_pretrained(str(d), dtype=torch.float32).eval()
            cache[v] = (d, hf, load(str(d / "text.gguf"), str(d / "mmproj.gguf"), device="cpu", n_ctx=256))
        return cache[v]
    return get
